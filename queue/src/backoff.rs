//! The one backoff of the miss path: exponential, with "equal jitter" (a
//! random delay in the upper half of the current step), so retries of many
//! keys after an outage spread out instead of arriving together, and no
//! retry comes sooner than half its step.

use std::{future::Future, pin::Pin, time::Duration};

use rand::Rng;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry's delay.
    pub base: Duration,
    /// No delay is longer.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(200), max: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// The upper bound of the delay before retry number `attempt` (1-based):
    /// `base * 2^(attempt-1)`, capped at `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1).min(30)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// A random delay in `[ceiling/2, ceiling]`: jittered, never zero.
    pub fn delay(&self, attempt: u32) -> Duration {
        let c = self.ceiling(attempt);
        let half = c / 2;
        half + rand::rng().random_range(Duration::ZERO..=c - half)
    }

    /// The delays before retry 1, 2, ... of an operation, for `backon`'s
    /// retry loop: `delay(1)`, `delay(2)`, ... Practically endless
    /// (`u32::MAX` retries); `.take(n)` bounds it.
    ///
    /// The retry loops that use it: the local queue's flusher
    /// (`local::LocalMissQueue`), KFC's produce of retries and dead letters
    /// (`kafka::KafkaMissSource`), assigning the invalidation topic
    /// (`kafka::invalidations::follow`), `Similar`'s start-up load, and
    /// `embark backfill`'s embedder calls. Not every pause goes through it:
    /// the fill loop calls [`Backoff::delay`] directly (a retried miss's
    /// not-before time, and a worker's pause after a failed round or
    /// embedder call), the gRPC accept loop has its own doubling pause, and
    /// the Kafka read loops pause a fixed 500 ms after a read error.
    ///
    /// ```
    /// # async fn call() -> Result<(), std::io::Error> { Ok(()) }
    /// # async fn demo() -> Result<(), std::io::Error> {
    /// use backon::Retryable;
    /// let backoff = embark_queue::backoff::Backoff::default();
    /// (|| call()).retry(backoff.delays().take(2)).notify(|e, delay| tracing::warn!(%e, ?delay, "retrying")).await
    /// # }
    /// ```
    pub fn delays(self) -> impl backon::Backoff {
        (1..=u32::MAX).map(move |attempt| self.delay(attempt))
    }
}

/// backon's sleeper for a retry loop that must let shutdown through: the
/// wait between two tries ends early when the token fires. Pair it with
/// `.when(|_| !stop.is_cancelled())`, so the loop then ends with the last
/// error instead of trying again.
#[derive(Debug, Clone)]
pub struct StopSleeper(pub CancellationToken);

impl backon::Sleeper for StopSleeper {
    type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        let stop = self.0.clone();
        Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(dur) => {}
                _ = stop.cancelled() => {}
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use backon::Retryable;

    use super::*;

    #[test]
    fn delays_follow_the_backoff() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) };
        for (n, d) in b.delays().take(8).enumerate() {
            let ceiling = b.ceiling(n as u32 + 1);
            assert!(d >= ceiling / 2 && d <= ceiling, "retry {}: {d:?}", n + 1);
        }
    }

    #[tokio::test]
    async fn an_operation_is_tried_once_more_than_its_retries() {
        let b = Backoff { base: Duration::from_millis(10), max: Duration::from_millis(10) };
        let calls = AtomicU32::new(0);
        let result: Result<(), &str> = (|| async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err("down")
        })
        .retry(b.delays().take(2))
        .await;
        assert_eq!((result, calls.load(Ordering::Relaxed)), (Err("down"), 3));
    }

    #[tokio::test]
    async fn a_stop_ends_the_wait_and_the_retries() {
        let b = Backoff { base: Duration::from_secs(3600), max: Duration::from_secs(3600) };
        let stop = CancellationToken::new();
        let calls = AtomicU32::new(0);
        let retried = (|| async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>("down")
        })
        .retry(b.delays())
        .sleep(StopSleeper(stop.clone()))
        .when(|_| !stop.is_cancelled());
        let stopper = async {
            while calls.load(Ordering::Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
            stop.cancel();
        };
        let (result, ()) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(retried, stopper) })
            .await
            .expect("the hour-long wait ended at the stop");
        assert_eq!(result, Err("down"));
        assert_eq!(calls.load(Ordering::Relaxed), 2, "the wait ended early, one more try saw the stop");
    }

    #[test]
    fn grows_then_caps() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) };
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(400));
        assert_eq!(b.ceiling(50), Duration::from_secs(1));
        for a in 1..10 {
            let d = b.delay(a);
            assert!(d >= b.ceiling(a) / 2 && d <= b.ceiling(a), "{d:?}");
        }
    }
}
