//! Protects Lookups from a slow or failing store: a deadline on every
//! store read and a circuit breaker.
//!
//! - A read that does not finish within the deadline (or fails) leaves
//!   its keys unanswered: the front returns them as `OOV_UNAVAILABLE`,
//!   without queuing them, and the Lookup stays within its budget.
//! - After `failure_threshold` consecutive failed reads the breaker opens:
//!   reads are skipped at once for `cool_down` instead of piling up on a
//!   store that is down. Then one probe read goes through (half-open): its
//!   success closes the breaker, its failure opens it again.
//! - Tier hits never touch the store, so they flow throughout.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use embark_store::{EmbeddingStore, StoredRow};

#[derive(Debug, Clone)]
pub struct GuardConfig {
    pub deadline: Duration,
    pub failure_threshold: u32,
    pub cool_down: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self { deadline: Duration::from_millis(50), failure_threshold: 5, cool_down: Duration::from_secs(2) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    /// Skipping reads until this instant.
    Open(Instant),
    /// One probe in flight.
    HalfOpen,
}

/// Why a read gave no rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    Timeout,
    Error,
    BreakerOpen,
}

pub struct GuardedStore {
    store: Arc<dyn EmbeddingStore>,
    config: GuardConfig,
    state: Mutex<State>,
    consecutive_failures: AtomicU32,
}

impl std::fmt::Debug for GuardedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl GuardedStore {
    pub fn new(store: Arc<dyn EmbeddingStore>, config: GuardConfig) -> Self {
        metrics::gauge!("embark_store_breaker_open").set(0.0);
        Self { store, config, state: Mutex::new(State::Closed), consecutive_failures: AtomicU32::new(0) }
    }

    /// The store behind the guard (for writes, which are not on the Lookup path).
    pub fn inner(&self) -> &Arc<dyn EmbeddingStore> {
        &self.store
    }

    /// Whether a read may go to the store now; moves Open -> HalfOpen when
    /// the cool-down is over (that caller is the probe).
    fn admit(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match *state {
            State::Closed => true,
            State::Open(until) if Instant::now() >= until => {
                *state = State::HalfOpen;
                true
            }
            State::Open(_) | State::HalfOpen => false,
        }
    }

    fn record(&self, ok: bool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            if *state != State::Closed {
                tracing::info!("store answering again: breaker closed");
                metrics::gauge!("embark_store_breaker_open").set(0.0);
            }
            *state = State::Closed;
            return;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if *state == State::HalfOpen || n >= self.config.failure_threshold {
            if !matches!(*state, State::Open(_)) {
                tracing::warn!(failures = n, cool_down = ?self.config.cool_down, "store failing: breaker open");
                metrics::counter!("embark_store_breaker_opens_total").increment(1);
                metrics::gauge!("embark_store_breaker_open").set(1.0);
            }
            *state = State::Open(Instant::now() + self.config.cool_down);
        }
    }

    /// Reads within the deadline, or says why not.
    pub async fn get_many(&self, model: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, Unavailable> {
        if !self.admit() {
            return Err(Unavailable::BreakerOpen);
        }
        match tokio::time::timeout(self.config.deadline, self.store.get_many(model, keys)).await {
            Ok(Ok(rows)) => {
                self.record(true);
                Ok(rows)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "store read failed");
                metrics::counter!("embark_store_errors_total").increment(1);
                self.record(false);
                Err(Unavailable::Error)
            }
            Err(_) => {
                metrics::counter!("embark_store_timeouts_total").increment(1);
                self.record(false);
                Err(Unavailable::Timeout)
            }
        }
    }
}
