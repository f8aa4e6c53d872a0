//! Network changes under a live client: QUIC connection migration.

use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::NewMessage;
use msmq_client::{Client, FetchLimits};
use std::time::Duration;

/// A long poll at `offset`, in flight on the client's connection.
fn long_poll(
    client: &Client,
    offset: u64,
) -> tokio::task::JoinHandle<Result<msmq_client::protocol::FetchedMessages, msmq_client::ClientError>>
{
    let client = client.clone();
    tokio::spawn(async move {
        let limits = FetchLimits {
            max_wait_ms: 5_000,
            ..FetchLimits::default()
        };
        client.fetch("moves", 0, offset, limits).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_rebinds_its_udp_port_stays_connected_and_working() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("moves", 1).await?;
    let producer = client.producer("moves");
    producer.send(NewMessage::new("before")).await?;
    let mut ports = vec![];
    for round in 0..3u64 {
        // A request in flight while the client moves: had the connection
        // dropped instead of migrating, it would fail, not be answered.
        let waiting = long_poll(&client, 1 + round);
        tokio::time::sleep(Duration::from_millis(100)).await;
        ports.push(client.rebind()?.port());
        producer
            .send(NewMessage::new(format!("after-{round}")))
            .await?;
        let fetched = waiting.await??;
        assert_eq!(
            fetched.messages[0].payload[..],
            *format!("after-{round}").as_bytes()
        );
    }
    let log: Vec<_> = read_all(&client, "moves", 0, 0)
        .await?
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(log, ["before", "after-0", "after-1", "after-2"]);
    ports.dedup();
    assert_eq!(ports.len(), 3, "each rebind took a new port: {ports:?}");
    Ok(())
}
