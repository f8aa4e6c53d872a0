//! Produce: validate, route to partitions, append durably, acknowledge;
//! idempotent producers' ids and sequenced produces.

use crate::command::TopicRef;
use crate::command::{Command, PartitionAppend};
use crate::core::BrokerState;
use crate::core::{blocking, from_write, invalid, unknown_topic};
use crate::producers::{self, Admission, Claim, Slot, StoredReply};
use crate::storage::{batch, read, WriteOutcome};
use crate::topics::Topic;
use msmq_protocol::{
    ErrorCode, ErrorReply, MessageAck, MessageId, NewMessage, ProducerIdentity, ProducerSequence,
    Reply, SCHEDULED_OFFSET,
};
use std::collections::BTreeMap;

/// Retry hint given with `BACKLOG_FULL`.
pub const BACKLOG_RETRY_AFTER_MS: u32 = 1000;

/// A new producer id, or the next epoch of `producer_id`.
pub(crate) async fn init_producer(
    state: &BrokerState,
    principal: String,
    producer_id: Option<u64>,
) -> Result<Reply, ErrorReply> {
    let outcome = state
        .submit(Command::InitProducer {
            producer_id,
            principal,
            now_ms: state.now_ms(),
            idle_expiry_ms: state.config.producer_idle_expiry.as_millis() as u64,
            producers_max: state.config.producers_max,
        })
        .await
        .map_err(from_write)?;
    match outcome {
        WriteOutcome::ProducerInit(producer_id, epoch) => {
            Ok(Reply::ProducerInit(ProducerIdentity { producer_id, epoch }))
        }
        _ => Err(ErrorReply::new(
            ErrorCode::INTERNAL,
            "unexpected write outcome",
        )),
    }
}

/// What the writer checks a sequenced request of `count` messages against.
pub(crate) fn claim(
    state: &BrokerState,
    (producer, principal): (ProducerSequence, String),
    count: usize,
    now_ms: u64,
) -> Claim {
    Claim {
        producer_id: producer.producer_id,
        epoch: producer.epoch,
        sequence: producer.sequence,
        count: count as u32,
        principal,
        now_ms,
        idle_expiry_ms: state.config.producer_idle_expiry.as_millis() as u64,
    }
}

/// The stored reply of a sequenced request sent before, if it is one: a
/// retry stores nothing, so the limits that guard new writes (free disk,
/// backlog) do not refuse it. Looked up only when one of them would, so
/// the usual path reads nothing more; the writer decides anything else.
pub(crate) async fn repeated_reply(
    state: &BrokerState,
    claim: &Claim,
) -> Result<Option<StoredReply>, ErrorReply> {
    let db = state.store.db().clone();
    let id = claim.producer_id;
    let record = blocking(move || read::producer(&db, id)).await?;
    Ok(match producers::admit(record.as_ref(), claim) {
        Ok(Admission::Repeat(reply)) => {
            crate::metrics::global().sequenced_repeats.inc();
            Some(reply)
        }
        _ => None,
    })
}

/// `refusal`, unless the request is a retry of a stored one: its reply.
async fn refused_unless_repeat(
    state: &BrokerState,
    claim: Option<&Claim>,
    refusal: ErrorReply,
) -> Result<Reply, ErrorReply> {
    if let Some(c) = claim {
        if let Some(StoredReply::Produced(placement)) = repeated_reply(state, c).await? {
            return Ok(Reply::Produced(placement.acks(state.store.store_id())));
        }
    }
    Err(refusal)
}

