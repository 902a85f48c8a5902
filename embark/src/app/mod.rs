//! The `embark up` and `embark serve` deployments, wired from their flags
//! ([`args`]). `src/main.rs` parses the command line and calls [`run`].
//!
//! What a process runs is decided once, in [`Mode`] and [`Backends::open`]:
//!
//! | command | store | misses go to | filled by |
//! |---|---|---|---|
//! | `up` | embedded, or CQL | the local durable queue | this process (in-process Retina) |
//! | `serve` | embedded, or CQL | the local durable queue | a later `embark up` on the same file |
//! | `serve --kafka-brokers` | CQL (or embedded) | the Kafka miss topic | `kfc` |
//!
//! The redb file is opened when the store is embedded or the misses stay
//! local, and only then.

pub mod args;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use embark_ops::{grpc::ServerLimits, http::Readiness, operator::Operator};
use embark_proto::embark::v1::emb_ark_server::EmbArkServer;
use embark_queue::{
    MissPublisher,
    kafka::{KafkaInvalidations, KafkaMissPublisher, KafkaPublisherConfig, invalidations::replica_id},
    local::{LocalMissQueue, PendingMisses},
};
use embark_store::{EmbeddingStore, cql::CqlStore};
use kfc::{FillConfig, FillLoop, InProcessRetina};
use retina::{Engine, ModelSpec};
use tokio_util::sync::CancellationToken;

pub use self::args::{FillArgs, FrontArgs, SimilarArgs};
use crate::{
    cache::{MissDedup, VectorCache, key_hash},
    front::{Front, Limits},
    models::ModelRegistry,
    service::EmbArkService,
    similar::{IndexingStore, SimilarIndexes},
    store_guard::{GuardConfig, GuardedStore},
};

/// What this process runs besides the front.
#[derive(Debug)]
pub enum Mode {
    /// `embark up`: the fill loop and Retina's engine in this process,
    /// draining the local durable queue.
    Up(Box<FillArgs>),
    /// `embark serve`: the front alone.
    Serve,
}

/// Where this process's misses go, decided with the store.
enum MissRoute {
    /// The durable queue in the redb file.
    Local(PendingMisses),
    /// The Kafka miss topic on these brokers.
    Kafka(String),
}

/// The store and the miss route of this process, opened once.
struct Backends {
    store: Arc<dyn EmbeddingStore>,
    misses: MissRoute,
}

impl Backends {
    /// Opens the store and the miss route the flags name: every
    /// combination is one arm, so none is implied.
    async fn open(args: &FrontArgs, mode: &Mode) -> anyhow::Result<Self> {
        let kafka = match (mode, &args.kafka_brokers) {
            (Mode::Up(_), Some(_)) => {
                anyhow::bail!(
                    "`embark up` fills its own misses; --kafka-brokers is for `embark serve` with a separate kfc"
                )
            }
            (_, brokers) => brokers.clone(),
        };
        let cql = match args.store.cql()? {
            Some(cfg) => {
                if args.store.cql_migrate_on_start {
                    CqlStore::migrate(&cfg).await?;
                }
                Some(Arc::new(CqlStore::connect(&cfg).await?) as Arc<dyn EmbeddingStore>)
            }
            None => None,
        };
        let local = |file: &embark_store::embedded::EmbeddedStore| -> anyhow::Result<MissRoute> {
            Ok(MissRoute::Local(PendingMisses::open(file.database()).context("opening the durable miss queue")?))
        };
        Ok(match (cql, kafka) {
            (Some(store), Some(brokers)) => Self { store, misses: MissRoute::Kafka(brokers) },
            (Some(store), None) => Self { store, misses: local(&args.embedded.open()?)? },
            (None, Some(brokers)) => Self { store: Arc::new(args.embedded.open()?), misses: MissRoute::Kafka(brokers) },
            (None, None) => {
                let file = args.embedded.open()?;
                Self { misses: local(&file)?, store: Arc::new(file) }
            }
        })
    }
}

/// Where this process's misses go, once started.
enum Misses {
    /// The durable queue in the redb file, and the task writing it.
    Local(Arc<LocalMissQueue>, tokio::task::JoinHandle<()>),
    Kafka(Arc<KafkaMissPublisher>),
}

