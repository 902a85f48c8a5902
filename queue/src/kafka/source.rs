//! Kafka: the distributed miss queue, consumed at least once.
//!
//! [`KafkaMissSource`] is the [`MissSource`] of the `kfc` binary. One task
//! reads the consumer group's partitions and hands misses to the fill
//! workers through a bounded channel. Several workers run
//! `kfc::FillLoop` rounds at once over whatever partitions the misses
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

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use backon::Retryable;
use embark_proto::{
    internal::v1::{DeadLetter, MissEvent},
    now_unix_ms,
};
use futures::StreamExt;
use prost::Message as _;
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer},
    error::KafkaError,
    producer::{FutureProducer, FutureRecord, Producer},
    util::Timeout,
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, time::DelayQueue};

use super::{DEFAULT_DLQ_TOPIC, DEFAULT_MISS_TOPIC, MissToken, OffsetTracker, client_config, is_permanent};
use crate::{
    MissSource, QueueError,
    backoff::{Backoff, StopSleeper},
    codec::{
        MAX_RETRY_DELAY, attach_trace_headers, decode_miss, fit_dead_letter, message_key, miss_record, retry_wait,
    },
};

/// Times a produce that failed permanently (see [`super::is_permanent`]) is tried
/// before its record is dropped (counted), so that one bad record can
/// never freeze a partition's offsets.
pub const MAX_PERMANENT_PRODUCE_ATTEMPTS: u32 = 3;

#[derive(Clone)]
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
    /// How long a retry or dead letter may wait for the broker's
    /// acknowledgement (librdkafka's `message.timeout.ms`) before its
    /// round fails, is logged and is sent again. Without it librdkafka
    /// waits 300 s, and a produce the broker never answers held the misses
    /// of every partition unsettled, silently: commits stopped.
    pub publish_timeout: Duration,
    /// Extra librdkafka properties (`key=value`), e.g. security settings.
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaSourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSourceConfig")
            .field("brokers", &self.brokers)
            .field("miss_topic", &self.miss_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("group", &self.group)
            .field("session_timeout", &self.session_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("ready_buffer", &self.ready_buffer)
            .field("max_delayed", &self.max_delayed)
            .field("linger", &self.linger)
            .field("publish_timeout", &self.publish_timeout)
            .field("properties", &super::security::Redacted(&self.properties))
            .finish()
    }
}

