//! The QUIC server: endpoint, connections, graceful shutdown.
//!
//! Owns: the quinn endpoint, the shared [`BrokerState`], the background
//! session checker and the set of in-flight request tasks.
//!
//! Invariants: once shutdown starts no new connection or request is
//! accepted; requests already accepted run to completion (their writes are
//! committed and acknowledged) before the writer stops and the endpoint
//! closes, so no write is ever left half done.

mod checkback;
mod connection;
mod console;
pub mod disk;
pub(crate) mod handlers;
mod http;
pub mod limits;
pub mod memory;
mod producers;
mod reply_faults;
pub mod retention;
mod scheduler;

use crate::config::Config;
use crate::groups::Coordinator;
use crate::storage::{Store, StoreOptions};
use crate::topics::TopicRegistry;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::task::TaskTracker;

/// Everything request handlers share.
pub struct BrokerState {
    pub config: Config,
    pub store: Store,
    pub registry: Arc<TopicRegistry>,
    pub groups: Mutex<Coordinator>,
    /// Leases, retries and policies of groups using per-message acks.
    pub acks: Mutex<crate::delivery::AckRegistry>,
    pub producers: producers::ProducerRegistry,
    /// Tokens and their principals.
    pub tokens: crate::auth::Tokens,
    /// What each principal may do (with authentication on).
    pub acls: crate::auth::Acls,
    /// Deployed plugins and their runners.
    pub plugins: crate::plugins::PluginManager,
    /// Open connections per principal.
    pub connections: limits::ConnectionCounts,
    /// Request bytes held in memory, broker-wide and per principal.
    pub request_memory: memory::RequestMemory,
    /// Free space of the data directory's filesystem.
    pub disk: disk::DiskWatch,
    /// Signalled when a message is scheduled, so the scheduler looks again.
    pub scheduler_wake: tokio::sync::Notify,
    /// Signalled at every disk check while the disk is low, so retention
    /// runs then instead of waiting for its own interval.
    pub retention_wake: tokio::sync::Notify,
    /// The `drop-replies` test fault, when fault switches are on.
    reply_faults: Option<reply_faults::ReplyFaults>,
    shutting_down: AtomicBool,
    next_connection_id: AtomicU64,
}

impl BrokerState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Run `f` on the coordinator with a partition-count lookup.
    pub fn with_groups<R>(
        &self,
        f: impl FnOnce(&mut Coordinator, &dyn Fn(&str) -> Option<u32>) -> R,
    ) -> R {
        let registry = &self.registry;
        let partitions_of = |t: &str| registry.partitions_of(t);
        let mut groups = self.groups.lock().expect("group lock");
        f(&mut groups, &partitions_of)
    }
}

