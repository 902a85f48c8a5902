//! The inference engine: one thread per loaded model, fed by a bounded
//! queue, batching requests that arrive together.
//!
//! Why threads and not `spawn_blocking`: a model holds its weights once and
//! runs one batch at a time at full speed (candle parallelises inside a
//! batch); a dedicated thread per model makes batching natural and keeps
//! inference off the async runtime. The queue is bounded, so overload is
//! refused at once ([`EngineError::Overloaded`]) instead of growing memory.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel},
    time::{Duration, Instant},
};
use tracing::Instrument as _;

use embark_proto::retina::v1::FailureCode;
use std::sync::Arc;
use tokio::sync::{Semaphore, oneshot};

use crate::{
    catalog::{Architecture, EngineKind, ModelKind, ModelSpec},
    fetch::{FetchConfig, FetchError, Fetcher},
    image_model::EfficientNetLite0,
    preprocess::{self, DecodeError, DecodeLimits},
    text::{BertEncoder, BertFiles},
};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most inputs per forward pass.
    pub max_batch: usize,
    /// How long the first request of a batch waits for company.
    pub max_wait: Duration,
    /// Requests queued per model before new ones are refused.
    pub queue_capacity: usize,
    /// Inputs longer than this (bytes) are refused as INVALID_INPUT.
    pub max_input_bytes: usize,
    /// How image URLs are downloaded.
    pub fetch: FetchConfig,
    /// Downloads in flight at once (all image models together).
    pub fetch_concurrency: usize,
    /// Downloads in flight at once from one host: a slow host (or a
    /// trickle of URLs on an attacker's host) holds at most this many of
    /// the `fetch_concurrency` slots.
    pub fetch_per_host: usize,
    pub decode: DecodeLimits,
    /// Images decoded at once (CPU work on the blocking pool).
    pub decode_concurrency: usize,
    /// ONNX Runtime's shared library (models with `engine = "onnx"`).
    pub onnxruntime_lib: std::path::PathBuf,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_wait: Duration::from_millis(2),
            queue_capacity: 1024,
            max_input_bytes: 64 * 1024,
            fetch: FetchConfig::default(),
            fetch_concurrency: 32,
            fetch_per_host: 8,
            decode: DecodeLimits::default(),
            decode_concurrency: 2,
            onnxruntime_lib: crate::config::default_onnxruntime_lib(),
        }
    }
}

/// Why one input could not be embedded.
#[derive(Debug, Clone, PartialEq)]
pub struct InputFailure {
    pub code: FailureCode,
    pub reason: String,
    /// Retrying later may succeed.
    pub transient: bool,
}

pub type InputResult = Result<Vec<f32>, InputFailure>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown model {name:?}; this Retina serves {available:?}")]
    UnknownModel { name: String, available: Vec<String> },
    #[error("model {0:?} is overloaded: its queue is full; retry later")]
    Overloaded(String),
    #[error("model {0:?} has stopped")]
    Stopped(String),
    #[error(
        "model {name:?}: file {path} is missing; install its weights (scripts/setup-models.sh for the shipped models) or point --models-dir at them"
    )]
    MissingFile { name: String, path: String },
    #[error("loading model {name:?}: {reason}")]
    Load { name: String, reason: String },
}

/// An input ready for its model: a text, or an image's preprocessed pixels.
enum Prepared {
    Text(String),
    /// `crop x crop x 3` values in the entry's layout, normalised.
    Pixels(Vec<f32>),
}

struct Job {
    inputs: Vec<Prepared>,
    reply: oneshot::Sender<Vec<Result<Vec<f32>, InputFailure>>>,
    /// The caller's span: a batch's `retina.infer` span is the child of
    /// its first job's and follows from the others'.
    span: tracing::Span,
}

struct Worker {
    spec: &'static ModelSpec,
    queue: SyncSender<Job>,
}

/// The loaded models. Dropping the engine stops its threads once their
/// queues drain.
pub struct Engine {
    /// By (name, version): each loaded version of a model has its own
    /// thread and queue.
    workers: BTreeMap<(&'static str, &'static str), Worker>,
    fetcher: Fetcher,
    fetch_slots: Arc<Semaphore>,
    host_slots: HostSlots,
    decode_slots: Arc<Semaphore>,
    config: EngineConfig,
}

/// Download slots per host, created on first use and dropped when idle,
/// so the map holds only hosts with downloads in flight.
#[derive(Debug, Default)]
struct HostSlots {
    per_host: usize,
    hosts: std::sync::Mutex<std::collections::HashMap<String, Arc<Semaphore>>>,
}

