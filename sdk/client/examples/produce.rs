//! Send a few payment events to a running broker.
//!
//! ```text
//! msmq serve &                      # in the same working directory
//! cargo run -p msmq-client --example produce
//! ```

use msmq_client::{Client, ClientOptions, NewMessage};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // MSMQ_SERVER / MSMQ_CA override the defaults (127.0.0.1:7171, ./msmq-data/tls/cert.pem).
    let client = Client::connect(ClientOptions::from_env()).await?;
    client.ensure_topic("payments", 4).await?;
    let producer = client.producer("payments");
    for i in 0..5 {
        let ack = producer
            .send(
                NewMessage::new(format!("{{\"transfer\":{i},\"amount\":100}}"))
                    .with_key(format!("account-{}", i % 2))
                    .with_tag("transfer")
                    .with_header("currency", "EUR"),
            )
            .await?;
        println!(
            "transfer {i}: partition {} offset {} id {}",
            ack.partition, ack.offset, ack.id
        );
    }
    client.close().await;
    Ok(())
}
