//! Transactional producers: registration, half messages, commit/rollback,
//! and the operator's view of pending and discarded transactions.

use super::produce::{check_limits, claim, repeated_reply, route};
use crate::command::{Command, TopicRef};
use crate::core::BrokerState;
use crate::core::{blocking, from_write, invalid, unknown_topic};
use crate::producers::{half_acks, StoredReply};
use crate::storage::{read, WriteOutcome};
use crate::transactions::{TxOutcome, TxSource};
use msmq_protocol::{
    names::validate_name, DiscardedAction, ErrorCode, ErrorReply, HalfAck, MessageAck, MessageId,
    NewMessage, ProducerSequence, Reply, TransactionInfo, TxAction, TxDecision, TxEndResult,
    TxEnded,
};
use std::time::Duration;

/// Most transactions one `ListTransactions` returns.
pub const LIST_TRANSACTIONS_MAX: u32 = 10_000;

pub(crate) async fn send_half(
    state: &BrokerState,
    producer_group: String,
    topic_name: String,
    partition: Option<u32>,
    messages: Vec<NewMessage>,
    check_immunity_ms: u32,
    sequenced: Option<(ProducerSequence, String)>,
) -> Result<Reply, ErrorReply> {
    validate_name("producer group", &producer_group).map_err(invalid)?;
    let topic = state
        .registry
        .get(&topic_name)
        .ok_or_else(|| unknown_topic(&topic_name))?;
    check_limits(state, &messages)?;
    let created_at_ms = state.now_ms();
    let claim = sequenced.map(|s| claim(state, s, messages.len(), created_at_ms));
    if let Err(refusal) = state.disk.check_room(state.config.disk_free_min.as_u64()) {
        // A retry of a stored request stores nothing: answer it.
        if let Some(c) = &claim {
            if let Some(StoredReply::HalfStored(halves)) = repeated_reply(state, c).await? {
                let store_id = state.store.store_id();
                return Ok(Reply::HalfStored(half_acks(&halves, store_id)));
            }
        }
        return Err(refusal);
    }
    if let Some(i) = messages.iter().position(|m| m.deliver_at_ms.is_some()) {
        return Err(invalid(format!(
            "message {i} carries a delivery time; a transactional message may not be delayed"
        )));
    }
    let partitions = route(&topic, partition, &messages)?;
    let wait = state
        .config
        .transaction_timeout
        .max(Duration::from_millis(check_immunity_ms as u64));
    let op = Command::StoreHalf {
        topic: TopicRef::of(&topic),
        producer_group,
        halves: partitions.iter().copied().zip(messages).collect(),
        created_at_ms,
        first_check_at_ms: created_at_ms + wait.as_millis() as u64,
        producer: claim,
    };
    let store_id = state.store.store_id();
    let ids = match state.submit(op).await.map_err(from_write)? {
        WriteOutcome::HalfStored(ids) => ids,
        WriteOutcome::Repeated(StoredReply::HalfStored(halves)) => {
            crate::metrics::global().sequenced_repeats.inc();
            return Ok(Reply::HalfStored(half_acks(&halves, store_id)));
        }
        _ => {
            return Err(ErrorReply::new(
                ErrorCode::INTERNAL,
                "unexpected write outcome",
            ))
        }
    };
    Ok(Reply::HalfStored(
        ids.into_iter()
            .zip(partitions)
            .map(|((tx_id, sequence), partition)| HalfAck {
                tx_id,
                id: MessageId::new(store_id, sequence),
                partition,
            })
            .collect(),
    ))
}

fn ended(state: &BrokerState, outcome: WriteOutcome) -> Result<Reply, ErrorReply> {
    match outcome {
        WriteOutcome::TxCommitted(landed) => {
            Ok(Reply::TransactionEnded(TxEnded::Committed(MessageAck {
                partition: landed.partition,
                offset: landed.offset,
                id: MessageId::new(state.store.store_id(), landed.sequence),
            })))
        }
        WriteOutcome::TxRolledBack => Ok(Reply::TransactionEnded(TxEnded::RolledBack)),
        WriteOutcome::Resumed => Ok(Reply::TransactionEnded(TxEnded::Pending)),
        other => Err(ErrorReply::new(
            ErrorCode::INTERNAL,
            format!("unexpected write outcome {other:?}"),
        )),
    }
}

pub(crate) async fn end_transaction(
    state: &BrokerState,
    producer_group: String,
    tx_id: u64,
    action: TxAction,
) -> Result<Reply, ErrorReply> {
    let commit = match action {
        TxAction::Commit => true,
        TxAction::Rollback => false,
        TxAction::Unknown => return transaction_state(state, &producer_group, tx_id).await,
    };
    let op = Command::EndTransaction {
        tx_id,
        producer_group: Some(producer_group),
        commit,
        source: TxSource::Producer,
        now_ms: state.now_ms(),
    };
    let outcome = state.submit(op).await.map_err(from_write)?;
    ended(state, outcome)
}

/// Most decisions in one `EndTransactions` request.
pub const DECISIONS_PER_REQUEST_MAX: usize = 10_000;

