//! The plugin's key-value state, kept by the broker.
//!
//! Keys and values are byte strings; anything that is `AsRef<[u8]>` (`&str`,
//! `String`, `&[u8]`, `Vec<u8>`, ...) can be passed. Reads see the writes the
//! plugin made earlier in the same batch. Writes and deletes are committed
//! together with the batch's outcomes and publishes, or discarded with them if
//! the call traps, times out, runs out of memory, or the broker dies: a
//! redelivered message never sees half of a failed batch.
//!
//! The state is private to the plugin (all its instances and partitions share
//! it). Each plugin has its own namespace; there is no way to read another
//! plugin's state.
//!
//! ```ignore
//! use msmq_plugin::state;
//!
//! let key = format!("seen/{}", msg.id_hex());
//! if !state::contains(&key) {
//!     state::put(&key, "1")?;
//! }
//! for (key, value) in state::scan_all("bill/", 100) {
//!     // ...
//! }
//! ```
//!
//! # Panics
//!
//! Every function panics on a non-`wasm32` target (there is no broker).

use std::fmt::Display;
use std::str::FromStr;

use crate::bindings::msmq::plugin::host;
use crate::HostError;

/// Returns the value of `key`, or `None` if it is not set.
pub fn get(key: impl AsRef<[u8]>) -> Option<Vec<u8>> {
    host::state_get(key.as_ref())
}

/// Returns the value of `key` as text (invalid UTF-8 is replaced with
/// `U+FFFD`), or `None` if it is not set.
pub fn get_string(key: impl AsRef<[u8]>) -> Option<String> {
    get(key).map(|v| match String::from_utf8(v) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Parses the value of `key` as text with [`FromStr`] (e.g. a decimal
/// counter): `Ok(None)` if it is not set, `Err` with a message naming the key
/// if the value is not UTF-8 or does not parse.
///
/// ```ignore
/// let n: u64 = state::get_parsed("count")?.unwrap_or(0);
/// state::put("count", (n + 1).to_string())?;
/// ```
pub fn get_parsed<T>(key: impl AsRef<[u8]>) -> Result<Option<T>, String>
where
    T: FromStr,
    T::Err: Display,
{
    let key = key.as_ref();
    let Some(raw) = get(key) else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&raw).map_err(|e| {
        format!(
            "state key `{}` does not hold UTF-8 text: {e}",
            String::from_utf8_lossy(key)
        )
    })?;
    text.parse().map(Some).map_err(|e| {
        format!(
            "state key `{}` holds `{text}`, which does not parse: {e}",
            String::from_utf8_lossy(key)
        )
    })
}

/// Returns `true` if `key` is set.
pub fn contains(key: impl AsRef<[u8]>) -> bool {
    get(key).is_some()
}

/// Sets `key` to `value`; committed with the batch.
///
/// Fails if the broker refuses the write, e.g. with
/// [`HostError::TooLarge`] when a key, value or the batch's total exceeds a
/// limit.
pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<(), HostError> {
    host::state_put(key.as_ref(), value.as_ref()).map_err(HostError::from)
}

/// Writes all `entries` in order, or none of them, in one call into the
/// broker (`state-put-many`): if the broker refuses one entry, nothing is
/// written and the error names the entry, so the caller can answer with
/// [`Outcome::retry`](crate::Outcome::retry) without leaving half a message's
/// changes behind. A later entry wins over an earlier one with the same key.
///
/// ```ignore
/// state::put_all(&[
///     (format!("bill/{from}"), new_from.to_string()),
///     (format!("bill/{to}"), new_to.to_string()),
///     (format!("seen/{}", msg.id_hex()), "1".to_string()),
/// ])?;
/// ```
pub fn put_all<K, V>(entries: &[(K, V)]) -> Result<(), HostError>
where
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let entries: Vec<(Vec<u8>, Vec<u8>)> = entries
        .iter()
        .map(|(k, v)| (k.as_ref().to_vec(), v.as_ref().to_vec()))
        .collect();
    host::state_put_many(&entries).map_err(HostError::from)
}

/// Reads several keys in one call into the broker (`state-get-many`): one
/// answer per key, in order, each as [`get`] would give it.
pub fn get_many<K: AsRef<[u8]>>(keys: &[K]) -> Vec<Option<Vec<u8>>> {
    let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.as_ref().to_vec()).collect();
    host::state_get_many(&keys)
}

/// Deletes `key` (nothing happens if it is not set); committed with the batch.
pub fn delete(key: impl AsRef<[u8]>) {
    host::state_delete(key.as_ref());
}

/// Returns up to `limit` entries whose key starts with `prefix`, in key order,
/// starting after the key `start_after` when given.
///
/// To page through a prefix, pass the last key of one page as `start_after`
/// of the next; [`scan_all`] does that for you.
pub fn scan(
    prefix: impl AsRef<[u8]>,
    start_after: Option<&[u8]>,
    limit: u32,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    host::state_scan(prefix.as_ref(), start_after, limit)
}

/// Iterates over all entries whose key starts with `prefix`, in key order,
/// fetching `page_size` entries per call to the host.
///
/// A `page_size` of 0 is treated as 1.
pub fn scan_all(prefix: impl AsRef<[u8]>, page_size: u32) -> Scan {
    Scan {
        prefix: prefix.as_ref().to_vec(),
        page_size: page_size.max(1),
        last_key: None,
        page: Vec::new().into_iter(),
        done: false,
    }
}

/// Iterator returned by [`scan_all`]: yields `(key, value)` pairs, paging
/// through the host as needed.
#[derive(Debug)]
pub struct Scan {
    prefix: Vec<u8>,
    page_size: u32,
    last_key: Option<Vec<u8>>,
    page: std::vec::IntoIter<(Vec<u8>, Vec<u8>)>,
    done: bool,
}

impl Iterator for Scan {
    type Item = (Vec<u8>, Vec<u8>);

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(entry) = self.page.next() {
            return Some(entry);
        }
        if self.done {
            return None;
        }
        let page = scan(&self.prefix, self.last_key.as_deref(), self.page_size);
        if page.len() < self.page_size as usize {
            self.done = true;
        }
        match page.last() {
            Some((key, _)) => self.last_key = Some(key.clone()),
            None => {
                self.done = true;
                return None;
            }
        }
        self.page = page.into_iter();
        self.page.next()
    }
}
