//! The broker-wide budget for request bytes held in memory, and each
//! principal's share of it (Kafka's `queued.max.request.bytes`, made fair).
//!
//! Owns: how many request bytes are reserved, broker-wide and per principal
//! (unauthenticated connections: per address), and how many streams wait.
//!
//! Invariants:
//! - A frame's body is read only after its whole length is reserved, in its
//!   principal's share and in the broker-wide budget. A reserved frame can
//!   therefore always be read to its end, and half-read frames can never
//!   hold the budget between them while each waits for more.
//! - A reservation is released exactly once, when its request has been
//!   answered or has failed (it is dropped).
//! - Waiters are served in arrival order (tokio's semaphores are fair), so
//!   a large frame is not starved by a stream of small ones.
//! - A frame larger than the share or the budget could never be reserved
//!   and is refused before anything is read.
//! - On a broker with `--auth`, a connection that has not authenticated
//!   sends one frame at a time of at most [`UNAUTHENTICATED_FRAME_BYTES_MAX`],
//!   charged to the budget alone: an unauthenticated flood from an address
//!   cannot take the share that its authenticating neighbours need.
//!
//! What a stream that waits holds meanwhile is bounded by its connection's
//! QUIC receive window (`msmq_client::transport::BROKER_CONNECTION_WINDOW_BYTES`);
//! the connection grants the sender credit for exactly the reserved bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Largest frame a connection may send before it authenticates on a broker
/// with `--auth` (an `Authenticate` or a `Ping` is far smaller).
pub const UNAUTHENTICATED_FRAME_BYTES_MAX: u64 = 4096;

/// The budget and the count of streams waiting for it.
pub struct RequestMemory {
    budget_bytes: u64,
    per_principal_bytes: u64,
    total: Arc<Semaphore>,
    /// Bytes of reservations made (not of permits promised to a waiter).
    reserved: Arc<AtomicU64>,
    waiting: AtomicU64,
}

/// Bytes held for one request frame; released when dropped.
pub struct Reservation {
    _principal: Option<OwnedSemaphorePermit>,
    _total: OwnedSemaphorePermit,
    reserved: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A frame no reservation could ever cover.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a request frame of {bytes} bytes is larger than {limit} ({limit_bytes} bytes)")]
pub struct FrameTooLarge {
    pub bytes: u64,
    pub limit: &'static str,
    pub limit_bytes: u64,
}

impl RequestMemory {
    pub fn new(budget_bytes: u64, per_principal_bytes: u64) -> RequestMemory {
        RequestMemory {
            budget_bytes,
            per_principal_bytes,
            total: Arc::new(Semaphore::new(permits(budget_bytes))),
            reserved: Arc::new(AtomicU64::new(0)),
            waiting: AtomicU64::new(0),
        }
    }

    /// A fresh share for one principal, to be kept with its other limits.
    pub fn principal_share(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(permits(self.per_principal_bytes)))
    }

    /// Whether a frame of `bytes` could ever be reserved (`authenticated`:
    /// from a connection that is not held to the unauthenticated limit).
    pub fn check_fits(&self, bytes: u64, authenticated: bool) -> Result<(), FrameTooLarge> {
        let (limit, limit_bytes) = if !authenticated {
            (
                "what a connection may send before it authenticates",
                UNAUTHENTICATED_FRAME_BYTES_MAX,
            )
        } else if self.per_principal_bytes < self.budget_bytes {
            ("request_memory_per_principal_max", self.per_principal_bytes)
        } else {
            ("request_memory_max", self.budget_bytes)
        };
        if bytes > limit_bytes {
            return Err(FrameTooLarge {
                bytes,
                limit,
                limit_bytes,
            });
        }
        Ok(())
    }

