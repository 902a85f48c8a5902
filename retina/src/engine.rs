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

use embark_proto::retina::v1::FailureCode;
use tokio::sync::oneshot;

use crate::{
    catalog::{self, ModelKind, ModelSpec},
    text::MiniLm,
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch: 32, max_wait: Duration::from_millis(2), queue_capacity: 1024, max_input_bytes: 64 * 1024 }
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
        "model {name:?}: file {path} is missing; run scripts/setup-models.sh (or point --models-dir at its output)"
    )]
    MissingFile { name: String, path: String },
    #[error("loading model {name:?}: {reason}")]
    Load { name: String, reason: String },
}

struct Job {
    inputs: Vec<String>,
    reply: oneshot::Sender<Vec<InputResult>>,
}

struct Worker {
    spec: &'static ModelSpec,
    queue: SyncSender<Job>,
}

/// The loaded models. Dropping the engine stops its threads once their
/// queues drain.
pub struct Engine {
    workers: BTreeMap<&'static str, Worker>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("models", &self.workers.keys().collect::<Vec<_>>()).finish()
    }
}

/// What a model thread runs: a batch of valid inputs in, vectors out.
trait BatchModel: Send + 'static {
    fn embed_batch(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, String>;
}

impl BatchModel for MiniLm {
    fn embed_batch(&self, inputs: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        self.embed(inputs).map_err(|e| e.to_string())
    }
}

impl Engine {
    /// Loads the named models from `<models_dir>/<name>/` and starts their
    /// threads. Fails on an unknown name or a missing or bad file.
    pub fn load(models_dir: &Path, names: &[String], config: EngineConfig) -> Result<Self, EngineError> {
        let mut workers = BTreeMap::new();
        for name in names {
            let spec = catalog::spec(name).ok_or_else(|| EngineError::UnknownModel {
                name: name.clone(),
                available: catalog::names().into_iter().map(String::from).collect(),
            })?;
            let dir = models_dir.join(spec.name);
            for f in spec.files {
                let path = dir.join(f);
                if !path.is_file() {
                    return Err(EngineError::MissingFile { name: name.clone(), path: path.display().to_string() });
                }
            }
            let started = Instant::now();
            let model: Box<dyn BatchModel> = match spec.kind {
                ModelKind::Text => Box::new(
                    MiniLm::load(&dir).map_err(|e| EngineError::Load { name: name.clone(), reason: e.to_string() })?,
                ),
                ModelKind::Image => {
                    return Err(EngineError::Load {
                        name: name.clone(),
                        reason: "image models are not built yet".into(),
                    });
                }
            };
            tracing::info!(model = spec.name, dim = spec.dim, elapsed = ?started.elapsed(), "model loaded");
            let (tx, rx) = sync_channel(config.queue_capacity.max(1));
            let cfg = config.clone();
            std::thread::Builder::new()
                .name(format!("retina-{}", spec.name))
                .spawn(move || run_model(spec, model, rx, cfg))
                .map_err(|e| EngineError::Load { name: name.clone(), reason: format!("spawning its thread: {e}") })?;
            workers.insert(spec.name, Worker { spec, queue: tx });
        }
        Ok(Self { workers })
    }

    /// The loaded models, by name.
    pub fn models(&self) -> impl Iterator<Item = &'static ModelSpec> + '_ {
        self.workers.values().map(|w| w.spec)
    }

    pub fn spec(&self, name: &str) -> Option<&'static ModelSpec> {
        self.workers.get(name).map(|w| w.spec)
    }

    /// Embeds `inputs` with `model`: one result per input, in order. Waits
    /// without blocking the runtime; refuses at once when the queue is full.
    pub async fn embed(&self, model: &str, inputs: Vec<String>) -> Result<Vec<InputResult>, EngineError> {
        let worker = self.workers.get(model).ok_or_else(|| EngineError::UnknownModel {
            name: model.to_owned(),
            available: self.workers.keys().map(|s| s.to_string()).collect(),
        })?;
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        match worker.queue.try_send(Job { inputs, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("retina_overloaded_total", "model" => model.to_owned()).increment(1);
                return Err(EngineError::Overloaded(model.to_owned()));
            }
            Err(TrySendError::Disconnected(_)) => return Err(EngineError::Stopped(model.to_owned())),
        }
        rx.await.map_err(|_| EngineError::Stopped(model.to_owned()))
    }
}

/// A model thread: gather jobs for up to `max_wait` or `max_batch` inputs,
/// run them shortest-first in batches (less padding), reply to each job.
fn run_model(spec: &'static ModelSpec, model: Box<dyn BatchModel>, rx: Receiver<Job>, cfg: EngineConfig) {
    let name = spec.name;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut queued = jobs[0].inputs.len();
        let deadline = Instant::now() + cfg.max_wait;
        while queued < cfg.max_batch {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(job) => {
                    queued += job.inputs.len();
                    jobs.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }

        let mut results: Vec<Vec<Option<InputResult>>> = jobs.iter().map(|j| vec![None; j.inputs.len()]).collect();
        let mut valid: Vec<(usize, usize)> = Vec::with_capacity(queued);
        for (j, job) in jobs.iter().enumerate() {
            for (i, input) in job.inputs.iter().enumerate() {
                if input.len() > cfg.max_input_bytes {
                    results[j][i] = Some(Err(InputFailure {
                        code: FailureCode::InvalidInput,
                        reason: format!(
                            "input of {} bytes is over the limit of {} bytes",
                            input.len(),
                            cfg.max_input_bytes
                        ),
                        transient: false,
                    }));
                } else {
                    valid.push((j, i));
                }
            }
        }
        valid.sort_by_key(|&(j, i)| jobs[j].inputs[i].len());

        for chunk in valid.chunks(cfg.max_batch.max(1)) {
            let texts: Vec<&str> = chunk.iter().map(|&(j, i)| jobs[j].inputs[i].as_str()).collect();
            let started = Instant::now();
            let outcome = model.embed_batch(&texts);
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
            for r in &res {
                if let Err(f) = r {
                    metrics::counter!("retina_embed_failures_total", "model" => name, "code" => f.code.as_str_name())
                        .increment(1);
                }
            }
            // The caller may have gone away (cancelled request): fine.
            let _ = job.reply.send(res);
        }
    }
    tracing::info!(model = name, "model thread stopped");
}
