//! The web console in headless Chromium: `tests/console/drive.mjs`
//! (Playwright driving Debian's chromium) signs in with a token, finds the
//! topics, groups, pending transaction, dead letters and plugins this test
//! made, waits for both charts to draw, and pauses a plugin with its button;
//! the test then checks over QUIC that the plugin really is paused.
//!
//! `MSMQ_CONSOLE_SCREENSHOT=docs/console.png CONSOLE_WATCH_MS=20000` keeps
//! the screenshot, taken after 20 s more of traffic.

use crate::harness::TestBroker;
use crate::plugins::{deploy, repo_root, rust_component, spec, wait_stats};
use anyhow::Context;
use msmq_client::protocol::{NewMessage, TransactionCheck, TxAction};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Most batches the background producer sends while the browser looks.
const BACKGROUND_BATCHES_MAX: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_broker_and_pauses_a_plugin_in_headless_chromium(
) -> anyhow::Result<()> {
    let driver = repo_root().join("tests").join("console");
    anyhow::ensure!(
        driver.join("node_modules").join("playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/console` \
         (scripts/test.sh installs it, with Debian's chromium)"
    );
    let broker = TestBroker::start_with(&["--auth", "--transaction-timeout", "60s"])?;
    let (token, client) = broker.admin().await?;
    client.create_topic("payments", 2).await?;
    deploy(
        &client,
        spec("billing", "payments"),
        &rust_component("ack-all")?,
    )
    .await?;
    let mut audit = spec("audit", "payments");
    audit.limits.delivery_attempts_max = 1;
    deploy(&client, audit, &rust_component("trapper")?).await?;
    let producer = client.producer("payments");
    producer
        .send_batch(
            (0..3)
                .map(|i| NewMessage::new(format!("trap-{i}")))
                .collect(),
        )
        .await?;
    wait_stats(&client, "audit", Duration::from_secs(30), |s| {
        s.dead_lettered == 3
    })
    .await?;
    let tx = client
        .transactional_producer("payment-centre", "payments", |_: &TransactionCheck| {
            TxAction::Unknown
        })
        .await?;
    tx.send_half(NewMessage::new("transfer-pending")).await?;

    // Traffic while the browser watches, so the charts have something to draw.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (producer, stop) = (producer.clone(), stop.clone());
        tokio::spawn(async move {
            for n in 0..BACKGROUND_BATCHES_MAX {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let batch = (0..50)
                    .map(|i| NewMessage::new(format!("t-{n}-{i}")))
                    .collect();
                producer.send_batch(batch).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        })
    };

    let screenshot = match std::env::var_os("MSMQ_CONSOLE_SCREENSHOT") {
        Some(path) => repo_root().join(path),
        None => broker.dir.path().join("console.png"),
    };
    let http = broker
        .http
        .clone()
        .context("the console needs the HTTP port")?;
    let mut command = tokio::process::Command::new("node");
    command
        .arg(driver.join("drive.mjs"))
        .current_dir(&driver)
        .env("CONSOLE_URL", format!("http://{http}/"))
        .env("CONSOLE_TOKEN", &token)
        .env("CONSOLE_TOPIC", "payments")
        .env("CONSOLE_PLUGIN", "billing")
        .env("SCREENSHOT", &screenshot)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .context("the browser run took over 120 s")?
        .context("running node (install Node.js; scripts/test.sh expects it)")?;
    stop.store(true, Ordering::Relaxed);
    background.await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "the console driver failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    println!("console driver saw: {stdout}");
    let seen: serde_json::Value = serde_json::from_str(stdout.trim())?;
    let listed = |key: &str| -> Vec<String> {
        seen[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    assert_eq!(listed("topics"), vec!["payments"]);
    assert!(listed("groups").contains(&"plugin.billing".to_string()));
    assert_eq!(listed("dead_letters"), vec!["%DLQ%plugin.audit"]);
    assert_eq!(listed("transactions").len(), 1, "{seen}");
    assert_eq!(listed("plugins"), vec!["audit", "billing"]);
    assert_eq!(seen["status_before"], "running");
    assert!(seen["status_after"]
        .as_str()
        .unwrap_or("")
        .starts_with("paused"));
    for chart in ["throughput", "plugins"] {
        assert!(
            seen["charts"][chart]["points"].as_u64().unwrap_or(0) >= 6,
            "{seen}"
        );
    }

    // The click paused the plugin in the broker, not just on the page.
    let stats = client.plugin_stats("billing").await?;
    assert!(stats.status.starts_with("paused"), "{stats:?}");
    let png = std::fs::read(&screenshot)?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    Ok(())
}

/// One HTTP/1.1 request over plain TCP; returns (status, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_api_needs_a_token_the_rights_the_action_header_and_a_loopback_host(
) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--auth"])?;
    let (admin_token, admin) = broker.admin().await?;
    admin.create_topic("payments", 1).await?;
    deploy(
        &admin,
        spec("billing", "payments"),
        &rust_component("ack-all")?,
    )
    .await?;
    let (_, viewer) = admin.create_token("viewer").await?;
    let addr = broker.http.clone().context("HTTP port")?;
    let (admin_auth, viewer_auth) = (format!("Bearer {admin_token}"), format!("Bearer {viewer}"));
    let action = ("X-MSMQ-Console", "1");
    let pause = "/api/plugins/billing/pause";
    let tasks = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        // The page itself is public; the API is not.
        assert_eq!(http(&addr, "GET", "/", &addr, &[])?.0, 200);
        assert_eq!(http(&addr, "GET", "/api/overview", &addr, &[])?.0, 401);
        // Any valid token may look, but sees no transactions without the right.
        let (status, body) = http(
            &addr,
            "GET",
            "/api/overview",
            &addr,
            &[("Authorization", &viewer_auth)],
        )?;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"transactions_pending\":null"), "{body}");
        // The health figures: disk, storage errors, request memory.
        let overview: serde_json::Value = serde_json::from_str(&body)?;
        let health = &overview["health"];
        assert!(
            health["disk_free_bytes"].as_u64().is_some_and(|b| b > 0),
            "{body}"
        );
        assert_eq!(health["disk_low"], false, "{body}");
        assert_eq!(health["storage_errors"], 0, "{body}");
        assert_eq!(
            health["request_memory_budget_bytes"],
            512u64 << 20,
            "{body}"
        );
        // Actions need the header (no cross-site form can send it) and the right.
        let (status, body) = http(
            &addr,
            "POST",
            pause,
            &addr,
            &[("Authorization", &admin_auth)],
        )?;
        assert_eq!(status, 403, "{body}");
        let (status, body) = http(
            &addr,
            "POST",
            pause,
            &addr,
            &[("Authorization", &viewer_auth), action],
        )?;
        assert_eq!((status, body.contains("FORBIDDEN")), (403, true), "{body}");
        // A Host that is not loopback (a rebound DNS name) is refused.
        let (status, _) = http(
            &addr,
            "POST",
            pause,
            "evil.example",
            &[("Authorization", &admin_auth), action],
        )?;
        assert_eq!(status, 403);
        let (status, body) = http(
            &addr,
            "POST",
            pause,
            &addr,
            &[("Authorization", &admin_auth), action],
        )?;
        assert_eq!(status, 200, "{body}");
        Ok(())
    });
    tasks.await??;
    let stats = admin.plugin_stats("billing").await?;
    assert!(stats.status.starts_with("paused"), "{stats:?}");
    Ok(())
}
