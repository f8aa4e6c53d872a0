//! Acceptance: misbehaving plugins are stopped or refused with a clear
//! error, and a well-behaved plugin beside them still does all its work.

use super::{deploy, rust_component, spec, wait_stats};
use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::{ErrorCode, NewMessage, PluginLimits};
use std::time::Duration;

const WORK: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_are_stopped_and_a_good_one_keeps_working() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("work", 2).await?;
    client.create_topic("mixed", 1).await?;
    client.create_topic("forbidden", 1).await?;
    let producer = client.producer("work");
    for chunk in 0..WORK / 500 {
        let batch = (0..500)
            .map(|i| NewMessage::new(format!("ok-{}", chunk * 500 + i)))
            .collect();
        producer.send_batch(batch).await?;
    }
    let mixed: Vec<NewMessage> = (0..20)
        .map(|i| {
            NewMessage::new(if i % 4 == 0 {
                format!("trap-{i}")
            } else {
                format!("ok-{i}")
            })
        })
        .collect();
    client.producer("mixed").send_batch(mixed).await?;

    // (e) WASI filesystem: refused at deploy, naming the import.
    let err = deploy(&client, spec("fs", "work"), &rust_component("fs-reader")?)
        .await
        .expect_err("a plugin importing wasi:filesystem must be refused");
    let err = err.downcast::<msmq_client::ClientError>()?;
    assert_eq!(err.code(), Some(ErrorCode::PLUGIN_REFUSED), "{err}");
    assert!(err.to_string().contains("wasi:filesystem"), "{err}");

    let strict = |limits: PluginLimits| PluginLimits {
        batch_time_ms_max: 200,
        memory_bytes_max: 16 * 1024 * 1024,
        failures_before_pause: 3,
        ..limits
    };
    // (a) an endless loop: interrupted at its time limit, then paused.
    let mut looper = spec("looper", "work");
    looper.limits = strict(looper.limits);
    deploy(&client, looper, &rust_component("looper")?).await?;
    // (b) unbounded memory: stopped at its memory limit, then paused.
    let mut hog = spec("hog", "work");
    hog.limits = strict(hog.limits);
    deploy(&client, hog, &rust_component("memory-hog")?).await?;
    // (c) traps on some messages: those are dead-lettered, the rest acked.
    let mut trapper = spec("trapper", "mixed");
    trapper.limits.delivery_attempts_max = 2;
    deploy(&client, trapper, &rust_component("trapper")?).await?;
    // (d) publishes where it may not: refused, and it dead-letters.
    let mut publisher = spec("publisher", "mixed");
    publisher.config = vec![("target".into(), "forbidden".into())];
    deploy(&client, publisher, &rust_component("forbidden-publisher")?).await?;
    // The good one.
    deploy(&client, spec("good", "work"), &rust_component("ack-all")?).await?;

    let timeout = Duration::from_secs(60);
    let good = wait_stats(&client, "good", timeout, |s| s.processed as usize == WORK).await?;
    assert_eq!((good.lag, good.failed_batches), (0, 0), "{good:?}");

    let looper = wait_stats(&client, "looper", timeout, |s| {
        s.status.starts_with("paused")
    })
    .await?;
    assert!(looper.status.contains("time limit of 200 ms"), "{looper:?}");
    assert_eq!(looper.processed, 0);
    let hog = wait_stats(&client, "hog", timeout, |s| s.status.starts_with("paused")).await?;
    assert!(hog.status.contains("memory limit"), "{hog:?}");
    assert_eq!(hog.processed, 0);

    let trapper = wait_stats(&client, "trapper", timeout, |s| s.processed == 20).await?;
    assert_eq!(
        (trapper.acked, trapper.dead_lettered),
        (15, 5),
        "{trapper:?}"
    );
    let letters = read_all(&client, "%DLQ%plugin.trapper", 0, 0).await?;
    assert_eq!(letters.len(), 5);
    for letter in &letters {
        assert!(String::from_utf8_lossy(&letter.payload).starts_with("trap-"));
        let reason = letter
            .headers
            .iter()
            .find(|h| h.name == "msmq.dlq.reason")
            .map(|h| h.value.clone())
            .unwrap_or_default();
        assert!(reason.contains("failed 2 deliveries"), "{reason}");
    }

    let publisher = wait_stats(&client, "publisher", timeout, |s| s.processed == 20).await?;
    assert_eq!(publisher.dead_lettered, 20, "{publisher:?}");
    let letters = read_all(&client, "%DLQ%plugin.publisher", 0, 0).await?;
    let reason = &letters[0]
        .headers
        .iter()
        .find(|h| h.name == "msmq.dlq.reason")
        .expect("a reason")
        .value;
    assert!(
        reason.contains("may not publish to topic \"forbidden\""),
        "{reason}"
    );
    assert!(read_all(&client, "forbidden", 0, 0).await?.is_empty());

    // A paused plugin's backlog shows as lag; resuming retries it.
    assert_eq!(looper.lag, WORK as u64);
    Ok(())
}
