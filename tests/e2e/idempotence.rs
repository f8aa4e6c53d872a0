//! Idempotent producers: a sequenced request sent again is answered with
//! its original reply and stored once, over any connection and across a
//! restart; gaps, stale epochs and the producer limits get their codes.

use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::{ProducerIdentity, ProducerSequence, Reply, Request, SequencedRequest};
use msmq_client::{Client, ClientError, ErrorCode, MessageAck, NewMessage};
use std::time::Duration;

async fn init(client: &Client, producer_id: Option<u64>) -> Result<ProducerIdentity, ClientError> {
    match client
        .request(&Request::InitProducer { producer_id })
        .await?
    {
        Reply::ProducerInit(identity) => Ok(identity),
        other => panic!("InitProducer answered {other:?}"),
    }
}

fn sequenced(who: ProducerIdentity, sequence: u64, request: SequencedRequest) -> Request {
    Request::Sequenced {
        producer: ProducerSequence {
            producer_id: who.producer_id,
            epoch: who.epoch,
            sequence,
        },
        request,
    }
}

fn produce(who: ProducerIdentity, sequence: u64, messages: Vec<NewMessage>) -> Request {
    sequenced(
        who,
        sequence,
        SequencedRequest::Produce {
            topic: "payments".into(),
            partition: None,
            messages,
        },
    )
}

async fn acks(client: &Client, request: &Request) -> Result<Vec<MessageAck>, ClientError> {
    match client.request(request).await? {
        Reply::Produced(acks) => Ok(acks),
        other => panic!("produce answered {other:?}"),
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Broker(refusal)) => refusal.code,
        other => panic!("expected a broker error, got {other:?}"),
    }
}

/// Keyed messages over three partitions, and one scheduled for later.
fn transfers(first: u32, count: u32) -> Vec<NewMessage> {
    (first..first + count)
        .map(|i| {
            let m = NewMessage::new(format!("transfer-{i}")).with_key(format!("acct-{}", i % 5));
            if i == first + 1 {
                m.with_delay(Duration::from_secs(3600))
            } else {
                m
            }
        })
        .collect()
}

