//! [`KafkaMissPublisher`]: misses to the Kafka topic, never in a Lookup's way.
//!
//! `publish` hands the event to librdkafka's bounded in-memory queue and
//! returns; a background thread of librdkafka sends it (acks=all) and
//! reports the outcome to [`DeliveryCounter`]. Nothing on the Lookup path
//! waits on the network:
//!
//! - a full queue (a broker outage longer than the queue lasts) refuses the
//!   event at once: it is dropped and counted, and the front forgets the
//!   key's dedup entry, so the next Lookup of the key publishes it again;
//! - an event librdkafka could not deliver within `message.timeout.ms` is
//!   counted as dropped too, and the front is told ([`Undelivered`]) so
//!   the key leaves its dedup window and the next Lookup publishes it again.
//!
//! Nothing is lost for good: a miss exists as long as the key is unknown.

use std::time::Duration;

use embark_proto::internal::v1::MissEvent;
use rdkafka::{
    ClientContext, Message,
    error::{KafkaError, RDKafkaErrorCode},
    message::DeliveryResult,
    producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer},
    util::Timeout,
};

use crate::{
    MissPublisher,
    codec::{message_key, miss_record, parse_message_key},
};

/// Told of each miss librdkafka gave up on, with its model namespace
/// (`embark_proto::model_namespace`) and key (from the message key), from librdkafka's own thread: the front forgets the
/// key's dedup entry, so the next Lookup of it publishes it again instead
/// of waiting out the window.
pub type Undelivered = Box<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Clone)]
pub struct KafkaPublisherConfig {
    pub brokers: String,
    pub topic: String,
    /// Events librdkafka holds while the brokers are slow or away.
    pub buffer: usize,
    /// How long an event may wait for a broker before it is dropped.
    pub message_timeout: Duration,
    /// Extra librdkafka properties.
    pub properties: Vec<(String, String)>,
}

impl std::fmt::Debug for KafkaPublisherConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaPublisherConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("buffer", &self.buffer)
            .field("message_timeout", &self.message_timeout)
            .field("properties", &super::security::Redacted(&self.properties))
            .finish()
    }
}

/// Counts deliveries, and lets the next Lookup of an undelivered miss
/// publish it again at once; librdkafka calls it from its own thread.
pub struct DeliveryCounter {
    undelivered: Undelivered,
}

impl std::fmt::Debug for DeliveryCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryCounter").finish_non_exhaustive()
    }
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => metrics::counter!("embark_misses_delivered_total").increment(1),
            Err((e, message)) => {
                tracing::debug!(error = %e, "a miss was not delivered");
                metrics::counter!("embark_misses_dropped_total", "reason" => "undelivered").increment(1);
                // Otherwise the key would wait out the dedup window before
                // any Lookup could publish it again.
                if let Some((model, key)) = message.key().and_then(parse_message_key) {
                    (self.undelivered)(model, key);
                }
            }
        }
    }
}

pub struct KafkaMissPublisher {
    producer: ThreadedProducer<DeliveryCounter>,
    topic: String,
}

impl std::fmt::Debug for KafkaMissPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaMissPublisher").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl KafkaMissPublisher {
    /// A publisher that tells `undelivered` of each miss it gave up on.
    pub fn new(config: &KafkaPublisherConfig, undelivered: Undelivered) -> Result<Self, KafkaError> {
        let cc = super::client_config(
            &config.brokers,
            &config.properties,
            &[
                ("acks", "all".into()),
                // A retried send may duplicate a miss; duplicates are harmless
                // (KFC skips stored keys), and idempotence would make a broker
                // that lost its state fatal for this producer.
                ("enable.idempotence", "false".into()),
                ("linger.ms", "5".into()),
                ("queue.buffering.max.messages", config.buffer.max(1).to_string()),
                ("message.timeout.ms", config.message_timeout.as_millis().max(1).to_string()),
            ],
        );
        let producer: ThreadedProducer<DeliveryCounter> = cc.create_with_context(DeliveryCounter { undelivered })?;
        Ok(Self { producer, topic: config.topic.clone() })
    }

    /// Waits up to `timeout` for queued misses to be delivered (shutdown).
    pub fn flush(&self, timeout: Duration) {
        let queued = self.producer.in_flight_count();
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, queued, "not every miss reached Kafka before shutdown");
        } else if queued > 0 {
            tracing::info!(misses = queued, "flushed queued misses to Kafka");
        }
    }

    /// Misses queued in librdkafka, not yet acknowledged.
    pub fn queued(&self) -> i32 {
        self.producer.in_flight_count()
    }
}

impl MissPublisher for KafkaMissPublisher {
    fn publish(&self, event: MissEvent) -> bool {
        let key = message_key(&embark_proto::model_namespace(&event.model, &event.version), &event.key);
        let (payload, headers) = miss_record(&event);
        let mut record = BaseRecord::to(&self.topic).key(&key).payload(&payload);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        match self.producer.send(record) {
            Ok(()) => true,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                metrics::counter!("embark_misses_dropped_total", "reason" => "buffer_full").increment(1);
                false
            }
            Err((e, _)) => {
                tracing::debug!(error = %e, "a miss could not be queued");
                metrics::counter!("embark_misses_dropped_total", "reason" => "error").increment(1);
                false
            }
        }
    }
}
