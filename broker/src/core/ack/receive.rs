//! Receive with a lease: hand out due retries first, then fresh messages
//! from the group's floors, within the unsettled limit per partition and
//! in key order for ordered groups.

use super::settle::commit_floors;
use super::*;

pub(crate) async fn receive(
    state: &BrokerState,
    group: String,
    member_id: u64,
    limits: FetchLimits,
    invisibility_ms: u32,
) -> Result<Reply, ErrorReply> {
    if !(INVISIBILITY_MS_MIN..=INVISIBILITY_MS_MAX).contains(&invisibility_ms) {
        return Err(invalid(format!(
            "invisibility must be {INVISIBILITY_MS_MIN}..={INVISIBILITY_MS_MAX} ms, not {invisibility_ms}"
        )));
    }
    let limits = clamp(state, limits)?;
    validate_name("group", &group).map_err(invalid)?;
    // Members only: no state is created for groups nobody joined.
    state
        .with_groups(|g, _| g.heartbeat(&group, member_id, Instant::now()))
        .map_err(crate::core::from_group)?;
    ensure_group(state, &group).await?;
    let deadline = tokio::time::Instant::now() + limits.wait;
    let mut appended = state.registry.subscribe_appended();
    loop {
        appended.borrow_and_update();
        let plan = state
            .with_groups(|g, _| g.poll_targets(&group, member_id, Instant::now()))
            .map_err(crate::core::from_group)?;
        let (assignment, targets, session_timeout, filter) = (
            plan.assignment,
            plan.targets,
            plan.session_timeout,
            plan.filter,
        );
        let mut filtered_floors = BTreeMap::new();
        let mut skipped_by_filter = false;
        let now = state.now_ms();
        let until = now + invisibility_ms as u64;
        let mut out = Handouts {
            batches: Vec::new(),
            left: limits.max_messages,
            bytes_left: limits.max_bytes,
        };
        for target in targets {
            if out.full() {
                break;
            }
            let tp = &target.partition;
            let Some(topic) = state.registry.get(&tp.topic) else {
                continue;
            };
            let key = (topic.id(), tp.partition);
            let known = acks(state)
                .groups
                .get(&group)
                .is_some_and(|g| g.partitions.contains_key(&key));
            if !known {
                let Some(floor) = initial_position(state, &group, tp, target.start).await? else {
                    continue;
                };
                let (retried, ordered) = acks(state)
                    .groups
                    .get(&group)
                    .map(|g| (g.retries.offsets_of(key.0, key.1), g.policy.ordered))
                    .unwrap_or_default();
                // Ordered groups: a message waiting for its retry keeps its key
                // across restarts, so later messages of the key wait too.
                let mut retry_keys = Vec::new();
                if ordered {
                    for offset in &retried {
                        if let Some(k) = message_at(state, &topic, key.1, *offset)
                            .await?
                            .and_then(|m| m.key)
                        {
                            retry_keys.push((*offset, crate::storage::key_hash(&k)));
                        }
                    }
                }
                if let Some(g) = acks(state).groups.get_mut(&group) {
                    g.partitions.entry(key).or_insert_with(|| {
                        // Stored retries above the floor are settled already.
                        let mut leases = PartitionLeases::new(floor);
                        for offset in retried {
                            leases.settled_by_retry(offset);
                        }
                        for (offset, key_hash) in retry_keys {
                            leases.claim_key(key_hash, offset);
                        }
                        leases
                    });
                }
            }
            // Retries that are due come first.
            let due = acks(state)
                .groups
                .get(&group)
                .map(|g| g.retries.due(key.0, key.1, now, out.left))
                .unwrap_or_default();
            for (offset, record) in due {
                let nonce = {
                    let mut reg = acks(state);
                    let nonce = reg.next_nonce();
                    let Some(g) = reg.groups.get_mut(&group) else {
                        continue;
                    };
                    let Some(p) = g.partitions.get_mut(&key) else {
                        continue;
                    };
                    if p.lease_of(offset).is_some() {
                        continue;
                    }
                    // Re-check under the lock: another receive may have taken
                    // (and settled or rescheduled) it since `due` was read.
                    match g.retries.get((key.0, key.1, offset)) {
                        Some(current) if current.due_ms <= now && *current == record => {}
                        _ => continue,
                    }
                    g.retries.remove((key.0, key.1, offset));
                    p.lease(offset, record.attempt, until, nonce, true);
                    nonce
                };
                // Durable: after a crash it is visible again once the lease ends.
                let leased = RetryRecord {
                    due_ms: until,
                    ..record.clone()
                };
                let message = message_at(state, &topic, key.1, offset).await?;
                let op = Command::Settle {
                    group: group.clone(),
                    retry_puts: if message.is_some() {
                        vec![((key.0, key.1, offset), leased)]
                    } else {
                        vec![]
                    },
                    retry_deletes: if message.is_none() {
                        vec![(key.0, key.1, offset)]
                    } else {
                        vec![]
                    },
                    dead_letters: vec![],
                    now_ms: now,
                };
                let written = state.submit(op).await;
                let Some(message) = message.filter(|_| written.is_ok()) else {
                    // Gone from the log (or not recorded): forget it, or put it back.
                    let mut reg = acks(state);
                    if let Some(g) = reg.groups.get_mut(&group) {
                        if let Some(p) = g.partitions.get_mut(&key) {
                            p.settle(offset);
                        }
                        if written.is_err() {
                            g.retries.insert((key.0, key.1, offset), record);
                        }
                    }
                    continue;
                };
                out.push(
                    &tp.topic,
                    key,
                    Handout {
                        offset,
                        nonce,
                        attempt: record.attempt,
                        until,
                    },
                    message,
                );
            }
            if out.full() {
                break;
            }
            // Ordered mode: messages held back for their key, whose key is free now.
            let ordered = acks(state)
                .groups
                .get(&group)
                .is_some_and(|g| g.policy.ordered);
            let held = acks(state)
                .groups
                .get(&group)
                .and_then(|g| g.partitions.get(&key))
                .is_some_and(|p| p.has_held());
            if ordered || held {
                let ready: Vec<(u64, u64)> = {
                    let mut reg = acks(state);
                    let Some(p) = reg
                        .groups
                        .get_mut(&group)
                        .and_then(|g| g.partitions.get_mut(&key))
                    else {
                        continue;
                    };
                    // No longer ordered: what was held goes out now.
                    let ready = if ordered {
                        p.take_ready(out.left)
                    } else {
                        p.take_all_held(out.left)
                    };
                    let nonces: Vec<u64> = ready.iter().map(|_| reg.next_nonce()).collect();
                    let Some(p) = reg
                        .groups
                        .get_mut(&group)
                        .and_then(|g| g.partitions.get_mut(&key))
                    else {
                        continue;
                    };
                    ready
                        .into_iter()
                        .zip(nonces)
                        .map(|((offset, key_hash), nonce)| {
                            if ordered {
                                p.claim_key(key_hash, offset);
                            }
                            p.lease(offset, 1, until, nonce, false);
                            (offset, nonce)
                        })
                        .collect()
                };
                for (offset, nonce) in ready {
                    match message_at(state, &topic, key.1, offset).await? {
                        Some(message) => {
                            out.push(
                                &tp.topic,
                                key,
                                Handout {
                                    offset,
                                    nonce,
                                    attempt: 1,
                                    until,
                                },
                                message,
                            );
                        }
                        None => {
                            // Gone from the log: nothing to deliver or wait for.
                            let mut reg = acks(state);
                            if let Some(p) = reg
                                .groups
                                .get_mut(&group)
                                .and_then(|g| g.partitions.get_mut(&key))
                            {
                                p.settle(offset);
                                p.release_key(offset);
                            }
                        }
                    }
                }
                if out.full() {
                    break;
                }
            }
            // Then new messages from the log, while the partition has room.
            let Some((from, room)) = acks(state)
                .groups
                .get(&group)
                .and_then(|g| g.partitions.get(&key))
                .map(|p| (p.next, p.room(UNSETTLED_PER_PARTITION_MAX)))
            else {
                continue;
            };
            if room == 0 {
                continue;
            }
            let messages = read_messages(
                state,
                &topic,
                key.1,
                from,
                out.left.min(room),
                out.bytes_left,
            )
            .await?;
            let mut reg = acks(state);
            for message in messages {
                let nonce = reg.next_nonce();
                let Some(p) = reg
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.partitions.get_mut(&key))
                else {
                    break;
                };
                // Another receive of this group took it meanwhile.
                if message.offset < p.next || p.lease_of(message.offset).is_some() {
                    continue;
                }
                // A stored retry owns it (after a restart): not a fresh message.
                if p.skip_settled(message.offset) {
                    continue;
                }
                // Left out by the member's filter: settled without delivery.
                if !filter.matches(&message) {
                    skipped_by_filter = true;
                    p.lease(message.offset, 1, until, nonce, false);
                    if let Some(floor) = p.settle(message.offset) {
                        filtered_floors.insert(key, floor);
                    }
                    continue;
                }
                // Ordered mode: a key's next message waits for the previous one.
                if ordered {
                    if let Some(k) = &message.key {
                        let key_hash = crate::storage::key_hash(k);
                        if !p.claim_key(key_hash, message.offset) {
                            p.hold(message.offset, key_hash);
                            continue;
                        }
                    }
                }
                p.lease(message.offset, 1, until, nonce, false);
                out.push(
                    &tp.topic,
                    key,
                    Handout {
                        offset: message.offset,
                        nonce,
                        attempt: 1,
                        until,
                    },
                    message,
                );
            }
        }
        let filtered_any = !filtered_floors.is_empty() || skipped_by_filter;
        commit_floors(state, &group, std::mem::take(&mut filtered_floors)).await;
        if out.batches.is_empty() && filtered_any && tokio::time::Instant::now() < deadline {
            continue; // everything read was filtered out: read on at once
        }
        // Retries fall due without an append: look again at least every 100 ms then.
        let retries_waiting = acks(state)
            .groups
            .get(&group)
            .is_some_and(|g| !g.retries.is_empty());
        let mut wake = deadline.min(tokio::time::Instant::now() + session_timeout / 2);
        if retries_waiting {
            wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(100));
        }
        let done = !out.batches.is_empty()
            || (!wait_for_append(state, &mut appended, wake).await
                && (state.is_shutting_down() || tokio::time::Instant::now() >= deadline));
        if done {
            return Ok(Reply::Received {
                assignment,
                batches: out.batches,
            });
        }
    }
}

