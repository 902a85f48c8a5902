//! `embark backfill`: embed a catalogue before launch instead of one miss
//! at a time.
//!
//! Keys already stored (or recorded as failed, unless `--retry-failed`) are
//! skipped, so the store itself is the checkpoint: an interrupted run
//! finishes its batches in flight, and the same command again embeds only
//! what is left. Batches go to the embedder `--concurrency` at a time;
//! transient failures are retried with backoff, permanent ones recorded
//! (Lookups then answer OOV_FAILED) and reported by code.
//!
//! What is skipped, stored, retried or recorded is decided by the fill
//! loop's own [`FillPolicy`], so a backfilled key ends as KFC would leave
//! it. Three choices are the tool's: a failure record stands for good unless
//! `--retry-failed` (KFC trusts one for `--failure-ttl-secs`); an input
//! still failing transiently after `--max-attempts` is left unrecorded for
//! the next run (KFC records it); and a whole embedder call that keeps
//! failing is made `--max-attempts` times, then the run aborts with an
//! error (KFC retries such calls forever).
//!
//! A key deleted by an Invalidate while it was embedded is not written
//! back; only the embedded store reports it (`invalidated` in the summary),
//! while on CQL the delete wins by write timestamp without being counted.

use std::{
    collections::{BTreeMap, HashSet},
    io::BufRead,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use backon::Retryable;
use clap::Args;
use embark_proto::retina::v1::FailureCode;
use embark_queue::backoff::Backoff;
use embark_store::{EmbeddingStore, Filled, FilledRow, now_unix_ms};
use futures::StreamExt;
use kfc::{Decision, Embedder, FillPolicy, ModelVersion, Stands, embed_checked};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{EXIT_INTERRUPTED, Progress, StoreLocation, model_version};

#[derive(Debug, Args)]
pub(crate) struct BackfillArgs {
    /// The model to embed with.
    #[arg(long)]
    model: String,
    /// The model version (default: the current one, as `embark promote`
    /// recorded it, else the catalogue's).
    #[arg(long, default_value = "")]
    version: String,
    /// Keys, one per line (`-`: standard input). Blank lines are skipped;
    /// a key repeated in the input is embedded once.
    #[arg(long)]
    input: PathBuf,
    #[command(flatten)]
    location: StoreLocation,
    #[command(flatten)]
    embedder: EmbedderArgs,
    #[command(flatten)]
    batching: BatchArgs,
    /// Embed keys that have a failure record, too.
    #[arg(long)]
    retry_failed: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// How a batch tool calls its embedder (`backfill`, `reembed`).
#[derive(Debug, Args)]
pub(crate) struct BatchArgs {
    /// Keys per embedder call.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    pub(crate) concurrency: usize,
    /// Tries of an input whose failure is transient (timeouts, 5xx).
    #[arg(long, default_value_t = 3)]
    pub(crate) max_attempts: u32,
}

/// Which embedder a batch tool calls (`backfill`, `reembed`).
#[derive(Debug, Args)]
pub(crate) struct EmbedderArgs {
    /// Retina services to call (`http://host:port`, or `https://` for TLS;
    /// comma-separated); without it the model runs in this process from
    /// --models-dir.
    #[arg(long, env = "EMBARK_BACKFILL_RETINA", value_delimiter = ',')]
    retina: Vec<String>,
    #[command(flatten)]
    retina_tls: kfc::RetinaTlsArgs,
    /// Where the in-process Retina finds its weights.
    #[command(flatten)]
    models_dir: retina::config::ModelsDirArg,
    #[command(flatten)]
    engine: retina::config::EngineArgs,
}

impl EmbedderArgs {
    /// The embedder of `spec`: remote Retinas, or the model loaded here.
    /// A remote client runs until `stop`.
    pub(crate) async fn start(
        &self,
        spec: &'static retina::ModelSpec,
        stop: &CancellationToken,
    ) -> anyhow::Result<Arc<dyn Embedder>> {
        Ok(if self.retina.is_empty() {
            let dir = self.models_dir.models_dir.clone();
            let config = self.engine.config();
            let engine = tokio::task::spawn_blocking(move || retina::Engine::load(&dir, &[spec], config)).await??;
            Arc::new(kfc::InProcessRetina::new(Arc::new(engine)))
        } else {
            Arc::new(kfc::RemoteRetina::start(
                self.retina_tls.apply(kfc::RetinaClientConfig { urls: self.retina.clone(), ..Default::default() })?,
                stop.clone(),
            )?)
        })
    }
}

/// What a run did; printed at the end.
#[derive(Debug, Default, Serialize)]
pub(crate) struct BackfillSummary {
    pub model: String,
    pub version: String,
    /// Distinct keys in the input.
    pub keys: usize,
    pub duplicate_lines: usize,
    /// Skipped: a vector was stored already.
    pub already_stored: usize,
    /// Skipped: a failure record was stored already.
    pub already_failed: usize,
    /// Embedded and stored by this run.
    pub embedded: usize,
    /// Recorded as failed by this run, by failure code.
    pub failed: BTreeMap<String, usize>,
    /// Still transiently failing after --max-attempts: not recorded, so
    /// the next run tries them again.
    pub transient: BTreeMap<String, usize>,
    /// Embedded, but not written: deleted (Invalidate) while this run
    /// embedded it. The miss the Invalidate queued fills it again.
    pub invalidated: usize,
    /// Not reached because the run was interrupted.
    pub not_reached: usize,
    pub interrupted: bool,
    pub seconds: f64,
    pub embedded_per_second: f64,
}

/// What [`backfill_batch`] did with one batch.
#[derive(Default)]
pub(crate) struct BatchOutcome {
    pub(crate) already_stored: usize,
    pub(crate) already_failed: usize,
    pub(crate) embedded: usize,
    /// Failure codes recorded, one per key.
    pub(crate) failed: Vec<String>,
    /// Transient failure codes left unrecorded, one per key.
    pub(crate) transient: Vec<String>,
    pub(crate) invalidated: usize,
}

/// Spaces out the retries of a backfill's embedder calls and inputs.
const BACKOFF: Backoff = Backoff { base: Duration::from_millis(500), max: Duration::from_secs(30) };

/// The fill loop's policy, with the tool's two choices (see the module
/// docs): failure records stand for good unless `retry_failed`; inputs
/// still failing transiently after `max_attempts` tries are left
/// unrecorded (in [`backfill_batch`]).
pub(crate) fn policy(max_attempts: u32, retry_failed: bool) -> FillPolicy {
    FillPolicy {
        failure_ttl: if retry_failed { Duration::ZERO } else { Duration::MAX },
        max_attempts: max_attempts.max(1),
        backoff: BACKOFF,
    }
}

fn code_name(code: i32) -> String {
    FailureCode::try_from(code).map(|c| c.as_str_name().to_owned()).unwrap_or_else(|_| code.to_string())
}

fn read_keys(input: &PathBuf) -> anyhow::Result<(Vec<String>, usize)> {
    let reader: Box<dyn BufRead> = if input.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(input).with_context(|| format!("opening {}", input.display()))?,
        ))
    };
    let (mut seen, mut keys, mut duplicates) = (HashSet::new(), Vec::new(), 0);
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading line {} of {}", n + 1, input.display()))?;
        let key = line.strip_suffix('\r').unwrap_or(&line);
        if key.is_empty() {
            continue;
        }
        if seen.insert(key.to_owned()) {
            keys.push(key.to_owned());
        } else {
            duplicates += 1;
        }
    }
    Ok((keys, duplicates))
}