    /// Reserve `bytes` in `principal`'s share (none for an unauthenticated
    /// connection on an `--auth` broker) and in the budget, waiting (counted
    /// in `waiting`) for as long as it takes. The caller checked
    /// [`Self::check_fits`]. Cancel-safe: a dropped wait holds nothing.
    pub async fn reserve(&self, principal: Option<&Arc<Semaphore>>, bytes: u32) -> Reservation {
        let share = |s: &Arc<Semaphore>| s.clone().try_acquire_many_owned(bytes);
        let quick_share = principal.map(share).transpose();
        if let (Ok(p), Ok(t)) = (
            quick_share,
            self.total.clone().try_acquire_many_owned(bytes),
        ) {
            return self.made(p, t, bytes);
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let _counted = Waiting(&self.waiting);
        // The semaphores are never closed.
        let p = match principal {
            Some(s) => Some(s.clone().acquire_many_owned(bytes).await),
            None => None,
        };
        let t = self.total.clone().acquire_many_owned(bytes).await;
        self.made(
            p.map(|p| p.expect("principal share is never closed")),
            t.expect("request memory is never closed"),
            bytes,
        )
    }

    fn made(
        &self,
        principal: Option<OwnedSemaphorePermit>,
        total: OwnedSemaphorePermit,
        bytes: u32,
    ) -> Reservation {
        self.reserved.fetch_add(u64::from(bytes), Ordering::Relaxed);
        Reservation {
            _principal: principal,
            _total: total,
            reserved: self.reserved.clone(),
            bytes: u64::from(bytes),
        }
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Bytes reserved now, broker-wide.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Streams waiting for a reservation now.
    pub fn waiting_streams(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Semaphore permits for a byte count (validated to fit when configured).
fn permits(bytes: u64) -> usize {
    usize::try_from(bytes)
        .unwrap_or(usize::MAX)
        .min(Semaphore::MAX_PERMITS)
}

struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_share_and_the_budget_hold_at_their_limits() {
        let memory = RequestMemory::new(1000, 400);
        assert_eq!(memory.check_fits(400, true), Ok(()));
        let past = memory.check_fits(401, true).unwrap_err();
        assert_eq!(past.limit, "request_memory_per_principal_max");
        let (a, b, c) = (
            memory.principal_share(),
            memory.principal_share(),
            memory.principal_share(),
        );
        // A principal holds its whole share, not a byte more.
        let held = memory.reserve(Some(&a), 400).await;
        let one_more = tokio::time::timeout(Duration::from_millis(50), memory.reserve(Some(&a), 1));
        assert!(one_more.await.is_err(), "past the share it waits");
        assert_eq!(memory.waiting_streams(), 0, "a dropped wait is uncounted");
        // Others go on until the budget is spent.
        let _b = memory.reserve(Some(&b), 400).await;
        let _c = memory.reserve(Some(&c), 200).await;
        assert_eq!(memory.reserved_bytes(), 1000);
        let waiter = memory.reserve(Some(&c), 1);
        tokio::pin!(waiter);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut waiter)
            .await
            .is_err());
        assert_eq!(memory.waiting_streams(), 1);
        drop(held);
        let _d = waiter.await;
        assert_eq!(
            (memory.reserved_bytes(), memory.waiting_streams()),
            (601, 0)
        );
    }

    #[test]
    fn the_budget_is_the_limit_when_no_share_is_smaller() {
        let memory = RequestMemory::new(1000, 1000);
        assert_eq!(memory.check_fits(1000, true), Ok(()));
        assert_eq!(
            memory.check_fits(1001, true).unwrap_err().limit,
            "request_memory_max"
        );
    }

    #[tokio::test]
    async fn unauthenticated_frames_are_small_and_take_no_share() {
        let memory = RequestMemory::new(1 << 20, 1 << 20);
        let max = UNAUTHENTICATED_FRAME_BYTES_MAX;
        assert_eq!(memory.check_fits(max, false), Ok(()));
        assert!(memory.check_fits(max + 1, false).is_err());
        let _held = memory.reserve(None, max as u32).await;
        assert_eq!(memory.reserved_bytes(), max);
    }
}
