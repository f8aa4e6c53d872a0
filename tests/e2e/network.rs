//! Network changes under a live client: QUIC connection migration.

use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::NewMessage;
use msmq_client::{Client, FetchLimits};
use std::time::Duration;

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
        let waiting = long_poll_on(&client, "moves", 1 + round);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_lose_nothing_and_the_client_reconnects() -> anyhow::Result<()> {
    use crate::bad_input::raw_connection;
    use msmq_client::protocol::{encode_frame, Request};
    use msmq_client::ConsumerOptions;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("drops", 1).await?;
    let end = |c: Client| async move {
        anyhow::Ok(c.describe_topic("drops").await?.partitions[0].end_offset)
    };

    // Mid-request: the connection goes away halfway through a produce frame.
    let frame = encode_frame(&Request::Produce {
        topic: "drops".into(),
        partition: None,
        messages: (0..10)
            .map(|i| NewMessage::new(format!("half-{i}")))
            .collect(),
    })?;
    let (_endpoint, raw) = raw_connection(&broker).await?;
    let (mut send, _recv) = raw.open_bi().await?;
    send.write_all(&frame[..frame.len() / 2]).await?;
    raw.close(0u32.into(), b"gone mid-request");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        end(client.clone()).await?,
        0,
        "half a request stores nothing"
    );

    // Mid-request through the client: a long poll is cut by the client
    // closing; its next request reconnects by itself.
    let waiting = long_poll_on(&client, "drops", 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.close().await;
    assert!(
        waiting.await?.is_err(),
        "the cut request fails, it is not answered"
    );
    client
        .producer("drops")
        .send(NewMessage::new("first"))
        .await?;
    assert_eq!(end(client.clone()).await?, 1);

    // Mid-batch: a member polls a batch and its connection drops before it
    // commits; the next member of the group gets the whole batch again.
    let batch: Vec<_> = (0..99).map(|i| NewMessage::new(format!("m-{i}"))).collect();
    client.producer("drops").send_batch(batch).await?;
    let options = || ConsumerOptions {
        limits: FetchLimits {
            max_messages: 50,
            max_bytes: 1 << 20,
            max_wait_ms: 500,
        },
        ..ConsumerOptions::default()
    };
    let first = broker.client().await?;
    let mut member = first.consumer("billing", &["drops"], options()).await?;
    let polled = member.poll().await?;
    assert!(!polled.is_empty());
    first.close().await;
    let second = broker.client().await?;
    let mut member = second.consumer("billing", &["drops"], options()).await?;
    let mut offsets = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while offsets.len() < 100 && std::time::Instant::now() < deadline {
        offsets.extend(member.poll().await?.iter().map(|m| m.message.offset));
        member.commit().await?;
    }
    assert_eq!(
        offsets,
        (0..100).collect::<Vec<u64>>(),
        "every message, once, from offset 0"
    );
    Ok(())
}

/// A broker killed and back within milliseconds, while a consumer's long
/// poll waits: the old broker had acknowledged the poll, so the client has
/// nothing left to send, and only its liveness ping after the wait finds the
/// connection gone (the heartbeat is 20 s away here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_in_a_long_poll_notices_a_restarted_broker_soon_after_its_wait(
) -> anyhow::Result<()> {
    use msmq_client::ConsumerOptions;
    let mut broker = TestBroker::start()?;
    broker.client().await?.create_topic("restarts", 1).await?;
    let wait_ms = 300;
    let options = ConsumerOptions {
        limits: FetchLimits {
            max_wait_ms: wait_ms,
            ..FetchLimits::default()
        },
        session_timeout: Duration::from_secs(60),
        ..ConsumerOptions::default()
    };
    let consumer_client = broker.client().await?;
    let mut consumer = consumer_client
        .consumer("watchers", &["restarts"], options)
        .await?;
    assert!(consumer.poll().await?.is_empty());
    // The next poll is on its way and acknowledged.
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.restart()?;
    let restarted = std::time::Instant::now();
    broker
        .client()
        .await?
        .producer("restarts")
        .send(NewMessage::new("after"))
        .await?;
    let mut received = Vec::new();
    let mut errors = 0;
    while received.is_empty() && restarted.elapsed() < Duration::from_secs(15) {
        match consumer.poll().await {
            Ok(batch) => received.extend(batch.into_iter().map(|m| m.message.payload)),
            Err(_) => {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let took = restarted.elapsed();
    println!(
        "the consumer got the first message {took:?} after the restart ({errors} failed polls)"
    );
    assert_eq!(received, [b"after".to_vec()]);
    assert!(
        took < Duration::from_millis(u64::from(wait_ms) + 1_500),
        "took {took:?}"
    );
    Ok(())
}

/// A long poll at `offset` of partition 0, in flight on the client's connection.
fn long_poll_on(
    client: &Client,
    topic: &'static str,
    offset: u64,
) -> tokio::task::JoinHandle<Result<msmq_client::protocol::FetchedMessages, msmq_client::ClientError>>
{
    let client = client.clone();
    tokio::spawn(async move {
        let limits = FetchLimits {
            max_wait_ms: 5_000,
            ..FetchLimits::default()
        };
        client.fetch(topic, 0, offset, limits).await
    })
}

/// Path-MTU discovery reaches `MTU_PROBE_BYTES_MAX` on loopback (quinn's
/// default accepted payload, 1472, would stop it there), and a large request
/// loses no datagram: a limit past what one segmented UDP send carries made
/// the kernel refuse whole batches, which the sender saw as loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_connections_use_large_datagrams_without_loss() -> anyhow::Result<()> {
    use msmq_client::transport::MTU_PROBE_BYTES_MAX;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("wide", 1).await?;
    let producer = client.producer("wide");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = client.connection_stats().await.expect("connected");
        if stats.path.current_mtu == MTU_PROBE_BYTES_MAX {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "path MTU stayed at {} (wanted {MTU_PROBE_BYTES_MAX})",
            stats.path.current_mtu
        );
        producer.send(NewMessage::new("probe")).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = client.connection_stats().await.expect("connected");
    for round in 0..20u8 {
        let batch = (0..100)
            .map(|_| NewMessage::new(vec![round; 1000]))
            .collect();
        producer.send_batch(batch).await?;
    }
    let after = client.connection_stats().await.expect("connected");
    assert_eq!(after.path.current_mtu, MTU_PROBE_BYTES_MAX);
    assert_eq!(
        after.path.lost_packets, before.path.lost_packets,
        "datagrams were lost on loopback"
    );
    assert!(
        after.udp_tx.datagrams - before.udp_tx.datagrams < 20 * 40,
        "2 MB went in {} datagrams",
        after.udp_tx.datagrams - before.udp_tx.datagrams
    );
    Ok(())
}
