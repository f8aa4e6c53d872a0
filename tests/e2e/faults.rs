//! Storage faults, injected under a real broker by its fault-injecting redb
//! backend and segment files (`MSMQ_STORAGE_FAULTS=1`, switched by files in
//! `<data>/faults/`): a failed write, a failed fsync and a power cut
//! mid-commit, in redb and in the log's segment files. Each time the
//! affected request fails cleanly, a refused request never appears after a
//! restart and nothing acknowledged disappears; after a failed write or
//! fsync the broker reopens its database and writes again without a restart.
//!
//! The commit point is the command log's frame: once its bytes are synced
//! the commit is durable, and redb (the index) is made durable only at
//! checkpoints, about every 250 ms. So redb faults strike checkpoints
//! (the tests wait for one to be due), and a broker that dies after a
//! frame was synced keeps that commit even though it never acknowledged it.

use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::NewMessage;
use msmq_client::{Client, ErrorCode};
use std::time::Duration;

const BATCH: usize = 10;

/// The payloads of `batch(tag)`, as the log holds them.
fn payloads(tag: &str) -> Vec<String> {
    batch(tag)
        .into_iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).expect("utf-8"))
        .collect()
}

fn batch(tag: &str) -> Vec<NewMessage> {
    (0..BATCH)
        .map(|i| NewMessage::new(format!("{tag}-{i}")))
        .collect()
}

/// Produce `batches` batches that must all be acknowledged; returns the
/// payloads in offset order.
async fn produce_acked(client: &Client, tag: &str, batches: usize) -> anyhow::Result<Vec<String>> {
    let producer = client.producer("ledger");
    let mut acked = Vec::new();
    for b in 0..batches {
        let messages = batch(&format!("{tag}{b}"));
        let acks = producer.send_batch(messages.clone()).await?;
        anyhow::ensure!(acks.len() == BATCH, "short ack");
        acked.extend(
            messages
                .into_iter()
                .map(|m| String::from_utf8(m.payload.to_vec()).expect("utf-8")),
        );
    }
    Ok(acked)
}

