//! One plugin's runner: a thread that feeds the plugin batches, holds it to
//! its limits and quota, and commits each batch's effects atomically.
//!
//! Size: over 800 lines. Its per-message-ack logic (retries, dead letters)
//! leaves for the domain layer with the deterministic-core work, which also
//! takes it off the wire handler it calls today; splitting sooner would cut
//! along a line that is about to move.
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

use super::engine::{Prepared, EPOCH_TICK_MS};
use super::host::{HostState, Outcome};
use super::instance::CallMessage;
pub(super) use super::instance::Instance;
use super::quota::TokenBucket;
use super::PluginRecord;
use crate::command::{Command, PartitionAppend, PluginCommit, TopicRef};
use crate::core::BrokerState;
use crate::storage::{batch, read, WriteError};
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

    fn load_progress(&mut self, topic: &Topic) -> Result<(), crate::storage::StorageError> {
        let db = self.state.store.db();
        let group = self.record.spec.group_name();
        let mut positions = Vec::with_capacity(topic.partition_count() as usize);
        for p in 0..topic.partition_count() {
            let start = topic.partition(p).map_or(0, |o| o.start());
            let committed = read::group_offset(db, &group, topic.id(), p)?;
            positions.push(committed.unwrap_or(start).max(start));
        }
        self.retries = read::plugin_retries(db, self.name())?
            .into_iter()
            .filter(|((t, _, _), _)| *t == topic.id())
            .map(|((_, p, o), (due, attempt))| ((due, p, o), attempt))
            .collect();
        self.shared
            .counters
            .pending_retries
            .store(self.retries.len() as u64, Ordering::Relaxed);
        *self.shared.positions.lock().expect("positions lock") = positions.clone();
        self.positions = positions;
        self.failed.clear();
        Ok(())
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

    /// The next messages to hand out, at most the quota's burst; `None`
    /// when there is nothing to do now.
    fn next_batch(&mut self, topic: &Arc<Topic>) -> Option<Vec<Handed>> {
        let mut max = self.limits().batch_messages_max as u64;
        max = max.min(self.messages_quota.burst()).max(1);
        let handed = match self.due_retries(topic, max as usize) {
            Some(h) => h,
            None => self.fresh(topic, max as usize)?,
        };
        let now = Instant::now();
        self.messages_quota.take(handed.len() as u64, now);
        let bytes: usize = handed.iter().map(|h| h.message.payload.len()).sum();
        self.bytes_quota.take(bytes as u64, now);
        Some(handed)
    }

    fn due_retries(&mut self, topic: &Topic, max: usize) -> Option<Vec<Handed>> {
        let now_ms = self.state.now_ms();
        let due: Vec<(u64, u32, u64)> = self
            .retries
            .range(..=(now_ms, u32::MAX, u64::MAX))
            .map(|(k, _)| *k)
            .take(max)
            .collect();
        if due.is_empty() {
            return None;
        }
        let mut handed = Vec::new();
        let mut expired = Vec::new();
        for key in due {
            let (_, partition, offset) = key;
            if offset < topic.partition(partition).map_or(0, |o| o.start()) {
                // Retention removed the message: there is nothing to retry.
                expired.push(key);
                continue;
            }
            let failed_before = self.failed.contains_key(&(partition, offset));
            if failed_before && !handed.is_empty() {
                break;
            }
            let attempt =
                self.retries[&key] + self.failed.get(&(partition, offset)).copied().unwrap_or(0);
            match self.read(topic, partition, offset, offset + 1, 1) {
                Some(mut messages) if !messages.is_empty() => {
                    handed.push(Handed {
                        message: messages.remove(0),
                        partition,
                        attempt,
                        origin: Origin::Retry,
                    });
                }
                Some(_) => {
                    // Past the partition's end: only a corrupt retry row
                    // points there. Keep it (and say so) rather than lose it.
                    tracing::warn!(plugin = %self.name(), partition, offset, "retry of a message that does not exist; skipped");
                    break;
                }
                None => break,
            }
            if failed_before {
                break;
            }
        }
        if !expired.is_empty() {
            self.forget_retries(topic, expired);
        }
        (!handed.is_empty()).then_some(handed)
    }

    /// Delete retries of messages retention removed.
    fn forget_retries(&mut self, topic: &Topic, keys: Vec<(u64, u32, u64)>) {
        let commit = PluginCommit {
            plugin: self.record.spec.name.clone(),
            incarnation: self.record.incarnation,
            group: self.record.spec.group_name(),
            offsets: vec![],
            state: vec![],
            publishes: vec![],
            retry_puts: vec![],
            retry_deletes: keys.iter().map(|k| (topic.id(), k.1, k.2)).collect(),
            dead_letters: vec![],
            now_ms: self.state.now_ms(),
        };
        match self
            .runtime
            .block_on(self.state.submit(Command::PluginCommit(Box::new(commit))))
        {
            Ok(_) => {
                tracing::info!(plugin = %self.name(), retries = keys.len(), "retries of messages removed by retention dropped");
                for key in keys {
                    self.retries.remove(&key);
                    self.failed.remove(&(key.1, key.2));
                }
                self.shared
                    .counters
                    .pending_retries
                    .store(self.retries.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(plugin = %self.name(), error = %e, "could not drop expired retries; will try again")
            }
        }
    }

    fn fresh(&mut self, topic: &Topic, max: usize) -> Option<Vec<Handed>> {
        let count = topic.partition_count();
        for i in 0..count {
            let p = (self.next_partition + i) % count;
            let end = topic.partition(p).map_or(0, |o| o.end());
            let from = self.positions.get(p as usize).copied().unwrap_or(0);
            if from >= end {
                continue;
            }
            self.next_partition = (p + 1) % count;
            // A message of a failed call goes alone; others stop before it.
            let mut max = max;
            if self.failed.contains_key(&(p, from)) {
                max = 1;
            } else if let Some(first_failed) =
                (from..end.min(from + max as u64)).find(|o| self.failed.contains_key(&(p, *o)))
            {
                max = (first_failed - from) as usize;
            }
            let messages = self.read(topic, p, from, end, max)?;
            if messages.is_empty() {
                continue;
            }
            return Some(
                messages
                    .into_iter()
                    .map(|m| Handed {
                        attempt: 1 + self.failed.get(&(p, m.offset)).copied().unwrap_or(0),
                        message: m,
                        partition: p,
                        origin: Origin::Fresh,
                    })
                    .collect(),
            );
        }
        None
    }

    fn read(
        &self,
        topic: &Topic,
        partition: u32,
        from: u64,
        end: u64,
        max: usize,
    ) -> Option<Vec<msmq_protocol::Message>> {
        match read::read_partition(
            self.state.store.db(),
            self.state.store.segments(),
            self.state.store.store_id(),
            topic.id(),
            partition,
            from,
            end,
            max,
            BATCH_READ_BYTES_MAX,
        ) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!(plugin = %self.name(), error = %e, "reading a batch failed");
                None
            }
        }
    }

    fn run_batch(&mut self, topic: &Arc<Topic>, handed: Vec<Handed>) {
        let messages: Vec<CallMessage<'_>> = handed
            .iter()
            .map(|h| CallMessage {
                message: &h.message,
                partition: h.partition,
                attempt: h.attempt,
            })
            .collect();
        let outcome = self.call(&topic.name, &messages);
        drop(messages);
        match outcome {
            Ok(outcomes) if outcomes.len() == handed.len() => {
                if let Some(acknowledged) = self.swap_acknowledged.take() {
                    let swap = acknowledged.elapsed();
                    tracing::info!(plugin = %self.name(), version = self.record.version, swap_ms = swap.as_millis() as u64, "new version handled its first batch");
                    self.shared
                        .counters
                        .last_swap_us
                        .store(swap.as_micros() as u64, Ordering::Relaxed);
                }
                self.commit(topic, &handed, outcomes);
            }
            Ok(outcomes) => {
                let error = format!(
                    "handle-batch returned {} outcomes for {} messages",
                    outcomes.len(),
                    handed.len()
                );
                self.failed_call(topic, &handed, error);
            }
            Err(error) => self.failed_call(topic, &handed, error),
        }
    }

    /// Call the plugin; on a trap the instance is dropped.
    fn call(&mut self, topic: &str, messages: &[CallMessage<'_>]) -> Result<Vec<Outcome>, String> {
        let limit = self.record.spec.limits.memory_bytes_max;
        if let Some(instance) = &self.instance {
            let used = instance.store.data().memory.current_bytes as u64;
            if used.saturating_mul(100) > limit.saturating_mul(INSTANCE_RECYCLE_MEMORY_PERCENT) {
                tracing::info!(
                    plugin = %self.name(),
                    memory_bytes = used,
                    limit_bytes = limit,
                    "replacing the plugin's instance between batches: its memory passed {INSTANCE_RECYCLE_MEMORY_PERCENT}% of its limit"
                );
                self.shared
                    .counters
                    .instances_recycled
                    .fetch_add(1, Ordering::Relaxed);
                self.instance = None;
            }
        }
        if self.instance.is_none() {
            self.instance = Some(instantiate(&self.state, &self.record.spec, &self.prepared)?);
        }
        let spec = &self.record.spec;
        let instance = self.instance.as_mut().expect("instance just made");
        instance.store.data_mut().reset_batch();
        instance
            .store
            .set_epoch_deadline(deadline_ticks(spec.limits.batch_time_ms_max));
        let output = instance.store.data().output.clone();
        output.begin_call();
        let started = Instant::now();
        let result = instance.call_batch(topic, messages);
        output.end_call();
        self.shared
            .counters
            .busy_us
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.shared.counters.memory_bytes.store(
            instance.store.data().memory.current_bytes as u64,
            Ordering::Relaxed,
        );
        result.map_err(|e| {
            let text = with_plugin_errors(describe_failure(&e, spec), &output);
            self.instance = None;
            text
        })
    }

    fn commit(&mut self, topic: &Arc<Topic>, handed: &[Handed], outcomes: Vec<Outcome>) {
        let now_ms = self.state.now_ms();
        let group = self.record.spec.group_name();
        let attempts_max = self.limits().delivery_attempts_max;
        let (state_writes, publishes) = match self.instance.as_mut() {
            Some(i) => i.store.data_mut().take_effects(),
            None => Default::default(),
        };
        let published = publishes.len() as u64;
        // Publishes grow the log: below the disk watermark the batch waits,
        // whole, to be handed out again once space returns.
        if published > 0 && self.state.disk.is_low() {
            // The disk watch logged the state once; no warning per batch.
            self.shared
                .note_error("the broker's disk is below disk_free_min; publishes wait for space");
            self.instance = None;
            let retry_ms = crate::core::disk::DISK_FULL_RETRY_AFTER_MS;
            self.wait(Duration::from_millis(retry_ms.into()), false);
            return;
        }
        let mut commit = PluginCommit {
            plugin: self.record.spec.name.clone(),
            incarnation: self.record.incarnation,
            group: group.clone(),
            offsets: Vec::new(),
            state: state_writes,
            publishes: Vec::new(),
            retry_puts: Vec::new(),
            retry_deletes: Vec::new(),
            dead_letters: Vec::new(),
            now_ms,
        };
        match self.group_publishes(publishes, now_ms) {
            Ok(p) => commit.publishes = p,
            Err(error) => return self.retry_later(&error),
        }
        let (mut acked, mut retried, mut dead) = (0u64, 0u64, 0u64);
        let mut new_retries = Vec::new();
        let mut done_retries = Vec::new();
        let mut dlq = None;
        for (h, outcome) in handed.iter().zip(outcomes) {
            let key = (topic.id(), h.partition, h.message.offset);
            if let Origin::Retry = h.origin {
                done_retries.push((h.partition, h.message.offset));
            }
            let reason = match outcome {
                Outcome::Ack => {
                    acked += 1;
                    if let Origin::Retry = h.origin {
                        commit.retry_deletes.push(key);
                    }
                    continue;
                }
                Outcome::Retry(delay_ms) if h.attempt < attempts_max => {
                    retried += 1;
                    let due = now_ms + delay_ms as u64;
                    commit.retry_puts.push((key, (due, h.attempt + 1)));
                    new_retries.push(((due, h.partition, h.message.offset), h.attempt + 1));
                    continue;
                }
                Outcome::Retry(_) => format!(
                    "the plugin asked for a retry after delivery {} of {attempts_max}",
                    h.attempt
                ),
                Outcome::DeadLetter(mut reason) => {
                    truncate(&mut reason, DLQ_REASON_BYTES_MAX);
                    reason
                }
            };
            dead += 1;
            if let Origin::Retry = h.origin {
                commit.retry_deletes.push(key);
            }
            let dlq_topic = match &dlq {
                Some(t) => Arc::clone(t),
                None => match self.dlq_topic(&group) {
                    Ok(t) => {
                        dlq = Some(t.clone());
                        t
                    }
                    Err(e) => return self.retry_later(&e),
                },
            };
            commit
                .dead_letters
                .push((TopicRef::of(&dlq_topic), letter(topic, h, &reason)));
        }
        // Fresh messages are contiguous from the partition's position.
        let fresh_end = handed
            .iter()
            .filter(|h| matches!(h.origin, Origin::Fresh))
            .map(|h| (h.partition, h.message.offset + 1))
            .max_by_key(|(_, end)| *end);
        if let Some((p, end)) = fresh_end {
            commit.offsets.push((topic.id(), p, end));
        }
        match self
            .runtime
            .block_on(self.state.submit(Command::PluginCommit(Box::new(commit))))
        {
            Ok(_) => {}
            Err(e) => return self.commit_failed(&e),
        }
        // Committed: now the in-memory mirror follows.
        if let Some((p, end)) = fresh_end {
            self.positions[p as usize] = end;
            self.shared.positions.lock().expect("positions lock")[p as usize] = end;
        }
        let done: HashSet<(u32, u64)> = done_retries.into_iter().collect();
        self.retries.retain(|k, _| !done.contains(&(k.1, k.2)));
        self.retries.extend(new_retries);
        for h in handed {
            self.failed.remove(&(h.partition, h.message.offset));
        }
        let c = &self.shared.counters;
        c.pending_retries
            .store(self.retries.len() as u64, Ordering::Relaxed);
        c.consecutive_failures.store(0, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.acked.fetch_add(acked, Ordering::Relaxed);
        c.retried.fetch_add(retried, Ordering::Relaxed);
        c.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        c.published.fetch_add(published, Ordering::Relaxed);
        let processed = c
            .processed
            .fetch_add(handed.len() as u64, Ordering::Relaxed)
            + handed.len() as u64;
        let mut samples = self.shared.samples.lock().expect("samples lock");
        let now = Instant::now();
        samples.push_back((now, processed));
        while samples
            .front()
            .is_some_and(|(t, _)| now - *t > Duration::from_millis(RATE_WINDOW_MS * 2))
        {
            samples.pop_front();
        }
    }

    /// Route publishes to partitions and encode them, one append per
    /// (topic, partition).
    #[allow(clippy::type_complexity)]
    fn group_publishes(
        &self,
        publishes: Vec<(String, msmq_protocol::NewMessage)>,
        now_ms: u64,
    ) -> Result<Vec<(TopicRef, Vec<PartitionAppend>)>, String> {
        let mut by_topic: BTreeMap<
            String,
            (Arc<Topic>, BTreeMap<u32, Vec<msmq_protocol::NewMessage>>),
        > = BTreeMap::new();
        for (name, message) in publishes {
            let entry = match by_topic.get_mut(&name) {
                Some(e) => e,
                None => {
                    let topic =
                        self.state.registry.get(&name).ok_or_else(|| {
                            format!("topic {name:?} was deleted while the batch ran")
                        })?;
                    by_topic.entry(name).or_insert((topic, BTreeMap::new()))
                }
            };
            let spread = entry.0.next_spread_partition();
            let p = entry
                .0
                .partition_for_key(message.key.as_ref().map(|k| k.as_slice()), spread);
            entry.1.entry(p).or_default().push(message);
        }
        Ok(by_topic
            .into_values()
            .map(|(topic, parts)| {
                let appends = parts
                    .into_iter()
                    .flat_map(|(p, messages)| {
                        messages
                            .chunks(PUBLISHED_PER_STORED_BATCH_MAX)
                            .map(|chunk| {
                                let records: Vec<&msmq_protocol::NewMessage> =
                                    chunk.iter().collect();
                                PartitionAppend {
                                    partition: p,
                                    count: records.len() as u32,
                                    key_hashes: crate::storage::key_hashes(records.iter().copied()),
                                    value: batch::encode(now_ms, &records),
                                }
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect();
                (TopicRef::of(&topic), appends)
            })
            .collect())
    }

    fn dlq_topic(&self, group: &str) -> Result<Arc<Topic>, String> {
        self.runtime
            .block_on(crate::core::ack::dlq_topic(&self.state, group))
            .map_err(|e| e.to_string())
    }

    /// Storage refused the batch's effects: nothing happened; try again
    /// (or stop, when the plugin was removed meanwhile).
    fn commit_failed(&mut self, error: &WriteError) {
        if let WriteError::PluginGone(_) = error {
            tracing::info!(plugin = %self.name(), "plugin removed; its runner stops without committing its last batch");
            self.shared.request_stop();
            return;
        }
        self.retry_later(&error.to_string());
    }

    /// Something outside the plugin failed; nothing was kept. Wait a little.
    fn retry_later(&mut self, error: &str) {
        tracing::warn!(plugin = %self.name(), error, "committing a plugin batch failed; it will be handed out again");
        self.shared.note_error(error);
        // The instance may hold in-memory results of the lost batch.
        self.instance = None;
        self.wait(Duration::from_millis(FAILURE_BACKOFF_MS_FIRST * 4), false);
    }

    /// A call failed: nothing of it is kept. Count the failure against each
    /// message, dead-letter a lone message that used up its attempts, back
    /// off, and pause the plugin after too many failures in a row.
    fn failed_call(&mut self, topic: &Arc<Topic>, handed: &[Handed], error: String) {
        let c = &self.shared.counters;
        c.failed_batches.fetch_add(1, Ordering::Relaxed);
        let consecutive = c.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.note_error(&error);
        tracing::warn!(plugin = %self.name(), messages = handed.len(), consecutive, error = %error, "plugin call failed; nothing of it was kept");
        if let Some(i) = self.instance.as_mut() {
            i.store.data_mut().reset_batch();
        }
        for h in handed {
            *self
                .failed
                .entry((h.partition, h.message.offset))
                .or_insert(0) += 1;
        }
        if let [lone] = handed {
            if lone.attempt >= self.limits().delivery_attempts_max {
                self.dead_letter_poison(topic, lone, &error);
            }
        }
        let limit = self.limits().failures_before_pause;
        if consecutive >= limit {
            let why = format!("{consecutive} consecutive failed calls; last: {error}");
            tracing::error!(plugin = %self.name(), "plugin paused: {why}");
            match self
                .runtime
                .block_on(self.state.submit(Command::PluginSetPaused {
                    name: self.record.spec.name.clone(),
                    incarnation: self.record.incarnation,
                    paused: Some(why.clone()),
                })) {
                Ok(_) => {
                    self.record.paused = Some(why.clone());
                    self.shared.set_record_paused(Some(why));
                    return;
                }
                Err(e @ WriteError::PluginGone(_)) => return self.commit_failed(&e),
                Err(e) => {
                    tracing::error!(plugin = %self.name(), error = %e, "could not store the pause; backing off");
                }
            }
        }
        let backoff = FAILURE_BACKOFF_MS_FIRST
            .saturating_mul(1 << (consecutive - 1).min(16))
            .min(FAILURE_BACKOFF_MS_MAX);
        self.wait(Duration::from_millis(backoff), false);
    }

    fn dead_letter_poison(&mut self, topic: &Arc<Topic>, h: &Handed, error: &str) {
        let group = self.record.spec.group_name();
        let dlq = match self.dlq_topic(&group) {
            Ok(t) => t,
            Err(e) => return self.retry_later(&e),
        };
        let key = (topic.id(), h.partition, h.message.offset);
        let reason = format!("failed {} deliveries: {error}", h.attempt);
        let letter = letter(topic, h, &reason);
        let fresh = matches!(h.origin, Origin::Fresh);
        let commit = PluginCommit {
            plugin: self.record.spec.name.clone(),
            incarnation: self.record.incarnation,
            group,
            offsets: if fresh {
                vec![(topic.id(), h.partition, h.message.offset + 1)]
            } else {
                vec![]
            },
            state: vec![],
            publishes: vec![],
            retry_puts: vec![],
            retry_deletes: if fresh { vec![] } else { vec![key] },
            dead_letters: vec![(TopicRef::of(&dlq), letter)],
            now_ms: self.state.now_ms(),
        };
        if let Err(e) = self
            .runtime
            .block_on(self.state.submit(Command::PluginCommit(Box::new(commit))))
        {
            return self.commit_failed(&e);
        }
        tracing::warn!(plugin = %self.name(), partition = h.partition, offset = h.message.offset, "poison message dead-lettered: {reason}");
        if fresh {
            self.positions[h.partition as usize] = h.message.offset + 1;
            self.shared.positions.lock().expect("positions lock")[h.partition as usize] =
                h.message.offset + 1;
        } else {
            self.retries
                .retain(|k, _| !(k.1 == h.partition && k.2 == h.message.offset));
        }
        self.failed.remove(&(h.partition, h.message.offset));
        let c = &self.shared.counters;
        c.dead_lettered.fetch_add(1, Ordering::Relaxed);
        c.processed.fetch_add(1, Ordering::Relaxed);
        c.pending_retries
            .store(self.retries.len() as u64, Ordering::Relaxed);
    }
}

/// The dead letter of a handed-out message.
fn letter(topic: &Topic, h: &Handed, reason: &str) -> msmq_protocol::NewMessage {
    crate::core::ack::dead_letter(
        h.message.clone(),
        reason,
        &topic.name,
        h.partition,
        h.attempt,
    )
}

/// Cut `text` to at most `max` bytes at a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}
