//! One plugin's runner: a thread that feeds the plugin batches, holds it to
//! its limits and quota, and commits each batch's effects atomically.
//!
//! Layout: this file is the runner's thread and its scheduling (control,
//! waits, quota, upgrades); `handout.rs` chooses the messages of the next
//! batch; `execute.rs` runs a batch and commits its outcomes.
//!
//! Owns: the plugin's live instance (`instance.rs`), its in-memory positions
//! (mirroring the committed group offsets), its pending retries, and the
//! count of failed calls per message.
//!
//! Invariants:
//! - Positions, retries and counters change only after the commit that
//!   stores them succeeded; a failed call or commit changes nothing, and the
//!   same messages are handed out again.
//! - A message that was part of a failed call is next handed out alone, so
//!   one poison message cannot hold back the others; after
//!   `delivery_attempts_max` failed deliveries it is dead-lettered.
//! - An upgrade or stop takes effect only between batches.

mod execute;
mod handout;

use execute::truncate;

use super::engine::{Prepared, EPOCH_TICK_MS};
use super::host::{HostState, Outcome};
use super::instance::CallMessage;
pub(super) use super::instance::Instance;
use super::quota::TokenBucket;
use super::PluginRecord;
use crate::command::{Command, PartitionAppend, PluginCommit, TopicRef};
use crate::core::BrokerState;
use crate::storage::{read, WriteError};
use crate::topics::Topic;
use msmq_protocol::{PluginSpec, PluginStats};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::Store;

/// Longest back-off after consecutive failures.
pub const FAILURE_BACKOFF_MS_MAX: u64 = 5_000;
/// First back-off after a failure; doubled per consecutive failure.
pub const FAILURE_BACKOFF_MS_FIRST: u64 = 50;
/// How long an idle runner sleeps before looking again without a wake-up.
const IDLE_RECHECK_MS: u64 = 1_000;
/// Longest error text kept for `plugin stats`.
const ERROR_TEXT_BYTES_MAX: usize = 4096;
/// Most bytes of a plugin's own error output added to a failure's text.
const PLUGIN_SAID_BYTES_MAX: usize = 3072;
/// An instance whose linear memory passed this share of its limit (in
/// percent) is replaced before its next batch: guests whose memory only grows
/// (some language runtimes keep what the host hands them) get a fresh
/// instance instead of a trapped batch.
pub const INSTANCE_RECYCLE_MEMORY_PERCENT: u64 = 75;
/// Window of the recent-throughput figure.
const RATE_WINDOW_MS: u64 = 3_000;
/// Longest dead-letter reason kept from a plugin.
const DLQ_REASON_BYTES_MAX: usize = 1024;
/// Most published messages stored as one batch in the log.
const PUBLISHED_PER_STORED_BATCH_MAX: usize = 1000;
/// Payload bytes read for one batch at most.
const BATCH_READ_BYTES_MAX: usize = 16 * 1024 * 1024;

/// What the manager keeps of a runner.
pub(super) struct RunnerHandle {
    pub shared: Arc<RunnerShared>,
    thread: std::thread::JoinHandle<()>,
}

impl RunnerHandle {
    /// Ask the runner to stop after its current batch and wait up to `wait`.
    /// Returns whether it stopped.
    pub fn stop(self, wait: Duration) -> bool {
        self.shared.request_stop();
        let deadline = Instant::now() + wait;
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.thread.join();
        true
    }
}

struct Control {
    record: PluginRecord,
    /// The new version, its trial instance, and when the deploy was
    /// acknowledged.
    upgrade: Option<(PluginRecord, Prepared, Instant, Option<Instance>)>,
    stop: bool,
}

#[derive(Default)]
struct Counters {
    processed: AtomicU64,
    acked: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    failed_batches: AtomicU64,
    batches: AtomicU64,
    published: AtomicU64,
    throttled_us: AtomicU64,
    busy_us: AtomicU64,
    memory_bytes: AtomicU64,
    instances_recycled: AtomicU64,
    consecutive_failures: AtomicU32,
    /// `u64::MAX`: no upgrade yet.
    last_swap_us: AtomicU64,
    pending_retries: AtomicU64,
}

