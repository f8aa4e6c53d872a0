//! Requests, replies and the records they carry.
//!
//! Field and variant order is wire format: append, never reorder.
//!
//! Size: over 800 lines because it is the one list of every request and
//! reply; splitting it by family waits for the deterministic core's command
//! type, which decides those families.

use crate::ErrorCode;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A request from a client to the broker. One per stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and version check. Reply: [`Reply::Pong`].
    Ping,
    /// Reply: [`Reply::TopicCreated`].
    CreateTopic {
        name: String,
        partitions: u32,
    },
    /// Delete a topic, its log and its group offsets. Reply: [`Reply::Done`].
    DeleteTopic {
        name: String,
    },
    /// Reply: [`Reply::Topics`].
    ListTopics,
    /// Partitions with their offsets and the lag of every group. Reply: [`Reply::TopicDescription`].
    DescribeTopic {
        name: String,
    },
    /// Append messages. With `partition` set every message goes there;
    /// otherwise a message with a key goes to `hash(key) % partitions` and the
    /// keyless ones of one request go together to the next partition in turn.
    /// Reply: [`Reply::Produced`], acknowledged once durable.
    Produce {
        topic: String,
        partition: Option<u32>,
        messages: Vec<NewMessage>,
    },
    /// Read a partition directly by offset, outside any group. Waits up to
    /// `max_wait_ms` for the first message. Reply: [`Reply::Fetched`].
    Fetch {
        topic: String,
        partition: u32,
        offset: u64,
        limits: FetchLimits,
    },
    /// Join (or create) a consumer group. Reply: [`Reply::Joined`].
    JoinGroup {
        group: String,
        topics: Vec<String>,
        start: StartFrom,
        session_timeout_ms: u32,
        /// Broadcast mode: every member gets every message, each with its
        /// own progress kept under this stable instance name (e.g. a host
        /// name). `None`: clustering mode, one member per partition.
        broadcast_instance: Option<String>,
        /// Tag filter: `*` or `TagA || TagB`. `None`: every tag.
        tag_filter: Option<String>,
        /// SQL92-style filter over headers, e.g. `amount > 1000 AND region = 'EU'`.
        sql_filter: Option<String>,
    },
    /// Keep a membership alive and learn the current assignment. Reply: [`Reply::Assignment`].
    Heartbeat {
        group: String,
        member_id: u64,
    },
    /// Take the next messages from the member's assigned partitions, waiting
    /// up to `limits.max_wait_ms` when none is ready. Counts as a heartbeat.
    /// `positions` is where the member wants to continue on partitions it
    /// has already received messages from (one past the last one it got);
    /// for any other partition the broker continues from its own record,
    /// which starts at the group's committed offset. Sending positions makes
    /// a lost reply harmless: its messages are read again.
    /// Reply: [`Reply::Polled`].
    Poll {
        group: String,
        member_id: u64,
        limits: FetchLimits,
        positions: Vec<PartitionOffset>,
    },
    /// Store the group's progress: each offset is the next offset to consume.
    /// Reply: [`Reply::Done`].
    CommitOffsets {
        group: String,
        member_id: u64,
        generation: u64,
        offsets: Vec<PartitionOffset>,
    },
    /// Leave the group at once (partitions are rebalanced). Reply: [`Reply::Done`].
    LeaveGroup {
        group: String,
        member_id: u64,
    },
    /// Reply: [`Reply::Groups`].
    ListGroups,
    /// Reply: [`Reply::GroupDescription`].
    DescribeGroup {
        group: String,
    },
    /// Declare this connection a live producer of `producer_group`: the
    /// broker may send it [`BrokerRequest::CheckTransaction`] on streams it
    /// opens. Holds until the connection closes. Reply: [`Reply::Done`].
    RegisterProducer {
        producer_group: String,
    },
    /// Store half messages, one transaction each, invisible to consumers
    /// until committed. Routed like `Produce`. The first check-back comes
    /// after the broker's `transaction_timeout` or `check_immunity_ms`,
    /// whichever is later. Reply: [`Reply::HalfStored`], once durable.
    SendHalf {
        producer_group: String,
        topic: String,
        partition: Option<u32>,
        messages: Vec<NewMessage>,
        check_immunity_ms: u32,
    },
    /// Commit or roll back a transaction (or report it still unknown).
    /// Repeating the same decision is harmless; the opposite decision after
    /// a resolution is refused with `TRANSACTION_RESOLVED`.
    /// Reply: [`Reply::TransactionEnded`].
    EndTransaction {
        producer_group: String,
        tx_id: u64,
        action: TxAction,
    },
    /// Pending (or, with `discarded`, discarded) transactions, oldest first,
    /// at most `limit`. Reply: [`Reply::Transactions`].
    ListTransactions {
        discarded: bool,
        limit: u32,
    },
    /// Operator action on a discarded transaction: back to pending for a
    /// new round of checks, or commit it by hand.
    /// Reply: [`Reply::TransactionEnded`].
    ResolveDiscarded {
        tx_id: u64,
        action: DiscardedAction,
    },
    /// Several `EndTransaction`s in one request, each applied (and answered)
    /// on its own. Reply: [`Reply::TransactionsEnded`], in request order.
    EndTransactions {
        producer_group: String,
        decisions: Vec<TxDecision>,
    },
    /// Move a group's committed offsets on one topic. The group must have no
    /// live members (`GROUP_ACTIVE` otherwise). Reply: [`Reply::OffsetsReset`].
    ResetGroupOffsets {
        group: String,
        topic: String,
        to: ResetTo,
    },
    /// Per-message acknowledgement: take messages from the member's
    /// partitions — retries that are due first, then new ones — each leased
    /// for `invisibility_ms`: unless acked (or its invisibility changed) in
    /// time it is retried after the group's back-off. Counts as a heartbeat.
    /// Reply: [`Reply::Received`].
    Receive {
        group: String,
        member_id: u64,
        limits: FetchLimits,
        invisibility_ms: u32,
    },
    /// Settle received messages: done for good. Reply: [`Reply::Settled`].
    Ack {
        group: String,
        receipts: Vec<Receipt>,
    },
    /// Give received messages back: each is retried after the group's
    /// back-off, or dead-lettered after its last attempt. Reply: [`Reply::Settled`].
    Nack {
        group: String,
        receipts: Vec<Receipt>,
        reason: String,
    },
    /// Keep a received message invisible for `invisibility_ms` from now.
    /// The old receipt becomes stale. Reply: [`Reply::Leased`].
    ChangeInvisibility {
        group: String,
        receipt: Receipt,
        invisibility_ms: u32,
    },
    /// Set a group's retry policy (stored; applies to later failures).
    /// Reply: [`Reply::Done`].
    ConfigureGroup {
        group: String,
        max_delivery_attempts: u32,
        retry_backoff_ms: Vec<u64>,
        /// Ordered (FIFO) per message key: a key's next message is delivered
        /// only after the previous one is acked or dead-lettered; different
        /// keys proceed in parallel.
        ordered: bool,
    },
    /// Look a message up by id. Reply: [`Reply::Messages`] (empty if unknown
    /// or no longer stored).
    GetMessage {
        id: MessageId,
    },
    /// Messages of `topic` with exactly this key, oldest first per
    /// partition, at most `limit`. Reply: [`Reply::Messages`].
    FindMessages {
        topic: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        limit: u32,
    },
    /// Deploy a plugin, or upgrade the running plugin of that name.
    DeployPlugin {
        spec: crate::PluginSpec,
        #[serde(with = "serde_bytes")]
        component: Vec<u8>,
    },
    ListPlugins,
    PluginStats {
        name: String,
    },
    PausePlugin {
        name: String,
    },
    ResumePlugin {
        name: String,
    },
    RemovePlugin {
        name: String,
    },
    /// Read a plugin's committed state: up to `limit` entries whose key
    /// starts with `prefix`, after `start_after` when given.
    PluginState {
        name: String,
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        start_after: Option<serde_bytes::ByteBuf>,
        limit: u32,
    },
    /// Set a topic's retention (0 = no limit), or with `None` return it to
    /// the broker default. Reply: [`Reply::Done`].
    SetTopicRetention {
        topic: String,
        retention: Option<Retention>,
    },
    /// Reply: [`Reply::TopicRetention`].
    GetTopicRetention {
        topic: String,
    },
    /// Present a token; the connection acts as its principal from then on.
    /// Reply: [`Reply::Authenticated`].
    Authenticate {
        token: String,
    },
    /// Create a token for a principal (admin only). Reply:
    /// [`Reply::TokenCreated`]; the token is shown only in that reply.
    CreateToken {
        principal: String,
    },
    /// Revoke a token by its id (admin only). Reply: [`Reply::Done`].
    RevokeToken {
        token_id: String,
    },
    /// Every token's id and principal (admin only). Reply: [`Reply::Tokens`].
    ListTokens,
    /// Replace a principal's ACL rules (admin only; empty removes them).
    /// Reply: [`Reply::Done`].
    SetAcl {
        principal: String,
        rules: Vec<AclRule>,
    },
    /// A principal's ACL rules (admin only). Reply: [`Reply::Acl`].
    GetAcl {
        principal: String,
    },
    /// Become an idempotent producer: `None` gets a new producer id (epoch
    /// 0); `Some(id)`, an id this principal holds, gets the next epoch of it,
    /// which fences every request of the older epochs. Reply:
    /// [`Reply::ProducerInit`].
    InitProducer {
        producer_id: Option<u64>,
    },
    /// A `Produce` or `SendHalf` numbered by an idempotent producer: its
    /// messages take the producer's sequence numbers `sequence ..
    /// sequence + count`. Sent again with the same numbers (after a lost
    /// reply, over any connection), it is answered with the original
    /// reply and stored nothing. Reply: that of the inner request.
    Sequenced {
        producer: ProducerSequence,
        request: SequencedRequest,
    },
}

