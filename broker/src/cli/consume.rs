//! `msmq consume TOPIC --group G`

use super::ClientArgs;
use clap::{Args, ValueEnum};
use msmq_client::{ConsumerOptions, FetchLimits, ReceivedMessage, StartFrom};
use serde_json::json;
use std::io::Write;

#[derive(Clone, Copy, ValueEnum)]
enum From {
    Earliest,
    Latest,
}

#[derive(Args)]
pub struct ConsumeArgs {
    topic: String,
    /// Consumer group; every group gets every message.
    #[arg(long, short)]
    group: String,
    /// Stop after this many messages (default: run until SIGINT, SIGTERM or
    /// SIGHUP, which commit what was printed, leave the group and exit 0).
    #[arg(long)]
    count: Option<u64>,
    /// Where the group starts on partitions it never committed: the oldest
    /// retained message, or the end of each partition when the group's
    /// first consumer joins (pinned for the group before the first poll, so
    /// nothing produced after the join is skipped).
    #[arg(long, value_enum, default_value_t = From::Earliest)]
    from: From,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
    /// Most messages per poll.
    #[arg(long, default_value_t = 500)]
    max_messages: u32,
    /// Broadcast mode: receive every message under this stable instance
    /// name (each instance keeps its own progress) instead of sharing the
    /// group's messages with its other members.
    #[arg(long, value_name = "INSTANCE")]
    broadcast: Option<String>,
    /// Only messages with these tags, e.g. 'TagA || TagB' (evaluated on the broker).
    #[arg(long)]
    tag: Option<String>,
    /// Only messages whose headers match, e.g. "amount > 1000 AND region = 'EU'".
    #[arg(long)]
    sql: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

fn print(out: &mut impl Write, m: &ReceivedMessage, as_json: bool) -> std::io::Result<()> {
    let msg = &m.message;
    if as_json {
        let headers: serde_json::Map<String, serde_json::Value> = msg
            .headers
            .iter()
            .map(|h| (h.name.clone(), json!(h.value)))
            .collect();
        let mut obj = json!({
            "topic": &*m.topic,
            "partition": m.partition,
            "offset": msg.offset,
            "id": msg.id.to_string(),
            "timestamp_ms": msg.timestamp_ms,
            "key": msg.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "tag": msg.tag,
            "headers": headers,
        });
        match std::str::from_utf8(&msg.payload) {
            Ok(text) => obj["payload"] = json!(text),
            Err(_) => {
                let hex: String = msg.payload.iter().map(|b| format!("{b:02x}")).collect();
                obj["payload_hex"] = json!(hex);
            }
        }
        writeln!(out, "{obj}")
    } else {
        writeln!(
            out,
            "{}/{}@{} {}",
            m.topic,
            m.partition,
            msg.offset,
            String::from_utf8_lossy(&msg.payload)
        )
    }
}

pub async fn run(args: ConsumeArgs) -> anyhow::Result<()> {
    let client = args.client.connect().await?;
    let options = ConsumerOptions {
        start: match args.from {
            From::Earliest => StartFrom::Earliest,
            From::Latest => StartFrom::Latest,
        },
        limits: FetchLimits {
            max_messages: args.max_messages,
            ..FetchLimits::default()
        },
        broadcast_instance: args.broadcast.clone(),
        tag_filter: args.tag.clone(),
        sql_filter: args.sql.clone(),
        ..ConsumerOptions::default()
    };
    let mut consumer = client
        .consumer(&args.group, &[&args.topic], options)
        .await?;
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    let result = async {
        loop {
            if super::shutdown::requested() {
                return anyhow::Ok(());
            }
            if let Some(count) = args.count {
                if seen >= count {
                    return anyhow::Ok(());
                }
                // Never take more than is left, so exactly `count` are committed.
                consumer.limits_mut().max_messages = args
                    .max_messages
                    .min((count - seen).min(u32::MAX as u64) as u32);
            }
            // A stop signal drops a poll in flight: what it would have
            // returned was neither printed nor committed, so the group's next
            // owner receives it.
            let messages = tokio::select! {
                m = consumer.poll() => m?,
                _ = super::shutdown::wait() => return Ok(()),
            };
            let mut out = stdout.lock();
            for m in &messages {
                print(&mut out, m, args.json)?;
            }
            out.flush()?;
            seen += messages.len() as u64;
            // Commit after printing: at-least-once. A stop signal waits for
            // this commit, so nothing printed is delivered again.
            consumer.commit().await?;
        }
    }
    .await;
    let left = consumer.leave().await;
    result?;
    left?;
    Ok(())
}
