//! Kafka: the distributed miss queue, consumed at least once.
//!
//! [`KafkaMissSource`] is the [`MissSource`] of the `kfc` binary. One task
//! reads the consumer group's partitions and hands misses to the fill
//! workers through a bounded channel. Several workers run
//! [`crate::FillLoop`] rounds at once over whatever partitions the misses
//! came from, so a slow partition never holds up the others.
//!
//! **Offsets.** An offset is committed only when it and every offset before
//! it in its partition is settled: its vector or failure record is written,
//! or its retry is safely back on the topic. [`OffsetTracker`] keeps the
//! unsettled offsets of each partition. The committable position is the
//! lowest of them, or one past the highest seen. A periodic task commits
//! positions that moved. On a revocation (rebalance) and at shutdown, the
//! settled positions are committed synchronously before the partitions are
//! released. A crash therefore replays work and never skips any. Replays are
//! cheap: keys already stored are skipped.
//!
//! **Retries never block a partition.** A transiently failed miss goes back
//! on the topic with its attempt count and a not-before time, and its
//! original offset is settled. When a miss comes due later it waits in a
//! bounded in-memory delay queue, while the messages after it flow. When the
//! queue is full, reading pauses until the earliest entry is due. The retry
//! is durable as soon as Kafka acknowledges it.
//!
//! **Dead letters.** A permanent failure is written to the store (by the
//! fill loop) and forwarded to the DLQ topic with its code and reason. A
//! message that is not a `MissEvent` goes there too, raw.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use embark_proto::embark::v1::{DeadLetter, MissEvent};
use embark_store::now_unix_ms;
use futures::StreamExt;
use prost::Message as _;
use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::{KafkaError, RDKafkaErrorCode},
    producer::{FutureProducer, FutureRecord, Producer},
    util::Timeout,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, time::DelayQueue};

use crate::{MissSource, SourceError, backoff::Backoff};

pub const DEFAULT_MISS_TOPIC: &str = "embark.misses";
pub const DEFAULT_DLQ_TOPIC: &str = "embark.misses.dlq";

/// The longest a miss waits in the delay queue. A `not_before` further out
/// (a clock far ahead, a hostile message) is due after this instead: the
/// fill loop's own backoff never asks for more, and the delay queue panics
/// on durations of years.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(600);

/// The most of a poison message's bytes a dead letter carries: enough to
/// see what it was, small enough that the letter always fits a message
/// (`message.max.bytes` is 1 MB by default).
pub const MAX_DEAD_LETTER_RAW: usize = 64 << 10;

/// The longest reason a dead letter carries, in bytes.
pub const MAX_DEAD_LETTER_REASON: usize = 4096;

/// Times a produce that failed permanently (see [`is_permanent`]) is tried
/// before its record is dropped (counted), so that one bad record can
/// never freeze a partition's offsets.
pub const MAX_PERMANENT_PRODUCE_ATTEMPTS: u32 = 3;

/// How long a miss due at `not_before_unix_ms` waits from `now`: `None`
/// when due, at most [`MAX_RETRY_DELAY`]. Saturating: any `i64` is safe.
pub fn retry_wait(not_before_unix_ms: i64, now_unix_ms: i64) -> Option<Duration> {
    let wait = not_before_unix_ms.saturating_sub(now_unix_ms);
    (wait > 0).then(|| Duration::from_millis(wait as u64).min(MAX_RETRY_DELAY))
}

/// Cuts a dead letter's raw bytes and reason so it fits in a message, and
/// says so in the reason.
pub fn fit_dead_letter(d: &mut DeadLetter) {
    let mut cut = Vec::new();
    if d.raw.len() > MAX_DEAD_LETTER_RAW {
        cut.push(format!("raw cut to {MAX_DEAD_LETTER_RAW} of {} bytes", d.raw.len()));
        d.raw = d.raw.slice(..MAX_DEAD_LETTER_RAW);
    }
    if d.reason.len() > MAX_DEAD_LETTER_REASON {
        let mut end = MAX_DEAD_LETTER_REASON;
        while !d.reason.is_char_boundary(end) {
            end -= 1;
        }
        cut.push(format!("reason cut to {end} of {} bytes", d.reason.len()));
        d.reason.truncate(end);
    }
    if !cut.is_empty() {
        d.reason = format!("{} ({})", d.reason, cut.join(", "));
    }
}

