//! Read paths. Each call opens its own redb read transaction (a consistent
//! snapshot) and never blocks the writer. These are blocking calls: run them
//! on a blocking thread from async code.

use super::segments::Segments;
use super::ReadSource;
use super::{batch, tables, StorageError};
use msmq_protocol::Message;
use redb::ReadableTable;

/// Read messages of one partition from offset `from` (inclusive) up to `end`
/// (exclusive, the committed end), stopping at `max_messages` or once
/// `max_bytes` of payload is reached. The first message is always returned
/// even when it alone exceeds `max_bytes`, so a consumer can never be stuck.
#[allow(clippy::too_many_arguments)]
pub fn read_partition(
    db: &impl ReadSource,
    segments: &Segments,
    store_id: u64,
    topic_id: u32,
    partition: u32,
    from: u64,
    end: u64,
    max_messages: usize,
    max_bytes: usize,
) -> Result<Vec<Message>, StorageError> {
    let mut out = Vec::new();
    if from >= end || max_messages == 0 {
        return Ok(out);
    }
    let txn = db.read_txn()?;
    let log = txn.open_table(tables::LOG)?;
    // The batch holding `from` is the last one whose base is <= from.
    let first_base = log
        .range((topic_id, partition, 0)..=(topic_id, partition, from))?
        .next_back()
        .transpose()?
        .map(|(k, _)| k.value().2)
        .unwrap_or(from);
    let mut bytes = 0usize;
    let mut full = false;
    for entry in log.range((topic_id, partition, first_base)..(topic_id, partition, end))? {
        let (key, value) = entry?;
        let base = key.value().2;
        let value = value.value();
        let pointed;
        let records = match batch::pointer(value).map_err(StorageError::Corrupt)? {
            None => value,
            Some(at) => match segments.read(&at)? {
                Some(bytes) => {
                    pointed = bytes;
                    &pointed
                }
                None => {
                    // Deleted since this snapshot: fine if retention has
                    // trimmed the batch by now, corruption if not.
                    let count = batch::header(value).map_err(StorageError::Corrupt)?.count;
                    let now = db.read_txn()?;
                    let start = now
                        .open_table(tables::PARTITIONS)?
                        .get((topic_id, partition))?
                        .map(|v| v.value().0);
                    if start.is_some_and(|start| start < base + count as u64) {
                        return Err(StorageError::Corrupt(format!(
                            "the segment of the batch at offset {base} of partition {partition} is missing"
                        )));
                    }
                    break;
                }
            },
        };
        batch::decode_from(records, store_id, base, from, |m| {
            if m.offset >= end {
                full = true;
                return false;
            }
            bytes += m.payload.len();
            out.push(m);
            full = out.len() >= max_messages || bytes >= max_bytes;
            !full
        })
        .map_err(StorageError::Corrupt)?;
        if full {
            break;
        }
    }
    Ok(out)
}

/// The committed offset of a group on one partition.
pub fn group_offset(
    db: &impl ReadSource,
    group: &str,
    topic_id: u32,
    partition: u32,
) -> Result<Option<u64>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::GROUP_OFFSETS)?;
    Ok(table.get((group, topic_id, partition))?.map(|v| v.value()))
}

/// Every committed group offset: (group, topic id, partition, offset).
pub fn all_group_offsets(
    db: &impl ReadSource,
) -> Result<Vec<(String, u32, u32, u64)>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::GROUP_OFFSETS)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let (group, topic_id, partition) = k.value();
        out.push((group.to_string(), topic_id, partition, v.value()));
    }
    Ok(out)
}

/// Decode a stored postcard record; `what` names it in the error.
fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    what: impl std::fmt::Display,
) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

/// One postcard record of a table keyed by u64.
fn get_record<T: serde::de::DeserializeOwned>(
    db: &impl ReadSource,
    table: redb::TableDefinition<u64, &[u8]>,
    key: u64,
    what: &str,
) -> Result<Option<T>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(table)?;
    let value = table.get(key)?;
    value
        .map(|v| decode(v.value(), format_args!("{what} {key}")))
        .transpose()
}

/// One half message by transaction id.
pub fn half_message(
    db: &impl ReadSource,
    tx_id: u64,
) -> Result<Option<crate::transactions::HalfRecord>, StorageError> {
    get_record(db, tables::HALF_MESSAGES, tx_id, "half message")
}

