//! A disk that fills up. Below `disk_free_min` producers are refused with
//! the retryable `DISK_FULL` before the filesystem is full; a consumer group
//! joins, drains and commits meanwhile; once space is freed producers are
//! served again within seconds, with no restart, and nothing acknowledged is
//! lost. With the watermark off, a write that really meets `ENOSPC` is
//! recovered from without a restart too. The filesystem is a small tmpfs the test mounts (it needs root; CI
//! runs as root; elsewhere the test says why it skipped).

use crate::harness::{read_all, TestBroker};
use crate::plugins::{deploy, rust_component, spec, wait_stats};
use msmq_client::protocol::PluginSpec;
use msmq_client::{ConsumerOptions, ErrorCode, FetchLimits, NewMessage};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TMPFS_MIB: u64 = 256;
/// What the test frees to make room again.
const BALLAST_MIB: u64 = 96;
const FREE_MIN: &str = "64MiB";
const MESSAGE_BYTES: usize = 64 * 1024;
const BATCH_MESSAGES: usize = 4;
/// Bounds of the fill loop: it meets the floor after about 100 MiB.
const FILL_BATCHES_MAX: usize = 2_000;
const FILL_TIME_MAX: Duration = Duration::from_secs(90);

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with the reason printed) where this process may not mount.
    fn mount(size_mib: u64) -> anyhow::Result<Option<Tmpfs>> {
        // SAFETY: geteuid has no preconditions and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs for the full-disk test needs root");
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Ok(Some(Tmpfs { dir })),
            Ok(out) => {
                eprintln!(
                    "skipped: mount -t tmpfs failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                Ok(None)
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                Ok(None)
            }
        }
    }

    /// A mount of `TMPFS_MIB` holding `BALLAST_MIB` in a file to free later.
    fn mount_with_ballast() -> anyhow::Result<Option<(Tmpfs, PathBuf)>> {
        let Some(fs) = Tmpfs::mount(TMPFS_MIB)? else {
            return Ok(None);
        };
        let ballast = fs.path().join("ballast");
        std::fs::write(&ballast, vec![0u8; (BALLAST_MIB << 20) as usize])?;
        Ok(Some((fs, ballast)))
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail * stat.f_frsize)
}

