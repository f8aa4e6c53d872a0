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
