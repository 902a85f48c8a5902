//! The Lookup path: tier -> store -> OOV + miss, and Invalidate.
//!
//! [`Front`] holds the logic; [`crate::service`] only maps it onto gRPC.

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use embark_proto::{
    embark::v1::{Source, VectorType},
    internal::v1::MissEvent,
    vectors,
};
use embark_queue::MissPublisher;
use embark_store::{StoreError, StoredRow, now_unix_ms};
use tracing::Instrument as _;

use crate::{
    cache::{CachedRow, KeyHash, MissDedup, VectorCache, key_hash},
    models::{ModelRegistry, ServedModel},
    similar::{SimilarError, SimilarIndexes},
    store_guard::GuardedStore,
};

/// Request limits; each error message names the flag that sets it.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most keys in one Lookup or Invalidate (`--max-batch-keys`).
    pub max_batch_keys: usize,
    /// Longest key in bytes (`--max-key-bytes`).
    pub max_key_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_batch_keys: 4096, max_key_bytes: 8192 }
    }
}

/// How long an Invalidate waits for the store's delete by default.
pub const DEFAULT_DELETE_DEADLINE: Duration = Duration::from_secs(5);

/// A request the front refuses; maps to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
}

/// A Lookup's answer: `keys.len() x dim` little-endian f32 plus sources.
#[derive(Debug)]
pub struct LookupAnswer {
    /// The model version every row belongs to.
    pub version: &'static str,
    pub dim: usize,
    /// The rows' type, as asked.
    pub vector_type: VectorType,
    /// `sources.len() x dim` values of `vector_type`, little-endian, in
    /// pieces to be sent one after the other: each row's own shared buffer
    /// from the tier when it is kept in the asked type (no copy until the
    /// encoder's), else one buffer of converted rows.
    pub matrix: Vec<Bytes>,
    /// I8 only: each row's float32 scale, little-endian.
    pub scales: Vec<u8>,
    pub sources: Vec<Source>,
}

impl LookupAnswer {
    /// The matrix in one buffer (a copy; tests and in-process readers).
    pub fn vectors(&self) -> Vec<u8> {
        self.matrix.concat()
    }
}

pub struct Front {
    models: ModelRegistry,
    tier: VectorCache,
    store: Arc<GuardedStore>,
    publisher: Arc<dyn MissPublisher>,
    dedup: MissDedup,
    limits: Limits,
    /// A failure record younger than this is answered OOV_FAILED and not
    /// queued again.
    failure_ttl: Duration,
    /// The similarity indexes (none until [`Front::with_similar`]: every
    /// model then answers "off") and the largest `k` a Similar may ask for.
    similar: Arc<SimilarIndexes>,
    max_similar_k: usize,
    /// Searches in progress at once: a search is CPU work, and a flood of
    /// them must neither queue without bound nor take the blocking pool
    /// the embedded store reads on. Past it, `RESOURCE_EXHAUSTED`.
    similar_slots: Arc<tokio::sync::Semaphore>,
    /// Bumped before and after each Invalidate's delete. A Lookup caches
    /// what it read from the store only if no Invalidate ran meanwhile:
    /// a row read just before the delete must not go back into the tier
    /// just after the Invalidate cleared it.
    invalidations: std::sync::atomic::AtomicU64,
    /// How long an Invalidate waits for the store's delete.
    delete_deadline: Duration,
    /// Tells the other replicas about an Invalidate (none on one machine).
    broadcast: Option<Arc<dyn InvalidationBroadcast>>,
    /// Stored vectors per served version (namespace), as last counted by
    /// [`crate::versions`], with when (ms since the epoch).
    coverage: std::sync::Mutex<HashMap<String, (u64, i64)>>,
}

/// Tells every other EmbArk replica that keys were invalidated, so that
/// they drop them from their tiers and indexes too.
#[async_trait::async_trait]
pub trait InvalidationBroadcast: Send + Sync + 'static {
    /// Returns once the message is durable (or says why it is not).
    async fn broadcast(&self, model: &str, keys: &[String]) -> Result<(), BroadcastError>;
}

/// Why an invalidation did not reach the other replicas (a Kafka error).
pub type BroadcastError = Box<dyn std::error::Error + Send + Sync>;

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front").field("models", &self.models.names()).finish_non_exhaustive()
    }
}

/// Named in the refusal of a batch over the limit (`RESOURCE_EXHAUSTED`,
/// like load shedding): clients retry shedding, never this, which would
/// fail the same way every time.
pub const BATCH_LIMIT_FLAG: &str = "--max-batch-keys";

/// What `Similar` searches with.
#[derive(Debug, Clone)]
pub enum SimilarQuery {
    /// A stored key's vector; the key itself is left out of the answer.
    Key(String),
    /// Little-endian f32 bytes of the model's dim.
    Vector(Vec<u8>),
}

/// A `Similar` answer, best first.
#[derive(Debug)]
pub struct SimilarAnswer {
    pub keys: Vec<String>,
    pub scores: Vec<f32>,
    pub exact: bool,
}

/// A resolved row: the vector (or the OOV row) and where it came from.
type Resolved = (Bytes, Source);

impl Front {
    pub fn new(
        models: ModelRegistry,
        tier: VectorCache,
        store: GuardedStore,
        publisher: Arc<dyn MissPublisher>,
        dedup: MissDedup,
        limits: Limits,
        failure_ttl: Duration,
    ) -> Self {
        let similar = SimilarIndexes::new(&[], &embark_index::IndexConfig { max_vectors: 0, ..Default::default() });
        let slots = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let similar_slots = Arc::new(tokio::sync::Semaphore::new(slots));
        // At 0 from the start, so a scrape tells "no miss yet" (0) from a
        // series that does not exist (a renamed metric, a broken wiring).
        metrics::counter!("embark_misses_published_total").increment(0);
        metrics::counter!("embark_misses_deduplicated_total").increment(0);
        Self {
            models,
            tier,
            store: Arc::new(store),
            publisher,
            dedup,
            limits,
            failure_ttl,
            similar,
            max_similar_k: 1,
            similar_slots,
            invalidations: std::sync::atomic::AtomicU64::new(0),
            delete_deadline: DEFAULT_DELETE_DEADLINE,
            broadcast: None,
            coverage: Default::default(),
        }
    }

    /// Serves `Similar` from these indexes, with `k` up to `max_k`.
    pub fn with_similar(mut self, indexes: Arc<SimilarIndexes>, max_k: usize) -> Self {
        (self.similar, self.max_similar_k) = (indexes, max_k);
        self
    }

