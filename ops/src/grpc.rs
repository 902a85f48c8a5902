//! What every gRPC server of the project adds to its own services: the
//! standard health service, reflection (so `grpcurl` works without .proto
//! files), transport settings tuned for large responses, and the limits
//! (connections, streams, requests in flight) that keep a server's memory
//! bounded under any load.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tonic::transport::{Server, server::Connected};

/// How much a gRPC server takes on at once. Past these it refuses rather
/// than queues, so memory stays bounded whatever the clients do.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Open connections; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// HTTP/2 streams per connection (`SETTINGS_MAX_CONCURRENT_STREAMS`):
    /// a client cannot open 10k streams on one connection.
    pub max_streams_per_connection: u32,
    /// Requests in progress across all connections; beyond it a request is
    /// answered `RESOURCE_EXHAUSTED` at once (load shedding), never queued.
    pub max_in_flight: usize,
    /// Bytes of request bodies held at once across connections
    /// ([`crate::budget`]): what bounds in-flight requests times their size.
    pub max_request_bytes_in_flight: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_streams_per_connection: 256,
            max_in_flight: 512,
            max_request_bytes_in_flight: crate::budget::DEFAULT_REQUEST_BYTES_IN_FLIGHT,
        }
    }
}

/// The layers [`server_builder`] puts around every service, outermost
/// first: load shedding, the global concurrency limit, the body budget.
pub type LimitLayers = tower::layer::util::Stack<
    crate::budget::BodyBudgetLayer,
    tower::layer::util::Stack<
        tower::limit::GlobalConcurrencyLimitLayer,
        tower::layer::util::Stack<tower::load_shed::LoadShedLayer, tower::layer::util::Identity>,
    >,
>;

/// [`LimitLayers`] for `limits`. The shedder sees the limit's readiness,
/// so request `max_in_flight + 1` is refused at once instead of waiting
/// for a slot; only admitted requests take from the body budget.
pub fn limit_layers(limits: &ServerLimits) -> LimitLayers {
    use tower::layer::util::{Identity, Stack};
    Stack::new(
        crate::budget::BodyBudgetLayer::new(limits.max_request_bytes_in_flight),
        Stack::new(
            tower::limit::GlobalConcurrencyLimitLayer::new(limits.max_in_flight.max(1)),
            Stack::new(tower::load_shed::LoadShedLayer::new(), Identity::new()),
        ),
    )
}

/// A server builder with the project's transport settings and limits.
///
/// Responses carry matrices of hundreds of KiB: larger HTTP/2 windows and
/// frames let one response go out without waiting on window updates;
/// TCP_NODELAY keeps small replies from waiting on Nagle; keepalives find
/// dead peers. Streams per connection are bounded, and [`limit_layers`]
/// refuse work past `max_in_flight` requests or
/// `max_request_bytes_in_flight` bytes with `RESOURCE_EXHAUSTED` instead
/// of queueing it.
pub fn server_builder(
    limits: &ServerLimits,
    request_timeout: Duration,
) -> Server<tower::layer::util::Stack<LimitLayers, tower::layer::util::Identity>> {
    Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some((1 << 20) - 1))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(limits.max_streams_per_connection.max(1)))
        .timeout(request_timeout)
        .layer(limit_layers(limits))
}

