//! The row types a Lookup answers in ([`VectorType`]): float32, float16,
//! bfloat16 and int8 with a per-row scale, all little-endian.
//!
//! A row is handled in two forms:
//! - **packed**: how the front's tier keeps it, one buffer per row: the
//!   values of its type, preceded for [`VectorType::I8`] by the row's
//!   float32 scale. A tier of float16 rows holds half the bytes of float32.
//! - **on the wire**: the values in `LookupResponse.vectors`, an I8 row's
//!   scale apart in `LookupResponse.scales`.
//!
//! Conversions are in bulk over a row: float16 through `half` (F16C
//! instructions where the CPU has them), bfloat16 and int8 in loops the
//! compiler vectorises (no per-value branch or libm call).

use half::{bf16, f16, slice::HalfFloatSliceExt};

use crate::embark::v1::VectorType;

/// The lowercase name of a type, as flags and docs spell it.
pub fn type_name(t: VectorType) -> &'static str {
    match t {
        VectorType::F32 => "f32",
        VectorType::F16 => "f16",
        VectorType::Bf16 => "bf16",
        VectorType::I8 => "i8",
    }
}

/// A type by its name (`f32`, `f16`, `bf16`, `i8`; case-insensitive).
pub fn parse_type(name: &str) -> Option<VectorType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Some(VectorType::F32),
        "f16" | "float16" => Some(VectorType::F16),
        "bf16" | "bfloat16" => Some(VectorType::Bf16),
        "i8" | "int8" => Some(VectorType::I8),
        _ => None,
    }
}

/// Bytes of one value of `t`.
pub fn value_bytes(t: VectorType) -> usize {
    match t {
        VectorType::F32 => 4,
        VectorType::F16 | VectorType::Bf16 => 2,
        VectorType::I8 => 1,
    }
}

/// Bytes of a packed row of `dim` values of `t` (an I8 row's scale included).
pub fn packed_row_bytes(t: VectorType, dim: usize) -> usize {
    dim * value_bytes(t) + if t == VectorType::I8 { 4 } else { 0 }
}

/// Appends `row` packed as `t` to `out`.
pub fn pack(t: VectorType, row: &[f32], out: &mut Vec<u8>) {
    match t {
        VectorType::F32 => crate::extend_le_f32(out, row),
        // Through a buffer on the stack, a block at a time: no allocation
        // per row on the Lookup path.
        VectorType::F16 => {
            let mut half = [f16::ZERO; BLOCK];
            for block in row.chunks(BLOCK) {
                let half = &mut half[..block.len()];
                half.convert_from_f32_slice(block);
                extend_le_u16(out, bytemuck::cast_slice(half));
            }
        }
        VectorType::Bf16 => {
            let mut half = [bf16::ZERO; BLOCK];
            for block in row.chunks(BLOCK) {
                let half = &mut half[..block.len()];
                half.convert_from_f32_slice(block);
                extend_le_u16(out, bytemuck::cast_slice(half));
            }
        }
        VectorType::I8 => {
            let scale = i8_scale(row);
            out.extend_from_slice(&scale.to_le_bytes());
            extend_i8(out, row, scale);
        }
    }
}

/// Values converted per block of [`pack`].
const BLOCK: usize = 256;

/// The symmetric scale of a row: max |finite value| / 127 (0 for a row of
/// zeros or of non-finite values only).
fn i8_scale(row: &[f32]) -> f32 {
    let max = row.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs()));
    max / 127.0
}

/// Appends `row / scale` rounded, as signed bytes: clamped to ±127 (an
/// infinity, or every value of a row whose scale underflows to 0), NaN as
/// 0. Rounds half away from zero by truncation, which vectorises, unlike
/// `round`.
fn extend_i8(out: &mut Vec<u8>, row: &[f32], scale: f32) {
    out.extend(row.iter().map(|v| {
        let r = (v / scale).clamp(-127.0, 127.0);
        (r + 0.5f32.copysign(r)) as i32 as i8 as u8
    }));
}

/// Appends the values of a packed row of `t` to `out` as float32; `false`
/// (nothing appended) when its length is not a packed row of `dim`.
pub fn unpack(t: VectorType, packed: &[u8], dim: usize, out: &mut Vec<f32>) -> bool {
    if packed.len() != packed_row_bytes(t, dim) {
        return false;
    }
    match t {
        VectorType::I8 => {
            let (scale, values) = packed.split_at(4);
            let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
            out.extend(values.iter().map(|&q| q as i8 as f32 * scale));
        }
        _ => wire_to_f32(t, packed, out),
    }
    true
}

