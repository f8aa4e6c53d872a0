//! Acceptance: misbehaving plugins are stopped or refused with a clear
//! error, and a well-behaved plugin beside them still does all its work.

use super::{deploy, rust_component, spec, state, wait_stats};
use crate::harness::{read_all, TestBroker};
use msmq_client::protocol::{NewMessage, PluginLimits};
use std::time::Duration;

const WORK: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_plugins_are_stopped_and_a_good_one_keeps_working() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("work", 2).await?;
    client.create_topic("mixed", 1).await?;
    client.create_topic("forbidden", 1).await?;
    let producer = client.producer("work");
    for chunk in 0..WORK / 500 {
        let batch = (0..500)
            .map(|i| NewMessage::new(format!("ok-{}", chunk * 500 + i)))
            .collect();
        producer.send_batch(batch).await?;
    }
    let mixed: Vec<NewMessage> = (0..20)
        .map(|i| {
            NewMessage::new(if i % 4 == 0 {
                format!("trap-{i}")
            } else {
                format!("ok-{i}")
            })
        })
        .collect();
    client.producer("mixed").send_batch(mixed).await?;

    let strict = |limits: PluginLimits| PluginLimits {
        batch_time_ms_max: 200,
        memory_bytes_max: 16 * 1024 * 1024,
        failures_before_pause: 3,
        ..limits
    };
    // (a) an endless loop: interrupted at its time limit, then paused.
    let mut looper = spec("looper", "work");
    looper.limits = strict(looper.limits);
    deploy(&client, looper, &rust_component("looper")?).await?;
    // (b) unbounded memory: stopped at its memory limit, then paused.
    let mut hog = spec("hog", "work");
    hog.limits = strict(hog.limits);
    deploy(&client, hog, &rust_component("memory-hog")?).await?;
    // (c) traps on some messages: those are dead-lettered, the rest acked.
    let mut trapper = spec("trapper", "mixed");
    trapper.limits.delivery_attempts_max = 2;
    deploy(&client, trapper, &rust_component("trapper")?).await?;
    // (d) publishes where it may not: refused, and it dead-letters.
    let mut publisher = spec("publisher", "mixed");
    publisher.config = vec![("target".into(), "forbidden".into())];
    deploy(&client, publisher, &rust_component("forbidden-publisher")?).await?;
    // The good one.
    deploy(&client, spec("good", "work"), &rust_component("ack-all")?).await?;

    let timeout = Duration::from_secs(60);
    let good = wait_stats(&client, "good", timeout, |s| s.processed as usize == WORK).await?;
    assert_eq!((good.lag, good.failed_batches), (0, 0), "{good:?}");

    let looper = wait_stats(&client, "looper", timeout, |s| {
        s.status.starts_with("paused")
    })
    .await?;
    assert!(looper.status.contains("time limit of 200 ms"), "{looper:?}");
    assert_eq!(looper.processed, 0);
    let hog = wait_stats(&client, "hog", timeout, |s| s.status.starts_with("paused")).await?;
    assert!(hog.status.contains("memory limit"), "{hog:?}");
    assert_eq!(hog.processed, 0);

    let trapper = wait_stats(&client, "trapper", timeout, |s| s.processed == 20).await?;
    assert_eq!(
        (trapper.acked, trapper.dead_lettered),
        (15, 5),
        "{trapper:?}"
    );
    let letters = read_all(&client, "%DLQ%plugin.trapper", 0, 0).await?;
    assert_eq!(letters.len(), 5);
    for letter in &letters {
        assert!(String::from_utf8_lossy(&letter.payload).starts_with("trap-"));
        let reason = letter
            .headers
            .iter()
            .find(|h| h.name == "msmq.dlq.reason")
            .map(|h| h.value.clone())
            .unwrap_or_default();
        assert!(reason.contains("failed 2 deliveries"), "{reason}");
    }

    let publisher = wait_stats(&client, "publisher", timeout, |s| s.processed == 20).await?;
    assert_eq!(publisher.dead_lettered, 20, "{publisher:?}");
    let letters = read_all(&client, "%DLQ%plugin.publisher", 0, 0).await?;
    let reason = &letters[0]
        .headers
        .iter()
        .find(|h| h.name == "msmq.dlq.reason")
        .expect("a reason")
        .value;
    assert!(
        reason.contains("may not publish to topic \"forbidden\""),
        "{reason}"
    );
    assert!(read_all(&client, "forbidden", 0, 0).await?.is_empty());

    // A paused plugin's backlog shows as lag; resuming retries it.
    assert_eq!(looper.lag, WORK as u64);
    Ok(())
}

