//! `msmq group …`

use super::ClientArgs;
use clap::Subcommand;
use msmq_client::protocol::ResetTo;

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
    /// Move a group's offsets on a topic (stop its consumers first).
    Reset {
        group: String,
        #[arg(long)]
        topic: String,
        /// `earliest`, `latest`, an RFC 3339 time (2026-11-25T20:00:00Z) or
        /// milliseconds since the Unix epoch: replay from the first message
        /// appended at or after it.
        #[arg(long, value_parser = parse_reset_to)]
        to: ResetTo,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn parse_reset_to(s: &str) -> Result<ResetTo, String> {
    match s {
        "earliest" => Ok(ResetTo::Earliest),
        "latest" => Ok(ResetTo::Latest),
        _ => {
            if let Ok(ms) = s.parse::<u64>() {
                return Ok(ResetTo::Timestamp(ms));
            }
            let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
                format!("expected earliest, latest, an RFC 3339 time or epoch milliseconds: {e}")
            })?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| "time before 1970".to_string())?
                .as_millis() as u64;
            Ok(ResetTo::Timestamp(ms))
        }
    }
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
        GroupCommand::Reset {
            group,
            topic,
            to,
            client,
        } => {
            let offsets = client
                .connect()
                .await?
                .reset_group_offsets(&group, &topic, to)
                .await?;
            for o in offsets {
                println!("{}/{} -> {}", o.topic, o.partition, o.offset);
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