/// Half messages, discarded or pending, oldest first, at most `limit`.
pub fn half_messages(
    db: &impl ReadSource,
    discarded: bool,
    limit: usize,
) -> Result<Vec<(u64, crate::transactions::HalfRecord)>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::HALF_MESSAGES)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let record: crate::transactions::HalfRecord =
            decode(v.value(), format_args!("half message {}", k.value()))?;
        if record.discarded == discarded {
            out.push((k.value(), record));
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

/// How a resolved transaction ended, if its outcome is still kept.
pub fn tx_outcome(
    db: &impl ReadSource,
    tx_id: u64,
) -> Result<Option<crate::transactions::OutcomeRecord>, StorageError> {
    get_record(db, tables::TX_OUTCOMES, tx_id, "outcome")
}

/// The first offset of a partition whose message was appended at or after
/// `timestamp_ms`; `None` when every stored message is older.
pub fn offset_for_time(
    db: &impl ReadSource,
    topic_id: u32,
    partition: u32,
    timestamp_ms: u64,
) -> Result<Option<u64>, StorageError> {
    let txn = db.read_txn()?;
    let log = txn.open_table(tables::LOG)?;
    for entry in log.range((topic_id, partition, 0)..=(topic_id, partition, u64::MAX))? {
        let (key, row) = entry?;
        if appended_ms(row.value())? >= timestamp_ms {
            return Ok(Some(key.value().2));
        }
    }
    Ok(None)
}

/// Every stored retry: (group, (topic id, partition, offset), record).
#[allow(clippy::type_complexity)]
pub fn all_retries(
    db: &impl ReadSource,
) -> Result<Vec<(String, (u32, u32, u64), crate::delivery::RetryRecord)>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::RETRIES)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let (group, t, p, o) = k.value();
        match postcard::from_bytes(v.value()) {
            Ok(record) => out.push((group.to_string(), (t, p, o), record)),
            Err(e) => tracing::error!(%group, topic_id = t, partition = p, offset = o, error = %e,
                "unreadable retry record skipped"),
        }
    }
    Ok(out)
}

/// A group's stored retry policy.
pub fn group_policy(
    db: &impl ReadSource,
    group: &str,
) -> Result<Option<crate::delivery::RetryPolicy>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::GROUP_POLICIES)?;
    table
        .get(group)?
        .map(|v| decode(v.value(), format_args!("policy of group {group}")))
        .transpose()
}

/// Where the message with id sequence `sequence` is: (topic id, partition, offset).
pub fn locate_by_sequence(
    db: &impl ReadSource,
    sequence: u64,
) -> Result<Option<(u32, u32, u64)>, StorageError> {
    let txn = db.read_txn()?;
    let index = txn.open_table(tables::ID_INDEX)?;
    let found = index
        .range(..=sequence)?
        .next_back()
        .transpose()?
        .and_then(|(k, v)| {
            let base_sequence = k.value();
            let (topic_id, partition, base_offset, count) = v.value();
            (sequence < base_sequence + count as u64).then_some((
                topic_id,
                partition,
                base_offset + (sequence - base_sequence),
            ))
        });
    Ok(found)
}

/// (partition, offset) of messages of a topic whose key hashes to `hash`,
/// at most `limit`, oldest first per partition.
pub fn locate_by_key_hash(
    db: &impl ReadSource,
    topic_id: u32,
    hash: u64,
    limit: usize,
) -> Result<Vec<(u32, u64)>, StorageError> {
    let txn = db.read_txn()?;
    let index = txn.open_table(tables::KEY_INDEX)?;
    let mut out = Vec::new();
    for entry in index.range((topic_id, hash, 0, 0)..=(topic_id, hash, u32::MAX, u64::MAX))? {
        let (k, _) = entry?;
        let (_, _, partition, offset) = k.value();
        out.push((partition, offset));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// Every deployed plugin's record.
pub fn plugin_records(
    db: &impl ReadSource,
) -> Result<Vec<crate::command::PluginRecord>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::PLUGINS)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.push(decode(v.value(), format_args!("plugin {}", k.value()))?);
    }
    Ok(out)
}

/// A stored plugin component by its SHA-256 (hex).
pub fn plugin_component(
    db: &impl ReadSource,
    sha256: &str,
) -> Result<Option<Vec<u8>>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::PLUGIN_COMPONENTS)?;
    Ok(table.get(sha256)?.map(|v| v.value().to_vec()))
}

/// State entries: (key, value).
pub type StateEntries = Vec<(Vec<u8>, Vec<u8>)>;

/// Up to `limit` state entries of `plugin` whose key starts with `prefix`,
/// in key order, after `start_after` when given.
pub fn plugin_state_scan(
    txn: &redb::ReadTransaction,
    plugin: &str,
    prefix: &[u8],
    start_after: Option<&[u8]>,
    limit: usize,
) -> Result<StateEntries, StorageError> {
    let table = txn.open_table(tables::PLUGIN_STATE)?;
    let from: &[u8] = match start_after {
        Some(after) if after >= prefix => after,
        _ => prefix,
    };
    let mut out = Vec::new();
    for entry in table.range((plugin, from)..)? {
        if out.len() >= limit {
            break;
        }
        let (k, v) = entry?;
        let (owner, key) = k.value();
        if owner != plugin || !key.starts_with(prefix) {
            break;
        }
        if start_after.is_some_and(|after| key <= after) {
            continue;
        }
        out.push((key.to_vec(), v.value().to_vec()));
    }
    Ok(out)
}

