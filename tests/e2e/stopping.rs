//! Long-running client commands stopped by a signal (SIGTERM from `kill`,
//! `timeout` or systemd, SIGINT from Ctrl-C, SIGHUP from a closed terminal):
//! they commit what they printed, leave their groups and exit 0.

use crate::harness::{cli, CliProcess, TestBroker};
use msmq_client::{ConsumerOptions, FetchLimits, NewMessage};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_stopped_by_sigterm_hands_its_partitions_over_at_once() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    let producer = client.producer("payments");
    let early: Vec<NewMessage> = (0..20)
        .map(|i| NewMessage::new(format!("early-{i}")))
        .collect();
    producer.send_batch(early).await?;

    // Its session (10 s by default) outlasts the 1 s below: only leaving
    // frees its partitions in time.
    let consumer = CliProcess::spawn(&broker, &["consume", "payments", "--group", "g", "--json"])?;
    let mut printed = Vec::new();
    while printed.len() < 20 {
        let line = consumer
            .line(Duration::from_secs(20))
            .ok_or_else(|| anyhow::anyhow!("consumer printed only {printed:?}"))?;
        let value: serde_json::Value = serde_json::from_str(&line)?;
        printed.push(value["payload"].as_str().unwrap_or_default().to_string());
    }
    // Now it long-polls an empty group.
    let (status, rest, stderr) = consumer.stop("TERM", Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status:?}; stderr: {stderr}");
    assert!(rest.is_empty(), "printed after the signal: {rest:?}");
    assert!(stderr.contains("SIGTERM received"), "{stderr}");

    // Everything printed was committed.
    let group = client.describe_group("g").await?;
    let committed: u64 = group
        .offsets
        .iter()
        .filter_map(|o| o.committed_offset)
        .sum();
    assert_eq!(committed, 20, "{group:?}");
    assert!(group.members.is_empty(), "still a member: {group:?}");

    // A second member of the group gets the next message within 1 s.
    let mut second = client
        .consumer(
            "g",
            &["payments"],
            ConsumerOptions {
                session_timeout: Duration::from_secs(30),
                limits: FetchLimits {
                    max_messages: 100,
                    max_bytes: 1 << 20,
                    max_wait_ms: 200,
                },
                ..ConsumerOptions::default()
            },
        )
        .await?;
    assert_eq!(
        second.assignment().partitions.len(),
        2,
        "the stopped consumer still owns partitions"
    );
    producer.send(NewMessage::new("next")).await?;
    let produced_at = Instant::now();
    let mut got = Vec::new();
    while got.is_empty() && produced_at.elapsed() < Duration::from_secs(1) {
        got.extend(second.poll().await?);
    }
    let waited = produced_at.elapsed();
    let payloads: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.message.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        vec!["next"],
        "only the new message, nothing printed before"
    );
    assert!(waited < Duration::from_secs(1), "took {waited:?}");
    Ok(())
}

#[test]
fn tx_send_waiting_for_a_check_back_stops_on_sigint() -> anyhow::Result<()> {
    // The first check-back is far away: the command waits until the signal.
    let broker = TestBroker::start_with(&["--transaction-timeout", "60s"])?;
    let created = cli(
        &broker,
        &["topic", "create", "payments", "--partitions", "1"],
        None,
    )?;
    assert!(created.status.success());
    let tx = CliProcess::spawn(
        &broker,
        &[
            "tx",
            "send",
            "payments",
            "undecided",
            "--action",
            "unknown",
            "--wait",
            "60s",
        ],
    )?;
    let stored = tx.line(Duration::from_secs(20)).unwrap_or_default();
    assert!(stored.contains("half message stored"), "{stored}");
    let pending = tx.line(Duration::from_secs(20)).unwrap_or_default();
    assert!(pending.contains("Pending"), "{pending}");
    let started = Instant::now();
    let (status, rest, stderr) = tx.stop("INT", Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status:?}; stderr: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(rest.iter().any(|l| l.contains("still pending")), "{rest:?}");
    Ok(())
}

#[test]
fn a_bench_stopped_by_sighup_reports_what_it_measured() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let bench = CliProcess::spawn(
        &broker,
        &[
            "bench",
            "e2e",
            "--count",
            "100000000",
            "--duration",
            "60s",
            "--rate",
            "2000",
            "--size",
            "64",
            "--report-every",
            "200ms",
            "--json",
        ],
    )?;
    // Stop it once an interval shows messages flowing.
    let flowing = Instant::now() + Duration::from_secs(30);
    loop {
        let line = bench
            .line(Duration::from_secs(30))
            .ok_or_else(|| anyhow::anyhow!("the bench printed nothing"))?;
        let interval: serde_json::Value = serde_json::from_str(&line)?;
        if interval["messages_per_sec"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        anyhow::ensure!(Instant::now() < flowing, "no messages flowed: {line}");
    }
    let started = Instant::now();
    let (status, rest, stderr) = bench.stop("HUP", Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status:?}; stderr: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Interval lines may follow; the summary is the last line.
    let summary: serde_json::Value = serde_json::from_str(rest.last().map_or("", |l| l))?;
    let received = summary["messages"].as_u64().unwrap_or(0);
    let sent = summary["sent"].as_u64().unwrap_or(0);
    assert!(received > 0 && sent >= received, "{summary}");
    Ok(())
}
