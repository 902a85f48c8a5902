//! The start-up every server binary shares: logs, the metrics recorder,
//! the signal token, readiness and the operator HTTP port, in that order,
//! and their orderly stop.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::http::{MountedRoutes, Readiness};

/// Why the operator side could not start.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("installing the metrics recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
    #[error("starting the trace exporter: {0}")]
    Traces(#[from] crate::traces::TraceError),
    #[error("binding the metrics port {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running operator side: what a server binary watches and reports to.
#[derive(Debug)]
pub struct Operator {
    /// Cancelled on SIGTERM or SIGINT: stop accepting, finish what is in flight.
    pub shutdown: CancellationToken,
    /// What `/readyz` and gRPC health report.
    pub ready: Readiness,
    /// The bound operator port (useful with port 0).
    pub addr: SocketAddr,
    /// Cancelled by [`Operator::stop`], after the binary's own work has
    /// stopped: background tasks (gauges, probers, index loads) watch it.
    pub stop: CancellationToken,
    /// Routes the binary serves on the operator port beside `/metrics`.
    pub routes: MountedRoutes,
    traces: crate::traces::Traces,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    /// Starts logging (`json` lines or text) and, if `traces` names an
    /// endpoint, span export as `service`; installs the Prometheus
    /// recorder, listens for signals and serves `/metrics`, `/healthz` and
    /// `/readyz` on `metrics_listen`. Call once per process, first thing.
    pub async fn start(
        metrics_listen: SocketAddr,
        json: bool,
        traces: &crate::traces::TraceArgs,
        service: &'static str,
    ) -> Result<Self, OperatorError> {
        let traces = crate::telemetry::init_with_traces(json, traces, service)?;
        let metrics = crate::http::install_recorder()?;
        let shutdown = crate::shutdown::on_signal();
        crate::shutdown::take_hangups();
        let ready = Readiness::default();
        let stop = CancellationToken::new();
        let routes = MountedRoutes::default();
        let (addr, task) = crate::http::serve(metrics_listen, metrics, ready.clone(), routes.clone(), stop.clone())
            .await
            .map_err(|source| OperatorError::Bind { addr: metrics_listen, source })?;
        if traces.enabled() {
            tracing::info!(service, "exporting spans over OTLP");
        }
        Ok(Self { shutdown, ready, addr, stop, routes, traces, task })
    }

    /// Not ready any more, then stops the background tasks and the
    /// operator port (scrapes until then still see the final metrics),
    /// and exports the last spans.
    pub async fn stop(self) {
        self.ready.set(false);
        self.stop.cancel();
        let _ = self.task.await;
        let traces = self.traces;
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
}
