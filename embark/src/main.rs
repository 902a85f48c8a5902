//! `embark`: the cache front, or the whole system in one process.
//!
//! - `embark up`: front + fill loop + in-process Retina on the embedded
//!   store, no external service.
//! - `embark serve`: the front alone (misses wait in the durable queue).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use embark::{
    cache::{MissDedup, VectorCache},
    embedder::InProcessRetina,
    front::{Front, Limits},
    miss::{LocalMissQueue, MissPublisher},
    models::ModelRegistry,
    service::EmbArkService,
};
use embark_proto::embark::v1::emb_ark_server::EmbArkServer;
use embark_store::{EmbeddingStore, embedded::EmbeddedStore};
use retina::Engine;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "EmbArk: an embedding cache for online ranking")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process: front, fill loop and Retina, on the
    /// embedded store in --data-dir.
    Up {
        #[command(flatten)]
        front: FrontArgs,
        #[command(flatten)]
        fill: FillArgs,
    },
    /// The front alone on the embedded store; misses wait in its durable
    /// queue for an `embark up` on the same --data-dir.
    Serve {
        #[command(flatten)]
        front: FrontArgs,
    },
}

#[derive(Debug, Args)]
struct FrontArgs {
    /// gRPC listen address.
    #[arg(long, env = "EMBARK_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Operator HTTP address: /metrics, /healthz, /readyz.
    #[arg(long, env = "EMBARK_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// Where the embedded store (embark.redb) lives.
    #[arg(long, env = "EMBARK_DATA_DIR", default_value = "embark-data")]
    data_dir: PathBuf,
    /// Models to serve, comma-separated.
    #[arg(long, env = "EMBARK_MODELS", value_delimiter = ',', default_value = "minilm-l6-v2,efficientnet-lite0")]
    models: Vec<String>,
    /// OOV row of a model read from a file (MODEL=PATH, dim numbers); zeros
    /// otherwise. Repeat or comma-separate for several models.
    #[arg(long, env = "EMBARK_OOV", value_delimiter = ',')]
    oov: Vec<String>,
    /// Size of the in-process tier: bytes, or with KiB/MiB/GiB.
    #[arg(long, env = "EMBARK_CACHE_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    cache_bytes: u64,
    /// Expire tier entries this many seconds after insertion (none by default:
    /// size-bounded LFU eviction only).
    #[arg(long, env = "EMBARK_CACHE_TTL_SECS")]
    cache_ttl_secs: Option<u64>,
    /// A key missed many times within this window is queued once.
    #[arg(long, env = "EMBARK_DEDUP_WINDOW_SECS", default_value_t = 60)]
    dedup_window_secs: u64,
    /// An input that could not be embedded is answered OOV_FAILED, and not
    /// queued again, for this long.
    #[arg(long, env = "EMBARK_FAILURE_TTL_SECS", default_value_t = 3600)]
    failure_ttl_secs: u64,
    /// Most keys in one Lookup or Invalidate.
    #[arg(long, env = "EMBARK_MAX_BATCH_KEYS", default_value_t = 4096)]
    max_batch_keys: usize,
    /// Longest key, in bytes.
    #[arg(long, env = "EMBARK_MAX_KEY_BYTES", default_value_t = 8192)]
    max_key_bytes: usize,
    /// Misses buffered in memory before the durable queue; beyond it they
    /// are dropped (counted) and queued again by the next Lookup.
    #[arg(long, env = "EMBARK_MISS_BUFFER", default_value_t = 65536)]
    miss_buffer: usize,
    /// Requests handled at once per client connection.
    #[arg(long, env = "EMBARK_CONCURRENCY_PER_CONNECTION", default_value_t = 256)]
    concurrency_per_connection: usize,
    /// Log as JSON lines.
    #[arg(long, env = "EMBARK_LOG_JSON")]
    log_json: bool,
}

#[derive(Debug, Args)]
struct FillArgs {
    /// Directory with one folder of weights per model (scripts/setup-models.sh).
    #[arg(long, env = "EMBARK_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// Misses taken from the queue per fill round.
    #[arg(long, env = "EMBARK_FILL_BATCH", default_value_t = 64)]
    fill_batch: usize,
    /// Transient failures of one input before it is recorded as failed.
    #[arg(long, env = "EMBARK_FILL_MAX_ATTEMPTS", default_value_t = 5)]
    fill_max_attempts: u32,
    #[command(flatten)]
    engine: retina::config::EngineArgs,
}

/// Parses `1024`, `512MiB`, `1GiB`, `64KiB` (also KB/MB/GB as powers of 1000).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number of bytes, e.g. 512MiB"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mul).ok_or_else(|| format!("{s:?} is too large"))
}

fn default_models_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache/embark/models")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Up { front, fill } => run(front, Some(fill)).await,
            Command::Serve { front } => run(front, None).await,
        }
    })
}

