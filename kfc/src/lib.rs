//! KFC, the miss filler: takes pending misses, embeds them, writes the
//! vectors (or failure records) to the store, and only then marks the
//! misses done. At least once: a crash before `MissSource::settle` means a
//! miss is processed again, never lost; a repeat is harmless because keys
//! already stored are skipped.
//!
//! The loop is generic over its three seams, so the same code runs on one
//! machine (durable in-process queue, in-process Retina, embedded store) and
//! distributed (Kafka, Retina over gRPC, ScyllaDB):
//!
//! - `embark_queue::MissSource`: where misses come from and how they are
//!   settled (the local queue or Kafka; all of it in `embark-queue`).
//! - [`embedder::Embedder`]: what turns inputs into vectors, and its two
//!   adapters: [`embedder::in_process::InProcessRetina`] (Retina's engine
//!   in this process) and [`embedder::remote::RemoteRetina`] (Retina over
//!   gRPC, balanced across the replicas a name resolves to).
//! - `embark_store::EmbeddingStore`: where vectors go.
//!
//! [`fill::FillLoop`] is the loop itself, deciding per key by
//! [`fill::FillPolicy`] (shared with `embark backfill`); [`app`] is the
//! `kfc` binary's deployment (Kafka, remote Retina, CQL).

pub mod app;
pub mod embedder;
pub mod fill;

pub use embedder::{
    EmbedCallError, EmbedError, EmbedOutcome, Embedder, embed_checked,
    in_process::InProcessRetina,
    remote::{DEFAULT_RETINA_URL, RemoteRetina, RetinaClientConfig, RetinaTlsArgs},
};
pub use fill::{Decision, FillConfig, FillLoop, FillPolicy, ModelVersion, Stands};
