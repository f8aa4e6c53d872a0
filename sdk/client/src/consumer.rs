//! Consumer-group membership: join, poll, commit, leave.
//!
//! The broker assigns each partition of the subscribed topics to one live
//! member of the group and keeps the group's offsets. A member polls
//! (long-poll: it waits up to `max_wait` for messages), processes, then
//! commits; a crash between the two redelivers, never loses (at-least-once).
//! A background task heartbeats so a slow handler does not lose its
//! partitions; the member leaves when [`Consumer::leave`] is called or the
//! broker stops hearing from it.

use crate::connection::{expect_done, unexpected};
use crate::prefetch::{offset_list, read_to, Member, Prefetch, Prefetcher};
use crate::{Client, ClientError};
use msmq_protocol::{
    Assignment, ErrorCode, FetchLimits, Message, Receipt, Reply, Request, StartFrom, TopicPartition,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How a consumer joins and polls.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Where to start on partitions the group has never committed.
    pub start: StartFrom,
    /// The broker drops a member it has not heard from for this long.
    pub session_timeout: Duration,
    /// Per-poll limits (messages, bytes, wait).
    pub limits: FetchLimits,
    /// Broadcast mode under this stable instance name: this member gets
    /// every message of the topics and keeps its own progress. `None`:
    /// clustering, each message to one member of the group.
    pub broadcast_instance: Option<String>,
    /// Only messages with one of these tags: `*` or `TagA || TagB`.
    pub tag_filter: Option<String>,
    /// Only messages whose headers match, e.g. `amount > 1000 AND region = 'EU'`.
    /// Filters run on the broker: left-out messages never cross the network.
    pub sql_filter: Option<String>,
    /// How far [`Consumer::poll`] fetches ahead ([`Prefetch::OFF`]: one
    /// request per poll).
    pub prefetch: Prefetch,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            start: StartFrom::Earliest,
            session_timeout: Duration::from_secs(10),
            limits: FetchLimits::default(),
            broadcast_instance: None,
            tag_filter: None,
            sql_filter: None,
            prefetch: Prefetch::default(),
        }
    }
}

/// A message received with per-message acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub topic: Arc<str>,
    pub partition: u32,
    pub message: Message,
    /// 1 on the first delivery to this group, then 2, 3, …
    pub attempt: u32,
    /// Names this lease in `ack`, `nack` and `change_invisibility`.
    pub receipt: Receipt,
    /// When the message becomes visible again unless acked (ms since epoch).
    pub invisible_until_ms: u64,
}

/// Acknowledges deliveries of one group; see [`Consumer::acker`].
#[derive(Clone)]
pub struct Acker {
    client: Client,
    group: String,
}

impl Acker {
    /// As [`Consumer::ack`].
    pub async fn ack(&self, deliveries: &[Delivery]) -> Result<Vec<bool>, ClientError> {
        let req = Request::Ack {
            group: self.group.clone(),
            receipts: deliveries.iter().map(|d| d.receipt).collect(),
        };
        match self.client.request(&req).await? {
            Reply::Settled(s) => Ok(s),
            other => Err(unexpected("Ack", other)),
        }
    }
}

/// One message as a group member receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub topic: Arc<str>,
    pub partition: u32,
    pub message: Message,
}

impl ReceivedMessage {
    pub fn offset(&self) -> u64 {
        self.message.offset
    }
}

