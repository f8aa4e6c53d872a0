//! Producing messages.

use crate::coalesce::{split_on, Coalescer};
use crate::connection::unexpected;
use crate::{Client, ClientError};
use msmq_protocol::{MessageAck, NewMessage, Reply, Request};
use std::sync::Arc;

/// Sends messages to one topic. Every send returns after the broker has
/// stored the messages durably (or refused them).
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
    singles: Arc<Coalescer<NewMessage, MessageAck>>,
}

impl Producer {
    pub(crate) fn new(client: Client, topic: &str) -> Self {
        let (c, t) = (client.clone(), topic.to_string());
        let singles = Coalescer::new(NewMessage::size_bytes, move |messages| {
            send_coalesced(c.clone(), t.clone(), messages)
        });
        Producer {
            client,
            topic: topic.to_string(),
            singles: Arc::new(singles),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
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
        produce(&self.client, &self.topic, None, messages).await
    }

    /// Send a batch to one chosen partition.
    pub async fn send_to_partition(
        &self,
        partition: u32,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageAck>, ClientError> {
        produce(&self.client, &self.topic, Some(partition), messages).await
    }
}

async fn produce(
    client: &Client,
    topic: &str,
    partition: Option<u32>,
    messages: Vec<NewMessage>,
) -> Result<Vec<MessageAck>, ClientError> {
    let count = messages.len();
    let req = Request::Produce {
        topic: topic.to_string(),
        partition,
        messages,
    };
    match client.request(&req).await? {
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
    messages: Vec<NewMessage>,
) -> Vec<Result<MessageAck, ClientError>> {
    let count = messages.len();
    let retry = if count > 1 {
        messages.clone()
    } else {
        Vec::new()
    };
    match produce(&client, &topic, None, messages).await {
        Ok(acks) => acks.into_iter().map(Ok).collect(),
        Err(e) if count > 1 && split_on(&e) => {
            let mut out = Vec::with_capacity(count);
            for m in retry {
                out.push(
                    produce(&client, &topic, None, vec![m])
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
