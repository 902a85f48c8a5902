//! `embark serve` on the CQL store (served in-process by this test with
//! kassandra, reached through the real `scylla` driver): Lookups end to
//! end, and a store that stops answering: Lookups end at their deadline,
//! unanswered rows are OOV_UNAVAILABLE and not queued, cached
//! rows keep flowing, the breaker opens and closes again (seen in /metrics);
//! and `Similar` indexes the CQL store and picks up vectors written later.

use std::time::Duration;

use cql_test_server::CqlTestServer;
use embark_proto::embark::v1::{LookupRequest, Source};
use embark_store::{
    EmbeddingStore,
    cql::{CqlConfig, CqlStore},
};
use embark_tests::{Server, binary, eventually};
use tonic_health::pb::health_check_response::ServingStatus;

const MODEL: &str = "minilm-l6-v2";
use embark_tests::TEST_REPLICATION as REPLICATION;

/// One test at a time: the first reads the store under a 200 ms deadline,
/// which a neighbour test sharing the 2 cores could make real reads miss.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `embark serve` of [`MODEL`] on the CQL store at `url` (its own data
/// directory, returned first so it outlives the server), with `extra` flags.
async fn serve_on(url: &str, extra: &[&str]) -> anyhow::Result<(tempfile::TempDir, Server)> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_str().expect("utf-8");
    let mut args = vec!["serve", "--data-dir", dir, "--store", url, "--models", MODEL];
    args.extend_from_slice(extra);
    let server = Server::start(&binary("embark"), &args).await?;
    Ok((data, server))
}

fn sources(raw: &[i32]) -> Vec<Source> {
    raw.iter().map(|s| Source::try_from(*s).expect("known source")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_from_cql_and_survives_a_store_that_stops_answering() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cql = CqlTestServer::start()?;
    let url = format!("cql://{}/embark_e2e", cql.addr);

    // The schema comes from the explicit command.
    embark_tests::migrate(&url)?;

    // Vectors written by someone else (KFC, a backfill).
    let cfg = CqlConfig { replication: REPLICATION.into(), ..CqlConfig::from_url(&url)? };
    let writer = CqlStore::connect(&cfg).await?;
    let stored: Vec<(String, Vec<f32>)> =
        (0..20).map(|i| (format!("stored text {i}"), vec![i as f32 / 10.0; 384])).collect();
    writer.put_vectors(&embark_tests::stored_as(MODEL), stored).await?;

    let (_data, embark) = serve_on(
        &url,
        &["--store-deadline-ms", "200", "--store-breaker-failures", "3", "--store-breaker-cool-down-ms", "1000"],
    )
    .await?;
    let mut client = embark.embark_client().await?;
    let lookup = |keys: Vec<String>| LookupRequest { model: MODEL.into(), keys, ..Default::default() };

    let r = client.lookup(lookup(vec!["stored text 1".into(), "never seen".into()])).await?.into_inner();
    assert_eq!(sources(&r.sources), vec![Source::Store, Source::OovPending]);
    assert_eq!(embark_tests::rows(&r.vectors, 384)[0], vec![0.1f32; 384]);
    let r = client.lookup(lookup(vec!["stored text 1".into()])).await?.into_inner();
    assert_eq!(sources(&r.sources), vec![Source::Cache]);
    let published = embark.metric("embark_misses_published_total").await?;

    // The store stops answering. Each Lookup returns, without its store
    // row, while the store is paused: the deadline ended the read (the
    // timeout counter below says so; how long it took is not asserted, on
    // 2 shared cores that measures the machine).
    cql.pause();
    for i in 2..6 {
        let r = client.lookup(lookup(vec!["stored text 1".into(), format!("stored text {i}")])).await?.into_inner();
        assert_eq!(sources(&r.sources), vec![Source::Cache, Source::OovUnavailable], "lookup {i}");
    }
    assert_eq!(embark.metric("embark_store_breaker_open").await?, 1.0, "3 late reads open the breaker");
    assert!(embark.metric("embark_store_breaker_opens_total").await? >= 1.0);
    // At least: the background prober may have timed out a probe too.
    assert!(embark.metric("embark_store_timeouts_total").await? >= 3.0);
    // While open, the store is skipped (not read and waited for); cached
    // rows still flow. The 5th Lookup above was skipped already.
    let skipped = embark.metric("embark_store_skipped_reads_total").await?;
    assert!(skipped >= 1.0, "the Lookup after the third late read skipped the store");
    let r = client.lookup(lookup(vec!["stored text 1".into(), "stored text 9".into()])).await?.into_inner();
    assert_eq!(sources(&r.sources), vec![Source::Cache, Source::OovUnavailable]);
    assert!(embark.metric("embark_store_skipped_reads_total").await? > skipped, "an open breaker skips the store");
    let series = format!("embark_lookup_keys_total{{model=\"{MODEL}\",source=\"oov_unavailable\"}}");
    assert_eq!(embark.metric(&series).await?, 5.0);
    assert_eq!(embark.metric("embark_misses_published_total").await?, published, "unavailable rows are not queued");
    // Readiness tells the truth: not ready while the breaker is open, on
    // /readyz and in gRPC health alike.
    let ready = reqwest::get(format!("http://{}/readyz", embark.metrics)).await?;
    assert_eq!(ready.status().as_u16(), 503);
    assert!(ready.text().await?.contains("store breaker"), "/readyz names the reason");
    eventually(Duration::from_secs(5), "gRPC health to say NOT_SERVING", || async {
        Ok((health(&embark).await? == ServingStatus::NotServing).then_some(()))
    })
    .await?;

    // The store comes back: after the cool-down a probe closes the breaker.
    cql.resume();
    eventually(Duration::from_secs(20), "the breaker to close and the store to answer", || {
        let mut client = client.clone();
        async move {
            let r = client.lookup(lookup(vec!["stored text 9".into()])).await?.into_inner();
            Ok((r.sources == vec![Source::Store as i32]).then_some(()))
        }
    })
    .await?;
    assert_eq!(embark.metric("embark_store_breaker_open").await?, 0.0);
    eventually(Duration::from_secs(5), "ready again, in /readyz and gRPC health", || async {
        let ready = reqwest::get(format!("http://{}/readyz", embark.metrics)).await?.status().is_success();
        Ok((ready && health(&embark).await? == ServingStatus::Serving).then_some(()))
    })
    .await?;
    Ok(())
}

/// The overall status of the gRPC health service.
async fn health(server: &embark_tests::Server) -> anyhow::Result<ServingStatus> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.grpc))?.connect().await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?.into_inner();
    Ok(ServingStatus::try_from(status.status)?)
}