/// Reflection services (v1 and v1alpha, for older grpcurl) over the
/// encoded descriptor set.
pub fn reflection(
    descriptors: &'static [u8],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Says so when a server listens beyond loopback unprotected (`protected`:
/// TLS on, and callers named by tokens or client certificates).
pub fn warn_if_exposed(addr: std::net::SocketAddr, protected: bool) {
    if !(addr.ip().is_loopback() || protected) {
        tracing::warn!(%addr, "gRPC listens beyond loopback without TLS and named callers (--tls-cert, --auth-tokens or --tls-client-ca): see docs/security.md");
    }
}

/// A listener [`incoming`] accepts from: TCP or a Unix socket.
pub trait Accept: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        // `Server::tcp_nodelay` applies only when tonic binds the port
        // itself; without it each small reply waits ~40 ms for the peer's
        // delayed ACK (Nagle).
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// A connection holding one of [`incoming`]'s slots until it closes.
#[derive(Debug)]
pub struct LimitedIo<T> {
    io: T,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl<T> LimitedIo<T> {
    /// The connection and its slot, to wrap the connection (in TLS) while
    /// the slot stays held.
    pub(crate) fn into_parts(self) -> (T, tokio::sync::OwnedSemaphorePermit) {
        (self.io, self._slot)
    }

    pub(crate) fn from_parts(io: T, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self { io, _slot: slot }
    }
}

impl<T: Connected> Connected for LimitedIo<T> {
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for LimitedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for LimitedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The first delay after an accept error that is not about one connection
/// (out of file descriptors, memory); doubled up to [`MAX_ACCEPT_BACKOFF`].
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Whether an accept error concerns only the connection being accepted
/// (the peer gave up): accept the next one at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted)
}

/// The connections of `listener`, at most `max_connections` open at once
/// (each holds a slot until it closes; further clients wait in the
/// kernel's backlog). An accept error such as EMFILE is logged, counted
/// (`grpc_accept_errors_total`) and followed by a growing pause instead of
/// a hot loop; the stream itself never ends or fails.
pub fn incoming<L: Accept>(
    listener: L,
    max_connections: usize,
) -> impl futures::Stream<Item = std::io::Result<LimitedIo<L::Io>>> + Send + 'static {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        let slot = slots.clone().acquire_owned().await.ok()?;
        let mut backoff = MIN_ACCEPT_BACKOFF;
        loop {
            match listener.accept().await {
                Ok(io) => return Some((Ok(LimitedIo { io, _slot: slot }), (listener, slots))),
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, pause = ?backoff, "accepting a connection failed");
                    metrics::counter!("grpc_accept_errors_total").increment(1);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener whose accepts fail with EMFILE a number of times.
    struct Exhausted {
        failures: std::sync::atomic::AtomicUsize,
        inner: tokio::net::TcpListener,
    }

    impl Accept for Exhausted {
        type Io = tokio::net::TcpStream;
        async fn accept(&self) -> std::io::Result<Self::Io> {
            if self.failures.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                return Err(std::io::Error::from_raw_os_error(24)); // EMFILE
            }
            self.failures.store(0, std::sync::atomic::Ordering::SeqCst);
            Ok(self.inner.accept().await?.0)
        }
    }

    /// Defect 11.16: tonic's own accept loop retried EMFILE at once, a
    /// hot loop burning a core while the process was out of descriptors.
    #[tokio::test]
    async fn the_accept_loop_spins_on_emfile() {
        use futures::StreamExt;
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = inner.local_addr().expect("addr");
        let listener = Exhausted { failures: 5.into(), inner };
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let started = std::time::Instant::now();
        let mut conns = Box::pin(incoming(listener, 4));
        let first = conns.next().await.expect("a connection").expect("no error surfaces");
        // 10 + 20 + 40 + 80 + 160 ms of pauses, not five instant retries.
        assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
        drop(first);
    }

    /// Past `max_in_flight` a request is refused at once (it would
    /// otherwise queue without bound), and tonic maps the refusal to
    /// `RESOURCE_EXHAUSTED`.
    #[tokio::test]
    async fn requests_past_the_in_flight_limit_are_shed() {
        use tower::{Layer, Service, ServiceExt};
        let slow = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok::<_, std::convert::Infallible>(())
        });
        let limits = ServerLimits { max_in_flight: 1, ..ServerLimits::default() };
        let service = limit_layers(&limits).layer(slow);
        let (mut a, mut b) = (service.clone(), service);
        let request = || http::Request::new(tonic::body::Body::empty());
        let first = tokio::spawn(async move { a.ready().await.expect("ready").call(request()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = b.ready().await.expect("ready").call(request()).await.expect_err("shed");
        assert!(refused.is::<tower::load_shed::error::Overloaded>(), "{refused}");
        assert_eq!(tonic::Status::from_error(refused).code(), tonic::Code::ResourceExhausted);
        assert!(first.await.expect("task").is_ok(), "the request in flight is served");
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_for_a_slot() {
        use futures::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut conns = Box::pin(incoming(listener, 1));
        let _a = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _b = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let first = conns.next().await.expect("stream").expect("conn");
        let second = tokio::time::timeout(Duration::from_millis(200), conns.next()).await;
        assert!(second.is_err(), "the second connection waits while the first is open");
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), conns.next()).await;
        assert!(matches!(second, Ok(Some(Ok(_)))), "then it is accepted");
    }
}