/// What a [`Request::Sequenced`] carries: the fields of a
/// [`Request::Produce`] or a [`Request::SendHalf`], in the same order (a
/// type of its own, so a sequenced request cannot nest another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SequencedRequest {
    Produce {
        topic: String,
        partition: Option<u32>,
        messages: Vec<NewMessage>,
    },
    SendHalf {
        producer_group: String,
        topic: String,
        partition: Option<u32>,
        messages: Vec<NewMessage>,
        check_immunity_ms: u32,
    },
}

impl SequencedRequest {
    /// The same request, not numbered.
    pub fn into_request(self) -> Request {
        match self {
            SequencedRequest::Produce {
                topic,
                partition,
                messages,
            } => Request::Produce {
                topic,
                partition,
                messages,
            },
            SequencedRequest::SendHalf {
                producer_group,
                topic,
                partition,
                messages,
                check_immunity_ms,
            } => Request::SendHalf {
                producer_group,
                topic,
                partition,
                messages,
                check_immunity_ms,
            },
        }
    }

    /// How many sequence numbers the request takes: one per message.
    pub fn message_count(&self) -> usize {
        match self {
            SequencedRequest::Produce { messages, .. }
            | SequencedRequest::SendHalf { messages, .. } => messages.len(),
        }
    }
}

