//! Transactions: half messages, commit and rollback, check-back counts,
//! discards, resumes and the pruning of old outcomes.

use super::producer_claims::{admit_claim, remember_claim};
use super::*;

impl Writer {
    /// Apply a command of this family.
    pub(super) fn apply_transaction(
        &self,
        command: &mut Command,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &mut Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        Ok(match command {
            Command::StoreHalf {
                topic,
                producer_group,
                halves,
                created_at_ms,
                first_check_at_ms,
                producer,
            } => {
                let admitted = match producer {
                    Some(claim) => admit_claim(t, claim)?,
                    None => Ok(None),
                };
                let Some(live) = self.live(topic, fx, scope) else {
                    return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
                };
                if let Err(e) = partitions_exist(&live, halves.iter().map(|h| h.0)) {
                    Err(e)
                } else if let Err(e) = admitted {
                    Err(e)
                } else if let Ok(Some(reply)) = admitted {
                    Ok(WriteOutcome::Repeated(reply))
                } else {
                    let topic = &live;
                    let mut ids = Vec::with_capacity(halves.len());
                    for (partition, message) in halves.iter() {
                        let tx_id = fx.counters.next_tx_id;
                        fx.counters.next_tx_id += 1;
                        let sequence = fx.counters.take_sequences(1);
                        let record = HalfRecord {
                            producer_group: producer_group.clone(),
                            topic_id: topic.id(),
                            topic: topic.name.clone(),
                            partition: *partition,
                            message_sequence: sequence,
                            created_at_ms: *created_at_ms,
                            check_count: 0,
                            next_check_at_ms: *first_check_at_ms,
                            discarded: false,
                            message: message.clone(),
                        };
                        t.halves.insert(tx_id, encode(&record).as_slice())?;
                        fx.schedule.push(ScheduleChange::Upsert(
                            tx_id,
                            PendingTx {
                                producer_group: producer_group.clone(),
                                check_count: 0,
                                next_check_at_ms: *first_check_at_ms,
                            },
                        ));
                        ids.push((tx_id, sequence));
                    }
                    if let Some(claim) = producer {
                        let stored = ids
                            .iter()
                            .zip(halves.iter())
                            .map(|(&(tx_id, sequence), (partition, _))| {
                                (tx_id, sequence, *partition)
                            })
                            .collect();
                        remember_claim(t, claim, StoredReply::HalfStored(stored))?;
                    }
                    Ok(WriteOutcome::HalfStored(ids))
                }
            }
            Command::EndTransaction {
                tx_id,
                producer_group,
                commit,
                source,
                now_ms,
            } => self.end_transaction(
                t,
                fx,
                scope,
                *tx_id,
                producer_group.as_deref(),
                *commit,
                *source,
                *now_ms,
            )?,
            Command::CountCheck {
                tx_id,
                next_check_at_ms,
            } => match load_half(t, *tx_id)? {
                Err(e) => Err(e),
                Ok(Some(mut record)) => {
                    if record.discarded {
                        Ok(WriteOutcome::CheckCounted(None))
                    } else {
                        record.check_count += 1;
                        record.next_check_at_ms = *next_check_at_ms;
                        t.halves.insert(*tx_id, encode(&record).as_slice())?;
                        fx.schedule.push(ScheduleChange::Upsert(
                            *tx_id,
                            PendingTx {
                                producer_group: record.producer_group.clone(),
                                check_count: record.check_count,
                                next_check_at_ms: *next_check_at_ms,
                            },
                        ));
                        Ok(WriteOutcome::CheckCounted(Some(record.check_count)))
                    }
                }
                Ok(None) => Ok(WriteOutcome::CheckCounted(None)),
            },
            Command::Discard { tx_id, now_ms } => match load_half(t, *tx_id)? {
                Err(e) => Err(e),
                Ok(Some(mut record)) => {
                    if record.discarded {
                        Ok(WriteOutcome::Discarded(false))
                    } else {
                        record.discarded = true;
                        t.halves.insert(*tx_id, encode(&record).as_slice())?;
                        let outcome = OutcomeRecord {
                            outcome: TxOutcome::Discarded {
                                checks: record.check_count,
                            },
                            resolved_at_ms: *now_ms,
                            producer_group: record.producer_group.clone(),
                        };
                        t.outcomes.insert(*tx_id, encode(&outcome).as_slice())?;
                        fx.schedule.push(ScheduleChange::Remove(*tx_id));
                        Ok(WriteOutcome::Discarded(true))
                    }
                }
                Ok(None) => Ok(WriteOutcome::Discarded(false)),
            },
            Command::Resume {
                tx_id,
                next_check_at_ms,
            } => match load_half(t, *tx_id)? {
                Err(e) => Err(e),
                Ok(Some(mut record)) => {
                    if !record.discarded {
                        Err(WriteError::TransactionResolved {
                            tx_id: *tx_id,
                            reason: "is pending, not discarded: nothing to resume".into(),
                        })
                    } else {
                        record.discarded = false;
                        record.check_count = 0;
                        record.next_check_at_ms = *next_check_at_ms;
                        t.halves.insert(*tx_id, encode(&record).as_slice())?;
                        t.outcomes.remove(*tx_id)?;
                        fx.schedule.push(ScheduleChange::Upsert(
                            *tx_id,
                            PendingTx {
                                producer_group: record.producer_group,
                                check_count: 0,
                                next_check_at_ms: *next_check_at_ms,
                            },
                        ));
                        Ok(WriteOutcome::Resumed)
                    }
                }
                Ok(None) => Err(WriteError::UnknownTransaction(*tx_id)),
            },
            Command::PruneOutcomes {
                resolved_before_ms,
                rows_max,
            } => {
                // Outcomes are pruned in transaction-id order and pruning stops
                // at the first one still inside the retention window, so one
                // long-lived transaction holds back the ids after it:
                // retention is a lower bound.
                let mut pruned = 0u64;
                while pruned < *rows_max {
                    let first = t
                        .outcomes
                        .first()?
                        .map(|(k, v)| (k.value(), v.value().to_vec()));
                    let Some((tx_id, bytes)) = first else { break };
                    // An outcome that no longer decodes answers nothing: prune it.
                    if let Ok(record) = decode::<OutcomeRecord>(&bytes, "transaction outcome") {
                        if record.resolved_at_ms >= *resolved_before_ms {
                            break;
                        }
                    }
                    t.outcomes.remove(tx_id)?;
                    pruned += 1;
                }
                Ok(WriteOutcome::Pruned(pruned))
            }
            other => return Ok(Err(misrouted(other))),
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn end_transaction(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &Scope,
        tx_id: u64,
        requester: Option<&str>,
        commit: bool,
        source: TxSource,
        now_ms: u64,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        let half = t.halves.get(tx_id)?.map(|v| v.value().to_vec());
        let Some(bytes) = half else {
            // Already resolved: answer consistently from the outcome.
            let outcome = t.outcomes.get(tx_id)?.map(|v| v.value().to_vec());
            let Some(bytes) = outcome else {
                return Ok(Err(WriteError::UnknownTransaction(tx_id)));
            };
            let record: OutcomeRecord = match decode(&bytes, "transaction outcome") {
                Ok(r) => r,
                Err(e) => return Ok(Err(WriteError::Corrupt(e.to_string()))),
            };
            if let Some(e) = wrong_group(tx_id, requester, &record.producer_group) {
                return Ok(Err(e));
            }
            return Ok(match (record.outcome, commit) {
                (
                    TxOutcome::Committed {
                        partition,
                        offset,
                        message_sequence,
                    },
                    true,
                ) => Ok(WriteOutcome::TxCommitted(Landed {
                    partition,
                    offset,
                    sequence: message_sequence,
                })),
                (TxOutcome::Committed { .. }, false) => Err(WriteError::TransactionResolved {
                    tx_id,
                    reason: "was committed; it cannot be rolled back".into(),
                }),
                (TxOutcome::RolledBack, false) => Ok(WriteOutcome::TxRolledBack),
                (TxOutcome::RolledBack, true) => Err(WriteError::TransactionResolved {
                    tx_id,
                    reason: "was rolled back; it cannot be committed".into(),
                }),
                (TxOutcome::Discarded { .. }, _) => unreachable_discarded(tx_id),
            });
        };
        let record: HalfRecord = match decode(&bytes, "half message") {
            Ok(r) => r,
            Err(e) => return Ok(Err(WriteError::Corrupt(e.to_string()))),
        };
        if let Some(e) = wrong_group(tx_id, requester, &record.producer_group) {
            return Ok(Err(e));
        }
        if source == TxSource::Operator && !record.discarded {
            return Ok(Err(WriteError::TransactionResolved {
                tx_id,
                reason: "is pending, not discarded: its producer decides".into(),
            }));
        }
        if record.discarded && source != TxSource::Operator {
            // Discarded means rolled back: a rollback agrees, a commit conflicts.
            return Ok(if commit {
                Err(WriteError::TransactionResolved {
                    tx_id,
                    reason: format!(
                        "was discarded (rolled back) after {} unanswered checks; an operator can resume or commit it",
                        record.check_count
                    ),
                })
            } else {
                Ok(WriteOutcome::TxRolledBack)
            });
        }
        t.halves.remove(tx_id)?;
        fx.schedule.push(ScheduleChange::Remove(tx_id));
        let named = TopicRef {
            id: record.topic_id,
            name: record.topic.clone(),
        };
        let topic = self
            .live(&named, fx, scope)
            .filter(|topic| record.partition < topic.partition_count());
        let (outcome, result) = match (commit, topic) {
            (true, Some(topic)) => {
                let mut value = batch::encode(now_ms, &[&record.message]);
                batch::set_base_sequence(&mut value, record.message_sequence);
                let keys = crate::storage::key_hashes([&record.message]);
                let offset = self.append(t, fx, &topic, record.partition, 1, &value, &keys)?;
                let landed = Landed {
                    partition: record.partition,
                    offset,
                    sequence: record.message_sequence,
                };
                (
                    TxOutcome::Committed {
                        partition: record.partition,
                        offset,
                        message_sequence: record.message_sequence,
                    },
                    Ok(WriteOutcome::TxCommitted(landed)),
                )
            }
            (true, None) => (
                TxOutcome::RolledBack,
                Err(WriteError::UnknownTopic(record.topic.clone())),
            ),
            (false, _) => (TxOutcome::RolledBack, Ok(WriteOutcome::TxRolledBack)),
        };
        let outcome = OutcomeRecord {
            outcome,
            resolved_at_ms: now_ms,
            producer_group: record.producer_group,
        };
        t.outcomes.insert(tx_id, encode(&outcome).as_slice())?;
        Ok(result)
    }
}

/// The error when a producer group decides another group's transaction.
pub(super) fn wrong_group(tx_id: u64, requester: Option<&str>, owner: &str) -> Option<WriteError> {
    requester
        .filter(|r| *r != owner)
        .map(|r| WriteError::WrongProducerGroup {
            tx_id,
            owner: owner.to_string(),
            requester: r.to_string(),
        })
}

/// A stored half message; a record that does not decode fails only the
/// request that touched it.
#[allow(clippy::type_complexity)]
pub(super) fn load_half(
    t: &Tables,
    tx_id: u64,
) -> Result<Result<Option<HalfRecord>, WriteError>, StorageError> {
    let Some(bytes) = t.halves.get(tx_id)?.map(|v| v.value().to_vec()) else {
        return Ok(Ok(None));
    };
    Ok(decode(&bytes, "half message")
        .map(Some)
        .map_err(|e| WriteError::Corrupt(e.to_string())))
}

/// A discarded transaction keeps its half record, so its outcome is never
/// consulted without one; answer as a conflict rather than panic.
pub(super) fn unreachable_discarded(tx_id: u64) -> Result<WriteOutcome, WriteError> {
    Err(WriteError::TransactionResolved {
        tx_id,
        reason: "was discarded".into(),
    })
}