/// State shared between a runner thread and the request handlers.
pub(super) struct RunnerShared {
    control: Mutex<Control>,
    wake: tokio::sync::Notify,
    counters: Counters,
    last_error: Mutex<Option<String>>,
    /// Committed next offset per partition.
    positions: Mutex<Vec<u64>>,
    /// (time, processed) samples for the recent rate.
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl RunnerShared {
    pub fn record(&self) -> PluginRecord {
        self.control.lock().expect("control lock").record.clone()
    }

    pub fn upgrade(
        &self,
        record: PluginRecord,
        prepared: Prepared,
        acknowledged: Instant,
        instance: Option<Instance>,
    ) {
        self.control.lock().expect("control lock").upgrade =
            Some((record, prepared, acknowledged, instance));
        self.wake.notify_one();
    }

    pub fn set_record_paused(&self, paused: Option<String>) {
        {
            let mut c = self.control.lock().expect("control lock");
            c.record.paused = paused.clone();
            if let Some((up, _, _, _)) = c.upgrade.as_mut() {
                up.paused = paused;
            }
        }
        if self.record().paused.is_none() {
            self.counters
                .consecutive_failures
                .store(0, Ordering::Relaxed);
        }
        self.wake.notify_one();
    }

    /// Undo a stop request that was not acted on (a remove that failed).
    pub fn cancel_stop(&self) {
        self.control.lock().expect("control lock").stop = false;
    }

    pub fn request_stop(&self) {
        self.control.lock().expect("control lock").stop = true;
        self.wake.notify_one();
    }

    pub fn stats(&self, state: &BrokerState) -> PluginStats {
        let record = self.record();
        let c = &self.counters;
        let group = record.spec.group_name();
        let lag = state.registry.get(&record.spec.topic).map_or(0, |topic| {
            let positions = self.positions.lock().expect("positions lock");
            (0..topic.partition_count())
                .map(|p| {
                    let offsets = topic.partition(p);
                    let end = offsets.map_or(0, |o| o.end());
                    // Before the runner loaded its positions: the stored ones.
                    let position = positions.get(p as usize).copied().unwrap_or_else(|| {
                        state
                            .registry
                            .committed_offset(&group, topic.id(), p)
                            .unwrap_or_else(|| offsets.map_or(0, |o| o.start()))
                    });
                    end.saturating_sub(position)
                })
                .sum::<u64>()
        }) + c.pending_retries.load(Ordering::Relaxed);
        let swap = c.last_swap_us.load(Ordering::Relaxed);
        PluginStats {
            name: record.spec.name.clone(),
            version: record.version,
            status: record.status(),
            processed: c.processed.load(Ordering::Relaxed),
            acked: c.acked.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            consecutive_failures: c.consecutive_failures.load(Ordering::Relaxed),
            last_error: self.last_error.lock().expect("error lock").clone(),
            published: c.published.load(Ordering::Relaxed),
            lag,
            throttled_ms: c.throttled_us.load(Ordering::Relaxed) / 1000,
            busy_ms: c.busy_us.load(Ordering::Relaxed) / 1000,
            memory_bytes: c.memory_bytes.load(Ordering::Relaxed),
            instances_recycled: c.instances_recycled.load(Ordering::Relaxed),
            last_swap_ms: (swap != u64::MAX).then_some(swap / 1000),
            recent_messages_per_second: self.recent_rate().round() as u64,
        }
    }

    fn recent_rate(&self) -> f64 {
        let samples = self.samples.lock().expect("samples lock");
        let now = Instant::now();
        let window = Duration::from_millis(RATE_WINDOW_MS);
        let Some(&(first_at, first)) = samples.iter().find(|(t, _)| now - *t <= window) else {
            return 0.0;
        };
        let last = samples.back().map_or(first, |s| s.1);
        let secs = window
            .as_secs_f64()
            .min((now - first_at).as_secs_f64().max(0.001));
        (last - first) as f64 / secs
    }

    fn note_error(&self, error: &str) {
        let mut text = error.to_string();
        truncate(&mut text, ERROR_TEXT_BYTES_MAX);
        *self.last_error.lock().expect("error lock") = Some(text);
    }
}

/// Start a runner thread for a plugin.
pub(super) fn spawn(
    state: Arc<BrokerState>,
    record: PluginRecord,
    prepared: Prepared,
    instance: Option<Instance>,
) -> RunnerHandle {
    let shared = Arc::new(RunnerShared {
        control: Mutex::new(Control {
            record: record.clone(),
            upgrade: None,
            stop: false,
        }),
        wake: tokio::sync::Notify::new(),
        counters: Counters {
            last_swap_us: AtomicU64::new(u64::MAX),
            ..Default::default()
        },
        last_error: Mutex::new(None),
        positions: Mutex::new(Vec::new()),
        samples: Mutex::new(VecDeque::new()),
    });
    let runtime = tokio::runtime::Handle::current();
    let appended = state.registry.subscribe_appended();
    let now = Instant::now();
    let runner = Runner {
        messages_quota: TokenBucket::new(record.spec.limits.messages_per_second as u64, now),
        bytes_quota: TokenBucket::new(record.spec.limits.bytes_per_second, now),
        state,
        shared: shared.clone(),
        record,
        prepared,
        instance,
        topic: None,
        positions: Vec::new(),
        retries: BTreeMap::new(),
        failed: HashMap::new(),
        next_partition: 0,
        swap_acknowledged: None,
        runtime,
        appended,
    };
    let name = format!("plugin-{}", runner.record.spec.name);
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || runner.run())
        .expect("spawning a plugin runner thread");
    RunnerHandle { shared, thread }
}

