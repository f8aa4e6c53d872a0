//! `billing`: keeps a balance per account from the `transfers` topic.
//!
//! Payload: UTF-8 `transfer_id|from|to|amount_cents`, e.g.
//! `tx-000017|alice|bob|1250`, with a positive integer amount.
//!
//! State:
//! * `bill/<account>`: the account's balance in cents, a signed decimal
//!   integer (missing = 0). A transfer subtracts the amount from `from` and
//!   adds it to `to`.
//! * `seen/<message id>`: marks a processed message. Processing is idempotent
//!   by message id: a message that was already processed is acked and changes
//!   nothing.
//!
//! A malformed payload is dead-lettered with a reason that says what is wrong.
//! All of a message's state changes are written together or not at all
//! ([`state::put_all`]); a refused write retries the message a second later.

use msmq_plugin::{log, state, Batch, Config, Message, Outcome, Plugin};

use transfer::parse;

struct Billing;

impl Billing {
    fn process(msg: &Message) -> Outcome {
        let seen = format!("seen/{}", msg.id_hex());
        if state::contains(&seen) {
            return Outcome::Ack;
        }
        let transfer = match parse(msg.payload()) {
            Ok(t) => t,
            Err(reason) => return Outcome::dead_letter(format!("malformed transfer: {reason}")),
        };
        let amount = match i64::try_from(transfer.amount_cents) {
            Ok(a) => a,
            Err(_) => return Outcome::dead_letter("malformed transfer: amount_cents is too large"),
        };

        let mut writes: Vec<(String, String)> = Vec::with_capacity(3);
        // A transfer to the same account leaves its balance unchanged.
        if transfer.from != transfer.to {
            let from_key = format!("bill/{}", transfer.from);
            let to_key = format!("bill/{}", transfer.to);
            let (from_balance, to_balance) = match (balance(&from_key), balance(&to_key)) {
                (Ok(f), Ok(t)) => (f, t),
                (Err(reason), _) | (_, Err(reason)) => return Outcome::dead_letter(reason),
            };
            let (Some(new_from), Some(new_to)) = (
                from_balance.checked_sub(amount),
                to_balance.checked_add(amount),
            ) else {
                return Outcome::dead_letter("balance would overflow a 64-bit integer");
            };
            writes.push((from_key, new_from.to_string()));
            writes.push((to_key, new_to.to_string()));
        }
        writes.push((seen, "1".to_string()));

        match state::put_all(&writes) {
            Ok(()) => Outcome::Ack,
            Err(e) => {
                log::warn(format!("message {}: state write refused: {e}", msg.id()));
                Outcome::retry(1_000)
            }
        }
    }
}

/// The balance stored under `key` (missing = 0).
fn balance(key: &str) -> Result<i64, String> {
    Ok(state::get_parsed::<i64>(key)?.unwrap_or(0))
}

impl Plugin for Billing {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(Billing)
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        batch.iter().map(Billing::process).collect()
    }
}

msmq_plugin::export_plugin!(Billing);
