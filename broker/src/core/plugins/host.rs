//! What a plugin instance sees of the broker: the host functions of the
//! `msmq:plugin/host` interface, backed by one batch's pending effects.
//!
//! Owns: [`HostState`], the data of one plugin `Store`.
//!
//! Invariants:
//! - Nothing a host function does is visible outside the plugin until the
//!   runner commits the batch: state writes go to an overlay that reads see
//!   first, publishes are buffered. A failed batch drops both.
//! - A plugin publishes only to the topics it was deployed with.
//! - Memory growth past the plugin's limit traps the call.

use crate::storage::read;
use crate::storage::ReadSource;
use crate::topics::TopicRegistry;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

wasmtime::component::bindgen!({
    world: "consumer",
    path: "../wit",
    // A failed storage read, malformed packed keys, or an answer the
    // plugin's memory could not hold have no error in the WIT signature:
    // they trap the call.
    imports: {
        "msmq:plugin/host.state-get": trappable,
        "msmq:plugin/host.state-get-many": trappable,
        "msmq:plugin/host.state-get-packed": trappable,
    },
});

/// Bindings of the `packed-consumer` world: its own exports, the same
/// `types` and `host` interfaces (one `Host` implementation serves both).
pub mod packed {
    wasmtime::component::bindgen!({
        world: "packed-consumer",
        path: "../wit",
        with: {
            "msmq:plugin/types": super::msmq::plugin::types,
            "msmq:plugin/host": super::msmq::plugin::host,
        },
    });
}

pub use msmq::plugin::types::{
    ByteStrings, FlatStrings, Header, HostError, LogLevel, Message, MessageId, NewMessage,
    PackedBatch, PackedOutcomes, PackedValues,
};

/// Longest state key a plugin may write.
pub const STATE_KEY_BYTES_MAX: usize = 1024;
/// Largest state value a plugin may write.
pub const STATE_VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Most bytes of state writes and publishes one batch may leave behind.
pub const BATCH_EFFECT_BYTES_MAX: usize = 32 * 1024 * 1024;
/// What each publish, state write or delete costs against
/// [`BATCH_EFFECT_BYTES_MAX`] beyond its own bytes: the broker's bookkeeping
/// of it, so even empty entries are bounded.
pub const EFFECT_ENTRY_OVERHEAD_BYTES: usize = 64;
/// Longest log line kept from a plugin.
pub const LOG_LINE_BYTES_MAX: usize = 4096;
/// Most entries one `state-scan` returns.
pub const STATE_SCAN_ENTRIES_MAX: u32 = 10_000;

/// The data of one plugin's `Store`.
pub struct HostState {
    pub plugin: Arc<str>,
    db: Arc<crate::storage::db::Db>,
    registry: Arc<TopicRegistry>,
    /// The broker's clock: `now-ms` reads it.
    clock: crate::clock::Clock,
    allowed_topics: HashSet<String>,
    message_bytes_max: usize,
    /// A snapshot for this batch's state reads, opened on first use.
    snapshot: Option<redb::ReadTransaction>,
    /// This batch's state writes: key → value, `None` for a delete.
    pub overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// This batch's publishes.
    pub publishes: Vec<(String, msmq_protocol::NewMessage)>,
    effect_bytes: usize,
    /// Refused publishes and state writes of this batch.
    pub refusals: u64,
    pub memory: MemoryLimiter,
    /// The empty WASI of this instance ([`super::wasi`]).
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime_wasi::ResourceTable,
    /// Where its stdout, stderr and error logs go.
    pub output: super::wasi::PluginOutput,
}

impl wasmtime_wasi::WasiView for HostState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and tables, and remembers the current size.
pub struct MemoryLimiter {
    pub limit_bytes: usize,
    pub current_bytes: usize,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit_bytes {
            return Err(wasmtime::Error::msg(format!(
                "plugin memory limit of {} reached (it asked for {})",
                bytesize::ByteSize(self.limit_bytes as u64),
                bytesize::ByteSize(desired as u64)
            )));
        }
        self.current_bytes = desired;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // A table element is at most a pointer pair; count it against memory.
        Ok(desired.saturating_mul(16) <= self.limit_bytes)
    }
}

