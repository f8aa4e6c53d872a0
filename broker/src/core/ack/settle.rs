//! Settle what was handed out: ack, nack with back-off, change the
//! invisibility, expire leases; retries and dead letters are stored before
//! the lease is settled in memory, and the floor is committed after.

use super::*;

/// Store floors that moved (the group's committed offsets).
pub(super) async fn commit_floors(
    state: &BrokerState,
    group: &str,
    floors: BTreeMap<(u32, u32), u64>,
) {
    if floors.is_empty() {
        return;
    }
    let op = Command::CommitOffsets {
        group: group.to_string(),
        offsets: floors.into_iter().map(|((t, p), o)| (t, p, o)).collect(),
    };
    // A floor lower than the truth only means redelivery after a crash.
    if let Err(e) = state.submit(op).await {
        tracing::warn!(%group, error = %e, "could not store the acknowledged floor");
    }
}

pub(crate) async fn ack(
    state: &BrokerState,
    group: String,
    receipts: Vec<Receipt>,
) -> Result<Reply, ErrorReply> {
    let mut settled = vec![false; receipts.len()];
    let mut floors = BTreeMap::new();
    let mut retry_acks = Vec::new();
    {
        let mut reg = acks(state);
        let g = reg
            .groups
            .get_mut(&group)
            .ok_or_else(|| stale_or_missing(&group))?;
        for (i, r) in receipts.iter().enumerate() {
            let key = (r.topic_id, r.partition);
            let Some(p) = g.partitions.get_mut(&key) else {
                continue;
            };
            let Some(lease) = p.current(r) else { continue };
            if lease.retry {
                p.mark_settling(r.offset, true);
                retry_acks.push((i, (r.topic_id, r.partition, r.offset)));
            } else {
                if let Some(floor) = p.settle(r.offset) {
                    floors.insert(key, floor);
                }
                p.release_key(r.offset);
                settled[i] = true;
            }
        }
    }
    if !retry_acks.is_empty() {
        let op = Command::Settle {
            group: group.clone(),
            retry_puts: vec![],
            retry_deletes: retry_acks.iter().map(|(_, k)| *k).collect(),
            dead_letters: vec![],
            now_ms: state.now_ms(),
        };
        let ok = state.submit(op).await.is_ok();
        let mut reg = acks(state);
        if let Some(g) = reg.groups.get_mut(&group) {
            for (i, k) in retry_acks {
                if let Some(p) = g.partitions.get_mut(&(k.0, k.1)) {
                    if ok {
                        p.settle(k.2);
                        p.release_key(k.2);
                        settled[i] = true;
                    } else {
                        p.mark_settling(k.2, false);
                    }
                }
            }
        }
    }
    commit_floors(state, &group, floors).await;
    Ok(Reply::Settled(settled))
}

pub(crate) async fn nack(
    state: &BrokerState,
    group: String,
    receipts: Vec<Receipt>,
    reason: String,
) -> Result<Reply, ErrorReply> {
    let mut settled = Vec::with_capacity(receipts.len());
    for r in receipts {
        let lease = {
            let mut reg = acks(state);
            let g = reg
                .groups
                .get_mut(&group)
                .ok_or_else(|| stale_or_missing(&group))?;
            let lease = g
                .partitions
                .get_mut(&(r.topic_id, r.partition))
                .and_then(|p| {
                    let lease = p.current(&r);
                    if lease.is_some() {
                        p.mark_settling(r.offset, true);
                    }
                    lease
                });
            lease
        };
        match lease {
            Some(lease) => {
                let reason = if reason.is_empty() {
                    "negatively acknowledged".to_string()
                } else {
                    reason.clone()
                };
                settled.push(
                    fail(
                        state,
                        &group,
                        (r.topic_id, r.partition, r.offset),
                        lease,
                        reason,
                    )
                    .await,
                );
            }
            None => settled.push(false),
        }
    }
    Ok(Reply::Settled(settled))
}