/// A held per-host slot; the host's entry goes when its last slot does.
struct HostSlot<'a> {
    slots: &'a HostSlots,
    host: String,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl HostSlots {
    async fn acquire(&self, host: &str) -> Option<HostSlot<'_>> {
        let semaphore = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.entry(host.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(self.per_host.max(1)))).clone()
        };
        let permit = semaphore.acquire_owned().await.ok()?;
        Some(HostSlot { slots: self, host: host.to_owned(), permit: Some(permit) })
    }
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut hosts = self.slots.hosts.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it, and every slot is free: the host is idle.
        if let Some(s) = hosts.get(&self.host)
            && Arc::strong_count(s) == 1
            && s.available_permits() == self.slots.per_host.max(1)
        {
            hosts.remove(&self.host);
        }
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("models", &self.workers.keys().collect::<Vec<_>>()).finish()
    }
}

/// What a model thread runs: a batch of valid inputs in, vectors out.
trait BatchModel: Send + 'static {
    fn embed_batch(&mut self, inputs: &[&Prepared]) -> Result<Vec<Vec<f32>>, String>;
}

/// A text model's batch: the texts, or an error if it was given pixels.
fn texts<'a>(inputs: &[&'a Prepared]) -> Result<Vec<&'a str>, String> {
    inputs
        .iter()
        .map(|p| match p {
            Prepared::Text(t) => Ok(t.as_str()),
            Prepared::Pixels(_) => Err("a text model was given pixels".to_string()),
        })
        .collect()
}

/// An image model's batch: the images' values, concatenated.
fn pixels(inputs: &[&Prepared]) -> Result<Vec<f32>, String> {
    let mut out =
        Vec::with_capacity(inputs.iter().map(|p| if let Prepared::Pixels(px) = p { px.len() } else { 0 }).sum());
    for p in inputs {
        match p {
            Prepared::Pixels(px) => out.extend_from_slice(px),
            Prepared::Text(_) => return Err("an image model was given text".into()),
        }
    }
    Ok(out)
}

impl BatchModel for BertEncoder {
    fn embed_batch(&mut self, inputs: &[&Prepared]) -> Result<Vec<Vec<f32>>, String> {
        self.embed(&texts(inputs)?).map_err(|e| e.to_string())
    }
}

/// EfficientNet-Lite0 at the side its catalogue entry crops to.
struct ImageEncoder {
    net: EfficientNetLite0,
    side: usize,
}

impl BatchModel for crate::onnx::OnnxTextEncoder {
    fn embed_batch(&mut self, inputs: &[&Prepared]) -> Result<Vec<Vec<f32>>, String> {
        self.embed(&texts(inputs)?).map_err(|e| e.to_string())
    }
}

impl BatchModel for crate::onnx::OnnxImageEncoder {
    fn embed_batch(&mut self, inputs: &[&Prepared]) -> Result<Vec<Vec<f32>>, String> {
        self.embed(pixels(inputs)?, inputs.len()).map_err(|e| e.to_string())
    }
}

impl BatchModel for ImageEncoder {
    fn embed_batch(&mut self, inputs: &[&Prepared]) -> Result<Vec<Vec<f32>>, String> {
        let pooled = self.net.embed(&pixels(inputs)?, inputs.len(), self.side).map_err(|e| e.to_string())?;
        pooled.to_vec2::<f32>().map_err(|e| e.to_string())
    }
}

fn failure(code: FailureCode, reason: impl Into<String>, transient: bool) -> InputFailure {
    InputFailure { code, reason: reason.into(), transient }
}

fn fetch_failure(e: FetchError) -> InputFailure {
    let transient = e.is_transient();
    let code = match &e {
        FetchError::BadUrl(_) => FailureCode::InvalidInput,
        FetchError::Blocked(_) => FailureCode::BlockedAddress,
        FetchError::NotFound { .. } | FetchError::UnknownHost(_) => FailureCode::NotFound,
        FetchError::ClientError { .. } => FailureCode::HttpError,
        FetchError::ServerError { .. } | FetchError::Unreachable(_) => FailureCode::Unavailable,
        FetchError::TooLarge { .. } => FailureCode::TooLarge,
        FetchError::TooManyRedirects(_) => FailureCode::TooManyRedirects,
        FetchError::Timeout(_) => FailureCode::Timeout,
    };
    failure(code, e.to_string(), transient)
}

