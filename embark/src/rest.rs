//! REST/JSON beside gRPC (`--rest-listen`): `POST /v1/lookup`,
//! `POST /v1/similar`, `POST /v1/invalidate`, `GET /v1/models`, and the
//! OpenAPI document of these at `GET /v1/openapi.json`.
//!
//! Every route calls the gRPC service itself ([`EmbArkService`] through
//! the `EmbArk` trait), so a REST call gets the same validation, limits,
//! Invalidate rate and errors as a gRPC one; a [`Status`] becomes an HTTP
//! code ([`http_status`]) and a JSON body `{"error": {"code", "message"}}`.
//! The principals and roles are the gRPC server's too: the same
//! [`AuthLayer`] (reloaded together) under [`access`], which names each
//! route by the gRPC method it calls. Over TLS the listener takes the
//! gRPC server's certificate (reloaded the same way). A token is needed
//! for REST even under mTLS: a client certificate names a principal on
//! gRPC only.
//!
//! Vectors go out as JSON numbers by default, or base64 of the
//! little-endian float32 matrix (`"encoding": "base64"`), which is about a
//! third of the size and decodes exactly.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, FromRequest, Request, State, rejection::JsonRejection},
    http::StatusCode,
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use embark_ops::auth::{Access, AuthLayer, Principal};
use embark_proto::{
    embark::v1::{
        InvalidateRequest, LookupRequest, ModelsRequest, SimilarRequest, Source, VectorType, emb_ark_server::EmbArk,
        similar_request::Query,
    },
    vectors,
};
use serde::{Deserialize, Serialize};
use tonic::{Code, Status};

use crate::{models::source_name, service::EmbArkService};

/// The OpenAPI 3.0 document of the routes below (kept beside them, and
/// checked against the live server by schemathesis in the test suite).
pub const OPENAPI: &str = include_str!("rest/openapi.json");

/// Neighbours `/v1/similar` returns when the request names no `k`.
pub const DEFAULT_SIMILAR_K: u32 = 10;

/// Who may call each route: the role of the gRPC method it calls
/// ([`crate::service::access`], the one place roles are set). The
/// OpenAPI document is public; a route not named here needs `admin`.
pub fn access(path: &str) -> Access {
    let method = match path {
        "/v1/openapi.json" => return Access::Public,
        "/v1/lookup" => "Lookup",
        "/v1/similar" => "Similar",
        "/v1/models" => "Models",
        "/v1/invalidate" => "Invalidate",
        _ => return Access::Requires(embark_ops::auth::Role::Admin),
    };
    crate::service::access(&format!("/embark.v1.EmbArk/{method}"))
}

#[derive(Clone)]
struct Rest {
    service: EmbArkService,
    auth: Option<AuthLayer>,
    /// Requests in progress at most, past which `429` at once (as gRPC's
    /// `--max-in-flight` sheds with `RESOURCE_EXHAUSTED`).
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// The REST routes over `service`. `auth` is the gRPC server's layer (or
/// none without `--auth-tokens`); `max_body_bytes` bounds a request body
/// and `max_in_flight` the requests served at once.
pub fn router(service: EmbArkService, auth: Option<&AuthLayer>, max_body_bytes: usize, max_in_flight: usize) -> Router {
    let state = Rest {
        service,
        auth: auth.map(|a| a.with_policy(access)),
        in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1))),
    };
    Router::new()
        .route("/v1/lookup", post(lookup))
        .route("/v1/similar", post(similar))
        .route("/v1/invalidate", post(invalidate))
        .route("/v1/models", get(models))
        .route("/v1/openapi.json", get(openapi))
        .fallback(|| async { ApiError(Status::not_found("no such route: see GET /v1/openapi.json")) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Refuses a call without a principal of its route's role, before any
/// body is read; an admitted call carries its [`Principal`] for the
/// service (the Invalidate rate is per principal). Then sheds load past
/// the in-flight bound.
async fn admit(State(rest): State<Rest>, mut request: Request, next: Next) -> Response {
    if let Some(auth) = &rest.auth {
        match auth.admit(&request) {
            Ok(Some(principal)) => {
                request.extensions_mut().insert(principal);
            }
            Ok(None) => {}
            Err(status) => return ApiError(status).into_response(),
        }
    }
    let Ok(_permit) = rest.in_flight.clone().try_acquire_owned() else {
        return ApiError(Status::resource_exhausted("too many requests in progress; retry with backoff"))
            .into_response();
    };
    next.run(request).await
}

/// A gRPC request with the caller's principal, as the gRPC path gives it.
fn grpc_request<T>(message: T, principal: Option<Principal>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(p) = principal {
        request.extensions_mut().insert(p);
    }
    request
}

/// A JSON body, or a `400`/`413`/`415` in the API's error shape (axum's
/// own rejections are plain text).
struct Body<T>(T);

impl<S, T> FromRequest<S> for Body<T>
where
    S: Send + Sync,
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = Response;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Body(value)),
            Err(rejection) => {
                let (code, status) = match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => ("RESOURCE_EXHAUSTED", StatusCode::PAYLOAD_TOO_LARGE),
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => ("INVALID_ARGUMENT", StatusCode::UNSUPPORTED_MEDIA_TYPE),
                    _ => ("INVALID_ARGUMENT", StatusCode::BAD_REQUEST),
                };
                Err(error_body(status, code, &rejection.body_text()))
            }
        }
    }
}

