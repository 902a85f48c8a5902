//! TLS for the gRPC servers and their clients, on rustls.
//!
//! A server's certificate, key and (for mTLS) client CA come from PEM
//! files ([`TlsServerArgs`]); the [`rustls::ServerConfig`] built from them
//! is [`Reloadable`]: rotated files are served to new connections within a
//! poll interval or at once on SIGHUP, and open connections keep theirs,
//! so a rotation drops nothing. [`tls_incoming`] handshakes every accepted
//! connection in a task of its own, bounded in time, so a client that
//! stalls mid-handshake cannot hold up the accept loop.
//!
//! Why not tonic's `ServerTlsConfig`: it is fixed at start (no rotation)
//! and handshakes inside tonic's accept loop, where our connection limit
//! ([`crate::grpc::incoming`]) could not count a connection until after
//! its handshake.

use std::{path::PathBuf, sync::Arc, time::Duration};

use futures::StreamExt;
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_util::sync::CancellationToken;

use crate::{
    grpc::{Accept, LimitedIo},
    reload::{self, Reloadable},
};

/// A client that has not finished its handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS flags every gRPC server shares.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsServerArgs {
    /// Serve gRPC over TLS with this certificate chain (PEM, leaf first).
    /// Reloaded when the file changes or on SIGHUP.
    #[arg(long, env = "EMBARK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "EMBARK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require clients to present a certificate signed by this CA (PEM):
    /// mutual TLS. Needs --tls-cert.
    #[arg(long, env = "EMBARK_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the certificate files are compared with those in service.
    #[arg(long, env = "EMBARK_TLS_RELOAD_SECS", default_value_t = reload::DEFAULT_RELOAD_EVERY.as_secs())]
    pub tls_reload_secs: u64,
}

/// The PEM files a server's TLS configuration is read from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {source}")]
    Rejected {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("client CA {path}: {source}")]
    ClientCa {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

impl TlsServerArgs {
    /// The files, if TLS is asked for.
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }

    /// Loads the configuration (refusing bad files now, at start) and keeps
    /// it in step with the files until `stop`. `None` without --tls-cert.
    pub fn start(&self, stop: &CancellationToken) -> Result<Option<Arc<Reloadable<ServerConfig>>>, TlsError> {
        let Some(files) = self.files() else { return Ok(None) };
        let config = Arc::new(Reloadable::new(files.load()?));
        let mut watched = vec![files.cert.clone(), files.key.clone()];
        watched.extend(files.client_ca.clone());
        reload::watch(
            "tls",
            watched,
            Duration::from_secs(self.tls_reload_secs),
            config.clone(),
            move || files.load(),
            stop.clone(),
        );
        Ok(Some(config))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's provider: ring's suites with the AES-128-GCM ones first.
/// A Lookup answer is hundreds of KiB, so the bulk cipher is most of what
/// TLS costs per request, and AES-128 runs 10 AES rounds where AES-256 runs
/// 14. AES-128-GCM is TLS 1.3's mandatory suite and within every current
/// recommendation (NIST SP 800-52r2, Mozilla's "modern" profile); the
/// server picks by its own order ([`ServerConfig::ignore_client_order`]),
/// as rustls clients list AES-256 first.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// The certificates of a PEM file (at least one).
pub fn read_certificates(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read { path: path.clone(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.clone() });
    }
    Ok(certs)
}

impl TlsFiles {
    /// A server configuration from the files: HTTP/2 first (gRPC), then
    /// HTTP/1.1 for REST clients that offer nothing else, TLS 1.2
    /// and 1.3 with rustls' safe defaults, the key checked against the
    /// certificate, client certificates required when a client CA is set.
    pub fn load(&self) -> Result<ServerConfig, TlsError> {
        let certs = read_certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|source| TlsError::Read { path: self.key.clone(), source })?;
        let builder = ServerConfig::builder_with_provider(server_provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rejected { path: self.cert.clone(), source })?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certificates(path)? {
                    roots.add(cert).map_err(|source| TlsError::Rejected { path: path.clone(), source })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|source| TlsError::ClientCa { path: path.clone(), source })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|source| TlsError::Rejected { path: self.key.clone(), source })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ignore_client_order = true;
        Ok(config)
    }
}

