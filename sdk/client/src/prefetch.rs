//! The consumer's prefetch: a task that keeps fetching a member's
//! partitions ahead of [`crate::Consumer::poll`], so the next messages
//! travel while the application works on (and commits) the last ones, as
//! Kafka's fetcher and RocketMQ's pull cache do.
//!
//! Invariants:
//! - Replies are handed out in the order they arrived, so the messages of a
//!   partition come in offset order, each once; one `poll` takes as many
//!   waiting messages as fit in its limits.
//! - At most [`Prefetch`] messages and bytes wait, plus one poll's worth.
//!   A fetch asks for the room left, so one fetch serves many polls; a poll
//!   takes at most its own limits, splitting a fetched batch if need be.
//! - When a reply shows the member lost partitions, whatever was fetched of
//!   them is dropped: their new owner reads them from the group's last
//!   commit, and the prefetch never delivers a message twice by itself.
//! - The fetch positions here run ahead of what the application has seen;
//!   commits follow only what [`crate::Consumer::poll`] returned.

use crate::{Client, ClientError};
use msmq_protocol::{
    Assignment, FetchLimits, FetchedMessages, PartitionOffset, Polled, Reply, Request,
    TopicPartition,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// Messages fetched ahead by default.
pub const PREFETCH_MESSAGES_DEFAULT: u32 = 2_000;
/// Payload bytes fetched ahead by default.
pub const PREFETCH_BYTES_DEFAULT: u64 = 8 << 20;
/// Most payload bytes one fetch asks for (unless one poll asks for more):
/// the broker holds a reply whole while it sends it, so this is broker
/// memory per consumer. Fewer, larger fetches cost less per message: a
/// cold single-consumer drain of 1 KB messages with 2,000-message polls
/// ran at 349-436k msg/s with 256 KiB, 448-466k with 512 KiB and 462-584k
/// with 1 MiB, but at 1 MiB four consumers took the broker's peak RSS
/// from 113 to 168 MiB.
pub const FETCH_BYTES_MAX: u64 = 512 << 10;

/// How far a consumer fetches ahead of what `poll` has returned. Zero
/// messages turns prefetching off: each poll is one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefetch {
    pub messages: u32,
    pub bytes: u64,
}

impl Prefetch {
    pub const OFF: Prefetch = Prefetch {
        messages: 0,
        bytes: 0,
    };

    pub fn is_on(&self) -> bool {
        self.messages > 0 && self.bytes > 0
    }
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch {
            messages: PREFETCH_MESSAGES_DEFAULT,
            bytes: PREFETCH_BYTES_DEFAULT,
        }
    }
}

/// What the fetch task and the consumer share.
struct Shared {
    state: Mutex<State>,
    /// A reply (or a failure) arrived.
    arrived: Notify,
    /// The consumer took a reply: there may be room again.
    taken: Notify,
}

struct State {
    replies: VecDeque<Polled>,
    messages: u64,
    bytes: u64,
    /// Where the next fetch reads each owned partition from.
    positions: BTreeMap<TopicPartition, u64>,
    assignment: Assignment,
    /// The fetch that failed; the task has stopped.
    failed: Option<ClientError>,
}

impl State {
    /// Take a newer assignment: drop what was fetched of partitions lost,
    /// and forget positions the way the consumer does (a partition owned
    /// again may have been read by another member meanwhile).
    fn reassign(&mut self, assignment: &Assignment) {
        // Replies fetched earlier carry older generations: never go back.
        if assignment.generation <= self.assignment.generation {
            return;
        }
        let owned = |tp: &TopicPartition| assignment.partitions.contains(tp);
        let before = &self.assignment;
        self.positions
            .retain(|tp, _| owned(tp) && before.partitions.contains(tp));
        let (mut messages, mut bytes) = (0, 0);
        for reply in &mut self.replies {
            reply.batches.retain(|b| {
                owned(&TopicPartition {
                    topic: b.topic.clone(),
                    partition: b.partition,
                })
            });
            let (m, b) = size(reply);
            messages += m;
            bytes += b;
        }
        self.messages = messages;
        self.bytes = bytes;
        self.assignment = assignment.clone();
    }
}

