//! Consumer-group requests: join, heartbeat, poll, commit, leave.

use crate::command::Command;
use crate::core::read::{clamp, initial_position, read_messages, wait_for_append};
use crate::core::BrokerState;
use crate::core::{blocking, from_group, from_write, invalid, unknown_topic};
use crate::groups::{NewMember, SESSION_TIMEOUT_MS_MAX, SESSION_TIMEOUT_MS_MIN};
use crate::storage::read;
use msmq_protocol::{
    names::validate_name, ErrorCode, ErrorReply, FetchLimits, FetchedMessages, Joined,
    PartitionOffset, Polled, Reply, ResetTo, StartFrom, TopicPartition,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Who is asking: the connection a member belongs to (its session ends
/// with it) and where it connects from.
pub struct Client {
    pub connection_id: u64,
    pub remote: std::net::SocketAddr,
}

/// Separates a broadcast group from its member's instance name.
pub const BROADCAST_SEPARATOR: char = '%';

/// A plugin's group belongs to its runner: clients may not join it or move
/// its offsets.
fn refuse_plugin_group(state: &BrokerState, group: &str) -> Result<(), ErrorReply> {
    match state.plugins.group_owner(group) {
        Some(plugin) => Err(invalid(format!(
            "group {group:?} holds the progress of plugin {plugin:?}; consumers cannot join it or move its offsets"
        ))),
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn join(
    state: &BrokerState,
    client: &Client,
    group: String,
    topics: Vec<String>,
    start: StartFrom,
    session_timeout_ms: u32,
    broadcast_instance: Option<String>,
    tag_filter: Option<String>,
    sql_filter: Option<String>,
) -> Result<Reply, ErrorReply> {
    validate_name("group", &group).map_err(invalid)?;
    refuse_plugin_group(state, &group)?;
    let filter =
        msmq_protocol::filter::Filter::compile(tag_filter.as_deref(), sql_filter.as_deref())
            .map_err(|e| invalid(format!("invalid subscription filter: {e}")))?;
    // Broadcast: each instance is a group of its own, so it gets every
    // partition and keeps its own offsets.
    let group = match broadcast_instance {
        Some(instance) => {
            validate_name("broadcast instance", &instance).map_err(invalid)?;
            let effective = format!("{group}{BROADCAST_SEPARATOR}{instance}");
            validate_name("group", &effective).map_err(invalid)?;
            effective
        }
        None => group,
    };
    if topics.is_empty() {
        return Err(invalid(
            "a group member must subscribe to at least one topic",
        ));
    }
    for topic in &topics {
        if state.registry.get(topic).is_none() {
            return Err(unknown_topic(topic));
        }
    }
    if !(SESSION_TIMEOUT_MS_MIN..=SESSION_TIMEOUT_MS_MAX).contains(&session_timeout_ms) {
        return Err(invalid(format!(
            "session timeout must be between {SESSION_TIMEOUT_MS_MIN} and {SESSION_TIMEOUT_MS_MAX} ms, not {session_timeout_ms}"
        )));
    }
    // A group with live members already has its positions: members of it
    // that start from `earliest` must not find their partitions pinned.
    let live = state.with_groups(|g, _| g.group(&group).map_or(0, |g| g.members.len()));
    if start == StartFrom::Latest && live == 0 {
        pin_latest(state, &group, &topics).await?;
    }
    let member = NewMember {
        topics,
        filter: std::sync::Arc::new(filter),
        start,
        session_timeout: Duration::from_millis(session_timeout_ms as u64),
        connection_id: client.connection_id,
        client_addr: client.remote.to_string(),
    };
    let (member_id, assignment) =
        state.with_groups(|g, partitions_of| g.join(&group, member, Instant::now(), partitions_of));
    tracing::info!(%group, member_id, remote = %client.remote, partitions = assignment.partitions.len(),
        generation = assignment.generation, "member joined");
    Ok(Reply::Joined(Joined {
        member_id,
        assignment,
        group,
    }))
}

/// `latest` is the end of each partition when the first member joins: pin
/// it durably, before the join is answered, on every partition of `topics`
/// the group has no position for, so the group receives everything produced
/// after the join (a member that polls later must not skip it).
async fn pin_latest(state: &BrokerState, group: &str, topics: &[String]) -> Result<(), ErrorReply> {
    let mut offsets = Vec::new();
    for name in topics {
        let Some(topic) = state.registry.get(name) else {
            continue;
        };
        for p in 0..topic.partition_count() {
            if state
                .registry
                .committed_offset(group, topic.id(), p)
                .is_none()
            {
                offsets.push((topic.id(), p, topic.partitions[p as usize].end()));
            }
        }
    }
    if offsets.is_empty() {
        return Ok(());
    }
    state
        .submit(Command::PinOffsets {
            group: group.to_string(),
            offsets,
        })
        .await
        .map_err(from_write)?;
    Ok(())
}

pub(crate) fn heartbeat(
    state: &BrokerState,
    group: String,
    member_id: u64,
) -> Result<Reply, ErrorReply> {
    state
        .with_groups(|g, _| g.heartbeat(&group, member_id, Instant::now()))
        .map(Reply::Assignment)
        .map_err(from_group)
}

pub(crate) fn leave(
    state: &BrokerState,
    group: String,
    member_id: u64,
) -> Result<Reply, ErrorReply> {
    state
        .with_groups(|g, partitions_of| g.leave(&group, member_id, partitions_of))
        .map_err(from_group)?;
    tracing::info!(%group, member_id, "member left");
    Ok(Reply::Done)
}

pub(crate) async fn poll(
    state: &BrokerState,
    group: String,
    member_id: u64,
    limits: FetchLimits,
    positions: Vec<PartitionOffset>,
) -> Result<Reply, ErrorReply> {
    let limits = clamp(state, limits)?;
    if crate::core::ack::uses_acks(state, &group) {
        return Err(invalid(format!(
            "group {group:?} consumes with per-message acks (Receive/Ack); it cannot also Poll"
        )));
    }
    let mut client_positions: HashMap<TopicPartition, u64> = positions
        .into_iter()
        .map(|p| {
            let tp = TopicPartition {
                topic: p.topic,
                partition: p.partition,
            };
            (tp, p.offset)
        })
        .collect();
    let deadline = tokio::time::Instant::now() + limits.wait;
    let mut appended = state.registry.subscribe_appended();
    // Partitions read in earlier rounds of this poll (messages all filtered out).
    let mut progress: Vec<FetchedMessages> = Vec::new();
    let mut read_any = false;
    loop {
        appended.borrow_and_update();
        let plan = state
            .with_groups(|g, _| g.poll_targets(&group, member_id, Instant::now()))
            .map_err(from_group)?;
        let (assignment, targets, session_timeout, filter) = (
            plan.assignment,
            plan.targets,
            plan.session_timeout,
            plan.filter,
        );
        let mut batches: Vec<FetchedMessages> = Vec::new();
        let (mut messages_left, mut bytes_left) = (limits.max_messages, limits.max_bytes);
        for target in targets {
            if messages_left == 0 || bytes_left == 0 {
                break;
            }
            let tp = &target.partition;
            let Some(topic) = state.registry.get(&tp.topic) else {
                continue;
            };
            let Some(offsets) = topic.partition(tp.partition) else {
                continue;
            };
            let from = match (client_positions.get(tp), target.position) {
                (Some(p), _) => (*p).clamp(offsets.start(), offsets.end()),
                (None, Some(p)) => p,
                (None, None) => match initial_position(state, &group, tp, target.start).await? {
                    Some(p) => p,
                    None => continue,
                },
            };
            let messages =
                read_messages(state, &topic, tp.partition, from, messages_left, bytes_left).await?;
            let Some(last) = messages.last() else {
                // Record where a fresh partition starts so `latest` stays put.
                if target.position.is_none() {
                    state.with_groups(|g, _| g.advance(&group, member_id, tp, None, from));
                }
                continue;
            };
            let next = last.offset + 1;
            // Another poll of this member, or a rebalance, got there first: drop the read.
            if !state.with_groups(|g, _| g.advance(&group, member_id, tp, target.position, next)) {
                continue;
            }
            // Later rounds of this poll continue from here, not from the client's word.
            client_positions.insert(tp.clone(), next);
            let messages: Vec<_> = if filter.matches_all() {
                messages
            } else {
                messages.into_iter().filter(|m| filter.matches(m)).collect()
            };
            messages_left -= messages.len();
            bytes_left = bytes_left.saturating_sub(messages.iter().map(|m| m.payload.len()).sum());
            let end_offset = topic.partition(tp.partition).map_or(next, |o| o.end());
            match progress
                .iter_mut()
                .find(|b| b.topic == tp.topic && b.partition == tp.partition)
            {
                Some(b) => {
                    b.messages.extend(messages);
                    b.next_offset = next;
                    b.end_offset = end_offset;
                }
                None => progress.push(FetchedMessages {
                    topic: tp.topic.clone(),
                    partition: tp.partition,
                    end_offset,
                    messages,
                    next_offset: next,
                }),
            }
            read_any = true;
        }
        batches.append(&mut progress);
        let delivered = batches.iter().any(|b| !b.messages.is_empty());
        if !delivered && read_any && tokio::time::Instant::now() < deadline {
            // Everything read was filtered out: read on at once, keeping the
            // progress to report.
            progress = batches;
            read_any = false;
            continue;
        }
        // Wake at least twice per session timeout so a long wait refreshes
        // the member's liveness even without separate heartbeats.
        let wake = deadline.min(tokio::time::Instant::now() + session_timeout / 2);
        let done = delivered
            || (!wait_for_append(state, &mut appended, wake).await
                && (state.is_shutting_down() || tokio::time::Instant::now() >= deadline));
        if done {
            return Ok(Reply::Polled(Polled {
                assignment,
                batches,
            }));
        }
        progress = batches;
    }
}

pub(crate) async fn commit(
    state: &BrokerState,
    group: String,
    member_id: u64,
    offsets: Vec<PartitionOffset>,
) -> Result<Reply, ErrorReply> {
    if crate::core::ack::uses_acks(state, &group) {
        return Err(invalid(format!(
            "group {group:?} consumes with per-message acks; the broker commits its progress"
        )));
    }
    // A partition that does not exist is refused as such before ownership
    // is checked: it is no member's, and `REBALANCED` would send the client
    // to retry what can never succeed.
    let mut targets = Vec::with_capacity(offsets.len());
    for o in &offsets {
        let topic = state
            .registry
            .get(&o.topic)
            .ok_or_else(|| unknown_topic(&o.topic))?;
        if topic.partition(o.partition).is_none() {
            return Err(ErrorReply::new(
                ErrorCode::UNKNOWN_PARTITION,
                format!("{}/{} does not exist", o.topic, o.partition),
            ));
        }
        targets.push(topic);
    }
    let partitions: Vec<TopicPartition> = offsets
        .iter()
        .map(|o| TopicPartition {
            topic: o.topic.clone(),
            partition: o.partition,
        })
        .collect();
    state
        .with_groups(|g, _| g.check_owner(&group, member_id, &partitions))
        .map_err(from_group)?;
    let mut stored = Vec::with_capacity(offsets.len());
    for (o, topic) in offsets.iter().zip(&targets) {
        let end = topic.partition(o.partition).map_or(0, |p| p.end());
        if o.offset > end {
            return Err(ErrorReply::new(
                ErrorCode::OFFSET_OUT_OF_RANGE,
                format!(
                    "cannot commit offset {} past the end {end} of {}/{}",
                    o.offset, o.topic, o.partition
                ),
            ));
        }
        stored.push((topic.id(), o.partition, o.offset));
    }
    state
        .submit(Command::CommitOffsets {
            group,
            offsets: stored,
        })
        .await
        .map_err(from_write)?;
    Ok(Reply::Done)
}

pub(crate) async fn reset_offsets(
    state: &BrokerState,
    group: String,
    topic_name: String,
    to: ResetTo,
) -> Result<Reply, ErrorReply> {
    validate_name("group", &group).map_err(invalid)?;
    refuse_plugin_group(state, &group)?;
    let topic = state
        .registry
        .get(&topic_name)
        .ok_or_else(|| unknown_topic(&topic_name))?;
    let live = state.with_groups(|g, _| g.group(&group).map_or(0, |g| g.members.len()));
    if live > 0 {
        return Err(ErrorReply::new(
            ErrorCode::GROUP_ACTIVE,
            format!(
                "group {group:?} has {live} live members; stop them before resetting its offsets"
            ),
        ));
    }
    crate::core::ack::prepare_reset(state, &group, topic.id()).await?;
    let mut offsets = Vec::with_capacity(topic.partition_count() as usize);
    for p in 0..topic.partition_count() {
        let o = &topic.partitions[p as usize];
        let offset = match to {
            ResetTo::Earliest => o.start(),
            ResetTo::Latest => o.end(),
            ResetTo::Timestamp(ms) => {
                let db = state.store.db().clone();
                let id = topic.id();
                blocking(move || read::offset_for_time(&db, id, p, ms))
                    .await?
                    .unwrap_or(o.end())
                    .clamp(o.start(), o.end())
            }
        };
        offsets.push((topic.id(), p, offset));
    }
    state
        .submit(Command::CommitOffsets {
            group: group.clone(),
            offsets: offsets.clone(),
        })
        .await
        .map_err(from_write)?;
    tracing::info!(%group, topic = %topic_name, ?to, "group offsets reset");
    Ok(Reply::OffsetsReset(
        offsets
            .into_iter()
            .map(|(_, partition, offset)| PartitionOffset {
                topic: topic_name.clone(),
                partition,
                offset,
            })
            .collect(),
    ))
}
