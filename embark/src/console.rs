//! The operator console: a web page at `/console` on the operator port
//! (`--metrics-listen`, beside `/metrics`), for the people who run EmbArk
//! and the analysts who look for near-duplicates.
//!
//! - An overview per model: coverage (vectors in its similarity index),
//!   hit rate and OOV share of looked-up keys, fills, failures by code,
//!   the miss backlog and the store breaker. The page reads the numbers
//!   from this process's own `/metrics` (what Prometheus sees, no second
//!   bookkeeping) and the models from `/console/api/models`.
//! - A near-duplicate explorer: a key or image URL, its nearest stored
//!   neighbours with scores, thumbnails and marks (`/console/api/similar`).
//!
//! The console is read-only: it can look up a key (which queues an unknown
//! one, as any Lookup does) and search, never invalidate. It has no
//! authentication of its own, like `/metrics`: the operator port binds to
//! loopback by default and belongs on the internal network
//! (docs/security.md); `--console false` turns it off. Keys are hostile
//! input: the page builds its DOM with `textContent` only, and a strict
//! Content-Security-Policy allows no inline script and no other origin
//! but images (the thumbnails, loaded by the viewer's browser from the
//! keys' own URLs, without a referrer).

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use embark_proto::embark::v1::Source;
use serde::{Deserialize, Serialize};

use crate::{
    front::{Front, FrontError, SimilarQuery},
    models::kind_name,
};

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// Neighbours the explorer asks for when the request names no `k`.
pub const DEFAULT_K: usize = 12;

/// Two vectors scoring at least this are, for every use of the vector, the
/// same: the same pixels after decoding (e.g. the same bytes under two
/// URLs), the same text, or a variant the network cannot tell apart. The
/// page marks them `identical`; below it, the page's own threshold tells
/// near-duplicates from the rest.
pub const IDENTICAL_SCORE: f32 = 0.99999;

/// No inline script or style, nothing fetched from another origin except
/// the thumbnails (`img-src`), no framing.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
     img-src http: https: data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's routes, to mount on the operator port.
pub fn router(front: Arc<Front>) -> Router {
    Router::new()
        .route("/console", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/console/console.js", get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }))
        .route("/console/console.css", get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }))
        .route("/console/api/models", get(models))
        .route("/console/api/similar", get(similar))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(front)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Every console response: the policy above, no MIME sniffing, no
/// referrer, not cached (the numbers change).
async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Debug, Serialize)]
struct ModelsAnswer {
    models: Vec<ModelView>,
}

#[derive(Debug, Serialize)]
struct ModelView {
    name: String,
    kind: &'static str,
    dim: u32,
    version: String,
    /// The version Lookups get when they name none.
    current: bool,
    /// Vectors in the model's similarity index (the stored vectors once
    /// loaded); `None` when `Similar` is off.
    coverage: Option<usize>,
    /// Whether the index finished loading from the store.
    coverage_complete: bool,
}

async fn models(State(front): State<Arc<Front>>) -> Json<ModelsAnswer> {
    // The current version of each model: the metrics below are per model.
    let models = front
        .model_infos()
        .into_iter()
        .filter(|m| m.current)
        .map(|m| {
            let coverage = front.similar_coverage(&m.name);
            ModelView {
                kind: kind_name(m.kind),
                dim: m.dim,
                version: m.version,
                current: m.current,
                coverage: coverage.map(|(n, _)| n),
                coverage_complete: coverage.is_some_and(|(_, loaded)| loaded),
                name: m.name,
            }
        })
        .collect();
    Json(ModelsAnswer { models })
}

#[derive(Debug, Deserialize)]
struct SimilarParams {
    #[serde(default)]
    model: String,
    #[serde(default)]
    q: String,
    /// Parsed by hand, so a bad number gets the API's JSON error.
    k: Option<String>,
}

#[derive(Debug, Serialize)]
struct SimilarAnswer {
    model: String,
    query: Item,
    /// True when the search was exact (a small index), false through HNSW.
    exact_search: bool,
    neighbours: Vec<Neighbour>,
}

#[derive(Debug, Serialize)]
struct Item {
    key: String,
    /// Whether the page may show the key as an image: an image model's
    /// http(s) URL.
    image: bool,
}

