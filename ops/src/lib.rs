//! Operations scaffolding shared by the `embark`, `retina` and `kfc`
//! binaries, so each serves logs, metrics, probes and shutdown the same way.
//!
//! - [`telemetry`]: `tracing` subscriber (text or JSON, `RUST_LOG` filter).
//! - [`traces`]: spans exported over OTLP (`--otlp-endpoint`), and the W3C
//!   trace context carried in gRPC metadata, Kafka headers and queued misses.
//! - [`http`]: the operator port: Prometheus `/metrics`, `/healthz`, `/readyz`.
//! - [`budget`]: a memory budget for request bodies across connections (a tower layer).
//! - [`grpc`]: what every gRPC server adds: health service, reflection, transport tuning.
//! - [`tls`]: TLS for servers (rotated files, handshakes off the accept loop) and clients.
//! - [`auth`]: principals (bearer tokens, client certificates), roles per
//!   method, and the layer that refuses a call before a service sees it.
//! - [`reload`]: configuration files swapped in place on change or SIGHUP.
//! - [`shutdown`]: SIGTERM/SIGINT -> a `CancellationToken` every task watches.
//! - [`operator`]: [`operator::Operator`], all of the above started in one
//!   call, the same way by every binary, and stopped in one call.

pub mod auth;
pub mod budget;
pub mod grpc;
pub mod http;
pub mod operator;
pub mod reload;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod traces;
