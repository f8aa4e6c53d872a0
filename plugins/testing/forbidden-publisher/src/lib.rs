//! `forbidden-publisher` (test plugin): for every message, publishes its
//! payload to the topic named by config `target` (default `forbidden`). If the
//! broker refuses, the message is dead-lettered with reason
//! `publish refused: <error>`; otherwise it is acked.

use msmq_plugin::{publish, Batch, Config, Outcome, Plugin};

struct ForbiddenPublisher {
    target: String,
}

impl Plugin for ForbiddenPublisher {
    fn init(config: Config) -> Result<Self, String> {
        Ok(ForbiddenPublisher {
            target: config.get_or("target", "forbidden").to_string(),
        })
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        batch
            .iter()
            .map(
                |msg| match publish(self.target.as_str(), msg.payload()).send() {
                    Ok(()) => Outcome::Ack,
                    Err(e) => Outcome::dead_letter(format!("publish refused: {e}")),
                },
            )
            .collect()
    }
}

msmq_plugin::export_plugin!(ForbiddenPublisher);
