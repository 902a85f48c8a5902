//! `embark`: the cache front, or the whole system in one process.
//!
//! - `embark up`: front + fill loop + in-process Retina on the embedded
//!   store, no external service.
//! - `embark serve`: the front alone; misses go to Kafka for `kfc`
//!   (`--kafka-brokers`), or wait in the durable queue.
//! - `embark migrate`: creates the CQL schema.
//! - `embark backfill | export | dedup`: batch tools ([`cli`]).

mod cli;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use embark::{
    cache::{MissDedup, VectorCache},
    embedder::InProcessRetina,
    front::{Front, Limits},
    miss::{LocalMissQueue, MissPublisher},
    miss_kafka::{KafkaMissPublisher, KafkaPublisherConfig},
    models::ModelRegistry,
    service::EmbArkService,
    similar::{IndexingStore, SimilarIndexes},
    store_guard::{GuardConfig, GuardedStore},
};
use embark_ops::grpc::ServerLimits;
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

// Parsed once at start; boxing the flag structs would buy nothing.
#[allow(clippy::large_enum_variant)]
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
    /// The front alone. With --kafka-brokers its misses go to Kafka for
    /// `kfc`; otherwise they wait in the durable queue for an `embark up` on
    /// the same --data-dir.
    Serve {
        #[command(flatten)]
        front: FrontArgs,
    },
    /// Create the CQL keyspace and table (safe to run again).
    Migrate {
        #[command(flatten)]
        store: embark_store::args::StoreArgs,
    },
    /// Embed every key of a file (or stdin) that is not stored yet; resumable.
    Backfill(cli::backfill::BackfillArgs),
    /// Write a model's keys and vectors as .npy + keys.jsonl and Parquet; resumable.
    Export(cli::export::ExportArgs),
    /// Write the near-duplicate pairs of a model's keys as CSV; resumable.
    Dedup(cli::dedup::DedupArgs),
}

