//! The broker's one source of wall-clock time.
//!
//! Owns: [`Clock`], real by default, manual in tests. Everything the core
//! stores with a time (append times, transaction deadlines, lease-free
//! retry due times, plugin deploy times) reads it here, and the plugin
//! host's `now-ms` import reads the same clock, so a test that sets the
//! clock sees the same time everywhere. In-memory timers that are never
//! stored (lease expiry, session expiry, quotas) use `Instant`.
//!
//! Invariant: a command carries the time it was built with; applying a
//! command never reads the clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Wall-clock milliseconds since the Unix epoch.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system clock.
    #[default]
    Real,
    /// A clock that only moves when told to (tests, replays).
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A manual clock showing `now_ms`.
    pub fn manual(now_ms: u64) -> Clock {
        Clock::Manual(Arc::new(AtomicU64::new(now_ms)))
    }

    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::Real => system_now_ms(),
            Clock::Manual(now) => now.load(Ordering::Acquire),
        }
    }

    /// Move a manual clock forward by `ms`; the real clock ignores this.
    pub fn advance_ms(&self, ms: u64) {
        if let Clock::Manual(now) = self {
            now.fetch_add(ms, Ordering::AcqRel);
        }
    }
}

/// The system clock in ms since the Unix epoch (0 before it).
pub fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let clock = Clock::manual(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        clock.clone().advance_ms(250);
        assert_eq!(clock.now_ms(), 1_250, "clones share the time");
    }

    #[test]
    fn the_real_clock_is_past_2020() {
        assert!(Clock::Real.now_ms() > 1_577_836_800_000);
    }
}
