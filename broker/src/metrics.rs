//! Prometheus metrics, served as text at `/metrics` on the HTTP port.
//!
//! Owns: the process-wide metric registry. Hot paths bump counters and
//! histograms (atomic adds); figures that already live elsewhere (backlog
//! and lag, pending transactions, plugin counters) are read when scraped.
//! Every name starts with `msmq_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::{Mutex, OnceLock};

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Mutex<Registry>,
    pub produced_messages: Counter,
    pub produced_bytes: Counter,
    pub produce_seconds: Histogram,
    pub consumed_messages: Counter,
    pub consumed_bytes: Counter,
    pub commit_requests: Histogram,
    pub commit_bytes: Histogram,
    pub commit_seconds: Histogram,
    pub retries: Counter,
    pub dead_letters: Counter,
    pub sequenced_repeats: Counter,
    pub transaction_checks: Counter,
    pub retention_removed_messages: Counter,
    pub segment_written_bytes: Counter,
    pub segment_syncs: Counter,
    pub storage_errors: Counter,
    pub storage_recovering: Gauge,
    backlog: Family<Labels, Gauge>,
    lag: Family<Labels, Gauge>,
    transactions_pending: Gauge,
    connections_open: Gauge,
    disk_free_bytes: Gauge,
    disk_low: Gauge,
    request_memory_reserved: Gauge,
    request_memory_budget: Gauge,
    request_memory_waiting: Gauge,
    plugin_processed: Family<Labels, Counter>,
    plugin_failed_batches: Family<Labels, Counter>,
    plugin_dead_letters: Family<Labels, Counter>,
    plugin_throttled_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    plugin_busy_seconds: Family<Labels, Counter<f64, std::sync::atomic::AtomicU64>>,
    plugin_memory_bytes: Family<Labels, Gauge>,
    plugin_lag: Family<Labels, Gauge>,
    plugin_paused: Family<Labels, Gauge>,
    client_limits: Family<Labels, Counter>,
    process_cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    process_disk_written_bytes: Counter,
    process_written_bytes: Counter,
    process_resident_bytes: Gauge,
    process_resident_peak_bytes: Gauge,
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("msmq")),
            produced_messages: Counter::default(),
            produced_bytes: Counter::default(),
            produce_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            consumed_messages: Counter::default(),
            consumed_bytes: Counter::default(),
            commit_requests: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            commit_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 12)),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            retries: Counter::default(),
            dead_letters: Counter::default(),
            sequenced_repeats: Counter::default(),
            transaction_checks: Counter::default(),
            retention_removed_messages: Counter::default(),
            segment_written_bytes: Counter::default(),
            segment_syncs: Counter::default(),
            storage_errors: Counter::default(),
            storage_recovering: Gauge::default(),
            backlog: Family::default(),
            lag: Family::default(),
            transactions_pending: Gauge::default(),
            connections_open: Gauge::default(),
            disk_free_bytes: Gauge::default(),
            disk_low: Gauge::default(),
            request_memory_reserved: Gauge::default(),
            request_memory_budget: Gauge::default(),
            request_memory_waiting: Gauge::default(),
            plugin_processed: Family::default(),
            plugin_failed_batches: Family::default(),
            plugin_dead_letters: Family::default(),
            plugin_throttled_seconds: Family::default(),
            plugin_busy_seconds: Family::default(),
            plugin_memory_bytes: Family::default(),
            plugin_lag: Family::default(),
            plugin_paused: Family::default(),
            client_limits: Family::default(),
            process_cpu_seconds: Counter::default(),
            process_disk_written_bytes: Counter::default(),
            process_written_bytes: Counter::default(),
            process_resident_bytes: Gauge::default(),
            process_resident_peak_bytes: Gauge::default(),
        };
        {
            let mut r = m.registry.lock().expect("registry lock");
            r.register(
                "produced_messages",
                "Messages acknowledged to producers",
                m.produced_messages.clone(),
            );
            r.register(
                "produced_bytes",
                "Bytes of messages acknowledged to producers",
                m.produced_bytes.clone(),
            );
            r.register(
                "produce_latency_seconds",
                "Produce requests, receipt to acknowledgement",
                m.produce_seconds.clone(),
            );
            r.register(
                "consumed_messages",
                "Messages handed to consumers (fetch, poll, receive)",
                m.consumed_messages.clone(),
            );
            r.register(
                "consumed_bytes",
                "Payload bytes handed to consumers",
                m.consumed_bytes.clone(),
            );
            r.register(
                "commit_batch_requests",
                "Requests per storage group commit",
                m.commit_requests.clone(),
            );
            r.register(
                "commit_batch_bytes",
                "Bytes per storage group commit",
                m.commit_bytes.clone(),
            );
            r.register(
                "commit_seconds",
                "Time of one storage group commit, fsync included",
                m.commit_seconds.clone(),
            );
            r.register(
                "retries",
                "Messages scheduled for another delivery (per-message acks and plugins)",
                m.retries.clone(),
            );
            r.register(
                "dead_letters",
                "Messages moved to a dead-letter topic",
                m.dead_letters.clone(),
            );
            r.register(
                "sequenced_repeats",
                "Sequenced requests sent again by idempotent producers and answered with their stored reply, storing nothing",
                m.sequenced_repeats.clone(),
            );
            r.register(
                "transaction_checks",
                "Transaction check-backs sent to producers",
                m.transaction_checks.clone(),
            );
            r.register(
                "client_limit_hits",
                "Clients held to a limit: rate (request refused), cut_off (connection \
                 closed for not backing off), banned (connection refused after a cut-off), \
                 connections (connection refused at connections_per_principal_max), \
                 address_connections (at unauthenticated_connections_per_address_max), \
                 broker_connections (at connections_max)",
                m.client_limits.clone(),
            );
            r.register(
                "retention_removed_messages",
                "Messages removed by retention",
                m.retention_removed_messages.clone(),
            );
            r.register(
                "storage_errors",
                "Storage commits that failed (their requests were refused with STORAGE_ERROR)",
                m.storage_errors.clone(),
            );
            r.register(
                "storage_recovering",
                "1 while the database is being reopened after an I/O error (writes refused)",
                m.storage_recovering.clone(),
            );
            r.register(
                "process_cpu_seconds",
                "CPU time of the broker process, user and system",
                m.process_cpu_seconds.clone(),
            );
            r.register(
                "process_disk_written_bytes",
                "Bytes the broker process caused to be written to storage (Linux write_bytes)",
                m.process_disk_written_bytes.clone(),
            );
            r.register(
                "process_written_bytes",
                "Bytes the broker process passed to write calls (Linux wchar)",
                m.process_written_bytes.clone(),
            );
            r.register(
                "process_resident_bytes",
                "Resident memory of the broker process",
                m.process_resident_bytes.clone(),
            );
            r.register(
                "process_resident_peak_bytes",
                "Peak resident memory of the broker process",
                m.process_resident_peak_bytes.clone(),
            );
            r.register(
                "segment_written_bytes",
                "Batch bytes written to segment files",
                m.segment_written_bytes.clone(),
            );
            r.register(
                "segment_syncs",
                "Segment file fdatasyncs made before index commits",
                m.segment_syncs.clone(),
            );
            r.register(
                "partition_backlog_messages",
                "Messages of a partition its slowest group has not consumed",
                m.backlog.clone(),
            );
            r.register(
                "group_lag_messages",
                "Messages of a partition a group has not consumed",
                m.lag.clone(),
            );
            r.register(
                "transactions_pending",
                "Half messages waiting for commit or rollback",
                m.transactions_pending.clone(),
            );
            r.register(
                "connections_open",
                "Client connections open (limit: connections_max)",
                m.connections_open.clone(),
            );
            r.register(
                "disk_free_bytes",
                "Free bytes of the data directory's filesystem, as last measured",
                m.disk_free_bytes.clone(),
            );
            r.register(
                "disk_low",
                "1 while free disk space is below disk_free_min (produces refused with DISK_FULL)",
                m.disk_low.clone(),
            );
            r.register(
                "request_memory_reserved_bytes",
                "Request bytes reserved in memory now, broker-wide",
                m.request_memory_reserved.clone(),
            );
            r.register(
                "request_memory_budget_bytes",
                "The request memory budget (request_memory_max)",
                m.request_memory_budget.clone(),
            );
            r.register(
                "request_memory_waiting_streams",
                "Request streams left unread until their frame fits the budget or their principal's share",
                m.request_memory_waiting.clone(),
            );
            r.register(
                "plugin_processed_messages",
                "Messages whose plugin outcome was committed",
                m.plugin_processed.clone(),
            );
            r.register(
                "plugin_failed_batches",
                "Plugin calls that failed (trap, timeout, memory)",
                m.plugin_failed_batches.clone(),
            );
            r.register(
                "plugin_dead_letters",
                "Messages a plugin dead-lettered",
                m.plugin_dead_letters.clone(),
            );
            r.register(
                "plugin_throttled_seconds",
                "Time a plugin waited for its quota",
                m.plugin_throttled_seconds.clone(),
            );
            r.register(
                "plugin_busy_seconds",
                "Time spent inside plugin calls (CPU)",
                m.plugin_busy_seconds.clone(),
            );
            r.register(
                "plugin_memory_bytes",
                "Linear memory of a plugin instance",
                m.plugin_memory_bytes.clone(),
            );
            r.register(
                "plugin_lag_messages",
                "Messages waiting for a plugin",
                m.plugin_lag.clone(),
            );
            r.register(
                "plugin_paused",
                "1 when the plugin is paused",
                m.plugin_paused.clone(),
            );
        }
        m
    }

    /// Count one hit of a client limit (`rate`, `cut_off`, `banned`,
    /// `connections`, `address_connections`, `broker_connections`,
    /// `request_memory` for a frame larger than any reservation,
    /// `abandoned_frames` for a connection closed for unused credit).
    pub fn client_limit(&self, limit: &str) {
        self.client_limits
            .get_or_create(&vec![("limit".to_string(), limit.to_string())])
            .inc();
    }

    /// The metrics as Prometheus text, with scrape-time figures refreshed.
    pub fn render(&self, figures: &ScrapeFigures) -> String {
        self.refresh(figures);
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry lock");
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }

    fn refresh(&self, f: &ScrapeFigures) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let process = ProcessFigures::now();
        bump_f(&self.process_cpu_seconds, process.cpu_seconds);
        bump(&self.process_disk_written_bytes, process.disk_written_bytes);
        bump(&self.process_written_bytes, process.written_bytes);
        self.process_resident_bytes
            .set(gauge(process.resident_bytes));
        self.process_resident_peak_bytes
            .set(gauge(process.resident_peak_bytes));
        self.connections_open.set(i64::from(f.connections_open));
        self.request_memory_reserved
            .set(gauge(f.request_memory_reserved));
        self.request_memory_budget
            .set(gauge(f.request_memory_budget));
        self.request_memory_waiting
            .set(gauge(f.request_memory_waiting));
        self.disk_free_bytes.set(gauge(f.disk_free_bytes));
        self.disk_low.set(i64::from(f.disk_low));
        self.backlog.clear();
        self.lag.clear();
        for (topic, partition, backlog) in &f.backlog {
            let labels = vec![
                ("topic".to_string(), topic.clone()),
                ("partition".to_string(), partition.to_string()),
            ];
            self.backlog.get_or_create(&labels).set(gauge(*backlog));
        }
        for (group, topic, partition, lag) in &f.lag {
            let labels = vec![
                ("group".to_string(), group.clone()),
                ("topic".to_string(), topic.clone()),
                ("partition".to_string(), partition.to_string()),
            ];
            self.lag.get_or_create(&labels).set(gauge(*lag));
        }
        self.transactions_pending.set(gauge(f.transactions_pending));
        for (name, s) in &f.plugins {
            let l = vec![("plugin".to_string(), name.clone())];
            bump(&self.plugin_processed.get_or_create(&l), s.processed);
            bump(
                &self.plugin_failed_batches.get_or_create(&l),
                s.failed_batches,
            );
            bump(&self.plugin_dead_letters.get_or_create(&l), s.dead_lettered);
            bump_f(
                &self.plugin_throttled_seconds.get_or_create(&l),
                s.throttled_ms as f64 / 1000.0,
            );
            bump_f(
                &self.plugin_busy_seconds.get_or_create(&l),
                s.busy_ms as f64 / 1000.0,
            );
            self.plugin_memory_bytes
                .get_or_create(&l)
                .set(gauge(s.memory_bytes));
            self.plugin_lag.get_or_create(&l).set(gauge(s.lag));
            self.plugin_paused
                .get_or_create(&l)
                .set(i64::from(s.status.starts_with("paused")));
        }
    }
}

