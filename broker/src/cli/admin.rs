//! `msmq admin`: offline tools for a stopped broker's data directory.
//!
//! `digest` prints one hash of everything clients can observe (the
//! replication and replay tests compare stores with it); `replay` rebuilds
//! a store from a command recording (`msmq serve --record-commands FILE`).

use crate::config::Config;
use crate::storage::{recording, Store, StoreOptions, DB_FILE_NAME};
use anyhow::Context;
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long closing a store waits for the writer.
const CLOSE_GRACE: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Print one SHA-256 of all observable state of a stopped broker's data
    /// directory: topics, messages, offsets, groups, acks, retries, dead
    /// letters, transactions, scheduled messages, plugins and their state,
    /// tokens, ACLs, producers. Equal digests: the same broker to a client.
    Digest {
        /// The data directory (the broker must be stopped).
        #[arg(long, default_value = "msmq-data")]
        data_dir: PathBuf,
        /// Also print one line per table: name, rows, SHA-256.
        #[arg(long)]
        verbose: bool,
    },
    /// Build a new store by applying a command recording, commit by commit.
    Replay {
        /// The recording (`msmq serve --record-commands FILE`).
        #[arg(long)]
        commands: PathBuf,
        /// Where to build the store; must not hold one already.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// Store options for an offline tool: the defaults, no metrics, no recording.
fn offline_options() -> StoreOptions {
    StoreOptions {
        observer: Arc::new(crate::storage::NoObserver),
        record_commands: None,
        ..crate::core::store_options(&Config::default())
    }
}

async fn open(data_dir: &Path) -> anyhow::Result<Store> {
    let dir = data_dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        Store::open(
            &dir,
            offline_options(),
            Arc::new(crate::topics::TopicRegistry::default()),
        )
    })
    .await
    .context("opening the store")?
    .with_context(|| format!("opening the store in {}", data_dir.display()))
}

/// The digest of the store in `data_dir`, which must exist.
pub async fn digest(data_dir: &Path) -> anyhow::Result<crate::storage::digest::Digest> {
    if !data_dir.join(DB_FILE_NAME).exists() {
        anyhow::bail!(
            "{} holds no broker data ({DB_FILE_NAME} is missing)",
            data_dir.display()
        );
    }
    let store = open(data_dir).await?;
    let (db, segments) = (store.db().clone(), store.segments().clone());
    let digest =
        tokio::task::spawn_blocking(move || crate::storage::digest::digest(&db, &segments))
            .await
            .context("computing the digest")??;
    store.shutdown(CLOSE_GRACE).await;
    Ok(digest)
}

/// Apply a recording to a new store in `data_dir`; returns (commits,
/// commands).
pub async fn replay(commands: &Path, data_dir: &Path) -> anyhow::Result<(u64, u64)> {
    if data_dir.join(DB_FILE_NAME).exists() {
        anyhow::bail!(
            "{} already holds a store; replay builds a new one",
            data_dir.display()
        );
    }
    let path = commands.to_path_buf();
    let commits = tokio::task::spawn_blocking(move || recording::read(&path))
        .await
        .context("reading the recording")?
        .with_context(|| format!("reading {}", commands.display()))?;
    let store = open(data_dir).await?;
    let (mut applied, mut count) = (0u64, 0u64);
    for commit in commits {
        count += commit.commands.len() as u64;
        for result in store.write_many(commit.commands).await {
            if let Err(crate::storage::WriteError::Storage(e)) = result {
                anyhow::bail!("storage failed at recorded commit {}: {e}", commit.index);
            }
        }
        applied += 1;
    }
    store.shutdown(CLOSE_GRACE).await;
    Ok((applied, count))
}

pub async fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::Digest { data_dir, verbose } => {
            let digest = digest(&data_dir).await?;
            if verbose {
                for table in &digest.tables {
                    println!(
                        "{:<20} {:>10} rows  {}",
                        table.name, table.rows, table.sha256
                    );
                }
            }
            println!("{}", digest.total);
        }
        AdminCommand::Replay { commands, data_dir } => {
            let (commits, count) = replay(&commands, &data_dir).await?;
            println!(
                "replayed {commits} commits ({count} commands) into {}",
                data_dir.display()
            );
        }
    }
    Ok(())
}