impl Misses {
    /// Starts the route's publisher: the local queue's flusher, or the Kafka
    /// producer (whose undelivered misses leave `dedup`, so the next Lookup
    /// publishes them again).
    async fn start(
        route: MissRoute,
        args: &FrontArgs,
        properties: &[(String, String)],
        dedup: &MissDedup,
    ) -> anyhow::Result<Self> {
        Ok(match route {
            MissRoute::Local(pending) => {
                let queue = LocalMissQueue::new(pending, args.miss_buffer, args.max_queued_misses);
                let flusher = queue.spawn_flusher();
                Misses::Local(queue, flusher)
            }
            MissRoute::Kafka(brokers) => {
                // Best effort: KFC creates the miss topic too, and a broker
                // that is down now must not keep EmbArk from serving.
                let mut topics = vec![(args.invalidation_topic.as_str(), 1)];
                if args.miss_topic_partitions > 0 {
                    topics.push((args.miss_topic.as_str(), args.miss_topic_partitions));
                }
                let created = embark_queue::kafka::ensure_topics(
                    &brokers,
                    properties,
                    &topics,
                    args.topic_replication,
                    Duration::from_secs(5),
                );
                if let Err(e) = created.await {
                    tracing::warn!(error = %e, ?topics, "cannot make sure the topics exist");
                }
                let dedup = dedup.clone();
                let config = KafkaPublisherConfig {
                    brokers,
                    topic: args.miss_topic.clone(),
                    buffer: args.miss_buffer,
                    message_timeout: Duration::from_millis(args.kafka_message_timeout_ms),
                    properties: properties.to_vec(),
                };
                let forget = Box::new(move |model: &str, key: &str| dedup.forget(&key_hash(model, key)));
                Misses::Kafka(Arc::new(KafkaMissPublisher::new(&config, forget)?))
            }
        })
    }

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

/// The served models, from the catalogue: loaded into Retina's engine for
/// `up`; for `serve`, only their specs (dim, kind, version).
async fn load_models(args: &FrontArgs, mode: &Mode) -> anyhow::Result<(Option<Arc<Engine>>, Vec<&'static ModelSpec>)> {
    let catalog = args.catalog.load()?;
    let specs = catalog.select(&args.models).map_err(anyhow::Error::msg)?;
    match mode {
        Mode::Up(fill) => {
            let dir = fill.models_dir.models_dir.clone();
            let config = fill.engine.config();
            let load = specs.clone();
            let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(&dir, &load, config)).await??);
            Ok((Some(engine), specs))
        }
        Mode::Serve => Ok((None, specs)),
    }
}

