//! Transactional producers: half messages, commit/rollback, and the checker
//! the broker calls back when a transaction's outcome is unknown.
//!
//! The flow (RocketMQ's, which the broker makes exactly-once):
//! 1. [`TransactionalProducer::send_half`] stores a half message: durable,
//!    invisible to consumers. If it fails, do not run the local transaction.
//! 2. Run the local transaction (the payment's database update).
//! 3. [`TransactionalProducer::commit`] or [`TransactionalProducer::rollback`].
//!    If the producer crashes before step 3, the broker asks a live producer
//!    of the same producer group — its [`TransactionChecker`] — and applies
//!    the answer.
//!
//! [`TransactionalProducer::execute`] does all three steps around a closure.

use crate::coalesce::{split_on, Coalescer};
use crate::connection::unexpected;
use crate::idempotence::Sender;
use crate::ProducerOptions;
use crate::{Client, ClientError};
use msmq_protocol::{
    HalfAck, MessageAck, NewMessage, Reply, Request, SequencedRequest, TransactionCheck, TxAction,
    TxDecision, TxEndResult, TxEnded,
};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Decides a transaction's state when the broker checks back: look the
/// transaction up in the local database (by `check.tx_id`, a business key in
/// the message, …) and answer commit, rollback, or unknown (ask again
/// later). It runs on a blocking thread, so it may query a database.
pub trait TransactionChecker: Send + Sync + 'static {
    fn check(&self, check: &TransactionCheck) -> TxAction;
}

impl<F> TransactionChecker for F
where
    F: Fn(&TransactionCheck) -> TxAction + Send + Sync + 'static,
{
    fn check(&self, check: &TransactionCheck) -> TxAction {
        self(check)
    }
}

/// Sends transactional messages to one topic for one producer group.
///
/// ```no_run
/// # async fn example(client: msmq_client::Client) -> Result<(), msmq_client::ClientError> {
/// use msmq_client::{NewMessage, TxAction};
/// // The checker answers for transactions whose producer died before deciding.
/// let payments = client
///     .transactional_producer("payment-centre", "payments", |check: &msmq_client::TransactionCheck| {
///         // look up check.message / check.tx_id in the local database
///         TxAction::Commit
///     })
///     .await?;
/// let ended = payments
///     .execute(NewMessage::new("transfer 42: 100 EUR"), |half| async move {
///         // debit the account in the local database, then:
///         TxAction::Commit
///     })
///     .await?;
/// println!("{ended:?}");
/// # Ok(())
/// # }
/// ```
/// Half messages are sent idempotently by default (as by an idempotent
/// [`crate::Producer`]): a `send_half` whose reply was lost is sent again
/// and stores one transaction, never two.
#[derive(Clone)]
pub struct TransactionalProducer {
    group: String,
    topic: String,
    sender: Sender,
    halves: Arc<Coalescer<NewMessage, HalfAck>>,
    ends: Arc<Coalescer<TxDecision, TxEnded>>,
}

fn batch_error(e: &ClientError, count: usize) -> Vec<Result<HalfAck, ClientError>> {
    (0..count)
        .map(|_| {
            Err(match e {
                ClientError::Broker(reply) => ClientError::Broker(reply.clone()),
                other => ClientError::Stream(other.to_string()),
            })
        })
        .collect()
}

/// One `SendHalf` for many calls; if the broker refuses the whole batch (one
/// message too large, say), each call is retried alone so only the culprit fails.
async fn send_halves(
    sender: Sender,
    group: String,
    topic: String,
    messages: Vec<NewMessage>,
) -> Vec<Result<HalfAck, ClientError>> {
    let count = messages.len();
    let req = |messages: Vec<NewMessage>| SequencedRequest::SendHalf {
        producer_group: group.clone(),
        topic: topic.clone(),
        partition: None,
        messages,
        check_immunity_ms: 0,
    };
    let single = count == 1;
    let retry = if single { Vec::new() } else { messages.clone() };
    match sender.send(req(messages)).await {
        Ok(Reply::HalfStored(acks)) if acks.len() == count => acks.into_iter().map(Ok).collect(),
        Ok(other) => {
            let e = unexpected("SendHalf", other);
            batch_error(&e, count)
        }
        Err(e) if !single && split_on(&e) => {
            tracing::debug!(error = %e, "coalesced half messages refused together; sending each alone");
            let mut out = Vec::with_capacity(count);
            for m in retry {
                out.push(match sender.send(req(vec![m])).await {
                    Ok(Reply::HalfStored(mut acks)) if acks.len() == 1 => Ok(acks.remove(0)),
                    Ok(other) => Err(unexpected("SendHalf", other)),
                    Err(e) => Err(e),
                });
            }
            out
        }
        Err(e) => batch_error(&e, count),
    }
}

async fn end_many(
    client: Client,
    group: String,
    decisions: Vec<TxDecision>,
) -> Vec<Result<TxEnded, ClientError>> {
    let count = decisions.len();
    let req = Request::EndTransactions {
        producer_group: group,
        decisions,
    };
    let fail = |e: ClientError| -> Vec<Result<TxEnded, ClientError>> {
        (0..count)
            .map(|_| {
                Err(match &e {
                    ClientError::Broker(reply) => ClientError::Broker(reply.clone()),
                    other => ClientError::Stream(other.to_string()),
                })
            })
            .collect()
    };
    match client.request(&req).await {
        Ok(Reply::TransactionsEnded(results)) if results.len() == count => results
            .into_iter()
            .map(|r| match r {
                TxEndResult::Ended(e) => Ok(e),
                TxEndResult::Error(e) => Err(ClientError::Broker(e)),
            })
            .collect(),
        Ok(other) => fail(unexpected("EndTransactions", other)),
        Err(e) => fail(e),
    }
}

