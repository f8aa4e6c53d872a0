//! The deterministic core end to end: a broker records every command it
//! applies (`serve --record-commands`) while a mixed workload runs; the
//! recording, applied to an empty store (`msmq admin replay`), gives the
//! same `msmq admin digest` as the broker's own data directory. Once on a
//! clean run, once with a SIGKILL in the middle.

use crate::harness::{TestBroker, MSMQ};
use crate::plugins::{deploy, rust_component, spec, wait_stats};
use crate::transactions::FAST_CHECKS;
use msmq_client::protocol::{AclAction, AclResource, AclRule, Retention};
use msmq_client::{Client, ConsumerOptions, FetchLimits, NewMessage, TransactionCheck, TxAction};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// `msmq admin digest --verbose`: (total, table → rows).
fn digest(data_dir: &Path) -> anyhow::Result<(String, BTreeMap<String, u64>)> {
    let out = Command::new(MSMQ)
        .args(["admin", "digest", "--verbose", "--data-dir"])
        .arg(data_dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "digest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let mut lines: Vec<&str> = text.lines().collect();
    let total = lines.pop().unwrap_or_default().to_string();
    let rows = lines
        .iter()
        .map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next().unwrap_or_default().to_string();
            let rows = words.next().and_then(|r| r.parse().ok()).unwrap_or(0);
            (name, rows)
        })
        .collect();
    Ok((total, rows))
}