/// Runs `embark up` or `embark serve` until SIGTERM/SIGINT.
pub async fn run(args: FrontArgs, mode: Mode) -> anyhow::Result<()> {
    let op = Operator::start(args.metrics_listen, args.log_json, &args.traces, "embark").await?;
    let backends = Backends::open(&args, &mode).await?;
    let (engine, specs) = load_models(&args, &mode).await?;
    let mut registry = ModelRegistry::new(&specs, &args.oov)?;
    registry.set_tier_types(&args.tier_type)?;

    // Similarity indexes: loaded from the store in the background; every
    // write and delete of this process goes through `IndexingStore`.
    // One per served version (its namespace), as each has its own vectors.
    let indexes = SimilarIndexes::new(
        &specs.iter().map(|s| (embark_store::namespace(&s.name, &s.version), s.dim)).collect::<Vec<_>>(),
        &args.similar.config(),
    );
    indexes.spawn_load(backends.store.clone(), op.stop.clone());
    if matches!(mode, Mode::Serve) && args.similar.similar_refresh_secs > 0 {
        let every = Duration::from_secs(args.similar.similar_refresh_secs);
        indexes.spawn_refresh(backends.store.clone(), every, op.stop.clone());
    }
    let store: Arc<dyn EmbeddingStore> = Arc::new(IndexingStore::new(backends.store, indexes.clone()));

    let dedup = MissDedup::new(Duration::from_secs(args.dedup_window_secs), args.dedup_max_keys);
    let properties = embark_queue::kafka::client_properties(&args.kafka_security, &args.kafka_property)?;
    let mut misses = Misses::start(backends.misses, &args, &properties, &dedup).await?;
    let failure_ttl = Duration::from_secs(args.failure_ttl_secs);
    let tier = VectorCache::new(args.cache_bytes, args.cache_ttl_secs.map(Duration::from_secs));
    let guard = GuardConfig {
        deadline: Duration::from_millis(args.store_deadline_ms),
        failure_threshold: args.store_breaker_failures.max(1),
        cool_down: Duration::from_millis(args.store_breaker_cool_down_ms),
    };
    let limits = Limits { max_batch_keys: args.max_batch_keys, max_key_bytes: args.max_key_bytes };
    let front = Front::new(
        registry,
        tier.clone(),
        GuardedStore::new(store.clone(), guard),
        misses.publisher(),
        dedup,
        limits,
        failure_ttl,
    )
    .with_similar(indexes, args.similar.similar_max_k.max(1));
    // The promoted versions are in force before the first Lookup.
    crate::versions::follow_once(&front, &*store, false).await;
    let front = follow_other_replicas(front, &args, &properties, &op)?;
    crate::versions::spawn(
        front.clone(),
        store.clone(),
        Duration::from_secs(args.version_refresh_secs),
        Duration::from_secs(args.coverage_refresh_secs),
        op.stop.clone(),
    );
    if args.console {
        op.routes.mount(crate::console::router(front.clone())).map_err(|_| anyhow::anyhow!("console mounted twice"))?;
        tracing::info!(console = %format!("http://{}/console", op.addr), "web console serving");
        if !op.addr.ip().is_loopback() {
            // The console searches stored keys with no login of its own.
            tracing::warn!(
                addr = %op.addr,
                "the web console listens beyond loopback with no authentication: keep --metrics-listen on the \
                 internal network, or --console false (docs/security.md)"
            );
        }
    }

    // The fill loop stops on its own token, after the front has stopped
    // and the last misses were flushed.
    let fill_stop = CancellationToken::new();
    let fill_task = match (&mode, &engine, &misses) {
        (Mode::Up(f), Some(engine), Misses::Local(queue, _)) => {
            let config = FillConfig {
                max_batch: f.fill_batch,
                embed_batch: f.engine.max_batch,
                failure_ttl,
                max_attempts: f.fill_max_attempts,
                ..FillConfig::default()
            };
            let embedder = Arc::new(InProcessRetina::new(engine.clone()));
            let fill_loop = FillLoop::new(queue.clone(), embedder, store.clone(), config);
            let stop = fill_stop.clone();
            Some(tokio::spawn(async move { fill_loop.run(stop).await }))
        }
        _ => None,
    };

    spawn_tier_gauges(tier, op.stop.clone());
    // Readiness follows what this process can do: with the store breaker
    // open, every key not in the tier answers OOV_UNAVAILABLE, so traffic
    // is better sent to another replica. (A Kafka outage does not count:
    // Lookups are answered in full, and misses are published again later.)
    let breaker = front.clone();
    op.ready.add_check("store breaker closed", move || !breaker.store_breaker_open());
    if let Some(model) = front.models().names().first() {
        front.store_guard().spawn_prober(model.to_string(), op.stop.clone());
    }
    tracing::info!(
        models = ?front.models().names(),
        data_dir = %args.embedded.data_dir.display(),
        pending_misses = misses.depth(),
        misses = misses.name(),
        mode = if fill_task.is_some() { "up" } else { "serve" },
        store = %args.store.store,
        "embark starting"
    );
    serve_grpc(&args, front, &op.ready, &op.shutdown, &op.stop).await?;

    // In-flight Lookups are done. Keep every miss: flush the buffer into the
    // durable queue, then let the fill loop finish its round.
    op.ready.set(false);
    misses.close().await;
    fill_stop.cancel();
    if let Some(t) = fill_task {
        let _ = t.await;
    }
    op.stop().await;
    tracing::info!(pending_misses = misses.depth(), "embark stopped");
    Ok(())
}

/// With Kafka, every Invalidate is published for the other replicas, and
/// theirs are applied here; readiness waits until this replica follows.
fn follow_other_replicas(
    front: Front,
    args: &FrontArgs,
    properties: &[(String, String)],
    op: &Operator,
) -> anyhow::Result<Arc<Front>> {
    let Some(brokers) = &args.kafka_brokers else {
        return Ok(Arc::new(front));
    };
    let replica = replica_id();
    let broadcast = Arc::new(KafkaInvalidations::new(brokers, &args.invalidation_topic, &replica, properties)?);
    let front = Arc::new(front.with_broadcast(broadcast));
    let following = crate::invalidation::spawn_listener(
        brokers,
        &args.invalidation_topic,
        &replica,
        properties,
        front.clone(),
        op.stop.clone(),
    )?;
    op.ready.add_check("following other replicas' invalidations", move || following.get());
    Ok(front)
}

/// Tier gauges, refreshed off the Lookup path.
fn spawn_tier_gauges(tier: VectorCache, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    metrics::gauge!("embark_cache_bytes").set(tier.weighted_size() as f64);
                    metrics::gauge!("embark_cache_entries").set(tier.entry_count() as f64);
                }
            }
        }
    });
}

