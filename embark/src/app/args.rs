//! The flags of `embark up` and `embark serve`, defined once.
//!
//! Defaults that a library type also has come from its `Default` impl
//! (`ServerLimits`, `EngineConfig`, ...), so a flag and the code cannot
//! disagree.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use embark_index::IndexConfig;
use embark_ops::grpc::ServerLimits;
use embark_store::args::parse_bytes;
use kfc::FillConfig;

use crate::{front::Limits, store_guard::GuardConfig};

#[derive(Debug, Args)]
pub struct FrontArgs {
    #[command(flatten)]
    pub store: embark_store::args::StoreArgs,
    #[command(flatten)]
    pub embedded: embark_store::args::EmbeddedArgs,
    /// A Lookup waits this long for the store; rows it has not answered by
    /// then come back OOV_UNAVAILABLE (not queued).
    #[arg(long, env = "EMBARK_STORE_DEADLINE_MS", default_value_t = GuardConfig::default().deadline.as_millis() as u64)]
    pub store_deadline_ms: u64,
    /// Consecutive failed or late store reads that open the breaker.
    #[arg(long, env = "EMBARK_STORE_BREAKER_FAILURES", default_value_t = GuardConfig::default().failure_threshold)]
    pub store_breaker_failures: u32,
    /// How long an open breaker skips the store before one probe read.
    #[arg(long, env = "EMBARK_STORE_BREAKER_COOL_DOWN_MS", default_value_t = GuardConfig::default().cool_down.as_millis() as u64)]
    pub store_breaker_cool_down_ms: u64,
    /// gRPC listen address.
    #[arg(long, env = "EMBARK_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Also serve gRPC on this Unix domain socket (a ranker on the same host
    /// skips TCP). The file is replaced at start and removed at exit.
    #[arg(long, env = "EMBARK_UDS")]
    pub uds: Option<PathBuf>,
    #[command(flatten)]
    pub tls: embark_ops::tls::TlsServerArgs,
    #[command(flatten)]
    pub auth: embark_ops::auth::AuthArgs,
    /// Keys one principal (or, without --auth-tokens, one peer address) may
    /// invalidate per second; past it Invalidate answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "EMBARK_INVALIDATE_KEYS_PER_SECOND", default_value_t = crate::service::DEFAULT_INVALIDATE_KEYS_PER_SECOND)]
    pub invalidate_keys_per_second: u32,
    /// Also serve the REST/JSON API (`/v1/lookup`, `/v1/similar`,
    /// `/v1/invalidate`, `/v1/models`, `/v1/openapi.json`) on this address,
    /// over HTTP/1.1 (or HTTP/2), with the gRPC server's TLS and tokens. Off by default.
    #[arg(long, env = "EMBARK_REST_LISTEN")]
    pub rest_listen: Option<SocketAddr>,
    /// Operator HTTP address: /metrics, /healthz, /readyz and the web
    /// console (/console).
    #[arg(long, env = "EMBARK_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// Serve the read-only web console at /console on the operator port
    /// (no authentication of its own, like /metrics: keep that port on
    /// the internal network). `--console false` turns it off.
    #[arg(long, env = "EMBARK_CONSOLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub console: bool,
    /// Read each model's current version (what `embark promote` recorded
    /// in the store) this often, so every replica follows a promote within
    /// this delay; 0: only at start.
    #[arg(long, env = "EMBARK_VERSION_REFRESH_SECS", default_value_t = crate::versions::DEFAULT_VERSION_REFRESH.as_secs())]
    pub version_refresh_secs: u64,
    /// Count each served version's stored vectors (the coverage `Models`
    /// reports) this often; 0: never. On CQL each count scans the table.
    #[arg(long, env = "EMBARK_COVERAGE_REFRESH_SECS", default_value_t = crate::versions::DEFAULT_COVERAGE_REFRESH.as_secs())]
    pub coverage_refresh_secs: u64,
    #[command(flatten)]
    pub catalog: retina::config::CatalogArg,
    /// Models to serve, comma-separated (default: every model of the
    /// catalogue).
    #[arg(long, env = "EMBARK_MODELS", value_delimiter = ',')]
    pub models: Vec<String>,
    /// OOV row of a model read from a file (MODEL=PATH for every version,
    /// MODEL@VERSION=PATH for one; dim numbers); its catalogue entry's
    /// `oov_file`, else zeros, otherwise. Repeat or comma-separate for
    /// several models.
    #[arg(long, env = "EMBARK_OOV", value_delimiter = ',')]
    pub oov: Vec<String>,
    /// Keep a model's rows in the tier in a compact type: MODEL=TYPE for
    /// every version, MODEL@VERSION=TYPE for one, TYPE one of f32 (the
    /// default), f16, bf16, i8 (per-row scale). f16 halves a row's bytes
    /// (an entry also has ~96 B of bookkeeping); Lookups of another type
    /// convert, and f32 answers then carry the compact type's rounding.
    /// Repeat or comma-separate.
    #[arg(long, env = "EMBARK_TIER_TYPE", value_delimiter = ',')]
    pub tier_type: Vec<String>,
    /// Size of the in-process tier: bytes, or with KiB/MiB/GiB.
    #[arg(long, env = "EMBARK_CACHE_BYTES", default_value = "1GiB", value_parser = parse_bytes)]
    pub cache_bytes: u64,
    /// Expire tier entries this many seconds after insertion (none by default:
    /// only quick_cache's size-bounded S3-FIFO eviction).
    #[arg(long, env = "EMBARK_CACHE_TTL_SECS")]
    pub cache_ttl_secs: Option<u64>,
    /// A key missed many times within this window is queued once.
    #[arg(long, env = "EMBARK_DEDUP_WINDOW_SECS", default_value_t = 60)]
    pub dedup_window_secs: u64,
    /// Keys the dedup window remembers at most (~100 bytes each); past it
    /// the oldest are forgotten and may be queued twice.
    #[arg(long, env = "EMBARK_DEDUP_MAX_KEYS", default_value_t = 1_000_000)]
    pub dedup_max_keys: u64,
    /// Misses the durable queue holds at most (no Kafka); past it new
    /// misses are dropped (counted) and queued again by a later Lookup.
    #[arg(long, env = "EMBARK_MAX_QUEUED_MISSES", default_value_t = 1_000_000)]
    pub max_queued_misses: u64,
    /// An input that could not be embedded is answered OOV_FAILED, and not
    /// queued again, for this long.
    #[arg(long, env = "EMBARK_FAILURE_TTL_SECS", default_value_t = FillConfig::default().failure_ttl.as_secs())]
    pub failure_ttl_secs: u64,
    /// Most keys in one Lookup or Invalidate.
    #[arg(long, env = "EMBARK_MAX_BATCH_KEYS", default_value_t = Limits::default().max_batch_keys)]
    pub max_batch_keys: usize,
    /// Longest key, in bytes.
    #[arg(long, env = "EMBARK_MAX_KEY_BYTES", default_value_t = Limits::default().max_key_bytes)]
    pub max_key_bytes: usize,
    /// Misses buffered in memory before the durable queue (or Kafka); beyond
    /// it they are dropped (counted) and queued again by the next Lookup.
    #[arg(long, env = "EMBARK_MISS_BUFFER", default_value_t = 65536)]
    pub miss_buffer: usize,
    /// Publish misses to Kafka (`host:port[,host:port]`) for KFC instead of
    /// the local durable queue (`embark serve` only).
    #[arg(long, env = "EMBARK_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// The Kafka topic of misses.
    #[arg(long, env = "EMBARK_MISS_TOPIC", default_value = embark_queue::kafka::DEFAULT_MISS_TOPIC)]
    pub miss_topic: String,
    /// Create the miss topic with this many partitions if it is missing
    /// (0: never create it).
    #[arg(long, env = "EMBARK_MISS_TOPIC_PARTITIONS", default_value_t = 12)]
    pub miss_topic_partitions: i32,
    /// The Kafka topic on which replicas tell each other about Invalidate
    /// (`embark serve --kafka-brokers`): every replica drops the keys from
    /// its tier and similarity index.
    #[arg(long, env = "EMBARK_INVALIDATION_TOPIC", default_value = embark_queue::kafka::DEFAULT_INVALIDATION_TOPIC)]
    pub invalidation_topic: String,
    /// Replication factor of the miss topic and the invalidation topic when
    /// EmbArk creates them.
    #[arg(long, env = "EMBARK_TOPIC_REPLICATION", default_value_t = 1)]
    pub topic_replication: i32,
    /// A miss the brokers have not acknowledged within this time is dropped
    /// (counted); the next Lookup of the key publishes it again.
    #[arg(long, env = "EMBARK_KAFKA_MESSAGE_TIMEOUT_MS", default_value_t = 30_000)]
    pub kafka_message_timeout_ms: u64,
    /// Extra librdkafka properties, `key=value` (repeat or comma-separate).
    #[arg(long, env = "EMBARK_KAFKA_PROPERTY", value_delimiter = ',')]
    pub kafka_property: Vec<String>,
    #[command(flatten)]
    pub kafka_security: embark_queue::kafka::KafkaSecurityArgs,
    /// Open client connections at most; further ones wait to be accepted.
    #[arg(long, env = "EMBARK_MAX_CONNECTIONS", default_value_t = ServerLimits::default().max_connections)]
    pub max_connections: usize,
    /// HTTP/2 streams (requests) in flight per client connection.
    #[arg(long, env = "EMBARK_CONCURRENCY_PER_CONNECTION", default_value_t = ServerLimits::default().max_streams_per_connection)]
    pub concurrency_per_connection: u32,
    /// Requests in progress across all connections; beyond it requests are
    /// refused at once with RESOURCE_EXHAUSTED (load shedding).
    #[arg(long, env = "EMBARK_MAX_IN_FLIGHT", default_value_t = ServerLimits::default().max_in_flight)]
    pub max_in_flight: usize,
    /// Bytes of request bodies held at once across connections; a request
    /// that would exceed it is refused with RESOURCE_EXHAUSTED (with the
    /// decode limit, this bounds request memory).
    #[arg(long, env = "EMBARK_MAX_REQUEST_BYTES_IN_FLIGHT", default_value_t = ServerLimits::default().max_request_bytes_in_flight)]
    pub max_request_bytes_in_flight: usize,
    #[command(flatten)]
    pub similar: SimilarArgs,
    /// Log as JSON lines.
    #[arg(long, env = "EMBARK_LOG_JSON")]
    pub log_json: bool,
    #[command(flatten)]
    pub traces: embark_ops::traces::TraceArgs,
}

