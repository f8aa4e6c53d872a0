//! Topic and group administration.

use crate::command::{Command, TopicRef};
use crate::core::BrokerState;
use crate::core::{blocking, from_write, invalid, unknown_topic};
use crate::storage::{read, WriteOutcome};
use msmq_protocol::{
    names::validate_name, ErrorCode, ErrorReply, GroupDescription, GroupLag, GroupPartitionState,
    GroupSummary, MemberInfo, PartitionInfo, PartitionLag, Reply, TopicDescription, TopicInfo,
    TopicPartition,
};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) fn ping() -> Reply {
    Reply::Pong {
        protocol_version: msmq_protocol::PROTOCOL_VERSION,
        broker_version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

fn info(topic: &crate::topics::Topic) -> TopicInfo {
    TopicInfo {
        name: topic.name.clone(),
        partitions: topic.partition_count(),
        created_at_ms: topic.meta.created_at_ms,
    }
}

pub(crate) async fn create_topic(
    state: &BrokerState,
    name: String,
    partitions: u32,
) -> Result<Reply, ErrorReply> {
    validate_name("topic", &name).map_err(invalid)?;
    let max = state.config.partitions_max;
    if partitions == 0 || partitions > max {
        return Err(invalid(format!(
            "a topic needs between 1 and {max} partitions (partitions_max), not {partitions}"
        )));
    }
    let op = Command::CreateTopic {
        name,
        partitions,
        created_at_ms: state.now_ms(),
    };
    match state.submit(op).await.map_err(from_write)? {
        WriteOutcome::TopicCreated(topic) => {
            tracing::info!(topic = %topic.name, partitions, "topic created");
            state.with_groups(|g, partitions_of| g.rebalance_all(partitions_of));
            Ok(Reply::TopicCreated(info(&topic)))
        }
        other => Err(unexpected(other)),
    }
}

fn unexpected(outcome: WriteOutcome) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::INTERNAL,
        format!("unexpected write outcome {outcome:?}"),
    )
}

pub(crate) async fn delete_topic(state: &BrokerState, name: String) -> Result<Reply, ErrorReply> {
    let Some(topic) = state.registry.get(&name) else {
        return Err(unknown_topic(&name));
    };
    state
        .submit(Command::DeleteTopic { name: name.clone() })
        .await
        .map_err(from_write)?;
    tracing::info!(topic = %name, "topic deleted");
    crate::core::ack::forget_topic(state, topic.id());
    state.with_groups(|g, partitions_of| {
        g.forget_topic(&name);
        g.rebalance_all(partitions_of);
    });
    Ok(Reply::Done)
}

pub(crate) fn list_topics(state: &BrokerState) -> Reply {
    Reply::Topics(state.registry.list().iter().map(|t| info(t)).collect())
}

pub(crate) async fn describe_topic(state: &BrokerState, name: String) -> Result<Reply, ErrorReply> {
    let topic = state
        .registry
        .get(&name)
        .ok_or_else(|| unknown_topic(&name))?;
    let db = state.store.db().clone();
    let offsets = blocking(move || read::all_group_offsets(&db)).await?;
    let partitions: Vec<PartitionInfo> = (0..topic.partition_count())
        .map(|p| {
            let o = &topic.partitions[p as usize];
            PartitionInfo {
                partition: p,
                start_offset: o.start(),
                end_offset: o.end(),
            }
        })
        .collect();
    let mut committed: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    for (group, topic_id, partition, offset) in offsets {
        if topic_id == topic.id() {
            committed
                .entry(group)
                .or_default()
                .insert(partition, offset);
        }
    }
    let groups = committed
        .into_iter()
        .map(|(group, by_partition)| GroupLag {
            group,
            partitions: partitions
                .iter()
                .map(|p| {
                    let c = by_partition.get(&p.partition).copied();
                    PartitionLag {
                        partition: p.partition,
                        committed_offset: c,
                        lag: p.end_offset - c.unwrap_or(p.start_offset).min(p.end_offset),
                    }
                })
                .collect(),
        })
        .collect();
    Ok(Reply::TopicDescription(TopicDescription {
        info: info(&topic),
        partitions,
        groups,
    }))
}

