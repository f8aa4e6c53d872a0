//! `state-limits` (test plugin): writes state at and one past each limit,
//! with `state-put` and with `state-put-many`, and records what the broker
//! answered under `result/<case>` (`ok` or `refused: <reason>`), so a test
//! can check every limit from outside. Acks every message.
//!
//! The limits (the broker's `STATE_KEY_BYTES_MAX` and
//! `STATE_VALUE_BYTES_MAX`) come in as config `key_max` and `value_max`.

use msmq_plugin::{state, Batch, Config, Outcome, Plugin};

struct Limits {
    key_max: usize,
    value_max: usize,
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
        })
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
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
        ];
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
