//! The fill loop's embedder on one machine (`embark up`, `embark backfill`):
//! Retina's engine, in this process.

use std::sync::Arc;

use super::{EmbedError, EmbedOutcome, Embedder};
use async_trait::async_trait;
use embark_proto::retina::v1::FailureCode;
use retina::{Engine, EngineError};

#[derive(Debug, Clone)]
pub struct InProcessRetina {
    engine: Arc<Engine>,
}

impl InProcessRetina {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[async_trait]
impl Embedder for InProcessRetina {
    async fn embed(&self, model: &str, version: &str, inputs: Vec<String>) -> Result<Vec<EmbedOutcome>, EmbedError> {
        let n = inputs.len();
        match self.engine.embed_version(model, version, inputs).await {
            Ok(results) => Ok(results
                .into_iter()
                .map(|r| match r {
                    Ok(v) => EmbedOutcome::Vector(v),
                    Err(f) => EmbedOutcome::Failed { code: f.code as i32, reason: f.reason, transient: f.transient },
                })
                .collect()),
            // A queued miss for a model this process does not load cannot
            // succeed by retrying: record it.
            Err(e @ EngineError::UnknownModel { .. }) => Ok((0..n)
                .map(|_| EmbedOutcome::Failed {
                    code: FailureCode::InvalidInput as i32,
                    reason: e.to_string(),
                    transient: false,
                })
                .collect()),
            Err(e) => Err(EmbedError::Engine(e)),
        }
    }
}
