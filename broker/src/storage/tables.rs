//! The redb table layout. Changing a key or value type here is a data format
//! change.

use super::StorageError;
use redb::{Database, ReadableTable, TableDefinition};

/// (topic id, partition, base offset) → a [`super::batch::Pointer`] to the
/// batch in its segment file (the batch itself in older data directories).
pub const LOG: TableDefinition<(u32, u32, u64), &[u8]> = TableDefinition::new("log");
/// segment file number → its committed length, or [`super::segments::OPEN`]
/// while it is appended to (see [`super::segments`]). Local layout, not
/// part of the digest.
pub const LOG_FILES: TableDefinition<u64, u64> = TableDefinition::new("log_files");
/// The earlier layout: (topic id, partition, segment base offset) → 0, a
/// row per file of a partition's own sequence. Moved into [`LOG_FILES`] at
/// start-up and left empty.
pub const SEGMENTS: TableDefinition<(u32, u32, u64), u64> = TableDefinition::new("segments");
/// Tables of earlier versions, deleted at open: a batch's append time and
/// size are in its `log` row, and two more tables written in every commit
/// cost redb pages (write amplification) for nothing.
pub const RETIRED: [TableDefinition<(u32, u32, u64), u64>; 2] = [
    TableDefinition::new("batch_times"),
    TableDefinition::new("batch_bytes"),
];
/// topic id → (max age in ms, max bytes per partition), 0 meaning no limit:
/// the topic's own retention (topics without a row use the broker default).
pub const TOPIC_RETENTION: TableDefinition<u32, (u64, u64)> =
    TableDefinition::new("topic_retention");
/// (topic id, partition) → (start offset, end offset): `start..end` is stored.
pub const PARTITIONS: TableDefinition<(u32, u32), (u64, u64)> = TableDefinition::new("partitions");
/// topic name → postcard [`crate::topics::TopicMeta`].
pub const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// (group, topic id, partition) → next offset the group will consume.
pub const GROUP_OFFSETS: TableDefinition<(&str, u32, u32), u64> =
    TableDefinition::new("group_offsets");
/// transaction id → postcard [`crate::transactions::HalfRecord`]: half
/// messages, pending or discarded, invisible to consumers.
pub const HALF_MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("half_messages");
/// transaction id → postcard [`crate::transactions::OutcomeRecord`].
pub const TX_OUTCOMES: TableDefinition<u64, &[u8]> = TableDefinition::new("tx_outcomes");
/// (group, topic id, partition, offset) → postcard
/// [`crate::delivery::RetryRecord`]: messages a group will get again.
pub const RETRIES: TableDefinition<(&str, u32, u32, u64), &[u8]> = TableDefinition::new("retries");
/// group → postcard [`crate::delivery::RetryPolicy`], for groups that set one.
pub const GROUP_POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("group_policies");
/// (due time in ms, message-id sequence) → postcard
/// [`crate::storage::ScheduledRecord`]: messages waiting for their delivery time.
pub const SCHEDULED: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("scheduled");
/// base message-id sequence of a batch → (topic id, partition, base offset,
/// count): finds a message by id.
pub const ID_INDEX: TableDefinition<u64, (u32, u32, u64, u32)> = TableDefinition::new("id_index");
/// (topic id, key hash, partition, offset) → (): finds messages by key.
pub const KEY_INDEX: TableDefinition<(u32, u64, u32, u64), ()> = TableDefinition::new("key_index");
/// plugin name → postcard [`crate::command::PluginRecord`].
pub const PLUGINS: TableDefinition<&str, &[u8]> = TableDefinition::new("plugins");
/// component SHA-256 (hex) → the component's bytes, as deployed.
pub const PLUGIN_COMPONENTS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("plugin_components");
/// (plugin name, key) → value: each plugin's key-value state.
pub const PLUGIN_STATE: TableDefinition<(&str, &[u8]), &[u8]> =
    TableDefinition::new("plugin_state");
/// (plugin name, topic id, partition, offset) → (due time in ms, delivery
/// attempt): messages a plugin asked to see again.
pub const PLUGIN_RETRIES: TableDefinition<(&str, u32, u32, u64), (u64, u32)> =
    TableDefinition::new("plugin_retries");
/// token id → postcard [`crate::auth::TokenRecord`] (principal and the
/// SHA-256 of the secret; never the secret).
pub const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// principal → postcard `Vec<AclRule>`: what the principal may do.
pub const ACLS: TableDefinition<&str, &[u8]> = TableDefinition::new("acls");
/// producer id → postcard [`crate::producers::ProducerRecord`]: idempotent
/// producers, their sequences and their latest replies.
pub const PRODUCERS: TableDefinition<u64, &[u8]> = TableDefinition::new("producers");
/// Broker-wide counters.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Key in [`META`]: the next topic id to hand out (ids are never reused).
pub const META_NEXT_TOPIC_ID: &str = "next_topic_id";
/// Key in [`META`]: the next message-id sequence.
pub const META_NEXT_MESSAGE_SEQUENCE: &str = "next_message_sequence";
/// Key in [`META`]: the next transaction id.
pub const META_NEXT_TX_ID: &str = "next_tx_id";
/// Key in [`META`]: the next producer id to hand out (never reused).
pub const META_NEXT_PRODUCER_ID: &str = "next_producer_id";
/// Key in [`META`]: how many write transactions that applied commands this
/// store has committed. Local bookkeeping (it depends on how commands
/// shared commits), kept out of the digest; a command recording is cut back
/// to it at open.
pub const META_APPLIED_INDEX: &str = "applied_index";
/// Keys in [`META`]: the segment file and position where the last
/// committed frame of the command log ends. Once a checkpoint made them
/// durable, start-up applies again the frames after that point
/// (`storage::frames`). Local bookkeeping, kept out of the digest.
pub const META_LOG_FILE: &str = "log_file";
pub const META_LOG_END: &str = "log_end";
/// Key in [`META`]: this store's random id, the first half of message ids.
pub const META_STORE_ID: &str = "store_id";

/// Create every table so read transactions can open them.
pub fn create_all(db: &Database) -> Result<(), StorageError> {
    let txn = db.begin_write()?;
    txn.open_table(LOG)?;
    txn.open_table(SEGMENTS)?;
    txn.open_table(LOG_FILES)?;
    for retired in RETIRED {
        txn.delete_table(retired)?;
    }
    txn.open_table(TOPIC_RETENTION)?;
    txn.open_table(PARTITIONS)?;
    txn.open_table(TOPICS)?;
    txn.open_table(GROUP_OFFSETS)?;
    txn.open_table(HALF_MESSAGES)?;
    txn.open_table(RETRIES)?;
    txn.open_table(SCHEDULED)?;
    txn.open_table(ID_INDEX)?;
    txn.open_table(KEY_INDEX)?;
    txn.open_table(GROUP_POLICIES)?;
    txn.open_table(TX_OUTCOMES)?;
    txn.open_table(PLUGINS)?;
    txn.open_table(TOKENS)?;
    txn.open_table(ACLS)?;
    txn.open_table(PLUGIN_COMPONENTS)?;
    txn.open_table(PLUGIN_STATE)?;
    txn.open_table(PLUGIN_RETRIES)?;
    txn.open_table(PRODUCERS)?;
    let mut meta = txn.open_table(META)?;
    if meta.get(META_STORE_ID)?.is_none() {
        // Never 0, so an id from this store is never all zeros.
        meta.insert(META_STORE_ID, rand::random::<u64>() | 1)?;
    }
    drop(meta);
    txn.commit()?;
    Ok(())
}
