//! The crash driver: a mixed workload against a real broker that is
//! SIGKILLed at seeded random moments, at least [`KILLS_MIN`] times a run,
//! with an oracle checking the broker's state after every restart.
//!
//! The workload: two plain idempotent producers (keyed and unkeyed
//! batches) and a transactional producer that commits or rolls back by a
//! seeded coin and answers check-backs from the same coin, all three
//! running through every kill (each send is retried, with the same producer
//! id and sequence, until the restarted broker answers); and, started again
//! after each restart, a consumer group acknowledging message by message and
//! a stateful plugin (`stateful-publisher`) that counts every message in its
//! state and republishes it.
//!
//! At the end the producers stop after their current send, and the oracle
//! checks every message they sent, acknowledged or not: each plain message
//! is in the log exactly once, each transaction whose coin said commit is
//! there once, none whose coin said roll back is.
//!
//! The oracle, after each restart:
//! - every acknowledged message is in the log once, at its offset;
//! - no payload is in the log twice; a transaction whose commit was
//!   acknowledged is there, one whose rollback was acknowledged is not, nor
//!   is one whose coin said roll back;
//! - the group's deliveries cover the log below its committed progress, and
//!   each delivery matches the log;
//! - the plugin's effects are exactly once: its state and its published
//!   messages name the same payloads, each counted once and published once,
//!   and they cover the log below the plugin's progress.
//!
//! `MSMQ_CRASH_SEED` replays a run; `MSMQ_CRASH_DRIVER_KILLS` sets the
//! number of kills. `scripts/crash.sh` runs seeds from the command line.

use crate::harness::{read_all, TestBroker};
use crate::plugins::{deploy, rust_component, spec, state};
use crate::transactions::FAST_CHECKS;
use msmq_client::{
    Client, ClientOptions, ConsumerOptions, FetchLimits, NewMessage, TransactionCheck, TxAction,
};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a producer's connection attempt waits for the broker.
const PRODUCER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Kills per run, unless `MSMQ_CRASH_DRIVER_KILLS` says more.
const KILLS_MIN: usize = 30;
const TOPIC: &str = "orders";
const AUDIT: &str = "audit";
const PARTITIONS: u32 = 2;
const GROUP: &str = "billing";
const PLUGIN: &str = "ledger";
const PRODUCER_GROUP: &str = "payment-centre";

/// What the clients were told, kept across restarts.
#[derive(Default)]
struct Ledger {
    /// (partition, offset) → payload of every acknowledged plain message.
    acked: BTreeMap<(u32, u64), String>,
    /// Transaction payload → commit (true) or roll back, decided before
    /// its half message is sent.
    coin: HashMap<String, bool>,
    half_acked: HashSet<String>,
    commit_acked: BTreeMap<String, (u32, u64)>,
    rollback_acked: HashSet<String>,
    /// (partition, offset) → payload of every message the group received.
    delivered: HashMap<(u32, u64), String>,
    /// Every plain message a producer sent (each exactly once), acknowledged
    /// or not.
    sent: Vec<String>,
    /// Sends that returned an error (their messages may or may not be stored).
    send_failures: Vec<String>,
    /// Kills so far; a send that starts before a kill and ends after it
    /// was in flight through the kill (sent again, or first sent after it).
    kills: usize,
    sends_through_kills: usize,
}

type Shared = Arc<Mutex<Ledger>>;

