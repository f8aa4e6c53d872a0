//! Topics and their logs: create and delete topics, append batches and
//! scheduled messages, release due ones, trim for retention, set a
//! retention.

use super::producer_claims::{admit_claim, remember_claim};
use super::*;

impl Writer {
    /// Apply a command of this family.
    pub(super) fn apply_log(
        &self,
        command: &mut Command,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &mut Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        Ok(match command {
            Command::CreateTopic {
                name,
                partitions: count,
                created_at_ms,
            } => {
                let exists = self.live_named(name, fx, scope).is_some();
                if !(1..=TOPIC_PARTITIONS_MAX).contains(count) {
                    Err(WriteError::Invalid(format!(
                        "a topic has 1 to {TOPIC_PARTITIONS_MAX} partitions, not {count}"
                    )))
                } else if exists {
                    Err(WriteError::TopicExists(name.clone()))
                } else {
                    let meta = TopicMeta {
                        id: fx.counters.next_topic_id,
                        partitions: *count,
                        created_at_ms: *created_at_ms,
                    };
                    fx.counters.next_topic_id += 1;
                    t.topics.insert(name.as_str(), encode(&meta).as_slice())?;
                    for p in 0..*count {
                        t.partitions.insert((meta.id, p), (0u64, 0u64))?;
                    }
                    let topic = Arc::new(Topic::new(name.clone(), meta));
                    fx.created.push(topic.clone());
                    Ok(WriteOutcome::TopicCreated(topic))
                }
            }
            Command::DeleteTopic { name } => match self.live_named(name, fx, scope) {
                None => Err(WriteError::UnknownTopic(name.clone())),
                Some(topic) => {
                    let id = topic.id();
                    t.topics.remove(name.as_str())?;
                    t.log
                        .retain_in((id, 0, 0)..=(id, u32::MAX, u64::MAX), |_, _| false)?;
                    self.reaper.borrow_mut().rows_dropped();
                    t.partitions
                        .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)?;
                    t.retention.remove(id)?;
                    t.retries.retain(|k, _| k.1 != id)?;
                    t.plugin_retries.retain(|k, _| k.1 != id)?;
                    t.id_index.retain(|_, v| v.0 != id)?;
                    t.key_index.retain_in(
                        (id, 0, 0, 0)..=(id, u64::MAX, u32::MAX, u64::MAX),
                        |_, _| false,
                    )?;
                    t.group_offsets.retain(|k, _| k.1 != id)?;
                    scope.deleted.insert(id);
                    fx.ends.retain(|k, _| k.0 != id);
                    fx.deleted.push(id);
                    Ok(WriteOutcome::TopicDeleted)
                }
            },
            Command::Append {
                topic,
                appends,
                scheduled,
                producer,
            } => {
                let admitted = match producer {
                    Some((claim, _)) => admit_claim(t, claim)?,
                    None => Ok(None),
                };
                let partitions = appends
                    .iter()
                    .map(|a| a.partition)
                    .chain(scheduled.iter().map(|s| s.0));
                let Some(live) = self.live(topic, fx, scope) else {
                    return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
                };
                if let Err(e) = partitions_exist(&live, partitions) {
                    Err(e)
                } else if let Err(e) = admitted {
                    Err(e)
                } else if let Ok(Some(reply)) = admitted {
                    Ok(WriteOutcome::Repeated(reply))
                } else {
                    let topic = &live;
                    let mut sequences = Vec::with_capacity(scheduled.len());
                    for (partition, due_ms, message) in scheduled.iter() {
                        let sequence = fx.counters.take_sequences(1);
                        let record = crate::storage::ScheduledRecord {
                            topic_id: topic.id(),
                            topic: topic.name.clone(),
                            partition: *partition,
                            message: NewMessage {
                                deliver_at_ms: None,
                                ..message.clone()
                            },
                        };
                        t.scheduled
                            .insert((*due_ms, sequence), encode(&record).as_slice())?;
                        fx.next_scheduled_ms = fx.next_scheduled_ms.min(*due_ms);
                        sequences.push(sequence);
                    }
                    let mut bases = Vec::with_capacity(appends.len());
                    for (part, append) in appends.iter_mut().enumerate() {
                        // The frame holds this batch for the command.
                        self.origin
                            .set(Some((self.command_index.get(), part as u32)));
                        bases.push(self.append_with_ids(t, fx, topic, append)?);
                    }
                    if let Some((claim, slots)) = producer {
                        let appended = appends
                            .iter()
                            .zip(&bases)
                            .map(|(a, (base, sequence))| (a.partition, *base, *sequence))
                            .collect();
                        let placement = Placement::new(slots, appended, sequences.clone());
                        remember_claim(t, claim, StoredReply::Produced(placement))?;
                    }
                    Ok(WriteOutcome::Appended(bases, sequences))
                }
            }
            Command::ReleaseDue { now_ms, max } => {
                let mut released = 0;
                let mut due = Vec::new();
                for entry in t.scheduled.range(..=(*now_ms, u64::MAX))?.take(*max) {
                    let (k, v) = entry?;
                    due.push((k.value(), v.value().to_vec()));
                }
                for ((due_ms, sequence), bytes) in due {
                    t.scheduled.remove((due_ms, sequence))?;
                    let record: crate::storage::ScheduledRecord =
                        match decode(&bytes, "scheduled message") {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "unreadable scheduled message dropped");
                                continue;
                            }
                        };
                    let named = TopicRef {
                        id: record.topic_id,
                        name: record.topic.clone(),
                    };
                    let topic = self
                        .live(&named, fx, scope)
                        .filter(|topic| record.partition < topic.partition_count());
                    let Some(topic) = topic else {
                        tracing::info!(topic = %record.topic, "scheduled message dropped: its topic was deleted");
                        continue;
                    };
                    let mut value = batch::encode(*now_ms, &[&record.message]);
                    batch::set_base_sequence(&mut value, sequence);
                    let keys = crate::storage::key_hashes([&record.message]);
                    self.append(t, fx, &topic, record.partition, 1, &value, &keys)?;
                    released += 1;
                }
                fx.next_scheduled_ms = t
                    .scheduled
                    .first()?
                    .map(|(k, _)| k.value().0)
                    .unwrap_or(crate::storage::NOTHING_SCHEDULED);
                fx.scheduled_recomputed = true;
                Ok(WriteOutcome::Released(released))
            }
            Command::Trim {
                topic,
                partition,
                before,
                batches_max,
            } => match self.live(topic, fx, scope) {
                None => Err(WriteError::UnknownTopic(topic.name.clone())),
                Some(live) => match partitions_exist(&live, [*partition]) {
                    Err(e) => Err(e),
                    Ok(()) => Ok(self.trim(t, fx, &live, *partition, *before, *batches_max)?),
                },
            },
            Command::SetRetention { topic, retention } => {
                if self.live(topic, fx, scope).is_none() {
                    Err(WriteError::UnknownTopic(topic.name.clone()))
                } else {
                    match retention {
                        Some(r) => t.retention.insert(topic.id, *r)?,
                        None => t.retention.remove(topic.id)?,
                    };
                    Ok(WriteOutcome::RetentionSet)
                }
            }
            other => return Ok(Err(misrouted(other))),
        })
    }

    /// The topic a command names, if it is still the live topic of its
    /// name in this transaction (created by an earlier command of it
    /// included): the same answer whatever commits the commands share.
    pub(super) fn live(&self, topic: &TopicRef, fx: &Effects, scope: &Scope) -> Option<Arc<Topic>> {
        self.live_named(&topic.name, fx, scope)
            .filter(|t| t.id() == topic.id)
    }

    /// The live topic of a name in this transaction: created by an earlier
    /// command of it, or committed before, and not deleted since.
    pub(super) fn live_named(&self, name: &str, fx: &Effects, scope: &Scope) -> Option<Arc<Topic>> {
        fx.created
            .iter()
            .rev()
            .find(|t| t.name == name && !scope.deleted.contains(&t.id()))
            .cloned()
            .or_else(|| {
                self.registry
                    .get(name)
                    .filter(|t| !scope.deleted.contains(&t.id()))
            })
    }

    /// Append a dead letter to partition 0 of its dead-letter topic.
    pub(super) fn append_dead_letter(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        message: &NewMessage,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let sequence = fx.counters.take_sequences(1);
        let mut value = batch::encode(now_ms, &[message]);
        batch::set_base_sequence(&mut value, sequence);
        self.append(
            t,
            fx,
            topic,
            0,
            1,
            &value,
            &crate::storage::key_hashes([message]),
        )?;
        Ok(())
    }

    /// Remove whole batches of a partition below `before` (at most
    /// `batches_max`), with their index entries, and move the partition's
    /// start to the first batch kept.
    pub(super) fn trim(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        partition: u32,
        before: u64,
        batches_max: usize,
    ) -> Result<WriteOutcome, StorageError> {
        let id = topic.id();
        let key = (id, partition);
        let offsets = &topic.partitions[partition as usize];
        let (start, end) = fx
            .ends
            .get(&key)
            .map(|(_, s, e)| (*s, *e))
            .unwrap_or((offsets.start(), offsets.end()));
        let before = before.min(end);
        // Batches appended earlier in this transaction are read back for
        // their keys: put them in their files first.
        self.appender.borrow_mut().write()?;
        let mut doomed = Vec::new();
        for entry in t.log.range((id, partition, 0)..(id, partition, before))? {
            let (k, v) = entry?;
            let base = k.value().2;
            let value = v.value();
            let Ok(h) = batch::header(value) else {
                doomed.push((base, 0, None, Vec::new()));
                continue;
            };
            // Only whole batches go: the batch must end at or below `before`.
            if base + h.count as u64 > before {
                break;
            }
            let mut keys = Vec::new();
            let loaded;
            let records = match batch::pointer(value) {
                Ok(None) => Some(value),
                Ok(Some(at)) if at.has_keys => {
                    let reaper = self.reaper.borrow();
                    loaded = reaper
                        .segments()
                        .read(&at)
                        .inspect_err(|e| {
                            tracing::warn!(topic = %topic.name, partition, offset = base, error = %e,
                                "reading a trimmed batch's keys failed; its key index rows stay")
                        })
                        .ok()
                        .flatten();
                    loaded.as_deref()
                }
                _ => None,
            };
            if let Some(records) = records {
                let _ = batch::decode_from(records, 0, base, base, |m| {
                    if let Some(k) = m.key {
                        keys.push((crate::storage::key_hash(&k), m.offset));
                    }
                    true
                });
            }
            doomed.push((base, h.count, Some(h.base_sequence), keys));
            if doomed.len() >= batches_max {
                break;
            }
        }
        let mut messages = 0u64;
        let mut new_start = start;
        for (base, count, sequence, keys) in &doomed {
            t.log.remove((id, partition, *base))?;
            if let Some(sequence) = sequence {
                t.id_index.remove(*sequence)?;
            }
            for (hash, offset) in keys {
                t.key_index.remove((id, *hash, partition, *offset))?;
            }
            messages += *count as u64;
            new_start = new_start.max(base + *count as u64);
        }
        if !doomed.is_empty() {
            // The first batch kept starts where the last removed one ended.
            let next = t
                .log
                .range((id, partition, new_start)..(id, partition, u64::MAX))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().2)
                .unwrap_or(end);
            new_start = new_start.max(next.min(end)).min(end);
            self.reaper.borrow_mut().rows_dropped();
            t.partitions.insert(key, (new_start, end))?;
            fx.ends.insert(key, (topic.clone(), new_start, end));
        }
        Ok(WriteOutcome::Trimmed {
            batches: doomed.len(),
            messages,
        })
    }

    /// Give a batch its message ids and append it; returns (base offset,
    /// base message-id sequence).
    pub(super) fn append_with_ids(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        append: &mut PartitionAppend,
    ) -> Result<(u64, u64), StorageError> {
        let sequence = fx.counters.take_sequences(append.count as u64);
        batch::set_base_sequence(&mut append.value, sequence);
        let base = self.append(
            t,
            fx,
            topic,
            append.partition,
            append.count,
            &append.value,
            &append.key_hashes,
        )?;
        Ok((base, sequence))
    }

    /// Append one stored batch to the active segment file (written
    /// and synced before this transaction commits) and index it. Returns
    /// its base offset.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn append(
        &self,
        t: &mut Tables,
        fx: &mut Effects,
        topic: &Arc<Topic>,
        partition: u32,
        count: u32,
        value: &[u8],
        key_hashes: &[(u32, u64)],
    ) -> Result<u64, StorageError> {
        let key = (topic.id(), partition);
        let header = batch::header(value).map_err(StorageError::Corrupt)?;
        let offsets = &topic.partitions[partition as usize];
        let (start, end) = fx
            .ends
            .get(&key)
            .map(|(_, s, e)| (*s, *e))
            .unwrap_or((offsets.start(), offsets.end()));
        let at = self.appender.borrow_mut().append(
            value,
            batch::is_keyed(value),
            self.origin.take(),
            || self.roll(t, key.0),
        )?;
        t.log.insert(
            (key.0, key.1, end),
            batch::encode_pointer(value, at).as_slice(),
        )?;
        t.id_index
            .insert(header.base_sequence, (key.0, key.1, end, header.count))?;
        for (i, hash) in key_hashes {
            t.key_index
                .insert((key.0, *hash, key.1, end + *i as u64), ())?;
        }
        let new_end = end + count as u64;
        t.partitions.insert(key, (start, new_end))?;
        fx.ends.insert(key, (topic.clone(), start, new_end));
        Ok(end)
    }
}
