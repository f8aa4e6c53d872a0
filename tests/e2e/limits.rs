//! Limits against abusive clients, over real QUIC: request rate with
//! cut-off, connections per principal, streams per connection, request
//! read timeout and in-flight bytes.

use crate::bad_input::{closed_with, raw_connection, send_raw};
use crate::harness::TestBroker;
use msmq_client::protocol::{decode_frame, encode_frame, Reply, Request};
use msmq_client::{Client, ClientError, ErrorCode, FetchLimits, NewMessage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RATE_PER_SEC: u32 = 50;
const REFUSALS_BEFORE_CUTOFF: u32 = 256;
/// Longest a flood may run before the test gives up on the cut-off.
const FLOOD_TIME_MAX: Duration = Duration::from_secs(20);

async fn ping_raw(conn: &quinn::Connection) -> anyhow::Result<Reply> {
    let reply = send_raw(conn, &encode_frame(&Request::Ping)?).await?;
    Ok(decode_frame::<Reply>(&reply)?)
}

/// Send `n` pings at once; returns (answered, refused for rate).
async fn burst(conn: &quinn::Connection, n: usize) -> anyhow::Result<(usize, usize)> {
    let replies = futures::future::join_all((0..n).map(|_| ping_raw(conn))).await;
    let (mut pongs, mut refused) = (0, 0);
    for reply in replies {
        match reply? {
            Reply::Pong { .. } => pongs += 1,
            Reply::Error(e) if e.code == ErrorCode::RATE_LIMITED => {
                assert!(e.retry_after_ms.is_some(), "a refusal says when to retry");
                refused += 1;
            }
            other => anyhow::bail!("unexpected reply {other:?}"),
        }
    }
    Ok((pongs, refused))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_cut_off_and_a_good_client_keeps_working() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--requests-per-sec-per-connection-max",
        &RATE_PER_SEC.to_string(),
        "--refused-requests-before-cutoff",
        &REFUSALS_BEFORE_CUTOFF.to_string(),
        "--cutoff-ban",
        "1s",
        "--streams-per-connection-max",
        "128",
    ])?;
    let good = broker.client().await?;
    good.create_topic("orders", 1).await?;

    // At the limit: a fresh connection's first second of requests passes.
    let (_endpoint, conn) = raw_connection(&broker).await?;
    let (pongs, refused) = burst(&conn, RATE_PER_SEC as usize).await?;
    assert_eq!((pongs, refused), (RATE_PER_SEC as usize, 0));
    // Past it: the bucket is empty, so most of the next burst is refused.
    let (_, refused) = burst(&conn, 100).await?;
    // (Sending them would have to take over 1.5 s for fewer to be refused.)
    assert!(refused >= 25, "only {refused} of 100 refused past the rate");
    conn.close(0u32.into(), b"done");

    // A flooder that ignores refusals, beside a client that behaves.
    let (_endpoint, flood) = raw_connection(&broker).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..64)
        .map(|_| {
            let (flood, sent) = (flood.clone(), sent.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                while started.elapsed() < FLOOD_TIME_MAX {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if ping_raw(&flood).await.is_err() && flood.close_reason().is_some() {
                        break;
                    }
                }
            })
        })
        .collect();
    let producer = good.producer("orders");
    let mut acked = 0;
    let started = Instant::now();
    while flood.close_reason().is_none() && started.elapsed() < FLOOD_TIME_MAX {
        let batch: Vec<_> = (0..10)
            .map(|i| NewMessage::new(format!("o-{acked}-{i}")))
            .collect();
        acked += producer.send_batch(batch).await?.len();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for f in flooders {
        f.await?;
    }
    closed_with(&flood, ErrorCode::RATE_LIMITED);
    let reason = format!("{:?}", flood.close_reason());
    assert!(reason.contains("cut off"), "{reason}");
    println!(
        "flooder cut off after {} requests in {:?}; the good client had {acked} messages acknowledged",
        sent.load(Ordering::Relaxed),
        started.elapsed()
    );
    // The flooder's address may not come back at once; after the ban it may.
    assert!(Client::connect(broker.options()).await.is_err());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    Client::connect(broker.options()).await?.ping().await?;
    // The good client keeps working after the cut-off, and lost nothing.
    acked += producer.send(NewMessage::new("after")).await.map(|_| 1)?;
    let end = good.describe_topic("orders").await?.partitions[0].end_offset;
    assert_eq!(end, acked as u64);
    let metrics = crate::metrics::scrape(broker.http.as_deref().expect("metrics on"))?;
    assert!(
        metrics.contains("msmq_client_limit_hits_total{limit=\"cut_off\"} 1"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_token_is_banned_and_other_principals_are_not() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--auth",
        "--requests-per-sec-per-connection-max",
        &RATE_PER_SEC.to_string(),
        "--refused-requests-before-cutoff",
        &REFUSALS_BEFORE_CUTOFF.to_string(),
        "--streams-per-connection-max",
        "128",
    ])?;
    let (admin_token, admin) = broker.admin().await?;
    let (_, token) = admin.create_token("flood").await?;
    let (_endpoint, flood) = raw_connection(&broker).await?;
    let hello = send_raw(
        &flood,
        &encode_frame(&Request::Authenticate {
            token: token.clone(),
        })?,
    )
    .await?;
    assert!(matches!(
        decode_frame::<Reply>(&hello)?,
        Reply::Authenticated { .. }
    ));
    let started = Instant::now();
    while flood.close_reason().is_none() && started.elapsed() < FLOOD_TIME_MAX {
        let _ = burst(&flood, 64).await;
    }
    closed_with(&flood, ErrorCode::RATE_LIMITED);
    // The principal is banned: its token cannot authenticate a new connection.
    match Client::connect(broker.options().token(&token)).await {
        Err(ClientError::Broker(e)) => {
            assert_eq!(e.code, ErrorCode::RATE_LIMITED);
            assert!(e.retry_after_ms.is_some_and(|ms| ms > 0), "{e}");
        }
        other => panic!("a banned principal must be refused, got {:?}", other.err()),
    }
    // Another principal from the same address is not.
    Client::connect(broker.options().token(&admin_token))
        .await?
        .ping()
        .await?;
    admin.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_backs_off_on_refusals_instead_of_failing() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--requests-per-sec-per-connection-max", "50"])?;
    let client = broker.client().await?;
    // 150 requests at once on one connection: three seconds' worth.
    let started = Instant::now();
    let pings = futures::future::join_all((0..150).map(|_| client.ping())).await;
    for ping in pings {
        ping?;
    }
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // A client keeping its whole stream allowance busy far past the rate is
    // slowed down but never cut off, because it waits as told.
    let broker = TestBroker::start_with(&[
        "--requests-per-sec-per-connection-max",
        "200",
        "--streams-per-connection-max",
        "256",
        "--refused-requests-before-cutoff",
        "512",
    ])?;
    let busy = Client::connect(broker.options().rate_limited_retries(30)).await?;
    let started = Instant::now();
    let pings = futures::future::join_all((0..1000).map(|_| busy.ping())).await;
    let failed: Vec<_> = pings.into_iter().filter_map(Result::err).collect();
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3), "{took:?}");
    let metrics = crate::metrics::scrape(broker.http.as_deref().expect("metrics on"))?;
    assert!(!metrics.contains("limit=\"cut_off\""), "{metrics}");
    println!("1000 pings at 200/s over 256 streams took {took:?}");
    // Without retries the refusal comes back to the caller.
    let impatient = Client::connect(broker.options().rate_limited_retries(0)).await?;
    let results = futures::future::join_all((0..300).map(|_| impatient.ping())).await;
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.code() == Some(ErrorCode::RATE_LIMITED)))
        .count();
    assert!(refused > 0);
    Ok(())
}

