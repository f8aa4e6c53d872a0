//! The check-back loop: asks a live producer of a transaction's producer
//! group for its state once the transaction is due, applies the answer, and
//! discards the transaction after `transaction_check_max` unanswered checks.
//!
//! Invariants: a check is counted in storage before it is sent; a check that
//! finds no connected producer is not counted; at most
//! `transaction_checks_per_sec_max` checks start per second and at most
//! `CHECKS_IN_FLIGHT_MAX` wait for answers at once.

use super::ServerState;
use crate::command::Command;
use crate::storage::{read, WriteOutcome};
use crate::transactions::TxSource;
use msmq_protocol::{
    decode_frame, encode_frame, BrokerRequest, BrokerRequestReply, MessageId, TransactionCheck,
    TxAction,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Checks that may wait for an answer at the same time.
pub const CHECKS_IN_FLIGHT_MAX: usize = 256;
/// Longest pause between two looks at the schedule.
const TICK_MS_MAX: u64 = 100;
/// How often resolved outcomes past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(5);
/// Most outcomes one prune removes (keeps each write transaction short).
const PRUNE_ROWS_MAX: u64 = 20_000;
/// Largest answer to a check-back the broker reads (answers are tiny).
pub const CHECK_REPLY_BYTES_MAX: usize = 64 * 1024;

pub(super) async fn run(state: Arc<ServerState>) {
    let config = &state.config;
    let interval_ms = config.transaction_check_interval.as_millis() as u64;
    let tick = Duration::from_millis(interval_ms.clamp(10, TICK_MS_MAX));
    let rate = config.transaction_checks_per_sec_max as f64;
    let in_flight = Arc::new(Semaphore::new(CHECKS_IN_FLIGHT_MAX));
    // Transactions with a check or discard under way: never two at once.
    let busy: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let mut tokens = rate;
    let mut refilled = Instant::now();
    let mut last_prune = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = state.producers.registered.notified() => {}
        }
        if state.is_shutting_down() {
            return;
        }
        tokens = (tokens + rate * refilled.elapsed().as_secs_f64()).min(rate.max(1.0));
        refilled = Instant::now();
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            prune_outcomes(&state).await;
        }
        let budget = (tokens as usize).min(in_flight.available_permits());
        if budget == 0 {
            continue;
        }
        let now = state.now_ms();
        let due = state
            .store
            .schedule()
            .lock()
            .expect("schedule lock")
            .due(now, budget);
        for (tx_id, pending) in due {
            if busy.lock().expect("busy lock").contains(&tx_id) {
                continue;
            }
            // Whatever happens next, do not pick this one again before the interval.
            state
                .store
                .schedule()
                .lock()
                .expect("schedule lock")
                .postpone(tx_id, now + interval_ms);
            // Checks used up: discard, whether or not a producer is connected.
            let conn = if pending.check_count >= state.config.transaction_check_max {
                None
            } else {
                match state.producers.pick(&pending.producer_group) {
                    Some(conn) => Some(conn),
                    None => {
                        tracing::debug!(tx_id, group = %pending.producer_group,
                            "no producer of the group connected; check postponed, not counted");
                        continue;
                    }
                }
            };
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                break;
            };
            tokens -= 1.0;
            busy.lock().expect("busy lock").insert(tx_id);
            let (state, busy) = (state.clone(), busy.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match conn {
                    None => discard(&state, tx_id, pending.check_count).await,
                    Some(conn) => check_one(&state, conn, tx_id, now + interval_ms).await,
                }
                busy.lock().expect("busy lock").remove(&tx_id);
            });
        }
    }
}