/// Which producer numbered a request, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerSequence {
    pub producer_id: u64,
    pub epoch: u32,
    /// The sequence number of the request's first message; the producer's
    /// first request has 0, each next one the previous one's plus its
    /// message count.
    pub sequence: u64,
}

/// An idempotent producer's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerIdentity {
    pub producer_id: u64,
    pub epoch: u32,
}

/// A message found by id or key, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoundMessage {
    pub topic: String,
    pub partition: u32,
    pub message: Message,
}

/// Identifies one delivery of one message to a group: where the message is
/// and which lease. A later lease of the same message makes it stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Receipt {
    pub topic_id: u32,
    pub partition: u32,
    pub offset: u64,
    pub nonce: u64,
}

/// Leased messages of one partition (per-message acknowledgement).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedBatch {
    pub topic: String,
    pub partition: u32,
    pub messages: Vec<LeasedMessage>,
}

/// A message received with per-message acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedMessage {
    pub message: Message,
    /// 1 on the first delivery to this group, then 2, 3, …
    pub attempt: u32,
    pub receipt: Receipt,
    /// When the message becomes visible again unless acked (ms since epoch).
    pub invisible_until_ms: u64,
}

/// Where `ResetGroupOffsets` moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetTo {
    Earliest,
    Latest,
    /// The first message appended at or after this time (ms since the Unix
    /// epoch); the partition end if every message is older.
    Timestamp(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxDecision {
    pub tx_id: u64,
    pub action: TxAction,
}

/// The reply to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Error(ErrorReply),
    Pong {
        protocol_version: u16,
        broker_version: String,
    },
    Done,
    TopicCreated(TopicInfo),
    Topics(Vec<TopicInfo>),
    TopicDescription(TopicDescription),
    Produced(Vec<MessageAck>),
    Fetched(FetchedMessages),
    Joined(Joined),
    Assignment(Assignment),
    Polled(Polled),
    Groups(Vec<GroupSummary>),
    GroupDescription(GroupDescription),
    /// One per half message, in request order.
    HalfStored(Vec<HalfAck>),
    TransactionEnded(TxEnded),
    Transactions(Vec<TransactionInfo>),
    TransactionsEnded(Vec<TxEndResult>),
    /// The new committed offset of every partition.
    OffsetsReset(Vec<PartitionOffset>),
    Received {
        assignment: Assignment,
        batches: Vec<LeasedBatch>,
    },
    /// For each receipt in order: settled, or stale (its lease ended or was
    /// replaced, so the message is or will be delivered again).
    Settled(Vec<bool>),
    Leased {
        receipt: Receipt,
        invisible_until_ms: u64,
    },
    Messages(Vec<FoundMessage>),
    PluginDeployed(crate::PluginDeployed),
    Plugins(Vec<crate::PluginInfo>),
    PluginStats(crate::PluginStats),
    PluginState(Vec<crate::StateEntry>),
    /// The retention in force and whether it is the broker default.
    TopicRetention {
        retention: Retention,
        is_default: bool,
    },
    Authenticated {
        principal: String,
    },
    TokenCreated {
        token_id: String,
        token: String,
    },
    Tokens(Vec<TokenInfo>),
    Acl(Vec<AclRule>),
    ProducerInit(ProducerIdentity),
}