impl HostState {
    pub fn new(
        plugin: Arc<str>,
        db: Arc<crate::storage::db::Db>,
        registry: Arc<TopicRegistry>,
        clock: crate::clock::Clock,
        allowed_topics: HashSet<String>,
        message_bytes_max: usize,
        memory_bytes_max: usize,
    ) -> Self {
        let output = super::wasi::PluginOutput::new(plugin.clone());
        HostState {
            wasi: super::wasi::empty_wasi(&output),
            table: wasmtime_wasi::ResourceTable::new(),
            output,
            plugin,
            db,
            registry,
            clock,
            allowed_topics,
            message_bytes_max,
            snapshot: None,
            overlay: BTreeMap::new(),
            publishes: Vec::new(),
            effect_bytes: 0,
            refusals: 0,
            memory: MemoryLimiter {
                limit_bytes: memory_bytes_max,
                current_bytes: 0,
            },
        }
    }

    /// Forget the pending effects and the read snapshot (after a commit or
    /// a failure).
    pub fn reset_batch(&mut self) {
        self.snapshot = None;
        self.overlay.clear();
        self.publishes.clear();
        self.effect_bytes = 0;
        self.refusals = 0;
    }

    /// Take the batch's effects: (state writes, publishes).
    #[allow(clippy::type_complexity)]
    pub fn take_effects(
        &mut self,
    ) -> (
        Vec<(Vec<u8>, Option<Vec<u8>>)>,
        Vec<(String, msmq_protocol::NewMessage)>,
    ) {
        let state = std::mem::take(&mut self.overlay).into_iter().collect();
        let publishes = std::mem::take(&mut self.publishes);
        self.reset_batch();
        (state, publishes)
    }

    fn snapshot(&mut self) -> Option<&redb::ReadTransaction> {
        if self.snapshot.is_none() {
            match self.db.read_txn() {
                Ok(txn) => self.snapshot = Some(txn),
                Err(e) => {
                    tracing::error!(plugin = %self.plugin, error = %e, "state read failed");
                    return None;
                }
            }
        }
        self.snapshot.as_ref()
    }

    fn charge(&mut self, bytes: usize) -> Result<(), HostError> {
        let bytes = bytes + EFFECT_ENTRY_OVERHEAD_BYTES;
        if self.effect_bytes + bytes > BATCH_EFFECT_BYTES_MAX {
            self.refusals += 1;
            return Err(HostError::TooLarge(format!(
                "this batch's state writes and publishes would exceed {BATCH_EFFECT_BYTES_MAX} bytes"
            )));
        }
        self.effect_bytes += bytes;
        Ok(())
    }

    /// The state table of this batch's snapshot, opened for reading. A
    /// storage error traps the call: answering "missing" would let the
    /// plugin compute on a wrong value (a balance of 0), and a trap retries
    /// the batch.
    fn reader(&mut self, call: &str) -> wasmtime::Result<read::PluginStateReader> {
        let failed = |e: &dyn std::fmt::Display| {
            wasmtime::Error::msg(format!("{call}: state read failed: {e}"))
        };
        if self.snapshot.is_none() {
            self.snapshot = Some(self.db.read_txn().map_err(|e| failed(&e))?);
        }
        let txn = self.snapshot.as_ref().expect("snapshot just opened");
        read::PluginStateReader::open(txn).map_err(|e| failed(&e))
    }

    /// The values of `keys`, in order: this batch's write, else the stored
    /// one, read under one open table. An answer is copied into the plugin's
    /// memory, so one larger than its limit could never arrive: past that
    /// many bytes the reading stops and the call traps.
    fn read_states(
        &mut self,
        call: &str,
        keys: &[&[u8]],
    ) -> wasmtime::Result<Vec<Option<Vec<u8>>>> {
        // (`byte-strings` ends are u32 too.)
        let budget = self.memory.limit_bytes.min(u32::MAX as usize);
        let plugin = self.plugin.clone();
        let too_large = |count: usize| {
            wasmtime::Error::msg(format!(
                "{call}: the values of {count} keys pass the plugin's memory limit of {}",
                bytesize::ByteSize(budget as u64)
            ))
        };
        // The snapshot is opened only if some key is not this batch's write.
        let overlay = &self.overlay;
        let reader = match keys.iter().all(|k| overlay.contains_key(*k)) {
            true => None,
            false => Some(self.reader(call)?),
        };
        let mut bytes = 0usize;
        let mut values = Vec::with_capacity(keys.len());
        for key in keys {
            let value = match (self.overlay.get(*key), &reader) {
                (Some(pending), _) => pending.clone(),
                (None, Some(r)) => r
                    .get(&plugin, key)
                    .map_err(|e| wasmtime::Error::msg(format!("{call}: state read failed: {e}")))?,
                (None, None) => None,
            };
            bytes += value.as_ref().map_or(0, Vec::len);
            if bytes > budget {
                return Err(too_large(values.len() + 1));
            }
            values.push(value);
        }
        Ok(values)
    }

