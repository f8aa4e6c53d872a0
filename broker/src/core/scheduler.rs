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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::command::TopicRef;
    use msmq_protocol::NewMessage;

    /// The scheduler releases by the core's clock, not the system's: with a
    /// manual clock a message stays scheduled until the clock is moved.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduled_messages_are_released_by_the_cores_clock() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = crate::config::Config {
            data_dir: dir.path().to_path_buf(),
            ..crate::config::Config::default()
        };
        let start_ms = 1_000_000;
        let clock = Clock::manual(start_ms);
        let state = BrokerState::open(config, clock.clone()).await?;
        state
            .submit(Command::CreateTopic {
                name: "later".into(),
                partitions: 1,
                created_at_ms: state.now_ms(),
            })
            .await?;
        let topic = state.registry.get("later").expect("created");
        assert_eq!(topic.meta.created_at_ms, start_ms);
        state
            .submit(Command::Append {
                topic: TopicRef::of(&topic),
                appends: vec![],
                scheduled: vec![(0, start_ms + 60_000, NewMessage::new("due in a minute"))],
                producer: None,
            })
            .await?;
        let scheduler = tokio::spawn(run(state.clone()));
        let end = || topic.partition(0).map_or(0, |p| p.end());
        // The system clock is far past the due time; the core's is not.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(end(), 0, "released before the core's clock reached it");
        clock.advance_ms(60_000);
        state.scheduler_wake.notify_one();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while end() == 0 {
            assert!(std::time::Instant::now() < deadline, "never released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(end(), 1);
        scheduler.abort();
        Ok(())
    }
}
