//! Which version of each model is current, agreed by every replica, and
//! how many vectors each served version has stored (coverage).
//!
//! `embark promote` records a model's current version in the store
//! ([`EmbeddingStore::set_current_version`]); every front reads it back at
//! start and then every `--version-refresh-secs`, so all replicas answer
//! Lookups that name no version from the promoted version within that
//! delay (plus one store read). Until the first promote, the catalogue's
//! `current` entry stands. A promoted version this replica does not serve
//! (its catalogue lacks it) is logged and left: the replica keeps its own
//! current version rather than answer from nothing.
//!
//! Coverage is counted in the background every `--coverage-refresh-secs`
//! (a range count on the embedded store, a full-table scan on CQL, so it
//! is rare) and served by `Models` with the time of the count.

use std::{sync::Arc, time::Duration};

use embark_store::EmbeddingStore;
use tokio_util::sync::CancellationToken;

use crate::front::Front;

/// How often a front reads the current versions back from the store.
pub const DEFAULT_VERSION_REFRESH: Duration = Duration::from_secs(5);

/// How often a front counts each served version's stored vectors: rarely,
/// as on CQL each count scans the whole table (like the `Similar` rescan).
pub const DEFAULT_COVERAGE_REFRESH: Duration = Duration::from_secs(300);

/// What one [`follow_once`] round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Followed {
    /// Models whose current version changed.
    pub changed: usize,
    /// Whether a read of the store failed.
    pub failed: bool,
}

/// Reads every model's promoted version once and applies it. A store error
/// is counted, and logged as a warning unless `quiet` (the round before
/// failed too: a missing table would otherwise warn every few seconds);
/// the versions in force stay.
pub async fn follow_once(front: &Front, store: &dyn EmbeddingStore, quiet: bool) -> Followed {
    let mut out = Followed::default();
    for name in front.models().names() {
        match store.current_version(name).await {
            Ok(None) => {}
            Ok(Some(promoted)) => match front.set_current(name, &promoted.version) {
                Ok(true) => {
                    out.changed += 1;
                    tracing::info!(model = name, version = %promoted.version, promoted_at_ms = promoted.promoted_at_ms, "current version changed");
                    metrics::counter!("embark_version_switches_total", "model" => name).increment(1);
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(model = name, version = %promoted.version, error = %e, "the promoted version is not served here; keeping this replica's current version");
                    metrics::counter!("embark_version_unserved_total", "model" => name).increment(1);
                }
            },
            Err(e) => {
                if quiet {
                    tracing::debug!(model = name, error = %e, "reading the current version failed again");
                } else {
                    tracing::warn!(model = name, error = %e, "reading the current version failed; keeping the one in force (on CQL, run `embark migrate` if the model_versions table is missing)");
                }
                metrics::counter!("embark_version_read_errors_total").increment(1);
                out.failed = true;
            }
        }
    }
    out
}

/// Counts every served version's stored vectors once.
pub async fn count_once(front: &Front, store: &dyn EmbeddingStore) {
    for served in front.models().all() {
        match store.count_vectors(&served.namespace).await {
            Ok(n) => {
                front.set_coverage(&served.namespace, n, embark_store::now_unix_ms());
                metrics::gauge!(
                    "embark_stored_vectors",
                    "model" => served.spec.name.clone(),
                    "version" => served.spec.version.clone()
                )
                .set(n as f64);
            }
            Err(e) => {
                tracing::warn!(model = %served.spec.name, version = %served.spec.version, error = %e, "counting stored vectors failed")
            }
        }
    }
}

/// Follows promotes every `refresh` and counts coverage every `coverage`
/// (`Duration::ZERO`: never), until `stop`.
pub fn spawn(
    front: Arc<Front>,
    store: Arc<dyn EmbeddingStore>,
    refresh: Duration,
    coverage: Duration,
    stop: CancellationToken,
) {
    if !refresh.is_zero() {
        let (front, store, stop) = (front.clone(), store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(refresh) => {}
                }
                failing = follow_once(&front, &*store, failing).await.failed;
            }
        });
    }
    if !coverage.is_zero() {
        tokio::spawn(async move {
            loop {
                count_once(&front, &*store).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(coverage) => {}
                }
            }
        });
    }
}
