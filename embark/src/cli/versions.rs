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
//!   second without a terminal); Ctrl-C or SIGTERM finishes the page in
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
//! - **adopt** copies the vectors a release before versions stored under
//!   the bare model name into a version's rows, without running the
//!   network, so an upgrade keeps every key rankers found before (`reembed
//!   --from-unversioned` embeds them again instead, for a changed model;
//!   `retire --unversioned` removes them afterwards).

use std::{path::PathBuf, sync::Arc, time::Instant};

use anyhow::Context;
use clap::Args;
use embark_store::{EmbeddingStore, namespace};
use futures::StreamExt;
use kfc::{Embedder, ModelVersion};
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
    #[arg(long, default_value = "", conflicts_with = "from_unversioned")]
    from_version: String,
    /// Embed again the keys of the rows a release before versions wrote
    /// under the bare model name (when the model changed since; when it
    /// did not, `embark adopt` copies them without running it).
    #[arg(long)]
    from_unversioned: bool,
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
    let to = model_version(&args.location.catalog, &*store, &args.model, &args.to_version).await?;
    // The source's version; empty for the unversioned rows.
    let from_version = if args.from_unversioned {
        String::new()
    } else {
        model_version(&args.location.catalog, &*store, &args.model, &args.from_version).await?.version.clone()
    };
    anyhow::ensure!(
        from_version != to.version,
        "version {:?} is the source of the reembed already; name another --to-version",
        to.version
    );
    let checkpoint = Checkpoint::new(
        args.checkpoint.clone().unwrap_or_else(|| PathBuf::from(format!(".reembed-{}.json", args.model))),
    );
    let mut state = match checkpoint.load::<ReembedCheckpoint>()? {
        Some(c)
            if c.summary.model != args.model
                || c.summary.from_version != from_version
                || c.summary.to_version != to.version =>
        {
            anyhow::bail!(
                "{} holds an unfinished reembed of {:?} from {:?} to {:?}; finish it, or delete the file",
                checkpoint.path().display(),
                c.summary.model,
                c.summary.from_version,
                c.summary.to_version
            )
        }
        Some(c) => {
            tracing::info!(scanned = c.summary.scanned, "resuming the reembed");
            c.resumed()
        }
        None => ReembedCheckpoint {
            summary: ReembedSummary {
                model: args.model.clone(),
                from_version: from_version.clone(),
                to_version: to.version.clone(),
                ..Default::default()
            },
            cursor: None,
        },
    };
    let source = namespace(&args.model, &from_version);
    let total = store.count_vectors(&source).await.context("counting the source version's vectors")?;
    let stop = embark_ops::shutdown::on_signal();
    let embedder_stop = CancellationToken::new();
    let embedder = args.embedder.start(to, &embedder_stop).await?;
    let started = Instant::now();
    let mut bar = Progress::new(Some(total), "reembed");
    bar.set_position(state.summary.scanned);
    let pages = Pages { source: &source, page: args.page, batching: &args.batching, checkpoint: &checkpoint };
    let done = reembed_pages(store, embedder, to, &pages, &mut state, &mut bar, &stop).await;
    bar.finish();
    embedder_stop.cancel();
    done?;
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

impl ReembedCheckpoint {
    /// The state a resumed run starts from: the counts and the scan
    /// position, no longer interrupted (an interrupted flag carried over
    /// would end every later run as interrupted, starting the scan over).
    fn resumed(mut self) -> Self {
        self.summary.interrupted = false;
        self
    }
}

/// Where a reembed reads and how it batches.
struct Pages<'a> {
    /// The source version's namespace.
    source: &'a str,
    page: usize,
    batching: &'a BatchArgs,
    checkpoint: &'a Checkpoint,
}

