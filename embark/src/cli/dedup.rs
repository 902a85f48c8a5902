//! `embark dedup`: the near-duplicate pairs of a model's keys, as CSV.
//!
//! Pass 1 pages through the store into a [`SimilarityIndex`] (exact below
//! `--exact-below`, HNSW above). Pass 2 pages through again and asks, for
//! each key, its `--neighbours` nearest keys scoring at least
//! `--threshold`; every pair found from either side goes, as
//! `(smaller key, larger key, score)`, to a candidates file. At the end the
//! candidates are sorted, made unique and written as `key_a,key_b,score`,
//! best first. Pass 2 checkpoints after each page (the scan cursor and the
//! candidates file's length), so an interrupted run rebuilds the index and
//! carries on where pass 2 stopped.

use std::{
    fs::OpenOptions,
    io::{BufWriter, Seek, SeekFrom, Write},
    path::PathBuf,
    time::Instant,
};

use anyhow::Context;
use clap::Args;
use embark_index::{IndexConfig, SimilarityIndex};
use embark_store::{EmbeddingStore, ScanCursor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Checkpoint, EXIT_INTERRUPTED, Progress, StoreLocation, saved_cursor, scanned_version};

#[derive(Debug, Args)]
pub(crate) struct DedupArgs {
    #[arg(long)]
    model: String,
    /// The model version (default: the current one, as `embark promote`
    /// recorded it, else the catalogue's).
    #[arg(long, default_value = "")]
    version: String,
    /// Pairs scoring at least this cosine are written (see
    /// docs/similarity.md for sensible values per model).
    #[arg(long)]
    threshold: f32,
    /// The CSV file to write.
    #[arg(long, default_value = "duplicates.csv")]
    out: PathBuf,
    #[command(flatten)]
    location: StoreLocation,
    /// Neighbours looked at per key: a key with more near-duplicates than
    /// this reports its closest ones.
    #[arg(long, default_value_t = 32)]
    neighbours: usize,
    /// Threads searching at once (default: one per core).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Exact search below this many vectors, HNSW from it on.
    #[arg(long, default_value_t = 20_000)]
    exact_below: usize,
    /// Rows read from the store per page (and per checkpoint).
    #[arg(long, default_value_t = 4096)]
    page: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct DedupCheckpoint {
    /// The model version's namespace (`name@version`): a resume after a
    /// promote must not carry on into another version's rows.
    model: String,
    threshold: f32,
    /// Keys whose neighbours are in the candidates file.
    done: u64,
    candidates_bytes: u64,
    cursor: Option<String>,
}

pub(crate) async fn run(args: DedupArgs) -> anyhow::Result<i32> {
    let store = args.location.open().await?;
    dedup(&*store, &args, embark_ops::shutdown::on_signal()).await
}

/// The dedup of `store`'s vectors, until done or until `stop`.
async fn dedup(store: &dyn EmbeddingStore, args: &DedupArgs, stop: CancellationToken) -> anyhow::Result<i32> {
    let (dim, namespace) = scanned_version(&args.location.catalog, store, &args.model, &args.version).await?;
    if !(-1.0..=1.0).contains(&args.threshold) {
        anyhow::bail!("--threshold {} is not a cosine in [-1, 1]", args.threshold);
    }
    if let Some(n) = args.concurrency {
        // Bounds the index build (rayon) and the searches alike.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
    }
    let candidates_path = args.out.with_extension("candidates.partial");
    let checkpoint = Checkpoint::new(args.out.with_extension("checkpoint.json"));
    let mut state = match checkpoint.load::<DedupCheckpoint>()? {
        Some(c) if c.model != namespace || c.threshold != args.threshold => anyhow::bail!(
            "{} belongs to an unfinished dedup of {:?} at threshold {}; delete it or use another --out",
            checkpoint.path().display(),
            c.model,
            c.threshold
        ),
        Some(c) => c,
        None => DedupCheckpoint {
            model: namespace.clone(),
            threshold: args.threshold,
            done: 0,
            candidates_bytes: 0,
            cursor: None,
        },
    };
    let started = Instant::now();

    // Pass 1: the index.
    let index = SimilarityIndex::new(
        dim,
        IndexConfig { exact_below: args.exact_below.max(1), max_vectors: usize::MAX, ..IndexConfig::default() },
    );
    let mut bar = Progress::new(None, "dedup: indexing");
    let mut cursor = None;
    loop {
        if stop.is_cancelled() {
            return Ok(EXIT_INTERRUPTED);
        }
        let page = store.scan(&namespace, cursor.take(), args.page.max(1)).await.context("reading the store")?;
        let n = page.rows.len() as u64;
        let report = tokio::task::block_in_place(|| index.insert(&page.rows));
        if report.rejected > 0 {
            tracing::warn!(rejected = report.rejected, "vectors of another dimension or zero were left out");
        }
        bar.inc(n);
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    bar.finish();
    let total = index.len() as u64;
    tracing::info!(vectors = total, approximate = index.is_approximate(), "dedup: index built");

    // Pass 2: neighbours of every key, from where the checkpoint says.
    let mut file = OpenOptions::new().create(true).write(true).truncate(false).open(&candidates_path)?;
    file.set_len(state.candidates_bytes)?;
    file.seek(SeekFrom::End(0))?;
    let mut candidates = BufWriter::new(file);
    let mut bar = Progress::new(Some(total), "dedup: searching");
    bar.set_position(state.done);
    loop {
        if stop.is_cancelled() {
            bar.finish();
            println!("dedup interrupted after {} of {total} keys; run the same command again to carry on", state.done);
            return Ok(EXIT_INTERRUPTED);
        }
        if state.cursor.is_none() && state.done > 0 {
            break; // pass 2 finished before the interruption
        }
        let cursor = saved_cursor(state.cursor.as_deref())?;
        let page = store.scan(&namespace, cursor, args.page.max(1)).await.context("reading the store")?;
        let (k, threshold) = (args.neighbours.max(1), args.threshold);
        let found: Vec<(String, String, f32)> = tokio::task::block_in_place(|| {
            page.rows
                .par_iter()
                .flat_map_iter(|(key, v)| {
                    let hits = index.search(v, k, threshold, Some(key)).unwrap_or_default();
                    hits.into_iter().map(move |h| {
                        let other = h.key.to_string();
                        if key.as_str() < other.as_str() {
                            (key.clone(), other, h.score)
                        } else {
                            (other, key.clone(), h.score)
                        }
                    })
                })
                .collect()
        });
        let mut w = csv::Writer::from_writer(Vec::new());
        for (a, b, s) in &found {
            w.write_record([a.as_str(), b.as_str(), &format!("{s:.6}")])?;
        }
        let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("csv: {e}"))?;
        candidates.write_all(&bytes)?;
        candidates.flush()?;
        candidates.get_ref().sync_data()?;
        state.candidates_bytes += bytes.len() as u64;
        state.done += page.rows.len() as u64;
        state.cursor = page.next.as_ref().map(ScanCursor::to_hex);
        let finished = page.next.is_none();
        if finished {
            // Marks pass 2 done even when the last page was empty.
            state.done = state.done.max(1);
        }
        checkpoint.save(&state)?;
        bar.set_position(state.done.min(total));
        if finished {
            break;
        }
    }
    bar.finish();
    drop(candidates);

    // Unique pairs, best first.
    let mut pairs: Vec<(String, String, f32)> = Vec::new();
    let mut reader = csv::ReaderBuilder::new().has_headers(false).from_path(&candidates_path)?;
    for record in reader.records() {
        let r = record?;
        let score: f32 = r.get(2).context("a candidate without a score")?.parse()?;
        pairs.push((r[0].to_owned(), r[1].to_owned(), score));
    }
    pairs.sort_by(|x, y| (&x.0, &x.1).cmp(&(&y.0, &y.1)));
    pairs.dedup_by(|x, y| x.0 == y.0 && x.1 == y.1);
    pairs.sort_by(|x, y| y.2.total_cmp(&x.2).then_with(|| (&x.0, &x.1).cmp(&(&y.0, &y.1))));
    let tmp = args.out.with_extension("csv.partial");
    let mut w = csv::Writer::from_path(&tmp)?;
    w.write_record(["key_a", "key_b", "score"])?;
    for (a, b, s) in &pairs {
        w.write_record([a.as_str(), b.as_str(), &format!("{s:.6}")])?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, &args.out)?;
    std::fs::remove_file(&candidates_path).ok();
    checkpoint.remove()?;
    println!(
        "{} near-duplicate pairs (cosine >= {}) among {total} vectors of {} in {:.1} s ({} search): {}",
        pairs.len(),
        args.threshold,
        args.model,
        started.elapsed().as_secs_f64(),
        if index.is_approximate() { "HNSW" } else { "exact" },
        args.out.display()
    );
    Ok(0)
}

#[cfg(test)]
mod resume_tests {
    use std::sync::atomic::AtomicUsize;