async fn stored(client: &Client) -> anyhow::Result<Vec<String>> {
    let mut payloads = Vec::new();
    for p in 0..3 {
        for m in read_all(client, "payments", p, 0).await? {
            payloads.push(String::from_utf8(m.payload)?);
        }
    }
    payloads.sort();
    Ok(payloads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_sequenced_produce_is_stored_once_and_gets_its_first_reply() -> anyhow::Result<()>
{
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 3).await?;
    let who = init(&client, None).await?;
    assert_eq!(who.epoch, 0);

    let first = produce(who, 0, transfers(0, 6));
    let original = acks(&client, &first).await?;
    assert_eq!(original.len(), 6);
    assert!(original
        .iter()
        .any(|a| a.offset == msmq_client::protocol::SCHEDULED_OFFSET));
    // The same request again, on this connection and on a new one.
    assert_eq!(acks(&client, &first).await?, original);
    let other = broker.client().await?;
    assert_eq!(acks(&other, &first).await?, original);
    assert_eq!(stored(&client).await?.len(), 5, "the scheduled one waits");

    // The next request continues the sequence; a gap or a changed retry does not.
    let second = produce(who, 6, transfers(6, 4));
    let second_acks = acks(&other, &second).await?;
    assert_eq!(
        code(acks(&client, &produce(who, 11, transfers(10, 1))).await),
        ErrorCode::SEQUENCE_OUT_OF_ORDER
    );
    assert_eq!(
        code(acks(&client, &produce(who, 6, transfers(6, 2))).await),
        ErrorCode::INVALID_ARGUMENT
    );
    assert_eq!(stored(&client).await?.len(), 8);

    // Replies survive a crash.
    broker.kill9();
    broker.restart()?;
    let client = broker.client().await?;
    assert_eq!(acks(&client, &second).await?, second_acks);
    assert_eq!(acks(&client, &first).await?, original);
    assert_eq!(stored(&client).await?.len(), 8);

    // A half message sent twice is one transaction.
    let half = sequenced(
        who,
        10,
        SequencedRequest::SendHalf {
            producer_group: "payment-centre".into(),
            topic: "payments".into(),
            partition: None,
            messages: vec![NewMessage::new("half-1")],
            check_immunity_ms: 60_000,
        },
    );
    let Reply::HalfStored(tx) = client.request(&half).await? else {
        panic!("SendHalf did not answer HalfStored");
    };
    let Reply::HalfStored(again) = client.request(&half).await? else {
        panic!("the repeated SendHalf did not answer HalfStored");
    };
    assert_eq!(tx, again);
    assert_eq!(client.list_transactions(false, 100).await?.len(), 1);

    // A new epoch fences the old one; the new one starts at sequence 0.
    let next = init(&client, Some(who.producer_id)).await?;
    assert_eq!((next.producer_id, next.epoch), (who.producer_id, 1));
    assert_eq!(
        code(acks(&client, &produce(who, 11, transfers(11, 1))).await),
        ErrorCode::PRODUCER_FENCED
    );
    // Two messages, the second scheduled for later.
    acks(&client, &produce(next, 0, transfers(11, 2))).await?;
    assert_eq!(stored(&client).await?.len(), 9);
    assert_eq!(
        code(init(&client, Some(999)).await),
        ErrorCode::UNKNOWN_PRODUCER
    );
    Ok(())
}

/// The reply window holds exactly the last `PRODUCER_REQUESTS_REMEMBERED`
/// requests: the oldest of them is still answered, one older is refused as
/// `DUPLICATE_SEQUENCE` and stored nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reply_window_keeps_the_last_requests() -> anyhow::Result<()> {
    const WINDOW: u64 = msmq_broker::producers::PRODUCER_REQUESTS_REMEMBERED as u64;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 3).await?;
    let who = init(&client, None).await?;
    let mut replies = Vec::new();
    for i in 0..=WINDOW {
        let request = produce(who, i, vec![NewMessage::new(format!("m{i}"))]);
        replies.push((request.clone(), acks(&client, &request).await?));
    }
    // Requests 1..=WINDOW are the last WINDOW: all answered as before.
    for (request, original) in &replies[1..] {
        assert_eq!(&acks(&client, request).await?, original);
    }
    assert_eq!(
        code(acks(&client, &replies[0].0).await),
        ErrorCode::DUPLICATE_SEQUENCE
    );
    assert_eq!(stored(&client).await?.len(), WINDOW as usize + 1);
    Ok(())
}

/// `producers_max` ids at most: at the limit the next one is refused with a
/// retry hint; once the others are idle past `producer_idle_expiry` they
/// are forgotten (their requests get `UNKNOWN_PRODUCER`) and make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_ids_are_bounded_and_expire_when_idle() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--producers-max", "2", "--producer-idle-expiry", "2s"])?;
    let client = broker.client().await?;
    client.create_topic("payments", 3).await?;
    let a = init(&client, None).await?;
    let b = init(&client, None).await?;
    match init(&client, None).await {
        Err(ClientError::Broker(refusal)) => {
            assert_eq!(refusal.code, ErrorCode::PRODUCERS_FULL);
            assert!(refusal.retry_after_ms.is_some());
        }
        other => panic!("a third producer id was not refused: {other:?}"),
    }
    // Used within the expiry: still known.
    acks(&client, &produce(a, 0, transfers(0, 1))).await?;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let c = init(&client, None).await?;
    assert_ne!(c.producer_id, a.producer_id);
    assert_eq!(
        code(acks(&client, &produce(a, 1, transfers(1, 1))).await),
        ErrorCode::UNKNOWN_PRODUCER
    );
    assert_eq!(
        code(acks(&client, &produce(b, 0, transfers(1, 1))).await),
        ErrorCode::UNKNOWN_PRODUCER
    );
    acks(&client, &produce(c, 0, transfers(1, 1))).await?;
    Ok(())
}

/// Batches whose reply the broker drops after committing them (the
/// connection is cut, as by a network fault), then answers on the retry.
const DROPPED_REPLIES: u64 = 1000;

