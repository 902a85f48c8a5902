//! One key's path from its miss to its fill is one trace, exported over
//! OTLP to a test receiver (the collector's gRPC trace service):
//! - `embark up` with the image model: the ranker's trace context in gRPC
//!   metadata → Lookup → store read and miss publish → (the miss in the
//!   local queue) → the fill round → store read, embed (→ fetch, decode,
//!   inference on the model's thread), store write;
//! - distributed: `embark serve` → Kafka (context in the message headers)
//!   → `kfc` → Retina over gRPC (context in the metadata) → the store,
//!   three processes exporting into one trace.

use std::{net::SocketAddr, time::Duration};

use cql_test_server::CqlTestServer;
use embark_proto::embark::v1::{LookupRequest, Source};
use embark_tests::{
    Server, binary, eventually, free_port,
    http_fixtures::ImageServer,
    kafka::{Broker, KfcTarget, create_topics, kfc_args, start_kafka_embark_with},
    migrate,
    otlp::{OtlpReceiver, ReceivedSpan},
};

const MODEL: &str = "minilm-l6-v2";
const IMAGE_MODEL: &str = "efficientnet-lite0";

/// The ranker's own span, which the Lookup joins.
const TRACE_ID: &str = "5b8efff798038103d269b633813fc60c";
const RANKER_SPAN: &str = "eee19b7ec3c1b174";

/// A Lookup of `key` that carries the ranker's trace context.
fn traced_lookup(model: &str, key: &str) -> tonic::Request<LookupRequest> {
    let mut request =
        tonic::Request::new(LookupRequest { model: model.into(), keys: vec![key.into()], ..Default::default() });
    let traceparent = format!("00-{TRACE_ID}-{RANKER_SPAN}-01");
    request.metadata_mut().insert("traceparent", traceparent.parse().expect("ASCII"));
    request
}

/// Looks `key` up (untraced) until it has a vector.
async fn until_filled(embark: &Server, model: &str, key: &str) -> anyhow::Result<()> {
    let client = embark.embark_client().await?;
    eventually(Duration::from_secs(60), "the key to be filled", || {
        let mut client = client.clone();
        async move {
            let answer = client
                .lookup(LookupRequest { model: model.into(), keys: vec![key.into()], ..Default::default() })
                .await?
                .into_inner();
            Ok(matches!(Source::try_from(answer.sources[0]), Ok(Source::Cache | Source::Store)).then_some(()))
        }
    })
    .await
}

/// The span of `trace` named `name` (exactly one).
fn span<'a>(trace: &'a [ReceivedSpan], name: &str) -> anyhow::Result<&'a ReceivedSpan> {
    let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
    anyhow::ensure!(found.len() == 1, "{} spans named {name} in the trace: {trace:#?}", found.len());
    Ok(found[0])
}

