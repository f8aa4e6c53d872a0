//! A disk that fills up. Below `disk_free_min` producers are refused with
//! the retryable `DISK_FULL` before the filesystem is full; a consumer group
//! joins, drains and commits meanwhile; once space is freed producers are
//! served again within seconds, with no restart, and nothing acknowledged is
//! lost. The filesystem is a small tmpfs the test mounts (it needs root; CI
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
    let Some(fs) = Tmpfs::mount(TMPFS_MIB)? else {
        return Ok(());
    };
    let ballast: PathBuf = fs.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; (BALLAST_MIB << 20) as usize])?;
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
        .send_batch(batch("scratch", 100))
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
    std::fs::remove_file(&ballast)?;
    let freed = Instant::now();
    let resumed = loop {
        match producer.send(NewMessage::new("after")).await {
            Ok(ack) => break ack,
            Err(e) if e.code() == Some(ErrorCode::DISK_FULL) => {
                anyhow::ensure!(
                    freed.elapsed() < Duration::from_secs(5),
                    "still refused 5 s after space returned: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    eprintln!("served again {:?} after space returned", freed.elapsed());
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
