//! `ack-all` (test plugin): acks every message and does nothing else. Used for
//! throughput benchmarks, so it is kept minimal.

use msmq_plugin::{Batch, Config, Outcome, Plugin};

struct AckAll;

impl Plugin for AckAll {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(AckAll)
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        vec![Outcome::Ack; batch.len()]
    }
}

msmq_plugin::export_plugin!(AckAll);
