//! Producing messages.

use crate::coalesce::{split_on, Coalescer};
use crate::connection::unexpected;
use crate::idempotence::{Sequencer, SEND_DEADLINE_DEFAULT};
use crate::{Client, ClientError};
use msmq_protocol::{MessageAck, NewMessage, ProducerIdentity, Reply, Request, SequencedRequest};
use std::sync::Arc;
use std::time::Duration;

/// How a [`Producer`] sends.
#[derive(Debug, Clone, Copy)]
pub struct ProducerOptions {
    /// Number every request (one producer id per producer and its clones)
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
/// ([`ProducerOptions`]): one request at a time per producer and its
/// clones, each stored exactly once however often it had to be sent.
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
    client: Client,
    topic: String,
    sequencer: Option<Arc<Sequencer>>,
    singles: Arc<Coalescer<NewMessage, MessageAck>>,
}

impl Producer {
    pub(crate) fn new(client: Client, topic: &str, options: ProducerOptions) -> Self {
        let sequencer = options
            .idempotent
            .then(|| Arc::new(Sequencer::new(client.clone(), options.send_deadline)));
        let (c, t, s) = (client.clone(), topic.to_string(), sequencer.clone());
        let singles = Coalescer::new(NewMessage::size_bytes, move |messages| {
            send_coalesced(c.clone(), t.clone(), s.clone(), messages)
        });
        Producer {
            client,
            topic: topic.to_string(),
            sequencer,
            singles: Arc::new(singles),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The producer id and epoch of an idempotent producer, once its first
    /// send got them from the broker.
    pub async fn identity(&self) -> Option<ProducerIdentity> {
        match &self.sequencer {
            Some(s) => s.identity().await,
            None => None,
        }
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
        produce(
            &self.client,
            &self.topic,
            self.sequencer.as_deref(),
            None,
            messages,
        )
        .await
    }

    /// Send a batch to one chosen partition.
    pub async fn send_to_partition(
        &self,
        partition: u32,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageAck>, ClientError> {
        let sequencer = self.sequencer.as_deref();
        produce(
            &self.client,
            &self.topic,
            sequencer,
            Some(partition),
            messages,
        )
        .await
    }
}

async fn produce(
    client: &Client,
    topic: &str,
    sequencer: Option<&Sequencer>,
    partition: Option<u32>,
    messages: Vec<NewMessage>,
) -> Result<Vec<MessageAck>, ClientError> {
    let count = messages.len();
    let topic = topic.to_string();
    let reply = match sequencer {
        Some(s) => {
            s.send(SequencedRequest::Produce {
                topic,
                partition,
                messages,
            })
            .await?
        }
        None => {
            client
                .request(&Request::Produce {
                    topic,
                    partition,
                    messages,
                })
                .await?
        }
    };
    match reply {
        Reply::Produced(acks) if acks.len() == count => Ok(acks),
        other => Err(unexpected("Produce", other)),
    }
}

/// Coalesced single sends: one request; if the broker refuses it as a whole
/// (one message too large, say), each message is sent alone so only the
/// culprit fails.
async fn send_coalesced(
    client: Client,
    topic: String,
    sequencer: Option<Arc<Sequencer>>,
    messages: Vec<NewMessage>,
) -> Vec<Result<MessageAck, ClientError>> {
    let sequencer = sequencer.as_deref();
    let count = messages.len();
    let retry = if count > 1 {
        messages.clone()
    } else {
        Vec::new()
    };
    match produce(&client, &topic, sequencer, None, messages).await {
        Ok(acks) => acks.into_iter().map(Ok).collect(),
        Err(e) if count > 1 && split_on(&e) => {
            let mut out = Vec::with_capacity(count);
            for m in retry {
                out.push(
                    produce(&client, &topic, sequencer, None, vec![m])
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