/// The plugin-state table open for many reads: opening it per key costs
/// about as much as the read.
pub struct PluginStateReader(redb::ReadOnlyTable<(&'static str, &'static [u8]), &'static [u8]>);

impl PluginStateReader {
    pub fn open(txn: &redb::ReadTransaction) -> Result<Self, StorageError> {
        Ok(PluginStateReader(txn.open_table(tables::PLUGIN_STATE)?))
    }

    /// One state value of `plugin`.
    pub fn get(&self, plugin: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.0.get((plugin, key))?.map(|v| v.value().to_vec()))
    }
}

/// A plugin's pending retries: ((topic id, partition, offset), (due ms, attempt)).
#[allow(clippy::type_complexity)]
pub fn plugin_retries(
    db: &impl ReadSource,
    plugin: &str,
) -> Result<Vec<((u32, u32, u64), (u64, u32))>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::PLUGIN_RETRIES)?;
    let mut out = Vec::new();
    for entry in table.range((plugin, 0, 0, 0)..=(plugin, u32::MAX, u32::MAX, u64::MAX))? {
        let (k, v) = entry?;
        let (_, t, p, o) = k.value();
        out.push(((t, p, o), v.value()));
    }
    Ok(out)
}

/// A topic's own retention: (max age ms, max bytes per partition), 0 = no
/// limit; `None` when it uses the broker default.
pub fn topic_retention(
    db: &impl ReadSource,
    topic_id: u32,
) -> Result<Option<(u64, u64)>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::TOPIC_RETENTION)?;
    Ok(table.get(topic_id)?.map(|v| v.value()))
}

/// An idempotent producer's record.
pub fn producer(
    db: &impl ReadSource,
    producer_id: u64,
) -> Result<Option<crate::producers::ProducerRecord>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(tables::PRODUCERS)?;
    match table.get(producer_id)? {
        Some(v) => postcard::from_bytes(v.value())
            .map(Some)
            .map_err(|e| StorageError::Corrupt(format!("producer record: {e}"))),
        None => Ok(None),
    }
}

/// When a log row's batch was appended.
fn appended_ms(row: &[u8]) -> Result<u64, StorageError> {
    Ok(batch::header(row)
        .map_err(StorageError::Corrupt)?
        .timestamp_ms)
}

/// Where retention moves a partition's start: the base of the oldest batch
/// to keep, given batches appended before `cutoff_ms` expire (0: no age
/// limit) and at most `max_bytes` (0: no size limit) of batches are kept.
/// Returns `start` when nothing expires.
pub fn retention_start(
    db: &impl ReadSource,
    topic_id: u32,
    partition: u32,
    start: u64,
    end: u64,
    cutoff_ms: u64,
    max_bytes: u64,
) -> Result<u64, StorageError> {
    let txn = db.read_txn()?;
    let log = txn.open_table(tables::LOG)?;
    let mut keep_from = start;
    if cutoff_ms > 0 {
        keep_from = end;
        for entry in log.range((topic_id, partition, start)..(topic_id, partition, end))? {
            let (k, row) = entry?;
            if appended_ms(row.value())? >= cutoff_ms {
                keep_from = k.value().2;
                break;
            }
        }
    }
    if max_bytes > 0 {
        let mut kept = 0u64;
        for entry in log
            .range((topic_id, partition, start)..(topic_id, partition, end))?
            .rev()
        {
            let (k, row) = entry?;
            kept += batch::stored_bytes(row.value()).map_err(StorageError::Corrupt)?;
            if kept > max_bytes {
                // This batch does not fit: keep from the next one on.
                let base = k.value().2;
                let next = log
                    .range((topic_id, partition, base + 1)..(topic_id, partition, end))?
                    .next()
                    .transpose()?
                    .map(|(k, _)| k.value().2)
                    .unwrap_or(end);
                keep_from = keep_from.max(next);
                break;
            }
        }
    }
    Ok(keep_from.max(start))
}

/// Every stored token: (id, record).
pub fn tokens(
    db: &impl ReadSource,
) -> Result<Vec<(String, crate::auth::TokenRecord)>, StorageError> {
    all_by_name(db, tables::TOKENS, "token")
}

/// Every principal's ACL rules.
pub fn acls(
    db: &impl ReadSource,
) -> Result<Vec<(String, Vec<msmq_protocol::AclRule>)>, StorageError> {
    all_by_name(db, tables::ACLS, "ACL of")
}

/// Every record of a name-keyed table, decoded.
fn all_by_name<T: serde::de::DeserializeOwned>(
    db: &impl ReadSource,
    table: redb::TableDefinition<&str, &[u8]>,
    what: &str,
) -> Result<Vec<(String, T)>, StorageError> {
    let txn = db.read_txn()?;
    let table = txn.open_table(table)?;
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.push((
            k.value().to_string(),
            decode(v.value(), format_args!("{what} {}", k.value()))?,
        ));
    }
    Ok(out)
}