impl Client {
    /// Register as a producer of `producer_group` with its checker (kept for
    /// the life of this client, re-registered after reconnects) and return a
    /// transactional producer for `topic`.
    pub async fn transactional_producer(
        &self,
        producer_group: &str,
        topic: &str,
        checker: impl TransactionChecker,
    ) -> Result<TransactionalProducer, ClientError> {
        self.transactional_producer_with(producer_group, topic, checker, ProducerOptions::default())
            .await
    }

    /// [`Client::transactional_producer`] with `options` for its half
    /// messages (idempotence off, say).
    pub async fn transactional_producer_with(
        &self,
        producer_group: &str,
        topic: &str,
        checker: impl TransactionChecker,
        options: ProducerOptions,
    ) -> Result<TransactionalProducer, ClientError> {
        self.register_checker(producer_group, Arc::new(checker))
            .await?;
        let sender = Sender::new(self, options.idempotent, options.send_deadline);
        let (s, group, topic_name) = (
            sender.clone(),
            producer_group.to_string(),
            topic.to_string(),
        );
        let halves = Coalescer::new(NewMessage::size_bytes, move |messages| {
            send_halves(s.clone(), group.clone(), topic_name.clone(), messages)
        });
        let (client, group) = (self.clone(), producer_group.to_string());
        let ends = Coalescer::new(
            |_: &TxDecision| 16,
            move |decisions| end_many(client.clone(), group.clone(), decisions),
        );
        Ok(TransactionalProducer {
            group: producer_group.to_string(),
            topic: topic.to_string(),
            sender,
            halves: Arc::new(halves),
            ends: Arc::new(ends),
        })
    }
}

impl TransactionalProducer {
    pub fn producer_group(&self) -> &str {
        &self.group
    }

    /// Store a half message. The broker checks back after its
    /// `transaction_timeout` if no decision arrives. Concurrent calls are
    /// coalesced into one request.
    pub async fn send_half(&self, message: NewMessage) -> Result<HalfAck, ClientError> {
        self.halves.call(message).await
    }

    /// Store a half message that must not be checked before `immunity`
    /// (for local transactions known to take long).
    pub async fn send_half_with_immunity(
        &self,
        message: NewMessage,
        immunity: Duration,
    ) -> Result<HalfAck, ClientError> {
        let mut acks = self.send_halves(vec![message], immunity).await?;
        acks.pop().ok_or_else(|| ClientError::UnexpectedReply {
            request: "SendHalf",
            reply: "no acknowledgement".into(),
        })
    }

    /// Store several half messages at once, one transaction each.
    pub async fn send_halves(
        &self,
        messages: Vec<NewMessage>,
        immunity: Duration,
    ) -> Result<Vec<HalfAck>, ClientError> {
        let count = messages.len();
        let req = SequencedRequest::SendHalf {
            producer_group: self.group.clone(),
            topic: self.topic.clone(),
            partition: None,
            messages,
            check_immunity_ms: immunity.as_millis().min(u32::MAX as u128) as u32,
        };
        match self.sender.send(req).await? {
            Reply::HalfStored(acks) if acks.len() == count => Ok(acks),
            other => Err(unexpected("SendHalf", other)),
        }
    }

    /// Send a decision; `Unknown` leaves the transaction to the check-back.
    /// Concurrent calls are coalesced into one request.
    pub async fn end(&self, tx_id: u64, action: TxAction) -> Result<TxEnded, ClientError> {
        self.ends.call(TxDecision { tx_id, action }).await
    }

    /// Commit: the message enters the log exactly once. Returns where.
    pub async fn commit(&self, tx_id: u64) -> Result<MessageAck, ClientError> {
        match self.end(tx_id, TxAction::Commit).await? {
            TxEnded::Committed(ack) => Ok(ack),
            other => Err(ClientError::UnexpectedReply {
                request: "EndTransaction",
                reply: format!("{other:?}"),
            }),
        }
    }

    /// Roll back: the message is never delivered.
    pub async fn rollback(&self, tx_id: u64) -> Result<(), ClientError> {
        match self.end(tx_id, TxAction::Rollback).await? {
            TxEnded::RolledBack => Ok(()),
            other => Err(ClientError::UnexpectedReply {
                request: "EndTransaction",
                reply: format!("{other:?}"),
            }),
        }
    }

    /// Send the half message, run `local` (the local transaction) only if it
    /// was stored, then send its decision. If sending the decision fails the
    /// broker resolves the transaction by checking back.
    pub async fn execute<F, Fut>(
        &self,
        message: NewMessage,
        local: F,
    ) -> Result<TxEnded, ClientError>
    where
        F: FnOnce(HalfAck) -> Fut,
        Fut: Future<Output = TxAction>,
    {
        let half = self.send_half(message).await?;
        let action = local(half).await;
        self.end(half.tx_id, action).await
    }
}
