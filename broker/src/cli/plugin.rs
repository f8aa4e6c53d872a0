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
    /// Make a new plugin folder NAME that builds with one command and
    /// deploys as it is: a small counting (Rust) or acking plugin with its
    /// own copy of the WIT contract. Prints the build command.
    New {
        /// Plugin name: a letter, then letters, digits, '-' or '_'.
        name: String,
        /// Language of the plugin.
        #[arg(long, value_enum)]
        lang: super::plugin_new::Lang,
        /// Folder to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Say whether a broker would accept a component, without a broker and
    /// without compiling it: its size, the consumer world's exports, and
    /// every import with how the broker links it. Exits non-zero if the
    /// broker would refuse it, naming the import or export and the rule.
    Check {
        /// The component (.wasm).
        file: PathBuf,
        /// The broker's `plugin_component_bytes_max` [default: the broker's
        /// default, 32 MiB].
        #[arg(long)]
        component_bytes_max: Option<ByteSize>,
    },
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
        PluginCommand::Check {
            file,
            component_bytes_max,
        } => check(&file, component_bytes_max)?,
        PluginCommand::New { name, lang, dir } => {
            let made = super::plugin_new::create(&dir, &name, lang)?;
            println!("created {}", made.dir.display());
            println!("build:  cd {} && {}", made.dir.display(), made.build);
            println!(
                "deploy: msmq plugin deploy {name} {}/{} --topic TOPIC",
                made.dir.display(),
                made.component
            );
        }
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
            let client = client.connect().await?;
            let plugins = client.list_plugins().await?;
            println!(
                "{:<20} {:>4} {:<20} {:<24} {:>10}  STATUS",
                "PLUGIN", "VER", "TOPIC", "GROUP", "SIZE"
            );
            for p in plugins {
                // What the plugin said names the error better than the trap.
                let last_error = match client.plugin_stats(&p.spec.name).await {
                    Ok(s) => s
                        .last_error
                        .as_deref()
                        .map(|e| e.rsplit_once(PLUGIN_SAID).map_or(e, |(_, said)| said))
                        .and_then(|e| e.lines().find(|l| !l.trim().is_empty()))
                        .map(|l| format!("; last error: {}", cut(l.trim(), LIST_ERROR_CHARS_MAX)))
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                };
                println!(
                    "{:<20} {:>4} {:<20} {:<24} {:>10}  {}{last_error}",
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
                println!("recycled        {} instances", s.instances_recycled);
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

/// Where a failed call's text goes on with the plugin's own words.
const PLUGIN_SAID: &str = "the plugin said: ";
/// Most characters of a plugin's last error shown by `plugin list`.
const LIST_ERROR_CHARS_MAX: usize = 100;

/// `text`, cut to `max` characters with an ellipsis.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// `msmq plugin check`: the deploy-time checks, offline.
fn check(file: &std::path::Path, size_max: Option<ByteSize>) -> anyhow::Result<()> {
    use crate::core::plugins::check::{self as rules, ImportRule};
    let started = std::time::Instant::now();
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let size_max = size_max
        .unwrap_or(crate::config::Config::default().plugin_component_bytes_max)
        .as_u64() as usize;
    let refused = |why: String| anyhow::anyhow!("a broker would refuse {}: {why}", file.display());
    println!(
        "{}: {} (limit {})",
        file.display(),
        ByteSize(bytes.len() as u64),
        ByteSize(size_max as u64)
    );
    let outline = rules::outline(&bytes, size_max).map_err(|e| refused(e.to_string()))?;
    println!(
        "exports: {}",
        if outline.exported_functions.is_empty() {
            "no functions".to_string()
        } else {
            outline.exported_functions.join(", ")
        }
    );
    println!("imports:");
    for (name, rule) in outline.rules() {
        let verdict = if matches!(rule, ImportRule::Refused(_)) {
            "REFUSED"
        } else {
            "ok"
        };
        println!("  {verdict:<8} {name:<40} {}", rule.describe());
    }
    rules::check(&bytes, size_max).map_err(|e| refused(e.to_string()))?;
    // What the broker's compiler would find wrong, short of compiling.
    wasmparser::Validator::new_with_features(wasmparser::WasmFeatures::all())
        .validate_all(&bytes)
        .map_err(|e| refused(format!("the component is invalid: {e}")))?;
    println!(
        "accepted: a broker would deploy it (checked in {} ms; the function types are checked against the WIT when the broker compiles it)",
        started.elapsed().as_millis()
    );
    Ok(())
}
