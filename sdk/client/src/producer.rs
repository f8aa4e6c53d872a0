//! Producing messages.

use crate::connection::unexpected;
use crate::{Client, ClientError};
use msmq_protocol::{MessageAck, NewMessage, Reply, Request};

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
}

impl Producer {
    pub(crate) fn new(client: Client, topic: &str) -> Self {
        Producer {
            client,
            topic: topic.to_string(),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Send one message.
    pub async fn send(&self, message: NewMessage) -> Result<MessageAck, ClientError> {
        let mut acks = self.send_batch(vec![message]).await?;
        acks.pop().ok_or_else(|| ClientError::UnexpectedReply {
            request: "Produce",
            reply: "no acknowledgement for the message".into(),
        })
    }

    /// Send a batch atomically: all stored, or none. Acks are in input order.
    pub async fn send_batch(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageAck>, ClientError> {
        self.produce(None, messages).await
    }

    /// Send a batch to one chosen partition.
    pub async fn send_to_partition(
        &self,
        partition: u32,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageAck>, ClientError> {
        self.produce(Some(partition), messages).await
    }

    async fn produce(
        &self,
        partition: Option<u32>,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageAck>, ClientError> {
        let count = messages.len();
        let req = Request::Produce {
            topic: self.topic.clone(),
            partition,
            messages,
        };
        match self.client.request(&req).await? {
            Reply::Produced(acks) if acks.len() == count => Ok(acks),
            other => Err(unexpected("Produce", other)),
        }
    }
}
