//! `Similar`: one [`SimilarityIndex`] per served model, loaded from the
//! store at start and kept current.
//!
//! How the indexes stay current:
//! - `embark up`: the fill loop writes through [`IndexingStore`], so a
//!   vector is searchable as soon as it is stored, and Invalidate removes it.
//! - `embark serve` (vectors written by separate KFC processes): every
//!   `--similar-refresh-secs` the store is scanned again and keys not yet
//!   indexed are added ([`SimilarIndexes::spawn_refresh`]). See
//!   ARCHITECTURE.md for why this beats a per-write event here.
//!
//! Until its first load finishes, a model's index answers `UNAVAILABLE`
//! rather than partial results that would look like "no duplicates".

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use backon::Retryable;
use embark_index::{Hit, IndexConfig, IndexError, InsertReport, SimilarityIndex};
use embark_store::{EmbeddingStore, FailureRecord, ScanCursor, ScanPage, StoreError, storage_key};
use tokio_util::sync::CancellationToken;

/// Rows per store page while loading.
const LOAD_PAGE: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum SimilarError {
    #[error("similarity search is off for model {0:?} (--similar-max-vectors 0)")]
    Off(String),
    #[error("the index of model {model:?} is still loading ({loaded} vectors so far); retry shortly")]
    Loading { model: String, loaded: usize },
    #[error(transparent)]
    Query(#[from] IndexError),
}

struct ModelIndex {
    index: Arc<SimilarityIndex>,
    ready: AtomicBool,
}

/// The indexes of all served models.
pub struct SimilarIndexes {
    by_model: HashMap<String, ModelIndex>,
}

impl std::fmt::Debug for SimilarIndexes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimilarIndexes").field("models", &self.by_model.keys().collect::<Vec<_>>()).finish()
    }
}

impl SimilarIndexes {
    /// Empty, not-yet-loaded indexes for `(model, dim)`; none at all when
    /// `config.max_vectors` is 0.
    pub fn new(models: &[(String, usize)], config: &IndexConfig) -> Arc<Self> {
        let by_model = if config.max_vectors == 0 {
            HashMap::new()
        } else {
            models
                .iter()
                .map(|(name, dim)| {
                    let index = Arc::new(SimilarityIndex::new(*dim, config.clone()));
                    (name.clone(), ModelIndex { index, ready: AtomicBool::new(false) })
                })
                .collect()
        };
        Arc::new(Self { by_model })
    }

    /// Searches `model`'s index.
    pub fn search(
        &self,
        model: &str,
        query: &[f32],
        k: usize,
        min_score: f32,
        exclude: Option<&str>,
    ) -> Result<(Vec<Hit>, bool), SimilarError> {
        let m = self.by_model.get(model).ok_or_else(|| SimilarError::Off(model.to_owned()))?;
        if !m.ready.load(Ordering::Acquire) {
            return Err(SimilarError::Loading { model: model.to_owned(), loaded: m.index.len() });
        }
        let hits = m.index.search(query, k, min_score, exclude)?;
        Ok((hits, !m.index.is_approximate()))
    }

    /// How many vectors `model`'s index holds and whether its start-up load
    /// is done; `None` when the model has no index (search is off).
    pub fn coverage(&self, model: &str) -> Option<(usize, bool)> {
        self.by_model.get(model).map(|m| (m.index.len(), m.ready.load(Ordering::Acquire)))
    }

    /// Indexes freshly written vectors (blocking: call off the runtime).
    pub fn insert(&self, model: &str, rows: &[(String, Vec<f32>)]) {
        if let Some(m) = self.by_model.get(model) {
            let report = m.index.insert(rows);
            record(model, &m.index, &report);
        }
    }

    pub fn remove(&self, model: &str, keys: &[String]) {
        if let Some(m) = self.by_model.get(model) {
            m.index.remove(keys);
            metrics::gauge!("embark_similar_vectors", "model" => name_of(model), "version" => version_of(model))
                .set(m.index.len() as f64);
        }
    }

