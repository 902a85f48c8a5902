//! EmbArk, the cache front rankers call.
//!
//! A Lookup goes tier -> store -> OOV: known keys come from the in-process
//! tier or the store; an unknown key gets its model's OOV row at once,
//! flagged `OOV_PENDING`, and one miss event per dedup window goes to the
//! miss queue, which KFC drains into the store. A Lookup never waits on a
//! neural network.
//!
//! Map of the crate:
//! - [`front`]: the Lookup and Invalidate logic, request limits, errors.
//! - [`cache`]: the tier (quick_cache, bounded in bytes) and the miss dedup
//!   window (moka, for its per-entry time-to-live).
//! - [`models`]: the served models, every version of each, their OOV rows
//!   ([`models::OovPolicy`]), per-model metric handles, and which version
//!   is current.
//! - [`versions`]: the current versions every replica follows from the
//!   store (`embark promote`), and each version's coverage.
//! - [`store_guard`]: a deadline and a circuit breaker between Lookups and
//!   the store; unanswered rows come back `OOV_UNAVAILABLE`.
//! - [`invalidation`]: Invalidate across `embark serve` replicas, through
//!   an event on Kafka that every replica applies to its tier and index.
//! - [`similar`]: per-model similarity indexes (`embark_index`) behind
//!   `Similar`, loaded from the store and kept current by
//!   [`similar::IndexingStore`] (one machine) or a periodic rescan (serve).
//! - [`service`]: `embark.v1.EmbArk` over gRPC.
//! - [`rest`]: the same calls as REST/JSON (`--rest-listen`), through the
//!   gRPC service, with its roles and errors, and an OpenAPI document.
//! - [`console`]: the operator web console (`/console` on the operator
//!   port): per-model coverage, hit rates, backlog and failures, and a
//!   near-duplicate explorer with thumbnails.
//!
//! - [`app`]: the deployments, wired from their flags: `embark up` runs
//!   front, fill loop and Retina in one process, on the embedded store by
//!   default (with `--store cql://`, vectors in CQL and the miss queue in
//!   `--data-dir`);
//!   `embark serve` runs the front alone, publishing misses to Kafka for the
//!   `kfc` binary (or to the local queue). The `embark` binary
//!   (`src/main.rs`) parses the command line and calls [`app::run`].
//!
//! The miss queue itself (publishers, sources, Kafka) is the
//! `embark-queue` crate; the fill loop and its embedders are `kfc`.

pub mod app;
pub mod cache;
pub mod console;
pub mod front;
pub mod invalidation;
pub mod models;
pub mod rest;
pub mod service;
pub mod similar;
pub mod store_guard;
pub mod versions;
