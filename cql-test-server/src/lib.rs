//! For tests only: a CQL v4 server on a loopback port, backed by the
//! in-memory `kassandra` engine, driven by the real `scylla` driver.
//!
//! It runs on a thread of its own (a current-thread runtime), so the
//! engine needs no `Send` and tests with any runtime can use it. Controls
//! for fault tests: [`CqlTestServer::pause`] keeps connections open but
//! stops answering (a store that hangs); [`CqlTestServer::restart`] drops
//! every connection and listens again on the same port with the same data.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use kassandra::{
    KassandraSession,
    error::DbError,
    frame::{
        request::Request,
        request_stream,
        response::{Response, error::Error},
        response_sink,
    },
};
use tokio::{net::TcpListener, sync::oneshot};

type Session = Arc<Mutex<KassandraSession>>;

pub struct CqlTestServer {
    pub addr: SocketAddr,
    session: Session,
    paused: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for CqlTestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlTestServer").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl CqlTestServer {
    /// Starts on a free loopback port with an empty database.
    pub fn start() -> std::io::Result<Self> {
        Self::start_at("127.0.0.1:0".parse().map_err(std::io::Error::other)?, Session::default())
    }

    fn start_at(addr: SocketAddr, session: Session) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let paused = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = oneshot::channel();
        let (s, p) = (session.clone(), paused.clone());
        let thread = std::thread::Builder::new().name("cql-test-server".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "cql test server runtime");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let Ok(listener) = TcpListener::from_std(listener) else { return };
                let accept = async {
                    loop {
                        if let Ok((stream, _)) = listener.accept().await {
                            let _ = stream.set_nodelay(true);
                            tokio::task::spawn_local(serve(stream, s.clone(), p.clone()));
                        }
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
            // Dropping the runtime closes every connection.
        })?;
        Ok(Self { addr, session, paused, stop: Some(stop), thread: Some(thread) })
    }

    /// Connections stay open but no request is answered until `resume`.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Drops every connection, then serves the same data on the same port.
    pub fn restart(mut self) -> std::io::Result<Self> {
        self.shutdown();
        let (addr, session) = (self.addr, self.session.clone());
        // The port is ours again once the old listener is gone.
        let mut last = None;
        for _ in 0..50 {
            match Self::start_at(addr, session.clone()) {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("restart failed")))
    }
}

impl Drop for CqlTestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(mut stream: tokio::net::TcpStream, session: Session, paused: Arc<AtomicBool>) {
    let (mut read, mut write) = stream.split();
    let mut requests = request_stream(&mut read);
    let mut responses = response_sink(&mut write);
    while let Some(frame) = requests.next().await {
        let Ok((frame, opcode, data)) = frame else { break };
        while paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let response = match Request::deserialize(opcode, &data, frame.flags) {
            // kassandra has unimplemented corners (`todo!()`); a panic there
            // becomes an error answer, as a real node would give, instead of
            // killing the server.
            Ok(request) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(&session, request)))
                .unwrap_or_else(|_| Response::Error(Error::new(DbError::ServerError, "kassandra: unimplemented"))),
            Err(e) => {
                tracing::warn!(error = ?e, "cql test server: unparsable request");
                Response::Error(Error::new(DbError::ProtocolError, "Error parsing request"))
            }
        };
        if responses.send((response, frame.stream)).await.is_err() {
            break;
        }
    }
}

fn answer(session: &Session, request: Request<'_>) -> Response {
    // A panic while locked (see `serve`) poisons the lock; the data is
    // still consistent for a test server, so keep using it.
    let mut s = session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let result = match request {
        Request::StartUp(_) | Request::Register { .. } => return Response::Ready,
        Request::Options => return Response::options(),
        Request::Query(q) => s.process(q),
        Request::Prepare(p) => s.prepare(p),
        Request::Execute(e) => s.execute(e),
        Request::Batch(b) => s.process_batch(b),
        Request::AuthResponse => return Response::Error(Error::new(DbError::ProtocolError, "no authentication here")),
    };
    match result {
        Ok(r) => Response::Result(r),
        Err(e) => Response::Error(e),
    }
}
