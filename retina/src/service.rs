//! `retina.v1.Retina` over an [`Engine`].

use std::sync::Arc;
use tracing::Instrument as _;

use embark_proto::retina::v1::{
    EmbedFailure, EmbedRequest, EmbedResponse, ModelInfo, ModelKind as WireKind, ModelsRequest, ModelsResponse,
    retina_server::Retina,
};
use tonic::{Request, Response, Status};

use crate::{Engine, EngineError, ModelKind};

/// The role each method needs (the auth layer's policy): embedding and
/// listing models are reads; no Retina method changes state.
pub fn access(path: &str) -> embark_ops::auth::Access {
    use embark_ops::auth::{Access, Role, is_public_path};
    match path.strip_prefix("/retina.v1.Retina/") {
        Some("Embed" | "Models") => Access::Requires(Role::Read),
        _ if is_public_path(path) => Access::Public,
        _ => Access::Requires(Role::Admin),
    }
}

#[derive(Debug, Clone)]
pub struct RetinaService {
    engine: Arc<Engine>,
    max_request_inputs: usize,
}

impl RetinaService {
    pub fn new(engine: Arc<Engine>, max_request_inputs: usize) -> Self {
        Self { engine, max_request_inputs }
    }
}

fn status(e: EngineError) -> Status {
    match e {
        EngineError::UnknownModel { .. } => Status::not_found(e.to_string()),
        EngineError::Overloaded(_) | EngineError::Stopped(_) => Status::unavailable(e.to_string()),
        EngineError::MissingFile { .. } | EngineError::Load { .. } => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl Retina for RetinaService {
    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let span = tracing::info_span!("retina.Embed", model = %request.get_ref().model, inputs = request.get_ref().inputs.len());
        embark_ops::traces::extract_metadata(&span, request.metadata());
        self.embed_in_span(request.into_inner()).instrument(span).await
    }

    async fn models(&self, _: Request<ModelsRequest>) -> Result<Response<ModelsResponse>, Status> {
        let models = self
            .engine
            .models()
            .map(|s| ModelInfo {
                name: s.name.to_owned(),
                dim: s.dim as u32,
                kind: match s.kind {
                    ModelKind::Image => WireKind::Image,
                    ModelKind::Text => WireKind::Text,
                } as i32,
                version: s.version.to_owned(),
                current: self.engine.spec(&s.name).is_some_and(|c| std::ptr::eq(c, s)),
            })
            .collect();
        Ok(Response::new(ModelsResponse { models }))
    }
}

impl RetinaService {
    async fn embed_in_span(&self, request: EmbedRequest) -> Result<Response<EmbedResponse>, Status> {
        let EmbedRequest { model, inputs, version } = request;
        if model.is_empty() {
            return Err(Status::invalid_argument("model is required (see the Models RPC)"));
        }
        let spec = self.engine.spec_version(&model, &version).ok_or_else(|| {
            status(EngineError::UnknownModel {
                name: if version.is_empty() { model.clone() } else { format!("{model} version {version}") },
                available: self.engine.models().map(|s| format!("{} version {}", s.name, s.version)).collect(),
            })
        })?;
        if inputs.len() > self.max_request_inputs {
            return Err(Status::resource_exhausted(format!(
                "{} inputs in one request; the limit is {} (--max-request-inputs): split the batch",
                inputs.len(),
                self.max_request_inputs
            )));
        }
        let results = self.engine.embed_version(&spec.name, &spec.version, inputs).await.map_err(status)?;
        let mut vectors = Vec::with_capacity(results.len() * spec.dim * 4);
        let mut failures = Vec::new();
        let zeros = vec![0f32; spec.dim];
        for (i, r) in results.iter().enumerate() {
            match r {
                Ok(v) if v.len() == spec.dim => embark_proto::extend_le_f32(&mut vectors, v),
                Ok(v) => {
                    embark_proto::extend_le_f32(&mut vectors, &zeros);
                    failures.push(EmbedFailure {
                        index: i as u32,
                        code: embark_proto::retina::v1::FailureCode::Internal as i32,
                        reason: format!("model produced {} values, expected {}", v.len(), spec.dim),
                        transient: true,
                    });
                }
                Err(f) => {
                    embark_proto::extend_le_f32(&mut vectors, &zeros);
                    failures.push(EmbedFailure {
                        index: i as u32,
                        code: f.code as i32,
                        reason: f.reason.clone(),
                        transient: f.transient,
                    });
                }
            }
        }
        Ok(Response::new(EmbedResponse { dim: spec.dim as u32, vectors: vectors.into(), failures }))
    }
}
