//! `msmq bench abuse`: well-behaved producers alone, then beside abusive
//! clients, in alternating phases of the same run; reports the producers'
//! throughput ratio (beside / alone) and what happened to the abusers. Two
//! attacks: `flood` (connections that ignore `RATE_LIMITED` and reconnect
//! when cut off) and `hold` (connections that each send most of a large
//! frame and never the rest, to pin the broker's memory).

use super::{setup, topic_name, Common};
use msmq_client::protocol::{NewMessage, Retention};
use msmq_client::{Client, ClientError, ErrorCode};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How many phases of messages the bench's own topic keeps.
/// (A warm-up phase, not counted, comes first.)
const RETAINED_PHASES: u32 = 2;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// Pings on many streams, ignoring rate refusals.
    Flood,
    /// Unfinished large frames, one per connection.
    Hold,
}

impl Attack {
    fn noun(self) -> &'static str {
        match self {
            Attack::Flood => "flood",
            Attack::Hold => "holders",
        }
    }
}

#[derive(clap::Args)]
pub struct AbuseBench {
    /// What the abusive clients do.
    #[arg(long, value_enum, default_value_t = Attack::Flood)]
    attack: Attack,
    /// `hold`: connections, each holding one unfinished frame.
    #[arg(long, default_value_t = 256)]
    holders: usize,
    /// `hold`: the length each frame's header declares, e.g. "64 MiB".
    #[arg(long, default_value = "64MiB")]
    hold_frame_bytes: bytesize::ByteSize,
    /// `hold`: how much of it each holder sends, e.g. "60 MiB".
    #[arg(long, default_value = "60MiB")]
    hold_sent_bytes: bytesize::ByteSize,
    /// (Linux) the broker's process id: its resident memory is read from
    /// /proc at the end of every phase and reported.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Flooding connections, each sending pings on many streams at once.
    #[arg(long, default_value_t = 4)]
    flooders: usize,
    /// Requests each flooding connection keeps in flight.
    #[arg(long, default_value_t = 256)]
    flood_streams: usize,
    /// How long a flooder waits before reconnecting once cut off or refused.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    reconnect_delay: Duration,
    /// Token the abusers present (another principal); default: the bench's.
    #[arg(long, env = "MSMQ_FLOOD_TOKEN", hide_env_values = true)]
    flood_token: Option<String>,
    /// Well-behaved producers, each on its own connection with one request
    /// in flight.
    #[arg(long, default_value_t = 2)]
    producers: usize,
    /// Phases with the flood; each sits between two phases without it (after
    /// one uncounted warm-up phase).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[command(flatten)]
    common: Common,
}

/// What the flooders saw during one phase.
#[derive(Default)]
struct FloodTally {
    answered: AtomicU64,
    refused: AtomicU64,
    cut_off: AtomicU64,
    connects_refused: AtomicU64,
    holders_open: AtomicU64,
    last_reason: std::sync::Mutex<String>,
}

