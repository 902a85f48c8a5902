//! The operator HTTP port: Prometheus text on `/metrics`, liveness on
//! `/healthz`, readiness on `/readyz`.
//!
//! The exporter only records; this module serves it from a listener the
//! binary binds itself, so the bound address is known and the server stops
//! with the rest of the process.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Latency buckets (seconds) for every `*_seconds` histogram: fine below a
/// millisecond for Lookup, up to minutes for the miss-to-fill path.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
];

/// Installs the global Prometheus recorder. Call once per process, before
/// any metric is recorded.
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_size".into()), &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])?
        .install_recorder()
}

/// A named condition readiness depends on (the store breaker closed, the
/// Kafka reader alive, ...), evaluated on every probe.
type Check = (&'static str, Arc<dyn Fn() -> bool + Send + Sync>);

/// Whether the process is ready for traffic: started (models loaded,
/// listeners up; [`Readiness::set`]) and every registered check passing,
/// so `/readyz` and gRPC health follow what the process can do now.
#[derive(Clone, Default)]
pub struct Readiness {
    started: Arc<AtomicBool>,
    checks: Arc<std::sync::RwLock<Vec<Check>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").field("started", &self.started).field("failing", &self.failing()).finish()
    }
}

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.started.store(ready, Ordering::Release);
    }

    /// Adds a condition: while `ok` returns false the process is not ready,
    /// and `/readyz` names it.
    pub fn add_check(&self, name: &'static str, ok: impl Fn() -> bool + Send + Sync + 'static) {
        self.checks.write().unwrap_or_else(|p| p.into_inner()).push((name, Arc::new(ok)));
    }

    /// The names of the conditions not met now (`started` first).
    pub fn failing(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if !self.started.load(Ordering::Acquire) {
            out.push("starting or stopping");
        }
        let checks = self.checks.read().unwrap_or_else(|p| p.into_inner());
        out.extend(checks.iter().filter(|(_, ok)| !ok()).map(|(name, _)| *name));
        out
    }

    pub fn get(&self) -> bool {
        self.failing().is_empty()
    }

    /// Keeps the gRPC health service's overall status (`""`) and `services`
    /// in step with readiness, checked every `every`, until `stop`.
    pub fn follow_in_health(
        &self,
        reporter: tonic_health::server::HealthReporter,
        services: Vec<&'static str>,
        every: std::time::Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let failing = this.failing();
                let ready = failing.is_empty();
                if last == Some(ready) {
                    continue;
                }
                last = Some(ready);
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tracing::warn!(?failing, "not ready");
                    tonic_health::ServingStatus::NotServing
                };
                for name in std::iter::once("").chain(services.iter().copied()) {
                    reporter.set_service_status(name, status).await;
                }
            }
        })
    }
}

#[derive(Clone)]
struct OpsState {
    metrics: PrometheusHandle,
    ready: Readiness,
    mounted: MountedRoutes,
}

/// Routes a binary adds to the operator port once it has what they serve
/// (e.g. `embark`'s `/console`, which needs the loaded models): the port
/// itself is up first, so `/metrics` and `/healthz` answer during start-up.
/// Set once; until then every other path is `404`.
#[derive(Clone, Debug, Default)]
pub struct MountedRoutes(Arc<std::sync::OnceLock<Router>>);

impl MountedRoutes {
    /// Adds `router` (whose paths must not be the operator's own). A second
    /// call is refused: the routes of one process are mounted once.
    pub fn mount(&self, router: Router) -> Result<(), Router> {
        self.0.set(router)
    }

    async fn call(self, request: axum::extract::Request) -> axum::response::Response {
        use axum::response::IntoResponse;
        match self.0.get() {
            Some(router) => {
                // A Router's error type is Infallible.
                match tower::ServiceExt::oneshot(router.clone(), request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
            None => StatusCode::NOT_FOUND.into_response(),
        }
    }
}

/// Binds `addr` and serves the operator endpoints until `shutdown` fires.
/// Returns the bound address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    ready: Readiness,
    mounted: MountedRoutes,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    // The exporter folds histogram samples on each render; upkeep keeps
    // memory bounded when nobody scrapes.
    let upkeep = metrics.clone();
    let upkeep_stop = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => break,
                _ = tick.tick() => upkeep.run_upkeep(),
            }
        }
    });
    let app = Router::new()
        .route("/metrics", get(|State(s): State<OpsState>| async move { s.metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<OpsState>| async move {
                let failing = s.ready.failing();
                if failing.is_empty() {
                    (StatusCode::OK, "ready".to_owned())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}", failing.join(", ")))
                }
            }),
        )
        .fallback(|State(s): State<OpsState>, request: axum::extract::Request| s.mounted.call(request))
        .with_state(OpsState { metrics, ready, mounted });
    let task = tokio::spawn(async move {
        let result = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = result {
            tracing::error!(error = %e, "operator HTTP server failed");
        }
    });
    Ok((bound, task))
}
