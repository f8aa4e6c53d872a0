//! Acceptance: the payment scenario. Transfers are sent as transactional
//! messages, some rolled back; billing, points and notification plugins
//! must end exactly consistent with the committed set.

use super::{c_component, deploy, rust_component, spec, state, wait_stats};
use crate::harness::TestBroker;
use msmq_client::protocol::{NewMessage, TransactionCheck, TxAction};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

const ACCOUNTS: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];
const TRANSFERS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_plugins_agree_with_the_committed_transfers() -> anyhow::Result<()> {
    payment_scenario(rust_component("points")?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_points_plugin_passes_the_same_payment_scenario() -> anyhow::Result<()> {
    payment_scenario(c_component("points")?).await
}

async fn payment_scenario(points_component: PathBuf) -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("transfers", 4).await?;
    client.create_topic("notify", 2).await?;
    client.create_topic("outbox", 1).await?;

    deploy(
        &client,
        spec("billing", "transfers"),
        &rust_component("billing")?,
    )
    .await?;
    let mut points = spec("points", "transfers");
    points.publish_to = vec!["notify".into()];
    points.config = vec![("notify_topic".into(), "notify".into())];
    deploy(&client, points, &points_component).await?;
    let mut notification = spec("notification", "notify");
    notification.publish_to = vec!["outbox".into()];
    notification.config = vec![("outbox_topic".into(), "outbox".into())];
    deploy(&client, notification, &rust_component("notification")?).await?;

    // The payment centre: every fifth transfer's local transaction fails.
    let producer = client
        .transactional_producer("payment-centre", "transfers", |_: &TransactionCheck| {
            TxAction::Rollback
        })
        .await?;
    let mut balances: BTreeMap<&str, i64> = BTreeMap::new();
    let mut points_expected: BTreeMap<&str, i64> = BTreeMap::new();
    let mut committed = BTreeSet::new();
    for i in 0..TRANSFERS {
        let from = ACCOUNTS[i % ACCOUNTS.len()];
        let to = ACCOUNTS[(i * 7 + 1) % ACCOUNTS.len()];
        let to = if to == from {
            ACCOUNTS[(i + 1) % ACCOUNTS.len()]
        } else {
            to
        };
        let amount = 100 + (i as i64 * 7919) % 50_000;
        let id = format!("tx-{i:05}");
        let half = producer
            .send_half(NewMessage::new(format!("{id}|{from}|{to}|{amount}")).with_key(from))
            .await?;
        if i % 5 == 4 {
            producer.rollback(half.tx_id).await?;
        } else {
            producer.commit(half.tx_id).await?;
            *balances.entry(from).or_default() -= amount;
            *balances.entry(to).or_default() += amount;
            *points_expected.entry(from).or_default() += amount / 100;
            committed.insert(id);
        }
    }

    let timeout = Duration::from_secs(60);
    for name in ["billing", "points"] {
        wait_stats(&client, name, timeout, |s| {
            s.processed as usize >= committed.len() && s.lag == 0
        })
        .await?;
    }
    wait_stats(&client, "notification", timeout, |s| {
        s.processed as usize >= committed.len() && s.lag == 0
    })
    .await?;

    let bills = state(&client, "billing", "bill/").await?;
    let expected: BTreeMap<String, String> = balances
        .iter()
        .map(|(a, b)| (format!("bill/{a}"), b.to_string()))
        .collect();
    assert_eq!(
        bills, expected,
        "billing disagrees with the committed transfers"
    );

    let points_state = state(&client, "points", "points/").await?;
    let expected: BTreeMap<String, String> = points_expected
        .iter()
        .map(|(a, p)| (format!("points/{a}"), p.to_string()))
        .collect();
    assert_eq!(
        points_state, expected,
        "points disagree with the committed transfers"
    );

    // One notification per committed transfer, none for a rolled-back one.
    let notified = super::notified_transfers(&client, "outbox").await?;
    assert_eq!(notified, committed);
    for name in ["billing", "points", "notification"] {
        let s = client.plugin_stats(name).await?;
        assert_eq!(s.failed_batches, 0, "{name}: {s:?}");
        assert_eq!(s.dead_lettered, 0, "{name}: {s:?}");
    }
    Ok(())
}

#[test]
fn msmq_demo_runs_the_scenario_and_checks_it() -> anyhow::Result<()> {
    let dir = rust_component("billing")?
        .parent()
        .expect("a directory")
        .to_path_buf();
    let out = std::process::Command::new(crate::harness::MSMQ)
        .args([
            "demo",
            "--transfers",
            "30",
            "--burst",
            "1000",
            "--quota",
            "5000",
        ])
        .arg("--plugins")
        .arg(&dir)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("demo OK"), "{stdout}");
    assert!(
        stdout.contains("26 transfers committed, 4 rolled back"),
        "{stdout}"
    );
    Ok(())
}
