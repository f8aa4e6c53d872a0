//! Broker configuration: defaults that work with no file, a commented TOML
//! file with human units ("64 MiB", "30s"), `MSMQ_*` environment variables
//! and command-line flags, in rising order of precedence.
//!
//! Every limit is a named field with its unit in the name; `validate` rejects
//! values the broker cannot run with, with a message that says which key.

use crate::storage::Durability;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bounds of `in_flight_bytes_per_connection_max`: at least one small
/// request, at most what a semaphore counts in one acquisition.
const IN_FLIGHT_BYTES_MIN: u64 = 4096;
const IN_FLIGHT_BYTES_MAX: u64 = u32::MAX as u64;
/// Bounds of `request_memory_max` and `request_memory_per_principal_max`:
/// at least one small request; at most what fits a semaphore on any target.
const REQUEST_MEMORY_BYTES_MIN: u64 = 4096;
const REQUEST_MEMORY_BYTES_MAX: u64 = 1 << 40;
/// Shortest `disk_check_interval`: statvfs is cheap, but not free.
pub const DISK_CHECK_INTERVAL_MIN: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Require a token on every connection (`msmq token create`); the admin
    /// token is written to `<data_dir>/admin.token` at first start.
    pub auth: bool,
    /// Serve clients without a token on a non-loopback address (refused
    /// otherwise, so a broker is never open to a network by accident).
    pub allow_anonymous: bool,
    /// HTTP address for `/metrics`, or `off`.
    pub http: String,
    /// Directory for the database and the generated TLS certificate.
    pub data_dir: PathBuf,
    /// PEM certificate chain to serve instead of the generated one.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) for mutual TLS: a client certificate signed by
    /// one of them authenticates its common name as the principal.
    pub tls_client_ca: Option<PathBuf>,
    /// `immediate` (fsync before acknowledging) or `none`.
    pub durability: Durability,
    /// Largest message (payload + key + tag + headers).
    pub message_bytes_max: ByteSize,
    /// Largest produce request, all messages together.
    pub batch_bytes_max: ByteSize,
    /// Most messages in one produce request.
    pub batch_messages_max: u32,
    /// Most partitions a topic may have.
    pub partitions_max: u32,
    /// Longest long-poll wait a client may ask for.
    #[serde(with = "humantime_serde")]
    pub fetch_wait_max: Duration,
    /// Most payload bytes one fetch or poll returns.
    pub fetch_bytes_max: ByteSize,
    /// Most messages one fetch or poll returns.
    pub fetch_messages_max: u32,
    /// redb page cache size.
    pub cache_bytes: ByteSize,
    /// Most bytes the writer puts into one transaction.
    pub commit_bytes_max: ByteSize,
    /// How often group members are checked for expired sessions.
    #[serde(with = "humantime_serde")]
    pub session_check_interval: Duration,
    /// Most messages a partition may hold that its slowest consumer group has
    /// not consumed (all stored messages if no group committed); past it
    /// producers get `BACKLOG_FULL`. 0: no limit.
    pub backlog_messages_max: u64,
    /// Furthest in the future a message may be scheduled for delivery.
    #[serde(with = "humantime_serde")]
    pub schedule_delay_max: Duration,
    /// A half message unresolved this long is checked back with its producer group.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Time between check-backs of a transaction still unknown.
    #[serde(with = "humantime_serde")]
    pub transaction_check_interval: Duration,
    /// Checks without an answer before the transaction is rolled back and discarded.
    pub transaction_check_max: u32,
    /// Most check-backs sent per second (a recovering broker must not storm its producers).
    pub transaction_checks_per_sec_max: u32,
    /// How long a check-back waits for the producer's answer.
    #[serde(with = "humantime_serde")]
    pub transaction_check_reply_timeout: Duration,
    /// How long a resolved transaction's outcome is kept to answer repeated
    /// or conflicting commit/rollback requests consistently.
    #[serde(with = "humantime_serde")]
    pub transaction_outcome_retention: Duration,
    /// Most idempotent producer ids the broker holds at once; past it
    /// `InitProducer` answers `PRODUCERS_FULL` until idle ones expire.
    pub producers_max: u32,
    /// An idempotent producer id unused this long is forgotten: its next
    /// sequenced request gets `UNKNOWN_PRODUCER`.
    #[serde(with = "humantime_serde")]
    pub producer_idle_expiry: Duration,
    /// How long shutdown waits for in-flight requests.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a topic keeps messages unless it sets its own retention
    /// (`0s`: forever). Whole batches older than this are removed.
    #[serde(with = "humantime_serde")]
    pub retention_default: Duration,
    /// How many bytes each partition of a topic keeps unless the topic sets
    /// its own (0: no size limit). The oldest whole batches go first.
    pub retention_bytes_default: ByteSize,
    /// How often retention looks for expired batches.
    #[serde(with = "humantime_serde")]
    pub retention_check_interval: Duration,
    /// Largest a log segment file grows before the partition starts a new
    /// one. Topics with a retention roll sooner, 8 times per retention.
    pub segment_bytes_max: ByteSize,
    /// Longest a partition appends to one segment file.
    #[serde(with = "humantime_serde")]
    pub segment_age_max: Duration,
    /// Zero-fill the next segment file ahead of time while the write path
    /// is latency-bound (a producer waiting on each commit), so a commit's
    /// fdatasync flushes data and no file-system metadata: about 40% less
    /// sync time per commit on ext4, for a second write of those files.
    pub segment_prefill: bool,
    /// Least free space the data directory's filesystem keeps: below it,
    /// produces and half messages are refused with `DISK_FULL` (retryable)
    /// while consumers, commits, joins and deletes go on in the reserve.
    /// 0: never refuse.
    pub disk_free_min: ByteSize,
    /// How often the free space is measured; producers are served again
    /// within this long of space returning.
    #[serde(with = "humantime_serde")]
    pub disk_check_interval: Duration,
    /// Most connections the broker holds open at once, whoever opened them.
    pub connections_max: u32,
    /// Most connections one principal (a token or a client certificate) may
    /// have open.
    pub connections_per_principal_max: u32,
    /// Most connections one remote address may have open that did not
    /// authenticate (an IPv6 host counts by its /64). On a broker without
    /// `--auth` this is the limit of every client host.
    pub unauthenticated_connections_per_address_max: u32,
    /// Most requests (streams) one connection may have open at once.
    pub streams_per_connection_max: u32,
    /// Most requests one connection may send per second (bursts of one
    /// second's worth pass); more are answered `RATE_LIMITED`.
    pub requests_per_sec_per_connection_max: u32,
    /// Most requests per second of all connections of one principal together
    /// (unauthenticated ones: of one address); more are answered `RATE_LIMITED`.
    pub requests_per_sec_per_principal_max: u32,
    /// A connection refused this many times while it was told to wait is
    /// closed with the reason: it is not backing off. At least twice
    /// `streams_per_connection_max`.
    pub refused_requests_before_cutoff: u32,
    /// After a connection is cut off, new connections of its principal (or
    /// address) are refused for this long.
    #[serde(with = "humantime_serde")]
    pub cutoff_ban: Duration,
    /// Most request bytes one connection may have received but not yet
    /// answered; further requests wait (QUIC flow control slows the sender).
    pub in_flight_bytes_per_connection_max: ByteSize,
    /// How long a request stream may take to deliver its whole frame.
    #[serde(with = "humantime_serde")]
    pub request_read_timeout: Duration,
    /// Most request bytes the whole broker holds in memory at once: a frame
    /// is read only once its length is reserved here; until then its stream
    /// is not read and QUIC flow control holds the sender back.
    pub request_memory_max: ByteSize,
    /// Most of `request_memory_max` one principal (unauthenticated: one
    /// address) may hold, so one client cannot take all of it. A frame
    /// longer than this is refused with `FRAME_TOO_LARGE`.
    pub request_memory_per_principal_max: ByteSize,
    /// Largest plugin component a deploy accepts.
    pub plugin_component_bytes_max: ByteSize,
    /// A directory watched for plugins: `NAME.wasm` with a `NAME.toml`
    /// manifest beside it is deployed, replaced or removed as the files are.
    pub plugin_dir: Option<PathBuf>,
    /// Append every applied command to this file, in commit order, so the
    /// store can be rebuilt with `msmq admin replay` (tests, debugging;
    /// it grows without bound and is not fsynced).
    pub record_commands: Option<PathBuf>,
    /// Log filter (`info`, `msmq_broker=debug`, …); `RUST_LOG` wins.
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], msmq_protocol::DEFAULT_PORT)),
            auth: false,
            allow_anonymous: false,
            http: "127.0.0.1:7172".into(),
            data_dir: PathBuf::from("msmq-data"),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            durability: Durability::Immediate,
            message_bytes_max: ByteSize::mib(4),
            batch_bytes_max: ByteSize::mib(16),
            batch_messages_max: 10_000,
            partitions_max: 1024,
            fetch_wait_max: Duration::from_secs(30),
            fetch_bytes_max: ByteSize::mib(16),
            fetch_messages_max: 10_000,
            cache_bytes: ByteSize::mib(64),
            commit_bytes_max: ByteSize::mib(64),
            session_check_interval: Duration::from_millis(250),
            backlog_messages_max: 0,
            schedule_delay_max: Duration::from_secs(40 * 24 * 3600),
            transaction_timeout: Duration::from_secs(6),
            transaction_check_interval: Duration::from_secs(30),
            transaction_check_max: 15,
            transaction_checks_per_sec_max: 2000,
            transaction_check_reply_timeout: Duration::from_secs(5),
            transaction_outcome_retention: Duration::from_secs(3600),
            producers_max: 100_000,
            producer_idle_expiry: Duration::from_secs(24 * 3600),
            shutdown_grace: Duration::from_secs(10),
            retention_default: Duration::from_secs(72 * 3600),
            retention_bytes_default: ByteSize(0),
            retention_check_interval: Duration::from_secs(1),
            segment_bytes_max: ByteSize(256 << 20),
            segment_age_max: Duration::from_secs(3600),
            segment_prefill: true,
            disk_free_min: ByteSize::mib(256),
            disk_check_interval: Duration::from_secs(1),
            connections_max: 10_000,
            connections_per_principal_max: 256,
            unauthenticated_connections_per_address_max: 256,
            streams_per_connection_max: msmq_client::transport::STREAMS_PER_CONNECTION_MAX,
            requests_per_sec_per_connection_max: 20_000,
            requests_per_sec_per_principal_max: 100_000,
            refused_requests_before_cutoff: 4_096,
            cutoff_ban: Duration::from_secs(10),
            in_flight_bytes_per_connection_max: ByteSize::mib(64),
            request_read_timeout: Duration::from_secs(30),
            request_memory_max: ByteSize::mib(512),
            request_memory_per_principal_max: ByteSize::mib(64),
            plugin_component_bytes_max: ByteSize::mib(32),
            plugin_dir: None,
            record_commands: None,
            log: "info".into(),
        }
    }
}

