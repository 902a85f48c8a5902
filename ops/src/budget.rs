//! A memory budget for request bodies, as a tower layer: every byte of a
//! request body takes a unit of one budget shared by all connections until
//! the request is done (its body dropped), and a body that would exceed it
//! fails at once with `RESOURCE_EXHAUSTED`.
//!
//! The decode limit bounds one request; the in-flight limit bounds their
//! number; only this bounds their product. Without it 512 requests of the
//! largest allowed size would each be buffered in full (16 GiB at the
//! default limits) before any handler could refuse them.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of request bodies held at once, across connections, by default.
pub const DEFAULT_REQUEST_BYTES_IN_FLIGHT: usize = 256 << 20;

/// Layer form of [`BodyBudget`].
#[derive(Debug, Clone)]
pub struct BodyBudgetLayer {
    budget: Arc<Semaphore>,
    bytes: usize,
}

impl BodyBudgetLayer {
    pub fn new(bytes: usize) -> Self {
        let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self { budget: Arc::new(Semaphore::new(bytes)), bytes }
    }
}

impl<S> tower::Layer<S> for BodyBudgetLayer {
    type Service = BodyBudget<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BodyBudget { inner, budget: self.budget.clone(), bytes: self.bytes }
    }
}

/// Wraps each request body in a [`BudgetedBody`].
#[derive(Debug, Clone)]
pub struct BodyBudget<S> {
    inner: S,
    budget: Arc<Semaphore>,
    bytes: usize,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for BodyBudget<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (parts, body) = request.into_parts();
        let body = BudgetedBody { inner: body, budget: self.budget.clone(), total: self.bytes, held: Vec::new() };
        self.inner.call(http::Request::from_parts(parts, tonic::body::Body::new(body)))
    }
}

/// A request body whose bytes are counted against the shared budget.
#[derive(Debug)]
pub struct BudgetedBody {
    inner: tonic::body::Body,
    budget: Arc<Semaphore>,
    total: usize,
    /// Released when the body is dropped.
    held: Vec<OwnedSemaphorePermit>,
}

impl Body for BudgetedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
            match self.budget.clone().try_acquire_many_owned(n) {
                Ok(permit) => self.held.push(permit),
                Err(_) => {
                    metrics::counter!("grpc_request_bytes_shed_total").increment(1);
                    return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(format!(
                        "the server holds {} MiB of requests already (--max-request-bytes-in-flight); retry shortly",
                        self.total >> 20
                    )))));
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    fn body(bytes: usize) -> tonic::body::Body {
        tonic::body::Body::new(http_body_util::Full::new(Bytes::from(vec![0u8; bytes])))
    }

    /// The budget is shared, held until a body is dropped, and a body that
    /// would exceed it fails instead of being buffered.
    #[tokio::test]
    async fn request_bodies_share_one_budget() {
        let budget = Arc::new(Semaphore::new(1000));
        let wrap = |b| BudgetedBody { inner: b, budget: budget.clone(), total: 1000, held: Vec::new() };
        let mut first = wrap(body(600));
        let frame = first.frame().await.expect("a frame").expect("within the budget");
        assert_eq!(frame.data_ref().map(|d| d.len()), Some(600));
        let mut second = wrap(body(600));
        let refused = second.frame().await.expect("a frame").expect_err("over the budget");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        drop(first);
        let mut third = wrap(body(600));
        assert!(third.frame().await.expect("a frame").is_ok(), "released when the first was dropped");
    }
}
