//! Acceptance: plugins written in Python, JavaScript, Go and C, built from
//! source with their pinned toolchains, keep exact balances and send one
//! notification per transfer across a hot upgrade mid-stream, like the Rust
//! ones. Each language's folder has a `build.sh` that also runs
//! `msmq plugin check` on its output.

use super::{deploy, rust_component, spec, state, wait_stats};
use crate::harness::TestBroker;
use msmq_client::protocol::{NewMessage, PluginSpec};
use msmq_client::Client;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

const ACCOUNTS: [&str; 7] = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
const TRANSFERS: usize = 3_000;
/// Sent per produce request.
const CHUNK: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_billing_and_notification_survive_a_hot_upgrade() -> anyhow::Result<()> {
    let billing = super::language_component("python", "billing")?;
    let notification = super::language_component("python", "notification")?;
    scenario(&billing, Some(&notification), "256 MiB").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_billing_and_notification_survive_a_hot_upgrade() -> anyhow::Result<()> {
    let billing = super::language_component("js", "billing")?;
    let notification = super::language_component("js", "notification")?;
    scenario(&billing, Some(&notification), "256 MiB").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_billing_survives_a_hot_upgrade() -> anyhow::Result<()> {
    let billing = super::c_component("billing")?;
    scenario(&billing, None, "64 MiB").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_billing_survives_a_hot_upgrade() -> anyhow::Result<()> {
    let billing = super::language_component("go", "billing")?;
    scenario(&billing, None, "64 MiB").await
}

fn with_memory(mut spec: PluginSpec, memory: &str) -> anyhow::Result<PluginSpec> {
    spec.limits.memory_bytes_max = memory
        .parse::<bytesize::ByteSize>()
        .map_err(anyhow::Error::msg)?
        .as_u64();
    Ok(spec)
}

/// Billing (and notification, Rust's if `notification` is `None`) in the
/// language under test, points in Rust between them; both language plugins
/// are upgraded to a second deploy halfway through the transfers.
async fn scenario(
    billing: &Path,
    notification: Option<&PathBuf>,
    memory: &str,
) -> anyhow::Result<()> {
    let rust_notification = rust_component("notification")?;
    let notification = notification.unwrap_or(&rust_notification);
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("transfers", 4).await?;
    client.create_topic("notify", 2).await?;
    client.create_topic("outbox", 1).await?;

    let billing_spec = |generation: &str| -> anyhow::Result<PluginSpec> {
        let mut s = with_memory(spec("billing", "transfers"), memory)?;
        s.config = vec![("generation".into(), generation.into())];
        Ok(s)
    };
    let notification_spec = |generation: &str| -> anyhow::Result<PluginSpec> {
        let mut s = with_memory(spec("notification", "notify"), memory)?;
        s.publish_to = vec!["outbox".into()];
        s.config = vec![
            ("outbox_topic".into(), "outbox".into()),
            ("generation".into(), generation.into()),
        ];
        Ok(s)
    };
    deploy(&client, billing_spec("1")?, billing).await?;
    let mut points = spec("points", "transfers");
    points.publish_to = vec!["notify".into()];
    points.config = vec![("notify_topic".into(), "notify".into())];
    deploy(&client, points, &rust_component("points")?).await?;
    deploy(&client, notification_spec("1")?, notification).await?;

    let mut balances: BTreeMap<&str, i64> = BTreeMap::new();
    let mut sent = BTreeSet::new();
    let producer = client.producer("transfers");
    for chunk in 0..TRANSFERS / CHUNK {
        if chunk == TRANSFERS / CHUNK / 2 {
            upgrade(&client, billing_spec("2")?, billing).await?;
            upgrade(&client, notification_spec("2")?, notification).await?;
        }
        let mut batch = Vec::with_capacity(CHUNK);
        for i in chunk * CHUNK..(chunk + 1) * CHUNK {
            let from = ACCOUNTS[i % ACCOUNTS.len()];
            let to = ACCOUNTS[(i * 3 + 1) % ACCOUNTS.len()];
            let amount = 100 + (i as i64 * 7919) % 90_000;
            let id = format!("tx-{i:06}");
            if from != to {
                *balances.entry(from).or_default() -= amount;
                *balances.entry(to).or_default() += amount;
            }
            batch.push(NewMessage::new(format!("{id}|{from}|{to}|{amount}")).with_key(from));
            sent.insert(id);
        }
        producer.send_batch(batch).await?;
    }

    let timeout = Duration::from_secs(180);
    for name in ["billing", "points", "notification"] {
        wait_stats(&client, name, timeout, |s| {
            s.processed as usize >= TRANSFERS && s.lag == 0
        })
        .await?;
    }
    let bills = state(&client, "billing", "bill/").await?;
    let expected: BTreeMap<String, String> = balances
        .iter()
        .map(|(a, b)| (format!("bill/{a}"), b.to_string()))
        .collect();
    assert_eq!(bills, expected, "balances disagree with the transfers sent");

    let notified = super::notified_transfers(&client, "outbox").await?;
    assert_eq!(notified, sent, "one notification per transfer");
    for name in ["billing", "points", "notification"] {
        let s = client.plugin_stats(name).await?;
        assert_eq!(s.failed_batches, 0, "{name}: {s:?}");
        assert_eq!(s.dead_lettered, 0, "{name}: {s:?}");
    }
    let billing_stats = client.plugin_stats("billing").await?;
    assert_eq!(billing_stats.version, 2, "{billing_stats:?}");
    Ok(())
}

async fn upgrade(client: &Client, spec: PluginSpec, component: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(component)?;
    let done = client.deploy_plugin(spec, bytes).await?;
    anyhow::ensure!(done.upgraded, "{done:?}");
    Ok(())
}

/// A Python exception on one message: its text and the traceback's last
/// frame reach the broker's log, `plugin stats` and `plugin list`, and the
/// message is dead-lettered alone while the others are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_exception_shows_its_message_and_last_frame() -> anyhow::Result<()> {
    let component = super::language_component("python", "testing_raiser")?;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("work", 1).await?;
    let mut raiser = spec("raiser", "work");
    raiser.limits.delivery_attempts_max = 2;
    deploy(&client, raiser, &component).await?;
    let batch = ["ok-1", "bad", "ok-2"].map(NewMessage::new).to_vec();
    client.producer("work").send_batch(batch).await?;
    let stats = wait_stats(&client, "raiser", Duration::from_secs(60), |s| {
        s.processed == 3
    })
    .await?;
    assert_eq!((stats.acked, stats.dead_lettered), (2, 1), "{stats:?}");
    let error = stats.last_error.clone().unwrap_or_default();
    assert!(error.contains("ValueError: bad amount"), "{error}");
    assert!(
        error.contains("in amount_of"),
        "the traceback's last frame is missing: {error}"
    );
    let log = broker.log();
    assert!(
        log.contains("ValueError: bad amount") && log.contains("in amount_of"),
        "{log}"
    );

    let list = crate::harness::cli(&broker, &["plugin", "list"], None)?;
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("bad amount"), "{list}");
    Ok(())
}