/// The empty WASI: a plugin that uses `std::fs`, `std::env` and `std::net`
/// deploys, and finds no file, no directory, no environment, no arguments
/// and no network; what it prints reaches the broker's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_empty_wasi_gives_a_plugin_no_files_no_network_and_no_environment() -> anyhow::Result<()>
{
    // A listener the plugin is told about: nothing may ever connect to it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("work", 1).await?;
    let mut probe = spec("probe", "work");
    probe.config = vec![("tcp_port".into(), port.to_string())];
    deploy(&client, probe, &rust_component("sandbox-probe")?).await?;
    client.producer("work").send(NewMessage::new("go")).await?;
    let stats = wait_stats(&client, "probe", Duration::from_secs(30), |s| {
        s.processed == 1
    })
    .await?;
    assert_eq!(stats.acked, 1, "{stats:?}\n{}", broker.log());

    let found = state(&client, "probe", "probe/").await?;
    let get = |k: &str| found.get(k).cloned().unwrap_or_default();
    assert!(get("probe/file").starts_with("error:"), "{found:?}");
    assert!(get("probe/dir").starts_with("error:"), "{found:?}");
    assert!(get("probe/tcp").starts_with("error:"), "{found:?}");
    assert_eq!(get("probe/env"), "0 variables", "{found:?}");
    assert_eq!(get("probe/args"), "0 arguments", "{found:?}");
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => anyhow::bail!("the plugin reached the listener: {other:?}"),
    }
    let log = broker.log();
    for line in [
        "sandbox-probe: hello on stdout",
        "sandbox-probe: hello on stderr",
    ] {
        assert!(
            log.lines().any(|l| l.contains(line) && l.contains("probe")),
            "{line:?} is not in the broker log:\n{log}"
        );
    }
    Ok(())
}

/// State writes at each limit are taken and one past it refused, with
/// `state-put`, `state-put-many` and `state-put-packed`; a refused list
/// writes none of its entries, and malformed packed lists are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_writes_hold_at_the_limits_and_are_refused_past_them() -> anyhow::Result<()> {
    use msmq_broker::core::plugins::host::{STATE_KEY_BYTES_MAX, STATE_VALUE_BYTES_MAX};
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("work", 1).await?;
    let mut limits = spec("limits", "work");
    limits.config = vec![
        ("key_max".into(), STATE_KEY_BYTES_MAX.to_string()),
        ("value_max".into(), STATE_VALUE_BYTES_MAX.to_string()),
    ];
    deploy(&client, limits, &rust_component("state-limits")?).await?;
    client.producer("work").send(NewMessage::new("go")).await?;
    let stats = wait_stats(&client, "limits", Duration::from_secs(30), |s| {
        s.processed == 1
    })
    .await?;
    assert_eq!(stats.acked, 1, "{stats:?}");

    let results = state(&client, "limits", "result/").await?;
    let get = |case: &str| {
        results
            .get(&format!("result/{case}"))
            .cloned()
            .unwrap_or_default()
    };
    for case in ["put-key-at-limit", "put-value-at-limit", "many-at-limit"] {
        assert_eq!(get(case), "ok", "{case}: {results:?}");
    }
    for case in ["put-key-past-limit", "put-value-past-limit"] {
        assert!(
            get(case).starts_with("refused:") && get(case).contains("exceeds"),
            "{case}: {results:?}"
        );
    }
    assert!(
        get("many-key-past-limit").contains("entry 1"),
        "{results:?}"
    );
    assert!(
        get("many-value-past-limit").contains("entry 1"),
        "{results:?}"
    );
    // The accepted list wrote both entries; the refused lists wrote nothing.
    assert_eq!(
        get("read-back"),
        format!("{STATE_VALUE_BYTES_MAX},1,missing,missing"),
        "{results:?}"
    );
    assert_eq!(get("packed-at-limit"), "ok", "{results:?}");
    assert!(
        get("packed-key-past-limit").contains("entry 1")
            && get("packed-key-past-limit").contains("exceeds"),
        "{results:?}"
    );
    assert!(
        get("packed-bad-ends").contains("byte-strings end 1 is 99"),
        "{results:?}"
    );
    assert!(
        get("packed-count-mismatch").contains("1 keys but 2 values"),
        "{results:?}"
    );
    // The value at the limit and the empty value are there (an empty value
    // is not a missing one); the refused lists wrote nothing.
    let v = STATE_VALUE_BYTES_MAX;
    assert_eq!(
        get("packed-read-back"),
        format!("ends=[{v}, {v}, {v}, {v}, {v}] missing=[2, 3, 4]"),
        "{results:?}"
    );
    Ok(())
}

/// `state-get-packed` traps, rather than answering wrongly, on `ends` that do
/// not describe the data and on an answer larger than the plugin's memory;
/// the broker says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_or_oversized_packed_read_traps_the_call() -> anyhow::Result<()> {
    use msmq_broker::core::plugins::host::{STATE_KEY_BYTES_MAX, STATE_VALUE_BYTES_MAX};
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("work", 1).await?;
    for trap in ["bad-ends", "past-memory"] {
        let name = format!("trap-{trap}");
        let mut s = spec(&name, "work");
        s.config = vec![
            ("key_max".into(), STATE_KEY_BYTES_MAX.to_string()),
            ("value_max".into(), STATE_VALUE_BYTES_MAX.to_string()),
            ("trap".into(), trap.into()),
        ];
        s.limits.memory_bytes_max = 64 * 1024 * 1024;
        deploy(&client, s, &rust_component("state-limits")?).await?;
    }
    client.producer("work").send(NewMessage::new("go")).await?;
    for (trap, expected) in [
        (
            "bad-ends",
            "state-get-packed: byte-strings end 1 is 4, outside 2..=3",
        ),
        (
            "past-memory",
            "the values of 65 keys pass the plugin's memory limit of",
        ),
    ] {
        let name = format!("trap-{trap}");
        let stats = wait_stats(&client, &name, Duration::from_secs(60), |s| {
            s.failed_batches >= 1
        })
        .await?;
        let error = stats.last_error.clone().unwrap_or_default();
        assert!(error.contains(expected), "{trap}: {error}");
        assert_eq!(stats.acked, 0, "{trap}: {stats:?}");
    }
    Ok(())
}
