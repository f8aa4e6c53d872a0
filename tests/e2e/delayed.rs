//! Delayed and scheduled delivery.

use crate::harness::{cli, TestBroker};
use msmq_client::protocol::SCHEDULED_OFFSET;
use msmq_client::{ConsumerOptions, ErrorCode, FetchLimits, NewMessage};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_delayed_messages_arrive_on_time_across_a_restart() -> anyhow::Result<()> {
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("reminders", 4).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let producer = client.producer("reminders");
    let mut due: HashMap<String, u64> = HashMap::new();
    // Far enough ahead that producing all of them (slow on a loaded machine)
    // ends before the first is due.
    let base = now_ms() + 2_000;
    for batch in 0..100 {
        let mut messages = Vec::new();
        for i in 0..100 {
            let at = base + rng.random_range(0..5_000u64);
            let id = format!("r{batch}-{i}");
            due.insert(id.clone(), at);
            let mut m = NewMessage::new(id.into_bytes());
            m.deliver_at_ms = Some(at);
            messages.push(m);
        }
        for ack in producer.send_batch(messages).await? {
            assert_eq!(
                ack.offset, SCHEDULED_OFFSET,
                "scheduled, not yet in the log"
            );
        }
    }
    let options = ConsumerOptions {
        limits: FetchLimits {
            max_messages: 1000,
            max_bytes: 8 << 20,
            max_wait_ms: 100,
        },
        session_timeout: Duration::from_secs(5),
        ..ConsumerOptions::default()
    };
    let mut consumer = client
        .consumer("reminder-sender", &["reminders"], options)
        .await?;
    let mut lateness: HashMap<String, i64> = HashMap::new();
    let started = Instant::now();
    let mut restarted = false;
    while lateness.len() < due.len() && started.elapsed() < Duration::from_secs(30) {
        if !restarted && started.elapsed() > Duration::from_millis(2500) {
            broker.kill9();
            broker.restart()?;
            restarted = true;
        }
        let batch = match consumer.poll().await {
            Ok(b) => b,
            // The broker is restarting; the client reconnects.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let arrived = now_ms();
        for m in batch {
            let id = String::from_utf8(m.message.payload)?;
            let at = due[&id];
            assert!(
                m.message.timestamp_ms >= at,
                "{id} entered the log before it was due"
            );
            lateness.entry(id).or_insert(arrived as i64 - at as i64);
        }
        let _ = consumer.commit().await;
    }
    assert!(restarted);
    assert_eq!(lateness.len(), due.len(), "every scheduled message arrived");
    let mut late: Vec<i64> = lateness.values().copied().collect();
    late.sort();
    assert!(late[0] >= 0, "a message arrived {} ms early", -late[0]);
    let p99 = late[late.len() * 99 / 100];
    println!(
        "lateness: p50 {} ms, p99 {p99} ms, max {} ms",
        late[late.len() / 2],
        late[late.len() - 1]
    );
    assert!(p99 <= 200, "p99 lateness {p99} ms");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_are_bounded_and_not_for_transactions_and_the_cli_schedules() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--schedule-delay-max", "31days"])?;
    let client = broker.client().await?;
    client.create_topic("later", 1).await?;
    let producer = client.producer("later");
    // 30 days ahead is accepted; past the configured maximum is refused.
    let ack = producer
        .send(NewMessage::new("month").with_delay(Duration::from_secs(30 * 24 * 3600)))
        .await?;
    assert_eq!(ack.offset, SCHEDULED_OFFSET);
    let refused = producer
        .send_batch(vec![
            NewMessage::new("too far").with_delay(Duration::from_secs(32 * 24 * 3600))
        ])
        .await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::INVALID_ARGUMENT)
    );
    // A transactional message may not be delayed.
    let tx = client
        .transactional_producer("pc", "later", |_: &msmq_client::TransactionCheck| {
            msmq_client::TxAction::Commit
        })
        .await?;
    let half = tx
        .send_half(NewMessage::new("x").with_delay(Duration::from_secs(5)))
        .await;
    assert_eq!(
        half.err().and_then(|e| e.code()),
        Some(ErrorCode::INVALID_ARGUMENT)
    );
    // The CLI schedules with --delay; the message shows up only when due.
    let sent = Instant::now();
    let out = cli(
        &broker,
        &["produce", "later", "soon", "--delay", "1s"],
        None,
    )?;
    assert!(String::from_utf8(out.stdout)?.contains("scheduled"));
    let options = ConsumerOptions {
        limits: FetchLimits {
            max_messages: 10,
            max_bytes: 1 << 20,
            max_wait_ms: 3000,
        },
        ..ConsumerOptions::default()
    };
    let mut consumer = client.consumer("g", &["later"], options).await?;
    let got = consumer.poll().await?;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.payload, b"soon");
    assert!(
        sent.elapsed() >= Duration::from_millis(950),
        "delivered early: {:?}",
        sent.elapsed()
    );
    Ok(())
}
