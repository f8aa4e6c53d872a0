//! The commands of the deterministic core: every change to what clients can
//! observe, as a value that can be stored, sent and applied again.
//!
//! Owns: [`Command`] and the records commands carry (a plugin's stored
//! record here; tokens in `auth`, retry records in `delivery`, producers'
//! claims in `producers`), and their encoding: [`encode`] writes
//! [`COMMAND_FORMAT_VERSION`] then the value in postcard (serde's compact,
//! varint-based binary format); [`decode`] refuses other versions.
//!
//! Invariants: a command holds ids and names, never live objects, and every
//! input that is not a function of the store and the command (wall time,
//! random ids, a leader's choices) is decided by whoever builds it: nothing
//! here or in the writer reads the clock or draws a random number. Offsets,
//! message-id sequences, topic ids, transaction ids and producer ids are
//! functions of the store (its counters in `meta` and its partitions' ends),
//! so they come out the same on every store the commands are applied to.
//! Work that changes no observable state (moving batches into segment
//! files) is not a command: see `storage::LocalOp`.

use crate::auth::TokenRecord;
use crate::delivery::{RetryPolicy, RetryRecord};
use crate::producers::{Claim, Slot};
use crate::transactions::TxSource;
use msmq_protocol::{NewMessage, PluginSpec};
use serde::{Deserialize, Serialize};

/// The encoding's version, the first byte of every encoded command batch.
pub const COMMAND_FORMAT_VERSION: u8 = 1;

/// A topic as a command names it: its id (never reused) and, for errors,
/// its name. A command for a topic deleted meanwhile, or re-created under
/// the same name, is refused as an unknown topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicRef {
    pub id: u32,
    pub name: String,
}

impl TopicRef {
    pub fn of(topic: &crate::topics::Topic) -> TopicRef {
        TopicRef {
            id: topic.id(),
            name: topic.name.clone(),
        }
    }
}

