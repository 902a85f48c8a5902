//! The single-machine store: one redb file holding the embeddings table
//! (and, beside it, the durable miss queue of `embark_queue::local`, which
//! opens its own table in the same file through [`EmbeddedStore::database`]).
//!
//! redb gives ACID transactions with a durable commit, so a vector or a
//! queued miss that a call reported as written survives a crash. All calls
//! into redb are blocking; the async trait methods run them on tokio's
//! blocking pool so they never stall the runtime's worker threads.

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{EmbeddingStore, FailureRecord, ScanCursor, ScanPage, StoreError, StoredRow, row, storage_key};

/// (model, storage key) -> encoded [`StoredRow`].
const EMBEDDINGS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("embeddings");

/// model name -> (current version, promoted at ms): what `embark promote`
/// recorded.
const CURRENT_VERSIONS: TableDefinition<&str, (&str, i64)> = TableDefinition::new("current_versions");

/// The embedded store. Cheap to clone; all clones share one database.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

/// The page cache of [`EmbeddedStore::open`]: enough for the miss queue and
/// the B-tree's inner pages; the vectors themselves are cached by EmbArk.
pub const DEFAULT_PAGE_CACHE_BYTES: usize = 64 << 20;

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Embedded(e.into())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file with redb's default page cache.
    /// Fails if another process has it open: one file belongs to one process.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_PAGE_CACHE_BYTES)
    }

    /// Like [`EmbeddedStore::open`], with a page cache of `cache_bytes`.
    /// EmbArk's own tier already holds the hot vectors, so a small page
    /// cache avoids keeping them in memory twice.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let db = Database::builder().set_cache_size(cache_bytes).create(path).map_err(db_err)?;
        // Create the table up front so read transactions never meet a
        // missing table.
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(EMBEDDINGS).map_err(db_err)?;
        txn.open_table(CURRENT_VERSIONS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// The file's database, for the durable miss queue that shares it
    /// (`embark_queue::local::PendingMisses`): one file, one process, one
    /// fsync per commit for both.
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    fn get_many_blocking(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(EMBEDDINGS).map_err(db_err)?;
        keys.iter()
            .map(|key| {
                let skey = storage_key(key);
                match table.get((model, skey.as_ref())).map_err(db_err)? {
                    None => Ok(None),
                    Some(v) if row::deleted_at(v.value()).is_some() => Ok(None),
                    Some(v) => Ok(Some(row::decode_or_corrupt(v.value()))),
                }
            })
            .collect()
    }

    /// Stores encoded values (rows, or delete records), in one transaction.
    fn write_blocking(&self, model: &str, rows: impl Iterator<Item = (String, Vec<u8>)>) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = txn.open_table(EMBEDDINGS).map_err(db_err)?;
            for (key, value) in rows {
                let skey = storage_key(&key);
                table.insert((model, skey.as_ref()), value.as_slice()).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)
    }

    fn scan_blocking(&self, model: &str, after: Option<&str>, page: usize) -> Result<ScanPage, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(EMBEDDINGS).map_err(db_err)?;
        let mut out = ScanPage::default();
        let mut last: Option<String> = None;
        let mut more = false;
        for entry in table.range((model, after.unwrap_or(""))..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let (m, key) = k.value();
            if m != model {
                break;
            }
            if after == Some(key) {
                continue;
            }
            // Other rows count too, so a page stays bounded for `retire`.
            if last.is_some() && out.rows.len() + out.other_keys.len() >= page.max(1) {
                more = true;
                break;
            }
            last = Some(key.to_owned());
            if row::deleted_at(v.value()).is_some() {
                out.other_keys.push(key.to_owned());
                continue;
            }
            match row::decode_or_corrupt(v.value()) {
                StoredRow::Vector { vector, .. } => out.rows.push((key.to_owned(), vector)),
                StoredRow::Failed(_) => out.other_keys.push(key.to_owned()),
                StoredRow::Corrupt { reason } => {
                    crate::skip_corrupt(model, key, &reason);
                    out.other_keys.push(key.to_owned());
                }
            }
        }
        out.next = if more { last.map(|k| ScanCursor(k.into_bytes())) } else { None };
        Ok(out)
    }

    fn count_blocking(&self, model: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(EMBEDDINGS).map_err(db_err)?;
        let mut n = 0;
        for entry in table.range((model, "")..).map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            if k.value().0 != model {
                break;
            }
            // A vector's status byte; failures and delete records do not count.
            n += u64::from(v.value().first() == Some(&row::STATUS_VECTOR));
        }
        Ok(n)
    }

    /// Runs a blocking closure over a clone of `self` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&EmbeddedStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this)).await?
    }
}

