//! The miss path between the front and the filler, in one place.
//!
//! A Lookup that meets an unknown key hands a [`MissEvent`] to a
//! [`MissPublisher`] and returns; the fill loop (`kfc`) takes misses from a
//! [`MissSource`], and settles each only once its vector or failure record
//! is written. Both seams, and every implementation of them, live here:
//!
//! - [`publisher`]: [`MissPublisher`], what the front calls (never blocks).
//! - [`source`]: [`MissSource`], what the fill loop drains (at least once,
//!   with explicit settlement), and [`QueueError`].
//! - [`codec`]: the one encoding of a miss on a queue: the Kafka message key
//!   (model, newline, key) and its parser, the payload, the not-before wait,
//!   and dead letters cut to fit a message.
//! - [`backoff`]: the jittered exponential backoff of the retry loops
//!   (`Backoff::delays` lists which) and of the fill loop's retry times.
//! - [`local`]: one machine's durable queue: [`local::PendingMisses`] (a
//!   table in the embedded store's redb file) and [`local::LocalMissQueue`]
//!   (its buffered publisher and its source, with the flusher between them).
//! - [`kafka`]: the distributed queue: [`kafka::KafkaMissPublisher`],
//!   [`kafka::KafkaMissSource`] (consumer group, offsets committed only past
//!   settled work, retries and dead letters back on Kafka), topic admin and
//!   client properties, and the invalidation topic that keeps replicas'
//!   tiers coherent.
//!
//! [`MissEvent`]: embark_proto::internal::v1::MissEvent

pub mod backoff;
pub mod codec;
pub mod kafka;
pub mod local;
pub mod publisher;
pub mod source;

pub use publisher::MissPublisher;
pub use source::{MissSource, QueueError};
