//! Idempotent producers, as pure logic: no I/O, time passed in.
//!
//! Owns: [`ProducerRecord`], stored per producer id (table `producers`), and
//! the rules that decide whether a sequenced request is new, a retry of a
//! stored one (answered with the stored reply), or refused.
//!
//! Invariants:
//! - A producer's requests are stored in sequence order with no gap: a
//!   request is stored only if it starts at the record's `next_sequence`.
//!   So every sequence below `next_sequence` was stored, exactly once.
//! - A retry of one of the last [`PRODUCER_REQUESTS_REMEMBERED`] requests
//!   gets that request's original reply; an older one gets
//!   `DUPLICATE_SEQUENCE`; neither stores anything.
//! - A request of an epoch older than the record's is never stored.
//! - A record idle for longer than the idle expiry counts as gone, whether
//!   or not the sweep has removed it yet.
//!
//! Why per producer and not per partition (as Kafka numbers them): a
//! request is stored in one commit whatever partitions it spans, and the
//! broker, not the client, routes keyless messages, so the request is the
//! unit a retry repeats.

use msmq_protocol::{HalfAck, MessageAck, MessageId, SCHEDULED_OFFSET};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use thiserror::Error;

/// How many of a producer's latest requests the broker keeps the replies
/// of, to answer their retries (Kafka keeps 5 batches per partition, its
/// `max.in.flight.requests.per.connection` limit for idempotence).
pub const PRODUCER_REQUESTS_REMEMBERED: usize = 5;

/// Everything the broker keeps about one idempotent producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerRecord {
    /// Who got the id; only they may use it.
    pub principal: String,
    pub epoch: u32,
    /// The sequence the next new request must start at.
    pub next_sequence: u64,
    /// Broker time of the last request that used the id, ms since the epoch.
    pub last_used_ms: u64,
    /// The latest requests, oldest first.
    pub remembered: VecDeque<Remembered>,
}

/// One stored request and its reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub sequence: u64,
    pub count: u32,
    pub reply: StoredReply,
}

/// The reply of a stored request, as kept for its retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredReply {
    Produced(Placement),
    /// (transaction id, message sequence, partition) per half message.
    HalfStored(Vec<(u64, u64, u32)>),
}

/// The acknowledgements of half messages stored as `halves`.
pub fn half_acks(halves: &[(u64, u64, u32)], store_id: u64) -> Vec<HalfAck> {
    halves
        .iter()
        .map(|&(tx_id, sequence, partition)| HalfAck {
            tx_id,
            id: MessageId::new(store_id, sequence),
            partition,
        })
        .collect()
}

/// Where a message of a produce went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Slot {
    /// Appended to this partition's log.
    Log(u32),
    /// Scheduled for later delivery to this partition.
    Scheduled(u32),
}

/// Where a produce's messages landed, compactly: a run per stretch of
/// messages with the same slot (a keyless request is one run), one entry
/// per partition appended to, one sequence per scheduled message. The
/// acknowledgements follow from it ([`Placement::acks`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub runs: Vec<(Slot, u32)>,
    /// (partition, base offset, base message sequence) per append.
    pub appended: Vec<(u32, u64, u64)>,
    /// The message sequence of each scheduled message, in message order.
    pub scheduled: Vec<u64>,
}

impl Placement {
    /// `slots` per message in request order; the appends' (partition, base
    /// offset, base sequence); the scheduled messages' sequences.
    pub fn new(slots: &[Slot], appended: Vec<(u32, u64, u64)>, scheduled: Vec<u64>) -> Placement {
        let mut runs: Vec<(Slot, u32)> = Vec::new();
        for slot in slots {
            match runs.last_mut() {
                Some((last, n)) if last == slot => *n += 1,
                _ => runs.push((*slot, 1)),
            }
        }
        Placement {
            runs,
            appended,
            scheduled,
        }
    }