/// After a fault clears, the broker reopens its database by itself:
/// producers are served again within seconds, with no restart, and reads
/// see exactly what was acknowledged. Acknowledged payloads join `acked`.
async fn writes_resume_without_restart(
    broker: &TestBroker,
    client: &Client,
    acked: &mut Vec<String>,
) -> anyhow::Result<()> {
    let cleared = std::time::Instant::now();
    let mut refused = 0;
    loop {
        let messages = batch(&format!("after{refused}"));
        match client.producer("ledger").send_batch(messages.clone()).await {
            Ok(_) => {
                acked.extend(
                    messages
                        .iter()
                        .map(|m| String::from_utf8_lossy(&m.payload).into_owned()),
                );
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::STORAGE_ERROR), "{e}");
                refused += 1;
                anyhow::ensure!(
                    cleared.elapsed() < Duration::from_secs(10),
                    "still refused 10 s after the fault cleared: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    println!(
        "served again {:?} after the fault cleared ({refused} batches refused meanwhile)",
        cleared.elapsed()
    );
    acked.extend(produce_acked(client, "resumed", 2).await?);
    let log: Vec<String> = read_all(client, "ledger", 0, 0)
        .await?
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(&log, acked, "reads see every acknowledged message, once");
    let metrics = crate::metrics::scrape(broker.http.as_deref().expect("metrics on"))?;
    assert!(
        metrics.lines().any(|l| l == "msmq_storage_recovering 0"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("msmq_storage_errors_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    Ok(())
}

/// After a restart without faults: the log holds exactly `acked`, in order.
async fn restart_and_check(broker: &mut TestBroker, acked: &[String]) -> anyhow::Result<Client> {
    std::fs::remove_dir_all(broker.faults_dir()).ok();
    broker.restart()?;
    let client = broker.client().await?;
    let log: Vec<String> = read_all(&client, "ledger", 0, 0)
        .await?
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(log.len(), acked.len(), "log {log:?}");
    assert_eq!(
        log, acked,
        "every acknowledged message, once, at its offset"
    );
    Ok(client)
}

async fn setup() -> anyhow::Result<(TestBroker, Client, Vec<String>)> {
    let broker = TestBroker::start_with_faults(&[])?;
    std::fs::create_dir_all(broker.faults_dir())?;
    let client = broker.client().await?;
    client.create_topic("ledger", 1).await?;
    let acked = produce_acked(&client, "before", 5).await?;
    Ok((broker, client, acked))
}

/// Longer than the broker's checkpoint interval (250 ms): the next commit
/// after a pause this long is a checkpoint, a durable redb commit.
const CHECKPOINT_DUE: Duration = Duration::from_millis(1300);

/// Switch a fault on, send one batch that must be refused, switch it off.
async fn refused_while(broker: &TestBroker, client: &Client, fault: &str) -> anyhow::Result<()> {
    tokio::time::sleep(CHECKPOINT_DUE).await;
    let switch = broker.faults_dir().join(fault);
    std::fs::write(&switch, b"")?;
    let result = client.producer("ledger").send_batch(batch("refused")).await;
    std::fs::remove_file(&switch)?;
    let err = result.expect_err("a produce whose commit failed must not be acknowledged");
    assert_eq!(err.code(), Some(ErrorCode::STORAGE_ERROR), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_refuses_the_produce_and_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let (mut broker, client, mut acked) = setup().await?;
    refused_while(&broker, &client, "fail-sync").await?;
    writes_resume_without_restart(&broker, &client, &mut acked).await?;
    let client = restart_and_check(&mut broker, &acked).await?;
    // After the restart the broker writes again.
    acked.extend(produce_acked(&client, "restarted", 1).await?);
    restart_and_check(&mut broker, &acked).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_refuses_the_produce_and_loses_nothing_acknowledged() -> anyhow::Result<()> {
    let (mut broker, client, mut acked) = setup().await?;
    refused_while(&broker, &client, "fail-write").await?;
    writes_resume_without_restart(&broker, &client, &mut acked).await?;
    restart_and_check(&mut broker, &acked).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_mid_checkpoint_keeps_the_synced_frame_and_loses_nothing() -> anyhow::Result<()>
{
    let (mut broker, client, mut acked) = setup().await?;
    // The producer gets its id first: the next commit is the batch's.
    let producer = client.producer("ledger");
    producer.send_batch(batch("warm")).await?;
    acked.extend(payloads("warm"));
    // The broker dies after two more page writes: inside the next
    // checkpoint, after that commit's frame was synced.
    tokio::time::sleep(CHECKPOINT_DUE).await;
    std::fs::write(broker.faults_dir().join("power-cut-after-writes"), b"2")?;
    // A dead broker sends no close: the client hears nothing until its idle
    // timeout, so give up waiting after a few seconds.
    let result =
        tokio::time::timeout(Duration::from_secs(3), producer.send_batch(batch("cut"))).await;
    assert!(
        !matches!(result, Ok(Ok(_))),
        "the broker died before acknowledging"
    );
    assert!(
        broker.log().contains("power cut mid-commit"),
        "{}",
        broker.log()
    );
    // The frame is the commit: the restart applies it again, so the batch
    // the broker never acknowledged is kept, once.
    acked.extend(payloads("cut"));
    let client = restart_and_check(&mut broker, &acked).await?;
    acked.extend(produce_acked(&client, "after", 2).await?);
    restart_and_check(&mut broker, &acked).await?;
    Ok(())
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A failed segment write or fsync fails the commit that appended to the
/// segment: its produce is refused, writes resume once the fault clears
/// (the writer starts a new segment file), and a restart cuts the refused
/// batch's bytes off and loses nothing acknowledged.
async fn segment_fault(fault: &str) -> anyhow::Result<()> {
    let (mut broker, client, mut acked) = setup().await?;
    refused_while(&broker, &client, fault).await?;
    writes_resume_without_restart(&broker, &client, &mut acked).await?;
    assert!(broker.segment_bytes() > 0);
    restart_and_check(&mut broker, &acked).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_segment_write_refuses_the_produce_and_loses_nothing() -> anyhow::Result<()> {
    segment_fault("fail-segment-write").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_segment_fsync_refuses_the_produce_and_loses_nothing() -> anyhow::Result<()> {
    segment_fault("fail-segment-sync").await
}

/// The broker dies after a commit's frame reached its segment file
/// (written and synced) but before the index commit: the frame is the
/// commit, so the restart applies it again and the batch is kept, once.
/// Then it dies in the middle of writing a frame: the restart cuts the
/// torn bytes off, and the log holds exactly what it held before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synced_frame_survives_a_crash_before_the_index_commit_and_a_torn_one_is_cut(
) -> anyhow::Result<()> {
    let (mut broker, client, mut acked) = setup().await?;
    let crash = |producer: msmq_client::Producer, tag: &'static str| async move {
        let result =
            tokio::time::timeout(Duration::from_secs(3), producer.send_batch(batch(tag))).await;
        assert!(
            !matches!(result, Ok(Ok(_))),
            "the broker died before acknowledging"
        );
    };
    std::fs::write(broker.faults_dir().join("crash-before-index-commit"), b"")?;
    crash(client.producer("ledger"), "synced").await;
    eventually("the broker's test crash", || {
        broker
            .log()
            .contains("crash between the segment write and the index commit")
    })
    .await?;
    acked.extend(payloads("synced"));
    let client = restart_and_check(&mut broker, &acked).await?;
    assert!(
        broker
            .log()
            .contains("applied the command log past the checkpoint again"),
        "{}",
        broker.log()
    );
    // A commit first, so the torn frame follows it in the same file (and
    // the producer has its id: the next commit is the torn one).
    let producer = client.producer("ledger");
    producer.send_batch(batch("between")).await?;
    acked.extend(payloads("between"));
    std::fs::create_dir_all(broker.faults_dir())?;
    let segments_before = broker.segment_bytes();
    std::fs::write(broker.faults_dir().join("crash-mid-frame"), b"")?;
    crash(producer, "torn").await;
    eventually("the broker's test crash", || {
        broker
            .log()
            .contains("crash in the middle of writing a frame")
    })
    .await?;
    assert!(
        broker.segment_bytes() > segments_before,
        "part of the torn frame reached the segment file"
    );
    let client = restart_and_check(&mut broker, &acked).await?;
    assert!(
        broker
            .log()
            .contains("cutting uncommitted bytes off a segment"),
        "{}",
        broker.log()
    );
    // And the log takes writes again after the cut.
    acked.extend(produce_acked(&client, "after", 2).await?);
    restart_and_check(&mut broker, &acked).await?;
    Ok(())
}
