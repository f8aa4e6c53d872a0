//! `msmq demo`: the payment-transfer scenario end to end on an embedded
//! broker. Billing, points and notification plugins consume transfers sent
//! as transactional messages (some rolled back); a flash-sale burst far above
//! the plugins' quotas shows the backlog draining at the quota; at the end
//! the plugins' state and notifications are checked against the committed
//! transfers. The plugins are the example components embedded at build time
//! (`broker/build.rs`), so the demo runs anywhere the binary does.

use crate::config::Config;
use crate::server::RunningBroker;
use anyhow::Context;
use clap::Args;
use msmq_client::protocol::{
    NewMessage, PluginLimits, PluginSpec, PluginStats, TransactionCheck, TxAction,
};
use msmq_client::{Client, ClientOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ACCOUNTS: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];
/// The example components (`plugins/examples`), built for wasm32-wasip2 by
/// the build script and embedded, so the demo needs nothing but the binary.
const EMBEDDED_PLUGINS: [(&str, &[u8]); 3] = [
    (
        "billing",
        include_bytes!(concat!(env!("OUT_DIR"), "/billing.wasm")),
    ),
    (
        "points",
        include_bytes!(concat!(env!("OUT_DIR"), "/points.wasm")),
    ),
    (
        "notification",
        include_bytes!(concat!(env!("OUT_DIR"), "/notification.wasm")),
    ),
];

#[derive(Args)]
pub struct DemoArgs {
    /// Transfers sent as transactional messages (every 7th rolled back).
    #[arg(long, default_value_t = 300)]
    transfers: usize,
    /// Transfers in the flash-sale burst (plain produces, all committed).
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
    /// Each plugin's quota in messages per second.
    #[arg(long, default_value_t = 2_000)]
    quota: u32,
    /// Directory with billing.wasm, points.wasm and notification.wasm to use
    /// instead of the example components built into this binary.
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Give up waiting for the plugins to drain after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// The three components, by plugin name: from `dir` if given, else the
/// embedded ones.
fn components(dir: Option<&Path>) -> anyhow::Result<BTreeMap<&'static str, Vec<u8>>> {
    EMBEDDED_PLUGINS
        .iter()
        .map(|(name, embedded)| {
            let bytes = match dir {
                Some(dir) => {
                    let path = dir.join(format!("{name}.wasm"));
                    std::fs::read(&path).with_context(|| {
                        format!(
                            "reading {} (--plugins needs billing.wasm, points.wasm and notification.wasm)",
                            path.display()
                        )
                    })?
                }
                None => embedded.to_vec(),
            };
            Ok((*name, bytes))
        })
        .collect()
}

fn transfer(i: usize) -> (String, &'static str, &'static str, i64) {
    let from = ACCOUNTS[i % ACCOUNTS.len()];
    let mut to = ACCOUNTS[(i * 5 + 3) % ACCOUNTS.len()];
    if to == from {
        to = ACCOUNTS[(i + 1) % ACCOUNTS.len()];
    }
    (
        format!("tx-{i:06}"),
        from,
        to,
        100 + (i as i64 * 7919) % 90_000,
    )
}

#[derive(Default)]
struct Expected {
    balances: BTreeMap<String, i64>,
    points: BTreeMap<String, i64>,
    committed: BTreeSet<String>,
}

