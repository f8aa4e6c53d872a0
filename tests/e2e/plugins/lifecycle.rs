//! Deploy checks, hot reload under load, `--plugin-dir`, and plugins
//! surviving a restart.

use super::{deploy, rust_component, spec, state, wait_stats};
use crate::harness::TestBroker;
use msmq_client::protocol::{ErrorCode, NewMessage};
use msmq_client::ClientError;
use std::time::{Duration, Instant};

fn refusal(result: anyhow::Result<()>) -> ClientError {
    result
        .expect_err("the deploy must be refused")
        .downcast::<ClientError>()
        .expect("a broker error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_components_and_specs_are_refused_with_clear_errors() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--plugin-component-bytes-max", "60000"])?;
    let client = broker.client().await?;
    client.create_topic("t", 1).await?;
    let dir = tempfile::tempdir()?;
    let not_wasm = dir.path().join("x.wasm");
    std::fs::write(&not_wasm, b"hello, I am not wasm")?;
    let e = refusal(deploy(&client, spec("x", "t"), &not_wasm).await);
    assert_eq!(e.code(), Some(ErrorCode::PLUGIN_REFUSED));
    assert!(e.to_string().contains("not WebAssembly"), "{e}");

    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0")?;
    let e = refusal(deploy(&client, spec("x", "t"), &core).await);
    assert!(
        e.to_string()
            .contains("core WebAssembly module, not a component"),
        "{e}"
    );

    let e = refusal(deploy(&client, spec("x", "t"), &rust_component("wrong-world")?).await);
    assert_eq!(e.code(), Some(ErrorCode::PLUGIN_REFUSED));
    assert!(
        e.to_string()
            .contains("does not target the msmq:plugin/consumer (or packed-consumer) world"),
        "{e}"
    );

    // An import of another package: refused before anything is compiled.
    let e = refusal(deploy(&client, spec("x", "t"), &rust_component("foreign-import")?).await);
    assert_eq!(e.code(), Some(ErrorCode::PLUGIN_REFUSED));
    assert!(
        e.to_string().contains("test:vault/secrets"),
        "the refusal names the import: {e}"
    );
    let cache = broker.data_dir().join("plugin-cache");
    let compiled = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        compiled, 0,
        "nothing may be compiled for refused components"
    );

    // The size limit: ack-all is under 60 000 bytes, recorder-v1 is over.
    let small = rust_component("ack-all")?;
    let large = rust_component("recorder-v1")?;
    assert!(std::fs::metadata(&small)?.len() <= 60_000);
    assert!(std::fs::metadata(&large)?.len() > 60_000);
    deploy(&client, spec("small", "t"), &small).await?;
    let e = refusal(deploy(&client, spec("large", "t"), &large).await);
    assert!(e.to_string().contains("plugin_component_bytes_max"), "{e}");

    let e = refusal(deploy(&client, spec("x", "no-such-topic"), &small).await);
    assert_eq!(e.code(), Some(ErrorCode::UNKNOWN_TOPIC));
    let mut bad = spec("x", "t");
    bad.limits.batch_messages_max = 0;
    let e = refusal(deploy(&client, bad, &small).await);
    assert_eq!(e.code(), Some(ErrorCode::INVALID_ARGUMENT));
    assert!(e.to_string().contains("batch_messages_max"), "{e}");

    // A group belongs to one plugin, and consumers cannot join it.
    let mut shared = spec("other", "t");
    shared.group = Some("plugin.small".into());
    let e = refusal(deploy(&client, shared, &small).await);
    assert_eq!(e.code(), Some(ErrorCode::INVALID_ARGUMENT));
    assert!(
        e.to_string()
            .contains("already holds the progress of plugin \"small\""),
        "{e}"
    );
    let Err(e) = client
        .consumer("plugin.small", &["t"], Default::default())
        .await
    else {
        anyhow::bail!("joining a plugin's group must be refused");
    };
    assert!(
        e.to_string().contains("holds the progress of plugin"),
        "{e}"
    );

    let e = client.plugin_stats("nobody").await.expect_err("unknown");
    assert_eq!(e.code(), Some(ErrorCode::UNKNOWN_PLUGIN));
    assert_eq!(client.list_plugins().await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_processes_every_message_exactly_once() -> anyhow::Result<()> {
    const MESSAGES: usize = 100_000;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("flow", 4).await?;
    deploy(
        &client,
        spec("rec", "flow"),
        &rust_component("recorder-v1")?,
    )
    .await?;

    let producer = client.producer("flow");
    let sending = tokio::spawn(async move {
        for chunk in 0..MESSAGES / 1000 {
            let batch = (0..1000)
                .map(|i| NewMessage::new(format!("m-{}", chunk * 1000 + i)))
                .collect();
            producer.send_batch(batch).await?;
        }
        anyhow::Ok(())
    });
    wait_stats(&client, "rec", Duration::from_secs(120), |s| {
        s.processed >= 30_000
    })
    .await?;
    let v2 = std::fs::read(rust_component("recorder-v2")?)?;
    let deployed = client.deploy_plugin(spec("rec", "flow"), v2).await?;
    assert!(deployed.upgraded && deployed.version == 2, "{deployed:?}");
    sending.await??;
    let done = wait_stats(&client, "rec", Duration::from_secs(120), |s| {
        s.processed as usize >= MESSAGES && s.lag == 0
    })
    .await?;
    let swap_ms = done.last_swap_ms.expect("the swap was measured");
    println!("hot reload: v2's first batch {swap_ms} ms after the deploy was acknowledged");
    // The target (under 100 ms) is reported, not asserted: CI machines are
    // shared. A swap that waits for more than a batch is a bug, though.
    assert!(swap_ms < 1_000, "swap took {swap_ms} ms");
    assert_eq!(done.processed as usize, MESSAGES);

    let counts = state(&client, "rec", "count/").await?;
    let v1: usize = counts.get("count/v1").map_or(Ok(0), |v| v.parse())?;
    let v2: usize = counts.get("count/v2").map_or(Ok(0), |v| v.parse())?;
    println!("processed by v1: {v1}, by v2: {v2}");
    assert!(v1 >= 30_000 && v2 > 0, "v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, MESSAGES);
    assert!(
        state(&client, "rec", "dup/").await?.is_empty(),
        "a message was processed twice"
    );
    assert_eq!(state(&client, "rec", "seen/").await?.len(), MESSAGES);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_directory_deploys_replaces_and_removes() -> anyhow::Result<()> {
    let plugins = tempfile::tempdir()?;
    let dir = plugins.path().to_str().expect("utf-8 path").to_string();
    let broker = TestBroker::start_with(&["--plugin-dir", &dir])?;
    let client = broker.client().await?;

    // Manifest first, then the component by rename, as a deploy tool would.
    std::fs::write(plugins.path().join("rec.toml"), "topic = \"orders\"\n")?;
    let drop_in = |component: &std::path::Path| -> anyhow::Result<()> {
        let tmp = plugins.path().join("rec.wasm.partial");
        std::fs::copy(component, &tmp)?;
        std::fs::rename(&tmp, plugins.path().join("rec.wasm"))?;
        Ok(())
    };
    // Dropped before its topic exists: deployed once the topic is there.
    drop_in(&rust_component("recorder-v1")?)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(client.list_plugins().await?.is_empty());
    client.create_topic("orders", 1).await?;
    let batch: Vec<NewMessage> = (0..50).map(|i| NewMessage::new(format!("o-{i}"))).collect();
    client.producer("orders").send_batch(batch).await?;
    let deadline = Duration::from_secs(30);
    let s = wait_stats_appear(&client, "rec", deadline).await?;
    assert_eq!(s.version, 1);
    wait_stats(&client, "rec", deadline, |s| s.processed == 50).await?;

    drop_in(&rust_component("recorder-v2")?)?;
    wait_stats(&client, "rec", deadline, |s| s.version == 2).await?;
    client
        .producer("orders")
        .send(NewMessage::new("after-upgrade"))
        .await?;
    wait_stats(&client, "rec", deadline, |s| s.processed == 1 || s.lag == 0).await?;
    let counts = state(&client, "rec", "count/").await?;
    assert_eq!(counts.get("count/v1").map(String::as_str), Some("50"));
    assert_eq!(counts.get("count/v2").map(String::as_str), Some("1"));

    std::fs::remove_file(plugins.path().join("rec.wasm"))?;
    let started = Instant::now();
    while !client.list_plugins().await?.is_empty() {
        anyhow::ensure!(started.elapsed() < deadline, "not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn wait_stats_appear(
    client: &msmq_client::Client,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<msmq_client::protocol::PluginStats> {
    let started = Instant::now();
    loop {
        match client.plugin_stats(name).await {
            Ok(s) => return Ok(s),
            Err(e) if e.code() == Some(ErrorCode::UNKNOWN_PLUGIN) => {}
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(started.elapsed() < timeout, "plugin {name} never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_state_and_pauses_survive_a_restart() -> anyhow::Result<()> {
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("t", 1).await?;
    let batch: Vec<NewMessage> = (0..10).map(|i| NewMessage::new(format!("a-{i}"))).collect();
    client.producer("t").send_batch(batch).await?;
    deploy(&client, spec("rec", "t"), &rust_component("recorder-v1")?).await?;
    deploy(&client, spec("idle", "t"), &rust_component("ack-all")?).await?;
    wait_stats(&client, "rec", Duration::from_secs(30), |s| {
        s.processed == 10
    })
    .await?;
    wait_stats(&client, "idle", Duration::from_secs(30), |s| {
        s.processed == 10
    })
    .await?;
    client.pause_plugin("idle").await?;
    client.close().await;

    broker.terminate()?;
    broker.restart()?;
    let client = broker.client().await?;
    let list = client.list_plugins().await?;
    let status: Vec<(String, String)> = list
        .iter()
        .map(|p| (p.spec.name.clone(), p.status.clone()))
        .collect();
    assert_eq!(
        status,
        vec![
            ("idle".into(), "paused".into()),
            ("rec".into(), "running".into())
        ]
    );
    let batch: Vec<NewMessage> = (0..5).map(|i| NewMessage::new(format!("b-{i}"))).collect();
    client.producer("t").send_batch(batch).await?;
    wait_stats(&client, "rec", Duration::from_secs(30), |s| {
        s.processed == 5 && s.lag == 0
    })
    .await?;
    let counts = state(&client, "rec", "count/").await?;
    assert_eq!(counts.get("count/v1").map(String::as_str), Some("15"));
    let idle = client.plugin_stats("idle").await?;
    // Its committed progress came back: only the 5 new messages wait.
    assert_eq!((idle.status.as_str(), idle.lag), ("paused", 5));

    client.resume_plugin("idle").await?;
    wait_stats(&client, "idle", Duration::from_secs(30), |s| s.lag == 0).await?;
    client.remove_plugin("rec").await?;
    assert!(client.plugin_stats("rec").await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_cli_deploys_inspects_and_removes() -> anyhow::Result<()> {
    use crate::harness::cli;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("transfers", 2).await?;
    let billing = rust_component("billing")?;
    let billing = billing.to_str().expect("utf-8 path");
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = cli(&broker, args, None)?;
        anyhow::ensure!(
            out.status.success(),
            "msmq {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let out = run(&[
        "plugin",
        "deploy",
        "billing",
        billing,
        "--topic",
        "transfers",
        "--messages-per-second",
        "500",
        "--memory",
        "32 MiB",
        "--batch-time",
        "500ms",
    ])?;
    assert!(out.starts_with("deployed billing version 1"), "{out}");
    run(&[
        "produce",
        "transfers",
        "tx-1|alice|bob|700",
        "not a transfer",
    ])?;
    wait_stats(&client, "billing", Duration::from_secs(30), |s| {
        s.processed == 2
    })
    .await?;

    let list = run(&["plugin", "list"])?;
    assert!(
        list.contains("billing") && list.contains("running"),
        "{list}"
    );
    let stats = run(&["plugin", "stats", "billing"])?;
    assert!(stats.contains("dead-lettered 1"), "{stats}");
    let state = run(&["plugin", "state", "billing", "--prefix", "bill/"])?;
    assert_eq!(state, "bill/alice = -700\nbill/bob = 700\n");
    run(&["plugin", "pause", "billing"])?;
    assert!(run(&["plugin", "list"])?.contains("paused"));
    run(&["plugin", "resume", "billing"])?;
    run(&["plugin", "remove", "billing"])?;
    let out = cli(&broker, &["plugin", "stats", "billing"], None)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNKNOWN_PLUGIN"));
    let spec_limits = client.list_plugins().await?;
    assert!(spec_limits.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_plugin_that_cannot_load_is_listed_and_can_be_replaced() -> anyhow::Result<()> {
    use msmq_broker::storage::tables;
    use redb::{ReadableDatabase, ReadableTable};
    let mut broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("t", 1).await?;
    deploy(&client, spec("rec", "t"), &rust_component("recorder-v1")?).await?;
    client.close().await;
    broker.terminate()?;

    // Damage the stored component and drop the compiled cache.
    std::fs::remove_dir_all(broker.data_dir().join("plugin-cache"))?;
    {
        let db = redb::Database::open(broker.data_dir().join("msmq.redb"))?;
        let txn = db.begin_write()?;
        {
            let mut components = txn.open_table(tables::PLUGIN_COMPONENTS)?;
            let hashes: Vec<String> = components
                .iter()?
                .map(|e| e.map(|(k, _)| k.value().to_string()))
                .collect::<Result<_, _>>()?;
            for hash in hashes {
                components.insert(hash.as_str(), &b"\0asm\x0d\0\x01\0garbage"[..])?;
            }
        }
        txn.commit()?;
        let _ = db.begin_read()?;
    }
    broker.restart()?;
    let client = broker.client().await?;
    let list = client.list_plugins().await?;
    assert_eq!(list.len(), 1);
    assert!(
        list[0].status.starts_with("not running"),
        "{:?}",
        list[0].status
    );
    let stats = client.plugin_stats("rec").await?;
    assert!(stats.last_error.is_some(), "{stats:?}");

    // A new deploy replaces it and runs.
    deploy(&client, spec("rec", "t"), &rust_component("recorder-v2")?).await?;
    client.producer("t").send(NewMessage::new("x")).await?;
    wait_stats(&client, "rec", Duration::from_secs(30), |s| {
        s.processed == 1
    })
    .await?;
    client.remove_plugin("rec").await?;
    assert!(client.list_plugins().await?.is_empty());
    Ok(())
}

/// `msmq plugin check` answers offline: the imports with their rules, and a
/// non-zero exit naming the import a broker would refuse.
#[test]
fn plugin_check_names_a_refused_import_and_accepts_a_good_component() -> anyhow::Result<()> {
    let run = |component: &std::path::Path| {
        std::process::Command::new(crate::harness::MSMQ)
            .args(["plugin", "check"])
            .arg(component)
            .output()
    };
    let out = run(&rust_component("foreign-import")?)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("REFUSED") && l.contains("test:vault/secrets")),
        "{stdout}"
    );
    assert!(
        stderr.contains("test:vault/secrets")
            && stderr.contains("only msmq:plugin/host@1.x and WASI 0.2"),
        "{stderr}"
    );

    let out = run(&rust_component("billing")?)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("accepted"), "{stdout}");
    assert!(stdout.contains("msmq:plugin/host@1."), "{stdout}");
    Ok(())
}
