//! Idempotent sends: one producer id per [`Sequencer`], every request
//! numbered, and a request whose reply was lost (the connection dropped,
//! the broker restarted) sent again with the same numbers until the broker
//! answers or the deadline passes; a refusal goes to the caller at once.
//! The broker stores a numbered request once and answers its retries with
//! the first reply (PROTOCOL.md §8.3).
//!
//! Owns: the producer id, its epoch and the next sequence.
//!
//! Invariants:
//! - One request in flight per sequencer, so its requests reach the broker
//!   in sequence order (a gap would be refused). A producer sends through a
//!   small pool of sequencers, each with its own producer id, to keep a few
//!   requests in flight.
//! - The sequence moves on only past a request the broker stored. A request
//!   it refused stored nothing, so the next one reuses its numbers.
//! - A request given up on with its reply lost, refused with
//!   `STORAGE_ERROR`, or refused after an earlier send of it lost its
//!   reply, may have been stored:
//!   its numbers are never reused for other messages. The next request
//!   starts a new epoch of the id (sequence 0), which also fences any copy
//!   of the old one still in flight.

use crate::{Client, ClientError};
use msmq_protocol::{
    ErrorCode, ProducerIdentity, ProducerSequence, Reply, Request, SequencedRequest,
};
use std::time::{Duration, Instant};

/// Default of how long a send keeps retrying a request whose outcome is
/// unknown before it returns the last error.
pub const SEND_DEADLINE_DEFAULT: Duration = Duration::from_secs(60);
/// Wait before the second retry (the first goes at once, over a new
/// connection if the old one is gone); it doubles up to [`RETRY_WAIT_MAX`].
pub const RETRY_WAIT_FIRST: Duration = Duration::from_millis(50);
/// Longest wait between two sends of one request.
pub const RETRY_WAIT_MAX: Duration = Duration::from_secs(1);

struct State {
    identity: Option<ProducerIdentity>,
    next_sequence: u64,
    /// The last request was given up on unanswered: start a new epoch.
    must_bump: bool,
}

/// Numbers and retries the requests of one idempotent producer.
pub(crate) struct Sequencer {
    client: Client,
    deadline: Duration,
    state: tokio::sync::Mutex<State>,
}

/// Whether the broker may have stored the request without the client
/// hearing of it: the request or its reply was lost on the way. Only these
/// are sent again; an answer (a refusal stored nothing) goes to the caller.
fn reply_lost(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Connect { .. }
            | ClientError::Connection(_)
            | ClientError::Stream(_)
            | ClientError::Timeout(_)
    )
}

/// Whether the request may be stored though the call failed: a lost reply,
/// or a failed commit whose fsync may still have reached the disk
/// (`STORAGE_ERROR`, PROTOCOL.md §7). Its numbers must not be reused.
fn maybe_stored(e: &ClientError) -> bool {
    reply_lost(e) || e.code() == Some(ErrorCode::STORAGE_ERROR)
}

impl Sequencer {
    pub(crate) fn new(client: Client, deadline: Duration) -> Sequencer {
        Sequencer {
            client,
            deadline,
            state: tokio::sync::Mutex::new(State {
                identity: None,
                next_sequence: 0,
                must_bump: false,
            }),
        }
    }

    /// The producer id and epoch in use, once the first send got one.
    pub(crate) async fn identity(&self) -> Option<ProducerIdentity> {
        self.state.lock().await.identity
    }

    async fn init(&self, producer_id: Option<u64>) -> Result<ProducerIdentity, ClientError> {
        match self
            .client
            .request(&Request::InitProducer { producer_id })
            .await?
        {
            Reply::ProducerInit(identity) => Ok(identity),
            other => Err(crate::connection::unexpected("InitProducer", other)),
        }
    }

    /// Send `request` numbered, retrying until the broker answers or the
    /// deadline passes.
    pub(crate) async fn send(&self, request: SequencedRequest) -> Result<Reply, ClientError> {
        let state = self.state.lock().await;
        self.send_locked(state, request).await
    }