/// Whether a produce error will recur however often it is retried: the
/// record is too large, the topic does not exist or may not be written.
/// Broker outages, timeouts and full queues are transient.
pub fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidRecord
                | C::InvalidMessage
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidTopic
                | C::InvalidRequiredAcks
                | C::UnsupportedForMessageFormat
        )
    )
}

/// The message key of a miss: model, a newline, key. The same key always
/// lands on the same partition, so its misses are ordered.
pub fn message_key(model: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(model.len() + 1 + key.len());
    k.extend_from_slice(model.as_bytes());
    k.push(b'\n');
    k.extend_from_slice(key.as_bytes());
    k
}

/// Parses librdkafka properties given as `key=value` flags.
pub fn parse_properties(list: &[String]) -> Result<Vec<(String, String)>, String> {
    list.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("--kafka-property {p:?}: expected key=value"))
        })
        .collect()
}

/// Creates `topics` (name, partitions) with `replication` if they do not
/// exist yet. Topics that exist are left as they are.
pub async fn ensure_topics(
    brokers: &str,
    topics: &[(&str, i32)],
    replication: i32,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("socket.timeout.ms", timeout.as_millis().to_string())
        .create()?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|(name, parts)| NewTopic::new(name, *parts, TopicReplication::Fixed(replication))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Timeout::After(timeout))).request_timeout(Some(timeout));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(name) => tracing::info!(topic = %name, "topic created"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => tracing::debug!(topic = %name, "topic exists"),
            Err((name, code)) => {
                tracing::error!(topic = %name, error = %code, "cannot create topic");
                return Err(KafkaError::AdminOp(code));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    pub brokers: String,
    pub miss_topic: String,
    pub dlq_topic: String,
    pub group: String,
    /// The group coordinator's session timeout: how soon a dead member's
    /// partitions move to another.
    pub session_timeout: Duration,
    /// How often settled positions are committed.
    pub commit_interval: Duration,
    /// Misses read but not yet taken by a worker.
    pub ready_buffer: usize,
    /// Misses waiting in memory for their retry time; reading pauses when full.
    pub max_delayed: usize,
    /// How long a worker waits to fill a batch after its first miss.
    pub linger: Duration,
    /// Extra librdkafka properties (`key=value`), e.g. security settings.
    pub properties: Vec<(String, String)>,
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            miss_topic: DEFAULT_MISS_TOPIC.into(),
            dlq_topic: DEFAULT_DLQ_TOPIC.into(),
            group: "kfc".into(),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            ready_buffer: 1024,
            max_delayed: 100_000,
            linger: Duration::from_millis(5),
            properties: Vec::new(),
        }
    }
}

/// A handed-out miss: where it is in Kafka, and which assignment of its
/// partition it belongs to (a token of an earlier assignment is stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissToken {
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

#[derive(Debug)]
struct PartitionState {
    generation: u64,
    /// Offsets handed out or waiting, not yet settled.
    unsettled: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// The last position committed (or sent to commit).
    committed: Option<i64>,
}

impl PartitionState {
    fn new(generation: u64) -> Self {
        Self { generation, unsettled: BTreeSet::new(), next: None, committed: None }
    }

    fn position(&self) -> Option<i64> {
        self.unsettled.first().copied().or(self.next)
    }
}

/// Which offsets of each assigned partition are settled, so only settled
/// prefixes are committed.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    inner: Mutex<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    partitions: HashMap<i32, PartitionState>,
    generations: u64,
}

