//! The distributed miss path with separate processes: `embark serve`
//! (Kafka publisher, CQL store served in-process by the test through the
//! real `scylla` driver), `kfc`, `retina`, and a real broker (tansu).
//!
//! - misses flow Lookup -> Kafka -> KFC -> Retina -> store -> Lookup;
//!   a poison input becomes OOV_FAILED and a dead letter with its reason;
//! - a 5,000-miss backlog survives `kill -9` of KFC mid-flight, and KFC
//!   resumes from a committed offset inside a record batch;
//! - Retina killed and restarted: KFC backs off, then finishes;
//! - the broker killed: Lookups keep answering (tier hits and OOV rows);
//!   after it returns, new misses reach it again; EmbArk outlives a
//!   broker that comes back empty.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use cql_test_server::CqlTestServer;
use embark_proto::{
    embark::v1::{LookupRequest, Source, emb_ark_client::EmbArkClient},
    retina::v1::{EmbedRequest, FailureCode},
};
use embark_store::{
    EmbeddingStore, StoredRow,
    cql::{CqlConfig, CqlStore},
};
use embark_tests::{
    Server, binary, cosine, eventually, free_port,
    kafka::{
        Broker, KfcTarget, commit_group_offset, create_topics, kfc_args, produce, produce_misses, read_dead_letters,
        read_misses, start_kafka_embark,
    },
    migrate, minilm_reference, rows,
};
use tonic::transport::Channel;

const MODEL: &str = "minilm-l6-v2";

/// The tests here each run a broker, a CQL server and three processes on
/// 2 cores: one at a time, so none starves another's deadlines (and no two
/// race for the free ports they pick).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const DIM: usize = 384;

/// Everything but KFC, wired on loopback with fresh topic and group names.
struct Stack {
    broker: Broker,
    _cql: CqlTestServer,
    store_url: String,
    store: CqlStore,
    retina_addr: SocketAddr,
    retina: Server,
    embark: Server,
    miss_topic: String,
    dlq_topic: String,
    group: String,
    _data: tempfile::TempDir,
}

impl Stack {
    async fn start() -> anyhow::Result<Self> {
        let broker = Broker::start()?;
        let id = free_port();
        let (miss_topic, dlq_topic, group) = (format!("misses-{id}"), format!("misses-{id}.dlq"), format!("kfc-{id}"));
        create_topics(&broker.brokers(), &miss_topic, &dlq_topic, 4).await?;

        let cql = CqlTestServer::start()?;
        let store_url = format!("cql://{}/embark_kafka", cql.addr);
        migrate(&store_url)?;
        let store = CqlStore::connect(&CqlConfig::from_url(&store_url)?).await?;

        let retina_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let retina = start_retina(retina_addr).await?;
        let data = tempfile::tempdir()?;
        let embark = start_embark(&broker.brokers(), &miss_topic, &store_url, &data).await?;
        Ok(Self {
            broker,
            _cql: cql,
            store_url,
            store,
            retina_addr,
            retina,
            embark,
            miss_topic,
            dlq_topic,
            group,
            _data: data,
        })
    }

    async fn start_kfc(&self) -> anyhow::Result<Server> {
        self.start_kfc_with(&[]).await
    }

    async fn start_kfc_with(&self, extra: &[&str]) -> anyhow::Result<Server> {
        self.start_kfc_on(&self.miss_topic, &self.dlq_topic, &self.group, extra).await
    }

    /// A `kfc` reading `miss_topic` in `group` (dead letters to `dlq_topic`).
    async fn start_kfc_on(
        &self,
        miss_topic: &str,
        dlq_topic: &str,
        group: &str,
        extra: &[&str],
    ) -> anyhow::Result<Server> {
        let brokers = self.broker.brokers();
        let target = KfcTarget {
            brokers: &brokers,
            miss_topic,
            dlq_topic,
            group,
            store_url: &self.store_url,
            retina: self.retina_addr,
        };
        let owned = kfc_args(target, 0, 2000);
        let mut args: Vec<&str> = owned.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        Server::start_on(&binary("kfc"), &args, None).await
    }

    async fn client(&self) -> anyhow::Result<EmbArkClient<Channel>> {
        self.embark.embark_client().await
    }

