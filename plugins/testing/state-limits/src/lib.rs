//! `state-limits` (test plugin): writes state at and one past each limit,
//! with `state-put`, `state-put-many` and `state-put-packed`, and records
//! what the broker answered under `result/<case>` (`ok` or `refused:
//! <reason>`), so a test can check every limit from outside. Acks every
//! message.
//!
//! The limits (the broker's `STATE_KEY_BYTES_MAX` and
//! `STATE_VALUE_BYTES_MAX`) come in as config `key_max` and `value_max`.
//! With config `trap` = `bad-ends` it instead calls `state-get-packed` with
//! `ends` past the data, and with `trap` = `past-memory` asks it for a
//! 1 MiB value more times than the plugin's memory holds: both must trap.

use msmq_plugin::bindings::msmq::plugin::host;
use msmq_plugin::bindings::msmq::plugin::types::ByteStrings;
use msmq_plugin::{state, Batch, Config, Outcome, Plugin};

struct Limits {
    key_max: usize,
    value_max: usize,
    trap: Option<String>,
}

/// `items` laid end to end as the WIT `byte-strings`.
fn pack(items: &[&[u8]]) -> ByteStrings {
    let mut data = Vec::new();
    let mut ends = Vec::new();
    for item in items {
        data.extend_from_slice(item);
        ends.push(data.len() as u32);
    }
    ByteStrings { data, ends }
}

fn put_packed(keys: ByteStrings, values: ByteStrings) -> String {
    answer(host::state_put_packed(&keys, &values).map_err(msmq_plugin::HostError::from))
}

fn answer(result: Result<(), msmq_plugin::HostError>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => format!("refused: {e}"),
    }
}

impl Plugin for Limits {
    fn init(config: Config) -> Result<Self, String> {
        let number = |key: &str| {
            config
                .get(key)
                .ok_or_else(|| format!("config {key} is required"))?
                .parse::<usize>()
                .map_err(|e| format!("config {key}: {e}"))
        };
        Ok(Limits {
            key_max: number("key_max")?,
            value_max: number("value_max")?,
            trap: config.get("trap").map(str::to_string),
        })
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        match self.trap.as_deref() {
            Some("bad-ends") => {
                let keys = ByteStrings { data: b"abc".to_vec(), ends: vec![2, 4] };
                host::state_get_packed(&keys);
                return vec![Outcome::Ack; batch.len()];
            }
            Some("past-memory") => {
                let big = vec![b'm'; self.value_max];
                let _ = state::put("big", &big);
                // 65 copies of 1 MiB: more than a 64 MiB plugin memory.
                let keys: Vec<&[u8]> = vec![b"big"; 65];
                host::state_get_packed(&pack(&keys));
                return vec![Outcome::Ack; batch.len()];
            }
            _ => {}
        }
        let key = |len: usize, fill: u8| vec![fill; len];
        let value = |len: usize| vec![b'v'; len];
        let (k, v) = (self.key_max, self.value_max);
        let mut results: Vec<(String, String)> = vec![
            ("put-key-at-limit".into(), answer(state::put(key(k, b'a'), "x"))),
            ("put-key-past-limit".into(), answer(state::put(key(k + 1, b'b'), "x"))),
            ("put-value-at-limit".into(), answer(state::put("value-at", value(v)))),
            ("put-value-past-limit".into(), answer(state::put("value-past", value(v + 1)))),
            (
                "many-at-limit".into(),
                answer(state::put_all(&[(key(k, b'c'), value(v)), (key(k, b'd'), value(1))])),
            ),
            (
                "many-key-past-limit".into(),
                answer(state::put_all(&[(b"many-first".to_vec(), value(1)), (key(k + 1, b'e'), value(1))])),
            ),
            (
                "many-value-past-limit".into(),
                answer(state::put_all(&[(b"many-second".to_vec(), value(1)), (b"many-big".to_vec(), value(v + 1))])),
            ),
            (
                "packed-at-limit".into(),
                put_packed(pack(&[&key(k, b'f'), b"p1"]), pack(&[&value(v), b""])),
            ),
            (
                "packed-key-past-limit".into(),
                put_packed(pack(&[b"packed-first", &key(k + 1, b'g')]), pack(&[b"1", b"1"])),
            ),
            (
                "packed-bad-ends".into(),
                put_packed(
                    ByteStrings { data: b"packed-second".to_vec(), ends: vec![7, 99] },
                    pack(&[b"1", b"1"]),
                ),
            ),
            (
                "packed-count-mismatch".into(),
                put_packed(pack(&[b"packed-third"]), pack(&[b"1", b"2"])),
            ),
        ];
        // What the packed writes left, read back packed: values, and the
        // indices of the missing keys.
        let found = host::state_get_packed(&pack(&[
            &key(k, b'f'),
            b"p1",
            b"packed-first",
            b"packed-second",
            b"packed-third",
        ]));
        results.push((
            "packed-read-back".into(),
            format!(
                "ends={:?} missing={:?}",
                found.values.ends, found.missing
            ),
        ));
        // What the refused lists left behind (nothing) and what the
        // accepted one wrote, read back in one call.
        let read = state::get_many(&[key(k, b'c'), key(k, b'd'), b"many-first".to_vec(), b"many-second".to_vec()]);
        let found: Vec<String> = read
            .iter()
            .map(|v| v.as_ref().map_or("missing".into(), |v| v.len().to_string()))
            .collect();
        results.push(("read-back".into(), found.join(",")));
        let results: Vec<(String, String)> = results
            .into_iter()
            .map(|(case, answer)| (format!("result/{case}"), answer))
            .collect();
        match state::put_all(&results) {
            Ok(()) => vec![Outcome::Ack; batch.len()],
            Err(_) => vec![Outcome::retry(100); batch.len()],
        }
    }
}

msmq_plugin::export_plugin!(Limits);