/// The answer to one decision of an `EndTransactions` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxEndResult {
    Ended(TxEnded),
    Error(ErrorReply),
}

/// A producer's decision on a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxAction {
    Commit,
    Rollback,
    /// Not decided yet: the broker keeps the half message and checks back.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiscardedAction {
    Resume,
    Commit,
}

/// A stored half message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfAck {
    pub tx_id: u64,
    /// The id the message keeps once committed.
    pub id: MessageId,
    pub partition: u32,
}

/// The state of a transaction after an `EndTransaction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxEnded {
    /// In the log (now or earlier) at this place.
    Committed(MessageAck),
    RolledBack,
    /// Still pending (or pending again); the broker will check back.
    Pending,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionInfo {
    pub tx_id: u64,
    pub producer_group: String,
    pub topic: String,
    pub partition: u32,
    pub id: MessageId,
    pub created_at_ms: u64,
    pub check_count: u32,
    pub next_check_at_ms: u64,
    pub discarded: bool,
}

/// A request the broker sends to a client, on a stream the broker opens.
/// Framed like every request; the client answers with one
/// [`BrokerRequestReply`] frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerRequest {
    /// What is the state of this transaction? Sent to a live producer of the
    /// transaction's producer group.
    CheckTransaction(TransactionCheck),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionCheck {
    pub tx_id: u64,
    pub producer_group: String,
    pub topic: String,
    pub partition: u32,
    pub id: MessageId,
    /// 1 for the first check.
    pub check_number: u32,
    pub created_at_ms: u64,
    pub message: NewMessage,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerRequestReply {
    /// The producer's answer; `tx_id` must echo the check's.
    TransactionState { tx_id: u64, action: TxAction },
    /// The client cannot answer: no checker registered for the group
    /// (`INVALID_ARGUMENT`), the request did not decode (`BAD_REQUEST`) or
    /// the checker failed (`INTERNAL`).
    Error(ErrorReply),
}

/// An error reply: a stable code, a human message, and for `BUSY` a hint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u32>,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(ms) = self.retry_after_ms {
            write!(f, " (retry after {ms} ms)")?;
        }
        Ok(())
    }
}