/// Remove the ballast, then send until the producer is served, refused
/// only with `refusal` meanwhile and for at most `limit_secs`; the ack and
/// how long it took.
async fn served_again(
    producer: &msmq_client::Producer,
    ballast: &Path,
    refusal: ErrorCode,
    limit_secs: u64,
) -> anyhow::Result<(msmq_client::MessageAck, Duration)> {
    std::fs::remove_file(ballast)?;
    let freed = Instant::now();
    loop {
        match producer.send(NewMessage::new("after")).await {
            Ok(ack) => return Ok((ack, freed.elapsed())),
            Err(e) if e.code() == Some(refusal) => {
                anyhow::ensure!(
                    freed.elapsed() < Duration::from_secs(limit_secs),
                    "still refused {limit_secs} s after space returned: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn batch(tag: &str, n: usize) -> Vec<NewMessage> {
    (0..n)
        .map(|i| {
            let mut payload = format!("{tag}-{i}|").into_bytes();
            payload.resize(MESSAGE_BYTES, b'x');
            NewMessage::new(payload)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_producers_early_and_serves_them_again_when_space_returns(
) -> anyhow::Result<()> {
    let Some((fs, ballast)) = Tmpfs::mount_with_ballast()? else {
        return Ok(());
    };
    let broker = TestBroker::start_in(
        fs.path(),
        &[
            "--disk-free-min",
            FREE_MIN,
            "--disk-check-interval",
            "50ms",
            // Retention's own pass would come too late to matter here.
            "--retention-check-interval",
            "1h",
        ],
    )?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    // A topic whose messages expire after 2 s: retention frees them early,
    // at the disk checks, once the disk is low.
    client.create_topic("scratch", 1).await?;
    client
        .set_topic_retention(
            "scratch",
            Some(msmq_client::protocol::Retention {
                max_age_ms: 2_000,
                max_bytes: 0,
            }),
        )
        .await?;
    client
        .producer("scratch")
        .send_batch(
            (0..100)
                .map(|i| NewMessage::new(format!("scratch-{i}")))
                .collect(),
        )
        .await?;
    let producer = client.producer("payments");
    // A plugin that publishes, paused with input waiting for it.
    client.create_topic("orders", 1).await?;
    client.create_topic("echo", 1).await?;
    let echo = PluginSpec {
        publish_to: vec!["echo".into()],
        config: vec![("out_topic".into(), "echo".into())],
        ..spec("echoer", "orders")
    };
    deploy(&client, echo, &rust_component("stateful-publisher")?).await?;
    client.pause_plugin("echoer").await?;
    let orders: Vec<NewMessage> = (0..10)
        .map(|i| NewMessage::new(format!("order-{i}")))
        .collect();
    client.producer("orders").send_batch(orders).await?;

    // Fill until refused: the refusal must come while space is left.
    let started = Instant::now();
    let mut acked = 0usize;
    let mut refusal = None;
    for i in 0..FILL_BATCHES_MAX {
        if started.elapsed() > FILL_TIME_MAX {
            break;
        }
        match producer
            .send_batch(batch(&format!("fill{i}"), BATCH_MESSAGES))
            .await
        {
            Ok(acks) => acked += acks.len(),
            Err(e) if e.code() == Some(ErrorCode::DISK_FULL) => {
                refusal = Some(e);
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let refusal = refusal.ok_or_else(|| {
        anyhow::anyhow!("{acked} messages acknowledged and never refused with DISK_FULL")
    })?;
    let free = free_bytes(fs.path())?;
    eprintln!(
        "refused after {acked} messages ({} MiB) with {} MiB free: {refusal}",
        (acked * MESSAGE_BYTES) >> 20,
        free >> 20
    );
    assert!(free > 16 << 20, "refused only with {free} bytes left");
    assert!(refusal.code().is_some_and(|c| c.is_retryable()));
    // Keep the disk well below the floor from here on, whatever retention
    // frees meanwhile; it goes with the ballast.
    std::fs::write(fs.path().join("margin"), vec![0u8; 8 << 20])?;
    // Half messages are refused the same way.
    let tx = client
        .transactional_producer("pay", "payments", |_: &msmq_client::TransactionCheck| {
            msmq_client::TxAction::Rollback
        })
        .await?;
    let half = tx.send_half(NewMessage::new("half")).await;
    assert_eq!(
        half.err().and_then(|e| e.code()),
        Some(ErrorCode::DISK_FULL)
    );

    // A group joins, drains everything acknowledged and commits, in the reserve.
    let mut consumer = client
        .consumer(
            "billing",
            &["payments"],
            ConsumerOptions {
                limits: FetchLimits {
                    max_messages: 200,
                    max_bytes: 8 << 20,
                    max_wait_ms: 100,
                },
                ..ConsumerOptions::default()
            },
        )
        .await?;
    let mut drained = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while drained < acked && Instant::now() < deadline {
        drained += consumer.poll().await?.len();
        consumer.commit().await?;
    }
    assert_eq!(
        drained, acked,
        "the group drained every acknowledged message"
    );
    let group = client.describe_group("billing").await?;
    assert!(group.offsets.iter().all(|o| o.lag == 0), "{group:?}");
    // Retention ran while the disk was low, not an hour later.
    let trimmed_by = Instant::now() + Duration::from_secs(10);
    loop {
        let scratch = client.describe_topic("scratch").await?.partitions[0].clone();
        if scratch.start_offset == scratch.end_offset {
            break;
        }
        anyhow::ensure!(
            Instant::now() < trimmed_by,
            "expired messages still kept while the disk is low: {scratch:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The plugin's publishes wait for space too: it runs, but commits nothing.
    client.resume_plugin("echoer").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stats = client.plugin_stats("echoer").await?;
    assert_eq!((stats.processed, stats.lag), (0, 10), "{stats:?}");
    assert_eq!(read_all(&client, "echo", 0, 0).await?.len(), 0);

    // Space returns: producers are served again within 5 s, no restart.
    let (resumed, waited) = served_again(&producer, &ballast, ErrorCode::DISK_FULL, 5).await?;
    eprintln!("served again {waited:?} after space returned");
    // The plugin's batch commits now, each publish exactly once.
    wait_stats(&client, "echoer", Duration::from_secs(30), |s| s.lag == 0).await?;
    let echoed = read_all(&client, "echo", 0, 0).await?;
    assert_eq!(echoed.len(), 10, "each order echoed exactly once");
    let got = consumer.poll().await?;
    assert!(
        got.iter()
            .any(|m| m.partition == resumed.partition && m.message.payload == b"after"),
        "the new message reaches the group"
    );

    // Nothing acknowledged was lost.
    let description = client.describe_topic("payments").await?;
    let stored: u64 = description
        .partitions
        .iter()
        .map(|p| p.end_offset - p.start_offset)
        .sum();
    assert_eq!(stored, acked as u64 + 1);
    drop(client);
    drop(broker);
    drop(fs);
    Ok(())
}

/// With the watermark off, a write really meets `ENOSPC`: in a segment file
/// (the commit fails and the writer starts a new segment file) or in redb
/// (which latches the error until the broker reopens it). Writes resume
/// with no restart once space returns; nothing acknowledged is lost, then
/// or after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_meets_enospc_recovers_without_a_restart_once_space_returns(
) -> anyhow::Result<()> {
    let Some((fs, ballast)) = Tmpfs::mount_with_ballast()? else {
        return Ok(());
    };
    let mut broker = TestBroker::start_in(fs.path(), &["--disk-free-min", "0"])?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    let producer = client.producer("payments");

    // Fill until a write fails for want of space.
    let started = Instant::now();
    let mut acked: Vec<Vec<u8>> = Vec::new();
    let mut failure = None;
    for i in 0..FILL_BATCHES_MAX {
        if started.elapsed() > FILL_TIME_MAX {
            break;
        }
        let messages = batch(&format!("fill{i}"), BATCH_MESSAGES);
        match producer.send_batch(messages.clone()).await {
            Ok(_) => acked.extend(messages.into_iter().map(|m| m.payload.to_vec())),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.ok_or_else(|| {
        anyhow::anyhow!("{} messages acknowledged and no write failed", acked.len())
    })?;
    assert_eq!(failure.code(), Some(ErrorCode::STORAGE_ERROR), "{failure}");
    eprintln!(
        "a write failed after {} messages with {} KiB free: {failure}",
        acked.len(),
        free_bytes(fs.path())? >> 10
    );
    // Still full: whatever is acknowledged meanwhile must be stored too
    // (a small write may fit in the pages the failed commit left free).
    if producer.send(NewMessage::new("while full")).await.is_ok() {
        acked.push(b"while full".to_vec());
    }
    // Reads work while the disk is still full: the database was reopened
    // (its repair fits in the pages the failed commit left).
    let full_since = Instant::now();
    let read_while_full = loop {
        match read_all(&client, "payments", 0, 0).await {
            Ok(messages) => break messages.len(),
            Err(e) => anyhow::ensure!(
                full_since.elapsed() < Duration::from_secs(5),
                "reads still fail 5 s after the failed write: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(read_while_full, acked.len(), "reads while full");
    let free = free_bytes(fs.path())?;
    assert!(free < 1 << 20, "the disk is still full: {free} bytes free");

    // Space returns: writes resume with no restart.
    let (_, waited) = served_again(&producer, &ballast, ErrorCode::STORAGE_ERROR, 10).await?;
    acked.push(b"after".to_vec());
    eprintln!("writes resumed {waited:?} after space returned");
    let log = broker.log();
    assert!(
        log.contains("commit failed; refusing its requests"),
        "{log}"
    );
    assert!(
        !log.contains("writes stay refused until the broker is restarted"),
        "no restart needed: {log}"
    );

    // Every acknowledged message is there, once, now and after a restart.
    let stored = stored_once(&client, &acked).await?;
    drop(client);
    broker.restart()?;
    let client = broker.client().await?;
    let after_restart = stored_once(&client, &acked).await?;
    eprintln!(
        "{} acknowledged; {stored} stored before the restart, {after_restart} after",
        acked.len()
    );
    Ok(())
}

/// How many messages `payments` stores, once every payload of `acked` is
/// there exactly once and nothing is stored twice.
async fn stored_once(client: &msmq_client::Client, acked: &[Vec<u8>]) -> anyhow::Result<usize> {
    let mut seen = std::collections::HashMap::new();
    let stored = read_all(client, "payments", 0, 0).await?;
    for m in &stored {
        *seen.entry(m.payload.to_vec()).or_insert(0u32) += 1;
    }
    let lost = acked.iter().filter(|p| !seen.contains_key(*p)).count();
    let doubled = seen.values().filter(|&&n| n > 1).count();
    anyhow::ensure!(
        lost == 0 && doubled == 0,
        "{lost} lost, {doubled} stored twice"
    );
    Ok(stored.len())
}
