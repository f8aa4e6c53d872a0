//! Producing messages.

use crate::coalesce::{split_on, Coalescer};
use crate::connection::unexpected;
use crate::idempotence::{Sender, SEND_DEADLINE_DEFAULT};
use crate::{Client, ClientError};
use msmq_protocol::{MessageAck, NewMessage, ProducerIdentity, Reply, SequencedRequest};
use std::sync::Arc;
use std::time::Duration;

/// How a [`Producer`] sends.
#[derive(Debug, Clone, Copy)]
pub struct ProducerOptions {
    /// Number every request (producer ids of the producer and its clones)
    /// so that a request sent again after a lost reply is stored once, and
    /// send again, over a new connection if need be, every request whose
    /// outcome is unknown, until `send_deadline`. Off: a send whose reply
    /// is lost returns the error and the messages may or may not be
    /// stored. Default on.
    pub idempotent: bool,
    /// How long an idempotent send keeps trying.
    pub send_deadline: Duration,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            idempotent: true,
            send_deadline: SEND_DEADLINE_DEFAULT,
        }
    }
}

/// Sends messages to one topic. Every send returns after the broker has
/// stored the messages durably (or refused them). Idempotent by default
/// ([`ProducerOptions`]): each request is stored exactly once however often
/// it had to be sent; a producer and its clones keep up to 4 requests in
/// flight, one per producer id of their pool.
///
/// ```no_run
/// # async fn example(client: msmq_client::Client) -> Result<(), msmq_client::ClientError> {
/// use msmq_client::NewMessage;
/// let producer = client.producer("payments");
/// let acks = producer
///     .send_batch(vec![
///         NewMessage::new("debit 10").with_key("acct-1").with_tag("debit"),
///         NewMessage::new("credit 10").with_key("acct-2").with_header("currency", "EUR"),
///     ])
///     .await?;
/// assert_eq!(acks.len(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Producer {
    topic: String,
    sender: Sender,
    singles: Arc<Coalescer<NewMessage, MessageAck>>,
}

impl Producer {
    pub(crate) fn new(client: Client, topic: &str, options: ProducerOptions) -> Self {
        let sender = Sender::new(&client, options.idempotent, options.send_deadline);
        let (s, t) = (sender.clone(), topic.to_string());
        let singles = Coalescer::new(NewMessage::size_bytes, move |messages| {
            send_coalesced(s.clone(), t.clone(), messages)
        });
        Producer {
            topic: topic.to_string(),
            sender,
            singles: Arc::new(singles),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The producer id and epoch of an idempotent producer, once its first
    /// send got them from the broker.
    pub async fn identity(&self) -> Option<ProducerIdentity> {
        self.sender.identity().await
    }

    /// Send one message. Concurrent sends through clones of this producer
    /// are coalesced into one request while earlier ones are in flight; each
    /// still returns its own acknowledgement (or error).
    pub async fn send(&self, message: NewMessage) -> Result<MessageAck, ClientError> {
        self.singles.call(message).await
    }

    /// Send a batch atomically: all stored, or none. Acks are in input order.
    pub async fn send_batch(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageAck>, ClientError> {
        produce(&self.sender, &self.topic, None, messages).await
    }

    /// Send a batch to one chosen partition.
    pub async fn send_to_partition(
        &self,
        partition: u32,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageAck>, ClientError> {
        produce(&self.sender, &self.topic, Some(partition), messages).await
    }
}

async fn produce(
    sender: &Sender,
    topic: &str,
    partition: Option<u32>,
    messages: Vec<NewMessage>,
) -> Result<Vec<MessageAck>, ClientError> {
    let count = messages.len();
    let request = SequencedRequest::Produce {
        topic: topic.to_string(),
        partition,
        messages,
    };
    match sender.send(request).await? {
        Reply::Produced(acks) if acks.len() == count => Ok(acks),
        other => Err(unexpected("Produce", other)),
    }
}

/// Coalesced single sends: one request; if the broker refuses it as a whole
/// (one message too large, say), each message is sent alone so only the
/// culprit fails.
async fn send_coalesced(
    sender: Sender,
    topic: String,
    messages: Vec<NewMessage>,
) -> Vec<Result<MessageAck, ClientError>> {
    let count = messages.len();
    let retry = if count > 1 {
        messages.clone()
    } else {
        Vec::new()
    };
    match produce(&sender, &topic, None, messages).await {
        Ok(acks) => acks.into_iter().map(Ok).collect(),
        Err(e) if count > 1 && split_on(&e) => {
            let mut out = Vec::with_capacity(count);
            for m in retry {
                out.push(
                    produce(&sender, &topic, None, vec![m])
                        .await
                        .map(|mut acks| acks.remove(0)),
                );
            }
            out
        }
        Err(e) => {
            let reason = e.to_string();
            let mut out = vec![Err(e)];
            out.extend((1..count).map(|_| Err(ClientError::Stream(reason.clone()))));
            out
        }
    }
}
