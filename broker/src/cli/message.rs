//! `msmq message get|find`: look messages up by id or by key.

use super::ClientArgs;
use clap::Subcommand;
use msmq_client::protocol::FoundMessage;
use msmq_client::MessageId;

#[derive(Subcommand)]
pub enum MessageCommand {
    /// Show the message with this id (32 hex digits, as acks print it).
    Get {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show messages of a topic with this key.
    Find {
        #[arg(long)]
        topic: String,
        #[arg(long)]
        key: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn print(found: &FoundMessage) {
    let m = &found.message;
    let headers: Vec<String> = m
        .headers
        .iter()
        .map(|h| format!("{}={}", h.name, h.value))
        .collect();
    println!(
        "{}/{}@{} id {} time {} key {} tag {} headers [{}]\n  {}",
        found.topic,
        found.partition,
        m.offset,
        m.id,
        m.timestamp_ms,
        m.key
            .as_ref()
            .map_or("-".into(), |k| String::from_utf8_lossy(k).into_owned()),
        m.tag.as_deref().unwrap_or("-"),
        headers.join(", "),
        String::from_utf8_lossy(&m.payload)
    );
}

pub async fn run(cmd: MessageCommand) -> anyhow::Result<()> {
    match cmd {
        MessageCommand::Get { id, client } => {
            let id = MessageId::parse(&id)
                .ok_or_else(|| anyhow::anyhow!("{id:?} is not a message id (32 hex digits)"))?;
            match client.connect().await?.get_message(id).await? {
                Some(found) => print(&found),
                None => {
                    anyhow::bail!("no message {id} (unknown, not yet due, or no longer stored)")
                }
            }
        }
        MessageCommand::Find {
            topic,
            key,
            limit,
            client,
        } => {
            let found = client
                .connect()
                .await?
                .find_messages(&topic, key.as_bytes(), limit)
                .await?;
            for f in &found {
                print(f);
            }
            eprintln!("{} messages with key {key:?} in {topic}", found.len());
        }
    }
    Ok(())
}
