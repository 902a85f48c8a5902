//! Moving rankers from one model version to the next without an OOV
//! spike: `embark reembed` fills the new version in the shadow of the
//! current one, `embark promote` makes it current for every replica, and
//! `embark retire` removes an old version's rows.
//!
//! - **reembed** scans every vector stored under the source version
//!   (default: the current one), and embeds each key with the target
//!   version into the target's own rows, through the same per-batch logic
//!   as `backfill` (keys the target has already are skipped, transient
//!   failures retried, permanent ones recorded). Lookups keep being served
//!   from the current version meanwhile. Progress is a bar (a log line per
//!   second without a terminal); Ctrl-C or SIGTERM finishes the batches in
//!   flight, saves the scan position in `--checkpoint`, and exits 130; the
//!   same command carries on from there. Keys over 256 bytes are stored
//!   under their hash, which cannot be embedded again: they are counted
//!   (`hashed_keys`) and fill on their first Lookup after the promote.
//! - **promote** records the version as current in the store. Every front
//!   reads it within `--version-refresh-secs` (5 s by default). It is
//!   refused while the target holds fewer than `--min-coverage` of the
//!   current version's vectors, unless `--force`.
//! - **retire** removes every row (vectors and failure records) of a
//!   version that is not current, page by page; it can be stopped and run
//!   again. Remove the version from the catalogue too, or its Lookups
//!   fill it again.

use std::{path::PathBuf, time::Instant};

use anyhow::Context;
use clap::Args;
use embark_store::{EmbeddingStore, namespace};
use futures::StreamExt;
use kfc::ModelVersion;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    Checkpoint, EXIT_INTERRUPTED, Progress, StoreLocation,
    backfill::{BatchArgs, EmbedderArgs, backfill_batch, policy},
    model_version, saved_cursor,
};

