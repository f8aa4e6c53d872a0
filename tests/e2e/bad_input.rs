//! Every kind of bad input gets its error code; the broker keeps serving and
//! loses nothing acknowledged.

use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::{encode_frame, Reply, Request};
use msmq_client::{ClientError, ErrorCode, FetchLimits, NewMessage};

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> ErrorCode {
    match r {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("no broker error code in {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_and_bad_arguments_get_their_codes() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--partitions-max", "8"])?;
    let client = broker.client().await?;
    let p = client.producer("nope");
    assert_eq!(
        code(p.send(NewMessage::new("x")).await),
        ErrorCode::UNKNOWN_TOPIC
    );
    assert_eq!(
        code(client.describe_topic("nope").await),
        ErrorCode::UNKNOWN_TOPIC
    );
    assert_eq!(
        code(client.delete_topic("nope").await),
        ErrorCode::UNKNOWN_TOPIC
    );
    assert_eq!(
        code(client.fetch("nope", 0, 0, FetchLimits::default()).await),
        ErrorCode::UNKNOWN_TOPIC
    );
    assert_eq!(
        code(
            client
                .consumer("g", &["nope"], Default::default())
                .await
                .map(|_| ())
        ),
        ErrorCode::UNKNOWN_TOPIC
    );
    assert_eq!(
        code(client.describe_group("nobody").await),
        ErrorCode::UNKNOWN_GROUP
    );

    // Partition counts: 0 and max+1 refused, max accepted.
    assert_eq!(
        code(client.create_topic("t0", 0).await),
        ErrorCode::INVALID_ARGUMENT
    );
    assert_eq!(
        code(client.create_topic("t9", 9).await),
        ErrorCode::INVALID_ARGUMENT
    );
    client.create_topic("t8", 8).await?;
    assert_eq!(
        code(client.create_topic("t8", 8).await),
        ErrorCode::TOPIC_EXISTS
    );
    assert_eq!(
        code(client.create_topic("bad name", 1).await),
        ErrorCode::INVALID_ARGUMENT
    );

    let producer = client.producer("t8");
    assert_eq!(
        code(
            producer
                .send_to_partition(8, vec![NewMessage::new("x")])
                .await
        ),
        ErrorCode::UNKNOWN_PARTITION
    );
    assert_eq!(
        code(producer.send_batch(vec![]).await),
        ErrorCode::INVALID_ARGUMENT
    );
    assert_eq!(
        code(client.fetch("t8", 8, 0, FetchLimits::default()).await),
        ErrorCode::UNKNOWN_PARTITION
    );
    assert_eq!(
        code(client.fetch("t8", 0, 5, FetchLimits::default()).await),
        ErrorCode::OFFSET_OUT_OF_RANGE
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_limits_hold_at_the_limit_and_refuse_one_past_it() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--message-bytes-max",
        "1000",
        "--batch-bytes-max",
        "3000",
        "--batch-messages-max",
        "5",
    ])?;
    let client = broker.client().await?;
    client.create_topic("sized", 1).await?;
    let producer = client.producer("sized");
    // Message: payload + key + tag + headers count.
    producer.send(NewMessage::new(vec![1u8; 1000])).await?;
    let with_key = NewMessage::new(vec![1u8; 990]).with_key(vec![2u8; 10]);
    producer.send(with_key).await?;
    assert_eq!(
        code(producer.send(NewMessage::new(vec![1u8; 1001])).await),
        ErrorCode::MESSAGE_TOO_LARGE
    );
    let over_by_header = NewMessage::new(vec![1u8; 999]).with_header("h", "x");
    assert_eq!(
        code(producer.send(over_by_header).await),
        ErrorCode::MESSAGE_TOO_LARGE
    );
    // Batch bytes: 3 × 1000 fits, 3 × 1000 + 1 does not.
    producer
        .send_batch(vec![NewMessage::new(vec![0u8; 1000]); 3])
        .await?;
    let mut over = vec![NewMessage::new(vec![0u8; 1000]); 3];
    over.push(NewMessage::new(vec![0u8; 1]));
    assert_eq!(
        code(producer.send_batch(over).await),
        ErrorCode::BATCH_TOO_LARGE
    );
    // Batch count: 5 fits, 6 does not.
    producer.send_batch(vec![NewMessage::new("x"); 5]).await?;
    assert_eq!(
        code(producer.send_batch(vec![NewMessage::new("x"); 6]).await),
        ErrorCode::BATCH_TOO_LARGE
    );
    // Refused batches wrote nothing: 1 + 1 + 3 + 5 messages.
    assert_eq!(read_all(&client, "sized", 0, 0).await?.len(), 10);
    Ok(())
}

