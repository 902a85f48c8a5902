//! `embark.v1.EmbArk` over a [`Front`]: request in, status or answer out.

use std::sync::Arc;

use embark_proto::embark::v1::{
    InvalidateRequest, InvalidateResponse, LookupRequest, LookupResponse, ModelsRequest, ModelsResponse,
    SimilarRequest, SimilarResponse, emb_ark_server::EmbArk, similar_request::Query,
};
use tonic::{Request, Response, Status};

use crate::front::{Front, FrontError, SimilarQuery};

#[derive(Debug, Clone)]
pub struct EmbArkService {
    front: Arc<Front>,
}

impl EmbArkService {
    pub fn new(front: Arc<Front>) -> Self {
        Self { front }
    }
}

impl From<FrontError> for Status {
    fn from(e: FrontError) -> Self {
        match e {
            FrontError::InvalidArgument(m) => Status::invalid_argument(m),
            FrontError::NotFound(m) => Status::not_found(m),
            FrontError::ResourceExhausted(m) => Status::resource_exhausted(m),
            FrontError::FailedPrecondition(m) => Status::failed_precondition(m),
            FrontError::Unavailable(m) => Status::unavailable(m),
            FrontError::Store(e) => {
                tracing::warn!(error = %e, "store read failed during a request");
                metrics::counter!("embark_store_errors_total", "kind" => crate::store_guard::error_kind(&e))
                    .increment(1);
                Status::unavailable(format!("store unavailable: {e}"))
            }
        }
    }
}

#[tonic::async_trait]
impl EmbArk for EmbArkService {
    async fn lookup(&self, request: Request<LookupRequest>) -> Result<Response<LookupResponse>, Status> {
        let LookupRequest { model, keys } = request.into_inner();
        let answer = self.front.lookup(&model, &keys).await?;
        Ok(Response::new(LookupResponse {
            dim: answer.dim as u32,
            vectors: answer.vectors.into(),
            sources: answer.sources.into_iter().map(|s| s as i32).collect(),
        }))
    }

    async fn models(&self, _: Request<ModelsRequest>) -> Result<Response<ModelsResponse>, Status> {
        Ok(Response::new(ModelsResponse { models: self.front.models().infos() }))
    }

    async fn invalidate(&self, request: Request<InvalidateRequest>) -> Result<Response<InvalidateResponse>, Status> {
        let InvalidateRequest { model, keys } = request.into_inner();
        let n = self.front.invalidate(&model, &keys).await?;
        Ok(Response::new(InvalidateResponse { invalidated: n as u32 }))
    }

    async fn similar(&self, request: Request<SimilarRequest>) -> Result<Response<SimilarResponse>, Status> {
        let SimilarRequest { model, query, k, min_score } = request.into_inner();
        let query = match query {
            Some(Query::Key(key)) if !key.is_empty() => SimilarQuery::Key(key),
            Some(Query::Vector(v)) => SimilarQuery::Vector(v.to_vec()),
            _ => return Err(Status::invalid_argument("give a query: a non-empty `key` or a `vector`")),
        };
        let answer = self.front.similar(&model, query, k as usize, min_score).await?;
        Ok(Response::new(SimilarResponse { keys: answer.keys, scores: answer.scores, exact: answer.exact }))
    }
}
