//! `kfc`: drains the Kafka miss topic into Retina and the store.
//!
//! Several fill workers share one consumer-group member. Each worker takes a
//! batch of misses from any partitions, skips stored keys, embeds the rest
//! on a Retina replica, and writes the vectors or failure records. Offsets
//! are committed only past settled work (see `kfc::kafka`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use embark_store::EmbeddingStore;
use kfc::{
    FillConfig, FillLoop,
    backoff::Backoff,
    kafka::{KafkaMissSource, KafkaSourceConfig},
    retina_client::{RemoteRetina, RetinaClientConfig},
};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(version, about = "KFC: fills EmbArk's misses from Kafka with Retina, at least once")]
struct Args {
    /// Kafka bootstrap servers, `host:port[,host:port]`.
    #[arg(long, env = "KFC_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    kafka_brokers: String,
    /// The topic EmbArk publishes misses to.
    #[arg(long, env = "KFC_MISS_TOPIC", default_value = kfc::kafka::DEFAULT_MISS_TOPIC)]
    miss_topic: String,
    /// Where misses given up on go, with their reason.
    #[arg(long, env = "KFC_DLQ_TOPIC", default_value = kfc::kafka::DEFAULT_DLQ_TOPIC)]
    dlq_topic: String,
    /// Consumer group; instances in one group split the partitions.
    #[arg(long, env = "KFC_GROUP", default_value = "kfc")]
    group: String,
    /// Create the miss topic with this many partitions if it is missing
    /// (0: do not create topics).
    #[arg(long, env = "KFC_MISS_TOPIC_PARTITIONS", default_value_t = 12)]
    miss_topic_partitions: i32,
    /// Replication factor of topics KFC creates.
    #[arg(long, env = "KFC_TOPIC_REPLICATION", default_value_t = 1)]
    topic_replication: i32,
    /// Group session timeout: how soon a dead instance's partitions move.
    #[arg(long, env = "KFC_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// How often settled offsets are committed.
    #[arg(long, env = "KFC_COMMIT_INTERVAL_MS", default_value_t = 1000)]
    commit_interval_ms: u64,
    /// Extra librdkafka properties, `key=value` (repeat or comma-separate).
    #[arg(long, env = "KFC_KAFKA_PROPERTY", value_delimiter = ',')]
    kafka_property: Vec<String>,

    /// Retina services, `http://host:port` (comma-separated); every address
    /// each name resolves to is used, balanced.
    #[arg(long, env = "KFC_RETINA", value_delimiter = ',', default_value = "http://127.0.0.1:50061")]
    retina: Vec<String>,
    /// Deadline of one Retina call.
    #[arg(long, env = "KFC_RETINA_TIMEOUT_MS", default_value_t = 30_000)]
    retina_timeout_ms: u64,
    /// How often Retina names are resolved again (new replicas).
    #[arg(long, env = "KFC_RETINA_RESOLVE_SECS", default_value_t = 5)]
    retina_resolve_secs: u64,

    #[command(flatten)]
    store: embark_store::args::StoreArgs,

    /// Fill rounds in flight at once (each a batch of misses).
    #[arg(long, env = "KFC_WORKERS", default_value_t = 4)]
    workers: usize,
    /// Misses per fill round.
    #[arg(long, env = "KFC_FILL_BATCH", default_value_t = 64)]
    fill_batch: usize,
    /// Inputs per Retina call.
    #[arg(long, env = "KFC_EMBED_BATCH", default_value_t = 32)]
    embed_batch: usize,
    /// Transient failures of one input before it is recorded as failed.
    #[arg(long, env = "KFC_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// A failure record younger than this is trusted (the key is skipped).
    #[arg(long, env = "KFC_FAILURE_TTL_SECS", default_value_t = 3600)]
    failure_ttl_secs: u64,
    /// Longest backoff between retries, in milliseconds.
    #[arg(long, env = "KFC_MAX_BACKOFF_MS", default_value_t = Backoff::default().max.as_millis() as u64)]
    max_backoff_ms: u64,
    /// Misses held in memory until their retry time; reading pauses beyond.
    #[arg(long, env = "KFC_MAX_DELAYED", default_value_t = 100_000)]
    max_delayed: usize,

