//! Benchmark (not a test): `Similar`'s index against exact search and,
//! in the same run, the `hnsw_rs` graph it used before (same M,
//! ef_construction and threads).
//!
//! Builds the HNSW index of `embark_index` (USearch, once per vector type
//! in `--vector-types`) over N vectors (default 100k,
//! 384-d like minilm-l6-v2), drawn around 2,000 cluster centres so that
//! neighbourhoods exist as they do in real embeddings (uniform random
//! vectors in high dimension have none). Held-out queries are searched
//! through the index at several `ef` and exactly (the flat scan, the same
//! code as Similar below --similar-exact-below; and, in the same run,
//! NumPy's `X @ q` per query when the client venv is installed), and
//! through faiss-cpu's HNSW (f32 and fp16, same M, ef_construction and
//! threads) when `--faiss-python` is given. Reports
//! recall@10 against the exact answer, queries/s (one thread and all
//! cores), the build time and the index's memory (measured RSS growth and
//! the index's own estimate). Writes JSON.
//!
//!   scripts/bench-similar.sh [--vectors 100000] [--dim 384] [--queries 1000]

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use clap::Parser;
use embark_index::{IndexConfig, Quantization, SimilarityIndex, dot, normalized};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    vectors: usize,
    #[arg(long, default_value_t = 384)]
    dim: usize,
    #[arg(long, default_value_t = 1_000)]
    queries: usize,
    #[arg(long, default_value_t = 2_000)]
    clusters: usize,
    /// Spread of a cluster relative to the spread of the centres.
    #[arg(long, default_value_t = 1.0)]
    spread: f32,
    #[arg(long, default_value_t = 10)]
    k: usize,
    #[arg(long, value_delimiter = ',', default_value = "32,64,96,128,256")]
    ef: Vec<usize>,
    /// Python with NumPy for the NumPy peer (skipped when absent).
    #[arg(long, env = "EMBARK_BENCH_PYTHON")]
    python: Option<PathBuf>,
    /// The graph's vector types to measure.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,i8")]
    vector_types: Vec<Quantization>,
    /// Leave out the `hnsw_rs` peer.
    #[arg(long)]
    no_hnsw_rs: bool,
    /// Python with faiss-cpu for the faiss HNSW peer (IndexHNSWFlat and
    /// IndexHNSWSQ fp16, same M, ef_construction and threads; skipped when
    /// absent).
    #[arg(long, env = "EMBARK_BENCH_FAISS_PYTHON")]
    faiss_python: Option<PathBuf>,
    #[arg(long, default_value = "bench-results/similar.json")]
    out: PathBuf,
}