fn decode_failure(e: DecodeError) -> InputFailure {
    let code = match &e {
        DecodeError::NotAnImage(_) => FailureCode::NotAnImage,
        DecodeError::TooLarge(_) => FailureCode::ImageTooLarge,
        DecodeError::Undecodable(_) => FailureCode::Undecodable,
    };
    failure(code, e.to_string(), false)
}

/// Reads `spec`'s files (checked against the catalogue's digests) and
/// builds its network.
fn load_model(
    models_dir: &Path,
    spec: &'static ModelSpec,
    config: &EngineConfig,
) -> Result<Box<dyn BatchModel>, EngineError> {
    let name = spec.name.clone();
    let file_err = |e: crate::catalog::FileError| match e {
        crate::catalog::FileError::Io { path, source } if source.kind() == std::io::ErrorKind::NotFound => {
            EngineError::MissingFile { name: name.clone(), path }
        }
        other => EngineError::Load { name: name.clone(), reason: other.to_string() },
    };
    let load_err = |e: &dyn std::fmt::Display| EngineError::Load { name: spec.name.clone(), reason: e.to_string() };
    let weights = spec.weights.read_checked(models_dir).map_err(file_err)?;
    let model: Box<dyn BatchModel> = match (spec.engine, spec.architecture, &spec.text, &spec.image) {
        (EngineKind::Candle, Architecture::Bert, Some(text), _) => {
            let Some(config_file) = &text.config else {
                return Err(load_err(&"the candle engine needs text.config"));
            };
            let files = BertFiles {
                config: config_file.read_checked(models_dir).map_err(file_err)?,
                config_path: config_file.resolve(models_dir).display().to_string(),
                tokenizer: text.tokenizer.read_checked(models_dir).map_err(file_err)?,
                tokenizer_path: text.tokenizer.resolve(models_dir).display().to_string(),
                weights,
            };
            Box::new(BertEncoder::load(files, text).map_err(|e| load_err(&e))?)
        }
        (EngineKind::Onnx, Architecture::Bert, Some(text), _) => {
            let tokenizer = text.tokenizer.read_checked(models_dir).map_err(file_err)?;
            Box::new(
                crate::onnx::OnnxTextEncoder::load(&config.onnxruntime_lib, &weights, &tokenizer, spec, text)
                    .map_err(|e| load_err(&e))?,
            )
        }
        (EngineKind::Onnx, _, _, Some(image)) => Box::new(
            crate::onnx::OnnxImageEncoder::load(&config.onnxruntime_lib, &weights, spec, image)
                .map_err(|e| load_err(&e))?,
        ),
        (EngineKind::Candle, Architecture::EfficientnetLite0, _, Some(image)) => {
            let net = EfficientNetLite0::from_safetensors(&weights).map_err(|e| load_err(&e))?;
            Box::new(ImageEncoder { net, side: image.crop })
        }
        // The catalogue refuses these combinations when it is read.
        _ => return Err(load_err(&"its catalogue entry lacks the settings its architecture needs")),
    };
    let mut model = model;
    check_output(spec, &mut *model).map_err(|reason| load_err(&reason))?;
    Ok(model)
}

/// One forward pass on a neutral input at load: the network must give
/// `spec.dim` finite values, or the entry's `dim` (or its weights) is
/// wrong; a text probe is `max_tokens` long, so a model with fewer
/// positions fails here. Caught at start, not as failed fills later.
fn check_output(spec: &ModelSpec, model: &mut dyn BatchModel) -> Result<(), String> {
    let probe = match (&spec.image, &spec.text) {
        (Some(image), _) => Prepared::Pixels(vec![0.0; image.input_len()]),
        (None, Some(text)) => Prepared::Text("probe ".repeat(text.max_tokens)),
        (None, None) => Prepared::Text("probe".into()),
    };
    let out = model.embed_batch(&[&probe]).map_err(|e| format!("a probe input failed: {e}"))?;
    let got = out.first().map_or(0, Vec::len);
    if got != spec.dim {
        return Err(format!("the network gives {got} values per input, but the catalogue says dim = {}", spec.dim));
    }
    if out.iter().flatten().any(|v| !v.is_finite()) {
        return Err("the network gives non-finite values on a probe input".into());
    }
    Ok(())
}

