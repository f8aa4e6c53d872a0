//! Acceptance: a throughput quota slows a plugin down without losing
//! anything, and the throttling shows in its stats.

use super::{deploy, rust_component, spec, wait_stats};
use crate::harness::TestBroker;
use msmq_client::protocol::NewMessage;
use std::time::{Duration, Instant};

const MESSAGES: usize = 20_000;
const QUOTA_PER_SECOND: u32 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_over_its_quota_is_slowed_to_it_and_loses_nothing() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("burst", 2).await?;
    let producer = client.producer("burst");
    for chunk in 0..MESSAGES / 1000 {
        let batch = (0..1000)
            .map(|i| NewMessage::new(format!("m-{}", chunk * 1000 + i)))
            .collect();
        producer.send_batch(batch).await?;
    }
    let mut quota = spec("slow", "burst");
    quota.limits.messages_per_second = QUOTA_PER_SECOND;
    let started = Instant::now();
    deploy(&client, quota, &rust_component("ack-all")?).await?;

    let midway = wait_stats(&client, "slow", Duration::from_secs(60), |s| {
        s.processed as usize >= MESSAGES / 2
    })
    .await?;
    assert!(midway.lag > 0 && midway.throttled_ms > 0, "{midway:?}");
    let done = wait_stats(&client, "slow", Duration::from_secs(60), |s| {
        s.processed as usize == MESSAGES
    })
    .await?;
    let rate = MESSAGES as f64 / started.elapsed().as_secs_f64();
    println!(
        "quota {QUOTA_PER_SECOND}/s: {MESSAGES} messages at {rate:.0}/s, throttled {} ms",
        done.throttled_ms
    );
    assert!(
        (900.0..=1100.0).contains(&rate),
        "rate {rate:.0}/s is not within 10% of {QUOTA_PER_SECOND}/s"
    );
    assert_eq!((done.lag, done.acked), (0, MESSAGES as u64));
    assert!(done.throttled_ms > 10_000, "{done:?}");
    Ok(())
}
