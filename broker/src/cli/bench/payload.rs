//! What the messages of a bench load hold: a timestamp and zeros, the
//! payment scenario's transfers (whose balances can be checked afterwards),
//! or the lines of a file.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the payloads of a load are.
#[derive(Clone, Default)]
pub enum Payload {
    /// `--size` bytes: the send time in µs (8 bytes, little-endian), then
    /// zeros.
    #[default]
    Stamped,
    /// The payment scenario's transfers, `tx-N|acct-A|acct-B|amount`,
    /// numbered in send order, between [`TRANSFER_ACCOUNTS`] accounts.
    Transfers(Arc<AtomicU64>),
    /// The lines of a file, in turn.
    Lines(Arc<Vec<Vec<u8>>>, Arc<AtomicU64>),
}

/// Accounts the generated transfers move money between.
pub const TRANSFER_ACCOUNTS: u64 = 1000;

/// Transfer `n` of [`Payload::Transfers`]: (from, to, amount in cents). A
/// fixed mix of senders and receivers, never the same account twice.
pub fn transfer(n: u64) -> (u64, u64, u64) {
    let from = n.wrapping_mul(7919) % TRANSFER_ACCOUNTS;
    let to = (from + 1 + n % (TRANSFER_ACCOUNTS - 1)) % TRANSFER_ACCOUNTS;
    let amount = 100 + n.wrapping_mul(104_729) % 99_900;
    (from, to, amount)
}

/// The balances (`bill/acct-NNNN` → cents) a billing plugin must end with
/// after transfers `0..count`.
pub fn transfer_balances(count: u64) -> std::collections::BTreeMap<String, i64> {
    let mut balances = std::collections::BTreeMap::new();
    for n in 0..count {
        let (from, to, amount) = transfer(n);
        *balances.entry(format!("bill/acct-{from:04}")).or_insert(0) -= amount as i64;
        *balances.entry(format!("bill/acct-{to:04}")).or_insert(0) += amount as i64;
    }
    balances
}

impl Payload {
    pub(super) fn make(&self, size: usize, stamp: [u8; 8]) -> Vec<u8> {
        match self {
            Payload::Stamped => {
                let mut payload = vec![0u8; size];
                payload[..8].copy_from_slice(&stamp);
                payload
            }
            Payload::Transfers(next) => {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let (from, to, amount) = transfer(n);
                format!("tx-{n:09}|acct-{from:04}|acct-{to:04}|{amount}").into_bytes()
            }
            Payload::Lines(lines, next) => {
                let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                lines[n % lines.len()].clone()
            }
        }
    }
}