    /// Operator HTTP address: /metrics, /healthz, /readyz.
    #[arg(long, env = "KFC_METRICS_LISTEN", default_value = "127.0.0.1:9466")]
    metrics_listen: SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "KFC_LOG_JSON")]
    log_json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    embark_ops::telemetry::init(args.log_json);
    let metrics = embark_ops::http::install_recorder().context("installing the metrics recorder")?;
    let shutdown = embark_ops::shutdown::on_signal();
    let ready = embark_ops::http::Readiness::default();
    let ops_stop = CancellationToken::new();
    let (ops_addr, ops_task) = embark_ops::http::serve(args.metrics_listen, metrics, ready.clone(), ops_stop.clone())
        .await
        .with_context(|| format!("binding the metrics port {}", args.metrics_listen))?;

    let cql = args.store.cql()?.context("kfc writes to a shared store: pass --store cql://host:port/keyspace")?;
    if args.store.cql_migrate_on_start {
        embark_store::cql::CqlStore::migrate(&cql).await?;
    }
    let store: Arc<dyn EmbeddingStore> = Arc::new(
        embark_store::cql::CqlStore::connect(&cql)
            .await
            .with_context(|| format!("connecting to {}", args.store.store))?,
    );

    if args.miss_topic_partitions > 0 {
        kfc::kafka::ensure_topics(
            &args.kafka_brokers,
            &[(&args.miss_topic, args.miss_topic_partitions), (&args.dlq_topic, 1)],
            args.topic_replication,
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("creating topics on {}", args.kafka_brokers))?;
    }

    // Reading stops first (on the signal); the workers finish their rounds;
    // then the settled offsets are committed and the group is left.
    let read_stop = CancellationToken::new();
    let source = KafkaMissSource::start(
        KafkaSourceConfig {
            brokers: args.kafka_brokers.clone(),
            miss_topic: args.miss_topic.clone(),
            dlq_topic: args.dlq_topic.clone(),
            group: args.group.clone(),
            session_timeout: Duration::from_millis(args.session_timeout_ms),
            commit_interval: Duration::from_millis(args.commit_interval_ms),
            ready_buffer: args.fill_batch * args.workers.max(1),
            max_delayed: args.max_delayed,
            properties: kfc::kafka::parse_properties(&args.kafka_property).map_err(anyhow::Error::msg)?,
            ..KafkaSourceConfig::default()
        },
        read_stop.clone(),
    )?;
    let retina_stop = CancellationToken::new();
    let retina = Arc::new(
        RemoteRetina::start(
            RetinaClientConfig {
                urls: args.retina.clone(),
                timeout: Duration::from_millis(args.retina_timeout_ms),
                resolve_every: Duration::from_secs(args.retina_resolve_secs.max(1)),
                ..RetinaClientConfig::default()
            },
            retina_stop.clone(),
        )
        .map_err(|e| anyhow::anyhow!(e))?,
    );
    let fill = Arc::new(FillLoop::new(
        source.clone(),
        retina,
        store,
        FillConfig {
            max_batch: args.fill_batch,
            embed_batch: args.embed_batch,
            failure_ttl: Duration::from_secs(args.failure_ttl_secs),
            max_attempts: args.max_attempts,
            backoff: Backoff { max: Duration::from_millis(args.max_backoff_ms), ..Backoff::default() },
        },
    ));
    let worker_stop = CancellationToken::new();
    let spawn_worker = |workers: &mut tokio::task::JoinSet<()>| {
        let fill = fill.clone();
        let stop = worker_stop.clone();
        workers.spawn(async move { fill.run(stop).await });
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.workers.max(1) {
        spawn_worker(&mut workers);
    }
    let reader = source.clone();
    ready.add_check("miss topic reader", move || reader.is_reading());
    ready.set(true);
    tracing::info!(
        brokers = %args.kafka_brokers,
        topic = %args.miss_topic,
        group = %args.group,
        retina = ?args.retina,
        store = %args.store.store,
        workers = workers.len(),
        metrics = %ops_addr,
        "kfc running"
    );

    // Supervision: a worker that ends before shutdown (a panic) is
    // replaced; its batch was not settled and comes back. The reader is
    // the consumer-group member itself: if it ever ends, the process stops
    // with an error so its orchestrator restarts it (crash-only), after
    // committing what is settled.
    let mut failure = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = source.reader_stopped() => {
                failure = Some(anyhow::anyhow!("the miss topic reader stopped unexpectedly"));
                break;
            }
            Some(ended) = workers.join_next() => {
                tracing::error!(error = ?ended.err(), "a fill worker ended; starting another");
                metrics::counter!("kfc_worker_restarts_total").increment(1);
                spawn_worker(&mut workers);
            }
        }
    }
    ready.set(false);
    read_stop.cancel();
    worker_stop.cancel();
    while workers.join_next().await.is_some() {}
    source.shutdown().await;
    retina_stop.cancel();
    ops_stop.cancel();
    let _ = ops_task.await;
    tracing::info!(unsettled = source.in_flight(), "kfc stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
