//! Plugins: records and components, pause and remove, and the effects of
//! one plugin batch.

use super::*;

impl Writer {
    /// Apply a command of this family.
    pub(super) fn apply_plugins(
        &self,
        command: &mut Command,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &mut Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        Ok(match command {
            Command::PluginPut { record, component } => {
                if let Some(bytes) = component {
                    t.plugin_components
                        .insert(record.component_sha256.as_str(), bytes.as_slice())?;
                }
                t.plugins
                    .insert(record.spec.name.as_str(), encode(&**record).as_slice())?;
                Self::drop_unused_components(t)?;
                Ok(WriteOutcome::PluginStored)
            }
            Command::PluginSetPaused {
                name,
                incarnation,
                paused,
            } => {
                let stored = match t.plugins.get(name.as_str())? {
                    Some(v) => Some(decode::<crate::command::PluginRecord>(
                        v.value(),
                        "plugin record",
                    )?),
                    None => None,
                };
                match stored {
                    Some(mut record) if record.incarnation == *incarnation => {
                        record.paused = paused.clone();
                        t.plugins
                            .insert(name.as_str(), encode(&record).as_slice())?;
                        Ok(WriteOutcome::PluginStored)
                    }
                    _ => Err(WriteError::PluginGone(name.clone())),
                }
            }
            Command::PluginRemove { name, group } => {
                let existed = t.plugins.remove(name.as_str())?.is_some();
                let plugin = name.as_str();
                t.plugin_state.retain_in(
                    (plugin, &[][..])..(plugin_successor(plugin).as_str(), &[][..]),
                    |_, _| false,
                )?;
                t.plugin_retries.retain_in(
                    (plugin, 0, 0, 0)..=(plugin, u32::MAX, u32::MAX, u64::MAX),
                    |_, _| false,
                )?;
                t.group_offsets.retain_in(
                    (group.as_str(), 0, 0)..=(group.as_str(), u32::MAX, u32::MAX),
                    |_, _| false,
                )?;
                Self::drop_unused_components(t)?;
                fx.forgotten_groups.push(group.clone());
                Ok(WriteOutcome::PluginRemoved(existed))
            }
            Command::PluginCommit(c) => self.plugin_commit(c, t, fx, scope)?,
            other => return Ok(Err(misrouted(other))),
        })
    }

    /// Delete stored components no plugin record refers to.
    pub(super) fn drop_unused_components(t: &mut Tables) -> Result<(), StorageError> {
        let mut used = HashSet::new();
        for entry in t.plugins.iter()? {
            let (_, v) = entry?;
            let record: crate::command::PluginRecord = decode(v.value(), "plugin record")?;
            used.insert(record.component_sha256);
        }
        t.plugin_components.retain(|hash, _| used.contains(hash))?;
        Ok(())
    }

    pub(super) fn plugin_commit(
        &self,
        c: &mut PluginCommit,
        t: &mut Tables,
        fx: &mut Effects,
        scope: &Scope,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        // Check first: a refused commit must change nothing.
        let live = match t.plugins.get(c.plugin.as_str())? {
            Some(v) => {
                let record: crate::command::PluginRecord = decode(v.value(), "plugin record")?;
                record.incarnation == c.incarnation
            }
            None => false,
        };
        if !live {
            return Ok(Err(WriteError::PluginGone(c.plugin.clone())));
        }
        let dead_topic = c
            .publishes
            .iter()
            .map(|(t, _)| t)
            .chain(c.dead_letters.iter().map(|(t, _)| t))
            .find(|t| self.live(t, fx, scope).is_none());
        if let Some(topic) = dead_topic {
            return Ok(Err(WriteError::UnknownTopic(topic.name.clone())));
        }
        for (topic, appends) in &c.publishes {
            let topic = self.live(topic, fx, scope).expect("checked above");
            if let Err(e) = partitions_exist(&topic, appends.iter().map(|a| a.partition)) {
                return Ok(Err(e));
            }
        }
        let plugin = c.plugin.as_str();
        for (key, value) in &c.state {
            match value {
                Some(v) => t
                    .plugin_state
                    .insert((plugin, key.as_slice()), v.as_slice())?,
                None => t.plugin_state.remove((plugin, key.as_slice()))?,
            };
        }
        for (key, (due, attempt)) in &c.retry_puts {
            t.plugin_retries
                .insert((plugin, key.0, key.1, key.2), (*due, *attempt))?;
        }
        for key in &c.retry_deletes {
            t.plugin_retries.remove((plugin, key.0, key.1, key.2))?;
        }
        for (topic, appends) in c.publishes.iter_mut() {
            let topic = self.live(topic, fx, scope).expect("checked above");
            for append in appends.iter_mut() {
                self.append_with_ids(t, fx, &topic, append)?;
            }
        }
        for (topic, message) in &c.dead_letters {
            let topic = self.live(topic, fx, scope).expect("checked above");
            self.append_dead_letter(t, fx, &topic, message, c.now_ms)?;
        }
        for (topic_id, partition, offset) in &c.offsets {
            t.group_offsets
                .insert((c.group.as_str(), *topic_id, *partition), *offset)?;
            fx.committed
                .push((c.group.clone(), *topic_id, *partition, *offset));
        }
        Ok(Ok(WriteOutcome::PluginCommitted))
    }
}

/// The smallest string greater than every `(name, …)` key of `name`: the
/// name with a NUL appended (names never contain NUL).
pub(super) fn plugin_successor(name: &str) -> String {
    format!("{name}\0")
}