/// What the operating system says about this process (0 where it says
/// nothing: the I/O and resident figures come from Linux's `/proc`).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessFigures {
    pub cpu_seconds: f64,
    /// Bytes sent to the storage layer (`write_bytes`).
    pub disk_written_bytes: u64,
    /// Bytes passed to write calls (`wchar`).
    pub written_bytes: u64,
    pub resident_bytes: u64,
    pub resident_peak_bytes: u64,
}

impl ProcessFigures {
    pub fn now() -> ProcessFigures {
        let mut figures = ProcessFigures::default();
        // SAFETY: getrusage fills the struct it is given and reads nothing else.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
            let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            figures.cpu_seconds = seconds(usage.ru_utime) + seconds(usage.ru_stime);
            // Linux reports KiB.
            figures.resident_peak_bytes = (usage.ru_maxrss as u64).saturating_mul(1024);
        }
        if let Ok(io) = std::fs::read_to_string("/proc/self/io") {
            for line in io.lines() {
                let mut parts = line.split(':');
                let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let value = value.trim().parse().unwrap_or(0);
                match name {
                    "write_bytes" => figures.disk_written_bytes = value,
                    "wchar" => figures.written_bytes = value,
                    _ => {}
                }
            }
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            // SAFETY: sysconf only reads a constant of the system.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
            let pages: u64 = statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            figures.resident_bytes = pages * page;
        }
        figures
    }
}

