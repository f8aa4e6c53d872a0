//! `msmq bench produce|consume|e2e`: load a running broker and report
//! messages/s, MB/s and latency percentiles (HdrHistogram). Every run is
//! bounded by a message count and a duration, whichever comes first; a stop
//! signal (SIGINT, SIGTERM, SIGHUP) ends it early, consumers leave their
//! groups and the summary covers what was done.
//!
//! Size: over 800 lines: the produce, consume, e2e and tx benches share the
//! run bookkeeping and load loops kept here; the plugin, abuse and disk
//! benches and the broker efficiency figures are in `bench/`.

mod abuse;
mod disk;
mod efficiency;
mod payload;
mod plugin;

use super::ClientArgs;
use anyhow::Context;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use msmq_client::{Client, ConsumerOptions, FetchLimits, NewMessage, StartFrom};
use payload::Payload;
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ConsumeMode {
    Offsets,
    Acks,
    Both,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Producers send batches as fast as acknowledgements come back.
    Produce(ProduceBench),
    /// Fill a backlog (untimed), then drain it with one consumer group.
    Consume(ConsumeBench),
    /// Produce and consume at once; latency is send-to-receive per message.
    E2e(E2eBench),
    /// Transactions: half message + commit round trips, then the same load
    /// as plain one-message produces for comparison.
    Tx(TxBench),
    /// A plugin draining a backlog, against a native consumer draining the
    /// same backlog; host cost per batch; optionally beside misbehaving plugins.
    Plugin(plugin::PluginBench),
    /// Deploy N plugins on one idle topic and report deploy times.
    PluginDeploy(plugin::PluginDeployBench),
    /// Well-behaved producers alone and beside flooding clients that ignore
    /// rate refusals; reports the throughput they keep.
    Abuse(abuse::AbuseBench),
    /// This machine's synced sequential write bandwidth (no broker needed):
    /// the ceiling of durable produce.
    Disk(disk::DiskBench),
}