    /// How many of `keys` have a vector in the store.
    async fn stored(&self, keys: &[String]) -> anyhow::Result<usize> {
        let mut n = 0;
        for chunk in keys.chunks(500) {
            let rows = self.store.get_many(&embark_tests::stored_as(MODEL), chunk).await?;
            n += rows.iter().filter(|r| matches!(r, Some(StoredRow::Vector { .. }))).count();
        }
        Ok(n)
    }
}

/// An `embark serve` replica publishing misses to `miss_topic`.
async fn start_embark(
    brokers: &str,
    miss_topic: &str,
    store_url: &str,
    data: &tempfile::TempDir,
) -> anyhow::Result<Server> {
    start_kafka_embark(MODEL, brokers, miss_topic, store_url, data.path()).await
}

/// Retina with the text model; inputs over 300 bytes are refused
/// (permanently), which makes a poison input.
/// Retina on `addr`. A restart on the address of a killed Retina may find
/// it taken for a moment: KFC's reconnects to a port nobody listens on can
/// be given that very port as their own (a TCP self-connect on loopback,
/// seen in CI), until KFC drops the connection. So a bind refused with
/// "Address already in use" is tried again, for up to 10 s.
async fn start_retina(addr: SocketAddr) -> anyhow::Result<Server> {
    let args = ["--models", MODEL, "--max-input-bytes", "300"];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Server::start_on(&binary("retina"), &args, Some(addr)).await {
            Err(e) if format!("{e:#}").contains("Address already in use") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

fn lookup(keys: Vec<String>) -> LookupRequest {
    LookupRequest { model: MODEL.into(), keys, ..Default::default() }
}

fn sources(raw: &[i32]) -> Vec<Source> {
    raw.iter().map(|s| Source::try_from(*s).expect("known source")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_flow_through_kafka_and_poison_lands_in_the_dlq() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start().await?;
    let _kfc = stack.start_kfc().await?;
    let mut client = stack.client().await?;

    let reference = minilm_reference();
    let poison = "p".repeat(400);
    let mut keys: Vec<String> = reference.iter().map(|(t, _)| t.clone()).collect();
    keys.push(poison.clone());
    let first = client.lookup(lookup(keys.clone())).await?.into_inner();
    assert_eq!(first.dim as usize, DIM);
    assert!(sources(&first.sources).iter().all(|s| *s == Source::OovPending), "{:?}", first.sources);
    assert!(rows(&first.vectors, DIM).iter().all(|r| r.iter().all(|x| *x == 0.0)), "OOV rows are zeros");

    // A message that is not a MissEvent at all.
    produce(&stack.broker.brokers(), &stack.miss_topic, vec![(b"junk".to_vec(), b"\xff\xfe not protobuf".to_vec())])
        .await?;

    let filled = eventually(Duration::from_secs(60), "the vectors and the failure record", || {
        let mut client = client.clone();
        let keys = keys.clone();
        async move {
            let r = client.lookup(lookup(keys)).await?.into_inner();
            let s = sources(&r.sources);
            let real = s[..s.len() - 1].iter().all(|s| matches!(s, Source::Store | Source::Cache));
            Ok((real && s[s.len() - 1] == Source::OovFailed).then_some(r))
        }
    })
    .await?;
    let got = rows(&filled.vectors, DIM);
    let mut retina = stack.retina.retina_client().await?;
    let direct = retina
        .embed(EmbedRequest {
            model: MODEL.into(),
            inputs: reference.iter().map(|(t, _)| t.clone()).collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let direct = rows(&direct.vectors, DIM);
    for (i, (text, want)) in reference.iter().enumerate() {
        let c = cosine(&got[i], want);
        assert!(c >= 0.9999, "{text:?}: cosine {c} against the reference");
        assert!(cosine(&got[i], &direct[i]) >= 0.9999, "{text:?}: differs from Retina.Embed");
    }

    let letters = read_dead_letters(&stack.broker.brokers(), &stack.dlq_topic, 2, Duration::from_secs(30))?;
    let poisoned = letters
        .iter()
        .find(|d| d.event.as_ref().is_some_and(|e| e.key == poison))
        .expect("the poison input is a dead letter");
    assert_eq!(poisoned.code, FailureCode::InvalidInput as i32);
    assert!(poisoned.reason.contains("300"), "the reason names the limit: {}", poisoned.reason);
    let junk = letters.iter().find(|d| d.event.is_none()).expect("the junk message is a dead letter");
    assert!(junk.reason.contains("not a MissEvent"), "{}", junk.reason);
    assert_eq!(&junk.raw[..], b"\xff\xfe not protobuf");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_survives_kill_9_of_kfc() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start().await?;
    let mut client = stack.client().await?;
    let keys: Vec<String> = (0..5000).map(|i| format!("backlog item {i}: a short product title")).collect();
    for chunk in keys.chunks(500) {
        let r = client.lookup(lookup(chunk.to_vec())).await?.into_inner();
        assert!(sources(&r.sources).iter().all(|s| *s == Source::OovPending));
    }
    eventually(Duration::from_secs(30), "5,000 misses acknowledged by the broker", || async {
        // Appears with the first delivery.
        Ok((stack.embark.metric_or_zero("embark_misses_delivered_total").await? >= 5000.0).then_some(()))
    })
    .await?;

    let mut kfc = stack.start_kfc().await?;
    let series = format!("kfc_filled_total{{model=\"{MODEL}\",outcome=\"vector\"}}");
    let before_kill = eventually(Duration::from_secs(120), "KFC to be mid-flight", || async {
        // Appears with the first fill.
        let n = kfc.metric_or_zero(&series).await?;
        Ok((n >= 1000.0).then_some(n))
    })
    .await?;
    kfc.kill();
    let stored_at_kill = stack.stored(&keys).await?;
    assert!(stored_at_kill < keys.len(), "killed mid-flight ({stored_at_kill} stored)");

    let kfc = stack.start_kfc().await?;
    let res = eventually(Duration::from_secs(240), "every key of the backlog stored", || async {
        // Reading 5,000 rows from the in-process CQL server costs CPU that
        // KFC and Retina need on these 2 cores: look once a second, not at
        // every 100 ms tick of `eventually`.
        tokio::time::sleep(Duration::from_millis(900)).await;
        Ok((stack.stored(&keys).await? == keys.len()).then_some(()))
    })
    .await;
    if let Err(e) = res {
        // A stall here has been seen on a loaded machine (about one run in
        // eight with both cores busy): the restarted KFC joins, reads and
        // commits for a minute, then commits nothing more. Say how far it
        // got, its counters, and its log without the CQL driver's metadata
        // warnings about the test server (one a second), which would bury
        // the consumer's own lines.
        let stored_at_end = stack.stored(&keys).await.unwrap_or(0);
        let counters = kfc.metrics_text().await.unwrap_or_default();
        let counters: Vec<&str> = counters.lines().filter(|l| l.starts_with("kfc_")).collect();
        let log = kfc.log_text();
        let tail: Vec<&str> = log.lines().filter(|l| !l.contains("scylla::")).rev().take(60).collect();
        anyhow::bail!(
            "{e} ({stored_at_kill} stored at the kill, {stored_at_end} at the end); the restarted kfc's counters:\n{}\n\
             its log ends:\n{}",
            counters.join("\n"),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let after = kfc.metric(&series).await?;
    let skipped = kfc.metric(&format!("kfc_skipped_total{{model=\"{MODEL}\"}}")).await?;
    eprintln!(
        "backlog 5000: {before_kill} embedded before kill -9, {stored_at_kill} stored at the kill, \
         {after} embedded after the restart, {skipped} replayed keys skipped as already stored, \
         {} embedded twice",
        (before_kill + after) as i64 - keys.len() as i64
    );
    // The Lookup path sees them too.
    let r = client.lookup(lookup(keys[..100].to_vec())).await?.into_inner();
    assert!(sources(&r.sources).iter().all(|s| matches!(s, Source::Store | Source::Cache)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kfc_backs_off_while_retina_is_down_then_finishes() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start().await?;
    // One worker taking whole rounds into one Retina call: one failed call
    // per round, each followed by the round's backoff (below).
    let kfc = stack.start_kfc_with(&["--workers", "1", "--fill-batch", "64", "--embed-batch", "64"]).await?;
    stack.retina.kill();

    let mut client = stack.client().await?;
    let keys: Vec<String> = (0..300).map(|i| format!("while retina is down {i}")).collect();
    client.lookup(lookup(keys.clone())).await?;
    let errors = format!("kfc_embed_call_errors_total{{model=\"{MODEL}\"}}");
    eventually(Duration::from_secs(30), "KFC to see Retina down", || async {
        // Appears with the first failed call.
        Ok((kfc.metric_or_zero(&errors).await? >= 1.0).then_some(()))
    })
    .await?;
    // Backing off, not spinning: wait for four more failed calls and check
    // they took at least the backoff between them. After failure n the
    // round sleeps at least half of min(200 ms * 2^(n-1), 2 s); from n >= 2
    // on the three sleeps before the fourth are >= 200 + 400 + 800 ms. A
    // hot loop makes four calls in milliseconds. (A lower bound on time:
    // a slow, shared machine only makes it longer.)
    let started = Instant::now();
    let a = kfc.metric(&errors).await?;
    eventually(Duration::from_secs(60), "four more failed calls", || async {
        Ok((kfc.metric(&errors).await? >= a + 4.0).then_some(()))
    })
    .await?;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1), "four failed calls in {took:?}: a hot loop");
    assert_eq!(stack.stored(&keys).await?, 0);

    stack.retina = start_retina(stack.retina_addr).await?;
    eventually(Duration::from_secs(90), "the backlog filled after Retina returns", || async {
        Ok((stack.stored(&keys).await? == keys.len()).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_does_not_touch_lookups() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start().await?;
    let mut client = stack.client().await?;

    // Known keys in the tier, so each Lookup mixes hits and new misses.
    let known: Vec<String> = (0..16).map(|i| format!("known {i}")).collect();
    stack
        .store
        .put_vectors(&embark_tests::stored_as(MODEL), known.iter().map(|k| (k.clone(), vec![0.5; DIM])).collect())
        .await?;
    client.lookup(lookup(known.clone())).await?;

    async fn timed(client: &mut EmbArkClient<Channel>, known: &[String], tag: &str) -> anyhow::Result<Vec<Duration>> {
        let mut took = Vec::new();
        for i in 0..300 {
            let mut keys = known.to_vec();
            keys.extend((0..16).map(|j| format!("{tag} miss {i}-{j}")));
            let started = Instant::now();
            let r = client.lookup(lookup(keys)).await?.into_inner();
            took.push(started.elapsed());
            let s = sources(&r.sources);
            assert!(s[..16].iter().all(|s| *s == Source::Cache), "{s:?}");
            assert!(s[16..].iter().all(|s| *s == Source::OovPending), "{s:?}");
        }
        took.sort();
        Ok(took)
    }
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];

    let healthy = timed(&mut client, &known, "healthy").await?;
    stack.broker.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outage = timed(&mut client, &known, "outage").await?;
    eprintln!(
        "Lookup latency, broker up: p50 {:?} p99 {:?}; broker killed: p50 {:?} p99 {:?}",
        pct(&healthy, 0.5),
        pct(&healthy, 0.99),
        pct(&outage, 0.5),
        pct(&outage, 0.99)
    );
    // No assertion on these numbers: on 2 shared cores they measure the
    // machine as much as EmbArk (the Lookup benchmark measures latency).
    // What is checked is that every Lookup of the outage was answered, with
    // the right sources, while the producer could reach no broker.

    // The broker returns (empty: tansu keeps its log in memory) and new
    // misses reach it again. They are read off the topic directly: KFC's
    // group positions refer to the lost log, and tansu does not answer a
    // fetch past the end with OFFSET_OUT_OF_RANGE as Kafka does, so
    // whether KFC resumes there says nothing about EmbArk.
    stack.broker.restart()?;
    create_topics(&stack.broker.brokers(), &stack.miss_topic, &stack.dlq_topic, 4).await?;
    let fresh: Vec<String> = (0..5).map(|i| format!("after the outage {i}")).collect();
    let brokers = stack.broker.brokers();
    let topic = stack.miss_topic.clone();
    let wanted = fresh.clone();
    let reader = tokio::task::spawn_blocking(move || {
        read_misses(&brokers, &topic, Duration::from_secs(90), |seen| {
            wanted.iter().all(|k| seen.iter().any(|e| &e.key == k))
        })
    });
    // Lookups keep asking (and answering) while the producer reconnects.
    let started = Instant::now();
    while !reader.is_finished() && started.elapsed() < Duration::from_secs(90) {
        let r = client.lookup(lookup(fresh.clone())).await?.into_inner();
        assert!(sources(&r.sources).iter().all(|s| *s == Source::OovPending), "{:?}", r.sources);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = reader.await??;
    for k in &fresh {
        assert!(seen.iter().any(|e| &e.key == k), "{k:?} never reached the returned broker");
    }
    assert!(stack.embark.metric("embark_misses_delivered_total").await? >= 5.0);
    Ok(())
}

/// KFC resumes at its group's committed offset, which after a kill lies
/// inside a record batch more often than not (EmbArk's producer batches
/// misses). Every miss from that offset on is filled. tansu 0.6.0 skipped
/// the rest of the batch: the kill -9 backlog test lost 101 of 5,000 misses
/// in one run of four. `scripts/install-tansu.sh` patches it; on an
/// unpatched tansu this test fails every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kfc_resumes_from_inside_a_record_batch() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start().await?;
    let brokers = stack.broker.brokers();
    // One partition, 40 misses sent at once: one batch (linger 20 ms).
    let (topic, dlq, group) =
        (format!("{}-one", stack.miss_topic), format!("{}-one.dlq", stack.miss_topic), format!("{}-one", stack.group));
    create_topics(&brokers, &topic, &dlq, 1).await?;
    let keys: Vec<String> = (0..40).map(|i| format!("one batch, miss {i}")).collect();
    produce_misses(&brokers, &topic, MODEL, &keys).await?;
    commit_group_offset(&brokers, &group, &topic, 0, 17)?;

    let _kfc = stack.start_kfc_on(&topic, &dlq, &group, &[]).await?;
    eventually(Duration::from_secs(90), "the misses from the committed offset on filled", || async {
        Ok((stack.stored(&keys[17..]).await? == keys.len() - 17).then_some(()))
    })
    .await?;
    assert_eq!(stack.stored(&keys[..17]).await?, 0, "the misses before the committed offset were done already");
    Ok(())
}

/// A broker restarted empty (tansu keeps its log in memory) is asked by
/// EmbArk's invalidation follower for the topic it lost, by the topic id
/// from before, until the follower refreshes its metadata. tansu 0.6.0
/// answered with a zero topic id and a "current leader", on which
/// librdkafka 2.12.1 calls strcmp on a null topic name: EmbArk died of
/// SIGSEGV in a third of the broker outage runs (and in CI).
/// `scripts/install-tansu.sh` patches tansu to answer as Kafka does. The
/// window is short, so the broker goes down and comes back (its topics
/// created again, as after an outage) several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embark_outlives_a_broker_that_returns_empty() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut stack = Stack::start().await?;
    let mut client = stack.client().await?;
    for round in 0..6 {
        eventually(Duration::from_secs(60), "EmbArk following the invalidation topic", || async {
            let ready = reqwest::get(format!("http://{}/readyz", stack.embark.metrics)).await?;
            Ok(ready.status().is_success().then_some(()))
        })
        .await?;
        stack.broker.kill();
        stack.broker.restart()?;
        create_topics(&stack.broker.brokers(), &stack.miss_topic, &stack.dlq_topic, 4).await?;
        embark_queue::kafka::ensure_topics(
            &stack.broker.brokers(),
            &[],
            &[(embark_queue::kafka::DEFAULT_INVALIDATION_TOPIC, 1)],
            1,
            Duration::from_secs(10),
        )
        .await?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(status) = stack.embark.exited() {
                anyhow::bail!("round {round}: embark died after the broker came back empty: {status}");
            }
        }
    }
    let r = client.lookup(lookup(vec!["after the broker came back empty".into()])).await?.into_inner();
    assert_eq!(sources(&r.sources), [Source::OovPending]);
    Ok(())
}

/// Defects 11.2 and 11.3 on the real broker: a miss due in the year
/// 292,277,026 (or before the epoch) killed KFC's reader, and a junk
/// message whose dead letter was larger than the producer accepts was
/// retried forever; either froze every partition. Now both are handled and
/// the misses behind them are filled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_kafka_message_kills_kfcs_reader() -> anyhow::Result<()> {
    use embark_proto::internal::v1::MissEvent;
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start().await?;
    // A producer limit well under the junk message below: its dead letter
    // (the junk raw, plus a reason) would never fit.
    let kfc = stack.start_kfc_with(&["--kafka-property", "message.max.bytes=200000"]).await?;
    let miss = |key: &str, not_before_unix_ms: i64| {
        let version = embark_tests::builtin_version(MODEL);
        let e = MissEvent { model: MODEL.into(), key: key.into(), not_before_unix_ms, version, ..MissEvent::default() };
        (embark_queue::codec::message_key(&embark_tests::stored_as(MODEL), key), embark_queue::codec::encode_miss(&e))
    };
    let junk = vec![0xffu8; 500_000];
    produce(
        &stack.broker.brokers(),
        &stack.miss_topic,
        vec![miss("due in the far future", i64::MAX), miss("due before the epoch", i64::MIN), (b"junk".to_vec(), junk)],
    )
    .await?;

    // Misses published after the poison are still filled.
    let mut client = stack.client().await?;
    let keys: Vec<String> = (0..40).map(|i| format!("after the poison {i}")).collect();
    client.lookup(lookup(keys.clone())).await?;
    let mut wanted = keys.clone();
    wanted.push("due before the epoch".into());
    eventually(Duration::from_secs(60), "the misses behind the poison filled", || async {
        Ok((stack.stored(&wanted).await? == wanted.len()).then_some(()))
    })
    .await?;

    let letters = read_dead_letters(&stack.broker.brokers(), &stack.dlq_topic, 1, Duration::from_secs(30))?;
    let junk = letters.iter().find(|d| d.event.is_none()).expect("the junk message is a dead letter");
    assert_eq!(junk.raw.len(), embark_queue::codec::MAX_DEAD_LETTER_RAW, "cut to fit");
    assert!(junk.reason.contains("not a MissEvent") && junk.reason.contains("cut to"), "{}", junk.reason);
    // The reader lives and says so; the far-future miss waits (clamped),
    // it did not kill anything.
    let ready = reqwest::get(format!("http://{}/readyz", kfc.metrics)).await?;
    assert!(ready.status().is_success(), "{}", ready.text().await?);
    assert!(kfc.metric("kfc_delayed_misses").await? >= 1.0);
    Ok(())
}

/// Defect 11.8 across replicas: Invalidate cleared only the tier of the
/// replica that served it; another replica went on answering the old
/// vector from its tier. Now every replica drops the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_is_incoherent() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start().await?;
    let data = tempfile::tempdir()?;
    let other = start_embark(&stack.broker.brokers(), &stack.miss_topic, &stack.store_url, &data).await?;
    let key = "a key both replicas cache".to_string();
    stack.store.put_vectors(&embark_tests::stored_as(MODEL), vec![(key.clone(), vec![0.25; DIM])]).await?;
    let (mut a, mut b) = (stack.client().await?, other.embark_client().await?);
    for client in [&mut a, &mut b] {
        client.lookup(lookup(vec![key.clone()])).await?;
        let cached = client.lookup(lookup(vec![key.clone()])).await?.into_inner();
        assert_eq!(sources(&cached.sources), vec![Source::Cache]);
    }

    let done =
        a.invalidate(embark_proto::embark::v1::InvalidateRequest { model: MODEL.into(), keys: vec![key.clone()] });
    assert_eq!(done.await?.into_inner().invalidated, 1);
    let seen = eventually(Duration::from_secs(20), "the other replica to drop the key", || {
        let (mut b, key) = (b.clone(), key.clone());
        async move {
            let s = sources(&b.lookup(lookup(vec![key])).await?.into_inner().sources);
            Ok((s != vec![Source::Cache]).then_some(s))
        }
    })
    .await?;
    assert_eq!(seen, vec![Source::OovPending], "the store row is gone too");
    Ok(())
}
