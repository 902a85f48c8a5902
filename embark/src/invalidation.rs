//! Invalidate across `embark serve` replicas, on the Kafka invalidation
//! topic (`embark_queue::kafka::invalidations`): the replica that served
//! the Invalidate publishes the keys, and every other replica drops them
//! from its tier, dedup window and similarity index.

use std::sync::Arc;

use embark_queue::kafka::{Following, KafkaError, KafkaInvalidations, invalidations};
use tokio_util::sync::CancellationToken;

use crate::front::{BroadcastError, Front, InvalidationBroadcast};

#[async_trait::async_trait]
impl InvalidationBroadcast for KafkaInvalidations {
    async fn broadcast(&self, model: &str, keys: &[String]) -> Result<(), BroadcastError> {
        Ok(self.publish(model, keys).await?)
    }
}

/// Follows the invalidation topic and applies other replicas' events for
/// the models `front` serves, until `stop`.
pub fn spawn_listener(
    brokers: &str,
    topic: &str,
    origin: &str,
    properties: &[(String, String)],
    front: Arc<Front>,
    stop: CancellationToken,
) -> Result<Following, KafkaError> {
    let apply = move |event: embark_proto::internal::v1::InvalidationEvent| {
        if front.models().get(&event.model).is_some() {
            front.forget_local(&event.model, &event.keys);
        }
    };
    invalidations::follow(brokers, topic, origin, properties, apply, stop)
}