impl Engine {
    /// Loads `specs` (their files under `models_dir`, each checked against
    /// its SHA-256) and starts their threads. Fails on a missing, wrong or
    /// bad file, naming the model.
    pub fn load(models_dir: &Path, specs: &[&'static ModelSpec], config: EngineConfig) -> Result<Self, EngineError> {
        let mut models: Vec<(&'static ModelSpec, Box<dyn BatchModel>)> = Vec::new();
        for &spec in specs {
            let started = Instant::now();
            let model = load_model(models_dir, spec, &config)?;
            tracing::info!(model = %spec.name, version = %spec.version, dim = spec.dim, elapsed = ?started.elapsed(), "model loaded");
            models.push((spec, model));
        }
        Self::start(models, config)
    }

    /// Starts one thread per model (the seam the batching tests use, with
    /// models that need no weights).
    fn start(
        models: Vec<(&'static ModelSpec, Box<dyn BatchModel>)>,
        config: EngineConfig,
    ) -> Result<Self, EngineError> {
        let mut workers = BTreeMap::new();
        for (spec, model) in models {
            let (tx, rx) = sync_channel(config.queue_capacity.max(1));
            let cfg = config.clone();
            std::thread::Builder::new()
                .name(format!("retina-{}", spec.name))
                .spawn(move || run_model(spec, model, rx, cfg))
                .map_err(|e| EngineError::Load {
                    name: spec.name.clone(),
                    reason: format!("spawning its thread: {e}"),
                })?;
            // At 0 from the start, so a scrape tells "nothing embedded yet"
            // from a series that does not exist.
            metrics::counter!("retina_embedded_inputs_total", "model" => spec.name.as_str()).increment(0);
            workers.insert((spec.name.as_str(), spec.version.as_str()), Worker { spec, queue: tx });
        }
        let fetcher = Fetcher::new(config.fetch.clone())
            .map_err(|e| EngineError::Load { name: "fetcher".into(), reason: e.to_string() })?;
        Ok(Self {
            workers,
            fetcher,
            fetch_slots: Arc::new(Semaphore::new(config.fetch_concurrency.max(1))),
            host_slots: HostSlots { per_host: config.fetch_per_host, ..HostSlots::default() },
            decode_slots: Arc::new(Semaphore::new(config.decode_concurrency.max(1))),
            config,
        })
    }

    /// The loaded models, every version, by name.
    pub fn models(&self) -> impl Iterator<Item = &'static ModelSpec> + '_ {
        self.workers.values().map(|w| w.spec)
    }

    /// The current version of `name` among the loaded ones: the entry
    /// marked `current`, else the only (or first) loaded one.
    pub fn spec(&self, name: &str) -> Option<&'static ModelSpec> {
        let mut loaded = self.workers.range((name, "")..).take_while(|((n, _), _)| *n == name).map(|(_, w)| w.spec);
        let first = loaded.next()?;
        Some(if first.current { first } else { loaded.find(|s| s.current).unwrap_or(first) })
    }

    /// The loaded entry of `name` at `version` (empty: the current one).
    pub fn spec_version(&self, name: &str, version: &str) -> Option<&'static ModelSpec> {
        if version.is_empty() {
            return self.spec(name);
        }
        self.workers.get(&(name, version)).map(|w| w.spec)
    }

    /// Embeds `inputs` with the current version of `model`.
    pub async fn embed(&self, model: &str, inputs: Vec<String>) -> Result<Vec<InputResult>, EngineError> {
        self.embed_version(model, "", inputs).await
    }

    /// Embeds `inputs` with `model` at `version` (empty: the current
    /// one): one result per input, in order. Waits without blocking the
    /// runtime; refuses at once when the queue is full.
    pub async fn embed_version(
        &self,
        model: &str,
        version: &str,
        inputs: Vec<String>,
    ) -> Result<Vec<InputResult>, EngineError> {
        let worker = self
            .spec_version(model, version)
            .and_then(|s| self.workers.get(&(s.name.as_str(), s.version.as_str())))
            .ok_or_else(|| EngineError::UnknownModel {
                name: if version.is_empty() { model.to_owned() } else { format!("{model} version {version}") },
                available: self.workers.keys().map(|(n, v)| format!("{n} version {v}")).collect(),
            })?;
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let n = inputs.len();
        let max = self.config.max_input_bytes;
        let mut results: Vec<Option<InputResult>> = vec![None; n];
        let mut pending = Vec::with_capacity(n);
        for (i, input) in inputs.into_iter().enumerate() {
            if input.len() > max {
                let reason = format!("input of {} bytes is over the limit of {max} bytes", input.len());
                results[i] = Some(Err(failure(FailureCode::InvalidInput, reason, false)));
            } else {
                pending.push((i, input));
            }
        }
        let prepared: Vec<(usize, Prepared)> = match worker.spec.kind {
            ModelKind::Text => pending.into_iter().map(|(i, t)| (i, Prepared::Text(t))).collect(),
            ModelKind::Image => {
                let jobs =
                    pending.into_iter().map(|(i, url)| async move { (i, self.prepare_image(worker.spec, &url).await) });
                let mut ok = Vec::new();
                for (i, r) in futures::future::join_all(jobs).await {
                    match r {
                        Ok(px) => ok.push((i, Prepared::Pixels(px))),
                        Err(f) => results[i] = Some(Err(f)),
                    }
                }
                ok
            }
        };
        if !prepared.is_empty() {
            let (indices, inputs): (Vec<usize>, Vec<Prepared>) = prepared.into_iter().unzip();
            let (reply, rx) = oneshot::channel();
            match worker.queue.try_send(Job { inputs, reply, span: tracing::Span::current() }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    metrics::counter!("retina_overloaded_total", "model" => model.to_owned()).increment(1);
                    return Err(EngineError::Overloaded(model.to_owned()));
                }
                Err(TrySendError::Disconnected(_)) => return Err(EngineError::Stopped(model.to_owned())),
            }
            let embedded = rx.await.map_err(|_| EngineError::Stopped(model.to_owned()))?;
            for (i, r) in indices.into_iter().zip(embedded) {
                results[i] = Some(r);
            }
        }
        let results: Vec<InputResult> = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(failure(FailureCode::Internal, "not processed", true))))
            .collect();
        // Failures are counted here only, once per input (the model
        // thread's included; it does not count them itself).
        for r in &results {
            if let Err(f) = r {
                metrics::counter!("retina_embed_failures_total", "model" => model.to_owned(), "code" => f.code.as_str_name())
                    .increment(1);
            }
        }
        Ok(results)
    }

    /// URL -> pixels: download (bounded concurrency, overall and per
    /// host), then decode and preprocess on the blocking pool (bounded
    /// concurrency), so downloads overlap each other and inference, and
    /// decoding never stalls the runtime. A downloaded body keeps its
    /// download slot until a decode slot is free, so bodies waiting to be
    /// decoded are bounded by `fetch_concurrency` too.
    async fn prepare_image(&self, spec: &'static ModelSpec, url: &str) -> Result<Vec<f32>, InputFailure> {
        let model = spec.name.as_str();
        let Some(settings) = &spec.image else {
            return Err(failure(FailureCode::Internal, "an image model without image settings", false));
        };
        let started = Instant::now();
        let stopped = || failure(FailureCode::Internal, "stopped", true);
        let host = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
        let host_slot = self.host_slots.acquire(&host).await.ok_or_else(stopped)?;
        let fetch_slot = self.fetch_slots.acquire().await.map_err(|_| stopped())?;
        let bytes = self
            .fetcher
            .fetch(url)
            .instrument(tracing::info_span!("retina.fetch", model))
            .await
            .map_err(fetch_failure)?;
        drop(host_slot);
        metrics::histogram!("retina_fetch_seconds", "model" => model.to_owned())
            .record(started.elapsed().as_secs_f64());
        let _slot = self.decode_slots.acquire().await.map_err(|_| stopped())?;
        drop(fetch_slot);
        let limits = self.config.decode.clone();
        let decoding = tracing::info_span!("retina.decode", model, bytes = bytes.len());
        tokio::task::spawn_blocking(move || decoding.in_scope(|| preprocess::prepare(&bytes, &limits, settings)))
            .await
            .map_err(|e| failure(FailureCode::Internal, format!("decode task: {e}"), true))?
            .map_err(decode_failure)
    }
}