/// A status as the REST API answers it.
struct ApiError(Status);

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        Self(status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_body(http_status(self.0.code()), code_name(self.0.code()), self.0.message())
    }
}

fn error_body(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(ErrorBody { error: ErrorDetail { code: code.to_owned(), message: message.to_owned() } }))
        .into_response()
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Serialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

/// The HTTP code of a gRPC status, as Google's HTTP mapping of
/// `google.rpc.Code` has it.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `INVALID_ARGUMENT`, `NOT_FOUND`...: the gRPC code's name, as clients of
/// both APIs know it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// How a Lookup answer carries its vectors.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    /// `vectors`: one array of `dim` numbers per key.
    #[default]
    Floats,
    /// `vectors_base64`: the little-endian float32 matrix, row-major.
    Base64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LookupBody {
    model: String,
    keys: Vec<String>,
    /// The model version; absent: the current one.
    #[serde(default)]
    version: String,
    #[serde(default)]
    encoding: Encoding,
    /// `f32` (default), `f16`, `bf16` or `i8`.
    #[serde(default)]
    vector_type: Option<String>,
}

#[derive(Debug, Serialize)]
struct LookupAnswer {
    model: String,
    /// The version every row belongs to.
    version: String,
    dim: u32,
    /// Per key: CACHE, STORE, OOV_PENDING, OOV_FAILED, OOV_UNAVAILABLE.
    sources: Vec<&'static str>,
    /// Per key: true where the row is a real vector (CACHE or STORE).
    mask: Vec<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vectors: Option<Vec<Vec<f32>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vectors_base64: Option<String>,
    vector_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scales_base64: Option<String>,
}

