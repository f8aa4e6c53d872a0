//! The connection to the broker: TLS trust, (re)connecting, one request per
//! stream, and the admin calls.
//!
//! Size: over 1,000 lines because `Client` has one small method per admin
//! request (34 of them); the connection machinery is to move into its own
//! module when the Python and Node.js bindings wrap this client.

use crate::TransactionChecker;
use crate::{ClientError, Consumer, ConsumerOptions, Producer, ProducerOptions};
use msmq_protocol::{
    decode_frame, encode_frame, BrokerRequest, BrokerRequestReply, DiscardedAction, ErrorCode,
    ErrorReply, FetchLimits, FetchedMessages, GroupDescription, GroupSummary, Reply, Request,
    TopicDescription, TopicInfo, TransactionInfo, TxAction, TxEnded, ALPN, FRAME_BYTES_MAX,
    FRAME_HEADER_BYTES,
};
use rustls_pki_types::{pem::PemObject, CertificateDer};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// Where a client connects when nothing else is said.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7171";
/// The broker's self-signed certificate, as `msmq serve` writes it with its
/// default data directory: a client started in the same working directory
/// trusts it with no options.
pub const DEFAULT_CA_FILE: &str = "msmq-data/tls/cert.pem";
/// The admin token a broker with authentication writes into its data
/// directory; clients started beside it use it when given no token.
pub const DEFAULT_TOKEN_FILE: &str = "msmq-data/admin.token";

/// How to reach and trust the broker.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port` of the broker.
    pub server: String,
    /// Name checked against the broker certificate.
    pub server_name: String,
    /// PEM file with the certificate(s) to trust. `None`: use
    /// [`DEFAULT_CA_FILE`] if it exists.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Token presented on every connection, for brokers with authentication
    /// on. `None`: use [`DEFAULT_TOKEN_FILE`] if it exists.
    pub token: Option<String>,
    /// PEM certificate chain and private key to present (mutual TLS): a
    /// broker with a client CA maps the certificate's common name to a
    /// principal.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// How many times a request refused with `RATE_LIMITED` is sent again
    /// after the wait the broker asks for (the broker ran nothing, so it is
    /// always safe). 0: return the refusal at once.
    pub rate_limited_retries: u32,
}

/// Default of [`ClientOptions::rate_limited_retries`].
pub const RATE_LIMITED_RETRIES_DEFAULT: u32 = 10;

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            server: DEFAULT_SERVER.to_string(),
            server_name: "localhost".to_string(),
            ca_file: None,
            connect_timeout: Duration::from_secs(10),
            token: None,
            client_cert: None,
            rate_limited_retries: RATE_LIMITED_RETRIES_DEFAULT,
        }
    }
}

impl ClientOptions {
    /// Defaults, overridden by `MSMQ_SERVER`, `MSMQ_SERVER_NAME` and `MSMQ_CA`.
    pub fn from_env() -> Self {
        let mut opts = ClientOptions::default();
        if let Ok(server) = std::env::var("MSMQ_SERVER") {
            opts.server = server;
        }
        if let Ok(name) = std::env::var("MSMQ_SERVER_NAME") {
            opts.server_name = name;
        }
        if let Ok(ca) = std::env::var("MSMQ_CA") {
            opts.ca_file = Some(ca.into());
        }
        if let Ok(token) = std::env::var("MSMQ_TOKEN") {
            opts.token = Some(token);
        }
        opts
    }

    /// The token to present: the given one, else [`DEFAULT_TOKEN_FILE`].
    fn effective_token(&self) -> Option<String> {
        self.token.clone().or_else(|| {
            std::fs::read_to_string(DEFAULT_TOKEN_FILE)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        })
    }

