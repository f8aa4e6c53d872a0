//! `msmq dlq …`: dead letters of a group (messages that used up their
//! delivery attempts), and re-driving them to their original topics.

use super::ClientArgs;
use clap::Subcommand;
use msmq_client::{ConsumerOptions, FetchLimits, NewMessage};
use std::time::Duration;

/// Prefix of a group's dead-letter topic.
const DLQ_PREFIX: &str = "%DLQ%";
/// Header names the broker puts on a dead letter.
const HEADER_PREFIX: &str = "msmq.dlq.";

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List a group's dead letters with their reason and origin.
    List {
        group: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send every dead letter not re-driven yet back to its original topic.
    Redrive {
        group: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn header<'a>(m: &'a msmq_client::Message, name: &str) -> &'a str {
    m.headers
        .iter()
        .find(|h| h.name == format!("{HEADER_PREFIX}{name}"))
        .map_or("-", |h| h.value.as_str())
}

pub async fn run(cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List {
            group,
            limit,
            client,
        } => {
            let client = client.connect().await?;
            let topic = format!("{DLQ_PREFIX}{group}");
            let limits = FetchLimits {
                max_messages: limit.max(1),
                max_bytes: 16 << 20,
                max_wait_ms: 0,
            };
            let fetched = client.fetch(&topic, 0, 0, limits).await?;
            println!(
                "{:>8} {:<32} {:<30} {:>8} {:>10}  REASON",
                "OFFSET", "ID", "FROM", "ATTEMPTS", "SIZE"
            );
            for m in fetched.messages {
                let from = format!(
                    "{}/{}@{}",
                    header(&m, "topic"),
                    header(&m, "partition"),
                    header(&m, "offset")
                );
                println!(
                    "{:>8} {:<32} {:<30} {:>8} {:>10}  {}",
                    m.offset,
                    header(&m, "id"),
                    from,
                    header(&m, "attempts"),
                    m.payload.len(),
                    header(&m, "reason")
                );
            }
        }
        DlqCommand::Redrive { group, client } => {
            let client = client.connect().await?;
            let topic = format!("{DLQ_PREFIX}{group}");
            // Progress is kept as a consumer group, so a second run re-drives only newer letters.
            let options = ConsumerOptions {
                limits: FetchLimits {
                    max_messages: 500,
                    max_bytes: 16 << 20,
                    max_wait_ms: 200,
                },
                session_timeout: Duration::from_secs(30),
                ..ConsumerOptions::default()
            };
            let mut reader = client
                .consumer(&format!("%REDRIVE%{group}"), &[&topic], options)
                .await?;
            let mut sent = 0u64;
            loop {
                let letters = reader.poll().await?;
                if letters.is_empty() {
                    break;
                }
                for letter in letters {
                    let m = letter.message;
                    let original = header(&m, "topic").to_string();
                    anyhow::ensure!(
                        original != "-",
                        "dead letter at offset {} has no original topic",
                        m.offset
                    );
                    let headers = m
                        .headers
                        .into_iter()
                        .filter(|h| !h.name.starts_with(HEADER_PREFIX))
                        .collect();
                    let again = NewMessage {
                        payload: m.payload,
                        key: m.key,
                        tag: m.tag,
                        headers,
                        deliver_at_ms: None,
                    };
                    client.producer(&original).send_batch(vec![again]).await?;
                    sent += 1;
                }
                reader.commit().await?;
            }
            reader.leave().await?;
            println!("re-drove {sent} dead letters of group {group}");
        }
    }
    Ok(())
}