    /// Write all `entries` or, if one breaks a limit (named by its index) or
    /// the batch total would pass its cap, none.
    fn write_all(&mut self, entries: &[(&[u8], &[u8])]) -> Result<(), HostError> {
        if entries.is_empty() {
            return Ok(());
        }
        for (index, (key, value)) in entries.iter().enumerate() {
            if let Err(error) = check_state_entry(key, value) {
                let error = match error {
                    HostError::TooLarge(why) => {
                        HostError::TooLarge(format!("entry {index}: {why}"))
                    }
                    other => other,
                };
                return self.refuse(error);
            }
        }
        // Charged at once, so a refusal leaves nothing half-written; `charge`
        // adds one entry's overhead itself.
        let bytes: usize = entries
            .iter()
            .map(|(k, v)| k.len() + v.len() + EFFECT_ENTRY_OVERHEAD_BYTES)
            .sum();
        self.charge(bytes - EFFECT_ENTRY_OVERHEAD_BYTES)?;
        for (key, value) in entries {
            self.overlay.insert(key.to_vec(), Some(value.to_vec()));
        }
        Ok(())
    }

    fn refuse(&mut self, error: HostError) -> Result<(), HostError> {
        self.refusals += 1;
        tracing::warn!(plugin = %self.plugin, error = ?error, "plugin request refused");
        Err(error)
    }
}

/// The strings of a `byte-strings`, or why its `ends` do not describe
/// `data`.
fn unpack(packed: &ByteStrings) -> Result<Vec<&[u8]>, String> {
    let mut strings = Vec::with_capacity(packed.ends.len());
    let mut start = 0usize;
    for (index, &end) in packed.ends.iter().enumerate() {
        let end = end as usize;
        if end < start || end > packed.data.len() {
            return Err(format!(
                "byte-strings end {index} is {end}, outside {start}..={}",
                packed.data.len()
            ));
        }
        strings.push(&packed.data[start..end]);
        start = end;
    }
    if start != packed.data.len() {
        return Err(format!(
            "byte-strings ends at {start} but holds {} bytes",
            packed.data.len()
        ));
    }
    Ok(strings)
}

/// A state write's key and value within their limits, or why not.
fn check_state_entry(key: &[u8], value: &[u8]) -> Result<(), HostError> {
    if key.len() > STATE_KEY_BYTES_MAX {
        return Err(HostError::TooLarge(format!(
            "state key of {} bytes exceeds {STATE_KEY_BYTES_MAX}",
            key.len()
        )));
    }
    if value.len() > STATE_VALUE_BYTES_MAX {
        return Err(HostError::TooLarge(format!(
            "state value of {} bytes exceeds {STATE_VALUE_BYTES_MAX}",
            value.len()
        )));
    }
    Ok(())
}

impl msmq::plugin::types::Host for HostState {}

impl msmq::plugin::host::Host for HostState {
    fn log(&mut self, level: LogLevel, mut message: String) {
        if message.len() > LOG_LINE_BYTES_MAX {
            let mut cut = LOG_LINE_BYTES_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => {
                tracing::error!(plugin, "{message}");
                self.output.note_error(&message);
            }
        }
    }

    fn publish(&mut self, message: NewMessage) -> Result<(), HostError> {
        if !self.allowed_topics.contains(&message.topic) {
            return self.refuse(HostError::NotAllowed(format!(
                "plugin {} may not publish to topic {:?} (deploy it with --publish-to {})",
                self.plugin, message.topic, message.topic
            )));
        }
        if self.registry.get(&message.topic).is_none() {
            return self.refuse(HostError::UnknownTopic(message.topic));
        }
        let new = msmq_protocol::NewMessage {
            payload: message.payload,
            key: message.key.map(Into::into),
            tag: message.tag,
            headers: message
                .headers
                .into_iter()
                .map(|h| msmq_protocol::Header {
                    name: h.name,
                    value: h.value,
                })
                .collect(),
            deliver_at_ms: None,
        };
        let size = new.size_bytes();
        if size > self.message_bytes_max {
            return self.refuse(HostError::TooLarge(format!(
                "message of {size} bytes exceeds message_bytes_max ({})",
                self.message_bytes_max
            )));
        }
        self.charge(size)?;
        self.publishes.push((message.topic, new));
        Ok(())
    }