/// A change to what clients can observe. Applying a command reads only the
/// store and the command: the same commands, applied in the same order to
/// two empty stores, leave them with the same observable state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    CreateTopic {
        name: String,
        partitions: u32,
        created_at_ms: u64,
    },
    DeleteTopic {
        name: String,
    },
    /// Append batches (one per partition) and store scheduled messages
    /// (partition, due ms, message), atomically.
    Append {
        topic: TopicRef,
        appends: Vec<PartitionAppend>,
        scheduled: Vec<(u32, u64, NewMessage)>,
        /// For a sequenced produce: the producer's claim and each message's
        /// slot (to remember where they went).
        producer: Option<(Claim, Vec<Slot>)>,
    },
    /// Move up to `max` scheduled messages due at `now_ms` into their logs.
    ReleaseDue {
        now_ms: u64,
        max: usize,
    },
    /// Store group offsets: (topic id, partition, next offset).
    CommitOffsets {
        group: String,
        offsets: Vec<(u32, u32, u64)>,
    },
    /// Store group offsets only where the group has none yet: how a
    /// `latest` start is pinned without overwriting a member's commit.
    PinOffsets {
        group: String,
        offsets: Vec<(u32, u32, u64)>,
    },
    /// Store half messages, one transaction each, invisible to consumers.
    StoreHalf {
        topic: TopicRef,
        producer_group: String,
        /// (partition, message) per transaction.
        halves: Vec<(u32, NewMessage)>,
        created_at_ms: u64,
        first_check_at_ms: u64,
        /// For a sequenced `SendHalf`.
        producer: Option<Claim>,
    },
    /// Give out a new producer id (`None`) or the next epoch of one the
    /// principal holds; producer ids past their idle expiry go first.
    InitProducer {
        producer_id: Option<u64>,
        principal: String,
        now_ms: u64,
        idle_expiry_ms: u64,
        producers_max: u32,
    },
    /// Remove producer records idle for longer than `idle_expiry_ms`.
    ExpireProducers {
        now_ms: u64,
        idle_expiry_ms: u64,
    },
    /// Commit or roll back a transaction.
    EndTransaction {
        tx_id: u64,
        /// The group the requester speaks for; `None` for an operator.
        producer_group: Option<String>,
        commit: bool,
        source: TxSource,
        now_ms: u64,
    },
    /// Count a check-back before it is sent and schedule the next one.
    CountCheck {
        tx_id: u64,
        next_check_at_ms: u64,
    },
    /// Roll back after `check_max` unanswered checks, keeping the record.
    Discard {
        tx_id: u64,
        now_ms: u64,
    },
    /// Put a discarded transaction back to pending with a fresh check count.
    Resume {
        tx_id: u64,
        next_check_at_ms: u64,
    },
    /// Per-message acknowledgement bookkeeping of one group, atomically:
    /// retries to store or update, retries to forget, dead letters to append.
    Settle {
        group: String,
        retry_puts: Vec<((u32, u32, u64), RetryRecord)>,
        retry_deletes: Vec<(u32, u32, u64)>,
        dead_letters: Vec<(TopicRef, NewMessage)>,
        now_ms: u64,
    },
    /// Retention: drop whole batches of a partition below `before`, at most
    /// `batches_max` of them, oldest first, and move its start past them.
    Trim {
        topic: TopicRef,
        partition: u32,
        before: u64,
        batches_max: usize,
    },
    /// Set a topic's retention: (max age ms, max bytes per partition), 0 =
    /// no limit; `None` returns it to the broker default.
    SetRetention {
        topic: TopicRef,
        retention: Option<(u64, u64)>,
    },
    /// Store a token (its secret's hash), or with `None` revoke it.
    PutToken {
        id: String,
        record: Option<TokenRecord>,
    },
    /// Replace a principal's ACL rules (empty: remove them).
    SetAcl {
        principal: String,
        rules: Vec<msmq_protocol::AclRule>,
    },
    /// Store a group's retry policy.
    SetPolicy {
        group: String,
        policy: RetryPolicy,
    },
    /// Store a plugin's record (deploy, upgrade, pause, resume), with its
    /// component when that is new. Components no record uses are dropped.
    PluginPut {
        record: Box<PluginRecord>,
        component: Option<Vec<u8>>,
    },
    /// Pause (`Some(why)`, `""` for an operator) or resume a plugin, only if
    /// it is still the incarnation the caller knows; the rest of the stored
    /// record (its current version) is kept.
    PluginSetPaused {
        name: String,
        incarnation: u64,
        paused: Option<String>,
    },
    /// Forget a plugin: record, state, retries and its group's offsets.
    PluginRemove {
        name: String,
        group: String,
    },
    /// Everything one plugin batch did, atomically.
    PluginCommit(Box<PluginCommit>),
    /// Forget outcomes resolved before `resolved_before_ms`, oldest
    /// transaction ids first, at most `rows_max`.
    PruneOutcomes {
        resolved_before_ms: u64,
        rows_max: u64,
    },
}

/// A plugin retry: (topic id, partition, offset) → (due ms, attempt).
pub type PluginRetryPut = ((u32, u32, u64), (u64, u32));

/// The effects of one plugin batch: its group's progress, its state writes,
/// the messages it published, its retries and its dead letters. Refused
/// (nothing written) when the plugin was removed or redeployed from scratch
/// since the batch started (`incarnation` differs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginCommit {
    pub plugin: String,
    pub incarnation: u64,
    pub group: String,
    /// (topic id, partition, next offset).
    pub offsets: Vec<(u32, u32, u64)>,
    /// key → new value, or `None` to delete.
    pub state: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub publishes: Vec<(TopicRef, Vec<PartitionAppend>)>,
    pub retry_puts: Vec<PluginRetryPut>,
    pub retry_deletes: Vec<(u32, u32, u64)>,
    pub dead_letters: Vec<(TopicRef, NewMessage)>,
    pub now_ms: u64,
}

/// One stored batch for one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionAppend {
    pub partition: u32,
    pub count: u32,
    /// (index in the batch, key hash) of keyed messages, for the key index.
    pub key_hashes: Vec<(u32, u64)>,
    /// The encoded batch (`storage::batch::encode`); the writer sets its
    /// message-id sequence when it applies the command.
    pub value: Vec<u8>,
}

