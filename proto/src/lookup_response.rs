//! `embark.v1.LookupResponse`, written by hand so that its matrix is sent
//! from the rows where they already are.
//!
//! prost's generated message holds the matrix in one `vectors` buffer, so
//! the front used to copy every row into it, and the codec then copied
//! that buffer into tonic's encode buffer: two copies of up to hundreds of
//! KiB per answer. This type also carries `chunks`, the answer's rows as
//! shared `Bytes` (the tier's own buffers): they are written after
//! `vectors` as the rest of field 2, straight into the encode buffer, one
//! copy in all. On the wire nothing changes: field 2 is one `bytes` field
//! whose content is `vectors` followed by the chunks, so every client
//! decodes it as before (into `vectors`; a decoded message has no chunks),
//! and `tests::the_wire_is_the_generated_message_s` holds the bytes equal
//! to prost's own encoding of the same message.
//!
//! The generated code uses this type through `extern_path` (build.rs).

use bytes::{Buf, BufMut, Bytes};
use prost::{
    DecodeError, Message,
    encoding::{self, DecodeContext, WireType},
};

#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct LookupResponse {
    /// Length of each row.
    pub dim: u32,
    /// keys.len() x dim values of `vector_type`, row-major, in request
    /// order; on the sending side, followed by `chunks`.
    pub vectors: Bytes,
    /// One `Source` per key, in request order.
    pub sources: Vec<i32>,
    /// The model version every row of this answer belongs to.
    pub version: String,
    /// The rows' `VectorType`.
    pub vector_type: i32,
    /// I8 only: one float32 (little-endian) per row, its scale.
    pub scales: Bytes,
    /// The rest of the matrix, sent after `vectors` as the same field (see
    /// the module's doc); always empty in a decoded message.
    pub chunks: Vec<Bytes>,
}

impl std::fmt::Debug for LookupResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The matrix by its size: a debug line of 300 KiB helps no one.
        f.debug_struct("LookupResponse")
            .field("dim", &self.dim)
            .field("matrix_bytes", &self.matrix_len())
            .field("sources", &self.sources)
            .field("version", &self.version)
            .field("vector_type", &self.vector_type)
            .field("scales_bytes", &self.scales.len())
            .finish()
    }
}

impl LookupResponse {
    /// Bytes of the whole matrix: `vectors` and the chunks.
    pub fn matrix_len(&self) -> usize {
        self.vectors.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }

    /// The whole matrix in one buffer (a copy only when there are chunks).
    pub fn matrix(&self) -> Bytes {
        if self.chunks.is_empty() {
            return self.vectors.clone();
        }
        let mut out = Vec::with_capacity(self.matrix_len());
        out.extend_from_slice(&self.vectors);
        self.chunks.iter().for_each(|c| out.extend_from_slice(c));
        Bytes::from(out)
    }
}