/// Make an instance and run its `init`, within the plugin's limits.
fn instantiate(
    state: &BrokerState,
    spec: &PluginSpec,
    prepared: &Prepared,
) -> Result<Instance, String> {
    let host = HostState::new(
        spec.name.as_str().into(),
        state.store.db().clone(),
        state.registry.clone(),
        state.clock.clone(),
        spec.publish_to.iter().cloned().collect::<HashSet<_>>(),
        state.config.message_bytes_max.as_u64() as usize,
        spec.limits.memory_bytes_max as usize,
    );
    let mut store = Store::new(state.plugins.engine().engine(), host);
    store.limiter(|s| &mut s.memory);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(deadline_ticks(spec.limits.batch_time_ms_max));
    let output = store.data().output.clone();
    output.begin_call();
    let mut instance = Instance::new(&prepared.pre, store)
        .map_err(|e| with_plugin_errors(describe_failure(&e, spec), &output))?;
    instance
        .store
        .set_epoch_deadline(deadline_ticks(spec.limits.batch_time_ms_max));
    let result = instance.call_init(&spec.config);
    output.end_call();
    match result {
        Ok(Ok(())) => Ok(instance),
        Ok(Err(message)) => Err(format!("init returned an error: {message}")),
        Err(e) => Err(format!(
            "init failed: {}",
            with_plugin_errors(describe_failure(&e, spec), &output)
        )),
    }
}

/// A failure's description followed by what the plugin wrote to stderr or
/// logged as errors during the call (a traceback, a panic message), which
/// usually says more than the trap.
fn with_plugin_errors(failure: String, output: &super::wasi::PluginOutput) -> String {
    match output.recent_errors() {
        Some(said) => {
            // The end of a traceback names the error and its frame: keep it.
            let mut start = said.len().saturating_sub(PLUGIN_SAID_BYTES_MAX);
            while !said.is_char_boundary(start) {
                start += 1;
            }
            format!("{failure}; the plugin said: {}", &said[start..])
        }
        None => failure,
    }
}

/// Instantiate and init once, to refuse a deploy whose init fails. The
/// instance then serves the deployed version's first batch, so a deploy or
/// an upgrade pays for one instantiation, not two.
pub(super) fn trial_init(
    state: &BrokerState,
    spec: &PluginSpec,
    prepared: &Prepared,
) -> Result<Instance, String> {
    instantiate(state, spec, prepared)
}

fn deadline_ticks(ms: u32) -> u64 {
    (ms as u64).div_ceil(EPOCH_TICK_MS) + 1
}

/// A readable account of a failed call.
fn describe_failure(e: &wasmtime::Error, spec: &PluginSpec) -> String {
    if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
        return format!(
            "the call ran past its time limit of {} ms and was interrupted",
            spec.limits.batch_time_ms_max
        );
    }
    // The outer layer is the backtrace; the root says what happened (a
    // trap, or a host function's error such as the memory limit).
    let cause = e.root_cause().to_string();
    let frame = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| bt.frames().iter().find_map(|f| f.func_name()))
        .map(|name| format!(" (in {name})"))
        .unwrap_or_default();
    format!("{cause}{frame}")
}

/// Where a message handed to the plugin came from.
#[derive(Clone, Copy)]
enum Origin {
    /// Next in its partition.
    Fresh,
    /// From the plugin's retries (its key there).
    Retry,
}

