//! A client-side token bucket on Sprites.dev calls: a fleet's reconciles
//! spread their calls out instead of hammering the service (429 and
//! Retry-After are honoured besides, by the retry policy).

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimit {
    per_second: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// `per_second` calls on average, up to `burst` at once after a quiet time.
    pub fn new(per_second: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: f64::from(per_second.max(1)),
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    /// Takes a token at `now`; returns how long the caller must wait first
    /// (zero when one was there). A caller that waits has its token already:
    /// waiters queue up in the bucket's debt.
    pub fn take(&self, now: Instant) -> Duration {
        let mut b = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.at = now;
        b.tokens -= 1.0;
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_calls_are_spaced_at_the_rate() {
        let r = RateLimit::new(10, 3);
        let t = Instant::now();
        for _ in 0..3 {
            assert_eq!(r.take(t), Duration::ZERO);
        }
        // The 4th and 5th wait 0.1 s and 0.2 s.
        let w4 = r.take(t);
        let w5 = r.take(t);
        assert!((w4.as_secs_f64() - 0.1).abs() < 1e-9, "{w4:?}");
        assert!((w5.as_secs_f64() - 0.2).abs() < 1e-9, "{w5:?}");
        // After a quiet second the bucket is full again (never above burst).
        let later = t + Duration::from_secs(2);
        for _ in 0..3 {
            assert_eq!(r.take(later), Duration::ZERO);
        }
        assert!(r.take(later) > Duration::ZERO);
    }
}
