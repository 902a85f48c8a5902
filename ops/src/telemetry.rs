//! Structured logs through `tracing`.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber: `RUST_LOG` filters (default `info`);
/// `json` switches to one JSON object per line for log shippers. Logs go to
/// stderr, so stdout stays free for command output.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only for a person at a terminal, not in files and pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second init (tests running several servers in one process) is fine.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}
