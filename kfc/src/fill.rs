//! The fill loop: misses -> skip what is stored -> embed -> write -> settle.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};
use tracing::Instrument as _;

use embark_proto::{
    internal::v1::{DeadLetter, MissEvent},
    retina::v1::FailureCode,
};
use embark_queue::{MissSource, QueueError, backoff::Backoff};
use embark_store::{EmbeddingStore, FailureRecord, Filled, FilledRow, StoreError, StoredRow, now_unix_ms};
use tokio_util::sync::CancellationToken;

use crate::{EmbedOutcome, Embedder, embed_checked};

#[derive(Debug, Clone)]
pub struct FillConfig {
    /// Misses taken from the source per round.
    pub max_batch: usize,
    /// Inputs per embedder call.
    pub embed_batch: usize,
    /// A failure record younger than this is trusted: the key is skipped.
    pub failure_ttl: Duration,
    /// Transient per-input failures tolerated before a failure record is
    /// written. Whole-call failures (embedder down) are retried forever.
    pub max_attempts: u32,
    pub backoff: Backoff,
}

impl FillConfig {
    /// The per-key decisions of this configuration.
    pub fn policy(&self) -> FillPolicy {
        FillPolicy { failure_ttl: self.failure_ttl, max_attempts: self.max_attempts, backoff: self.backoff }
    }
}

impl Default for FillConfig {
    fn default() -> Self {
        Self {
            max_batch: 64,
            embed_batch: 32,
            failure_ttl: Duration::from_secs(3600),
            max_attempts: 5,
            backoff: Backoff::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Source(#[from] QueueError),
    /// The store broke the one-row-per-key contract of `get_many`: pairing
    /// its answer with the keys would skip (and settle) keys never filled.
    #[error("the store returned {rows} rows for {keys} keys")]
    StoreMiscounted { keys: usize, rows: usize },
}

/// What a fill decides for each key, shared by [`FillLoop`] and `embark
/// backfill` so that the two cannot drift: which stored rows stand (the key
/// is skipped, [`FillPolicy::stands`]) and what becomes of each outcome of
/// the embedder ([`FillPolicy::decide`]).
#[derive(Debug, Clone, Copy)]
pub struct FillPolicy {
    /// A failure record younger than this stands: the key is skipped.
    /// `Duration::MAX`: failure records stand for good.
    pub failure_ttl: Duration,
    /// Tries of an input whose failure is transient, the first included.
    pub max_attempts: u32,
    /// Spaces out the retries of an input.
    pub backoff: Backoff,
}

/// Why a key is skipped: what is stored for it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stands {
    /// A vector of the dim the model is served at (of any dim when that is
    /// not known).
    Vector,
    /// A failure record younger than [`FillPolicy::failure_ttl`].
    Failure,
}

/// What becomes of one input's outcome ([`FillPolicy::decide`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Store this vector.
    Store(Vec<f32>),
    /// A transient failure with tries left: try again after `delay`;
    /// `attempts` counts the tries that failed so far.
    Retry { attempts: u32, delay: Duration, code: i32, reason: String },
    /// A permanent failure: record it.
    Fail(FailureRecord),
    /// A transient failure with no tries left. The fill loop records it
    /// (else the front would queue the key for good); `embark backfill`
    /// leaves it unrecorded, for its next run to try again.
    GiveUp(FailureRecord),
}

impl Decision {
    /// The `retina.v1.FailureCode` of an outcome that is not a vector.
    pub fn code(&self) -> Option<i32> {
        match self {
            Decision::Store(_) => None,
            Decision::Retry { code, .. } => Some(*code),
            Decision::Fail(f) | Decision::GiveUp(f) => Some(f.code),
        }
    }
}

impl FillPolicy {
    /// Whether `row`, stored for a key of a model served at `dim` dims (0:
    /// not known), stands at `now_ms`, so that the key is not embedded.
    pub fn stands(&self, row: Option<&StoredRow>, dim: u32, now_ms: i64) -> Option<Stands> {
        let ttl_ms = i64::try_from(self.failure_ttl.as_millis()).unwrap_or(i64::MAX);
        match row {
            // A vector of another dim than the front serves is stale
            // model output, which the front queues again: embed it, or
            // the key stays OOV_PENDING for good.
            Some(StoredRow::Vector { vector, .. }) if dim == 0 || vector.len() == dim as usize => Some(Stands::Vector),
            Some(StoredRow::Failed(f)) if now_ms.saturating_sub(f.at_unix_ms) < ttl_ms => Some(Stands::Failure),
            // Nothing, an expired failure record, or a corrupt row.
            _ => None,
        }
    }

