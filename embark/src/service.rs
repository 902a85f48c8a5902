//! `embark.v1.EmbArk` over a [`Front`]: request in, status or answer out;
//! who may call which method ([`access`]) and how fast a principal may
//! invalidate ([`InvalidateLimit`]).

use std::{net::IpAddr, num::NonZeroU32, sync::Arc};
use tracing::Instrument as _;

use embark_ops::auth::{Access, Principal, Role};

use embark_proto::embark::v1::{
    InvalidateRequest, InvalidateResponse, LookupRequest, LookupResponse, ModelsRequest, ModelsResponse,
    SimilarRequest, SimilarResponse, VectorType, emb_ark_server::EmbArk, similar_request::Query,
};
use tonic::{Request, Response, Status};

use crate::front::{Front, FrontError, SimilarQuery};

/// The role each method needs (the auth layer's policy): reads for
/// `read`, anything that changes the store for `admin`. A method added to
/// the API stays `admin` until it is named here.
pub fn access(path: &str) -> Access {
    match path.strip_prefix("/embark.v1.EmbArk/") {
        Some("Lookup" | "Models" | "Similar") => Access::Requires(Role::Read),
        Some(_) => Access::Requires(Role::Admin),
        None if embark_ops::auth::is_public_path(path) => Access::Public,
        None => Access::Requires(Role::Admin),
    }
}

/// Invalidated keys per second and principal, by default. Each
/// invalidated key costs an embedding on Retina later: a loop of
/// Invalidate must not turn into a denial of service there.
pub const DEFAULT_INVALIDATE_KEYS_PER_SECOND: u32 = 1000;

/// Who an Invalidate is counted against: its principal, or without auth
/// the peer's address (all local-socket callers share one budget).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Caller {
    Principal(Arc<str>),
    Peer(IpAddr),
    Local,
}

/// A keyed GCRA limiter (governor) on invalidated keys per caller: a
/// burst of one second's worth (at least a full batch), refilled evenly.
#[derive(Debug)]
pub struct InvalidateLimit {
    limiter: governor::DefaultKeyedRateLimiter<Caller>,
    burst: NonZeroU32,
}