struct Handed {
    message: msmq_protocol::Message,
    partition: u32,
    attempt: u32,
    origin: Origin,
}

struct Runner {
    state: Arc<BrokerState>,
    shared: Arc<RunnerShared>,
    record: PluginRecord,
    prepared: Prepared,
    instance: Option<Instance>,
    topic: Option<Arc<Topic>>,
    positions: Vec<u64>,
    /// (due ms, partition, offset) → attempt of the next delivery.
    retries: BTreeMap<(u64, u32, u64), u32>,
    /// (partition, offset) → failed deliveries so far.
    failed: HashMap<(u32, u64), u32>,
    next_partition: u32,
    swap_acknowledged: Option<Instant>,
    messages_quota: TokenBucket,
    bytes_quota: TokenBucket,
    runtime: tokio::runtime::Handle,
    appended: tokio::sync::watch::Receiver<u64>,
}

impl Runner {
    fn name(&self) -> &str {
        &self.record.spec.name
    }

    fn limits(&self) -> &msmq_protocol::PluginLimits {
        &self.record.spec.limits
    }

    fn run(mut self) {
        tracing::debug!(plugin = %self.name(), "runner started");
        loop {
            if !self.apply_control() {
                break;
            }
            if self.record.paused.is_some() {
                self.wait(Duration::from_millis(IDLE_RECHECK_MS), false);
                continue;
            }
            let Some(topic) = self.current_topic() else {
                self.wait(Duration::from_millis(IDLE_RECHECK_MS), true);
                continue;
            };
            self.appended.borrow_and_update();
            if self.throttle() {
                continue;
            }
            let Some(handed) = self.next_batch(&topic) else {
                let until_retry = self
                    .retries
                    .keys()
                    .next()
                    .map(|k| k.0.saturating_sub(self.state.now_ms()));
                let idle = until_retry.unwrap_or(IDLE_RECHECK_MS).min(IDLE_RECHECK_MS);
                self.wait(Duration::from_millis(idle.max(1)), true);
                continue;
            };
            self.run_batch(&topic, handed);
        }
        tracing::debug!(plugin = %self.name(), "runner stopped");
    }

    /// Take an upgrade or stop request. Returns false to stop.
    fn apply_control(&mut self) -> bool {
        let mut control = self.shared.control.lock().expect("control lock");
        if control.stop {
            return false;
        }
        if let Some((record, prepared, acknowledged, instance)) = control.upgrade.take() {
            tracing::info!(plugin = %record.spec.name, from = self.record.version, to = record.version, "plugin upgraded at a batch boundary");
            control.record = record.clone();
            let now = Instant::now();
            self.messages_quota =
                TokenBucket::new(record.spec.limits.messages_per_second as u64, now);
            self.bytes_quota = TokenBucket::new(record.spec.limits.bytes_per_second, now);
            self.record = record;
            self.prepared = prepared;
            self.instance = instance;
            self.swap_acknowledged = Some(acknowledged);
        } else {
            self.record.paused = control.record.paused.clone();
        }
        true
    }

    /// Sleep up to `timeout`, waking early on a control change or, when
    /// `on_append`, on new messages.
    fn wait(&mut self, timeout: Duration, on_append: bool) {
        let shared = self.shared.clone();
        let appended = &mut self.appended;
        self.runtime.block_on(async {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = appended.changed(), if on_append => {}
                _ = tokio::time::sleep(timeout) => {}
            }
        });
    }

    /// The topic, reloading positions and retries when it is new or was
    /// recreated.
    fn current_topic(&mut self) -> Option<Arc<Topic>> {
        let topic = self.state.registry.get(&self.record.spec.topic)?;
        if self.topic.as_ref().is_some_and(|t| t.id() == topic.id()) {
            return self.topic.clone();
        }
        match self.load_progress(&topic) {
            Ok(()) => {
                self.topic = Some(topic.clone());
                Some(topic)
            }
            Err(e) => {
                tracing::error!(plugin = %self.name(), error = %e, "cannot load plugin progress");
                None
            }
        }
    }

    /// Wait while the quota is in debt. Returns whether it waited.
    fn throttle(&mut self) -> bool {
        let now = Instant::now();
        let wait = self
            .messages_quota
            .wait_before_take(now)
            .max(self.bytes_quota.wait_before_take(now));
        if wait.is_zero() {
            return false;
        }
        let started = Instant::now();
        self.wait(wait, false);
        self.shared
            .counters
            .throttled_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        true
    }
}
