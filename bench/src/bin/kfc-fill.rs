//! Benchmark (not a test): how fast KFC drains a miss backlog, against Retina
//! alone on the same inputs, in the same run.
//!
//! 1. Retina alone: the N texts in calls of `--embed-batch` inputs,
//!    `--workers` calls in flight (what KFC does at its defaults).
//! 2. KFC: the same N texts as a backlog of misses on a real broker (tansu),
//!    drained by the `kfc` binary into a CQL store (kassandra in this
//!    process, through the real `scylla` driver), timed from KFC's start to
//!    the last vector stored.
//!
//! The ratio is what Kafka, the store and KFC's bookkeeping cost on top of
//! the model. Run with `scripts/bench-kfc.sh`.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use embark_proto::retina::v1::EmbedRequest;
use embark_store::cql::{CqlConfig, CqlStore};
use embark_tests::{
    Server, free_port,
    kafka::{Broker, create_topics, produce_misses},
};
use futures::{StreamExt, stream};

#[derive(Debug, Parser)]
struct Args {
    /// Distinct texts in the backlog.
    #[arg(long, default_value_t = 5000)]
    misses: usize,
    /// KFC's fill workers, and Retina calls in flight in the direct run.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Inputs per Retina call.
    #[arg(long, default_value_t = 32)]
    embed_batch: usize,
    /// Where the `retina` and `kfc` binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

const MODEL: &str = "minilm-l6-v2";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.to_path_buf(),
    };
    let texts: Vec<String> = (0..args.misses)
        .map(|i| format!("item {i}: a lightweight running shoe with a breathable mesh upper, size {}", 36 + i % 12))
        .collect();

    let retina_addr = format!("127.0.0.1:{}", free_port()).parse()?;
    let retina = Server::start_on(&bin_dir.join("retina"), &["--models", MODEL], Some(retina_addr)).await?;

    // Warm-up, then Retina alone.
    let mut client = retina.retina_client().await?;
    client
        .embed(EmbedRequest {
            model: MODEL.into(),
            inputs: texts[..64.min(texts.len())].to_vec(),
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let calls = stream::iter(texts.chunks(args.embed_batch).map(|c| c.to_vec()))
        .map(|inputs| {
            let mut client = client.clone();
            async move {
                client
                    .embed(EmbedRequest { model: MODEL.into(), inputs, ..Default::default() })
                    .await
                    .map(|r| r.into_inner())
            }
        })
        .buffer_unordered(args.workers.max(1))
        .collect::<Vec<_>>()
        .await;
    for c in calls {
        c.context("Retina.Embed")?;
    }
    let direct = started.elapsed();

    // KFC over a backlog of the same texts.
    let broker = Broker::start()?;
    let (topic, dlq) = ("bench.misses", "bench.misses.dlq");
    create_topics(&broker.brokers(), topic, dlq, 12).await?;
    for chunk in texts.chunks(1000) {
        produce_misses(&broker.brokers(), topic, MODEL, chunk).await?;
    }
    let cql = cql_test_server::CqlTestServer::start()?;
    let url = format!("cql://{}/bench", cql.addr);
    let cfg = CqlConfig {
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        ..CqlConfig::from_url(&url)?
    };
    CqlStore::migrate(&cfg).await?;
    let store = Arc::new(CqlStore::connect(&cfg).await?);

    let workers = args.workers.to_string();
    let batch = args.embed_batch.to_string();
    let retina_url = format!("http://{retina_addr}");
    let started = Instant::now();
    let kfc = Server::start_on(
        &bin_dir.join("kfc"),
        &[
            "--kafka-brokers",
            &broker.brokers(),
            "--miss-topic",
            topic,
            "--dlq-topic",
            dlq,
            "--miss-topic-partitions",
            "0",
            "--store",
            &url,
            "--retina",
            &retina_url,
            "--workers",
            &workers,
            "--embed-batch",
            &batch,
        ],
        None,
    )
    .await?;
    let series = format!("kfc_filled_total{{model=\"{MODEL}\",outcome=\"vector\"}}");
    loop {
        // Appears with the first fill.
        if kfc.metric_or_zero(&series).await? as usize >= texts.len() {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(1800), "KFC did not finish within 30 minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let through_kfc = started.elapsed();
    let mut stored = 0;
    for chunk in texts.chunks(500) {
        use embark_store::EmbeddingStore;
        stored += store.get_many(&embark_tests::stored_as(MODEL), chunk).await?.iter().filter(|r| r.is_some()).count();
    }
    anyhow::ensure!(stored == texts.len(), "only {stored} of {} stored", texts.len());

    let n = texts.len() as f64;
    let direct_rate = n / direct.as_secs_f64();
    let kfc_rate = n / through_kfc.as_secs_f64();
    println!("model {MODEL}, {} texts, {} workers x {} inputs per call", texts.len(), args.workers, args.embed_batch);
    println!("  Retina alone : {direct_rate:8.1} texts/s  ({direct:.2?})");
    println!("  through KFC  : {kfc_rate:8.1} texts/s  ({through_kfc:.2?}, Kafka -> KFC -> Retina -> CQL store)");
    println!("  ratio KFC / Retina alone: {:.2}x", kfc_rate / direct_rate);
    if let Some(path) = &args.json {
        let v = serde_json::json!({
            "model": MODEL, "misses": texts.len(), "workers": args.workers, "embed_batch": args.embed_batch,
            "retina_alone_per_s": direct_rate, "kfc_per_s": kfc_rate, "ratio": kfc_rate / direct_rate,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    drop(kfc);
    drop(retina);
    Ok(())
}
