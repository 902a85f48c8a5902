//! The distributed queue on Kafka: every production librdkafka client of
//! EmbArk (the test harness `embark-tests` has its own, for test messages).
//!
//! - [`publisher`]: [`KafkaMissPublisher`], the front's misses to the miss
//!   topic, never in a Lookup's way.
//! - [`source`]: [`KafkaMissSource`], the miss topic for KFC's consumer
//!   group; retries and dead letters go back to Kafka.
//! - [`offsets`]: [`OffsetTracker`], which offsets are settled, so only
//!   settled prefixes are committed.
//! - [`invalidations`]: the invalidation topic that tells every `embark
//!   serve` replica which keys to drop from its tier and index.
//!
//! - [`security`]: the security flags (SASL, TLS) every client gets.
//!
//! And what all of them share, here: the default topic names, extra client
//! properties from `--kafka-property`, topic creation, and which produce
//! errors are permanent.

pub mod invalidations;
pub mod offsets;
pub mod publisher;
pub mod security;
pub mod source;

use std::time::Duration;

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::RDKafkaErrorCode,
    util::Timeout,
};

pub use invalidations::{Following, KafkaInvalidations};
pub use offsets::{MissToken, OffsetTracker};
pub use publisher::{KafkaMissPublisher, KafkaPublisherConfig};
/// librdkafka's error, for callers that need not depend on rdkafka.
pub use rdkafka::error::KafkaError;
pub use security::{KafkaSecurityArgs, KafkaSecurityError, client_properties};
pub use source::{KafkaMissSource, KafkaSourceConfig};

/// Where a client looks for Kafka when told nothing.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";
/// KFC's consumer group.
pub const DEFAULT_GROUP: &str = "kfc";
pub const DEFAULT_MISS_TOPIC: &str = "embark.misses";
pub const DEFAULT_DLQ_TOPIC: &str = "embark.misses.dlq";
pub const DEFAULT_INVALIDATION_TOPIC: &str = "embark.invalidations";

/// A `--kafka-property` that is not `key=value`.
#[derive(Debug, thiserror::Error)]
#[error("--kafka-property {0:?}: expected key=value")]
pub struct BadProperty(pub String);

/// Parses librdkafka properties given as `key=value` flags (security
/// settings and the like), once at start; every client gets them.
pub fn parse_properties(list: &[String]) -> Result<Vec<(String, String)>, BadProperty> {
    list.iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| BadProperty(p.clone()))
        })
        .collect()
}

/// A client configuration for `brokers`, with the extra `properties` set
/// last so an operator's setting wins over ours.
fn client_config(brokers: &str, properties: &[(String, String)], ours: &[(&str, String)]) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers);
    for (k, v) in ours {
        cc.set(*k, v);
    }
    for (k, v) in properties {
        cc.set(k, v);
    }
    cc
}

/// Creates `topics` (name, partitions) with `replication` if they do not
/// exist yet. Topics that exist are left as they are.
pub async fn ensure_topics(
    brokers: &str,
    properties: &[(String, String)],
    topics: &[(&str, i32)],
    replication: i32,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(brokers, properties, &[("socket.timeout.ms", timeout.as_millis().to_string())]).create()?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn properties_are_key_value_and_the_operators_win() {
        let props = parse_properties(&["security.protocol = SASL_SSL".into(), "linger.ms=50".into()]).expect("parse");
        assert_eq!(props[0], ("security.protocol".into(), "SASL_SSL".into()));
        let cc = client_config("b:9092", &props, &[("linger.ms", "5".into())]);
        assert_eq!(cc.get("linger.ms"), Some("50"));
        assert_eq!(cc.get("bootstrap.servers"), Some("b:9092"));
        let err = parse_properties(&["novalue".into()]).expect_err("refused");
        assert!(err.to_string().contains("\"novalue\""), "{err}");
    }
}
