//! The disk watermark: free space of the data directory's filesystem.
//!
//! Owns: the last measured free bytes and whether they are below
//! `disk_free_min`. Invariant: while they are, requests that grow the log
//! (produce, including scheduled messages, and half messages) are refused
//! with the retryable `DISK_FULL` before the filesystem is full; everything
//! else (reads, acks, offset commits, group joins, deletes) keeps working in
//! the reserve. Free space is measured every `disk_check_interval`, so
//! producers are served again within that interval of space returning.

use super::BrokerState;
use msmq_protocol::{ErrorCode, ErrorReply};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Retry hint given with `DISK_FULL`.
pub const DISK_FULL_RETRY_AFTER_MS: u32 = 1000;

/// The data directory's free space, as last measured.
#[derive(Default)]
pub struct DiskWatch {
    free_bytes: AtomicU64,
    low: AtomicBool,
    /// Whether a measurement ever succeeded (a filesystem that cannot be
    /// measured never refuses anything).
    measured: AtomicBool,
}

impl DiskWatch {
    /// Measure `dir`'s filesystem now; `free_min` is the watermark.
    pub fn measure(&self, dir: &Path, free_min: u64) {
        match free_bytes(dir) {
            Ok(free) => {
                self.free_bytes.store(free, Ordering::Relaxed);
                self.measured.store(true, Ordering::Relaxed);
                let low = free < free_min;
                let was_low = self.low.swap(low, Ordering::Relaxed);
                if low && !was_low {
                    tracing::warn!(free_bytes = free, disk_free_min = free_min,
                        dir = %dir.display(), "disk below its free-space floor: refusing produces");
                } else if was_low && !low {
                    tracing::info!(
                        free_bytes = free,
                        disk_free_min = free_min,
                        "disk above its free-space floor again: serving produces"
                    );
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, dir = %dir.display(), "measuring free disk space failed")
            }
        }
    }

    /// Free bytes at the last measurement (0 before the first).
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// Whether the free space is below the watermark.
    pub fn is_low(&self) -> bool {
        self.low.load(Ordering::Relaxed)
    }

    /// `DISK_FULL` while the free space is below the watermark.
    pub fn check_room(&self, free_min: u64) -> Result<(), ErrorReply> {
        if !self.is_low() || !self.measured.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(ErrorReply {
            code: ErrorCode::DISK_FULL,
            message: format!(
                "the broker's disk has {} bytes free, below disk_free_min ({free_min} bytes); \
                 nothing was stored",
                self.free_bytes()
            ),
            retry_after_ms: Some(DISK_FULL_RETRY_AFTER_MS),
        })
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s filesystem.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Measure every `disk_check_interval` until shutdown.
pub async fn run(state: Arc<BrokerState>) {
    let mut ticker = tokio::time::interval(state.config.disk_check_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let free_min = state.config.disk_free_min.as_u64();
    while !state.is_shutting_down() {
        ticker.tick().await;
        let (dir, watch) = (state.config.data_dir.clone(), state.clone());
        // statvfs is a blocking call; keep it off the request workers.
        let _ = tokio::task::spawn_blocking(move || watch.disk.measure(&dir, free_min)).await;
        if state.disk.is_low() {
            // Free what retention allows now, not at its next interval.
            state.retention_wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_floor_refuses_and_above_it_serves() {
        let dir = tempfile::tempdir().unwrap();
        let watch = DiskWatch::default();
        // Nothing measured yet: nothing is refused.
        assert!(watch.check_room(u64::MAX).is_ok());
        watch.measure(dir.path(), u64::MAX);
        assert!(watch.is_low());
        let refusal = watch.check_room(u64::MAX).unwrap_err();
        assert_eq!(refusal.code, ErrorCode::DISK_FULL);
        assert_eq!(refusal.retry_after_ms, Some(DISK_FULL_RETRY_AFTER_MS));
        assert!(watch.free_bytes() > 0);
        watch.measure(dir.path(), 0);
        assert!(!watch.is_low());
        assert!(watch.check_room(0).is_ok());
    }
}