#[derive(Debug, Serialize)]
struct Neighbour {
    key: String,
    score: f32,
    /// The same vector as the query's (see [`IDENTICAL_SCORE`]).
    identical: bool,
    image: bool,
}

/// A console API error: `{"error": message}`, plus `source` and `queued`
/// when the query key has no vector yet.
#[derive(Debug, Serialize)]
struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    queued: Option<bool>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self { status, error: error.into(), source: None, queued: None }
    }
}

impl From<FrontError> for ApiError {
    fn from(e: FrontError) -> Self {
        let status = match &e {
            FrontError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            FrontError::NotFound(_) => StatusCode::NOT_FOUND,
            FrontError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            FrontError::FailedPrecondition(_) => StatusCode::CONFLICT,
            FrontError::Unavailable(_) | FrontError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

fn shows_as_image(kind: &str, key: &str) -> bool {
    kind == "image" && (key.starts_with("http://") || key.starts_with("https://"))
}

async fn similar(
    State(front): State<Arc<Front>>,
    Query(params): Query<SimilarParams>,
) -> Result<Json<SimilarAnswer>, ApiError> {
    let SimilarParams { model, q, k } = params;
    let k = match k.as_deref().map(str::trim) {
        None | Some("") => DEFAULT_K,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, format!("k {text:?} is not a whole number")))?,
    };
    if q.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "give a key or an image URL (q)"));
    }
    // The query's own row first (this also checks the model and the key):
    // an unknown key is queued by this Lookup and the page says so.
    let looked_up = front.lookup(&model, std::slice::from_ref(&q)).await?;
    let kind =
        front.models().infos().into_iter().find(|m| m.name == model).map_or("unspecified", |m| kind_name(m.kind));
    if front.similar_coverage(&model).is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("similarity search is off for {model:?} (--similar-max-vectors 0)"),
        ));
    }
    match looked_up.sources.first().copied() {
        Some(Source::Cache | Source::Store) => {}
        other => {
            let source = other.unwrap_or(Source::Unspecified);
            let why = match source {
                Source::OovPending => "has no vector yet; it is queued for embedding, retry in a moment",
                Source::OovFailed => {
                    "could not be embedded (its failure record is in the store); it is retried once the record expires"
                }
                _ => "could not be read from the store in time; retry shortly",
            };
            return Err(ApiError {
                status: StatusCode::CONFLICT,
                error: format!("{q:?} {why}"),
                source: Some(source.as_str_name()),
                queued: Some(source == Source::OovPending),
            });
        }
    }
    let answer = front.similar(&model, SimilarQuery::Key(q.clone()), k, -1.0).await?;
    let neighbours = answer
        .keys
        .into_iter()
        .zip(answer.scores)
        .map(|(key, score)| Neighbour {
            image: shows_as_image(kind, &key),
            identical: score >= IDENTICAL_SCORE,
            key,
            score,
        })
        .collect();
    Ok(Json(SimilarAnswer {
        query: Item { image: shows_as_image(kind, &q), key: q },
        model,
        exact_search: answer.exact,
        neighbours,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_image_models_web_urls_show_as_images() {
        assert!(shows_as_image("image", "https://cdn.example/a.jpg"));
        assert!(shows_as_image("image", "http://127.0.0.1:9/a.jpg"));
        assert!(!shows_as_image("image", "javascript:alert(1)"));
        assert!(!shows_as_image("image", "h256:00ff"));
        assert!(!shows_as_image("text", "https://cdn.example/a.jpg"));
    }

    #[test]
    fn the_policy_allows_no_inline_script_and_no_framing() {
        assert!(CONTENT_SECURITY_POLICY.contains("script-src 'self'"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-inline"));
        assert!(CONTENT_SECURITY_POLICY.contains("frame-ancestors 'none'"));
    }

    /// The page must not write keys as HTML (they are hostile input).
    #[test]
    fn the_page_never_writes_html_from_data() {
        for banned in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!CONSOLE_JS.contains(banned), "console.js uses {banned}");
        }
        assert!(!INDEX_HTML.contains("<script>"), "no inline script");
    }
}