/// Embeds the source version's keys with `to`, page by page from
/// `state.cursor`, until the scan ends or `stop`; saves the checkpoint
/// after each whole page. `state.summary.interrupted` says which.
async fn reembed_pages(
    store: Arc<dyn EmbeddingStore>,
    embedder: Arc<dyn Embedder>,
    to: &retina::ModelSpec,
    pages: &Pages<'_>,
    state: &mut ReembedCheckpoint,
    bar: &mut Progress,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let dim = u32::try_from(to.dim).context("the model's dim")?;
    let policy = policy(pages.batching.max_attempts, false);
    loop {
        if stop.is_cancelled() {
            state.summary.interrupted = true;
            return Ok(());
        }
        let cursor = saved_cursor(state.cursor.as_deref())?;
        let page = store.scan(pages.source, cursor, pages.page.max(1)).await.context("reading the source version")?;
        let s = &mut state.summary;
        s.scanned += page.rows.len() as u64;
        let (keys, hashed): (Vec<String>, Vec<String>) =
            page.rows.into_iter().map(|(k, _)| k).partition(|k| !k.starts_with(embark_store::HASHED_KEY_PREFIX));
        s.hashed_keys += hashed.len() as u64;
        let batches: Vec<Vec<String>> = keys.chunks(pages.batching.batch.max(1)).map(<[String]>::to_vec).collect();
        let mut outcomes = futures::stream::iter(batches)
            .map(|batch| {
                let (store, embedder, policy) = (store.clone(), embedder.clone(), &policy);
                async move {
                    let target = ModelVersion::new(&to.name, &to.version);
                    backfill_batch(&*store, &*embedder, &target, dim, batch, policy).await
                }
            })
            .buffer_unordered(pages.batching.concurrency.max(1));
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
            return Ok(());
        }
        // The page is done: a later run starts after it.
        pages.checkpoint.save(state)?;
    }
}

