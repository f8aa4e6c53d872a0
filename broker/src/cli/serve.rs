//! `msmq serve`: run the broker until SIGINT or SIGTERM.

use crate::config::Config;
use crate::server::RunningBroker;
use crate::storage::Durability;
use bytesize::ByteSize;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Every flag overrides the config file; each also reads `MSMQ_<NAME>`.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML config file (see `msmq config` for every key and its default).
    #[arg(long, env = "MSMQ_CONFIG")]
    config: Option<PathBuf>,
    /// QUIC listen address [default: 127.0.0.1:7171].
    #[arg(long, env = "MSMQ_LISTEN")]
    listen: Option<SocketAddr>,
    /// Require a token on every connection; the admin token is written to
    /// DATA_DIR/admin.token at first start (`msmq token create` makes more).
    #[arg(long, env = "MSMQ_AUTH")]
    auth: bool,
    /// Serve clients without a token on a non-loopback address.
    #[arg(long, env = "MSMQ_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// HTTP address for Prometheus metrics at /metrics, or "off"
    /// [default: 127.0.0.1:7172].
    #[arg(long, env = "MSMQ_HTTP")]
    http: Option<String>,
    /// Data directory [default: ./msmq-data].
    #[arg(long, env = "MSMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// PEM certificate chain to serve instead of the generated one.
    #[arg(long, env = "MSMQ_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "MSMQ_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) for mutual TLS: a client certificate they
    /// signed authenticates its common name as the principal.
    #[arg(long, env = "MSMQ_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// `immediate` (fsync before every acknowledgement) or `none` [default: immediate].
    #[arg(long, env = "MSMQ_DURABILITY")]
    durability: Option<Durability>,
    /// Largest message, e.g. "4 MiB".
    #[arg(long, env = "MSMQ_MESSAGE_BYTES_MAX")]
    message_bytes_max: Option<ByteSize>,
    /// Largest produce request, e.g. "16 MiB".
    #[arg(long, env = "MSMQ_BATCH_BYTES_MAX")]
    batch_bytes_max: Option<ByteSize>,
    /// Most messages in one produce request.
    #[arg(long, env = "MSMQ_BATCH_MESSAGES_MAX")]
    batch_messages_max: Option<u32>,
    /// Most partitions per topic.
    #[arg(long, env = "MSMQ_PARTITIONS_MAX")]
    partitions_max: Option<u32>,
    /// Longest long-poll wait, e.g. "30s".
    #[arg(long, env = "MSMQ_FETCH_WAIT_MAX", value_parser = humantime::parse_duration)]
    fetch_wait_max: Option<Duration>,
    /// Most payload bytes one fetch or poll returns, e.g. "16 MiB".
    #[arg(long, env = "MSMQ_FETCH_BYTES_MAX")]
    fetch_bytes_max: Option<ByteSize>,
    /// Most messages one fetch or poll returns.
    #[arg(long, env = "MSMQ_FETCH_MESSAGES_MAX")]
    fetch_messages_max: Option<u32>,
    /// Most bytes the storage writer puts into one transaction, e.g. "64 MiB".
    #[arg(long, env = "MSMQ_COMMIT_BYTES_MAX")]
    commit_bytes_max: Option<ByteSize>,
    /// How often group members are checked for expired sessions, e.g. "250ms".
    #[arg(long, env = "MSMQ_SESSION_CHECK_INTERVAL", value_parser = humantime::parse_duration)]
    session_check_interval: Option<Duration>,
    /// How long shutdown waits for in-flight requests, e.g. "10s".
    #[arg(long, env = "MSMQ_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    shutdown_grace: Option<Duration>,
    /// Backlog per partition (unconsumed by the slowest group) past which
    /// producers get BACKLOG_FULL; 0 for no limit.
    #[arg(long, env = "MSMQ_BACKLOG_MESSAGES_MAX")]
    backlog_messages_max: Option<u64>,
    /// Furthest ahead a message may be scheduled, e.g. "40days".
    #[arg(long, env = "MSMQ_SCHEDULE_DELAY_MAX", value_parser = humantime::parse_duration)]
    schedule_delay_max: Option<Duration>,
    /// Age at which an unresolved half message is first checked back, e.g. "6s".
    #[arg(long, env = "MSMQ_TRANSACTION_TIMEOUT", value_parser = humantime::parse_duration)]
    transaction_timeout: Option<Duration>,
    /// Time between check-backs of a transaction still unknown, e.g. "30s".
    #[arg(long, env = "MSMQ_TRANSACTION_CHECK_INTERVAL", value_parser = humantime::parse_duration)]
    transaction_check_interval: Option<Duration>,
    /// Unanswered checks before a transaction is rolled back and discarded.
    #[arg(long, env = "MSMQ_TRANSACTION_CHECK_MAX")]
    transaction_check_max: Option<u32>,
    /// Most check-backs sent per second.
    #[arg(long, env = "MSMQ_TRANSACTION_CHECKS_PER_SEC_MAX")]
    transaction_checks_per_sec_max: Option<u32>,
    /// How long a check-back waits for the producer's answer, e.g. "5s".
    #[arg(long, env = "MSMQ_TRANSACTION_CHECK_REPLY_TIMEOUT", value_parser = humantime::parse_duration)]
    transaction_check_reply_timeout: Option<Duration>,
    /// How long resolved transactions' outcomes are kept, e.g. "1h".
    #[arg(long, env = "MSMQ_TRANSACTION_OUTCOME_RETENTION", value_parser = humantime::parse_duration)]
    transaction_outcome_retention: Option<Duration>,
    /// Most idempotent producer ids held at once; past it new producers get
    /// PRODUCERS_FULL.
    #[arg(long, env = "MSMQ_PRODUCERS_MAX")]
    producers_max: Option<u32>,
    /// How long an unused idempotent producer id is kept, e.g. "24h".
    #[arg(long, env = "MSMQ_PRODUCER_IDLE_EXPIRY", value_parser = humantime::parse_duration)]
    producer_idle_expiry: Option<Duration>,
    /// redb page cache, e.g. "64 MiB".
    #[arg(long, env = "MSMQ_CACHE_BYTES")]
    cache_bytes: Option<ByteSize>,
    /// How long topics keep messages unless they set their own retention,
    /// e.g. "72h"; "0s" keeps them forever.
    #[arg(long, env = "MSMQ_RETENTION_DEFAULT", value_parser = humantime::parse_duration)]
    retention_default: Option<Duration>,
    /// Bytes each partition keeps unless its topic sets its own, e.g.
    /// "10 GiB"; 0 for no size limit.
    #[arg(long, env = "MSMQ_RETENTION_BYTES_DEFAULT")]
    retention_bytes_default: Option<ByteSize>,
    /// How often retention looks for expired batches, e.g. "1s".
    #[arg(long, env = "MSMQ_RETENTION_CHECK_INTERVAL", value_parser = humantime::parse_duration)]
    retention_check_interval: Option<Duration>,
    /// Largest a log segment file grows before its partition starts a new
    /// one, e.g. "256 MiB". Topics with a retention roll 8 times per
    /// retention period or size, so expired data leaves the disk promptly.
    #[arg(long, env = "MSMQ_SEGMENT_BYTES_MAX")]
    segment_bytes_max: Option<ByteSize>,
    /// Longest a partition appends to one segment file, e.g. "1h".
    #[arg(long, env = "MSMQ_SEGMENT_AGE_MAX", value_parser = humantime::parse_duration)]
    segment_age_max: Option<Duration>,
    /// Zero-fill the next segment file ahead of time while producers wait
    /// on each commit (true, the default), so a commit's fdatasync writes
    /// no file-system metadata; false: files grow as they are written.
    #[arg(long, env = "MSMQ_SEGMENT_PREFILL")]
    segment_prefill: Option<bool>,
    /// Least free space kept on the data directory's filesystem, e.g.
    /// "256 MiB": below it produces and half messages get DISK_FULL
    /// (retryable) while consumers keep draining; 0 turns it off.
    #[arg(long, env = "MSMQ_DISK_FREE_MIN")]
    disk_free_min: Option<ByteSize>,
    /// How often free disk space is measured, e.g. "1s".
    #[arg(long, env = "MSMQ_DISK_CHECK_INTERVAL", value_parser = humantime::parse_duration)]
    disk_check_interval: Option<Duration>,
    /// Most connections the broker holds open at once, from all clients.
    #[arg(long, env = "MSMQ_CONNECTIONS_MAX")]
    connections_max: Option<u32>,
    /// Most connections one principal (token or client certificate) may
    /// have open.
    #[arg(long, env = "MSMQ_CONNECTIONS_PER_PRINCIPAL_MAX")]
    connections_per_principal_max: Option<u32>,
    /// Most connections one remote address may have open before they
    /// authenticate (without --auth: every connection of a client host).
    #[arg(long, env = "MSMQ_UNAUTHENTICATED_CONNECTIONS_PER_ADDRESS_MAX")]
    unauthenticated_connections_per_address_max: Option<u32>,
    /// Most requests one connection may have open at once (QUIC streams).
    #[arg(long, env = "MSMQ_STREAMS_PER_CONNECTION_MAX")]
    streams_per_connection_max: Option<u32>,
    /// Most requests per second per connection; more are answered RATE_LIMITED.
    #[arg(long, env = "MSMQ_REQUESTS_PER_SEC_PER_CONNECTION_MAX")]
    requests_per_sec_per_connection_max: Option<u32>,
    /// Most requests per second of one principal's connections together.
    #[arg(long, env = "MSMQ_REQUESTS_PER_SEC_PER_PRINCIPAL_MAX")]
    requests_per_sec_per_principal_max: Option<u32>,
    /// Rate refusals while told to wait after which the connection is closed
    /// (at least twice --streams-per-connection-max).
    #[arg(long, env = "MSMQ_REFUSED_REQUESTS_BEFORE_CUTOFF")]
    refused_requests_before_cutoff: Option<u32>,
    /// How long a cut-off client's new connections are refused, e.g. "10s".
    #[arg(long, env = "MSMQ_CUTOFF_BAN", value_parser = humantime::parse_duration)]
    cutoff_ban: Option<Duration>,
    /// Request bytes a connection may have unanswered, e.g. "64 MiB".
    #[arg(long, env = "MSMQ_IN_FLIGHT_BYTES_PER_CONNECTION_MAX")]
    in_flight_bytes_per_connection_max: Option<ByteSize>,
    /// How long a request stream may take to deliver its frame, e.g. "30s".
    #[arg(long, env = "MSMQ_REQUEST_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    request_read_timeout: Option<Duration>,
    /// Request bytes the whole broker holds in memory at once, e.g. "512 MiB";
    /// a request whose frame cannot be reserved is not read until room frees.
    #[arg(long, env = "MSMQ_REQUEST_MEMORY_MAX")]
    request_memory_max: Option<ByteSize>,
    /// Share of --request-memory-max one principal (or unauthenticated
    /// address) may hold, e.g. "64 MiB"; longer frames get FRAME_TOO_LARGE.
    #[arg(long, env = "MSMQ_REQUEST_MEMORY_PER_PRINCIPAL_MAX")]
    request_memory_per_principal_max: Option<ByteSize>,
    /// Largest plugin component a deploy accepts, e.g. "32 MiB".
    #[arg(long, env = "MSMQ_PLUGIN_COMPONENT_BYTES_MAX")]
    plugin_component_bytes_max: Option<ByteSize>,
    /// Watch this directory for plugins: NAME.wasm plus a NAME.toml manifest
    /// is deployed; replacing or deleting the .wasm upgrades or removes it.
    #[arg(long, env = "MSMQ_PLUGIN_DIR")]
    plugin_dir: Option<PathBuf>,
    /// Append every applied command to this file, in commit order, for
    /// `msmq admin replay` (tests and debugging; grows without bound).
    #[arg(long, env = "MSMQ_RECORD_COMMANDS")]
    record_commands: Option<PathBuf>,
    /// Log filter, e.g. "info" or "msmq_broker=debug"; RUST_LOG wins.
    #[arg(long, env = "MSMQ_LOG")]
    log: Option<String>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$( if let Some(v) = self.$field { c.$field = v; } )*};
        }
        set!(
            listen,
            http,
            data_dir,
            durability,
            message_bytes_max,
            batch_bytes_max,
            batch_messages_max,
            partitions_max,
            fetch_wait_max,
            fetch_bytes_max,
            fetch_messages_max,
            commit_bytes_max,
            session_check_interval,
            shutdown_grace,
            backlog_messages_max,
            schedule_delay_max,
            transaction_timeout,
            transaction_check_interval,
            transaction_check_max,
            transaction_checks_per_sec_max,
            transaction_check_reply_timeout,
            transaction_outcome_retention,
            producers_max,
            producer_idle_expiry,
            cache_bytes,
            plugin_component_bytes_max,
            retention_default,
            retention_bytes_default,
            retention_check_interval,
            segment_bytes_max,
            segment_age_max,
            segment_prefill,
            disk_free_min,
            disk_check_interval,
            connections_max,
            connections_per_principal_max,
            unauthenticated_connections_per_address_max,
            streams_per_connection_max,
            requests_per_sec_per_connection_max,
            requests_per_sec_per_principal_max,
            refused_requests_before_cutoff,
            cutoff_ban,
            in_flight_bytes_per_connection_max,
            request_read_timeout,
            request_memory_max,
            request_memory_per_principal_max,
            log
        );
        if self.auth {
            c.auth = true;
        }
        if self.tls_client_ca.is_some() {
            c.tls_client_ca = self.tls_client_ca;
        }
        if self.allow_anonymous {
            c.allow_anonymous = true;
        }
        if self.plugin_dir.is_some() {
            c.plugin_dir = self.plugin_dir;
        }
        if self.record_commands.is_some() {
            c.record_commands = self.record_commands;
        }
        if self.tls_cert.is_some() {
            c.tls_cert = self.tls_cert;
            c.tls_key = self.tls_key;
        }
        c.validate()?;
        Ok(c)
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log))
        .map_err(|e| anyhow::anyhow!("bad log filter {:?}: {e}", config.log))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let broker = RunningBroker::start(config).await?;
    // One machine-readable line on stdout, so scripts can find a port-0 broker.
    match broker.http_addr {
        Some(http) => println!(
            "msmq listening on {} (certificate {}; metrics http://{http}/metrics)",
            broker.local_addr,
            broker.cert_path.display()
        ),
        None => println!(
            "msmq listening on {} (certificate {})",
            broker.local_addr,
            broker.cert_path.display()
        ),
    }
    shutdown_signal().await;
    broker.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; use Ctrl-C");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