    /// One acknowledgement per message, in request order: the messages of
    /// one partition take consecutive offsets and ids from its append's
    /// base, in request order.
    pub fn acks(&self, store_id: u64) -> Vec<MessageAck> {
        let mut taken: Vec<u64> = vec![0; self.appended.len()];
        let mut scheduled = self.scheduled.iter();
        let mut acks = Vec::new();
        for (slot, n) in &self.runs {
            for _ in 0..*n {
                let ack = match slot {
                    Slot::Log(p) => self.appended.iter().position(|(q, _, _)| q == p).map(|i| {
                        let (_, base, sequence) = self.appended[i];
                        let k = taken[i];
                        taken[i] += 1;
                        MessageAck {
                            partition: *p,
                            offset: base + k,
                            id: MessageId::new(store_id, sequence + k),
                        }
                    }),
                    Slot::Scheduled(p) => scheduled.next().map(|sequence| MessageAck {
                        partition: *p,
                        offset: SCHEDULED_OFFSET,
                        id: MessageId::new(store_id, *sequence),
                    }),
                };
                // A placement is built from its own append: every slot has one.
                acks.extend(ack);
            }
        }
        acks
    }
}

/// A sequenced request, as the writer checks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub producer_id: u64,
    pub epoch: u32,
    pub sequence: u64,
    pub count: u32,
    pub principal: String,
    /// Broker time of the request, ms since the epoch.
    pub now_ms: u64,
    /// A record unused for longer than this is gone (`producer_idle_expiry`).
    pub idle_expiry_ms: u64,
}

/// What to do with a sequenced request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Store it, then [`ProducerRecord::remember`] it.
    New,
    /// A retry of a stored request: answer this, store nothing.
    Repeat(StoredReply),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProducerError {
    #[error("producer {0} is unknown to this broker (never given out, or idle past producer_idle_expiry); get a new id with InitProducer")]
    Unknown(u64),
    #[error("producer {producer_id} has epoch {current}; this request's epoch {got} is fenced")]
    Fenced {
        producer_id: u64,
        current: u32,
        got: u32,
    },
    #[error("producer {producer_id} has never had epoch {got} (its epoch is {current})")]
    FutureEpoch {
        producer_id: u64,
        current: u32,
        got: u32,
    },
    #[error("producer {producer_id} expected sequence {expected}, got {got}: a request before this one is missing or still in flight")]
    OutOfOrder {
        producer_id: u64,
        expected: u64,
        got: u64,
    },
    #[error("sequences {got}.. of producer {producer_id} were stored already, longer ago than its last {PRODUCER_REQUESTS_REMEMBERED} requests whose replies are kept; nothing was stored again")]
    Forgotten { producer_id: u64, got: u64 },
    #[error("sequence {sequence} of producer {producer_id} began a request of {stored} messages, not {got}: a retry must repeat the request as it was")]
    NotTheSameRequest {
        producer_id: u64,
        sequence: u64,
        stored: u32,
        got: u32,
    },
    #[error("producer {0} belongs to another principal")]
    NotYours(u64),
}

impl ProducerRecord {
    pub fn new(principal: String, now_ms: u64) -> ProducerRecord {
        ProducerRecord {
            principal,
            epoch: 0,
            next_sequence: 0,
            last_used_ms: now_ms,
            remembered: VecDeque::new(),
        }
    }

    /// Unused for longer than `idle_expiry_ms` at `now_ms`.
    pub fn is_expired(&self, now_ms: u64, idle_expiry_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_used_ms) > idle_expiry_ms
    }

    /// The next epoch: older epochs are fenced, sequences start again at 0.
    pub fn bump_epoch(&mut self, now_ms: u64) {
        self.epoch = self.epoch.wrapping_add(1);
        self.next_sequence = 0;
        self.remembered.clear();
        self.last_used_ms = now_ms;
    }

    /// Record a stored request and its reply (after [`Admission::New`]).
    pub fn remember(&mut self, claim: &Claim, reply: StoredReply) {
        self.next_sequence = claim.sequence + claim.count as u64;
        self.last_used_ms = claim.now_ms;
        self.remembered.push_back(Remembered {
            sequence: claim.sequence,
            count: claim.count,
            reply,
        });
        while self.remembered.len() > PRODUCER_REQUESTS_REMEMBERED {
            self.remembered.pop_front();
        }
    }
}

