//! TLS, principals and roles end to end, over real TLS on loopback with
//! certificates from `embark dev-certs`: refused calls never reach the
//! store or the miss queue; mTLS refuses another CA's client certificate;
//! a rotated certificate is served without a restart (on change and on
//! SIGHUP) while open connections carry on; KFC fills through mTLS to
//! Retina.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use embark_proto::{
    embark::v1::{InvalidateRequest, LookupRequest, ModelsRequest, Source, emb_ark_client::EmbArkClient},
    retina::v1::{EmbedRequest, retina_client::RetinaClient},
};
use embark_tests::{
    Server, binary, dev_certs, eventually, free_port,
    kafka::{Broker, KfcTarget, create_topics, kfc_args, start_kafka_embark},
    migrate, tls_channel, with_token,
};
use tonic::{Code, transport::Channel};

const MODEL: &str = "minilm-l6-v2";

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).to_str().expect("utf-8 path").to_owned()
}

fn token(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.token"))).expect("token file").trim().to_owned()
}

fn lookup(keys: &[&str]) -> LookupRequest {
    LookupRequest { model: MODEL.into(), keys: keys.iter().map(|k| k.to_string()).collect(), ..Default::default() }
}

fn embark_client(channel: Channel) -> EmbArkClient<Channel> {
    EmbArkClient::new(channel).max_decoding_message_size(256 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_every_call_over_tls() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    let c = certs.path();
    dev_certs(c, &["--server", "embark", "--token", "ranker=read", "--token", "ops=admin"])?;
    let data = tempfile::tempdir()?;
    let embark = Server::start(
        &binary("embark"),
        &[
            "up",
            "--models",
            MODEL,
            "--data-dir",
            data.path().to_str().expect("utf-8"),
            "--tls-cert",
            &path(c, "embark.pem"),
            "--tls-key",
            &path(c, "embark.key"),
            "--auth-tokens",
            &path(c, "tokens.toml"),
            // A burst of 8 keys, then 1 a second.
            "--max-batch-keys",
            "8",
            "--invalidate-keys-per-second",
            "1",
        ],
    )
    .await?;
    let (read, admin) = (token(c, "ranker"), token(c, "ops"));

    // Plaintext gets nowhere near the API.
    let plain = async {
        let mut client = EmbArkClient::connect(format!("http://{}", embark.grpc)).await?;
        client.models(ModelsRequest {}).await.map_err(anyhow::Error::from)
    };
    assert!(tokio::time::timeout(Duration::from_secs(10), plain).await?.is_err(), "a plaintext call is refused");

    let mut client = embark_client(tls_channel(embark.grpc, &c.join("ca.pem"), None).await?);
    let published = || async { embark.metric("embark_misses_published_total").await };
    let before = published().await?;
    let key = "a text only a principal may have embedded";
    let refused = client.lookup(lookup(&[key])).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = client.lookup(with_token(lookup(&[key]), "not-a-token")).await.expect_err("unknown token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(!refused.message().contains("not-a-token"), "the token is not echoed: {}", refused.message());
    let refused = client.models(ModelsRequest {}).await.expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(published().await?, before, "a refused Lookup queues no miss");

    // A read principal looks up; its miss is queued and filled.
    let first = client.lookup(with_token(lookup(&[key]), &read)).await?.into_inner();
    assert_eq!(first.sources, vec![Source::OovPending as i32]);
    assert_eq!(published().await?, before + 1.0);
    eventually(Duration::from_secs(60), "the key to be filled", || {
        let (mut client, read) = (client.clone(), read.clone());
        async move {
            let r = client.lookup(with_token(lookup(&[key]), &read)).await?.into_inner();
            Ok((r.sources[0] == Source::Store as i32 || r.sources[0] == Source::Cache as i32).then_some(()))
        }
    })
    .await?;

    // ... but may not invalidate, and its attempt changes nothing.
    let invalidate =
        |keys: &[&str]| InvalidateRequest { model: MODEL.into(), keys: keys.iter().map(|k| k.to_string()).collect() };
    let refused = client.invalidate(with_token(invalidate(&[key]), &read)).await.expect_err("read role");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let after = client.lookup(with_token(lookup(&[key]), &read)).await?.into_inner();
    assert_ne!(after.sources[0], Source::OovPending as i32, "the row is still there");

    // An admin may, within its rate.
    let done = client.invalidate(with_token(invalidate(&[key]), &admin)).await?.into_inner();
    assert_eq!(done.invalidated, 1);
    let seven = ["k1", "k2", "k3", "k4", "k5", "k6", "k7"];
    client.invalidate(with_token(invalidate(&seven), &admin)).await?;
    let throttled = client.invalidate(with_token(invalidate(&["k8", "k9"]), &admin)).await.expect_err("over the rate");
    assert_eq!(throttled.code(), Code::ResourceExhausted, "{throttled:?}");
    assert!(embark.metric("embark_invalidate_throttled_total").await? >= 1.0);

    // Health stays public, over the same TLS port (it follows readiness
    // every 500 ms, so it may say NOT_SERVING for a moment after start).
    let health =
        tonic_health::pb::health_client::HealthClient::new(tls_channel(embark.grpc, &c.join("ca.pem"), None).await?);
    eventually(Duration::from_secs(10), "gRPC health to say SERVING without a token", || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest { service: "embark.v1.EmbArk".into() })
                .await?
                .into_inner()
                .status;
            Ok((status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32).then_some(()))
        }
    })
    .await?;
    assert!(embark.metric("grpc_auth_refusals_total{code=\"unauthenticated\"}").await? >= 3.0);
    assert!(!embark.log_text().contains(&read) && !embark.log_text().contains(&admin), "tokens never reach the log");
    Ok(())
}