/// Serves `embark.v1.EmbArk`, health and reflection on TCP (and a Unix
/// socket if asked) until `shutdown`; gRPC health follows `ready`.
async fn serve_grpc(
    args: &FrontArgs,
    front: Arc<Front>,
    ready: &Readiness,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    ready.follow_in_health(
        health_reporter,
        vec![<EmbArkServer<EmbArkService> as tonic::server::NamedService>::NAME],
        Duration::from_millis(500),
        stop.clone(),
    );
    let (reflection_v1, reflection_v1alpha) = embark_ops::grpc::reflection(embark_proto::EMBARK_DESCRIPTOR_SET)?;
    let tls = args.tls.start(stop).context("--tls-cert/--tls-key/--tls-client-ca")?;
    let auth = args
        .auth
        .start(crate::service::access, Duration::from_secs(args.tls.tls_reload_secs), stop)
        .context("--auth-tokens")?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let grpc_addr = listener.local_addr()?;
    // Anyone who reaches a port beyond loopback may call everything
    // unless the channel is encrypted and callers are named.
    embark_ops::grpc::warn_if_exposed(grpc_addr, tls.is_some() && auth.is_some());
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
    tracing::info!(grpc = %grpc_addr, uds = ?args.uds, tls = tls.is_some(), auth = auth.is_some(), "embark serving");
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
    let invalidate_limit = crate::service::InvalidateLimit::new(args.invalidate_keys_per_second, args.max_batch_keys);
    let service = EmbArkService::new(front, invalidate_limit);
    let rest = match args.rest_listen {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding --rest-listen {addr}"))?;
            let local = listener.local_addr()?;
            embark_ops::grpc::warn_if_exposed(local, tls.is_some() && auth.is_some());
            tracing::info!(rest = %local, "REST serving");
            // JSON spends up to 6 bytes on a key byte (\u escapes).
            let max_body = decode_limit.saturating_mul(6);
            let router = crate::rest::router(service.clone(), auth.as_ref(), max_body, limits.max_in_flight);
            Some((listener, local, router, tls.clone()))
        }
        None => None,
    };
    let router = embark_ops::grpc::server_builder(&limits, Duration::from_secs(30))
        .layer(tower::util::option_layer(auth))
        .add_optional_service((!args.auth.disable_grpc_health).then_some(health))
        .add_optional_service((!args.auth.disable_reflection).then_some(reflection_v1))
        .add_optional_service((!args.auth.disable_reflection).then_some(reflection_v1alpha))
        .add_service(
            EmbArkServer::new(service).max_decoding_message_size(decode_limit).max_encoding_message_size(256 << 20),
        );
    let tcp = async {
        let shutdown = shutdown.clone().cancelled_owned();
        match tls {
            Some(tls) => {
                let incoming = embark_ops::tls::tls_incoming(listener, limits.max_connections, tls);
                router.clone().serve_with_incoming_shutdown(incoming, shutdown).await
            }
            None => {
                let incoming = embark_ops::grpc::incoming(listener, limits.max_connections);
                router.clone().serve_with_incoming_shutdown(incoming, shutdown).await
            }
        }
    };
    // The socket is local: file permissions guard it, not TLS; the auth
    // layer applies to it as to TCP.
    let unix = async {
        match uds {
            Some(l) => {
                router
                    .clone()
                    .serve_with_incoming_shutdown(
                        embark_ops::grpc::incoming(l, limits.max_connections),
                        shutdown.clone().cancelled_owned(),
                    )
                    .await
            }
            None => Ok(()),
        }
    };
    let rest = async {
        let Some((listener, local, router, tls)) = rest else { return Ok(()) };
        let shutdown = shutdown.clone();
        match tls {
            Some(tls) => {
                let incoming = embark_ops::tls::tls_incoming(listener, limits.max_connections, tls);
                crate::rest::serve(incoming, local, router, shutdown).await
            }
            None => {
                let incoming = embark_ops::grpc::incoming(listener, limits.max_connections);
                crate::rest::serve(incoming, local, router, shutdown).await
            }
        }
    };
    let served = tokio::try_join!(
        async { tcp.await.context("gRPC server") },
        async { unix.await.context("gRPC server on the Unix socket") },
        async { rest.await.context("REST server") },
    );
    if let Some(path) = &args.uds {
        let _ = std::fs::remove_file(path);
    }
    served.map(|_| ())
}