/// Appends a packed row of `from` to a response of type `to`: its values
/// to `vectors` and, for I8, its scale to `scales`. The same type is a
/// copy; another goes through float32 in `scratch`. `false` (nothing
/// appended) when `packed` is not a row of `dim`.
pub fn append_as(
    from: VectorType,
    packed: &[u8],
    dim: usize,
    to: VectorType,
    out: &mut WireRows,
    scratch: &mut Vec<f32>,
) -> bool {
    if packed.len() != packed_row_bytes(from, dim) {
        return false;
    }
    if from == to {
        out.push_packed(to, packed);
        return true;
    }
    scratch.clear();
    unpack(from, packed, dim, scratch);
    if to == VectorType::I8 {
        let scale = i8_scale(scratch);
        out.scales.extend_from_slice(&scale.to_le_bytes());
        extend_i8(&mut out.vectors, scratch, scale);
    } else {
        pack(to, scratch, &mut out.vectors);
    }
    true
}

/// The rows of a response being built: values and (I8) scales.
#[derive(Debug, Default)]
pub struct WireRows {
    pub vectors: Vec<u8>,
    pub scales: Vec<u8>,
}

impl WireRows {
    /// Room for `rows` rows of `dim` values of `t`.
    pub fn with_capacity(t: VectorType, rows: usize, dim: usize) -> Self {
        let scales = if t == VectorType::I8 { rows * 4 } else { 0 };
        Self { vectors: Vec::with_capacity(rows * dim * value_bytes(t)), scales: Vec::with_capacity(scales) }
    }

    /// Appends a packed row of `t` (the caller checked its length).
    fn push_packed(&mut self, t: VectorType, packed: &[u8]) {
        if t == VectorType::I8 {
            let (scale, values) = packed.split_at(4);
            self.scales.extend_from_slice(scale);
            self.vectors.extend_from_slice(values);
        } else {
            self.vectors.extend_from_slice(packed);
        }
    }
}

/// A response's matrix as float32 (clients and tests): `vectors` of `t`,
/// with `scales` for I8. `None` when the lengths do not make whole rows of
/// `dim`.
pub fn decode_matrix(t: VectorType, vectors: &[u8], scales: &[u8], dim: usize) -> Option<Vec<f32>> {
    let row = dim.checked_mul(value_bytes(t))?;
    if row == 0 {
        return vectors.is_empty().then(Vec::new);
    }
    if !vectors.len().is_multiple_of(row) {
        return None;
    }
    let rows = vectors.len() / row;
    let mut out = Vec::with_capacity(rows * dim);
    if t == VectorType::I8 {
        if scales.len() != rows * 4 {
            return None;
        }
        for (values, scale) in vectors.chunks_exact(row).zip(scales.chunks_exact(4)) {
            let scale = f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]]);
            out.extend(values.iter().map(|&q| q as i8 as f32 * scale));
        }
    } else {
        wire_to_f32(t, vectors, &mut out);
    }
    Some(out)
}

/// Float values of a float type's little-endian bytes, appended.
fn wire_to_f32(t: VectorType, bytes: &[u8], out: &mut Vec<f32>) {
    let start = out.len();
    match t {
        VectorType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        VectorType::F16 => {
            let half: Vec<f16> = bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]])).collect();
            out.resize(start + half.len(), 0.0);
            half.convert_to_f32_slice(&mut out[start..]);
        }
        VectorType::Bf16 => {
            out.extend(bytes.chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)))
        }
        VectorType::I8 => out.extend(bytes.iter().map(|&q| q as i8 as f32)),
    }
}