#[derive(Args, Clone)]
pub struct Common {
    /// Topic to use; created if missing.
    #[arg(long)]
    topic: Option<String>,
    /// Partitions when the topic is created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per produce request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Stop after this many messages.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Stop after this long at the latest.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Print one JSON summary object instead of text.
    #[arg(long)]
    json: bool,
    /// Produce without idempotence (no producer id, no sequence numbers),
    /// to compare with the default.
    #[arg(long)]
    no_idempotence: bool,
    /// The broker's metrics page (http://host:port/metrics), for broker CPU
    /// seconds per million messages and write amplification in the summary
    /// [default: http://127.0.0.1:7172/metrics when --server is the default
    /// address, none otherwise]; "off": none.
    #[arg(long, env = "MSMQ_METRICS")]
    metrics: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

/// How long a produce bench waits after its load before reading the
/// broker's totals, so writes a broker makes after acknowledging (a
/// background copy, as older brokers' segment mover made) are counted.
const AFTER_LOAD_SETTLE: Duration = Duration::from_secs(1);

/// The metrics page of a broker serving on the default address.
const DEFAULT_METRICS_URL: &str = "http://127.0.0.1:7172/metrics";

impl Common {
    /// The broker's totals now, if its metrics page is known.
    async fn broker_totals(&self) -> Option<efficiency::BrokerTotals> {
        let url = match self.metrics.as_deref() {
            Some("off") => return None,
            Some(url) => url,
            None if self.client.server == msmq_client::DEFAULT_SERVER => DEFAULT_METRICS_URL,
            None => return None,
        };
        efficiency::read(url).await
    }
}

#[derive(Args)]
pub struct ProduceBench {
    /// Concurrent producers, each on its own connection.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Requests each producer keeps in flight.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// First probe the disk in this directory (put it on the broker's disk,
    /// see `bench disk`) and report the produce's payload MB/s as a
    /// fraction of its synced sequential bandwidth.
    #[arg(long)]
    disk_probe: Option<std::path::PathBuf>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct TxBench {
    /// Concurrent transactional producers, each on its own connection.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Transactions each producer keeps in flight.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Skip the plain-produce comparison run.
    #[arg(long)]
    no_baseline: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct ConsumeBench {
    /// Concurrent members of the consumer group.
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Most messages per poll.
    #[arg(long, default_value_t = 2000)]
    max_messages: u32,
    /// Messages each consumer fetches ahead of its polls (0: none, one
    /// request per poll).
    #[arg(long, default_value_t = msmq_client::PREFETCH_MESSAGES_DEFAULT)]
    prefetch_messages: u32,
    /// Use the topic's existing messages instead of producing a backlog first.
    #[arg(long)]
    no_prefill: bool,
    /// Offset commits per poll, per-message acks, or both on the same backlog
    /// (reports their ratio).
    #[arg(long, value_enum, default_value_t = ConsumeMode::Offsets)]
    mode: ConsumeMode,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
pub struct E2eBench {
    #[arg(long, default_value_t = 1)]
    producers: usize,
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    /// Messages per second per producer (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Also print one JSON line per interval this long (received messages/s
    /// and latency percentiles of that interval), for soak runs.
    #[arg(long, value_parser = humantime::parse_duration)]
    report_every: Option<Duration>,
    #[command(flatten)]
    common: Common,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Produce(b) => produce(b).await,
        BenchCommand::Consume(b) => consume(b).await,
        BenchCommand::E2e(b) => e2e(b).await,
        BenchCommand::Tx(b) => tx(b).await,
        BenchCommand::Plugin(b) => plugin::plugin(b).await,
        BenchCommand::PluginDeploy(b) => plugin::deploy(b).await,
        BenchCommand::Abuse(b) => abuse::abuse(b).await,
        BenchCommand::Disk(b) => disk::run(b).await,
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Shared progress: a counter, a bar, a deadline, a stop flag.
struct Run {
    done: AtomicU64,
    bytes: AtomicU64,
    count: u64,
    deadline: Instant,
    stop: AtomicBool,
    latencies_us: Mutex<Histogram<u64>>,
    /// Latencies since the last interval report (`--report-every`).
    interval_us: Mutex<Histogram<u64>>,
    bar: ProgressBar,
}

impl Run {
    fn new(common: &Common, what: &str) -> Arc<Run> {
        let bar = if common.json {
            ProgressBar::with_draw_target(Some(common.count), ProgressDrawTarget::hidden())
        } else {
            ProgressBar::new(common.count)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
            )
            .expect("valid template"),
        );
        bar.set_prefix(what.to_string());
        Arc::new(Run {
            done: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            count: common.count,
            deadline: Instant::now() + common.duration,
            stop: AtomicBool::new(false),
            latencies_us: Mutex::new(histogram()),
            interval_us: Mutex::new(histogram()),
            bar,
        })
    }

    /// Claim up to `n` messages of the budget; 0 when the run is over.
    fn claim(&self, n: u64) -> u64 {
        if self.stopped() || Instant::now() >= self.deadline {
            return 0;
        }
        let before = self.done.fetch_add(n, Ordering::Relaxed);
        if before >= self.count {
            self.done.fetch_sub(n, Ordering::Relaxed);
            return 0;
        }
        let got = n.min(self.count - before);
        if got < n {
            self.done.fetch_sub(n - got, Ordering::Relaxed);
        }
        got
    }

    fn record(&self, messages: u64, bytes: u64, latency: Duration) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.bar.inc(messages);
        let us = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.latencies_us.lock().expect("histogram lock").record(us);
        let _ = self.interval_us.lock().expect("histogram lock").record(us);
    }

    /// Stopped by the run itself or by a stop signal.
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || super::shutdown::requested()
    }

    fn over(&self) -> bool {
        self.stopped()
            || Instant::now() >= self.deadline
            || self.done.load(Ordering::Relaxed) >= self.count
    }
}

fn summary(
    bench: &str,
    run: &Run,
    messages: u64,
    elapsed: Duration,
    extra: serde_json::Value,
    as_json: bool,
) {
    run.bar.finish_and_clear();
    let h = run.latencies_us.lock().expect("histogram lock");
    let secs = elapsed.as_secs_f64().max(1e-9);
    let bytes = run.bytes.load(Ordering::Relaxed);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let mut obj = json!({
        "bench": bench,
        "messages": messages,
        "bytes": bytes,
        "seconds": secs,
        "messages_per_sec": messages as f64 / secs,
        "mb_per_sec": bytes as f64 / secs / 1_000_000.0,
        "p50_ms": ms(0.5),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": h.max() as f64 / 1000.0,
        "latency_samples": h.len(),
    });
    if let (Some(o), Some(e)) = (obj.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    if as_json {
        println!("{obj}");
    } else {
        if let Some(cpu) = obj["broker_cpu_seconds_per_million"].as_f64() {
            println!(
                "broker: {cpu:.2} CPU s per million messages, write amplification {} (write calls {}), peak RSS {:.0} MiB",
                obj["write_amplification"].as_f64().map_or("n/a".into(), |w| format!("{w:.2}")),
                obj["write_call_amplification"].as_f64().map_or("n/a".into(), |w| format!("{w:.2}")),
                obj["broker_peak_rss_mib"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "{bench}: {messages} messages in {secs:.2} s: {:.0} msg/s, {:.1} MB/s; latency p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            obj["messages_per_sec"].as_f64().unwrap_or(0.0),
            obj["mb_per_sec"].as_f64().unwrap_or(0.0),
            ms(0.5),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        );
    }
}

/// Add `more`'s fields to `into` (both JSON objects).
fn merge(into: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(into), Some(more)) = (into.as_object_mut(), more.as_object()) {
        into.extend(more.clone());
    }
}

fn topic_name(common: &Common, kind: &str) -> String {
    common
        .topic
        .clone()
        .unwrap_or_else(|| format!("bench-{kind}-{}", now_micros()))
}

async fn setup(common: &Common, topic: &str) -> anyhow::Result<Client> {
    anyhow::ensure!(common.batch >= 1, "--batch must be at least 1");
    let client = common.client.connect().await?;
    client
        .ensure_topic(topic, common.partitions)
        .await
        .with_context(|| format!("creating topic {topic}"))?;
    Ok(client)
}

/// Send `run.count` messages from `producers` connections; payloads start with
/// the send time in µs so an e2e consumer can measure latency.
async fn produce_load(
    common: &Common,
    topic: &str,
    producers: usize,
    inflight: usize,
    rate_per_producer: u64,
    run: Arc<Run>,
) -> anyhow::Result<()> {
    produce_payloads(
        common,
        topic,
        producers,
        inflight,
        rate_per_producer,
        run,
        Payload::Stamped,
    )
    .await
}

async fn produce_payloads(
    common: &Common,
    topic: &str,
    producers: usize,
    inflight: usize,
    rate_per_producer: u64,
    run: Arc<Run>,
    payload: Payload,
) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..producers.max(1) {
        let shared = common.client.connect().await?.producer_with(
            topic,
            msmq_client::ProducerOptions {
                idempotent: !common.no_idempotence,
                ..Default::default()
            },
        );
        for _ in 0..inflight.max(1) {
            let producer = shared.clone();
            let run = run.clone();
            let payload = payload.clone();
            let (size, batch) = (common.size.max(8), common.batch);
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let mut sent = 0u64;
                loop {
                    let n = run.claim(batch as u64);
                    if n == 0 {
                        return anyhow::Ok(());
                    }
                    if rate_per_producer > 0 {
                        let due = started
                            + Duration::from_secs_f64(sent as f64 / rate_per_producer as f64);
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let t0 = Instant::now();
                    let stamp = now_micros().to_le_bytes();
                    let messages: Vec<NewMessage> = (0..n)
                        .map(|_| NewMessage::new(payload.make(size, stamp)))
                        .collect();
                    let bytes = messages.iter().map(|m| m.payload.len() as u64).sum();
                    if messages.len() == 1 {
                        // Single sends of concurrent tasks share requests
                        // (an idempotent producer has one in flight).
                        producer
                            .send(messages.into_iter().next().expect("one"))
                            .await?;
                    } else {
                        producer.send_batch(messages).await?;
                    }
                    run.record(n, bytes, t0.elapsed());
                    sent += n;
                }
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

async fn produce(b: ProduceBench) -> anyhow::Result<()> {
    let topic = topic_name(&b.common, "produce");
    setup(&b.common, &topic).await?;
    let disk = match &b.disk_probe {
        Some(dir) => {
            let probe = disk::DiskBench {
                dir: dir.clone(),
                bytes: bytesize::ByteSize::gib(1),
                sync_bytes: bytesize::ByteSize::kib(100),
                duration: Duration::from_secs(60),
                json: true,
            };
            Some(tokio::task::spawn_blocking(move || disk::probe(&probe)).await??)
        }
        None => None,
    };
    let run = Run::new(&b.common, "produce");
    let before = b.common.broker_totals().await;
    let started = Instant::now();
    produce_load(&b.common, &topic, b.producers, b.inflight, 0, run.clone()).await?;
    let elapsed = started.elapsed();
    let messages = run.done.load(Ordering::Relaxed);
    if before.is_some() {
        tokio::time::sleep(AFTER_LOAD_SETTLE).await;
    }
    let after = b.common.broker_totals().await;
    let mut extra = json!({"producers": b.producers, "inflight": b.inflight, "batch": b.common.batch, "size": b.common.size, "topic": topic, "idempotent": !b.common.no_idempotence});
    let payload = messages * b.common.size as u64;
    merge(
        &mut extra,
        efficiency::figures(before, after, messages, payload),
    );
    if let Some(disk) = disk {
        let payload_mb_per_sec = payload as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6;
        extra["disk_sequential_mb_per_sec"] = json!(disk.sequential_mb_per_sec);
        extra["disk_synced_mb_per_sec"] = json!(disk.synced_mb_per_sec);
        extra["disk_fraction"] = json!(payload_mb_per_sec / disk.sequential_mb_per_sec.max(1e-9));
        if !b.common.json {
            println!(
                "disk: {:.0} MB/s sequential ({:.0} MB/s synced every 100 KiB); this produce's payload {:.0} MB/s is {:.2} of it",
                disk.sequential_mb_per_sec,
                disk.synced_mb_per_sec,
                payload_mb_per_sec,
                payload_mb_per_sec / disk.sequential_mb_per_sec.max(1e-9)
            );
        }
    }
    summary("produce", &run, messages, elapsed, extra, b.common.json);
    Ok(())
}

async fn consume(b: ConsumeBench) -> anyhow::Result<()> {
    let topic = topic_name(&b.common, "consume");
    let client = setup(&b.common, &topic).await?;
    if !b.no_prefill {
        let fill = Common {
            batch: b.common.batch.max(1),
            duration: Duration::from_secs(3600),
            ..b.common.clone()
        };
        let prefill = Run::new(&fill, "prefill");
        produce_load(&fill, &topic, 4, 1, 0, prefill.clone()).await?;
        prefill.bar.finish_and_clear();
    }
    let modes: &[bool] = match b.mode {
        ConsumeMode::Offsets => &[false],
        ConsumeMode::Acks => &[true],
        ConsumeMode::Both => &[false, true],
    };
    let mut rates = Vec::new();
    for &acks in modes {
        let before = b.common.broker_totals().await;
        let (run, elapsed) = drain_backlog(&b, &client, &topic, acks).await?;
        let messages = run.done.load(Ordering::Relaxed);
        let after = b.common.broker_totals().await;
        rates.push(messages as f64 / elapsed.as_secs_f64().max(1e-9));
        let mut extra = json!({"consumers": b.consumers, "size": b.common.size, "topic": topic,
            "max_messages": b.max_messages, "prefetch_messages": b.prefetch_messages,
            "mode": if acks { "acks" } else { "offsets" },
            "latency_is": if acks { "per receive+ack" } else { "per poll (one offset commit in flight)" }});
        let payload = messages * b.common.size as u64;
        merge(
            &mut extra,
            efficiency::figures(before, after, messages, payload),
        );
        if rates.len() == 2 {
            extra["offsets_messages_per_sec"] = json!(rates[0]);
            extra["acks_to_offsets_ratio"] = json!(rates[1] / rates[0].max(1e-9));
        }
        summary("consume", &run, messages, elapsed, extra, b.common.json);
    }
    if rates.len() == 2 && !b.common.json {
        println!(
            "per-message acks reach {:.2} of offset commits on the same backlog",
            rates[1] / rates[0].max(1e-9)
        );
    }
    Ok(())
}

type AckTask = tokio::task::JoinHandle<Result<Vec<bool>, msmq_client::ClientError>>;
type CommitTask = tokio::task::JoinHandle<Result<(), msmq_client::ClientError>>;

/// A commit refused because members joined meanwhile (the bench's members
/// join one after another) is not a failure: the next poll takes the new
/// assignment and the new owner reads on from the last commit.
fn rebalanced_is_fine(result: Result<(), msmq_client::ClientError>) -> anyhow::Result<()> {
    match result {
        Err(e) if e.code() == Some(msmq_client::ErrorCode::REBALANCED) => Ok(()),
        other => Ok(other?),
    }
}

/// One fresh group drains the topic from the start: poll + commit, or
/// receive + ack of every message.
async fn drain_backlog(
    b: &ConsumeBench,
    client: &Client,
    topic: &str,
    acks: bool,
) -> anyhow::Result<(Arc<Run>, Duration)> {
    let run = Run::new(&b.common, if acks { "consume (acks)" } else { "consume" });
    let group = format!(
        "bench-{}-{}",
        if acks { "acks" } else { "offsets" },
        now_micros()
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..b.consumers.max(1) {
        let client = if tasks.is_empty() {
            client.clone()
        } else {
            b.common.client.connect().await?
        };
        let options = ConsumerOptions {
            start: StartFrom::Earliest,
            limits: FetchLimits {
                max_messages: b.max_messages,
                max_bytes: 16 * 1024 * 1024,
                max_wait_ms: 200,
            },
            prefetch: msmq_client::Prefetch {
                messages: b.prefetch_messages,
                ..msmq_client::Prefetch::default()
            },
            ..ConsumerOptions::default()
        };
        let mut consumer = client.consumer(&group, &[topic], options).await?;
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            // Acks of one batch travel while the next is received.
            let acker = consumer.acker();
            let mut pending_ack: Option<AckTask> = None;
            let mut pending_commit: Option<CommitTask> = None;
            while !run.over() {
                let t0 = Instant::now();
                let (n, bytes) = if acks {
                    let deliveries = consumer.receive(Duration::from_secs(60)).await?;
                    if let Some(previous) = pending_ack.take() {
                        previous.await??;
                    }
                    let bytes = deliveries
                        .iter()
                        .map(|d| d.message.payload.len() as u64)
                        .sum();
                    let n = deliveries.len() as u64;
                    if n > 0 {
                        let acker = acker.clone();
                        pending_ack =
                            Some(tokio::spawn(async move { acker.ack(&deliveries).await }));
                    }
                    (n, bytes)
                } else {
                    let messages = consumer.poll().await?;
                    // One commit in flight while the next polls are taken;
                    // the next commit, once it is back, covers them all.
                    // Polls never wait for a commit's fsync.
                    if pending_commit.as_ref().is_none_or(|c| c.is_finished()) {
                        if let Some(previous) = pending_commit.take() {
                            rebalanced_is_fine(previous.await?)?;
                        }
                        if !messages.is_empty() {
                            pending_commit = Some(consumer.commit_in_background());
                        }
                    }
                    let bytes = messages
                        .iter()
                        .map(|m| m.message.payload.len() as u64)
                        .sum();
                    (messages.len() as u64, bytes)
                };
                if n > 0 {
                    run.done.fetch_add(n, Ordering::Relaxed);
                    run.record(n, bytes, t0.elapsed());
                }
            }
            if let Some(last) = pending_ack.take() {
                last.await??;
            }
            if let Some(last) = pending_commit.take() {
                rebalanced_is_fine(last.await?)?;
            }
            if !acks {
                rebalanced_is_fine(consumer.commit().await)?;
            }
            consumer.leave().await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((run, started.elapsed()))
}

/// Every `every`, one JSON line: seconds since `started`, messages/s
/// received and latency percentiles of that interval alone.
async fn report_intervals(run: Arc<Run>, started: Instant, every: Duration) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    let mut last_done = 0;
    while !run.over() {
        ticker.tick().await;
        let done = run.done.load(Ordering::Relaxed);
        let mut h = run.interval_us.lock().expect("histogram lock");
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{}",
            json!({
                "interval_end_s": started.elapsed().as_secs_f64(),
                "messages_per_sec": (done - last_done) as f64 / every.as_secs_f64(),
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
                "max_ms": h.max() as f64 / 1000.0,
            })
        );
        h.reset();
        last_done = done;
    }
}

/// Limit on [`await_settled_assignment`]: a group of a few members settles
/// in one heartbeat each.
const ASSIGNMENT_SETTLE_MS_MAX: u64 = 10_000;

/// Heartbeat every member until their assignments cover `partitions`
/// partitions once each.
async fn await_settled_assignment(
    consumers: &mut [msmq_client::Consumer],
    partitions: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(ASSIGNMENT_SETTLE_MS_MAX);
    loop {
        let mut owned = std::collections::BTreeSet::new();
        let mut assigned = 0;
        for consumer in consumers.iter_mut() {
            consumer.heartbeat_now().await?;
            assigned += consumer.assignment().partitions.len();
            owned.extend(consumer.assignment().partitions.iter().cloned());
        }
        if owned.len() == partitions && assigned == partitions {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the group's {} members did not settle on an assignment of {partitions} partitions in {ASSIGNMENT_SETTLE_MS_MAX} ms",
            consumers.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn e2e(b: E2eBench) -> anyhow::Result<()> {
    let topic = topic_name(&b.common, "e2e");
    let setup_client = setup(&b.common, &topic).await?;
    let group = format!("bench-e2e-{}", now_micros());
    let received = Run::new(&b.common, "e2e");
    // Join before producing: `latest` is the end of each partition at the
    // join, so the group receives every message the producers send.
    let mut consumers = Vec::new();
    for _ in 0..b.consumers.max(1) {
        let client = b.common.client.connect().await?;
        let options = ConsumerOptions {
            start: StartFrom::Latest,
            limits: FetchLimits {
                max_messages: 2000,
                max_bytes: 16 * 1024 * 1024,
                max_wait_ms: 100,
            },
            ..ConsumerOptions::default()
        };
        consumers.push(client.consumer(&group, &[&topic], options).await?);
    }
    // `latest` was pinned for the group at the first join; wait, too, until
    // the members agree on who owns every partition, so the measured run
    // starts without a rebalance.
    let partitions = setup_client.describe_topic(&topic).await?.partitions.len();
    await_settled_assignment(&mut consumers, partitions).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut consumer in consumers {
        let run = received.clone();
        tasks.push(tokio::spawn(async move {
            while !run.over() {
                let messages = consumer.poll().await?;
                let now = now_micros();
                for m in &messages {
                    let sent = m
                        .message
                        .payload
                        .get(..8)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .unwrap_or(now);
                    run.record(
                        1,
                        m.message.payload.len() as u64,
                        Duration::from_micros(now.saturating_sub(sent)),
                    );
                }
                run.done.fetch_add(messages.len() as u64, Ordering::Relaxed);
                consumer.commit().await?;
            }
            consumer.leave().await?;
            anyhow::Ok(())
        }));
    }
    let sent = Run::new(
        &Common {
            json: true,
            ..b.common.clone()
        },
        "send",
    );
    let reporter = b
        .report_every
        .map(|every| tokio::spawn(report_intervals(received.clone(), started, every)));
    produce_load(&b.common, &topic, b.producers, 1, b.rate, sent.clone()).await?;
    // Give consumers the rest of the time budget to catch up, then stop them.
    while !received.over()
        && received.done.load(Ordering::Relaxed) < sent.done.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    received.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    if let Some(reporter) = reporter {
        reporter.abort();
    }
    let elapsed = started.elapsed();
    summary(
        "e2e",
        &received,
        received.done.load(Ordering::Relaxed),
        elapsed,
        json!({"producers": b.producers, "consumers": b.consumers, "sent": sent.done.load(Ordering::Relaxed),
               "batch": b.common.batch, "size": b.common.size, "rate": b.rate, "topic": topic}),
        b.common.json,
    );
    Ok(())
}

async fn tx(b: TxBench) -> anyhow::Result<()> {
    let topic = topic_name(&b.common, "tx");
    setup(&b.common, &topic).await?;
    let group = format!("bench-tx-{}", now_micros());
    let run = Run::new(&b.common, "tx");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..b.producers.max(1) {
        let client = b.common.client.connect().await?;
        let options = msmq_client::ProducerOptions {
            idempotent: !b.common.no_idempotence,
            ..Default::default()
        };
        let producer = client
            .transactional_producer_with(
                &group,
                &topic,
                |_: &msmq_client::TransactionCheck| msmq_client::TxAction::Commit,
                options,
            )
            .await?;
        for _ in 0..b.inflight.max(1) {
            let producer = producer.clone();
            let run = run.clone();
            let size = b.common.size.max(8);
            tasks.push(tokio::spawn(async move {
                while run.claim(1) == 1 {
                    let t0 = Instant::now();
                    let mut payload = vec![0u8; size];
                    payload[..8].copy_from_slice(&now_micros().to_le_bytes());
                    let half = producer.send_half(NewMessage::new(payload)).await?;
                    producer.commit(half.tx_id).await?;
                    run.record(1, size as u64, t0.elapsed());
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    let committed = run.done.load(Ordering::Relaxed);
    let tx_rate = committed as f64 / elapsed.as_secs_f64().max(1e-9);
    // The same load as plain one-message produces, in the same run.
    let mut extra = json!({"producers": b.producers, "inflight": b.inflight, "size": b.common.size,
        "topic": topic, "latency_is": "half + commit round trips per transaction",
        "idempotent": !b.common.no_idempotence});
    // A stop signal ended the run: no baseline to compare with.
    if !b.no_baseline && !super::shutdown::requested() {
        let plain_common = Common {
            batch: 1,
            count: committed.max(1),
            json: true,
            ..b.common.clone()
        };
        let plain = Run::new(&plain_common, "plain");
        let plain_started = Instant::now();
        produce_load(
            &plain_common,
            &topic,
            b.producers,
            b.inflight,
            0,
            plain.clone(),
        )
        .await?;
        let plain_rate = plain.done.load(Ordering::Relaxed) as f64
            / plain_started.elapsed().as_secs_f64().max(1e-9);
        let plain_p99 = plain
            .latencies_us
            .lock()
            .expect("histogram lock")
            .value_at_quantile(0.99) as f64
            / 1000.0;
        extra["plain_messages_per_sec"] = json!(plain_rate);
        extra["plain_p99_ms"] = json!(plain_p99);
        extra["tx_to_plain_ratio"] = json!(tx_rate / plain_rate.max(1e-9));
    }
    summary("tx", &run, committed, elapsed, extra.clone(), b.common.json);
    if !b.common.json {
        if let Some(ratio) = extra["tx_to_plain_ratio"].as_f64() {
            println!(
                "plain produce, same load: {:.0} msg/s; transactions reach {:.2} of it",
                extra["plain_messages_per_sec"].as_f64().unwrap_or(0.0),
                ratio
            );
        }
    }
    Ok(())
}
