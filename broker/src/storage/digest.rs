//! One hash of everything a client can observe in a store.
//!
//! Owns: [`digest`], a SHA-256 per table over its rows in key order, and one
//! over those. Two stores with equal digests serve the same topics, messages
//! (offsets, ids, keys, tags, headers, payloads, timestamps), offsets,
//! groups' durable state, acks, retries, dead letters, transactions,
//! scheduled messages, plugins and their state, tokens, ACLs, producers and
//! settings. The replication tests compare members with it; the replay test
//! compares a broker with a store rebuilt from its commands.
//!
//! What it leaves out, because it is this store's own business: where a
//! batch's bytes live (inline in its `log` row or in a segment file: the
//! batch is hashed, not the row), the `segments` table, and the store's own
//! random id and its count of commits (`meta` `store_id`, `applied_index`).

use super::db::ReadSource;
use super::segments::Segments;
use super::{batch, tables, StorageError};
use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle};
use ring::digest::{Context, SHA256};

/// The digest of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// SHA-256 (hex) over every table's name, row count and hash.
    pub total: String,
    pub tables: Vec<TableDigest>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    pub name: String,
    pub rows: u64,
    /// SHA-256 (hex) over the rows, each as length-prefixed key and value.
    pub sha256: String,
}

/// Tables hashed row by row as stored (the `log` is hashed batch by batch).
const PLAIN_TABLES: usize = 18;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes rows as length-prefixed byte strings.
struct RowHasher {
    context: Context,
    rows: u64,
}

impl RowHasher {
    fn new() -> RowHasher {
        RowHasher {
            context: Context::new(&SHA256),
            rows: 0,
        }
    }

    fn row(&mut self, parts: &[&[u8]]) {
        for part in parts {
            self.context.update(&(part.len() as u64).to_le_bytes());
            self.context.update(part);
        }
        self.rows += 1;
    }

    fn finish(self, name: &str) -> TableDigest {
        TableDigest {
            name: name.to_string(),
            rows: self.rows,
            sha256: hex(self.context.finish().as_ref()),
        }
    }
}

fn plain<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    definition: TableDefinition<K, V>,
    skip_key: impl Fn(&[u8]) -> bool,
) -> Result<TableDigest, StorageError> {
    let table = txn.open_table(definition)?;
    let mut hasher = RowHasher::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let key = k.value();
        let value = v.value();
        let key_bytes = K::as_bytes(&key);
        if skip_key(key_bytes.as_ref()) {
            continue;
        }
        hasher.row(&[key_bytes.as_ref(), V::as_bytes(&value).as_ref()]);
    }
    Ok(hasher.finish(definition.name()))
}

/// The `log`: each batch's key and bytes, read from its segment when the
/// row is a pointer.
fn log(txn: &ReadTransaction, segments: &Segments) -> Result<TableDigest, StorageError> {
    let table = txn.open_table(tables::LOG)?;
    let mut hasher = RowHasher::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        let (topic, partition, base) = k.value();
        let value = v.value();
        let key = [
            &topic.to_be_bytes()[..],
            &partition.to_be_bytes(),
            &base.to_be_bytes(),
        ]
        .concat();
        match batch::pointer(value).map_err(StorageError::Corrupt)? {
            None => hasher.row(&[&key, value]),
            Some(at) => {
                let bytes = segments.read(&at)?.ok_or_else(|| {
                    StorageError::Corrupt(format!(
                        "the segment of batch {base} of topic {topic} partition {partition} is missing"
                    ))
                })?;
                hasher.row(&[&key, &bytes]);
            }
        }
    }
    Ok(hasher.finish(tables::LOG.name()))
}

/// The digest of the store `db` (with its segment files), from one
/// consistent snapshot.
pub fn digest(db: &impl ReadSource, segments: &Segments) -> Result<Digest, StorageError> {
    let txn = db.read_txn()?;
    let none = |_: &[u8]| false;
    let local_meta = |key: &[u8]| {
        [
            tables::META_STORE_ID,
            tables::META_APPLIED_INDEX,
            tables::META_LOG_FILE,
            tables::META_LOG_END,
        ]
        .iter()
        .any(|local| key == local.as_bytes())
    };
    let mut out = vec![log(&txn, segments)?];
    let plain_tables = [
        plain(&txn, tables::PARTITIONS, none)?,
        plain(&txn, tables::TOPICS, none)?,
        plain(&txn, tables::TOPIC_RETENTION, none)?,
        plain(&txn, tables::GROUP_OFFSETS, none)?,
        plain(&txn, tables::HALF_MESSAGES, none)?,
        plain(&txn, tables::TX_OUTCOMES, none)?,
        plain(&txn, tables::RETRIES, none)?,
        plain(&txn, tables::GROUP_POLICIES, none)?,
        plain(&txn, tables::SCHEDULED, none)?,
        plain(&txn, tables::ID_INDEX, none)?,
        plain(&txn, tables::KEY_INDEX, none)?,
        plain(&txn, tables::PLUGINS, none)?,
        plain(&txn, tables::PLUGIN_COMPONENTS, none)?,
        plain(&txn, tables::PLUGIN_STATE, none)?,
        plain(&txn, tables::PLUGIN_RETRIES, none)?,
        plain(&txn, tables::TOKENS, none)?,
        plain(&txn, tables::ACLS, none)?,
        plain(&txn, tables::PRODUCERS, none)?,
    ];
    debug_assert_eq!(plain_tables.len(), PLAIN_TABLES);
    out.extend(plain_tables);
    out.push(plain(&txn, tables::META, local_meta)?);
    let mut total = Context::new(&SHA256);
    for table in &out {
        total.update(table.name.as_bytes());
        total.update(&table.rows.to_le_bytes());
        total.update(table.sha256.as_bytes());
    }
    Ok(Digest {
        total: hex(total.finish().as_ref()),
        tables: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table of `tables.rs` is hashed, except the local file layout
    /// (`segments`, `log_files`).
    #[test]
    fn the_digest_covers_every_table_but_the_file_layout() {
        let source = include_str!("tables.rs");
        let defined: Vec<&str> = source
            .split("TableDefinition::new(\"")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap())
            .collect();
        assert!(defined.len() > 20, "parsed {defined:?}");
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("t.redb")).unwrap();
        tables::create_all(&db).unwrap();
        let (segments, _) = Segments::recover(dir.path(), &db, None).unwrap();
        let digest = digest(&db, &segments).unwrap();
        let hashed: Vec<&str> = digest.tables.iter().map(|t| t.name.as_str()).collect();
        let retired: Vec<&str> = tables::RETIRED.iter().map(|t| t.name()).collect();
        for name in defined {
            assert_eq!(
                hashed.contains(&name),
                !["segments", "log_files"].contains(&name) && !retired.contains(&name),
                "table {name}: hashed {hashed:?}"
            );
        }
        // The store id and applied index are left out: an empty store
        // hashes the same whatever its random id.
        let other = tempfile::tempdir().unwrap();
        let db2 = redb::Database::create(other.path().join("t.redb")).unwrap();
        tables::create_all(&db2).unwrap();
        let (segments2, _) = Segments::recover(other.path(), &db2, None).unwrap();
        assert_eq!(digest, super::digest(&db2, &segments2).unwrap());
    }
}
