//! Transactional (half) messages: their stored records and the in-memory
//! schedule of check-backs.
//!
//! Owns: [`HalfRecord`] and [`OutcomeRecord`] (their storage lives in
//! `storage::tables::HALF_MESSAGES` / `TX_OUTCOMES`, changed only by the
//! storage writer) and the [`TxSchedule`] of pending transactions by next
//! check time. The check-back loop that acts on the schedule is server glue
//! (`server/checkback.rs`).
//!
//! Invariants:
//! - A half message is never in the log. Commit moves it into the log and
//!   removes its half record in one redb transaction, so it is delivered
//!   exactly once or not at all, whatever crashes in between.
//! - A check is counted durably before it is sent; a check that could not be
//!   sent (no producer of the group connected) is not counted.
//! - The schedule mirrors the pending half records: the writer updates it
//!   only after the commit that changed them.

use msmq_protocol::NewMessage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// A half message as stored, keyed by its transaction id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HalfRecord {
    pub producer_group: String,
    pub topic_id: u32,
    pub topic: String,
    pub partition: u32,
    /// The message id sequence, fixed when the half message was stored.
    pub message_sequence: u64,
    pub created_at_ms: u64,
    /// Checks sent so far.
    pub check_count: u32,
    pub next_check_at_ms: u64,
    /// Rolled back after `check_max` unanswered checks; kept so an operator
    /// can resume or commit it.
    pub discarded: bool,
    pub message: NewMessage,
}

/// How a transaction ended, kept for a while so repeated or conflicting
/// commit/rollback requests get a consistent answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxOutcome {
    Committed {
        partition: u32,
        offset: u64,
        message_sequence: u64,
    },
    RolledBack,
    /// Rolled back by the broker after this many unanswered checks.
    Discarded {
        checks: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub outcome: TxOutcome,
    pub resolved_at_ms: u64,
    /// Only this group's producers are told the outcome.
    pub producer_group: String,
}

/// Who ends a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TxSource {
    /// The producer's own commit/rollback.
    Producer,
    /// A producer's answer to a check-back.
    Check,
    /// An operator (commit of a discarded transaction).
    Operator,
}

/// What the check loop needs to know about a pending transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTx {
    pub producer_group: String,
    pub check_count: u32,
    pub next_check_at_ms: u64,
}

/// Pending (not discarded) transactions ordered by when to look at them
/// next: their stored next check time, or later while postponed in memory
/// because no producer of their group was connected.
#[derive(Debug, Default)]
pub struct TxSchedule {
    /// tx id → (the stored state, the effective time it is due).
    pending: HashMap<u64, (PendingTx, u64)>,
    by_due: BTreeSet<(u64, u64)>,
}

impl TxSchedule {
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn get(&self, tx_id: u64) -> Option<&PendingTx> {
        self.pending.get(&tx_id).map(|(tx, _)| tx)
    }

    fn set_effective(&mut self, tx_id: u64, tx: PendingTx, effective_ms: u64) {
        if let Some((_, old)) = self.pending.insert(tx_id, (tx, effective_ms)) {
            self.by_due.remove(&(old, tx_id));
        }
        self.by_due.insert((effective_ms, tx_id));
    }

    /// Record the stored state of a transaction (due at its stored time).
    pub fn upsert(&mut self, tx_id: u64, tx: PendingTx) {
        let due = tx.next_check_at_ms;
        self.set_effective(tx_id, tx, due);
    }

    pub fn remove(&mut self, tx_id: u64) {
        if let Some((_, due)) = self.pending.remove(&tx_id) {
            self.by_due.remove(&(due, tx_id));
        }
    }

    /// Look at a transaction again no sooner than `until_ms`, without
    /// touching storage (the check was not sent, so it is not counted).
    pub fn postpone(&mut self, tx_id: u64, until_ms: u64) {
        if let Some((tx, _)) = self.pending.get(&tx_id).cloned() {
            self.set_effective(tx_id, tx, until_ms);
        }
    }

    /// Up to `limit` transactions due at `now_ms`, earliest first.
    pub fn due(&self, now_ms: u64, limit: usize) -> Vec<(u64, PendingTx)> {
        self.by_due
            .range(..=(now_ms, u64::MAX))
            .take(limit)
            .map(|(_, id)| (*id, self.pending[id].0.clone()))
            .collect()
    }

    /// A producer of `group` connected: undo in-memory postponements, so
    /// transactions whose stored check time has passed are due now and the
    /// others (still in their timeout or immunity) keep their time.
    pub fn wake_group(&mut self, group: &str) {
        let ids: Vec<(u64, PendingTx)> = self
            .pending
            .iter()
            .filter(|(_, (t, due))| t.producer_group == group && *due != t.next_check_at_ms)
            .map(|(id, (t, _))| (*id, t.clone()))
            .collect();
        for (id, tx) in ids {
            self.upsert(id, tx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(group: &str, at: u64) -> PendingTx {
        PendingTx {
            producer_group: group.into(),
            check_count: 0,
            next_check_at_ms: at,
        }
    }

    #[test]
    fn due_is_ordered_and_bounded() {
        let mut s = TxSchedule::default();
        s.upsert(1, tx("a", 300));
        s.upsert(2, tx("a", 100));
        s.upsert(3, tx("b", 200));
        s.upsert(4, tx("b", 900));
        let due: Vec<u64> = s.due(300, 10).into_iter().map(|(id, _)| id).collect();
        assert_eq!(due, vec![2, 3, 1]);
        assert_eq!(s.due(300, 2).len(), 2);
        assert!(s.due(99, 10).is_empty());
    }

    #[test]
    fn upsert_postpone_remove_keep_the_index_consistent() {
        let mut s = TxSchedule::default();
        s.upsert(1, tx("a", 100));
        s.postpone(1, 500);
        assert!(s.due(400, 10).is_empty());
        assert_eq!(s.due(500, 10).len(), 1);
        s.upsert(
            1,
            PendingTx {
                check_count: 3,
                ..tx("a", 50)
            },
        );
        assert_eq!(s.due(60, 10)[0].1.check_count, 3);
        s.remove(1);
        assert!(s.is_empty());
        assert!(s.due(u64::MAX, 10).is_empty());
    }

    #[test]
    fn a_connecting_producer_wakes_only_its_groups_overdue_checks() {
        let mut s = TxSchedule::default();
        s.upsert(1, tx("a", 100)); // overdue, postponed for lack of a producer
        s.postpone(1, 10_000);
        s.upsert(2, tx("b", 100));
        s.postpone(2, 10_000);
        s.upsert(3, tx("a", 5_000)); // still in its timeout or immunity
        s.wake_group("a");
        let due: Vec<u64> = s.due(200, 10).into_iter().map(|(id, _)| id).collect();
        assert_eq!(due, vec![1]);
        assert_eq!(s.due(5_000, 10).len(), 2);
    }
}
