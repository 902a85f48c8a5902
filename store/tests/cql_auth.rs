//! The CQL store against a node that requires a password, TLS, or both
//! (the in-process CQL server, through the real `scylla` driver, on
//! loopback). Certificates are made here with rcgen: a CA, a node's
//! certificate, a client's.
//!
//! What the test server checks: the user name and password of SASL PLAIN
//! (`PasswordAuthenticator`), and TLS (rustls) with an optional client
//! certificate. It has no SCRAM, Kerberos or LDAP, no roles or permissions.

use std::{path::PathBuf, time::Duration};

use cql_test_server::CqlTestServer;
use embark_store::{
    EmbeddingStore, StoreError, StoredRow,
    cql::{CqlAuth, CqlConfig, CqlError, CqlStore, CqlTls},
    secret::Secret,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

const USER: &str = "embark";
const PASSWORD: &str = "correct horse battery staple";
/// Every test ends well within this, or fails.
const BOUND: Duration = Duration::from_secs(60);

/// A certificate authority that signs node and client certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        Self { pem, issuer: Issuer::new(params, key) }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), and its
    /// key, PEM.
    fn issue(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("client"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.issuer).expect("leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    fn node(&self, names: &[&str]) -> (String, String) {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)
    }
}

/// Files in a directory that lives as long as the test.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("tempdir"))
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, content).expect("write");
        path
    }
}