    /// Tells other replicas about each Invalidate through `broadcast`.
    pub fn with_broadcast(mut self, broadcast: Arc<dyn InvalidationBroadcast>) -> Self {
        self.broadcast = Some(broadcast);
        self
    }

    /// Drops keys another replica invalidated from this replica's tier,
    /// dedup window and similarity indexes, in every version of the model
    /// (the store rows are gone already).
    pub fn forget_local(&self, model: &str, keys: &[String]) {
        use std::sync::atomic::Ordering::AcqRel;
        // A Lookup of this replica reading the store right now must not
        // cache what it read.
        self.invalidations.fetch_add(1, AcqRel);
        let Some(versions) = self.models.versions(model) else { return };
        let stored: Vec<String> = keys.iter().map(|k| embark_store::storage_key(k).into_owned()).collect();
        for served in versions.all() {
            for k in keys {
                let h = key_hash(&served.namespace, k);
                self.tier.invalidate(&h);
                self.dedup.forget(&h);
            }
            self.similar.remove(&served.namespace, &stored);
        }
        metrics::counter!("embark_remote_invalidated_keys_total").increment(keys.len() as u64);
    }

    /// The vectors the similarity index of `model`'s current version holds
    /// and whether it is loaded (`None`: no index, `Similar` is off).
    pub fn similar_coverage(&self, model: &str) -> Option<(usize, bool)> {
        self.similar.coverage(&self.models.get(model)?.namespace)
    }

    /// Records a count of a version's stored vectors (by namespace).
    pub fn set_coverage(&self, namespace: &str, stored: u64, at_ms: i64) {
        if let Ok(mut c) = self.coverage.lock() {
            c.insert(namespace.to_owned(), (stored, at_ms));
        }
    }

    /// Every served version with its coverage as last counted, and which
    /// version is current (the `Models` answer).
    pub fn model_infos(&self) -> Vec<embark_proto::embark::v1::ModelInfo> {
        let mut infos = self.models.infos();
        let coverage = self.coverage.lock().map(|c| c.clone()).unwrap_or_default();
        for info in &mut infos {
            let ns = embark_store::namespace(&info.name, &info.version);
            if let Some(&(stored, at)) = coverage.get(&ns) {
                (info.stored_vectors, info.stored_vectors_counted_at_unix_ms) = (stored, at);
            }
        }
        infos
    }

    /// Makes `version` current for `model` on this replica (a promote read
    /// from the store). Returns whether that changed anything.
    pub fn set_current(&self, model: &str, version: &str) -> Result<bool, FrontError> {
        self.models.set_current(model, version).map_err(|served| {
            FrontError::NotFound(format!(
                "this EmbArk does not serve version {version:?} of {model:?}; it serves {served:?}"
            ))
        })
    }

    pub fn models(&self) -> &ModelRegistry {
        &self.models
    }

    pub fn tier(&self) -> &VectorCache {
        &self.tier
    }

    /// The guard between Lookups and the store.
    pub fn store_guard(&self) -> &Arc<GuardedStore> {
        &self.store
    }

    /// Whether the store breaker is open: non-tier keys answer
    /// `OOV_UNAVAILABLE` now. Readiness reports it.
    pub fn store_breaker_open(&self) -> bool {
        self.store.is_open()
    }

    /// The served `version` of `name` (empty: its current version).
    fn model(&self, name: &str, version: &str) -> Result<&ServedModel, FrontError> {
        if name.is_empty() {
            return Err(FrontError::InvalidArgument(format!(
                "model is required; this EmbArk serves {:?}",
                self.models.names()
            )));
        }
        let versions = self.models.versions(name).ok_or_else(|| {
            FrontError::NotFound(format!("unknown model {name:?}; this EmbArk serves {:?}", self.models.names()))
        })?;
        versions.get(version).ok_or_else(|| {
            FrontError::NotFound(format!(
                "model {name:?} has no version {version:?} here; this EmbArk serves {:?} (Models lists them)",
                versions.version_names()
            ))
        })
    }

    fn check_keys(&self, keys: &[String]) -> Result<(), FrontError> {
        if keys.len() > self.limits.max_batch_keys {
            return Err(FrontError::ResourceExhausted(format!(
                "{} keys in one request; the limit is {} ({BATCH_LIMIT_FLAG}): split the batch",
                keys.len(),
                self.limits.max_batch_keys
            )));
        }
        for (i, k) in keys.iter().enumerate() {
            if k.is_empty() {
                return Err(FrontError::InvalidArgument(format!("keys[{i}] is empty; every key must be non-empty")));
            }
            if k.len() > self.limits.max_key_bytes {
                return Err(FrontError::InvalidArgument(format!(
                    "keys[{i}] is {} bytes; the limit is {} bytes (--max-key-bytes)",
                    k.len(),
                    self.limits.max_key_bytes
                )));
            }
        }
        Ok(())
    }

    /// Answers a batch from `model`'s current version (see
    /// [`Front::lookup_version`]).
    pub async fn lookup(&self, model: &str, keys: &[String]) -> Result<LookupAnswer, FrontError> {
        self.lookup_version(model, "", keys).await
    }

    /// Answers a batch from `model` at `version` (empty: the current one):
    /// every key gets a row, never an error for an unknown key. Duplicate
    /// keys are resolved once and answered alike. Every row is of the one
    /// version the answer names: tier entries, store rows and misses are
    /// all keyed by the version's namespace.
    pub async fn lookup_version(
        &self,
        model: &str,
        version: &str,
        keys: &[String],
    ) -> Result<LookupAnswer, FrontError> {
        self.lookup_as(model, version, keys, VectorType::F32).await
    }

