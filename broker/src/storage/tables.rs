//! The redb table layout. Changing a key or value type here is a data format
//! change.

use super::StorageError;
use redb::{Database, TableDefinition};

/// (topic id, partition, base offset) → a stored batch (see [`super::batch`]).
pub const LOG: TableDefinition<(u32, u32, u64), &[u8]> = TableDefinition::new("log");
/// (topic id, partition) → (start offset, end offset): `start..end` is stored.
pub const PARTITIONS: TableDefinition<(u32, u32), (u64, u64)> = TableDefinition::new("partitions");
/// topic name → postcard [`crate::topics::TopicMeta`].
pub const TOPICS: TableDefinition<&str, &[u8]> = TableDefinition::new("topics");
/// (group, topic id, partition) → next offset the group will consume.
pub const GROUP_OFFSETS: TableDefinition<(&str, u32, u32), u64> =
    TableDefinition::new("group_offsets");
/// Broker-wide counters.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Key in [`META`]: the next topic id to hand out (ids are never reused).
pub const META_NEXT_TOPIC_ID: &str = "next_topic_id";

/// Create every table so read transactions can open them.
pub fn create_all(db: &Database) -> Result<(), StorageError> {
    let txn = db.begin_write()?;
    txn.open_table(LOG)?;
    txn.open_table(PARTITIONS)?;
    txn.open_table(TOPICS)?;
    txn.open_table(GROUP_OFFSETS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(())
}
