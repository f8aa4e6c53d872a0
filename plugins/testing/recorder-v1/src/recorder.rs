// Shared by `recorder-v1` and `recorder-v2`, which include this file with
// `#[path]` and differ only in the `VERSION` constant of their crate root.

use msmq_plugin::{state, Batch, Config, Outcome, Plugin};

use crate::VERSION;

/// Records which version processed each message.
pub struct Recorder;

impl Plugin for Recorder {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Recorder)
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        let count_key = format!("count/{VERSION}");
        batch
            .iter()
            .map(|msg| {
                let id = msg.id_hex();
                let seen = format!("seen/{id}");
                if state::contains(&seen) {
                    // A second processing of the same message: must never
                    // happen, and a test looks for these keys.
                    state::put(format!("dup/{id}"), VERSION).expect("state write refused");
                } else {
                    state::put(&seen, VERSION).expect("state write refused");
                    let count = state::get_parsed::<u64>(&count_key)
                        .expect("corrupt counter")
                        .unwrap_or(0);
                    state::put(&count_key, (count + 1).to_string()).expect("state write refused");
                }
                Outcome::Ack
            })
            .collect()
    }
}
