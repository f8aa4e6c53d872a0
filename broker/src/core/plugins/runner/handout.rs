//! What a runner hands its plugin next: retries that are due, then fresh
//! messages from its positions, read from the log in one pass.

use super::*;

impl Runner {
    pub(super) fn load_progress(
        &mut self,
        topic: &Topic,
    ) -> Result<(), crate::storage::StorageError> {
        let db = self.state.store.db();
        let group = self.record.spec.group_name();
        let mut positions = Vec::with_capacity(topic.partition_count() as usize);
        for p in 0..topic.partition_count() {
            let start = topic.partition(p).map_or(0, |o| o.start());
            let committed = read::group_offset(db, &group, topic.id(), p)?;
            positions.push(committed.unwrap_or(start).max(start));
        }
        self.retries = read::plugin_retries(db, self.name())?
            .into_iter()
            .filter(|((t, _, _), _)| *t == topic.id())
            .map(|((_, p, o), (due, attempt))| ((due, p, o), attempt))
            .collect();
        self.shared
            .counters
            .pending_retries
            .store(self.retries.len() as u64, Ordering::Relaxed);
        *self.shared.positions.lock().expect("positions lock") = positions.clone();
        self.positions = positions;
        self.failed.clear();
        Ok(())
    }

    /// The next messages to hand out, at most the quota's burst; `None`
    /// when there is nothing to do now.
    pub(super) fn next_batch(&mut self, topic: &Arc<Topic>) -> Option<Vec<Handed>> {
        let mut max = self.limits().batch_messages_max as u64;
        max = max.min(self.messages_quota.burst()).max(1);
        let handed = match self.due_retries(topic, max as usize) {
            Some(h) => h,
            None => self.fresh(topic, max as usize)?,
        };
        let now = Instant::now();
        self.messages_quota.take(handed.len() as u64, now);
        let bytes: usize = handed.iter().map(|h| h.message.payload.len()).sum();
        self.bytes_quota.take(bytes as u64, now);
        Some(handed)
    }

    pub(super) fn due_retries(&mut self, topic: &Topic, max: usize) -> Option<Vec<Handed>> {
        let now_ms = self.state.now_ms();
        let due: Vec<(u64, u32, u64)> = self
            .retries
            .range(..=(now_ms, u32::MAX, u64::MAX))
            .map(|(k, _)| *k)
            .take(max)
            .collect();
        if due.is_empty() {
            return None;
        }
        let mut handed = Vec::new();
        let mut expired = Vec::new();
        for key in due {
            let (_, partition, offset) = key;
            if offset < topic.partition(partition).map_or(0, |o| o.start()) {
                // Retention removed the message: there is nothing to retry.
                expired.push(key);
                continue;
            }
            let failed_before = self.failed.contains_key(&(partition, offset));
            if failed_before && !handed.is_empty() {
                break;
            }
            let attempt =
                self.retries[&key] + self.failed.get(&(partition, offset)).copied().unwrap_or(0);
            match self.read(topic, partition, offset, offset + 1, 1) {
                Some(mut messages) if !messages.is_empty() => {
                    handed.push(Handed {
                        message: messages.remove(0),
                        partition,
                        attempt,
                        origin: Origin::Retry,
                    });
                }
                Some(_) => {
                    // Past the partition's end: only a corrupt retry row
                    // points there. Keep it (and say so) rather than lose it.
                    tracing::warn!(plugin = %self.name(), partition, offset, "retry of a message that does not exist; skipped");
                    break;
                }
                None => break,
            }
            if failed_before {
                break;
            }
        }
        if !expired.is_empty() {
            self.forget_retries(topic, expired);
        }
        (!handed.is_empty()).then_some(handed)
    }

    /// Delete retries of messages retention removed.
    pub(super) fn forget_retries(&mut self, topic: &Topic, keys: Vec<(u64, u32, u64)>) {
        let commit = PluginCommit {
            plugin: self.record.spec.name.clone(),
            incarnation: self.record.incarnation,
            group: self.record.spec.group_name(),
            offsets: vec![],
            state: vec![],
            publishes: vec![],
            retry_puts: vec![],
            retry_deletes: keys.iter().map(|k| (topic.id(), k.1, k.2)).collect(),
            dead_letters: vec![],
            now_ms: self.state.now_ms(),
        };
        match self
            .runtime
            .block_on(self.state.submit(Command::PluginCommit(Box::new(commit))))
        {
            Ok(_) => {
                tracing::info!(plugin = %self.name(), retries = keys.len(), "retries of messages removed by retention dropped");
                for key in keys {
                    self.retries.remove(&key);
                    self.failed.remove(&(key.1, key.2));
                }
                self.shared
                    .counters
                    .pending_retries
                    .store(self.retries.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(plugin = %self.name(), error = %e, "could not drop expired retries; will try again")
            }
        }
    }

    pub(super) fn fresh(&mut self, topic: &Topic, max: usize) -> Option<Vec<Handed>> {
        let count = topic.partition_count();
        for i in 0..count {
            let p = (self.next_partition + i) % count;
            let end = topic.partition(p).map_or(0, |o| o.end());
            let from = self.positions.get(p as usize).copied().unwrap_or(0);
            if from >= end {
                continue;
            }
            self.next_partition = (p + 1) % count;
            // A message of a failed call goes alone; others stop before it.
            let mut max = max;
            if self.failed.contains_key(&(p, from)) {
                max = 1;
            } else if let Some(first_failed) =
                (from..end.min(from + max as u64)).find(|o| self.failed.contains_key(&(p, *o)))
            {
                max = (first_failed - from) as usize;
            }
            let messages = self.read(topic, p, from, end, max)?;
            if messages.is_empty() {
                continue;
            }
            return Some(
                messages
                    .into_iter()
                    .map(|m| Handed {
                        attempt: 1 + self.failed.get(&(p, m.offset)).copied().unwrap_or(0),
                        message: m,
                        partition: p,
                        origin: Origin::Fresh,
                    })
                    .collect(),
            );
        }
        None
    }

    pub(super) fn read(
        &self,
        topic: &Topic,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Option<Vec<msmq_protocol::Message>> {
        match read::read_partition(
            self.state.store.db(),
            self.state.store.segments(),
            self.state.store.store_id(),
            topic.id(),
            partition,
            from,
            end,
            max,
            BATCH_READ_BYTES_MAX,
        ) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(plugin = %self.name(), error = %e, "reading a batch failed");
                None
            }
        }
    }
}
