//! `kfc`: drains the Kafka miss topic into Retina and the store. The flags
//! are here; what runs is `kfc::app`.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use embark_queue::{backoff::Backoff, kafka::KafkaSourceConfig};
use kfc::{FillConfig, RetinaClientConfig, app::KfcConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "KFC: fills EmbArk's misses from Kafka with Retina, at least once")]
struct Args {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    #[arg(long, env = "KFC_KAFKA_BROKERS", default_value = embark_queue::kafka::DEFAULT_BROKERS)]
    kafka_brokers: String,
    /// The topic EmbArk publishes misses to.
    #[arg(long, env = "KFC_MISS_TOPIC", default_value = embark_queue::kafka::DEFAULT_MISS_TOPIC)]
    miss_topic: String,
    /// Where misses given up on go, with their reason.
    #[arg(long, env = "KFC_DLQ_TOPIC", default_value = embark_queue::kafka::DEFAULT_DLQ_TOPIC)]
    dlq_topic: String,
    /// Consumer group; instances in one group split the partitions.
    #[arg(long, env = "KFC_GROUP", default_value = embark_queue::kafka::DEFAULT_GROUP)]
    group: String,
    /// Create the miss topic with this many partitions if it is missing
    /// (0: do not create topics).
    #[arg(long, env = "KFC_MISS_TOPIC_PARTITIONS", default_value_t = 12)]
    miss_topic_partitions: i32,
    /// Replication factor of topics KFC creates.
    #[arg(long, env = "KFC_TOPIC_REPLICATION", default_value_t = 1)]
    topic_replication: i32,
    /// Group session timeout: how soon a dead instance's partitions move.
    #[arg(long, env = "KFC_SESSION_TIMEOUT_MS", default_value_t = KafkaSourceConfig::default().session_timeout.as_millis() as u64)]
    session_timeout_ms: u64,
    /// How often settled offsets are committed.
    #[arg(long, env = "KFC_COMMIT_INTERVAL_MS", default_value_t = KafkaSourceConfig::default().commit_interval.as_millis() as u64)]
    commit_interval_ms: u64,
    /// Extra librdkafka properties, `key=value` (repeat or comma-separate).
    #[arg(long, env = "KFC_KAFKA_PROPERTY", value_delimiter = ',')]
    kafka_property: Vec<String>,
    #[command(flatten)]
    kafka_security: embark_queue::kafka::KafkaSecurityArgs,

    /// Retina services, `http://host:port` or `https://host:port` for TLS
    /// (comma-separated); every address each name resolves to is used,
    /// balanced.
    #[arg(long, env = "KFC_RETINA", value_delimiter = ',', default_value = kfc::DEFAULT_RETINA_URL)]
    retina: Vec<String>,
    /// Deadline of one Retina call.
    #[arg(long, env = "KFC_RETINA_TIMEOUT_MS", default_value_t = RetinaClientConfig::default().timeout.as_millis() as u64)]
    retina_timeout_ms: u64,
    /// How often Retina names are resolved again (new replicas).
    #[arg(long, env = "KFC_RETINA_RESOLVE_SECS", default_value_t = RetinaClientConfig::default().resolve_every.as_secs())]
    retina_resolve_secs: u64,
    #[command(flatten)]
    retina_tls: kfc::RetinaTlsArgs,

    #[command(flatten)]
    store: embark_store::args::StoreArgs,

    /// Fill rounds in flight at once (each a batch of misses).
    #[arg(long, env = "KFC_WORKERS", default_value_t = 4)]
    workers: usize,
    /// Misses per fill round.
    #[arg(long, env = "KFC_FILL_BATCH", default_value_t = FillConfig::default().max_batch)]
    fill_batch: usize,
    /// Inputs per Retina call.
    #[arg(long, env = "KFC_EMBED_BATCH", default_value_t = FillConfig::default().embed_batch)]
    embed_batch: usize,
    /// Transient failures of one input before it is recorded as failed.
    #[arg(long, env = "KFC_MAX_ATTEMPTS", default_value_t = FillConfig::default().max_attempts)]
    max_attempts: u32,
    /// A failure record younger than this is trusted (the key is skipped).
    #[arg(long, env = "KFC_FAILURE_TTL_SECS", default_value_t = FillConfig::default().failure_ttl.as_secs())]
    failure_ttl_secs: u64,
    /// Longest backoff between retries, in milliseconds.
    #[arg(long, env = "KFC_MAX_BACKOFF_MS", default_value_t = Backoff::default().max.as_millis() as u64)]
    max_backoff_ms: u64,
    /// Misses held in memory until their retry time; reading pauses beyond.
    #[arg(long, env = "KFC_MAX_DELAYED", default_value_t = KafkaSourceConfig::default().max_delayed)]
    max_delayed: usize,
    /// How long a retry or dead letter may wait for the broker's
    /// acknowledgement before it is logged and sent again, in milliseconds.
    #[arg(
        long,
        env = "KFC_PUBLISH_TIMEOUT_MS",
        default_value_t = KafkaSourceConfig::default().publish_timeout.as_millis() as u64
    )]
    publish_timeout_ms: u64,

    /// Operator HTTP address: /metrics, /healthz, /readyz.
    #[arg(long, env = "KFC_METRICS_LISTEN", default_value = "127.0.0.1:9466")]
    metrics_listen: SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "KFC_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    traces: embark_ops::traces::TraceArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = KfcConfig {
        source: KafkaSourceConfig {
            brokers: args.kafka_brokers,
            miss_topic: args.miss_topic,
            dlq_topic: args.dlq_topic,
            group: args.group,
            session_timeout: Duration::from_millis(args.session_timeout_ms),
            commit_interval: Duration::from_millis(args.commit_interval_ms),
            ready_buffer: args.fill_batch * args.workers.max(1),
            max_delayed: args.max_delayed,
            publish_timeout: Duration::from_millis(args.publish_timeout_ms.max(1)),
            properties: embark_queue::kafka::client_properties(&args.kafka_security, &args.kafka_property)?,
            ..KafkaSourceConfig::default()
        },
        miss_topic_partitions: args.miss_topic_partitions,
        topic_replication: args.topic_replication,
        retina: args.retina_tls.apply(RetinaClientConfig {
            urls: args.retina,
            timeout: Duration::from_millis(args.retina_timeout_ms),
            resolve_every: Duration::from_secs(args.retina_resolve_secs.max(1)),
            ..RetinaClientConfig::default()
        })?,
        store: args.store,
        fill: FillConfig {
            max_batch: args.fill_batch,
            embed_batch: args.embed_batch,
            failure_ttl: Duration::from_secs(args.failure_ttl_secs),
            max_attempts: args.max_attempts,
            backoff: Backoff { max: Duration::from_millis(args.max_backoff_ms), ..Backoff::default() },
        },
        workers: args.workers,
        metrics_listen: args.metrics_listen,
        log_json: args.log_json,
        traces: args.traces,
    };
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(kfc::app::run(config))
}