impl Config {
    /// Read a TOML file; keys it does not set keep their defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// Reject settings the broker cannot run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        let frame_max = msmq_protocol::FRAME_BYTES_MAX as u64;
        anyhow::ensure!(
            self.message_bytes_max.as_u64() >= 1,
            "message_bytes_max must be at least 1 byte"
        );
        anyhow::ensure!(
            self.batch_bytes_max >= self.message_bytes_max,
            "batch_bytes_max ({}) must be at least message_bytes_max ({})",
            self.batch_bytes_max,
            self.message_bytes_max
        );
        anyhow::ensure!(
            self.batch_bytes_max.as_u64() <= frame_max / 2,
            "batch_bytes_max must be at most {} (half the protocol frame limit)",
            ByteSize(frame_max / 2)
        );
        anyhow::ensure!(
            self.fetch_bytes_max.as_u64() <= frame_max / 2,
            "fetch_bytes_max must be at most {}",
            ByteSize(frame_max / 2)
        );
        anyhow::ensure!(
            self.batch_messages_max >= 1,
            "batch_messages_max must be at least 1"
        );
        anyhow::ensure!(
            self.fetch_messages_max >= 1,
            "fetch_messages_max must be at least 1"
        );
        anyhow::ensure!(
            (1..=65_536).contains(&self.partitions_max),
            "partitions_max must be between 1 and 65536"
        );
        anyhow::ensure!(
            self.session_check_interval >= Duration::from_millis(10),
            "session_check_interval must be at least 10ms"
        );
        anyhow::ensure!(
            self.transaction_check_interval >= Duration::from_millis(10),
            "transaction_check_interval must be at least 10ms"
        );
        anyhow::ensure!(self.producers_max >= 1, "producers_max must be at least 1");
        anyhow::ensure!(
            self.producer_idle_expiry >= Duration::from_secs(1),
            "producer_idle_expiry must be at least 1s"
        );
        anyhow::ensure!(
            self.transaction_check_max >= 1,
            "transaction_check_max must be at least 1"
        );
        anyhow::ensure!(
            self.transaction_checks_per_sec_max >= 1,
            "transaction_checks_per_sec_max must be at least 1"
        );
        anyhow::ensure!(
            self.transaction_check_reply_timeout >= Duration::from_millis(10),
            "transaction_check_reply_timeout must be at least 10ms"
        );
        self.http_addr()?;
        anyhow::ensure!(
            self.auth || self.allow_anonymous || self.listen.ip().is_loopback(),
            "listening on {} without authentication would let anyone on the network in: \
             turn it on with --auth (auth = true), or accept anonymous clients with \
             --allow-anonymous (allow_anonymous = true)",
            self.listen
        );
        if let Some(http) = self.http_addr()? {
            anyhow::ensure!(
                self.auth || self.allow_anonymous || http.ip().is_loopback(),
                "serving the HTTP port (metrics and console) on {http} without authentication \
                 would let anyone on the network pause and deploy plugins: turn it on with \
                 --auth, accept that with --allow-anonymous, or keep --http on loopback",
            );
        }
        anyhow::ensure!(
            u64::from(self.refused_requests_before_cutoff)
                >= 2 * u64::from(self.streams_per_connection_max),
            "refused_requests_before_cutoff ({}) must be at least twice streams_per_connection_max \
             ({}): a client that waits as told may still have that many requests refused, those \
             in flight and those it sent before the first refusal reached it",
            self.refused_requests_before_cutoff,
            self.streams_per_connection_max
        );
        anyhow::ensure!(
            self.retention_check_interval >= Duration::from_millis(10),
            "retention_check_interval must be at least 10ms"
        );
        anyhow::ensure!(
            self.segment_bytes_max >= self.batch_bytes_max,
            "segment_bytes_max ({}) must be at least batch_bytes_max ({})",
            self.segment_bytes_max,
            self.batch_bytes_max
        );
        anyhow::ensure!(
            self.segment_age_max >= crate::storage::segments::SEGMENT_AGE_MIN,
            "segment_age_max must be at least {:?}",
            crate::storage::segments::SEGMENT_AGE_MIN
        );
        anyhow::ensure!(
            self.disk_check_interval >= DISK_CHECK_INTERVAL_MIN,
            "disk_check_interval must be at least {DISK_CHECK_INTERVAL_MIN:?}"
        );
        for (key, value) in [
            ("connections_max", self.connections_max),
            (
                "connections_per_principal_max",
                self.connections_per_principal_max,
            ),
            (
                "unauthenticated_connections_per_address_max",
                self.unauthenticated_connections_per_address_max,
            ),
            (
                "streams_per_connection_max",
                self.streams_per_connection_max,
            ),
            (
                "requests_per_sec_per_connection_max",
                self.requests_per_sec_per_connection_max,
            ),
            (
                "requests_per_sec_per_principal_max",
                self.requests_per_sec_per_principal_max,
            ),
        ] {
            anyhow::ensure!(value >= 1, "{key} must be at least 1");
        }
        anyhow::ensure!(
            (IN_FLIGHT_BYTES_MIN..=IN_FLIGHT_BYTES_MAX)
                .contains(&self.in_flight_bytes_per_connection_max.as_u64()),
            "in_flight_bytes_per_connection_max must be between {} and {}",
            ByteSize(IN_FLIGHT_BYTES_MIN),
            ByteSize(IN_FLIGHT_BYTES_MAX)
        );
        anyhow::ensure!(
            (REQUEST_MEMORY_BYTES_MIN..=REQUEST_MEMORY_BYTES_MAX)
                .contains(&self.request_memory_max.as_u64()),
            "request_memory_max must be between {} and {}",
            ByteSize(REQUEST_MEMORY_BYTES_MIN),
            ByteSize(REQUEST_MEMORY_BYTES_MAX)
        );
        anyhow::ensure!(
            (REQUEST_MEMORY_BYTES_MIN..=self.request_memory_max.as_u64())
                .contains(&self.request_memory_per_principal_max.as_u64()),
            "request_memory_per_principal_max must be between {} and request_memory_max ({})",
            ByteSize(REQUEST_MEMORY_BYTES_MIN),
            self.request_memory_max
        );
        anyhow::ensure!(
            self.request_read_timeout >= Duration::from_millis(10),
            "request_read_timeout must be at least 10ms"
        );
        anyhow::ensure!(
            self.plugin_component_bytes_max.as_u64() <= frame_max / 2,
            "plugin_component_bytes_max must be at most {}",
            ByteSize(frame_max / 2)
        );
        anyhow::ensure!(
            self.tls_cert.is_some() == self.tls_key.is_some(),
            "tls_cert and tls_key must be given together"
        );
        Ok(())
    }

    /// The HTTP listen address; `None` when `http = "off"`.
    pub fn http_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        if self.http == "off" {
            return Ok(None);
        }
        self.http.parse().map(Some).map_err(|e| {
            anyhow::anyhow!(
                "http must be host:port or \"off\", not {:?}: {e}",
                self.http
            )
        })
    }

    /// The commented default configuration, for `msmq config`.
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Config::default()).expect("default config serialises");
        format!(
            "# MSMQ broker configuration. Every key is optional; shown are the defaults.\n\
             # Each key can also be set by an MSMQ_<KEY> environment variable or a --<key> flag.\n\
             # Sizes take units (\"4 MiB\"), durations too (\"30s\", \"250ms\").\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_round_trip_through_toml() {
        let c = Config::default();
        c.validate().unwrap();
        let back: Config = toml::from_str(&Config::default_toml()).unwrap();
        assert_eq!(back.listen, c.listen);
        assert_eq!(back.message_bytes_max, ByteSize::mib(4));
    }

    #[test]
    fn human_units_and_unknown_keys() {
        let c: Config = toml::from_str(
            "message_bytes_max = \"1 MiB\"\nfetch_wait_max = \"2s\"\ndurability = \"none\"",
        )
        .unwrap();
        assert_eq!(c.message_bytes_max.as_u64(), 1024 * 1024);
        assert_eq!(c.fetch_wait_max, Duration::from_secs(2));
        assert_eq!(c.durability, Durability::None);
        assert!(toml::from_str::<Config>("no_such_key = 1").is_err());
    }

    #[test]
    fn limits_at_and_past_their_bounds() {
        let mut c = Config {
            partitions_max: 65_536,
            ..Config::default()
        };
        c.validate().unwrap();
        c.partitions_max = 65_537;
        assert!(c.validate().is_err());
        let mut c = Config {
            batch_bytes_max: ByteSize::mib(32),
            ..Config::default()
        };
        c.validate().unwrap();
        c.batch_bytes_max = ByteSize::b(32 * 1024 * 1024 + 1);
        assert!(c.validate().is_err());
        let mut c = Config {
            in_flight_bytes_per_connection_max: ByteSize(IN_FLIGHT_BYTES_MAX),
            requests_per_sec_per_connection_max: 1,
            ..Config::default()
        };
        c.validate().unwrap();
        c.in_flight_bytes_per_connection_max = ByteSize(IN_FLIGHT_BYTES_MAX + 1);
        assert!(c.validate().is_err());
        c.in_flight_bytes_per_connection_max = ByteSize(IN_FLIGHT_BYTES_MIN);
        c.validate().unwrap();
        c.in_flight_bytes_per_connection_max = ByteSize(IN_FLIGHT_BYTES_MIN - 1);
        assert!(c.validate().is_err());
        c.in_flight_bytes_per_connection_max = ByteSize::mib(1);
        c.requests_per_sec_per_connection_max = 0;
        assert!(c.validate().is_err());
        // Idempotent producers: at least one id, kept at least a second.
        let mut c = Config {
            producers_max: 1,
            producer_idle_expiry: Duration::from_secs(1),
            ..Config::default()
        };
        c.validate().unwrap();
        c.producers_max = 0;
        assert!(c.validate().is_err());
        c.producers_max = 1;
        c.producer_idle_expiry = Duration::from_millis(999);
        assert!(c.validate().is_err());
        // The request memory budget, and a principal's share of it.
        let mut c = Config {
            request_memory_max: ByteSize(REQUEST_MEMORY_BYTES_MAX),
            request_memory_per_principal_max: ByteSize(REQUEST_MEMORY_BYTES_MAX),
            ..Config::default()
        };
        c.validate().unwrap();
        c.request_memory_max = ByteSize(REQUEST_MEMORY_BYTES_MAX + 1);
        assert!(c.validate().is_err());
        c.request_memory_max = ByteSize(REQUEST_MEMORY_BYTES_MIN);
        c.request_memory_per_principal_max = ByteSize(REQUEST_MEMORY_BYTES_MIN);
        c.validate().unwrap();
        c.request_memory_per_principal_max = ByteSize(REQUEST_MEMORY_BYTES_MIN + 1);
        assert!(c.validate().is_err(), "a share larger than the budget");
        c.request_memory_max = ByteSize(REQUEST_MEMORY_BYTES_MIN - 1);
        c.request_memory_per_principal_max = ByteSize(REQUEST_MEMORY_BYTES_MIN - 1);
        assert!(c.validate().is_err());
        // The disk check interval, and the connection limits (at least 1).
        let mut c = Config {
            disk_check_interval: DISK_CHECK_INTERVAL_MIN,
            connections_max: 1,
            unauthenticated_connections_per_address_max: 1,
            ..Config::default()
        };
        c.validate().unwrap();
        c.disk_check_interval -= Duration::from_millis(1);
        assert!(c.validate().is_err());
        c.disk_check_interval = DISK_CHECK_INTERVAL_MIN;
        c.connections_max = 0;
        assert!(c.validate().is_err());
        c.connections_max = 1;
        c.unauthenticated_connections_per_address_max = 0;
        assert!(c.validate().is_err());
        // A segment holds at least one whole batch, for at least the minimum age.
        let mut c = Config {
            segment_bytes_max: ByteSize::mib(16),
            batch_bytes_max: ByteSize::mib(16),
            segment_age_max: crate::storage::segments::SEGMENT_AGE_MIN,
            ..Config::default()
        };
        c.validate().unwrap();
        c.segment_bytes_max = ByteSize(16 * 1024 * 1024 - 1);
        assert!(c.validate().is_err());
        c.segment_bytes_max = ByteSize::mib(16);
        c.segment_age_max -= Duration::from_millis(1);
        assert!(c.validate().is_err());
        c.segment_age_max = crate::storage::segments::SEGMENT_AGE_MIN;
    }
}
