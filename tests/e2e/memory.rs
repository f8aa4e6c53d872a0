//! Request memory under clients that hold large frames unfinished, over
//! real QUIC: the broker's RSS stays within its budget plus a margin, a
//! normal client keeps producing and fetching, and frames at and past the
//! limits are served or refused.

use crate::bad_input::{raw_connection, send_raw};
use crate::harness::TestBroker;
use msmq_client::protocol::{decode_frame, encode_frame, Reply, Request};
use msmq_client::{Client, ErrorCode, FetchLimits, NewMessage};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// The budget the tests set, and each principal's share of it.
const BUDGET_MIB: u64 = 32;
const SHARE_MIB: u64 = 6;
/// Each holder declares a frame this long and sends all but its last
/// quarter MiB: two fit a share, so a principal holds 6 MiB.
const HELD_FRAME_BYTES: u64 = 3 * MIB;
const HELD_SENT_BYTES: u64 = HELD_FRAME_BYTES - MIB / 4;
/// What the broker may grow by beyond its budget: transport state and
/// receive windows of the holders' connections, allocator slack.
const RSS_MARGIN_MIB: u64 = 24;
/// Longest a normal client's request may take while the holders hold.
const NORMAL_REQUEST_MAX: Duration = Duration::from_secs(2);
/// How long the normal client works beside the holders.
const NORMAL_WORK: Duration = Duration::from_secs(3);

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib.trim().parse::<u64>()? * 1024)
}

fn metric(metrics: &str, name: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == name).then(|| value.parse::<f64>().ok().map(|v| v as u64))?
    })
}

/// A connection authenticated with `token` whose one stream declares a
/// frame of `frame_bytes` and sends `sent_bytes` of it, never the rest.
struct Holder {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    writer: tokio::task::JoinHandle<()>,
}

impl Holder {
    async fn open(broker: &TestBroker, token: &str, frame_bytes: u64) -> anyhow::Result<Holder> {
        let (endpoint, conn) = raw_connection(broker).await?;
        let hello = send_raw(
            &conn,
            &encode_frame(&Request::Authenticate {
                token: token.to_string(),
            })?,
        )
        .await?;
        anyhow::ensure!(matches!(
            decode_frame::<Reply>(&hello)?,
            Reply::Authenticated { .. }
        ));
        let (mut send, _recv) = conn.open_bi().await?;
        let writer = tokio::spawn(async move {
            let _keep = _recv;
            let mut held = (frame_bytes as u32).to_be_bytes().to_vec();
            held.resize(4 + HELD_SENT_BYTES as usize, 7);
            // Blocks once the broker stops granting credit; never finishes.
            let _ = send.write_all(&held).await;
            std::future::pending::<()>().await;
        });
        Ok(Holder {
            _endpoint: endpoint,
            conn,
            writer,
        })
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.writer.abort();
        self.conn.close(0u32.into(), b"done");
    }
}

