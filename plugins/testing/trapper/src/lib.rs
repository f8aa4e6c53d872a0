//! `trapper` (test plugin): panics (traps) on any message whose payload starts
//! with `trap`, acks every other message. A batch holding a `trap` message
//! therefore always traps.

use msmq_plugin::{Batch, Config, Outcome, Plugin};

struct Trapper;

impl Plugin for Trapper {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Trapper)
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        batch
            .iter()
            .map(|msg| {
                if msg.payload().starts_with(b"trap") {
                    panic!("trapper: message {} asked to trap", msg.id());
                }
                Outcome::Ack
            })
            .collect()
    }
}

msmq_plugin::export_plugin!(Trapper);