impl Message for LookupResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.dim != 0 {
            encoding::uint32::encode(1, &self.dim, buf);
        }
        let matrix = self.matrix_len();
        if matrix != 0 {
            encoding::encode_key(2, WireType::LengthDelimited, buf);
            encoding::encode_varint(matrix as u64, buf);
            buf.put_slice(&self.vectors);
            for chunk in &self.chunks {
                buf.put_slice(chunk);
            }
        }
        encoding::int32::encode_packed(3, &self.sources, buf);
        if !self.version.is_empty() {
            encoding::string::encode(4, &self.version, buf);
        }
        if self.vector_type != 0 {
            encoding::int32::encode(5, &self.vector_type, buf);
        }
        if !self.scales.is_empty() {
            encoding::bytes::encode(6, &self.scales, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        let field = |name: &'static str| {
            move |mut e: DecodeError| {
                e.push("LookupResponse", name);
                e
            }
        };
        match tag {
            1 => encoding::uint32::merge(wire_type, &mut self.dim, buf, ctx).map_err(field("dim")),
            2 => {
                // A later occurrence replaces the field, chunks included.
                self.chunks.clear();
                encoding::bytes::merge(wire_type, &mut self.vectors, buf, ctx).map_err(field("vectors"))
            }
            3 => encoding::int32::merge_repeated(wire_type, &mut self.sources, buf, ctx).map_err(field("sources")),
            4 => encoding::string::merge(wire_type, &mut self.version, buf, ctx).map_err(field("version")),
            5 => encoding::int32::merge(wire_type, &mut self.vector_type, buf, ctx).map_err(field("vector_type")),
            6 => encoding::bytes::merge(wire_type, &mut self.scales, buf, ctx).map_err(field("scales")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let matrix = self.matrix_len();
        (if self.dim != 0 { encoding::uint32::encoded_len(1, &self.dim) } else { 0 })
            + (if matrix != 0 {
                encoding::key_len(2) + encoding::encoded_len_varint(matrix as u64) + matrix
            } else {
                0
            })
            + encoding::int32::encoded_len_packed(3, &self.sources)
            + (if self.version.is_empty() { 0 } else { encoding::string::encoded_len(4, &self.version) })
            + (if self.vector_type != 0 { encoding::int32::encoded_len(5, &self.vector_type) } else { 0 })
            + (if self.scales.is_empty() { 0 } else { encoding::bytes::encoded_len(6, &self.scales) })
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message prost would generate from embark.proto.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(uint32, tag = "1")]
        dim: u32,
        #[prost(bytes = "bytes", tag = "2")]
        vectors: Bytes,
        #[prost(int32, repeated, tag = "3")]
        sources: Vec<i32>,
        #[prost(string, tag = "4")]
        version: String,
        #[prost(int32, tag = "5")]
        vector_type: i32,
        #[prost(bytes = "bytes", tag = "6")]
        scales: Bytes,
    }

    fn rows(n: usize, width: usize) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from((0..width).map(|b| (i * 31 + b) as u8).collect::<Vec<u8>>())).collect()
    }

    #[test]
    fn the_wire_is_the_generated_message_s() {
        for (n, width, vector_type, scales) in
            [(0, 0, 0, 0), (1, 16, 0, 0), (64, 5120, 0, 0), (3, 768, 1, 0), (5, 384, 3, 20), (200, 1, 2, 0)]
        {
            let chunks = rows(n, width);
            let flat: Vec<u8> = chunks.concat();
            let scales = Bytes::from(vec![9u8; scales]);
            let sources: Vec<i32> = (0..n as i32).map(|i| i % 6).collect();
            let version = if n % 2 == 0 { String::new() } else { "m/v1".to_owned() };
            let generated = Generated {
                dim: width as u32,
                vectors: Bytes::from(flat.clone()),
                sources: sources.clone(),
                version: version.clone(),
                vector_type,
                scales: scales.clone(),
            };
            let want = generated.encode_to_vec();
            // The rows as chunks, all or after a head in `vectors`.
            let split = flat.len() / 3;
            for (vectors, chunks) in [
                (Bytes::new(), chunks.clone()),
                (Bytes::from(flat.clone()), Vec::new()),
                (Bytes::from(flat[..split].to_vec()), vec![Bytes::from(flat[split..].to_vec())]),
            ] {
                let ours = LookupResponse {
                    dim: width as u32,
                    vectors,
                    sources: sources.clone(),
                    version: version.clone(),
                    vector_type,
                    scales: scales.clone(),
                    chunks,
                };
                assert_eq!(ours.encoded_len(), want.len(), "{n} rows of {width}");
                let bytes = ours.encode_to_vec();
                assert!(bytes == want, "{n} rows of {width}: the bytes differ");
                // Decoded by ours and by the generated message alike.
                let back = LookupResponse::decode(bytes.as_slice()).expect("decodes");
                assert!(back.chunks.is_empty());
                assert_eq!(back.matrix(), ours.matrix());
                assert_eq!(
                    (back.dim, &back.sources, &back.version, back.scales.clone()),
                    (ours.dim, &sources, &version, scales.clone())
                );
                assert_eq!(Generated::decode(bytes.as_slice()).expect("decodes"), generated);
            }
        }
    }
}