    /// Present this certificate chain and key (PEM files) to the broker.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    pub fn rate_limited_retries(mut self, retries: u32) -> Self {
        self.rate_limited_retries = retries;
        self
    }

    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub fn server(mut self, server: impl Into<String>) -> Self {
        self.server = server.into();
        self
    }

    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The quinn client configuration these options describe (TLS trust,
    /// ALPN, transport settings), for tools that speak the protocol directly.
    pub fn quic_client_config(&self) -> Result<quinn::ClientConfig, ClientError> {
        let ca_file = match &self.ca_file {
            Some(path) => path.clone(),
            None if std::path::Path::new(DEFAULT_CA_FILE).exists() => DEFAULT_CA_FILE.into(),
            None => {
                return Err(ClientError::Options(format!(
                    "no CA file given and {DEFAULT_CA_FILE} does not exist here; \
                     pass the broker's certificate (--ca FILE or MSMQ_CA)"
                )))
            }
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&ca_file)
            .map_err(|e| ClientError::Options(format!("reading {}: {e}", ca_file.display())))?;
        for cert in certs {
            let cert = cert
                .map_err(|e| ClientError::Options(format!("parsing {}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Options(format!("bad CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Options(format!(
                "{} holds no certificate",
                ca_file.display()
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Options(e.to_string()))?
            .with_root_certificates(roots);
        let mut tls = match &self.client_cert {
            None => tls.with_no_client_auth(),
            Some((cert_file, key_file)) => {
                let read = |path: &PathBuf| {
                    std::fs::read(path).map_err(|e| {
                        ClientError::Options(format!("reading {}: {e}", path.display()))
                    })
                };
                let chain = CertificateDer::pem_slice_iter(&read(cert_file)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        ClientError::Options(format!("parsing {}: {e}", cert_file.display()))
                    })?;
                let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&read(key_file)?)
                    .map_err(|e| {
                        ClientError::Options(format!("parsing {}: {e}", key_file.display()))
                    })?;
                tls.with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Options(format!("client certificate: {e}")))?
            }
        };
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Options(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(crate::transport::transport_config());
        Ok(config)
    }
}

/// A connection to one broker. Clone it freely: clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    quic_config: quinn::ClientConfig,
    addr: SocketAddr,
    options: ClientOptions,
    connection: Mutex<Option<quinn::Connection>>,
    /// Checkers by producer group; registered again on every new connection.
    checkers: std::sync::RwLock<HashMap<String, Arc<dyn TransactionChecker>>>,
    /// Transactions whose checker call is still running: a repeated check
    /// is answered `Unknown` at once instead of piling up blocked threads.
    checking: std::sync::Mutex<std::collections::HashSet<u64>>,
    /// The broker asked this client to wait until then (`RATE_LIMITED`):
    /// every request waits, not only the refused one, because the broker
    /// counts requests sent during the wait against the connection.
    rate_limited_until: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Held while one request frame is written: frames go out one after
    /// another, so the flow-control credit the broker grants a frame it has
    /// reserved memory for is spent on that frame, not on a later one that
    /// waits for memory (which would leave both stuck).
    frame_writes: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"client closed");
    }
}