#[derive(Debug, Args)]
pub(crate) struct ReembedArgs {
    #[arg(long)]
    model: String,
    /// The version to embed into (a catalogue entry of the model).
    #[arg(long)]
    to_version: String,
    /// The version whose stored keys are embedded again (default: the
    /// current one).
    #[arg(long, default_value = "")]
    from_version: String,
    #[command(flatten)]
    location: StoreLocation,
    #[command(flatten)]
    embedder: EmbedderArgs,
    /// Where the scan position is saved (default:
    /// `.reembed-<model>.json` in the working directory).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Stored rows read per page (the checkpoint is saved once a page is done).
    #[arg(long, default_value_t = 512)]
    page: usize,
    #[command(flatten)]
    batching: BatchArgs,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What a reembed did, over every run of it (the checkpoint carries the
/// counts across an interruption).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct ReembedSummary {
    pub model: String,
    pub from_version: String,
    pub to_version: String,
    /// Vectors of the source version seen by the scan.
    pub scanned: u64,
    /// Skipped: the target version had a vector already.
    pub already_stored: u64,
    pub embedded: u64,
    /// Recorded as failed under the target version (permanent failures).
    pub failed: u64,
    /// Still failing transiently after --max-attempts: the next run
    /// tries them again.
    pub transient: u64,
    /// Keys stored by their hash (over 256 bytes): not embedded again.
    pub hashed_keys: u64,
    pub interrupted: bool,
    pub seconds: f64,
}

/// Where an interrupted reembed carries on.
#[derive(Debug, Serialize, Deserialize)]
struct ReembedCheckpoint {
    summary: ReembedSummary,
    /// The source scan's next page (hex), `None` at the start.
    cursor: Option<String>,
}

pub(crate) async fn reembed(args: ReembedArgs) -> anyhow::Result<i32> {
    let store = args.location.open().await?;
    let from = model_version(&args.location.catalog, &*store, &args.model, &args.from_version).await?;
    let to = model_version(&args.location.catalog, &*store, &args.model, &args.to_version).await?;
    anyhow::ensure!(
        from.version != to.version,
        "version {:?} is the source of the reembed already; name another --to-version",
        to.version
    );
    let dim = u32::try_from(to.dim).context("the model's dim")?;
    let checkpoint = Checkpoint::new(
        args.checkpoint.clone().unwrap_or_else(|| PathBuf::from(format!(".reembed-{}.json", args.model))),
    );
    let mut state = match checkpoint.load::<ReembedCheckpoint>()? {
        Some(c) if c.summary.from_version != from.version || c.summary.to_version != to.version => anyhow::bail!(
            "{} holds an unfinished reembed of {:?} from {:?} to {:?}; finish it, or delete the file",
            checkpoint.path().display(),
            c.summary.model,
            c.summary.from_version,
            c.summary.to_version
        ),
        Some(c) => {
            tracing::info!(scanned = c.summary.scanned, "resuming the reembed");
            c
        }
        None => ReembedCheckpoint {
            summary: ReembedSummary {
                model: args.model.clone(),
                from_version: from.version.clone(),
                to_version: to.version.clone(),
                ..Default::default()
            },
            cursor: None,
        },
    };
    let source = namespace(&args.model, &from.version);
    let total = store.count_vectors(&source).await.context("counting the source version's vectors")?;
    let stop = embark_ops::shutdown::on_signal();
    let embedder_stop = CancellationToken::new();
    let embedder = args.embedder.start(to, &embedder_stop).await?;
    let policy = policy(args.batching.max_attempts, false);
    let started = Instant::now();
    let mut bar = Progress::new(Some(total), "reembed");
    bar.set_position(state.summary.scanned);
    loop {
        if stop.is_cancelled() {
            state.summary.interrupted = true;
            break;
        }
        let cursor = saved_cursor(state.cursor.as_deref())?;
        let page = store.scan(&source, cursor, args.page.max(1)).await.context("reading the source version")?;
        let s = &mut state.summary;
        s.scanned += page.rows.len() as u64;
        let (keys, hashed): (Vec<String>, Vec<String>) =
            page.rows.into_iter().map(|(k, _)| k).partition(|k| !k.starts_with(embark_store::HASHED_KEY_PREFIX));
        s.hashed_keys += hashed.len() as u64;
        let batches: Vec<Vec<String>> = keys.chunks(args.batching.batch.max(1)).map(<[String]>::to_vec).collect();
        let mut outcomes = futures::stream::iter(batches)
            .map(|batch| {
                let (store, embedder, policy) = (store.clone(), embedder.clone(), &policy);
                async move {
                    let target = ModelVersion::new(&to.name, &to.version);
                    backfill_batch(&*store, &*embedder, &target, dim, batch, policy).await
                }
            })
            .buffer_unordered(args.batching.concurrency.max(1));
        let n = keys.len() as u64 + hashed.len() as u64;
        while let Some(outcome) = outcomes.next().await {
            let o = outcome?;
            s.already_stored += o.already_stored as u64;
            s.embedded += o.embedded as u64;
            s.failed += o.failed.len() as u64 + o.already_failed as u64;
            s.transient += o.transient.len() as u64;
        }
        bar.inc(n);
        state.cursor = page.next.map(|c| c.to_hex());
        if state.cursor.is_none() {
            break;
        }
        // The page is done: a later run starts after it.
        checkpoint.save(&state)?;
    }
    bar.finish();
    embedder_stop.cancel();
    state.summary.seconds += started.elapsed().as_secs_f64();
    if state.summary.interrupted {
        checkpoint.save(&state)?;
    } else {
        checkpoint.remove()?;
    }
    let s = &state.summary;
    if args.json {
        println!("{}", serde_json::to_string(s)?);
    } else {
        println!(
            "reembed of {} from {:?} to {:?}: {} stored vectors scanned",
            s.model, s.from_version, s.to_version, s.scanned
        );
        println!("  embedded         {}", s.embedded);
        println!("  already there    {}", s.already_stored);
        println!("  failed           {} (recorded under the new version)", s.failed);
        if s.transient > 0 {
            println!("  still failing    {} (transient: run the same command again)", s.transient);
        }
        if s.hashed_keys > 0 {
            println!(
                "  hashed keys      {} (over 256 bytes: filled on their first Lookup after the promote)",
                s.hashed_keys
            );
        }
        if s.interrupted {
            println!("  interrupted: run the same command again to carry on ({})", checkpoint.path().display());
        } else {
            println!("  next: embark promote --model {} --version {:?}", s.model, s.to_version);
        }
    }
    Ok(if s.interrupted { EXIT_INTERRUPTED } else { 0 })
}

/// The share of the current version's vectors a promote wants the new
/// version to hold.
pub(crate) const DEFAULT_MIN_COVERAGE: f64 = 0.99;

#[derive(Debug, Args)]
pub(crate) struct PromoteArgs {
    #[arg(long)]
    model: String,
    /// The version to make current.
    #[arg(long)]
    version: String,
    #[command(flatten)]
    location: StoreLocation,
    /// Refuse unless the version holds at least this share of the current
    /// version's stored vectors (0 to 1).
    #[arg(long, default_value_t = DEFAULT_MIN_COVERAGE)]
    min_coverage: f64,
    /// Promote whatever the coverage.
    #[arg(long)]
    force: bool,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct PromoteOutcome {
    model: String,
    from_version: String,
    to_version: String,
    /// Stored vectors of the version current before, and of the new one.
    from_vectors: u64,
    to_vectors: u64,
    coverage: f64,
    promoted: bool,
}

pub(crate) async fn promote(args: PromoteArgs) -> anyhow::Result<i32> {
    anyhow::ensure!((0.0..=1.0).contains(&args.min_coverage), "--min-coverage {} is not in 0..1", args.min_coverage);
    let store = args.location.open().await?;
    let current = model_version(&args.location.catalog, &*store, &args.model, "").await?;
    let target = model_version(&args.location.catalog, &*store, &args.model, &args.version).await?;
    let from_vectors = store.count_vectors(&namespace(&args.model, &current.version)).await?;
    let to_vectors = store.count_vectors(&namespace(&args.model, &target.version)).await?;
    let coverage = if from_vectors == 0 { 1.0 } else { to_vectors as f64 / from_vectors as f64 };
    let mut outcome = PromoteOutcome {
        model: args.model.clone(),
        from_version: current.version.clone(),
        to_version: target.version.clone(),
        from_vectors,
        to_vectors,
        coverage,
        promoted: false,
    };
    if current.version != target.version {
        anyhow::ensure!(
            args.force || coverage >= args.min_coverage,
            "refused: version {:?} holds {to_vectors} vectors, {:.1}% of the current version's {from_vectors} \
             (--min-coverage {}); run `embark reembed --model {} --to-version {:?}` first, or pass --force",
            target.version,
            coverage * 100.0,
            args.min_coverage,
            args.model,
            target.version
        );
    }
    // Recorded even when already current by the catalogue, so replicas
    // with another catalogue default agree too.
    store.set_current_version(&args.model, &target.version).await.context("recording the current version")?;
    outcome.promoted = true;
    if args.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        println!(
            "{} now answers from version {:?} (was {:?}; coverage {to_vectors}/{from_vectors}); every replica follows \
             within its --version-refresh-secs (5 s by default)",
            args.model, target.version, current.version
        );
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub(crate) struct RetireArgs {
    #[arg(long)]
    model: String,
    /// The version whose rows are removed (not the current one).
    #[arg(long)]
    version: String,
    #[command(flatten)]
    location: StoreLocation,
    /// Rows removed per page.
    #[arg(long, default_value_t = 1024)]
    page: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct RetireSummary {
    model: String,
    version: String,
    /// Rows removed: vectors, and failure or delete records.
    removed: u64,
    interrupted: bool,
    seconds: f64,
}

pub(crate) async fn retire(args: RetireArgs) -> anyhow::Result<i32> {
    let store = args.location.open().await?;
    let current = model_version(&args.location.catalog, &*store, &args.model, "").await?;
    anyhow::ensure!(
        current.version != args.version,
        "version {:?} is current: promote another version before retiring this one",
        args.version
    );
    let stop = embark_ops::shutdown::on_signal();
    let summary = retire_rows(&*store, &args.model, &args.version, args.page, &stop).await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else if summary.interrupted {
        println!(
            "retire of {} {:?} interrupted after {} rows; run it again to finish",
            summary.model, summary.version, summary.removed
        );
    } else {
        println!(
            "retired {} version {:?}: {} rows removed in {:.1} s; remove its catalogue entry too",
            summary.model, summary.version, summary.removed, summary.seconds
        );
    }
    Ok(if summary.interrupted { EXIT_INTERRUPTED } else { 0 })
}

/// Removes every row of `model` at `version`, a page at a time, until done
/// or `stop`. Rows are removed as they are read, so each page starts the
/// scan over: what is left is what the next page reads.
async fn retire_rows(
    store: &dyn EmbeddingStore,
    model: &str,
    version: &str,
    page: usize,
    stop: &CancellationToken,
) -> anyhow::Result<RetireSummary> {
    let started = Instant::now();
    let ns = namespace(model, version);
    let mut summary = RetireSummary { model: model.to_owned(), version: version.to_owned(), ..Default::default() };
    let mut bar = Progress::new(None, "retire");
    let mut cursor = None;
    loop {
        if stop.is_cancelled() {
            summary.interrupted = true;
            break;
        }
        let p = store.scan(&ns, cursor.take(), page.max(1)).await.context("reading the version's rows")?;
        let keys: Vec<String> = p.rows.into_iter().map(|(k, _)| k).chain(p.other_keys).collect();
        if !keys.is_empty() {
            store.purge(&ns, &keys).await.context("removing rows")?;
        }
        summary.removed += keys.len() as u64;
        bar.inc(keys.len() as u64);
        match p.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    bar.finish();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use embark_store::{FailureRecord, embedded::EmbeddedStore};

    use super::*;

    #[tokio::test]
    async fn retire_removes_every_row_of_one_version_and_no_other() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        let (old, new) = (namespace("m", "1"), namespace("m", "2"));
        let long = "k".repeat(300);
        let rows = |n: usize| (0..n).map(|i| (format!("key {i}"), vec![0.5; 4])).collect::<Vec<_>>();
        store.put_vectors(&old, rows(2500)).await.expect("put");
        store.put_vectors(&old, vec![(long.clone(), vec![1.0; 4])]).await.expect("put");
        store
            .put_failures(&old, vec![("bad".into(), FailureRecord { code: 4, reason: "404".into(), at_unix_ms: 1 })])
            .await
            .expect("put");
        store.delete(&old, &["key 0".to_owned()]).await.expect("delete");
        store.put_vectors(&new, rows(10)).await.expect("put");

        let summary = retire_rows(&store, "m", "1", 1000, &CancellationToken::new()).await.expect("retire");
        assert_eq!(summary.removed, 2500 + 1 + 1, "2499 vectors, the delete record, the long key, the failure");
        assert_eq!(store.count_vectors(&old).await.expect("count"), 0);
        let page = store.scan(&old, None, 10).await.expect("scan");
        assert!(page.rows.is_empty() && page.other_keys.is_empty(), "nothing left: {page:?}");
        assert_eq!(store.count_vectors(&new).await.expect("count"), 10, "the other version is untouched");
    }
}
