//! `points`: loyalty points from the `transfers` topic.
//!
//! Payload: UTF-8 `transfer_id|from|to|amount_cents`, e.g.
//! `tx-000017|alice|bob|1250`, with a positive integer amount.
//!
//! For each new transfer the sender earns `amount_cents / 100` points
//! (integer division), added to state `points/<from>` (decimal, missing = 0).
//! Then a message goes to the topic named by config `notify_topic` (default
//! `notify`), with key = `from` and payload
//! `transfer_id|from|points_added|total_points`.
//!
//! Processing is idempotent by message id (state `seen/<message id>`).
//!
//! Ordering: the notification is published *before* the state is written. If
//! the broker refuses the publish, the message is retried a second later with
//! no state changed. A publish cannot be taken back, so if a state write is
//! refused after a successful publish the plugin panics: the trap rolls back
//! the whole batch (publishes included) and the broker redelivers it.
//!
//! A malformed payload is dead-lettered with a reason that says what is wrong.

use msmq_plugin::{log, publish, state, Batch, Config, Message, Outcome, Plugin};

use transfer::parse;

struct Points {
    notify_topic: String,
}

impl Points {
    fn process(&self, msg: &Message) -> Outcome {
        let seen = format!("seen/{}", msg.id_hex());
        if state::contains(&seen) {
            return Outcome::Ack;
        }
        let transfer = match parse(msg.payload()) {
            Ok(t) => t,
            Err(reason) => return Outcome::dead_letter(format!("malformed transfer: {reason}")),
        };
        let points_key = format!("points/{}", transfer.from);
        let before = match state::get_parsed::<u64>(&points_key) {
            Ok(n) => n.unwrap_or(0),
            Err(reason) => return Outcome::dead_letter(reason),
        };
        let added = transfer.amount_cents / 100;
        let Some(total) = before.checked_add(added) else {
            return Outcome::dead_letter("points total would overflow a 64-bit integer");
        };

        let notification = format!("{}|{}|{added}|{total}", transfer.transfer_id, transfer.from);
        if let Err(e) = publish(self.notify_topic.as_str(), notification)
            .key(transfer.from)
            .send()
        {
            log::warn(format!(
                "message {}: publish to `{}` refused: {e}",
                msg.id(),
                self.notify_topic
            ));
            return Outcome::retry(1_000);
        }

        let writes = [(points_key, total.to_string()), (seen, "1".to_string())];
        if let Err(e) = state::put_all(&writes) {
            // The notification is already published and cannot be taken back:
            // trap so that the broker rolls the whole batch back.
            panic!(
                "message {}: state write refused after publishing: {e}",
                msg.id()
            );
        }
        Outcome::Ack
    }
}

impl Plugin for Points {
    fn init(config: Config) -> Result<Self, String> {
        let notify_topic = config.get_or("notify_topic", "notify");
        if notify_topic.is_empty() {
            return Err("config key `notify_topic` must not be empty".to_string());
        }
        Ok(Points {
            notify_topic: notify_topic.to_string(),
        })
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        batch.iter().map(|msg| self.process(msg)).collect()
    }
}

msmq_plugin::export_plugin!(Points);
