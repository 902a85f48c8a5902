//! The monitoring files (`ops/monitoring/`: the Grafana dashboard and the
//! Prometheus alert rules) against what the binaries really export.
//!
//! Runs the distributed stack (tansu, the CQL test server, `retina`,
//! `embark serve` publishing to Kafka, `kfc`) and then an `embark up` with
//! tokens and both models, sends traffic through each (texts filled, a
//! poison input that ends as a dead letter, a junk Kafka message, an image
//! fetched and embedded, a 404, a call without a token), scrapes every
//! `/metrics` into one directory and runs `scripts/check_monitoring.py
//! names` on it: every metric name and matched label of the dashboard and
//! the rules must be in a scrape, or be an `event` metric of
//! `ops/monitoring/unscraped-metrics.txt` (one that only a failure renders)
//! registered in the source. Unlike the standalone run of
//! `scripts/check-monitoring.sh`, the Kafka metrics must be scraped here.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use cql_test_server::CqlTestServer;
use embark_proto::embark::v1::{LookupRequest, Source, emb_ark_client::EmbArkClient};
use embark_tests::{
    Server, binary, dev_certs, eventually, free_port,
    http_fixtures::ImageServer,
    kafka::{Broker, KfcTarget, create_topics, kfc_args, produce, start_kafka_embark},
    migrate, with_token,
};
use tonic::transport::Channel;

const TEXT: &str = "minilm-l6-v2";
const IMAGE: &str = "efficientnet-lite0";

fn lookup(model: &str, keys: &[String]) -> LookupRequest {
    LookupRequest { model: model.into(), keys: keys.to_vec(), ..Default::default() }
}

/// Looks `keys` of `model` up (with `token`, if any) until none is
/// OOV_PENDING: each is filled or has a failure record.
async fn until_settled(
    client: &EmbArkClient<Channel>,
    model: &str,
    keys: &[String],
    token: Option<&str>,
) -> anyhow::Result<()> {
    eventually(Duration::from_secs(90), "every miss filled or failed", || {
        let mut client = client.clone();
        let request = match token {
            Some(t) => with_token(lookup(model, keys), t),
            None => tonic::Request::new(lookup(model, keys)),
        };
        async move {
            let r = client.lookup(request).await?.into_inner();
            Ok(r.sources.iter().all(|s| *s != Source::OovPending as i32).then_some(()))
        }
    })
    .await
}

/// Polls `server` until the series `series` (as rendered) is at least 1.
async fn until_counted(server: &Server, series: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(30), series, || async move {
        Ok((server.metric_or_zero(series).await? >= 1.0).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_use_only_exported_metrics() -> anyhow::Result<()> {
    let scrapes = tempfile::tempdir()?;
    let texts: Vec<String> =
        ["a red running shoe", "a blue running shoe", "a green garden chair"].iter().map(|s| (*s).to_owned()).collect();

    // The distributed stack, wired on loopback with fresh topic and group
    // names; scraped, then stopped before `embark up` starts.
    {
        let broker = Broker::start()?;
        let brokers = broker.brokers();
        let id = free_port();
        let (miss_topic, dlq_topic, group) = (format!("misses-{id}"), format!("misses-{id}.dlq"), format!("kfc-{id}"));
        create_topics(&brokers, &miss_topic, &dlq_topic, 2).await?;
        let cql = CqlTestServer::start()?;
        let store_url = format!("cql://{}/embark_monitoring", cql.addr);
        migrate(&store_url)?;
        let retina_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        // Inputs over 300 bytes are refused for good: a poison input.
        let retina =
            Server::start_on(&binary("retina"), &["--models", TEXT, "--max-input-bytes", "300"], Some(retina_addr))
                .await?;
        let data = tempfile::tempdir()?;
        let serve = start_kafka_embark(TEXT, &brokers, &miss_topic, &store_url, data.path()).await?;
        let target = KfcTarget {
            brokers: &brokers,
            miss_topic: &miss_topic,
            dlq_topic: &dlq_topic,
            group: &group,
            store_url: &store_url,
            retina: retina_addr,
        };
        let kfc_owned = kfc_args(target, 0, 2000);
        let kfc_flags: Vec<&str> = kfc_owned.iter().map(String::as_str).collect();
        let kfc = Server::start_on(&binary("kfc"), &kfc_flags, None).await?;

        let mut keys = texts.clone();
        keys.push("p".repeat(400));
        let client = serve.embark_client().await?;
        client.clone().lookup(lookup(TEXT, &keys)).await?;
        produce(&brokers, &miss_topic, vec![(b"junk".to_vec(), b"\xff\xfe not a MissEvent".to_vec())]).await?;
        until_settled(&client, TEXT, &keys, None).await?;
        client.clone().lookup(lookup(TEXT, &keys)).await?; // from the tier
        until_counted(&kfc, "kfc_dead_letters_total").await?;
        until_counted(&kfc, "kfc_commits_total{when=\"periodic\"}").await?;

        for (name, server) in [("embark-serve-kafka", &serve), ("kfc", &kfc), ("retina", &retina)] {
            std::fs::write(scrapes.path().join(format!("{name}.prom")), server.metrics_text().await?)?;
        }
    }

    // `embark up` with tokens and both models: the local miss queue, the
    // in-process fill loop and Retina (an image fetched, a 404), and a
    // refused call.
    let images = ImageServer::start().await?;
    let certs = tempfile::tempdir()?;
    dev_certs(certs.path(), &["--token", "ranker=read"])?;
    let token = std::fs::read_to_string(certs.path().join("ranker.token"))?;
    let up_data = tempfile::tempdir()?;
    let models = format!("{TEXT},{IMAGE}");
    let up = Server::start(
        &binary("embark"),
        &[
            "up",
            "--models",
            &models,
            "--data-dir",
            up_data.path().to_str().expect("utf-8 path"),
            "--fetch-allow-nets",
            "127.0.0.0/8",
            "--auth-tokens",
            certs.path().join("tokens.toml").to_str().expect("utf-8 path"),
        ],
    )
    .await?;
    let client = up.embark_client().await?;
    let urls = vec![images.url("/img/cat.jpg"), images.url("/missing")];
    client.clone().lookup(with_token(lookup(TEXT, &texts), &token)).await?;
    client.clone().lookup(with_token(lookup(IMAGE, &urls), &token)).await?;
    until_settled(&client, TEXT, &texts, Some(&token)).await?;
    until_settled(&client, IMAGE, &urls, Some(&token)).await?;
    client.clone().lookup(with_token(lookup(TEXT, &texts), &token)).await?;
    let refused = client.clone().lookup(lookup(TEXT, &texts)).await.expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    std::fs::write(scrapes.path().join("embark-up.prom"), up.metrics_text().await?)?;

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/check_monitoring.py");
    let out = Command::new("python3").arg(&script).arg("names").arg("--scrapes").arg(scrapes.path()).output()?;
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{report}");
    assert!(out.status.success(), "the dashboard or the rules use metrics the binaries do not export:\n{report}");
    Ok(())
}