/// The similarity indexes behind `Similar` (see docs/similarity.md).
#[derive(Debug, Args)]
pub struct SimilarArgs {
    /// Vectors (live keys) each model's index holds at most (0: no index,
    /// `Similar` off). Once past `--similar-exact-below`, memory is about
    /// this x (dim x the bytes of `--similar-vector-type` + 200) bytes per
    /// model: 0.2 GiB at 384-d, 0.65 GiB at 1280-d for the default in
    /// f16. A removed or replaced key's slot is reused.
    #[arg(long, env = "EMBARK_SIMILAR_MAX_VECTORS", default_value_t = IndexConfig::default().max_vectors)]
    pub similar_max_vectors: usize,
    /// Below this many vectors a model is searched exactly; from it on
    /// through an HNSW graph.
    #[arg(long, env = "EMBARK_SIMILAR_EXACT_BELOW", default_value_t = IndexConfig::default().exact_below)]
    pub similar_exact_below: usize,
    /// HNSW candidate list per search: higher is slower with better recall.
    #[arg(long, env = "EMBARK_SIMILAR_EF_SEARCH", default_value_t = IndexConfig::default().ef_search)]
    pub similar_ef_search: usize,
    /// How the graph stores vectors: f32, f16 (half the memory; scores
    /// within about 1e-3) or i8 (a quarter; within about 1e-2). The exact
    /// scan below `--similar-exact-below` keeps f32.
    #[arg(long, env = "EMBARK_SIMILAR_VECTOR_TYPE", default_value_t = IndexConfig::default().quantization)]
    pub similar_vector_type: embark_index::Quantization,
    /// The largest k a Similar call may ask for.
    #[arg(long, env = "EMBARK_SIMILAR_MAX_K", default_value_t = 1000)]
    pub similar_max_k: usize,
    /// `embark serve`: rescan the store this often for vectors other
    /// processes wrote (0: load once at start).
    #[arg(long, env = "EMBARK_SIMILAR_REFRESH_SECS", default_value_t = 300)]
    pub similar_refresh_secs: u64,
}

impl SimilarArgs {
    pub fn config(&self) -> embark_index::IndexConfig {
        embark_index::IndexConfig {
            exact_below: self.similar_exact_below.max(1),
            max_vectors: self.similar_max_vectors,
            ef_search: self.similar_ef_search.max(1),
            quantization: self.similar_vector_type,
            ..embark_index::IndexConfig::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct FillArgs {
    #[command(flatten)]
    pub models_dir: retina::config::ModelsDirArg,
    /// Misses taken from the queue per fill round.
    #[arg(long, env = "EMBARK_FILL_BATCH", default_value_t = FillConfig::default().max_batch)]
    pub fill_batch: usize,
    /// Transient failures of one input before it is recorded as failed.
    #[arg(long, env = "EMBARK_FILL_MAX_ATTEMPTS", default_value_t = FillConfig::default().max_attempts)]
    pub fill_max_attempts: u32,
    #[command(flatten)]
    pub engine: retina::config::EngineArgs,
}