/// Figures that live elsewhere, gathered when `/metrics` is scraped.
#[derive(Debug, Default)]
pub struct ScrapeFigures {
    pub connections_open: u32,
    pub request_memory_reserved: u64,
    pub request_memory_budget: u64,
    pub request_memory_waiting: u64,
    pub disk_free_bytes: u64,
    pub disk_low: bool,
    /// (topic, partition, messages not yet trimmed).
    pub backlog: Vec<(String, u32, u64)>,
    /// (group, topic, partition, messages behind the end).
    pub lag: Vec<(String, String, u32, u64)>,
    pub transactions_pending: u64,
    pub plugins: Vec<(String, msmq_protocol::PluginStats)>,
}

/// The process-wide metrics as the store's observer.
pub fn storage_observer() -> std::sync::Arc<dyn crate::storage::StorageObserver> {
    std::sync::Arc::new(GlobalMetrics)
}

struct GlobalMetrics;

impl crate::storage::StorageObserver for GlobalMetrics {
    fn group_committed(&self, requests: usize, bytes: usize, elapsed: std::time::Duration) {
        let m = global();
        m.commit_requests.observe(requests as f64);
        m.commit_bytes.observe(bytes as f64);
        m.commit_seconds.observe(elapsed.as_secs_f64());
    }