/// Decide a sequenced request against the producer's record (`None` if it
/// has none).
pub fn admit(record: Option<&ProducerRecord>, claim: &Claim) -> Result<Admission, ProducerError> {
    let id = claim.producer_id;
    let record = match record {
        Some(r) if !r.is_expired(claim.now_ms, claim.idle_expiry_ms) => r,
        _ => return Err(ProducerError::Unknown(id)),
    };
    if record.principal != claim.principal {
        return Err(ProducerError::NotYours(id));
    }
    if claim.epoch < record.epoch {
        return Err(ProducerError::Fenced {
            producer_id: id,
            current: record.epoch,
            got: claim.epoch,
        });
    }
    if claim.epoch > record.epoch {
        return Err(ProducerError::FutureEpoch {
            producer_id: id,
            current: record.epoch,
            got: claim.epoch,
        });
    }
    if claim.sequence == record.next_sequence {
        return Ok(Admission::New);
    }
    if claim.sequence > record.next_sequence {
        return Err(ProducerError::OutOfOrder {
            producer_id: id,
            expected: record.next_sequence,
            got: claim.sequence,
        });
    }
    match record
        .remembered
        .iter()
        .find(|r| r.sequence == claim.sequence)
    {
        Some(r) if r.count == claim.count => Ok(Admission::Repeat(r.reply.clone())),
        Some(r) => Err(ProducerError::NotTheSameRequest {
            producer_id: id,
            sequence: claim.sequence,
            stored: r.count,
            got: claim.count,
        }),
        None => match record.remembered.front() {
            // Below every remembered request: stored, reply forgotten.
            Some(oldest) if claim.sequence < oldest.sequence => Err(ProducerError::Forgotten {
                producer_id: id,
                got: claim.sequence,
            }),
            None => Err(ProducerError::Forgotten {
                producer_id: id,
                got: claim.sequence,
            }),
            // Inside the remembered range but not where a request began.
            Some(_) => Err(ProducerError::OutOfOrder {
                producer_id: id,
                expected: record.next_sequence,
                got: claim.sequence,
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    fn claim(sequence: u64, count: u32) -> Claim {
        Claim {
            producer_id: 7,
            epoch: 0,
            sequence,
            count,
            principal: "payments".into(),
            now_ms: 1_000,
            idle_expiry_ms: HOUR_MS,
        }
    }

    fn reply(n: u64) -> StoredReply {
        StoredReply::Produced(Placement::new(&[Slot::Log(0)], vec![(0, n, n)], vec![]))
    }

    /// Stores requests as the writer does: admit, then remember.
    fn store(record: &mut ProducerRecord, c: &Claim) {
        assert_eq!(admit(Some(record), c), Ok(Admission::New));
        record.remember(c, reply(c.sequence));
    }

    #[test]
    fn requests_are_stored_in_order_and_retries_get_their_reply() {
        let mut r = ProducerRecord::new("payments".into(), 0);
        store(&mut r, &claim(0, 3));
        store(&mut r, &claim(3, 2));
        assert_eq!(r.next_sequence, 5);
        assert_eq!(
            admit(Some(&r), &claim(0, 3)),
            Ok(Admission::Repeat(reply(0)))
        );
        assert_eq!(
            admit(Some(&r), &claim(3, 2)),
            Ok(Admission::Repeat(reply(3)))
        );
        assert!(matches!(
            admit(Some(&r), &claim(6, 1)),
            Err(ProducerError::OutOfOrder {
                expected: 5,
                got: 6,
                ..
            })
        ));
        assert!(matches!(
            admit(Some(&r), &claim(1, 2)),
            Err(ProducerError::OutOfOrder {
                expected: 5,
                got: 1,
                ..
            })
        ));
        assert!(matches!(
            admit(Some(&r), &claim(3, 5)),
            Err(ProducerError::NotTheSameRequest {
                stored: 2,
                got: 5,
                ..
            })
        ));
    }

    /// At the limit the oldest reply is still there; one request past it,
    /// that reply is forgotten and its retry is refused, never stored.
    #[test]
    fn the_window_keeps_exactly_the_last_requests() {
        let mut r = ProducerRecord::new("payments".into(), 0);
        for i in 0..PRODUCER_REQUESTS_REMEMBERED as u64 {
            store(&mut r, &claim(i, 1));
        }
        assert_eq!(r.remembered.len(), PRODUCER_REQUESTS_REMEMBERED);
        assert_eq!(
            admit(Some(&r), &claim(0, 1)),
            Ok(Admission::Repeat(reply(0)))
        );
        store(&mut r, &claim(PRODUCER_REQUESTS_REMEMBERED as u64, 1));
        assert_eq!(r.remembered.len(), PRODUCER_REQUESTS_REMEMBERED);
        assert!(matches!(
            admit(Some(&r), &claim(0, 1)),
            Err(ProducerError::Forgotten { got: 0, .. })
        ));
        assert_eq!(
            admit(Some(&r), &claim(1, 1)),
            Ok(Admission::Repeat(reply(1)))
        );
    }

    #[test]
    fn epochs_fence_and_principals_own_their_ids() {
        let mut r = ProducerRecord::new("payments".into(), 0);
        store(&mut r, &claim(0, 1));
        r.bump_epoch(500);
        assert_eq!((r.epoch, r.next_sequence, r.remembered.len()), (1, 0, 0));
        assert!(matches!(
            admit(Some(&r), &claim(1, 1)),
            Err(ProducerError::Fenced {
                current: 1,
                got: 0,
                ..
            })
        ));
        let mut future = claim(0, 1);
        future.epoch = 2;
        assert!(matches!(
            admit(Some(&r), &future),
            Err(ProducerError::FutureEpoch { .. })
        ));
        let mut next = claim(0, 1);
        next.epoch = 1;
        assert_eq!(admit(Some(&r), &next), Ok(Admission::New));
        let mut other = next.clone();
        other.principal = "billing".into();
        assert_eq!(admit(Some(&r), &other), Err(ProducerError::NotYours(7)));
        assert_eq!(admit(None, &next), Err(ProducerError::Unknown(7)));
    }

    /// Idle exactly the expiry: still known; one millisecond more: gone.
    #[test]
    fn a_producer_idle_past_the_expiry_is_unknown() {
        let mut r = ProducerRecord::new("payments".into(), 0);
        store(&mut r, &claim(0, 1));
        let mut at_limit = claim(1, 1);
        at_limit.now_ms = 1_000 + HOUR_MS;
        assert_eq!(admit(Some(&r), &at_limit), Ok(Admission::New));
        let mut past = at_limit.clone();
        past.now_ms += 1;
        assert_eq!(admit(Some(&r), &past), Err(ProducerError::Unknown(7)));
    }

    #[test]
    fn placements_give_back_the_acks_in_request_order() {
        use Slot::*;
        let slots = [Log(1), Log(1), Log(0), Scheduled(2), Log(1), Log(0)];
        let p = Placement::new(&slots, vec![(0, 100, 5_000), (1, 40, 6_000)], vec![9_000]);
        assert_eq!(p.runs.len(), 5);
        let acks = p.acks(0xAB);
        let got: Vec<(u32, u64, u64)> = acks
            .iter()
            .map(|a| (a.partition, a.offset, a.id.sequence()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 40, 6_000),
                (1, 41, 6_001),
                (0, 100, 5_000),
                (2, SCHEDULED_OFFSET, 9_000),
                (1, 42, 6_002),
                (0, 101, 5_001),
            ]
        );
        assert!(acks.iter().all(|a| a.id.store_id() == 0xAB));
        // A keyless request of any size is one run.
        assert_eq!(
            Placement::new(&[Log(3); 1000], vec![(3, 0, 0)], vec![])
                .runs
                .len(),
            1
        );
    }
}
