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

/// Open connections, broker-wide and per principal (or per address for
/// unauthenticated ones), and the keys whose new connections are refused
/// for a while because one of their connections was cut off.
#[derive(Default)]
pub struct ConnectionCounts {
    open: Mutex<OpenConnections>,
    banned_until: Mutex<HashMap<String, Instant>>,
    shared: Mutex<HashMap<String, Arc<PrincipalShared>>>,
}

/// What all connections of one principal (or unauthenticated address)
/// share: a request rate and a share of the request memory budget.
pub struct PrincipalShared {
    pub rate: RequestRate,
    pub memory: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
struct OpenConnections {
    by_key: HashMap<String, u32>,
    total: u32,
}

/// Why a connection was not counted.
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionRefusal {
    /// The broker holds its limit of connections (`open` of them).
    Broker { open: u32 },
    /// The key holds its limit (`open` of them).
    Key { open: u32 },
}

/// Principals whose rate is remembered after their last connection closed
/// (so reconnecting does not refill it) before idle ones are forgotten.
const PRINCIPAL_RATES_KEPT_MAX: usize = 10_000;

impl ConnectionCounts {
    /// The limits all connections of `key` share; `new` makes them for a
    /// key not seen (or forgotten) before.
    pub fn principal_shared(
        &self,
        key: &str,
        new: impl FnOnce() -> PrincipalShared,
    ) -> Arc<PrincipalShared> {
        let mut shared = self.shared.lock().expect("principal limits lock");
        if !shared.contains_key(key) && shared.len() >= PRINCIPAL_RATES_KEPT_MAX {
            let open = self.open.lock().expect("connection count lock");
            // Forget idle principals; if most are connected, let the map
            // grow (to twice what is connected) rather than scan it each time.
            // A request still holding memory of a forgotten principal keeps
            // its own handle on the share, so nothing is released twice.
            if shared.len() >= 2 * open.by_key.len() {
                shared.retain(|k, _| open.by_key.contains_key(k));
            }
        }
        shared
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(new()))
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

    /// Count one more connection of `key`: refused when the broker holds
    /// `total_max` connections or `key` holds `key_max`.
    pub fn acquire(
        &self,
        key: &str,
        key_max: u32,
        total_max: u32,
    ) -> Result<(), ConnectionRefusal> {
        let mut open = self.open.lock().expect("connection count lock");
        if open.total >= total_max {
            return Err(ConnectionRefusal::Broker { open: open.total });
        }
        let count = open.by_key.get(key).copied().unwrap_or(0);
        if count >= key_max {
            return Err(ConnectionRefusal::Key { open: count });
        }
        open.by_key.insert(key.to_string(), count + 1);
        open.total += 1;
        Ok(())
    }

    /// Count one connection of `from` under `to` instead (it authenticated);
    /// `Err(open)` when `to` already holds `to_max`. The broker-wide count
    /// does not change.
    pub fn recount(&self, from: &str, to: &str, to_max: u32) -> Result<(), u32> {
        let mut open = self.open.lock().expect("connection count lock");
        let count = open.by_key.get(to).copied().unwrap_or(0);
        if count >= to_max {
            return Err(count);
        }
        open.by_key.insert(to.to_string(), count + 1);
        Self::forget_one(&mut open.by_key, from);
        Ok(())
    }

    pub fn release(&self, key: &str) {
        let mut open = self.open.lock().expect("connection count lock");
        if Self::forget_one(&mut open.by_key, key) {
            open.total -= 1;
        }
    }

    fn forget_one(by_key: &mut HashMap<String, u32>, key: &str) -> bool {
        let Some(count) = by_key.get_mut(key) else {
            return false;
        };
        *count -= 1;
        if *count == 0 {
            by_key.remove(key);
        }
        true
    }

    /// Connections open under `key`.
    pub fn open(&self, key: &str) -> u32 {
        let open = self.open.lock().expect("connection count lock");
        open.by_key.get(key).copied().unwrap_or(0)
    }