pub async fn abuse(b: AbuseBench) -> anyhow::Result<()> {
    let topic = topic_name(&b.common, "abuse");
    let admin = setup(&b.common, &topic).await?;
    if b.common.topic.is_none() {
        // Phases write gigabytes; keep only the last few phases' worth.
        let max_age_ms = (b.common.duration * RETAINED_PHASES).as_millis() as u64;
        admin
            .set_topic_retention(
                &topic,
                Some(Retention {
                    max_age_ms,
                    max_bytes: 0,
                }),
            )
            .await?;
    }
    let mut producers = Vec::new();
    for _ in 0..b.producers.max(1) {
        producers.push(b.common.client.connect().await?);
    }
    let phase = b.common.duration;
    // Warm up (file growth, caches) so the first round compares like with like.
    good_phase(&b.common, &producers, &topic, phase).await?;
    let mut alone = vec![good_phase(&b.common, &producers, &topic, phase).await?];
    let mut rss_alone = vec![rss_mib(b.broker_pid)];
    let mut beside = Vec::new();
    let mut floods = Vec::new();
    for round in 0..b.rounds.max(1) {
        let tally = Arc::new(FloodTally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let abusers: Vec<_> = match b.attack {
            Attack::Flood => (0..b.flooders)
                .map(|_| {
                    tokio::spawn(flood(
                        options(&b),
                        b.flood_streams,
                        b.reconnect_delay,
                        tally.clone(),
                        stop.clone(),
                    ))
                })
                .collect(),
            Attack::Hold => vec![tokio::spawn(hold(
                options(&b),
                b.holders,
                b.hold_frame_bytes.as_u64(),
                b.hold_sent_bytes.as_u64(),
                tally.clone(),
                stop.clone(),
            ))],
        };
        let rate = good_phase(&b.common, &producers, &topic, phase).await?;
        let rss_beside = rss_mib(b.broker_pid);
        stop.store(true, Ordering::Relaxed);
        for a in abusers {
            a.await?;
        }
        beside.push(rate);
        let after = good_phase(&b.common, &producers, &topic, phase).await?;
        rss_alone.push(rss_mib(b.broker_pid));
        if crate::cli::shutdown::requested() {
            // A round cut short by a stop signal compares nothing.
            break;
        }
        alone.push(after);
        let ratio = rate / ((alone[round] + after) / 2.0);
        let reason = tally.last_reason.lock().expect("reason lock").clone();
        let flood = json!({
            "round": round + 1,
            "alone_before_msg_per_sec": alone[round],
            "beside_flood_msg_per_sec": rate,
            "alone_after_msg_per_sec": after,
            "ratio": ratio,
            "flood_answered": tally.answered.load(Ordering::Relaxed),
            "flood_refused": tally.refused.load(Ordering::Relaxed),
            "flood_cut_off": tally.cut_off.load(Ordering::Relaxed),
            "flood_connects_refused": tally.connects_refused.load(Ordering::Relaxed),
            "flood_close_reason": reason,
            "holders_open": tally.holders_open.load(Ordering::Relaxed),
            "broker_rss_alone_before_mib": rss_alone[round],
            "broker_rss_beside_mib": rss_beside,
        });
        if !b.common.json {
            println!(
                "round {}: alone {:.0} msg/s, beside the {} {rate:.0} msg/s, alone again {after:.0} msg/s: ratio {ratio:.2}; \
                 flooders: {} answered, {} refused, {} cut off, {} reconnects refused",
                round + 1,
                alone[round],
                b.attack.noun(),
                flood["flood_answered"],
                flood["flood_refused"],
                flood["flood_cut_off"],
                flood["flood_connects_refused"],
            );
            if !reason.is_empty() {
                println!("  close reason: {reason}");
            }
            if b.attack == Attack::Hold {
                println!(
                    "  {} holders held unfinished frames; broker RSS alone {} MiB, beside them {} MiB",
                    flood["holders_open"], flood["broker_rss_alone_before_mib"], flood["broker_rss_beside_mib"]
                );
            }
        }
        floods.push(flood);
    }
    if floods.is_empty() {
        eprintln!("abuse: stopped before a round completed; nothing to report");
        return Ok(());
    }
    let mut ratios: Vec<f64> = floods.iter().filter_map(|f| f["ratio"].as_f64()).collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN);
    if b.common.json {
        println!(
            "{}",
            json!({"bench": "abuse", "phase_seconds": phase.as_secs_f64(), "median_ratio": median, "rounds": floods})
        );
    } else {
        println!(
            "abuse: well-behaved producers kept {:.0}% of their throughput beside the {} (median ratio {median:.2} of {} rounds)",
            median * 100.0,
            b.attack.noun(),
            ratios.len()
        );
    }
    for client in producers {
        client.close().await;
    }
    admin.close().await;
    Ok(())
}

fn options(b: &AbuseBench) -> msmq_client::ClientOptions {
    let mut options = b.common.client.options().rate_limited_retries(0);
    if let Some(token) = &b.flood_token {
        options.token = Some(token.clone());
    }
    options
}

/// Messages/s the producers had acknowledged during one phase.
async fn good_phase(
    common: &Common,
    producers: &[Client],
    topic: &str,
    phase: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let deadline = started + phase;
    let mut tasks = Vec::new();
    for client in producers {
        let producer = client.producer(topic);
        let (size, batch) = (common.size, common.batch);
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            while Instant::now() < deadline && !crate::cli::shutdown::requested() {
                let messages = (0..batch)
                    .map(|_| NewMessage::new(vec![b'g'; size]))
                    .collect();
                acked += producer.send_batch(messages).await?.len() as u64;
            }
            anyhow::Ok(acked)
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await??;
    }
    Ok(acked as f64 / started.elapsed().as_secs_f64())
}