/// `embark serve` loads `Similar`'s index from the CQL store at start and
/// picks up vectors other processes (KFC, a backfill) write afterwards by
/// its periodic rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_indexes_the_cql_store_and_picks_up_vectors_written_later() -> anyhow::Result<()> {
    use embark_proto::embark::v1::{SimilarRequest, similar_request::Query};
    let _serial = SERIAL.lock().await;

    let cql = CqlTestServer::start()?;
    let url = format!("cql://{}/embark_similar", cql.addr);
    let cfg = CqlConfig { replication: REPLICATION.into(), ..CqlConfig::from_url(&url)? };
    CqlStore::migrate(&cfg).await?;
    let writer = CqlStore::connect(&cfg).await?;
    // Unit vectors along the axes, and one near axis 0.
    let axis = |i: usize| (0..384).map(|j| if j == i { 1.0 } else { 0.0 }).collect::<Vec<f32>>();
    writer
        .put_vectors(&embark_tests::stored_as(MODEL), (0..50).map(|i| (format!("axis {i}"), axis(i))).collect())
        .await?;

    let (_data, embark) = serve_on(&url, &["--similar-refresh-secs", "1"]).await?;
    let client = embark.embark_client().await?;
    let query = |v: Vec<f32>| SimilarRequest {
        model: MODEL.into(),
        query: Some(Query::Vector(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into())),
        k: 2,
        min_score: 0.5,
        ..Default::default()
    };
    let first = embark_tests::similar_once_loaded(&client, query(axis(0)), Duration::from_secs(30)).await?;
    assert_eq!(first.keys, ["axis 0"], "only axis 0 scores above 0.5");
    assert!(first.exact);

    // Written by another process after start: found after a rescan.
    let mut near = axis(0);
    near[1] = 0.2;
    writer.put_vectors(&embark_tests::stored_as(MODEL), vec![("near axis 0".into(), near)]).await?;
    let after = eventually(Duration::from_secs(30), "the rescan to index the new vector", || {
        let mut client = client.clone();
        let request = query(axis(0));
        async move {
            let r = client.similar(request).await?.into_inner();
            Ok((r.keys.len() == 2).then_some(r))
        }
    })
    .await?;
    assert_eq!(after.keys, ["axis 0", "near axis 0"]);
    assert!((after.scores[1] - 1.0 / 1.04f32.sqrt()).abs() < 1e-4, "{:?}", after.scores);
    Ok(())
}