/// A string header of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A message as a producer sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NewMessage {
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub key: Option<serde_bytes::ByteBuf>,
    pub tag: Option<String>,
    pub headers: Vec<Header>,
    /// Deliver no earlier than this time (ms since the Unix epoch): the
    /// message is durable at once but enters the log, where consumers see
    /// it, only when due. `None` or a past time: at once.
    pub deliver_at_ms: Option<u64>,
}

impl NewMessage {
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        NewMessage {
            payload: payload.into(),
            ..Default::default()
        }
    }

    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(serde_bytes::ByteBuf::from(key.into()));
        self
    }

    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    /// Deliver at `at` (millisecond precision).
    pub fn deliver_at(mut self, at: std::time::SystemTime) -> Self {
        let ms = at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.deliver_at_ms = Some(ms);
        self
    }

    /// Deliver after `delay` from now (by this machine's clock).
    pub fn with_delay(self, delay: std::time::Duration) -> Self {
        self.deliver_at(std::time::SystemTime::now() + delay)
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// The bytes this message counts against `message_bytes_max`: payload,
    /// key, tag and every header name and value.
    pub fn size_bytes(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, |k| k.len())
            + self.tag.as_ref().map_or(0, |t| t.len())
            + self
                .headers
                .iter()
                .map(|h| h.name.len() + h.value.len())
                .sum::<usize>()
    }
}

/// What an ACL rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AclResource {
    Topic,
    Group,
    ProducerGroup,
    Plugin,
}

/// What an ACL rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AclAction {
    /// Produce to a topic.
    Produce,
    /// Read a topic; join, poll, commit, receive and ack in a group.
    Consume,
    /// Send half messages and end transactions as a producer group.
    Transact,
    /// Deploy, pause, resume, remove and read the state of a plugin.
    Deploy,
}

/// Allows `actions` on resources of kind `resource` whose name matches
/// `pattern`: a name, `*`, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AclRule {
    pub resource: AclResource,
    pub pattern: String,
    pub actions: Vec<AclAction>,
}

/// A token as `ListTokens` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub token_id: String,
    pub principal: String,
    pub created_at_ms: u64,
}

/// How long and how much a topic keeps: whole batches older than
/// `max_age_ms`, or beyond `max_bytes` per partition (oldest first), are
/// removed. 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    pub max_age_ms: u64,
    pub max_bytes: u64,
}

/// A message as a consumer receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub offset: u64,
    pub id: MessageId,
    /// Broker time when the message was appended, in ms since the Unix epoch.
    pub timestamp_ms: u64,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub key: Option<serde_bytes::ByteBuf>,
    pub tag: Option<String>,
    pub headers: Vec<Header>,
}