    fn state_get(&mut self, key: Vec<u8>) -> wasmtime::Result<Option<Vec<u8>>> {
        let mut value = self.read_states("state-get", &[&key])?;
        Ok(value.pop().flatten())
    }

    fn state_put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), HostError> {
        if let Err(error) = check_state_entry(&key, &value) {
            return self.refuse(error);
        }
        self.charge(key.len() + value.len())?;
        self.overlay.insert(key, Some(value));
        Ok(())
    }

    fn state_get_many(&mut self, keys: Vec<Vec<u8>>) -> wasmtime::Result<Vec<Option<Vec<u8>>>> {
        let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        self.read_states("state-get-many", &keys)
    }

    fn state_put_many(&mut self, entries: Vec<(Vec<u8>, Vec<u8>)>) -> Result<(), HostError> {
        let entries: Vec<(&[u8], &[u8])> = entries
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        self.write_all(&entries)
    }

    fn state_get_packed(&mut self, keys: ByteStrings) -> wasmtime::Result<PackedValues> {
        let keys = unpack(&keys)
            .map_err(|why| wasmtime::Error::msg(format!("state-get-packed: {why}")))?;
        let mut data = Vec::new();
        let mut ends = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (index, value) in self
            .read_states("state-get-packed", &keys)?
            .into_iter()
            .enumerate()
        {
            match value {
                Some(value) => data.extend_from_slice(&value),
                None => missing.push(index as u32),
            }
            // At most the memory limit, itself capped at u32::MAX.
            ends.push(data.len() as u32);
        }
        Ok(PackedValues {
            values: ByteStrings { data, ends },
            missing,
        })
    }

    fn state_put_packed(
        &mut self,
        keys: ByteStrings,
        values: ByteStrings,
    ) -> Result<(), HostError> {
        let unpacked = unpack(&keys).and_then(|k| Ok((k, unpack(&values)?)));
        let (keys, values) = match unpacked {
            Ok(kv) => kv,
            Err(why) => return self.refuse(HostError::Other(format!("state-put-packed: {why}"))),
        };
        if keys.len() != values.len() {
            return self.refuse(HostError::Other(format!(
                "state-put-packed: {} keys but {} values",
                keys.len(),
                values.len()
            )));
        }
        let entries: Vec<(&[u8], &[u8])> = keys.into_iter().zip(values).collect();
        self.write_all(&entries)
    }

    fn state_delete(&mut self, key: Vec<u8>) {
        if key.len() <= STATE_KEY_BYTES_MAX && self.charge(key.len()).is_ok() {
            self.overlay.insert(key, None);
        }
    }

    fn state_scan(
        &mut self,
        prefix: Vec<u8>,
        start_after: Option<Vec<u8>>,
        limit: u32,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let limit = limit.min(STATE_SCAN_ENTRIES_MAX) as usize;
        let plugin = self.plugin.clone();
        // Stored entries, then this batch's writes on top, in key order.
        let pending_deletes = self.overlay.values().filter(|v| v.is_none()).count();
        let stored = match self.snapshot() {
            Some(txn) => read::plugin_state_scan(
                txn,
                &plugin,
                &prefix,
                start_after.as_deref(),
                limit + pending_deletes,
            )
            .unwrap_or_else(|e| {
                tracing::error!(%plugin, error = %e, "state scan failed");
                Vec::new()
            }),
            None => Vec::new(),
        };
        // When the stored window was cut short, pending writes past its end
        // could hide stored keys before them: leave those out.
        let window_end = (stored.len() >= limit + pending_deletes)
            .then(|| stored.last().map(|(k, _)| k.clone()))
            .flatten();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        for (k, v) in self.overlay.range(prefix.clone()..) {
            if !k.starts_with(&prefix) || window_end.as_ref().is_some_and(|end| k > end) {
                break;
            }
            if start_after.as_ref().is_some_and(|after| k <= after) {
                continue;
            }
            match v {
                Some(v) => {
                    merged.insert(k.clone(), v.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        merged.into_iter().take(limit).collect()
    }

    fn now_ms(&mut self) -> u64 {
        self.clock.now_ms()
    }
}
