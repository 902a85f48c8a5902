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
use embark_store::{EmbeddingStore, FailureRecord, ScanCursor, ScanPage, StoreError, StoredRow, storage_key};
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
            metrics::gauge!("embark_similar_vectors", "model" => model.to_owned()).set(m.index.len() as f64);
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
                        metrics::counter!("embark_similar_load_failures_total", "model" => model.clone()).increment(1);
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
                        metrics::gauge!("embark_similar_build_seconds", "model" => model.clone()).set(secs);
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
            let ScanPage { rows, next } = store.scan(model, cursor.take(), LOAD_PAGE).await?;
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

fn record(model: &str, index: &SimilarityIndex, report: &InsertReport) {
    let m = model.to_owned();
    metrics::gauge!("embark_similar_vectors", "model" => m.clone()).set(index.len() as f64);
    metrics::gauge!("embark_similar_memory_bytes", "model" => m.clone()).set(index.memory_bytes() as f64);
    metrics::gauge!("embark_similar_approximate", "model" => m.clone())
        .set(f64::from(u8::from(index.is_approximate())));
    if report.full > 0 {
        metrics::counter!("embark_similar_not_indexed_total", "model" => m.clone(), "reason" => "full")
            .increment(report.full as u64);
        tracing::warn!(model, skipped = report.full, "similarity index is full (--similar-max-vectors)");
    }
    if report.rejected > 0 {
        metrics::counter!("embark_similar_not_indexed_total", "model" => m, "reason" => "invalid")
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

#[async_trait]
impl EmbeddingStore for IndexingStore {
    async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
        self.inner.get_many(model, keys).await
    }

    async fn get_each(
        &self,
        model: &str,
        keys: &[String],
        sink: &mut (dyn FnMut(usize, embark_store::RowRead) + Send),
    ) {
        self.inner.get_each(model, keys, sink).await
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

    async fn scan(&self, model: &str, cursor: Option<ScanCursor>, page: usize) -> Result<ScanPage, StoreError> {
        self.inner.scan(model, cursor, page).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use embark_store::embedded::EmbeddedStore;

    use super::*;

    /// The embedded store, whose first `fail` scans fail (a store still
    /// starting when EmbArk does).
    struct FlakyScans {
        inner: EmbeddedStore,
        fail: AtomicUsize,
    }

    #[async_trait]
    impl EmbeddingStore for FlakyScans {
        async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
            self.inner.get_many(model, keys).await
        }
        async fn put_vectors(&self, model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
            self.inner.put_vectors(model, rows).await
        }
        async fn put_failures(&self, model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
            self.inner.put_failures(model, rows).await
        }
        async fn delete(&self, model: &str, keys: &[String]) -> Result<(), StoreError> {
            self.inner.delete(model, keys).await
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
}