pub(crate) async fn list_groups(state: &BrokerState) -> Result<Reply, ErrorReply> {
    let db = state.store.db().clone();
    let offsets = blocking(move || read::all_group_offsets(&db)).await?;
    let names_by_id: BTreeMap<u32, String> = state
        .registry
        .list()
        .iter()
        .map(|t| (t.id(), t.name.clone()))
        .collect();
    let mut groups: BTreeMap<String, (u32, BTreeSet<String>)> = BTreeMap::new();
    for (group, topic_id, _, _) in offsets {
        if let Some(topic) = names_by_id.get(&topic_id) {
            groups.entry(group).or_default().1.insert(topic.clone());
        }
    }
    state.with_groups(|g, _| {
        for (name, group) in g.groups() {
            let entry = groups.entry(name.clone()).or_default();
            entry.0 = group.members.len() as u32;
            entry.1.extend(
                group
                    .members
                    .values()
                    .flat_map(|m| m.topics.iter().cloned()),
            );
        }
    });
    Ok(Reply::Groups(
        groups
            .into_iter()
            .map(|(group, (members, topics))| GroupSummary {
                group,
                members,
                topics: topics.into_iter().collect(),
            })
            .collect(),
    ))
}

pub(crate) async fn describe_group(
    state: &BrokerState,
    group: String,
) -> Result<Reply, ErrorReply> {
    let db = state.store.db().clone();
    let offsets = blocking(move || read::all_group_offsets(&db)).await?;
    let topics_by_id: BTreeMap<u32, _> = state
        .registry
        .list()
        .into_iter()
        .map(|t| (t.id(), t))
        .collect();
    let mut committed: BTreeMap<TopicPartition, u64> = BTreeMap::new();
    for (g, topic_id, partition, offset) in offsets {
        if g == group {
            if let Some(t) = topics_by_id.get(&topic_id) {
                committed.insert(
                    TopicPartition {
                        topic: t.name.clone(),
                        partition,
                    },
                    offset,
                );
            }
        }
    }
    let (generation, members, owners) = state.with_groups(|g, _| match g.group(&group) {
        Some(live) => (
            live.generation,
            live.members
                .iter()
                .map(|(id, m)| MemberInfo {
                    member_id: *id,
                    client_addr: m.client_addr.clone(),
                    topics: m.topics.clone(),
                    partitions: live
                        .owners
                        .iter()
                        .filter(|(_, o)| *o == id)
                        .map(|(tp, _)| tp.clone())
                        .collect(),
                })
                .collect::<Vec<_>>(),
            live.owners.clone(),
        ),
        None => (0, Vec::new(), BTreeMap::new()),
    });
    if members.is_empty() && committed.is_empty() {
        return Err(ErrorReply::new(
            ErrorCode::UNKNOWN_GROUP,
            format!("group {group:?} has no members and no committed offsets"),
        ));
    }
    let partitions: BTreeSet<TopicPartition> =
        committed.keys().chain(owners.keys()).cloned().collect();
    let offsets = partitions
        .into_iter()
        .filter_map(|tp| {
            let topic = state.registry.get(&tp.topic)?;
            let p = topic.partition(tp.partition)?;
            let c = committed.get(&tp).copied();
            Some(GroupPartitionState {
                committed_offset: c,
                end_offset: p.end(),
                lag: p.end() - c.unwrap_or(p.start()).min(p.end()),
                owner: owners.get(&tp).copied(),
                topic: tp.topic,
                partition: tp.partition,
            })
        })
        .collect();
    Ok(Reply::GroupDescription(GroupDescription {
        group,
        generation,
        members,
        offsets,
    }))
}

pub(crate) async fn set_retention(
    state: &BrokerState,
    name: String,
    retention: Option<msmq_protocol::Retention>,
) -> Result<Reply, ErrorReply> {
    let topic = state
        .registry
        .get(&name)
        .ok_or_else(|| unknown_topic(&name))?;
    state
        .submit(Command::SetRetention {
            topic: TopicRef::of(&topic),
            retention: retention.map(|r| (r.max_age_ms, r.max_bytes)),
        })
        .await
        .map_err(from_write)?;
    tracing::info!(topic = %name, ?retention, "topic retention set");
    Ok(Reply::Done)
}

pub(crate) async fn get_retention(state: &BrokerState, name: String) -> Result<Reply, ErrorReply> {
    let topic = state
        .registry
        .get(&name)
        .ok_or_else(|| unknown_topic(&name))?;
    let (retention, is_default) =
        crate::core::retention::effective(state, topic.id()).map_err(crate::core::from_storage)?;
    Ok(Reply::TopicRetention {
        retention,
        is_default,
    })
}