/// One lease being handed out in a reply.
struct Handout {
    offset: u64,
    nonce: u64,
    attempt: u32,
    until: u64,
}

/// The reply being built: leased messages grouped by partition, and what
/// is left of the request's message and byte budget.
struct Handouts {
    batches: Vec<LeasedBatch>,
    left: usize,
    bytes_left: usize,
}

impl Handouts {
    pub(super) fn full(&self) -> bool {
        self.left == 0 || self.bytes_left == 0
    }

    /// Add a leased message, charging it to the budget.
    fn push(
        &mut self,
        topic: &str,
        (topic_id, partition): (u32, u32),
        lease: Handout,
        message: Message,
    ) {
        self.left = self.left.saturating_sub(1);
        self.bytes_left = self.bytes_left.saturating_sub(message.payload.len());
        let leased = LeasedMessage {
            attempt: lease.attempt,
            receipt: Receipt {
                topic_id,
                partition,
                offset: lease.offset,
                nonce: lease.nonce,
            },
            invisible_until_ms: lease.until,
            message,
        };
        match self.batches.last_mut() {
            Some(b) if b.partition == partition && b.topic == topic => b.messages.push(leased),
            _ => self.batches.push(LeasedBatch {
                topic: topic.to_string(),
                partition,
                messages: vec![leased],
            }),
        }
    }
}
