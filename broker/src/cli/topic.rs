//! `msmq topic …`

use super::ClientArgs;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        name: String,
        /// Number of partitions (order is kept within a partition).
        #[arg(long, short, default_value_t = 4)]
        partitions: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List topics.
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show partitions with their offsets and every group's lag.
    Describe {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a topic's retention, or set it with --max-age / --max-bytes
    /// (0 for no limit), or return it to the broker default with --default.
    Retention {
        name: String,
        /// Keep messages this long, e.g. "72h", "10s"; "0s" for ever.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_age: Option<std::time::Duration>,
        /// Keep at most this much per partition, e.g. "10 GiB"; 0 for no limit.
        #[arg(long)]
        max_bytes: Option<bytesize::ByteSize>,
        /// Use the broker's default retention again.
        #[arg(long, conflicts_with_all = ["max_age", "max_bytes"])]
        default: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a topic with its messages and group offsets.
    Delete {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn run(cmd: TopicCommand) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            client,
        } => {
            let info = client
                .connect()
                .await?
                .create_topic(&name, partitions)
                .await?;
            println!(
                "created topic {} with {} partitions",
                info.name, info.partitions
            );
        }
        TopicCommand::Retention {
            name,
            max_age,
            max_bytes,
            default,
            client,
        } => {
            let client = client.connect().await?;
            if default {
                client.set_topic_retention(&name, None).await?;
            } else if max_age.is_some() || max_bytes.is_some() {
                let (current, _) = client.topic_retention(&name).await?;
                let retention = msmq_client::protocol::Retention {
                    max_age_ms: max_age.map_or(current.max_age_ms, |d| d.as_millis() as u64),
                    max_bytes: max_bytes.map_or(current.max_bytes, |b| b.as_u64()),
                };
                client.set_topic_retention(&name, Some(retention)).await?;
            }
            let (r, is_default) = client.topic_retention(&name).await?;
            let age = match r.max_age_ms {
                0 => "forever".to_string(),
                ms => humantime::format_duration(std::time::Duration::from_millis(ms)).to_string(),
            };
            let bytes = match r.max_bytes {
                0 => "no size limit".to_string(),
                b => format!("at most {} per partition", bytesize::ByteSize(b)),
            };
            println!(
                "{name}: keeps messages {age}, {bytes}{}",
                if is_default { " (broker default)" } else { "" }
            );
        }
        TopicCommand::List { client } => {
            let topics = client.connect().await?.list_topics().await?;
            println!("{:<40} {:>10}", "TOPIC", "PARTITIONS");
            for t in topics {
                println!("{:<40} {:>10}", t.name, t.partitions);
            }
        }
        TopicCommand::Describe { name, client } => {
            let d = client.connect().await?.describe_topic(&name).await?;
            println!("topic {} ({} partitions)", d.info.name, d.info.partitions);
            println!("{:>10} {:>14} {:>14}", "PARTITION", "START", "END");
            for p in &d.partitions {
                println!(
                    "{:>10} {:>14} {:>14}",
                    p.partition, p.start_offset, p.end_offset
                );
            }
            for g in &d.groups {
                let total: u64 = g.partitions.iter().map(|p| p.lag).sum();
                println!("group {} (lag {total})", g.group);
                for p in &g.partitions {
                    let committed = p
                        .committed_offset
                        .map_or("-".to_string(), |c| c.to_string());
                    println!(
                        "{:>10} committed {:>14} lag {:>10}",
                        p.partition, committed, p.lag
                    );
                }
            }
        }
        TopicCommand::Delete { name, client } => {
            client.connect().await?.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}