    /// Loads every model's index from the store in the background; each
    /// model answers once its own load is done.
    pub fn spawn_load(self: &Arc<Self>, store: Arc<dyn EmbeddingStore>, stop: CancellationToken) {
        for model in self.by_model.keys() {
            let (this, store, stop, model) = (self.clone(), store.clone(), stop.clone(), model.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                // A failed load (the store unreachable at start) is tried
                // again with backoff until it succeeds or the process stops;
                // a retry skips what the failed attempt already indexed.
                let backoff =
                    embark_queue::backoff::Backoff { base: Duration::from_millis(500), max: Duration::from_secs(30) };
                let resume = AtomicBool::new(false);
                let load = (|| this.load(&store, &model, resume.swap(true, Ordering::Relaxed), &stop))
                    .retry(backoff.delays())
                    .when(|_| !stop.is_cancelled())
                    .notify(|e, delay| {
                        tracing::warn!(model, error = %e, ?delay, "loading the similarity index failed; retrying");
                        metrics::counter!("embark_similar_load_failures_total", "model" => name_of(&model), "version" => version_of(&model)).increment(1);
                    });
                let loaded = tokio::select! {
                    biased;
                    loaded = load => loaded,
                    _ = stop.cancelled() => {
                        tracing::info!(model, "stopped before the similarity index was loaded");
                        return;
                    }
                };
                match loaded {
                    Ok(n) => {
                        let secs = started.elapsed().as_secs_f64();
                        let m = &this.by_model[&model];
                        m.ready.store(true, Ordering::Release);
                        metrics::gauge!("embark_similar_build_seconds", "model" => name_of(&model), "version" => version_of(&model)).set(secs);
                        tracing::info!(
                            model,
                            vectors = n,
                            seconds = secs,
                            approximate = m.index.is_approximate(),
                            bytes = m.index.memory_bytes(),
                            "similarity index loaded"
                        );
                    }
                    Err(e) => tracing::error!(model, error = %e, "loading the similarity index failed"),
                }
            });
        }
    }

    /// Scans the store again every `every` and indexes keys not yet
    /// indexed (for `embark serve`, where other processes write).
    pub fn spawn_refresh(self: &Arc<Self>, store: Arc<dyn EmbeddingStore>, every: Duration, stop: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for model in this.by_model.keys() {
                    if !this.by_model[model].ready.load(Ordering::Acquire) {
                        continue;
                    }
                    match this.load(&store, model, true, &stop).await {
                        Ok(n) => tracing::debug!(model, new = n, "similarity index refreshed"),
                        Err(e) => tracing::warn!(model, error = %e, "refreshing the similarity index failed"),
                    }
                }
            }
        });
    }

    /// Pages through the store into the index; with `only_new`, keys
    /// already indexed are skipped. Returns the vectors indexed.
    async fn load(
        &self,
        store: &Arc<dyn EmbeddingStore>,
        model: &str,
        only_new: bool,
        stop: &CancellationToken,
    ) -> Result<usize, StoreError> {
        let index = self.by_model[model].index.clone();
        let mut cursor: Option<ScanCursor> = None;
        let mut total = 0;
        loop {
            if stop.is_cancelled() {
                break;
            }
            let ScanPage { rows, next, .. } = store.scan(model, cursor.take(), LOAD_PAGE).await?;
            let index = index.clone();
            let model_name = model.to_owned();
            total += tokio::task::spawn_blocking(move || {
                let rows: Vec<_> =
                    if only_new { rows.into_iter().filter(|(k, _)| !index.contains(k)).collect() } else { rows };
                let report = index.insert(&rows);
                record(&model_name, &index, &report);
                report.added + report.replaced
            })
            .await
            .map_err(StoreError::Task)?;
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        Ok(total)
    }
}

/// The `model` label of an index's metrics: the model's name (an index is
/// keyed by its version's namespace, `name@version`).
fn name_of(namespace: &str) -> String {
    embark_proto::split_namespace(namespace).0.to_owned()
}

/// The `version` label of an index's metrics.
fn version_of(namespace: &str) -> String {
    embark_proto::split_namespace(namespace).1.to_owned()
}

fn record(model: &str, index: &SimilarityIndex, report: &InsertReport) {
    let m = model.to_owned();
    metrics::gauge!("embark_similar_vectors", "model" => name_of(&m), "version" => version_of(&m))
        .set(index.len() as f64);
    metrics::gauge!("embark_similar_memory_bytes", "model" => name_of(&m), "version" => version_of(&m))
        .set(index.memory_bytes() as f64);
    metrics::gauge!("embark_similar_approximate", "model" => name_of(&m), "version" => version_of(&m))
        .set(f64::from(u8::from(index.is_approximate())));
    if report.full > 0 {
        metrics::counter!("embark_similar_not_indexed_total", "model" => name_of(&m), "version" => version_of(&m), "reason" => "full")
            .increment(report.full as u64);
        tracing::warn!(model, skipped = report.full, "similarity index is full (--similar-max-vectors)");
    }
    if report.rejected > 0 {
        metrics::counter!("embark_similar_not_indexed_total", "model" => name_of(&m), "version" => version_of(&m), "reason" => "invalid")
            .increment(report.rejected as u64);
    }
}

