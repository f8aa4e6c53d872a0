//! The `msmq` command line against a real broker.

use crate::harness::{cli, TestBroker};

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn topics_produce_consume_and_groups_from_the_command_line() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    ok(cli(
        &broker,
        &["topic", "create", "payments", "--partitions", "2"],
        None,
    )?);
    assert!(ok(cli(&broker, &["topic", "list"], None)?).contains("payments"));
    let acks = ok(cli(
        &broker,
        &[
            "produce", "payments", "one", "two", "--key", "k", "--header", "a=b",
        ],
        None,
    )?);
    assert_eq!(acks.lines().count(), 2);
    ok(cli(
        &broker,
        &["produce", "payments", "--tag", "T"],
        Some("three\nfour\n"),
    )?);
    ok(cli(
        &broker,
        &["produce", "payments", "--count", "10", "--size", "16", "-q"],
        None,
    )?);
    let json = ok(cli(
        &broker,
        &[
            "consume", "payments", "--group", "billing", "--count", "14", "--json",
        ],
        None,
    )?);
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 14);
    let payloads: Vec<&str> = lines.iter().filter_map(|l| l["payload"].as_str()).collect();
    for want in ["one", "two", "three", "four"] {
        assert!(payloads.contains(&want), "{want} missing from {payloads:?}");
    }
    let one = lines.iter().find(|l| l["payload"] == "one").unwrap();
    assert_eq!(one["headers"]["a"], "b");
    assert_eq!(one["key"], "k");
    let describe = ok(cli(&broker, &["topic", "describe", "payments"], None)?);
    assert!(describe.contains("group billing (lag 0)"), "{describe}");
    assert!(ok(cli(&broker, &["group", "list"], None)?).contains("billing"));
    let reset = ok(cli(
        &broker,
        &[
            "group",
            "reset",
            "billing",
            "--topic",
            "payments",
            "--to",
            "2020-01-01T00:00:00Z",
        ],
        None,
    )?);
    assert!(
        reset.contains("payments/0 -> 0") && reset.contains("payments/1 -> 0"),
        "{reset}"
    );
    assert!(ok(cli(&broker, &["group", "describe", "billing"], None)?).contains("payments"));
    // Errors are clear and exit non-zero.
    let out = cli(&broker, &["produce", "missing", "x"], None)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNKNOWN_TOPIC"));
    let metrics = format!(
        "http://{}/metrics",
        broker
            .http
            .as_deref()
            .expect("the test broker serves metrics")
    );
    let bench = ok(cli(
        &broker,
        &[
            "bench",
            "produce",
            "--producers",
            "2",
            "--count",
            "2000",
            "--batch",
            "100",
            "--metrics",
            &metrics,
            "--json",
        ],
        None,
    )?);
    check_summary(&bench, 2000);
    // What the run cost the broker, from its metrics page: the payload was
    // written to disk at least once.
    let summary: serde_json::Value = serde_json::from_str(bench.trim())?;
    assert!(
        summary["broker_cpu_seconds_per_million"].as_f64() > Some(0.0),
        "{summary}"
    );
    assert!(
        summary["write_call_amplification"].as_f64() >= Some(1.0),
        "{summary}"
    );
    assert!(
        summary["broker_peak_rss_mib"].as_f64() > Some(1.0),
        "{summary}"
    );
    let bench = ok(cli(
        &broker,
        &["bench", "consume", "--count", "3000", "--json"],
        None,
    )?);
    check_summary(&bench, 3000);
    // The producers start as soon as the consumers joined, and every
    // message sent is received: `latest` is pinned at the join.
    for (members, count) in [(["1", "1"], "1000"), (["3", "2"], "3000")] {
        let [producers, consumers] = members;
        let bench = ok(cli(
            &broker,
            &[
                "bench",
                "e2e",
                "--producers",
                producers,
                "--consumers",
                consumers,
                "--count",
                count,
                "--batch",
                "10",
                "--duration",
                "30s",
                "--json",
            ],
            None,
        )?);
        check_summary(&bench, count.parse()?);
        let summary: serde_json::Value = serde_json::from_str(bench.trim())?;
        assert_eq!(summary["sent"], summary["messages"], "{summary}");
    }
    Ok(())
}

#[test]
fn the_demo_runs_from_any_directory_with_nothing_but_the_binary() -> anyhow::Result<()> {
    let elsewhere = tempfile::tempdir()?;
    let out = std::process::Command::new(crate::harness::MSMQ)
        .args([
            "demo",
            "--transfers",
            "40",
            "--burst",
            "2000",
            "--quota",
            "5000",
        ])
        .current_dir(elsewhere.path())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.lines().last().unwrap_or("").starts_with("demo OK"),
        "{stdout}"
    );
    // --plugins replaces the embedded components, and says what is missing.
    let out = std::process::Command::new(crate::harness::MSMQ)
        .args(["demo", "--plugins"])
        .arg(elsewhere.path())
        .current_dir(elsewhere.path())
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("billing.wasm"), "{stderr}");
    Ok(())
}

fn check_summary(json: &str, messages: u64) {
    let summary: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(summary["messages"], messages, "{summary}");
    for key in [
        "messages_per_sec",
        "mb_per_sec",
        "p50_ms",
        "p99_ms",
        "p999_ms",
    ] {
        assert!(
            summary[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} in {summary}"
        );
    }
}

#[test]
fn serve_refuses_bad_configuration_with_a_clear_message() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(crate::harness::MSMQ)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--partitions-max",
            "0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("partitions_max"));
    // The same check through an environment variable.
    let out = std::process::Command::new(crate::harness::MSMQ)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("MSMQ_SESSION_CHECK_INTERVAL", "0s")
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("session_check_interval"));
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "no_such_key = 1\n")?;
    let out = std::process::Command::new(crate::harness::MSMQ)
        .args(["serve", "--config"])
        .arg(&config)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_key"));
    Ok(())
}

#[test]
fn transactions_from_the_command_line() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--transaction-timeout",
        "200ms",
        "--transaction-check-interval",
        "100ms",
    ])?;
    ok(cli(
        &broker,
        &["topic", "create", "payments", "--partitions", "1"],
        None,
    )?);
    let sent = ok(cli(
        &broker,
        &["tx", "send", "payments", "committed", "--action", "commit"],
        None,
    )?);
    assert!(sent.contains("Committed"), "{sent}");
    let sent = ok(cli(
        &broker,
        &["tx", "send", "payments", "rolled", "--action", "rollback"],
        None,
    )?);
    assert!(sent.contains("RolledBack"), "{sent}");
    // Undecided: the command stays and answers the check-back with --answer.
    let sent = ok(cli(
        &broker,
        &[
            "tx", "send", "payments", "checked", "--action", "unknown", "--answer", "commit",
            "--wait", "20s",
        ],
        None,
    )?);
    assert!(sent.lines().last().unwrap().contains("Committed"), "{sent}");
    let list = ok(cli(&broker, &["tx", "list"], None)?);
    assert_eq!(list.lines().count(), 1, "only the header: {list}");
    let json = ok(cli(
        &broker,
        &[
            "consume", "payments", "--group", "g", "--count", "2", "--json",
        ],
        None,
    )?);
    let payloads: Vec<String> = json
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["payload"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(payloads, vec!["committed", "checked"]);
    Ok(())
}
