//! `msmq produce TOPIC`

use super::{parse_key_value, ClientArgs};
use clap::Args;
use msmq_client::NewMessage;
use std::io::BufRead;

#[derive(Args)]
pub struct ProduceArgs {
    topic: String,
    /// Messages to send. With none, lines are read from stdin (one message
    /// each), unless --count generates them.
    messages: Vec<String>,
    /// Key of every message (same key, same partition, kept in order).
    #[arg(long)]
    key: Option<String>,
    /// Tag of every message.
    #[arg(long)]
    tag: Option<String>,
    /// Header name=value, repeatable.
    #[arg(long = "header", value_parser = parse_key_value)]
    headers: Vec<(String, String)>,
    /// Send to this partition instead of choosing by key.
    #[arg(long)]
    partition: Option<u32>,
    /// Deliver after this delay, e.g. "5s", "2h" (durable now, visible when due).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "deliver_at")]
    delay: Option<std::time::Duration>,
    /// Deliver at this RFC 3339 time, e.g. 2026-12-01T09:30:00Z.
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    deliver_at: Option<std::time::SystemTime>,
    /// Generate this many messages of --size bytes instead.
    #[arg(long)]
    count: Option<u64>,
    /// Payload size of generated messages, in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Messages per produce request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Print nothing per message.
    #[arg(long, short)]
    quiet: bool,
    /// Send without a producer id and sequence numbers: a batch whose reply
    /// is lost fails instead of being sent again, and may or may not be
    /// stored. By default every batch is stored exactly once, however
    /// often it had to be sent.
    #[arg(long)]
    no_idempotence: bool,
    #[command(flatten)]
    client: ClientArgs,
}

impl ProduceArgs {
    fn message(&self, payload: Vec<u8>) -> NewMessage {
        let mut m = NewMessage::new(payload);
        if let Some(k) = &self.key {
            m = m.with_key(k.as_bytes().to_vec());
        }
        if let Some(t) = &self.tag {
            m = m.with_tag(t.clone());
        }
        for (k, v) in &self.headers {
            m = m.with_header(k.clone(), v.clone());
        }
        if let Some(delay) = self.delay {
            m = m.with_delay(delay);
        }
        if let Some(at) = self.deliver_at {
            m = m.deliver_at(at);
        }
        m
    }
}

pub async fn run(args: ProduceArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    let client = args.client.connect().await?;
    let producer = client.producer_with(
        &args.topic,
        msmq_client::ProducerOptions {
            idempotent: !args.no_idempotence,
            ..Default::default()
        },
    );
    let mut sent = 0u64;
    let mut pending: Vec<NewMessage> = Vec::new();
    let send = |batch: Vec<NewMessage>| {
        let producer = producer.clone();
        let quiet = args.quiet;
        let partition = args.partition;
        async move {
            let acks = match partition {
                Some(p) => producer.send_to_partition(p, batch).await?,
                None => producer.send_batch(batch).await?,
            };
            if !quiet {
                for a in &acks {
                    if a.offset == msmq_client::protocol::SCHEDULED_OFFSET {
                        println!("partition {} scheduled id {}", a.partition, a.id);
                    } else {
                        println!("partition {} offset {} id {}", a.partition, a.offset, a.id);
                    }
                }
            }
            anyhow::Ok(acks.len() as u64)
        }
    };
    if let Some(count) = args.count {
        let payload = vec![b'x'; args.size];
        while sent < count && !super::shutdown::requested() {
            let n = (count - sent).min(args.batch as u64) as usize;
            let batch = (0..n).map(|_| args.message(payload.clone())).collect();
            sent += send(batch).await?;
        }
    } else if !args.messages.is_empty() {
        let batch = args
            .messages
            .iter()
            .map(|m| args.message(m.clone().into_bytes()))
            .collect();
        sent += send(batch).await?;
    } else {
        // Lines come from a thread (a read blocks), so a stop signal is
        // seen at once: what was read is sent, then the command ends.
        let (tx, mut lines) = tokio::sync::mpsc::channel(args.batch.max(1));
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let stop = line.is_err();
                if tx.blocking_send(line).is_err() || stop {
                    return;
                }
            }
        });
        loop {
            let line = tokio::select! {
                biased;
                _ = super::shutdown::wait() => None,
                line = lines.recv() => line,
            };
            let Some(line) = line else { break };
            pending.push(args.message(line?.into_bytes()));
            if pending.len() >= args.batch {
                sent += send(std::mem::take(&mut pending)).await?;
            }
        }
        if !pending.is_empty() {
            sent += send(pending).await?;
        }
    }
    if super::shutdown::requested() {
        eprintln!("stopped by a signal after sending the messages above");
    }
    eprintln!("sent {sent} messages to {}", args.topic);
    Ok(())
}
