//! The `msmq` command line: `serve` runs the broker; the other subcommands
//! are clients of a running broker (topics, produce, consume, groups,
//! benchmarks).

mod acl;
mod admin;
mod bench;
mod consume;
mod demo;
mod dlq;
mod group;
mod message;
mod plugin;
mod plugin_new;
mod produce;
mod serve;
pub mod shutdown;
mod token;
mod topic;
mod tx;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use msmq_client::{Client, ClientOptions};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "msmq",
    version,
    about = "MSMQ: a durable message broker over QUIC",
    long_about = "MSMQ: a durable message broker over QUIC.\n\n\
        Start a broker with `msmq serve` (data in ./msmq-data, listening on 127.0.0.1:7171). \
        Every other subcommand talks to a running broker; run it in the same working \
        directory and it finds the broker's certificate by itself."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(Box<serve::ServeArgs>),
    /// Print the default configuration file, with comments.
    Config,
    /// Run the payment-transfer scenario end to end on an embedded broker:
    /// plugins, transactions, a flash-sale burst, and a consistency check.
    Demo(demo::DemoArgs),
    /// Create, list, describe and delete topics.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Send messages: from arguments, from stdin (one per line), or generated.
    Produce(produce::ProduceArgs),
    /// Receive messages as a member of a consumer group.
    Consume(consume::ConsumeArgs),
    /// List and describe consumer groups.
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Transactions: list pending and discarded ones, resume or commit, send one.
    #[command(subcommand)]
    Tx(tx::TxCommand),
    /// Look messages up by id or by key.
    #[command(subcommand)]
    Message(message::MessageCommand),
    /// Dead letters of a group: list them, re-drive them to their topics.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Rights of principals on a broker with authentication on: set, show.
    #[command(subcommand)]
    Acl(acl::AclCommand),
    /// Tokens for a broker with authentication on: create, list, revoke.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Consumer plugins (Wasm components): deploy, list, stats, pause, resume, remove.
    #[command(subcommand)]
    Plugin(plugin::PluginCommand),
    /// Measure throughput and latency against a running broker.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Offline tools for a stopped broker's data directory: digest, replay.
    #[command(subcommand)]
    Admin(admin::AdminCommand),
}

/// How client subcommands reach the broker.
#[derive(Args, Clone, Debug)]
pub struct ClientArgs {
    /// Broker address, host:port.
    #[arg(long, env = "MSMQ_SERVER", default_value = msmq_client::DEFAULT_SERVER)]
    pub server: String,
    /// PEM file of the certificate to trust [default: ./msmq-data/tls/cert.pem].
    #[arg(long, env = "MSMQ_CA")]
    pub ca: Option<PathBuf>,
    /// Name to verify in the broker's certificate.
    #[arg(long, env = "MSMQ_SERVER_NAME", default_value = "localhost")]
    pub server_name: String,
    /// Token for a broker with authentication on [default: the contents of
    /// ./msmq-data/admin.token, if that file exists].
    #[arg(long, env = "MSMQ_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientArgs {
    pub fn options(&self) -> ClientOptions {
        ClientOptions {
            server: self.server.clone(),
            server_name: self.server_name.clone(),
            ca_file: self.ca.clone(),
            token: self.token.clone(),
            ..ClientOptions::default()
        }
    }

    /// Connect; the connection is closed cleanly when the command ends.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let client = Client::connect(self.options()).await?;
        OPEN_CLIENTS
            .lock()
            .expect("client list lock")
            .push(client.clone());
        Ok(client)
    }
}

/// Clients opened by this command, closed before the process exits so the
/// broker hears the close instead of waiting for an idle timeout.
static OPEN_CLIENTS: std::sync::Mutex<Vec<Client>> = std::sync::Mutex::new(Vec::new());

async fn close_clients() {
    let clients = std::mem::take(&mut *OPEN_CLIENTS.lock().expect("client list lock"));
    for client in clients {
        client.close().await;
    }
}

/// Entry point of the `msmq` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Config => {
                print!("{}", crate::config::Config::default_toml());
                Ok(())
            }
            Command::Admin(command) => {
                init_client_logging();
                admin::run(command).await
            }
            client_command => {
                init_client_logging();
                shutdown::install().context("listening for stop signals")?;
                let graceful = client_command.stops_gracefully();
                let command = run_client_command(client_command);
                let result = if graceful {
                    command.await
                } else {
                    tokio::select! {
                        result = command => result,
                        signal = shutdown::wait() => Err(shutdown::Interrupted(signal).into()),
                    }
                };
                close_clients().await;
                result
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<shutdown::Interrupted>() {
            Some(shutdown::Interrupted(signal)) => {
                eprintln!("msmq: {e}");
                ExitCode::from(signal.exit_status())
            }
            None => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

impl Command {
    /// Whether the command watches [`shutdown::requested`] and ends by itself
    /// after a stop signal (exit 0; `demo` shuts its embedded broker down and
    /// exits 128 + the signal number), instead of being dropped at once.
    fn stops_gracefully(&self) -> bool {
        matches!(
            self,
            Command::Consume(_)
                | Command::Demo(_)
                | Command::Produce(_)
                | Command::Bench(_)
                | Command::Tx(tx::TxCommand::Send { .. })
        )
    }
}

async fn run_client_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => demo::run(args).await,
        Command::Topic(cmd) => topic::run(cmd).await,
        Command::Produce(args) => produce::run(args).await,
        Command::Consume(args) => consume::run(args).await,
        Command::Group(cmd) => group::run(cmd).await,
        Command::Tx(cmd) => tx::run(cmd).await,
        Command::Dlq(cmd) => dlq::run(cmd).await,
        Command::Message(cmd) => message::run(cmd).await,
        Command::Bench(cmd) => bench::run(cmd).await,
        Command::Plugin(cmd) => plugin::run(cmd).await,
        Command::Token(cmd) => token::run(cmd).await,
        Command::Acl(cmd) => acl::run(cmd).await,
        Command::Serve(_) | Command::Config | Command::Admin(_) => {
            anyhow::bail!("serve, config and admin are not client commands")
        }
    }
}

fn init_client_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parse `key=value`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}