    /// [`Front::lookup_version`] with rows of `vector_type`: a tier row of
    /// that type is copied as it is, another converted (`vectors::append_as`).
    pub async fn lookup_as(
        &self,
        model: &str,
        version: &str,
        keys: &[String],
        vector_type: VectorType,
    ) -> Result<LookupAnswer, FrontError> {
        let started = std::time::Instant::now();
        let served = self.model(model, version)?;
        self.check_keys(keys)?;
        let dim = served.spec.dim;
        let ns = served.namespace.as_str();
        let packed_len = vectors::packed_row_bytes(served.tier_type, dim);

        // Distinct keys, each resolved once: `slot[i]` is key i's distinct index.
        let mut first: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
        let mut slot = Vec::with_capacity(keys.len());
        let mut distinct: Vec<(&str, KeyHash)> = Vec::with_capacity(keys.len());
        for k in keys {
            let next = distinct.len();
            let s = *first.entry(k.as_str()).or_insert(next);
            if s == next {
                distinct.push((k.as_str(), key_hash(ns, k)));
            }
            slot.push(s);
        }

        let now = now_unix_ms();
        let mut resolved: Vec<Option<Resolved>> = vec![None; distinct.len()];
        let mut to_store: Vec<usize> = Vec::new();
        for (i, (_, h)) in distinct.iter().enumerate() {
            match self.tier.get(h) {
                Some(CachedRow::Vector(v)) if v.len() == packed_len => resolved[i] = Some((v, Source::Cache)),
                Some(CachedRow::Failed { until_unix_ms }) if now < until_unix_ms => {
                    resolved[i] = Some((served.oov_packed.clone(), Source::OovFailed))
                }
                _ => to_store.push(i),
            }
        }

        if !to_store.is_empty() {
            let wanted: Vec<String> = to_store.iter().map(|&i| distinct[i].0.to_owned()).collect();
            let epoch = self.invalidations.load(std::sync::atomic::Ordering::Acquire);
            let rows = self
                .store
                .get_many(ns, &wanted)
                .instrument(tracing::info_span!("store.read", model, keys = wanted.len()))
                .await;
            let may_cache = self.invalidations.load(std::sync::atomic::Ordering::Acquire) == epoch;
            let ttl_ms = self.failure_ttl.as_millis() as i64;
            for (&i, row) in to_store.iter().zip(rows) {
                // Not answered in time: OOV, not queued (the key may well
                // be stored), counted by the guard.
                let Ok(row) = row else {
                    resolved[i] = Some((served.oov_packed.clone(), Source::OovUnavailable));
                    continue;
                };
                let (key, h) = distinct[i];
                resolved[i] = Some(match row {
                    Some(StoredRow::Vector { vector, .. }) if vector.len() == dim => {
                        let v = served.pack(&vector);
                        if may_cache {
                            self.tier.insert(h, CachedRow::Vector(v.clone()));
                        }
                        (v, Source::Store)
                    }
                    Some(StoredRow::Failed(f)) if now - f.at_unix_ms < ttl_ms => {
                        if may_cache {
                            self.tier.insert(h, CachedRow::Failed { until_unix_ms: f.at_unix_ms + ttl_ms });
                        }
                        (served.oov_packed.clone(), Source::OovFailed)
                    }
                    // Unknown, an expired failure, a corrupt row or a
                    // vector of another dim (stale model output): queue it.
                    _ => {
                        self.queue_miss(served, key, h, now);
                        (served.oov_packed.clone(), Source::OovPending)
                    }
                });
            }
        }

        // The answer's rows: the tier's own buffers when it keeps the asked
        // type (shared, copied once by the encoder), else converted into
        // one buffer. Counters once per request, not once per key.
        let shared = served.tier_type == vector_type;
        let mut matrix = Vec::with_capacity(if shared { keys.len() } else { 1 });
        let mut wire = vectors::WireRows::with_capacity(vector_type, if shared { 0 } else { keys.len() }, dim);
        let mut scales = Vec::new();
        let mut scratch = Vec::new();
        let mut sources = Vec::with_capacity(keys.len());
        let mut counts = [0u64; 8];
        for s in slot {
            let (v, source) = resolved[s].as_ref().unwrap_or_else(|| unreachable!("every distinct key is resolved"));
            match (shared, vector_type) {
                // A packed I8 row is its scale, then its values.
                (true, VectorType::I8) => {
                    scales.extend_from_slice(&v[..4]);
                    matrix.push(v.slice(4..));
                }
                (true, _) => matrix.push(v.clone()),
                (false, _) => {
                    if !vectors::append_as(served.tier_type, v, dim, vector_type, &mut wire, &mut scratch) {
                        unreachable!("tier rows and the OOV row are packed rows of the model's dim");
                    }
                }
            }
            sources.push(*source);
            counts[(*source as usize).min(counts.len() - 1)] += 1;
        }
        if !shared {
            matrix.push(Bytes::from(wire.vectors));
            scales = wire.scales;
        }
        for (i, n) in counts.iter().enumerate() {
            if *n > 0
                && let Ok(source) = Source::try_from(i as i32)
            {
                served.metrics.keys(source).increment(*n);
            }
        }
        served.metrics.lookups.increment(1);
        served.metrics.latency.record(started.elapsed().as_secs_f64());
        Ok(LookupAnswer { version: served.spec.version.as_str(), dim, vector_type, matrix, scales, sources })
    }

    fn queue_miss(&self, served: &ServedModel, key: &str, h: KeyHash, now: i64) {
        let model = served.spec.name.as_str();
        if !self.dedup.first_in_window(h) {
            metrics::counter!("embark_misses_deduplicated_total").increment(1);
            return;
        }
        // The miss carries this span's context, so its fill (in KFC or the
        // fill loop of `embark up`) joins the Lookup's trace.
        let span = tracing::info_span!("miss.publish", model);
        let _entered = span.enter();
        let event = MissEvent {
            model: model.to_owned(),
            key: key.to_owned(),
            first_seen_unix_ms: now,
            attempts: 0,
            not_before_unix_ms: 0,
            dim: served.spec.dim as u32,
            trace_context: embark_ops::traces::current_carrier(),
            version: served.spec.version.clone(),
        };
        if self.publisher.publish(event) {
            metrics::counter!("embark_misses_published_total").increment(1);
        } else {
            // Dropped: let the next Lookup of this key try again.
            self.dedup.forget(&h);
        }
    }

    /// The keys most similar to the query's vector (see `embark.proto`).
    pub async fn similar(
        &self,
        model: &str,
        query: SimilarQuery,
        k: usize,
        min_score: f32,
    ) -> Result<SimilarAnswer, FrontError> {
        self.similar_version(model, "", query, k, min_score).await
    }

