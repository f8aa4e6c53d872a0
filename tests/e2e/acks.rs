//! Per-message acknowledgement: retries with back-off, dead letters,
//! redelivery after a crash.

use crate::harness::{cli, read_all, TestBroker};
use msmq_client::{ConsumerOptions, FetchLimits, NewMessage};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

fn options() -> ConsumerOptions {
    ConsumerOptions {
        limits: FetchLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            max_wait_ms: 200,
        },
        session_timeout: Duration::from_secs(10),
        ..ConsumerOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nacked_twice_then_acked_is_delivered_three_times_after_the_back_off() -> anyhow::Result<()>
{
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    let backoff = [Duration::from_millis(400), Duration::from_millis(800)];
    client
        .configure_group("billing", 16, &backoff, false)
        .await?;
    client
        .producer("payments")
        .send(NewMessage::new("transfer-7"))
        .await?;

    let mut billing = client.consumer("billing", &["payments"], options()).await?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.len() < 3 && Instant::now() < deadline {
        for d in billing.receive(Duration::from_secs(30)).await? {
            seen.push((Instant::now(), d.attempt, d.message.payload.clone()));
            if d.attempt < 3 {
                assert_eq!(
                    billing.nack(std::slice::from_ref(&d), "not yet").await?,
                    vec![true]
                );
            } else {
                assert_eq!(billing.ack(std::slice::from_ref(&d)).await?, vec![true]);
                // Acking twice: the receipt is stale now.
                assert_eq!(billing.ack(&[d]).await?, vec![false]);
            }
        }
    }
    let attempts: Vec<u32> = seen.iter().map(|s| s.1).collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    for (i, want) in backoff.iter().enumerate() {
        let gap = seen[i + 1].0 - seen[i].0;
        assert!(gap >= *want, "gap {i} was {gap:?}, back-off {want:?}");
        assert!(
            gap < *want + Duration::from_millis(600),
            "gap {i} was {gap:?}, back-off {want:?}"
        );
    }
    // Nothing more for billing; another group saw it exactly once.
    let extra = billing.receive(Duration::from_secs(30)).await?;
    assert!(extra.is_empty(), "{extra:?}");
    let mut points = client.consumer("points", &["payments"], options()).await?;
    let got = points.receive(Duration::from_secs(30)).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].attempt, 1);
    points.ack(&got).await?;
    assert!(points.receive(Duration::from_secs(30)).await?.is_empty());
    // The group's committed progress passed the message.
    let lag = client.describe_topic("payments").await?;
    let billing_lag = lag.groups.iter().find(|g| g.group == "billing").unwrap();
    assert_eq!(billing_lag.partitions[0].lag, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_acked_is_dead_lettered_listed_and_re_driven() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    client
        .configure_group("notify", 3, &[Duration::from_millis(100)], false)
        .await?;
    let ack = client
        .producer("payments")
        .send(
            NewMessage::new("poison")
                .with_key("k")
                .with_header("amount", "5"),
        )
        .await?;
    client
        .producer("payments")
        .send(NewMessage::new("fine"))
        .await?;
    let mut notify = client.consumer("notify", &["payments"], options()).await?;
    let mut attempts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        for d in notify.receive(Duration::from_millis(200)).await? {
            if d.message.payload == b"fine" {
                notify.ack(&[d]).await?;
            } else {
                attempts.push(d.attempt); // never acked
            }
        }
        if attempts.len() == 3
            && !read_all(&client, "%DLQ%notify", 0, 0)
                .await
                .unwrap_or_default()
                .is_empty()
        {
            break;
        }
    }
    assert_eq!(attempts, vec![1, 2, 3]);
    let letters = read_all(&client, "%DLQ%notify", 0, 0).await?;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.payload, b"poison");
    let header = |n: &str| {
        letter
            .headers
            .iter()
            .find(|h| h.name == n)
            .map(|h| h.value.clone())
    };
    assert_eq!(
        header("amount").as_deref(),
        Some("5"),
        "original headers kept"
    );
    assert_eq!(header("msmq.dlq.topic").as_deref(), Some("payments"));
    assert_eq!(header("msmq.dlq.attempts").as_deref(), Some("3"));
    assert_eq!(header("msmq.dlq.id"), Some(ack.id.to_string()));
    assert!(header("msmq.dlq.reason").unwrap().contains("invisibility"));
    // No fourth delivery.
    assert!(notify.receive(Duration::from_millis(200)).await?.is_empty());

    let listed = cli(&broker, &["dlq", "list", "notify"], None)?;
    let text = String::from_utf8(listed.stdout)?;
    assert!(
        text.contains(&ack.id.to_string()) && text.contains("payments/"),
        "{text}"
    );
    let redriven = cli(&broker, &["dlq", "redrive", "notify"], None)?;
    assert!(String::from_utf8(redriven.stdout)?.contains("re-drove 1"));
    let again = cli(&broker, &["dlq", "redrive", "notify"], None)?;
    assert!(
        String::from_utf8(again.stdout)?.contains("re-drove 0"),
        "re-driven once only"
    );
    // Delivered again, as a new message with its own id and fresh attempts.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = Vec::new();
    while back.is_empty() && Instant::now() < deadline {
        back = notify.receive(Duration::from_secs(30)).await?;
    }
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].message.payload, b"poison");
    assert_eq!(back[0].attempt, 1);
    assert!(back[0]
        .message
        .headers
        .iter()
        .all(|h| !h.name.starts_with("msmq.dlq.")));
    notify.ack(&back).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_by_a_crashed_member_go_to_another_after_the_invisibility(
) -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let admin = broker.client().await?;
    admin.create_topic("payments", 2).await?;
    admin
        .configure_group("billing", 16, &[Duration::from_millis(100)], false)
        .await?;
    let producer = admin.producer("payments");
    for i in 0..40 {
        producer
            .send_to_partition(i % 2, vec![NewMessage::new(format!("m{i}"))])
            .await?;
    }
    // A member takes everything and dies without acking.
    let doomed = broker.client().await?;
    let mut a = doomed.consumer("billing", &["payments"], options()).await?;
    let mut held = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while held.len() < 40 && Instant::now() < deadline {
        for d in a.receive(Duration::from_millis(1500)).await? {
            held.insert(String::from_utf8(d.message.payload)?);
        }
    }
    assert_eq!(held.len(), 40);
    let crashed_at = Instant::now();
    drop(a);
    doomed.close().await;

    let survivor = broker.client().await?;
    let mut b = survivor
        .consumer("billing", &["payments"], options())
        .await?;
    let mut got = BTreeSet::new();
    let mut first_at = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while got.len() < 40 && Instant::now() < deadline {
        let batch = b.receive(Duration::from_secs(30)).await?;
        if !batch.is_empty() && first_at.is_none() {
            first_at = Some(Instant::now());
        }
        for d in &batch {
            assert_eq!(d.attempt, 2, "a redelivery");
            got.insert(String::from_utf8(d.message.payload.clone())?);
        }
        b.ack(&batch).await?;
    }
    assert_eq!(got, held, "none lost");
    let waited = first_at.unwrap() - crashed_at;
    assert!(
        waited >= Duration::from_millis(1200),
        "redelivered before the invisibility ran out: {waited:?}"
    );
    assert!(
        b.receive(Duration::from_secs(30)).await?.is_empty(),
        "nothing twice"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_survive_a_restart_and_the_modes_do_not_mix() -> anyhow::Result<()> {
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    client
        .configure_group("billing", 5, &[Duration::from_millis(1500)], false)
        .await?;
    let producer = client.producer("payments");
    producer.send(NewMessage::new("first")).await?;
    producer.send(NewMessage::new("second")).await?;
    let mut billing = client.consumer("billing", &["payments"], options()).await?;
    let got = billing.receive(Duration::from_secs(30)).await?;
    assert_eq!(got.len(), 2);
    // "first" is retried later; "second" stays leased, holding the floor.
    billing.nack(&got[..1], "busy").await?;
    // The same group may not poll or commit offsets now.
    let mut poller = client.consumer("billing", &["payments"], options()).await?;
    assert_eq!(
        poller.poll().await.err().and_then(|e| e.code()),
        Some(msmq_client::ErrorCode::INVALID_ARGUMENT)
    );
    drop(poller);
    broker.kill9();
    broker.restart()?;
    let client = broker.client().await?;
    let mut billing = client.consumer("billing", &["payments"], options()).await?;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && seen.len() < 2 {
        for d in billing.receive(Duration::from_secs(30)).await? {
            seen.push((String::from_utf8(d.message.payload.clone())?, d.attempt));
            billing.ack(&[d]).await?;
        }
    }
    seen.sort();
    // "second" was only leased: redelivered fresh. "first" keeps its retry,
    // attempt 2, and is not handed out again as a fresh message.
    assert_eq!(
        seen,
        vec![("first".to_string(), 2), ("second".to_string(), 1)]
    );
    assert!(billing.receive(Duration::from_secs(30)).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_groups_process_each_key_strictly_in_order_while_keys_interleave(
) -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("ledger", 2).await?;
    client
        .configure_group("fifo", 1000, &[Duration::from_millis(5)], true)
        .await?;
    let producer = client.producer("ledger");
    const KEYS: usize = 4;
    const PER_KEY: usize = 1000;
    for chunk in 0..(PER_KEY / 50) {
        let mut batch = Vec::new();
        for i in chunk * 50..(chunk + 1) * 50 {
            for k in 0..KEYS {
                batch.push(NewMessage::new(format!("{k}:{i}")).with_key(format!("account-{k}")));
            }
        }
        producer.send_batch(batch).await?;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut consumer = client.consumer("fifo", &["ledger"], options()).await?;
    let mut expected = [0usize; KEYS];
    let mut processed: Vec<usize> = Vec::new();
    let (mut nacks, mut rounds) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while processed.len() < KEYS * PER_KEY && Instant::now() < deadline {
        rounds += 1;
        let batch = consumer.receive(Duration::from_secs(30)).await?;
        let mut in_batch = BTreeSet::new();
        let (mut to_ack, mut to_nack) = (Vec::new(), Vec::new());
        for d in batch {
            let text = String::from_utf8(d.message.payload.clone())?;
            let (k, i) = text.split_once(':').unwrap();
            let (k, i): (usize, usize) = (k.parse()?, i.parse()?);
            assert!(in_batch.insert(k), "two messages of key {k} out at once");
            assert_eq!(
                i, expected[k],
                "key {k}: got {i} while {} is not done",
                expected[k]
            );
            if rng.random_bool(0.1) {
                nacks += 1;
                to_nack.push(d);
            } else {
                expected[k] += 1;
                processed.push(k);
                to_ack.push(d);
            }
        }
        if !to_ack.is_empty() {
            assert!(consumer.ack(&to_ack).await?.iter().all(|ok| *ok));
        }
        if !to_nack.is_empty() {
            consumer.nack(&to_nack, "try again").await?;
        }
    }
    assert_eq!(
        expected, [PER_KEY; KEYS],
        "every message processed once, in order"
    );
    let switches = processed.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > PER_KEY, "keys interleave ({switches} switches)");
    println!(
        "{} messages, {nacks} nacks, {rounds} receives, {switches} key switches",
        processed.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_key_waiting_for_its_retry_stays_held_across_a_restart() -> anyhow::Result<()> {
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("ledger", 1).await?;
    client
        .configure_group("fifo", 10, &[Duration::from_millis(1500)], true)
        .await?;
    let producer = client.producer("ledger");
    for i in 0..3 {
        producer
            .send(NewMessage::new(format!("k:{i}")).with_key("account"))
            .await?;
    }
    let mut consumer = client.consumer("fifo", &["ledger"], options()).await?;
    let first = consumer.receive(Duration::from_secs(30)).await?;
    assert_eq!(first.len(), 1, "one message of the key at a time");
    assert_eq!(first[0].message.payload, b"k:0");
    consumer.nack(&first, "later").await?;
    broker.kill9();
    broker.restart()?;
    let client = broker.client().await?;
    let mut consumer = client.consumer("fifo", &["ledger"], options()).await?;
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while order.len() < 3 && Instant::now() < deadline {
        for d in consumer.receive(Duration::from_secs(30)).await? {
            order.push(String::from_utf8(d.message.payload.clone())?);
            consumer.ack(&[d]).await?;
        }
    }
    assert_eq!(
        order,
        vec!["k:0", "k:1", "k:2"],
        "k:1 waited for the retry of k:0"
    );
    Ok(())
}