/// A model thread: gather jobs for up to `max_wait` or `max_batch` inputs,
/// run them shortest-first in batches (less padding), reply to each job.
fn run_model(spec: &'static ModelSpec, mut model: Box<dyn BatchModel>, rx: Receiver<Job>, cfg: EngineConfig) {
    let name = spec.name.as_str();
    // The entry's own batch limit, else the engine's.
    let max_batch = spec.max_batch.unwrap_or(cfg.max_batch).max(1);
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut queued = jobs[0].inputs.len();
        let deadline = Instant::now() + cfg.max_wait;
        while queued < max_batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => {
                    queued += job.inputs.len();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }

        let mut results: Vec<Vec<Option<InputResult>>> = jobs.iter().map(|j| vec![None; j.inputs.len()]).collect();
        let mut valid: Vec<(usize, usize)> =
            jobs.iter().enumerate().flat_map(|(j, job)| (0..job.inputs.len()).map(move |i| (j, i))).collect();
        // Texts of similar length together: less padding per batch.
        valid.sort_by_key(|&(j, i)| match &jobs[j].inputs[i] {
            Prepared::Text(t) => t.len(),
            Prepared::Pixels(_) => 0,
        });

        for chunk in valid.chunks(max_batch) {
            let batch: Vec<&Prepared> = chunk.iter().map(|&(j, i)| &jobs[j].inputs[i]).collect();
            let infer =
                tracing::info_span!(parent: &jobs[chunk[0].0].span, "retina.infer", model = name, batch = chunk.len());
            let mut joined = vec![chunk[0].0];
            for &(j, _) in chunk {
                if !joined.contains(&j) {
                    joined.push(j);
                    infer.follows_from(&jobs[j].span);
                }
            }
            let started = Instant::now();
            let outcome = infer.in_scope(|| model.embed_batch(&batch));
            metrics::histogram!("retina_inference_seconds", "model" => name).record(started.elapsed().as_secs_f64());
            metrics::histogram!("retina_batch_size", "model" => name).record(chunk.len() as f64);
            match outcome {
                Ok(vectors) if vectors.len() == chunk.len() => {
                    metrics::counter!("retina_embedded_inputs_total", "model" => name).increment(chunk.len() as u64);
                    for (&(j, i), v) in chunk.iter().zip(vectors) {
                        results[j][i] = Some(Ok(v));
                    }
                }
                other => {
                    let reason = match other {
                        Ok(v) => format!("model returned {} vectors for {} inputs", v.len(), chunk.len()),
                        Err(e) => e,
                    };
                    tracing::error!(model = name, %reason, "inference failed");
                    for &(j, i) in chunk {
                        results[j][i] = Some(Err(InputFailure {
                            code: FailureCode::Internal,
                            reason: format!("inference failed: {reason}"),
                            transient: true,
                        }));
                    }
                }
            }
        }
        for (job, res) in jobs.into_iter().zip(results) {
            let res: Vec<InputResult> = res
                .into_iter()
                .map(|r| {
                    r.unwrap_or_else(|| {
                        Err(InputFailure {
                            code: FailureCode::Internal,
                            reason: "not processed".into(),
                            transient: true,
                        })
                    })
                })
                .collect();
            // Failures are counted by `Engine::embed`, which sees every
            // input's outcome, not here: counted twice otherwise.

            // The caller may have gone away (cancelled request): fine.
            let _ = job.reply.send(res);
        }
    }
    tracing::info!(model = name, "model thread stopped");
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        mpsc::{Receiver, Sender, channel},
    };

    use futures::FutureExt;

    use super::*;

    /// A model whose every batch fails.
    struct Failing;

    impl BatchModel for Failing {
        fn embed_batch(&mut self, _: &[&Prepared]) -> Result<Vec<Vec<f32>>, String> {
            Err("out of memory".into())
        }
    }

    /// An inference failure was counted in `retina_embed_failures_total`
    /// twice: by the model thread and again by `embed`.
    #[test]
    fn an_inference_failure_is_counted_once() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let spec = crate::catalog::builtin().spec("minilm-l6-v2").expect("a text model");
        let config = EngineConfig::default();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let results = std::thread::scope(|scope| {
            let (tx, rx) = sync_channel(4);
            let (recorder, cfg) = (&recorder, config.clone());
            // The model thread records into the same recorder.
            scope.spawn(move || metrics::with_local_recorder(recorder, || run_model(spec, Box::new(Failing), rx, cfg)));
            let _rt = rt.enter();
            let engine = Engine {
                workers: BTreeMap::from([((spec.name.as_str(), spec.version.as_str()), Worker { spec, queue: tx })]),
                fetcher: Fetcher::new(config.fetch.clone()).expect("fetcher"),
                fetch_slots: Arc::new(Semaphore::new(1)),
                host_slots: HostSlots::default(),
                decode_slots: Arc::new(Semaphore::new(1)),
                config,
            };
            let inputs = vec!["a".to_owned(), "b".to_owned()];
            let results = metrics::with_local_recorder(recorder, || rt.block_on(engine.embed(&spec.name, inputs)));
            // Closes the queue: the model thread stops.
            drop(engine);
            results
        });
        let results = results.expect("answered");
        assert!(results.iter().all(|r| r.as_ref().is_err_and(|f| f.code == FailureCode::Internal)), "{results:?}");
        let counted: u64 = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, ..)| key.key().name() == "retina_embed_failures_total")
            .map(|(.., value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => n,
                other => panic!("not a counter: {other:?}"),
            })
            .sum();
        assert_eq!(counted, 2, "two inputs failed, each counted once");
    }

    const MODEL: &str = "minilm-l6-v2";

    /// Each input's vector: its bytes, as numbers.
    fn vector_of(text: &str) -> Vec<f32> {
        text.bytes().map(f32::from).collect()
    }

    /// A text model that needs no weights. It records the inputs of each
    /// batch, says so on `entered`, and then runs the batch only once the
    /// test sends a permit on `proceed`.
    struct GatedModel {
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        entered: Sender<()>,
        proceed: Receiver<()>,
    }

    impl BatchModel for GatedModel {
        fn embed_batch(&mut self, inputs: &[&Prepared]) -> Result<Vec<Vec<f32>>, String> {
            let texts: Vec<String> = inputs
                .iter()
                .map(|p| match p {
                    Prepared::Text(t) => t.clone(),
                    Prepared::Pixels(_) => "pixels".into(),
                })
                .collect();
            self.batches.lock().unwrap_or_else(|p| p.into_inner()).push(texts.clone());
            let _ = self.entered.send(());
            self.proceed.recv_timeout(Duration::from_secs(30)).map_err(|e| format!("no permit: {e}"))?;
            Ok(texts.iter().map(|t| vector_of(t)).collect())
        }
    }

    struct Harness {
        engine: Engine,
        batches: Arc<Mutex<Vec<Vec<String>>>>,
        entered: Receiver<()>,
        proceed: Sender<()>,
    }

    impl Harness {
        /// An engine over one [`GatedModel`]. The first input of a batch
        /// waits 30 s for company, so a batch that closes early closed at
        /// the batch limit.
        fn new(config: EngineConfig) -> Self {
            let (entered_tx, entered) = channel();
            let (proceed, proceed_rx) = channel();
            let batches = Arc::new(Mutex::new(Vec::new()));
            let model: Box<dyn BatchModel> =
                Box::new(GatedModel { batches: batches.clone(), entered: entered_tx, proceed: proceed_rx });
            let spec = crate::catalog::builtin().spec(MODEL).expect("a known model");
            let config = EngineConfig { max_wait: Duration::from_secs(30), ..config };
            let engine = Engine::start(vec![(spec, model)], config).expect("start");
            Self { engine, batches, entered, proceed }
        }

        fn batches(&self) -> Vec<Vec<String>> {
            self.batches.lock().unwrap_or_else(|p| p.into_inner()).clone()
        }

        /// Waits (bounded) until the model thread is inside a batch.
        fn wait_entered(&self) {
            self.entered.recv_timeout(Duration::from_secs(10)).expect("the model thread runs a batch");
        }

        fn permit(&self, batches: usize) {
            for _ in 0..batches {
                self.proceed.send(()).expect("the model thread is alive");
            }
        }
    }

    fn strings(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    fn embedded(k: &[&str]) -> Vec<InputResult> {
        k.iter().map(|t| Ok(vector_of(t))).collect()
    }

    #[tokio::test]
    async fn requests_that_queue_together_coalesce_up_to_the_batch_limit() {
        let h = Harness::new(EngineConfig { max_batch: 4, ..EngineConfig::default() });
        let first_inputs = ["g1", "g2", "g3", "g4"];
        let mut first = Box::pin(h.engine.embed(MODEL, strings(&first_inputs)));
        // The first poll queues the request (text needs no preparation).
        assert!(futures::poll!(&mut first).is_pending());
        h.wait_entered();
        // While the model is busy, five requests queue up in this order.
        let later: [&[&str]; 5] = [&["a1", "a2"], &["b1"], &["c1"], &["d1", "d2", "d3"], &["e1"]];
        let mut queued = Vec::new();
        for inputs in later {
            let mut f = Box::pin(h.engine.embed(MODEL, strings(inputs)));
            assert!(futures::poll!(&mut f).is_pending());
            queued.push(f);
        }
        h.permit(3);
        assert_eq!(first.await.expect("embedded"), embedded(&first_inputs));
        let results = futures::future::join_all(queued).await;
        for (r, inputs) in results.into_iter().zip(later) {
            assert_eq!(r.expect("embedded"), embedded(inputs), "each caller gets its own rows, in order");
        }
        // Whole requests fill a batch up to the limit of 4 inputs and no
        // further; the next batch starts with the next request.
        let want: Vec<Vec<String>> =
            vec![strings(&first_inputs), strings(&["a1", "a2", "b1", "c1"]), strings(&["d1", "d2", "d3", "e1"])];
        assert_eq!(h.batches(), want);
    }

    #[tokio::test]
    async fn a_request_over_the_batch_limit_is_split_shortest_inputs_first() {
        let h = Harness::new(EngineConfig { max_batch: 4, ..EngineConfig::default() });
        h.permit(2);
        let inputs = ["cccc", "a", "bbb", "dd", "eeeee", "f"];
        assert_eq!(h.engine.embed(MODEL, strings(&inputs)).await.expect("embedded"), embedded(&inputs));
        assert_eq!(h.batches(), vec![strings(&["a", "f", "dd", "bbb"]), strings(&["cccc", "eeeee"])]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_takes_requests_again_once_drained() {
        let h = Harness::new(EngineConfig { max_batch: 1, queue_capacity: 1, ..EngineConfig::default() });
        let mut running = Box::pin(h.engine.embed(MODEL, strings(&["r"])));
        assert!(futures::poll!(&mut running).is_pending());
        h.wait_entered();
        let mut waiting = Box::pin(h.engine.embed(MODEL, strings(&["w"])));
        assert!(futures::poll!(&mut waiting).is_pending(), "it takes the one place in the queue");
        // Refused on its first poll: not queued, not waited for.
        let refused = h.engine.embed(MODEL, strings(&["x"])).now_or_never().expect("answered at once");
        assert!(matches!(&refused, Err(EngineError::Overloaded(m)) if m == MODEL), "{refused:?}");
        h.permit(2);
        assert_eq!(running.await.expect("embedded"), embedded(&["r"]));
        assert_eq!(waiting.await.expect("embedded"), embedded(&["w"]));
        h.permit(1);
        assert_eq!(h.engine.embed(MODEL, strings(&["y"])).await.expect("embedded"), embedded(&["y"]));
        assert_eq!(h.batches(), vec![strings(&["r"]), strings(&["w"]), strings(&["y"])], "x never reached the model");
    }

    #[tokio::test]
    async fn bad_requests_and_inputs_never_reach_the_model() {
        let h = Harness::new(EngineConfig { max_batch: 1, max_input_bytes: 4, ..EngineConfig::default() });
        let e = h.engine.embed("nope", strings(&["x"])).await.expect_err("unknown model");
        assert!(
            matches!(&e, EngineError::UnknownModel { name, available }
                if name == "nope" && available.len() == 1 && available[0].starts_with(&format!("{MODEL} version "))),
            "{e}"
        );
        assert_eq!(h.engine.embed(MODEL, Vec::new()).await.expect("empty"), Vec::<InputResult>::new());
        h.permit(1);
        let r = h.engine.embed(MODEL, strings(&["ok", "too long"])).await.expect("embedded");
        let too_long = InputFailure {
            code: FailureCode::InvalidInput,
            reason: "input of 8 bytes is over the limit of 4 bytes".into(),
            transient: false,
        };
        assert_eq!(r, vec![Ok(vector_of("ok")), Err(too_long)]);
        assert_eq!(h.batches(), vec![strings(&["ok"])]);
    }

    /// Defect 11.10: a slow host held download slots for everyone; now
    /// each host has a few slots of its own, and idle hosts are forgotten.
    #[tokio::test]
    async fn slow_hosts_hold_fetch_slots_for_the_full_15_s() {
        let slots = HostSlots { per_host: 2, ..HostSlots::default() };
        let a1 = slots.acquire("slow.example").await.expect("slot");
        let a2 = slots.acquire("slow.example").await.expect("slot");
        // One poll each, no timed wait: a free slot is taken at once, a
        // taken one leaves the future pending.
        assert!(slots.acquire("slow.example").now_or_never().is_none(), "a third download from the slow host waits");
        let other = slots.acquire("fast.example").now_or_never();
        assert!(other.as_ref().is_some_and(|s| s.is_some()), "another host is not held up");
        drop((a1, a2, other));
        assert!(slots.hosts.lock().expect("lock").is_empty(), "idle hosts leave the map");
    }
}