/// The wire form of per-partition offsets.
pub(crate) fn offset_list(offsets: &BTreeMap<TopicPartition, u64>) -> Vec<PartitionOffset> {
    offsets
        .iter()
        .map(|(tp, offset)| PartitionOffset {
            topic: tp.topic.clone(),
            partition: tp.partition,
            offset: *offset,
        })
        .collect()
}

/// Where reading a partition goes on after a fetched batch: progress
/// includes messages a filter left out.
pub(crate) fn read_to(batch: &FetchedMessages) -> u64 {
    batch
        .messages
        .last()
        .map_or(batch.next_offset, |m| batch.next_offset.max(m.offset + 1))
}

/// Messages and payload bytes of a reply.
fn size(reply: &Polled) -> (u64, u64) {
    reply.batches.iter().fold((0, 0), |(m, b), batch| {
        (
            m + batch.messages.len() as u64,
            b + batch
                .messages
                .iter()
                .map(|m| m.payload.len() as u64)
                .sum::<u64>(),
        )
    })
}

/// One poll's worth from the front of the queue: whole replies while they
/// fit in `limits`, and the front part of the next one (at least one
/// message, so an oversized message still goes out), with its messages
/// and payload bytes. Fetches are larger than polls, so most polls take
/// part of a reply.
fn take_up_to(replies: &mut VecDeque<Polled>, limits: &FetchLimits) -> (Polled, u64, u64) {
    let (max_messages, max_bytes) = (limits.max_messages as u64, limits.max_bytes as u64);
    let front = replies.front().expect("a waiting reply");
    let mut out = Polled {
        assignment: front.assignment.clone(),
        batches: Vec::new(),
    };
    let (mut messages, mut bytes) = (0u64, 0u64);
    while let Some(reply) = replies.front_mut() {
        out.assignment = reply.assignment.clone();
        while !reply.batches.is_empty() {
            let batch = &mut reply.batches[0];
            // How many of this batch's messages fit.
            let mut take = 0;
            for m in &batch.messages {
                let size = m.payload.len() as u64;
                let first = messages == 0 && take == 0;
                if !first && (messages + 1 > max_messages || bytes + size > max_bytes) {
                    break;
                }
                messages += 1;
                bytes += size;
                take += 1;
            }
            if take == batch.messages.len() {
                out.batches.push(reply.batches.remove(0));
                continue;
            }
            if take > 0 {
                let rest = batch.messages.split_off(take);
                let head = std::mem::replace(&mut batch.messages, rest);
                let next_offset = head.last().map_or(batch.next_offset, |m| m.offset + 1);
                out.batches.push(FetchedMessages {
                    topic: batch.topic.clone(),
                    partition: batch.partition,
                    end_offset: batch.end_offset,
                    messages: head,
                    next_offset,
                });
            }
            return (out, messages, bytes);
        }
        replies.pop_front();
    }
    (out, messages, bytes)
}

