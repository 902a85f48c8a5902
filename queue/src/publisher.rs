//! The front's side of the queue.

use embark_proto::internal::v1::MissEvent;

/// Where a Lookup sends its misses: [`crate::local::LocalMissQueue`] on one
/// machine, [`crate::kafka::KafkaMissPublisher`] distributed.
pub trait MissPublisher: Send + Sync + 'static {
    /// Queues `event` without waiting. Returns false if it was dropped (the
    /// buffer is full); the caller then forgets the key's dedup entry so the
    /// next Lookup tries again.
    fn publish(&self, event: MissEvent) -> bool;
}
