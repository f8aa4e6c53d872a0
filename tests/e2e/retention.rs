//! Retention: expired batches are removed in the background, consumers
//! continue from the new start, and the storage on disk (the redb file and
//! the log's segment files) stays bounded.

use crate::harness::TestBroker;
use msmq_client::protocol::{ErrorCode, NewMessage, Retention};
use msmq_client::FetchLimits;
use std::time::{Duration, Instant};

/// Retention and load time of the steady-load test; the full run is
/// `MSMQ_RETENTION_MS=10000 MSMQ_RETENTION_LOAD_SECS=120`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
const MESSAGE_BYTES: usize = 1024;
const BATCH: usize = 100;
const BATCHES_PER_SECOND: u64 = 20;

/// (redb file, segment files) in bytes.
fn stored_bytes(broker: &TestBroker) -> (u64, u64) {
    let redb = std::fs::metadata(broker.data_dir().join("msmq.redb")).map_or(0, |m| m.len());
    (redb, broker.segment_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_batches_go_and_the_file_stays_bounded_under_steady_load() -> anyhow::Result<()> {
    let retention_ms = env_or("MSMQ_RETENTION_MS", 3_000);
    let load = Duration::from_secs(env_or("MSMQ_RETENTION_LOAD_SECS", 20));
    let broker = TestBroker::start_with(&["--retention-check-interval", "100ms"])?;
    let client = broker.client().await?;
    client.create_topic("ticks", 2).await?;
    let (default, is_default) = client.topic_retention("ticks").await?;
    assert!(is_default);
    assert_eq!(default.max_age_ms, 72 * 3600 * 1000);
    client
        .set_topic_retention(
            "ticks",
            Some(Retention {
                max_age_ms: retention_ms,
                max_bytes: 0,
            }),
        )
        .await?;

    // Steady load: 2 000 messages of 1 KiB a second, bounded in time.
    let producer = client.producer("ticks");
    let started = Instant::now();
    let mut sent = 0u64;
    let (mut peak_total, mut peak_redb, mut peak_segments) = (0, 0, 0);
    while started.elapsed() < load {
        let batch = (0..BATCH)
            .map(|_| NewMessage::new(vec![7u8; MESSAGE_BYTES]))
            .collect();
        producer.send_batch(batch).await?;
        sent += BATCH as u64;
        let due = Duration::from_millis(sent / BATCH as u64 * 1000 / BATCHES_PER_SECOND);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if started.elapsed() > Duration::from_secs(2 * retention_ms / 1000) {
            let (redb, segments) = stored_bytes(&broker);
            peak_total = peak_total.max(redb + segments);
            peak_redb = peak_redb.max(redb);
            peak_segments = peak_segments.max(segments);
        }
    }
    let topic = client.describe_topic("ticks").await?;
    let retained: u64 = topic
        .partitions
        .iter()
        .map(|p| p.end_offset - p.start_offset)
        .sum();
    let ends: u64 = topic.partitions.iter().map(|p| p.end_offset).sum();
    assert_eq!(ends, sent);
    let retained_bytes = retained * MESSAGE_BYTES as u64;
    let rate = BATCH as u64 * BATCHES_PER_SECOND;
    let window_bytes = rate * retention_ms / 1000 * MESSAGE_BYTES as u64;
    println!(
        "sent {sent} ({} MiB), retained {retained} ({retained_bytes} bytes); peak on disk \
         {peak_total} bytes ({:.2}x the {window_bytes} bytes of one retention period): \
         redb file peak {peak_redb}, segment files peak {peak_segments}",
        (sent * MESSAGE_BYTES as u64) >> 20,
        peak_total as f64 / window_bytes as f64,
    );
    // About retention_ms of load is kept (plus a check interval and a batch).
    assert!(
        retained <= rate * (retention_ms + 1000) / 1000,
        "retained {retained}"
    );
    assert!(
        retained >= rate * (retention_ms - 1000) / 1000,
        "retained {retained}"
    );
    // Expired segments leave the disk: bounded by twice the retained data.
    assert!(
        peak_total <= 2 * window_bytes,
        "{peak_total} bytes on disk for {window_bytes} retained"
    );

    // Below the start is out of range; a fetch from the start gets what is
    // kept. Retention goes on trimming as batches age, so the start is read
    // again right before each try.
    let limits = FetchLimits {
        max_messages: 10,
        max_bytes: 1 << 20,
        max_wait_ms: 0,
    };
    for tries in 1.. {
        let start = client.describe_topic("ticks").await?.partitions[0].start_offset;
        assert!(start > 0);
        let err = client
            .fetch("ticks", 0, start - 1, limits)
            .await
            .expect_err("below the start");
        assert_eq!(err.code(), Some(ErrorCode::OFFSET_OUT_OF_RANGE));
        match client.fetch("ticks", 0, start, limits).await {
            Ok(fetched) => {
                assert_eq!(fetched.messages[0].offset, start);
                break;
            }
            // Trimmed in between.
            Err(e) if e.code() == Some(ErrorCode::OFFSET_OUT_OF_RANGE) && tries < 5 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_retention_keeps_the_newest_batches_within_the_limit() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--retention-check-interval", "100ms"])?;
    let client = broker.client().await?;
    client.create_topic("sized", 1).await?;
    let limit = 100 * 1024;
    client
        .set_topic_retention(
            "sized",
            Some(Retention {
                max_age_ms: 0,
                max_bytes: limit,
            }),
        )
        .await?;
    let producer = client.producer("sized");
    for i in 0..100u32 {
        let batch = (0..10)
            .map(|j| NewMessage::new(format!("{i}-{j}").into_bytes()).with_key(format!("k{j}")))
            .collect::<Vec<_>>();
        let padded = batch
            .into_iter()
            .map(|mut m| {
                m.payload.resize(1000, b'.');
                m
            })
            .collect();
        producer.send_batch(padded).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = client.describe_topic("sized").await?.partitions[0].clone();
        let kept = p.end_offset - p.start_offset;
        // 10 messages of ~1 KiB per batch: at most 100 KiB is about 90.
        if kept <= 100 {
            assert!(kept >= 80, "kept {kept}");
            assert_eq!(p.end_offset, 1000);
            // Keys of removed messages are gone from the key index too.
            let found = client.find_messages("sized", b"k3", 1000).await?;
            assert!(found.iter().all(|m| m.message.offset >= p.start_offset));
            assert_eq!(found.len() as u64, kept / 10);
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "not trimmed: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back to the default: nothing more is removed.
    client.set_topic_retention("sized", None).await?;
    assert!(client.topic_retention("sized").await?.1);
    Ok(())
}
