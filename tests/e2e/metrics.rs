//! The Prometheus endpoint: every metric family is there, with values that
//! match what the test did.

use crate::harness::TestBroker;
use crate::plugins::{deploy, rust_component, spec, wait_stats};
use msmq_client::protocol::NewMessage;
use msmq_client::ConsumerOptions;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

/// GET /metrics over plain HTTP/1.1; returns the body.
pub(crate) fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP body: {response}"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_string())
}

/// `name{labels}` → value, for every sample line.
fn samples(text: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| anyhow::anyhow!("bad line {line:?}"))?;
        out.insert(name.to_string(), value.parse()?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_shows_every_family_with_plausible_values() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let http = broker.http.clone().expect("metrics are served by default");
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    let batch: Vec<NewMessage> = (0..500)
        .map(|i| NewMessage::new(vec![1u8; 100]).with_key(format!("k{i}")))
        .collect();
    client.producer("payments").send_batch(batch).await?;
    let mut consumer = client
        .consumer("billing", &["payments"], ConsumerOptions::default())
        .await?;
    let mut got = 0;
    while got < 500 {
        got += consumer.poll().await?.len();
        consumer.commit().await?;
    }
    deploy(
        &client,
        spec("points", "payments"),
        &rust_component("ack-all")?,
    )
    .await?;
    wait_stats(&client, "points", Duration::from_secs(30), |s| {
        s.processed == 500
    })
    .await?;

    let text = scrape(&http)?;
    let s = samples(&text)?;
    let get = |name: &str| s.get(name).copied().unwrap_or(f64::NAN);
    for family in [
        "msmq_produced_messages",
        "msmq_produced_bytes",
        "msmq_produce_latency_seconds",
        "msmq_consumed_messages",
        "msmq_consumed_bytes",
        "msmq_commit_batch_requests",
        "msmq_commit_batch_bytes",
        "msmq_commit_seconds",
        "msmq_partition_backlog_messages",
        "msmq_group_lag_messages",
        "msmq_transactions_pending",
        "msmq_transaction_checks",
        "msmq_retries",
        "msmq_dead_letters",
        "msmq_retention_removed_messages",
        "msmq_plugin_processed_messages",
        "msmq_plugin_failed_batches",
        "msmq_plugin_dead_letters",
        "msmq_plugin_throttled_seconds",
        "msmq_plugin_busy_seconds",
        "msmq_plugin_memory_bytes",
        "msmq_plugin_lag_messages",
        "msmq_plugin_paused",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing from:\n{text}"
        );
    }
    assert_eq!(get("msmq_produced_messages_total"), 500.0);
    // 500 payloads of 100 bytes and keys k0..k499: 10×2 + 90×3 + 400×4 bytes.
    assert_eq!(get("msmq_produced_bytes_total"), 51_890.0);
    assert_eq!(get("msmq_produce_latency_seconds_count"), 1.0);
    assert!(get("msmq_consumed_messages_total") >= 500.0);
    assert!(get("msmq_commit_seconds_count") >= 2.0);
    for p in 0..2 {
        let lag = format!(
            "msmq_group_lag_messages{{group=\"billing\",topic=\"payments\",partition=\"{p}\"}}"
        );
        assert_eq!(get(&lag), 0.0, "{lag}");
    }
    assert_eq!(
        get("msmq_plugin_processed_messages_total{plugin=\"points\"}"),
        500.0
    );
    assert_eq!(get("msmq_plugin_lag_messages{plugin=\"points\"}"), 0.0);
    assert_eq!(get("msmq_plugin_paused{plugin=\"points\"}"), 0.0);
    assert!(get("msmq_plugin_memory_bytes{plugin=\"points\"}") > 0.0);
    assert_eq!(get("msmq_transactions_pending"), 0.0);
    Ok(())
}