fn data(args: &Args) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut rng = StdRng::seed_from_u64(42);
    let normal = Normal::new(0.0f32, 1.0).unwrap_or_else(|_| unreachable!("valid"));
    let centres: Vec<Vec<f32>> =
        (0..args.clusters).map(|_| (0..args.dim).map(|_| normal.sample(&mut rng)).collect()).collect();
    let draw = |rng: &mut StdRng| {
        let c = &centres[rng.random_range(0..centres.len())];
        c.iter().map(|x| x + args.spread * normal.sample(rng)).collect::<Vec<f32>>()
    };
    let base = (0..args.vectors).map(|_| draw(&mut rng)).collect();
    let queries = (0..args.queries).map(|_| draw(&mut rng)).collect();
    (base, queries)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pid = std::process::id();
    println!(
        "similar-bench: {} vectors x {} dims ({} clusters, spread {}), {} queries, k={}, {} threads",
        args.vectors,
        args.dim,
        args.clusters,
        args.spread,
        args.queries,
        args.k,
        rayon::current_num_threads()
    );
    let (base, queries) = data(&args);
    // Moved, not cloned: nothing is freed before the RSS is measured, so
    // the allocator cannot hand the index memory that looks already resident.
    let rows: Vec<(String, Vec<f32>)> = base.into_iter().enumerate().map(|(i, v)| (format!("key-{i}"), v)).collect();

    // Exact index (the flat scan): the ground truth and the peer.
    let exact = SimilarityIndex::new(
        args.dim,
        IndexConfig { exact_below: usize::MAX, max_vectors: usize::MAX, ..IndexConfig::default() },
    );
    let started = Instant::now();
    exact.insert(&rows);
    let exact_build = started.elapsed();
    let started = Instant::now();
    let truth: Vec<Vec<String>> = queries
        .par_iter()
        .map(|q| exact.search(q, args.k, -1.0, None).map(|h| h.into_iter().map(|h| h.key.to_string()).collect()))
        .collect::<Result<_, _>>()?;
    let exact_qps_all = args.queries as f64 / started.elapsed().as_secs_f64();
    let single = args.queries.min(200);
    let started = Instant::now();
    for q in &queries[..single] {
        std::hint::black_box(exact.search(q, args.k, -1.0, None)?);
    }
    let exact_qps_1 = single as f64 / started.elapsed().as_secs_f64();
    println!(
        "exact scan: built in {:.2} s, {exact_qps_1:.1} q/s on one thread, {exact_qps_all:.1} q/s on all",
        exact_build.as_secs_f64(),
    );
    drop(exact);

    let config = IndexConfig { exact_below: 1, max_vectors: usize::MAX, ..IndexConfig::default() };
    let raw = args.vectors * args.dim * 4;
    let mut engines = Vec::new();
    let mut names: Vec<String> = args.vector_types.iter().map(|t| format!("usearch-{t}")).collect();
    if !args.no_hnsw_rs {
        names.push("hnsw_rs-f32".into());
    }
    for name in names {
        // Each engine on the heap the previous one gave back; built the
        // way Similar builds at start (pages of inserts).
        let rss_before = embark_tests::rss_bytes(pid)?;
        let started = Instant::now();
        let engine: Box<dyn Engine> = match name.strip_prefix("usearch-") {
            Some(t) => {
                let index = SimilarityIndex::new(
                    args.dim,
                    IndexConfig { quantization: t.parse().map_err(anyhow::Error::msg)?, ..config.clone() },
                );
                for page in rows.chunks(2048) {
                    index.insert(page);
                }
                Box::new(index)
            }
            None => Box::new(HnswRs::build(&rows, args.dim, &config)),
        };
        let build = started.elapsed();
        let rss = embark_tests::rss_bytes(pid)?.saturating_sub(rss_before) as usize;
        let own = engine.memory_bytes();
        let stored = args.vectors * args.dim * engine.bytes_per_component();
        println!(
            "{name} (M={}, ef_construction={}): built in {:.1} s ({:.0} vectors/s), RSS +{:.0} MiB, {} reports {:.0} MiB = the vectors' {:.0} MiB + {:.0} B a vector",
            config.max_connections,
            config.ef_construction,
            build.as_secs_f64(),
            args.vectors as f64 / build.as_secs_f64(),
            rss as f64 / (1 << 20) as f64,
            if own.is_some() { "the index" } else { "its estimate" },
            own.unwrap_or(rss) as f64 / (1 << 20) as f64,
            stored as f64 / (1 << 20) as f64,
            own.unwrap_or(rss).saturating_sub(stored) as f64 / args.vectors as f64,
        );
        if let Some(b) = engine.breakdown() {
            println!("  {b}");
        }
        let mut sweep = Vec::new();
        for &ef in &args.ef {
            let search = |q: &Vec<f32>| engine.search(q, args.k, ef);
            let started = Instant::now();
            let found: Vec<Vec<String>> = queries.par_iter().map(search).collect::<Result<_, _>>()?;
            let qps_all = args.queries as f64 / started.elapsed().as_secs_f64();
            let started = Instant::now();
            for q in &queries[..single] {
                std::hint::black_box(search(q)?);
            }
            let qps_1 = single as f64 / started.elapsed().as_secs_f64();
            let hits: usize = found.iter().zip(&truth).map(|(f, t)| f.iter().filter(|k| t.contains(k)).count()).sum();
            let recall = hits as f64 / truth.iter().map(Vec::len).sum::<usize>() as f64;
            println!(
                "  ef={ef:<4} recall@{} {recall:.4}  {qps_1:.0} q/s one thread ({:.0}x exact)  {qps_all:.0} q/s all ({:.0}x exact)",
                args.k,
                qps_1 / exact_qps_1,
                qps_all / exact_qps_all
            );
            sweep.push(serde_json::json!({
                "ef": ef, "recall_at_k": recall, "qps_one_thread": qps_1, "qps_all_threads": qps_all,
                "speedup_vs_exact_one_thread": qps_1 / exact_qps_1, "speedup_vs_exact_all_threads": qps_all / exact_qps_all,
            }));
        }
        engines.push(serde_json::json!({
            "engine": name, "max_connections": config.max_connections, "ef_construction": config.ef_construction,
            "build_seconds": build.as_secs_f64(), "inserts_per_second": args.vectors as f64 / build.as_secs_f64(),
            "rss_bytes": rss, "index_bytes": own, "stored_vector_bytes": stored, "raw_f32_bytes": raw, "sweep": sweep,
        }));
        drop(engine);
    }
    drop(rows);

    let faiss = match args.faiss_python.as_ref().filter(|p| p.exists()) {
        Some(p) => faiss_peer(p, &args, &config, &truth)?,
        None => serde_json::Value::Null,
    };
    let numpy = args.python.as_ref().filter(|p| p.exists()).map(|p| numpy_peer(p, &args)).transpose()?;
    if let Some(qps) = numpy {
        println!("numpy X @ q per query (same data): {qps:.1} q/s; exact scan here is {:.2}x that", exact_qps_1 / qps);
    }

    let report = serde_json::json!({
        "vectors": args.vectors, "dim": args.dim, "clusters": args.clusters, "spread": args.spread,
        "queries": args.queries, "k": args.k, "threads": rayon::current_num_threads(),
        "engines": engines,
        "faiss": faiss,
        "exact": { "qps_one_thread": exact_qps_1, "qps_all_threads": exact_qps_all },
        "numpy_per_query_qps": numpy,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// An index under test.
trait Engine: Sync {
    fn search(&self, q: &[f32], k: usize, ef: usize) -> anyhow::Result<Vec<String>>;
    /// What the index says it holds, if it says.
    fn memory_bytes(&self) -> Option<usize>;
    fn bytes_per_component(&self) -> usize;
    fn breakdown(&self) -> Option<String> {
        None
    }
}

impl Engine for SimilarityIndex {
    fn search(&self, q: &[f32], k: usize, ef: usize) -> anyhow::Result<Vec<String>> {
        Ok(self.search_with_ef(q, k, -1.0, None, ef)?.into_iter().map(|h| h.key.to_string()).collect())
    }
    fn memory_bytes(&self) -> Option<usize> {
        Some(SimilarityIndex::memory_bytes(self))
    }
    fn bytes_per_component(&self) -> usize {
        self.quantization().bytes()
    }
    fn breakdown(&self) -> Option<String> {
        self.graph_memory().map(|m| format!("{m:?}"))
    }
}

/// The index `Similar` used before: `hnsw_rs` 0.3 with the vectorised
/// `1 - dot` of unit vectors, inserted in parallel pages as it was.
struct HnswRs {
    graph: hnsw_rs::hnsw::Hnsw<'static, f32, UnitDot>,
    keys: Vec<String>,
}

#[derive(Clone, Copy, Default)]
struct UnitDot;
impl hnsw_rs::anndists::dist::Distance<f32> for UnitDot {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

impl HnswRs {
    fn build(rows: &[(String, Vec<f32>)], dim: usize, config: &IndexConfig) -> Self {
        let graph = hnsw_rs::hnsw::Hnsw::new(config.max_connections, rows.len(), 16, config.ef_construction, UnitDot);
        let unit: Vec<Vec<f32>> = rows.iter().map(|(_, v)| normalized(v).unwrap_or_else(|| vec![0.0; dim])).collect();
        for (page, ids) in unit.chunks(2048).zip((0..rows.len()).collect::<Vec<_>>().chunks(2048)) {
            let refs: Vec<(&[f32], usize)> = page.iter().map(Vec::as_slice).zip(ids.iter().copied()).collect();
            graph.parallel_insert_slice(&refs);
        }
        Self { graph, keys: rows.iter().map(|(k, _)| k.clone()).collect() }
    }
}

impl Engine for HnswRs {
    fn search(&self, q: &[f32], k: usize, ef: usize) -> anyhow::Result<Vec<String>> {
        let q = normalized(q).ok_or_else(|| anyhow::anyhow!("zero query"))?;
        Ok(self.graph.search(&q, k, ef.max(k)).into_iter().map(|n| self.keys[n.d_id].clone()).collect())
    }
    fn memory_bytes(&self) -> Option<usize> {
        None
    }
    fn bytes_per_component(&self) -> usize {
        4
    }
}

/// Writes `rows`, normalised, as raw little-endian float32 for a Python peer.
fn write_unit_rows(path: &std::path::Path, rows: &[Vec<f32>]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in rows {
        let u = normalized(r).unwrap_or_else(|| r.clone());
        f.write_all(bytemuck::cast_slice(&u))?;
    }
    Ok(f.flush()?)
}

/// faiss-cpu's HNSW on the same data (unit vectors, inner product), in f32
/// (`IndexHNSWFlat`) and fp16 (`IndexHNSWSQ`), same M and
/// ef_construction, OpenMP on every core for the build and the "all"
/// figure, one thread for the per-query figure; recall against the same
/// exact answer. Prints its lines and returns them as JSON.
fn faiss_peer(
    python: &PathBuf,
    args: &Args,
    config: &IndexConfig,
    truth: &[Vec<String>],
) -> anyhow::Result<serde_json::Value> {
    let (base, queries) = data(args);
    let dir = tempfile::tempdir()?;
    write_unit_rows(&dir.path().join("base.f32"), &base)?;
    write_unit_rows(&dir.path().join("queries.f32"), &queries)?;
    let ids: Vec<i64> = truth
        .iter()
        .flat_map(|t| {
            let mut row: Vec<i64> =
                t.iter().filter_map(|k| k.strip_prefix("key-").and_then(|n| n.parse().ok())).collect();
            row.resize(args.k, -1);
            row
        })
        .collect();
    std::fs::write(dir.path().join("truth.i64"), bytemuck::cast_slice(&ids))?;
    let ef: Vec<String> = args.ef.iter().map(|e| e.to_string()).collect();
    let script = r#"
import json, sys, time, numpy as np, faiss
d, k, m, efc, single = (int(x) for x in sys.argv[2:7])
efs = [int(x) for x in sys.argv[7].split(',')]
X = np.fromfile(sys.argv[1] + '/base.f32', dtype=np.float32).reshape(-1, d)
Q = np.fromfile(sys.argv[1] + '/queries.f32', dtype=np.float32).reshape(-1, d)
T = np.fromfile(sys.argv[1] + '/truth.i64', dtype=np.int64).reshape(-1, k)
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
threads = faiss.omp_get_max_threads()
out = []
for name in ['faiss-hnsw-flat-f32', 'faiss-hnsw-sq-fp16']:
    if name.endswith('f32'):
        index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = efc
    faiss.omp_set_num_threads(threads)
    before = rss()
    t = time.perf_counter()
    if not index.is_trained:
        index.train(X)
    index.add(X)
    build = time.perf_counter() - t
    grown = rss() - before
    print(f"{name} (M={m}, ef_construction={efc}, {threads} threads): built in {build:.1f} s ({len(X) / build:.0f} vectors/s), RSS +{grown / 2**20:.0f} MiB", flush=True)
    sweep = []
    for ef in efs:
        index.hnsw.efSearch = ef
        faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        _, I = index.search(Q, k)
        qps_all = len(Q) / (time.perf_counter() - t)
        faiss.omp_set_num_threads(1)
        t = time.perf_counter()
        for q in Q[:single]:
            index.search(q.reshape(1, -1), k)
        qps_1 = single / (time.perf_counter() - t)
        found = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(I, T))
        recall = found / max(1, int((T >= 0).sum()))
        print(f"  ef={ef:<4} recall@{k} {recall:.4f}  {qps_1:.0f} q/s one thread  {qps_all:.0f} q/s all", flush=True)
        sweep.append({"ef": ef, "recall_at_k": recall, "qps_one_thread": qps_1, "qps_all_threads": qps_all})
    out.append({"engine": name, "build_seconds": build, "inserts_per_second": len(X) / build, "rss_bytes": grown, "sweep": sweep})
    del index
print("JSON " + json.dumps(out))
"#;
    let out = Command::new(python)
        .args([
            "-c",
            script,
            dir.path().to_str().unwrap_or("."),
            &args.dim.to_string(),
            &args.k.to_string(),
            &config.max_connections.to_string(),
            &config.ef_construction.to_string(),
            &args.queries.min(200).to_string(),
            &ef.join(","),
        ])
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "the faiss peer failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut json = serde_json::Value::Null;
    for line in text.lines() {
        match line.strip_prefix("JSON ") {
            Some(j) => json = serde_json::from_str(j)?,
            None => println!("{line}"),
        }
    }
    Ok(json)
}

/// NumPy's per-query exact search (`X @ q`, then `argpartition`) on the
/// same data, generated here and handed over as raw float32.
fn numpy_peer(python: &PathBuf, args: &Args) -> anyhow::Result<f64> {
    let (base, queries) = data(args);
    let dir = tempfile::tempdir()?;
    write_unit_rows(&dir.path().join("base.f32"), &base)?;
    write_unit_rows(&dir.path().join("queries.f32"), &queries[..args.queries.min(200)])?;
    let script = r#"
import sys, time, numpy as np
d, k = int(sys.argv[2]), int(sys.argv[3])
X = np.fromfile(sys.argv[1] + '/base.f32', dtype=np.float32).reshape(-1, d)
Q = np.fromfile(sys.argv[1] + '/queries.f32', dtype=np.float32).reshape(-1, d)
t = time.perf_counter()
for q in Q:
    s = X @ q
    top = np.argpartition(-s, k)[:k]
    top = top[np.argsort(-s[top])]
print(len(Q) / (time.perf_counter() - t))
"#;
    let out = Command::new(python)
        .args(["-c", script, dir.path().to_str().unwrap_or("."), &args.dim.to_string(), &args.k.to_string()])
        .env("OMP_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "the NumPy peer failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}