/// With `open` connections already up, one more is refused with
/// `TOO_MANY_CONNECTIONS`; its close reason.
async fn one_more_is_refused(broker: &TestBroker) -> anyhow::Result<String> {
    let err = match Client::connect(broker.options()).await {
        Ok(extra) => extra
            .ping()
            .await
            .map(|_| ())
            .expect_err("one connection past the limit is refused"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Some(ErrorCode::TOO_MANY_CONNECTIONS), "{err}");
    Ok(err.close_reason().unwrap_or_default().to_string())
}

/// A new connection that answers a ping, once a place frees.
async fn connects_again(broker: &TestBroker) -> anyhow::Result<Client> {
    for _ in 0..50 {
        if let Ok(c) = broker.client().await {
            if c.ping().await.is_ok() {
                return Ok(c);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("no place freed after a connection closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_wide_connection_limit_holds_at_the_limit_and_refuses_one_past_it(
) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--connections-max", "3"])?;
    let mut open = Vec::new();
    for _ in 0..3 {
        let c = broker.client().await?;
        c.ping().await?;
        open.push(c);
    }
    let reason = one_more_is_refused(&broker).await?;
    assert!(reason.contains("connections_max"), "{reason}");
    let metrics = crate::metrics::scrape(broker.http.as_deref().unwrap_or_default())?;
    assert!(
        metrics.contains("msmq_client_limit_hits_total{limit=\"broker_connections\"}"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "msmq_connections_open 3"),
        "{metrics}"
    );
    open.remove(0).close().await;
    connects_again(&broker).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_principal_hold_at_the_limit_and_refuse_one_past_it() -> anyhow::Result<()>
{
    // Unauthenticated: counted per address, under their own limit.
    let broker = TestBroker::start_with(&[
        "--unauthenticated-connections-per-address-max",
        "2",
        "--connections-per-principal-max",
        "1",
    ])?;
    let first = broker.client().await?;
    let second = broker.client().await?;
    first.ping().await?;
    second.ping().await?;
    let reason = one_more_is_refused(&broker).await?;
    assert!(
        reason.contains("unauthenticated_connections_per_address_max"),
        "{reason}"
    );
    // A closed connection frees its place.
    first.close().await;
    connects_again(&broker).await?;
    drop(broker);

    // With tokens: counted per principal once authenticated.
    let broker = TestBroker::start_with(&["--auth", "--connections-per-principal-max", "2"])?;
    let (admin_token, admin) = broker.admin().await?;
    let (_, token) = admin.create_token("app").await?;
    let a = Client::connect(broker.options().token(&token)).await?;
    let b = Client::connect(broker.options().token(&token)).await?;
    a.ping().await?;
    b.ping().await?;
    let refused = Client::connect(broker.options().token(&token)).await;
    match refused {
        Err(ClientError::Broker(e)) => {
            assert_eq!(e.code, ErrorCode::TOO_MANY_CONNECTIONS);
            assert!(e.message.contains("\"app\""), "{}", e.message);
        }
        other => panic!(
            "a third connection of app must be refused, got {:?}",
            other.err()
        ),
    }
    // Another principal is not affected.
    Client::connect(broker.options().token(&admin_token))
        .await?
        .ping()
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_hold_at_the_limit_and_queue_one_past_it() -> anyhow::Result<()> {
    const STREAMS: usize = 4;
    const WAIT_MS: u32 = 1500;
    let broker = TestBroker::start_with(&["--streams-per-connection-max", &STREAMS.to_string()])?;
    let client = broker.client().await?;
    client.create_topic("quiet", 1).await?;
    let long_poll = || {
        client.fetch(
            "quiet",
            0,
            0,
            FetchLimits {
                max_wait_ms: WAIT_MS,
                ..FetchLimits::default()
            },
        )
    };
    // One stream short of the limit: a ping goes straight through.
    let ping_beside = |polls: usize| {
        let client = &client;
        let long_poll = &long_poll;
        async move {
            let polls = futures::future::join_all((0..polls).map(|_| long_poll()));
            let ping = async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let started = Instant::now();
                client.ping().await.map(|_| started.elapsed())
            };
            let (polls, ping) = tokio::join!(polls, ping);
            for p in polls {
                p?;
            }
            anyhow::Ok(ping?)
        }
    };
    let quick = ping_beside(STREAMS - 1).await?;
    assert!(quick < Duration::from_millis(1000), "{quick:?}");
    // At the limit, the next request waits for a stream to end.
    let queued = ping_beside(STREAMS).await?;
    assert!(queued >= Duration::from_millis(1000), "{queued:?}");
    println!(
        "ping beside {} long polls: {quick:?}; beside {STREAMS}: {queued:?}",
        STREAMS - 1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_times_out_and_a_large_one_fits_a_small_budget() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--request-read-timeout",
        "300ms",
        "--in-flight-bytes-per-connection-max",
        "4096",
    ])?;
    let (_endpoint, conn) = raw_connection(&broker).await?;
    // A header promising 100 body bytes, then nothing.
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&100u32.to_be_bytes()).await?;
    let started = Instant::now();
    let reply = recv.read_to_end(1 << 20).await?;
    let reply = decode_frame::<Reply>(&reply)?;
    match reply {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::BAD_REQUEST);
            assert!(e.message.contains("request_read_timeout"), "{}", e.message);
        }
        other => panic!("expected a timeout error, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(250));
    // The connection is still good.
    assert!(matches!(ping_raw(&conn).await?, Reply::Pong { .. }));

    // Requests far above the 4 KiB in-flight budget are served one at a time:
    // one waits for the budget a long poll on the same connection holds.
    let client = broker.client().await?;
    client.create_topic("big", 1).await?;
    client.create_topic("quiet", 1).await?;
    let long_poll = client.fetch(
        "quiet",
        0,
        0,
        FetchLimits {
            max_wait_ms: 1500,
            ..FetchLimits::default()
        },
    );
    let big_send = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        client
            .producer("big")
            .send(NewMessage::new(vec![1u8; 64 * 1024]))
            .await
            .map(|_| started.elapsed())
    };
    let (polled, waited) = tokio::join!(long_poll, big_send);
    polled?;
    let waited = waited?;
    assert!(waited >= Duration::from_millis(1000), "{waited:?}");
    let producer = client.producer("big");
    let sends = futures::future::join_all(
        (0..8).map(|i| producer.send(NewMessage::new(vec![i as u8; 64 * 1024]))),
    )
    .await;
    for send in sends {
        send?;
    }
    assert_eq!(
        client.describe_topic("big").await?.partitions[0].end_offset,
        9
    );
    Ok(())
}