/// A store that also keeps the similarity indexes current: vectors it
/// writes are indexed, keys it deletes are removed.
pub struct IndexingStore {
    inner: Arc<dyn EmbeddingStore>,
    indexes: Arc<SimilarIndexes>,
}

impl std::fmt::Debug for IndexingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexingStore").finish_non_exhaustive()
    }
}

impl IndexingStore {
    pub fn new(inner: Arc<dyn EmbeddingStore>, indexes: Arc<SimilarIndexes>) -> Self {
        Self { inner, indexes }
    }
}

/// Reads and scans go straight to the inner store; writes and deletes
/// also update the indexes.
#[async_trait]
impl embark_store::wrap::StoreWrapper for IndexingStore {
    fn inner(&self) -> &dyn EmbeddingStore {
        &*self.inner
    }

    async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
        // Indexed under the key the store keeps (long keys as their hash),
        // so what a restart loads and what was indexed live agree.
        let indexed: Vec<(String, Vec<f32>)> =
            rows.iter().map(|(k, v)| (storage_key(k).into_owned(), v.clone())).collect();
        self.inner.put_vectors(model, rows).await?;
        let (indexes, model, rows) = (self.indexes.clone(), model.to_owned(), indexed);
        tokio::task::spawn_blocking(move || indexes.insert(&model, &rows)).await.map_err(StoreError::Task)
    }

    async fn put_filled(&self, model: &str, rows: Vec<embark_store::FilledRow>) -> Result<Vec<bool>, StoreError> {
        let written = self.inner.put_filled(model, rows.clone()).await?;
        let (mut add, mut drop) = (Vec::new(), Vec::new());
        for (r, ok) in rows.into_iter().zip(&written) {
            match (ok, r.value) {
                (true, embark_store::Filled::Vector(v)) => add.push((storage_key(&r.key).into_owned(), v)),
                (true, embark_store::Filled::Failure(_)) => drop.push(storage_key(&r.key).into_owned()),
                (false, _) => {}
            }
        }
        let (indexes, model) = (self.indexes.clone(), model.to_owned());
        tokio::task::spawn_blocking(move || {
            indexes.insert(&model, &add);
            indexes.remove(&model, &drop);
        })
        .await
        .map_err(StoreError::Task)?;
        Ok(written)
    }

    async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
        let keys: Vec<String> = rows.iter().map(|(k, _)| storage_key(k).into_owned()).collect();
        self.inner.put_failures(model, rows).await?;
        self.indexes.remove(model, &keys);
        Ok(())
    }

    async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
        self.inner.delete(model, keys).await?;
        let keys: Vec<String> = keys.iter().map(|k| storage_key(k).into_owned()).collect();
        self.indexes.remove(model, &keys);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use embark_store::{StoredRow, embedded::EmbeddedStore};

    use super::*;

    /// The embedded store, whose first `fail` scans fail (a store still
    /// starting when EmbArk does).
    struct FlakyScans {
        inner: EmbeddedStore,
        fail: AtomicUsize,
    }

    #[async_trait]
    impl embark_store::wrap::StoreWrapper for FlakyScans {
        fn inner(&self) -> &dyn EmbeddingStore {
            &self.inner
        }
        async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
            if self.fail.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(StoreError::Config("not up yet".into()));
            }
            self.inner.scan(model, cursor, page).await
        }
    }

    /// Defect 11.11: a failed start-up load was never retried, so the
    /// model's `Similar` answered UNAVAILABLE until a restart.
    #[tokio::test]
    async fn a_failed_start_up_load_is_never_retried() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        inner.put_vectors("m", vec![("a".into(), vec![1.0, 0.0]), ("b".into(), vec![0.0, 1.0])]).await.expect("put");
        let store: Arc<dyn EmbeddingStore> = Arc::new(FlakyScans { inner, fail: AtomicUsize::new(2) });
        let indexes = SimilarIndexes::new(&[("m".into(), 2)], &IndexConfig::default());
        let stop = CancellationToken::new();
        indexes.spawn_load(store, stop.clone());
        let hits = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Ok((hits, _)) = indexes.search("m", &[1.0, 0.0], 1, -1.0, None) {
                    break hits;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("loaded after the store came up");
        assert_eq!(&*hits[0].key, "a");
        stop.cancel();
    }

    /// The embedded store, whose scans wait until `open` gets a permit.
    struct GatedScans {
        inner: EmbeddedStore,
        open: tokio::sync::Semaphore,
    }

    #[async_trait]
    impl embark_store::wrap::StoreWrapper for GatedScans {
        fn inner(&self) -> &dyn EmbeddingStore {
            &self.inner
        }
        async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
            let _open = self.open.acquire().await.expect("the test never closes the gate");
            self.inner.scan(model, cursor, page).await
        }
    }

    fn open_store(dir: &tempfile::TempDir) -> EmbeddedStore {
        EmbeddedStore::open(&dir.path().join("s.redb")).expect("open")
    }

    /// (key, score) of each hit, scores to 4 decimals.
    fn found(hits: &[Hit]) -> Vec<(String, f32)> {
        hits.iter().map(|h| (h.key.to_string(), (h.score * 1e4).round() / 1e4)).collect()
    }

    fn owned(rows: &[(&str, f32)]) -> Vec<(String, f32)> {
        rows.iter().map(|(k, s)| (k.to_string(), *s)).collect()
    }

    /// Waits (bounded) until `model` has finished loading.
    async fn until_loaded(indexes: &SimilarIndexes, model: &str, dim: usize) {
        let mut probe = vec![0.0; dim];
        probe[0] = 1.0;
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Err(SimilarError::Loading { .. }) = indexes.search(model, &probe, 1, -1.0, None) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the index loads");
    }

    #[tokio::test]
    async fn a_model_answers_loading_until_its_index_is_loaded_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = open_store(&dir);
        let rows = vec![("a".into(), vec![1.0, 0.0]), ("b".into(), vec![0.0, 1.0]), ("c".into(), vec![0.6, 0.8])];
        inner.put_vectors("m", rows).await.expect("put");
        let store = Arc::new(GatedScans { inner, open: tokio::sync::Semaphore::new(0) });
        let indexes = SimilarIndexes::new(&[("m".into(), 2)], &IndexConfig::default());
        let loading = |i: &SimilarIndexes| match i.search("m", &[1.0, 0.0], 3, -1.0, None) {
            Err(SimilarError::Loading { model, loaded }) => Some((model, loaded)),
            _ => None,
        };
        assert_eq!(loading(&indexes), Some(("m".to_string(), 0)), "not loaded before the load starts");
        let stop = CancellationToken::new();
        indexes.spawn_load(store.clone(), stop.clone());
        // The load is under way but cannot finish while the scan waits.
        tokio::task::yield_now().await;
        assert_eq!(loading(&indexes), Some(("m".to_string(), 0)), "no partial answers while loading");
        store.open.add_permits(1);
        until_loaded(&indexes, "m", 2).await;

        let (hits, exact) = indexes.search("m", &[1.0, 0.0], 3, -1.0, None).expect("search");
        assert!(exact, "3 vectors are searched exactly");
        assert_eq!(found(&hits), owned(&[("a", 1.0), ("c", 0.6), ("b", 0.0)]));
        let (hits, _) = indexes.search("m", &[1.0, 0.0], 3, 0.5, Some("a")).expect("search");
        assert_eq!(found(&hits), owned(&[("c", 0.6)]), "the excluded key and low scores are left out");
        let e = indexes.search("m", &[1.0, 0.0, 0.0], 3, 0.0, None).expect_err("wrong dim");
        assert!(matches!(e, SimilarError::Query(IndexError::Dimension { expected: 2, got: 3 })), "{e}");
        stop.cancel();
    }

    #[tokio::test]
    async fn inserts_and_removes_keep_a_loaded_index_current() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn EmbeddingStore> = Arc::new(open_store(&dir));
        let indexes = SimilarIndexes::new(&[("m".into(), 2)], &IndexConfig::default());
        let stop = CancellationToken::new();
        indexes.spawn_load(store, stop.clone());
        until_loaded(&indexes, "m", 2).await;
        let search = |min_score| indexes.search("m", &[1.0, 0.0], 5, min_score, None).map(|(h, _)| found(&h));
        assert_eq!(search(-1.0).expect("search"), owned(&[]), "an empty store loads an empty index");

        indexes.insert("m", &[("x".into(), vec![2.0, 0.0]), ("y".into(), vec![0.0, 3.0])]);
        assert_eq!(search(-1.0).expect("search"), owned(&[("x", 1.0), ("y", 0.0)]), "vectors are normalised");
        // Inserting a key again replaces its vector.
        indexes.insert("m", &[("y".into(), vec![0.8, 0.6])]);
        assert_eq!(search(-1.0).expect("search"), owned(&[("x", 1.0), ("y", 0.8)]));
        indexes.remove("m", &["x".into(), "never indexed".into()]);
        assert_eq!(search(-1.0).expect("search"), owned(&[("y", 0.8)]));
        // Another model's rows go nowhere.
        indexes.insert("other", &[("z".into(), vec![1.0, 0.0])]);
        indexes.remove("other", &["y".into()]);
        assert_eq!(search(-1.0).expect("search"), owned(&[("y", 0.8)]));
        assert!(
            matches!(indexes.search("other", &[1.0, 0.0], 1, 0.0, None), Err(SimilarError::Off(m)) if m == "other")
        );
        stop.cancel();
    }

    #[test]
    fn similarity_search_is_off_without_an_index() {
        let config = IndexConfig { max_vectors: 0, ..IndexConfig::default() };
        let indexes = SimilarIndexes::new(&[("m".into(), 2)], &config);
        let e = indexes.search("m", &[1.0, 0.0], 1, 0.0, None).expect_err("off");
        assert!(matches!(e, SimilarError::Off(ref m) if m == "m"), "{e:?}");
        assert_eq!(e.to_string(), "similarity search is off for model \"m\" (--similar-max-vectors 0)");
    }

    #[tokio::test]
    async fn the_indexing_store_indexes_what_it_writes_and_forgets_what_it_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn EmbeddingStore> = Arc::new(open_store(&dir));
        let indexes = SimilarIndexes::new(&[("m".into(), 2)], &IndexConfig::default());
        let stop = CancellationToken::new();
        indexes.spawn_load(inner.clone(), stop.clone());
        until_loaded(&indexes, "m", 2).await;
        let store = IndexingStore::new(inner.clone(), indexes.clone());
        let keys = || indexes.search("m", &[1.0, 0.0], 10, -1.0, None).map(|(h, _)| found(&h)).expect("search");

        let long = "u".repeat(embark_store::MAX_INLINE_KEY_BYTES + 1);
        let hashed = storage_key(&long).into_owned();
        store.put_vectors("m", vec![("a".into(), vec![1.0, 0.0]), (long.clone(), vec![0.0, 1.0])]).await.expect("put");
        assert_eq!(keys(), owned(&[("a", 1.0), (hashed.as_str(), 0.0)]), "long keys are indexed as stored");
        assert!(matches!(inner.get_many("m", &["a".into()]).await.expect("get")[..], [Some(StoredRow::Vector { .. })]));

        let failure = FailureRecord { code: 1, reason: "bad".into(), at_unix_ms: 0 };
        store.put_failures("m", vec![("a".into(), failure.clone())]).await.expect("put");
        assert_eq!(keys(), owned(&[(hashed.as_str(), 0.0)]), "a key that failed has no vector to find");
        store.delete("m", std::slice::from_ref(&long)).await.expect("delete");
        assert_eq!(keys(), owned(&[]));

        use embark_store::{Filled, FilledRow};
        let filled = |key: &str, value| FilledRow { key: key.into(), seen_at_ms: embark_store::now_unix_ms(), value };
        let written = store
            .put_filled(
                "m",
                vec![filled("b", Filled::Vector(vec![0.6, 0.8])), filled("c", Filled::Vector(vec![1.0, 0.0]))],
            )
            .await
            .expect("put");
        assert_eq!(written, vec![true, true]);
        assert_eq!(keys(), owned(&[("c", 1.0), ("b", 0.6)]));
        store.put_filled("m", vec![filled("c", Filled::Failure(failure))]).await.expect("put");
        assert_eq!(keys(), owned(&[("b", 0.6)]), "a fill that failed removes the key");
        stop.cancel();
    }
}