fn replay(recording: &Path, data_dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(MSMQ)
        .args(["admin", "replay", "--commands"])
        .arg(recording)
        .arg("--data-dir")
        .arg(data_dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

fn receive_options() -> ConsumerOptions {
    ConsumerOptions {
        limits: FetchLimits {
            max_messages: 100,
            max_bytes: 1 << 20,
            max_wait_ms: 200,
        },
        session_timeout: Duration::from_secs(10),
        ..ConsumerOptions::default()
    }
}

fn checker(check: &TransactionCheck) -> TxAction {
    // Undecided transfers are looked up: the "commit-" ones happened.
    if check.message.payload.starts_with(b"commit-") {
        TxAction::Commit
    } else {
        TxAction::Rollback
    }
}

/// Topics, plain, keyed and scheduled messages, ACLs and tokens, a retention.
async fn first_half(client: &Client) -> anyhow::Result<()> {
    client.create_topic("payments", 3).await?;
    client.create_topic("events", 2).await?;
    client.create_topic("echo", 2).await?;
    client.create_topic("ticks", 1).await?;
    let payments = client.producer("payments");
    payments
        .send_batch(
            (0..40)
                .map(|i| NewMessage::new(format!("plain-{i}")))
                .collect(),
        )
        .await?;
    payments
        .send_batch(
            (0..40)
                .map(|i| NewMessage::new(format!("keyed-{i}")).with_key(format!("acct-{}", i % 7)))
                .collect(),
        )
        .await?;
    for i in 0..10u64 {
        payments
            .send(
                NewMessage::new(format!("later-{i}"))
                    .with_delay(Duration::from_millis(200 + 50 * i)),
            )
            .await?;
    }
    let (billing_id, _) = client.create_token("billing").await?;
    client.create_token("points").await?;
    client
        .set_acl(
            "billing",
            vec![AclRule {
                resource: AclResource::Topic,
                pattern: "payments".into(),
                actions: vec![AclAction::Produce, AclAction::Consume],
            }],
        )
        .await?;
    client.revoke_token(&billing_id).await?;
    client
        .set_topic_retention(
            "ticks",
            Some(Retention {
                max_age_ms: 300,
                max_bytes: 0,
            }),
        )
        .await?;
    let ticks = client.producer("ticks");
    for i in 0..5 {
        ticks.send(NewMessage::new(format!("tick-{i}"))).await?;
    }
    Ok(())
}

/// Transactions (commit, rollback, check-back), per-message acks with a
/// retry and a dead letter, a stateful plugin, a retention trim.
async fn second_half(client: &Client) -> anyhow::Result<()> {
    let producer = client
        .transactional_producer("payment-centre", "payments", checker)
        .await?;
    let committed = producer.send_half(NewMessage::new("tx-commit")).await?;
    producer.commit(committed.tx_id).await?;
    let rolled = producer.send_half(NewMessage::new("tx-rollback")).await?;
    producer.rollback(rolled.tx_id).await?;
    // Left undecided: the check-back asks the checker.
    producer
        .send_half(NewMessage::new("commit-by-check"))
        .await?;
    producer
        .send_half(NewMessage::new("rollback-by-check"))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !client.list_transactions(false, 100).await?.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "check-backs did not resolve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    client
        .configure_group("billing", 2, &[Duration::from_millis(100)], false)
        .await?;
    let mut billing = client
        .consumer("billing", &["events"], receive_options())
        .await?;
    client
        .producer("events")
        .send_batch((0..6).map(|i| NewMessage::new(format!("ev-{i}"))).collect())
        .await?;
    // Every message is nacked once (a retry); "ev-0" twice (a dead letter).
    let mut settled = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while settled < 6 && Instant::now() < deadline {
        for d in billing.receive(Duration::from_secs(30)).await? {
            if d.attempt == 1 || d.message.payload == b"ev-0" {
                billing.nack(std::slice::from_ref(&d), "not yet").await?;
                if d.attempt == 2 {
                    settled += 1;
                }
            } else {
                billing.ack(std::slice::from_ref(&d)).await?;
                settled += 1;
            }
        }
    }
    anyhow::ensure!(settled == 6, "settled {settled} of 6");
    billing.leave().await?;

    let mut plugin = spec("counter", "events");
    plugin.publish_to = vec!["echo".into()];
    plugin.config = vec![("out_topic".into(), "echo".into())];
    deploy(client, plugin, &rust_component("stateful-publisher")?).await?;
    client
        .producer("events")
        .send_batch(
            (0..50)
                .map(|i| NewMessage::new(format!("in-{i}")))
                .collect(),
        )
        .await?;
    wait_stats(client, "counter", Duration::from_secs(30), |s| s.lag == 0).await?;

    // Retention has trimmed the old ticks by now.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let described = client.describe_topic("ticks").await?;
        if described.partitions[0].start_offset > 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "retention did not trim ticks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn run(kill_between: bool) -> anyhow::Result<()> {
    let recording_dir = tempfile::tempdir()?;
    let recording = recording_dir.path().join("commands");
    let recording_arg = recording.to_str().expect("a UTF-8 temp path").to_string();
    let mut args = vec![
        "--auth",
        "--record-commands",
        &recording_arg,
        "--retention-check-interval",
        "100ms",
    ];
    args.extend_from_slice(FAST_CHECKS);
    let mut broker = TestBroker::start_with(&args)?;
    let (_, client) = broker.admin().await?;
    first_half(&client).await?;
    if kill_between {
        // Writes in flight when the broker dies: some commit, some not.
        let producer = client.producer("payments");
        let burst = tokio::spawn(async move {
            for i in 0..200 {
                if producer
                    .send(NewMessage::new(format!("burst-{i}")))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.close().await;
        broker.kill9();
        let _ = burst.await;
        broker.restart()?;
    } else {
        client.close().await;
    }
    let (_, client) = broker.admin().await?;
    second_half(&client).await?;
    client.close().await;
    let status = broker.terminate()?;
    anyhow::ensure!(status.success(), "broker exited with {status}");

    let (original, tables) = digest(&broker.data_dir())?;
    for table in [
        "log",
        "key_index",
        "tx_outcomes",
        "plugins",
        "plugin_state",
        "tokens",
        "acls",
        "topic_retention",
        "group_offsets",
    ] {
        anyhow::ensure!(
            tables.get(table).copied().unwrap_or(0) > 0,
            "the workload left table {table} empty: {tables:?}"
        );
    }
    // Four topics and the billing group's dead-letter topic; retries were
    // all redelivered, so their rows are gone again.
    anyhow::ensure!(tables.get("topics") == Some(&5), "topics: {tables:?}");
    let rebuilt_dir = tempfile::tempdir()?;
    let rebuilt = rebuilt_dir.path().join("data");
    let said = replay(&recording, &rebuilt)?;
    println!("{said}");
    let (replayed, replayed_tables) = digest(&rebuilt)?;
    assert_eq!(
        original, replayed,
        "replay differs; broker {tables:?}, replay {replayed_tables:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_workload_replays_to_the_same_digest() -> anyhow::Result<()> {
    run(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_workload_with_a_sigkill_replays_to_the_same_digest() -> anyhow::Result<()> {
    run(true).await
}
