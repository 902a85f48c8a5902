//! The embeddings table that EmbArk reads and KFC writes.
//!
//! - [`EmbeddingStore`]: the one trait both sides use (batch get, put
//!   vectors, put failure records, delete). Implementations must make a
//!   write visible to every later `get_many`, and must survive a restart.
//! - [`embedded::EmbeddedStore`]: the single-machine implementation on one
//!   redb file, which also holds the durable miss queue of `embark up`
//!   (`embark_queue::local`, in its own table).
//! - [`cql::CqlStore`]: ScyllaDB/Cassandra through the `scylla` driver, for
//!   the distributed deployment; schema by [`cql::CqlStore::migrate`].
//! - [`args`]: the store flags `embark` and `kfc` share.
//! - [`row`]: the row types and their compact binary encoding.
//! - [`wrap::StoreWrapper`]: a store over another that changes only some
//!   calls and forwards the rest.
//! - [`storage_key`]: keys longer than [`MAX_INLINE_KEY_BYTES`] are stored under
//!   a stable hash, so a store never sees unbounded keys.

pub mod args;
pub mod cql;
pub mod embedded;
pub mod row;
pub mod secret;
pub mod wrap;

use std::borrow::Cow;

use async_trait::async_trait;

pub use row::{CorruptRow, FailureRecord, StoredRow};

/// Keys up to this many bytes are stored as they are; longer ones (long
/// URLs, long texts) under `storage_key`'s hash.
pub const MAX_INLINE_KEY_BYTES: usize = 256;

/// The prefix of a hashed storage key. No inline key starts with it (such
/// a key is hashed too), so the two kinds never share a row.
pub const HASHED_KEY_PREFIX: &str = "h256:";

/// The key under which `key` is stored: itself when short and not looking
/// like a hashed key, else `h256:` + the 64 hex digits of its SHA-256.
///
/// Keys are chosen by whoever publishes URLs, so the hash must resist a
/// crafted collision (one would let a URL overwrite another's row):
/// SHA-256, not a fast non-cryptographic hash. Stable across versions and
/// platforms, as stored rows require.
pub fn storage_key(key: &str) -> Cow<'_, str> {
    if key.len() <= MAX_INLINE_KEY_BYTES && !key.starts_with(HASHED_KEY_PREFIX) {
        return Cow::Borrowed(key);
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(HASHED_KEY_PREFIX.len() + 64);
    out.push_str(HASHED_KEY_PREFIX);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    Cow::Owned(out)
}

pub use embark_proto::{VERSION_SEPARATOR, model_namespace as namespace};

