//! One batch through the plugin: the call within its limits, and the
//! commit of its outcomes (acks, retries, dead letters, publishes, state)
//! in one command; failed calls, poison messages and their dead letters.

use super::*;
use crate::storage::batch;

impl Runner {
    pub(super) fn run_batch(&mut self, topic: &Arc<Topic>, handed: Vec<Handed>) {
        let messages: Vec<CallMessage<'_>> = handed
            .iter()
            .map(|h| CallMessage {
                message: &h.message,
                partition: h.partition,
                attempt: h.attempt,
            })
            .collect();
        let outcome = self.call(&topic.name, &messages);
        drop(messages);
        match outcome {
            Ok(outcomes) if outcomes.len() == handed.len() => {
                if let Some(acknowledged) = self.swap_acknowledged.take() {
                    let swap = acknowledged.elapsed();
                    tracing::info!(plugin = %self.name(), version = self.record.version, swap_ms = swap.as_millis() as u64, "new version handled its first batch");
                    self.shared
                        .counters
                        .last_swap_us
                        .store(swap.as_micros() as u64, Ordering::Relaxed);
                }
                self.commit(topic, &handed, outcomes);
            }
            Ok(outcomes) => {
                let error = format!(
                    "handle-batch returned {} outcomes for {} messages",
                    outcomes.len(),
                    handed.len()
                );
                self.failed_call(topic, &handed, error);
            }
            Err(error) => self.failed_call(topic, &handed, error),
        }
    }