/// A broker-assigned message id, 16 bytes: the broker store's random id
/// (8 bytes, fixed when its data directory is created) and a sequence number
/// that store never reuses (8 bytes), both big-endian. A message keeps its id
/// from the moment the broker accepts it: a transactional message has it
/// already as a half message. Printed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    pub fn new(store_id: u64, sequence: u64) -> Self {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&store_id.to_be_bytes());
        b[8..].copy_from_slice(&sequence.to_be_bytes());
        MessageId(b)
    }

    pub fn store_id(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }

    pub fn sequence(&self) -> u64 {
        u64::from_be_bytes(self.0[8..].try_into().expect("8 bytes"))
    }

    /// Parse the 32-hex-digit form.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 32 || !text.is_ascii() {
            return None;
        }
        let mut b = [0u8; 16];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
        }
        Some(MessageId(b))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Where one produced message landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageAck {
    pub partition: u32,
    /// [`SCHEDULED_OFFSET`] for a message scheduled for later delivery: its
    /// offset is assigned when it becomes due.
    pub offset: u64,
    pub id: MessageId,
}

/// The offset in a [`MessageAck`] of a message scheduled for later delivery.
pub const SCHEDULED_OFFSET: u64 = u64::MAX;

/// How much one fetch or poll may return and how long it may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchLimits {
    pub max_messages: u32,
    pub max_bytes: u32,
    pub max_wait_ms: u32,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_messages: 500,
            max_bytes: 4 * 1024 * 1024,
            max_wait_ms: 500,
        }
    }
}

/// Messages of one partition, in offset order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchedMessages {
    pub topic: String,
    pub partition: u32,
    /// The partition's end (next offset to be written) when read.
    pub end_offset: u64,
    pub messages: Vec<Message>,
    /// Where reading continues: one past the last message read, including
    /// messages a subscription filter left out (so it can be past the last
    /// message returned).
    pub next_offset: u64,
}

/// Where a new group member starts on partitions the group has no offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StartFrom {
    /// The partition's first retained message.
    #[default]
    Earliest,
    /// The partition's end when the group's first live member joins: the
    /// broker commits it for the group before answering that join, so every
    /// message produced after it reaches the group.
    Latest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub member_id: u64,
    pub assignment: Assignment,
    /// The group name to use in later requests of this member: the group
    /// itself, or in broadcast mode `<group>%<instance>`.
    pub group: String,
}

/// The partitions a member owns in the current generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Assignment {
    pub generation: u64,
    pub partitions: Vec<TopicPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Polled {
    pub assignment: Assignment,
    pub batches: Vec<FetchedMessages>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    pub created_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicDescription {
    pub info: TopicInfo,
    pub partitions: Vec<PartitionInfo>,
    pub groups: Vec<GroupLag>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u32,
    pub start_offset: u64,
    pub end_offset: u64,
}

/// A group's committed progress on one topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLag {
    pub group: String,
    pub partitions: Vec<PartitionLag>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLag {
    pub partition: u32,
    pub committed_offset: Option<u64>,
    pub lag: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub group: String,
    pub members: u32,
    pub topics: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupDescription {
    pub group: String,
    pub generation: u64,
    pub members: Vec<MemberInfo>,
    pub offsets: Vec<GroupPartitionState>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub member_id: u64,
    pub client_addr: String,
    pub topics: Vec<String>,
    pub partitions: Vec<TopicPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPartitionState {
    pub topic: String,
    pub partition: u32,
    pub committed_offset: Option<u64>,
    pub end_offset: u64,
    pub lag: u64,
    pub owner: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_round_trips_through_text() {
        let id = MessageId::new(0xdead_beef, 123_456_789);
        let text = id.to_string();
        assert_eq!(text.len(), 32);
        let back = MessageId::parse(&text).unwrap();
        assert_eq!(back, id);
        assert_eq!(
            (back.store_id(), back.sequence()),
            (0xdead_beef, 123_456_789)
        );
        assert!(MessageId::parse("zz").is_none());
        assert!(MessageId::parse(&"g".repeat(32)).is_none());
    }

    #[test]
    fn size_counts_every_part() {
        let m = NewMessage::new(vec![0; 10])
            .with_key(vec![0; 3])
            .with_tag("ab")
            .with_header("x", "yz");
        assert_eq!(m.size_bytes(), 10 + 3 + 2 + 3);
    }
}
