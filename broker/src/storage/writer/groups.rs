//! Groups: offsets, per-message-ack settlements (retries and dead
//! letters) and retry policies.

use super::*;

impl Writer {
    /// Apply a command of this family.
    pub(super) fn apply_groups(
        &self,
        command: &mut Command,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &mut Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        Ok(match command {
            Command::CommitOffsets { group, offsets } => {
                for (topic_id, partition, offset) in offsets {
                    t.group_offsets
                        .insert((group.as_str(), *topic_id, *partition), *offset)?;
                    fx.committed
                        .push((group.clone(), *topic_id, *partition, *offset));
                }
                Ok(WriteOutcome::OffsetsCommitted)
            }
            Command::PinOffsets { group, offsets } => {
                for (topic_id, partition, offset) in offsets {
                    let key = (group.as_str(), *topic_id, *partition);
                    if t.group_offsets.get(key)?.is_none() {
                        t.group_offsets.insert(key, *offset)?;
                        fx.committed
                            .push((group.clone(), *topic_id, *partition, *offset));
                    }
                }
                Ok(WriteOutcome::OffsetsCommitted)
            }
            Command::Settle {
                group,
                retry_puts,
                retry_deletes,
                dead_letters,
                now_ms,
            } => {
                // Check first: a refused op must change nothing.
                if let Some((topic, _)) = dead_letters
                    .iter()
                    .find(|(t, _)| self.live(t, fx, scope).is_none())
                {
                    return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
                }
                for (key, record) in retry_puts.iter() {
                    t.retries.insert(
                        (group.as_str(), key.0, key.1, key.2),
                        encode(record).as_slice(),
                    )?;
                }
                for key in retry_deletes.iter() {
                    t.retries.remove((group.as_str(), key.0, key.1, key.2))?;
                }
                for (topic, message) in dead_letters.iter() {
                    let topic = self.live(topic, fx, scope).expect("checked above");
                    self.append_dead_letter(t, fx, &topic, message, *now_ms)?;
                }
                Ok(WriteOutcome::Settled)
            }
            Command::SetPolicy { group, policy } => {
                t.policies
                    .insert(group.as_str(), encode(policy).as_slice())?;
                Ok(WriteOutcome::PolicySet)
            }
            other => return Ok(Err(misrouted(other))),
        })
    }
}
