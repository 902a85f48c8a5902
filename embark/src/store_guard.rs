//! Protects Lookups from a slow or failing store: a deadline on every
//! store read and a circuit breaker.
//!
//! - Rows are read through [`EmbeddingStore::get_each`]; what has arrived
//!   when the deadline passes is kept, and only the keys still out come
//!   back unanswered: the front returns them as `OOV_UNAVAILABLE`, without
//!   queuing them, and the Lookup stays within its budget. Only CQL answers
//!   key by key; the embedded store uses the trait default (one `get_many`
//!   in one read transaction), so a late embedded batch is all or nothing.
//! - Only real failures count toward the breaker: a store error, or a
//!   deadline that passed with nothing answered. A store error counts
//!   whether it is transient or not (a store that refuses every read, its
//!   schema missing, cannot serve either); the two are logged and counted
//!   apart (`embark_store_errors_total{kind}`). A large batch that was
//!   partly answered in time shows a working store.
//! - After `failure_threshold` consecutive failed reads the breaker opens:
//!   reads are skipped at once for `cool_down` instead of piling up on a
//!   store that is down. Then one probe read goes through (half-open): its
//!   success closes the breaker, its failure opens it again. A probe whose
//!   Lookup is dropped (a client deadline, a disconnect) hands the probe
//!   on, through the [`Admission`] guard's `Drop`; and a probe that never
//!   finishes is superseded after twice the deadline. Either way the
//!   breaker cannot stay half-open.
//! - Tier hits never touch the store, so they flow throughout.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use embark_store::{EmbeddingStore, StoreError, StoredRow};

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
    /// One probe in flight since this instant.
    HalfOpen(Instant),
}

/// Why a key has no row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    Timeout,
    Error,
    BreakerOpen,
}

/// One key's read through the guard: its row (`None`: nothing stored), or
/// why it was not read.
pub type GuardedRow = Result<Option<StoredRow>, Unavailable>;

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

/// A read the breaker let through. The half-open probe's guard, dropped
/// before its outcome was recorded, reopens the way for the next probe.
struct Admission<'a> {
    guard: &'a GuardedStore,
    probe: bool,
    recorded: bool,
}

impl Admission<'_> {
    fn record(mut self, ok: bool) {
        self.recorded = true;
        self.guard.record(ok);
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            let mut state = self.guard.lock();
            if matches!(*state, State::HalfOpen(_)) {
                // The probe's Lookup went away: the next read probes.
                *state = State::Open(Instant::now());
            }
        }
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

    /// Whether the breaker is open (or half-open): reads are being skipped.
    /// Readiness reports it.
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a read may go to the store now; moves Open -> HalfOpen when
    /// the cool-down is over (that caller is the probe), and hands the
    /// probe to a new caller when the last one is older than twice the
    /// deadline (it can no longer be waiting for its answer).
    fn admit(&self) -> Option<Admission<'_>> {
        let mut state = self.lock();
        let now = Instant::now();
        let probe = match *state {
            State::Closed => false,
            State::Open(until) if now >= until => true,
            State::HalfOpen(since) if now.duration_since(since) >= self.config.deadline * 2 => true,
            State::Open(_) | State::HalfOpen(_) => return None,
        };
        if probe {
            *state = State::HalfOpen(now);
        }
        Some(Admission { guard: self, probe, recorded: false })
    }

    fn record(&self, ok: bool) {
        let mut state = self.lock();
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
        if matches!(*state, State::HalfOpen(_)) || n >= self.config.failure_threshold {
            if *state == State::Closed {
                tracing::warn!(failures = n, cool_down = ?self.config.cool_down, "store failing: breaker open");
                metrics::counter!("embark_store_breaker_opens_total").increment(1);
                metrics::gauge!("embark_store_breaker_open").set(1.0);
            }
            *state = State::Open(Instant::now() + self.config.cool_down);
        }
    }

    /// Probes the store every cool-down while the breaker is not closed,
    /// with a read of one key of `model` that no one uses, until `stop`.
    /// Without it a replica whose Lookups all hit the tier (or that a load
    /// balancer drained because it was not ready) would never read again,
    /// and its breaker would stay open for good.
    pub fn spawn_prober(self: &Arc<Self>, model: String, stop: tokio_util::sync::CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let key = vec!["embark:breaker-probe".to_owned()];
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(this.config.cool_down) => {}
                }
                if this.is_open() {
                    this.get_many(&model, &key).await;
                }
            }
        });
    }

    /// Reads each key within the deadline: one entry per key, in order,
    /// with its row or why it has none.
    pub async fn get_many(&self, model: &str, keys: &[String]) -> Vec<GuardedRow> {
        let Some(admission) = self.admit() else {
            metrics::counter!("embark_store_skipped_reads_total").increment(1);
            return vec![Err(Unavailable::BreakerOpen); keys.len()];
        };
        let mut rows: Vec<GuardedRow> = vec![Err(Unavailable::Timeout); keys.len()];
        let (mut answered, mut failed) = (0usize, None);
        let mut sink = |i: usize, read: embark_store::RowRead| {
            rows[i] = match read {
                Ok(row) => {
                    answered += 1;
                    Ok(row)
                }
                Err(e) => {
                    failed.get_or_insert(e);
                    Err(Unavailable::Error)
                }
            }
        };
        let read = self.store.get_each(model, keys, &mut sink);
        let in_time = tokio::time::timeout(self.config.deadline, read).await.is_ok();
        if let Some(e) = failed {
            if e.is_transient() {
                tracing::warn!(error = %e, "store read failed");
            } else {
                tracing::error!(error = %e, "store read refused; retrying will not help until the store is fixed");
            }
            metrics::counter!("embark_store_errors_total", "kind" => error_kind(&e)).increment(1);
            admission.record(false);
        } else if in_time || answered > 0 {
            if !in_time {
                metrics::counter!("embark_store_partial_reads_total").increment(1);
            }
            admission.record(true);
        } else {
            metrics::counter!("embark_store_timeouts_total").increment(1);
            admission.record(false);
        }
        rows
    }
}