#[derive(Debug, Args)]
struct FrontArgs {
    #[command(flatten)]
    store: embark_store::args::StoreArgs,
    /// A Lookup waits this long for the store; rows it has not answered by
    /// then come back OOV_UNAVAILABLE (not queued).
    #[arg(long, env = "EMBARK_STORE_DEADLINE_MS", default_value_t = 50)]
    store_deadline_ms: u64,
    /// Consecutive failed or late store reads that open the breaker.
    #[arg(long, env = "EMBARK_STORE_BREAKER_FAILURES", default_value_t = 5)]
    store_breaker_failures: u32,
    /// How long an open breaker skips the store before one probe read.
    #[arg(long, env = "EMBARK_STORE_BREAKER_COOL_DOWN_MS", default_value_t = 2000)]
    store_breaker_cool_down_ms: u64,
    /// gRPC listen address.
    #[arg(long, env = "EMBARK_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Also serve gRPC on this Unix domain socket (a ranker on the same host
    /// skips TCP). The file is replaced at start and removed at exit.
    #[arg(long, env = "EMBARK_UDS")]
    uds: Option<PathBuf>,
    /// Operator HTTP address: /metrics, /healthz, /readyz.
    #[arg(long, env = "EMBARK_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// Page cache of the embedded store file (the tier holds hot vectors).
    #[arg(long, env = "EMBARK_EMBEDDED_CACHE_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    embedded_cache_bytes: u64,
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
    /// Keys the dedup window remembers at most (~100 bytes each); past it
    /// the oldest are forgotten and may be queued twice.
    #[arg(long, env = "EMBARK_DEDUP_MAX_KEYS", default_value_t = 1_000_000)]
    dedup_max_keys: u64,
    /// Misses the durable queue holds at most (no Kafka); past it new
    /// misses are dropped (counted) and queued again by a later Lookup.
    #[arg(long, env = "EMBARK_MAX_QUEUED_MISSES", default_value_t = 1_000_000)]
    max_queued_misses: u64,
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
    /// Misses buffered in memory before the durable queue (or Kafka); beyond
    /// it they are dropped (counted) and queued again by the next Lookup.
    #[arg(long, env = "EMBARK_MISS_BUFFER", default_value_t = 65536)]
    miss_buffer: usize,
    /// Publish misses to Kafka (`host:port[,host:port]`) for KFC instead of
    /// the local durable queue (`embark serve` only).
    #[arg(long, env = "EMBARK_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// The Kafka topic of misses.
    #[arg(long, env = "EMBARK_MISS_TOPIC", default_value = kfc::kafka::DEFAULT_MISS_TOPIC)]
    miss_topic: String,
    /// Create the miss topic with this many partitions if it is missing
    /// (0: never create it).
    #[arg(long, env = "EMBARK_MISS_TOPIC_PARTITIONS", default_value_t = 12)]
    miss_topic_partitions: i32,
    /// The Kafka topic on which replicas tell each other about Invalidate
    /// (`embark serve --kafka-brokers`): every replica drops the keys from
    /// its tier and similarity index.
    #[arg(long, env = "EMBARK_INVALIDATION_TOPIC", default_value = embark::invalidation::DEFAULT_INVALIDATION_TOPIC)]
    invalidation_topic: String,
    /// Replication factor of the miss topic when EmbArk creates it.
    #[arg(long, env = "EMBARK_TOPIC_REPLICATION", default_value_t = 1)]
    topic_replication: i32,
    /// A miss the brokers have not acknowledged within this time is dropped
    /// (counted); the next Lookup of the key publishes it again.
    #[arg(long, env = "EMBARK_KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 30_000)]
    kafka_message_timeout_ms: u64,
    /// Extra librdkafka properties, `key=value` (repeat or comma-separate).
    #[arg(long, env = "EMBARK_KAFKA_PROPERTY", value_delimiter = ',')]
    kafka_property: Vec<String>,
    /// Open client connections at most; further ones wait to be accepted.
    #[arg(long, env = "EMBARK_MAX_CONNECTIONS", default_value_t = ServerLimits::default().max_connections)]
    max_connections: usize,
    /// HTTP/2 streams (requests) in flight per client connection.
    #[arg(long, env = "EMBARK_CONCURRENCY_PER_CONNECTION", default_value_t = ServerLimits::default().max_streams_per_connection)]
    concurrency_per_connection: u32,
    /// Requests in progress across all connections; beyond it requests are
    /// refused at once with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, env = "EMBARK_MAX_IN_FLIGHT", default_value_t = ServerLimits::default().max_in_flight)]
    max_in_flight: usize,
    /// Bytes of request bodies held at once across connections; a request
    /// that would exceed it is refused with RESOURCE_EXHAUSTED (with the
    /// decode limit, this bounds request memory).
    #[arg(long, env = "EMBARK_MAX_REQUEST_BYTES_IN_FLIGHT", default_value_t = ServerLimits::default().max_request_bytes_in_flight)]
    max_request_bytes_in_flight: usize,
    #[command(flatten)]
    similar: SimilarArgs,
    /// Log as JSON lines.
    #[arg(long, env = "EMBARK_LOG_JSON")]
    log_json: bool,
}

/// The similarity indexes behind `Similar` (see docs/similarity.md).
#[derive(Debug, Args)]
struct SimilarArgs {
    /// Vectors each model's index holds at most (0: no index, `Similar`
    /// off). Memory is about this x (dim x 4 + 3.3 KiB) bytes per model:
    /// 1.2 GiB at 384-d, 2 GiB at 1280-d for the default.
    #[arg(long, env = "EMBARK_SIMILAR_MAX_VECTORS", default_value_t = 250_000)]
    similar_max_vectors: usize,
    /// Below this many vectors a model is searched exactly; from it on
    /// through an HNSW graph.
    #[arg(long, env = "EMBARK_SIMILAR_EXACT_BELOW", default_value_t = 20_000)]
    similar_exact_below: usize,
    /// HNSW candidate list per search: higher is slower with better recall.
    #[arg(long, env = "EMBARK_SIMILAR_EF_SEARCH", default_value_t = 96)]
    similar_ef_search: usize,
    /// The largest k a Similar call may ask for.
    #[arg(long, env = "EMBARK_SIMILAR_MAX_K", default_value_t = 1000)]
    similar_max_k: usize,
    /// `embark serve`: rescan the store this often for vectors other
    /// processes wrote (0: load once at start).
    #[arg(long, env = "EMBARK_SIMILAR_REFRESH_SECS", default_value_t = 300)]
    similar_refresh_secs: u64,
}

