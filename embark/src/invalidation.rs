//! Invalidate across replicas: each `embark serve` replica holds its own
//! tier and similarity index, so deleting a key from the store is not
//! enough; the replica that served the Invalidate publishes an
//! [`InvalidationEvent`] on Kafka and every replica drops the keys.
//!
//! - [`KafkaInvalidations`] publishes (acks=all; the Invalidate fails with
//!   `UNAVAILABLE` if Kafka does not take it, and is safe to retry).
//! - [`spawn_listener`] follows the topic from its end, on every partition
//!   (manual assignment, no consumer group to wait for): a replica starting
//!   now has an empty tier, so only later events matter to it. Readiness
//!   waits until it follows the topic.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use backon::Retryable;
use embark_proto::embark::v1::InvalidationEvent;
use prost::Message as _;
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{Consumer, StreamConsumer},
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
    util::Timeout,
};
use tokio_util::sync::CancellationToken;

use crate::front::{Front, InvalidationBroadcast};

pub const DEFAULT_INVALIDATION_TOPIC: &str = "embark.invalidations";

/// How long an Invalidate waits for Kafka to take its event.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A name for this replica, unique enough to skip its own events.
pub fn replica_id() -> String {
    format!("{}-{}-{:016x}", std::process::id(), embark_store::now_unix_ms(), rand::random::<u64>())
}

impl KafkaInvalidations {
    pub fn new(brokers: &str, topic: &str, origin: &str, properties: &[(String, String)]) -> Result<Self, KafkaError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("message.timeout.ms", PUBLISH_TIMEOUT.as_millis().to_string());
        for (k, v) in properties {
            cc.set(k, v);
        }
        Ok(Self { producer: cc.create()?, topic: topic.to_owned(), origin: origin.to_owned() })
    }
}

#[async_trait::async_trait]
impl InvalidationBroadcast for KafkaInvalidations {
    async fn broadcast(&self, model: &str, keys: &[String]) -> Result<(), String> {
        let event = InvalidationEvent {
            model: model.to_owned(),
            keys: keys.to_vec(),
            at_unix_ms: embark_store::now_unix_ms(),
            origin: self.origin.clone(),
        };
        let payload = event.encode_to_vec();
        let record = FutureRecord::to(&self.topic).key(model.as_bytes()).payload(&payload);
        self.producer.send(record, Timeout::After(PUBLISH_TIMEOUT)).await.map(|_| ()).map_err(|(e, _)| e.to_string())
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

/// Follows `topic` from its end and applies other replicas' invalidations
/// to `front`, until `stop`.
pub fn spawn_listener(
    brokers: &str,
    topic: &str,
    origin: &str,
    properties: &[(String, String)],
    front: Arc<Front>,
    stop: CancellationToken,
) -> Result<Following, KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("group.id", format!("embark-invalidations-{origin}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "latest");
    for (k, v) in properties {
        cc.set(k, v);
    }
    let consumer: StreamConsumer = cc.create()?;
    let following = Following::default();
    let (topic, origin, state) = (topic.to_owned(), origin.to_owned(), following.clone());
    tokio::spawn(async move {
        let consumer = Arc::new(consumer);
        // Assign every partition at its end; retried while Kafka is away.
        let backoff = kfc::backoff::Backoff { base: Duration::from_millis(200), max: Duration::from_secs(10) };
        let assign = || {
            let (c, t) = (consumer.clone(), topic.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    let metadata = c.fetch_metadata(Some(&t), Timeout::After(Duration::from_secs(5)))?;
                    let mut tpl = TopicPartitionList::new();
                    for p in metadata.topics().iter().filter(|m| m.name() == t).flat_map(|m| m.partitions()) {
                        tpl.add_partition_offset(&t, p.id(), Offset::End)?;
                    }
                    if tpl.count() == 0 {
                        return Err(KafkaError::Subscription(format!("topic {t} has no partitions (yet)")));
                    }
                    c.assign(&tpl)
                })
                .await
                .map_err(anyhow::Error::from)?
                .map_err(anyhow::Error::from)
            }
        };
        let assigned = assign.retry(kfc::retry::delays(backoff)).notify(|e, delay| {
            tracing::warn!(error = %e, ?delay, topic, "cannot follow the invalidation topic yet");
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            assigned = assigned => if let Err(e) = assigned {
                tracing::error!(error = %e, topic, "gave up following the invalidation topic");
                return;
            },
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
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            if event.origin == origin || front.models().get(&event.model).is_none() {
                continue;
            }
            front.forget_local(&event.model, &event.keys);
        }
    });
    Ok(following)
}