/// Produce and fetch as a normal client for `NORMAL_WORK`; the slowest
/// request's time.
async fn normal_work(client: &Client, topic: &str) -> anyhow::Result<(Duration, u64)> {
    let producer = client.producer(topic);
    let start = client.describe_topic(topic).await?.partitions[0].end_offset;
    let (mut slowest, mut acked, mut offset) = (Duration::ZERO, 0u64, start);
    let started = Instant::now();
    while started.elapsed() < NORMAL_WORK {
        let t = Instant::now();
        let batch: Vec<_> = (0..20)
            .map(|i| NewMessage::new(format!("payment-{acked}-{i}")))
            .collect();
        acked += producer.send_batch(batch).await?.len() as u64;
        slowest = slowest.max(t.elapsed());
        let t = Instant::now();
        let fetched = client
            .fetch(topic, 0, offset, FetchLimits::default())
            .await?;
        slowest = slowest.max(t.elapsed());
        offset = fetched.next_offset;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(
        offset - start == acked,
        "fetched {} messages, {acked} acknowledged",
        offset - start
    );
    Ok((slowest, acked))
}

/// `principals` holders' tokens with `per_principal` connections each hold
/// unfinished frames; the broker's RSS, its request memory metrics and a
/// normal client's latency are checked meanwhile.
async fn hold_and_measure(principals: usize, per_principal: usize) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--auth",
        "--request-memory-max",
        &format!("{BUDGET_MIB}MiB"),
        "--request-memory-per-principal-max",
        &format!("{SHARE_MIB}MiB"),
    ])?;
    let pid = broker.pid().expect("broker runs");
    let (_, admin) = broker.admin().await?;
    admin.create_topic("payments", 1).await?;
    let mut tokens = Vec::new();
    for p in 0..principals {
        tokens.push(admin.create_token(&format!("holder-{p}")).await?.1);
    }
    // Warm up the normal client's path, then take the baseline.
    normal_work(&admin, "payments").await?;
    let before = rss_bytes(pid)?;

    let mut holders = Vec::new();
    for token in &tokens {
        for _ in 0..per_principal {
            holders.push(Holder::open(&broker, token, HELD_FRAME_BYTES).await?);
        }
    }
    let declared_mib = holders.len() as u64 * HELD_FRAME_BYTES / MIB;
    assert!(
        declared_mib > BUDGET_MIB,
        "the holders must ask for more than the budget"
    );
    // Each principal fills its share with two frames; the rest wait.
    let held = principals as u64 * 2 * HELD_FRAME_BYTES;
    let waiting = (holders.len() - 2 * principals) as u64;
    let http = broker.http.as_deref().expect("metrics on");
    let settled = Instant::now();
    let metrics = loop {
        let metrics = crate::metrics::scrape(http)?;
        let now = (
            metric(&metrics, "msmq_request_memory_reserved_bytes"),
            metric(&metrics, "msmq_request_memory_waiting_streams"),
        );
        if now == (Some(held), Some(waiting)) || settled.elapsed() > Duration::from_secs(10) {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric(&metrics, "msmq_request_memory_reserved_bytes"),
        Some(held),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "msmq_request_memory_waiting_streams"),
        Some(waiting)
    );
    assert_eq!(
        metric(&metrics, "msmq_request_memory_budget_bytes"),
        Some(BUDGET_MIB * MIB)
    );

    let (slowest, acked) = normal_work(&admin, "payments").await?;
    let after = rss_bytes(pid)?;
    let grew_mib = after.saturating_sub(before) as f64 / MIB as f64;
    println!(
        "{} holders of {principals} principal(s) declared {declared_mib} MiB; broker RSS \
         {:.1} -> {:.1} MiB (+{grew_mib:.1} MiB, budget {BUDGET_MIB} MiB, {} MiB held); \
         normal client: {acked} messages, slowest request {slowest:?}",
        holders.len(),
        before as f64 / MIB as f64,
        after as f64 / MIB as f64,
        held / MIB,
    );
    assert!(
        grew_mib <= (BUDGET_MIB + RSS_MARGIN_MIB) as f64,
        "RSS grew {grew_mib:.1} MiB, past the {BUDGET_MIB} MiB budget plus {RSS_MARGIN_MIB} MiB"
    );
    assert!(slowest <= NORMAL_REQUEST_MAX, "{slowest:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_holding_unfinished_frames_stays_within_its_share() -> anyhow::Result<()> {
    hold_and_measure(1, 24).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_principals_holding_unfinished_frames_stay_within_the_budget() -> anyhow::Result<()> {
    hold_and_measure(4, 8).await
}

/// Send a frame of `len` garbage bytes; the reply's error code.
async fn frame_of(conn: &quinn::Connection, len: u64) -> anyhow::Result<ErrorCode> {
    let mut frame = (len as u32).to_be_bytes().to_vec();
    frame.resize(4 + len as usize, 0xff);
    match decode_frame::<Reply>(&send_raw(conn, &frame).await?)? {
        Reply::Error(e) => Ok(e.code),
        other => anyhow::bail!("garbage answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_at_a_limit_are_read_and_one_byte_past_it_are_refused() -> anyhow::Result<()> {
    const SHARE: u64 = 64 * 1024;
    let broker = TestBroker::start_with(&[
        "--auth",
        "--request-memory-max",
        "1MiB",
        "--request-memory-per-principal-max",
        &SHARE.to_string(),
    ])?;
    let (admin_token, _admin) = broker.admin().await?;
    // Before authenticating: small frames only, whatever the share.
    let (_endpoint, conn) = raw_connection(&broker).await?;
    let unauthenticated = 4096;
    assert_eq!(
        frame_of(&conn, unauthenticated).await?,
        ErrorCode::BAD_REQUEST
    );
    let refused = frame_of(&conn, unauthenticated + 1).await?;
    assert_eq!(refused, ErrorCode::FRAME_TOO_LARGE);
    // Authenticated: up to the share; the connection stays usable.
    let hello = send_raw(
        &conn,
        &encode_frame(&Request::Authenticate { token: admin_token })?,
    )
    .await?;
    assert!(matches!(
        decode_frame::<Reply>(&hello)?,
        Reply::Authenticated { .. }
    ));
    assert_eq!(frame_of(&conn, SHARE).await?, ErrorCode::BAD_REQUEST);
    assert_eq!(
        frame_of(&conn, SHARE + 1).await?,
        ErrorCode::FRAME_TOO_LARGE
    );
    assert!(matches!(
        decode_frame::<Reply>(&send_raw(&conn, &encode_frame(&Request::Ping)?).await?)?,
        Reply::Pong { .. }
    ));
    let metrics = crate::metrics::scrape(broker.http.as_deref().expect("metrics on"))?;
    assert!(
        metrics.contains("msmq_client_limit_hits_total{limit=\"request_memory\"} 2"),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "msmq_request_memory_reserved_bytes"),
        Some(0)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_share_waits_and_every_request_succeeds() -> anyhow::Result<()> {
    // Sixteen 500 KB produces at once on one connection, against a share
    // that holds two: the rest wait unread (QUIC holds the client back),
    // none fails, none waits out the read timeout.
    const PAYLOAD_BYTES: usize = 500 * 1000;
    const SENDS: usize = 16;
    let broker = TestBroker::start_with(&[
        "--request-memory-max",
        "4MiB",
        "--request-memory-per-principal-max",
        "1MiB",
        "--request-read-timeout",
        "5s",
    ])?;
    let client = broker.client().await?;
    client.create_topic("big", 4).await?;
    let producer = client.producer("big");
    let started = Instant::now();
    // Separate tasks, so the runtime (not this test) orders their writes.
    let sends: Vec<_> = (0..SENDS)
        .map(|i| {
            let producer = producer.clone();
            tokio::spawn(async move {
                producer
                    .send_batch(vec![NewMessage::new(vec![i as u8; PAYLOAD_BYTES])])
                    .await
            })
        })
        .collect();
    for send in sends {
        send.await??;
    }
    let took = started.elapsed();
    let stored: u64 = client
        .describe_topic("big")
        .await?
        .partitions
        .iter()
        .map(|p| p.end_offset)
        .sum();
    assert_eq!(stored, SENDS as u64);
    let metrics = crate::metrics::scrape(broker.http.as_deref().expect("metrics on"))?;
    assert_eq!(
        metric(&metrics, "msmq_request_memory_reserved_bytes"),
        Some(0)
    );
    println!("{SENDS} produces of {PAYLOAD_BYTES} bytes through a 1 MiB share took {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    Ok(())
}

/// Declare a frame of `frame_bytes` on a new stream, send `sent_bytes` of
/// it once the broker granted credit for it, then reset the stream.
async fn abandon_frame(
    conn: &quinn::Connection,
    frame_bytes: u32,
    sent_bytes: usize,
) -> anyhow::Result<()> {
    let (mut send, _recv) = conn.open_bi().await?;
    let mut frame = frame_bytes.to_be_bytes().to_vec();
    frame.resize(4 + sent_bytes, 1);
    send.write_all(&frame).await?;
    // Give the broker time to reserve the frame and grant its credit.
    tokio::time::sleep(Duration::from_millis(200)).await;
    send.reset(0u32.into())?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoning_started_frames_is_tolerated_up_to_the_window_and_closed_past_it(
) -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let (_endpoint, conn) = raw_connection(&broker).await?;
    // 64 KiB left unused: within the 128 KiB the connection may hold.
    abandon_frame(&conn, 96 * 1024, 32 * 1024).await?;
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert!(matches!(
        decode_frame::<Reply>(&send_raw(&conn, &encode_frame(&Request::Ping)?).await?)?,
        Reply::Pong { .. }
    ));
    // Another 1 MiB: past it, the connection is closed with the reason.
    abandon_frame(&conn, 1024 * 1024 + 32 * 1024, 32 * 1024).await?;
    crate::bad_input::closed_with(&conn, ErrorCode::BAD_REQUEST);
    let reason = format!("{:?}", conn.close_reason());
    assert!(reason.contains("finish every frame you start"), "{reason}");
    let metrics = crate::metrics::scrape(broker.http.as_deref().expect("metrics on"))?;
    assert!(
        metrics.contains("msmq_client_limit_hits_total{limit=\"abandoned_frames\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_the_caller_gives_up_on_is_finished_and_the_connection_kept() -> anyhow::Result<()>
{
    let broker = TestBroker::start_with(&["--request-memory-per-principal-max", "3MiB"])?;
    let client = broker.client().await?;
    client.create_topic("big", 1).await?;
    // Another connection of the same address holds 2.5 MiB of the share
    // with a frame it never finishes.
    let (_endpoint, holder) = raw_connection(&broker).await?;
    let (mut held, _reply) = holder.open_bi().await?;
    let mut frame = (5u32 << 19).to_be_bytes().to_vec();
    frame.resize(4 + (1 << 20), 7);
    held.write_all(&frame).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    // So a 2 MB produce waits for the share, part-written; its caller gives up.
    let producer = client.producer("big");
    let send = producer.send_batch(vec![NewMessage::new(vec![1u8; 2_000_000])]);
    assert!(tokio::time::timeout(Duration::from_millis(500), send)
        .await
        .is_err());
    // The holder goes; the abandoned produce is reserved and finished in the
    // background, so nothing is held against the client's connection.
    holder.close(0u32.into(), b"done");
    let stored = Instant::now();
    while client.describe_topic("big").await?.partitions[0].end_offset < 1 {
        anyhow::ensure!(stored.elapsed() < Duration::from_secs(10), "never stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producer.send(NewMessage::new("after")).await?;
    let metrics = crate::metrics::scrape(broker.http.as_deref().expect("metrics on"))?;
    assert!(!metrics.contains("abandoned_frames"), "{metrics}");
    Ok(())
}