    use clap::Parser;
    use embark_store::embedded::EmbeddedStore;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::cli::testing::{StopAfterScans, append_junk, current_rows};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        dedup: DedupArgs,
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_dedup_resumes_and_finds_each_planted_pair_once() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let store = EmbeddedStore::open(&tmp.path().join("embark.redb"))?;
        let mut rng = StdRng::seed_from_u64(3);
        let mut rows = Vec::new();
        let mut planted = Vec::new();
        for i in 0..600 {
            let v: Vec<f32> = (0..384).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            if i % 60 == 0 {
                let twin = v.iter().map(|x| x + rng.random_range(-0.05f32..0.05)).collect();
                rows.push((format!("b{i:03}"), twin));
                planted.push((format!("a{i:03}"), format!("b{i:03}")));
            }
            rows.push((format!("a{i:03}"), v));
        }
        store.put_vectors(&current_rows("minilm-l6-v2"), rows).await?;
        let out = tmp.path().join("pairs.csv");
        let args = Cli::try_parse_from([
            "embark",
            "--model",
            "minilm-l6-v2",
            "--threshold",
            "0.9",
            "--out",
            out.to_str().unwrap_or("."),
            "--page",
            "50",
        ])?
        .dedup;

        // 610 vectors: pass 1 reads 13 pages; stop while pass 2 reads its third.
        let stop = CancellationToken::new();
        let interrupted = StopAfterScans { inner: store.clone(), left: AtomicUsize::new(16), stop: stop.clone() };
        assert_eq!(dedup(&interrupted, &args, stop).await?, EXIT_INTERRUPTED);
        let saved: DedupCheckpoint =
            Checkpoint::new(out.with_extension("checkpoint.json")).load()?.expect("checkpoint");
        assert_eq!(saved.done, 150);
        append_junk(&out.with_extension("candidates.partial"));

        assert_eq!(dedup(&store, &args, CancellationToken::new()).await?, 0);
        let mut found: Vec<(String, String)> = csv::Reader::from_path(&out)?
            .records()
            .map(|r| r.map(|r| (r[0].to_owned(), r[1].to_owned())))
            .collect::<Result<_, _>>()?;
        found.sort();
        assert_eq!(found, planted, "each planted pair once, nothing else");
        assert!(!out.with_extension("checkpoint.json").exists() && !out.with_extension("candidates.partial").exists());
        Ok(())
    }
}
