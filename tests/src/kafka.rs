//! A real Kafka-protocol broker for tests: tansu (in-memory storage), one
//! per test, on a free loopback port, installed once by
//! `scripts/install-tansu.sh` outside the checkout.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use embark_proto::internal::v1::{DeadLetter, MissEvent};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};

use crate::{Server, binary, free_port};

/// The tansu binary: `$EMBARK_TANSU`, or where the install script puts it.
pub fn tansu_binary() -> PathBuf {
    let path = std::env::var_os("EMBARK_TANSU").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("EMBARK_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/embark"));
        cache.join("tansu-0.6.0-embark2/bin/tansu")
    });
    assert!(path.is_file(), "no tansu at {}: run scripts/install-tansu.sh (scripts/test.sh does)", path.display());
    path
}

/// A running tansu broker. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker on a free loopback port and waits until it accepts
    /// connections (bounded).
    pub fn start() -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let logdir = tempfile::tempdir()?;
        let log = logdir.path().join("tansu.log");
        let mut broker = Self { child: None, addr, log, _logdir: logdir };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://{}", self.addr);
        let child = Command::new(tansu_binary())
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log)?)
            .spawn()
            .context("starting tansu")?;
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if started.elapsed() > Duration::from_secs(20) {
                bail!("tansu not listening on {} after 20 s:\n{}", self.addr, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: an outage (SIGTERM would keep open connections served).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A new broker on the same address (its in-memory state is gone).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates the miss topic (`partitions`) and its DLQ.
pub async fn create_topics(brokers: &str, miss_topic: &str, dlq_topic: &str, partitions: i32) -> anyhow::Result<()> {
    embark_queue::kafka::ensure_topics(
        brokers,
        &[],
        &[(miss_topic, partitions), (dlq_topic, 1)],
        1,
        Duration::from_secs(10),
    )
    .await
    .context("creating topics")
}

/// Produces raw `payloads` (with acks=all) to `topic`.
pub async fn produce(brokers: &str, topic: &str, payloads: Vec<(Vec<u8>, Vec<u8>)>) -> anyhow::Result<()> {
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("acks", "all").set("linger.ms", "20").create()?;
    let sends = payloads.iter().map(|(k, p)| {
        producer.send(FutureRecord::to(topic).key(k).payload(p), Timeout::After(Duration::from_secs(10)))
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| e).context("producing")?;
    }
    Ok(())
}

/// Produces one `MissEvent` per key of `model`.
pub async fn produce_misses(brokers: &str, topic: &str, model: &str, keys: &[String]) -> anyhow::Result<()> {
    let now = embark_store::now_unix_ms();
    let payloads = keys
        .iter()
        .map(|k| {
            let e = MissEvent {
                model: model.into(),
                key: k.clone(),
                first_seen_unix_ms: now,
                attempts: 0,
                not_before_unix_ms: 0,
                dim: 0,
                trace_context: Default::default(),
                // As a front of the built-in catalogue publishes it.
                version: crate::builtin_version(model),
            };
            let namespace = embark_store::namespace(model, &e.version);
            (embark_queue::codec::message_key(&namespace, k), embark_queue::codec::encode_miss(&e))
        })
        .collect();
    produce(brokers, topic, payloads).await
}

/// Sets `group`'s committed offset of `topic`'s `partition` to `offset`,
/// as a consumer of that group killed at that point would have left it.
pub fn commit_group_offset(brokers: &str, group: &str, topic: &str, partition: i32, offset: i64) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    consumer.assign(&tpl)?;
    consumer.commit(&tpl, CommitMode::Sync).context("committing")?;
    let committed = consumer.committed(Duration::from_secs(10))?;
    let got = committed.find_partition(topic, partition).map(|p| p.offset());
    anyhow::ensure!(got == Some(Offset::Offset(offset)), "the broker has {got:?} committed, not {offset}");
    Ok(())
}

/// Reads every dead letter on `topic` from the start, waiting up to
/// `limit` for at least `want` of them.
pub fn read_dead_letters(brokers: &str, topic: &str, want: usize, limit: Duration) -> anyhow::Result<Vec<DeadLetter>> {
    read_all(brokers, topic, limit, |letters: &[DeadLetter]| letters.len() >= want)
}

/// Reads the miss events on `topic` from the start until `done` says so or
/// `limit` passes.
pub fn read_misses(
    brokers: &str,
    topic: &str,
    limit: Duration,
    done: impl Fn(&[MissEvent]) -> bool,
) -> anyhow::Result<Vec<MissEvent>> {
    read_all(brokers, topic, limit, done)
}

fn read_all<T: prost::Message + Default>(
    brokers: &str,
    topic: &str,
    limit: Duration,
    done: impl Fn(&[T]) -> bool,
) -> anyhow::Result<Vec<T>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-reader-{}", free_port()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut out = Vec::new();
    while !done(&out) && started.elapsed() < limit {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(T::decode(m.payload().unwrap_or_default())?),
            Some(Err(e)) => eprintln!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// Where a test's `kfc` reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct KfcTarget<'a> {
    pub brokers: &'a str,
    pub miss_topic: &'a str,
    pub dlq_topic: &'a str,
    pub group: &'a str,
    pub store_url: &'a str,
    pub retina: SocketAddr,
}

/// The flags of a `kfc` tuned for tests and drills: a short session
/// timeout and commit interval so rebalances and replays happen within
/// seconds, a quick Retina re-resolve, and backoff capped at
/// `max_backoff_ms`. `miss_topic_partitions` 0 creates no topic.
pub fn kfc_args(target: KfcTarget<'_>, miss_topic_partitions: u32, max_backoff_ms: u64) -> Vec<String> {
    let flags: [(&str, String); 11] = [
        ("--kafka-brokers", target.brokers.to_owned()),
        ("--miss-topic", target.miss_topic.to_owned()),
        ("--dlq-topic", target.dlq_topic.to_owned()),
        ("--group", target.group.to_owned()),
        ("--miss-topic-partitions", miss_topic_partitions.to_string()),
        ("--session-timeout-ms", "6000".into()),
        ("--commit-interval-ms", "200".into()),
        ("--store", target.store_url.to_owned()),
        ("--retina", format!("http://{}", target.retina)),
        ("--retina-timeout-ms", "10000".into()),
        ("--retina-resolve-secs", "1".into()),
    ];
    let mut args: Vec<String> = flags.into_iter().flat_map(|(k, v)| [k.to_owned(), v]).collect();
    args.extend(["--max-backoff-ms".to_owned(), max_backoff_ms.to_string()]);
    args
}

/// An `embark serve` of `model` on the CQL store at `store_url`, publishing
/// misses to `miss_topic` (which it does not create), with its durable
/// files in `data`.
pub async fn start_kafka_embark(
    model: &str,
    brokers: &str,
    miss_topic: &str,
    store_url: &str,
    data: &std::path::Path,
) -> anyhow::Result<Server> {
    start_kafka_embark_with(model, brokers, miss_topic, store_url, data, &[]).await
}

/// [`start_kafka_embark`] with `extra` flags.
pub async fn start_kafka_embark_with(
    model: &str,
    brokers: &str,
    miss_topic: &str,
    store_url: &str,
    data: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<Server> {
    let data = data.to_str().context("a UTF-8 data directory")?;
    let mut args = vec![
        "serve",
        "--models",
        model,
        "--store",
        store_url,
        "--kafka-brokers",
        brokers,
        "--miss-topic",
        miss_topic,
        "--miss-topic-partitions",
        "0",
        "--data-dir",
        data,
        // These tests are about Kafka: a busy CI machine must not
        // turn slow store reads into OOV_UNAVAILABLE.
        "--store-deadline-ms",
        "2000",
    ];
    args.extend_from_slice(extra);
    Server::start(&binary("embark"), &args).await
}