async fn discard(state: &ServerState, tx_id: u64, checks: u32) {
    match state
        .submit(Command::Discard {
            tx_id,
            now_ms: state.now_ms(),
        })
        .await
    {
        Ok(WriteOutcome::Discarded(true)) => {
            tracing::warn!(
                tx_id,
                checks,
                "transaction discarded (rolled back) after unanswered checks"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::error!(tx_id, error = %e, "could not discard transaction"),
    }
}

async fn check_one(
    state: &ServerState,
    conn: quinn::Connection,
    tx_id: u64,
    next_check_at_ms: u64,
) {
    // Count first: a crash after this point cannot hide the check.
    let check_number = match state
        .submit(Command::CountCheck {
            tx_id,
            next_check_at_ms,
        })
        .await
    {
        Ok(WriteOutcome::CheckCounted(Some(n))) => {
            crate::metrics::global().transaction_checks.inc();
            n
        }
        Ok(_) => return, // resolved meanwhile
        Err(e) => {
            tracing::error!(tx_id, error = %e, "could not count a check");
            return;
        }
    };
    let db = state.store.db().clone();
    let record = match tokio::task::spawn_blocking(move || read::half_message(&db, tx_id)).await {
        Ok(Ok(Some(record))) => record,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return tracing::error!(tx_id, error = %e, "reading half message"),
        Err(e) => return tracing::error!(tx_id, error = %e, "reading half message"),
    };
    let group = record.producer_group.clone();
    let check = BrokerRequest::CheckTransaction(TransactionCheck {
        tx_id,
        producer_group: record.producer_group,
        topic: record.topic,
        partition: record.partition,
        id: MessageId::new(state.store.store_id(), record.message_sequence),
        check_number,
        created_at_ms: record.created_at_ms,
        message: record.message,
    });
    let timeout = state.config.transaction_check_reply_timeout;
    let answer = match tokio::time::timeout(timeout, ask(&conn, &check)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            return tracing::info!(tx_id, check_number, %group, error = %e, "check-back failed; will check again")
        }
        Err(_) => {
            return tracing::info!(tx_id, check_number, %group, "check-back unanswered within {timeout:?}; will check again")
        }
    };
    let action = match answer {
        BrokerRequestReply::TransactionState {
            tx_id: answered,
            action,
        } if answered == tx_id => action,
        BrokerRequestReply::TransactionState {
            tx_id: answered, ..
        } => {
            return tracing::warn!(tx_id, answered, %group, "producer answered for another transaction; ignored")
        }
        BrokerRequestReply::Error(e) => {
            return tracing::info!(tx_id, %group, error = %e, "producer could not answer the check")
        }
    };
    let commit = match action {
        TxAction::Commit => true,
        TxAction::Rollback => false,
        TxAction::Unknown => {
            return tracing::debug!(
                tx_id,
                check_number,
                "producer says unknown; will check again"
            )
        }
    };
    let op = Command::EndTransaction {
        tx_id,
        producer_group: Some(group),
        commit,
        source: TxSource::Check,
        now_ms: state.now_ms(),
    };
    match state.submit(op).await {
        Ok(_) => tracing::info!(
            tx_id,
            check_number,
            commit,
            "transaction resolved by check-back"
        ),
        // E.g. the topic was deleted (the transaction is then rolled back),
        // or the producer decided meanwhile.
        Err(e) => tracing::info!(tx_id, error = %e, "check-back answer refused"),
    }
}

/// Send one broker request on a new stream of `conn` and read the answer.
async fn ask(
    conn: &quinn::Connection,
    request: &BrokerRequest,
) -> anyhow::Result<BrokerRequestReply> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_frame(request)?).await?;
    send.finish()?;
    let bytes = recv.read_to_end(CHECK_REPLY_BYTES_MAX).await?;
    Ok(decode_frame(&bytes)?)
}

async fn prune_outcomes(state: &ServerState) {
    let retention = state.config.transaction_outcome_retention.as_millis() as u64;
    let op = Command::PruneOutcomes {
        resolved_before_ms: state.now_ms().saturating_sub(retention),
        rows_max: PRUNE_ROWS_MAX,
    };
    match state.submit(op).await {
        Ok(WriteOutcome::Pruned(n)) if n > 0 => {
            tracing::debug!(pruned = n, "pruned transaction outcomes")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "pruning transaction outcomes failed"),
    }
}