async fn lookup(
    State(rest): State<Rest>,
    principal: Option<axum::Extension<Principal>>,
    Body(body): Body<LookupBody>,
) -> Result<Json<LookupAnswer>, ApiError> {
    let vector_type = match body.vector_type.as_deref() {
        None => VectorType::F32,
        Some(name) => vectors::parse_type(name).ok_or_else(|| {
            ApiError::from(Status::invalid_argument(format!("unknown vector_type {name:?}; known: f32, f16, bf16, i8")))
        })?,
    };
    let request = LookupRequest {
        model: body.model.clone(),
        keys: body.keys,
        version: body.version,
        vector_type: vector_type as i32,
    };
    let answer = rest.service.lookup(grpc_request(request, principal.map(|p| p.0))).await?.into_inner();
    let matrix = answer.matrix();
    let real = |s: &i32| *s == Source::Cache as i32 || *s == Source::Store as i32;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let (vectors, vectors_base64, scales_base64) = match body.encoding {
        Encoding::Base64 => (None, Some(b64(&matrix)), (vector_type == VectorType::I8).then(|| b64(&answer.scales))),
        Encoding::Floats => {
            let dim = answer.dim as usize;
            let floats = vectors::decode_matrix(vector_type, &matrix, &answer.scales, dim).unwrap_or_default();
            let rows = floats.chunks(dim.max(1)).take(answer.sources.len());
            (Some(rows.map(<[f32]>::to_vec).collect()), None, None)
        }
    };
    Ok(Json(LookupAnswer {
        model: body.model,
        version: answer.version,
        dim: answer.dim,
        mask: answer.sources.iter().map(real).collect(),
        sources: answer.sources.iter().copied().map(source_name).collect(),
        vectors,
        vectors_base64,
        vector_type: vectors::type_name(vector_type),
        scales_base64,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimilarBody {
    model: String,
    #[serde(default)]
    version: String,
    key: Option<String>,
    vector: Option<Vec<f32>>,
    k: Option<u32>,
    min_score: Option<f32>,
}

#[derive(Debug, Serialize)]
struct Neighbour {
    key: String,
    score: f32,
}

#[derive(Debug, Serialize)]
struct SimilarAnswer {
    model: String,
    neighbours: Vec<Neighbour>,
    /// Whether the search was exact (a scan) rather than approximate.
    exact: bool,
}

async fn similar(
    State(rest): State<Rest>,
    principal: Option<axum::Extension<Principal>>,
    Body(body): Body<SimilarBody>,
) -> Result<Json<SimilarAnswer>, ApiError> {
    let query = match (body.key, body.vector) {
        (Some(key), None) => Query::Key(key),
        (None, Some(v)) => Query::Vector(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into()),
        _ => return Err(Status::invalid_argument("give exactly one of `key` and `vector`").into()),
    };
    let request = SimilarRequest {
        model: body.model.clone(),
        query: Some(query),
        k: body.k.unwrap_or(DEFAULT_SIMILAR_K),
        min_score: body.min_score.unwrap_or(0.0),
        version: body.version,
    };
    let answer = rest.service.similar(grpc_request(request, principal.map(|p| p.0))).await?.into_inner();
    let neighbours = answer.keys.into_iter().zip(answer.scores).map(|(key, score)| Neighbour { key, score }).collect();
    Ok(Json(SimilarAnswer { model: body.model, neighbours, exact: answer.exact }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateBody {
    model: String,
    keys: Vec<String>,
}

#[derive(Debug, Serialize)]
struct InvalidateAnswer {
    model: String,
    invalidated: u32,
}

async fn invalidate(
    State(rest): State<Rest>,
    principal: Option<axum::Extension<Principal>>,
    Body(body): Body<InvalidateBody>,
) -> Result<Json<InvalidateAnswer>, ApiError> {
    let request = InvalidateRequest { model: body.model.clone(), keys: body.keys };
    let answer = rest.service.invalidate(grpc_request(request, principal.map(|p| p.0))).await?.into_inner();
    Ok(Json(InvalidateAnswer { model: body.model, invalidated: answer.invalidated }))
}

#[derive(Debug, Serialize)]
struct ModelRow {
    name: String,
    /// `image` or `text`.
    kind: &'static str,
    dim: u32,
    version: String,
    /// Whether a request naming no version gets this one.
    current: bool,
    /// Coverage: stored vectors of this version, as last counted.
    stored_vectors: u64,
    stored_vectors_counted_at_unix_ms: i64,
}

#[derive(Debug, Serialize)]
struct ModelsAnswer {
    models: Vec<ModelRow>,
}

async fn models(
    State(rest): State<Rest>,
    principal: Option<axum::Extension<Principal>>,
) -> Result<Json<ModelsAnswer>, ApiError> {
    let answer = rest.service.models(grpc_request(ModelsRequest {}, principal.map(|p| p.0))).await?.into_inner();
    let models = answer
        .models
        .into_iter()
        .map(|m| ModelRow {
            kind: crate::models::kind_name(m.kind),
            name: m.name,
            dim: m.dim,
            version: m.version,
            current: m.current,
            stored_vectors: m.stored_vectors,
            stored_vectors_counted_at_unix_ms: m.stored_vectors_counted_at_unix_ms,
        })
        .collect();
    Ok(Json(ModelsAnswer { models }))
}

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// Serves `router` on `incoming` (plaintext or TLS connections, each
/// holding a connection slot) over HTTP/1.1, or HTTP/2 where TLS
/// negotiated it, until `shutdown`; requests in
/// progress are finished first.
pub async fn serve<S, Io>(
    incoming: S,
    local: SocketAddr,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()>
where
    S: futures::Stream<Item = std::io::Result<Io>> + Send + 'static,
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let listener = StreamListener { incoming: Box::pin(incoming), local };
    axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

/// An accepted-connection stream as axum's listener. The address is the
/// listening one: peers are named by their principal, not their address.
struct StreamListener<S> {
    incoming: std::pin::Pin<Box<S>>,
    local: SocketAddr,
}

impl<S, Io> axum::serve::Listener for StreamListener<S>
where
    S: futures::Stream<Item = std::io::Result<Io>> + Send + 'static,
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures::StreamExt as _;
        loop {
            match self.incoming.next().await {
                Some(Ok(io)) => return (io, self.local),
                // A failed handshake or accept is counted and backed off
                // by the stream itself; the next connection is served.
                Some(Err(_)) => continue,
                // The stream never ends while polled; if it did, accept
                // nothing more rather than spin.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embark_ops::auth::Role;

    #[test]
    fn each_route_needs_the_role_of_its_grpc_method() {
        assert_eq!(access("/v1/lookup"), Access::Requires(Role::Read));
        assert_eq!(access("/v1/similar"), Access::Requires(Role::Read));
        assert_eq!(access("/v1/models"), Access::Requires(Role::Read));
        assert_eq!(access("/v1/invalidate"), Access::Requires(Role::Admin));
        assert_eq!(access("/v1/openapi.json"), Access::Public);
        assert_eq!(access("/v1/anything-else"), Access::Requires(Role::Admin));
    }

    #[test]
    fn statuses_map_to_http_as_google_apis_do() {
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(http_status(Code::ResourceExhausted), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::PermissionDenied), StatusCode::FORBIDDEN);
        assert_eq!(http_status(Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(http_status(Code::FailedPrecondition), StatusCode::CONFLICT);
    }

    #[test]
    fn the_openapi_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
        for path in ["/v1/lookup", "/v1/similar", "/v1/invalidate", "/v1/models", "/v1/openapi.json"] {
            assert!(doc["paths"].get(path).is_some(), "{path} is documented");
        }
    }
}
