//! The engine's options as clap arguments, flattened into both the
//! `retina` binary and `embark up`, so each flag is defined once.

use std::{path::PathBuf, time::Duration};

use clap::Args;
use ipnet::IpNet;

use crate::{EngineConfig, fetch::FetchConfig, preprocess::DecodeLimits};

/// Where the model weights are: one folder per model, as
/// `scripts/setup-models.sh` writes them.
#[derive(Debug, Clone, Args)]
pub struct ModelsDirArg {
    /// Directory with one folder of weights per model (scripts/setup-models.sh).
    #[arg(long, env = "EMBARK_MODELS_DIR", default_value_os_t = default_models_dir())]
    pub models_dir: PathBuf,
}

/// Which catalogue of models: a TOML file, or the shipped one built in.
#[derive(Debug, Clone, Args)]
pub struct CatalogArg {
    /// The model catalogue (models.toml: names, versions, weights,
    /// preprocessing; see docs/models.md). Default: the shipped catalogue.
    #[arg(long, env = "EMBARK_MODELS_CONFIG")]
    pub models_config: Option<PathBuf>,
}

impl CatalogArg {
    /// Reads and checks it (once per process).
    pub fn load(&self) -> Result<&'static crate::catalog::Catalog, crate::catalog::CatalogError> {
        crate::catalog::Catalog::load(self.models_config.as_deref())
    }
}

/// Where `scripts/setup-onnxruntime.sh` puts ONNX Runtime.
pub fn default_onnxruntime_lib() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache/embark/onnxruntime/libonnxruntime.so")
}

/// `~/.cache/embark/models`, where the setup script puts the weights.
pub fn default_models_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".cache/embark/models")
}

#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Most inputs per forward pass.
    #[arg(long, env = "RETINA_MAX_BATCH", default_value_t = EngineConfig::default().max_batch)]
    pub max_batch: usize,
    /// How long a request waits for others to batch with, in milliseconds.
    #[arg(long, env = "RETINA_MAX_WAIT_MS", default_value_t = EngineConfig::default().max_wait.as_millis() as u64)]
    pub max_wait_ms: u64,
    /// Requests queued per model before new ones are refused (UNAVAILABLE).
    #[arg(long, env = "RETINA_QUEUE", default_value_t = EngineConfig::default().queue_capacity)]
    pub queue: usize,
    /// Longest input (text or URL) accepted, in bytes.
    #[arg(long, env = "RETINA_MAX_INPUT_BYTES", default_value_t = EngineConfig::default().max_input_bytes)]
    pub max_input_bytes: usize,
    /// Downloads in flight at once.
    #[arg(long, env = "RETINA_FETCH_CONCURRENCY", default_value_t = EngineConfig::default().fetch_concurrency)]
    pub fetch_concurrency: usize,
    /// Downloads in flight at once from one host.
    #[arg(long, env = "RETINA_FETCH_PER_HOST", default_value_t = EngineConfig::default().fetch_per_host)]
    pub fetch_per_host: usize,
    /// Largest image body downloaded, in bytes (enforced while streaming).
    #[arg(long, env = "RETINA_FETCH_MAX_BYTES", default_value_t = FetchConfig::default().max_bytes)]
    pub fetch_max_bytes: usize,
    /// Connect timeout, in milliseconds.
    #[arg(long, env = "RETINA_FETCH_CONNECT_TIMEOUT_MS", default_value_t = FetchConfig::default().connect_timeout.as_millis() as u64)]
    pub fetch_connect_timeout_ms: u64,
    /// Time to the response headers, in milliseconds.
    #[arg(long, env = "RETINA_FETCH_FIRST_BYTE_TIMEOUT_MS", default_value_t = FetchConfig::default().first_byte_timeout.as_millis() as u64)]
    pub fetch_first_byte_timeout_ms: u64,
    /// Time for the whole download, in milliseconds.
    #[arg(long, env = "RETINA_FETCH_TOTAL_TIMEOUT_MS", default_value_t = FetchConfig::default().total_timeout.as_millis() as u64)]
    pub fetch_total_timeout_ms: u64,
    /// Redirects followed at most.
    #[arg(long, env = "RETINA_FETCH_MAX_REDIRECTS", default_value_t = FetchConfig::default().max_redirects)]
    pub fetch_max_redirects: usize,
    /// Non-public networks image URLs may reach anyway (CIDR, comma-separated,
    /// e.g. 127.0.0.0/8 for a local image server). Empty: public addresses only.
    #[arg(long, env = "RETINA_FETCH_ALLOW_NETS", value_delimiter = ',')]
    pub fetch_allow_nets: Vec<IpNet>,
    /// Ports image URLs may name (comma-separated). A URL whose host is an
    /// address literal in --fetch-allow-nets may use any port.
    #[arg(long, env = "RETINA_FETCH_ALLOW_PORTS", value_delimiter = ',', default_values_t = crate::fetch::DEFAULT_ALLOW_PORTS)]
    pub fetch_allow_ports: Vec<u16>,
    /// Images decoded at once (decoding is CPU work; default: the CPU count).
    #[arg(long, env = "RETINA_DECODE_CONCURRENCY")]
    pub decode_concurrency: Option<usize>,
    /// ONNX Runtime's shared library, for models with `engine = "onnx"`
    /// (scripts/setup-onnxruntime.sh puts it in the cache).
    #[arg(long, env = "EMBARK_ONNXRUNTIME_LIB", default_value_os_t = default_onnxruntime_lib())]
    pub onnxruntime_lib: PathBuf,
    /// Widest and tallest image decoded, in pixels.
    #[arg(long, env = "RETINA_DECODE_MAX_SIDE", default_value_t = DecodeLimits::default().max_width)]
    pub decode_max_side: u32,
    /// Most memory one decode may allocate, in bytes.
    #[arg(long, env = "RETINA_DECODE_MAX_ALLOC", default_value_t = DecodeLimits::default().max_alloc)]
    pub decode_max_alloc: u64,
}

impl EngineArgs {
    pub fn config(&self) -> EngineConfig {
        EngineConfig {
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue_capacity: self.queue,
            max_input_bytes: self.max_input_bytes,
            fetch: FetchConfig {
                connect_timeout: Duration::from_millis(self.fetch_connect_timeout_ms),
                first_byte_timeout: Duration::from_millis(self.fetch_first_byte_timeout_ms),
                total_timeout: Duration::from_millis(self.fetch_total_timeout_ms),
                max_bytes: self.fetch_max_bytes,
                max_redirects: self.fetch_max_redirects,
                allow: self.fetch_allow_nets.clone(),
                allow_ports: self.fetch_allow_ports.clone(),
            },
            fetch_concurrency: self.fetch_concurrency,
            fetch_per_host: self.fetch_per_host,
            decode: DecodeLimits {
                max_width: self.decode_max_side,
                max_height: self.decode_max_side,
                max_alloc: self.decode_max_alloc,
            },
            onnxruntime_lib: self.onnxruntime_lib.clone(),
            decode_concurrency: self
                .decode_concurrency
                .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)),
        }
    }
}
