//! `msmq bench plugin`: a plugin draining a backlog against a native
//! consumer draining the same backlog in the same run, the host's cost per
//! batch, the same drain beside misbehaving plugins, and deploy times.

use super::payload::{transfer_balances, Payload};
use super::{
    drain_backlog, produce_payloads, setup, topic_name, Common, ConsumeBench, ConsumeMode, Run,
};
use msmq_client::protocol::{NewMessage, PluginSpec, PluginStats};
use msmq_client::Client;
use serde_json::json;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often plugin stats are polled while a drain runs.
const STATS_POLL_MS: u64 = 20;

#[derive(clap::Args)]
pub struct PluginBench {
    /// The plugin component to measure (an ack-all plugin measures the host).
    #[arg(long)]
    component: PathBuf,
    /// Messages per plugin batch.
    #[arg(long, default_value_t = 100)]
    batch_messages: u32,
    /// Most messages per poll of the native consumer it is compared with.
    #[arg(long, default_value_t = 2000)]
    native_max_messages: u32,
    /// Also drain beside these misbehaving plugins (repeat), each consuming a
    /// topic of messages that start with "trap", with default limits; reports
    /// the ratio to the drain alone.
    #[arg(long = "neighbour")]
    neighbours: Vec<PathBuf>,
    /// Skip the native consumer.
    #[arg(long)]
    no_native: bool,
    /// What the backlog's messages hold: `stamped` (a timestamp, then
    /// zeros, --size bytes) or `transfer` (the payment scenario's
    /// `tx-N|acct-A|acct-B|amount_cents` between 1000 accounts, for billing
    /// plugins).
    #[arg(long, value_enum, default_value_t = PayloadKind::Stamped)]
    payload: PayloadKind,
    /// Use the lines of this file as payloads, in turn (overrides --payload).
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// Linear memory limit of the measured plugin, e.g. "256 MiB".
    #[arg(long, default_value = "64 MiB")]
    memory: bytesize::ByteSize,
    #[command(flatten)]
    common: Common,
}

/// `--payload` of `bench plugin`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum PayloadKind {
    Stamped,
    Transfer,
}

#[derive(clap::Args)]
pub struct PluginDeployBench {
    /// The component to deploy.
    #[arg(long)]
    component: PathBuf,
    /// How many plugins to deploy (each on the same, empty topic).
    #[arg(long, default_value_t = 20)]
    plugins: u32,
    /// Name prefix of the plugins.
    #[arg(long, default_value = "idle")]
    prefix: String,
    #[command(flatten)]
    common: Common,
}

fn spec(name: &str, topic: &str, batch_messages: u32) -> PluginSpec {
    let mut spec = PluginSpec::new(name, topic);
    spec.limits.batch_messages_max = batch_messages;
    spec
}

impl PluginBench {
    fn payload(&self) -> anyhow::Result<Payload> {
        if let Some(path) = &self.payload_file {
            let text = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let lines: Vec<Vec<u8>> = text
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec)
                .collect();
            anyhow::ensure!(!lines.is_empty(), "{} has no lines", path.display());
            return Ok(Payload::Lines(Arc::new(lines), Arc::default()));
        }
        Ok(match self.payload {
            PayloadKind::Stamped => Payload::Stamped,
            PayloadKind::Transfer => Payload::Transfers(Arc::default()),
        })
    }
}

/// What a measured drain left.
struct Drained {
    /// From the deploy acknowledgement to the last message processed.
    elapsed: Duration,
    stats: PluginStats,
    /// The plugin's `bill/` state (a billing plugin's balances), if any.
    balances: std::collections::BTreeMap<String, Option<i64>>,
}

/// Deploy a plugin on `topic` and wait until it has processed `count`
/// messages; then read its `bill/` state and remove it.
async fn plugin_drain(
    client: &Client,
    component: &[u8],
    spec: PluginSpec,
    count: u64,
    timeout: Duration,
) -> anyhow::Result<Drained> {
    let name = spec.name.clone();
    client.deploy_plugin(spec, component.to_vec()).await?;
    let started = Instant::now();
    loop {
        let stats = client.plugin_stats(&name).await?;
        if stats.processed >= count || crate::cli::shutdown::requested() {
            let elapsed = started.elapsed();
            let billed = client.plugin_state_all(&name, b"bill/").await?;
            client.remove_plugin(&name).await?;
            let balances = billed
                .into_iter()
                .map(|e| {
                    let key = String::from_utf8_lossy(&e.key).into_owned();
                    let value = String::from_utf8_lossy(&e.value).parse::<i64>().ok();
                    (key, value)
                })
                .collect();
            return Ok(Drained {
                elapsed,
                stats,
                balances,
            });
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "plugin {name} processed only {} of {count} in {timeout:?}: {stats:?}",
            stats.processed
        );
        tokio::time::sleep(Duration::from_millis(STATS_POLL_MS)).await;
    }
}

