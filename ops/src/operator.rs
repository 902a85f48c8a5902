//! The start-up every server binary shares: logs, the metrics recorder,
//! the signal token, readiness and the operator HTTP port, in that order,
//! and their orderly stop.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;

use crate::http::Readiness;

/// Why the operator side could not start.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("installing the metrics recorder: {0}")]
    Recorder(#[from] metrics_exporter_prometheus::BuildError),
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
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    /// Starts logging (`json` lines or text), installs the Prometheus
    /// recorder, listens for signals and serves `/metrics`, `/healthz` and
    /// `/readyz` on `metrics_listen`. Call once per process, first thing.
    pub async fn start(metrics_listen: SocketAddr, json: bool) -> Result<Self, OperatorError> {
        crate::telemetry::init(json);
        let metrics = crate::http::install_recorder()?;
        let shutdown = crate::shutdown::on_signal();
        crate::shutdown::take_hangups();
        let ready = Readiness::default();
        let stop = CancellationToken::new();
        let (addr, task) = crate::http::serve(metrics_listen, metrics, ready.clone(), stop.clone())
            .await
            .map_err(|source| OperatorError::Bind { addr: metrics_listen, source })?;
        Ok(Self { shutdown, ready, addr, stop, task })
    }

    /// Not ready any more, then stops the background tasks and the
    /// operator port (scrapes until then still see the final metrics).
    pub async fn stop(self) {
        self.ready.set(false);
        self.stop.cancel();
        let _ = self.task.await;
    }
}
