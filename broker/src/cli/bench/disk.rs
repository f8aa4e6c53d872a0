//! `msmq bench disk`: this machine's synced sequential write bandwidth, the
//! physical ceiling of durable produce. Writes a temporary file in the
//! given directory (put it on the broker's disk) twice: once straight
//! through with one fdatasync at the end, once with an fdatasync after
//! every `--sync-bytes` (as group commits do); then removes it. A virtual
//! disk with a host-side cache can read fast on a short pass, hence the
//! 1 GiB default.

use bytesize::ByteSize;
use clap::Args;
use rand::RngCore;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes per write call in the straight-through pass.
const WRITE_CHUNK_BYTES: usize = 1 << 20;

#[derive(Args, Clone)]
pub struct DiskBench {
    /// Directory to write the probe file in (the broker's data directory's disk).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Bytes written by each pass.
    #[arg(long, default_value = "1 GiB")]
    pub bytes: ByteSize,
    /// Bytes between fdatasyncs in the synced pass.
    #[arg(long, default_value = "100 KiB")]
    pub sync_bytes: ByteSize,
    /// Stop a pass after this long at the latest.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Print one JSON summary object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What the probe measured, in MB/s (10^6 bytes).
#[derive(Debug, Clone, Copy)]
pub struct DiskFigures {
    pub sequential_mb_per_sec: f64,
    pub synced_mb_per_sec: f64,
    pub syncs_per_sec: f64,
}

/// One pass: write up to `bytes` in chunks of `chunk`, fdatasync after every
/// `sync_every` bytes (and at the end); returns (bytes, seconds, syncs).
fn pass(
    path: &Path,
    bytes: u64,
    chunk: usize,
    sync_every: u64,
    deadline: Duration,
) -> anyhow::Result<(u64, f64, u64)> {
    let mut data = vec![0u8; chunk];
    rand::rng().fill_bytes(&mut data);
    let mut file = std::fs::File::create(path)?;
    let started = Instant::now();
    let (mut written, mut since_sync, mut syncs) = (0u64, 0u64, 0u64);
    while written < bytes && started.elapsed() < deadline {
        let n = chunk.min((bytes - written) as usize);
        file.write_all(&data[..n])?;
        written += n as u64;
        since_sync += n as u64;
        if since_sync >= sync_every {
            file.sync_data()?;
            syncs += 1;
            since_sync = 0;
        }
    }
    if since_sync > 0 {
        file.sync_data()?;
        syncs += 1;
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    drop(file);
    std::fs::remove_file(path)?;
    Ok((written, seconds, syncs))
}

/// Run both passes in `dir`.
pub fn probe(b: &DiskBench) -> anyhow::Result<DiskFigures> {
    anyhow::ensure!(
        b.sync_bytes.as_u64() >= 1,
        "--sync-bytes must be at least 1 byte"
    );
    let path = b
        .dir
        .join(format!(".msmq-disk-probe-{}", std::process::id()));
    let run = || -> anyhow::Result<DiskFigures> {
        let (bytes, seconds, _) = pass(
            &path,
            b.bytes.as_u64(),
            WRITE_CHUNK_BYTES,
            u64::MAX,
            b.duration,
        )?;
        let sequential_mb_per_sec = bytes as f64 / seconds / 1e6;
        let chunk = (b.sync_bytes.as_u64() as usize).min(WRITE_CHUNK_BYTES);
        let (bytes, seconds, syncs) = pass(
            &path,
            b.bytes.as_u64(),
            chunk,
            b.sync_bytes.as_u64(),
            b.duration,
        )?;
        Ok(DiskFigures {
            sequential_mb_per_sec,
            synced_mb_per_sec: bytes as f64 / seconds / 1e6,
            syncs_per_sec: syncs as f64 / seconds,
        })
    };
    let result = run();
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| anyhow::anyhow!("probing the disk in {}: {e}", b.dir.display()))
}

pub async fn run(b: DiskBench) -> anyhow::Result<()> {
    let bench = b.clone();
    let figures = tokio::task::spawn_blocking(move || probe(&bench)).await??;
    if b.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "disk",
                "dir": b.dir.display().to_string(),
                "bytes": b.bytes.as_u64(),
                "sync_bytes": b.sync_bytes.as_u64(),
                "sequential_mb_per_sec": figures.sequential_mb_per_sec,
                "synced_mb_per_sec": figures.synced_mb_per_sec,
                "syncs_per_sec": figures.syncs_per_sec,
            })
        );
    } else {
        println!(
            "disk {}: {:.0} MB/s sequential with one fdatasync at the end; {:.0} MB/s with an fdatasync every {} ({:.0} syncs/s)",
            b.dir.display(),
            figures.sequential_mb_per_sec,
            figures.synced_mb_per_sec,
            b.sync_bytes,
            figures.syncs_per_sec
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_writes_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let bench = DiskBench {
            dir: dir.path().to_path_buf(),
            bytes: ByteSize::kib(512),
            sync_bytes: ByteSize::kib(64),
            duration: Duration::from_secs(30),
            json: true,
        };
        let figures = probe(&bench).unwrap();
        assert!(figures.sequential_mb_per_sec > 0.0);
        assert!(figures.synced_mb_per_sec > 0.0);
        // 512 KiB in 64 KiB steps: 8 syncs.
        assert!(figures.syncs_per_sec > 0.0);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe file left behind"
        );
        let missing = DiskBench {
            dir: dir.path().join("no-such-dir"),
            ..bench
        };
        let e = probe(&missing).unwrap_err().to_string();
        assert!(e.contains("no-such-dir"), "{e}");
    }
}