/// A raw QUIC connection speaking the framing by hand.
pub(crate) async fn raw_connection(
    broker: &TestBroker,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let config = broker.options().quic_client_config()?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = endpoint
        .connect_with(config, broker.addr, "localhost")?
        .await?;
    Ok((endpoint, conn))
}

pub(crate) async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(bytes).await?;
    send.finish()?;
    Ok(recv.read_to_end(1 << 20).await?)
}

pub(crate) fn closed_with(conn: &quinn::Connection, want: ErrorCode) {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(want.0 as u32),
                "{close:?}"
            );
            assert!(!close.reason.is_empty(), "a reason is given");
        }
        other => panic!("expected an application close with {want}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_and_oversize_frames() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("safe", 1).await?;
    let acked = client
        .producer("safe")
        .send(NewMessage::new("kept"))
        .await?;

    // A well-framed body that is not a request: BAD_REQUEST reply, connection stays.
    let (_e1, conn) = raw_connection(&broker).await?;
    let mut garbage = 5u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff]);
    let reply = send_raw(&conn, &garbage).await?;
    match msmq_client::protocol::frame::decode_frame::<Reply>(&reply)? {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::BAD_REQUEST),
        other => panic!("expected BAD_REQUEST, got {other:?}"),
    }
    let ping = encode_frame(&Request::Ping)?;
    let reply = send_raw(&conn, &ping).await?;
    assert!(matches!(
        msmq_client::protocol::frame::decode_frame::<Reply>(&reply)?,
        Reply::Pong { .. }
    ));

    // Truncated: the header promises more than the stream carries.
    let (_e2, conn) = raw_connection(&broker).await?;
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0u8; 10]);
    assert!(send_raw(&conn, &truncated).await.is_err());
    conn.closed().await;
    closed_with(&conn, ErrorCode::BAD_REQUEST);

    // Trailing bytes after the body.
    let (_e3, conn) = raw_connection(&broker).await?;
    let mut long = encode_frame(&Request::Ping)?;
    long.extend_from_slice(b"extra");
    assert!(send_raw(&conn, &long).await.is_err());
    conn.closed().await;
    closed_with(&conn, ErrorCode::BAD_REQUEST);

    // A header past the frame limit: closed before the body is read.
    let (_e4, conn) = raw_connection(&broker).await?;
    let oversize = ((msmq_client::protocol::FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
    assert!(send_raw(&conn, &oversize).await.is_err());
    conn.closed().await;
    closed_with(&conn, ErrorCode::FRAME_TOO_LARGE);

    // A client that disconnects mid-request: half a produce, then gone.
    let (e5, conn) = raw_connection(&broker).await?;
    let frame = encode_frame(&Request::Produce {
        topic: "safe".into(),
        partition: None,
        messages: vec![NewMessage::new(vec![7u8; 50_000])],
    })?;
    let (mut send, _recv) = conn.open_bi().await?;
    send.write_all(&frame[..frame.len() / 2]).await?;
    conn.close(0u32.into(), b"gone");
    e5.wait_idle().await;

    // The broker still serves, the half request wrote nothing, the ack holds.
    let messages = read_all(&client, "safe", 0, 0).await?;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].offset, acked.offset);
    assert_eq!(messages[0].payload, b"kept");
    client.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_certificate_is_told_what_to_do() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let missing = msmq_client::ClientOptions::default()
        .server(broker.addr.to_string())
        .ca_file(broker.dir.path().join("missing.pem"));
    let err = msmq_client::Client::connect(missing)
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    // A certificate that does not match: the handshake fails, not a hang.
    let other = tempfile::tempdir()?;
    let pem = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?
        .cert
        .pem();
    std::fs::write(other.path().join("other.pem"), pem)?;
    let wrong = msmq_client::ClientOptions::default()
        .server(broker.addr.to_string())
        .ca_file(other.path().join("other.pem"));
    assert!(matches!(
        msmq_client::Client::connect(wrong).await,
        Err(ClientError::Connect { .. })
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_certificate_and_key_are_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certified = rcgen::generate_simple_self_signed(vec!["broker.test".to_string()])?;
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::write(&cert, certified.cert.pem())?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;
    let broker = TestBroker::start_with(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ])?;
    assert!(
        !broker.cert().exists(),
        "no self-signed certificate when one is given"
    );
    let mut options = msmq_client::ClientOptions::default()
        .server(broker.addr.to_string())
        .ca_file(&cert);
    options.server_name = "broker.test".into();
    let client = msmq_client::Client::connect(options).await?;
    client.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_sends_fail_only_for_the_culprit() -> anyhow::Result<()> {
    let broker =
        TestBroker::start_with(&["--message-bytes-max", "1000", "--batch-bytes-max", "3000"])?;
    let client = broker.client().await?;
    client.create_topic("sized", 1).await?;
    let producer = client.producer("sized");
    // Concurrent single sends travel together; together they exceed the
    // batch limit and one of them the message limit.
    let mut tasks = Vec::new();
    for i in 0..12 {
        let producer = producer.clone();
        let size = if i == 5 { 1001 } else { 1000 };
        tasks.push(tokio::spawn(async move {
            producer.send(NewMessage::new(vec![i as u8; size])).await
        }));
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await? {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(i, 5, "only the oversize message fails: {e}");
                assert_eq!(e.code(), Some(ErrorCode::MESSAGE_TOO_LARGE));
            }
        }
    }
    assert_eq!(ok, 11);
    assert_eq!(read_all(&client, "sized", 0, 0).await?.len(), 11);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_producers_until_consumers_catch_up() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--backlog-messages-max", "100"])?;
    let client = broker.client().await?;
    client.create_topic("surge", 1).await?;
    let producer = client.producer("surge");
    producer.send_batch(vec![NewMessage::new("x"); 100]).await?; // at the limit
    let full = producer
        .send(NewMessage::new("one too many"))
        .await
        .expect_err("refused");
    assert_eq!(full.code(), Some(ErrorCode::BACKLOG_FULL));
    assert!(full.is_retryable());
    match &full {
        ClientError::Broker(reply) => assert_eq!(reply.retry_after_ms, Some(1000)),
        other => panic!("{other}"),
    }
    // A consumer group works off half; the slowest group sets the backlog.
    let options = msmq_client::ConsumerOptions {
        limits: FetchLimits {
            max_messages: 50,
            max_bytes: 1 << 20,
            max_wait_ms: 100,
        },
        ..Default::default()
    };
    let mut consumer = client.consumer("drain", &["surge"], options).await?;
    assert_eq!(consumer.poll().await?.len(), 50);
    consumer.commit().await?;
    producer.send_batch(vec![NewMessage::new("y"); 50]).await?;
    assert_eq!(
        producer
            .send(NewMessage::new("z"))
            .await
            .err()
            .and_then(|e| e.code()),
        Some(ErrorCode::BACKLOG_FULL)
    );
    assert_eq!(
        read_all(&client, "surge", 0, 0).await?.len(),
        150,
        "refused messages were not stored"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_ending_mid_frame_are_logged_once_per_connection() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let (endpoint, conn) = raw_connection(&broker).await?;
    // 40 requests each promise 1,000 bytes, carry 10 and end their streams.
    let mut streams = Vec::new();
    for _ in 0..40 {
        let (mut send, recv) = conn.open_bi().await?;
        let mut half = 1000u32.to_be_bytes().to_vec();
        half.extend_from_slice(&[0u8; 10]);
        send.write_all(&half).await?;
        streams.push((send, recv));
    }
    for (send, _) in &mut streams {
        let _ = send.finish();
    }
    conn.closed().await;
    closed_with(&conn, ErrorCode::BAD_REQUEST);
    drop(streams);
    endpoint.wait_idle().await;
    // The broker logs it when the connection's accept loop ends.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let lines = loop {
        let log = broker.log();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("framing"))
            .map(str::to_string)
            .collect();
        if !lines.is_empty() || std::time::Instant::now() >= deadline {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 1, "one warning for the connection: {lines:#?}");
    assert!(
        lines[0].contains("bad_streams") && lines[0].contains("truncated frame"),
        "{}",
        lines[0]
    );
    // The broker keeps serving.
    broker.client().await?.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committing_a_partition_the_topic_lacks_is_unknown_partition() -> anyhow::Result<()> {
    use msmq_client::protocol::PartitionOffset;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    let consumer = client
        .consumer("billing", &["payments"], Default::default())
        .await?;
    let commit = |partition: u32| Request::CommitOffsets {
        group: "billing".into(),
        member_id: consumer.member_id(),
        generation: consumer.assignment().generation,
        offsets: vec![PartitionOffset {
            topic: "payments".into(),
            partition,
            offset: 0,
        }],
    };
    // The last partition is fine; one past it does not exist.
    assert!(matches!(client.request(&commit(1)).await?, Reply::Done));
    assert_eq!(
        code(client.request(&commit(2)).await),
        ErrorCode::UNKNOWN_PARTITION
    );
    Ok(())
}
