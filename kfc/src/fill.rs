//! The fill loop: misses -> skip what is stored -> embed -> write -> settle.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use embark_proto::{
    embark::v1::{DeadLetter, MissEvent},
    retina::v1::FailureCode,
};
use embark_store::{EmbeddingStore, FailureRecord, Filled, FilledRow, StoreError, StoredRow, now_unix_ms};
use tokio_util::sync::CancellationToken;

use crate::{EmbedOutcome, Embedder, MissSource, SourceError, backoff::Backoff};

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
    Source(#[from] SourceError),
}

impl FillError {
    /// Whether the round may pass if tried again with nothing changed. A
    /// store that refuses (no schema, a bad statement) is not transient;
    /// the source's errors are taken as transient.
    pub fn is_transient(&self) -> bool {
        match self {
            FillError::Store(e) => e.is_transient(),
            FillError::Source(_) => true,
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

/// One model's misses of a round, with their tokens.
type ModelGroup<T> = (String, Vec<(T, MissEvent)>);

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
    pub async fn round(&self, batch: Vec<(S::Token, MissEvent)>) -> Result<RoundStats, FillError> {
        // Each model is filled and settled on its own: a model whose write
        // fails hands back only its own misses, and what the models before
        // it wrote, retried or gave up on is settled, dead letters included
        // (handed back, they would be skipped as stored next time and their
        // dead letters never sent).
        let mut by_model: Vec<ModelGroup<S::Token>> = Vec::new();
        for (token, event) in batch {
            match by_model.iter_mut().find(|(m, _)| *m == event.model) {
                Some((_, group)) => group.push((token, event)),
                None => by_model.push((event.model.clone(), vec![(token, event)])),
            }
        }
        let mut stats = RoundStats::default();
        let mut groups = by_model.into_iter();
        while let Some((model, group)) = groups.next() {
            let events: Vec<MissEvent> = group.iter().map(|(_, e)| e.clone()).collect();
            let (mut retry, mut dead) = (Vec::new(), Vec::new());
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
        model: &str,
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
        let ttl_ms = self.config.failure_ttl.as_millis() as i64;
        let rows = self.store.get_many(model, &keys).await?;
        let todo: Vec<MissEvent> = events
            .into_iter()
            .zip(rows)
            .filter_map(|(e, row)| match row {
                // A vector of another dim than the front serves is stale
                // model output, which the front queues again: embed it, or
                // the key stays OOV_PENDING for good.
                Some(StoredRow::Vector { vector, .. }) if e.dim == 0 || vector.len() == e.dim as usize => None,
                Some(StoredRow::Failed(f)) if now - f.at_unix_ms < ttl_ms => None,
                _ => Some(e),
            })
            .collect();
        let skipped = keys.len() - todo.len();
        stats.skipped += skipped;
        metrics::counter!("kfc_skipped_total", "model" => self.labels.get(model)).increment(skipped as u64);

        for chunk in todo.chunks(self.config.embed_batch.max(1)) {
            self.fill_chunk(model, chunk, stats, retry, dead).await?;
        }
        Ok(())
    }

    async fn fill_chunk(
        &self,
        model: &str,
        chunk: &[MissEvent],
        stats: &mut RoundStats,
        retry: &mut Vec<MissEvent>,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(), FillError> {
        let inputs: Vec<String> = chunk.iter().map(|e| e.key.clone()).collect();
        let outcomes = match self.embedder.embed(model, inputs).await {
            Ok(o) if o.len() == chunk.len() => o,
            other => {
                let reason = match other {
                    Ok(o) => format!("embedder returned {} outcomes for {} inputs", o.len(), chunk.len()),
                    Err(e) => e.to_string(),
                };
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
        for (event, outcome) in chunk.iter().zip(outcomes) {
            let outcome = match outcome {
                EmbedOutcome::Vector(v) if event.dim != 0 && v.len() != event.dim as usize => {
                    // Never store a row the front would refuse and queue
                    // again: the embedder serves another version of the
                    // model. Retried (a rollout may be under way), then
                    // recorded as a failure.
                    EmbedOutcome::Failed {
                        code: FailureCode::Internal as i32,
                        reason: format!(
                            "the embedder returned a {}-d vector; model {model:?} is served at {} dims",
                            v.len(),
                            event.dim
                        ),
                        transient: true,
                    }
                }
                o => o,
            };
            match outcome {
                EmbedOutcome::Vector(v) => {
                    let waited = (now - event.first_seen_unix_ms).max(0) as f64 / 1000.0;
                    metrics::histogram!("kfc_fill_latency_seconds", "model" => self.labels.get(model)).record(waited);
                    vectors.push(FilledRow {
                        key: event.key.clone(),
                        seen_at_ms: event.first_seen_unix_ms,
                        value: Filled::Vector(v),
                    });
                }
                EmbedOutcome::Failed { code, reason, transient } => {
                    let name =
                        FailureCode::try_from(code).map(|c| c.as_str_name().to_owned()).unwrap_or(code.to_string());
                    metrics::counter!("kfc_embed_failures_total", "model" => self.labels.get(model), "code" => name)
                        .increment(1);
                    let attempts = event.attempts + 1;
                    if transient && attempts < self.config.max_attempts {
                        retry.push(delayed(event, attempts, self.config.backoff.delay(attempts)));
                    } else {
                        let reason =
                            if transient { format!("gave up after {attempts} attempts: {reason}") } else { reason };
                        dead.push(DeadLetter {
                            event: Some(event.clone()),
                            code,
                            reason: reason.clone(),
                            at_unix_ms: now,
                            ..DeadLetter::default()
                        });
                        failures.push(FilledRow {
                            key: event.key.clone(),
                            seen_at_ms: event.first_seen_unix_ms,
                            value: Filled::Failure(FailureRecord { code, reason, at_unix_ms: now }),
                        });
                    }
                }
            }
        }
        let (n_vectors, n_failures) = (vectors.len(), failures.len());
        vectors.extend(failures);
        // Counted only once written, so the counter never runs ahead of the
        // store; a row an Invalidate deleted meanwhile is not written.
        let written = if vectors.is_empty() { Vec::new() } else { self.store.put_filled(model, vectors).await? };
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

#[cfg(test)]
mod tests {
    use super::*;

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
