//! `msmq tx …`: inspect and resolve transactions, and send one by hand.

use super::ClientArgs;
use clap::{Subcommand, ValueEnum};
use msmq_client::protocol::DiscardedAction;
use msmq_client::{NewMessage, TransactionCheck, TxAction};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum Action {
    Commit,
    Rollback,
    Unknown,
}

impl From<Action> for TxAction {
    fn from(a: Action) -> TxAction {
        match a {
            Action::Commit => TxAction::Commit,
            Action::Rollback => TxAction::Rollback,
            Action::Unknown => TxAction::Unknown,
        }
    }
}

#[derive(Subcommand)]
pub enum TxCommand {
    /// Pending half messages with their age and check count.
    List {
        /// Most transactions to show.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Transactions rolled back after unanswered checks.
    Discarded {
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Put a discarded transaction back to pending for another round of checks.
    Resume {
        tx_id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Commit a discarded transaction by hand.
    Commit {
        tx_id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Send one transactional message, for trying things out: a half
    /// message, then the --action. With `unknown`, stay connected and answer
    /// the broker's check-backs with --answer until it is resolved, --wait
    /// ends or a stop signal (SIGINT, SIGTERM, SIGHUP) arrives.
    Send {
        topic: String,
        message: String,
        /// Producer group.
        #[arg(long, short, default_value = "cli")]
        group: String,
        #[arg(long)]
        key: Option<String>,
        /// What to send after the half message.
        #[arg(long, value_enum, default_value_t = Action::Commit)]
        action: Action,
        /// How to answer check-backs.
        #[arg(long, value_enum, default_value_t = Action::Commit)]
        answer: Action,
        /// How long to stay for check-backs after `--action unknown`.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn age(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    humantime::format_duration(Duration::from_secs(now.saturating_sub(ms) / 1000)).to_string()
}

fn in_(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if ms <= now {
        "due".into()
    } else {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs((ms - now).div_ceil(1000)))
        )
    }
}

pub async fn run(cmd: TxCommand) -> anyhow::Result<()> {
    match cmd {
        TxCommand::List { limit, client } => list(client, false, limit).await,
        TxCommand::Discarded { limit, client } => list(client, true, limit).await,
        TxCommand::Resume { tx_id, client } => {
            let ended = client
                .connect()
                .await?
                .resolve_discarded(tx_id, DiscardedAction::Resume)
                .await?;
            println!("transaction {tx_id}: {ended:?}");
            Ok(())
        }
        TxCommand::Commit { tx_id, client } => {
            let ended = client
                .connect()
                .await?
                .resolve_discarded(tx_id, DiscardedAction::Commit)
                .await?;
            println!("transaction {tx_id}: {ended:?}");
            Ok(())
        }
        TxCommand::Send {
            topic,
            message,
            group,
            key,
            action,
            answer,
            wait,
            client,
        } => {
            let client = client.connect().await?;
            let answer: TxAction = answer.into();
            let producer = client
                .transactional_producer(&group, &topic, move |check: &TransactionCheck| {
                    eprintln!(
                        "check-back #{} for transaction {}: answering {answer:?}",
                        check.check_number, check.tx_id
                    );
                    answer
                })
                .await?;
            let mut m = NewMessage::new(message.into_bytes());
            if let Some(k) = key {
                m = m.with_key(k.into_bytes());
            }
            let half = producer.send_half(m).await?;
            println!(
                "half message stored: transaction {} id {} partition {}",
                half.tx_id, half.id, half.partition
            );
            let ended = producer.end(half.tx_id, action.into()).await?;
            println!("transaction {}: {ended:?}", half.tx_id);
            if matches!(action, Action::Unknown) {
                let deadline = tokio::time::Instant::now() + wait;
                while tokio::time::Instant::now() < deadline {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = super::shutdown::wait() => {
                            println!(
                                "transaction {} still pending; stopped by a signal (the broker checks back with another producer of group {group:?}, and rolls it back after its last check)",
                                half.tx_id
                            );
                            return Ok(());
                        }
                    }
                    let state = producer.end(half.tx_id, TxAction::Unknown).await?;
                    if state != msmq_client::TxEnded::Pending {
                        println!("transaction {}: {state:?}", half.tx_id);
                        return Ok(());
                    }
                }
                println!("transaction {} still pending after {wait:?}", half.tx_id);
            }
            Ok(())
        }
    }
}

async fn list(client: ClientArgs, discarded: bool, limit: u32) -> anyhow::Result<()> {
    let list = client
        .connect()
        .await?
        .list_transactions(discarded, limit)
        .await?;
    println!(
        "{:>12} {:<20} {:<24} {:>9} {:>10} {:>7} {:>10}",
        "TX", "PRODUCER GROUP", "TOPIC", "PARTITION", "AGE", "CHECKS", "NEXT CHECK"
    );
    for t in list {
        println!(
            "{:>12} {:<20} {:<24} {:>9} {:>10} {:>7} {:>10}",
            t.tx_id,
            t.producer_group,
            t.topic,
            t.partition,
            age(t.created_at_ms),
            t.check_count,
            if t.discarded {
                "-".to_string()
            } else {
                in_(t.next_check_at_ms)
            }
        );
    }
    Ok(())
}
