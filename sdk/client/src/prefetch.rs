//! The consumer's prefetch: a task that keeps fetching a member's
//! partitions ahead of [`crate::Consumer::poll`], so the next messages
//! travel while the application works on (and commits) the last ones, as
//! Kafka's fetcher and RocketMQ's pull cache do.
//!
//! Invariants:
//! - Replies are handed out in the order they arrived, so the messages of a
//!   partition come in offset order, each once; one `poll` takes as many
//!   waiting replies as fit in its limits.
//! - At most [`Prefetch`] messages and bytes wait, plus one fetch's worth.
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
use std::time::Duration;
use tokio::sync::Notify;

/// Messages fetched ahead by default.
pub const PREFETCH_MESSAGES_DEFAULT: u32 = 2_000;
/// Payload bytes fetched ahead by default.
pub const PREFETCH_BYTES_DEFAULT: u64 = 8 << 20;

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
                if let Some(mut reply) = state.replies.pop_front() {
                    // Whatever else waits joins it, up to one poll's limits:
                    // replies that trickled in one by one go out together.
                    let (mut messages, mut bytes) = size(&reply);
                    while let Some(next) = state.replies.front() {
                        let (m, b) = size(next);
                        if messages + m > self.limits.max_messages as u64
                            || bytes + b > self.limits.max_bytes as u64
                        {
                            break;
                        }
                        let next = state.replies.pop_front().expect("a front reply");
                        reply.assignment = next.assignment;
                        reply.batches.extend(next.batches);
                        messages += m;
                        bytes += b;
                    }
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
        let positions: Option<Vec<PartitionOffset>> = {
            let state = shared.state.lock().expect("prefetch state");
            let full = state.messages >= prefetch.messages as u64 || state.bytes >= prefetch.bytes;
            (!full).then(|| offset_list(&state.positions))
        };
        let Some(positions) = positions else {
            taken.await;
            continue;
        };
        let reply = client
            .long_poll(
                &Request::Poll {
                    group: group.clone(),
                    member_id: member_id.load(Ordering::Relaxed),
                    limits,
                    positions,
                },
                Duration::from_millis(limits.max_wait_ms.into()),
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