pub(crate) async fn run(args: BackfillArgs) -> anyhow::Result<i32> {
    let policy = policy(args.batching.max_attempts, args.retry_failed);
    let (keys, duplicate_lines) = read_keys(&args.input)?;
    let store = args.location.open().await?;
    let spec = model_version(&args.location.catalog, &*store, &args.model, &args.version).await?;
    // Vectors of another dim are stale (embedded again) or refused.
    let dim = u32::try_from(spec.dim).context("the model's dim")?;
    let stop = embark_ops::shutdown::on_signal();
    let embedder_stop = CancellationToken::new();
    let embedder = args.embedder.start(spec, &embedder_stop).await?;

    let started = Instant::now();
    let mut bar = Progress::new(Some(keys.len() as u64), "backfill");
    let mut summary = BackfillSummary {
        model: args.model.clone(),
        version: spec.version.clone(),
        keys: keys.len(),
        duplicate_lines,
        ..Default::default()
    };
    let mut reached = 0;
    let batches = keys.chunks(args.batching.batch.max(1)).map(<[String]>::to_vec).collect::<Vec<_>>();
    let mut outcomes = futures::stream::iter(batches)
        // Checked as each new batch is taken: batches in flight finish.
        .take_while(|_| std::future::ready(!stop.is_cancelled()))
        .map(|batch| {
            let (store, embedder) = (store.clone(), embedder.clone());
            async move {
                let n = batch.len();
                let target = ModelVersion::new(&spec.name, &spec.version);
                (n, backfill_batch(&*store, &*embedder, &target, dim, batch, &policy).await)
            }
        })
        .buffer_unordered(args.batching.concurrency.max(1));
    while let Some((n, outcome)) = outcomes.next().await {
        let o = outcome?;
        reached += n;
        summary.already_stored += o.already_stored;
        summary.already_failed += o.already_failed;
        summary.embedded += o.embedded;
        summary.invalidated += o.invalidated;
        for c in o.failed {
            *summary.failed.entry(c).or_default() += 1;
        }
        for c in o.transient {
            *summary.transient.entry(c).or_default() += 1;
        }
        bar.inc(n as u64);
    }
    bar.finish();
    embedder_stop.cancel();
    summary.not_reached = keys.len() - reached;
    summary.interrupted = summary.not_reached > 0;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.embedded_per_second = summary.embedded as f64 / summary.seconds.max(1e-9);
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if summary.interrupted { EXIT_INTERRUPTED } else { 0 })
}