impl OffsetTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, TrackerInner> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking `partitions` afresh (a new assignment).
    pub fn assign(&self, partitions: &[i32]) {
        let mut t = self.lock();
        for &p in partitions {
            t.generations += 1;
            let generation = t.generations;
            t.partitions.insert(p, PartitionState::new(generation));
        }
    }

    /// Stops tracking `partitions`; returns their settled positions to commit.
    pub fn revoke(&self, partitions: &[i32]) -> Vec<(i32, i64)> {
        let mut t = self.lock();
        partitions
            .iter()
            .filter_map(|p| t.partitions.remove(p).and_then(|s| s.position().map(|pos| (*p, pos))))
            .collect()
    }

    /// Records that `offset` was read and is not settled yet. `None` when
    /// the partition is not assigned to this member (a message fetched
    /// before a revocation and delivered after it): the message is not
    /// ours to process, and tracking it would let this member commit a
    /// position in a partition another member now owns.
    pub fn begin(&self, partition: i32, offset: i64) -> Option<MissToken> {
        let mut t = self.lock();
        let s = t.partitions.get_mut(&partition)?;
        s.unsettled.insert(offset);
        s.next = Some(s.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(MissToken { partition, offset, generation: s.generation })
    }

    /// Whether `token` belongs to the current assignment of its partition.
    pub fn is_current(&self, token: &MissToken) -> bool {
        self.lock().partitions.get(&token.partition).is_some_and(|s| s.generation == token.generation)
    }

    /// Marks `token` settled. Stale tokens are ignored: their partition was
    /// revoked, and its new owner replays them.
    pub fn settle(&self, token: &MissToken) {
        if let Some(s) = self.lock().partitions.get_mut(&token.partition)
            && s.generation == token.generation
        {
            s.unsettled.remove(&token.offset);
        }
    }

    /// Positions that moved since the last call, marked as committed.
    pub fn take_commits(&self) -> Vec<(i32, i64)> {
        let mut t = self.lock();
        let mut out = Vec::new();
        for (p, s) in t.partitions.iter_mut() {
            if let Some(pos) = s.position()
                && s.committed != Some(pos)
            {
                s.committed = Some(pos);
                out.push((*p, pos));
            }
        }
        out
    }

    /// Forgets that `positions` were committed (the commit failed).
    pub fn uncommit(&self, positions: &[(i32, i64)]) {
        let mut t = self.lock();
        for (p, pos) in positions {
            if let Some(s) = t.partitions.get_mut(p)
                && s.committed == Some(*pos)
            {
                s.committed = None;
            }
        }
    }

    /// Unsettled misses across all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock().partitions.values().map(|s| s.unsettled.len()).sum()
    }
}

fn commit_list(topic: &str, positions: &[(i32, i64)]) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (p, pos) in positions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(*pos))?;
    }
    Ok(tpl)
}

/// The consumer's callbacks: keeps the tracker in step with assignments and
/// commits settled work before a partition is given away.
pub struct TrackingContext {
    tracker: Arc<OffsetTracker>,
    topic: String,
}

impl ClientContext for TrackingContext {}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let ours = |tpl: &TopicPartitionList| -> Vec<i32> {
            tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = ours(tpl);
                tracing::info!(partitions = ?parts, "partitions assigned");
                self.tracker.assign(&parts);
            }
            Rebalance::Revoke(tpl) => {
                let parts = ours(tpl);
                let positions = self.tracker.revoke(&parts);
                tracing::info!(partitions = ?parts, committing = ?positions, "partitions revoked");
                if !positions.is_empty() {
                    match commit_list(&self.topic, &positions).and_then(|tpl| consumer.commit(&tpl, CommitMode::Sync)) {
                        Ok(()) => metrics::counter!("kfc_commits_total", "when" => "revoke").increment(1),
                        Err(e) => tracing::warn!(error = %e, "commit before revocation failed; work will be replayed"),
                    }
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

type Ready = (MissToken, MissEvent);

/// The miss topic as a [`MissSource`] for a consumer group.
pub struct KafkaMissSource {
    consumer: Arc<StreamConsumer<TrackingContext>>,
    producer: FutureProducer,
    tracker: Arc<OffsetTracker>,
    config: KafkaSourceConfig,
    ready: tokio::sync::Mutex<mpsc::Receiver<Ready>>,
    redeliver: mpsc::UnboundedSender<(Ready, Duration)>,
    stop: CancellationToken,
    backoff: Backoff,
    /// Cancelled when the read loop ends, for whatever reason (a panic
    /// included): readiness and the binary's supervisor watch it.
    reader_done: CancellationToken,
}

impl std::fmt::Debug for KafkaMissSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaMissSource").field("config", &self.config).finish_non_exhaustive()
    }
}

