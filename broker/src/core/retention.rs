//! Retention: removes expired batches in the background.
//!
//! Owns: the retention loop. Every `retention_check_interval` (and at every
//! disk check while the disk is below `disk_free_min`) it works out,
//! per partition, the oldest batch to keep (by age and by size, from the
//! topic's own retention or the broker default) and asks the writer to trim
//! the batches below it, a bounded number per commit so producers never wait
//! behind a long delete. redb reuses the freed pages for new batches, so the
//! file stays bounded under steady load.
//!
//! It also removes idempotent producers' records idle past
//! `producer_idle_expiry`, every [`PRODUCER_SWEEP_INTERVAL_MS`]: a record is
//! already treated as gone once idle that long, the sweep only frees the
//! disk.
//!
//! Invariants: only whole batches are removed, oldest first; a partition's
//! start only moves forward; consumers below the new start continue from it.

use super::BrokerState;
use crate::command::{Command, TopicRef};
use crate::storage::{read, WriteOutcome};
use msmq_protocol::Retention;
use std::sync::Arc;

/// Time between sweeps of idle producer records.
pub const PRODUCER_SWEEP_INTERVAL_MS: u64 = 60_000;

/// Most batches removed in one write transaction.
pub const TRIM_BATCHES_PER_COMMIT_MAX: usize = 2_000;

/// The retention in force for a topic, and whether it is the default.
pub fn effective(
    state: &BrokerState,
    topic_id: u32,
) -> Result<(Retention, bool), crate::storage::StorageError> {
    Ok(match read::topic_retention(state.store.db(), topic_id)? {
        Some((max_age_ms, max_bytes)) => (
            Retention {
                max_age_ms,
                max_bytes,
            },
            false,
        ),
        None => (
            Retention {
                max_age_ms: state.config.retention_default.as_millis() as u64,
                max_bytes: state.config.retention_bytes_default.as_u64(),
            },
            true,
        ),
    })
}

pub(crate) async fn run(state: Arc<BrokerState>) {
    let mut ticker = tokio::time::interval(state.config.retention_check_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_producer_sweep = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = state.retention_wake.notified() => {}
        }
        if state.is_shutting_down() {
            return;
        }
        for topic in state.registry.list() {
            if let Err(e) = trim_topic(&state, &topic).await {
                tracing::warn!(topic = %topic.name, error = %e, "retention pass failed; will retry");
            }
        }
        if std::time::Instant::now() >= next_producer_sweep {
            next_producer_sweep += std::time::Duration::from_millis(PRODUCER_SWEEP_INTERVAL_MS);
            let op = Command::ExpireProducers {
                now_ms: state.now_ms(),
                idle_expiry_ms: state.config.producer_idle_expiry.as_millis() as u64,
            };
            match state.submit(op).await {
                Ok(WriteOutcome::ProducersExpired(n)) if n > 0 => {
                    tracing::info!(producers = n, "forgot idle producers");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "sweeping idle producers failed; will retry"),
            }
        }
    }
}

async fn trim_topic(
    state: &Arc<BrokerState>,
    topic: &Arc<crate::topics::Topic>,
) -> anyhow::Result<()> {
    let (retention, _) = {
        let state = state.clone();
        let id = topic.id();
        tokio::task::spawn_blocking(move || effective(&state, id)).await??
    };
    if retention.max_age_ms == 0 && retention.max_bytes == 0 {
        return Ok(());
    }
    let cutoff_ms = match retention.max_age_ms {
        0 => 0,
        age => state.now_ms().saturating_sub(age),
    };
    for p in 0..topic.partition_count() {
        let Some(offsets) = topic.partition(p) else {
            continue;
        };
        let (start, end) = (offsets.start(), offsets.end());
        if start >= end {
            continue;
        }
        let db = state.store.db().clone();
        let id = topic.id();
        let keep_from = tokio::task::spawn_blocking(move || {
            read::retention_start(&db, id, p, start, end, cutoff_ms, retention.max_bytes)
        })
        .await??;
        if keep_from <= start {
            continue;
        }
        let outcome = state
            .submit(Command::Trim {
                topic: TopicRef::of(topic),
                partition: p,
                before: keep_from,
                batches_max: TRIM_BATCHES_PER_COMMIT_MAX,
            })
            .await?;
        if let WriteOutcome::Trimmed { batches, messages } = outcome {
            crate::metrics::global()
                .retention_removed_messages
                .inc_by(messages);
            tracing::debug!(topic = %topic.name, partition = p, batches, messages,
                start = offsets.start(), "retention removed expired batches");
        }
    }
    Ok(())
}