async fn run(args: FrontArgs, fill: Option<FillArgs>) -> anyhow::Result<()> {
    embark_ops::telemetry::init(args.log_json);
    let metrics = embark_ops::http::install_recorder().context("installing the metrics recorder")?;
    let shutdown = embark_ops::shutdown::on_signal();
    let ready = embark_ops::http::Readiness::default();
    let ops_stop = CancellationToken::new();
    let (ops_addr, ops_task) = embark_ops::http::serve(args.metrics_listen, metrics, ready.clone(), ops_stop.clone())
        .await
        .with_context(|| format!("binding the metrics port {}", args.metrics_listen))?;

    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
    let store_path = args.data_dir.join("embark.redb");
    let store = EmbeddedStore::open(&store_path)
        .with_context(|| format!("opening {} (is another embark using this --data-dir?)", store_path.display()))?;

    // Models: loaded in-process for `up`; for `serve`, only their specs.
    let engine = match &fill {
        Some(f) => {
            let dir = f.models_dir.clone().unwrap_or_else(default_models_dir);
            let names = args.models.clone();
            let config = f.engine.config();
            let engine = tokio::task::spawn_blocking(move || Engine::load(&dir, &names, config)).await??;
            Some(Arc::new(engine))
        }
        None => None,
    };
    let specs: Vec<&'static retina::ModelSpec> = match &engine {
        Some(e) => e.models().collect(),
        None => args
            .models
            .iter()
            .map(|n| {
                retina::catalog::spec(n)
                    .with_context(|| format!("unknown model {n:?}; known: {:?}", retina::catalog::names()))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let registry = ModelRegistry::new(&specs, &args.oov)?;

    let queue = LocalMissQueue::new(store.pending_misses(), args.miss_buffer);
    let flusher = queue.spawn_flusher();
    let failure_ttl = Duration::from_secs(args.failure_ttl_secs);
    let store: Arc<dyn EmbeddingStore> = Arc::new(store);
    let tier = VectorCache::new(args.cache_bytes, args.cache_ttl_secs.map(Duration::from_secs));
    let front = Arc::new(Front::new(
        registry,
        tier.clone(),
        store.clone(),
        queue.clone() as Arc<dyn MissPublisher>,
        MissDedup::new(Duration::from_secs(args.dedup_window_secs), 10_000_000),
        Limits { max_batch_keys: args.max_batch_keys, max_key_bytes: args.max_key_bytes },
        failure_ttl,
    ));

    // The fill loop stops on its own token, after the front has stopped
    // and the last misses were flushed.
    let fill_stop = CancellationToken::new();
    let fill_task = match (&fill, &engine) {
        (Some(f), Some(engine)) => {
            let config = kfc::FillConfig {
                max_batch: f.fill_batch,
                embed_batch: f.engine.max_batch,
                failure_ttl,
                max_attempts: f.fill_max_attempts,
                ..kfc::FillConfig::default()
            };
            let fill_loop = kfc::FillLoop::new(
                queue.clone(),
                Arc::new(InProcessRetina::new(engine.clone())),
                store.clone(),
                config,
            );
            let stop = fill_stop.clone();
            Some(tokio::spawn(async move { fill_loop.run(stop).await }))
        }
        _ => None,
    };

    // Tier gauges, refreshed off the Lookup path.
    let gauge_stop = ops_stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = gauge_stop.cancelled() => break,
                _ = tick.tick() => {
                    metrics::gauge!("embark_cache_bytes").set(tier.weighted_size() as f64);
                    metrics::gauge!("embark_cache_entries").set(tier.entry_count() as f64);
                }
            }
        }
    });

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<EmbArkServer<EmbArkService>>().await;
    let (reflection_v1, reflection_v1alpha) = embark_ops::grpc::reflection(embark_proto::EMBARK_DESCRIPTOR_SET)?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let grpc_addr = listener.local_addr()?;
    ready.set(true);
    tracing::info!(
        grpc = %grpc_addr,
        metrics = %ops_addr,
        models = ?front.models().names(),
        data_dir = %args.data_dir.display(),
        pending_misses = queue.depth(),
        mode = if fill.is_some() { "up" } else { "serve" },
        "embark serving"
    );
    embark_ops::grpc::server_builder(args.concurrency_per_connection, Duration::from_secs(30))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            EmbArkServer::new(EmbArkService::new(front))
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(256 << 20),
        )
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        )
        .await
        .context("gRPC server")?;

    // In-flight Lookups are done. Keep every miss: flush the buffer into the
    // durable queue, then let the fill loop finish its round.
    ready.set(false);
    queue.close();
    let _ = flusher.await;
    fill_stop.cancel();
    if let Some(t) = fill_task {
        let _ = t.await;
    }
    ops_stop.cancel();
    let _ = ops_task.await;
    tracing::info!(pending_misses = queue.depth(), "embark stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("2 GB"), Ok(2_000_000_000));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1PiB").is_err());
    }
}
