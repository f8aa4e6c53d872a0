//! Throughput quotas: a token bucket per unit (messages, bytes). Pure logic:
//! callers pass the time, so it is tested without sleeping.
//!
//! Invariant: over any long interval the amount taken is at most
//! `rate × elapsed + burst`. A taker is never refused; it is told how long
//! to wait, so a plugin over quota slows down and loses nothing.

use std::time::{Duration, Instant};

/// How much of a second's quota may be taken at once.
pub const BURST_FRACTION_OF_RATE: f64 = 0.1;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_second: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// `rate_per_second == 0` means unlimited.
    pub fn new(rate_per_second: u64, now: Instant) -> Self {
        let rate = rate_per_second as f64;
        let burst = (rate * BURST_FRACTION_OF_RATE).max(1.0);
        TokenBucket {
            rate_per_second: rate,
            burst,
            tokens: burst,
            updated: now,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.rate_per_second == 0.0
    }

    /// The most that can be taken without waiting once the bucket is full.
    pub fn burst(&self) -> u64 {
        if self.is_unlimited() {
            u64::MAX
        } else {
            self.burst as u64
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate_per_second).min(self.burst);
        self.updated = now;
    }

    /// How long to wait before taking anything: zero unless the bucket is in
    /// debt.
    pub fn wait_before_take(&mut self, now: Instant) -> Duration {
        if self.is_unlimited() {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate_per_second)
        }
    }

    /// Take `amount` (the bucket may go into debt; the next taker waits).
    pub fn take(&mut self, amount: u64, now: Instant) {
        if self.is_unlimited() {
            return;
        }
        self.refill(now);
        self.tokens -= amount as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_takers_to_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, start);
        let mut now = start;
        let mut taken = 0u64;
        // Take batches of 100 as fast as the bucket allows for 20 000 messages.
        while taken < 20_000 {
            now += bucket.wait_before_take(now);
            bucket.take(100, now);
            taken += 100;
        }
        let elapsed = (now - start).as_secs_f64();
        // 20 000 at 1 000/s with a burst of 100: 19.8 s to the last take.
        assert!((19.7..=19.9).contains(&elapsed), "elapsed {elapsed}");
    }

    #[test]
    fn unlimited_never_waits_and_a_big_take_waits_its_debt_off() {
        let start = Instant::now();
        let mut free = TokenBucket::new(0, start);
        free.take(u64::MAX / 2, start);
        assert_eq!(free.wait_before_take(start), Duration::ZERO);

        let mut bytes = TokenBucket::new(1000, start);
        assert_eq!(bytes.wait_before_take(start), Duration::ZERO);
        bytes.take(1100, start); // burst 100, so 1 000 in debt
        let wait = bytes.wait_before_take(start);
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(bytes.wait_before_take(start + wait), Duration::ZERO);
    }
}
