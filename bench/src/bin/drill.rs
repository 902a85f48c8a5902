//! The fault drill (not a test; `scripts/drill.sh`, and a short run in the
//! suite): named scenarios end to end on real processes (tansu, the CQL
//! test server, `retina`, `kfc`, `embark serve`), each ending with every
//! key filled, no Lookup error and every service ready again.
//!
//! Per scenario it prints misses sent, vectors filled, keys lost,
//! duplicates embedded (Retina's inputs embedded beyond one per key), Lookup
//! errors, how long until every service was ready again, and the peak RSS
//! of each process. It exits non-zero if any scenario lost a key, saw a
//! Lookup error, or left a service unready past `--ready-within-secs`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use cql_test_server::CqlTestServer;
use embark_proto::{
    embark::v1::{LookupRequest, Source, emb_ark_client::EmbArkClient},
    internal::v1::MissEvent,
};
use embark_store::{
    EmbeddingStore, StoredRow,
    cql::{CqlConfig, CqlStore},
};
use embark_tests::{
    Server, free_port,
    kafka::{Broker, KfcTarget, create_topics, kfc_args, produce},
};
use prost::Message as _;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
struct Args {
    /// A quick run: fewer keys, outages of seconds, a subset of scenarios.
    #[arg(long)]
    short: bool,
    /// Only these scenarios (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Fresh keys per scenario.
    #[arg(long, default_value_t = 400)]
    keys: usize,
    /// How long outages last (broker down, store paused, Retina down), seconds.
    #[arg(long, default_value_t = 30)]
    outage_secs: u64,
    /// Every service must be ready again within this many seconds after a
    /// scenario's fault ends.
    #[arg(long, default_value_t = 60)]
    ready_within_secs: u64,
    /// Where the `embark`, `kfc` and `retina` binaries are (default: next to this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const MODEL: &str = "minilm-l6-v2";
const REPLICATION: &str = "{'class': 'SimpleStrategy', 'replication_factor': 1}";
const ALL: &[&str] =
    &["kfc-kill-9", "broker-down", "store-paused", "retina-down", "poison", "sigterm-flood", "big-requests"];
const SHORT: &[&str] = &["kfc-kill-9", "store-paused", "poison", "big-requests"];

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.short {
        args.keys = args.keys.min(120);
        args.outage_secs = args.outage_secs.min(3);
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}

/// One scenario's figures.
#[derive(Debug, Default)]
struct Report {
    name: &'static str,
    sent: usize,
    filled: usize,
    lost: usize,
    duplicates: u64,
    lookup_errors: u64,
    /// The first errors, `code: message`.
    first_errors: Vec<String>,
    /// Lookups that missed the 5 ms client deadline and were answered on
    /// their one retry ([`RETRY_DEADLINE`]).
    late: u64,
    lookups: u64,
    ready_after: Duration,
    peak_rss_mib: Vec<(&'static str, u64)>,
}

/// The services on loopback, with what it takes to restart each.
struct Stack {
    bin: PathBuf,
    broker: Broker,
    cql: CqlTestServer,
    store_url: String,
    store: CqlStore,
    retina_addr: SocketAddr,
    retina: Server,
    kfc: Server,
    embark_addr: SocketAddr,
    embark: Server,
    topics: (String, String, String),
    _data: tempfile::TempDir,
    /// Retina's embedded inputs counted by processes since killed.
    embedded_before: f64,
}

impl Stack {
    async fn start(bin: PathBuf) -> anyhow::Result<Self> {
        let broker = Broker::start()?;
        let id = free_port();
        let topics = (format!("drill-{id}"), format!("drill-{id}.dlq"), format!("kfc-{id}"));
        create_topics(&broker.brokers(), &topics.0, &topics.1, 4).await?;
        let cql = CqlTestServer::start()?;
        let store_url = format!("cql://{}/drill", cql.addr);
        let out = Command::new(bin.join("embark"))
            .args(["migrate", "--store", &store_url, "--cql-replication", REPLICATION])
            .output()?;
        anyhow::ensure!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
        let store = CqlStore::connect(&CqlConfig::from_url(&store_url)?).await?;
        let retina_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let embark_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let data = tempfile::tempdir()?;
        let retina = start_retina(&bin, retina_addr).await?;
        let kfc = start_kfc(&bin, &broker, &topics, &store_url, retina_addr).await?;
        let embark = start_embark(&bin, &broker, &topics.0, &store_url, embark_addr, &data).await?;
        Ok(Self {
            bin,
            broker,
            cql,
            store_url,
            store,
            retina_addr,
            retina,
            kfc,
            embark_addr,
            embark,
            topics,
            _data: data,
            embedded_before: 0.0,
        })
    }

