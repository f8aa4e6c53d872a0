//! Idempotent producers: ids and epochs, and the sequence check of a
//! sequenced request (the decisions are in `crate::producers`).

use super::*;

impl Writer {
    /// Apply a command of this family.
    pub(super) fn apply_producers(
        &self,
        command: &mut Command,
        t: &mut Tables,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        Ok(match command {
            Command::InitProducer {
                producer_id,
                principal,
                now_ms,
                idle_expiry_ms,
                producers_max,
            } => init_producer(
                t,
                *producer_id,
                principal,
                *now_ms,
                *idle_expiry_ms,
                *producers_max,
            )?,
            Command::ExpireProducers {
                now_ms,
                idle_expiry_ms,
            } => Ok(WriteOutcome::ProducersExpired(expire_producers(
                t,
                *now_ms,
                *idle_expiry_ms,
            )?)),
            other => return Ok(Err(misrouted(other))),
        })
    }
}

/// Names and ids created or deleted earlier in the same transaction.
/// Count what a committed request did that metrics report: dead letters and
/// plugin retries (only after the commit, so a failed one counts nothing).
/// The producer's verdict on a claim: `Ok(None)` to store it, `Ok(Some)`
/// for a repeat, `Err` to refuse it. The outer error is storage's.
pub(super) fn admit_claim(
    t: &Tables<'_>,
    claim: &Claim,
) -> Result<Result<Option<StoredReply>, WriteError>, StorageError> {
    let record = read_producer(t, claim.producer_id)?;
    Ok(match producers::admit(record.as_ref(), claim) {
        Ok(Admission::New) => Ok(None),
        Ok(Admission::Repeat(reply)) => Ok(Some(reply)),
        Err(e) => Err(WriteError::Producer(e)),
    })
}

/// Record a stored request in its producer's record (admitted just before,
/// in the same transaction, so the record is there).
pub(super) fn remember_claim(
    t: &mut Tables<'_>,
    claim: &Claim,
    reply: StoredReply,
) -> Result<(), StorageError> {
    let Some(mut record) = read_producer(t, claim.producer_id)? else {
        return Err(StorageError::Corrupt(format!(
            "producer {} vanished within a transaction",
            claim.producer_id
        )));
    };
    record.remember(claim, reply);
    t.producers
        .insert(claim.producer_id, encode(&record).as_slice())?;
    Ok(())
}

pub(super) fn read_producer(
    t: &Tables<'_>,
    producer_id: u64,
) -> Result<Option<ProducerRecord>, StorageError> {
    match t.producers.get(producer_id)? {
        Some(v) => Ok(Some(decode(v.value(), "producer record")?)),
        None => Ok(None),
    }
}

pub(super) fn init_producer(
    t: &mut Tables<'_>,
    producer_id: Option<u64>,
    principal: &str,
    now_ms: u64,
    idle_expiry_ms: u64,
    producers_max: u32,
) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
    if let Some(id) = producer_id {
        let mut record = match read_producer(t, id)? {
            Some(r) if !r.is_expired(now_ms, idle_expiry_ms) => r,
            _ => return Ok(Err(ProducerError::Unknown(id).into())),
        };
        if record.principal != principal {
            return Ok(Err(ProducerError::NotYours(id).into()));
        }
        record.bump_epoch(now_ms);
        t.producers.insert(id, encode(&record).as_slice())?;
        return Ok(Ok(WriteOutcome::ProducerInit(id, record.epoch)));
    }
    if t.producers.len()? >= producers_max as u64
        && (expire_producers(t, now_ms, idle_expiry_ms)? == 0
            || t.producers.len()? >= producers_max as u64)
    {
        return Ok(Err(WriteError::ProducersFull(producers_max)));
    }
    let id = t
        .meta
        .get(tables::META_NEXT_PRODUCER_ID)?
        .map_or(1, |v| v.value());
    t.meta.insert(tables::META_NEXT_PRODUCER_ID, id + 1)?;
    let record = ProducerRecord::new(principal.to_string(), now_ms);
    t.producers.insert(id, encode(&record).as_slice())?;
    Ok(Ok(WriteOutcome::ProducerInit(id, record.epoch)))
}

/// Remove the producer records idle past the expiry; how many went.
pub(super) fn expire_producers(
    t: &mut Tables<'_>,
    now_ms: u64,
    idle_expiry_ms: u64,
) -> Result<u64, StorageError> {
    let mut idle = Vec::new();
    for entry in t.producers.iter()? {
        let (id, value) = entry?;
        let record: ProducerRecord = decode(value.value(), "producer record")?;
        if record.is_expired(now_ms, idle_expiry_ms) {
            idle.push(id.value());
        }
    }
    for id in &idle {
        t.producers.remove(id)?;
    }
    Ok(idle.len() as u64)
}
