//! The `kfc` deployment: the Kafka miss topic, drained by fill workers
//! into Retina over gRPC and the shared CQL store. `src/main.rs` holds the
//! flags and calls [`run`].
//!
//! Several fill workers share one consumer-group member. Each worker takes a
//! batch of misses from any partitions, skips stored keys, embeds the rest
//! on a Retina replica, and writes the vectors or failure records. Offsets
//! are committed only past settled work (`embark_queue::kafka`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use embark_ops::operator::Operator;
use embark_queue::kafka::{KafkaMissSource, KafkaSourceConfig};
use embark_store::{EmbeddingStore, args::StoreArgs, cql::CqlStore};
use tokio_util::sync::CancellationToken;

use crate::{FillConfig, FillLoop, RemoteRetina, RetinaClientConfig};

/// Everything `kfc` runs with, from its flags.
#[derive(Debug, Clone)]
pub struct KfcConfig {
    pub source: KafkaSourceConfig,
    /// Create the miss topic with this many partitions (and the DLQ) if
    /// missing; 0: create no topic.
    pub miss_topic_partitions: i32,
    pub topic_replication: i32,
    pub retina: RetinaClientConfig,
    pub store: StoreArgs,
    pub fill: FillConfig,
    /// Fill rounds in flight at once.
    pub workers: usize,
    pub metrics_listen: SocketAddr,
    pub log_json: bool,
    pub traces: embark_ops::traces::TraceArgs,
}

/// Runs KFC until SIGTERM/SIGINT, or until its reader fails (an error, so
/// its supervisor restarts it).
pub async fn run(config: KfcConfig) -> anyhow::Result<()> {
    let op = Operator::start(config.metrics_listen, config.log_json, &config.traces, "kfc").await?;
    let cql = config.store.cql()?.context("kfc writes to a shared store: pass --store cql://host:port/keyspace")?;
    if config.store.cql_migrate_on_start {
        CqlStore::migrate(&cql).await?;
    }
    let store: Arc<dyn EmbeddingStore> =
        Arc::new(CqlStore::connect(&cql).await.with_context(|| format!("connecting to {}", config.store.store))?);

    let kafka = &config.source;
    if config.miss_topic_partitions > 0 {
        embark_queue::kafka::ensure_topics(
            &kafka.brokers,
            &kafka.properties,
            &[(&kafka.miss_topic, config.miss_topic_partitions), (&kafka.dlq_topic, 1)],
            config.topic_replication,
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("creating topics on {}", kafka.brokers))?;
    }

    // Reading stops first (on the signal); the workers finish their rounds;
    // then the settled offsets are committed and the group is left.
    let read_stop = CancellationToken::new();
    let source = KafkaMissSource::start(config.source.clone(), read_stop.clone())?;
    let retina = Arc::new(RemoteRetina::start(config.retina.clone(), op.stop.clone())?);
    let fill = Arc::new(FillLoop::new(source.clone(), retina, store, config.fill.clone()));
    let worker_stop = CancellationToken::new();
    let spawn_worker = |workers: &mut tokio::task::JoinSet<()>| {
        let fill = fill.clone();
        let stop = worker_stop.clone();
        workers.spawn(async move { fill.run(stop).await });
    };
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.workers.max(1) {
        spawn_worker(&mut workers);
    }
    let reader = source.clone();
    op.ready.add_check("miss topic reader", move || reader.is_reading());
    op.ready.set(true);
    tracing::info!(
        brokers = %kafka.brokers,
        topic = %kafka.miss_topic,
        group = %kafka.group,
        retina = ?config.retina.urls,
        store = %config.store.store,
        workers = workers.len(),
        metrics = %op.addr,
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
            _ = op.shutdown.cancelled() => break,
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
    op.ready.set(false);
    read_stop.cancel();
    worker_stop.cancel();
    while workers.join_next().await.is_some() {}
    source.shutdown().await;
    op.stop().await;
    tracing::info!(unsettled = source.in_flight(), "kfc stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