#[async_trait]
impl EmbeddingStore for EmbeddedStore {
    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        let (model, keys) = (model.to_owned(), keys.to_vec());
        self.blocking(move |s| s.get_many_blocking(&model, &keys)).await
    }

    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
        let model = model.to_owned();
        let now = crate::now_unix_ms();
        self.blocking(move |s| {
            s.write_blocking(&model, rows.into_iter().map(|(k, v)| (k, row::encode_vector(&v, now))))
        })
        .await
    }

    async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
        let model = model.to_owned();
        let after = match cursor {
            None => None,
            Some(c) => Some(String::from_utf8(c.0).map_err(StoreError::BadCursor)?),
        };
        self.blocking(move |s| s.scan_blocking(&model, after.as_deref(), page)).await
    }

    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
        let model = model.to_owned();
        self.blocking(move |s| s.write_blocking(&model, rows.into_iter().map(|(k, f)| (k, row::encode_failure(&f)))))
            .await
    }

    /// Records each delete (a small row) rather than removing the key, so
    /// that [`EmbeddingStore::put_filled`] can tell a fill that began
    /// before the delete; any later write replaces the record.
    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
        let (model, keys) = (model.to_owned(), keys.to_vec());
        let now = crate::now_unix_ms();
        self.blocking(move |s| s.write_blocking(&model, keys.into_iter().map(|k| (k, row::encode_deleted(now))))).await
    }

    /// Counts the model's rows in its key range (no vector is decoded).
    async fn count_vectors(&self, model: &str) -> Result<u64, StoreError> {
        let model = model.to_owned();
        self.blocking(move |s| s.count_blocking(&model)).await
    }

    /// Removes the rows, delete records included.
    async fn purge(&self, model: &str, stored_keys: &[String]) -> Result<(), StoreError> {
        let (model, keys) = (model.to_owned(), stored_keys.to_vec());
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(EMBEDDINGS).map_err(db_err)?;
                for key in &keys {
                    table.remove((model.as_str(), key.as_str())).map_err(db_err)?;
                }
            }
            txn.commit().map_err(db_err)
        })
        .await
    }

    async fn current_version(&self, name: &str) -> Result<Option<crate::CurrentVersion>, StoreError> {
        let name = name.to_owned();
        self.blocking(move |s| {
            let txn = s.db.begin_read().map_err(db_err)?;
            let table = txn.open_table(CURRENT_VERSIONS).map_err(db_err)?;
            Ok(table.get(name.as_str()).map_err(db_err)?.map(|v| {
                let (version, promoted_at_ms) = v.value();
                crate::CurrentVersion { version: version.to_owned(), promoted_at_ms }
            }))
        })
        .await
    }

    async fn set_current_version(&self, name: &str, version: &str) -> Result<(), StoreError> {
        let (name, version) = (name.to_owned(), version.to_owned());
        let now = crate::now_unix_ms();
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(db_err)?;
            txn.open_table(CURRENT_VERSIONS)
                .map_err(db_err)?
                .insert(name.as_str(), (version.as_str(), now))
                .map_err(db_err)?;
            txn.commit().map_err(db_err)
        })
        .await
    }

    async fn copy_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<u64, StoreError> {
        let model = model.to_owned();
        let now = crate::now_unix_ms();
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(db_err)?;
            let mut written = 0;
            {
                let mut table = txn.open_table(EMBEDDINGS).map_err(db_err)?;
                for (skey, vector) in rows {
                    // Any row stands: a vector, a failure or a delete record.
                    if table.get((model.as_str(), skey.as_str())).map_err(db_err)?.is_some() {
                        continue;
                    }
                    let value = row::encode_vector(&vector, now);
                    table.insert((model.as_str(), skey.as_str()), value.as_slice()).map_err(db_err)?;
                    written += 1;
                }
            }
            txn.commit().map_err(db_err)?;
            Ok(written)
        })
        .await
    }

    async fn put_filled(&self, model: &str, rows: Vec<crate::FilledRow>) -> Result<Vec<bool>, StoreError> {
        let model = model.to_owned();
        let now = crate::now_unix_ms();
        self.blocking(move |s| {
            let txn = s.db.begin_write().map_err(db_err)?;
            let mut written = Vec::with_capacity(rows.len());
            {
                let mut table = txn.open_table(EMBEDDINGS).map_err(db_err)?;
                for r in rows {
                    let skey = storage_key(&r.key);
                    let deleted = table
                        .get((model.as_str(), skey.as_ref()))
                        .map_err(db_err)?
                        .and_then(|v| row::deleted_at(v.value()));
                    // Deleted after the input was seen: this fill is stale.
                    if deleted.is_some_and(|at| at > r.seen_at_ms) {
                        written.push(false);
                        continue;
                    }
                    let value = match &r.value {
                        crate::Filled::Vector(v) => row::encode_vector(v, now),
                        crate::Filled::Failure(f) => row::encode_failure(f),
                    };
                    table.insert((model.as_str(), skey.as_ref()), value.as_slice()).map_err(db_err)?;
                    written.push(true);
                }
            }
            txn.commit().map_err(db_err)?;
            Ok(written)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scan_pages_through_one_model_and_resumes_from_a_cursor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = EmbeddedStore::open(&dir.path().join("store.redb")).expect("open");
        let rows: Vec<(String, Vec<f32>)> = (0..10).map(|i| (format!("k{i:02}"), vec![i as f32])).collect();
        s.put_vectors("m", rows.clone()).await.expect("put");
        s.put_vectors("l", vec![("k00".into(), vec![9.0])]).await.expect("put other model");
        s.put_vectors("n", vec![("a".into(), vec![9.0])]).await.expect("put other model");
        let f = FailureRecord { code: 2, reason: "bad".into(), at_unix_ms: 5 };
        s.put_failures("m", vec![("k05x".into(), f)]).await.expect("put failure");

        let (mut seen, mut cursor, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = s.scan("m", cursor.take(), 3).await.expect("scan");
            pages += 1;
            seen.extend(page.rows);
            // Through hex, as a checkpoint file would carry it.
            match page.next {
                Some(c) => cursor = ScanCursor::from_hex(&c.to_hex()),
                None => break,
            }
        }
        assert_eq!(seen, rows, "every vector once, in key order, no failure records");
        assert_eq!(pages, 4);
        assert!(s.scan("empty", None, 3).await.expect("scan").next.is_none());
    }

    #[tokio::test]
    async fn rows_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.redb");
        let long = "k".repeat(1000);
        {
            let s = EmbeddedStore::open(&path).expect("open");
            s.put_vectors("m", vec![("a".into(), vec![1.0, 2.0]), (long.clone(), vec![3.0])]).await.expect("put");
            let f = FailureRecord { code: 2, reason: "bad".into(), at_unix_ms: 5 };
            s.put_failures("m", vec![("b".into(), f)]).await.expect("put failure");
        }
        let s = EmbeddedStore::open(&path).expect("reopen");
        let keys: Vec<String> = vec!["a".into(), "b".into(), "c".into(), long.clone()];
        let rows = s.get_many("m", &keys).await.expect("get");
        assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[1.0, 2.0]));
        assert!(matches!(&rows[1], Some(StoredRow::Failed(f)) if f.reason == "bad" && f.code == 2));
        assert!(rows[2].is_none());
        assert!(matches!(&rows[3], Some(StoredRow::Vector { vector, .. }) if vector == &[3.0]));
        // Other models do not see these rows.
        assert!(s.get_many("other", &keys).await.expect("get")[0].is_none());
        s.delete("m", &["a".to_string()]).await.expect("delete");
        assert!(s.get_many("m", &keys).await.expect("get")[0].is_none());
    }

    /// Defect 11.7: one row that did not decode failed every key of the
    /// batch (and its scan), so a single torn write blinded whole Lookups.
    #[tokio::test]
    async fn one_corrupt_row_fails_the_whole_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        s.put_vectors("m", vec![("a".into(), vec![1.0]), ("c".into(), vec![3.0])]).await.expect("put");
        s.write_blocking("m", std::iter::once(("b".to_owned(), vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])))
            .expect("raw write");
        let keys: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let rows = s.get_many("m", &keys).await.expect("the batch is answered");
        assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[1.0]));
        assert!(matches!(&rows[1], Some(StoredRow::Corrupt { .. })), "{:?}", rows[1]);
        assert!(matches!(&rows[2], Some(StoredRow::Vector { vector, .. }) if vector == &[3.0]));
        let page = s.scan("m", None, 10).await.expect("the scan skips the corrupt row");
        let keys: Vec<&str> = page.rows.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a", "c"]);
    }

    /// Defect 11.8 (the store's half): a fill that was under way when an
    /// Invalidate deleted the key wrote the old vector back.
    #[tokio::test]
    async fn a_fill_in_flight_puts_back_what_an_invalidate_deleted() {
        use crate::{Filled, FilledRow};
        let dir = tempfile::tempdir().expect("tempdir");
        let s = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        s.put_vectors("m", vec![("k".into(), vec![1.0])]).await.expect("put");
        let seen_before = crate::now_unix_ms() - 1000;
        s.delete("m", &["k".to_string()]).await.expect("delete");
        let fill = |seen_at_ms, x| FilledRow { key: "k".into(), seen_at_ms, value: Filled::Vector(vec![x]) };
        assert_eq!(s.put_filled("m", vec![fill(seen_before, 2.0)]).await.expect("fill"), vec![false]);
        assert!(s.get_many("m", &["k".to_string()]).await.expect("get")[0].is_none(), "the delete won");
        assert!(s.scan("m", None, 10).await.expect("scan").rows.is_empty(), "a delete record is not a row");
        // The miss the Invalidate queued is seen after the delete: it fills.
        let seen_after = crate::now_unix_ms();
        assert_eq!(s.put_filled("m", vec![fill(seen_after, 3.0)]).await.expect("fill"), vec![true]);
        let rows = s.get_many("m", &["k".to_string()]).await.expect("get");
        assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[3.0]));
        // A key never deleted takes any fill.
        let other = FilledRow { key: "new".into(), seen_at_ms: 0, value: Filled::Vector(vec![4.0]) };
        assert_eq!(s.put_filled("m", vec![other]).await.expect("fill"), vec![true]);
    }

    #[tokio::test]
    async fn the_current_version_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.redb");
        {
            let store = EmbeddedStore::open(&path).expect("open");
            assert_eq!(store.current_version("m").await.expect("read"), None);
            store.set_current_version("m", "2").await.expect("write");
        }
        let store = EmbeddedStore::open(&path).expect("reopen");
        let current = store.current_version("m").await.expect("read").expect("recorded");
        assert_eq!(current.version, "2");
        assert_eq!(store.current_version("other").await.expect("read"), None);
    }

    /// Review of issue 12: a page counted vectors only, so a version full
    /// of failure records came back as one unbounded page (and `retire`
    /// purged it in one transaction). Every row counts toward the page.
    #[tokio::test]
    async fn a_scan_page_counts_failure_records_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        let failure = FailureRecord { code: 4, reason: "404".into(), at_unix_ms: 1 };
        store.put_failures("m", (0..6).map(|i| (format!("a{i}"), failure.clone())).collect()).await.expect("put");
        store.put_vectors("m", (0..6).map(|i| (format!("b{i}"), vec![1.0])).collect()).await.expect("put");
        let (mut cursor, mut seen) = (None, 0);
        loop {
            let page = store.scan("m", cursor, 4).await.expect("scan");
            assert!(page.rows.len() + page.other_keys.len() <= 4, "{page:?}");
            seen += page.rows.len() + page.other_keys.len();
            match page.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, 12);
    }
}