    /// [`Sequencer::send`], holding the sequencer already.
    async fn send_locked(
        &self,
        mut state: tokio::sync::MutexGuard<'_, State>,
        request: SequencedRequest,
    ) -> Result<Reply, ClientError> {
        let count = request.message_count();
        let deadline = Instant::now() + self.deadline;
        let mut wait = Duration::ZERO;
        let mut unknown_producer_retried = false;
        // An earlier send of this request may have been stored: then even a
        // refusal of a later send (BACKLOG_FULL, say, checked before the
        // broker looks at the sequence) leaves its numbers taken.
        let mut reply_was_lost = false;
        // Built once and renumbered in place: a batch is not copied per send.
        let mut sequenced = Request::Sequenced {
            producer: ProducerSequence {
                producer_id: 0,
                epoch: 0,
                sequence: 0,
            },
            request,
        };
        loop {
            let identity = match (state.identity, state.must_bump) {
                (Some(identity), false) => identity,
                (held, _) => {
                    let fresh = match self.init(held.map(|i| i.producer_id)).await {
                        // Expired meanwhile: start over with a new id.
                        Err(e)
                            if held.is_some() && e.code() == Some(ErrorCode::UNKNOWN_PRODUCER) =>
                        {
                            self.init(None).await
                        }
                        other => other,
                    };
                    match fresh {
                        Ok(identity) => {
                            *state = State {
                                identity: Some(identity),
                                next_sequence: 0,
                                must_bump: false,
                            };
                            identity
                        }
                        Err(e) if reply_lost(&e) && Instant::now() < deadline => {
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).clamp(RETRY_WAIT_FIRST, RETRY_WAIT_MAX);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if let Request::Sequenced { producer, .. } = &mut sequenced {
                *producer = ProducerSequence {
                    producer_id: identity.producer_id,
                    epoch: identity.epoch,
                    sequence: state.next_sequence,
                };
            }
            match self.client.request(&sequenced).await {
                Ok(Reply::Error(refusal)) => return Err(ClientError::Broker(refusal)),
                Ok(reply) => {
                    state.next_sequence += count as u64;
                    return Ok(reply);
                }
                // Forgotten after a long silence: nothing of this request
                // can be stored under it; send it as the new id's first.
                Err(e)
                    if e.code() == Some(ErrorCode::UNKNOWN_PRODUCER)
                        && !unknown_producer_retried =>
                {
                    unknown_producer_retried = true;
                    state.identity = None;
                }
                Err(e) if reply_lost(&e) && Instant::now() < deadline => {
                    reply_was_lost = true;
                    tracing::debug!(error = %e, "sequenced request or its reply lost; sending it again");
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(wait.min(left)).await;
                    wait = (wait * 2).clamp(RETRY_WAIT_FIRST, RETRY_WAIT_MAX);
                }
                Err(e) => {
                    if reply_was_lost || maybe_stored(&e) {
                        state.must_bump = true;
                    }
                    return Err(e);
                }
            }
        }
    }
}

/// Requests an idempotent producer keeps in flight: one per producer id
/// of its pool (each id's requests go one after another, in sequence
/// order), as many as the client's coalescing queues keep in flight.
pub const IDEMPOTENT_REQUESTS_IN_FLIGHT_MAX: usize = crate::coalesce::REQUESTS_IN_FLIGHT_MAX;

/// The sequencers of one idempotent producer.
pub(crate) struct Pool {
    sequencers: Box<[Sequencer]>,
    /// Which sequencer the next caller queues behind when all are busy.
    next: std::sync::atomic::AtomicUsize,
}

/// How a producer sends its `Produce` or `SendHalf` requests.
#[derive(Clone)]
pub(crate) enum Sender {
    /// Numbered and sent again after a lost reply, by whichever sequencer
    /// of the pool is free (each gets its producer id on first use).
    Idempotent(std::sync::Arc<Pool>),
    /// Sent once, as they are.
    Plain(Client),
}

impl Sender {
    pub(crate) fn new(client: &Client, idempotent: bool, deadline: Duration) -> Sender {
        if idempotent {
            Sender::Idempotent(std::sync::Arc::new(Pool {
                sequencers: (0..IDEMPOTENT_REQUESTS_IN_FLIGHT_MAX)
                    .map(|_| Sequencer::new(client.clone(), deadline))
                    .collect(),
                next: std::sync::atomic::AtomicUsize::new(0),
            }))
        } else {
            Sender::Plain(client.clone())
        }
    }

    pub(crate) async fn send(&self, request: SequencedRequest) -> Result<Reply, ClientError> {
        match self {
            Sender::Idempotent(pool) => {
                // The first free sequencer (a lone caller always uses the
                // same producer id), else queue behind one, in turn.
                for sequencer in pool.sequencers.iter() {
                    if let Ok(state) = sequencer.state.try_lock() {
                        return sequencer.send_locked(state, request).await;
                    }
                }
                let turn = pool.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                pool.sequencers[turn % pool.sequencers.len()]
                    .send(request)
                    .await
            }
            Sender::Plain(client) => client.request(&request.into_request()).await,
        }
    }

    /// The producer id and epoch of the first sequencer (the one a lone
    /// caller uses), for an idempotent sender that has one.
    pub(crate) async fn identity(&self) -> Option<ProducerIdentity> {
        match self {
            Sender::Idempotent(pool) => pool.sequencers[0].identity().await,
            Sender::Plain(_) => None,
        }
    }
}