/// Every dropped reply's batch is sent again by the idempotent producer over
/// a new connection and stored once: 1,000 cut replies, 0 duplicates, 0
/// losses. The same fault with idempotence off and the caller sending again
/// stores duplicates, which shows the check can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cut_after_the_commit_lose_and_duplicate_nothing() -> anyhow::Result<()> {
    let broker = TestBroker::start_with_faults(&[])?;
    let client = broker.client().await?;
    client.create_topic("payments", 3).await?;
    std::fs::create_dir_all(broker.faults_dir())?;
    let switch = broker.faults_dir().join("drop-replies");
    std::fs::write(&switch, DROPPED_REPLIES.to_string())?;

    let producer = client.producer("payments");
    let started = std::time::Instant::now();
    let mut acked = std::collections::BTreeMap::new();
    for batch in 0..DROPPED_REPLIES {
        let messages = (0..3)
            .map(|i| {
                NewMessage::new(format!("p-{batch}-{i}")).with_key(format!("k{}", (batch + i) % 7))
            })
            .collect();
        for (i, ack) in producer.send_batch(messages).await?.into_iter().enumerate() {
            acked.insert((ack.partition, ack.offset), format!("p-{batch}-{i}"));
        }
    }
    assert_eq!(
        std::fs::read_to_string(&switch)?.trim(),
        "0",
        "every reply was dropped once"
    );
    let mut log = std::collections::BTreeMap::new();
    let mut copies: std::collections::HashMap<String, usize> = Default::default();
    for p in 0..3 {
        for m in read_all(&client, "payments", p, 0).await? {
            let payload = String::from_utf8(m.payload)?;
            *copies.entry(payload.clone()).or_default() += 1;
            log.insert((p, m.offset), payload);
        }
    }
    let duplicated = copies.values().filter(|n| **n > 1).count();
    let missing = (0..DROPPED_REPLIES)
        .flat_map(|b| (0..3).map(move |i| format!("p-{b}-{i}")))
        .filter(|p| !copies.contains_key(p))
        .count();
    println!(
        "{DROPPED_REPLIES} replies cut after the commit in {:?}: {} messages sent, {} stored, {missing} missing, {duplicated} duplicated",
        started.elapsed(),
        3 * DROPPED_REPLIES,
        log.len()
    );
    assert_eq!((missing, duplicated), (0, 0));
    assert_eq!(
        log, acked,
        "every acknowledgement names where its message is"
    );
    // Each retry was answered from the stored reply, and the metric says so.
    let http = broker.http.as_deref().expect("metrics endpoint");
    let repeats = crate::metrics::scrape(http)?
        .lines()
        .find_map(|l| {
            l.strip_prefix("msmq_sequenced_repeats_total ")
                .map(str::to_string)
        })
        .expect("msmq_sequenced_repeats_total is exported");
    assert_eq!(repeats.parse::<f64>()? as u64, DROPPED_REPLIES);

    // Without idempotence, sending again after a cut reply duplicates.
    std::fs::write(&switch, "10")?;
    let plain = client.producer_with(
        "control",
        msmq_client::ProducerOptions {
            idempotent: false,
            ..Default::default()
        },
    );
    client.create_topic("control", 1).await?;
    let mut sends = 0;
    for batch in 0..10 {
        let message = || vec![NewMessage::new(format!("c-{batch}"))];
        while plain.send_batch(message()).await.is_err() {
            sends += 1;
            anyhow::ensure!(sends < 100, "the control producer does not get through");
        }
    }
    let stored = read_all(&client, "control", 0, 0).await?.len();
    assert_eq!(stored, 20, "each of the 10 cut replies made a duplicate");
    Ok(())
}

/// A retry stores nothing, so the limits that guard new writes do not
/// refuse it: with the backlog full, a stored request sent again still gets
/// its first reply, and a new one gets `BACKLOG_FULL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_answered_even_when_the_backlog_is_full() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--backlog-messages-max", "5"])?;
    let client = broker.client().await?;
    client.create_topic("payments", 3).await?;
    let who = init(&client, None).await?;
    // Five messages to partition 0 fill its backlog.
    let to_partition_0 = |sequence: u64, from: u32| {
        let messages = (from..from + 5)
            .map(|i| NewMessage::new(format!("m{i}")))
            .collect();
        sequenced(
            who,
            sequence,
            SequencedRequest::Produce {
                topic: "payments".into(),
                partition: Some(0),
                messages,
            },
        )
    };
    let first = to_partition_0(0, 0);
    let original = acks(&client, &first).await?;
    assert_eq!(
        code(acks(&client, &to_partition_0(5, 5)).await),
        ErrorCode::BACKLOG_FULL
    );
    assert_eq!(acks(&client, &first).await?, original);
    assert_eq!(stored(&client).await?.len(), 5);
    Ok(())
}
