//! Retrying an operation: the `backon` crate's retry loop, spaced by the
//! one [`Backoff`] (exponential, full jitter) the rest of the workspace uses.
//!
//! ```ignore
//! use backon::Retryable;
//! let reply = (|| call()).retry(kfc::retry::delays(backoff).take(2)).notify(|e, d| warn!(...)).await;
//! ```

use crate::backoff::Backoff;

/// The delays before retry 1, 2, ... of an operation: `backoff.delay(n)`.
/// Practically endless (`u32::MAX` retries); `.take(n)` bounds it.
pub fn delays(backoff: Backoff) -> impl backon::Backoff {
    (1..=u32::MAX).map(move |attempt| backoff.delay(attempt))
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicU32, Ordering},
        time::Duration,
    };

    use backon::Retryable;

    use super::*;

    #[test]
    fn delays_follow_the_backoff() {
        let b = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(1) };
        for (n, d) in delays(b).take(8).enumerate() {
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
        .retry(delays(b).take(2))
        .await;
        assert_eq!((result, calls.load(Ordering::Relaxed)), (Err("down"), 3));
    }
}
