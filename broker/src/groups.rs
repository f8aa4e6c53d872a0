//! Consumer-group coordination, as pure logic: no I/O, time passed in.
//!
//! Owns: group membership, the partition → member assignment, each group's
//! in-memory read positions and member liveness. Committed offsets live in
//! storage; this module only decides.
//!
//! Invariants:
//! - Within a group each partition of a subscribed topic is owned by at most
//!   one live member; every member subscribed to a topic gets a fair share.
//! - The generation increases whenever the assignment changes.
//! - A read position exists only for a partition's current owner; when a
//!   partition changes owner its position is dropped, so the new owner
//!   resumes from the group's last committed offset (at-least-once).

use msmq_protocol::{Assignment, StartFrom, TopicPartition};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use thiserror::Error;

/// Shortest session timeout a member may ask for.
pub const SESSION_TIMEOUT_MS_MIN: u32 = 100;
/// Longest session timeout a member may ask for.
pub const SESSION_TIMEOUT_MS_MAX: u32 = 5 * 60 * 1000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("member {member_id} is not in group {group:?} (expired or never joined); join again")]
    UnknownMember { group: String, member_id: u64 },
    #[error("partition {}/{} is no longer assigned to this member (group rebalanced)", .0.topic, .0.partition)]
    NotOwner(TopicPartition),
}

/// What a joining member declares.
#[derive(Debug, Clone)]
pub struct NewMember {
    pub topics: Vec<String>,
    pub filter: std::sync::Arc<msmq_protocol::filter::Filter>,
    pub start: StartFrom,
    pub session_timeout: Duration,
    pub connection_id: u64,
    pub client_addr: String,
}

#[derive(Debug, Clone)]
pub struct Member {
    pub topics: Vec<String>,
    pub filter: std::sync::Arc<msmq_protocol::filter::Filter>,
    pub start: StartFrom,
    pub session_timeout: Duration,
    pub last_seen: Instant,
    pub connection_id: u64,
    pub client_addr: String,
    poll_cursor: usize,
}

#[derive(Debug, Default)]
pub struct Group {
    pub generation: u64,
    pub members: BTreeMap<u64, Member>,
    pub owners: BTreeMap<TopicPartition, u64>,
    positions: HashMap<TopicPartition, u64>,
}

impl Group {
    fn assignment_of(&self, member_id: u64) -> Assignment {
        Assignment {
            generation: self.generation,
            partitions: self
                .owners
                .iter()
                .filter(|(_, owner)| **owner == member_id)
                .map(|(tp, _)| tp.clone())
                .collect(),
        }
    }

    fn member_mut(&mut self, group: &str, member_id: u64) -> Result<&mut Member, GroupError> {
        self.members
            .get_mut(&member_id)
            .ok_or_else(|| GroupError::UnknownMember {
                group: group.to_string(),
                member_id,
            })
    }

    /// Recompute the assignment from the members and the topics' partition
    /// counts. Partitions go round-robin over the members subscribed to
    /// their topic, in member-id order.
    fn rebalance(&mut self, partitions_of: &dyn Fn(&str) -> Option<u32>) {
        let topics: BTreeSet<&String> = self.members.values().flat_map(|m| &m.topics).collect();
        let mut owners = BTreeMap::new();
        for topic in topics {
            let Some(count) = partitions_of(topic) else {
                continue;
            };
            let subscribers: Vec<u64> = self
                .members
                .iter()
                .filter(|(_, m)| m.topics.contains(topic))
                .map(|(id, _)| *id)
                .collect();
            for partition in 0..count {
                let owner = subscribers[partition as usize % subscribers.len()];
                owners.insert(
                    TopicPartition {
                        topic: topic.clone(),
                        partition,
                    },
                    owner,
                );
            }
        }
        if owners != self.owners {
            self.positions
                .retain(|tp, _| owners.contains_key(tp) && owners.get(tp) == self.owners.get(tp));
            self.owners = owners;
            self.generation += 1;
        }
    }
}

