//! Limits that keep one client from starving the others: connections and
//! request rate per principal, request rate and in-flight request bytes per
//! connection (the stream count per connection is QUIC's own
//! `max_concurrent_bidi_streams`). The per-principal rate is the same idea as
//! Kafka's per-user request quotas: one client's many connections share it.
//!
//! Invariants: a request over its connection's rate is answered
//! `RATE_LIMITED` without being decoded or run, so refusing costs little; a
//! connection that keeps sending past refusals is closed with the reason.
//! Every connection counted against a key is released exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long refusals are counted before the count starts again.
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);

/// Open connections per principal (or per address for unauthenticated
/// ones), and the keys whose new connections are refused for a while
/// because one of their connections was cut off.
#[derive(Default)]
pub struct ConnectionCounts {
    open: Mutex<HashMap<String, u32>>,
    banned_until: Mutex<HashMap<String, Instant>>,
    rates: Mutex<HashMap<String, Arc<RequestRate>>>,
}

/// Principals whose rate is remembered after their last connection closed
/// (so reconnecting does not refill it) before idle ones are forgotten.
const PRINCIPAL_RATES_KEPT_MAX: usize = 10_000;

impl ConnectionCounts {
    /// The request rate all connections of `key` share.
    pub fn principal_rate(&self, key: &str, per_sec: u32, refusals: u32) -> Arc<RequestRate> {
        let mut rates = self.rates.lock().expect("rates lock");
        if rates.len() >= PRINCIPAL_RATES_KEPT_MAX {
            let open = self.open.lock().expect("connection count lock");
            rates.retain(|k, _| open.contains_key(k));
        }
        rates
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(RequestRate::new(per_sec, refusals)))
            .clone()
    }

    /// Refuse new connections of `key` for `ban` (a reconnecting flooder
    /// must not get a fresh second of requests each time).
    pub fn ban(&self, key: &str, ban: Duration) {
        let mut banned = self.banned_until.lock().expect("ban lock");
        let now = Instant::now();
        banned.retain(|_, until| *until > now);
        banned.insert(key.to_string(), now + ban);
    }

    /// How much longer `key` is banned, if it is.
    pub fn banned_for(&self, key: &str) -> Option<Duration> {
        let banned = self.banned_until.lock().expect("ban lock");
        let left = banned.get(key)?.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Count one more connection of `key`; `Err(open)` when `max` are open.
    pub fn acquire(&self, key: &str, max: u32) -> Result<(), u32> {
        let mut open = self.open.lock().expect("connection count lock");
        let count = open.entry(key.to_string()).or_insert(0);
        if *count >= max {
            return Err(*count);
        }
        *count += 1;
        Ok(())
    }

    pub fn release(&self, key: &str) {
        let mut open = self.open.lock().expect("connection count lock");
        if let Some(count) = open.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                open.remove(key);
            }
        }
    }

    pub fn open(&self, key: &str) -> u32 {
        let open = self.open.lock().expect("connection count lock");
        open.get(key).copied().unwrap_or(0)
    }
}

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Over the rate: answer `RATE_LIMITED`, retry after this many ms.
    Refused {
        retry_after_ms: u32,
    },
    /// Refused too often: close the connection.
    CutOff {
        refused: u32,
    },
}

/// A token bucket holding one second of requests, plus the refusals counted
/// in the current window.
pub struct RequestRate {
    per_sec: u32,
    refusals_before_cutoff: u32,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
    refusals: u32,
    window_start: Instant,
}

impl RequestRate {
    pub fn new(per_sec: u32, refusals_before_cutoff: u32) -> RequestRate {
        let now = Instant::now();
        RequestRate {
            per_sec,
            refusals_before_cutoff,
            bucket: Mutex::new(Bucket {
                tokens: per_sec as f64,
                refilled_at: now,
                refusals: 0,
                window_start: now,
            }),
        }
    }

    pub fn admit(&self) -> Admission {
        self.admit_at(Instant::now())
    }

    /// Admit against this (connection) rate, then the principal's shared one.
    pub fn admit_with(&self, principal: &RequestRate) -> Admission {
        let now = Instant::now();
        match self.admit_at(now) {
            Admission::Allowed => principal.admit_at(now),
            refused => refused,
        }
    }