pub(super) async fn plugin(b: PluginBench) -> anyhow::Result<()> {
    let component = std::fs::read(&b.component)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", b.component.display()))?;
    let topic = topic_name(&b.common, "plugin");
    let client = setup(&b.common, &topic).await?;
    let fill = Common {
        duration: Duration::from_secs(3600),
        ..b.common.clone()
    };
    let prefill = Run::new(&fill, "prefill");
    produce_payloads(&fill, &topic, 4, 1, 0, prefill.clone(), b.payload()?).await?;
    prefill.bar.finish_and_clear();
    let count = prefill.done.load(Ordering::Relaxed);

    let payload_name = match (&b.payload_file, b.payload) {
        (Some(path), _) => path.display().to_string(),
        (None, PayloadKind::Stamped) => "stamped".into(),
        (None, PayloadKind::Transfer) => "transfer".into(),
    };
    let mut out = json!({"bench": "plugin", "messages": count, "size": b.common.size,
        "payload": payload_name, "batch_messages": b.batch_messages,
        "memory_bytes_max": b.memory.as_u64(), "topic": topic});
    let measured = |name: &str, topic: &str| {
        let mut s = spec(name, topic, b.batch_messages);
        s.limits.memory_bytes_max = b.memory.as_u64();
        s
    };
    if !b.no_native {
        let consume = ConsumeBench {
            consumers: 1,
            max_messages: b.native_max_messages,
            prefetch_messages: msmq_client::PREFETCH_MESSAGES_DEFAULT,
            no_prefill: true,
            mode: ConsumeMode::Offsets,
            common: b.common.clone(),
        };
        let (run, elapsed) = drain_backlog(&consume, &client, &topic, false).await?;
        run.bar.finish_and_clear();
        let native = run.done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(1e-9);
        out["native_messages_per_sec"] = json!(native);
    }
    let timeout = b.common.duration;
    let name = format!("bench-{}", super::now_micros());
    let Drained {
        elapsed,
        stats,
        balances,
    } = plugin_drain(&client, &component, measured(&name, &topic), count, timeout).await?;
    // A billing plugin on transfers must end with exact balances.
    if matches!(b.payload, PayloadKind::Transfer)
        && b.payload_file.is_none()
        && !balances.is_empty()
    {
        let expected = transfer_balances(count);
        let wrong = expected
            .iter()
            .filter(|(k, v)| balances.get(*k) != Some(&Some(**v)))
            .count()
            + balances
                .keys()
                .filter(|k| !expected.contains_key(*k))
                .count();
        out["balances_checked"] = json!(expected.len());
        out["balances_wrong"] = json!(wrong);
    }
    let rate = stats.processed as f64 / elapsed.as_secs_f64().max(1e-9);
    let batches = stats.batches.max(1) as f64;
    let per_batch_us = elapsed.as_secs_f64() * 1e6 / batches;
    let inside_us = stats.busy_ms as f64 * 1000.0 / batches;
    out["plugin_messages_per_sec"] = json!(rate);
    out["batches"] = json!(stats.batches);
    out["per_batch_us"] = json!(per_batch_us);
    out["per_batch_in_call_us"] = json!(inside_us);
    out["per_batch_host_loop_us"] = json!(per_batch_us - inside_us);
    out["failed_batches"] = json!(stats.failed_batches);
    out["dead_lettered"] = json!(stats.dead_lettered);
    out["instances_recycled"] = json!(stats.instances_recycled);
    out["plugin_memory_bytes"] = json!(stats.memory_bytes);
    if let Some(native) = out["native_messages_per_sec"].as_f64() {
        out["plugin_to_native_ratio"] = json!(rate / native.max(1e-9));
    }

    if !b.neighbours.is_empty() {
        let bad_topic = format!("{topic}-neighbours");
        client.ensure_topic(&bad_topic, 1).await?;
        let poison: Vec<NewMessage> = (0..1000)
            .map(|i| NewMessage::new(format!("trap-{i}")))
            .collect();
        client.producer(&bad_topic).send_batch(poison).await?;
        let mut names = Vec::new();
        for (i, path) in b.neighbours.iter().enumerate() {
            let bytes = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
            let n = format!("{name}-neighbour-{i}");
            client
                .deploy_plugin(spec(&n, &bad_topic, 100), bytes)
                .await?;
            names.push(n);
        }
        // Let them start misbehaving before the measured drain.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Drained { elapsed, stats, .. } = plugin_drain(
            &client,
            &component,
            measured(&format!("{name}-beside"), &topic),
            count,
            timeout,
        )
        .await?;
        let beside = stats.processed as f64 / elapsed.as_secs_f64().max(1e-9);
        out["beside_neighbours_messages_per_sec"] = json!(beside);
        out["beside_to_alone_ratio"] = json!(beside / rate.max(1e-9));
        let mut neighbour_status = Vec::new();
        for n in &names {
            let s = client.plugin_stats(n).await?;
            neighbour_status.push(
                json!({"status": s.status, "failed_batches": s.failed_batches,
                "dead_lettered": s.dead_lettered, "busy_ms": s.busy_ms}),
            );
            client.remove_plugin(n).await?;
        }
        out["neighbours"] = json!(neighbour_status);
    }
    if b.common.json {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}

pub(super) async fn deploy(b: PluginDeployBench) -> anyhow::Result<()> {
    let component = std::fs::read(&b.component)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", b.component.display()))?;
    let topic = topic_name(&b.common, "plugin-deploy");
    let client = setup(&b.common, &topic).await?;
    let mut times_ms = Vec::new();
    let mut compile_ms = Vec::new();
    for i in 0..b.plugins {
        if crate::cli::shutdown::requested() {
            break;
        }
        let started = Instant::now();
        let done = client
            .deploy_plugin(
                spec(&format!("{}-{i}", b.prefix), &topic, 100),
                component.clone(),
            )
            .await?;
        times_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        compile_ms.push(done.compile_ms);
    }
    let mut cached: Vec<f64> = times_ms.iter().skip(1).copied().collect();
    cached.sort_by(f64::total_cmp);
    let out = json!({"bench": "plugin-deploy", "plugins": times_ms.len(),
        "first_deploy_ms": times_ms.first(), "first_compile_ms": compile_ms.first(),
        "cached_deploy_median_ms": cached.get(cached.len() / 2)});
    println!("{out}");
    Ok(())
}
