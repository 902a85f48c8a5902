//! For tests only: a CQL v4 server on a loopback port, backed by the
//! in-memory `kassandra` engine, driven by the real `scylla` driver.
//!
//! It runs on a thread of its own (a current-thread runtime), so the
//! engine needs no `Send` and tests with any runtime can use it. Controls
//! for fault tests: [`CqlTestServer::pause`] keeps connections open but
//! stops answering (a store that hangs); [`CqlTestServer::restart`] drops
//! every connection and listens again on the same port with the same data.
//!
//! Optionally ([`CqlTestServer::builder`]) it requires a user name and
//! password, as Cassandra's `PasswordAuthenticator` does (SASL PLAIN in one
//! AUTH_RESPONSE; no SCRAM, Kerberos or LDAP), and speaks TLS only
//! (rustls), with client certificates checked against a CA if one is given.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use kassandra::{
    KassandraSession,
    error::DbError,
    frame::{
        FrameFlags, FrameParams,
        request::{Request, RequestOpcode},
        request_stream,
        response::{Response, ResponseFrameCodec, ResponseOpcode, error::Error},
    },
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::oneshot,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::FramedWrite;

type Session = Arc<Mutex<KassandraSession>>;

/// The authenticator a node that checks passwords names in AUTHENTICATE.
pub const PASSWORD_AUTHENTICATOR: &str = "org.apache.cassandra.auth.PasswordAuthenticator";
/// What Cassandra answers a wrong user name or password (error 0x0100).
pub const BAD_CREDENTIALS: &str = "Provided username and/or password are incorrect";

/// What a server requires of its clients: see [`CqlTestServer::builder`].
#[derive(Clone, Default)]
struct Options {
    /// User name and password a client must present (SASL PLAIN).
    credentials: Option<(String, String)>,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Settings of a server that requires credentials or TLS.
#[derive(Debug, Default)]
pub struct CqlTestServerBuilder {
    options: Options,
}

impl CqlTestServerBuilder {
    /// Clients must authenticate as `user` with `password`
    /// (`PasswordAuthenticator`).
    pub fn password(mut self, user: &str, password: &str) -> Self {
        self.options.credentials = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// Speak TLS only, as the node of `cert_chain_pem` (leaf first) with
    /// `key_pem`. With `client_ca_pem`, a client must present a
    /// certificate that CA signed.
    pub fn tls(mut self, cert_chain_pem: &str, key_pem: &str, client_ca_pem: Option<&str>) -> std::io::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(cert_chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(std::io::Error::other)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(std::io::Error::other)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?;
        let builder = match client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(cert.map_err(std::io::Error::other)?).map_err(std::io::Error::other)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(std::io::Error::other)?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder.with_single_cert(certs, key).map_err(std::io::Error::other)?;
        self.options.tls = Some(TlsAcceptor::from(Arc::new(config)));
        Ok(self)
    }

    /// Starts on a free loopback port with an empty database.
    pub fn start(self) -> std::io::Result<CqlTestServer> {
        let addr = "127.0.0.1:0".parse().map_err(std::io::Error::other)?;
        CqlTestServer::start_at(addr, Session::default(), self.options)
    }
}

pub struct CqlTestServer {
    pub addr: SocketAddr,
    session: Session,
    options: Options,
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
    /// Starts on a free loopback port with an empty database, open to
    /// anyone, without TLS.
    pub fn start() -> std::io::Result<Self> {
        Self::builder().start()
    }

    /// A server that requires a password, or TLS, or both.
    pub fn builder() -> CqlTestServerBuilder {
        CqlTestServerBuilder::default()
    }