/// A delivery failed (nack or lease expiry): schedule the retry, or
/// dead-letter after the last attempt. The lease must be marked settling.
pub(super) async fn fail(
    state: &BrokerState,
    group: &str,
    key: (u32, u32, u64),
    lease: Lease,
    reason: String,
) -> bool {
    let now = state.now_ms();
    let policy = acks(state)
        .groups
        .get(group)
        .map(|g| g.policy.clone())
        .unwrap_or_default();
    let after = policy.after_failure(lease.attempt, now);
    let outcome: Result<Option<RetryRecord>, String> = async {
        match after {
            AfterFailure::RetryAt(due_ms) => {
                let record = RetryRecord {
                    attempt: lease.attempt + 1,
                    due_ms,
                    reason: reason.clone(),
                };
                state
                    .submit(Command::Settle {
                        group: group.to_string(),
                        retry_puts: vec![(key, record.clone())],
                        retry_deletes: vec![],
                        dead_letters: vec![],
                        now_ms: now,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                crate::metrics::global().retries.inc();
                Ok(Some(record))
            }
            AfterFailure::DeadLetter => {
                let topic = topic_by_id(state, key.0);
                let message = match &topic {
                    Some(t) => message_at(state, t, key.1, key.2)
                        .await
                        .map_err(|e| e.to_string())?,
                    None => None,
                };
                let mut dead_letters = Vec::new();
                if let (Some(topic), Some(m)) = (topic, message) {
                    let dlq = dlq_topic(state, group).await.map_err(|e| e.to_string())?;
                    let letter = dead_letter(m, &reason, &topic.name, key.1, lease.attempt);
                    dead_letters.push((TopicRef::of(&dlq), letter));
                }
                state
                    .submit(Command::Settle {
                        group: group.to_string(),
                        retry_puts: vec![],
                        retry_deletes: if lease.retry { vec![key] } else { vec![] },
                        dead_letters,
                        now_ms: now,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(%group, topic_id = key.0, partition = key.1, offset = key.2,
                    attempts = lease.attempt, %reason, "message dead-lettered");
                Ok(None)
            }
        }
    }
    .await;
    let mut floors = BTreeMap::new();
    let ok = {
        let mut reg = acks(state);
        let Some(g) = reg.groups.get_mut(group) else {
            return false;
        };
        let Some(p) = g.partitions.get_mut(&(key.0, key.1)) else {
            return false;
        };
        match outcome {
            Ok(retry) => {
                if let Some(floor) = p.settle(key.2) {
                    floors.insert((key.0, key.1), floor);
                }
                match retry {
                    // The key stays taken until the retry is settled.
                    Some(record) => g.retries.insert(key, record),
                    None => p.release_key(key.2),
                }
                true
            }
            Err(e) => {
                tracing::warn!(%group, error = %e, "could not record a failed delivery; will try again");
                p.mark_settling(key.2, false);
                false
            }
        }
    };
    commit_floors(state, group, floors).await;
    ok
}

pub(crate) async fn change_invisibility(
    state: &BrokerState,
    group: String,
    receipt: Receipt,
    invisibility_ms: u32,
) -> Result<Reply, ErrorReply> {
    if !(INVISIBILITY_MS_MIN..=INVISIBILITY_MS_MAX).contains(&invisibility_ms) {
        return Err(invalid(format!(
            "invisibility must be {INVISIBILITY_MS_MIN}..={INVISIBILITY_MS_MAX} ms, not {invisibility_ms}"
        )));
    }
    let until = state.now_ms() + invisibility_ms as u64;
    let mut reg = acks(state);
    let nonce = reg.next_nonce();
    let g = reg
        .groups
        .get_mut(&group)
        .ok_or_else(|| stale_or_missing(&group))?;
    let p = g.partitions.get_mut(&(receipt.topic_id, receipt.partition));
    match p {
        Some(p) if p.current(&receipt).is_some() => {
            p.extend(receipt.offset, until, nonce);
            Ok(Reply::Leased { receipt: Receipt { nonce, ..receipt }, invisible_until_ms: until })
        }
        _ => Err(ErrorReply::new(
            ErrorCode::INVALID_ARGUMENT,
            "stale receipt: the lease ended or was replaced; the message is or will be delivered again",
        )),
    }
}

pub(crate) async fn configure(
    state: &BrokerState,
    group: String,
    max_delivery_attempts: u32,
    retry_backoff_ms: Vec<u64>,
    ordered: bool,
) -> Result<Reply, ErrorReply> {
    validate_name("group", &group).map_err(invalid)?;
    let policy = RetryPolicy {
        max_delivery_attempts,
        retry_backoff_ms,
        ordered,
    };
    policy.validate().map_err(invalid)?;
    state
        .submit(Command::SetPolicy {
            group: group.clone(),
            policy: policy.clone(),
        })
        .await
        .map_err(from_write)?;
    acks(state).groups.entry(group.clone()).or_default().policy = policy;
    tracing::info!(%group, max_delivery_attempts, "retry policy set");
    Ok(Reply::Done)
}

/// Turn leases whose invisibility ran out into retries (or dead letters).
pub(crate) async fn expire_leases(state: Arc<BrokerState>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(LEASE_SWEEP_MS));
    loop {
        ticker.tick().await;
        if state.is_shutting_down() {
            return;
        }
        let now = state.now_ms();
        let mut expired = Vec::new();
        {
            let mut reg = acks(&state);
            for (group, g) in reg.groups.iter_mut() {
                for (key, p) in g.partitions.iter_mut() {
                    for (offset, lease) in p.expired(now) {
                        if expired.len() >= EXPIRED_PER_SWEEP_MAX {
                            break;
                        }
                        p.mark_settling(offset, true);
                        expired.push((group.clone(), (key.0, key.1, offset), lease));
                    }
                }
            }
        }
        for (group, key, lease) in expired {
            fail(
                &state,
                &group,
                key,
                lease,
                "invisibility timed out without an ack".into(),
            )
            .await;
        }
    }
}
