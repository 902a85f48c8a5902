//! `retina`: the embedding worker as a gRPC server.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use embark_ops::operator::Operator;
use embark_proto::retina::v1::retina_server::RetinaServer;
use retina::{
    Engine,
    config::{CatalogArg, EngineArgs, ModelsDirArg},
    service::RetinaService,
};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Serves `retina.v1.Retina`: embeds batches of inputs with pretrained models.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// gRPC listen address.
    #[arg(long, env = "RETINA_LISTEN", default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// Operator HTTP address: /metrics, /healthz, /readyz.
    #[arg(long, env = "RETINA_METRICS_LISTEN", default_value = "127.0.0.1:9465")]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    tls: embark_ops::tls::TlsServerArgs,
    #[command(flatten)]
    auth: embark_ops::auth::AuthArgs,
    #[command(flatten)]
    models_dir: ModelsDirArg,
    #[command(flatten)]
    catalog: CatalogArg,
    /// Models to load, comma-separated (default: every model of the
    /// catalogue).
    #[arg(long, env = "RETINA_MODELS", value_delimiter = ',')]
    models: Vec<String>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Most inputs in one Embed request.
    #[arg(long, env = "RETINA_MAX_REQUEST_INPUTS", default_value_t = 1024)]
    max_request_inputs: usize,
    /// Log as JSON lines.
    #[arg(long, env = "RETINA_LOG_JSON")]
    log_json: bool,
    #[command(flatten)]
    traces: embark_ops::traces::TraceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let op = Operator::start(args.metrics_listen, args.log_json, &args.traces, "retina").await?;
    let models_dir = args.models_dir.models_dir.clone();
    let config = args.engine.config();
    let catalog = args.catalog.load()?;
    let specs = catalog.select(&args.models).map_err(anyhow::Error::msg)?;
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let engine = tokio::task::spawn_blocking(move || Engine::load(&models_dir, &specs, config))
        .await
        .context("model loading task")??;
    let engine = Arc::new(engine);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    op.ready.follow_in_health(
        health_reporter,
        vec![<RetinaServer<RetinaService> as tonic::server::NamedService>::NAME],
        Duration::from_millis(500),
        op.stop.clone(),
    );
    let (reflection_v1, reflection_v1alpha) = embark_ops::grpc::reflection(embark_proto::RETINA_DESCRIPTOR_SET)?;
    let tls = args.tls.start(&op.stop).context("--tls-cert/--tls-key/--tls-client-ca")?;
    let auth = args
        .auth
        .start(retina::service::access, Duration::from_secs(args.tls.tls_reload_secs), &op.stop)
        .context("--auth-tokens")?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let grpc_addr = listener.local_addr()?;
    let service = RetinaService::new(engine, args.max_request_inputs);
    op.ready.set(true);
    // Retina is warned about only without TLS: it changes no state, and
    // its callers may be named by client certificates or by tokens.
    embark_ops::grpc::warn_if_exposed(grpc_addr, tls.is_some());
    tracing::info!(grpc = %grpc_addr, metrics = %op.addr, models = ?names, catalog = %catalog.source, tls = tls.is_some(), auth = auth.is_some(), "retina serving");
    let limits = embark_ops::grpc::ServerLimits::default();
    // No request is larger than a full batch of the longest inputs, and
    // none carries more fields than a full batch: bounded memory per request.
    let decode_limit =
        args.max_request_inputs.saturating_mul(args.engine.max_input_bytes.saturating_add(4)).saturating_add(64 << 10);
    embark_proto::codec::set_max_fields_per_message(args.max_request_inputs.saturating_add(16));
    let router = embark_ops::grpc::server_builder(&limits, Duration::from_secs(60))
        .layer(tower::util::option_layer(auth))
        .add_optional_service((!args.auth.disable_grpc_health).then_some(health))
        .add_optional_service((!args.auth.disable_reflection).then_some(reflection_v1))
        .add_optional_service((!args.auth.disable_reflection).then_some(reflection_v1alpha))
        .add_service(
            RetinaServer::new(service).max_decoding_message_size(decode_limit).max_encoding_message_size(64 << 20),
        );
    let shutdown = op.shutdown.clone().cancelled_owned();
    match tls {
        Some(tls) => {
            let incoming = embark_ops::tls::tls_incoming(listener, limits.max_connections, tls);
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
        None => {
            let incoming = embark_ops::grpc::incoming(listener, limits.max_connections);
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
    }
    .context("gRPC server")?;
    op.stop().await;
    tracing::info!("retina stopped");
    Ok(())
}