    /// What becomes of `outcome`, the embedder's answer for an input of a
    /// model served at `dim` dims (0: not known) whose earlier tries failed
    /// `attempts` times.
    pub fn decide(&self, model: &str, outcome: EmbedOutcome, dim: u32, attempts: u32, now_ms: i64) -> Decision {
        let outcome = match outcome {
            EmbedOutcome::Vector(v) if dim != 0 && v.len() != dim as usize => {
                // Never store a row the front would refuse and queue
                // again: the embedder serves another version of the
                // model. Retried (a rollout may be under way), then
                // recorded as a failure.
                EmbedOutcome::Failed {
                    code: FailureCode::Internal as i32,
                    reason: format!(
                        "the embedder returned a {}-d vector; model {model:?} is served at {dim} dims",
                        v.len()
                    ),
                    transient: true,
                }
            }
            o => o,
        };
        match outcome {
            EmbedOutcome::Vector(v) => Decision::Store(v),
            EmbedOutcome::Failed { code, reason, transient } => {
                let attempts = attempts.saturating_add(1);
                if !transient {
                    Decision::Fail(FailureRecord { code, reason, at_unix_ms: now_ms })
                } else if attempts < self.max_attempts {
                    Decision::Retry { attempts, delay: self.backoff.delay(attempts), code, reason }
                } else {
                    let reason = format!("gave up after {attempts} attempts: {reason}");
                    Decision::GiveUp(FailureRecord { code, reason, at_unix_ms: now_ms })
                }
            }
        }
    }
}

impl FillError {
    /// Whether the round may pass if tried again with nothing changed. A
    /// store that refuses (no schema, a bad statement) is not transient;
    /// the source's errors are taken as transient.
    pub fn is_transient(&self) -> bool {
        match self {
            FillError::Store(e) => e.is_transient(),
            FillError::Source(_) => true,
            // A store that breaks its own contract is a bug, not a blip.
            FillError::StoreMiscounted { .. } => false,
        }
    }
}

/// What one round did (for logs and tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    pub embedded: usize,
    pub failed: usize,
    pub skipped: usize,
    pub retried: usize,
    /// An embedder call failed as a whole (the embedder is down or
    /// overloaded): the loop backs off before its next round.
    pub embedder_down: bool,
}

pub struct FillLoop<S, E> {
    source: Arc<S>,
    embedder: Arc<E>,
    store: Arc<dyn EmbeddingStore>,
    config: FillConfig,
    /// Consecutive failed rounds or embedder calls, for the backoff.
    failures: AtomicU32,
    labels: ModelLabels,
}

/// What a fill writes to: a model at a version, and the store rows that
/// version's vectors live in.
#[derive(Debug)]
pub struct ModelVersion<'a> {
    pub model: &'a str,
    /// Empty: the embedder's current version, stored in the model's
    /// unversioned rows (misses queued before versions existed).
    pub version: &'a str,
    pub namespace: String,
}

impl<'a> ModelVersion<'a> {
    pub fn new(model: &'a str, version: &'a str) -> Self {
        Self { model, version, namespace: embark_store::namespace(model, version) }
    }
}

/// One model version's misses of a round, with their tokens.
type ModelGroup<T> = ((String, String), Vec<(T, MissEvent)>);

/// The `model` label of KFC's metrics. Model names arrive in messages
/// anyone who can write the topic controls: the first
/// [`MAX_MODEL_LABELS`] names seen get a series of their own, later ones
/// share `other`, so a flood of invented names cannot grow the metrics
/// without bound.
#[derive(Debug, Default)]
struct ModelLabels(std::sync::Mutex<std::collections::HashSet<String>>);

/// Distinct `model` label values KFC's metrics take at most.
pub const MAX_MODEL_LABELS: usize = 32;