    fn start_at(addr: SocketAddr, session: Session, options: Options) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let paused = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = oneshot::channel();
        let (s, p, o) = (session.clone(), paused.clone(), options.clone());
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
                            let (s, p, o) = (s.clone(), p.clone(), o.clone());
                            tokio::task::spawn_local(async move {
                                match &o.tls {
                                    None => serve(stream, s, p, o.credentials).await,
                                    Some(tls) => match tls.accept(stream).await {
                                        Ok(stream) => serve(stream, s, p, o.credentials).await,
                                        // A client that does not trust us, or
                                        // that we do not trust: no session.
                                        Err(e) => tracing::debug!(error = %e, "cql test server: TLS handshake"),
                                    },
                                }
                            });
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
        Ok(Self { addr, session, options, paused, stop: Some(stop), thread: Some(thread) })
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
        let (addr, session, options) = (self.addr, self.session.clone(), self.options.clone());
        // The port is ours again once the old listener is gone.
        let mut last = None;
        for _ in 0..50 {
            match Self::start_at(addr, session.clone(), options.clone()) {
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

async fn serve(
    stream: impl AsyncRead + AsyncWrite,
    session: Session,
    paused: Arc<AtomicBool>,
    credentials: Option<(String, String)>,
) {
    let (read, write) = tokio::io::split(stream);
    let mut requests = request_stream(read);
    let mut responses = FramedWrite::new(write, ResponseFrameCodec);
    // As a node with PasswordAuthenticator: nothing but OPTIONS, STARTUP
    // and AUTH_RESPONSE is served before the client has authenticated.
    let mut authenticated = credentials.is_none();
    while let Some(frame) = requests.next().await {
        let Ok((frame, opcode, data)) = frame else { break };
        while paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let raw = |opcode: ResponseOpcode, body: Bytes| {
            (FrameParams { version: frame.version, flags: FrameFlags::empty(), stream: frame.stream }, opcode, body)
        };
        let response = match (&credentials, opcode) {
            (Some(_), RequestOpcode::Startup) if !authenticated => {
                let sent =
                    responses.send(raw(ResponseOpcode::Authenticate, short_string(PASSWORD_AUTHENTICATOR))).await;
                if sent.is_err() {
                    break;
                }
                continue;
            }
            (Some((user, password)), RequestOpcode::AuthResponse) => {
                if plain_credentials(&data).is_some_and(|(u, p)| u == user.as_bytes() && p == password.as_bytes()) {
                    authenticated = true;
                    // AUTH_SUCCESS with a null token.
                    if responses.send(raw(ResponseOpcode::AuthSuccess, Bytes::from_static(&[0xff; 4]))).await.is_err() {
                        break;
                    }
                    continue;
                }
                Response::Error(Error::new(DbError::AuthenticationError, BAD_CREDENTIALS))
            }
            // kassandra cannot parse one (it would panic).
            (None, RequestOpcode::AuthResponse) => {
                Response::Error(Error::new(DbError::ProtocolError, "no authentication here"))
            }
            (Some(_), RequestOpcode::Options) => Response::options(),
            (Some(_), op) if !authenticated => Response::Error(Error::new(
                DbError::ProtocolError,
                format!("unexpected {op:?} before authentication (expecting a SASL response)"),
            )),
            _ => match Request::deserialize(opcode, &data, frame.flags) {
                // kassandra has unimplemented corners (`todo!()`); a panic there
                // becomes an error answer, as a real node would give, instead of
                // killing the server.
                Ok(request) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| answer(&session, request)))
                    .unwrap_or_else(|_| Response::Error(Error::new(DbError::ServerError, "kassandra: unimplemented"))),
                Err(e) => {
                    tracing::warn!(error = ?e, "cql test server: unparsable request");
                    Response::Error(Error::new(DbError::ProtocolError, "Error parsing request"))
                }
            },
        };
        if responses.send((response, frame.stream)).await.is_err() {
            break;
        }
    }
}

/// A CQL `[string]`: a u16 length, then the bytes.
fn short_string(s: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(2 + s.len());
    b.put_u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
    b.put_slice(s.as_bytes());
    b.freeze()
}

/// The user name and password of an AUTH_RESPONSE body: a `[bytes]` token
/// in SASL PLAIN form, `authzid \0 user \0 password`.
fn plain_credentials(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, token) = body.split_first_chunk::<4>()?;
    let token = token.get(..usize::try_from(i32::from_be_bytes(*len)).ok()?)?;
    let mut parts = token.splitn(3, |b| *b == 0);
    let (_authzid, user, password) = (parts.next()?, parts.next()?, parts.next()?);
    Some((user, password))
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
        // `serve` answers AUTH_RESPONSE itself.
        Request::AuthResponse => return Response::Error(Error::new(DbError::ProtocolError, "no authentication here")),
    };
    match result {
        Ok(r) => Response::Result(r),
        Err(e) => Response::Error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tokens_parse() {
        let body = |token: &[u8]| {
            let mut b = (token.len() as i32).to_be_bytes().to_vec();
            b.extend_from_slice(token);
            b
        };
        assert_eq!(plain_credentials(&body(b"\0alice\0s3cret")), Some((&b"alice"[..], &b"s3cret"[..])));
        // A password may hold a NUL; only the first two split.
        assert_eq!(plain_credentials(&body(b"\0alice\0a\0b")), Some((&b"alice"[..], &b"a\0b"[..])));
        assert_eq!(plain_credentials(&body(b"alice")), None);
        assert_eq!(plain_credentials(&[0, 0, 0, 9, 0]), None, "shorter than its length");
        assert_eq!(plain_credentials(&[0xff, 0xff, 0xff, 0xff]), None, "a null token");
    }
}