pub(crate) async fn end_transactions(
    state: &BrokerState,
    producer_group: String,
    decisions: Vec<TxDecision>,
) -> Result<Reply, ErrorReply> {
    if decisions.len() > DECISIONS_PER_REQUEST_MAX {
        return Err(ErrorReply::new(
            ErrorCode::BATCH_TOO_LARGE,
            format!(
                "{} decisions in one request; the limit is {DECISIONS_PER_REQUEST_MAX}",
                decisions.len()
            ),
        ));
    }
    let now = state.now_ms();
    let mut results: Vec<Option<TxEndResult>> = vec![None; decisions.len()];
    let mut writes = Vec::new();
    let mut write_slots = Vec::new();
    for (i, d) in decisions.iter().enumerate() {
        let commit = match d.action {
            TxAction::Commit => true,
            TxAction::Rollback => false,
            TxAction::Unknown => {
                results[i] = Some(
                    match transaction_state(state, &producer_group, d.tx_id).await {
                        Ok(Reply::TransactionEnded(e)) => TxEndResult::Ended(e),
                        Ok(_) => {
                            TxEndResult::Error(ErrorReply::new(ErrorCode::INTERNAL, "unexpected"))
                        }
                        Err(e) => TxEndResult::Error(e),
                    },
                );
                continue;
            }
        };
        writes.push(Command::EndTransaction {
            tx_id: d.tx_id,
            producer_group: Some(producer_group.clone()),
            commit,
            source: TxSource::Producer,
            now_ms: now,
        });
        write_slots.push(i);
    }
    for (slot, outcome) in write_slots.into_iter().zip(state.submit_many(writes).await) {
        results[slot] = Some(
            match outcome.map_err(from_write).and_then(|o| ended(state, o)) {
                Ok(Reply::TransactionEnded(e)) => TxEndResult::Ended(e),
                Ok(_) => {
                    TxEndResult::Error(ErrorReply::new(ErrorCode::INTERNAL, "unexpected reply"))
                }
                Err(e) => TxEndResult::Error(e),
            },
        );
    }
    Ok(Reply::TransactionsEnded(
        results.into_iter().flatten().collect(),
    ))
}

/// `Unknown` changes nothing; it reports where the transaction stands.
async fn transaction_state(
    state: &BrokerState,
    producer_group: &str,
    tx_id: u64,
) -> Result<Reply, ErrorReply> {
    let db = state.store.db().clone();
    let half = blocking(move || read::half_message(&db, tx_id)).await?;
    if let Some(half) = half {
        if half.producer_group != producer_group {
            return Err(invalid(format!(
                "transaction {tx_id} belongs to producer group {:?}, not {producer_group:?}",
                half.producer_group
            )));
        }
        return Ok(Reply::TransactionEnded(if half.discarded {
            TxEnded::RolledBack
        } else {
            TxEnded::Pending
        }));
    }
    let db = state.store.db().clone();
    let outcome = blocking(move || read::tx_outcome(&db, tx_id)).await?;
    if let Some(o) = &outcome {
        if o.producer_group != producer_group {
            return Err(invalid(format!(
                "transaction {tx_id} belongs to producer group {:?}, not {producer_group:?}",
                o.producer_group
            )));
        }
    }
    match outcome.map(|o| o.outcome) {
        Some(TxOutcome::Committed {
            partition,
            offset,
            message_sequence,
        }) => Ok(Reply::TransactionEnded(TxEnded::Committed(MessageAck {
            partition,
            offset,
            id: MessageId::new(state.store.store_id(), message_sequence),
        }))),
        Some(TxOutcome::RolledBack) | Some(TxOutcome::Discarded { .. }) => {
            Ok(Reply::TransactionEnded(TxEnded::RolledBack))
        }
        None => Err(ErrorReply::new(
            ErrorCode::UNKNOWN_TRANSACTION,
            format!("transaction {tx_id} is unknown"),
        )),
    }
}

pub(crate) async fn list_transactions(
    state: &BrokerState,
    discarded: bool,
    limit: u32,
) -> Result<Reply, ErrorReply> {
    let limit = limit.clamp(1, LIST_TRANSACTIONS_MAX) as usize;
    let db = state.store.db().clone();
    let halves = blocking(move || read::half_messages(&db, discarded, limit)).await?;
    let store_id = state.store.store_id();
    Ok(Reply::Transactions(
        halves
            .into_iter()
            .map(|(tx_id, h)| TransactionInfo {
                tx_id,
                producer_group: h.producer_group,
                topic: h.topic,
                partition: h.partition,
                id: MessageId::new(store_id, h.message_sequence),
                created_at_ms: h.created_at_ms,
                check_count: h.check_count,
                next_check_at_ms: h.next_check_at_ms,
                discarded: h.discarded,
            })
            .collect(),
    ))
}

pub(crate) async fn resolve_discarded(
    state: &BrokerState,
    tx_id: u64,
    action: DiscardedAction,
) -> Result<Reply, ErrorReply> {
    let op = match action {
        DiscardedAction::Resume => Command::Resume {
            tx_id,
            next_check_at_ms: state.now_ms(),
        },
        // The writer checks that it is (still) discarded.
        DiscardedAction::Commit => Command::EndTransaction {
            tx_id,
            producer_group: None,
            commit: true,
            source: TxSource::Operator,
            now_ms: state.now_ms(),
        },
    };
    let outcome = state.submit(op).await.map_err(from_write)?;
    tracing::info!(
        tx_id,
        ?action,
        "discarded transaction resolved by an operator"
    );
    ended(state, outcome)
}
