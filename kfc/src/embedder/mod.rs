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
#[error("embedder unavailable: {0}")]
pub struct EmbedError(pub String);

#[async_trait]
pub trait Embedder: Send + Sync + 'static {
    /// One outcome per input, in order.
    async fn embed(&self, model: &str, inputs: Vec<String>) -> Result<Vec<EmbedOutcome>, EmbedError>;
}