/// A running fetch task; stopped when dropped.
pub(crate) struct Prefetcher {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// The limits its fetches use.
    pub(crate) limits: FetchLimits,
    pub(crate) prefetch: Prefetch,
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a fetch task needs to know about its member.
pub(crate) struct Member {
    pub client: Client,
    pub group: String,
    pub member_id: Arc<AtomicU64>,
    pub assignment: Assignment,
    /// Where the application's reading stands: the task starts there.
    pub positions: BTreeMap<TopicPartition, u64>,
}

impl Prefetcher {
    pub(crate) fn start(member: Member, limits: FetchLimits, prefetch: Prefetch) -> Prefetcher {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                replies: VecDeque::new(),
                messages: 0,
                bytes: 0,
                positions: member.positions,
                assignment: member.assignment,
                failed: None,
            }),
            arrived: Notify::new(),
            taken: Notify::new(),
        });
        let task = tokio::spawn(fetch_loop(
            member.client,
            member.group,
            member.member_id,
            limits,
            prefetch,
            shared.clone(),
        ));
        Prefetcher {
            shared,
            task,
            limits,
            prefetch,
        }
    }

    /// The next reply, waiting up to the fetch's long-poll wait; `None`
    /// when nothing arrived meanwhile.
    pub(crate) async fn next(&self) -> Result<Option<Polled>, ClientError> {
        let wait = std::time::Duration::from_millis(self.limits.max_wait_ms as u64);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so an arrival in between wakes it.
            let arrived = self.shared.arrived.notified();
            {
                let mut state = self.shared.state.lock().expect("prefetch state");
                if !state.replies.is_empty() {
                    let (reply, messages, bytes) = take_up_to(&mut state.replies, &self.limits);
                    state.messages -= messages;
                    state.bytes -= bytes;
                    drop(state);
                    self.shared.taken.notify_one();
                    return Ok(Some(reply));
                }
                if let Some(e) = state.failed.take() {
                    return Err(e);
                }
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// The newest assignment the fetches have seen.
    pub(crate) fn assignment(&self) -> Assignment {
        self.shared
            .state
            .lock()
            .expect("prefetch state")
            .assignment
            .clone()
    }

    /// The consumer learned of a newer assignment (a heartbeat or a
    /// refused commit).
    pub(crate) fn reassign(&self, assignment: &Assignment) {
        self.shared
            .state
            .lock()
            .expect("prefetch state")
            .reassign(assignment);
    }
}

/// One fetch asks for the room left in the prefetch (up to
/// [`FETCH_BYTES_MAX`]) and never for fewer messages than one poll: a round
/// trip per fetch, not per poll, is what lets one consumer with small polls
/// drain as fast as one with large ones.
fn fetch_limits(poll: &FetchLimits, prefetch: &Prefetch, messages: u64, bytes: u64) -> FetchLimits {
    let room_messages = (prefetch.messages as u64).saturating_sub(messages);
    let room_bytes = prefetch.bytes.saturating_sub(bytes);
    FetchLimits {
        max_messages: room_messages
            .max(poll.max_messages as u64)
            .min(u32::MAX as u64) as u32,
        // The broker returns a first message larger than this all the same.
        max_bytes: room_bytes.clamp(1, FETCH_BYTES_MAX) as u32,
        max_wait_ms: poll.max_wait_ms,
    }
}

async fn fetch_loop(
    client: Client,
    group: String,
    member_id: Arc<AtomicU64>,
    limits: FetchLimits,
    prefetch: Prefetch,
    shared: Arc<Shared>,
) {
    loop {
        let taken = shared.taken.notified();
        let fetch: Option<(Vec<PartitionOffset>, FetchLimits)> = {
            let state = shared.state.lock().expect("prefetch state");
            // Refill below half: fetches of half the prefetch or more, not
            // one per poll taken.
            let full =
                state.messages > prefetch.messages as u64 / 2 || state.bytes > prefetch.bytes / 2;
            (!full).then(|| {
                (
                    offset_list(&state.positions),
                    fetch_limits(&limits, &prefetch, state.messages, state.bytes),
                )
            })
        };
        let Some((positions, fetch_limits)) = fetch else {
            taken.await;
            continue;
        };
        let reply = client
            .long_poll(
                &Request::Poll {
                    group: group.clone(),
                    member_id: member_id.load(Ordering::Relaxed),
                    limits: fetch_limits,
                    positions,
                },
                limits.max_wait_ms,
            )
            .await;
        let mut state = shared.state.lock().expect("prefetch state");
        match reply {
            Ok(Reply::Polled(polled)) => {
                state.reassign(&polled.assignment);
                for batch in &polled.batches {
                    let read_to = read_to(batch);
                    state.positions.insert(
                        TopicPartition {
                            topic: batch.topic.clone(),
                            partition: batch.partition,
                        },
                        read_to,
                    );
                }
                // An empty reply (the long poll ran out) is not kept: the
                // consumer's own wait says "nothing yet".
                if !polled.batches.is_empty() {
                    let (m, b) = size(&polled);
                    state.messages += m;
                    state.bytes += b;
                    state.replies.push_back(polled);
                    drop(state);
                    shared.arrived.notify_one();
                }
            }
            Ok(other) => {
                state.failed = Some(crate::connection::unexpected("Poll", other));
                drop(state);
                shared.arrived.notify_one();
                return;
            }
            Err(e) => {
                state.failed = Some(e);
                drop(state);
                shared.arrived.notify_one();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msmq_protocol::{Message, MessageId};

    fn batch(partition: u32, offsets: std::ops::Range<u64>, next_offset: u64) -> FetchedMessages {
        FetchedMessages {
            topic: "t".into(),
            partition,
            end_offset: next_offset,
            messages: offsets
                .map(|offset| Message {
                    offset,
                    id: MessageId([0; 16]),
                    timestamp_ms: 0,
                    payload: vec![0; 10],
                    key: None,
                    tag: None,
                    headers: Vec::new(),
                })
                .collect(),
            next_offset,
        }
    }

    fn reply(batches: Vec<FetchedMessages>) -> Polled {
        Polled {
            assignment: Assignment {
                generation: 1,
                partitions: Vec::new(),
            },
            batches,
        }
    }

    fn limits(max_messages: u32, max_bytes: u32) -> FetchLimits {
        FetchLimits {
            max_messages,
            max_bytes,
            max_wait_ms: 0,
        }
    }

    fn offsets(polled: &Polled) -> Vec<(u32, Vec<u64>, u64)> {
        polled
            .batches
            .iter()
            .map(|b| {
                let offsets = b.messages.iter().map(|m| m.offset).collect();
                (b.partition, offsets, read_to(b))
            })
            .collect()
    }

    #[test]
    fn a_poll_takes_part_of_a_fetch_and_the_next_poll_the_rest_in_order() {
        // A filter skipped past 12: the batch reads on to 15.
        let mut queue = VecDeque::from([reply(vec![batch(0, 0..6, 15), batch(1, 0..2, 2)])]);
        let (first, ..) = take_up_to(&mut queue, &limits(4, 1 << 20));
        assert_eq!(offsets(&first), [(0, vec![0, 1, 2, 3], 4)]);
        let (second, ..) = take_up_to(&mut queue, &limits(4, 1 << 20));
        assert_eq!(offsets(&second), [(0, vec![4, 5], 15), (1, vec![0, 1], 2)]);
        assert!(queue.is_empty());
    }

    #[test]
    fn whole_replies_join_up_to_the_limits_and_bytes_count_too() {
        let mut queue = VecDeque::from([
            reply(vec![batch(0, 0..2, 2)]),
            reply(vec![batch(0, 2..4, 4)]),
            reply(vec![batch(0, 4..6, 6)]),
        ]);
        // 10 bytes a message: 35 bytes take three.
        let (polled, messages, bytes) = take_up_to(&mut queue, &limits(100, 35));
        assert_eq!((messages, bytes), (3, 30));
        assert_eq!(offsets(&polled), [(0, vec![0, 1], 2), (0, vec![2], 3)]);
        let (polled, ..) = take_up_to(&mut queue, &limits(100, 1 << 20));
        assert_eq!(offsets(&polled), [(0, vec![3], 4), (0, vec![4, 5], 6)]);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_message_larger_than_a_poll_still_goes_out_alone() {
        let mut queue = VecDeque::from([reply(vec![batch(0, 0..3, 3)])]);
        let (polled, ..) = take_up_to(&mut queue, &limits(100, 5));
        assert_eq!(offsets(&polled), [(0, vec![0], 1)]);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn a_fetch_asks_for_the_room_left_and_at_least_one_poll() {
        let poll = limits(100, 1 << 20);
        let prefetch = Prefetch {
            messages: 2_000,
            bytes: 8 << 20,
        };
        let fetch = fetch_limits(&poll, &prefetch, 500, 7 << 20);
        assert_eq!(
            (fetch.max_messages, fetch.max_bytes),
            (1_500, FETCH_BYTES_MAX as u32)
        );
        let fetch = fetch_limits(&poll, &prefetch, 1_990, (8 << 20) - 10);
        assert_eq!((fetch.max_messages, fetch.max_bytes), (100, 10));
        let fetch = fetch_limits(&poll, &prefetch, 0, 0);
        assert_eq!(
            (fetch.max_messages, fetch.max_bytes),
            (2_000, FETCH_BYTES_MAX as u32)
        );
    }
}