    /// Call the plugin; on a trap the instance is dropped.
    pub(super) fn call(
        &mut self,
        topic: &str,
        messages: &[CallMessage<'_>],
    ) -> Result<Vec<Outcome>, String> {
        let limit = self.record.spec.limits.memory_bytes_max;
        if let Some(instance) = &self.instance {
            let used = instance.store.data().memory.current_bytes as u64;
            if used.saturating_mul(100) > limit.saturating_mul(INSTANCE_RECYCLE_MEMORY_PERCENT) {
                tracing::info!(
                    plugin = %self.name(),
                    memory_bytes = used,
                    limit_bytes = limit,
                    "replacing the plugin's instance between batches: its memory passed {INSTANCE_RECYCLE_MEMORY_PERCENT}% of its limit"
                );
                self.shared
                    .counters
                    .instances_recycled
                    .fetch_add(1, Ordering::Relaxed);
                self.instance = None;
            }
        }
        if self.instance.is_none() {
            self.instance = Some(instantiate(&self.state, &self.record.spec, &self.prepared)?);
        }
        let spec = &self.record.spec;
        let instance = self.instance.as_mut().expect("instance just made");
        instance.store.data_mut().reset_batch();
        instance
            .store
            .set_epoch_deadline(deadline_ticks(spec.limits.batch_time_ms_max));
        let output = instance.store.data().output.clone();
        output.begin_call();
        let started = Instant::now();
        let result = instance.call_batch(topic, messages);
        output.end_call();
        self.shared
            .counters
            .busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.shared.counters.memory_bytes.store(
            instance.store.data().memory.current_bytes as u64,
            Ordering::Relaxed,
        );
        result.map_err(|e| {
            let text = with_plugin_errors(describe_failure(&e, spec), &output);
            self.instance = None;
            text
        })
    }

    pub(super) fn commit(&mut self, topic: &Arc<Topic>, handed: &[Handed], outcomes: Vec<Outcome>) {
        let now_ms = self.state.now_ms();
        let group = self.record.spec.group_name();
        let attempts_max = self.limits().delivery_attempts_max;
        let (state_writes, publishes) = match self.instance.as_mut() {
            Some(i) => i.store.data_mut().take_effects(),
            None => Default::default(),
        };
        let published = publishes.len() as u64;
        // Publishes grow the log: below the disk watermark the batch waits,
        // whole, to be handed out again once space returns.
        if published > 0 && self.state.disk.is_low() {
            // The disk watch logged the state once; no warning per batch.
            self.shared
                .note_error("the broker's disk is below disk_free_min; publishes wait for space");
            self.instance = None;
            let retry_ms = crate::core::disk::DISK_FULL_RETRY_AFTER_MS;
            self.wait(Duration::from_millis(retry_ms.into()), false);
            return;
        }
        let mut commit = PluginCommit {
            plugin: self.record.spec.name.clone(),
            incarnation: self.record.incarnation,
            group: group.clone(),
            offsets: Vec::new(),
            state: state_writes,
            publishes: Vec::new(),
            retry_puts: Vec::new(),
            retry_deletes: Vec::new(),
            dead_letters: Vec::new(),
            now_ms,
        };
        match self.group_publishes(publishes, now_ms) {
            Ok(p) => commit.publishes = p,
            Err(error) => return self.retry_later(&error),
        }
        let (mut acked, mut retried, mut dead) = (0u64, 0u64, 0u64);
        let mut new_retries = Vec::new();
        let mut done_retries = Vec::new();
        let mut dlq = None;
        for (h, outcome) in handed.iter().zip(outcomes) {
            let key = (topic.id(), h.partition, h.message.offset);
            if let Origin::Retry = h.origin {
                done_retries.push((h.partition, h.message.offset));
            }
            let reason = match outcome {
                Outcome::Ack => {
                    acked += 1;
                    if let Origin::Retry = h.origin {
                        commit.retry_deletes.push(key);
                    }
                    continue;
                }
                Outcome::Retry(delay_ms) if h.attempt < attempts_max => {
                    retried += 1;
                    let due = now_ms + delay_ms as u64;
                    commit.retry_puts.push((key, (due, h.attempt + 1)));
                    new_retries.push(((due, h.partition, h.message.offset), h.attempt + 1));
                    continue;
                }
                Outcome::Retry(_) => format!(
                    "the plugin asked for a retry after delivery {} of {attempts_max}",
                    h.attempt
                ),
                Outcome::DeadLetter(mut reason) => {
                    truncate(&mut reason, DLQ_REASON_BYTES_MAX);
                    reason
                }
            };
            dead += 1;
            if let Origin::Retry = h.origin {
                commit.retry_deletes.push(key);
            }
            let dlq_topic = match &dlq {
                Some(t) => Arc::clone(t),
                None => match self.dlq_topic(&group) {
                    Ok(t) => {
                        dlq = Some(t.clone());
                        t
                    }
                    Err(e) => return self.retry_later(&e),
                },
            };
            commit
                .dead_letters
                .push((TopicRef::of(&dlq_topic), letter(topic, h, &reason)));
        }
        // Fresh messages are contiguous from the partition's position.
        let fresh_end = handed
            .iter()
            .filter(|h| matches!(h.origin, Origin::Fresh))
            .map(|h| (h.partition, h.message.offset + 1))
            .max_by_key(|(_, end)| *end);
        if let Some((p, end)) = fresh_end {
            commit.offsets.push((topic.id(), p, end));
        }
        match self
            .runtime
            .block_on(self.state.submit(Command::PluginCommit(Box::new(commit))))
        {
            Ok(_) => {}
            Err(e) => return self.commit_failed(&e),
        }
        // Committed: now the in-memory mirror follows.
        if let Some((p, end)) = fresh_end {
            self.positions[p as usize] = end;
            self.shared.positions.lock().expect("positions lock")[p as usize] = end;
        }
        let done: HashSet<(u32, u64)> = done_retries.into_iter().collect();
        self.retries.retain(|k, _| !done.contains(&(k.1, k.2)));
        self.retries.extend(new_retries);
        for h in handed {
            self.failed.remove(&(h.partition, h.message.offset));
        }
        let c = &self.shared.counters;
        c.pending_retries
            .store(self.retries.len() as u64, Ordering::Relaxed);
        c.consecutive_failures.store(0, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.acked.fetch_add(acked, Ordering::Relaxed);
        c.retried.fetch_add(retried, Ordering::Relaxed);
        c.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        c.published.fetch_add(published, Ordering::Relaxed);
        let processed = c
            .processed
            .fetch_add(handed.len() as u64, Ordering::Relaxed)
            + handed.len() as u64;
        let mut samples = self.shared.samples.lock().expect("samples lock");
        let now = Instant::now();
        samples.push_back((now, processed));
        while samples
            .front()
            .is_some_and(|(t, _)| now - *t > Duration::from_millis(RATE_WINDOW_MS * 2))
        {
            samples.pop_front();
        }
    }

    /// Route publishes to partitions and encode them, one append per
    /// (topic, partition).
    #[allow(clippy::type_complexity)]
    pub(super) fn group_publishes(
        &self,
        publishes: Vec<(String, msmq_protocol::NewMessage)>,
        now_ms: u64,
    ) -> Result<Vec<(TopicRef, Vec<PartitionAppend>)>, String> {
        let mut by_topic: BTreeMap<
            String,
            (Arc<Topic>, BTreeMap<u32, Vec<msmq_protocol::NewMessage>>),
        > = BTreeMap::new();
        for (name, message) in publishes {
            let entry = match by_topic.get_mut(&name) {
                Some(e) => e,
                None => {
                    let topic =
                        self.state.registry.get(&name).ok_or_else(|| {
                            format!("topic {name:?} was deleted while the batch ran")
                        })?;
                    by_topic.entry(name).or_insert((topic, BTreeMap::new()))
                }
            };
            let spread = entry.0.next_spread_partition();
            let p = entry
                .0
                .partition_for_key(message.key.as_ref().map(|k| k.as_slice()), spread);
            entry.1.entry(p).or_default().push(message);
        }
        Ok(by_topic
            .into_values()
            .map(|(topic, parts)| {
                let appends = parts
                    .into_iter()
                    .flat_map(|(p, messages)| {
                        messages
                            .chunks(PUBLISHED_PER_STORED_BATCH_MAX)
                            .map(|chunk| {
                                let records: Vec<&msmq_protocol::NewMessage> =
                                    chunk.iter().collect();
                                PartitionAppend {
                                    partition: p,
                                    count: records.len() as u32,
                                    key_hashes: crate::storage::key_hashes(records.iter().copied()),
                                    value: batch::encode(now_ms, &records),
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                (TopicRef::of(&topic), appends)
            })
            .collect())
    }

    pub(super) fn dlq_topic(&self, group: &str) -> Result<Arc<Topic>, String> {
        self.runtime
            .block_on(crate::core::ack::dlq_topic(&self.state, group))
            .map_err(|e| e.to_string())
    }

    /// Storage refused the batch's effects: nothing happened; try again
    /// (or stop, when the plugin was removed meanwhile).
    pub(super) fn commit_failed(&mut self, error: &WriteError) {
        if let WriteError::PluginGone(_) = error {
            tracing::info!(plugin = %self.name(), "plugin removed; its runner stops without committing its last batch");
            self.shared.request_stop();
            return;
        }
        self.retry_later(&error.to_string());
    }

    /// Something outside the plugin failed; nothing was kept. Wait a little.
    pub(super) fn retry_later(&mut self, error: &str) {
        tracing::warn!(plugin = %self.name(), error, "committing a plugin batch failed; it will be handed out again");
        self.shared.note_error(error);
        // The instance may hold in-memory results of the lost batch.
        self.instance = None;
        self.wait(Duration::from_millis(FAILURE_BACKOFF_MS_FIRST * 4), false);
    }

    /// A call failed: nothing of it is kept. Count the failure against each
    /// message, dead-letter a lone message that used up its attempts, back
    /// off, and pause the plugin after too many failures in a row.
    pub(super) fn failed_call(&mut self, topic: &Arc<Topic>, handed: &[Handed], error: String) {
        let c = &self.shared.counters;
        c.failed_batches.fetch_add(1, Ordering::Relaxed);
        let consecutive = c.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.note_error(&error);
        tracing::warn!(plugin = %self.name(), messages = handed.len(), consecutive, error = %error, "plugin call failed; nothing of it was kept");
        if let Some(i) = self.instance.as_mut() {
            i.store.data_mut().reset_batch();
        }
        for h in handed {
            *self
                .failed
                .entry((h.partition, h.message.offset))
                .or_insert(0) += 1;
        }
        if let [lone] = handed {
            if lone.attempt >= self.limits().delivery_attempts_max {
                self.dead_letter_poison(topic, lone, &error);
            }
        }
        let limit = self.limits().failures_before_pause;
        if consecutive >= limit {
            let why = format!("{consecutive} consecutive failed calls; last: {error}");
            tracing::error!(plugin = %self.name(), "plugin paused: {why}");
            match self
                .runtime
                .block_on(self.state.submit(Command::PluginSetPaused {
                    name: self.record.spec.name.clone(),
                    incarnation: self.record.incarnation,
                    paused: Some(why.clone()),
                })) {
                Ok(_) => {
                    self.record.paused = Some(why.clone());
                    self.shared.set_record_paused(Some(why));
                    return;
                }
                Err(e @ WriteError::PluginGone(_)) => return self.commit_failed(&e),
                Err(e) => {
                    tracing::error!(plugin = %self.name(), error = %e, "could not store the pause; backing off");
                }
            }
        }
        let backoff = FAILURE_BACKOFF_MS_FIRST
            .saturating_mul(1 << (consecutive - 1).min(16))
            .min(FAILURE_BACKOFF_MS_MAX);
        self.wait(Duration::from_millis(backoff), false);
    }

    pub(super) fn dead_letter_poison(&mut self, topic: &Arc<Topic>, h: &Handed, error: &str) {
        let group = self.record.spec.group_name();
        let dlq = match self.dlq_topic(&group) {
            Ok(t) => t,
            Err(e) => return self.retry_later(&e),
        };
        let key = (topic.id(), h.partition, h.message.offset);
        let reason = format!("failed {} deliveries: {error}", h.attempt);
        let letter = letter(topic, h, &reason);
        let fresh = matches!(h.origin, Origin::Fresh);
        let commit = PluginCommit {
            plugin: self.record.spec.name.clone(),
            incarnation: self.record.incarnation,
            group,
            offsets: if fresh {
                vec![(topic.id(), h.partition, h.message.offset + 1)]
            } else {
                vec![]
            },
            state: vec![],
            publishes: vec![],
            retry_puts: vec![],
            retry_deletes: if fresh { vec![] } else { vec![key] },
            dead_letters: vec![(TopicRef::of(&dlq), letter)],
            now_ms: self.state.now_ms(),
        };
        if let Err(e) = self
            .runtime
            .block_on(self.state.submit(Command::PluginCommit(Box::new(commit))))
        {
            return self.commit_failed(&e);
        }
        tracing::warn!(plugin = %self.name(), partition = h.partition, offset = h.message.offset, "poison message dead-lettered: {reason}");
        if fresh {
            self.positions[h.partition as usize] = h.message.offset + 1;
            self.shared.positions.lock().expect("positions lock")[h.partition as usize] =
                h.message.offset + 1;
        } else {
            self.retries
                .retain(|k, _| !(k.1 == h.partition && k.2 == h.message.offset));
        }
        self.failed.remove(&(h.partition, h.message.offset));
        let c = &self.shared.counters;
        c.dead_lettered.fetch_add(1, Ordering::Relaxed);
        c.processed.fetch_add(1, Ordering::Relaxed);
        c.pending_retries
            .store(self.retries.len() as u64, Ordering::Relaxed);
    }
}

/// The dead letter of a handed-out message.
pub(super) fn letter(topic: &Topic, h: &Handed, reason: &str) -> msmq_protocol::NewMessage {
    crate::core::ack::dead_letter(
        h.message.clone(),
        reason,
        &topic.name,
        h.partition,
        h.attempt,
    )
}

/// Cut `text` to at most `max` bytes at a character boundary.
pub(super) fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}