#[derive(Debug, Args)]
pub(crate) struct AdoptArgs {
    #[arg(long)]
    model: String,
    /// The version the unversioned rows become (default: the current one).
    #[arg(long, default_value = "")]
    version: String,
    #[command(flatten)]
    location: StoreLocation,
    /// Where the scan position is saved (default: `.adopt-<model>.json`
    /// in the working directory).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Stored rows read per page (the checkpoint is saved once a page is done).
    #[arg(long, default_value_t = 1024)]
    page: usize,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What an adopt did, over every run of it.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct AdoptSummary {
    pub model: String,
    pub version: String,
    /// Unversioned vectors seen by the scan.
    pub scanned: u64,
    /// Copied into the version's rows.
    pub copied: u64,
    /// Skipped: the version had a row for the key already (a newer fill,
    /// or a failure or delete record, which stands).
    pub already_stored: u64,
    /// Skipped: the vector's dim is not the version's (such rows were not
    /// made by this version's model; their keys fill on their next Lookup).
    pub wrong_dim: u64,
    pub interrupted: bool,
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct AdoptCheckpoint {
    summary: AdoptSummary,
    /// The unversioned scan's next page (hex), `None` at the start.
    cursor: Option<String>,
}

/// `embark adopt`: the rows a release before versions wrote under the bare
/// model name become a version's rows, copied as they are, without running
/// the network. For an upgrade whose catalogue entry is the model that
/// wrote them (the shipped models are): rankers then find every key they
/// found before, with no OOV spike. When the model changed, use `reembed
/// --from-unversioned` instead.
pub(crate) async fn adopt(args: AdoptArgs) -> anyhow::Result<i32> {
    let store = args.location.open().await?;
    let to = model_version(&args.location.catalog, &*store, &args.model, &args.version).await?;
    let checkpoint = Checkpoint::new(
        args.checkpoint.clone().unwrap_or_else(|| PathBuf::from(format!(".adopt-{}.json", args.model))),
    );
    let mut state = match checkpoint.load::<AdoptCheckpoint>()? {
        Some(c) if c.summary.model != args.model || c.summary.version != to.version => anyhow::bail!(
            "{} holds an unfinished adopt of {:?} into {:?}; finish it, or delete the file",
            checkpoint.path().display(),
            c.summary.model,
            c.summary.version
        ),
        Some(mut c) => {
            tracing::info!(scanned = c.summary.scanned, "resuming the adopt");
            c.summary.interrupted = false;
            c
        }
        None => AdoptCheckpoint {
            summary: AdoptSummary { model: args.model.clone(), version: to.version.clone(), ..Default::default() },
            cursor: None,
        },
    };
    let total = store.count_vectors(&args.model).await.context("counting the unversioned vectors")?;
    let stop = embark_ops::shutdown::on_signal();
    let started = Instant::now();
    let mut bar = Progress::new(Some(total), "adopt");
    bar.set_position(state.summary.scanned);
    adopt_pages(&*store, to, args.page, &checkpoint, &mut state, &mut bar, &stop).await?;
    bar.finish();
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
        println!("adopt of {}'s unversioned rows into {:?}: {} vectors scanned", s.model, s.version, s.scanned);
        println!("  copied           {}", s.copied);
        println!("  already there    {}", s.already_stored);
        if s.wrong_dim > 0 {
            println!("  wrong dim        {} (not this version's: filled on their next Lookup)", s.wrong_dim);
        }
        if s.interrupted {
            println!("  interrupted: run the same command again to carry on ({})", checkpoint.path().display());
        } else {
            println!(
                "  next, once every process runs this release: this command again, then embark retire --model {} \
                 --unversioned",
                s.model
            );
        }
    }
    Ok(if s.interrupted { EXIT_INTERRUPTED } else { 0 })
}

/// Copies the unversioned vectors of `to.name` of the right dim into
/// `to`'s rows, page by page from `state.cursor`, until the scan ends or
/// `stop`, saving the checkpoint after each page. Never over anything the
/// version has ([`EmbeddingStore::copy_vectors`]): its own fills, failure
/// records and Invalidates' delete records stand. Rows are copied by their
/// stored keys, so a long key's row is found by its hash afterwards.
async fn adopt_pages(
    store: &dyn EmbeddingStore,
    to: &retina::ModelSpec,
    page: usize,
    checkpoint: &Checkpoint,
    state: &mut AdoptCheckpoint,
    bar: &mut Progress,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let target = namespace(&to.name, &to.version);
    loop {
        if stop.is_cancelled() {
            state.summary.interrupted = true;
            return Ok(());
        }
        let cursor = saved_cursor(state.cursor.as_deref())?;
        let p = store.scan(&to.name, cursor, page.max(1)).await.context("reading the unversioned rows")?;
        let s = &mut state.summary;
        s.scanned += p.rows.len() as u64;
        bar.inc(p.rows.len() as u64);
        let (rows, wrong): (Vec<_>, Vec<_>) = p.rows.into_iter().partition(|(_, v)| v.len() == to.dim);
        s.wrong_dim += wrong.len() as u64;
        let offered = rows.len() as u64;
        let copied = if rows.is_empty() {
            0
        } else {
            store.copy_vectors(&target, rows).await.context("writing the version's rows")?
        };
        s.copied += copied;
        s.already_stored += offered - copied;
        state.cursor = p.next.map(|c| c.to_hex());
        if state.cursor.is_none() {
            return Ok(());
        }
        checkpoint.save(state)?;
    }
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
    #[arg(long, required_unless_present = "unversioned", conflicts_with = "unversioned")]
    version: Option<String>,
    /// Remove the rows a release before versions wrote under the bare model
    /// name instead (after `embark adopt`, once no process of that release
    /// still writes them).
    #[arg(long)]
    unversioned: bool,
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
    // Empty for the unversioned rows (clap requires one of the two).
    let version = args.version.clone().unwrap_or_default();
    anyhow::ensure!(
        current.version != version,
        "version {version:?} is current: promote another version before retiring this one"
    );
    let stop = embark_ops::shutdown::on_signal();
    let summary = retire_rows(&*store, &args.model, &version, args.page, &stop).await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else if summary.interrupted {
        println!(
            "retire of {} {:?} interrupted after {} rows; run it again to finish",
            summary.model, summary.version, summary.removed
        );
    } else if args.unversioned {
        println!(
            "retired {}'s unversioned rows: {} rows removed in {:.1} s",
            summary.model, summary.removed, summary.seconds
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
/// or `stop`. Each page's rows are removed before the next page is read
/// from the cursor, which both stores carry on from past removed rows.
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
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use embark_store::{FailureRecord, embedded::EmbeddedStore};
    use kfc::{EmbedError, EmbedOutcome};

    use super::*;
    use crate::cli::testing::StopAfterScans;

    /// Answers every input with a vector of `dim` ones.
    struct Ones(usize);

    #[async_trait]
    impl Embedder for Ones {
        async fn embed(&self, _: &str, _: &str, inputs: Vec<String>) -> Result<Vec<EmbedOutcome>, EmbedError> {
            Ok(inputs.iter().map(|_| EmbedOutcome::Vector(vec![1.0; self.0])).collect())
        }
    }

    /// Review of issue 12: the checkpoint of an interrupted reembed kept
    /// `interrupted`, so every resumed run ended as interrupted (saving a
    /// checkpoint with no cursor, exit 130) and the next started over.
    #[tokio::test]
    async fn an_interrupted_reembed_resumes_where_it_stopped_and_finishes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        let base = retina::catalog::builtin().spec("minilm-l6-v2").expect("built-in");
        let to: &'static retina::ModelSpec =
            Box::leak(Box::new(retina::ModelSpec { version: "2".into(), dim: 4, ..base.clone() }));
        let source = namespace(&to.name, "1");
        inner.put_vectors(&source, (0..50).map(|i| (format!("k{i:02}"), vec![0.5; 4])).collect()).await.expect("put");
        let checkpoint = Checkpoint::new(dir.path().join("reembed.json"));
        let batching = BatchArgs { batch: 4, concurrency: 2, max_attempts: 1 };
        let pages = Pages { source: &source, page: 10, batching: &batching, checkpoint: &checkpoint };
        let mut bar = Progress::new(None, "reembed");

        // Stopped while the second page is read: that page finishes.
        let stop = CancellationToken::new();
        let stopping = Arc::new(StopAfterScans { inner: inner.clone(), left: AtomicUsize::new(2), stop: stop.clone() });
        let mut state = ReembedCheckpoint { summary: ReembedSummary::default(), cursor: None };
        reembed_pages(stopping, Arc::new(Ones(4)), to, &pages, &mut state, &mut bar, &stop).await.expect("run");
        assert!(state.summary.interrupted);
        assert_eq!((state.summary.scanned, state.summary.embedded), (20, 20));
        checkpoint.save(&state).expect("save");

        // The same command again: from the checkpoint to the end.
        let mut state = checkpoint.load::<ReembedCheckpoint>().expect("load").expect("saved").resumed();
        let store: Arc<dyn EmbeddingStore> = Arc::new(inner.clone());
        let never = CancellationToken::new();
        reembed_pages(store, Arc::new(Ones(4)), to, &pages, &mut state, &mut bar, &never).await.expect("run");
        assert!(!state.summary.interrupted, "a resumed run that reaches the end is done");
        assert_eq!((state.summary.scanned, state.summary.embedded, state.summary.already_stored), (50, 50, 0));
        assert_eq!(inner.count_vectors(&namespace(&to.name, "2")).await.expect("count"), 50);
    }

    /// Issue 12: rows written before versions lived under the bare model
    /// name, which no version reads, so an upgrade turned every stored key
    /// into a miss. Adopt copies them (right dim only) into a version, never
    /// over what the version has, and resumes after an interruption.
    #[tokio::test]
    async fn adopt_copies_the_unversioned_rows_into_a_version_without_overwriting_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
        let base = retina::catalog::builtin().spec("minilm-l6-v2").expect("built-in");
        let to: &'static retina::ModelSpec =
            Box::leak(Box::new(retina::ModelSpec { version: "2".into(), dim: 4, ..base.clone() }));
        let (bare, target) = (to.name.clone(), namespace(&to.name, "2"));
        let long = "u".repeat(300);
        let mut rows: Vec<(String, Vec<f32>)> = (0..30).map(|i| (format!("k{i:02}"), vec![i as f32; 4])).collect();
        rows.push((long.clone(), vec![7.0; 4]));
        rows.push(("stale dim".into(), vec![1.0; 3]));
        inner.put_vectors(&bare, rows).await.expect("put");
        // The version filled one key itself, failed another, and an
        // Invalidate deleted a third: all three stand.
        inner.put_vectors(&target, vec![("k00".into(), vec![-1.0; 4])]).await.expect("put");
        inner
            .put_failures(&target, vec![("k01".into(), FailureRecord { code: 4, reason: "404".into(), at_unix_ms: 1 })])
            .await
            .expect("put");
        inner.delete(&target, &["k02".to_owned()]).await.expect("delete");
        // Another model's unversioned rows are not this one's.
        inner.put_vectors("other", vec![("k03".into(), vec![3.0; 4])]).await.expect("put");

        let checkpoint = Checkpoint::new(dir.path().join("adopt.json"));
        let mut bar = Progress::new(None, "adopt");
        let stop = CancellationToken::new();
        let stopping = StopAfterScans { inner: inner.clone(), left: AtomicUsize::new(1), stop: stop.clone() };
        let mut state = AdoptCheckpoint { summary: AdoptSummary::default(), cursor: None };
        adopt_pages(&stopping, to, 10, &checkpoint, &mut state, &mut bar, &stop).await.expect("run");
        assert!(state.summary.interrupted);
        assert_eq!(state.summary.scanned, 10);
        checkpoint.save(&state).expect("save");

        let mut state = checkpoint.load::<AdoptCheckpoint>().expect("load").expect("saved");
        state.summary.interrupted = false;
        adopt_pages(&inner, to, 10, &checkpoint, &mut state, &mut bar, &CancellationToken::new()).await.expect("run");
        let s = &state.summary;
        assert!(!s.interrupted);
        assert_eq!((s.scanned, s.wrong_dim), (32, 1));
        assert_eq!((s.copied, s.already_stored), (28, 3), "k00 (filled), k01 (failed), k02 (deleted) stand");

        let keys: Vec<String> =
            ["k00", "k01", "k02", "k03", "k29"].map(String::from).into_iter().chain([long]).collect();
        let got = inner.get_many(&target, &keys).await.expect("get");
        let vector = |r: &Option<embark_store::StoredRow>| match r {
            Some(embark_store::StoredRow::Vector { vector, .. }) => Some(vector.clone()),
            _ => None,
        };
        assert_eq!(vector(&got[0]), Some(vec![-1.0; 4]), "the version's own fill is kept");
        assert!(matches!(got[1], Some(embark_store::StoredRow::Failed(_))), "{:?}", got[1]);
        assert!(got[2].is_none(), "the Invalidate stands: {:?}", got[2]);
        assert_eq!(vector(&got[3]), Some(vec![3.0; 4]));
        assert_eq!(vector(&got[4]), Some(vec![29.0; 4]));
        assert_eq!(vector(&got[5]), Some(vec![7.0; 4]), "a long key is found by its hash");
        assert_eq!(inner.count_vectors(&target).await.expect("count"), 1 + 28);
        assert!(inner.get_many(&target, &["stale dim".to_owned()]).await.expect("get")[0].is_none());

        // The bare rows are then retired; the version's stay.
        retire_rows(&inner, &to.name, "", 100, &CancellationToken::new()).await.expect("retire");
        assert_eq!(inner.count_vectors(&bare).await.expect("count"), 0);
        assert_eq!(inner.count_vectors(&target).await.expect("count"), 29);
        assert_eq!(inner.count_vectors("other").await.expect("count"), 1);
    }

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