/// Why a store call failed. [`StoreError::is_transient`] tells a failure
/// that may pass if the same call is made again later (a timeout, too few
/// replicas) from one that will not until someone changes something (a
/// missing table, a bad statement, a damaged file).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded store's redb file failed: I/O, a damaged file, a file
    /// another process holds.
    #[error("embedded store: {0}")]
    Embedded(#[from] redb::Error),
    /// The blocking task that ran the call panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The CQL cluster could not serve the request now: a client or
    /// server timeout, too few live replicas, an overloaded or
    /// bootstrapping node, a broken connection, no node reachable.
    /// Transient.
    #[error("CQL store unavailable: {0}")]
    CqlUnavailable(#[source] Box<cql::CqlError>),
    /// The CQL cluster refused the request itself: a missing keyspace or
    /// table (`embark migrate` has not run), a statement that does not
    /// prepare, a bad query, rows of other types than this version reads.
    /// Not transient: the same request fails until the schema or the
    /// deployment is fixed.
    #[error("CQL store refused the request: {0}")]
    CqlRejected(#[source] Box<cql::CqlError>),
    /// A scan cursor this store did not hand out.
    #[error("scan cursor is not from this store")]
    BadCursor(#[source] std::string::FromUtf8Error),
    /// Bad store settings (a malformed `--store` URL).
    #[error("store configuration: {0}")]
    Config(String),
    /// Bad CQL credential or TLS settings: flags that do not fit together,
    /// a password file that cannot be read.
    #[error("store configuration: {0}")]
    CqlSettings(#[from] args::CqlSettingsError),
}

impl StoreError {
    /// Whether the same call may succeed if made again later, with nothing
    /// changed: CQL timeouts and unavailability, and the embedded store's
    /// I/O errors (a full disk may be freed). Schema, query, configuration
    /// and data errors, and a panicked task, are not.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::CqlUnavailable(_) => true,
            StoreError::Embedded(e) => matches!(e, redb::Error::Io(_)),
            StoreError::Task(_)
            | StoreError::CqlRejected(_)
            | StoreError::BadCursor(_)
            | StoreError::Config(_)
            | StoreError::CqlSettings(_) => false,
        }
    }
}

/// What a fill writes for one key ([`EmbeddingStore::put_filled`]).
#[derive(Debug, Clone, PartialEq)]
pub struct FilledRow {
    pub key: String,
    /// When the input was first seen missing (ms since the epoch).
    pub seen_at_ms: i64,
    pub value: Filled,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filled {
    Vector(Vec<f32>),
    Failure(FailureRecord),
}

/// One key's read in [`EmbeddingStore::get_each`]: its row (`None`: nothing
/// stored) or the store's error, shared when one error fails many keys.
pub type RowRead = Result<Option<StoredRow>, std::sync::Arc<StoreError>>;

/// The embeddings table, one row per (model, key).
///
/// Batch methods take a model and many keys because that is how both sides
/// use it: a Lookup reads a batch, the fill loop writes one.
#[async_trait]
pub trait EmbeddingStore: Send + Sync + 'static {
    /// The row of each key, in order; `None` where nothing is stored.
    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError>;

    /// Reads the keys and hands each row to `sink` (with the key's index)
    /// as soon as it arrives, so a caller with a deadline keeps what came
    /// in time. A key's own failure goes to `sink` and does not stop the
    /// others. The default reads the whole batch with `get_many`, right for
    /// a store whose batch read is one local transaction.
    async fn get_each(&self, model: &str, keys: &[String], sink: &mut (dyn FnMut(usize, RowRead) + Send)) {
        match self.get_many(model, keys).await {
            Ok(rows) => rows.into_iter().enumerate().for_each(|(i, r)| sink(i, Ok(r))),
            Err(e) => {
                let e = std::sync::Arc::new(e);
                (0..keys.len()).for_each(|i| sink(i, Err(e.clone())))
            }
        }
    }

    /// Stores vectors, replacing any previous row (vector or failure).
    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError>;

    /// Stores failure records for inputs that cannot be embedded.
    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError>;

    /// Stores what a fill found for inputs it saw at `seen_at_ms` (the
    /// miss's first sighting), unless the key was deleted after that: an
    /// Invalidate wins against a fill that was already under way when it
    /// ran (the miss the Invalidate queued fills the key again). Returns,
    /// per row, whether it was written. The default writes every row, for
    /// stores without deletes to respect.
    async fn put_filled(&self, model: &str, rows: Vec<FilledRow>) -> Result<Vec<bool>, StoreError> {
        let n = rows.len();
        let (mut vectors, mut failures) = (Vec::new(), Vec::new());
        for r in rows {
            match r.value {
                Filled::Vector(v) => vectors.push((r.key, v)),
                Filled::Failure(f) => failures.push((r.key, f)),
            }
        }
        if !vectors.is_empty() {
            self.put_vectors(model, vectors).await?;
        }
        if !failures.is_empty() {
            self.put_failures(model, failures).await?;
        }
        Ok(vec![true; n])
    }

    /// Forgets the rows of these keys; absent keys are ignored.
    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError>;

    /// One page of a model's stored vectors (failure records are skipped),
    /// from `cursor` on (`None`: the start). The order is the store's own
    /// and stable, so a [`ScanCursor`] saved to disk resumes a scan in a
    /// later process. Keys longer than [`MAX_INLINE_KEY_BYTES`] come back
    /// as their stored hash. A page may hold fewer than `page` rows (or
    /// none) before the end; the scan is over when `next` is `None`.
    async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError>;

    /// How many vectors `model` (a [`namespace`]) has stored: its
    /// coverage. The default pages through [`EmbeddingStore::scan`].
    async fn count_vectors(&self, model: &str) -> Result<u64, StoreError> {
        let (mut n, mut cursor) = (0u64, None);
        loop {
            let page = self.scan(model, cursor, 1024).await?;
            n += page.rows.len() as u64;
            match page.next {
                Some(c) => cursor = Some(c),
                None => return Ok(n),
            }
        }
    }

    /// Removes rows for good (`embark retire`), by their stored keys as
    /// [`EmbeddingStore::scan`] returns them (a long key's hash, not the
    /// key): no delete record is kept, as no fill of a retired version is
    /// expected.
    async fn purge(&self, model: &str, stored_keys: &[String]) -> Result<(), StoreError> {
        let _ = (model, stored_keys);
        Err(StoreError::Config("this store cannot purge rows".into()))
    }

    /// Writes vectors by their stored keys, as [`EmbeddingStore::scan`]
    /// returns them (a long key's hash, not the key), each only where
    /// `model` has no row for it: no vector, failure record or delete
    /// record, and never over a write that lands meanwhile. For copying
    /// rows between namespaces (`embark adopt`). Returns how many were
    /// written (on CQL: how many had no row at the read before the write;
    /// a delete record there still wins, by its newer timestamp).
    async fn copy_vectors(&self, model: &str, stored_rows: Vec<(String, Vec<f32>)>) -> Result<u64, StoreError> {
        let _ = (model, stored_rows);
        Err(StoreError::Config("this store cannot copy rows".into()))
    }

    /// The version `embark promote` made current for the model `name`, and
    /// when (ms since the epoch); `None` before any promote (the
    /// catalogue's `current` entry stands). Every replica reads it, so
    /// they agree on what a Lookup without a version gets.
    async fn current_version(&self, name: &str) -> Result<Option<CurrentVersion>, StoreError> {
        let _ = name;
        Ok(None)
    }

    /// Records `version` as the current version of the model `name`.
    async fn set_current_version(&self, name: &str, version: &str) -> Result<(), StoreError> {
        let _ = (name, version);
        Err(StoreError::Config("this store does not record current versions".into()))
    }
}

/// A promote as the store recorded it ([`EmbeddingStore::current_version`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentVersion {
    pub version: String,
    pub promoted_at_ms: i64,
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
    /// The stored keys of this page's other rows: failure records (and on
    /// the embedded store, delete records and rows that do not decode),
    /// so that `embark retire` removes a version's every row.
    pub other_keys: Vec<String>,
    /// Where the next page starts; `None` once the scan is complete.
    pub next: Option<ScanCursor>,
}

/// A scan meets a row that does not decode: it is skipped (a scan feeds an
/// index or an export, and one bad row must not stop it), logged, counted.
fn skip_corrupt(model: &str, key: &str, reason: &row::CorruptRow) {
    tracing::warn!(model, key, %reason, "skipping a corrupt stored row");
    metrics::counter!("embark_store_corrupt_rows_total").increment(1);
}

pub use embark_proto::now_unix_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_kept_long_keys_hashed_stably() {
        assert_eq!(storage_key("abc"), "abc");
        let long = "x".repeat(MAX_INLINE_KEY_BYTES + 1);
        let a = storage_key(&long);
        assert!(a.starts_with("h256:") && a.len() == 5 + 64, "{a}");
        assert_eq!(a, storage_key(&long));
        assert_ne!(a, storage_key(&"y".repeat(MAX_INLINE_KEY_BYTES + 1)));
    }

    /// Defect 11.6: the literal key `h128:<hash of U>` used to read and
    /// overwrite the row of the long key U.
    #[test]
    fn inline_keys_and_hashed_long_keys_have_separate_namespaces() {
        let long = format!("https://cdn.example/{}", "p".repeat(MAX_INLINE_KEY_BYTES));
        let hashed = storage_key(&long).into_owned();
        assert!(hashed.starts_with(HASHED_KEY_PREFIX));
        // The stored form of the long key, sent as a key of its own, is
        // hashed again and lands elsewhere.
        assert_ne!(storage_key(&hashed), hashed.as_str());
        assert!(storage_key(&hashed).starts_with(HASHED_KEY_PREFIX));
        // Short keys that merely contain the prefix later are inline.
        assert_eq!(storage_key("a/h256:b"), "a/h256:b");
    }

    #[test]
    fn embedded_io_errors_are_transient_a_damaged_file_or_bad_settings_are_not() {
        let io = StoreError::from(redb::Error::Io(std::io::Error::other("disk full")));
        assert!(io.is_transient());
        assert!(!StoreError::from(redb::Error::Corrupted("bad page".into())).is_transient());
        assert!(!StoreError::Config("cql://".into()).is_transient());
        let cursor = String::from_utf8(vec![0xff]).map_err(StoreError::BadCursor).expect_err("not UTF-8");
        assert!(!cursor.is_transient());
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
