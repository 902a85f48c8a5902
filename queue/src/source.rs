//! The fill loop's side of the queue.

use std::time::Duration;

use async_trait::async_trait;
use embark_proto::internal::v1::{DeadLetter, MissEvent};

/// Why a queue call failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The redb file of the local queue (I/O, a full disk, corruption).
    #[error("the durable miss queue: {0}")]
    Storage(#[from] redb::Error),
    /// A queued miss that does not decode (a torn or foreign write).
    #[error("queued miss {seq} does not decode: {source}")]
    Corrupt {
        seq: u64,
        #[source]
        source: prost::DecodeError,
    },
    /// The blocking task that ran a queue call panicked or was cancelled.
    #[error("a blocking queue task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A Kafka call failed (metadata, assignment, a client to create).
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The task reading the miss topic has ended (shutdown, or it failed).
    #[error("the miss topic reader stopped")]
    ReaderStopped,
    /// Shutdown came before Kafka acknowledged the retries or dead letters
    /// of a settle; nothing of it was settled.
    #[error("shutting down before Kafka took the records: {0}")]
    ShuttingDown(#[source] rdkafka::error::KafkaError),
}

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
    async fn next_batch(&self, max: usize) -> Result<Vec<(Self::Token, MissEvent)>, QueueError>;

    /// Marks `done` as processed and queues `retry` (with their updated
    /// attempt count and `not_before_unix_ms`) to be handed out again.
    /// `dead` are the misses given up on (already stored as failure
    /// records), for a source that forwards them (Kafka's DLQ).
    async fn settle(
        &self,
        done: Vec<Self::Token>,
        retry: Vec<MissEvent>,
        dead: Vec<DeadLetter>,
    ) -> Result<(), QueueError>;

    /// A round failed before settling `batch` (the store was unreachable):
    /// hand it out again after `after`. The default does nothing, for a
    /// source that hands out unsettled misses again by itself.
    async fn abandon(&self, batch: Vec<(Self::Token, MissEvent)>, after: Duration) {
        let _ = (batch, after);
    }
}