impl KafkaMissSource {
    /// Joins the group and starts reading, and committing, until `stop`.
    /// Call [`KafkaMissSource::shutdown`] after the workers have stopped.
    pub fn start(config: KafkaSourceConfig, stop: CancellationToken) -> Result<Arc<Self>, KafkaError> {
        let tracker = Arc::new(OffsetTracker::default());
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (config.session_timeout.as_millis() / 4).max(100).to_string())
            .set("partition.assignment.strategy", "range,roundrobin");
        for (k, v) in &config.properties {
            cc.set(k, v);
        }
        let context = TrackingContext { tracker: tracker.clone(), topic: config.miss_topic.clone() };
        let consumer: StreamConsumer<TrackingContext> = cc.create_with_context(context)?;
        consumer.subscribe(&[&config.miss_topic])?;

        let mut pc = ClientConfig::new();
        pc.set("bootstrap.servers", &config.brokers).set("acks", "all").set("linger.ms", "5");
        for (k, v) in &config.properties {
            pc.set(k, v);
        }
        let producer: FutureProducer = pc.create()?;

        let (ready_tx, ready_rx) = mpsc::channel(config.ready_buffer.max(1));
        let (redeliver_tx, redeliver_rx) = mpsc::unbounded_channel();
        let source = Arc::new(Self {
            consumer: Arc::new(consumer),
            producer,
            tracker,
            config,
            ready: tokio::sync::Mutex::new(ready_rx),
            redeliver: redeliver_tx,
            stop: stop.clone(),
            backoff: Backoff { base: Duration::from_millis(200), max: Duration::from_secs(10) },
            reader_done: CancellationToken::new(),
        });
        tokio::spawn(source.clone().read_loop(ready_tx, redeliver_rx));
        tokio::spawn(source.clone().commit_loop());
        Ok(source)
    }

    /// Whether the read loop is running (it stops at shutdown, or if it
    /// ever failed).
    pub fn is_reading(&self) -> bool {
        !self.reader_done.is_cancelled()
    }

    /// Resolves when the read loop has ended.
    pub async fn reader_stopped(&self) {
        self.reader_done.cancelled().await
    }

    /// Misses read and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    /// Commits what is settled (synchronously) and leaves the group. Call
    /// after the fill workers have finished their rounds.
    pub async fn shutdown(&self) {
        let positions = self.tracker.take_commits();
        if !positions.is_empty() {
            let consumer = self.consumer.clone();
            let topic = self.config.miss_topic.clone();
            let result = tokio::task::spawn_blocking(move || {
                commit_list(&topic, &positions).and_then(|tpl| consumer.commit(&tpl, CommitMode::Sync))
            })
            .await;
            match result {
                Ok(Ok(())) => tracing::info!("committed settled offsets at shutdown"),
                Ok(Err(e)) => tracing::warn!(error = %e, "final commit failed; work will be replayed"),
                Err(e) => tracing::warn!(error = %e, "final commit task failed"),
            }
        }
        let consumer = self.consumer.clone();
        let _ = tokio::task::spawn_blocking(move || consumer.unsubscribe()).await;
        let _ = self.producer.flush(Timeout::After(Duration::from_secs(5)));
    }

    /// Reads the topic into the ready channel (or the delay queue) until stop.
    async fn read_loop(
        self: Arc<Self>,
        ready: mpsc::Sender<Ready>,
        mut redeliver: mpsc::UnboundedReceiver<(Ready, Duration)>,
    ) {
        // Dropped on every exit, a panic's unwinding included.
        let _done = self.reader_done.clone().drop_guard();
        let mut delayed: DelayQueue<Ready> = DelayQueue::new();
        loop {
            let room = delayed.len() < self.config.max_delayed;
            metrics::gauge!("kfc_delayed_misses").set(delayed.len() as f64);
            let next: Option<Ready> = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(due) = delayed.next(), if !delayed.is_empty() => {
                    let r = due.into_inner();
                    self.tracker.is_current(&r.0).then_some(r)
                }
                Some((r, after)) = redeliver.recv() => {
                    delayed.insert(r, after.min(MAX_RETRY_DELAY));
                    None
                }
                m = self.consumer.recv(), if room => match m {
                    Ok(m) => self.admit(m.partition(), m.offset(), m.payload(), &mut delayed).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the miss topic");
                        metrics::counter!("kfc_consumer_errors_total").increment(1);
                        tokio::select! {
                            _ = self.stop.cancelled() => break,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        None
                    }
                },
            };
            if let Some(r) = next {
                tokio::select! {
                    _ = self.stop.cancelled() => break,
                    sent = ready.send(r) => if sent.is_err() { break },
                }
            }
        }
        tracing::info!(delayed = delayed.len(), "stopped reading the miss topic");
    }

    /// Tracks a new message and returns it if it is due now.
    async fn admit(
        &self,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        delayed: &mut DelayQueue<Ready>,
    ) -> Option<Ready> {
        let Some(token) = self.tracker.begin(partition, offset) else {
            tracing::debug!(partition, offset, "skipping a message of a partition no longer assigned here");
            return None;
        };
        metrics::counter!("kfc_misses_read_total").increment(1);
        let event = match payload.map(MissEvent::decode) {
            Some(Ok(e)) if !e.model.is_empty() && !e.key.is_empty() => e,
            other => {
                let reason = match other {
                    None => "empty message".to_owned(),
                    Some(Err(e)) => format!("not a MissEvent: {e}"),
                    Some(Ok(_)) => "a MissEvent without model or key".to_owned(),
                };
                tracing::warn!(partition, offset, %reason, "poison message on the miss topic");
                let mut letter = DeadLetter {
                    event: None,
                    code: 0,
                    reason,
                    at_unix_ms: now_unix_ms(),
                    raw: payload.unwrap_or_default().to_vec().into(),
                    partition,
                    offset,
                };
                // Never more than fits a message, and saying so.
                fit_dead_letter(&mut letter);
                // Settled only once the DLQ has it (or at shutdown, unsettled).
                if self.publish_until_done(&[], &[letter]).await.is_ok() {
                    self.tracker.settle(&token);
                }
                return None;
            }
        };
        match retry_wait(event.not_before_unix_ms, now_unix_ms()) {
            Some(wait) => {
                delayed.insert((token, event), wait);
                None
            }
            None => Some((token, event)),
        }
    }

    async fn commit_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            metrics::gauge!("kfc_in_flight_misses").set(self.tracker.in_flight() as f64);
            let positions = self.tracker.take_commits();
            if positions.is_empty() {
                continue;
            }
            match commit_list(&self.config.miss_topic, &positions)
                .and_then(|tpl| self.consumer.commit(&tpl, CommitMode::Async))
            {
                Ok(()) => metrics::counter!("kfc_commits_total", "when" => "periodic").increment(1),
                Err(e) => {
                    tracing::warn!(error = %e, "commit failed; retrying next tick");
                    self.tracker.uncommit(&positions);
                }
            }
        }
    }

    /// Produces `retry` to the miss topic and `dead` to the DLQ, and waits
    /// until Kafka has all of them. Transient errors (a broker down) are
    /// retried with backoff for as long as it takes, so nothing is lost;
    /// a record that fails permanently (too large, no such topic, denied)
    /// is dropped after [`MAX_PERMANENT_PRODUCE_ATTEMPTS`], logged and
    /// counted, so it cannot freeze the offsets behind it. Only records
    /// that failed are sent again. Errs only at shutdown, with nothing
    /// settled.
    async fn publish_until_done(&self, retry: &[MissEvent], dead: &[DeadLetter]) -> Result<(), SourceError> {
        let mut pending: Vec<Outgoing> = retry
            .iter()
            .map(|e| Outgoing {
                topic: &self.config.miss_topic,
                key: message_key(&e.model, &e.key),
                payload: e.encode_to_vec(),
                kind: "retry",
                permanent_failures: 0,
            })
            .chain(dead.iter().map(|d| {
                let mut d = d.clone();
                fit_dead_letter(&mut d);
                Outgoing {
                    topic: &self.config.dlq_topic,
                    key: d.event.as_ref().map(|e| message_key(&e.model, &e.key)).unwrap_or_default(),
                    payload: d.encode_to_vec(),
                    kind: "dead_letter",
                    permanent_failures: 0,
                }
            }))
            .collect();
        let mut attempt = 0;
        while !pending.is_empty() {
            let queue = Timeout::After(Duration::from_secs(5));
            let sends = pending
                .iter()
                .map(|o| self.producer.send(FutureRecord::to(o.topic).key(&o.key).payload(&o.payload), queue));
            let results = futures::future::join_all(sends).await;
            let mut failed = Vec::new();
            let mut last_error = None;
            for (mut o, result) in pending.into_iter().zip(results) {
                let Err((e, _)) = result else {
                    let name = if o.kind == "retry" { "kfc_retries_published_total" } else { "kfc_dead_letters_total" };
                    metrics::counter!(name).increment(1);
                    continue;
                };
                metrics::counter!("kfc_produce_errors_total", "kind" => o.kind).increment(1);
                if is_permanent(&e) {
                    o.permanent_failures += 1;
                    if o.permanent_failures >= MAX_PERMANENT_PRODUCE_ATTEMPTS {
                        tracing::error!(
                            error = %e, topic = o.topic, kind = o.kind, bytes = o.payload.len(),
                            "dropping a record Kafka refuses for good; its offset is settled"
                        );
                        let name = if o.kind == "retry" {
                            "kfc_retries_dropped_total"
                        } else {
                            "kfc_dead_letters_dropped_total"
                        };
                        metrics::counter!(name).increment(1);
                        continue;
                    }
                }
                last_error = Some(e);
                failed.push(o);
            }
            pending = failed;
            if let Some(e) = last_error {
                attempt += 1;
                let delay = self.backoff.delay(attempt);
                tracing::warn!(error = %e, ?delay, records = pending.len(), "producing retries or dead letters failed");
                tokio::select! {
                    _ = self.stop.cancelled() => return Err(SourceError(format!("shutting down: {e}"))),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
        Ok(())
    }
}

/// A record [`KafkaMissSource::publish_until_done`] has yet to see acknowledged.
struct Outgoing<'a> {
    topic: &'a str,
    key: Vec<u8>,
    payload: Vec<u8>,
    kind: &'static str,
    permanent_failures: u32,
}

#[async_trait]
impl MissSource for KafkaMissSource {
    type Token = MissToken;

    async fn next_batch(&self, max: usize) -> Result<Vec<(MissToken, MissEvent)>, SourceError> {
        let mut ready = self.ready.lock().await;
        let first = ready.recv().await.ok_or_else(|| SourceError("the miss topic reader stopped".into()))?;
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.config.linger;
        while batch.len() < max {
            match ready.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => match tokio::time::timeout_at(deadline, ready.recv()).await {
                    Ok(Some(r)) => batch.push(r),
                    _ => break,
                },
            }
        }
        Ok(batch)
    }

    async fn settle(
        &self,
        done: Vec<MissToken>,
        retry: Vec<MissEvent>,
        dead: Vec<DeadLetter>,
    ) -> Result<(), SourceError> {
        if !retry.is_empty() || !dead.is_empty() {
            self.publish_until_done(&retry, &dead).await?;
        }
        for t in &done {
            self.tracker.settle(t);
        }
        Ok(())
    }

    async fn abandon(&self, batch: Vec<(MissToken, MissEvent)>, after: Duration) {
        for r in batch {
            // The reader is gone only at shutdown: the misses stay
            // unsettled and are replayed by the next owner.
            let _ = self.redeliver.send((r, after));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_settled_prefixes() {
        let t = OffsetTracker::default();
        t.assign(&[0, 1]);
        let a = t.begin(0, 10).expect("assigned");
        let b = t.begin(0, 11).expect("assigned");
        let c = t.begin(0, 12).expect("assigned");
        assert_eq!(t.take_commits(), vec![(0, 10)]);
        t.settle(&b);
        t.settle(&c);
        assert_eq!(t.take_commits(), vec![], "10 is still unsettled");
        t.settle(&a);
        assert_eq!(t.take_commits(), vec![(0, 13)]);
        assert_eq!(t.take_commits(), vec![], "nothing moved");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn stale_tokens_are_ignored_after_revocation() {
        let t = OffsetTracker::default();
        t.assign(&[3]);
        let old = t.begin(3, 5).expect("assigned");
        assert_eq!(t.revoke(&[3]), vec![(3, 5)]);
        t.assign(&[3]);
        let new = t.begin(3, 5).expect("assigned");
        assert!(!t.is_current(&old));
        t.settle(&old);
        assert_eq!(t.take_commits(), vec![(3, 5)], "the old settle does not count");
        t.settle(&new);
        assert_eq!(t.take_commits(), vec![(3, 6)]);
    }

    /// Defect 11.15: `begin()` on a partition this member does not own
    /// started tracking it, so the member committed a position in a
    /// partition another member owns.
    #[test]
    fn begin_on_an_untracked_partition_can_commit_another_members_offset() {
        let t = OffsetTracker::default();
        t.assign(&[0]);
        assert!(t.begin(7, 100).is_none(), "partition 7 is not ours");
        assert_eq!(t.take_commits(), vec![], "nothing of partition 7 is ever committed");
        assert_eq!(t.in_flight(), 0);
    }

    /// Defect 11.2: a `not_before` far in the future (or far in the past)
    /// panicked `DelayQueue::insert` (or overflowed) and killed the reader.
    #[tokio::test]
    async fn one_kafka_message_kills_kfcs_reader() {
        let now = 1_700_000_000_000;
        assert_eq!(retry_wait(i64::MAX, now), Some(MAX_RETRY_DELAY));
        assert_eq!(retry_wait(i64::MIN, now), None);
        assert_eq!(retry_wait(now + 1500, now), Some(Duration::from_millis(1500)));
        assert_eq!(retry_wait(now, now), None);
        let mut q: DelayQueue<()> = DelayQueue::new();
        for wait in [retry_wait(i64::MAX, now), retry_wait(now + 1, now)].into_iter().flatten() {
            q.insert((), wait);
        }
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn dead_letters_are_cut_to_fit_the_producer() {
        let mut d = DeadLetter {
            raw: vec![7u8; 3 * MAX_DEAD_LETTER_RAW].into(),
            reason: "x".repeat(10_000),
            ..Default::default()
        };
        fit_dead_letter(&mut d);
        assert_eq!(d.raw.len(), MAX_DEAD_LETTER_RAW);
        assert!(d.reason.len() <= MAX_DEAD_LETTER_REASON + 128, "{}", d.reason.len());
        assert!(d.reason.contains("cut to"), "the letter says it was cut: {}", d.reason);
    }

    #[test]
    fn produce_errors_are_classified() {
        use rdkafka::error::RDKafkaErrorCode as C;
        for permanent in
            [C::MessageSizeTooLarge, C::TopicAuthorizationFailed, C::UnknownTopicOrPartition, C::InvalidRecord]
        {
            assert!(is_permanent(&KafkaError::MessageProduction(permanent)), "{permanent:?}");
        }
        for transient in [C::BrokerTransportFailure, C::MessageTimedOut, C::QueueFull, C::NotEnoughReplicas] {
            assert!(!is_permanent(&KafkaError::MessageProduction(transient)), "{transient:?}");
        }
    }

    #[test]
    fn message_keys_are_model_newline_key() {
        // Model names never hold a newline, so the first one splits them.
        assert_eq!(message_key("minilm-l6-v2", "a\nb"), b"minilm-l6-v2\na\nb");
    }
}
