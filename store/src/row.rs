//! Row types and the compact encoding the embedded store writes.
//!
//! Layout (little-endian): `status u8 | created_at_ms i64 | payload`, where
//! a vector's payload is `dim u32 | dim x f32` and a failure's is
//! `code i32 | reason (UTF-8, rest of the value)`. Statuses 0 (vector) and
//! 1 (failure) match the CQL table's `status int` column; status 2 is the
//! embedded store's delete record ([`STATUS_DELETED`]), which CQL does not
//! have (it deletes the row and relies on write timestamps).

/// What the store holds for one (model, key).
#[derive(Debug, Clone, PartialEq)]
pub enum StoredRow {
    Vector {
        vector: Vec<f32>,
        created_at_ms: i64,
    },
    Failed(FailureRecord),
    /// A value that does not decode (a torn write, another program's row,
    /// a vector whose bytes disagree with its dim). Reported per key, so
    /// one bad row does not fail a batch; readers treat it as absent and
    /// the next fill overwrites it.
    Corrupt {
        reason: CorruptRow,
    },
}

/// Why a stored value does not decode ([`StoredRow::Corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptRow {
    /// Shorter than the fixed header.
    #[error("value of {len} bytes is too short")]
    TooShort { len: usize },
    /// A vector whose bytes are not `dim` float32s.
    #[error("dim {dim} but {bytes} vector bytes")]
    DimMismatch { dim: i64, bytes: usize },
    /// A status byte (or CQL `status`) that is no row kind this version knows.
    #[error("unknown status {0}")]
    UnknownStatus(i64),
}

/// Why an input could not be embedded, and when that was found out. Only
/// permanent failures are recorded; they expire so an input is tried again
/// eventually (the server may have been fixed).
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRecord {
    /// `retina.v1.FailureCode` value.
    pub code: i32,
    pub reason: String,
    pub at_unix_ms: i64,
}

pub const STATUS_VECTOR: u8 = 0;
pub const STATUS_FAILED: u8 = 1;
/// The embedded store's record of a delete (`status | deleted_at_ms | 0u32`):
/// reads see no row, and a fill of an input seen before the delete does
/// not bring the row back (see `EmbeddingStore::put_filled`).
pub const STATUS_DELETED: u8 = 2;

pub fn encode_deleted(deleted_at_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 4);
    out.push(STATUS_DELETED);
    out.extend_from_slice(&deleted_at_ms.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// When the value records a delete, the time of the delete.
pub fn deleted_at(bytes: &[u8]) -> Option<i64> {
    (bytes.first() == Some(&STATUS_DELETED))
        .then(|| bytes.get(1..9).and_then(|b| b.try_into().ok()).map(i64::from_le_bytes).unwrap_or(i64::MAX))
}

const HEADER: usize = 1 + 8;

pub fn encode_vector(vector: &[f32], created_at_ms: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 4 + vector.len() * 4);
    out.push(STATUS_VECTOR);
    out.extend_from_slice(&created_at_ms.to_le_bytes());
    out.extend_from_slice(&(vector.len() as u32).to_le_bytes());
    for v in vector {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

pub fn encode_failure(f: &FailureRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 4 + f.reason.len());
    out.push(STATUS_FAILED);
    out.extend_from_slice(&f.at_unix_ms.to_le_bytes());
    out.extend_from_slice(&f.code.to_le_bytes());
    out.extend_from_slice(f.reason.as_bytes());
    out
}

/// Decodes a stored value; a value that does not decode is
/// [`StoredRow::Corrupt`], saying what is wrong.
pub fn decode_or_corrupt(bytes: &[u8]) -> StoredRow {
    decode(bytes).unwrap_or_else(|reason| StoredRow::Corrupt { reason })
}

/// Decodes a stored value; `Err` says what is wrong.
pub fn decode(bytes: &[u8]) -> Result<StoredRow, CorruptRow> {
    let too_short = || CorruptRow::TooShort { len: bytes.len() };
    let (header, rest) = bytes.split_first_chunk::<{ HEADER + 4 }>().ok_or_else(too_short)?;
    let at = i64::from_le_bytes(header[1..9].try_into().map_err(|_| too_short())?);
    let word = <[u8; 4]>::try_from(&header[9..13]).map_err(|_| too_short())?;
    match header[0] {
        STATUS_VECTOR => {
            let dim = u32::from_le_bytes(word) as usize;
            if rest.len() != dim * 4 {
                return Err(CorruptRow::DimMismatch { dim: dim as i64, bytes: rest.len() });
            }
            let vector = rest.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            Ok(StoredRow::Vector { vector, created_at_ms: at })
        }
        STATUS_FAILED => Ok(StoredRow::Failed(FailureRecord {
            code: i32::from_le_bytes(word),
            reason: String::from_utf8_lossy(rest).into_owned(),
            at_unix_ms: at,
        })),
        s => Err(CorruptRow::UnknownStatus(s.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let v = vec![1.0, -2.5, f32::MIN_POSITIVE];
        assert_eq!(decode(&encode_vector(&v, 42)), Ok(StoredRow::Vector { vector: v, created_at_ms: 42 }));
        let f = FailureRecord { code: 3, reason: "not an image".into(), at_unix_ms: 7 };
        assert_eq!(decode(&encode_failure(&f)), Ok(StoredRow::Failed(f)));
        assert_eq!(decode(&[0, 1, 2]), Err(CorruptRow::TooShort { len: 3 }));
        let mut bad = encode_vector(&[1.0], 0);
        bad.pop();
        assert_eq!(decode(&bad), Err(CorruptRow::DimMismatch { dim: 1, bytes: 3 }));
        let mut unknown = encode_vector(&[1.0], 0);
        unknown[0] = 9;
        assert_eq!(decode(&unknown), Err(CorruptRow::UnknownStatus(9)));
        assert!(matches!(decode_or_corrupt(&unknown), StoredRow::Corrupt { reason: CorruptRow::UnknownStatus(9) }));
    }
}
