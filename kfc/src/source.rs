//! Where misses come from.

use async_trait::async_trait;
use embark_proto::embark::v1::MissEvent;

#[derive(Debug, thiserror::Error)]
#[error("miss source: {0}")]
pub struct SourceError(pub String);

/// A queue of misses with explicit settlement.
///
/// `next_batch` hands out misses without removing them; `settle` removes the
/// processed ones (their `Token`s) and re-queues those to retry later. A
/// source must hand a miss out again if it was never settled (after a crash
/// or restart).
#[async_trait]
pub trait MissSource: Send + Sync + 'static {
    /// Identifies a handed-out miss for `settle` (a queue position, a Kafka
    /// partition and offset...).
    type Token: Send + 'static;

    /// Waits until at least one miss is due and returns up to `max` of them.
    async fn next_batch(&self, max: usize) -> Result<Vec<(Self::Token, MissEvent)>, SourceError>;

    /// Marks `done` as processed and queues `retry` (with their updated
    /// attempt count and `not_before_unix_ms`) to be handed out again.
    async fn settle(&self, done: Vec<Self::Token>, retry: Vec<MissEvent>) -> Result<(), SourceError>;
}