impl Client {
    /// Connect to the broker now (so bad options and unreachable brokers
    /// show at once); later requests reconnect by themselves if it drops.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let quic_config = options.quic_client_config()?;
        let addr = tokio::net::lookup_host(&options.server)
            .await
            .map_err(|e| ClientError::Connect {
                addr: options.server.clone(),
                reason: e.to_string(),
            })?
            .next()
            .ok_or_else(|| ClientError::Connect {
                addr: options.server.clone(),
                reason: "name resolved to no address".into(),
            })?;
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0".parse().expect("valid")
        } else {
            "0.0.0.0:0".parse().expect("valid")
        };
        let connect_error = |e: std::io::Error| ClientError::Connect {
            addr: options.server.clone(),
            reason: e.to_string(),
        };
        let (socket, _) = crate::transport::bind_udp(bind).map_err(connect_error)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| connect_error(std::io::Error::other("no async runtime")))?;
        let endpoint = quinn::Endpoint::new(
            crate::transport::endpoint_config(quinn::EndpointConfig::default()),
            None,
            socket,
            runtime,
        )
        .map_err(connect_error)?;
        let client = Client {
            inner: Arc::new(Inner {
                endpoint,
                quic_config,
                addr,
                options,
                connection: Mutex::new(None),
                checkers: std::sync::RwLock::new(HashMap::new()),
                checking: std::sync::Mutex::new(std::collections::HashSet::new()),
                rate_limited_until: std::sync::Mutex::new(None),
                frame_writes: Arc::new(tokio::sync::Mutex::new(())),
            }),
        };
        client.connection().await?;
        Ok(client)
    }

    /// The broker address this client talks to.
    pub fn server_addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Transport figures of the live connection (path MTU, round-trip time,
    /// packets sent and lost), or `None` before the first request.
    pub async fn connection_stats(&self) -> Option<quinn::ConnectionStats> {
        self.inner
            .connection
            .lock()
            .await
            .as_ref()
            .map(|conn| conn.stats())
    }

    /// Close the connection now (pending requests fail) and wait briefly
    /// until the broker has heard it, so nothing lingers on its side.
    pub async fn close(&self) {
        if let Some(conn) = self.inner.connection.lock().await.take() {
            conn.close(0u32.into(), b"client closed");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    /// Move to a new local UDP port (as when a device changes network): the
    /// connection migrates to it and stays open, with requests in flight.
    /// Returns the new local address.
    pub fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let options_error = |e: std::io::Error| ClientError::Options(format!("rebinding: {e}"));
        let local = self.inner.endpoint.local_addr().map_err(options_error)?;
        let socket =
            std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).map_err(options_error)?;
        self.inner.endpoint.rebind(socket).map_err(options_error)?;
        self.inner.endpoint.local_addr().map_err(options_error)
    }

    async fn connection(&self) -> Result<quinn::Connection, ClientError> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let inner = &self.inner;
        let connect_err = |reason: String| ClientError::Connect {
            addr: inner.options.server.clone(),
            reason,
        };
        let connecting = inner
            .endpoint
            .connect_with(
                inner.quic_config.clone(),
                inner.addr,
                &inner.options.server_name,
            )
            .map_err(|e| connect_err(e.to_string()))?;
        let conn = tokio::time::timeout(inner.options.connect_timeout, connecting)
            .await
            .map_err(|_| connect_err("timed out".into()))?
            .map_err(|e| connect_err(e.to_string()))?;
        tracing::debug!(addr = %inner.addr, "connected to broker");
        // Closes the connection unless it is stored below, also when this
        // future is dropped half-way: no half-registered connection lingers.
        let guard = CloseUnlessKept(Some(conn.clone()));
        tokio::spawn(answer_broker_requests(
            conn.clone(),
            Arc::downgrade(&self.inner),
        ));
        let groups: Vec<String> = inner
            .checkers
            .read()
            .expect("checker lock")
            .keys()
            .cloned()
            .collect();
        if let Some(token) = inner.options.effective_token() {
            request_on(&conn, &Request::Authenticate { token }).await?;
        }
        for producer_group in groups {
            request_on(&conn, &Request::RegisterProducer { producer_group }).await?;
        }
        guard.keep();
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Answer check-backs for `producer_group` with `checker` on this and
    /// every later connection.
    pub(crate) async fn register_checker(
        &self,
        producer_group: &str,
        checker: Arc<dyn TransactionChecker>,
    ) -> Result<(), ClientError> {
        self.inner
            .checkers
            .write()
            .expect("checker lock")
            .insert(producer_group.to_string(), checker);
        let req = Request::RegisterProducer {
            producer_group: producer_group.to_string(),
        };
        let result = self
            .request(&req)
            .await
            .and_then(|r| expect_done("RegisterProducer", r));
        if let Err(e) = &result {
            if !e.is_retryable() {
                // Refused for good (a bad name, say): forget it, or every
                // reconnect would fail on it.
                self.inner
                    .checkers
                    .write()
                    .expect("checker lock")
                    .remove(producer_group);
            }
        }
        result
    }

    /// Send one request and wait for its reply. An error reply from the
    /// broker becomes [`ClientError::Broker`].
    pub async fn request(&self, request: &Request) -> Result<Reply, ClientError> {
        let mut retries = self.inner.options.rate_limited_retries;
        loop {
            match self.request_once(request).await {
                Err(ClientError::Broker(refusal))
                    if refusal.code == ErrorCode::RATE_LIMITED && retries > 0 =>
                {
                    retries -= 1;
                    let wait = Duration::from_millis(refusal.retry_after_ms.unwrap_or(1).into())
                        + RATE_LIMITED_MARGIN;
                    let mut until = self
                        .inner
                        .rate_limited_until
                        .lock()
                        .expect("rate wait lock");
                    let new = tokio::time::Instant::now() + wait;
                    *until = Some(until.map_or(new, |u| u.max(new)));
                }
                result => return result,
            }
        }
    }

    /// Send a long poll (`Poll` or `Fetch` that may wait `max_wait_ms`) and
    /// watch the connection while it waits. A reply later than the wait plus
    /// [`LONG_POLL_GRACE`] sends a `Ping`, and more at doubling gaps after:
    /// a broker that restarted answers the Ping's packets with a stateless
    /// reset at once, where a poll the old broker had acknowledged sends
    /// nothing more and would learn of it only at the next heartbeat.
    pub(crate) async fn long_poll(
        &self,
        request: &Request,
        max_wait_ms: u32,
    ) -> Result<Reply, ClientError> {
        let reply = self.request(request);
        tokio::pin!(reply);
        let mut grace = LONG_POLL_GRACE;
        let wait = Duration::from_millis(max_wait_ms.into());
        let mut next_check = tokio::time::Instant::now() + wait + grace;
        loop {
            tokio::select! {
                result = &mut reply => return result,
                () = tokio::time::sleep_until(next_check) => {
                    let client = self.clone();
                    // Its answer does not matter: a dead connection fails
                    // the poll itself.
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(LONG_POLL_CHECK_MAX, client.ping()).await;
                    });
                    // A busy broker is slow, not gone: check less often.
                    grace = (grace * 2).min(LONG_POLL_CHECK_MAX);
                    next_check += grace;
                }
            }
        }
    }

    async fn request_once(&self, request: &Request) -> Result<Reply, ClientError> {
        let frame = encode_frame(request)?;
        // This request's turn to write, taken before its stream is opened,
        // so a caller that gives up while waiting leaves no stream behind.
        let turn = self.inner.frame_writes.clone().lock_owned().await;
        // A stream that cannot even be opened sent nothing, so one retry on a
        // fresh connection is safe for every request.
        let conn = self.connection().await?;
        let (send, recv) = match conn.open_bi().await {
            Ok(streams) => streams,
            Err(_) => self.connection().await?.open_bi().await?,
        };
        let write = FrameWrite::new(send, frame, Some(turn));
        // Only now: a request that waited for a stream must not slip past a
        // wait the broker asked for meanwhile.
        self.wait_if_rate_limited().await;
        exchange(write, recv).await
    }

    async fn wait_if_rate_limited(&self) {
        let until = *self
            .inner
            .rate_limited_until
            .lock()
            .expect("rate wait lock");
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }

    pub async fn ping(&self) -> Result<(u16, String), ClientError> {
        match self.request(&Request::Ping).await? {
            Reply::Pong {
                protocol_version,
                broker_version,
            } => Ok((protocol_version, broker_version)),
            other => Err(unexpected("Ping", other)),
        }
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
    ) -> Result<TopicInfo, ClientError> {
        let req = Request::CreateTopic {
            name: name.into(),
            partitions,
        };
        match self.request(&req).await? {
            Reply::TopicCreated(info) => Ok(info),
            other => Err(unexpected("CreateTopic", other)),
        }
    }

    /// Create the topic unless it exists already (with any partition count).
    pub async fn ensure_topic(&self, name: &str, partitions: u32) -> Result<(), ClientError> {
        match self.create_topic(name, partitions).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(ErrorCode::TOPIC_EXISTS) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        expect_done(
            "DeleteTopic",
            self.request(&Request::DeleteTopic { name: name.into() })
                .await?,
        )
    }

    /// Deploy a plugin component, or upgrade the running plugin of that
    /// name (hot reload at the next batch boundary).
    pub async fn deploy_plugin(
        &self,
        spec: msmq_protocol::PluginSpec,
        component: Vec<u8>,
    ) -> Result<msmq_protocol::PluginDeployed, ClientError> {
        match self
            .request(&Request::DeployPlugin { spec, component })
            .await?
        {
            Reply::PluginDeployed(d) => Ok(d),
            other => Err(unexpected("DeployPlugin", other)),
        }
    }

    pub async fn list_plugins(&self) -> Result<Vec<msmq_protocol::PluginInfo>, ClientError> {
        match self.request(&Request::ListPlugins).await? {
            Reply::Plugins(p) => Ok(p),
            other => Err(unexpected("ListPlugins", other)),
        }
    }

    pub async fn plugin_stats(
        &self,
        name: &str,
    ) -> Result<msmq_protocol::PluginStats, ClientError> {
        match self
            .request(&Request::PluginStats { name: name.into() })
            .await?
        {
            Reply::PluginStats(s) => Ok(s),
            other => Err(unexpected("PluginStats", other)),
        }
    }

    pub async fn pause_plugin(&self, name: &str) -> Result<(), ClientError> {
        expect_done(
            "PausePlugin",
            self.request(&Request::PausePlugin { name: name.into() })
                .await?,
        )
    }

    pub async fn resume_plugin(&self, name: &str) -> Result<(), ClientError> {
        expect_done(
            "ResumePlugin",
            self.request(&Request::ResumePlugin { name: name.into() })
                .await?,
        )
    }

    /// Stop a plugin and forget its state and progress.
    pub async fn remove_plugin(&self, name: &str) -> Result<(), ClientError> {
        expect_done(
            "RemovePlugin",
            self.request(&Request::RemovePlugin { name: name.into() })
                .await?,
        )
    }

    /// Read up to `limit` committed state entries of a plugin whose key
    /// starts with `prefix`, after `start_after` when given.
    pub async fn plugin_state(
        &self,
        name: &str,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<msmq_protocol::StateEntry>, ClientError> {
        let req = Request::PluginState {
            name: name.into(),
            prefix: prefix.to_vec(),
            start_after: start_after.map(|a| msmq_protocol::serde_bytes::ByteBuf::from(a.to_vec())),
            limit,
        };
        match self.request(&req).await? {
            Reply::PluginState(entries) => Ok(entries),
            other => Err(unexpected("PluginState", other)),
        }
    }

    /// Every committed state entry of a plugin whose key starts with
    /// `prefix`, paging through the broker's per-request limit.
    pub async fn plugin_state_all(
        &self,
        name: &str,
        prefix: &[u8],
    ) -> Result<Vec<msmq_protocol::StateEntry>, ClientError> {
        let mut all: Vec<msmq_protocol::StateEntry> = Vec::new();
        loop {
            let after = all.last().map(|e| e.key.clone());
            let page = self
                .plugin_state(name, prefix, after.as_deref(), 10_000)
                .await?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Set a topic's retention, or with `None` return it to the broker default.
    pub async fn set_topic_retention(
        &self,
        topic: &str,
        retention: Option<msmq_protocol::Retention>,
    ) -> Result<(), ClientError> {
        expect_done(
            "SetTopicRetention",
            self.request(&Request::SetTopicRetention {
                topic: topic.into(),
                retention,
            })
            .await?,
        )
    }

    /// The retention in force for a topic, and whether it is the default.
    pub async fn topic_retention(
        &self,
        topic: &str,
    ) -> Result<(msmq_protocol::Retention, bool), ClientError> {
        match self
            .request(&Request::GetTopicRetention {
                topic: topic.into(),
            })
            .await?
        {
            Reply::TopicRetention {
                retention,
                is_default,
            } => Ok((retention, is_default)),
            other => Err(unexpected("GetTopicRetention", other)),
        }
    }

    /// Create a token for `principal` (admin only): (token id, token).
    pub async fn create_token(&self, principal: &str) -> Result<(String, String), ClientError> {
        match self
            .request(&Request::CreateToken {
                principal: principal.into(),
            })
            .await?
        {
            Reply::TokenCreated { token_id, token } => Ok((token_id, token)),
            other => Err(unexpected("CreateToken", other)),
        }
    }

    /// Revoke a token (admin only); connections using it are refused from
    /// their next request.
    pub async fn revoke_token(&self, token_id: &str) -> Result<(), ClientError> {
        expect_done(
            "RevokeToken",
            self.request(&Request::RevokeToken {
                token_id: token_id.into(),
            })
            .await?,
        )
    }

    /// Replace a principal's ACL rules (admin only; empty removes them).
    pub async fn set_acl(
        &self,
        principal: &str,
        rules: Vec<msmq_protocol::AclRule>,
    ) -> Result<(), ClientError> {
        expect_done(
            "SetAcl",
            self.request(&Request::SetAcl {
                principal: principal.into(),
                rules,
            })
            .await?,
        )
    }

    /// A principal's ACL rules (admin only).
    pub async fn acl(&self, principal: &str) -> Result<Vec<msmq_protocol::AclRule>, ClientError> {
        match self
            .request(&Request::GetAcl {
                principal: principal.into(),
            })
            .await?
        {
            Reply::Acl(rules) => Ok(rules),
            other => Err(unexpected("GetAcl", other)),
        }
    }

    pub async fn list_tokens(&self) -> Result<Vec<msmq_protocol::TokenInfo>, ClientError> {
        match self.request(&Request::ListTokens).await? {
            Reply::Tokens(t) => Ok(t),
            other => Err(unexpected("ListTokens", other)),
        }
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self.request(&Request::ListTopics).await? {
            Reply::Topics(topics) => Ok(topics),
            other => Err(unexpected("ListTopics", other)),
        }
    }

    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription, ClientError> {
        match self
            .request(&Request::DescribeTopic { name: name.into() })
            .await?
        {
            Reply::TopicDescription(d) => Ok(d),
            other => Err(unexpected("DescribeTopic", other)),
        }
    }

    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>, ClientError> {
        match self.request(&Request::ListGroups).await? {
            Reply::Groups(groups) => Ok(groups),
            other => Err(unexpected("ListGroups", other)),
        }
    }

    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription, ClientError> {
        match self
            .request(&Request::DescribeGroup {
                group: group.into(),
            })
            .await?
        {
            Reply::GroupDescription(d) => Ok(d),
            other => Err(unexpected("DescribeGroup", other)),
        }
    }

    /// Move a group's committed offsets on `topic` (the group must have no
    /// live members). Returns the new offset of each partition.
    pub async fn reset_group_offsets(
        &self,
        group: &str,
        topic: &str,
        to: msmq_protocol::ResetTo,
    ) -> Result<Vec<msmq_protocol::PartitionOffset>, ClientError> {
        let req = Request::ResetGroupOffsets {
            group: group.into(),
            topic: topic.into(),
            to,
        };
        match self.request(&req).await? {
            Reply::OffsetsReset(offsets) => Ok(offsets),
            other => Err(unexpected("ResetGroupOffsets", other)),
        }
    }

    /// Set a group's retry policy for per-message acknowledgement; with
    /// `ordered`, each message key is consumed strictly in order (FIFO).
    pub async fn configure_group(
        &self,
        group: &str,
        max_delivery_attempts: u32,
        retry_backoff: &[Duration],
        ordered: bool,
    ) -> Result<(), ClientError> {
        let req = Request::ConfigureGroup {
            group: group.into(),
            max_delivery_attempts,
            retry_backoff_ms: retry_backoff.iter().map(|d| d.as_millis() as u64).collect(),
            ordered,
        };
        expect_done("ConfigureGroup", self.request(&req).await?)
    }

    /// A message by id (`None` if unknown or no longer stored).
    pub async fn get_message(
        &self,
        id: msmq_protocol::MessageId,
    ) -> Result<Option<msmq_protocol::FoundMessage>, ClientError> {
        match self.request(&Request::GetMessage { id }).await? {
            Reply::Messages(mut found) => Ok(found.pop()),
            other => Err(unexpected("GetMessage", other)),
        }
    }

    /// Messages of `topic` with exactly this key, at most `limit`.
    pub async fn find_messages(
        &self,
        topic: &str,
        key: &[u8],
        limit: u32,
    ) -> Result<Vec<msmq_protocol::FoundMessage>, ClientError> {
        let req = Request::FindMessages {
            topic: topic.into(),
            key: key.to_vec(),
            limit,
        };
        match self.request(&req).await? {
            Reply::Messages(found) => Ok(found),
            other => Err(unexpected("FindMessages", other)),
        }
    }

    /// Read one partition by offset, outside any consumer group.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        limits: FetchLimits,
    ) -> Result<FetchedMessages, ClientError> {
        let req = Request::Fetch {
            topic: topic.into(),
            partition,
            offset,
            limits,
        };
        match self.long_poll(&req, limits.max_wait_ms).await? {
            Reply::Fetched(f) => Ok(f),
            other => Err(unexpected("Fetch", other)),
        }
    }

    /// Pending (or discarded) transactions, oldest first.
    pub async fn list_transactions(
        &self,
        discarded: bool,
        limit: u32,
    ) -> Result<Vec<TransactionInfo>, ClientError> {
        match self
            .request(&Request::ListTransactions { discarded, limit })
            .await?
        {
            Reply::Transactions(list) => Ok(list),
            other => Err(unexpected("ListTransactions", other)),
        }
    }

    /// Operator action on a discarded transaction: resume checks, or commit.
    pub async fn resolve_discarded(
        &self,
        tx_id: u64,
        action: DiscardedAction,
    ) -> Result<TxEnded, ClientError> {
        match self
            .request(&Request::ResolveDiscarded { tx_id, action })
            .await?
        {
            Reply::TransactionEnded(ended) => Ok(ended),
            other => Err(unexpected("ResolveDiscarded", other)),
        }
    }

    /// A producer for one topic.
    /// A producer for `topic`, idempotent ([`ProducerOptions::default`]).
    pub fn producer(&self, topic: &str) -> Producer {
        Producer::new(self.clone(), topic, ProducerOptions::default())
    }

    /// A producer for `topic` with `options` (idempotence off, say).
    pub fn producer_with(&self, topic: &str, options: ProducerOptions) -> Producer {
        Producer::new(self.clone(), topic, options)
    }

    /// Join `group` on `topics` and return the member.
    pub async fn consumer(
        &self,
        group: &str,
        topics: &[&str],
        options: ConsumerOptions,
    ) -> Result<Consumer, ClientError> {
        Consumer::join(self.clone(), group, topics, options).await
    }
}

struct CloseUnlessKept(Option<quinn::Connection>);

impl CloseUnlessKept {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseUnlessKept {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            conn.close(0u32.into(), b"connection set-up abandoned");
        }
    }
}