    /// Connections open on the broker.
    pub fn total(&self) -> u32 {
        self.open.lock().expect("connection count lock").total
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

/// A token bucket holding one second of requests.
pub struct RequestRate {
    per_sec: u32,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

impl RequestRate {
    pub fn new(per_sec: u32) -> RequestRate {
        RequestRate {
            per_sec,
            bucket: Mutex::new(Bucket {
                tokens: per_sec as f64,
                refilled_at: Instant::now(),
            }),
        }
    }

    /// Take one request's token; `Err(rate)` when the bucket is empty.
    fn take(&self, now: Instant) -> Result<(), u32> {
        let mut b = self.bucket.lock().expect("rate lock");
        let rate = self.per_sec as f64;
        let elapsed = now.saturating_duration_since(b.refilled_at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.refilled_at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.per_sec)
        }
    }
}

/// One connection's admission: its own rate, its principal's shared rate,
/// and how it takes refusals. Each refusal tells the client to wait until the
/// buckets have refilled for every request refused so far; a client that
/// waits is refused at most once per request it had in flight, while one
/// that keeps sending during the wait runs up the count and is cut off.
/// Counted per connection, so a neighbour's flood never cuts it off.
pub struct ConnectionAdmission {
    own: RequestRate,
    refusals_before_cutoff: u32,
    wait: Mutex<Wait>,
}

struct Wait {
    /// Until when the client was told to wait.
    until: Instant,
    /// Requests refused since the last one that came after a wait ended.
    refused: u32,
}

impl ConnectionAdmission {
    pub fn new(per_sec: u32, refusals_before_cutoff: u32) -> ConnectionAdmission {
        ConnectionAdmission {
            own: RequestRate::new(per_sec),
            refusals_before_cutoff,
            wait: Mutex::new(Wait {
                until: Instant::now(),
                refused: 0,
            }),
        }
    }

    pub fn admit(&self, principal: &RequestRate) -> Admission {
        self.admit_at(principal, Instant::now())
    }

    fn admit_at(&self, principal: &RequestRate, now: Instant) -> Admission {
        let Err(rate) = self.own.take(now).and_then(|()| principal.take(now)) else {
            return Admission::Allowed;
        };
        let mut w = self.wait.lock().expect("refusal wait lock");
        if now >= w.until {
            w.refused = 0;
        }
        w.refused += 1;
        if w.refused > self.refusals_before_cutoff {
            return Admission::CutOff { refused: w.refused };
        }
        // Long enough for the bucket to refill for everyone refused so far.
        let wait = Duration::from_secs_f64(f64::from(w.refused) / f64::from(rate))
            .max(Duration::from_millis(1));
        w.until = w.until.max(now + wait);
        let retry_after_ms = w.until.saturating_duration_since(now).as_millis();
        Admission::Refused {
            retry_after_ms: u32::try_from(retry_after_ms).unwrap_or(u32::MAX).max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A principal rate that never runs out.
    fn unlimited() -> RequestRate {
        RequestRate::new(u32::MAX)
    }

    #[test]
    fn the_rate_allows_a_second_of_burst_then_refuses_then_cuts_off() {
        let conn = ConnectionAdmission::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(conn.admit_at(&unlimited(), t0), Admission::Allowed);
        }
        // Past the limit: each refusal is told to wait for one more token,
        // and the fourth sent during the wait is cut off.
        for n in 1..=3 {
            assert_eq!(
                conn.admit_at(&unlimited(), t0),
                Admission::Refused {
                    retry_after_ms: 100 * n
                }
            );
        }
        assert_eq!(
            conn.admit_at(&unlimited(), t0),
            Admission::CutOff { refused: 4 }
        );
    }

    #[test]
    fn a_client_that_waits_as_told_is_never_cut_off() {
        let conn = ConnectionAdmission::new(10, 3);
        let mut now = Instant::now();
        for _ in 0..10 {
            assert_eq!(conn.admit_at(&unlimited(), now), Admission::Allowed);
        }
        // Three requests in flight at once are refused; the client waits as
        // long as the last refusal said, then sends them again, many times.
        for _ in 0..20 {
            let mut wait_ms = 0;
            for _ in 0..3 {
                match conn.admit_at(&unlimited(), now) {
                    Admission::Refused { retry_after_ms } => wait_ms = retry_after_ms,
                    Admission::Allowed => {}
                    cut => panic!("a waiting client was cut off: {cut:?}"),
                }
            }
            now += Duration::from_millis(u64::from(wait_ms) + 1);
            // After the wait the bucket has a token for each of them.
            for _ in 0..3 {
                assert_eq!(conn.admit_at(&unlimited(), now), Admission::Allowed);
            }
        }
    }

    #[test]
    fn a_principal_rate_is_shared_but_refusals_count_per_connection() {
        let counts = ConnectionCounts::default();
        let new = || PrincipalShared {
            rate: RequestRate::new(4),
            memory: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        let shared = counts.principal_shared("app", new);
        assert!(Arc::ptr_eq(&shared, &counts.principal_shared("app", new)));
        let shared = &shared.rate;
        let first = ConnectionAdmission::new(10, 1);
        let second = ConnectionAdmission::new(10, 1);
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(first.admit_at(shared, t0), Admission::Allowed);
            assert_eq!(second.admit_at(shared, t0), Admission::Allowed);
        }
        // Each connection is under its own 10/s; together they used the 4/s.
        assert!(matches!(
            first.admit_at(shared, t0),
            Admission::Refused { .. }
        ));
        assert!(matches!(
            first.admit_at(shared, t0),
            Admission::CutOff { .. }
        ));
        // The first connection's refusals do not count against the second.
        assert!(matches!(
            second.admit_at(shared, t0),
            Admission::Refused { .. }
        ));
    }

    #[test]
    fn connections_are_counted_per_key_up_to_the_limit() {
        let counts = ConnectionCounts::default();
        assert!(counts.acquire("a", 2, 100).is_ok());
        assert!(counts.acquire("a", 2, 100).is_ok());
        assert_eq!(
            counts.acquire("a", 2, 100),
            Err(ConnectionRefusal::Key { open: 2 })
        );
        assert!(counts.acquire("b", 2, 100).is_ok());
        counts.release("a");
        assert!(counts.acquire("a", 2, 100).is_ok());
        counts.release("a");
        counts.release("a");
        counts.release("b");
        assert_eq!(counts.open("a"), 0);
        assert_eq!(counts.total(), 0);
        assert!(counts.open.lock().unwrap().by_key.is_empty());
    }

    #[test]
    fn the_broker_wide_limit_holds_across_keys_and_a_recount_keeps_the_total() {
        let counts = ConnectionCounts::default();
        assert!(counts.acquire("address:1", 10, 3).is_ok());
        assert!(counts.acquire("address:2", 10, 3).is_ok());
        assert!(counts.acquire("address:3", 10, 3).is_ok());
        assert_eq!(
            counts.acquire("address:4", 10, 3),
            Err(ConnectionRefusal::Broker { open: 3 })
        );
        // Authenticating moves a connection to its principal, up to that
        // principal's limit; the broker-wide count stays.
        assert!(counts.recount("address:1", "billing", 1).is_ok());
        assert_eq!(counts.recount("address:2", "billing", 1), Err(1));
        assert_eq!(counts.total(), 3);
        assert_eq!(counts.open("address:1"), 0);
        counts.release("billing");
        assert_eq!(counts.total(), 2);
        assert!(counts.acquire("address:4", 10, 3).is_ok());
        // Releasing a key that holds nothing changes nothing.
        counts.release("nobody");
        assert_eq!(counts.total(), 3);
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
