//! The one backoff of the miss path: exponential, with "equal jitter" (a
//! random delay in the upper half of the current step), so retries of many
//! keys after an outage spread out instead of arriving together, and no
//! retry comes sooner than half its step.

use std::time::Duration;

use rand::Rng;

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