impl Command {
    /// Roughly how many bytes applying it writes (for group-commit sizing).
    pub fn bytes(&self) -> usize {
        match self {
            Command::Append {
                appends, scheduled, ..
            } => {
                appends.iter().map(|a| a.value.len()).sum::<usize>()
                    + scheduled
                        .iter()
                        .map(|(_, _, m)| m.size_bytes())
                        .sum::<usize>()
            }
            Command::StoreHalf { halves, .. } => halves.iter().map(|(_, m)| m.size_bytes()).sum(),
            Command::PluginPut { component, .. } => component.as_ref().map_or(64, |c| c.len()),
            Command::PluginCommit(c) => {
                c.publishes
                    .iter()
                    .flat_map(|(_, a)| a.iter().map(|a| a.value.len()))
                    .sum::<usize>()
                    + c.state
                        .iter()
                        .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
                        .sum::<usize>()
                    + 64
            }
            Command::Settle { dead_letters, .. } => {
                dead_letters
                    .iter()
                    .map(|(_, m)| m.size_bytes())
                    .sum::<usize>()
                    + 64
            }
            _ => 64,
        }
    }
}

/// Encode commands (one group commit's worth) in the versioned format.
pub fn encode(commands: &[Command]) -> Vec<u8> {
    let out = vec![COMMAND_FORMAT_VERSION];
    postcard::to_extend(commands, out).expect("encoding to a Vec cannot fail")
}

/// [`encode`] for commands held by reference (the writer records what it
/// is about to apply); the bytes are the same.
pub fn encode_refs(commands: &[&Command]) -> Vec<u8> {
    let out = vec![COMMAND_FORMAT_VERSION];
    postcard::to_extend(commands, out).expect("encoding to a Vec cannot fail")
}

/// Why encoded commands could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("no bytes: an encoded command batch starts with its format version")]
    Empty,
    #[error("command format version {0}; this broker reads version {COMMAND_FORMAT_VERSION}")]
    Version(u8),
    #[error("malformed commands: {0}")]
    Malformed(String),
}

/// Decode what [`encode`] wrote.
pub fn decode(bytes: &[u8]) -> Result<Vec<Command>, DecodeError> {
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != COMMAND_FORMAT_VERSION {
        return Err(DecodeError::Version(version));
    }
    postcard::from_bytes(body).map_err(|e| DecodeError::Malformed(e.to_string()))
}

/// A deployed plugin as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub spec: PluginSpec,
    pub version: u32,
    pub component_sha256: String,
    pub component_bytes: u64,
    /// `None`: running. `Some("")`: paused by an operator. `Some(why)`:
    /// paused by the broker.
    pub paused: Option<String>,
    pub deployed_at_ms: u64,
    /// Random, fixed at first deploy: a batch started before a remove and
    /// redeploy cannot commit into the new plugin.
    pub incarnation: u64,
}

impl PluginRecord {
    pub fn status(&self) -> String {
        match &self.paused {
            None => "running".into(),
            Some(why) if why.is_empty() => "paused".into(),
            Some(why) => format!("paused: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Command> {
        vec![
            Command::CreateTopic {
                name: "payments".into(),
                partitions: 4,
                created_at_ms: 1_700_000_000_000,
            },
            Command::Append {
                topic: TopicRef {
                    id: 1,
                    name: "payments".into(),
                },
                appends: vec![PartitionAppend {
                    partition: 2,
                    count: 1,
                    key_hashes: vec![(0, 42)],
                    value: vec![1, 2, 3],
                }],
                scheduled: vec![(0, 99, NewMessage::default())],
                producer: None,
            },
            Command::Settle {
                group: "billing".into(),
                retry_puts: vec![],
                retry_deletes: vec![(1, 2, 3)],
                dead_letters: vec![],
                now_ms: 5,
            },
        ]
    }

    #[test]
    fn commands_read_back_as_written() {
        let commands = sample();
        let bytes = encode(&commands);
        assert_eq!(bytes[0], COMMAND_FORMAT_VERSION);
        assert_eq!(decode(&bytes).unwrap(), commands);
    }

    #[test]
    fn another_version_or_garbage_is_refused_not_misread() {
        let mut bytes = encode(&sample());
        bytes[0] = COMMAND_FORMAT_VERSION + 1;
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Version(COMMAND_FORMAT_VERSION + 1))
        );
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        let mut cut = encode(&sample());
        cut.truncate(cut.len() - 2);
        assert!(matches!(decode(&cut), Err(DecodeError::Malformed(_))));
    }
}