pub(crate) async fn produce(
    state: &BrokerState,
    topic_name: String,
    partition: Option<u32>,
    messages: Vec<NewMessage>,
    sequenced: Option<(ProducerSequence, String)>,
) -> Result<Reply, ErrorReply> {
    let topic = state
        .registry
        .get(&topic_name)
        .ok_or_else(|| unknown_topic(&topic_name))?;
    check_limits(state, &messages)?;
    let timestamp_ms = state.now_ms();
    let claim = sequenced.map(|s| claim(state, s, messages.len(), timestamp_ms));
    if let Err(refusal) = state.disk.check_room(state.config.disk_free_min.as_u64()) {
        return refused_unless_repeat(state, claim.as_ref(), refusal).await;
    }
    let delay_max_ms = state.config.schedule_delay_max.as_millis() as u64;
    let partitions = route(&topic, partition, &messages)?;
    // Messages due later wait in the schedule; the rest go to the log now.
    let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut scheduled = Vec::new();
    let mut scheduled_at = Vec::new();
    for (i, (p, m)) in partitions.iter().zip(&messages).enumerate() {
        match m.deliver_at_ms {
            Some(due) if due > timestamp_ms => {
                if due - timestamp_ms > delay_max_ms {
                    return Err(invalid(format!(
                        "message {i} is scheduled {} ms ahead; schedule_delay_max is {delay_max_ms} ms",
                        due - timestamp_ms
                    )));
                }
                scheduled.push((*p, due, m.clone()));
                scheduled_at.push(i);
            }
            _ => by_partition.entry(*p).or_default().push(i),
        }
    }
    let backlog_max = state.config.backlog_messages_max;
    if backlog_max > 0 {
        for (p, indexes) in &by_partition {
            let backlog = state.registry.backlog(&topic, *p);
            if backlog + indexes.len() as u64 > backlog_max {
                let refusal = ErrorReply {
                    code: ErrorCode::BACKLOG_FULL,
                    message: format!(
                        "partition {p} of {topic_name:?} holds {backlog} messages its slowest group has not consumed; backlog_messages_max is {backlog_max}"
                    ),
                    retry_after_ms: Some(BACKLOG_RETRY_AFTER_MS),
                };
                return refused_unless_repeat(state, claim.as_ref(), refusal).await;
            }
        }
    }
    let appends: Vec<PartitionAppend> = by_partition
        .iter()
        .map(|(p, indexes)| {
            let records: Vec<&NewMessage> = indexes.iter().map(|i| &messages[*i]).collect();
            PartitionAppend {
                partition: *p,
                count: records.len() as u32,
                key_hashes: crate::storage::key_hashes(records.iter().copied()),
                value: batch::encode(timestamp_ms, &records),
            }
        })
        .collect();
    let any_scheduled = !scheduled.is_empty();
    let producer = claim.map(|c| {
        let mut slots: Vec<Slot> = partitions.iter().map(|p| Slot::Log(*p)).collect();
        for i in &scheduled_at {
            slots[*i] = Slot::Scheduled(partitions[*i]);
        }
        (c, slots)
    });
    let outcome = state
        .submit(Command::Append {
            topic: TopicRef::of(&topic),
            appends,
            scheduled,
            producer,
        })
        .await
        .map_err(from_write)?;
    let (bases, sequences) = match outcome {
        WriteOutcome::Appended(bases, sequences) => (bases, sequences),
        WriteOutcome::Repeated(StoredReply::Produced(placement)) => {
            crate::metrics::global().sequenced_repeats.inc();
            return Ok(Reply::Produced(placement.acks(state.store.store_id())));
        }
        _ => {
            return Err(ErrorReply::new(
                ErrorCode::INTERNAL,
                "unexpected write outcome",
            ))
        }
    };
    if any_scheduled {
        state.scheduler_wake.notify_one();
    }
    let mut acks = vec![None; messages.len()];
    let store_id = state.store.store_id();
    for ((p, indexes), (base, sequence)) in by_partition.iter().zip(bases) {
        for (n, i) in indexes.iter().enumerate() {
            acks[*i] = Some(MessageAck {
                partition: *p,
                offset: base + n as u64,
                id: MessageId::new(store_id, sequence + n as u64),
            });
        }
    }
    for (i, sequence) in scheduled_at.into_iter().zip(sequences) {
        acks[i] = Some(MessageAck {
            partition: partitions[i],
            offset: SCHEDULED_OFFSET,
            id: MessageId::new(store_id, sequence),
        });
    }
    Ok(Reply::Produced(acks.into_iter().flatten().collect()))
}

/// The partition of each message: the explicit one, else by key hash, else
/// one partition in turn shared by every keyless message of the request.
pub(crate) fn route(
    topic: &Topic,
    partition: Option<u32>,
    messages: &[NewMessage],
) -> Result<Vec<u32>, ErrorReply> {
    if let Some(p) = partition {
        if p >= topic.partition_count() {
            return Err(ErrorReply::new(
                ErrorCode::UNKNOWN_PARTITION,
                format!(
                    "topic {:?} has partitions 0..{}, not {p}",
                    topic.name,
                    topic.partition_count()
                ),
            ));
        }
        return Ok(vec![p; messages.len()]);
    }
    let spread = topic.next_spread_partition();
    Ok(messages
        .iter()
        .map(|m| topic.partition_for_key(m.key.as_deref().map(|k| &k[..]), spread))
        .collect())
}

pub(crate) fn check_limits(state: &BrokerState, messages: &[NewMessage]) -> Result<(), ErrorReply> {
    let config = &state.config;
    if messages.is_empty() {
        return Err(invalid("a produce request needs at least one message"));
    }
    if messages.len() > config.batch_messages_max as usize {
        return Err(ErrorReply::new(
            ErrorCode::BATCH_TOO_LARGE,
            format!(
                "batch of {} messages exceeds batch_messages_max = {}",
                messages.len(),
                config.batch_messages_max
            ),
        ));
    }
    let message_max = config.message_bytes_max.as_u64() as usize;
    let mut total = 0usize;
    for (i, m) in messages.iter().enumerate() {
        let size = m.size_bytes();
        if size > message_max {
            return Err(ErrorReply::new(
                ErrorCode::MESSAGE_TOO_LARGE,
                format!("message {i} is {size} bytes; message_bytes_max is {message_max}"),
            ));
        }
        total += size;
    }
    let batch_max = config.batch_bytes_max.as_u64() as usize;
    if total > batch_max {
        return Err(ErrorReply::new(
            ErrorCode::BATCH_TOO_LARGE,
            format!("batch of {total} bytes exceeds batch_bytes_max = {batch_max}"),
        ));
    }
    Ok(())
}
