//! The Kafka security flags against a real broker: tansu (`$EMBARK_TANSU`)
//! started here with `--authentication`, on a loopback port.
//!
//! What tansu 0.6 checks, and so what these tests show: that a client
//! without SASL is refused, that the PLAIN handshake reaches the broker
//! (which offers SCRAM-SHA-256/512 and OAUTHBEARER only, so refuses it),
//! and that SCRAM is spoken and a user the broker does not know is refused.
//! No SASL login succeeds here: tansu's SCRAM users live in its storage,
//! which here is in memory and can only be written by an authenticated
//! client. TLS is not tested against tansu: 0.6 takes --cert/--key but
//! does not use them.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use embark_queue::kafka::{KafkaSecurityArgs, client_properties, ensure_topics, security::SaslMechanism};
use rdkafka::{
    ClientConfig, ClientContext,
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseProducer, DeliveryResult, Producer, ProducerContext},
};

fn tansu() -> PathBuf {
    let path = std::env::var_os("EMBARK_TANSU").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/embark/tansu-0.6.0-embark2/bin/tansu")
    });
    assert!(path.is_file(), "no tansu at {}: run scripts/install-tansu.sh (scripts/test.sh does)", path.display());
    path
}

/// A tansu broker that requires SASL, killed when dropped.
struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    fn start() -> Self {
        let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port");
        let url = format!("tcp://{addr}");
        let child = Command::new(tansu())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/", "--authentication", "--silent"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tansu");
        let started = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "tansu not listening on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, addr }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sasl(mechanism: SaslMechanism, user: &str, password: &str) -> KafkaSecurityArgs {
    KafkaSecurityArgs {
        kafka_security_protocol: Some(embark_queue::kafka::security::SecurityProtocol::SaslPlaintext),
        kafka_sasl_mechanism: Some(mechanism),
        kafka_sasl_username: Some(user.into()),
        kafka_sasl_password: Some(password.into()),
        ..KafkaSecurityArgs::default()
    }
}

/// Records the errors librdkafka reports on its own (an authentication
/// failure is one).
#[derive(Clone, Default)]
struct Errors(Arc<Mutex<Vec<Reported>>>);

/// An error librdkafka reported: its code and reason.
type Reported = (Option<RDKafkaErrorCode>, String);

impl ClientContext for Errors {
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((error.rdkafka_error_code(), reason.to_owned()));
    }
}

impl ProducerContext for Errors {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A metadata request with `props`: its result, and what librdkafka
/// reported meanwhile.
fn metadata(broker: &Broker, props: &[(String, String)]) -> (bool, Vec<Reported>) {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", broker.addr.to_string());
    for (k, v) in props {
        cc.set(k, v);
    }
    let errors = Errors::default();
    let producer: BaseProducer<Errors> = cc.create_with_context(errors.clone()).expect("client");
    let ok = producer.client().fetch_metadata(None, Duration::from_secs(5)).is_ok();
    // Errors reach the context when the client is polled.
    for _ in 0..10 {
        producer.poll(Duration::from_millis(100));
    }
    let seen = errors.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
    (ok, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_reaches_the_broker_and_is_refused_there() {
    let broker = Broker::start();
    let props = client_properties(&sasl(SaslMechanism::Plain, "embark", "pw"), &[]).expect("settings");
    let (ok, errors) = tokio::task::spawn_blocking(move || metadata(&broker, &props)).await.expect("task");
    // tansu 0.6 offers SCRAM-SHA-256/512 and OAUTHBEARER only: it drops
    // the connection at a PLAIN handshake.
    assert!(!ok, "tansu 0.6 has no PLAIN");
    assert!(
        errors.iter().any(|(code, reason)| *code == Some(RDKafkaErrorCode::Authentication) && reason.contains("PLAIN")),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_sasl_is_refused() {
    let broker = Broker::start();
    let props = client_properties(&KafkaSecurityArgs::default(), &[]).expect("settings");
    let created = tokio::time::timeout(
        Duration::from_secs(30),
        ensure_topics(&broker.addr.to_string(), &props, &[("embark.misses", 2)], 1, Duration::from_secs(3)),
    )
    .await
    .expect("bounded");
    assert!(created.is_err(), "the broker requires SASL: {created:?}");
}

#[cfg(feature = "kafka-tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_is_spoken_and_an_unknown_user_is_refused_as_an_authentication_failure() {
    let broker = Broker::start();
    let props = client_properties(&sasl(SaslMechanism::ScramSha512, "nobody", "pw"), &[]).expect("settings");
    let (ok, errors) = tokio::task::spawn_blocking(move || metadata(&broker, &props)).await.expect("task");
    assert!(!ok, "no such user");
    assert!(
        errors.iter().any(|(code, reason)| *code == Some(RDKafkaErrorCode::Authentication)
            && reason.contains("SCRAM")
            && reason.contains("unknown-user")),
        "{errors:?}"
    );
}