impl Default for KafkaSourceConfig {
    fn default() -> Self {
        Self {
            brokers: super::DEFAULT_BROKERS.into(),
            miss_topic: DEFAULT_MISS_TOPIC.into(),
            dlq_topic: DEFAULT_DLQ_TOPIC.into(),
            group: super::DEFAULT_GROUP.into(),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            ready_buffer: 1024,
            max_delayed: 100_000,
            linger: Duration::from_millis(5),
            publish_timeout: Duration::from_secs(30),
            properties: Vec::new(),
        }
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
#[derive(Debug)]
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
        let cc = client_config(
            &config.brokers,
            &config.properties,
            &[
                ("group.id", config.group.clone()),
                ("enable.auto.commit", "false".into()),
                ("enable.auto.offset.store", "false".into()),
                ("auto.offset.reset", "earliest".into()),
                ("session.timeout.ms", config.session_timeout.as_millis().to_string()),
                ("heartbeat.interval.ms", (config.session_timeout.as_millis() / 4).max(100).to_string()),
                ("partition.assignment.strategy", "range,roundrobin".into()),
            ],
        );
        let context = TrackingContext { tracker: tracker.clone(), topic: config.miss_topic.clone() };
        let consumer: StreamConsumer<TrackingContext> = cc.create_with_context(context)?;
        consumer.subscribe(&[&config.miss_topic])?;

        let publish_timeout = config.publish_timeout.as_millis().max(1).to_string();
        let producer: FutureProducer = client_config(
            &config.brokers,
            &config.properties,
            &[("acks", "all".into()), ("linger.ms", "5".into()), ("message.timeout.ms", publish_timeout)],
        )
        .create()?;

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
                    Ok(m) => self.admit(m.partition(), m.offset(), m.payload(), m.headers(), &mut delayed).await,
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
        headers: Option<&rdkafka::message::BorrowedHeaders>,
        delayed: &mut DelayQueue<Ready>,
    ) -> Option<Ready> {
        let Some(token) = self.tracker.begin(partition, offset) else {
            tracing::debug!(partition, offset, "skipping a message of a partition no longer assigned here");
            return None;
        };
        metrics::counter!("kfc_misses_read_total").increment(1);
        let event = match decode_miss(payload) {
            Ok(mut e) => {
                attach_trace_headers(&mut e, headers);
                e
            }
            Err(poison) => {
                let reason = poison.to_string();
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
    async fn publish_until_done(&self, retry: &[MissEvent], dead: &[DeadLetter]) -> Result<(), QueueError> {
        let records: Vec<Outgoing> = retry
            .iter()
            .map(|e| {
                let (payload, headers) = miss_record(e);
                Outgoing {
                    topic: &self.config.miss_topic,
                    key: message_key(&embark_proto::model_namespace(&e.model, &e.version), &e.key),
                    payload,
                    headers,
                    kind: "retry",
                    permanent_failures: 0,
                }
            })
            .chain(dead.iter().map(|d| {
                let mut d = d.clone();
                fit_dead_letter(&mut d);
                Outgoing {
                    topic: &self.config.dlq_topic,
                    key: d
                        .event
                        .as_ref()
                        .map(|e| message_key(&embark_proto::model_namespace(&e.model, &e.version), &e.key))
                        .unwrap_or_default(),
                    payload: d.encode_to_vec(),
                    headers: None,
                    kind: "dead_letter",
                    permanent_failures: 0,
                }
            }))
            .collect();
        let pending = std::sync::Mutex::new(records);
        let pending = &pending;
        let lock = || pending.lock().unwrap_or_else(|p| p.into_inner());
        // The first round always runs; a retry does not once the stop has
        // come (the wait before it ends early at the stop): a round against
        // brokers that are down can take librdkafka's whole message timeout.
        let tried = std::sync::atomic::AtomicBool::new(false);
        let tried = &tried;
        let last_error = std::sync::Mutex::new(None);
        let last_error = &last_error;
        let round = move || async move {
            if tried.swap(true, std::sync::atomic::Ordering::Relaxed) && self.stop.is_cancelled() {
                let last = last_error.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(last.unwrap_or(KafkaError::Canceled));
            }
            let batch = std::mem::take(&mut *lock());
            let (failed, error) = self.send_once(batch).await;
            *lock() = failed;
            *last_error.lock().unwrap_or_else(|p| p.into_inner()) = error.clone();
            error.map_or(Ok(()), Err)
        };
        round
            .retry(self.backoff.delays())
            .sleep(StopSleeper(self.stop.clone()))
            .when(|_| !self.stop.is_cancelled())
            .notify(|e, delay| {
                let records = lock().len();
                tracing::warn!(error = %e, ?delay, records, "producing retries or dead letters failed");
            })
            .await
            .map_err(QueueError::ShuttingDown)
    }

    /// Sends `pending` once; returns the records to send again and the
    /// last error, if any failed. A record refused for good for the
    /// [`MAX_PERMANENT_PRODUCE_ATTEMPTS`]th time is dropped and counted.
    async fn send_once<'a>(&self, pending: Vec<Outgoing<'a>>) -> (Vec<Outgoing<'a>>, Option<KafkaError>) {
        let queue = Timeout::After(Duration::from_secs(5));
        let sends = pending.iter().map(|o| {
            let mut record = FutureRecord::to(o.topic).key(&o.key).payload(&o.payload);
            if let Some(h) = &o.headers {
                record = record.headers(h.clone());
            }
            self.producer.send(record, queue)
        });
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
                    let name =
                        if o.kind == "retry" { "kfc_retries_dropped_total" } else { "kfc_dead_letters_dropped_total" };
                    metrics::counter!(name).increment(1);
                    continue;
                }
            }
            last_error = Some(e);
            failed.push(o);
        }
        (failed, last_error)
    }
}

/// A record [`KafkaMissSource::publish_until_done`] has yet to see acknowledged.
struct Outgoing<'a> {
    topic: &'a str,
    key: Vec<u8>,
    payload: Vec<u8>,
    headers: Option<rdkafka::message::OwnedHeaders>,
    kind: &'static str,
    permanent_failures: u32,
}

#[async_trait]
impl MissSource for KafkaMissSource {
    type Token = MissToken;

    async fn next_batch(&self, max: usize) -> Result<Vec<(MissToken, MissEvent)>, QueueError> {
        let mut ready = self.ready.lock().await;
        let first = ready.recv().await.ok_or(QueueError::ReaderStopped)?;
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
    ) -> Result<(), QueueError> {
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

    /// The stall of `a_backlog_survives_kill_9_of_kfc` on a loaded machine:
    /// a produce the broker never acknowledged kept a worker waiting for
    /// librdkafka's default 300 s, with nothing logged, while its batch
    /// held every partition's commits back. Against a broker that accepts
    /// connections and never answers, a send now fails within the publish
    /// timeout (and its round is logged and retried).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_produce_the_broker_never_answers_fails_within_the_publish_timeout() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = silent.local_addr().expect("addr");
        // Accepts and holds every connection, reads nothing, answers nothing.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in silent.incoming().flatten() {
                held.push(c);
            }
        });
        let stop = CancellationToken::new();
        let config = KafkaSourceConfig {
            brokers: addr.to_string(),
            publish_timeout: Duration::from_secs(2),
            ..KafkaSourceConfig::default()
        };
        let source = KafkaMissSource::start(config, stop.clone()).expect("start");
        let record = Outgoing {
            topic: "misses",
            key: b"k".to_vec(),
            payload: b"payload".to_vec(),
            headers: None,
            kind: "retry",
            permanent_failures: 0,
        };
        let sent = tokio::time::timeout(Duration::from_secs(20), source.send_once(vec![record])).await;
        stop.cancel();
        let (failed, error) = sent.expect("the send ends within the publish timeout, not librdkafka's 300 s");
        assert_eq!(failed.len(), 1, "the record is kept for the next round");
        assert!(matches!(error, Some(KafkaError::MessageProduction(_))), "{error:?}");
    }
}
