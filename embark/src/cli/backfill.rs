//! `embark backfill`: embed a catalogue before launch instead of one miss
//! at a time.
//!
//! Keys already stored (or recorded as failed, unless `--retry-failed`) are
//! skipped, so the store itself is the checkpoint: an interrupted run
//! finishes its batches in flight, and the same command again embeds only
//! what is left. Batches go to the embedder `--concurrency` at a time;
//! transient failures are retried with backoff, permanent ones recorded
//! (Lookups then answer OOV_FAILED) and reported by code.

use std::{
    collections::{BTreeMap, HashSet},
    io::BufRead,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use embark_proto::retina::v1::FailureCode;
use embark_store::{EmbeddingStore, FailureRecord, StoredRow, now_unix_ms};
use futures::StreamExt;
use kfc::{EmbedOutcome, Embedder};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{EXIT_INTERRUPTED, Progress, StoreLocation, model_dim};

#[derive(Debug, Args)]
pub(crate) struct BackfillArgs {
    /// The model to embed with.
    #[arg(long)]
    model: String,
    /// Keys, one per line (`-`: standard input). Blank lines are skipped;
    /// a key repeated in the input is embedded once.
    #[arg(long)]
    input: PathBuf,
    #[command(flatten)]
    location: StoreLocation,
    /// Retina services to call (`http://host:port`, comma-separated);
    /// without it the model runs in this process from --models-dir.
    #[arg(long, env = "EMBARK_BACKFILL_RETINA", value_delimiter = ',')]
    retina: Vec<String>,
    /// Directory with one folder of weights per model (in-process Retina).
    #[arg(long, env = "EMBARK_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Keys per embedder call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Batches in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Tries of an input whose failure is transient (timeouts, 5xx).
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Embed keys that have a failure record, too.
    #[arg(long)]
    retry_failed: bool,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: retina::config::EngineArgs,
}

/// What a run did; printed at the end.
#[derive(Debug, Default, Serialize)]
pub(crate) struct BackfillSummary {
    pub model: String,
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
    /// Not reached because the run was interrupted.
    pub not_reached: usize,
    pub interrupted: bool,
    pub seconds: f64,
    pub embedded_per_second: f64,
}

#[derive(Default)]
struct BatchOutcome {
    already_stored: usize,
    already_failed: usize,
    embedded: usize,
    failed: Vec<String>,
    transient: Vec<String>,
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
    model_dim(&args.model)?;
    let (keys, duplicate_lines) = read_keys(&args.input)?;
    let store = args.location.open().await?;
    let stop = embark_ops::shutdown::on_signal();
    let embedder_stop = CancellationToken::new();
    let embedder: Arc<dyn Embedder> = if args.retina.is_empty() {
        let dir = args.models_dir.clone().unwrap_or_else(retina::config::default_models_dir);
        let (names, config) = (vec![args.model.clone()], args.engine.config());
        let engine = tokio::task::spawn_blocking(move || retina::Engine::load(&dir, &names, config)).await??;
        Arc::new(kfc::InProcessRetina::new(Arc::new(engine)))
    } else {
        Arc::new(kfc::RemoteRetina::start(
            kfc::RetinaClientConfig { urls: args.retina.clone(), ..Default::default() },
            embedder_stop.clone(),
        )?)
    };

    let started = Instant::now();
    let mut bar = Progress::new(Some(keys.len() as u64), "backfill");
    let mut summary =
        BackfillSummary { model: args.model.clone(), keys: keys.len(), duplicate_lines, ..Default::default() };
    let mut reached = 0;
    let batches = keys.chunks(args.batch.max(1)).map(<[String]>::to_vec).collect::<Vec<_>>();
    let mut outcomes = futures::stream::iter(batches)
        // Checked as each new batch is taken: batches in flight finish.
        .take_while(|_| std::future::ready(!stop.is_cancelled()))
        .map(|batch| {
            let (store, embedder, model) = (store.clone(), embedder.clone(), args.model.clone());
            let (max_attempts, retry_failed) = (args.max_attempts.max(1), args.retry_failed);
            async move {
                let n = batch.len();
                (n, backfill_batch(&*store, &*embedder, &model, batch, max_attempts, retry_failed).await)
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    while let Some((n, outcome)) = outcomes.next().await {
        let o = outcome?;
        reached += n;
        summary.already_stored += o.already_stored;
        summary.already_failed += o.already_failed;
        summary.embedded += o.embedded;
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
    println!("backfill of {}: {} distinct keys ({} duplicate lines)", s.model, s.keys, s.duplicate_lines);
    println!("  already stored   {}", s.already_stored);
    println!("  already failed   {} (--retry-failed to try them again)", s.already_failed);
    println!("  embedded         {} ({:.1}/s over {:.1} s)", s.embedded, s.embedded_per_second, s.seconds);
    for (code, n) in &s.failed {
        println!("  failed {code:<18} {n}");
    }
    for (code, n) in &s.transient {
        println!("  still failing {code:<11} {n} (transient: not recorded, retried by the next run)");
    }
    if s.interrupted {
        println!("  interrupted: {} keys not reached; run the same command again to finish", s.not_reached);
    }
}

async fn backfill_batch(
    store: &dyn EmbeddingStore,
    embedder: &dyn Embedder,
    model: &str,
    batch: Vec<String>,
    max_attempts: u32,
    retry_failed: bool,
) -> anyhow::Result<BatchOutcome> {
    let mut out = BatchOutcome::default();
    let rows = store.get_many(model, &batch).await.context("reading the store")?;
    let mut todo = Vec::new();
    for (key, row) in batch.into_iter().zip(rows) {
        match row {
            Some(StoredRow::Vector { .. }) => out.already_stored += 1,
            Some(StoredRow::Failed(_)) if !retry_failed => out.already_failed += 1,
            _ => todo.push(key),
        }
    }
    let mut attempt = 0;
    while !todo.is_empty() {
        attempt += 1;
        let outcomes = match embedder.embed(model, todo.clone()).await {
            Ok(o) => o,
            Err(e) if attempt < max_attempts => {
                tracing::warn!(error = %e, attempt, "embedder unavailable; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                continue;
            }
            Err(e) => return Err(anyhow::Error::new(e).context("the embedder kept failing")),
        };
        let (mut vectors, mut failures, mut again) = (Vec::new(), Vec::new(), Vec::new());
        for (key, outcome) in todo.into_iter().zip(outcomes) {
            match outcome {
                EmbedOutcome::Vector(v) => vectors.push((key, v)),
                EmbedOutcome::Failed { transient: true, .. } if attempt < max_attempts => again.push(key),
                EmbedOutcome::Failed { code, transient: true, .. } => out.transient.push(code_name(code)),
                EmbedOutcome::Failed { code, reason, transient: false } => {
                    out.failed.push(code_name(code));
                    failures.push((key, FailureRecord { code, reason, at_unix_ms: now_unix_ms() }));
                }
            }
        }
        out.embedded += vectors.len();
        if !vectors.is_empty() {
            store.put_vectors(model, vectors).await.context("writing vectors")?;
        }
        if !failures.is_empty() {
            store.put_failures(model, failures).await.context("writing failure records")?;
        }
        if !again.is_empty() {
            tokio::time::sleep(backoff(attempt)).await;
        }
        todo = again;
    }
    Ok(out)
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << attempt.min(6)))
}