impl Expected {
    fn commit(&mut self, id: String, from: &str, to: &str, amount: i64) {
        *self.balances.entry(format!("bill/{from}")).or_default() -= amount;
        *self.balances.entry(format!("bill/{to}")).or_default() += amount;
        *self.points.entry(format!("points/{from}")).or_default() += amount / 100;
        self.committed.insert(id);
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let components = components(args.plugins.as_deref())?;
    let data = tempfile::tempdir().context("creating a temporary data directory")?;
    let config = Config {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data.path().join("data"),
        http: "off".into(),
        log: "warn".into(),
        ..Config::default()
    };
    let broker = RunningBroker::start(config).await?;
    println!(
        "embedded broker on {} (data in a temporary directory)",
        broker.local_addr
    );
    let client = Client::connect(
        ClientOptions::default()
            .server(broker.local_addr.to_string())
            .ca_file(broker.cert_path.clone()),
    )
    .await?;
    // A stop signal ends the scenario; the embedded broker still shuts
    // down in order (its plugin runners stop before the runtime does).
    let result = tokio::select! {
        result = scenario(&client, components, &args) => result,
        signal = super::shutdown::wait() => Err(super::shutdown::Interrupted(signal).into()),
    };
    client.close().await;
    broker.shutdown().await;
    result
}

async fn scenario(
    client: &Client,
    mut components: BTreeMap<&'static str, Vec<u8>>,
    args: &DemoArgs,
) -> anyhow::Result<()> {
    client.create_topic("transfers", 4).await?;
    client.create_topic("notify", 2).await?;
    client.create_topic("outbox", 1).await?;
    let limits = PluginLimits {
        messages_per_second: args.quota,
        ..PluginLimits::default()
    };
    let plugins = [
        ("billing", "transfers", None, vec![]),
        (
            "points",
            "transfers",
            Some("notify"),
            vec![("notify_topic".to_string(), "notify".to_string())],
        ),
        (
            "notification",
            "notify",
            Some("outbox"),
            vec![("outbox_topic".to_string(), "outbox".to_string())],
        ),
    ];
    for (name, topic, publish, config) in plugins {
        let bytes = components
            .remove(name)
            .context("every demo plugin has a component")?;
        let spec = PluginSpec {
            name: name.into(),
            topic: topic.into(),
            group: None,
            publish_to: publish.map(|t| vec![t.to_string()]).unwrap_or_default(),
            config,
            limits: limits.clone(),
        };
        let done = client.deploy_plugin(spec, bytes).await?;
        println!(
            "deployed {name} (consumes {topic}, quota {} msg/s, compiled in {} ms)",
            args.quota, done.compile_ms
        );
    }

    let mut expected = Expected::default();
    let producer = client
        .transactional_producer("payment-centre", "transfers", |_: &TransactionCheck| {
            TxAction::Rollback
        })
        .await?;
    let (mut committed, mut rolled_back) = (0, 0);
    for i in 0..args.transfers {
        let (id, from, to, amount) = transfer(i);
        let half = producer
            .send_half(NewMessage::new(format!("{id}|{from}|{to}|{amount}")).with_key(from))
            .await?;
        // The payment centre's local transaction fails for every 7th transfer.
        if i % 7 == 6 {
            producer.rollback(half.tx_id).await?;
            rolled_back += 1;
        } else {
            producer.commit(half.tx_id).await?;
            expected.commit(id, from, to, amount);
            committed += 1;
        }
    }
    println!("payment centre: {committed} transfers committed, {rolled_back} rolled back");

    let started = Instant::now();
    let plain = client.producer("transfers");
    for chunk in (0..args.burst).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|j| {
                let (id, from, to, amount) = transfer(args.transfers + j);
                expected.commit(id.clone(), from, to, amount);
                NewMessage::new(format!("{id}|{from}|{to}|{amount}")).with_key(from)
            })
            .collect();
        plain.send_batch(batch).await?;
    }
    println!(
        "flash sale: {} transfers in {:.2} s ({:.0}/s), {}x the plugins' quota",
        args.burst,
        started.elapsed().as_secs_f64(),
        args.burst as f64 / started.elapsed().as_secs_f64().max(1e-9),
        (args.burst as f64 / started.elapsed().as_secs_f64().max(1e-9) / args.quota as f64).round()
    );

    drain(client, args.timeout).await?;
    verify(client, &expected).await
}

/// Print each plugin's rate and lag until every lag is zero.
async fn drain(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let names = ["billing", "points", "notification"];
    loop {
        let mut all: Vec<PluginStats> = Vec::new();
        for name in names {
            all.push(client.plugin_stats(name).await?);
        }
        let line: Vec<String> = all
            .iter()
            .map(|s| {
                format!(
                    "{} {:>6}/s lag {:>6}",
                    s.name, s.recent_messages_per_second, s.lag
                )
            })
            .collect();
        println!(
            "[{:>5.1}s] {}",
            started.elapsed().as_secs_f64(),
            line.join(" | ")
        );
        // Notifications trail points: wait for a quiet moment with no lag.
        if all.iter().all(|s| s.lag == 0) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut quiet = true;
            for name in names {
                quiet &= client.plugin_stats(name).await?.lag == 0;
            }
            if quiet {
                for s in &all {
                    println!(
                        "{}: processed {}, throttled {} ms, {} failed batches",
                        s.name, s.processed, s.throttled_ms, s.failed_batches
                    );
                }
                return Ok(());
            }
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "the plugins did not drain within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn state(
    client: &Client,
    plugin: &str,
    prefix: &str,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for e in client.plugin_state_all(plugin, prefix.as_bytes()).await? {
        let key = String::from_utf8_lossy(&e.key).into_owned();
        let value = String::from_utf8_lossy(&e.value).parse::<i64>()?;
        out.insert(key, value);
    }
    Ok(out)
}

async fn verify(client: &Client, expected: &Expected) -> anyhow::Result<()> {
    let bills = state(client, "billing", "bill/").await?;
    anyhow::ensure!(
        bills == expected.balances,
        "billing disagrees with the committed transfers: {bills:?} vs {:?}",
        expected.balances
    );
    println!(
        "billing: {} accounts, every balance matches the committed transfers",
        bills.len()
    );
    let points = state(client, "points", "points/").await?;
    anyhow::ensure!(
        points == expected.points,
        "points disagree with the committed transfers"
    );
    println!("points: {} accounts, every balance matches", points.len());
    let mut notified = BTreeSet::new();
    let mut offset = 0;
    loop {
        let limits = msmq_client::FetchLimits {
            max_messages: 5000,
            max_bytes: 8 * 1024 * 1024,
            max_wait_ms: 0,
        };
        let fetched = client.fetch("outbox", 0, offset, limits).await?;
        if fetched.messages.is_empty() {
            break;
        }
        for m in fetched.messages {
            offset = m.offset + 1;
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let id = text
                .split(" transfer ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_default()
                .to_string();
            anyhow::ensure!(
                notified.insert(id.clone()),
                "transfer {id} was notified twice"
            );
        }
    }
    anyhow::ensure!(
        notified == expected.committed,
        "notifications ({}) do not match the committed transfers ({})",
        notified.len(),
        expected.committed.len()
    );
    println!(
        "notification: {} notifications, exactly one per committed transfer, none for a rolled-back one",
        notified.len()
    );
    println!("demo OK: downstream state is consistent with the payment centre");
    Ok(())
}
