//! Consume payment events as the `billing` group until none arrive for a second.
//!
//! ```text
//! cargo run -p msmq-client --example consume
//! ```

use msmq_client::{Client, ClientOptions, ConsumerOptions, FetchLimits};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect(ClientOptions::from_env()).await?;
    client.ensure_topic("payments", 4).await?;
    let options = ConsumerOptions {
        limits: FetchLimits {
            max_wait_ms: 1000,
            ..FetchLimits::default()
        },
        ..ConsumerOptions::default()
    };
    let mut billing = client.consumer("billing", &["payments"], options).await?;
    loop {
        let messages = billing.poll().await?;
        if messages.is_empty() {
            break;
        }
        for m in &messages {
            println!(
                "{}/{}@{}: {}",
                m.topic,
                m.partition,
                m.offset(),
                String::from_utf8_lossy(&m.message.payload)
            );
        }
        // Commit after processing: a crash before this line redelivers, never loses.
        billing.commit().await?;
    }
    billing.leave().await?;
    client.close().await;
    Ok(())
}
