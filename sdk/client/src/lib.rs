//! Async Rust client for the MSMQ broker.
//!
//! One [`Client`] holds one QUIC connection to the broker and is cheap to
//! clone; every request travels on its own QUIC stream, so many requests from
//! many tasks proceed at once over that connection. When the connection drops,
//! the next request reconnects.
//!
//! - [`Producer`]: send single messages or batches; each returns once the
//!   broker has made the messages durable. Idempotent by default: a send
//!   whose reply was lost is sent again, over a new connection if need be,
//!   and stored once.
//! - [`Consumer`]: join a consumer group, poll with long-poll, commit offsets.
//! - [`TransactionalProducer`]: half messages, commit/rollback, and a
//!   [`TransactionChecker`] the broker calls back for undecided transactions.
//! - Admin calls on [`Client`]: topics, groups, transactions.
//!
//! Runnable programs against a live broker are in `sdk/client/examples/`
//! (`cargo run -p msmq-client --example produce`, `consume`, `admin`).
//!
//! ```no_run
//! use msmq_client::{Client, ClientOptions, ConsumerOptions, NewMessage};
//!
//! # async fn example() -> Result<(), msmq_client::ClientError> {
//! let client = Client::connect(ClientOptions::from_env()).await?;
//! client.create_topic("payments", 4).await?;
//!
//! let producer = client.producer("payments");
//! let ack = producer.send(NewMessage::new("transfer #1").with_key("user-42")).await?;
//! println!("stored at partition {} offset {}", ack.partition, ack.offset);
//!
//! let mut billing = client.consumer("billing", &["payments"], ConsumerOptions::default()).await?;
//! for received in billing.poll().await? {
//!     println!("{}: {:?}", received.offset(), received.message.payload);
//! }
//! billing.commit().await?; // at-least-once: commit after processing
//! billing.leave().await?;
//! # Ok(())
//! # }
//! ```

mod coalesce;
mod connection;
mod consumer;
mod error;
mod idempotence;
mod prefetch;
mod producer;
mod transaction;
pub mod transport;

pub use connection::{Client, ClientOptions, DEFAULT_CA_FILE, DEFAULT_SERVER, DEFAULT_TOKEN_FILE};
pub use consumer::{Acker, Consumer, ConsumerOptions, Delivery, ReceivedMessage};
pub use error::ClientError;
pub use idempotence::SEND_DEADLINE_DEFAULT;
pub use msmq_protocol as protocol;
pub use msmq_protocol::{
    ErrorCode, FetchLimits, HalfAck, Header, Message, MessageAck, MessageId, NewMessage, StartFrom,
    TransactionCheck, TxAction, TxEnded,
};
pub use prefetch::{Prefetch, PREFETCH_BYTES_DEFAULT, PREFETCH_MESSAGES_DEFAULT};
pub use producer::{Producer, ProducerOptions};
pub use transaction::{TransactionChecker, TransactionalProducer};