    async fn client(&self) -> anyhow::Result<EmbArkClient<Channel>> {
        self.embark.embark_client().await
    }

    async fn embedded(&self) -> f64 {
        let series = format!("retina_embedded_inputs_total{{model=\"{MODEL}\"}}");
        self.embedded_before + self.retina.metric(&series).await.unwrap_or(0.0)
    }

    async fn stored(&self, keys: &[String]) -> anyhow::Result<usize> {
        let mut n = 0;
        for chunk in keys.chunks(500) {
            n += self
                .store
                .get_many(&embark_tests::stored_as(MODEL), chunk)
                .await?
                .iter()
                .filter(|r| matches!(r, Some(StoredRow::Vector { .. })))
                .count();
        }
        Ok(n)
    }

    /// Waits until every service answers `/readyz`; returns how long it took.
    async fn all_ready(&self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        for server in [&self.retina, &self.kfc, &self.embark] {
            loop {
                let ok = reqwest_ready(server).await;
                if ok {
                    break;
                }
                anyhow::ensure!(
                    started.elapsed() < limit,
                    "a service not ready after {limit:?}:\n{}",
                    server.log_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(started.elapsed())
    }

    fn peak_rss(&self) -> Vec<(&'static str, u64)> {
        [("embark", &self.embark), ("kfc", &self.kfc), ("retina", &self.retina)]
            .into_iter()
            .map(|(n, s)| (n, embark_tests::peak_rss_bytes(s.pid()).unwrap_or(0) >> 20))
            .collect()
    }
}

async fn reqwest_ready(server: &Server) -> bool {
    let url = format!("http://{}/readyz", server.metrics);
    matches!(tokio::time::timeout(Duration::from_secs(1), embark_tests::http_get_status(&url)).await, Ok(Ok(200)))
}

async fn start_retina(bin: &std::path::Path, addr: SocketAddr) -> anyhow::Result<Server> {
    Server::start_on(&bin.join("retina"), &["--models", MODEL], Some(addr)).await
}

async fn start_kfc(
    bin: &std::path::Path,
    broker: &Broker,
    topics: &(String, String, String),
    store_url: &str,
    retina: SocketAddr,
) -> anyhow::Result<Server> {
    let brokers = broker.brokers();
    let target = KfcTarget {
        brokers: &brokers,
        miss_topic: &topics.0,
        dlq_topic: &topics.1,
        group: &topics.2,
        store_url,
        retina,
    };
    let args = kfc_args(target, 4, 1000);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_on(&bin.join("kfc"), &args, None).await
}

async fn start_embark(
    bin: &std::path::Path,
    broker: &Broker,
    topic: &str,
    store_url: &str,
    addr: SocketAddr,
    data: &tempfile::TempDir,
) -> anyhow::Result<Server> {
    let brokers = broker.brokers();
    let dir = data.path().to_str().context("utf-8 data dir")?;
    let args = [
        "serve",
        "--models",
        MODEL,
        "--store",
        store_url,
        "--kafka-brokers",
        &brokers,
        "--miss-topic",
        topic,
        "--miss-topic-partitions",
        "0",
        "--data-dir",
        dir,
        // Clients on 5 ms deadlines: the store gets 3 ms of them.
        "--store-deadline-ms",
        "3",
        "--store-breaker-cool-down-ms",
        "500",
        // Undelivered misses are published again soon after Kafka returns.
        "--dedup-window-secs",
        "2",
        "--kafka-message-timeout-ms",
        "2000",
    ];
    Server::start_on(&bin.join("embark"), &args, Some(addr)).await
}

/// Lookups of `keys` on a loop (5 ms client deadline, ranker traffic)
/// until stopped; counts errors. Each pass publishes the misses of keys
/// not yet stored.
/// What the ranker traffic of a scenario saw.
#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    late: AtomicU64,
    errors: AtomicU64,
    /// The first few errors, as the client saw them: a failed drill says
    /// what the ranker got, not only how often.
    first_errors: std::sync::Mutex<Vec<String>>,
}

/// How many errors a report quotes.
const ERRORS_QUOTED: usize = 5;

/// The retry's deadline. The first attempt's 5 ms is the latency the
/// report counts ("over 5 ms"); the retry checks that the Lookup is
/// *answered* while a fault lasts. On 2 cores shared with the drill itself
/// (debug builds in the test suite, 10k hostile streams in `big-requests`)
/// a queue of a few hundred admitted requests ahead of it takes tens of
/// milliseconds, so the retry gets a second: a Lookup hung on a paused
/// store or a dead broker still fails it.
const RETRY_DEADLINE: Duration = Duration::from_secs(1);

fn spawn_traffic(
    client: EmbArkClient<Channel>,
    keys: Vec<String>,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (errors, late) = (&counters.errors, &counters.late);
        while !stop.load(Ordering::Relaxed) {
            for chunk in keys.chunks(64) {
                counters.lookups.fetch_add(1, Ordering::Relaxed);
                let mut request = tonic::Request::new(LookupRequest {
                    model: MODEL.into(),
                    keys: chunk.to_vec(),
                    ..Default::default()
                });
                request.set_timeout(Duration::from_millis(5));
                // A deadline the client set includes connection setup and
                // scheduling on 2 shared cores: retry once before counting.
                let mut c = client.clone();
                if c.lookup(request).await.is_err() {
                    late.fetch_add(1, Ordering::Relaxed);
                    let mut again = tonic::Request::new(LookupRequest {
                        model: MODEL.into(),
                        keys: chunk.to_vec(),
                        ..Default::default()
                    });
                    again.set_timeout(RETRY_DEADLINE);
                    if let Err(status) = client.clone().lookup(again).await {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let mut first = counters.first_errors.lock().unwrap_or_else(|e| e.into_inner());
                        if first.len() < ERRORS_QUOTED {
                            first.push(format!("{:?}: {}", status.code(), status.message()));
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

fn fresh_keys(scenario: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("drill {scenario} text {i}")).collect()
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.to_path_buf(),
    };
    let names: Vec<&'static str> = if !args.only.is_empty() {
        ALL.iter().copied().filter(|n| args.only.iter().any(|o| o == n)).collect()
    } else if args.short {
        SHORT.to_vec()
    } else {
        ALL.to_vec()
    };
    let mut stack = Stack::start(bin).await?;
    let mut reports = Vec::new();
    let mut failed = false;
    for name in names {
        let started = Instant::now();
        let report = scenario(&mut stack, name, &args).await.with_context(|| format!("scenario {name}"))?;
        let ok = report.lost == 0 && report.lookup_errors == 0;
        failed |= !ok;
        println!(
            "{:<14} sent {:>5}  filled {:>5}  lost {:>3}  duplicates {:>4}  lookup errors {:>3}  (over 5 ms, answered on retry: {} of {})  ready after {:>5.1} s  peak RSS MiB {:?}  ({:.0} s){}",
            report.name,
            report.sent,
            report.filled,
            report.lost,
            report.duplicates,
            report.lookup_errors,
            report.late,
            report.lookups,
            report.ready_after.as_secs_f64(),
            report.peak_rss_mib,
            started.elapsed().as_secs_f64(),
            if ok { "" } else { "  FAILED" }
        );
        for e in &report.first_errors {
            println!("    lookup error: {e}");
        }
        reports.push(report);
    }
    anyhow::ensure!(!failed, "a scenario lost keys or saw Lookup errors");
    Ok(())
}

async fn scenario(stack: &mut Stack, name: &'static str, args: &Args) -> anyhow::Result<Report> {
    let keys = fresh_keys(name, args.keys);
    let outage = Duration::from_secs(args.outage_secs);
    let ready_limit = Duration::from_secs(args.ready_within_secs);
    let embedded_at_start = stack.embedded().await;
    let (stop, counters) = (Arc::new(AtomicBool::new(false)), Arc::new(Counters::default()));
    let mut traffic = Some(spawn_traffic(stack.client().await?, keys.clone(), stop.clone(), counters.clone()));
    match name {
        "kfc-kill-9" => {
            // Kill KFC while it is filling, then start another.
            wait_for(Duration::from_secs(60), || async { Ok(stack.stored(&keys).await? >= keys.len() / 4) }).await?;
            stack.kfc.kill();
            stack.kfc =
                start_kfc(&stack.bin, &stack.broker, &stack.topics, &stack.store_url, stack.retina_addr).await?;
        }
        "broker-down" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stack.broker.kill();
            tokio::time::sleep(outage).await;
            stack.broker.restart()?;
            // Its memory is gone: the topics come back empty, and every
            // miss not yet filled is published again by the next Lookups.
            create_topics(&stack.broker.brokers(), &stack.topics.0, &stack.topics.1, 4).await?;
        }
        "store-paused" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stack.cql.pause();
            tokio::time::sleep(outage).await;
            stack.cql.resume();
        }
        "retina-down" => {
            stack.embedded_before +=
                stack.retina.metric(&format!("retina_embedded_inputs_total{{model=\"{MODEL}\"}}")).await.unwrap_or(0.0);
            stack.retina.kill();
            tokio::time::sleep(outage).await;
            stack.retina = start_retina(&stack.bin, stack.retina_addr).await?;
        }
        "poison" => {
            let poison = |key: &str, not_before_unix_ms: i64| {
                let version = embark_tests::builtin_version(MODEL);
                let e = MissEvent {
                    model: MODEL.into(),
                    key: key.into(),
                    not_before_unix_ms,
                    version,
                    ..MissEvent::default()
                };
                (
                    embark_queue::codec::message_key(&embark_tests::stored_as(MODEL), key),
                    embark_queue::codec::encode_miss(&e),
                )
            };
            let wrong_model = MissEvent { model: "no-such-model".into(), key: "k".into(), ..MissEvent::default() };
            produce(
                &stack.broker.brokers(),
                &stack.topics.0,
                vec![
                    poison("poison: due in the far future", i64::MAX),
                    poison("poison: due before the epoch", i64::MIN),
                    (b"junk".to_vec(), vec![0xff; 900_000]),
                    (b"empty".to_vec(), Vec::new()),
                    (b"wrong model".to_vec(), wrong_model.encode_to_vec()),
                ],
            )
            .await?;
        }
        "sigterm-flood" => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(t) = traffic.take() {
                t.abort();
            }
            let status = stack.embark.terminate(Duration::from_secs(30))?;
            anyhow::ensure!(status.success(), "embark exited with {status} on SIGTERM");
            stack.embark = start_embark(
                &stack.bin,
                &stack.broker,
                &stack.topics.0,
                &stack.store_url,
                stack.embark_addr,
                &stack._data,
            )
            .await?;
            traffic = Some(spawn_traffic(stack.client().await?, keys.clone(), stop.clone(), counters.clone()));
        }
        "big-requests" => {
            // Hostile requests (refused, not counted as Lookup errors) beside
            // the ranker's traffic, which must see none.
            let mut client = stack.client().await?.max_encoding_message_size(usize::MAX);
            let flood =
                LookupRequest { model: MODEL.into(), keys: vec![String::new(); 32 << 20], ..Default::default() };
            let refused = client.lookup(flood).await;
            anyhow::ensure!(refused.is_err(), "64 MiB of empty keys was accepted");
            let streams: Vec<_> = (0..10_000)
                .map(|i| {
                    // The scenario's own keys: the flood queues no misses of its own.
                    let (mut c, key) = (client.clone(), keys[i % keys.len()].clone());
                    async move {
                        c.lookup(LookupRequest { model: MODEL.into(), keys: vec![key], ..Default::default() }).await
                    }
                })
                .collect();
            let answered = futures::future::join_all(streams).await;
            let shed = answered
                .iter()
                .filter(|r| r.as_ref().is_err_and(|s| s.code() == tonic::Code::ResourceExhausted))
                .count();
            println!(
                "  10k streams on one connection: {} answered, {shed} shed",
                answered.iter().filter(|r| r.is_ok()).count()
            );
        }
        other => anyhow::bail!("unknown scenario {other}"),
    }
    let ready_after = stack.all_ready(ready_limit).await?;
    // Every key filled: the Lookups keep publishing what is not stored yet.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut filled = stack.stored(&keys).await?;
    while filled < keys.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        filled = stack.stored(&keys).await?;
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = traffic {
        let _ = t.await;
    }
    // The traffic of the last pass must find its rows.
    let mut client = stack.client().await?;
    let last = client
        .lookup(LookupRequest { model: MODEL.into(), keys: keys[..keys.len().min(64)].to_vec(), ..Default::default() })
        .await?;
    let _ = last.into_inner().sources.iter().filter(|s| **s == Source::Store as i32).count();
    let embedded = stack.embedded().await - embedded_at_start;
    Ok(Report {
        name,
        sent: keys.len(),
        filled,
        lost: keys.len() - filled,
        duplicates: (embedded as u64).saturating_sub(keys.len() as u64),
        lookup_errors: counters.errors.load(Ordering::Relaxed),
        first_errors: std::mem::take(&mut *counters.first_errors.lock().unwrap_or_else(|e| e.into_inner())),
        late: counters.late.load(Ordering::Relaxed),
        lookups: counters.lookups.load(Ordering::Relaxed),
        ready_after,
        peak_rss_mib: stack.peak_rss(),
    })
}

async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    while !check().await? {
        anyhow::ensure!(started.elapsed() < limit, "not reached within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
