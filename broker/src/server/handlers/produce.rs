//! Produce: validate, route to partitions, append durably, acknowledge.

use super::{from_write, invalid, now_ms, unknown_topic};
use crate::server::BrokerState;
use crate::storage::{batch, PartitionAppend, WriteOp, WriteOutcome};
use msmq_protocol::{ErrorCode, ErrorReply, MessageAck, MessageId, NewMessage, Reply};
use std::collections::BTreeMap;

pub(super) async fn produce(
    state: &BrokerState,
    topic_name: String,
    partition: Option<u32>,
    messages: Vec<NewMessage>,
) -> Result<Reply, ErrorReply> {
    let topic = state
        .registry
        .get(&topic_name)
        .ok_or_else(|| unknown_topic(&topic_name))?;
    check_limits(state, &messages)?;
    if let Some(p) = partition {
        if p >= topic.partition_count() {
            return Err(ErrorReply::new(
                ErrorCode::UNKNOWN_PARTITION,
                format!(
                    "topic {topic_name:?} has partitions 0..{}, not {p}",
                    topic.partition_count()
                ),
            ));
        }
    }
    // Keyless messages of one request stay together on one partition.
    let spread = partition.unwrap_or_else(|| topic.next_spread_partition());
    let mut by_partition: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, m) in messages.iter().enumerate() {
        let p = partition
            .unwrap_or_else(|| topic.partition_for_key(m.key.as_deref().map(|k| &k[..]), spread));
        by_partition.entry(p).or_default().push(i);
    }
    let timestamp_ms = now_ms();
    let appends: Vec<PartitionAppend> = by_partition
        .iter()
        .map(|(p, indexes)| {
            let records: Vec<&NewMessage> = indexes.iter().map(|i| &messages[*i]).collect();
            PartitionAppend {
                partition: *p,
                count: records.len() as u32,
                value: batch::encode(timestamp_ms, &records),
            }
        })
        .collect();
    let outcome = state
        .store
        .write(WriteOp::Append {
            topic: topic.clone(),
            appends,
        })
        .await
        .map_err(from_write)?;
    let WriteOutcome::Appended(bases) = outcome else {
        return Err(ErrorReply::new(
            ErrorCode::INTERNAL,
            "unexpected write outcome",
        ));
    };
    let mut acks = vec![None; messages.len()];
    for ((p, indexes), base) in by_partition.iter().zip(bases) {
        for (n, i) in indexes.iter().enumerate() {
            let offset = base + n as u64;
            acks[*i] = Some(MessageAck {
                partition: *p,
                offset,
                id: MessageId::new(topic.id(), *p, offset),
            });
        }
    }
    Ok(Reply::Produced(acks.into_iter().flatten().collect()))
}

fn check_limits(state: &BrokerState, messages: &[NewMessage]) -> Result<(), ErrorReply> {
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
