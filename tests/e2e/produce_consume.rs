//! Producing, fan-out to groups, ordering, durability across restarts.

use crate::harness::{read_all, TestBroker};
use msmq_client::{ConsumerOptions, ErrorCode, FetchLimits, NewMessage, ReceivedMessage};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

fn fast_options() -> ConsumerOptions {
    ConsumerOptions {
        limits: FetchLimits {
            max_messages: 300,
            max_bytes: 1 << 20,
            max_wait_ms: 200,
        },
        ..ConsumerOptions::default()
    }
}

/// Poll until `want` messages arrived or `timeout` passed; commits as it goes.
pub async fn drain(
    consumer: &mut msmq_client::Consumer,
    want: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<ReceivedMessage>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let batch = consumer.poll().await?;
        consumer.commit().await?;
        got.extend(batch);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_groups_each_get_every_message_once_in_partition_order() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 4).await?;
    let producer = client.producer("payments");
    let mut acked = BTreeMap::new();
    for batch in 0..20 {
        let messages = (0..50)
            .map(|i| {
                let n = batch * 50 + i;
                NewMessage::new(format!("transfer-{n}")).with_key(format!("account-{}", n % 17))
            })
            .collect();
        for ack in producer.send_batch(messages).await? {
            acked.insert((ack.partition, ack.offset), ());
        }
    }
    assert_eq!(acked.len(), 1000);
    for group in ["billing", "points", "notification"] {
        let mut consumer = client
            .consumer(group, &["payments"], fast_options())
            .await?;
        let got = drain(&mut consumer, 1000, Duration::from_secs(30)).await?;
        assert_eq!(got.len(), 1000, "group {group} got {} messages", got.len());
        // Exactly once, and in offset order within each partition.
        let mut last: HashMap<u32, u64> = HashMap::new();
        for m in &got {
            if let Some(prev) = last.insert(m.partition, m.offset()) {
                assert_eq!(
                    m.offset(),
                    prev + 1,
                    "group {group} partition {} out of order",
                    m.partition
                );
            } else {
                assert_eq!(m.offset(), 0);
            }
        }
        let distinct: std::collections::BTreeSet<_> =
            got.iter().map(|m| (m.partition, m.offset())).collect();
        assert_eq!(distinct.len(), 1000);
        // Nothing more arrives.
        assert!(consumer.poll().await?.is_empty());
        consumer.leave().await?;
    }
    // Same key, same partition.
    let mut key_partition: HashMap<Vec<u8>, u32> = HashMap::new();
    for p in 0..4 {
        for m in read_all(&client, "payments", p, 0).await? {
            let key = m.key.clone().unwrap().into_vec();
            assert_eq!(*key_partition.entry(key).or_insert(p), p);
        }
    }
    // Lag is zero for every group.
    let description = client.describe_topic("payments").await?;
    assert_eq!(description.groups.len(), 3);
    for g in &description.groups {
        assert!(g.partitions.iter().all(|p| p.lag == 0), "{g:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_fields_round_trip_and_ids_are_unique() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("orders", 2).await?;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let sent = NewMessage::new(vec![0u8, 159, 146, 150])
        .with_key("order-1")
        .with_tag("TagA")
        .with_header("amount", "1200")
        .with_header("region", "EU");
    let ack = client.producer("orders").send(sent.clone()).await?;
    let second = client.producer("orders").send(sent.clone()).await?;
    assert_ne!(ack.id, second.id);
    assert_eq!(ack.partition, second.partition, "same key, same partition");
    assert_eq!(second.offset, ack.offset + 1);
    let got = read_all(&client, "orders", ack.partition, 0).await?;
    let m = &got[0];
    assert_eq!(m.payload, sent.payload);
    assert_eq!(m.key, sent.key);
    assert_eq!(m.tag.as_deref(), Some("TagA"));
    assert_eq!(m.headers, sent.headers);
    assert_eq!(m.id, ack.id);
    assert!(m.timestamp_ms >= before && m.timestamp_ms < before + 60_000);
    // Explicit partition.
    let acks = client
        .producer("orders")
        .send_to_partition(1, vec![NewMessage::new("p1")])
        .await?;
    assert_eq!(acks[0].partition, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_a_message_arrives() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("events", 1).await?;
    let options = ConsumerOptions {
        limits: FetchLimits {
            max_messages: 10,
            max_bytes: 1 << 20,
            max_wait_ms: 10_000,
        },
        ..ConsumerOptions::default()
    };
    let mut consumer = client.consumer("g", &["events"], options).await?;
    let producer = client.producer("events");
    let send = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        producer.send(NewMessage::new("wake up")).await
    });
    let started = Instant::now();
    let got = consumer.poll().await?;
    let waited = started.elapsed();
    send.await??;
    assert_eq!(got.len(), 1);
    assert!(
        waited >= Duration::from_millis(250),
        "returned before the message existed: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "long poll did not wake up: {waited:?}"
    );
    // A direct fetch at the end waits and then returns empty.
    let started = Instant::now();
    let fetched = client
        .fetch(
            "events",
            0,
            1,
            FetchLimits {
                max_messages: 1,
                max_bytes: 1024,
                max_wait_ms: 200,
            },
        )
        .await?;
    assert!(fetched.messages.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(150));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_and_messages_survive_clean_and_hard_restarts() -> anyhow::Result<()> {
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("ledger", 4).await?;
    let producer = client.producer("ledger");
    for i in 0..10 {
        producer
            .send_batch(
                (0..40)
                    .map(|j| NewMessage::new(format!("{i}-{j}")))
                    .collect(),
            )
            .await?;
    }
    let mut consumer = client
        .consumer("billing", &["ledger"], fast_options())
        .await?;
    let first = drain(&mut consumer, 150, Duration::from_secs(20)).await?;
    assert!(first.len() >= 150);
    let consumed = first.len();
    consumer.leave().await?;
    drop(client);

    // Clean stop, then a hard kill: the committed offsets hold either way.
    assert!(broker.terminate()?.success(), "clean exit");
    broker.restart()?;
    broker.restart()?;
    let client = broker.client().await?;
    let description = client.describe_topic("ledger").await?;
    let total: u64 = description.partitions.iter().map(|p| p.end_offset).sum();
    assert_eq!(total, 400);
    let mut consumer = client
        .consumer("billing", &["ledger"], fast_options())
        .await?;
    let rest = drain(&mut consumer, 400 - consumed, Duration::from_secs(20)).await?;
    assert_eq!(
        rest.len(),
        400 - consumed,
        "resumed from the committed offsets, no repeats"
    );
    let mut all: Vec<String> = first
        .iter()
        .chain(rest.iter())
        .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 400);
    // New messages after restarts get fresh offsets.
    let ack = client
        .producer("ledger")
        .send_to_partition(0, vec![NewMessage::new("after")])
        .await?;
    assert_eq!(ack[0].offset, description.partitions[0].end_offset);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_every_request_and_loses_no_ack() -> anyhow::Result<()> {
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("burst", 2).await?;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let producer = client.producer("burst");
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..10_000 {
                let msg = NewMessage::new(format!("{t}-{i}"));
                match producer.send_batch(vec![msg.clone(), msg]).await {
                    Ok(acks) => acked.extend(
                        acks.into_iter()
                            .map(|a| (a.partition, a.offset, format!("{t}-{i}"))),
                    ),
                    Err(e) => {
                        // Refused (shutting down) or cut off: never half applied.
                        if let Some(code) = e.code() {
                            assert_eq!(code, ErrorCode::SHUTTING_DOWN, "{e}");
                        }
                        break;
                    }
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = broker.terminate()?;
    assert!(status.success(), "SIGTERM exits cleanly");
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await?);
    }
    assert!(!acked.is_empty());
    broker.restart()?;
    let client = broker.client().await?;
    let mut stored = HashMap::new();
    for p in 0..2 {
        for m in read_all(&client, "burst", p, 0).await? {
            stored.insert((p, m.offset), String::from_utf8(m.payload)?);
        }
    }
    for (p, offset, payload) in &acked {
        assert_eq!(
            stored.get(&(*p, *offset)),
            Some(payload),
            "acked message lost"
        );
    }
    // Batches are atomic: both copies of a request, or neither.
    let mut counts: HashMap<&String, usize> = HashMap::new();
    for payload in stored.values() {
        *counts.entry(payload).or_default() += 1;
    }
    assert!(counts.values().all(|c| *c == 2), "a batch was half applied");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_reconnects_after_the_broker_restarts() -> anyhow::Result<()> {
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("again", 1).await?;
    let producer = client.producer("again");
    producer.send(NewMessage::new("before")).await?;
    broker.terminate()?;
    broker.restart()?;
    // The old connection is gone; the next requests reconnect by themselves.
    let mut result = producer.send(NewMessage::new("after")).await;
    for _ in 0..20 {
        if result.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        result = producer.send(NewMessage::new("after")).await;
    }
    assert_eq!(result?.offset, 1);
    let all = read_all(&client, "again", 0, 0).await?;
    assert_eq!(all.len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_takes_its_messages_and_offsets_with_it() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("temp", 2).await?;
    client
        .producer("temp")
        .send_batch(vec![NewMessage::new("old"); 10])
        .await?;
    let mut consumer = client.consumer("g", &["temp"], fast_options()).await?;
    assert_eq!(
        drain(&mut consumer, 10, Duration::from_secs(10))
            .await?
            .len(),
        10
    );
    consumer.leave().await?;
    client.delete_topic("temp").await?;
    assert!(client.list_topics().await?.iter().all(|t| t.name != "temp"));
    assert_eq!(
        client
            .describe_topic("temp")
            .await
            .err()
            .and_then(|e| e.code()),
        Some(ErrorCode::UNKNOWN_TOPIC)
    );
    // Re-created under the same name: empty, new ids, no old group offsets.
    client.create_topic("temp", 1).await?;
    let description = client.describe_topic("temp").await?;
    assert_eq!(description.partitions[0].end_offset, 0);
    assert!(description.groups.is_empty());
    let ack = client.producer("temp").send(NewMessage::new("new")).await?;
    assert_eq!(ack.offset, 0);
    let mut consumer = client.consumer("g", &["temp"], fast_options()).await?;
    let got = drain(&mut consumer, 1, Duration::from_secs(10)).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.payload, b"new");
    assert_eq!(got[0].message.id, ack.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_found_by_id_and_by_key() -> anyhow::Result<()> {
    use crate::harness::cli;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("orders", 3).await?;
    let producer = client.producer("orders");
    let mut acks = Vec::new();
    for i in 0..30 {
        let m = NewMessage::new(format!("order-{i}")).with_key(format!("customer-{}", i % 4));
        acks.extend(
            producer
                .send_batch(vec![m.clone(), NewMessage::new(format!("plain-{i}"))])
                .await?,
        );
    }
    // A transactional message keeps its id after commit.
    let tx = client
        .transactional_producer("pc", "orders", |_: &msmq_client::TransactionCheck| {
            msmq_client::TxAction::Commit
        })
        .await?;
    let half = tx
        .send_half(NewMessage::new("tx-order").with_key("customer-9"))
        .await?;
    assert!(
        client.get_message(half.id).await?.is_none(),
        "a half message is not found"
    );
    tx.commit(half.tx_id).await?;
    for ack in acks.iter().step_by(7) {
        let found = client.get_message(ack.id).await?.expect("found by id");
        assert_eq!(
            (found.partition, found.message.offset, found.message.id),
            (ack.partition, ack.offset, ack.id)
        );
    }
    let found = client
        .get_message(half.id)
        .await?
        .expect("committed transaction found by id");
    assert_eq!(found.message.payload, b"tx-order");
    let by_key = client.find_messages("orders", b"customer-1", 100).await?;
    let mut payloads: Vec<String> = by_key
        .iter()
        .map(|f| String::from_utf8(f.message.payload.clone()).unwrap())
        .collect();
    payloads.sort();
    let mut want: Vec<String> = (0..30)
        .filter(|i| i % 4 == 1)
        .map(|i| format!("order-{i}"))
        .collect();
    want.sort();
    assert_eq!(payloads, want);
    assert_eq!(
        client
            .find_messages("orders", b"customer-9", 10)
            .await?
            .len(),
        1
    );
    assert!(client
        .find_messages("orders", b"nobody", 10)
        .await?
        .is_empty());
    // From the command line.
    let out = cli(&broker, &["message", "get", &acks[0].id.to_string()], None)?;
    assert!(String::from_utf8(out.stdout)?.contains("order-0"));
    let out = cli(
        &broker,
        &[
            "message",
            "find",
            "--topic",
            "orders",
            "--key",
            "customer-2",
        ],
        None,
    )?;
    assert_eq!(String::from_utf8(out.stdout)?.matches("order-").count(), 7);
    let out = cli(&broker, &["message", "get", "zz"], None)?;
    assert!(!out.status.success());
    Ok(())
}
