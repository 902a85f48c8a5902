//! Structured logs through `tracing`.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber: `RUST_LOG` filters (default `info`);
/// `json` switches to one JSON object per line for log shippers. Logs go to
/// stderr, so stdout stays free for command output.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, not in files and pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // A closed stderr (a supervisor or a pipe gone) must not turn a log line
    // into a panic: by default tracing reports a failed write with
    // `eprintln!`, which panics when stderr itself is what failed.
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).log_internal_errors(false);
    // A second init (tests running several servers in one process) is fine.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