fn config(server: &CqlTestServer) -> CqlConfig {
    CqlConfig {
        nodes: vec![server.addr.to_string()],
        keyspace: "embark_auth".into(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..CqlConfig::default()
    }
}

fn auth(password: &str) -> Option<CqlAuth> {
    Some(CqlAuth { username: USER.into(), password: Secret::new(password) })
}

/// Migrates, connects, writes a vector and reads it back.
async fn round_trip(cfg: &CqlConfig) -> Result<(), StoreError> {
    CqlStore::migrate(cfg).await?;
    let store = CqlStore::connect(cfg).await?;
    store.put_vectors("m", vec![("k".into(), vec![0.5, 1.5])]).await?;
    let rows = store.get_many("m", &["k".into()]).await?;
    assert!(matches!(&rows[0], Some(StoredRow::Vector { vector, .. }) if vector == &[0.5, 1.5]), "{rows:?}");
    Ok(())
}

/// The CQL error inside a refusal, which must not be transient (the same
/// settings fail every time).
fn rejected(e: &StoreError) -> &CqlError {
    eprintln!("refused: {e}");
    assert!(!e.is_transient(), "a refusal of our settings is not transient: {e}");
    match e {
        StoreError::CqlRejected(c) => c,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, f).await.expect("the test ends in bounded time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_credentials_read_and_write() {
    bounded(async {
        let server = CqlTestServer::builder().password(USER, PASSWORD).start().expect("server");
        let cfg = CqlConfig { auth: auth(PASSWORD), ..config(&server) };
        round_trip(&cfg).await.expect("authenticated round trip");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_as_an_authentication_failure() {
    bounded(async {
        let server = CqlTestServer::builder().password(USER, PASSWORD).start().expect("server");
        let cfg = CqlConfig { auth: auth("not the password"), ..config(&server) };
        let e = CqlStore::connect(&cfg).await.expect_err("wrong password");
        assert!(matches!(rejected(&e), CqlError::Authentication { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("authentication failed") && text.contains(USER), "{text}");
        assert!(text.contains(cql_test_server::BAD_CREDENTIALS), "the server's own word: {text}");
        assert!(!text.contains("not the password") && !format!("{e:?}").contains("not the password"), "{e:?}");
        // And a wrong user name alike.
        let cfg = CqlConfig {
            auth: Some(CqlAuth { username: "mallory".into(), password: Secret::new(PASSWORD) }),
            ..config(&server)
        };
        let e = CqlStore::migrate(&cfg).await.expect_err("wrong user");
        assert!(matches!(rejected(&e), CqlError::Authentication { .. }), "{e:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_are_refused_by_a_server_that_requires_them() {
    bounded(async {
        let server = CqlTestServer::builder().password(USER, PASSWORD).start().expect("server");
        let e = CqlStore::connect(&config(&server)).await.expect_err("no credentials");
        assert!(matches!(rejected(&e), CqlError::AuthenticationRequired { .. }), "{e:?}");
        assert!(e.to_string().contains("--cql-username"), "{e}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_node_s_ca_connects_and_serves() {
    bounded(async {
        let files = Files::new();
        let ca = Ca::new("test CA");
        let (cert, key) = ca.node(&["localhost", "127.0.0.1"]);
        let server = CqlTestServer::builder()
            .password(USER, PASSWORD)
            .tls(&cert, &key, None)
            .expect("tls")
            .start()
            .expect("server");
        let tls = CqlTls { ca: Some(files.write("ca.pem", &ca.pem)), ..CqlTls::default() };
        // Checked against the node's address (the driver's own check).
        let cfg = CqlConfig { auth: auth(PASSWORD), tls: Some(tls.clone()), ..config(&server) };
        round_trip(&cfg).await.expect("TLS round trip, by address");
        // Checked against a name the certificate carries.
        let cfg = CqlConfig {
            auth: auth(PASSWORD),
            tls: Some(CqlTls { server_name: Some("localhost".into()), ..tls }),
            ..config(&server)
        };
        round_trip(&cfg).await.expect("TLS round trip, by name");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    bounded(async {
        let files = Files::new();
        let (ours, theirs) = (Ca::new("our CA"), Ca::new("another CA"));
        let (cert, key) = theirs.node(&["localhost", "127.0.0.1"]);
        let server = CqlTestServer::builder().tls(&cert, &key, None).expect("tls").start().expect("server");
        let cfg = CqlConfig {
            tls: Some(CqlTls { ca: Some(files.write("ca.pem", &ours.pem)), ..CqlTls::default() }),
            ..config(&server)
        };
        let e = CqlStore::connect(&cfg).await.expect_err("not our CA");
        assert!(matches!(rejected(&e), CqlError::Tls { .. }), "{e:?}");
        assert!(e.to_string().contains("certificate verify failed"), "OpenSSL's reason: {e}");
        // A name the certificate carries does not make up for the CA.
        let cfg = CqlConfig {
            tls: Some(CqlTls {
                ca: Some(files.write("ca.pem", &ours.pem)),
                server_name: Some("localhost".into()),
                ..CqlTls::default()
            }),
            ..config(&server)
        };
        let e = CqlStore::connect(&cfg).await.expect_err("not our CA, whatever the name");
        assert!(matches!(rejected(&e), CqlError::Tls { .. }), "{e:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_must_carry_the_server_name() {
    bounded(async {
        let files = Files::new();
        let ca = Ca::new("test CA");
        // A name only, no address: what a cluster's shared certificate has.
        let (cert, key) = ca.node(&["*.db.test"]);
        let server = CqlTestServer::builder().tls(&cert, &key, None).expect("tls").start().expect("server");
        let tls = |name: Option<&str>| CqlTls {
            ca: Some(files.write("ca.pem", &ca.pem)),
            server_name: name.map(str::to_owned),
            ..CqlTls::default()
        };
        let cfg = CqlConfig { tls: Some(tls(Some("node1.db.test"))), ..config(&server) };
        round_trip(&cfg).await.expect("the wildcard covers the name");
        for wrong in [None, Some("db.test"), Some("node1.other.test"), Some("a.node1.db.test")] {
            let cfg = CqlConfig { tls: Some(tls(wrong)), ..config(&server) };
            let e = CqlStore::connect(&cfg).await.expect_err("the certificate does not carry the name");
            assert!(matches!(rejected(&e), CqlError::Tls { .. }), "{wrong:?}: {e:?}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_requires_a_client_certificate_gets_ours() {
    bounded(async {
        let files = Files::new();
        let ca = Ca::new("test CA");
        let (cert, key) = ca.node(&["127.0.0.1"]);
        let server = CqlTestServer::builder().tls(&cert, &key, Some(&ca.pem)).expect("tls").start().expect("server");
        let (client_cert, client_key) = ca.issue(&["embark-client"], ExtendedKeyUsagePurpose::ClientAuth);
        let ca_file = files.write("ca.pem", &ca.pem);
        let cfg = CqlConfig {
            tls: Some(CqlTls {
                ca: Some(ca_file.clone()),
                client_cert: Some((files.write("client.pem", &client_cert), files.write("client.key", &client_key))),
                ..CqlTls::default()
            }),
            ..config(&server)
        };
        round_trip(&cfg).await.expect("with a client certificate");

        let cfg = CqlConfig { tls: Some(CqlTls { ca: Some(ca_file), ..CqlTls::default() }), ..config(&server) };
        // Under TLS 1.3 the node refuses after the client's handshake is
        // done: the driver sees a broken connection, not a TLS error.
        CqlStore::connect(&cfg).await.expect_err("no client certificate");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_are_named() {
    bounded(async {
        let files = Files::new();
        let server = CqlTestServer::start().expect("server");
        let missing = files.0.path().join("missing.pem");
        let cfg = CqlConfig { tls: Some(CqlTls { ca: Some(missing), ..CqlTls::default() }), ..config(&server) };
        let e = CqlStore::connect(&cfg).await.expect_err("no CA file");
        assert!(matches!(rejected(&e), CqlError::TlsFile { .. }) && e.to_string().contains("missing.pem"), "{e}");

        let not_pem = files.write("ca.pem", "not a certificate");
        let cfg = CqlConfig { tls: Some(CqlTls { ca: Some(not_pem), ..CqlTls::default() }), ..config(&server) };
        let e = CqlStore::connect(&cfg).await.expect_err("no certificate in the CA file");
        assert!(e.to_string().contains("ca.pem"), "{e}");
    })
    .await
}
