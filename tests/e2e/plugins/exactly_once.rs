//! Acceptance: SIGKILL the broker again and again while a plugin with state
//! and publishes runs; afterwards its state and its published messages are
//! exactly one processing of every input.

use super::{deploy, rust_component, spec, state, wait_stats};
use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::NewMessage;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::Duration;

const INPUTS: usize = 4_000;
const PARTITIONS: u32 = 2;

fn kills() -> usize {
    std::env::var("MSMQ_PLUGIN_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_effects_happen_exactly_once_across_repeated_sigkill() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("MSMQ_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut broker = TestBroker::start()?;
    {
        let client = broker.client().await?;
        client.create_topic("in", PARTITIONS).await?;
        client.create_topic("echo", 2).await?;
        let producer = client.producer("in");
        for chunk in 0..INPUTS / 500 {
            let batch = (0..500)
                .map(|i| {
                    let n = chunk * 500 + i;
                    NewMessage::new(format!("m-{n:05}")).with_key(format!("k-{}", n % 17))
                })
                .collect();
            producer.send_batch(batch).await?;
        }
        let mut plugin = spec("counter", "in");
        plugin.publish_to = vec!["echo".into()];
        plugin.config = vec![("out_topic".into(), "echo".into())];
        plugin.limits.batch_messages_max = 20;
        // Slow enough that the kills land mid-stream.
        plugin.limits.messages_per_second = 400;
        deploy(&client, plugin, &rust_component("stateful-publisher")?).await?;
        client.close().await;
    }
    for round in 0..kills() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..600))).await;
        broker.kill9();
        broker.restart()?;
        let client = broker.client().await?;
        let s = client.plugin_stats("counter").await?;
        println!("round {round}: restarted, lag {}", s.lag);
        client.close().await;
    }
    let client = broker.client().await?;
    let done = wait_stats(&client, "counter", Duration::from_secs(60), |s| s.lag == 0).await?;
    assert_eq!(done.status, "running");

    let counts = state(&client, "counter", "n/").await?;
    assert_eq!(counts.len(), INPUTS, "every input counted");
    let twice: Vec<_> = counts.iter().filter(|(_, v)| v.as_str() != "1").collect();
    assert!(twice.is_empty(), "processed more than once: {twice:?}");

    let mut echoed: BTreeMap<String, usize> = BTreeMap::new();
    for p in 0..2 {
        for m in read_all(&client, "echo", p, 0).await? {
            *echoed.entry(String::from_utf8(m.payload)?).or_default() += 1;
        }
    }
    assert_eq!(echoed.len(), INPUTS, "every input published");
    let dup: Vec<_> = echoed.iter().filter(|(_, n)| **n != 1).collect();
    assert!(dup.is_empty(), "published more than once: {dup:?}");
    Ok(())
}