/// One request on a new stream of `conn`, while nothing else uses it.
async fn request_on(conn: &quinn::Connection, request: &Request) -> Result<Reply, ClientError> {
    let frame = encode_frame(request)?;
    let (send, recv) = conn.open_bi().await?;
    exchange(FrameWrite::new(send, frame, None), recv).await
}

/// One request frame on its way to the broker, holding this client's turn
/// to write (frames go out one after another, PROTOCOL §1). If the caller
/// gives up before the frame is out, a stream that carries nothing yet is
/// reset, and a frame already started is finished in the background: the
/// broker granted credit for the whole frame, and a connection that leaves
/// granted credit unused is closed.
struct FrameWrite {
    send: Option<quinn::SendStream>,
    frame: Vec<u8>,
    sent: usize,
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl FrameWrite {
    fn new(
        send: quinn::SendStream,
        frame: Vec<u8>,
        turn: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> FrameWrite {
        FrameWrite {
            send: Some(send),
            frame,
            sent: 0,
            turn,
        }
    }

    /// Write the whole frame and finish the stream, then give up the turn.
    async fn write(mut self) -> Result<(), quinn::WriteError> {
        let send = self.send.as_mut().expect("the stream is kept until drop");
        while self.sent < self.frame.len() {
            match send.write(&self.frame[self.sent..]).await {
                Ok(n) => self.sent += n,
                Err(e) => {
                    // Nothing more goes out on a stopped or lost stream.
                    self.send = None;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Drop for FrameWrite {
    fn drop(&mut self) {
        let Some(mut send) = self.send.take() else {
            return;
        };
        if self.sent == self.frame.len() {
            let _ = send.finish();
        } else if self.sent == 0 {
            let _ = send.reset(0u32.into());
        } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (rest, turn) = (self.frame.split_off(self.sent), self.turn.take());
            runtime.spawn(async move {
                let _turn = turn;
                if send.write_all(&rest).await.is_ok() {
                    let _ = send.finish();
                }
            });
        }
    }
}

/// Added to the broker's wait hint, so a retry does not arrive a hair early.
const RATE_LIMITED_MARGIN: Duration = Duration::from_millis(1);
/// How long past its wait a long poll may go unanswered before the client
/// checks that the connection is alive (a Ping).
pub const LONG_POLL_GRACE: Duration = Duration::from_millis(50);
/// The longest gap between such checks while the reply stays away; they
/// double from [`LONG_POLL_GRACE`] up to it.
pub const LONG_POLL_CHECK_MAX: Duration = Duration::from_secs(1);

async fn exchange(write: FrameWrite, mut recv: quinn::RecvStream) -> Result<Reply, ClientError> {
    match write.write().await {
        Ok(()) => {}
        // The broker answers some requests without reading them (a rate
        // refusal, a read timeout): its reply is on the way.
        Err(quinn::WriteError::Stopped(_)) => {}
        Err(quinn::WriteError::ConnectionLost(lost)) => return Err(ClientError::Connection(lost)),
        Err(other) => return Err(ClientError::Stream(other.to_string())),
    }
    let bytes = recv
        .read_to_end(FRAME_BYTES_MAX + FRAME_HEADER_BYTES)
        .await
        .map_err(|e| match e {
            // Keep the broker's close code and reason (a limit, a shutdown).
            quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(lost)) => {
                ClientError::Connection(lost)
            }
            other => ClientError::Stream(other.to_string()),
        })?;
    match decode_frame::<Reply>(&bytes)? {
        Reply::Error(err) => Err(ClientError::Broker(err)),
        reply => Ok(reply),
    }
}

/// Serve the requests the broker opens streams for (transaction checks).
async fn answer_broker_requests(conn: quinn::Connection, inner: std::sync::Weak<Inner>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let Some(inner) = inner.upgrade() else { break };
        tokio::spawn(answer_broker_request(inner, send, recv));
    }
}

async fn answer_broker_request(
    inner: Arc<Inner>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Ok(bytes) = recv.read_to_end(FRAME_BYTES_MAX + FRAME_HEADER_BYTES).await else {
        return;
    };
    let reply = match decode_frame::<BrokerRequest>(&bytes) {
        Ok(BrokerRequest::CheckTransaction(check)) => {
            let checker = inner
                .checkers
                .read()
                .expect("checker lock")
                .get(&check.producer_group)
                .cloned();
            let tx_id = check.tx_id;
            let fresh =
                checker.is_some() && inner.checking.lock().expect("checking lock").insert(tx_id);
            match checker {
                Some(_) if !fresh => BrokerRequestReply::TransactionState {
                    tx_id,
                    action: TxAction::Unknown,
                },
                Some(checker) => {
                    let answer = tokio::task::spawn_blocking(move || checker.check(&check)).await;
                    inner.checking.lock().expect("checking lock").remove(&tx_id);
                    match answer {
                        Ok(action) => BrokerRequestReply::TransactionState { tx_id, action },
                        Err(e) => BrokerRequestReply::Error(ErrorReply::new(
                            ErrorCode::INTERNAL,
                            format!("the transaction checker failed: {e}"),
                        )),
                    }
                }
                None => BrokerRequestReply::Error(ErrorReply::new(
                    ErrorCode::INVALID_ARGUMENT,
                    format!(
                        "no checker registered for producer group {:?}",
                        check.producer_group
                    ),
                )),
            }
        }
        Err(e) => BrokerRequestReply::Error(ErrorReply::new(
            ErrorCode::BAD_REQUEST,
            format!("broker request could not be decoded: {e}"),
        )),
    };
    if let Ok(frame) = encode_frame(&reply) {
        if send.write_all(&frame).await.is_ok() {
            let _ = send.finish();
        }
    }
}

pub(crate) fn unexpected(request: &'static str, reply: Reply) -> ClientError {
    ClientError::UnexpectedReply {
        request,
        reply: format!("{reply:?}").chars().take(200).collect(),
    }
}

pub(crate) fn expect_done(request: &'static str, reply: Reply) -> Result<(), ClientError> {
    match reply {
        Reply::Done => Ok(()),
        other => Err(unexpected(request, other)),
    }
}
