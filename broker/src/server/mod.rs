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
pub(crate) mod handlers;
mod http;
pub mod limits;
pub mod memory;
mod producers;
mod reply_faults;

use crate::clock::Clock;
use crate::config::Config;
pub use crate::core::BrokerState;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// What the wire adds to the core's state: connections, their memory and
/// limits, and which connections are producers of which group.
pub struct ServerState {
    pub core: Arc<BrokerState>,
    pub producers: producers::ProducerRegistry,
    /// Open connections per principal.
    pub connections: limits::ConnectionCounts,
    /// Request bytes held in memory, broker-wide and per principal.
    pub request_memory: memory::RequestMemory,
    /// The `drop-replies` test fault, when fault switches are on.
    reply_faults: Option<reply_faults::ReplyFaults>,
    next_connection_id: AtomicU64,
}

impl std::ops::Deref for ServerState {
    type Target = BrokerState;

    fn deref(&self) -> &BrokerState {
        &self.core
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
    state: Arc<ServerState>,
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
        let core = BrokerState::open(config, Clock::Real).await?;
        let config = core.config.clone();

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
        let mut endpoint_config = msmq_client::transport::endpoint_config(
            quinn::EndpointConfig::new(Arc::new(reset_key)),
        );
        endpoint_config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let (socket, granted) = msmq_client::transport::bind_udp(config.listen)
            .with_context(|| format!("binding {}", config.listen))?;
        if granted < msmq_client::transport::UDP_SOCKET_BUFFER_BYTES {
            tracing::warn!(
                granted_bytes = granted,
                wanted_bytes = msmq_client::transport::UDP_SOCKET_BUFFER_BYTES,
                "the kernel gave the QUIC socket a small receive buffer; bursts may drop datagrams \
                 and stall senders (raise net.core.rmem_max)"
            );
        }
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
        let reply_faults = reply_faults::ReplyFaults::from_env(&config.data_dir);
        let state = Arc::new(ServerState {
            core,
            producers: producers::ProducerRegistry::default(),
            connections: limits::ConnectionCounts::default(),
            request_memory,
            reply_faults,
            next_connection_id: AtomicU64::new(1),
        });
        if state.config.auth {
            ensure_admin_token(&state).await?;
        }
        let mut background = BrokerState::start(&state.core).await?;
        let requests = TaskTracker::new();
        background.extend([
            tokio::spawn(connection::accept_loop(
                state.clone(),
                endpoint.clone(),
                requests.clone(),
            )),
            tokio::spawn(checkback::run(state.clone())),
        ]);
        let http_addr = match state.config.http_addr()? {
            Some(addr) => {
                let (bound, task) = http::bind(state.clone(), addr).await?;
                background.push(task);
                Some(bound)
            }
            None => None,
        };
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

    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// Stop gracefully: refuse new work, finish in-flight requests, commit
    /// what is queued, close connections.
    pub async fn shutdown(self) {
        let grace = self.state.config.shutdown_grace;
        tracing::info!("shutting down: finishing in-flight requests");
        self.state.begin_shutdown();
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
async fn ensure_admin_token(state: &ServerState) -> anyhow::Result<()> {
    use crate::auth::{ADMIN_PRINCIPAL, ADMIN_TOKEN_FILE};
    let path = state.config.data_dir.join(ADMIN_TOKEN_FILE);
    if state.tokens.has_principal(ADMIN_PRINCIPAL) && path.exists() {
        return Ok(());
    }
    let (id, record, token) = crate::auth::generate(ADMIN_PRINCIPAL, state.now_ms());
    state
        .submit(crate::command::Command::PutToken {
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
