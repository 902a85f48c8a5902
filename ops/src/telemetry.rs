//! Structured logs through `tracing`, and (when asked) its spans exported
//! as OpenTelemetry traces ([`crate::traces`]).

use tracing_subscriber::{
    EnvFilter, Layer as _, filter::LevelFilter, fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

use crate::traces::{TraceArgs, TraceError, Traces};

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default
/// `info`), as text or, with `json`, one JSON object per line for log
/// shippers, on stderr so stdout stays free for command output. Without
/// an OTLP endpoint in `traces`, that is all.
pub fn init(json: bool) {
    // Without an endpoint nothing can fail.
    let _ = init_with_traces(json, &TraceArgs::default(), "embark");
}

/// [`init`], plus the spans of `info` and above exported over OTLP as
/// service `service` when `traces` names an endpoint (call in a Tokio
/// runtime). The log filter does not apply to the spans: `RUST_LOG=warn`
/// quietens the logs, not the traces.
pub fn init_with_traces(json: bool, traces: &TraceArgs, service: &'static str) -> Result<Traces, TraceError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, not in files and pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A closed stderr (a supervisor or a pipe gone) must not turn a log line
    // into a panic: by default tracing reports a failed write with
    // `eprintln!`, which panics when stderr itself is what failed.
    let (spans, handle) = crate::traces::layer(traces, service)?;
    // A second init (tests running several servers in one process) is fine.
    let Some(spans) = spans else {
        // No traces: one global filter, the plain subscriber (no per-layer
        // filtering state on librdkafka's threads, whose logs come here).
        let builder =
            fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).log_internal_errors(false);
        let _ = if json { builder.json().try_init() } else { builder.try_init() };
        return Ok(handle);
    };
    let logs = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).log_internal_errors(false);
    let logs = if json { logs.json().boxed() } else { logs.boxed() };
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans.with_filter(LevelFilter::INFO))
        .try_init();
    Ok(handle)
}