/// Waits until the trace holds every span of `tree`, then checks each
/// one's service and parent: `(service, name, parent name)`, the parent
/// `None` for the Lookup (whose parent is the ranker's span).
async fn assert_tree(
    receiver: &OtlpReceiver,
    tree: &[(&str, &str, Option<&str>)],
) -> anyhow::Result<Vec<ReceivedSpan>> {
    // The batch exporters send every 5 s by default.
    let trace = eventually(Duration::from_secs(60), "every span of the miss's trace", || async {
        let trace = receiver.trace(TRACE_ID);
        Ok(tree.iter().all(|(_, name, _)| trace.iter().any(|s| s.name == *name)).then_some(trace))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; received: {:#?}", receiver.spans()))?;
    for (service, name, parent) in tree {
        let s = span(&trace, name)?;
        anyhow::ensure!(s.service == *service, "{name} was exported by {:?}, not {service}", s.service);
        let want_parent = match parent {
            Some(p) => span(&trace, p)?.span_id.clone(),
            None => RANKER_SPAN.to_owned(),
        };
        anyhow::ensure!(
            s.parent_span_id == want_parent,
            "{name}'s parent is {:?}, not {parent:?} ({want_parent}): {trace:#?}",
            s.parent_span_id
        );
    }
    Ok(trace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_miss_is_one_trace_from_lookup_to_fill_in_embark_up() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let images = ImageServer::start().await?;
    let data = tempfile::tempdir()?;
    let endpoint = receiver.endpoint();
    let embark = Server::start(
        &binary("embark"),
        &[
            "up",
            "--models",
            IMAGE_MODEL,
            "--data-dir",
            data.path().to_str().expect("UTF-8"),
            // The image is served on loopback.
            "--fetch-allow-nets",
            "127.0.0.0/8",
            "--otlp-endpoint",
            &endpoint,
        ],
    )
    .await?;
    let key = images.url("/img/cat.jpg");
    let mut client = embark.embark_client().await?;
    let answer = client.lookup(traced_lookup(IMAGE_MODEL, &key)).await?.into_inner();
    assert_eq!(answer.sources, vec![Source::OovPending as i32]);
    until_filled(&embark, IMAGE_MODEL, &key).await?;

    assert_tree(
        &receiver,
        &[
            ("embark", "embark.Lookup", None),
            ("embark", "store.read", Some("embark.Lookup")),
            ("embark", "miss.publish", Some("embark.Lookup")),
            // Through the local queue: the context in the queued miss.
            ("embark", "kfc.fill", Some("miss.publish")),
            ("embark", "kfc.store.read", Some("kfc.fill")),
            ("embark", "kfc.embed", Some("kfc.fill")),
            ("embark", "retina.fetch", Some("kfc.embed")),
            ("embark", "retina.decode", Some("kfc.embed")),
            // On the model's own thread, handed the caller's span.
            ("embark", "retina.infer", Some("kfc.embed")),
            ("embark", "kfc.store.write", Some("kfc.fill")),
        ],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_miss_is_one_trace_across_embark_kafka_kfc_and_retina() -> anyhow::Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let broker = Broker::start()?;
    let id = free_port();
    let (miss_topic, dlq_topic, group) = (format!("misses-{id}"), format!("misses-{id}.dlq"), format!("kfc-{id}"));
    create_topics(&broker.brokers(), &miss_topic, &dlq_topic, 2).await?;
    let cql = CqlTestServer::start()?;
    let store_url = format!("cql://{}/embark_traces", cql.addr);
    migrate(&store_url)?;

    let retina_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let _retina =
        Server::start_on(&binary("retina"), &["--models", MODEL, "--otlp-endpoint", &endpoint], Some(retina_addr))
            .await?;
    let data = tempfile::tempdir()?;
    let brokers = broker.brokers();
    let embark =
        start_kafka_embark_with(MODEL, &brokers, &miss_topic, &store_url, data.path(), &["--otlp-endpoint", &endpoint])
            .await?;
    let target = KfcTarget {
        brokers: &brokers,
        miss_topic: &miss_topic,
        dlq_topic: &dlq_topic,
        group: &group,
        store_url: &store_url,
        retina: retina_addr,
    };
    let mut args = kfc_args(target, 0, 2000);
    args.extend(["--otlp-endpoint".to_owned(), endpoint.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _kfc = Server::start_on(&binary("kfc"), &args, None).await?;

    let key = "a traced miss through Kafka: a blue kettle";
    let mut client = embark.embark_client().await?;
    let answer = client.lookup(traced_lookup(MODEL, key)).await?.into_inner();
    assert_eq!(answer.sources, vec![Source::OovPending as i32]);
    until_filled(&embark, MODEL, key).await?;

    assert_tree(
        &receiver,
        &[
            ("embark", "embark.Lookup", None),
            ("embark", "store.read", Some("embark.Lookup")),
            ("embark", "miss.publish", Some("embark.Lookup")),
            // Across Kafka: the context came in the message headers.
            ("kfc", "kfc.fill", Some("miss.publish")),
            ("kfc", "kfc.store.read", Some("kfc.fill")),
            ("kfc", "kfc.embed", Some("kfc.fill")),
            // Across gRPC: the context came in the request metadata.
            ("retina", "retina.Embed", Some("kfc.embed")),
            ("retina", "retina.infer", Some("retina.Embed")),
            ("kfc", "kfc.store.write", Some("kfc.fill")),
        ],
    )
    .await?;
    Ok(())
}
