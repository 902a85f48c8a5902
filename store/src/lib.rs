//! The embeddings table that EmbArk reads and KFC writes.
//!
//! - [`EmbeddingStore`]: the one trait both sides use (batch get, put
//!   vectors, put failure records, delete). Implementations must make a
//!   write visible to every later `get_many`, and must survive a restart.
//! - [`embedded::EmbeddedStore`]: the single-machine implementation on one
//!   redb file, which also holds the durable queue of pending misses
//!   ([`embedded::PendingMisses`]) for `embark up`.
//! - [`cql::CqlStore`]: ScyllaDB/Cassandra through the `scylla` driver, for
//!   the distributed deployment; schema by [`cql::CqlStore::migrate`].
//! - [`args`]: the store flags `embark` and `kfc` share.
//! - [`row`]: the row types and their compact binary encoding.
//! - [`storage_key`]: keys longer than [`MAX_INLINE_KEY_BYTES`] are stored under
//!   a stable hash, so a store never sees unbounded keys.

pub mod args;
pub mod cql;
pub mod embedded;
pub mod row;

use std::borrow::Cow;

use async_trait::async_trait;

pub use row::{FailureRecord, StoredRow};

/// Keys up to this many bytes are stored as they are; longer ones (long
/// URLs, long texts) under `storage_key`'s hash.
pub const MAX_INLINE_KEY_BYTES: usize = 256;

/// The key under which `key` is stored: itself when short, else a stable
/// 128-bit hash (`h128:` + 32 hex digits). xxh3-128 is stable across
/// versions and platforms; a collision needs ~2^64 distinct long keys.
pub fn storage_key(key: &str) -> Cow<'_, str> {
    if key.len() <= MAX_INLINE_KEY_BYTES {
        Cow::Borrowed(key)
    } else {
        Cow::Owned(format!("h128:{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("embedded store: {0}")]
    Embedded(#[from] redb::Error),
    #[error("stored row for model {model:?} is corrupt: {reason}")]
    Corrupt { model: String, reason: String },
    #[error("store task failed: {0}")]
    Task(String),
    #[error("CQL store: {0}")]
    Cql(String),
    #[error("store configuration: {0}")]
    Config(String),
}

/// The embeddings table, one row per (model, key).
///
/// Batch methods take a model and many keys because that is how both sides
/// use it: a Lookup reads a batch, the fill loop writes one.
#[async_trait]
pub trait EmbeddingStore: Send + Sync + 'static {
    /// The row of each key, in order; `None` where nothing is stored.
    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError>;

    /// Stores vectors, replacing any previous row (vector or failure).
    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError>;

    /// Stores failure records for inputs that cannot be embedded.
    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError>;

    /// Forgets the rows of these keys; absent keys are ignored.
    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError>;

    /// One page of a model's stored vectors (failure records are skipped),
    /// from `cursor` on (`None`: the start). The order is the store's own
    /// and stable, so a [`ScanCursor`] saved to disk resumes a scan in a
    /// later process. Keys longer than [`MAX_INLINE_KEY_BYTES`] come back
    /// as their stored hash. A page may hold fewer than `page` rows (or
    /// none) before the end; the scan is over when `next` is `None`.
    async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError>;
}

/// Where a [`EmbeddingStore::scan`] stopped: opaque bytes, hex in checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanCursor(pub Vec<u8>);

impl ScanCursor {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if !s.len().is_multiple_of(2) {
            return None;
        }
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect::<Option<_>>().map(Self)
    }
}

/// A page of [`EmbeddingStore::scan`].
#[derive(Debug, Default)]
pub struct ScanPage {
    /// (stored key, vector).
    pub rows: Vec<(String, Vec<f32>)>,
    /// Where the next page starts; `None` once the scan is complete.
    pub next: Option<ScanCursor>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_kept_long_keys_hashed_stably() {
        assert_eq!(storage_key("abc"), "abc");
        let long = "x".repeat(MAX_INLINE_KEY_BYTES + 1);
        let a = storage_key(&long);
        assert!(a.starts_with("h128:") && a.len() == 5 + 32, "{a}");
        assert_eq!(a, storage_key(&long));
        assert_ne!(a, storage_key(&"y".repeat(MAX_INLINE_KEY_BYTES + 1)));
    }

    #[test]
    fn scan_cursors_round_trip_through_hex() {
        let c = ScanCursor(vec![0, 1, 0xab, 0xff]);
        assert_eq!(c.to_hex(), "0001abff");
        assert_eq!(ScanCursor::from_hex(&c.to_hex()), Some(c));
        assert_eq!(ScanCursor::from_hex("abc"), None);
        assert_eq!(ScanCursor::from_hex("zz"), None);
    }
}
