//! `stateful-publisher` (test plugin, for exactly-once crash tests): for each
//! message, publishes its payload (and key, if any) to the topic named by
//! config `out_topic` (default `echo`), then increments the decimal counter in
//! state `n/<payload>`, and acks. There is deliberately no idempotency check:
//! only the broker's atomic commit of state, publishes and outcomes keeps
//! every `n/...` at exactly 1 and every payload exactly once in `out_topic`.
//! A refused publish retries the message after a second with no state changed;
//! a refused state write traps.

use msmq_plugin::{publish, state, Batch, Config, Outcome, Plugin};

struct StatefulPublisher {
    out_topic: String,
}

impl Plugin for StatefulPublisher {
    fn init(config: Config) -> Result<Self, String> {
        Ok(StatefulPublisher {
            out_topic: config.get_or("out_topic", "echo").to_string(),
        })
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        batch
            .iter()
            .map(|msg| {
                let mut out = publish(self.out_topic.as_str(), msg.payload());
                if let Some(key) = msg.key() {
                    out = out.key(key);
                }
                if out.send().is_err() {
                    return Outcome::retry(1_000);
                }
                let key = [b"n/".as_slice(), msg.payload()].concat();
                let n = state::get_parsed::<u64>(&key)
                    .expect("corrupt counter")
                    .unwrap_or(0);
                state::put(&key, (n + 1).to_string()).expect("state write refused");
                Outcome::Ack
            })
            .collect()
    }
}

msmq_plugin::export_plugin!(StatefulPublisher);