/// Appends 16-bit values little-endian (one copy on a little-endian host).
fn extend_le_u16(out: &mut Vec<u8>, values: &[u16]) {
    if cfg!(target_endian = "little") {
        out.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    const ALL: [VectorType; 4] = [VectorType::F32, VectorType::F16, VectorType::Bf16, VectorType::I8];

    #[test]
    fn every_type_round_trips_through_packed_and_wire_forms() {
        let row: Vec<f32> = (0..384).map(|i| ((i as f32) * 0.37).sin() * 0.2).collect();
        for t in ALL {
            let mut packed = Vec::new();
            pack(t, &row, &mut packed);
            assert_eq!(packed.len(), packed_row_bytes(t, row.len()), "{t:?}");
            let mut back = Vec::new();
            assert!(unpack(t, &packed, row.len(), &mut back));
            let c = cosine(&row, &back);
            assert!(c > 0.999, "{t:?}: cosine {c}");

            // Every packed type to every wire type: decoded, the same
            // values as unpacking then packing directly.
            for to in ALL {
                let mut wire = WireRows::with_capacity(to, 2, row.len());
                let mut scratch = Vec::new();
                assert!(append_as(t, &packed, row.len(), to, &mut wire, &mut scratch));
                assert!(append_as(t, &packed, row.len(), to, &mut wire, &mut scratch));
                assert_eq!(wire.vectors.len(), 2 * row.len() * value_bytes(to));
                let decoded = decode_matrix(to, &wire.vectors, &wire.scales, row.len()).expect("whole rows");
                let mut direct = Vec::new();
                pack(to, &back, &mut direct);
                let mut want = Vec::new();
                unpack(to, &direct, row.len(), &mut want);
                assert_eq!(&decoded[..row.len()], &want[..], "{t:?} -> {to:?}");
                assert_eq!(&decoded[row.len()..], &want[..], "{t:?} -> {to:?}, second row");
            }
        }
        assert!(!append_as(VectorType::F32, &[0; 6], 2, VectorType::F16, &mut WireRows::default(), &mut Vec::new()));
    }

    #[test]
    fn float_types_are_exact_where_they_can_be_and_i8_is_symmetric() {
        let row = [1.0f32, -0.5, 0.0, 2.0, -2.0];
        for t in [VectorType::F32, VectorType::F16, VectorType::Bf16] {
            let mut packed = Vec::new();
            pack(t, &row, &mut packed);
            let mut back = Vec::new();
            unpack(t, &packed, row.len(), &mut back);
            assert_eq!(back, row, "{t:?}: values exact in the type come back exact");
        }
        let mut packed = Vec::new();
        pack(VectorType::I8, &row, &mut packed);
        assert_eq!(f32::from_le_bytes([packed[0], packed[1], packed[2], packed[3]]), 2.0 / 127.0);
        assert_eq!(&packed[4..], &[64i8 as u8, (-32i8) as u8, 0, 127, (-127i8) as u8]);
        // An all-zero row: scale 0, values 0, no division by zero.
        let mut zero = Vec::new();
        pack(VectorType::I8, &[0.0; 4], &mut zero);
        assert_eq!(zero, vec![0; 8]);
    }

    /// Review of issue 14: a row of tiny values made `1 / scale` infinite
    /// and its bytes wrapped (`inf as i32 as i8` is -1); an infinity made
    /// the whole row zeros.
    #[test]
    fn i8_keeps_tiny_rows_and_clamps_infinities() {
        let tiny = [3e-38f32, -1.5e-38, 0.0];
        let mut packed = Vec::new();
        pack(VectorType::I8, &tiny, &mut packed);
        // The scale is subnormal, so its precision is a few bits: -63 or -64.
        let q: Vec<i8> = packed[4..].iter().map(|b| *b as i8).collect();
        assert!(q[0] == 127 && (-64..=-63).contains(&q[1]) && q[2] == 0, "signs and magnitudes kept: {q:?}");
        let odd = [1.0f32, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.5];
        let mut packed = Vec::new();
        pack(VectorType::I8, &odd, &mut packed);
        assert_eq!(f32::from_le_bytes([packed[0], packed[1], packed[2], packed[3]]), 1.0 / 127.0);
        assert_eq!(&packed[4..], &[127, 127, (-127i8) as u8, 0, (-64i8) as u8]);
        let mut none = Vec::new();
        pack(VectorType::I8, &[f32::NAN, f32::INFINITY], &mut none);
        let mut back = Vec::new();
        assert!(unpack(VectorType::I8, &none, 2, &mut back));
        assert!(back.iter().all(|v| *v == 0.0), "no finite value: scale 0, zeros: {back:?}");
    }

    #[test]
    fn a_matrix_of_the_wrong_length_is_refused() {
        assert!(decode_matrix(VectorType::F16, &[0; 7], &[], 2).is_none());
        assert!(decode_matrix(VectorType::I8, &[0; 4], &[0; 4], 2).is_none(), "two rows need two scales");
        assert_eq!(decode_matrix(VectorType::I8, &[2, 254], &1.5f32.to_le_bytes(), 2), Some(vec![3.0, -3.0]));
        assert_eq!(parse_type("BF16"), Some(VectorType::Bf16));
        assert_eq!(parse_type("f64"), None);
        assert!(ALL.iter().all(|t| parse_type(type_name(*t)) == Some(*t)));
    }
}