impl ModelLabels {
    fn get(&self, model: &str) -> String {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(model) || (seen.len() < MAX_MODEL_LABELS && model.len() <= 128) {
            seen.insert(model.to_owned());
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }
}

impl<S, E> std::fmt::Debug for FillLoop<S, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillLoop").field("config", &self.config).finish_non_exhaustive()
    }
}

impl<S: MissSource, E: Embedder> FillLoop<S, E> {
    pub fn new(source: Arc<S>, embedder: Arc<E>, store: Arc<dyn EmbeddingStore>, config: FillConfig) -> Self {
        Self { source, embedder, store, config, failures: AtomicU32::new(0), labels: ModelLabels::default() }
    }

    /// Runs rounds until `cancel` fires. A round in progress is finished
    /// (written and settled) before returning, so a graceful shutdown does
    /// not repeat work; misses not yet taken stay in the source.
    pub async fn run(&self, cancel: CancellationToken) {
        loop {
            let batch = tokio::select! {
                _ = cancel.cancelled() => break,
                b = self.source.next_batch(self.config.max_batch.max(1)) => b,
            };
            let result = match batch {
                Ok(batch) => self.round(batch).await,
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(stats) if stats.embedder_down => {
                    // Do not take more work the embedder cannot do yet.
                    let delay = self.config.backoff.delay(self.failures.load(Ordering::Relaxed).max(1));
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                    let delay = self.config.backoff.delay(n);
                    if e.is_transient() {
                        tracing::warn!(error = %e, ?delay, "fill round failed; its misses will be handed out again");
                    } else {
                        // Retried all the same: the misses wait for the fix.
                        tracing::error!(error = %e, ?delay, "fill round refused; retrying until the store is fixed");
                    }
                    metrics::counter!("kfc_round_errors_total").increment(1);
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        tracing::info!("fill loop stopped");
    }

    /// Processes one batch and settles it. On `Err` nothing was settled and
    /// the batch is handed back to the source (what was already written is
    /// skipped next time).
    ///
    /// The round is one span, `kfc.fill`: the child of the first traced
    /// miss's Lookup, linked to every other traced miss of the batch (a
    /// batch serves many traces; OpenTelemetry links say which).
    pub async fn round(&self, batch: Vec<(S::Token, MissEvent)>) -> Result<RoundStats, FillError> {
        let span = tracing::info_span!("kfc.fill", misses = batch.len());
        let mut parented = false;
        for (_, e) in batch.iter().filter(|(_, e)| !e.trace_context.is_empty()) {
            let carrier = e.trace_context.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            if parented {
                embark_ops::traces::add_link(&span, carrier);
            } else {
                parented = embark_ops::traces::set_parent(&span, carrier);
            }
        }
        self.round_in_span(batch).instrument(span).await
    }

    async fn round_in_span(&self, batch: Vec<(S::Token, MissEvent)>) -> Result<RoundStats, FillError> {
        // Each model is filled and settled on its own: a model whose write
        // fails hands back only its own misses, and what the models before
        // it wrote, retried or gave up on is settled, dead letters included
        // (handed back, they would be skipped as stored next time and their
        // dead letters never sent).
        let mut by_model: Vec<ModelGroup<S::Token>> = Vec::new();
        for (token, event) in batch {
            match by_model.iter_mut().find(|((m, v), _)| *m == event.model && *v == event.version) {
                Some((_, group)) => group.push((token, event)),
                None => by_model.push(((event.model.clone(), event.version.clone()), vec![(token, event)])),
            }
        }
        let mut stats = RoundStats::default();
        let mut groups = by_model.into_iter();
        while let Some((model, group)) = groups.next() {
            let events: Vec<MissEvent> = group.iter().map(|(_, e)| e.clone()).collect();
            let (mut retry, mut dead) = (Vec::new(), Vec::new());
            let model = ModelVersion::new(&model.0, &model.1);
            if let Err(e) = self.fill_model(&model, events, &mut stats, &mut retry, &mut dead).await {
                let n = self.failures.load(Ordering::Relaxed) + 1;
                let rest: Vec<_> = group.into_iter().chain(groups.flat_map(|(_, g)| g)).collect();
                self.source.abandon(rest, self.config.backoff.delay(n)).await;
                return Err(e);
            }
            stats.retried += retry.len();
            let tokens = group.into_iter().map(|(t, _)| t).collect();
            self.source.settle(tokens, retry, dead).await?;
        }
        Ok(stats)
    }

    async fn fill_model(
        &self,
        target: &ModelVersion<'_>,
        events: Vec<MissEvent>,
        stats: &mut RoundStats,
        retry: &mut Vec<MissEvent>,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(), FillError> {
        // One embedding per distinct key, however often it was queued; the
        // latest sighting stands for them all (a miss an Invalidate queued
        // must not lose to an older sighting, see `put_filled`).
        let mut by_key: HashMap<String, MissEvent> = HashMap::with_capacity(events.len());
        let mut order = Vec::with_capacity(events.len());
        for e in events {
            match by_key.get_mut(&e.key) {
                Some(kept) => kept.first_seen_unix_ms = kept.first_seen_unix_ms.max(e.first_seen_unix_ms),
                None => {
                    order.push(e.key.clone());
                    by_key.insert(e.key.clone(), e);
                }
            }
        }
        let events: Vec<MissEvent> = order.iter().filter_map(|k| by_key.remove(k)).collect();
        let keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();

        let now = now_unix_ms();
        let policy = self.config.policy();
        let model = target.model;
        let rows = self
            .store
            .get_many(&target.namespace, &keys)
            .instrument(tracing::info_span!("kfc.store.read", model, keys = keys.len()))
            .await?;
        if rows.len() != keys.len() {
            return Err(FillError::StoreMiscounted { keys: keys.len(), rows: rows.len() });
        }
        let todo: Vec<MissEvent> = events
            .into_iter()
            .zip(rows)
            .filter(|(e, row)| policy.stands(row.as_ref(), e.dim, now).is_none())
            .map(|(e, _)| e)
            .collect();
        let skipped = keys.len() - todo.len();
        stats.skipped += skipped;
        metrics::counter!("kfc_skipped_total", "model" => self.labels.get(model)).increment(skipped as u64);

        for chunk in todo.chunks(self.config.embed_batch.max(1)) {
            self.fill_chunk(target, chunk, stats, retry, dead).await?;
        }
        Ok(())
    }

    async fn fill_chunk(
        &self,
        target: &ModelVersion<'_>,
        chunk: &[MissEvent],
        stats: &mut RoundStats,
        retry: &mut Vec<MissEvent>,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(), FillError> {
        let model = target.model;
        let inputs: Vec<String> = chunk.iter().map(|e| e.key.clone()).collect();
        let embedding = tracing::info_span!("kfc.embed", model, inputs = inputs.len());
        let outcomes = match embed_checked(&*self.embedder, model, target.version, inputs).instrument(embedding).await {
            Ok(o) => o,
            Err(e) => {
                let reason = e.to_string();
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                let delay = self.config.backoff.delay(n);
                tracing::warn!(model, %reason, ?delay, inputs = chunk.len(), "embedder call failed; retrying later");
                metrics::counter!("kfc_embed_call_errors_total", "model" => self.labels.get(model)).increment(1);
                retry.extend(chunk.iter().map(|e| delayed(e, e.attempts, delay)));
                stats.embedder_down = true;
                return Ok(());
            }
        };
        self.failures.store(0, Ordering::Relaxed);

        let now = now_unix_ms();
        let mut vectors = Vec::new();
        let mut failures = Vec::new();
        let policy = self.config.policy();
        // One outcome per input: `embed_checked` made sure of it.
        for (event, outcome) in chunk.iter().zip(outcomes) {
            let decision = policy.decide(model, outcome, event.dim, event.attempts, now);
            if let Some(code) = decision.code() {
                let name = FailureCode::try_from(code).map(|c| c.as_str_name().to_owned()).unwrap_or(code.to_string());
                metrics::counter!("kfc_embed_failures_total", "model" => self.labels.get(model), "code" => name)
                    .increment(1);
            }
            match decision {
                Decision::Store(v) => {
                    let waited = (now - event.first_seen_unix_ms).max(0) as f64 / 1000.0;
                    metrics::histogram!("kfc_fill_latency_seconds", "model" => self.labels.get(model)).record(waited);
                    vectors.push(FilledRow {
                        key: event.key.clone(),
                        seen_at_ms: seen_at(event, now),
                        value: Filled::Vector(v),
                    });
                }
                Decision::Retry { attempts, delay, .. } => retry.push(delayed(event, attempts, delay)),
                Decision::Fail(f) | Decision::GiveUp(f) => {
                    dead.push(DeadLetter {
                        event: Some(event.clone()),
                        code: f.code,
                        reason: f.reason.clone(),
                        at_unix_ms: now,
                        ..DeadLetter::default()
                    });
                    failures.push(FilledRow {
                        key: event.key.clone(),
                        seen_at_ms: seen_at(event, now),
                        value: Filled::Failure(f),
                    });
                }
            }
        }
        let (n_vectors, n_failures) = (vectors.len(), failures.len());
        vectors.extend(failures);
        // Counted only once written, so the counter never runs ahead of the
        // store; a row an Invalidate deleted meanwhile is not written.
        let written = if vectors.is_empty() {
            Vec::new()
        } else {
            let writing = tracing::info_span!("kfc.store.write", model, rows = vectors.len());
            self.store.put_filled(&target.namespace, vectors).instrument(writing).await?
        };
        let kept_vectors = written.iter().take(n_vectors).filter(|w| **w).count();
        let kept_failures = written.iter().skip(n_vectors).filter(|w| **w).count();
        let stale = (n_vectors + n_failures - kept_vectors - kept_failures) as u64;
        if stale > 0 {
            tracing::debug!(model, stale, "fills older than an Invalidate were not written");
            metrics::counter!("kfc_stale_fills_total", "model" => self.labels.get(model)).increment(stale);
        }
        stats.embedded += kept_vectors;
        stats.failed += kept_failures;
        let (n_vectors, n_failures) = (kept_vectors as u64, kept_failures as u64);
        metrics::counter!("kfc_filled_total", "model" => self.labels.get(model), "outcome" => "vector")
            .increment(n_vectors);
        metrics::counter!("kfc_filled_total", "model" => self.labels.get(model), "outcome" => "failure")
            .increment(n_failures);
        Ok(())
    }
}

fn delayed(e: &MissEvent, attempts: u32, delay: Duration) -> MissEvent {
    MissEvent { attempts, not_before_unix_ms: now_unix_ms() + delay.as_millis() as i64, ..e.clone() }
}

/// When a filled row counts as seen: the miss's first sighting, but never
/// later than now. The store orders a fill against Invalidates by this
/// time; a miss message claiming a future time (forged, or from a clock
/// ahead) would otherwise write a row no Invalidate could remove until then.
fn seen_at(event: &MissEvent, now: i64) -> i64 {
    event.first_seen_unix_ms.min(now)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;
    use embark_store::{ScanCursor, ScanPage};

    use super::*;
    use crate::EmbedError;

    /// Records what was settled and handed back.
    #[derive(Default)]
    struct Recorder {
        settled: Mutex<Vec<(Vec<u64>, Vec<MissEvent>)>>,
        abandoned: Mutex<Vec<u64>>,
    }

    #[async_trait]
    impl MissSource for Recorder {
        type Token = u64;
        async fn next_batch(&self, _max: usize) -> Result<Vec<(u64, MissEvent)>, QueueError> {
            std::future::pending().await
        }
        async fn settle(&self, done: Vec<u64>, retry: Vec<MissEvent>, _: Vec<DeadLetter>) -> Result<(), QueueError> {
            self.settled.lock().expect("lock").push((done, retry));
            Ok(())
        }
        async fn abandon(&self, batch: Vec<(u64, MissEvent)>, _after: Duration) {
            self.abandoned.lock().expect("lock").extend(batch.into_iter().map(|(t, _)| t));
        }
    }

    /// Answers one vector per call, whatever the number of inputs.
    struct OneVector;

    #[async_trait]
    impl Embedder for OneVector {
        async fn embed(
            &self,
            _model: &str,
            _version: &str,
            _inputs: Vec<String>,
        ) -> Result<Vec<EmbedOutcome>, EmbedError> {
            Ok(vec![EmbedOutcome::Vector(vec![1.0])])
        }
    }

    /// An in-memory store whose `get_many` answers at most `max_rows` rows.
    struct MemStore {
        rows: Mutex<HashMap<String, StoredRow>>,
        max_rows: usize,
        /// `seen_at_ms` of every filled row written.
        seen_at: Mutex<Vec<i64>>,
    }

    impl MemStore {
        fn new(max_rows: usize) -> Arc<Self> {
            Arc::new(Self { rows: Mutex::default(), max_rows, seen_at: Mutex::default() })
        }
    }

    #[async_trait]
    impl EmbeddingStore for MemStore {
        async fn get_many(&self, _model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
            let rows = self.rows.lock().expect("lock");
            Ok(keys.iter().take(self.max_rows).map(|k| rows.get(k).cloned()).collect())
        }
        async fn put_vectors(&self, _model: &str, rows: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
            let mut stored = self.rows.lock().expect("lock");
            for (k, vector) in rows {
                stored.insert(k, StoredRow::Vector { vector, created_at_ms: now_unix_ms() });
            }
            Ok(())
        }
        async fn put_failures(&self, _model: &str, rows: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
            let mut stored = self.rows.lock().expect("lock");
            for (k, f) in rows {
                stored.insert(k, StoredRow::Failed(f));
            }
            Ok(())
        }
        async fn delete(&self, _model: &str, keys: &[String]) -> Result<(), StoreError> {
            let mut stored = self.rows.lock().expect("lock");
            keys.iter().for_each(|k| drop(stored.remove(k)));
            Ok(())
        }
        async fn scan(&self, _: &str, _: Option<ScanCursor>, _: usize) -> Result<ScanPage, StoreError> {
            Ok(ScanPage::default())
        }
        async fn put_filled(&self, model: &str, rows: Vec<FilledRow>) -> Result<Vec<bool>, StoreError> {
            self.seen_at.lock().expect("lock").extend(rows.iter().map(|r| r.seen_at_ms));
            let n = rows.len();
            let vectors = rows
                .into_iter()
                .filter_map(|r| match r.value {
                    Filled::Vector(v) => Some((r.key, v)),
                    Filled::Failure(_) => None,
                })
                .collect();
            self.put_vectors(model, vectors).await?;
            Ok(vec![true; n])
        }
    }

    /// A miss claiming to be first seen far in the future (a forged
    /// message, a clock ahead) wrote its row with that time, which the
    /// store orders Invalidates by: no Invalidate could remove the row
    /// until then. The fill is stamped no later than now.
    #[tokio::test]
    async fn a_miss_from_the_future_pins_its_row_past_invalidates() {
        let (source, store) = (Arc::new(Recorder::default()), MemStore::new(usize::MAX));
        let fill = FillLoop::new(source, Arc::new(OneVector), store.clone(), FillConfig::default());
        let mut future = miss("a");
        future.first_seen_unix_ms = i64::MAX / 2;
        let before = now_unix_ms();
        let stats = fill.round(vec![(1, future)]).await.expect("round");
        assert_eq!(stats.embedded, 1);
        let seen = store.seen_at.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1);
        assert!(seen[0] >= before && seen[0] <= now_unix_ms(), "stamped now, not in the future: {}", seen[0]);
    }

    fn miss(key: &str) -> MissEvent {
        MissEvent { model: "m".into(), key: key.into(), first_seen_unix_ms: now_unix_ms(), ..MissEvent::default() }
    }

    /// Issue 15: an embedder answering fewer outcomes than inputs is a
    /// failed call: every input is retried, none is dropped or given
    /// another's vector.
    #[tokio::test]
    async fn a_miscounted_reply_retries_every_input() {
        let (source, store) = (Arc::new(Recorder::default()), MemStore::new(usize::MAX));
        let fill = FillLoop::new(source.clone(), Arc::new(OneVector), store.clone(), FillConfig::default());
        let stats = fill.round(vec![(1, miss("a")), (2, miss("b"))]).await.expect("round");
        assert!(stats.embedder_down);
        assert_eq!((stats.embedded, stats.retried), (0, 2));
        let settled = source.settled.lock().expect("lock").clone();
        let retried: Vec<_> = settled[0].1.iter().map(|e| (e.key.as_str(), e.attempts)).collect();
        assert_eq!(retried, vec![("a", 0), ("b", 0)]);
        assert!(store.rows.lock().expect("lock").is_empty(), "no vector stored under the wrong key");
    }

    /// Issue 15: the rows read from the store were zipped with the keys,
    /// so a store answering fewer rows made the round skip (and settle)
    /// keys it never filled.
    #[tokio::test]
    async fn a_miscounted_store_read_hands_the_batch_back() {
        let (source, store) = (Arc::new(Recorder::default()), MemStore::new(1));
        let fill = FillLoop::new(source.clone(), Arc::new(OneVector), store, FillConfig::default());
        let result = fill.round(vec![(1, miss("a")), (2, miss("b"))]).await;
        assert!(matches!(result, Err(FillError::StoreMiscounted { keys: 2, rows: 1 })), "{result:?}");
        assert!(source.settled.lock().expect("lock").is_empty(), "nothing settled");
        assert_eq!(*source.abandoned.lock().expect("lock"), vec![1, 2]);
    }

    fn policy(max_attempts: u32) -> FillPolicy {
        FillPolicy { failure_ttl: Duration::from_secs(60), max_attempts, backoff: Backoff::default() }
    }

    #[test]
    fn stored_rows_that_stand() {
        let p = policy(3);
        let now = now_unix_ms();
        let vector = |n: usize| StoredRow::Vector { vector: vec![0.0; n], created_at_ms: 0 };
        let failed =
            |age_ms: i64| StoredRow::Failed(FailureRecord { code: 1, reason: "x".into(), at_unix_ms: now - age_ms });
        assert_eq!(p.stands(Some(&vector(3)), 3, now), Some(Stands::Vector));
        assert_eq!(p.stands(Some(&vector(3)), 0, now), Some(Stands::Vector), "dim not known");
        assert_eq!(p.stands(Some(&vector(2)), 3, now), None, "stale dim: embedded again");
        assert_eq!(p.stands(Some(&failed(1_000)), 3, now), Some(Stands::Failure));
        assert_eq!(p.stands(Some(&failed(61_000)), 3, now), None, "expired");
        assert_eq!(
            p.stands(Some(&StoredRow::Corrupt { reason: embark_store::CorruptRow::TooShort { len: 3 } }), 3, now),
            None
        );
        assert_eq!(p.stands(None, 3, now), None);
        let forever = FillPolicy { failure_ttl: Duration::MAX, ..p };
        assert_eq!(forever.stands(Some(&failed(i64::MAX / 2)), 3, now), Some(Stands::Failure));
        let never = FillPolicy { failure_ttl: Duration::ZERO, ..p };
        assert_eq!(never.stands(Some(&failed(0)), 3, now), None);
    }

    #[test]
    fn outcomes_become_decisions() {
        let p = policy(3);
        let failed = |transient| EmbedOutcome::Failed { code: 7, reason: "nope".into(), transient };
        assert_eq!(p.decide("m", EmbedOutcome::Vector(vec![1.0; 3]), 3, 0, 5), Decision::Store(vec![1.0; 3]));
        assert_eq!(p.decide("m", EmbedOutcome::Vector(vec![1.0; 2]), 0, 0, 5), Decision::Store(vec![1.0; 2]));
        assert_eq!(
            p.decide("m", failed(false), 3, 0, 5),
            Decision::Fail(FailureRecord { code: 7, reason: "nope".into(), at_unix_ms: 5 })
        );
        assert!(matches!(p.decide("m", failed(true), 3, 1, 5), Decision::Retry { attempts: 2, code: 7, .. }));
        assert!(
            matches!(p.decide("m", failed(true), 3, 2, 5), Decision::GiveUp(f) if f.reason == "gave up after 3 attempts: nope")
        );
        // A vector of another dim is a transient failure, never stored.
        match p.decide("m", EmbedOutcome::Vector(vec![1.0; 2]), 3, 0, 5) {
            Decision::Retry { attempts: 1, code, reason, .. } => {
                assert_eq!(code, FailureCode::Internal as i32);
                assert!(reason.contains("2-d vector"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// Defect 11.15: every model name read from Kafka became a label
    /// value, so invented names grew the metrics without bound.
    #[test]
    fn model_names_from_kafka_become_unbounded_metric_labels() {
        let labels = ModelLabels::default();
        for i in 0..1000 {
            labels.get(&format!("invented-{i}"));
        }
        assert_eq!(labels.0.lock().expect("lock").len(), MAX_MODEL_LABELS);
        assert_eq!(labels.get("invented-5"), "invented-5", "a known name keeps its series");
        assert_eq!(labels.get("invented-999"), "other");
        assert_eq!(labels.get(&"x".repeat(200)), "other");
    }
}
