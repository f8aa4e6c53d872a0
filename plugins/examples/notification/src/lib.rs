//! `notification`: tells account holders about the points they earned.
//!
//! Consumes the `notify` topic written by the `points` plugin. Payload: UTF-8
//! `transfer_id|account|points_added|total_points`.
//!
//! Idempotent by transfer id: state `sent/<transfer_id>` is set to `1` when a
//! transfer's notification is sent, and a transfer already marked is acked
//! without sending anything again.
//!
//! The notification text is
//! `notified <account>: transfer <transfer_id> earned <points_added> points (total <total_points>)`.
//! If config key `outbox_topic` is set, it is published there with key =
//! account; otherwise it is written to the broker's log at info level.
//!
//! A malformed payload is dead-lettered with a reason that says what is wrong.

use msmq_plugin::{log, publish, state, Batch, Config, Message, Outcome, Plugin};

/// A parsed notification request.
struct Notice<'a> {
    transfer_id: &'a str,
    account: &'a str,
    points_added: u64,
    total_points: u64,
}

/// Parses `transfer_id|account|points_added|total_points`; the error says
/// what is wrong.
fn parse(payload: &[u8]) -> Result<Notice<'_>, String> {
    let text =
        std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8 text: {e}"))?;
    let fields: Vec<&str> = text.split('|').collect();
    let [transfer_id, account, points_added, total_points] = fields[..] else {
        return Err(format!(
            "expected 4 `|`-separated fields transfer_id|account|points_added|total_points, got {}",
            fields.len()
        ));
    };
    for (name, value) in [("transfer_id", transfer_id), ("account", account)] {
        if value.trim().is_empty() {
            return Err(format!("field `{name}` is empty"));
        }
    }
    let number = |name: &str, value: &str| match value.parse::<u64>() {
        Ok(n) if value.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("{name} `{value}` is not a non-negative integer")),
    };
    Ok(Notice {
        transfer_id,
        account,
        points_added: number("points_added", points_added)?,
        total_points: number("total_points", total_points)?,
    })
}

struct Notification {
    outbox_topic: Option<String>,
}

impl Notification {
    fn process(&self, msg: &Message) -> Outcome {
        let notice = match parse(msg.payload()) {
            Ok(n) => n,
            Err(reason) => {
                return Outcome::dead_letter(format!("malformed notification: {reason}"))
            }
        };
        let sent = format!("sent/{}", notice.transfer_id);
        if state::contains(&sent) {
            return Outcome::Ack;
        }
        let text = format!(
            "notified {}: transfer {} earned {} points (total {})",
            notice.account, notice.transfer_id, notice.points_added, notice.total_points
        );
        match &self.outbox_topic {
            Some(topic) => {
                // Publish first: a refused publish leaves no state behind.
                if let Err(e) = publish(topic.as_str(), text).key(notice.account).send() {
                    log::warn(format!(
                        "message {}: publish to `{topic}` refused: {e}",
                        msg.id()
                    ));
                    return Outcome::retry(1_000);
                }
                if let Err(e) = state::put(&sent, "1") {
                    // The publish cannot be taken back: trap to roll the
                    // whole batch back.
                    panic!(
                        "message {}: state write refused after publishing: {e}",
                        msg.id()
                    );
                }
            }
            None => {
                if let Err(e) = state::put(&sent, "1") {
                    log::warn(format!("message {}: state write refused: {e}", msg.id()));
                    return Outcome::retry(1_000);
                }
                log::info(text);
            }
        }
        Outcome::Ack
    }
}

impl Plugin for Notification {
    fn init(config: Config) -> Result<Self, String> {
        let outbox_topic = config.get("outbox_topic").filter(|t| !t.is_empty());
        Ok(Notification {
            outbox_topic: outbox_topic.map(str::to_string),
        })
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        batch.iter().map(|msg| self.process(msg)).collect()
    }
}

msmq_plugin::export_plugin!(Notification);
