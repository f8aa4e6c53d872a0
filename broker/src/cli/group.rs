//! `msmq group …`

use super::ClientArgs;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum GroupCommand {
    /// List consumer groups (live or with committed offsets).
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a group's members, assignment, offsets and lag.
    Describe {
        group: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn run(cmd: GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::List { client } => {
            let groups = client.connect().await?.list_groups().await?;
            println!("{:<32} {:>8}  TOPICS", "GROUP", "MEMBERS");
            for g in groups {
                println!("{:<32} {:>8}  {}", g.group, g.members, g.topics.join(","));
            }
        }
        GroupCommand::Describe { group, client } => {
            let d = client.connect().await?.describe_group(&group).await?;
            println!(
                "group {} generation {} ({} members)",
                d.group,
                d.generation,
                d.members.len()
            );
            for m in &d.members {
                let parts: Vec<String> = m
                    .partitions
                    .iter()
                    .map(|tp| format!("{}/{}", tp.topic, tp.partition))
                    .collect();
                println!(
                    "member {} at {}: {}",
                    m.member_id,
                    m.client_addr,
                    parts.join(" ")
                );
            }
            println!(
                "{:<30} {:>9} {:>12} {:>12} {:>10} {:>8}",
                "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "OWNER"
            );
            for o in &d.offsets {
                println!(
                    "{:<30} {:>9} {:>12} {:>12} {:>10} {:>8}",
                    o.topic,
                    o.partition,
                    o.committed_offset.map_or("-".into(), |c| c.to_string()),
                    o.end_offset,
                    o.lag,
                    o.owner.map_or("-".into(), |m| m.to_string())
                );
            }
        }
    }
    Ok(())
}