impl InvalidateLimit {
    pub fn new(keys_per_second: u32, max_batch_keys: usize) -> Self {
        let rate = NonZeroU32::new(keys_per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let batch = u32::try_from(max_batch_keys).unwrap_or(u32::MAX);
        let burst = NonZeroU32::new(batch.max(rate.get())).unwrap_or(rate);
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        Self { limiter: governor::RateLimiter::keyed(quota), burst }
    }

    /// Takes `keys` from `caller`'s budget, or says how long to wait.
    fn take(&self, caller: &Caller, keys: usize) -> Result<(), Status> {
        // Callers seen once (peer addresses) must not accumulate.
        if self.limiter.len() > 10_000 {
            self.limiter.retain_recent();
        }
        let n =
            NonZeroU32::new(u32::try_from(keys).unwrap_or(u32::MAX).min(self.burst.get())).unwrap_or(NonZeroU32::MIN);
        match self.limiter.check_key_n(caller, n) {
            Ok(Ok(())) => Ok(()),
            _ => {
                metrics::counter!("embark_invalidate_throttled_total").increment(1);
                Err(Status::resource_exhausted(format!(
                    "Invalidate is limited to {} keys per second per caller; retry later",
                    self.burst
                )))
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmbArkService {
    front: Arc<Front>,
    invalidate_limit: Arc<InvalidateLimit>,
}

impl EmbArkService {
    pub fn new(front: Arc<Front>, invalidate_limit: InvalidateLimit) -> Self {
        Self { front, invalidate_limit: Arc::new(invalidate_limit) }
    }
}

fn caller<T>(request: &Request<T>) -> Caller {
    match (request.extensions().get::<Principal>(), request.remote_addr()) {
        (Some(p), _) => Caller::Principal(p.name.clone()),
        (None, Some(addr)) => Caller::Peer(addr.ip()),
        (None, None) => Caller::Local,
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
        let span =
            tracing::info_span!("embark.Lookup", model = %request.get_ref().model, keys = request.get_ref().keys.len());
        embark_ops::traces::extract_metadata(&span, request.metadata());
        let LookupRequest { model, keys, version, vector_type } = request.into_inner();
        let vector_type = VectorType::try_from(vector_type).map_err(|_| {
            Status::invalid_argument(format!("unknown vector_type {vector_type}; known: F32, F16, BF16, I8"))
        })?;
        let answer = self.front.lookup_as(&model, &version, &keys, vector_type).instrument(span).await?;
        Ok(Response::new(LookupResponse {
            dim: answer.dim as u32,
            vectors: bytes::Bytes::new(),
            chunks: answer.matrix,
            sources: answer.sources.into_iter().map(|s| s as i32).collect(),
            version: answer.version.to_owned(),
            vector_type: answer.vector_type as i32,
            scales: answer.scales.into(),
        }))
    }

    async fn models(&self, _: Request<ModelsRequest>) -> Result<Response<ModelsResponse>, Status> {
        Ok(Response::new(ModelsResponse { models: self.front.model_infos() }))
    }

    async fn invalidate(&self, request: Request<InvalidateRequest>) -> Result<Response<InvalidateResponse>, Status> {
        let caller = caller(&request);
        let span = tracing::info_span!("embark.Invalidate", model = %request.get_ref().model, keys = request.get_ref().keys.len());
        embark_ops::traces::extract_metadata(&span, request.metadata());
        let InvalidateRequest { model, keys } = request.into_inner();
        if keys.is_empty() {
            return Ok(Response::new(InvalidateResponse { invalidated: 0 }));
        }
        self.invalidate_limit.take(&caller, keys.len())?;
        let n = self.front.invalidate(&model, &keys).instrument(span).await?;
        Ok(Response::new(InvalidateResponse { invalidated: n as u32 }))
    }

    async fn similar(&self, request: Request<SimilarRequest>) -> Result<Response<SimilarResponse>, Status> {
        let span = tracing::info_span!("embark.Similar", model = %request.get_ref().model, k = request.get_ref().k);
        embark_ops::traces::extract_metadata(&span, request.metadata());
        let SimilarRequest { model, query, k, min_score, version } = request.into_inner();
        let query = match query {
            Some(Query::Key(key)) if !key.is_empty() => SimilarQuery::Key(key),
            Some(Query::Vector(v)) => SimilarQuery::Vector(v.to_vec()),
            _ => return Err(Status::invalid_argument("give a query: a non-empty `key` or a `vector`")),
        };
        let answer =
            self.front.similar_version(&model, &version, query, k as usize, min_score).instrument(span).await?;
        Ok(Response::new(SimilarResponse { keys: answer.keys, scores: answer.scores, exact: answer.exact }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_need_read_changes_need_admin_and_unknown_methods_are_closed() {
        assert_eq!(access("/embark.v1.EmbArk/Lookup"), Access::Requires(Role::Read));
        assert_eq!(access("/embark.v1.EmbArk/Similar"), Access::Requires(Role::Read));
        assert_eq!(access("/embark.v1.EmbArk/Models"), Access::Requires(Role::Read));
        assert_eq!(access("/embark.v1.EmbArk/Invalidate"), Access::Requires(Role::Admin));
        assert_eq!(access("/embark.v1.EmbArk/Reembed"), Access::Requires(Role::Admin));
        assert_eq!(access("/embark.internal.v1.X/Y"), Access::Requires(Role::Admin));
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Public);
        assert_eq!(access("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), Access::Public);
    }

    #[test]
    fn invalidate_is_limited_per_caller() {
        let limit = InvalidateLimit::new(100, 64);
        let (a, b) = (Caller::Principal("a".into()), Caller::Principal("b".into()));
        assert!(limit.take(&a, 60).is_ok());
        assert!(limit.take(&a, 40).is_ok(), "a burst of one second's worth");
        let refused = limit.take(&a, 10).expect_err("over the budget");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(limit.take(&b, 100).is_ok(), "another caller has its own budget");
        assert!(
            limit.take(&Caller::Local, 10_000).is_ok(),
            "a batch larger than the burst is capped, not refused forever"
        );
    }
}