    /// [`Front::similar`] among the vectors of `model` at `version`
    /// (empty: the current one).
    pub async fn similar_version(
        &self,
        model: &str,
        version: &str,
        query: SimilarQuery,
        k: usize,
        min_score: f32,
    ) -> Result<SimilarAnswer, FrontError> {
        let served = self.model(model, version)?;
        let version = served.spec.version.as_str();
        let dim = served.spec.dim;
        let max_k = self.max_similar_k;
        if k == 0 || k > max_k {
            return Err(FrontError::InvalidArgument(format!("k is {k}; ask for 1 to {max_k} (--similar-max-k)")));
        }
        if !(-1.0..=1.0).contains(&min_score) {
            return Err(FrontError::InvalidArgument(format!("min_score {min_score} is not a cosine in [-1, 1]")));
        }
        let (vector, exclude) = match query {
            SimilarQuery::Vector(bytes) => {
                let vector = embark_proto::f32_from_le(&bytes).filter(|v| v.len() == dim).ok_or_else(|| {
                    FrontError::InvalidArgument(format!(
                        "vector is {} bytes; model {model:?} takes {dim} little-endian float32 ({} bytes)",
                        bytes.len(),
                        dim * 4
                    ))
                })?;
                // A cosine against a non-finite or all-zero query is not a
                // number: refuse it rather than answer NaN scores.
                if vector.iter().any(|x| !x.is_finite()) || vector.iter().all(|&x| x == 0.0) {
                    return Err(FrontError::InvalidArgument(
                        "vector must be finite numbers, not all zero (a cosine needs a direction)".into(),
                    ));
                }
                (vector, None)
            }
            SimilarQuery::Key(key) => {
                let answer = self.lookup_version(model, version, std::slice::from_ref(&key)).await?;
                match answer.sources.first() {
                    Some(Source::Cache | Source::Store) => {}
                    Some(s) => {
                        return Err(FrontError::FailedPrecondition(format!(
                            "key has no vector yet ({}); it is queued for embedding when pending, retry later",
                            s.as_str_name()
                        )));
                    }
                    None => unreachable!("one row per key"),
                }
                let vector = embark_proto::f32_from_le(&answer.vectors()).unwrap_or_default();
                (vector, Some(embark_store::storage_key(&key).into_owned()))
            }
        };
        let slot = self.similar_slots.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!("embark_similar_shed_total").increment(1);
            FrontError::ResourceExhausted("every similarity search slot is busy (one per core); retry shortly".into())
        })?;
        let (indexes, model_name) = (self.similar.clone(), served.namespace.clone());
        let found = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            indexes.search(&model_name, &vector, k, min_score, exclude.as_deref())
        })
        .await
        .map_err(|e| FrontError::Unavailable(format!("search task failed: {e}")))?;
        let (hits, exact) = found.map_err(|e| match e {
            SimilarError::Off(_) => FrontError::FailedPrecondition(e.to_string()),
            SimilarError::Loading { .. } => FrontError::Unavailable(e.to_string()),
            // The graph refusing a search is ours (out of memory), not the caller's.
            SimilarError::Query(q @ embark_index::IndexError::Graph(_)) => FrontError::Unavailable(q.to_string()),
            SimilarError::Query(q) => FrontError::InvalidArgument(q.to_string()),
        })?;
        metrics::counter!("embark_similar_requests_total", "model" => model.to_owned()).increment(1);
        Ok(SimilarAnswer {
            keys: hits.iter().map(|h| h.key.to_string()).collect(),
            scores: hits.iter().map(|h| h.score).collect(),
            exact,
        })
    }

    /// Forgets the keys' vectors (tier and store) in every served version
    /// of the model, and queues them again for the current one (the other
    /// versions fill again on their next Lookup). Returns how many
    /// distinct keys were invalidated.
    pub async fn invalidate(&self, model: &str, keys: &[String]) -> Result<usize, FrontError> {
        let current = self.model(model, "")?;
        self.check_keys(keys)?;
        let mut distinct: Vec<String> = keys.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let namespaces: Vec<&str> = self
            .models
            .versions(model)
            .map(|v| v.all().iter().map(|m| m.namespace.as_str()).collect())
            .unwrap_or_default();
        use std::sync::atomic::Ordering::AcqRel;
        self.invalidations.fetch_add(1, AcqRel);
        let store = self.store.inner();
        let deletes = futures::future::try_join_all(namespaces.iter().map(|ns| store.delete(ns, &distinct)));
        let deleted = tokio::time::timeout(self.delete_deadline, deletes).await.map(|r| r.map(|_| ()));
        self.invalidations.fetch_add(1, AcqRel);
        match deleted {
            Ok(done) => done?,
            Err(_) => {
                return Err(FrontError::Unavailable(format!(
                    "the store did not confirm the delete within {:?}; retry the Invalidate",
                    self.delete_deadline
                )));
            }
        }
        let now = now_unix_ms();
        for k in &distinct {
            for ns in &namespaces {
                let h = key_hash(ns, k);
                self.tier.invalidate(&h);
                self.dedup.forget(&h);
            }
            self.queue_miss(current, k, key_hash(&current.namespace, k), now);
        }
        metrics::counter!("embark_invalidated_keys_total").increment(distinct.len() as u64);
        if let Some(b) = &self.broadcast
            && let Err(e) = b.broadcast(model, &distinct).await
        {
            metrics::counter!("embark_invalidations_unbroadcast_total").increment(1);
            return Err(FrontError::Unavailable(format!(
                "deleted from the store and this replica, but other replicas were not told ({e}); retry the Invalidate"
            )));
        }
        Ok(distinct.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use async_trait::async_trait;
    use embark_store::{EmbeddingStore, FailureRecord, RowRead, embedded::EmbeddedStore};

    use super::*;
    use crate::cache::le_bytes;
    use crate::store_guard::GuardConfig;

    const MODEL: &str = "minilm-l6-v2";

    fn spec() -> &'static retina::ModelSpec {
        retina::catalog::builtin().spec(MODEL).expect("a known model")
    }

    /// Where the model's current version keeps its rows and tier entries.
    fn ns() -> String {
        embark_store::namespace(MODEL, &spec().version)
    }

    /// The embedded store, whose next read, once armed, waits at a gate
    /// after reading and before answering.
    struct GatedStore {
        inner: EmbeddedStore,
        armed: AtomicBool,
        entered: tokio::sync::Notify,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait]
    impl embark_store::wrap::StoreWrapper for GatedStore {
        fn inner(&self) -> &dyn EmbeddingStore {
            &self.inner
        }
        async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
            let rows = self.inner.get_many(model, keys).await;
            if self.armed.swap(false, Ordering::SeqCst) {
                self.entered.notify_one();
                let _open = self.gate.acquire().await;
            }
            rows
        }
        async fn get_each(&self, model: &str, keys: &[String], sink: &mut (dyn FnMut(usize, RowRead) + Send)) {
            match EmbeddingStore::get_many(self, model, keys).await {
                Ok(rows) => rows.into_iter().enumerate().for_each(|(i, r)| sink(i, Ok(r))),
                Err(e) => panic!("{e}"),
            }
        }
    }

    struct NoPublisher;
    impl MissPublisher for NoPublisher {
        fn publish(&self, _: MissEvent) -> bool {
            true
        }
    }

    /// Records the misses published to it; while `refuse` is set it drops
    /// them (a full buffer) and counts the refusals.
    #[derive(Default)]
    struct Recorder {
        published: std::sync::Mutex<Vec<MissEvent>>,
        refused: std::sync::atomic::AtomicUsize,
        refuse: AtomicBool,
    }

    impl MissPublisher for Recorder {
        fn publish(&self, event: MissEvent) -> bool {
            if self.refuse.load(Ordering::SeqCst) {
                self.refused.fetch_add(1, Ordering::SeqCst);
                return false;
            }
            self.published.lock().unwrap_or_else(|p| p.into_inner()).push(event);
            true
        }
    }

    impl Recorder {
        fn published(&self) -> Vec<MissEvent> {
            self.published.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        fn keys(&self) -> Vec<String> {
            self.published().into_iter().map(|e| e.key).collect()
        }
    }

    /// Key prefix whose store read never answers (a store that stopped).
    const STALL: &str = "stall:";

    /// The embedded store, recording the keys of every read that reaches
    /// it; keys starting with [`STALL`] are never answered.
    struct Instrumented {
        inner: EmbeddedStore,
        reads: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl Instrumented {
        fn reads(&self) -> Vec<Vec<String>> {
            self.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }
    }

    #[async_trait]
    impl embark_store::wrap::StoreWrapper for Instrumented {
        fn inner(&self) -> &dyn EmbeddingStore {
            &self.inner
        }
        async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
            self.reads.lock().unwrap_or_else(|p| p.into_inner()).push(keys.to_vec());
            self.inner.get_many(model, keys).await
        }
        async fn get_each(&self, model: &str, keys: &[String], sink: &mut (dyn FnMut(usize, RowRead) + Send)) {
            self.reads.lock().unwrap_or_else(|p| p.into_inner()).push(keys.to_vec());
            let answered: Vec<usize> = (0..keys.len()).filter(|&i| !keys[i].starts_with(STALL)).collect();
            let wanted: Vec<String> = answered.iter().map(|&i| keys[i].clone()).collect();
            match self.inner.get_many(model, &wanted).await {
                Ok(rows) => answered.iter().zip(rows).for_each(|(&i, r)| sink(i, Ok(r))),
                Err(e) => panic!("{e}"),
            }
            if answered.len() < keys.len() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A front on a real embedded store in a temporary directory.
    struct Fixture {
        front: Front,
        store: Arc<Instrumented>,
        publisher: Arc<Recorder>,
        _dir: tempfile::TempDir,
    }

    struct Options {
        /// The served versions of MODEL (default: the built-in one).
        specs: Vec<&'static retina::ModelSpec>,
        limits: Limits,
        dedup_window: Duration,
        failure_ttl: Duration,
        /// Generous by default: a read of the embedded store on a loaded
        /// machine must not turn into `OOV_UNAVAILABLE` by accident.
        deadline: Duration,
        /// `--tier-type` flags.
        tier_types: Vec<String>,
    }

    impl Default for Options {
        fn default() -> Self {
            Self {
                specs: vec![spec()],
                limits: Limits::default(),
                dedup_window: Duration::from_secs(60),
                failure_ttl: Duration::from_secs(3600),
                deadline: Duration::from_secs(10),
                tier_types: Vec::new(),
            }
        }
    }

    fn fixture(o: Options) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        let store = Arc::new(Instrumented { inner, reads: Default::default() });
        let publisher = Arc::new(Recorder::default());
        let mut registry = ModelRegistry::new(&o.specs, &[]).expect("registry");
        registry.set_tier_types(&o.tier_types).expect("tier types");
        let front = Front::new(
            registry,
            VectorCache::new(64 << 20, None),
            GuardedStore::new(store.clone(), GuardConfig { deadline: o.deadline, ..GuardConfig::default() }),
            publisher.clone(),
            MissDedup::new(o.dedup_window, 1000),
            o.limits,
            o.failure_ttl,
        );
        Fixture { front, store, publisher, _dir: dir }
    }

    const DIM: usize = 384;

    /// A second version of MODEL, current by the catalogue.
    fn v2() -> &'static retina::ModelSpec {
        Box::leak(Box::new(retina::ModelSpec { version: "2".into(), current: true, ..spec().clone() }))
    }

    /// Part 3 of issue 12: rows, tier entries and misses are per version,
    /// so one answer never mixes versions and a version never serves
    /// another's row; which is current moves with a promote.
    #[tokio::test]
    async fn versions_are_served_side_by_side_and_never_mix() {
        let v2 = v2();
        let f = fixture(Options { specs: vec![spec(), v2], ..Options::default() });
        let v2_rows = embark_store::namespace(MODEL, "2");
        f.store.put_vectors(&ns(), vec![("k".into(), vec![0.5; DIM])]).await.expect("put");
        f.store.put_vectors(&v2_rows, vec![("k".into(), vec![0.75; DIM])]).await.expect("put");

        // The catalogue marks version 2 current.
        let a = f.front.lookup(MODEL, &strings(&["k", "only in 1"])).await.expect("lookup");
        assert_eq!((a.version, a.sources.clone()), ("2", vec![Source::Store, Source::OovPending]));
        assert_eq!(&a.vectors()[..DIM * 4], wire(0.75).as_slice());
        let published = f.publisher.published();
        assert_eq!((published[0].key.as_str(), published[0].version.as_str()), ("only in 1", "2"));

        // Pinned to version 1: its own row, from the store then the tier.
        let v1 = spec().version.as_str();
        for source in [Source::Store, Source::Cache] {
            let a = f.front.lookup_version(MODEL, v1, &strings(&["k"])).await.expect("lookup");
            assert_eq!((a.version, a.sources.clone(), a.vectors()), (v1, vec![source], wire(0.5)));
        }
        let e = f.front.lookup_version(MODEL, "3", &strings(&["k"])).await.expect_err("unknown version");
        assert!(matches!(&e, FrontError::NotFound(m) if m.contains("no version \"3\"")), "{e}");

        // A promote read from the store: version 1 is current, from its tier entry.
        assert!(f.front.set_current(MODEL, v1).expect("served"));
        let a = f.front.lookup(MODEL, &strings(&["k"])).await.expect("lookup");
        assert_eq!((a.version, a.sources.clone(), a.vectors()), (v1, vec![Source::Cache], wire(0.5)));
        assert!(f.front.set_current(MODEL, "3").is_err(), "a version this front does not serve");
        let infos = f.front.model_infos();
        assert_eq!(
            infos.iter().map(|i| (i.version.as_str(), i.current)).collect::<Vec<_>>(),
            [(v1, true), ("2", false)]
        );

        // Invalidate forgets the key in every version.
        f.front.invalidate(MODEL, &strings(&["k"])).await.expect("invalidate");
        for version in [v1, "2"] {
            let a = f.front.lookup_version(MODEL, version, &strings(&["k"])).await.expect("lookup");
            assert_eq!(a.sources, vec![Source::OovPending], "version {version}");
        }
    }

    fn strings(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    /// A row of `DIM` copies of `x`, as the response carries it.
    fn wire(x: f32) -> Vec<u8> {
        le_bytes(&[x; DIM]).to_vec()
    }

    /// The OOV row (zeros by default), as the response carries it.
    fn oov() -> Vec<u8> {
        vec![0; DIM * 4]
    }

    #[tokio::test]
    async fn a_tier_hit_is_served_without_reading_the_store() {
        let f = fixture(Options::default());
        f.store.put_vectors(&ns(), vec![("k".into(), vec![0.5; DIM])]).await.expect("put");
        f.front.tier().insert(key_hash(&ns(), "k"), CachedRow::Vector(le_bytes(&[0.25; DIM])));
        let a = f.front.lookup(MODEL, &strings(&["k"])).await.expect("lookup");
        assert_eq!((a.dim, a.sources.clone()), (DIM, vec![Source::Cache]));
        assert_eq!(a.vectors(), wire(0.25), "the tier's row, not the store's");
        assert_eq!(f.store.reads(), Vec::<Vec<String>>::new());
        assert_eq!(f.publisher.published(), vec![]);
    }

    /// Issue 14: a Lookup answers in the type it asks for (f16, bf16, i8
    /// with per-row scales), from an f32 tier or a compact one, store hits
    /// and tier hits alike, OOV rows included; a compact tier keeps the
    /// smaller row.
    #[tokio::test]
    async fn lookups_answer_in_the_type_asked_from_a_tier_of_any_type() {
        use embark_proto::vectors::{decode_matrix, pack, packed_row_bytes, unpack, value_bytes};
        let all = [VectorType::F32, VectorType::F16, VectorType::Bf16, VectorType::I8];
        let through = |t: VectorType, row: &[f32]| {
            let mut packed = Vec::new();
            pack(t, row, &mut packed);
            let mut back = Vec::new();
            assert!(unpack(t, &packed, row.len(), &mut back));
            back
        };
        let row: Vec<f32> = (0..DIM).map(|i| ((i as f32) * 0.1).sin() * 0.3).collect();
        for tier in all {
            let name = embark_proto::vectors::type_name(tier);
            let f = fixture(Options { tier_types: vec![format!("{MODEL}={name}")], ..Options::default() });
            f.store.put_vectors(&ns(), vec![("k".into(), row.clone())]).await.expect("put");
            for (round, source) in [(0, Source::Store), (1, Source::Cache)] {
                for t in all {
                    let a = f.front.lookup_as(MODEL, "", &strings(&["k", "unknown"]), t).await.expect("lookup");
                    let what = format!("tier {tier:?}, answer {t:?}, round {round}");
                    assert_eq!(a.vector_type, t, "{what}");
                    assert_eq!(a.sources[0], if t == all[0] { source } else { Source::Cache }, "{what}");
                    assert_eq!(a.vectors().len(), 2 * DIM * value_bytes(t), "{what}");
                    assert_eq!(a.scales.len(), if t == VectorType::I8 { 8 } else { 0 }, "{what}");
                    let got = decode_matrix(t, &a.vectors(), &a.scales, DIM).expect("whole rows");
                    let want = if t == tier { through(t, &row) } else { through(t, &through(tier, &row)) };
                    assert_eq!(&got[..DIM], &want[..], "{what}");
                    assert!(got[DIM..].iter().all(|v| *v == 0.0), "{what}: the OOV row");
                }
            }
            match f.front.tier().get(&key_hash(&ns(), "k")) {
                Some(CachedRow::Vector(v)) => assert_eq!(v.len(), packed_row_bytes(tier, DIM), "{tier:?}"),
                other => panic!("{tier:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_store_hit_is_served_then_answered_from_the_tier() {
        let f = fixture(Options::default());
        f.store.put_vectors(&ns(), vec![("k".into(), vec![0.5; DIM])]).await.expect("put");
        let first = f.front.lookup(MODEL, &strings(&["k"])).await.expect("lookup");
        assert_eq!((first.sources.clone(), first.vectors()), (vec![Source::Store], wire(0.5)));
        // Gone from the store behind the front's back: the tier answers.
        f.store.inner.delete(&ns(), &strings(&["k"])).await.expect("delete");
        let second = f.front.lookup(MODEL, &strings(&["k"])).await.expect("lookup");
        assert_eq!((second.sources.clone(), second.vectors()), (vec![Source::Cache], wire(0.5)));
        assert_eq!(f.store.reads(), vec![strings(&["k"])], "read once");
        assert_eq!(f.publisher.published(), vec![]);
    }

    #[tokio::test]
    async fn an_unknown_key_is_oov_pending_and_queued_once_per_dedup_window() {
        let window = Duration::from_millis(300);
        let f = fixture(Options { dedup_window: window, ..Options::default() });
        let before = now_unix_ms();
        let a = f.front.lookup(MODEL, &strings(&["new"])).await.expect("lookup");
        let after = now_unix_ms();
        assert_eq!((a.dim, a.sources.clone(), a.vectors()), (DIM, vec![Source::OovPending], oov()));
        let published = f.publisher.published();
        assert_eq!(published.len(), 1, "{published:?}");
        let seen = published[0].first_seen_unix_ms;
        assert!((before..=after).contains(&seen), "first seen at {seen}, Lookup ran {before}..={after}");
        let want = MissEvent {
            model: MODEL.into(),
            key: "new".into(),
            first_seen_unix_ms: seen,
            attempts: 0,
            not_before_unix_ms: 0,
            dim: DIM as u32,
            trace_context: Default::default(),
            version: spec().version.clone(),
        };
        assert_eq!(published, vec![want]);
        // Within the window: still OOV_PENDING, not queued again.
        for _ in 0..3 {
            let again = f.front.lookup(MODEL, &strings(&["new"])).await.expect("lookup");
            assert_eq!((again.sources.clone(), again.vectors()), (vec![Source::OovPending], oov()));
        }
        assert_eq!(f.publisher.keys(), strings(&["new"]));
        // The next window queues it again: the key is still unknown.
        tokio::time::sleep(window + Duration::from_millis(200)).await;
        f.front.lookup(MODEL, &strings(&["new"])).await.expect("lookup");
        assert_eq!(f.publisher.keys(), strings(&["new", "new"]));
    }

    #[tokio::test]
    async fn a_dropped_miss_is_queued_by_the_next_lookup() {
        let f = fixture(Options::default());
        f.publisher.refuse.store(true, Ordering::SeqCst);
        for refused in 1..=2 {
            let a = f.front.lookup(MODEL, &strings(&["k"])).await.expect("lookup");
            assert_eq!(a.sources, vec![Source::OovPending]);
            assert_eq!(f.publisher.refused.load(Ordering::SeqCst), refused, "a dropped miss is not deduplicated");
        }
        f.publisher.refuse.store(false, Ordering::SeqCst);
        f.front.lookup(MODEL, &strings(&["k"])).await.expect("lookup");
        f.front.lookup(MODEL, &strings(&["k"])).await.expect("lookup");
        assert_eq!(f.publisher.keys(), strings(&["k"]), "queued once it was taken, then deduplicated");
    }

    #[tokio::test]
    async fn duplicate_keys_in_one_request_are_resolved_once_and_answered_alike() {
        let f = fixture(Options::default());
        f.store.put_vectors(&ns(), vec![("s".into(), vec![0.5; DIM])]).await.expect("put");
        f.front.tier().insert(key_hash(&ns(), "c"), CachedRow::Vector(le_bytes(&[0.25; DIM])));
        let a = f.front.lookup(MODEL, &strings(&["s", "u", "c", "s", "u", "c"])).await.expect("lookup");
        use Source::{Cache, OovPending, Store};
        assert_eq!(a.sources, vec![Store, OovPending, Cache, Store, OovPending, Cache]);
        let want: Vec<u8> = [wire(0.5), oov(), wire(0.25), wire(0.5), oov(), wire(0.25)].concat();
        assert_eq!(a.vectors(), want);
        assert_eq!(f.store.reads(), vec![strings(&["s", "u"])], "one read of the distinct non-tier keys");
        assert_eq!(f.publisher.keys(), strings(&["u"]), "one miss for the twice-asked unknown key");
    }

    #[tokio::test]
    async fn a_stored_row_of_another_dim_is_queued_again_and_not_cached() {
        let f = fixture(Options::default());
        // Output of another model version: 10 values for a 384-d model.
        f.store.put_vectors(&ns(), vec![("stale".into(), vec![0.5; 10])]).await.expect("put");
        for _ in 0..2 {
            let a = f.front.lookup(MODEL, &strings(&["stale"])).await.expect("lookup");
            assert_eq!((a.sources.clone(), a.vectors()), (vec![Source::OovPending], oov()));
        }
        assert!(f.front.tier().get(&key_hash(&ns(), "stale")).is_none(), "the stale row is not cached");
        assert_eq!(f.store.reads().len(), 2, "each Lookup read the store again");
        let published = f.publisher.published();
        assert_eq!(published.len(), 1, "queued once per window: {published:?}");
        assert_eq!((published[0].key.as_str(), published[0].dim), ("stale", DIM as u32));

        // A tier row of another dim is not served either: the store's is.
        f.front.tier().insert(key_hash(&ns(), "t"), CachedRow::Vector(le_bytes(&[1.0; 10])));
        f.store.put_vectors(&ns(), vec![("t".into(), vec![0.5; DIM])]).await.expect("put");
        let a = f.front.lookup(MODEL, &strings(&["t"])).await.expect("lookup");
        assert_eq!((a.sources.clone(), a.vectors()), (vec![Source::Store], wire(0.5)));
    }

    #[tokio::test]
    async fn a_fresh_failure_record_is_oov_failed_and_an_expired_one_is_queued() {
        let f = fixture(Options::default());
        let failure = |at_unix_ms| FailureRecord { code: 5, reason: "404".into(), at_unix_ms };
        let hour = 3_600_000;
        f.store
            .put_failures(
                &ns(),
                vec![("bad".into(), failure(now_unix_ms())), ("old".into(), failure(now_unix_ms() - 2 * hour))],
            )
            .await
            .expect("put");
        let a = f.front.lookup(MODEL, &strings(&["bad", "old"])).await.expect("lookup");
        assert_eq!(
            (a.sources.clone(), a.vectors()),
            (vec![Source::OovFailed, Source::OovPending], [oov(), oov()].concat())
        );
        assert_eq!(f.publisher.keys(), strings(&["old"]), "only the expired failure is tried again");
        // The fresh failure is answered from the tier now.
        let again = f.front.lookup(MODEL, &strings(&["bad"])).await.expect("lookup");
        assert_eq!(again.sources, vec![Source::OovFailed]);
        assert_eq!(f.store.reads(), vec![strings(&["bad", "old"])]);
    }

    #[tokio::test]
    async fn rows_the_store_does_not_answer_in_time_are_oov_unavailable_and_not_queued() {
        let f = fixture(Options { deadline: Duration::from_secs(1), ..Options::default() });
        f.store.put_vectors(&ns(), vec![("a".into(), vec![0.5; DIM])]).await.expect("put");
        let stalled = format!("{STALL}b");
        let a = f.front.lookup(MODEL, &["a".to_string(), stalled.clone()]).await.expect("lookup");
        assert_eq!(a.sources, vec![Source::Store, Source::OovUnavailable]);
        assert_eq!(a.vectors(), [wire(0.5), oov()].concat(), "the row that came in time is kept");
        assert_eq!(f.publisher.published(), vec![], "an unanswered key may well be stored: not queued");
        assert!(f.front.tier().get(&key_hash(&ns(), &stalled)).is_none());
        assert!(!f.front.store_breaker_open(), "a partly answered read is no failure");
    }

    #[tokio::test]
    async fn invalid_requests_are_refused_before_anything_is_read_or_queued() {
        let limits = Limits { max_batch_keys: 4, max_key_bytes: 8 };
        let f = fixture(Options { limits, ..Options::default() });
        f.front.tier().insert(key_hash(&ns(), "cached"), CachedRow::Vector(le_bytes(&[0.25; DIM])));
        let cases: [(&str, Vec<String>, &str); 5] = [
            ("", strings(&["fresh"]), "model is required; this EmbArk serves [\"minilm-l6-v2\"]"),
            ("nope", strings(&["fresh"]), "unknown model \"nope\"; this EmbArk serves [\"minilm-l6-v2\"]"),
            (MODEL, strings(&["fresh", ""]), "keys[1] is empty; every key must be non-empty"),
            (
                MODEL,
                strings(&["fresh", "cached", "123456789"]),
                "keys[2] is 9 bytes; the limit is 8 bytes (--max-key-bytes)",
            ),
            (
                MODEL,
                strings(&["fresh", "a", "b", "c", "d"]),
                "5 keys in one request; the limit is 4 (--max-batch-keys): split the batch",
            ),
        ];
        for (model, keys, message) in cases {
            let e = f.front.lookup(model, &keys).await.expect_err("refused");
            let kind_ok = match model {
                "" => matches!(e, FrontError::InvalidArgument(_)),
                "nope" => matches!(e, FrontError::NotFound(_)),
                _ if keys.len() > 4 => matches!(e, FrontError::ResourceExhausted(_)),
                _ => matches!(e, FrontError::InvalidArgument(_)),
            };
            assert!(kind_ok, "{model:?} {keys:?}: {e:?}");
            assert_eq!(e.to_string(), message);
        }
        assert_eq!(f.store.reads(), Vec::<Vec<String>>::new(), "nothing was read");
        assert_eq!(f.publisher.published(), vec![], "nothing was queued");
        // At the limits it is fine; an empty batch is an empty answer.
        let ok = f.front.lookup(MODEL, &strings(&["12345678", "cached", "c", "d"])).await.expect("lookup");
        assert_eq!(ok.sources.len(), 4);
        let empty = f.front.lookup(MODEL, &[]).await.expect("lookup");
        assert_eq!((empty.dim, empty.vectors().len(), empty.sources.len()), (DIM, 0, 0));
    }

    /// Defect 11.11: `Similar` had no concurrency bound: searches queued on
    /// the blocking pool without end. Past one per core they are refused.
    #[tokio::test]
    async fn similar_has_no_concurrency_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
        let front = Front::new(
            ModelRegistry::new(&[spec()], &[]).expect("registry"),
            VectorCache::new(1 << 20, None),
            GuardedStore::new(store, GuardConfig::default()),
            Arc::new(NoPublisher),
            MissDedup::new(Duration::from_secs(60), 1000),
            Limits::default(),
            Duration::from_secs(3600),
        );
        let query = || SimilarQuery::Vector(le_bytes(&[1.0; 384]).to_vec());
        let slots = front.similar_slots.available_permits();
        let _busy = front.similar_slots.clone().acquire_many_owned(slots as u32).await.expect("all slots");
        let refused = front.similar(MODEL, query(), 1, 0.0).await.expect_err("no slot free");
        assert!(matches!(refused, FrontError::ResourceExhausted(_)), "{refused}");
        drop(_busy);
        // With a slot free the search runs (and says Similar is off here).
        let off = front.similar(MODEL, query(), 1, 0.0).await.expect_err("off");
        assert!(matches!(off, FrontError::FailedPrecondition(_)), "{off}");
    }

    /// A NaN, infinite or all-zero query vector has no cosine with
    /// anything: it was searched and answered NaN scores (which JSON cannot
    /// even carry). It is refused before any search.
    #[tokio::test]
    async fn a_query_vector_without_a_direction_is_refused() {
        let f = fixture(Options::default());
        for (name, row) in [("zeros", [0.0; DIM]), ("nan", [f32::NAN; DIM]), ("inf", [f32::INFINITY; DIM])] {
            let query = SimilarQuery::Vector(le_bytes(&row).to_vec());
            let refused = f.front.similar(MODEL, query, 1, 0.0).await.expect_err(name);
            assert!(matches!(&refused, FrontError::InvalidArgument(m) if m.contains("finite")), "{name}: {refused}");
        }
    }

    /// Defect 11.8: a Lookup that read a row just before an Invalidate
    /// deleted it put the old vector back into the tier just after the
    /// Invalidate cleared it, and served it until evicted.
    #[tokio::test]
    async fn invalidate_is_incoherent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        inner.put_vectors(&ns(), vec![("k".into(), vec![0.5; 384])]).await.expect("put");
        let store = Arc::new(GatedStore {
            inner,
            armed: AtomicBool::new(true),
            entered: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let spec = retina::catalog::builtin().spec(MODEL).expect("a known model");
        let guard = GuardConfig { deadline: Duration::from_secs(10), ..GuardConfig::default() };
        let front = Arc::new(Front::new(
            ModelRegistry::new(&[spec], &[]).expect("registry"),
            VectorCache::new(64 << 20, None),
            GuardedStore::new(store.clone(), guard),
            Arc::new(NoPublisher),
            MissDedup::new(Duration::from_secs(60), 1000),
            Limits::default(),
            Duration::from_secs(3600),
        ));
        let lookup = tokio::spawn({
            let front = front.clone();
            async move { front.lookup(MODEL, &["k".to_string()]).await }
        });
        store.entered.notified().await;
        // The Lookup holds the old row; the Invalidate runs to completion.
        assert_eq!(front.invalidate(MODEL, &["k".to_string()]).await.expect("invalidate"), 1);
        store.gate.add_permits(1);
        let answer = lookup.await.expect("task").expect("lookup");
        assert_eq!(answer.sources, vec![Source::Store], "the Lookup that raced the Invalidate");
        assert!(front.tier().get(&key_hash(&ns(), "k")).is_none(), "the old vector is back in the tier");
        // The next Lookup reads the store, which no longer has it.
        let after = front.lookup(MODEL, &["k".to_string()]).await.expect("lookup");
        assert_eq!(after.sources, vec![Source::OovPending]);
    }
}