fn print_summary(s: &BackfillSummary) {
    println!(
        "backfill of {} version {}: {} distinct keys ({} duplicate lines)",
        s.model, s.version, s.keys, s.duplicate_lines
    );
    println!("  already stored   {}", s.already_stored);
    println!("  already failed   {} (--retry-failed to try them again)", s.already_failed);
    println!("  embedded         {} ({:.1}/s over {:.1} s)", s.embedded, s.embedded_per_second, s.seconds);
    for (code, n) in &s.failed {
        println!("  failed {code:<18} {n}");
    }
    for (code, n) in &s.transient {
        println!("  still failing {code:<11} {n} (transient: not recorded, retried by the next run)");
    }
    if s.invalidated > 0 {
        println!("  invalidated      {} (deleted while being embedded: not written)", s.invalidated);
    }
    if s.interrupted {
        println!("  interrupted: {} keys not reached; run the same command again to finish", s.not_reached);
    }
}

/// Backfills one batch of distinct keys of `target`, served at `dim` dims
/// (`embark reembed` fills its target version with it too).
pub(crate) async fn backfill_batch(
    store: &dyn EmbeddingStore,
    embedder: &dyn Embedder,
    target: &ModelVersion<'_>,
    dim: u32,
    batch: Vec<String>,
    policy: &FillPolicy,
) -> anyhow::Result<BatchOutcome> {
    let mut out = BatchOutcome::default();
    // Written as inputs seen now (as the fill loop writes): a key an
    // Invalidate deletes meanwhile is not brought back with an embedding
    // made before the delete.
    let seen_at_ms = now_unix_ms();
    let model = target.model;
    let rows = store.get_many(&target.namespace, &batch).await.context("reading the store")?;
    anyhow::ensure!(rows.len() == batch.len(), "the store returned {} rows for {} keys", rows.len(), batch.len());
    // Each key with the number of its tries that failed so far.
    let mut todo: Vec<(String, u32)> = Vec::new();
    for (key, row) in batch.into_iter().zip(rows) {
        match policy.stands(row.as_ref(), dim, seen_at_ms) {
            Some(Stands::Vector) => out.already_stored += 1,
            Some(Stands::Failure) => out.already_failed += 1,
            None => todo.push((key, 0)),
        }
    }
    while !todo.is_empty() {
        let inputs: Vec<String> = todo.iter().map(|(k, _)| k.clone()).collect();
        // A failed call (the embedder down, or a reply with another count
        // of outcomes) is made `max_attempts` times in all; it does not
        // use up the inputs' own tries.
        let retries = policy.max_attempts.saturating_sub(1) as usize;
        let outcomes = (|| embed_checked(embedder, model, target.version, inputs.clone()))
            .retry(policy.backoff.delays().take(retries))
            .notify(|e, delay| tracing::warn!(error = %e, ?delay, "embedder call failed; retrying"))
            .await
            .context("the embedder kept failing")?;
        let now = now_unix_ms();
        let (mut rows, mut again, mut wait) = (Vec::new(), Vec::new(), Duration::ZERO);
        // One outcome per input: `embed_checked` made sure of it.
        for ((key, attempts), outcome) in todo.into_iter().zip(outcomes) {
            let value = match policy.decide(model, outcome, dim, attempts, now) {
                Decision::Store(v) => Filled::Vector(v),
                Decision::Fail(f) => Filled::Failure(f),
                Decision::Retry { attempts, delay, .. } => {
                    wait = wait.max(delay);
                    again.push((key, attempts));
                    continue;
                }
                // Not recorded: the next run tries it again.
                Decision::GiveUp(f) => {
                    out.transient.push(code_name(f.code));
                    continue;
                }
            };
            rows.push(FilledRow { key, seen_at_ms, value });
        }
        if !rows.is_empty() {
            let codes: Vec<Option<i32>> = rows
                .iter()
                .map(|r| match &r.value {
                    Filled::Vector(_) => None,
                    Filled::Failure(f) => Some(f.code),
                })
                .collect();
            let written =
                store.put_filled(&target.namespace, rows).await.context("writing vectors and failure records")?;
            anyhow::ensure!(
                written.len() == codes.len(),
                "the store confirmed {} of {} writes",
                written.len(),
                codes.len()
            );
            for (code, kept) in codes.into_iter().zip(written) {
                match (kept, code) {
                    (false, _) => out.invalidated += 1,
                    (true, None) => out.embedded += 1,
                    (true, Some(code)) => out.failed.push(code_name(code)),
                }
            }
        }
        if !again.is_empty() {
            tokio::time::sleep(wait).await;
        }
        todo = again;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, sync::Mutex};

    use async_trait::async_trait;
    use embark_store::{FailureRecord, StoredRow, embedded::EmbeddedStore};
    use kfc::{EmbedError, EmbedOutcome};

    use super::*;

    type Reply = Result<Vec<EmbedOutcome>, EmbedError>;

    /// Answers each call with the next scripted reply; counts the calls.
    struct Scripted {
        replies: Mutex<VecDeque<Reply>>,
        calls: Mutex<usize>,
    }

    fn scripted(replies: Vec<Reply>) -> Scripted {
        Scripted { replies: Mutex::new(replies.into()), calls: Mutex::new(0) }
    }

    #[async_trait]
    impl Embedder for Scripted {
        async fn embed(&self, _model: &str, _version: &str, _inputs: Vec<String>) -> Reply {
            *self.calls.lock().expect("lock") += 1;
            self.replies
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or_else(|| Err(EmbedError::Other("script exhausted".into())))
        }
    }

    fn store() -> (tempfile::TempDir, EmbeddedStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        (dir, store)
    }

    /// The tool's policy with millisecond backoffs.
    fn quick(max_attempts: u32) -> FillPolicy {
        FillPolicy {
            backoff: Backoff { base: Duration::from_millis(1), max: Duration::from_millis(2) },
            ..policy(max_attempts, false)
        }
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|k| k.to_string()).collect()
    }

    fn v(n: usize) -> EmbedOutcome {
        EmbedOutcome::Vector(vec![0.5; n])
    }

    async fn row(store: &EmbeddedStore, key: &str) -> Option<StoredRow> {
        store.get_many("m", &keys(&[key])).await.expect("get").remove(0)
    }

    /// Issue 15: the outcomes were zipped with the keys, so an embedder
    /// answering fewer outcomes than inputs made keys vanish: neither
    /// stored, nor recorded, nor counted. Now the reply is a failed call,
    /// tried again.
    #[tokio::test]
    async fn a_miscounted_reply_drops_no_key() {
        let (_dir, store) = store();
        let embedder = scripted(vec![Ok(vec![v(2)]), Ok(vec![v(2), v(2)])]);
        let out = backfill_batch(&store, &embedder, &ModelVersion::new("m", ""), 2, keys(&["a", "b"]), &quick(3))
            .await
            .expect("batch");
        assert_eq!(out.embedded, 2);
        assert!(matches!(row(&store, "b").await, Some(StoredRow::Vector { .. })));
    }

    #[tokio::test]
    async fn an_embedder_that_keeps_miscounting_fails_the_batch() {
        let (_dir, store) = store();
        let embedder = scripted(vec![Ok(vec![v(2)]), Ok(vec![v(2)]), Ok(vec![v(2)])]);
        let err = backfill_batch(&store, &embedder, &ModelVersion::new("m", ""), 2, keys(&["a", "b"]), &quick(3))
            .await
            .err()
            .expect("fails");
        assert!(format!("{err:#}").contains("returned 1 outcomes for 2 inputs"), "{err:#}");
        assert_eq!(*embedder.calls.lock().expect("lock"), 3, "tried --max-attempts times");
        assert!(row(&store, "a").await.is_none(), "nothing stored under a guessed key");
    }

    /// Drift from the fill loop: a reply of another dim was stored, which
    /// the front refuses and queues again.
    #[tokio::test]
    async fn a_vector_of_the_wrong_dim_is_never_stored() {
        let (_dir, store) = store();
        let embedder = scripted(vec![Ok(vec![v(2)]), Ok(vec![v(2)])]);
        let out = backfill_batch(&store, &embedder, &ModelVersion::new("m", ""), 3, keys(&["a"]), &quick(2))
            .await
            .expect("batch");
        assert_eq!((out.embedded, out.transient.as_slice()), (0, ["INTERNAL".to_string()].as_slice()));
        assert!(row(&store, "a").await.is_none());
    }

    /// Drift from the fill loop: any stored vector was skipped, so one of
    /// a stale dim (which the front queues again) was never replaced.
    #[tokio::test]
    async fn a_stored_vector_of_another_dim_is_embedded_again() {
        let (_dir, store) = store();
        store.put_vectors("m", vec![("stale".into(), vec![9.0; 2]), ("fine".into(), vec![9.0; 3])]).await.expect("put");
        let embedder = scripted(vec![Ok(vec![v(3)])]);
        let out =
            backfill_batch(&store, &embedder, &ModelVersion::new("m", ""), 3, keys(&["stale", "fine"]), &quick(3))
                .await
                .expect("batch");
        assert_eq!((out.embedded, out.already_stored), (1, 1));
        assert!(matches!(row(&store, "stale").await, Some(StoredRow::Vector { vector, .. }) if vector.len() == 3));
    }

    /// Drift from the fill loop: one counter per batch counted failed
    /// calls and failed inputs alike, so an embedder blip used up every
    /// input's tries.
    #[tokio::test]
    async fn a_failed_call_does_not_use_up_the_inputs_tries() {
        let (_dir, store) = store();
        let flaky = EmbedOutcome::Failed { code: 14, reason: "busy".into(), transient: true };
        let embedder = scripted(vec![Err(EmbedError::Other("down".into())), Ok(vec![flaky]), Ok(vec![v(2)])]);
        let out = backfill_batch(&store, &embedder, &ModelVersion::new("m", ""), 2, keys(&["a"]), &quick(2))
            .await
            .expect("batch");
        assert_eq!((out.embedded, out.transient.len()), (1, 0));
    }

    /// Deletes the key from the store while embedding it (an Invalidate
    /// arriving mid-fill), then answers a vector.
    struct Invalidating(Arc<EmbeddedStore>);

    #[async_trait]
    impl Embedder for Invalidating {
        async fn embed(&self, model: &str, _version: &str, inputs: Vec<String>) -> Reply {
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.0.delete(model, &inputs).await.expect("delete");
            Ok(inputs.iter().map(|_| v(2)).collect())
        }
    }

    /// Drift from the fill loop: vectors were written unconditionally, so
    /// an embedding made before an Invalidate brought the deleted key back.
    #[tokio::test]
    async fn an_invalidate_during_the_embedding_wins() {
        let (_dir, store) = store();
        let store = Arc::new(store);
        store.put_vectors("m", vec![("a".into(), vec![9.0])]).await.expect("put");
        let embedder = Invalidating(store.clone());
        let out = backfill_batch(&*store, &embedder, &ModelVersion::new("m", ""), 2, keys(&["a"]), &quick(3))
            .await
            .expect("batch");
        assert_eq!((out.embedded, out.invalidated), (0, 1));
        assert!(row(&store, "a").await.is_none(), "the delete stands");
    }

    #[tokio::test]
    async fn failure_records_stand_unless_retry_failed() {
        let (_dir, store) = store();
        let old = FailureRecord { code: 3, reason: "too long".into(), at_unix_ms: 0 };
        store.put_failures("m", vec![("f".into(), old)]).await.expect("put");
        let embedder = scripted(vec![Ok(vec![v(2)])]);
        let out = backfill_batch(&store, &embedder, &ModelVersion::new("m", ""), 2, keys(&["f"]), &quick(3))
            .await
            .expect("batch");
        assert_eq!((out.already_failed, out.embedded), (1, 0), "an old record stands without --retry-failed");
        let retry = FillPolicy { failure_ttl: policy(3, true).failure_ttl, ..quick(3) };
        let out = backfill_batch(&store, &embedder, &ModelVersion::new("m", ""), 2, keys(&["f"]), &retry)
            .await
            .expect("batch");
        assert_eq!((out.already_failed, out.embedded), (0, 1));
    }
}