/// Counts the oracle printed after the last check.
#[derive(Debug, Default)]
pub struct Report {
    pub kills: usize,
    pub log_messages: usize,
    pub plain_acked: usize,
    pub tx_committed: usize,
    pub tx_rolled_back: usize,
    pub delivered: usize,
    pub plugin_effects: usize,
    /// At the end: plain messages sent, and how many of them the log lacks
    /// or holds more than once.
    pub plain_sent: usize,
    pub plain_missing: usize,
    pub plain_duplicated: usize,
    /// At the end: transactions sent whose coin said commit, and how many
    /// of them the log lacks or holds more than once.
    pub tx_sent_commit: usize,
    pub tx_missing: usize,
    pub tx_duplicated: usize,
    /// Sends that failed for good.
    pub send_failures: usize,
    /// Plain sends in flight through a kill, all stored once.
    pub sends_through_kills: usize,
    /// The first check that failed, if any.
    pub violations: Vec<String>,
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One run of the driver. With `broken`, the broker acknowledges before it
/// commits (a test fault), and the run stops at the first violation.
pub async fn run(seed: u64, broken: bool) -> anyhow::Result<Report> {
    let kills = env_or("MSMQ_CRASH_DRIVER_KILLS", KILLS_MIN as u64) as usize;
    println!("crash driver: seed {seed}, {kills} kills (MSMQ_CRASH_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut broker = TestBroker::start_with_faults(FAST_CHECKS)?;
    if broken {
        std::fs::create_dir_all(broker.faults_dir())?;
        std::fs::write(broker.faults_dir().join("ack-before-commit"), b"on purpose")?;
    }
    {
        let client = broker.client().await?;
        client.create_topic(TOPIC, PARTITIONS).await?;
        client.create_topic(AUDIT, PARTITIONS).await?;
        let mut plugin = spec(PLUGIN, TOPIC);
        plugin.publish_to = vec![AUDIT.into()];
        plugin.config = vec![("out_topic".into(), AUDIT.into())];
        plugin.limits.batch_messages_max = 20;
        deploy(&client, plugin, &rust_component("stateful-publisher")?).await?;
        client.close().await;
    }
    let ledger: Shared = Arc::default();
    let mut report = Report::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producers = start_producers(&broker, &ledger, &stop, rng.random()).await?;
    for round in 0..kills {
        let workload = start_consumer(&broker, &ledger).await?;
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
        broker.kill9();
        ledger.lock().expect("ledger").kills += 1;
        for task in workload {
            task.abort();
        }
        report.kills += 1;
        broker.restart()?;
        let client = broker.client().await?;
        let found = check(&client, &ledger, &mut report).await?;
        client.close().await;
        if !found.is_empty() {
            report.violations = found;
            println!("round {round}: the oracle found {:?}", report.violations);
            stop.store(true, Ordering::Relaxed);
            for task in producers {
                task.abort();
            }
            return Ok(report);
        }
        println!(
            "round {round}: ok; log {} messages, {} plain acked, {} tx committed, {} rolled back, {} delivered, {} plugin effects",
            report.log_messages,
            report.plain_acked,
            report.tx_committed,
            report.tx_rolled_back,
            report.delivered,
            report.plugin_effects
        );
    }
    // The producers finish their current sends (retried until stored).
    stop.store(true, Ordering::Relaxed);
    for task in producers {
        tokio::time::timeout(Duration::from_secs(120), task).await???;
    }
    // Let check-backs and the plugin finish, then the final check: every
    // sent half is resolved by its coin and the plugin caught up.
    let client = broker.client().await?;
    let _answers = client
        .transactional_producer(PRODUCER_GROUP, TOPIC, answer_from(ledger.clone()))
        .await?;
    wait_until("transactions resolve", || async {
        Ok(client.list_transactions(false, 10_000).await?.is_empty())
    })
    .await?;
    wait_until("the plugin catches up", || async {
        Ok(client.plugin_stats(PLUGIN).await?.lag == 0)
    })
    .await?;
    let mut found = check(&client, &ledger, &mut report).await?;
    let log = read_log(&client, TOPIC).await?;
    let audit = read_log(&client, AUDIT).await?;
    let mut in_log: HashMap<&String, usize> = HashMap::new();
    for payload in log.values() {
        *in_log.entry(payload).or_default() += 1;
    }
    {
        let ledger = ledger.lock().expect("ledger");
        // Everything sent, acknowledged or not: exactly once.
        report.plain_sent = ledger.sent.len();
        report.send_failures = ledger.send_failures.len();
        report.sends_through_kills = ledger.sends_through_kills;
        for payload in &ledger.sent {
            match in_log.get(payload).copied().unwrap_or(0) {
                1 => {}
                0 => report.plain_missing += 1,
                _ => report.plain_duplicated += 1,
            }
        }
        for (payload, commit) in &ledger.coin {
            let n = in_log.get(payload).copied().unwrap_or(0);
            if *commit {
                report.tx_sent_commit += 1;
                match n {
                    1 => {}
                    0 => report.tx_missing += 1,
                    _ => report.tx_duplicated += 1,
                }
            } else if n > 0 {
                found.push(format!(
                    "transaction {payload}: coin said roll back, in the log {n} times"
                ));
            }
        }
        if report.plain_missing + report.plain_duplicated + report.tx_missing + report.tx_duplicated
            > 0
        {
            found.push(format!(
                "sent but not in the log exactly once: plain {} missing, {} duplicated of {}; transactions {} missing, {} duplicated of {}",
                report.plain_missing,
                report.plain_duplicated,
                report.plain_sent,
                report.tx_missing,
                report.tx_duplicated,
                report.tx_sent_commit
            ));
        }
        if let Some(first) = ledger.send_failures.first() {
            found.push(format!(
                "{} sends failed for good, the first: {first}",
                ledger.send_failures.len()
            ));
        }
    }
    println!(
        "crash driver: every message sent: plain {} sent ({} batches in flight through a kill), {} missing, {} duplicated; transactions to commit {} sent, {} missing, {} duplicated; {} sends failed",
        report.plain_sent,
        report.sends_through_kills,
        report.plain_missing,
        report.plain_duplicated,
        report.tx_sent_commit,
        report.tx_missing,
        report.tx_duplicated,
        report.send_failures
    );
    if audit.len() != log.len() {
        found.push(format!(
            "plugin caught up but published {} messages for {} in the log",
            audit.len(),
            log.len()
        ));
    }
    report.violations = found;
    println!("crash driver: final {report:?}");
    Ok(report)
}

async fn wait_until<F, Fut>(what: &str, mut done: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Check-backs answered by the coin of the transaction asked about.
fn answer_from(ledger: Shared) -> impl Fn(&TransactionCheck) -> TxAction + Send + Sync + 'static {
    move |check: &TransactionCheck| {
        let payload = String::from_utf8_lossy(&check.message.payload);
        match ledger.lock().expect("ledger").coin.get(payload.as_ref()) {
            Some(true) => TxAction::Commit,
            Some(false) => TxAction::Rollback,
            None => TxAction::Unknown,
        }
    }
}

/// The producers, for the whole run: each sends until `stop`, and every
/// send is retried through kills until the broker stores it.
async fn start_producers(
    broker: &TestBroker,
    ledger: &Shared,
    stop: &Arc<AtomicBool>,
    seed: u64,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<anyhow::Result<()>>>> {
    // A connection attempt made while the broker is down waits this long
    // for an answer; the default (10 s) would outlast many kills.
    let options = ClientOptions {
        connect_timeout: PRODUCER_CONNECT_TIMEOUT,
        ..broker.options()
    };
    let mut tasks = Vec::new();
    for producer_id in 0..2u32 {
        let client = Client::connect(options.clone()).await?;
        let (ledger, stop) = (ledger.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let producer = client.producer(TOPIC);
            for seq in 0..u64::MAX {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let batch: Vec<NewMessage> = (0..5)
                    .map(|i| {
                        let m = NewMessage::new(format!("plain-{producer_id}-{seq}-{i}"));
                        if producer_id == 0 {
                            m.with_key(format!("k{}", seq % 7))
                        } else {
                            m
                        }
                    })
                    .collect();
                let payloads: Vec<String> = batch
                    .iter()
                    .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                    .collect();
                let kills_before = {
                    let mut ledger = ledger.lock().expect("ledger");
                    ledger.sent.extend(payloads.iter().cloned());
                    ledger.kills
                };
                match producer.send_batch(batch).await {
                    Ok(acks) => {
                        let mut ledger = ledger.lock().expect("ledger");
                        if ledger.kills > kills_before {
                            ledger.sends_through_kills += 1;
                        }
                        for (ack, payload) in acks.iter().zip(payloads) {
                            ledger.acked.insert((ack.partition, ack.offset), payload);
                        }
                    }
                    Err(e) => {
                        let mut ledger = ledger.lock().expect("ledger");
                        ledger.send_failures.push(format!("{}: {e}", payloads[0]));
                        return Ok(());
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        }));
    }
    let client = Client::connect(options).await?;
    let (ledger, stop) = (ledger.clone(), stop.clone());
    let mut flips = rand::rngs::StdRng::seed_from_u64(seed);
    tasks.push(tokio::spawn(async move {
        let producer = client
            .transactional_producer(PRODUCER_GROUP, TOPIC, answer_from(ledger.clone()))
            .await?;
        for seq in 0..u64::MAX {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let payload = format!("tx-{seq}");
            let commit = flips.random_bool(0.7);
            ledger
                .lock()
                .expect("ledger")
                .coin
                .insert(payload.clone(), commit);
            let half = match producer.send_half(NewMessage::new(payload.clone())).await {
                Ok(half) => half,
                Err(e) => {
                    let mut ledger = ledger.lock().expect("ledger");
                    ledger.send_failures.push(format!("{payload}: {e}"));
                    return Ok(());
                }
            };
            ledger
                .lock()
                .expect("ledger")
                .half_acked
                .insert(payload.clone());
            // A decision lost to a kill is left to the check-back, which
            // answers from the same coin.
            if commit {
                if let Ok(ack) = producer.commit(half.tx_id).await {
                    ledger
                        .lock()
                        .expect("ledger")
                        .commit_acked
                        .insert(payload, (ack.partition, ack.offset));
                }
            } else if producer.rollback(half.tx_id).await.is_ok() {
                ledger
                    .lock()
                    .expect("ledger")
                    .rollback_acked
                    .insert(payload);
            }
        }
        Ok(())
    }));
    Ok(tasks)
}

/// Start the round's consumer; it runs until aborted.
async fn start_consumer(
    broker: &TestBroker,
    ledger: &Shared,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    {
        let client = broker.client().await?;
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            let options = ConsumerOptions {
                limits: FetchLimits {
                    max_messages: 200,
                    max_bytes: 1 << 20,
                    max_wait_ms: 100,
                },
                ..ConsumerOptions::default()
            };
            let Ok(mut consumer) = client.consumer(GROUP, &[TOPIC], options).await else {
                return;
            };
            loop {
                let Ok(deliveries) = consumer.receive(Duration::from_secs(5)).await else {
                    return;
                };
                {
                    let mut ledger = ledger.lock().expect("ledger");
                    for d in &deliveries {
                        ledger.delivered.insert(
                            (d.partition, d.message.offset),
                            String::from_utf8_lossy(&d.message.payload).into_owned(),
                        );
                    }
                }
                if consumer.ack(&deliveries).await.is_err() {
                    return;
                }
            }
        }));
    }
    Ok(tasks)
}

/// (partition, offset) → payload of a whole topic.
async fn read_log(client: &Client, topic: &str) -> anyhow::Result<BTreeMap<(u32, u64), String>> {
    let mut log = BTreeMap::new();
    for partition in 0..PARTITIONS {
        for m in read_all(client, topic, partition, 0).await? {
            log.insert(
                (partition, m.offset),
                String::from_utf8_lossy(&m.payload).into_owned(),
            );
        }
    }
    Ok(log)
}

/// The oracle: every violation it finds, described.
async fn check(
    client: &Client,
    ledger: &Shared,
    report: &mut Report,
) -> anyhow::Result<Vec<String>> {
    // The plugin keeps running while this reads. Each of its batches
    // commits state, publishes and offset together, so what is read before
    // the audit is covered by it, and what is read after covers it.
    let plugin_group = client
        .describe_group(&spec(PLUGIN, TOPIC).group_name())
        .await?;
    let counted_before = state(client, PLUGIN, "n/").await?;
    // The producers keep running: what they were told before the log is
    // read must be in it; what they are told after may not be yet.
    let (acked, commit_acked) = {
        let ledger = ledger.lock().expect("ledger");
        (ledger.acked.clone(), ledger.commit_acked.clone())
    };
    let log = read_log(client, TOPIC).await?;
    let audit = read_log(client, AUDIT).await?;
    let counted_after = state(client, PLUGIN, "n/").await?;
    let group = client.describe_group(GROUP).await?;
    let ledger = ledger.lock().expect("ledger");
    let mut found = Vec::new();
    let mut note = |v: String| {
        if found.len() < 10 {
            found.push(v);
        }
    };

    // Acknowledged plain messages: once, at their offsets.
    for (at, payload) in &acked {
        match log.get(at) {
            Some(p) if p == payload => {}
            Some(p) => note(format!(
                "lost: {payload} acknowledged at {at:?}, log has {p}"
            )),
            None => note(format!(
                "lost: {payload} acknowledged at {at:?}, not in the log"
            )),
        }
    }
    let mut seen: HashMap<&String, (u32, u64)> = HashMap::new();
    for (at, payload) in &log {
        if let Some(first) = seen.insert(payload, *at) {
            note(format!("duplicated: {payload} at {first:?} and {at:?}"));
        }
    }
    // Transactions.
    for (payload, at) in &commit_acked {
        if log.get(at) != Some(payload) {
            note(format!(
                "lost: committed transaction {payload} acknowledged at {at:?}, log has {:?}, and it at {:?}",
                log.get(at),
                log.iter().find(|(_, p)| *p == payload).map(|(at, _)| at)
            ));
        }
    }
    for payload in seen.keys().filter(|p| p.starts_with("tx-")) {
        if ledger.rollback_acked.contains(*payload) || ledger.coin.get(*payload) == Some(&false) {
            note(format!("rolled back but delivered: {payload}"));
        }
    }
    // The group: deliveries cover the log below its progress, and match it.
    for state in &group.offsets {
        let progress = state.committed_offset.unwrap_or(0);
        for offset in 0..progress {
            let at = (state.partition, offset);
            match (log.get(&at), ledger.delivered.get(&at)) {
                (Some(l), Some(d)) if l == d => {}
                (l, d) => note(format!(
                    "group {GROUP} committed past {at:?} but delivered {d:?}, log {l:?}"
                )),
            }
        }
    }
    for (at, payload) in &ledger.delivered {
        if log.get(at) != Some(payload) {
            note(format!(
                "delivered {payload} at {at:?}, log has {:?}",
                log.get(at)
            ));
        }
    }
    // The plugin: state and publishes agree, each exactly once, and cover
    // the log below its progress.
    let mut published: HashMap<&String, usize> = HashMap::new();
    for payload in audit.values() {
        *published.entry(payload).or_default() += 1;
    }
    for (payload, n) in &published {
        if *n != 1 {
            note(format!("plugin published {payload} {n} times"));
        }
        if counted_after
            .get(&format!("n/{payload}"))
            .map(String::as_str)
            != Some("1")
        {
            note(format!(
                "plugin published {payload} but counted it {:?}",
                counted_after.get(&format!("n/{payload}"))
            ));
        }
    }
    for (key, n) in &counted_before {
        let payload = key.trim_start_matches("n/").to_string();
        if n != "1" || !published.contains_key(&payload) {
            note(format!(
                "plugin counted {payload} {n} times, published {:?}",
                published.get(&payload)
            ));
        }
    }
    for state in &plugin_group.offsets {
        let progress = state.committed_offset.unwrap_or(0);
        for offset in 0..progress {
            if let Some(payload) = log.get(&(state.partition, offset)) {
                if !published.contains_key(payload) {
                    note(format!("plugin passed {payload} without publishing it"));
                }
            }
        }
    }
    report.log_messages = log.len();
    report.plain_acked = ledger.acked.len();
    report.tx_committed = seen.keys().filter(|p| p.starts_with("tx-")).count();
    report.tx_rolled_back = ledger.rollback_acked.len();
    report.delivered = ledger.delivered.len();
    report.plugin_effects = published.len();
    Ok(found)
}

fn seed(default: u64) -> u64 {
    env_or("MSMQ_CRASH_SEED", default)
}

async fn passes(default_seed: u64) -> anyhow::Result<()> {
    let report = run(seed(default_seed), false).await?;
    assert!(report.kills >= KILLS_MIN, "{report:?}");
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(report.plain_acked > 0 && report.tx_committed > 0 && report.plugin_effects > 0);
    assert!(
        report.plain_sent > 0 && report.tx_sent_commit > 0,
        "{report:?}"
    );
    assert_eq!(
        (
            report.plain_missing,
            report.plain_duplicated,
            report.tx_missing,
            report.tx_duplicated
        ),
        (0, 0, 0, 0),
        "{report:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_one_survives_thirty_kills() -> anyhow::Result<()> {
    passes(1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_two_survives_thirty_kills() -> anyhow::Result<()> {
    passes(2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_three_survives_thirty_kills() -> anyhow::Result<()> {
    passes(3).await
}

/// The oracle can fail: a broker that answers before it commits loses
/// acknowledged messages to a SIGKILL, and the driver says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_acknowledges_before_commit_is_caught() -> anyhow::Result<()> {
    let report = run(seed(4), true).await?;
    assert!(
        report.violations.iter().any(|v| v.starts_with("lost")),
        "the oracle missed the broken broker: {report:?}"
    );
    Ok(())
}
