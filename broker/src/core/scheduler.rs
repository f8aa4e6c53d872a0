//! Delivers scheduled messages: moves each into its topic's log when due.
//!
//! Invariant: a scheduled message leaves the schedule and enters the log in
//! one storage transaction, so it is delivered exactly once, also across
//! restarts (overdue ones are released right after start-up). Release
//! happens in chunks of `RELEASE_PER_COMMIT_MAX`, so thousands due in the
//! same second never hold the writer for long.

use super::BrokerState;
use crate::command::Command;
use crate::storage::WriteOutcome;
use std::sync::Arc;
use std::time::Duration;

/// Most scheduled messages moved into logs by one write transaction.
pub const RELEASE_PER_COMMIT_MAX: usize = 2_000;
/// Longest sleep between two looks at the schedule.
const IDLE_WAIT_MS_MAX: u64 = 1_000;

pub(crate) async fn run(state: Arc<BrokerState>) {
    loop {
        if state.is_shutting_down() {
            return;
        }
        let now = state.now_ms();
        let next = state.store.next_scheduled_ms();
        if next <= now {
            let op = Command::ReleaseDue {
                now_ms: now,
                max: RELEASE_PER_COMMIT_MAX,
            };
            match state.submit(op).await {
                Ok(WriteOutcome::Released(n)) => {
                    tracing::debug!(released = n, "scheduled messages delivered")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "releasing scheduled messages failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        }
        let wait = Duration::from_millis((next - now).min(IDLE_WAIT_MS_MAX));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.scheduler_wake.notified() => {}
        }
    }
}