/// One flooder: connect, send pings on `streams` streams ignoring refusals
/// until the broker closes the connection, wait, reconnect; until `stop`.
async fn flood(
    options: msmq_client::ClientOptions,
    streams: usize,
    reconnect_delay: Duration,
    tally: Arc<FloodTally>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let client = match Client::connect(options.clone()).await {
            Ok(client) => client,
            Err(_) => {
                tally.connects_refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(reconnect_delay).await;
                continue;
            }
        };
        let dead = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let (client, tally, stop, dead) =
                    (client.clone(), tally.clone(), stop.clone(), dead.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) && !dead.load(Ordering::Relaxed) {
                        match client.ping().await {
                            Ok(_) => tally.answered.fetch_add(1, Ordering::Relaxed),
                            Err(ClientError::Broker(e)) if e.code == ErrorCode::RATE_LIMITED => {
                                tally.refused.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => {
                                if !dead.swap(true, Ordering::Relaxed) {
                                    if let Some(reason) = e.close_reason() {
                                        if e.code() == Some(ErrorCode::RATE_LIMITED) {
                                            tally.cut_off.fetch_add(1, Ordering::Relaxed);
                                        }
                                        *tally.last_reason.lock().expect("reason lock") = reason;
                                    }
                                }
                                break;
                            }
                        };
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        client.close().await;
        if !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(reconnect_delay).await;
        }
    }
}

/// The resident memory of process `pid` in MiB, read from /proc (Linux).
fn rss_mib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib / 1024)
}

/// `holders` connections, each authenticating with the abusers' token and
/// sending `sent_bytes` of a frame declared `frame_bytes` long, never the
/// rest; held until `stop`. Connections the broker refuses are counted.
async fn hold(
    options: msmq_client::ClientOptions,
    holders: usize,
    frame_bytes: u64,
    sent_bytes: u64,
    tally: Arc<FloodTally>,
    stop: Arc<AtomicBool>,
) {
    let Ok(addr) = resolve(&options.server).await else {
        tally.connects_refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Ok(config) = options.quic_client_config() else {
        tally.connects_refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Ok(endpoint) = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into()) else {
        tally.connects_refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let declared = u32::try_from(frame_bytes).unwrap_or(u32::MAX).to_be_bytes();
    let held: Arc<[u8]> = declared
        .into_iter()
        .chain(std::iter::repeat_n(
            b'h',
            sent_bytes.min(frame_bytes) as usize,
        ))
        .collect();
    let mut open = Vec::new();
    for _ in 0..holders {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match hold_one(&endpoint, &config, addr, &options, held.clone()).await {
            Ok(held) => {
                tally.holders_open.fetch_add(1, Ordering::Relaxed);
                open.push(held);
            }
            Err(e) => {
                tally.connects_refused.fetch_add(1, Ordering::Relaxed);
                *tally.last_reason.lock().expect("reason lock") = e.to_string();
            }
        }
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (conn, writer) in open {
        writer.abort();
        conn.close(0u32.into(), b"bench over");
    }
    endpoint.wait_idle().await;
}

async fn resolve(server: &str) -> anyhow::Result<std::net::SocketAddr> {
    tokio::net::lookup_host(server)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{server} resolves to nothing"))
}

/// One holder's connection and the task writing its frame.
async fn hold_one(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
    options: &msmq_client::ClientOptions,
    held: Arc<[u8]>,
) -> anyhow::Result<(quinn::Connection, tokio::task::JoinHandle<()>)> {
    use msmq_client::protocol::{decode_frame, encode_frame, Reply, Request};
    let conn = endpoint
        .connect_with(config.clone(), addr, &options.server_name)?
        .await?;
    if let Some(token) = &options.token {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&encode_frame(&Request::Authenticate {
            token: token.clone(),
        })?)
        .await?;
        send.finish()?;
        let reply = recv.read_to_end(1 << 16).await?;
        if let Reply::Error(e) = decode_frame::<Reply>(&reply)? {
            anyhow::bail!("authentication refused: {e}");
        }
    }
    let (mut send, recv) = conn.open_bi().await?;
    let writer = tokio::spawn(async move {
        let _reply_side = recv;
        // Blocks once the broker stops granting credit; never finishes.
        let _ = send.write_all(&held).await;
        std::future::pending::<()>().await;
    });
    Ok((conn, writer))
}