    fn settled(&self, dead_letters: u64, retries: u64) {
        let m = global();
        m.dead_letters.inc_by(dead_letters);
        m.retries.inc_by(retries);
    }

    fn commit_failed(&self) {
        global().storage_errors.inc();
    }

    fn recovering(&self, recovering: bool) {
        global().storage_recovering.set(i64::from(recovering));
    }

    fn segments_written(&self, bytes: u64) {
        global().segment_written_bytes.inc_by(bytes);
    }
    fn segments_synced(&self, files: usize) {
        global().segment_syncs.inc_by(files as u64);
    }
}

/// Count what a successful reply carried: produced or consumed messages.
pub fn observe_reply(
    reply: &msmq_protocol::Reply,
    produced_bytes: Option<u64>,
    started: std::time::Instant,
) {
    use msmq_protocol::Reply;
    let m = global();
    let consumed = |messages: &mut dyn Iterator<Item = &msmq_protocol::Message>| {
        let (mut count, mut bytes) = (0u64, 0u64);
        for message in messages {
            count += 1;
            bytes += message.payload.len() as u64;
        }
        m.consumed_messages.inc_by(count);
        m.consumed_bytes.inc_by(bytes);
    };
    match reply {
        Reply::Produced(acks) => {
            m.produced_messages.inc_by(acks.len() as u64);
            m.produced_bytes.inc_by(produced_bytes.unwrap_or(0));
            m.produce_seconds.observe(started.elapsed().as_secs_f64());
        }
        Reply::Fetched(f) => consumed(&mut f.messages.iter()),
        Reply::Polled(p) => consumed(&mut p.batches.iter().flat_map(|b| b.messages.iter())),
        Reply::Received { batches, .. } => consumed(
            &mut batches
                .iter()
                .flat_map(|b| b.messages.iter().map(|l| &l.message)),
        ),
        _ => {}
    }
}

/// Raise a counter to a total kept elsewhere.
fn bump(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

fn bump_f(counter: &Counter<f64, std::sync::atomic::AtomicU64>, total: f64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}
