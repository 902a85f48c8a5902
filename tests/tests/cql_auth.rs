//! The credential and TLS flags through the real binaries: `embark
//! migrate` against the in-process CQL server requiring a password and
//! TLS (certificates made here), given by flags, files and environment;
//! and `kfc` refusing Kafka security flags that cannot work, at start.
//! The store's own tests (store/tests/cql_auth.rs) cover the failures in
//! detail; these show the flags reach them.

use std::{process::Output, time::Duration};

use cql_test_server::CqlTestServer;
use embark_tests::binary;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

const USER: &str = "embark";
const PASSWORD: &str = "tr0ub4dor&3";
const REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";

/// A CA (PEM) and a node certificate and key it signed, for 127.0.0.1.
fn certificates() -> (String, String, String) {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let node = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
    let cert = node.signed_by(&key, &issuer).expect("node certificate");
    (ca_pem, cert.pem(), key.serialize_pem())
}

/// Runs `name args` with `env`, bounded in time.
async fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio::process::Command::new(binary(name));
    cmd.args(args).envs(env.iter().copied()).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), cmd.output()).await.expect("bounded").expect("ran")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_authenticates_over_tls_with_the_flags_files_and_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = certificates();
    let server =
        CqlTestServer::builder().password(USER, PASSWORD).tls(&cert, &key, None).expect("tls").start().expect("server");
    let write = |name: &str, content: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, content).expect("write");
        path.to_str().expect("utf-8").to_owned()
    };
    let (ca, good, bad) = (write("ca.pem", &ca), write("pw", &format!("{PASSWORD}\n")), write("bad", "guess\n"));
    let url = format!("cql://{}/embark_auth", server.addr);
    let migrate = |password_file: &str| {
        let args = [
            "migrate",
            "--store",
            &url,
            "--cql-replication",
            REPLICATION,
            "--cql-username",
            USER,
            "--cql-password-file",
            password_file,
            "--cql-tls",
            "--cql-tls-ca",
            &ca,
        ]
        .map(str::to_owned);
        async move { run("embark", &args.iter().map(String::as_str).collect::<Vec<_>>(), &[]).await }
    };

    let out = migrate(&good).await;
    assert!(out.status.success(), "migrate with the password file: {}", text(&out));

    let out = migrate(&bad).await;
    assert!(!out.status.success(), "a wrong password is refused");
    assert!(text(&out).contains("authentication failed"), "{}", text(&out));
    assert!(!text(&out).contains("guess"), "the password is not printed: {}", text(&out));

    // The same through the environment, the password itself in a variable.
    let env = [
        ("EMBARK_CQL_USERNAME", USER),
        ("EMBARK_CQL_PASSWORD", PASSWORD),
        ("EMBARK_CQL_TLS", "true"),
        ("EMBARK_CQL_TLS_CA", ca.as_str()),
    ];
    let out = run("embark", &["migrate", "--store", &url, "--cql-replication", REPLICATION], &env).await;
    assert!(out.status.success(), "migrate with the environment: {}", text(&out));

    // Without credentials the node refuses.
    let out = run("embark", &["migrate", "--store", &url, "--cql-tls", "--cql-tls-ca", &ca], &[]).await;
    assert!(!out.status.success() && text(&out).contains("authentication required"), "{}", text(&out));
}

#[tokio::test]
async fn kfc_refuses_kafka_security_flags_that_cannot_work_at_start() {
    let cases: [(&[&str], &str); 3] = [
        (&["--kafka-sasl-username", "kfc"], "--kafka-sasl-username needs --kafka-security-protocol"),
        (
            &["--kafka-security-protocol", "sasl_ssl", "--kafka-sasl-mechanism", "SCRAM-SHA-512"],
            "--kafka-sasl-username",
        ),
        (&["--kafka-security-protocol", "plaintext", "--kafka-ssl-ca", "/ca.pem"], "--kafka-ssl-ca needs"),
    ];
    for (flags, want) in cases {
        let mut args = vec!["--store", "cql://127.0.0.1:9/embark", "--metrics-listen", "127.0.0.1:0"];
        args.extend_from_slice(flags);
        let out = run("kfc", &args, &[]).await;
        assert!(!out.status.success() && text(&out).contains(want), "{flags:?}: {}", text(&out));
    }
}