/// The `kind` label of `embark_store_errors_total`: `transient` (a
/// timeout, too few replicas) or `permanent` (a schema, query or data
/// error that stays until someone fixes it).
pub(crate) fn error_kind(e: &StoreError) -> &'static str {
    if e.is_transient() { "transient" } else { "permanent" }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use async_trait::async_trait;
    use embark_store::{FailureRecord, RowRead, ScanCursor, ScanPage};

    use super::*;

    /// A store whose keys answer after their own delay (`slow:<ms>` keys)
    /// and which fails every read while `down` is set; `reads` counts the
    /// batch reads that reached it.
    #[derive(Default)]
    struct TestStore {
        down: AtomicBool,
        reads: std::sync::atomic::AtomicUsize,
    }

    fn delay_of(key: &str) -> Duration {
        Duration::from_millis(key.strip_prefix("slow:").and_then(|ms| ms.parse().ok()).unwrap_or(0))
    }

    #[async_trait]
    impl EmbeddingStore for TestStore {
        async fn get_many(&self, _: &str, keys: &[String]) -> Result<Vec<Option<StoredRow>>, StoreError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(StoreError::Config("down".into()));
            }
            tokio::time::sleep(keys.iter().map(|k| delay_of(k)).max().unwrap_or_default()).await;
            Ok(keys.iter().map(|_| Some(StoredRow::Vector { vector: vec![1.0], created_at_ms: 0 })).collect())
        }
        async fn get_each(&self, model: &str, keys: &[String], sink: &mut (dyn FnMut(usize, RowRead) + Send)) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let mut reads: futures::stream::FuturesUnordered<_> = keys
                .iter()
                .enumerate()
                .map(|(i, k)| async move { (i, self.get_many(model, std::slice::from_ref(k)).await) })
                .collect();
            use futures::StreamExt;
            while let Some((i, read)) = reads.next().await {
                sink(i, read.map(|mut rows| rows.pop().flatten()).map_err(Arc::new));
            }
        }
        async fn put_vectors(&self, _: &str, _: Vec<(String, Vec<f32>)>) -> Result<(), StoreError> {
            Ok(())
        }
        async fn put_failures(&self, _: &str, _: Vec<(String, FailureRecord)>) -> Result<(), StoreError> {
            Ok(())
        }
        async fn delete(&self, _: &str, _: &[String]) -> Result<(), StoreError> {
            Ok(())
        }
        async fn scan(&self, _: &str, _: Option<ScanCursor>, _: usize) -> Result<ScanPage, StoreError> {
            Ok(ScanPage::default())
        }
    }

    fn guard(store: &Arc<TestStore>) -> GuardedStore {
        let config = GuardConfig {
            deadline: Duration::from_millis(40),
            failure_threshold: 2,
            cool_down: Duration::from_millis(50),
        };
        GuardedStore::new(store.clone(), config)
    }

    /// A guard whose cool-down is long enough that a read right after the
    /// breaker opened is, even on a loaded machine, still inside it.
    fn slow_cooling_guard(store: &Arc<TestStore>) -> GuardedStore {
        let config = GuardConfig { deadline: Duration::from_secs(2), failure_threshold: 2, cool_down: COOL_DOWN };
        GuardedStore::new(store.clone(), config)
    }

    const COOL_DOWN: Duration = Duration::from_millis(300);

    fn reads(store: &TestStore) -> usize {
        store.reads.load(Ordering::SeqCst)
    }

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    async fn open_breaker(g: &GuardedStore, store: &TestStore) {
        store.down.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            g.get_many("m", &keys(&["a"])).await;
        }
        assert!(g.is_open());
        assert_eq!(g.get_many("m", &keys(&["a"])).await, vec![Err(Unavailable::BreakerOpen)]);
        store.down.store(false, Ordering::SeqCst);
    }

    /// Defect 11.1: a probe whose Lookup was dropped recorded nothing and
    /// every later read was refused until a restart.
    #[tokio::test]
    async fn breaker_stays_half_open_forever_when_its_probe_is_dropped() {
        let store = Arc::new(TestStore::default());
        let g = guard(&store);
        open_breaker(&g, &store).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        // The probe: a slow key, and a client that gives up after 5 ms.
        let dropped = tokio::time::timeout(Duration::from_millis(5), g.get_many("m", &keys(&["slow:1000"]))).await;
        assert!(dropped.is_err(), "the probe's Lookup went away");
        // The store has recovered: the next read probes and closes it.
        assert!(matches!(g.get_many("m", &keys(&["a"])).await[0], Ok(Some(_))));
        assert!(!g.is_open());
    }

    /// An open breaker is probed in the background: with every Lookup
    /// served from the tier it would otherwise never close again.
    #[tokio::test]
    async fn an_open_breaker_is_probed_without_lookups() {
        let store = Arc::new(TestStore::default());
        let g = Arc::new(guard(&store));
        open_breaker(&g, &store).await;
        let stop = tokio_util::sync::CancellationToken::new();
        g.spawn_prober("m".into(), stop.clone());
        tokio::time::timeout(Duration::from_secs(5), async {
            while g.is_open() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the prober closes the breaker once the store answers");
        stop.cancel();
    }

    /// A probe that hangs without being dropped is superseded after twice
    /// the deadline.
    #[tokio::test]
    async fn a_hung_probe_is_superseded() {
        let store = Arc::new(TestStore::default());
        let g = Arc::new(guard(&store));
        open_breaker(&g, &store).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let state = { *g.lock() };
        assert!(matches!(state, State::Open(_)));
        // Take the probe by hand and keep it, as a wedged task would.
        let held = g.admit().expect("the probe");
        assert!(held.probe);
        assert!(g.admit().is_none(), "one probe at a time");
        tokio::time::sleep(Duration::from_millis(90)).await;
        assert!(matches!(g.get_many("m", &keys(&["a"])).await[0], Ok(Some(_))));
        drop(held);
        assert!(!g.is_open());
    }

    /// Defect 11.7: the deadline covered the whole batch, so rows already
    /// answered were thrown away and a large batch counted as a failure.
    #[tokio::test]
    async fn store_deadline_covers_the_whole_batch_and_throws_away_rows_that_arrived() {
        let store = Arc::new(TestStore::default());
        let g = guard(&store);
        for _ in 0..3 {
            let rows = g.get_many("m", &keys(&["a", "slow:1000", "b"])).await;
            assert!(matches!(rows[0], Ok(Some(_))) && matches!(rows[2], Ok(Some(_))), "{rows:?}");
            assert_eq!(rows[1], Err(Unavailable::Timeout));
        }
        assert!(!g.is_open(), "answered reads are not failures");
        // A deadline with nothing answered is one.
        for _ in 0..2 {
            assert_eq!(g.get_many("m", &keys(&["slow:1000"])).await, vec![Err(Unavailable::Timeout)]);
        }
        assert!(g.is_open());
    }

    #[tokio::test]
    async fn only_consecutive_failures_open_the_breaker() {
        let store = Arc::new(TestStore::default());
        let g = slow_cooling_guard(&store);
        let (a, down) = (keys(&["a"]), |d: bool| store.down.store(d, Ordering::SeqCst));
        down(true);
        assert_eq!(g.get_many("m", &a).await, vec![Err(Unavailable::Error)]);
        down(false);
        assert!(matches!(g.get_many("m", &a).await[..], [Ok(Some(_))]));
        down(true);
        assert_eq!(g.get_many("m", &a).await, vec![Err(Unavailable::Error)]);
        assert!(!g.is_open(), "a success in between starts the count again");
        assert_eq!(g.get_many("m", &a).await, vec![Err(Unavailable::Error)]);
        assert!(g.is_open(), "two failures in a row");
        assert_eq!(reads(&store), 4);
    }

    #[tokio::test]
    async fn an_open_breaker_skips_the_store_until_a_probe_after_the_cool_down_closes_it() {
        let store = Arc::new(TestStore::default());
        let g = slow_cooling_guard(&store);
        store.down.store(true, Ordering::SeqCst);
        g.get_many("m", &keys(&["a"])).await;
        g.get_many("m", &keys(&["a"])).await;
        assert!(g.is_open());
        store.down.store(false, Ordering::SeqCst);
        // Open: every key of every read is unavailable at once, and the
        // store is not touched, though it would answer now.
        for _ in 0..3 {
            assert_eq!(g.get_many("m", &keys(&["a", "b"])).await, vec![Err(Unavailable::BreakerOpen); 2]);
        }
        assert_eq!(reads(&store), 2);
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(50)).await;
        // The first read after the cool-down is the probe; it succeeds.
        assert!(matches!(g.get_many("m", &keys(&["a"])).await[..], [Ok(Some(_))]));
        assert!(!g.is_open());
        assert!(matches!(g.get_many("m", &keys(&["a"])).await[..], [Ok(Some(_))]));
        assert_eq!(reads(&store), 4);
    }

    #[tokio::test]
    async fn a_failed_probe_opens_the_breaker_for_another_cool_down() {
        let store = Arc::new(TestStore::default());
        let g = slow_cooling_guard(&store);
        store.down.store(true, Ordering::SeqCst);
        g.get_many("m", &keys(&["a"])).await;
        g.get_many("m", &keys(&["a"])).await;
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(50)).await;
        // The probe reaches the store, which still fails.
        assert_eq!(g.get_many("m", &keys(&["a"])).await, vec![Err(Unavailable::Error)]);
        assert_eq!(reads(&store), 3);
        // One failed probe is enough to open it again (not `failure_threshold`).
        assert!(g.is_open());
        assert_eq!(g.get_many("m", &keys(&["a"])).await, vec![Err(Unavailable::BreakerOpen)]);
        assert_eq!(reads(&store), 3, "skipped during the new cool-down");
        store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(50)).await;
        assert!(matches!(g.get_many("m", &keys(&["a"])).await[..], [Ok(Some(_))]));
        assert!(!g.is_open());
        assert_eq!(reads(&store), 4);
    }

    #[tokio::test]
    async fn a_half_open_breaker_lets_one_probe_through_at_a_time() {
        let store = Arc::new(TestStore::default());
        let g = slow_cooling_guard(&store);
        store.down.store(true, Ordering::SeqCst);
        g.get_many("m", &keys(&["a"])).await;
        g.get_many("m", &keys(&["a"])).await;
        store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(COOL_DOWN + Duration::from_millis(50)).await;
        // The probe is admitted on its first poll and is still reading.
        let slow = keys(&["slow:200"]);
        let mut probe = Box::pin(g.get_many("m", &slow));
        assert!(futures::poll!(&mut probe).is_pending());
        assert_eq!(g.get_many("m", &keys(&["a"])).await, vec![Err(Unavailable::BreakerOpen)], "half-open");
        assert!(matches!(probe.await[..], [Ok(Some(_))]));
        assert!(!g.is_open(), "the probe's success closes it");
        assert_eq!(reads(&store), 3, "two failures and the probe; the read beside the probe was skipped");
    }
}