/// The connections of `listener` (at most `max_connections` open, as
/// [`crate::grpc::incoming`]), each through a TLS handshake with the
/// configuration in service when it was accepted. A failed or timed-out
/// handshake closes that connection only and is counted
/// (`grpc_tls_handshake_failures_total`); the stream never ends while
/// it is polled.
pub fn tls_incoming<L: Accept>(
    listener: L,
    max_connections: usize,
    config: Arc<Reloadable<ServerConfig>>,
) -> impl futures::Stream<Item = std::io::Result<LimitedIo<tokio_rustls::server::TlsStream<L::Io>>>> + Send + 'static {
    // Room for the handshakes that finish while tonic spawns the previous
    // connection; the slots bound the connections whatever its size.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let done = CancellationToken::new();
    let guard = done.clone().drop_guard();
    tokio::spawn(async move {
        let mut plain = Box::pin(crate::grpc::incoming(listener, max_connections));
        loop {
            let conn = tokio::select! {
                // The server stopped polling (shut down): stop accepting.
                _ = done.cancelled() => return,
                conn = plain.next() => conn,
            };
            let conn = match conn {
                Some(Ok(conn)) => conn,
                Some(Err(_)) => continue,
                None => return,
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                let (io, slot) = conn.into_parts();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(LimitedIo::from_parts(tls, slot))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        metrics::counter!("grpc_tls_handshake_failures_total", "reason" => "refused").increment(1);
                    }
                    Err(_) => {
                        metrics::counter!("grpc_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                    }
                }
            });
        }
    });
    futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let conn = rx.recv().await?;
        Some((conn, (rx, guard)))
    })
}

/// The files of a client of one of our gRPC servers (KFC's are
/// `--retina-ca`...): see [`client_tls`].
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// The CA that signed the server's certificate (PEM): `https://` URLs
    /// need it.
    pub ca: Option<PathBuf>,
    /// A client certificate and key for servers that require mTLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A client file that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientTlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("a client certificate needs its key, and a key its certificate")]
    HalfIdentity,
    #[error("an https:// server needs the CA that signed its certificate (--*-ca)")]
    NoCa,
}

/// tonic's TLS configuration for a client from `files`, for the server
/// named `domain` (checked against its certificate). Reads the files once,
/// at start: a rotated CA or client certificate takes a restart of the
/// client.
pub fn client_tls(files: &ClientTlsFiles, domain: &str) -> Result<tonic::transport::ClientTlsConfig, ClientTlsError> {
    let read =
        |path: &PathBuf| std::fs::read(path).map_err(|source| ClientTlsError::Read { path: path.clone(), source });
    let ca = files.ca.as_ref().ok_or(ClientTlsError::NoCa)?;
    let mut config = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?))
        .domain_name(domain);
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            config = config.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
        }
        (None, None) => {}
        _ => return Err(ClientTlsError::HalfIdentity),
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(
        dir: &std::path::Path,
        name: &str,
        cert: &rcgen::Certificate,
        key: &rcgen::KeyPair,
    ) -> (PathBuf, PathBuf) {
        let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    #[test]
    fn bad_files_are_refused_with_their_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params").self_signed(&key).expect("cert");
        let (cert_path, key_path) = write_pair(dir.path(), "server", &cert, &key);
        let good = TlsFiles { cert: cert_path.clone(), key: key_path.clone(), client_ca: None };
        assert!(good.load().is_ok());

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let err = TlsFiles { cert: empty.clone(), ..good.clone() }.load().expect_err("no certificate");
        assert!(err.to_string().contains("empty.pem"), "{err}");

        let other = rcgen::KeyPair::generate().expect("key");
        let other_key = dir.path().join("other.key");
        std::fs::write(&other_key, other.serialize_pem()).expect("write");
        let err = TlsFiles { key: other_key, ..good.clone() }.load().expect_err("a key of another certificate");
        assert!(err.to_string().contains("other.key"), "{err}");

        let missing = TlsFiles { client_ca: Some(dir.path().join("nope.pem")), ..good };
        assert!(missing.load().expect_err("missing CA").to_string().contains("nope.pem"));
    }

    #[test]
    fn the_server_chooses_aes_128_gcm_over_a_client_preferring_aes_256() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert =
            rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params").self_signed(&key).expect("cert");
        let (cert_path, key_path) = write_pair(dir.path(), "server", &cert, &key);
        let server_config = TlsFiles { cert: cert_path, key: key_path, client_ca: None }.load().expect("load");
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        // A stock rustls client: it lists TLS13_AES_256_GCM_SHA384 first.
        let client_provider = provider();
        assert_eq!(client_provider.cipher_suites[0].suite(), rustls::CipherSuite::TLS13_AES_256_GCM_SHA384);
        let client_config = rustls::ClientConfig::builder_with_provider(client_provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut client = rustls::ClientConnection::new(Arc::new(client_config), name).expect("client");
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).expect("server");
        // The handshake through in-memory buffers.
        for _ in 0..10 {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).expect("client write");
            server.read_tls(&mut wire.as_slice()).expect("server read");
            server.process_new_packets().expect("server process");
            let mut wire = Vec::new();
            server.write_tls(&mut wire).expect("server write");
            client.read_tls(&mut wire.as_slice()).expect("client read");
            client.process_new_packets().expect("client process");
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!server.is_handshaking(), "handshake did not finish");
        let chosen = server.negotiated_cipher_suite().expect("a suite").suite();
        assert_eq!(chosen, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
}
