//! The invalidation topic: each `embark serve` replica holds its own tier
//! and similarity index, so deleting a key from the store is not enough;
//! the replica that served the Invalidate publishes an [`InvalidationEvent`]
//! and every replica drops the keys.
//!
//! - [`KafkaInvalidations`] publishes (acks=all; the caller fails its
//!   Invalidate with `UNAVAILABLE` if Kafka does not take the event, and
//!   the Invalidate is safe to retry).
//! - [`follow`] reads the topic from its end, on every partition (manual
//!   assignment, no consumer group to wait for): a replica starting now has
//!   an empty tier, so only later events matter to it. [`Following`] says
//!   when it does, for readiness.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use backon::Retryable;
use embark_proto::{internal::v1::InvalidationEvent, now_unix_ms};
use prost::Message as _;
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use tokio_util::sync::CancellationToken;

use super::client_config;
use crate::{
    QueueError,
    backoff::{Backoff, StopSleeper},
};

/// How long an Invalidate waits for Kafka to take its event.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// How soon a failed read of the topic is tried again.
const READ_RETRY: Duration = Duration::from_millis(500);

/// A name for this replica, unique enough to skip its own events.
pub fn replica_id() -> String {
    format!("{}-{}-{:016x}", std::process::id(), now_unix_ms(), rand::random::<u64>())
}

/// Publishes invalidations for the other replicas.
pub struct KafkaInvalidations {
    producer: FutureProducer,
    topic: String,
    origin: String,
}

impl std::fmt::Debug for KafkaInvalidations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaInvalidations").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl KafkaInvalidations {
    /// A publisher on `topic` whose events carry `origin` (this replica's
    /// [`replica_id`]), so its own listener skips them.
    pub fn new(brokers: &str, topic: &str, origin: &str, properties: &[(String, String)]) -> Result<Self, KafkaError> {
        let cc = client_config(
            brokers,
            properties,
            &[("acks", "all".into()), ("message.timeout.ms", PUBLISH_TIMEOUT.as_millis().to_string())],
        );
        Ok(Self { producer: cc.create()?, topic: topic.to_owned(), origin: origin.to_owned() })
    }

    /// Publishes that `keys` of `model` were deleted; returns once Kafka
    /// has the event (acks=all).
    pub async fn publish(&self, model: &str, keys: &[String]) -> Result<(), KafkaError> {
        let event = InvalidationEvent {
            model: model.to_owned(),
            keys: keys.to_vec(),
            at_unix_ms: now_unix_ms(),
            origin: self.origin.clone(),
        };
        let payload = event.encode_to_vec();
        let record = FutureRecord::to(&self.topic).key(model.as_bytes()).payload(&payload);
        self.producer.send(record, Timeout::After(PUBLISH_TIMEOUT)).await.map(|_| ()).map_err(|(e, _)| e)
    }
}

/// Whether the listener follows the topic (for readiness).
#[derive(Debug, Clone, Default)]
pub struct Following(Arc<AtomicBool>);

impl Following {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Follows `topic` from its end and hands other replicas' events (not
/// `origin`'s own) to `apply`, until `stop`. Assigning the partitions is
/// retried with backoff while Kafka is away; an event that does not decode
/// is skipped and logged.
pub fn follow(
    brokers: &str,
    topic: &str,
    origin: &str,
    properties: &[(String, String)],
    apply: impl Fn(InvalidationEvent) + Send + 'static,
    stop: CancellationToken,
) -> Result<Following, KafkaError> {
    let consumer: StreamConsumer = client_config(
        brokers,
        properties,
        &[
            ("group.id", format!("embark-invalidations-{origin}")),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.offset.reset", "latest".into()),
        ],
    )
    .create()?;
    let following = Following::default();
    let (topic, origin, state) = (topic.to_owned(), origin.to_owned(), following.clone());
    tokio::spawn(async move {
        let consumer = Arc::new(consumer);
        let backoff = Backoff { base: Duration::from_millis(200), max: Duration::from_secs(10) };
        let assign = || {
            let (c, t) = (consumer.clone(), topic.clone());
            async move { tokio::task::spawn_blocking(move || assign_at_end(&c, &t)).await? }
        };
        let assigned = assign
            .retry(backoff.delays())
            .sleep(StopSleeper(stop.clone()))
            .when(|_| !stop.is_cancelled())
            .notify(|e, delay| tracing::warn!(error = %e, ?delay, topic, "cannot follow the invalidation topic yet"))
            .await;
        if let Err(e) = assigned {
            tracing::info!(error = %e, topic, "stopped before following the invalidation topic");
            return;
        }
        state.0.store(true, Ordering::Release);
        tracing::info!(topic, "following other replicas' invalidations");
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => break,
                m = consumer.recv() => m,
            };
            let event = match message {
                Ok(m) => match m.payload().map(InvalidationEvent::decode) {
                    Some(Ok(e)) => e,
                    _ => {
                        tracing::warn!(offset = m.offset(), "skipping an undecodable invalidation event");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "reading the invalidation topic");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(READ_RETRY) => {}
                    }
                    continue;
                }
            };
            if event.origin != origin {
                apply(event);
            }
        }
    });
    Ok(following)
}

/// Assigns every partition of `topic` at its end (blocking: metadata).
fn assign_at_end(consumer: &StreamConsumer, topic: &str) -> Result<(), QueueError> {
    let metadata = consumer.fetch_metadata(Some(topic), Timeout::After(Duration::from_secs(5)))?;
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics().iter().filter(|m| m.name() == topic).flat_map(|m| m.partitions()) {
        tpl.add_partition_offset(topic, p.id(), Offset::End)?;
    }
    if tpl.count() == 0 {
        return Err(KafkaError::Subscription(format!("topic {topic} has no partitions (yet)")).into());
    }
    Ok(consumer.assign(&tpl)?)
}
