//! KFC, the miss filler: takes pending misses, embeds them, writes the
//! vectors (or failure records) to the store, and only then marks the
//! misses done. At least once: a crash before [`MissSource::settle`] means a
//! miss is processed again, never lost; a repeat is harmless because keys
//! already stored are skipped.
//!
//! The loop is generic over its three seams, so the same code runs on one
//! machine (durable in-process queue, in-process Retina, embedded store) and
//! distributed (Kafka, Retina over gRPC, ScyllaDB):
//!
//! - [`source::MissSource`]: where misses come from and how they are settled.
//! - [`embedder::Embedder`]: what turns inputs into vectors.
//! - `embark_store::EmbeddingStore`: where vectors go.
//!
//! [`fill::FillLoop`] is the loop itself, deciding per key by
//! [`fill::FillPolicy`] (shared with `embark backfill`); [`backoff`] spaces
//! out retries and [`retry`] retries an operation with it.
//! The distributed implementations of the seams:
//!
//! - [`kafka::KafkaMissSource`]: the miss topic, through a consumer group,
//!   committing only settled offsets; retries and dead letters go back to
//!   Kafka.
//! - [`retina_client::RemoteRetina`]: Retina over gRPC, balanced across
//!   the replicas a name resolves to.

pub mod backoff;
pub mod embedder;
pub mod fill;
pub mod kafka;
pub mod retina_client;
pub mod retry;
pub mod source;

pub use embedder::{EmbedCallError, EmbedError, EmbedOutcome, Embedder, embed_checked};
pub use fill::{Decision, FillConfig, FillLoop, FillPolicy, Stands};
pub use source::{MissSource, SourceError};