/// A partition to poll, with its read position if known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollTarget {
    pub partition: TopicPartition,
    pub position: Option<u64>,
    pub start: StartFrom,
}

/// What a poll of one member should read.
#[derive(Debug, Clone)]
pub struct PollPlan {
    pub assignment: Assignment,
    pub targets: Vec<PollTarget>,
    pub session_timeout: Duration,
    pub filter: std::sync::Arc<msmq_protocol::filter::Filter>,
}

/// Every consumer group on this broker.
#[derive(Debug)]
pub struct Coordinator {
    groups: BTreeMap<String, Group>,
    next_member_id: u64,
}

impl Default for Coordinator {
    /// Member ids start from the clock (ms << 20), so an id a client kept from
    /// before a broker restart never names a member of the new process.
    fn default() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Coordinator {
            groups: BTreeMap::new(),
            next_member_id: ms << 20,
        }
    }
}

impl Coordinator {
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.get(name)
    }

    pub fn groups(&self) -> impl Iterator<Item = (&String, &Group)> {
        self.groups.iter()
    }

    fn group_mut(&mut self, group: &str, member_id: u64) -> Result<&mut Group, GroupError> {
        self.groups
            .get_mut(group)
            .ok_or_else(|| GroupError::UnknownMember {
                group: group.to_string(),
                member_id,
            })
    }

    /// Add a member; the group is rebalanced at once.
    pub fn join(
        &mut self,
        group: &str,
        new: NewMember,
        now: Instant,
        partitions_of: &dyn Fn(&str) -> Option<u32>,
    ) -> (u64, Assignment) {
        self.next_member_id += 1;
        let member_id = self.next_member_id;
        let g = self.groups.entry(group.to_string()).or_default();
        g.members.insert(
            member_id,
            Member {
                topics: new.topics,
                filter: new.filter,
                start: new.start,
                session_timeout: new.session_timeout,
                last_seen: now,
                connection_id: new.connection_id,
                client_addr: new.client_addr,
                poll_cursor: 0,
            },
        );
        g.rebalance(partitions_of);
        (member_id, g.assignment_of(member_id))
    }

    /// Record that the member is alive; returns its assignment.
    pub fn heartbeat(
        &mut self,
        group: &str,
        member_id: u64,
        now: Instant,
    ) -> Result<Assignment, GroupError> {
        let g = self.group_mut(group, member_id)?;
        g.member_mut(group, member_id)?.last_seen = now;
        Ok(g.assignment_of(member_id))
    }

    /// Remove a member at once and rebalance.
    pub fn leave(
        &mut self,
        group: &str,
        member_id: u64,
        partitions_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<(), GroupError> {
        let g = self.group_mut(group, member_id)?;
        g.members
            .remove(&member_id)
            .ok_or_else(|| GroupError::UnknownMember {
                group: group.to_string(),
                member_id,
            })?;
        g.rebalance(partitions_of);
        if g.members.is_empty() {
            self.groups.remove(group);
        }
        Ok(())
    }

    fn remove_where(
        &mut self,
        partitions_of: &dyn Fn(&str) -> Option<u32>,
        dead: impl Fn(&Member) -> bool,
    ) -> Vec<(String, u64)> {
        let mut removed = Vec::new();
        for (name, g) in self.groups.iter_mut() {
            let before = g.members.len();
            g.members.retain(|id, m| {
                let gone = dead(m);
                if gone {
                    removed.push((name.clone(), *id));
                }
                !gone
            });
            if g.members.len() != before {
                g.rebalance(partitions_of);
            }
        }
        self.groups.retain(|_, g| !g.members.is_empty());
        removed
    }

    /// Remove members not heard from within their session timeout.
    pub fn expire(
        &mut self,
        now: Instant,
        partitions_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Vec<(String, u64)> {
        self.remove_where(partitions_of, |m| {
            now.saturating_duration_since(m.last_seen) > m.session_timeout
        })
    }

    /// Remove every member that joined over a connection that has closed.
    pub fn drop_connection(
        &mut self,
        connection_id: u64,
        partitions_of: &dyn Fn(&str) -> Option<u32>,
    ) -> Vec<(String, u64)> {
        self.remove_where(partitions_of, |m| m.connection_id == connection_id)
    }

    /// Topics appeared or vanished: recompute every assignment.
    pub fn rebalance_all(&mut self, partitions_of: &dyn Fn(&str) -> Option<u32>) {
        for g in self.groups.values_mut() {
            g.rebalance(partitions_of);
        }
    }

    /// Forget read positions on a topic (it was deleted).
    pub fn forget_topic(&mut self, topic: &str) {
        for g in self.groups.values_mut() {
            g.positions.retain(|tp, _| tp.topic != topic);
        }
    }

    /// The partitions a poll should look at, rotated so that every partition
    /// gets its turn first. Counts as a heartbeat.
    pub fn poll_targets(
        &mut self,
        group: &str,
        member_id: u64,
        now: Instant,
    ) -> Result<PollPlan, GroupError> {
        let g = self.group_mut(group, member_id)?;
        let assignment = g.assignment_of(member_id);
        let member = g
            .members
            .get_mut(&member_id)
            .ok_or_else(|| GroupError::UnknownMember {
                group: group.to_string(),
                member_id,
            })?;
        let positions = &g.positions;
        member.last_seen = now;
        let n = assignment.partitions.len();
        let first = if n == 0 { 0 } else { member.poll_cursor % n };
        member.poll_cursor = member.poll_cursor.wrapping_add(1);
        let start = member.start;
        let session_timeout = member.session_timeout;
        let filter = member.filter.clone();
        let targets = (0..n)
            .map(|i| {
                let tp = &assignment.partitions[(first + i) % n];
                PollTarget {
                    partition: tp.clone(),
                    position: positions.get(tp).copied(),
                    start,
                }
            })
            .collect();
        Ok(PollPlan {
            assignment,
            targets,
            session_timeout,
            filter,
        })
    }

    /// Move the read position of `tp` from `from` to `to`, only if the member
    /// still owns it and nobody moved it meanwhile (`from == None`: it had no
    /// position yet). Returns false when the read must be discarded.
    pub fn advance(
        &mut self,
        group: &str,
        member_id: u64,
        tp: &TopicPartition,
        from: Option<u64>,
        to: u64,
    ) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        if g.owners.get(tp) != Some(&member_id) || g.positions.get(tp).copied() != from {
            return false;
        }
        g.positions.insert(tp.clone(), to);
        true
    }

    /// Fail unless the member owns every partition listed.
    pub fn check_owner<'a>(
        &self,
        group: &str,
        member_id: u64,
        partitions: impl IntoIterator<Item = &'a TopicPartition>,
    ) -> Result<(), GroupError> {
        let unknown = || GroupError::UnknownMember {
            group: group.to_string(),
            member_id,
        };
        let g = self.groups.get(group).ok_or_else(unknown)?;
        if !g.members.contains_key(&member_id) {
            return Err(unknown());
        }
        for tp in partitions {
            if g.owners.get(tp) != Some(&member_id) {
                return Err(GroupError::NotOwner(tp.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn four(topic: &str) -> Option<u32> {
        (topic == "payments").then_some(4)
    }

    fn member(conn: u64) -> NewMember {
        NewMember {
            topics: vec!["payments".into()],
            filter: std::sync::Arc::new(
                msmq_protocol::filter::Filter::compile(None, None).unwrap(),
            ),
            start: StartFrom::Earliest,
            session_timeout: Duration::from_secs(10),
            connection_id: conn,
            client_addr: "test".into(),
        }
    }

    fn tp(p: u32) -> TopicPartition {
        TopicPartition {
            topic: "payments".into(),
            partition: p,
        }
    }

    #[test]
    fn partitions_are_shared_and_rebalanced_on_join_and_leave() {
        let mut c = Coordinator::default();
        let now = Instant::now();
        let (a, assigned) = c.join("billing", member(1), now, &four);
        assert_eq!(assigned.partitions.len(), 4);
        let (b, b_assigned) = c.join("billing", member(2), now, &four);
        assert_eq!(b_assigned.partitions.len(), 2);
        let a_now = c.heartbeat("billing", a, now).unwrap();
        assert_eq!(a_now.partitions.len(), 2);
        assert!(a_now.generation > assigned.generation);
        // Disjoint.
        for p in &a_now.partitions {
            assert!(!b_assigned.partitions.contains(p));
        }
        // Another group is independent.
        let (_, other) = c.join("points", member(3), now, &four);
        assert_eq!(other.partitions.len(), 4);
        c.leave("billing", b, &four).unwrap();
        assert_eq!(c.heartbeat("billing", a, now).unwrap().partitions.len(), 4);
        assert!(matches!(
            c.heartbeat("billing", b, now),
            Err(GroupError::UnknownMember { .. })
        ));
    }

    #[test]
    fn silent_members_expire_and_closed_connections_leave() {
        let mut c = Coordinator::default();
        let t0 = Instant::now();
        let (a, _) = c.join("g", member(1), t0, &four);
        let (b, _) = c.join("g", member(2), t0, &four);
        // a keeps heartbeating, b goes silent.
        let later = t0 + Duration::from_secs(8);
        c.heartbeat("g", a, later).unwrap();
        assert!(c.expire(later, &four).is_empty());
        let expired = c.expire(t0 + Duration::from_secs(11), &four);
        assert_eq!(expired, vec![("g".to_string(), b)]);
        assert_eq!(c.heartbeat("g", a, later).unwrap().partitions.len(), 4);
        assert_eq!(c.drop_connection(1, &four), vec![("g".to_string(), a)]);
        assert!(c.group("g").is_none());
    }

    #[test]
    fn positions_survive_only_with_their_owner() {
        let mut c = Coordinator::default();
        let now = Instant::now();
        let (a, _) = c.join("g", member(1), now, &four);
        for p in 0..4 {
            assert!(c.advance("g", a, &tp(p), None, 10));
        }
        // Stale compare fails.
        assert!(!c.advance("g", a, &tp(0), Some(3), 12));
        let (b, _) = c.join("g", member(2), now, &four);
        let a_targets = c.poll_targets("g", a, now).unwrap().targets;
        let b_targets = c.poll_targets("g", b, now).unwrap().targets;
        // a kept two partitions with their positions; b starts fresh.
        assert!(a_targets.iter().all(|t| t.position == Some(10)));
        assert!(b_targets.iter().all(|t| t.position.is_none()));
        // a may not move or commit b's partitions.
        let b_tp = &b_targets[0].partition;
        assert!(!c.advance("g", a, b_tp, None, 20));
        assert_eq!(
            c.check_owner("g", a, [b_tp]),
            Err(GroupError::NotOwner(b_tp.clone()))
        );
        assert!(c.check_owner("g", b, [b_tp]).is_ok());
    }

    #[test]
    fn poll_order_rotates() {
        let mut c = Coordinator::default();
        let now = Instant::now();
        let (a, _) = c.join("g", member(1), now, &four);
        let firsts: BTreeSet<u32> = (0..4)
            .map(|_| {
                c.poll_targets("g", a, now).unwrap().targets[0]
                    .partition
                    .partition
            })
            .collect();
        assert_eq!(firsts.len(), 4);
    }

    #[test]
    fn unknown_topics_are_assigned_once_they_exist() {
        let mut c = Coordinator::default();
        let now = Instant::now();
        let none = |_: &str| None;
        let (a, assigned) = c.join("g", member(1), now, &none);
        assert!(assigned.partitions.is_empty());
        c.rebalance_all(&four);
        assert_eq!(c.heartbeat("g", a, now).unwrap().partitions.len(), 4);
    }
}
