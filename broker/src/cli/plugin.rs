//! `msmq plugin …`: deploy, list, inspect, pause, resume and remove consumer
//! plugins.

use super::{parse_key_value, ClientArgs};
use bytesize::ByteSize;
use clap::{Args, Subcommand};
use msmq_client::protocol::{PluginLimits, PluginSpec};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum PluginCommand {
    /// Deploy a plugin component, or upgrade the running plugin of that name
    /// (it switches at the next batch boundary and continues from the
    /// committed progress).
    Deploy(DeployArgs),
    /// List deployed plugins.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Counters of one plugin: processed, failed, retried, dead-lettered,
    /// lag, throttled time, time in the plugin, memory.
    Stats {
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop handing the plugin messages (its backlog grows as lag).
    Pause {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Resume a paused plugin (also one the broker paused after failures).
    Resume {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Stop a plugin and delete its state and progress.
    Remove {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a plugin's committed state (key = value), optionally by prefix.
    State {
        name: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
pub struct DeployArgs {
    /// Plugin name (letters, digits, '.', '_', '-').
    pub name: String,
    /// The component (.wasm) targeting the msmq:plugin/consumer world.
    pub file: PathBuf,
    /// Topic the plugin consumes.
    #[arg(long)]
    pub topic: String,
    /// Consumer group for its progress [default: plugin.NAME].
    #[arg(long)]
    pub group: Option<String>,
    /// A topic the plugin may publish to (repeat for several).
    #[arg(long = "publish-to")]
    pub publish_to: Vec<String>,
    /// key=value passed to the plugin's init (repeat for several).
    #[arg(long = "config", value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Linear memory limit, e.g. "64 MiB".
    #[arg(long, default_value = "64 MiB")]
    pub memory: ByteSize,
    /// Time limit of one batch call, e.g. "1s" or "200ms".
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub batch_time: Duration,
    /// Most messages per batch.
    #[arg(long, default_value_t = msmq_client::protocol::PLUGIN_BATCH_MESSAGES_DEFAULT)]
    pub batch_messages: u32,
    /// Throughput quota in messages per second (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub messages_per_second: u32,
    /// Throughput quota in payload bytes per second, e.g. "10 MiB" (0: unlimited).
    #[arg(long, default_value = "0")]
    pub bytes_per_second: ByteSize,
    /// Deliveries of a message before it is dead-lettered.
    #[arg(long, default_value_t = msmq_client::protocol::PLUGIN_DELIVERY_ATTEMPTS_DEFAULT)]
    pub delivery_attempts: u32,
    /// Consecutive failed calls after which the plugin is paused.
    #[arg(long, default_value_t = msmq_client::protocol::PLUGIN_FAILURES_BEFORE_PAUSE_DEFAULT)]
    pub failures_before_pause: u32,
    #[command(flatten)]
    pub client: ClientArgs,
}

impl DeployArgs {
    pub fn spec(&self) -> PluginSpec {
        PluginSpec {
            name: self.name.clone(),
            topic: self.topic.clone(),
            group: self.group.clone(),
            publish_to: self.publish_to.clone(),
            config: self.config.clone(),
            limits: PluginLimits {
                memory_bytes_max: self.memory.as_u64(),
                batch_time_ms_max: self.batch_time.as_millis().min(u32::MAX as u128) as u32,
                batch_messages_max: self.batch_messages,
                messages_per_second: self.messages_per_second,
                bytes_per_second: self.bytes_per_second.as_u64(),
                delivery_attempts_max: self.delivery_attempts,
                failures_before_pause: self.failures_before_pause,
            },
        }
    }
}

pub async fn run(cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Deploy(args) => {
            let bytes = std::fs::read(&args.file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", args.file.display()))?;
            let client = args.client.connect().await?;
            let done = client.deploy_plugin(args.spec(), bytes).await?;
            println!(
                "{} {} version {} (sha256 {}, compiled in {} ms)",
                if done.upgraded {
                    "upgraded"
                } else {
                    "deployed"
                },
                done.name,
                done.version,
                &done.component_sha256[..16],
                done.compile_ms
            );
        }
        PluginCommand::List { client } => {
            let plugins = client.connect().await?.list_plugins().await?;
            println!(
                "{:<20} {:>4} {:<20} {:<24} {:>10}  STATUS",
                "PLUGIN", "VER", "TOPIC", "GROUP", "SIZE"
            );
            for p in plugins {
                println!(
                    "{:<20} {:>4} {:<20} {:<24} {:>10}  {}",
                    p.spec.name,
                    p.version,
                    p.spec.topic,
                    p.spec.group_name(),
                    ByteSize(p.component_bytes).to_string(),
                    p.status
                );
            }
        }
        PluginCommand::Stats { name, json, client } => {
            let s = client.connect().await?.plugin_stats(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("plugin          {} (version {})", s.name, s.version);
                println!("status          {}", s.status);
                println!("processed       {}", s.processed);
                println!("  acked         {}", s.acked);
                println!("  retried       {}", s.retried);
                println!("  dead-lettered {}", s.dead_lettered);
                println!("published       {}", s.published);
                println!(
                    "batches         {} ({} failed)",
                    s.batches, s.failed_batches
                );
                println!("lag             {}", s.lag);
                println!(
                    "rate            {} msg/s (last 3 s)",
                    s.recent_messages_per_second
                );
                println!("throttled       {} ms", s.throttled_ms);
                println!("busy            {} ms inside the plugin", s.busy_ms);
                println!("memory          {}", ByteSize(s.memory_bytes));
                if let Some(ms) = s.last_swap_ms {
                    println!(
                        "last upgrade    first batch {ms} ms after the deploy was acknowledged"
                    );
                }
                if let Some(e) = &s.last_error {
                    println!("last error      {e}");
                }
            }
        }
        PluginCommand::Pause { name, client } => {
            client.connect().await?.pause_plugin(&name).await?;
            println!("paused {name}");
        }
        PluginCommand::Resume { name, client } => {
            client.connect().await?.resume_plugin(&name).await?;
            println!("resumed {name}");
        }
        PluginCommand::Remove { name, client } => {
            client.connect().await?.remove_plugin(&name).await?;
            println!("removed {name}");
        }
        PluginCommand::State {
            name,
            prefix,
            client,
        } => {
            let entries = client
                .connect()
                .await?
                .plugin_state_all(&name, prefix.as_bytes())
                .await?;
            for e in entries {
                println!(
                    "{} = {}",
                    String::from_utf8_lossy(&e.key),
                    String::from_utf8_lossy(&e.value)
                );
            }
        }
    }
    Ok(())
}