impl SimilarArgs {
    fn config(&self) -> embark_index::IndexConfig {
        embark_index::IndexConfig {
            exact_below: self.similar_exact_below.max(1),
            max_vectors: self.similar_max_vectors,
            ef_search: self.similar_ef_search.max(1),
            ..embark_index::IndexConfig::default()
        }
    }
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

pub(crate) fn default_models_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache/embark/models")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Up { front, fill } => run(front, Some(fill)).await,
            Command::Serve { front } => run(front, None).await,
            Command::Migrate { store } => {
                embark_ops::telemetry::init(false);
                let cfg =
                    store.cql()?.context("`embark migrate` is for --store cql://...; the embedded store needs none")?;
                embark_store::cql::CqlStore::migrate(&cfg).await?;
                println!("keyspace {} and table {}.embeddings are in place", cfg.keyspace, cfg.keyspace);
                Ok(())
            }
            Command::Backfill(args) => tool(cli::backfill::run(args)).await,
            Command::Export(args) => tool(cli::export::run(args)).await,
            Command::Dedup(args) => tool(cli::dedup::run(args)).await,
        }
    })
}

/// Runs a batch tool; an interrupted one exits 130 after its summary.
async fn tool(run: impl std::future::Future<Output = anyhow::Result<i32>>) -> anyhow::Result<()> {
    embark_ops::telemetry::init(false);
    let code = run.await?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
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

    if fill.is_some() && args.kafka_brokers.is_some() {
        anyhow::bail!("`embark up` fills its own misses; --kafka-brokers is for `embark serve` with a separate kfc");
    }
    let cql = args.store.cql()?;
    // The redb file holds the vectors on the embedded store, and the durable
    // miss queue whenever misses stay on this machine (no Kafka).
    let embedded =
        if cql.is_none() || args.kafka_brokers.is_none() {
            std::fs::create_dir_all(&args.data_dir)
                .with_context(|| format!("creating the data directory {}", args.data_dir.display()))?;
            let store_path = args.data_dir.join("embark.redb");
            let cache = usize::try_from(args.embedded_cache_bytes).unwrap_or(usize::MAX);
            Some(EmbeddedStore::open_with_cache(&store_path, cache).with_context(|| {
                format!("opening {} (is another embark using this --data-dir?)", store_path.display())
            })?)
        } else {
            None
        };
    let store: Arc<dyn EmbeddingStore> = match (&cql, &embedded) {
        (Some(cfg), _) => {
            if args.store.cql_migrate_on_start {
                embark_store::cql::CqlStore::migrate(cfg).await?;
            }
            Arc::new(embark_store::cql::CqlStore::connect(cfg).await?)
        }
        (None, Some(e)) => Arc::new(e.clone()),
        (None, None) => unreachable!("the embedded store is opened when no CQL store is given"),
    };

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

    // Similarity indexes: loaded from the store in the background; every
    // write and delete below goes through `IndexingStore` to keep them current.
    let indexes = SimilarIndexes::new(
        &specs.iter().map(|s| (s.name.to_owned(), s.dim)).collect::<Vec<_>>(),
        &args.similar.config(),
    );
    indexes.spawn_load(store.clone(), ops_stop.clone());
    if fill.is_none() && args.similar.similar_refresh_secs > 0 {
        indexes.spawn_refresh(store.clone(), Duration::from_secs(args.similar.similar_refresh_secs), ops_stop.clone());
    }
    let store: Arc<dyn EmbeddingStore> = Arc::new(IndexingStore::new(store, indexes.clone()));

    let dedup = MissDedup::new(Duration::from_secs(args.dedup_window_secs), args.dedup_max_keys);
    let properties = kfc::kafka::parse_properties(&args.kafka_property).map_err(anyhow::Error::msg)?;
    let mut misses = match (&args.kafka_brokers, &embedded) {
        (Some(brokers), _) => {
            // Best effort: KFC creates the miss topic too, and a broker that
            // is down now must not keep EmbArk from serving.
            let mut topics = vec![(args.invalidation_topic.as_str(), 1)];
            if args.miss_topic_partitions > 0 {
                topics.push((args.miss_topic.as_str(), args.miss_topic_partitions));
            }
            if let Err(e) =
                kfc::kafka::ensure_topics(brokers, &topics, args.topic_replication, Duration::from_secs(5)).await
            {
                tracing::warn!(error = %e, ?topics, "cannot make sure the topics exist");
            }
            Misses::Kafka(Arc::new(KafkaMissPublisher::new(
                &KafkaPublisherConfig {
                    brokers: brokers.clone(),
                    topic: args.miss_topic.clone(),
                    buffer: args.miss_buffer,
                    message_timeout: Duration::from_millis(args.kafka_message_timeout_ms),
                    properties: properties.clone(),
                },
                dedup.clone(),
            )?))
        }
        (None, Some(e)) => {
            let queue = LocalMissQueue::new(e.pending_misses(), args.miss_buffer, args.max_queued_misses);
            let flusher = queue.spawn_flusher();
            Misses::Local(queue, flusher)
        }
        (None, None) => unreachable!("the embedded store is opened when misses stay local"),
    };
    let failure_ttl = Duration::from_secs(args.failure_ttl_secs);
    let replica = embark::invalidation::replica_id();
    let broadcast = match &args.kafka_brokers {
        Some(brokers) => Some(Arc::new(embark::invalidation::KafkaInvalidations::new(
            brokers,
            &args.invalidation_topic,
            &replica,
            &properties,
        )?)),
        None => None,
    };
    let tier = VectorCache::new(args.cache_bytes, args.cache_ttl_secs.map(Duration::from_secs));
    let front = Front::new(
        registry,
        tier.clone(),
        GuardedStore::new(
            store.clone(),
            GuardConfig {
                deadline: Duration::from_millis(args.store_deadline_ms),
                failure_threshold: args.store_breaker_failures.max(1),
                cool_down: Duration::from_millis(args.store_breaker_cool_down_ms),
            },
        ),
        misses.publisher(),
        dedup,
        Limits { max_batch_keys: args.max_batch_keys, max_key_bytes: args.max_key_bytes },
        failure_ttl,
    )
    .with_similar(indexes, args.similar.similar_max_k.max(1));
    let front = Arc::new(match &broadcast {
        Some(b) => front.with_broadcast(b.clone()),
        None => front,
    });
    if let Some(brokers) = &args.kafka_brokers {
        let following = embark::invalidation::spawn_listener(
            brokers,
            &args.invalidation_topic,
            &replica,
            &properties,
            front.clone(),
            ops_stop.clone(),
        )?;
        ready.add_check("following other replicas' invalidations", move || following.get());
    }

    // The fill loop stops on its own token, after the front has stopped
    // and the last misses were flushed.
    let fill_stop = CancellationToken::new();
    let fill_task = match (&fill, &engine, &misses) {
        (Some(f), Some(engine), Misses::Local(queue, _)) => {
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

    // Readiness follows what this process can do: with the store breaker
    // open, every key not in the tier answers OOV_UNAVAILABLE, so traffic
    // is better sent to another replica. (A Kafka outage does not count:
    // Lookups are answered in full, and misses are published again later.)
    // gRPC health follows readiness.
    let breaker = front.clone();
    ready.add_check("store breaker closed", move || !breaker.store_breaker_open());
    if let Some(model) = front.models().names().first() {
        front.store_guard().spawn_prober(model.to_string(), ops_stop.clone());
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    ready.follow_in_health(
        health_reporter,
        vec![<EmbArkServer<EmbArkService> as tonic::server::NamedService>::NAME],
        Duration::from_millis(500),
        ops_stop.clone(),
    );
    let (reflection_v1, reflection_v1alpha) = embark_ops::grpc::reflection(embark_proto::EMBARK_DESCRIPTOR_SET)?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let grpc_addr = listener.local_addr()?;
    let uds = match &args.uds {
        Some(path) => {
            // A socket file left by a crash would make bind fail.
            if path.exists() {
                std::fs::remove_file(path).with_context(|| format!("removing the old socket {}", path.display()))?;
            }
            Some(tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?)
        }
        None => None,
    };
    ready.set(true);
    tracing::info!(
        grpc = %grpc_addr,
        metrics = %ops_addr,
        models = ?front.models().names(),
        data_dir = %args.data_dir.display(),
        pending_misses = misses.depth(),
        misses = misses.name(),
        mode = if fill.is_some() { "up" } else { "serve" },
        store = %args.store.store,
        uds = ?args.uds,
        "embark serving"
    );
    let limits = ServerLimits {
        max_connections: args.max_connections,
        max_streams_per_connection: args.concurrency_per_connection,
        max_in_flight: args.max_in_flight,
        max_request_bytes_in_flight: args.max_request_bytes_in_flight,
    };
    // No request is larger than the request limits allow, and none carries
    // more fields than a full batch: bounded memory per request.
    let decode_limit =
        args.max_batch_keys.saturating_mul(args.max_key_bytes.saturating_add(4)).saturating_add(64 << 10);
    embark_proto::codec::set_max_fields_per_message(args.max_batch_keys.saturating_add(16));
    let router = embark_ops::grpc::server_builder(&limits, Duration::from_secs(30))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            EmbArkServer::new(EmbArkService::new(front))
                .max_decoding_message_size(decode_limit)
                .max_encoding_message_size(256 << 20),
        );
    let tcp = router.clone().serve_with_incoming_shutdown(
        embark_ops::grpc::incoming(listener, limits.max_connections),
        shutdown.clone().cancelled_owned(),
    );
    let unix = async {
        match uds {
            Some(l) => {
                router
                    .serve_with_incoming_shutdown(
                        embark_ops::grpc::incoming(l, limits.max_connections),
                        shutdown.clone().cancelled_owned(),
                    )
                    .await
            }
            None => Ok(()),
        }
    };
    let served = tokio::try_join!(tcp, unix);
    if let Some(path) = &args.uds {
        let _ = std::fs::remove_file(path);
    }
    served.context("gRPC server")?;

    // In-flight Lookups are done. Keep every miss: flush the buffer into the
    // durable queue, then let the fill loop finish its round.
    ready.set(false);
    misses.close().await;
    fill_stop.cancel();
    if let Some(t) = fill_task {
        let _ = t.await;
    }
    ops_stop.cancel();
    let _ = ops_task.await;
    tracing::info!(pending_misses = misses.depth(), "embark stopped");
    Ok(())
}

/// Where this process's misses go.
enum Misses {
    /// The durable queue in the redb file, and the task writing it.
    Local(Arc<LocalMissQueue>, tokio::task::JoinHandle<()>),
    Kafka(Arc<KafkaMissPublisher>),
}

impl Misses {
    fn publisher(&self) -> Arc<dyn MissPublisher> {
        match self {
            Misses::Local(q, _) => q.clone(),
            Misses::Kafka(k) => k.clone(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Misses::Local(..) => "local",
            Misses::Kafka(_) => "kafka",
        }
    }

    /// Misses not yet handed on (queued locally, or unacknowledged by Kafka).
    fn depth(&self) -> u64 {
        match self {
            Misses::Local(q, _) => q.depth(),
            Misses::Kafka(k) => k.queued().max(0) as u64,
        }
    }

    /// Keeps every miss: writes the buffer to the durable queue, or waits a
    /// bounded time for Kafka to acknowledge what is queued.
    async fn close(&mut self) {
        match self {
            Misses::Local(q, flusher) => {
                q.close();
                let _ = flusher.await;
            }
            Misses::Kafka(k) => {
                let p = k.clone();
                let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(10))).await;
            }
        }
    }
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
