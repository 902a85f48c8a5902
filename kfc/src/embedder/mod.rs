//! What turns inputs into vectors: the [`Embedder`] seam, and its adapters,
//! an in-process Retina ([`in_process`]) or a remote one ([`remote`]).

pub mod in_process;
pub mod remote;

use async_trait::async_trait;

/// The result for one input.
#[derive(Debug, Clone, PartialEq)]
pub enum EmbedOutcome {
    Vector(Vec<f32>),
    /// `code` is a `retina.v1.FailureCode`; `transient` failures are retried
    /// with backoff, permanent ones recorded as failure records.
    Failed {
        code: i32,
        reason: String,
        transient: bool,
    },
}

/// The whole call failed (worker unreachable, overloaded...): every input
/// is retried later.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Retina's engine in this process refused the call (its queue full,
    /// shutting down).
    #[error("embedder unavailable: {0}")]
    Engine(#[from] retina::EngineError),
    /// Retina over gRPC answered with an error (unreachable, overloaded).
    #[error("Retina: {:?}: {}", .0.code(), .0.message())]
    Remote(Box<tonic::Status>),
    /// Retina over gRPC did not answer within the call's deadline.
    #[error("Retina did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Retina's reply does not fit its request (rows, dim, failure index).
    #[error("Retina's reply is malformed: {0}")]
    BadReply(String),
    /// The embedder is not set up to be called (a bad Retina URL, none).
    #[error("embedder configuration: {0}")]
    Config(String),
    /// Another embedder's failure (tests, embedders of other crates).
    #[error("embedder unavailable: {0}")]
    Other(String),
}

#[async_trait]
pub trait Embedder: Send + Sync + 'static {
    /// One outcome per input, in order, from `model` at `version` (empty:
    /// the embedder's current version of the model).
    async fn embed(&self, model: &str, version: &str, inputs: Vec<String>) -> Result<Vec<EmbedOutcome>, EmbedError>;
}

/// An embedder call that failed as a whole: every input is retried later.
#[derive(Debug, thiserror::Error)]
pub enum EmbedCallError {
    #[error(transparent)]
    Unavailable(#[from] EmbedError),
    /// The reply broke the one-outcome-per-input contract. Pairing it with
    /// the inputs would silently drop keys (or give one key another's
    /// vector), so none of it is used.
    #[error("the embedder returned {outcomes} outcomes for {inputs} inputs")]
    Miscounted { inputs: usize, outcomes: usize },
}

/// Calls `embedder` and checks that it answered one outcome per input: the
/// outcomes can then be zipped with the inputs without losing any.
pub async fn embed_checked<E: Embedder + ?Sized>(
    embedder: &E,
    model: &str,
    version: &str,
    inputs: Vec<String>,
) -> Result<Vec<EmbedOutcome>, EmbedCallError> {
    let n = inputs.len();
    let outcomes = embedder.embed(model, version, inputs).await?;
    if outcomes.len() != n {
        return Err(EmbedCallError::Miscounted { inputs: n, outcomes: outcomes.len() });
    }
    Ok(outcomes)
}