/// Whether a call from a client presenting `identity` is refused (at the
/// handshake, or at its first call: under TLS 1.3 the server checks the
/// client's certificate after the client considers itself connected).
async fn refused(addr: SocketAddr, ca: &Path, identity: Option<(&Path, &Path)>) -> bool {
    let call = async {
        let channel = tls_channel(addr, ca, identity).await?;
        RetinaClient::new(channel).models(embark_proto::retina::v1::ModelsRequest {}).await.map_err(anyhow::Error::from)
    };
    matches!(tokio::time::timeout(Duration::from_secs(10), call).await, Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kfc_fills_through_mtls_to_retina_which_refuses_other_cas() -> anyhow::Result<()> {
    let ours = tempfile::tempdir()?;
    let theirs = tempfile::tempdir()?;
    let (a, b) = (ours.path(), theirs.path());
    dev_certs(a, &["--server", "retina", "--client", "kfc"])?;
    dev_certs(b, &["--client", "kfc"])?;
    let retina_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let retina = Server::start_on(
        &binary("retina"),
        &[
            "--models",
            MODEL,
            "--tls-cert",
            &path(a, "retina.pem"),
            "--tls-key",
            &path(a, "retina.key"),
            "--tls-client-ca",
            &path(a, "ca.pem"),
            "--auth-tokens",
            &path(a, "tokens.toml"),
        ],
        Some(retina_addr),
    )
    .await?;
    let ca = a.join("ca.pem");
    assert!(refused(retina_addr, &ca, None).await, "no client certificate");
    let (their_cert, their_key) = (b.join("kfc.pem"), b.join("kfc.key"));
    assert!(refused(retina_addr, &ca, Some((&their_cert, &their_key))).await, "a certificate of another CA");
    assert!(retina.metric_or_zero("grpc_tls_handshake_failures_total{reason=\"refused\"}").await? >= 1.0);
    let (cert, key) = (a.join("kfc.pem"), a.join("kfc.key"));
    let mut client = RetinaClient::new(tls_channel(retina_addr, &ca, Some((&cert, &key))).await?);
    let reply = client
        .embed(EmbedRequest { model: MODEL.into(), inputs: vec!["hello".into()], ..Default::default() })
        .await?
        .into_inner();
    assert_eq!((reply.dim, reply.failures.len()), (384, 0), "the principal of our client certificate may embed");

    // The whole miss path, with KFC calling Retina over mTLS.
    let broker = Broker::start()?;
    let id = free_port();
    let (miss_topic, dlq_topic, group) = (format!("misses-{id}"), format!("misses-{id}.dlq"), format!("kfc-{id}"));
    create_topics(&broker.brokers(), &miss_topic, &dlq_topic, 2).await?;
    let cql = cql_test_server::CqlTestServer::start()?;
    let store_url = format!("cql://{}/embark_tls", cql.addr);
    migrate(&store_url)?;
    let data = tempfile::tempdir()?;
    let brokers = broker.brokers();
    let embark = start_kafka_embark(MODEL, &brokers, &miss_topic, &store_url, data.path()).await?;
    let target = KfcTarget {
        brokers: &brokers,
        miss_topic: &miss_topic,
        dlq_topic: &dlq_topic,
        group: &group,
        store_url: &store_url,
        retina: retina_addr,
    };
    let mut args = kfc_args(target, 0, 2000);
    let at = args.iter().position(|a| a == "--retina").expect("a --retina flag");
    args[at + 1] = format!("https://{retina_addr}");
    for (flag, file) in [("--retina-ca", "ca.pem"), ("--retina-cert", "kfc.pem"), ("--retina-key", "kfc.key")] {
        args.extend([flag.to_owned(), path(a, file)]);
    }
    args.extend(["--retina-tls-reload-secs".to_owned(), "1".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _kfc = Server::start_on(&binary("kfc"), &args, None).await?;

    let mut client = embark.embark_client().await?;
    let keys = ["filled over mutual TLS", "a second text over mutual TLS"];
    let first = client.lookup(lookup(&keys)).await?.into_inner();
    assert_eq!(first.sources, vec![Source::OovPending as i32; 2]);
    let filled = eventually(Duration::from_secs(60), "KFC to fill through Retina over mTLS", || {
        let mut client = client.clone();
        async move {
            let r = client.lookup(lookup(&keys)).await?.into_inner();
            Ok(r.sources.iter().all(|s| *s == Source::Store as i32 || *s == Source::Cache as i32).then_some(r))
        }
    })
    .await?;
    assert_eq!(filled.dim, 384);

    // A rotation to a new CA: KFC's files are replaced by ones the new CA
    // signed, and Retina restarts with it. KFC, not restarted, must connect
    // anew with the new files (its old certificate and CA fit no more).
    let rotated = tempfile::tempdir()?;
    let c = rotated.path();
    dev_certs(c, &["--server", "retina", "--client", "kfc"])?;
    for file in ["ca.pem", "kfc.pem", "kfc.key"] {
        let tmp = a.join(format!("{file}.tmp"));
        std::fs::copy(c.join(file), &tmp)?;
        std::fs::rename(&tmp, a.join(file))?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(retina);
    let _retina = Server::start_on(
        &binary("retina"),
        &[
            "--models",
            MODEL,
            "--tls-cert",
            &path(c, "retina.pem"),
            "--tls-key",
            &path(c, "retina.key"),
            "--tls-client-ca",
            &path(c, "ca.pem"),
            "--auth-tokens",
            &path(c, "tokens.toml"),
        ],
        Some(retina_addr),
    )
    .await?;
    let keys = ["filled after the rotation"];
    assert_eq!(client.lookup(lookup(&keys)).await?.into_inner().sources, vec![Source::OovPending as i32]);
    eventually(Duration::from_secs(60), "KFC to fill with its rotated certificate", || {
        let mut client = client.clone();
        async move {
            let r = client.lookup(lookup(&keys)).await?.into_inner();
            Ok((r.sources[0] == Source::Store as i32 || r.sources[0] == Source::Cache as i32).then_some(()))
        }
    })
    .await?;
    Ok(())
}

/// Copies `dir`'s `embark.pem`/`embark.key` over `to`'s `server.*`, each
/// by rename, as a secret rotation would.
fn rotate(from: &Path, to: &Path) -> anyhow::Result<()> {
    for (src, dst) in [("embark.key", "server.key"), ("embark.pem", "server.pem")] {
        let tmp = to.join(format!("{dst}.tmp"));
        std::fs::copy(from.join(src), &tmp)?;
        std::fs::rename(&tmp, to.join(dst))?;
    }
    Ok(())
}

async fn models_ok(channel: Channel) -> anyhow::Result<()> {
    embark_client(channel).models(ModelsRequest {}).await?;
    Ok(())
}

/// Whether a new connection trusting `ca` gets a Models answer.
async fn trusted_by(addr: SocketAddr, ca: &Path) -> bool {
    let call = async { models_ok(tls_channel(addr, ca, None).await?).await };
    matches!(tokio::time::timeout(Duration::from_secs(10), call).await, Ok(Ok(())))
}

async fn serve_with_rotating_cert(live: &Path, data: &Path, reload_secs: &str) -> anyhow::Result<Server> {
    let (cert, key): (PathBuf, PathBuf) = (live.join("server.pem"), live.join("server.key"));
    Server::start(
        &binary("embark"),
        &[
            "serve",
            "--models",
            MODEL,
            "--data-dir",
            data.to_str().expect("utf-8"),
            "--tls-cert",
            cert.to_str().expect("utf-8"),
            "--tls-key",
            key.to_str().expect("utf-8"),
            "--tls-reload-secs",
            reload_secs,
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() -> anyhow::Result<()> {
    let (old, new, live, data) =
        (tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?);
    dev_certs(old.path(), &["--server", "embark"])?;
    dev_certs(new.path(), &["--server", "embark"])?;
    let (old_ca, new_ca) = (old.path().join("ca.pem"), new.path().join("ca.pem"));

    // Polled: the new files are in service within a few seconds.
    rotate(old.path(), live.path())?;
    let embark = serve_with_rotating_cert(live.path(), data.path(), "1").await?;
    let open = tls_channel(embark.grpc, &old_ca, None).await?;
    models_ok(open.clone()).await?;
    rotate(new.path(), live.path())?;
    eventually(Duration::from_secs(20), "the rotated certificate", || {
        let new_ca = new_ca.clone();
        async move { Ok(trusted_by(embark.grpc, &new_ca).await.then_some(())) }
    })
    .await?;
    models_ok(open).await.map_err(|e| anyhow::anyhow!("the connection opened before the rotation was dropped: {e}"))?;
    assert!(!trusted_by(embark.grpc, &old_ca).await, "new connections get the new certificate");
    drop(embark);

    // On SIGHUP, with polling out of the way.
    let data = tempfile::tempdir()?;
    rotate(old.path(), live.path())?;
    let embark = serve_with_rotating_cert(live.path(), data.path(), "3600").await?;
    models_ok(tls_channel(embark.grpc, &old_ca, None).await?).await?;
    rotate(new.path(), live.path())?;
    let ok = Command::new("kill").arg("-HUP").arg(embark.pid().to_string()).status()?.success();
    anyhow::ensure!(ok, "kill -HUP failed");
    eventually(Duration::from_secs(20), "the certificate reloaded on SIGHUP", || {
        let new_ca = new_ca.clone();
        async move { Ok(trusted_by(embark.grpc, &new_ca).await.then_some(())) }
    })
    .await?;
    assert!(embark.log_text().contains("reloaded"), "{}", embark.log_text());
    Ok(())
}

/// SIGHUP's default action ends a process: one with no TLS or principals
/// to reload took it as a kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_nothing_to_reload_survives_sighup() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let embark = Server::start(
        &binary("embark"),
        &["serve", "--models", MODEL, "--data-dir", data.path().to_str().expect("utf-8")],
    )
    .await?;
    let ok = Command::new("kill").arg("-HUP").arg(embark.pid().to_string()).status()?.success();
    anyhow::ensure!(ok, "kill -HUP failed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    embark.embark_client().await?.models(ModelsRequest {}).await?;
    assert!(embark.log_text().contains("SIGHUP received"), "{}", embark.log_text());
    Ok(())
}
