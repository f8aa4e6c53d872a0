//! Crash safety: producers at full speed, SIGKILL at a random moment,
//! restart, and every acknowledged message is back at its offset, byte for
//! byte, with no offset reused. Repeated `MSMQ_CRASH_KILLS` times (default 10).

use crate::harness::{read_all, TestBroker};
use msmq_client::NewMessage;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const PARTITIONS: u32 = 3;

type Acked = Arc<Mutex<BTreeMap<(u32, u64), Vec<u8>>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_repeated_sigkill() -> anyhow::Result<()> {
    let kills: usize = std::env::var("MSMQ_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("MSMQ_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("crash test: {kills} kills, seed {seed} (set MSMQ_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut broker = TestBroker::start()?;
    broker
        .client()
        .await?
        .create_topic("crash", PARTITIONS)
        .await?;
    let acked: Acked = Arc::default();
    let mut ends_before = vec![0u64; PARTITIONS as usize];

    for round in 0..kills {
        let client = broker.client().await?;
        // Producers at full speed: one-message and multi-message batches, keyed and not.
        let mut tasks = Vec::new();
        for producer_id in 0..3u64 {
            let producer = client.producer("crash");
            let acked = acked.clone();
            let batch = [1usize, 10, 50][producer_id as usize];
            tasks.push(tokio::spawn(async move {
                for seq in 0..1_000_000u64 {
                    let messages: Vec<NewMessage> = (0..batch)
                        .map(|i| {
                            let body = format!("r{round}-p{producer_id}-s{seq}-i{i}-").repeat(8);
                            let m = NewMessage::new(body.into_bytes());
                            if i % 2 == 0 {
                                m.with_key(format!("k{seq}"))
                            } else {
                                m
                            }
                        })
                        .collect();
                    let payloads: Vec<Vec<u8>> =
                        messages.iter().map(|m| m.payload.clone()).collect();
                    match producer.send_batch(messages).await {
                        Ok(acks) => {
                            let mut acked = acked.lock().unwrap();
                            for (ack, payload) in acks.iter().zip(payloads) {
                                let previous = acked.insert((ack.partition, ack.offset), payload);
                                assert!(previous.is_none(), "offset {ack:?} acknowledged twice");
                            }
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        let delay = rng.random_range(100..600);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        broker.kill9();
        // Requests in flight will never be answered; their messages were not
        // acknowledged, so they are free to be present or absent.
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            if let Err(e) = t.await {
                anyhow::ensure!(e.is_cancelled(), "producer task failed: {e}");
            }
        }
        drop(client);
        broker.restart()?;

        let client = broker.client().await?;
        let acked = acked.lock().unwrap().clone();
        let mut found = 0;
        for p in 0..PARTITIONS {
            let stored = read_all(&client, "crash", p, 0).await?;
            let end = stored.len() as u64;
            assert!(
                end >= ends_before[p as usize],
                "partition {p} shrank after a crash"
            );
            ends_before[p as usize] = end;
            for m in &stored {
                if let Some(payload) = acked.get(&(p, m.offset)) {
                    assert_eq!(
                        &m.payload, payload,
                        "partition {p} offset {} differs",
                        m.offset
                    );
                    found += 1;
                }
            }
        }
        let missing: Vec<_> = acked
            .keys()
            .filter(|(p, o)| *o >= ends_before[*p as usize])
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "acknowledged messages lost: {missing:?}"
        );
        assert_eq!(found, acked.len());
        println!(
            "round {round}: killed after {delay} ms; {} acknowledged messages all present; ends {ends_before:?}",
            acked.len()
        );
    }
    assert!(
        acked.lock().unwrap().len() > kills,
        "the producers made progress"
    );
    Ok(())
}