/// A member of a consumer group. See the module docs.
pub struct Consumer {
    client: Client,
    group: String,
    topics: Vec<String>,
    options: ConsumerOptions,
    member_id: Arc<AtomicU64>,
    assignment: Assignment,
    /// Next offset to commit per partition: one past the last message polled.
    uncommitted: BTreeMap<TopicPartition, u64>,
    /// Where to continue reading per owned partition (sent with every poll).
    positions: BTreeMap<TopicPartition, u64>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// Fetches ahead of `poll` (started by the first poll).
    prefetcher: Option<Prefetcher>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Consumer {
    pub(crate) async fn join(
        client: Client,
        group: &str,
        topics: &[&str],
        options: ConsumerOptions,
    ) -> Result<Consumer, ClientError> {
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let (member_id, assignment, group) =
            join_request(&client, group, &topics, &options).await?;
        let group = group.as_str();
        let member_id = Arc::new(AtomicU64::new(member_id));
        let heartbeat = tokio::spawn(heartbeat_loop(
            client.clone(),
            group.to_string(),
            member_id.clone(),
            options.session_timeout / 3,
        ));
        Ok(Consumer {
            client,
            group: group.to_string(),
            topics,
            options,
            member_id,
            assignment,
            uncommitted: BTreeMap::new(),
            positions: BTreeMap::new(),
            heartbeat,
            prefetcher: None,
        })
    }

    pub fn member_id(&self) -> u64 {
        self.member_id.load(Ordering::Relaxed)
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// Change the per-poll limits from the next poll on.
    pub fn limits_mut(&mut self) -> &mut FetchLimits {
        &mut self.options.limits
    }

    /// The partitions this member owned at its last poll or heartbeat.
    pub fn assignment(&self) -> &Assignment {
        &self.assignment
    }

    /// Take the next messages from this member's partitions, waiting up to
    /// `limits.max_wait_ms` if none is ready. Returns an empty list when the
    /// wait ran out. Messages of one partition come in offset order. With
    /// a prefetch (the default), the next messages are fetched while the
    /// application works on these.
    pub async fn poll(&mut self) -> Result<Vec<ReceivedMessage>, ClientError> {
        if self.options.prefetch.is_on() {
            return self.poll_prefetched().await;
        }
        let reply = match self.poll_once().await {
            Err(e) if e.code() == Some(ErrorCode::UNKNOWN_MEMBER) => {
                // The broker dropped us (timeout or restart): join again.
                self.rejoin().await?;
                self.poll_once().await?
            }
            other => other?,
        };
        match reply {
            Reply::Polled(polled) => {
                self.set_assignment(polled.assignment.clone());
                Ok(self.deliver(polled))
            }
            other => Err(unexpected("Poll", other)),
        }
    }

    async fn poll_prefetched(&mut self) -> Result<Vec<ReceivedMessage>, ClientError> {
        let current = self.prefetcher.as_ref().is_some_and(|p| {
            p.limits == self.options.limits && p.prefetch == self.options.prefetch
        });
        if !current {
            self.start_prefetch();
        }
        let next = self.prefetcher.as_ref().expect("started").next().await;
        let reply = match next {
            Ok(reply) => reply,
            Err(e) if e.code() == Some(ErrorCode::UNKNOWN_MEMBER) => {
                // The broker dropped us (timeout or restart): join again
                // and fetch from what this member has delivered.
                self.prefetcher = None;
                self.rejoin().await?;
                self.start_prefetch();
                self.prefetcher.as_ref().expect("started").next().await?
            }
            Err(e) => {
                self.prefetcher = None;
                return Err(e);
            }
        };
        let newest = self.prefetcher.as_ref().expect("started").assignment();
        if newest.generation > self.assignment.generation {
            self.set_assignment(newest);
        }
        Ok(reply.map(|polled| self.deliver(polled)).unwrap_or_default())
    }

    fn start_prefetch(&mut self) {
        self.prefetcher = None;
        let member = Member {
            client: self.client.clone(),
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            assignment: self.assignment.clone(),
            positions: self.positions.clone(),
        };
        self.prefetcher = Some(Prefetcher::start(
            member,
            self.options.limits,
            self.options.prefetch,
        ));
    }

    /// Hand a reply's messages to the application: from here on they count
    /// as read, and a commit covers them.
    fn deliver(&mut self, polled: msmq_protocol::Polled) -> Vec<ReceivedMessage> {
        let mut out = Vec::new();
        for batch in polled.batches {
            let topic: Arc<str> = batch.topic.as_str().into();
            let read_to = read_to(&batch);
            let tp = TopicPartition {
                topic: batch.topic.clone(),
                partition: batch.partition,
            };
            if self.positions.get(&tp) != Some(&read_to) {
                self.positions.insert(tp.clone(), read_to);
                self.uncommitted.insert(tp, read_to);
            }
            out.extend(batch.messages.into_iter().map(|message| ReceivedMessage {
                topic: topic.clone(),
                partition: batch.partition,
                message,
            }));
        }
        out
    }

    async fn poll_once(&self) -> Result<Reply, ClientError> {
        let limits = self.options.limits;
        self.client
            .long_poll(
                &Request::Poll {
                    group: self.group.clone(),
                    member_id: self.member_id(),
                    limits,
                    positions: offset_list(&self.positions),
                },
                limits.max_wait_ms,
            )
            .await
    }

    async fn rejoin(&mut self) -> Result<(), ClientError> {
        let base = match &self.options.broadcast_instance {
            // Rejoin under the name the application gave, not the effective one.
            Some(instance) => self
                .group
                .strip_suffix(&format!("%{instance}"))
                .unwrap_or(&self.group)
                .to_string(),
            None => self.group.clone(),
        };
        let (id, assignment, _) =
            join_request(&self.client, &base, &self.topics, &self.options).await?;
        self.member_id.store(id, Ordering::Relaxed);
        self.positions.clear();
        self.set_assignment(assignment);
        Ok(())
    }

    fn set_assignment(&mut self, assignment: Assignment) {
        if let Some(prefetcher) = &self.prefetcher {
            prefetcher.reassign(&assignment);
        }
        // Progress on partitions we lost is no longer ours to commit.
        self.uncommitted
            .retain(|tp, _| assignment.partitions.contains(tp));
        if assignment.generation != self.assignment.generation {
            // A partition we own again may have been read by another member
            // meanwhile: continue from the broker's record, not our memory.
            self.positions.retain(|tp, _| {
                assignment.partitions.contains(tp) && self.assignment.partitions.contains(tp)
            });
        }
        self.assignment = assignment;
    }

    /// Commit everything polled so far. After a rebalance, progress on
    /// partitions this member lost is dropped (their new owner re-reads from
    /// the last commit: at-least-once).
    pub async fn commit(&mut self) -> Result<(), ClientError> {
        if self.uncommitted.is_empty() {
            return Ok(());
        }
        match self.commit_once().await {
            Err(e) if e.code() == Some(ErrorCode::REBALANCED) => {
                self.heartbeat_now().await?;
                self.commit_once().await
            }
            other => other,
        }
    }

    async fn commit_once(&mut self) -> Result<(), ClientError> {
        if self.uncommitted.is_empty() {
            return Ok(());
        }
        let request = self.commit_request();
        expect_done("CommitOffsets", self.client.request(&request).await?)?;
        self.uncommitted.clear();
        Ok(())
    }

    /// Start committing everything polled so far and return at once, so
    /// the commit travels while the application polls and works on the
    /// next messages. Await the handle before counting on the commit. To
    /// keep polls from ever waiting on a commit's fsync, start the next
    /// commit only once the last handle `is_finished()`: it then covers
    /// every poll in between (as `msmq bench consume` does). A commit the broker
    /// refuses (after a rebalance: `REBALANCED`) leaves the offsets to the
    /// next [`Consumer::commit`], which refreshes the assignment; a later
    /// commit covers an earlier one, as offsets only move forward.
    pub fn commit_in_background(&mut self) -> tokio::task::JoinHandle<Result<(), ClientError>> {
        let client = self.client.clone();
        let request = (!self.uncommitted.is_empty()).then(|| self.commit_request());
        self.uncommitted.clear();
        tokio::spawn(async move {
            match request {
                Some(request) => expect_done("CommitOffsets", client.request(&request).await?),
                None => Ok(()),
            }
        })
    }

    fn commit_request(&self) -> Request {
        Request::CommitOffsets {
            group: self.group.clone(),
            member_id: self.member_id(),
            generation: self.assignment.generation,
            offsets: offset_list(&self.uncommitted),
        }
    }

    /// Refresh the assignment now.
    pub async fn heartbeat_now(&mut self) -> Result<(), ClientError> {
        let reply = self
            .client
            .request(&Request::Heartbeat {
                group: self.group.clone(),
                member_id: self.member_id(),
            })
            .await?;
        match reply {
            Reply::Assignment(a) => {
                self.set_assignment(a);
                Ok(())
            }
            other => Err(unexpected("Heartbeat", other)),
        }
    }

    /// Per-message acknowledgement: take messages (due retries first), each
    /// invisible to the group for `invisibility` unless acked in time; a
    /// message not acked (or nacked) in time is retried after the group's
    /// back-off and, after its last attempt, goes to the group's dead-letter
    /// topic `%DLQ%<group>`. Do not mix with [`Consumer::poll`]/[`Consumer::commit`]
    /// in one group: the broker commits the group's progress itself.
    pub async fn receive(&mut self, invisibility: Duration) -> Result<Vec<Delivery>, ClientError> {
        let invisibility_ms = invisibility.as_millis().min(u32::MAX as u128) as u32;
        let req = |c: &Self| Request::Receive {
            group: c.group.clone(),
            member_id: c.member_id(),
            limits: c.options.limits,
            invisibility_ms,
        };
        let reply = match self.client.request(&req(self)).await {
            Err(e) if e.code() == Some(ErrorCode::UNKNOWN_MEMBER) => {
                self.rejoin().await?;
                self.client.request(&req(self)).await?
            }
            other => other?,
        };
        match reply {
            Reply::Received {
                assignment,
                batches,
            } => {
                self.set_assignment(assignment);
                let mut out = Vec::new();
                for batch in batches {
                    let topic: Arc<str> = batch.topic.as_str().into();
                    out.extend(batch.messages.into_iter().map(|m| Delivery {
                        topic: topic.clone(),
                        partition: batch.partition,
                        message: m.message,
                        attempt: m.attempt,
                        receipt: m.receipt,
                        invisible_until_ms: m.invisible_until_ms,
                    }));
                }
                Ok(out)
            }
            other => Err(unexpected("Receive", other)),
        }
    }

    /// A handle that acknowledges for this member from another task, so a
    /// consumer can ack one batch while it already receives the next.
    pub fn acker(&self) -> Acker {
        Acker {
            client: self.client.clone(),
            group: self.group.clone(),
        }
    }

    /// Acknowledge deliveries: settled for good. Returns, per delivery,
    /// whether its receipt was still current (false: the lease had ended and
    /// the message is or will be delivered again).
    pub async fn ack(&self, deliveries: &[Delivery]) -> Result<Vec<bool>, ClientError> {
        self.acker().ack(deliveries).await
    }

    /// Give deliveries back: retried after the back-off, or dead-lettered
    /// with `reason` after the last attempt.
    pub async fn nack(
        &self,
        deliveries: &[Delivery],
        reason: &str,
    ) -> Result<Vec<bool>, ClientError> {
        let req = Request::Nack {
            group: self.group.clone(),
            receipts: deliveries.iter().map(|d| d.receipt).collect(),
            reason: reason.to_string(),
        };
        match self.client.request(&req).await? {
            Reply::Settled(s) => Ok(s),
            other => Err(unexpected("Nack", other)),
        }
    }

    /// Keep a delivery invisible for `invisibility` from now; its receipt is
    /// replaced (the old one becomes stale).
    pub async fn change_invisibility(
        &self,
        delivery: &mut Delivery,
        invisibility: Duration,
    ) -> Result<(), ClientError> {
        let req = Request::ChangeInvisibility {
            group: self.group.clone(),
            receipt: delivery.receipt,
            invisibility_ms: invisibility.as_millis().min(u32::MAX as u128) as u32,
        };
        match self.client.request(&req).await? {
            Reply::Leased {
                receipt,
                invisible_until_ms,
            } => {
                delivery.receipt = receipt;
                delivery.invisible_until_ms = invisible_until_ms;
                Ok(())
            }
            other => Err(unexpected("ChangeInvisibility", other)),
        }
    }

    /// Leave the group at once so its partitions move to other members.
    /// Uncommitted progress is not committed: call [`Consumer::commit`] first.
    pub async fn leave(mut self) -> Result<(), ClientError> {
        self.heartbeat.abort();
        // What was fetched ahead and not polled is the next owner's to read.
        self.prefetcher = None;
        let reply = self
            .client
            .request(&Request::LeaveGroup {
                group: self.group.clone(),
                member_id: self.member_id(),
            })
            .await?;
        expect_done("LeaveGroup", reply)
    }
}

async fn join_request(
    client: &Client,
    group: &str,
    topics: &[String],
    options: &ConsumerOptions,
) -> Result<(u64, Assignment, String), ClientError> {
    let reply = client
        .request(&Request::JoinGroup {
            group: group.to_string(),
            topics: topics.to_vec(),
            start: options.start,
            session_timeout_ms: options.session_timeout.as_millis().min(u32::MAX as u128) as u32,
            broadcast_instance: options.broadcast_instance.clone(),
            tag_filter: options.tag_filter.clone(),
            sql_filter: options.sql_filter.clone(),
        })
        .await?;
    match reply {
        Reply::Joined(j) => Ok((j.member_id, j.assignment, j.group)),
        other => Err(unexpected("JoinGroup", other)),
    }
}

async fn heartbeat_loop(client: Client, group: String, member_id: Arc<AtomicU64>, every: Duration) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(50)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let req = Request::Heartbeat {
            group: group.clone(),
            member_id: member_id.load(Ordering::Relaxed),
        };
        if let Err(e) = client.request(&req).await {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }
}