    fn admit_at(&self, now: Instant) -> Admission {
        let mut b = self.bucket.lock().expect("rate lock");
        let rate = self.per_sec as f64;
        let elapsed = now.saturating_duration_since(b.refilled_at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.refilled_at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Admission::Allowed;
        }
        if now.saturating_duration_since(b.window_start) >= REFUSAL_WINDOW {
            b.window_start = now;
            b.refusals = 0;
        }
        b.refusals += 1;
        if b.refusals > self.refusals_before_cutoff {
            return Admission::CutOff {
                refused: b.refusals,
            };
        }
        let retry_after_ms = ((1.0 - b.tokens) / rate * 1000.0).ceil().max(1.0) as u32;
        Admission::Refused { retry_after_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_allows_a_second_of_burst_then_refuses_then_cuts_off() {
        let rate = RequestRate::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(rate.admit_at(t0), Admission::Allowed);
        }
        // Past the limit: refused three times, cut off at the fourth.
        for _ in 0..3 {
            assert!(
                matches!(rate.admit_at(t0), Admission::Refused { retry_after_ms } if retry_after_ms == 100)
            );
        }
        assert_eq!(rate.admit_at(t0), Admission::CutOff { refused: 4 });
        // A tenth of a second later one more request is allowed.
        let later = t0 + Duration::from_millis(100);
        assert_eq!(rate.admit_at(later), Admission::Allowed);
    }

    #[test]
    fn a_principal_rate_is_shared_by_its_connections() {
        let counts = ConnectionCounts::default();
        let shared = counts.principal_rate("app", 4, 100);
        assert!(Arc::ptr_eq(&shared, &counts.principal_rate("app", 4, 100)));
        let (first, second) = (RequestRate::new(10, 100), RequestRate::new(10, 100));
        for _ in 0..2 {
            assert_eq!(first.admit_with(&shared), Admission::Allowed);
            assert_eq!(second.admit_with(&shared), Admission::Allowed);
        }
        // Each connection is under its own 10/s, together they used the 4/s.
        assert!(matches!(
            first.admit_with(&shared),
            Admission::Refused { .. }
        ));
        assert!(matches!(
            second.admit_with(&shared),
            Admission::Refused { .. }
        ));
    }

    #[test]
    fn refusals_are_counted_per_window() {
        let rate = RequestRate::new(1, 2);
        let t0 = Instant::now();
        assert_eq!(rate.admit_at(t0), Admission::Allowed);
        assert!(matches!(rate.admit_at(t0), Admission::Refused { .. }));
        assert!(matches!(rate.admit_at(t0), Admission::Refused { .. }));
        // A new window: the count starts again (the token spent at once).
        let t1 = t0 + REFUSAL_WINDOW + Duration::from_millis(1);
        assert_eq!(rate.admit_at(t1), Admission::Allowed);
        assert!(matches!(rate.admit_at(t1), Admission::Refused { .. }));
        assert!(matches!(rate.admit_at(t1), Admission::Refused { .. }));
        assert!(matches!(rate.admit_at(t1), Admission::CutOff { .. }));
    }

    #[test]
    fn connections_are_counted_per_key_up_to_the_limit() {
        let counts = ConnectionCounts::default();
        assert!(counts.acquire("a", 2).is_ok());
        assert!(counts.acquire("a", 2).is_ok());
        assert_eq!(counts.acquire("a", 2), Err(2));
        assert!(counts.acquire("b", 2).is_ok());
        counts.release("a");
        assert!(counts.acquire("a", 2).is_ok());
        counts.release("a");
        counts.release("a");
        counts.release("b");
        assert_eq!(counts.open("a"), 0);
        assert!(counts.open.lock().unwrap().is_empty());
    }

    #[test]
    fn a_ban_lasts_its_time() {
        let counts = ConnectionCounts::default();
        counts.ban("flooder", Duration::from_millis(50));
        assert!(counts.banned_for("flooder").is_some());
        assert!(counts.banned_for("other").is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(counts.banned_for("flooder").is_none());
    }
}