/// A broker that is serving.
pub struct RunningBroker {
    /// The address actually bound (useful with port 0).
    pub local_addr: SocketAddr,
    /// The certificate clients should trust.
    pub cert_path: PathBuf,
    /// The HTTP address actually bound, when metrics are served.
    pub http_addr: Option<SocketAddr>,
    state: Arc<BrokerState>,
    endpoint: quinn::Endpoint,
    requests: TaskTracker,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningBroker {
    /// Open storage, bind the listener and start serving.
    pub async fn start(config: Config) -> anyhow::Result<RunningBroker> {
        config.validate()?;
        let (certs, key, cert_path) = crate::tls::load_or_generate(
            &config.data_dir,
            config.tls_cert.as_deref(),
            config.tls_key.as_deref(),
        )?;
        let registry = Arc::new(TopicRegistry::default());
        let data_dir = config.data_dir.clone();
        let options = StoreOptions {
            durability: config.durability,
            cache_bytes: config.cache_bytes.as_u64() as usize,
            commit_bytes_max: config.commit_bytes_max.as_u64() as usize,
            segment_move_interval: config.segment_move_interval,
            segment_roll_max: crate::storage::segments::Roll {
                bytes_max: config.segment_bytes_max.as_u64(),
                age_max: config.segment_age_max,
            },
            retention_default: (
                config.retention_default.as_millis() as u64,
                config.retention_bytes_default.as_u64(),
            ),
        };
        let store_registry = registry.clone();
        let store =
            tokio::task::spawn_blocking(move || Store::open(&data_dir, options, store_registry))
                .await
                .context("opening storage")??;
        let acks = handlers::load_acks(&store).await?;
        let tokens = {
            let db = store.db().clone();
            tokio::task::spawn_blocking(move || crate::storage::read::tokens(&db))
                .await
                .context("loading tokens")??
        };
        let tokens = crate::auth::Tokens::load(tokens);
        let acls = {
            let db = store.db().clone();
            tokio::task::spawn_blocking(move || crate::storage::read::acls(&db))
                .await
                .context("loading ACLs")??
        };
        let acls = crate::auth::Acls::load(acls);
        let plugin_engine = {
            let data_dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || {
                crate::plugins::engine::PluginEngine::new(&data_dir)
            })
            .await
            .context("starting the plugin engine")??
        };

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match &config.tls_client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                use rustls_pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_file_iter(path)
                    .with_context(|| format!("reading {}", path.display()))?
                {
                    roots.add(cert.with_context(|| format!("parsing {}", path.display()))?)?;
                }
                // Clients without a certificate may still use a token.
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("client CA {}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut tls = builder
            .with_single_cert(certs, key)
            .context("TLS certificate and key do not match")?;
        tls.alpn_protocols = vec![msmq_protocol::ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server_config.transport_config(msmq_client::transport::broker_transport_config(
            config.streams_per_connection_max,
        ));
        let (reset_key, cid_key) = crate::tls::stateless_reset_key(&config.data_dir)?;
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let socket = std::net::UdpSocket::bind(config.listen)
            .with_context(|| format!("binding {}", config.listen))?;
        let endpoint = quinn::Endpoint::new(
            endpoint_config,
            Some(server_config),
            socket,
            quinn::default_runtime().context("no async runtime")?,
        )
        .with_context(|| format!("serving on {}", config.listen))?;
        let local_addr = endpoint.local_addr()?;

        let request_memory = memory::RequestMemory::new(
            config.request_memory_max.as_u64(),
            config.request_memory_per_principal_max.as_u64(),
        );
        let config_data_dir = config.data_dir.clone();
        let state = Arc::new(BrokerState {
            config,
            store,
            registry,
            groups: Mutex::new(Coordinator::default()),
            acks: Mutex::new(acks),
            producers: producers::ProducerRegistry::default(),
            plugins: crate::plugins::PluginManager::new(plugin_engine),
            connections: limits::ConnectionCounts::default(),
            request_memory,
            disk: disk::DiskWatch::default(),
            tokens,
            acls,
            scheduler_wake: tokio::sync::Notify::new(),
            retention_wake: tokio::sync::Notify::new(),
            reply_faults: reply_faults::ReplyFaults::from_env(&config_data_dir),
            shutting_down: AtomicBool::new(false),
            next_connection_id: AtomicU64::new(1),
        });
        if state.config.auth {
            ensure_admin_token(&state).await?;
        }
        // Know the disk's state before the first produce arrives.
        state
            .disk
            .measure(&state.config.data_dir, state.config.disk_free_min.as_u64());
        let loaded = crate::plugins::PluginManager::start_stored(&state)
            .await
            .context("loading plugins")?;
        if loaded > 0 {
            tracing::info!(plugins = loaded, "plugins loaded");
        }
        let requests = TaskTracker::new();
        let mut background = vec![
            tokio::spawn(connection::accept_loop(
                state.clone(),
                endpoint.clone(),
                requests.clone(),
            )),
            tokio::spawn(session_checker(state.clone())),
            tokio::spawn(checkback::run(state.clone())),
            tokio::spawn(handlers::expire_leases(state.clone())),
            tokio::spawn(scheduler::run(state.clone())),
            tokio::spawn(retention::run(state.clone())),
            tokio::spawn(disk::run(state.clone())),
        ];
        let http_addr = match state.config.http_addr()? {
            Some(addr) => {
                let (bound, task) = http::bind(state.clone(), addr).await?;
                background.push(task);
                Some(bound)
            }
            None => None,
        };
        if let Some(dir) = state.config.plugin_dir.clone() {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating plugin directory {}", dir.display()))?;
            background.push(tokio::spawn(crate::plugins::watch::run(state.clone(), dir)));
        }
        tracing::info!(addr = %local_addr, durability = ?state.config.durability,
            data_dir = %state.config.data_dir.display(), "broker listening");
        Ok(RunningBroker {
            local_addr,
            cert_path,
            http_addr,
            state,
            endpoint,
            requests,
            background,
        })
    }

    pub fn state(&self) -> &Arc<BrokerState> {
        &self.state
    }

    /// Stop gracefully: refuse new work, finish in-flight requests, commit
    /// what is queued, close connections.
    pub async fn shutdown(self) {
        let grace = self.state.config.shutdown_grace;
        tracing::info!("shutting down: finishing in-flight requests");
        self.state.shutting_down.store(true, Ordering::Release);
        self.requests.close();
        if tokio::time::timeout(grace, self.requests.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pending = self.requests.len(),
                "in-flight requests did not finish within {grace:?}"
            );
        }
        let state = self.state.clone();
        let _ = tokio::task::spawn_blocking(move || state.plugins.stop_all(grace)).await;
        self.state.store.shutdown(grace).await;
        for task in &self.background {
            task.abort();
        }
        self.endpoint.close(
            msmq_protocol::ErrorCode::SHUTTING_DOWN.0.into(),
            b"broker shutting down",
        );
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.endpoint.wait_idle())
            .await;
        tracing::info!("broker stopped");
    }
}

/// With authentication on, make sure an admin token exists; a new one is
/// written to `<data dir>/admin.token` (readable by the owner only).
async fn ensure_admin_token(state: &Arc<BrokerState>) -> anyhow::Result<()> {
    use crate::auth::{ADMIN_PRINCIPAL, ADMIN_TOKEN_FILE};
    let path = state.config.data_dir.join(ADMIN_TOKEN_FILE);
    if state.tokens.has_principal(ADMIN_PRINCIPAL) && path.exists() {
        return Ok(());
    }
    let (id, record, token) = crate::auth::generate(ADMIN_PRINCIPAL, now_ms());
    state
        .store
        .write(crate::storage::WriteOp::PutToken {
            id: id.clone(),
            record: Some(record.clone()),
        })
        .await?;
    state.tokens.insert(id, record);
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        writeln!(file, "{token}")?;
    }
    std::fs::rename(&tmp, &path)?;
    tracing::info!(file = %path.display(), "admin token written");
    Ok(())
}

/// Wall-clock time in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Drop group members that stopped heartbeating.
async fn session_checker(state: Arc<BrokerState>) {
    let mut ticker = tokio::time::interval(state.config.session_check_interval);
    loop {
        ticker.tick().await;
        let expired = state.with_groups(|g, partitions_of| g.expire(Instant::now(), partitions_of));
        for (group, member) in expired {
            tracing::info!(%group, member, "member session expired; partitions rebalanced");
        }
    }
}
