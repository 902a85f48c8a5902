//! Where misses come from.

use std::time::Duration;

use async_trait::async_trait;
use embark_proto::embark::v1::{DeadLetter, MissEvent};

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
    /// `dead` are the misses given up on (already stored as failure
    /// records), for a source that forwards them (Kafka's DLQ).
    async fn settle(
        &self,
        done: Vec<Self::Token>,
        retry: Vec<MissEvent>,
        dead: Vec<DeadLetter>,
    ) -> Result<(), SourceError>;

    /// A round failed before settling `batch` (the store was unreachable):
    /// hand it out again after `after`. The default does nothing, for a
    /// source that hands out unsettled misses again by itself.
    async fn abandon(&self, batch: Vec<(Self::Token, MissEvent)>, after: Duration) {
        let _ = (batch, after);
    }
}
