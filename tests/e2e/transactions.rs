//! Transactional half messages end to end: visibility, commit, rollback,
//! check-back, discard, conflicts, crashes, and a concurrent mix.

use crate::harness::{cli, read_all, TestBroker};
use msmq_client::protocol::DiscardedAction;
use msmq_client::{
    Client, ClientError, ConsumerOptions, ErrorCode, FetchLimits, NewMessage, TransactionCheck,
    TxAction, TxEnded,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fast check-backs for tests.
pub(crate) const FAST_CHECKS: &[&str] = &[
    "--transaction-timeout",
    "300ms",
    "--transaction-check-interval",
    "150ms",
    "--transaction-check-reply-timeout",
    "500ms",
];

fn always(action: TxAction) -> impl Fn(&TransactionCheck) -> TxAction + Send + Sync + 'static {
    move |_: &TransactionCheck| action
}

fn options(wait_ms: u32) -> ConsumerOptions {
    ConsumerOptions {
        limits: FetchLimits {
            max_messages: 1000,
            max_bytes: 8 << 20,
            max_wait_ms: wait_ms,
        },
        ..ConsumerOptions::default()
    }
}

/// Everything a new group receives from the start of `topic` until nothing
/// new arrives for `quiet`. Payloads as strings.
async fn collect(
    client: &Client,
    group: &str,
    topic: &str,
    quiet: Duration,
) -> anyhow::Result<Vec<String>> {
    let mut consumer = client.consumer(group, &[topic], options(100)).await?;
    let mut got = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < quiet {
        let batch = consumer.poll().await?;
        if !batch.is_empty() {
            last = Instant::now();
        }
        for m in batch {
            got.push(String::from_utf8(m.message.payload)?);
        }
        consumer.commit().await?;
    }
    consumer.leave().await?;
    Ok(got)
}

/// Wait until no transaction is pending, or fail after `timeout`.
async fn until_resolved(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = client.list_transactions(false, 10_000).await?;
        if pending.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} transactions still pending, e.g. {:?}",
            pending.len(),
            pending.first()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_message_is_invisible_until_commit_then_each_group_gets_it_once(
) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--transaction-timeout", "60s"])?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    let producer = client
        .transactional_producer("payment-centre", "payments", always(TxAction::Unknown))
        .await?;
    let half = producer
        .send_half(NewMessage::new("transfer-1").with_key("acct-9"))
        .await?;
    // Three groups poll with a long wait while the transaction is open.
    let mut waiting = Vec::new();
    for group in ["billing", "points", "notification"] {
        let mut consumer = client.consumer(group, &["payments"], options(1500)).await?;
        waiting.push(tokio::spawn(async move {
            let before = consumer.poll().await?;
            anyhow::Ok((consumer, before))
        }));
    }
    let mut consumers = Vec::new();
    for w in waiting {
        let (consumer, before) = w.await??;
        assert!(before.is_empty(), "a half message was visible: {before:?}");
        consumers.push(consumer);
    }
    let ack = producer.commit(half.tx_id).await?;
    assert_eq!(
        ack.id, half.id,
        "the message keeps the id it had as a half message"
    );
    assert_eq!(ack.partition, half.partition);
    for mut consumer in consumers {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            got.extend(consumer.poll().await?);
            consumer.commit().await?;
            if !got.is_empty() {
                // Nothing more arrives after the one message.
                got.extend(consumer.poll().await?);
                break;
            }
        }
        assert_eq!(got.len(), 1, "group {} got {got:?}", consumer.group());
        assert_eq!(got[0].message.id, half.id);
        assert_eq!(got[0].message.payload, b"transfer-1");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_message_is_never_delivered() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(FAST_CHECKS)?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    let producer = client
        .transactional_producer("payment-centre", "payments", always(TxAction::Commit))
        .await?;
    let half = producer.send_half(NewMessage::new("rolled-back")).await?;
    producer.rollback(half.tx_id).await?;
    // Several check intervals pass; a checker that would say commit is never asked.
    tokio::time::sleep(Duration::from_millis(800)).await;
    client
        .producer("payments")
        .send(NewMessage::new("marker"))
        .await?;
    for group in ["billing", "points", "notification"] {
        let got = collect(&client, group, "payments", Duration::from_millis(500)).await?;
        assert_eq!(got, vec!["marker".to_string()], "group {group}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_producers_transaction_is_committed_by_check_back_with_a_live_one(
) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(FAST_CHECKS)?;
    let admin = broker.client().await?;
    admin.create_topic("payments", 2).await?;
    // The first producer stores a half message and dies before deciding.
    let dying = broker.client().await?;
    let first = dying
        .transactional_producer("payment-centre", "payments", always(TxAction::Unknown))
        .await?;
    let half = first.send_half(NewMessage::new("orphan")).await?;
    dying.close().await;
    drop(first);
    // A second producer of the same group knows the local transaction committed.
    let asked = Arc::new(AtomicU32::new(0));
    let seen = asked.clone();
    let survivor = broker.client().await?;
    let _second = survivor
        .transactional_producer(
            "payment-centre",
            "payments",
            move |check: &TransactionCheck| {
                assert_eq!(check.message.payload, b"orphan");
                seen.fetch_add(1, Ordering::SeqCst);
                TxAction::Commit
            },
        )
        .await?;
    until_resolved(&admin, Duration::from_secs(10)).await?;
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    let got = collect(&admin, "billing", "payments", Duration::from_millis(400)).await?;
    assert_eq!(got, vec!["orphan".to_string()]);
    // The producer's late commit is answered consistently and adds nothing.
    let late = survivor
        .transactional_producer("payment-centre", "payments", always(TxAction::Commit))
        .await?;
    let ack = late.commit(half.tx_id).await?;
    assert_eq!(ack.id, half.id);
    let got = collect(&admin, "points", "payments", Duration::from_millis(400)).await?;
    assert_eq!(
        got.len(),
        1,
        "delivered once, not again after the late commit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_three_times_then_commit_delivers_once_after_the_fourth_check() -> anyhow::Result<()>
{
    let broker = TestBroker::start_with(&[
        "--transaction-timeout",
        "300ms",
        "--transaction-check-interval",
        "700ms",
    ])?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    let checks = Arc::new(AtomicU32::new(0));
    let counter = checks.clone();
    let producer = client
        .transactional_producer(
            "payment-centre",
            "payments",
            move |check: &TransactionCheck| {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                assert_eq!(check.check_number, n, "checks are numbered");
                if n <= 3 {
                    TxAction::Unknown
                } else {
                    TxAction::Commit
                }
            },
        )
        .await?;
    let half = producer.send_half(NewMessage::new("slow")).await?;
    assert_eq!(
        producer.end(half.tx_id, TxAction::Unknown).await?,
        TxEnded::Pending
    );
    // Meanwhile `msmq tx list` shows the check count growing.
    let mut counts_seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while checks.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
        let out = cli(&broker, &["tx", "list"], None)?;
        let text = String::from_utf8(out.stdout)?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.first() == Some(&half.tx_id.to_string().as_str()) {
                counts_seen.insert(cols[5].parse::<u32>()?);
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    until_resolved(&client, Duration::from_secs(10)).await?;
    assert_eq!(
        checks.load(Ordering::SeqCst),
        4,
        "resolved at the fourth check"
    );
    assert!(
        counts_seen.iter().any(|c| (1..=3).contains(c)),
        "tx list showed the check count: {counts_seen:?}"
    );
    let got = collect(&client, "billing", "payments", Duration::from_millis(400)).await?;
    assert_eq!(got, vec!["slow".to_string()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_check_max_unanswered_checks_it_is_discarded_listed_and_can_be_resumed(
) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--transaction-timeout",
        "200ms",
        "--transaction-check-interval",
        "100ms",
        "--transaction-check-max",
        "3",
        "--transaction-check-reply-timeout",
        "200ms",
    ])?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    // One producer never knows; another one never answers in time.
    let asked = Arc::new(AtomicU32::new(0));
    let count = asked.clone();
    let producer = client
        .transactional_producer("payment-centre", "payments", move |_: &TransactionCheck| {
            count.fetch_add(1, Ordering::SeqCst);
            TxAction::Unknown
        })
        .await?;
    let slow_client = broker.client().await?;
    let _slow = slow_client
        .transactional_producer("payment-centre", "payments", |_: &TransactionCheck| {
            std::thread::sleep(Duration::from_millis(400));
            TxAction::Commit
        })
        .await?;
    let half = producer.send_half(NewMessage::new("limbo")).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let discarded = loop {
        let d = client.list_transactions(true, 100).await?;
        if !d.is_empty() || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(discarded.len(), 1, "discarded after the checks ran out");
    assert_eq!(discarded[0].tx_id, half.tx_id);
    assert_eq!(discarded[0].check_count, 3);
    assert!(client.list_transactions(false, 100).await?.is_empty());
    let out = cli(&broker, &["tx", "discarded"], None)?;
    assert!(String::from_utf8(out.stdout)?.contains(&half.tx_id.to_string()));
    // The producer's commit now is refused: the broker rolled it back.
    let refused = producer
        .commit(half.tx_id)
        .await
        .err()
        .and_then(|e| e.code());
    assert_eq!(refused, Some(ErrorCode::TRANSACTION_RESOLVED));
    // A rollback agrees with the discard.
    producer.rollback(half.tx_id).await?;
    assert!(
        collect(&client, "billing", "payments", Duration::from_millis(300))
            .await?
            .is_empty()
    );
    // An operator resumes it (a fresh round of checks) ...
    assert_eq!(
        client
            .resolve_discarded(half.tx_id, DiscardedAction::Resume)
            .await?,
        TxEnded::Pending
    );
    let pending = client.list_transactions(false, 100).await?;
    assert!(pending.len() == 1 || client.list_transactions(true, 100).await?.len() == 1);
    // ... and, once discarded again, commits it by hand.
    let deadline = Instant::now() + Duration::from_secs(15);
    while client.list_transactions(true, 100).await?.is_empty() {
        assert!(Instant::now() < deadline, "not discarded again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = cli(&broker, &["tx", "commit", &half.tx_id.to_string()], None)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = collect(&client, "billing2", "payments", Duration::from_millis(400)).await?;
    assert_eq!(got, vec!["limbo".to_string()]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_unknown_and_repeated_decisions() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--transaction-timeout", "60s"])?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    let producer = client
        .transactional_producer("payment-centre", "payments", always(TxAction::Unknown))
        .await?;
    fn code<T>(r: Result<T, ClientError>) -> Option<ErrorCode> {
        r.err().and_then(|e| e.code())
    }
    // A producer group the broker refuses does not poison later reconnects.
    let bad = client
        .transactional_producer("bad name", "payments", always(TxAction::Commit))
        .await;
    assert_eq!(code(bad.map(|_| ())), Some(ErrorCode::INVALID_ARGUMENT));
    let a = producer.send_half(NewMessage::new("a")).await?;
    let b = producer.send_half(NewMessage::new("b")).await?;
    producer.rollback(a.tx_id).await?;
    producer.rollback(a.tx_id).await?; // idempotent
    assert_eq!(
        code(producer.commit(a.tx_id).await),
        Some(ErrorCode::TRANSACTION_RESOLVED)
    );
    let first = producer.commit(b.tx_id).await?;
    let again = producer.commit(b.tx_id).await?; // idempotent: same place
    assert_eq!(first, again);
    assert_eq!(
        code(producer.rollback(b.tx_id).await),
        Some(ErrorCode::TRANSACTION_RESOLVED)
    );
    assert_eq!(
        code(producer.commit(999_999).await),
        Some(ErrorCode::UNKNOWN_TRANSACTION)
    );
    assert_eq!(
        code(producer.rollback(999_999).await),
        Some(ErrorCode::UNKNOWN_TRANSACTION)
    );
    // Another producer group may not decide this group's transaction.
    let c = producer.send_half(NewMessage::new("c")).await?;
    let intruder = client
        .transactional_producer("someone-else", "payments", always(TxAction::Commit))
        .await?;
    assert_eq!(
        code(intruder.commit(c.tx_id).await),
        Some(ErrorCode::INVALID_ARGUMENT)
    );
    producer.rollback(c.tx_id).await?;
    let stored = read_all(&client, "payments", 0, 0).await?;
    assert_eq!(stored.len(), 1, "only b is in the log");
    assert_eq!(stored[0].payload, b"b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_wait_for_a_producer_and_wrong_answers_are_ignored() -> anyhow::Result<()> {
    use msmq_client::protocol::{
        decode_frame, encode_frame, BrokerRequest, BrokerRequestReply, Reply, Request,
    };
    let broker = TestBroker::start_with(&[
        "--transaction-timeout",
        "200ms",
        "--transaction-check-interval",
        "100ms",
        "--transaction-check-max",
        "50",
    ])?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    let gone = broker.client().await?;
    let producer = gone
        .transactional_producer("payment-centre", "payments", always(TxAction::Unknown))
        .await?;
    let half = producer.send_half(NewMessage::new("waiting")).await?;
    gone.close().await;
    // Many check intervals with nobody to ask: no check is used up.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let pending = client.list_transactions(false, 10).await?;
    assert_eq!(pending.len(), 1);
    assert_eq!(
        pending[0].check_count, 0,
        "checks that could not be sent were counted"
    );

    // A raw producer that answers for the wrong transaction: ignored, the
    // transaction stays pending (and that check counts).
    let config = broker.options().quic_client_config()?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let conn = endpoint
        .connect_with(config, broker.addr, "localhost")?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&encode_frame(&Request::RegisterProducer {
        producer_group: "payment-centre".into(),
    })?)
    .await?;
    send.finish()?;
    assert_eq!(
        decode_frame::<Reply>(&recv.read_to_end(1 << 16).await?)?,
        Reply::Done
    );
    let (mut send, mut recv) =
        tokio::time::timeout(Duration::from_secs(5), conn.accept_bi()).await??;
    let BrokerRequest::CheckTransaction(check) = decode_frame(&recv.read_to_end(1 << 20).await?)?;
    assert_eq!(check.tx_id, half.tx_id);
    send.write_all(&encode_frame(&BrokerRequestReply::TransactionState {
        tx_id: half.tx_id + 1000,
        action: TxAction::Commit,
    })?)
    .await?;
    send.finish()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    conn.close(0u32.into(), b"done");
    let pending = client.list_transactions(false, 10).await?;
    assert_eq!(pending.len(), 1, "a wrong answer must not resolve it");
    assert!(pending[0].check_count >= 1);
    assert!(read_all(&client, "payments", 0, 0).await?.is_empty());
    // A real producer connects: checking resumes and commits it.
    let back = broker.client().await?;
    let _p = back
        .transactional_producer("payment-centre", "payments", always(TxAction::Commit))
        .await?;
    until_resolved(&client, Duration::from_secs(10)).await?;
    assert_eq!(read_all(&client, "payments", 0, 0).await?.len(), 1);
    Ok(())
}

/// The decision a test's "local database" made for each transaction.
type Decisions = Arc<Mutex<HashMap<u64, TxAction>>>;

fn decided_checker(decisions: Decisions) -> impl Fn(&TransactionCheck) -> TxAction + Send + Sync {
    move |check: &TransactionCheck| {
        decisions
            .lock()
            .unwrap()
            .get(&check.tx_id)
            .copied()
            .unwrap_or(TxAction::Unknown)
    }
}

/// Every committed payload exactly once per group, no other.
async fn assert_exactly_committed(
    client: &Client,
    topic: &str,
    committed: &BTreeSet<String>,
    groups: &[&str],
) -> anyhow::Result<()> {
    for group in groups {
        let got = collect(client, group, topic, Duration::from_millis(600)).await?;
        let mut counts: BTreeMap<&String, usize> = BTreeMap::new();
        for p in &got {
            *counts.entry(p).or_default() += 1;
        }
        let duplicated: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).take(5).collect();
        assert!(
            duplicated.is_empty(),
            "group {group}: delivered twice: {duplicated:?}"
        );
        let got: BTreeSet<String> = got.into_iter().collect();
        let missing: Vec<_> = committed.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(committed).take(5).collect();
        assert!(
            missing.is_empty(),
            "group {group}: committed but not delivered: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "group {group}: delivered but not committed: {extra:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_a_thousand_pending_resolves_each_exactly_once() -> anyhow::Result<()> {
    let mut broker = TestBroker::start_with(&[
        "--transaction-timeout",
        "1s",
        "--transaction-check-interval",
        "200ms",
    ])?;
    let client = broker.client().await?;
    client.create_topic("payments", 3).await?;
    let decisions: Decisions = Arc::default();
    let producer = client
        .transactional_producer(
            "payment-centre",
            "payments",
            decided_checker(decisions.clone()),
        )
        .await?;
    let mut halves = Vec::new();
    for chunk in 0..10 {
        let sends = (0..100).map(|i| {
            let p = producer.clone();
            async move {
                p.send_half(NewMessage::new(format!("tx-{chunk}-{i}")))
                    .await
            }
        });
        for (i, r) in futures_join(sends).await.into_iter().enumerate() {
            halves.push((r?, format!("tx-{chunk}-{i}")));
        }
    }
    assert_eq!(halves.len(), 1000);
    assert_eq!(client.list_transactions(false, 10_000).await?.len(), 1000);
    // The local transactions: a third commit, a third roll back, a third stay open.
    let mut committed = BTreeSet::new();
    for (n, (half, payload)) in halves.iter().enumerate() {
        let action = match n % 3 {
            0 => TxAction::Commit,
            1 => TxAction::Rollback,
            _ => {
                // Decided later, known only to the checker.
                let late = if n.is_multiple_of(2) {
                    TxAction::Commit
                } else {
                    TxAction::Rollback
                };
                decisions.lock().unwrap().insert(half.tx_id, late);
                if late == TxAction::Commit {
                    committed.insert(payload.clone());
                }
                continue;
            }
        };
        decisions.lock().unwrap().insert(half.tx_id, action);
        if action == TxAction::Commit {
            committed.insert(payload.clone());
        }
    }
    // Send the decided ones without waiting and kill the broker mid-way:
    // some are applied and acknowledged, some applied but unacknowledged, some lost.
    let mut in_flight = Vec::new();
    for (n, (half, _)) in halves.iter().enumerate() {
        if n % 3 == 2 {
            continue;
        }
        let producer = producer.clone();
        let (tx_id, action) = (half.tx_id, decisions.lock().unwrap()[&half.tx_id]);
        in_flight.push(tokio::spawn(
            async move { producer.end(tx_id, action).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    broker.kill9();
    let mut acked = 0;
    for t in in_flight {
        t.abort();
        if let Ok(Ok(_)) = t.await {
            acked += 1;
        }
    }
    drop(producer);
    drop(client);
    broker.restart()?;
    let client = broker.client().await?;
    let pending_after = client.list_transactions(false, 10_000).await?.len();
    println!("decisions acknowledged before the kill: {acked} of 667; pending after restart: {pending_after}");
    let _producer = client
        .transactional_producer(
            "payment-centre",
            "payments",
            decided_checker(decisions.clone()),
        )
        .await?;
    until_resolved(&client, Duration::from_secs(30)).await?;
    assert_exactly_committed(
        &client,
        "payments",
        &committed,
        &["billing", "points", "notification"],
    )
    .await?;
    Ok(())
}

/// Await many futures concurrently (no extra dependency for a join_all).
async fn futures_join<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task panicked"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_store_mid_commit_and_mid_check_round_is_exactly_once() -> anyhow::Result<()>
{
    let mut broker = TestBroker::start_with(&[
        "--transaction-timeout",
        "300ms",
        "--transaction-check-interval",
        "200ms",
        "--transaction-check-reply-timeout",
        "2s",
    ])?;
    let admin = broker.client().await?;
    admin.create_topic("payments", 2).await?;
    let decisions: Decisions = Arc::default();
    let mut committed = BTreeSet::new();
    let mut n = 0u32;

    for point in ["after-store", "mid-commit", "mid-check"] {
        let client = broker.client().await?;
        let checker_decisions = decisions.clone();
        let block_checks = point == "mid-check";
        let producer = client
            .transactional_producer(
                "payment-centre",
                "payments",
                move |check: &TransactionCheck| {
                    if block_checks {
                        // Keep the check round open while the broker dies.
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    checker_decisions
                        .lock()
                        .unwrap()
                        .get(&check.tx_id)
                        .copied()
                        .unwrap_or(TxAction::Unknown)
                },
            )
            .await?;
        let mut halves = Vec::new();
        for _ in 0..60 {
            n += 1;
            let payload = format!("{point}-{n}");
            let half = producer.send_half(NewMessage::new(payload.clone())).await?;
            let action = if n.is_multiple_of(2) {
                TxAction::Commit
            } else {
                TxAction::Rollback
            };
            decisions.lock().unwrap().insert(half.tx_id, action);
            if action == TxAction::Commit {
                committed.insert(payload);
            }
            halves.push((half.tx_id, action));
        }
        match point {
            // Killed right after the half messages are stored.
            "after-store" => {}
            // Killed while the commits and rollbacks are being applied.
            "mid-commit" => {
                for (tx_id, action) in halves.iter().copied() {
                    let p = producer.clone();
                    tokio::spawn(async move { p.end(tx_id, action).await });
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            // Killed while check-backs are out and their answers are on the way.
            _ => tokio::time::sleep(Duration::from_millis(700)).await,
        }
        broker.kill9();
        drop(producer);
        client.close().await;
        broker.restart()?;
    }
    let client = broker.client().await?;
    let _producer = client
        .transactional_producer(
            "payment-centre",
            "payments",
            decided_checker(decisions.clone()),
        )
        .await?;
    until_resolved(&client, Duration::from_secs(30)).await?;
    assert_exactly_committed(&client, "payments", &committed, &["billing", "points"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_transactions_deliver_exactly_the_committed_set(
) -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&[
        "--transaction-timeout",
        "500ms",
        "--transaction-check-interval",
        "200ms",
    ])?;
    let admin = broker.client().await?;
    admin.create_topic("payments", 4).await?;
    let decisions: Decisions = Arc::default();
    let committed: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    // Producers stay connected until the end: they answer the check-backs.
    let mut keep = Vec::new();
    for p in 0..4u64 {
        let client = broker.client().await?;
        let producer = client
            .transactional_producer(
                "payment-centre",
                "payments",
                decided_checker(decisions.clone()),
            )
            .await?;
        keep.push(producer.clone());
        for lane in 0..16u64 {
            let (producer, decisions, committed) =
                (producer.clone(), decisions.clone(), committed.clone());
            tasks.push(tokio::spawn(async move {
                let mut seed = p * 1000 + lane + 1;
                for i in 0..157u64 {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let payload = format!("p{p}-l{lane}-{i}");
                    let half = producer.send_half(NewMessage::new(payload.clone())).await?;
                    let action = match seed % 3 {
                        0 => TxAction::Commit,
                        1 => TxAction::Rollback,
                        _ => TxAction::Unknown,
                    };
                    // The local outcome of an `unknown` one is decided now but
                    // only the checker tells the broker.
                    let real = if action == TxAction::Unknown {
                        if seed.is_multiple_of(2) {
                            TxAction::Commit
                        } else {
                            TxAction::Rollback
                        }
                    } else {
                        action
                    };
                    decisions.lock().unwrap().insert(half.tx_id, real);
                    if real == TxAction::Commit {
                        committed.lock().unwrap().insert(payload);
                    }
                    producer.end(half.tx_id, action).await?;
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    let total = decisions.lock().unwrap().len();
    assert!(total >= 10_000, "{total} transactions");
    until_resolved(&admin, Duration::from_secs(60)).await?;
    let committed = committed.lock().unwrap().clone();
    println!("{total} transactions, {} committed", committed.len());
    assert_exactly_committed(&admin, "payments", &committed, &["billing"]).await?;
    drop(keep);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immunity_postpones_checks_and_execute_wraps_the_local_transaction() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(FAST_CHECKS)?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    let first_check = Arc::new(Mutex::new(None::<Instant>));
    let seen = first_check.clone();
    let producer = client
        .transactional_producer("payment-centre", "payments", move |_: &TransactionCheck| {
            seen.lock().unwrap().get_or_insert_with(Instant::now);
            TxAction::Commit
        })
        .await?;
    // Immune for 1.5 s although the broker's timeout is 300 ms.
    let sent = Instant::now();
    let half = producer
        .send_half_with_immunity(NewMessage::new("long-running"), Duration::from_millis(1500))
        .await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pending = client.list_transactions(false, 10).await?;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].check_count, 0, "checked while immune");
    until_resolved(&client, Duration::from_secs(10)).await?;
    let checked_after = first_check
        .lock()
        .unwrap()
        .expect("checked once immune no more")
        - sent;
    assert!(
        checked_after >= Duration::from_millis(1400),
        "checked after {checked_after:?}"
    );
    assert_eq!(read_all(&client, "payments", 0, 0).await?[0].id, half.id);

    // execute(): the local transaction runs only after the half message is stored.
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    let ended = producer
        .execute(NewMessage::new("wrapped-commit"), |half| async move {
            assert!(half.tx_id > 0);
            r.fetch_add(1, Ordering::SeqCst);
            TxAction::Commit
        })
        .await?;
    assert!(matches!(ended, TxEnded::Committed(_)));
    let ended = producer
        .execute(NewMessage::new("wrapped-rollback"), |_| async {
            TxAction::Rollback
        })
        .await?;
    assert_eq!(ended, TxEnded::RolledBack);
    // A half message the broker refuses: the local transaction never runs.
    let missing = client
        .transactional_producer("payment-centre", "no-such-topic", always(TxAction::Commit))
        .await?;
    let r = ran.clone();
    let refused = missing
        .execute(NewMessage::new("x"), |_| async move {
            r.fetch_add(100, Ordering::SeqCst);
            TxAction::Commit
        })
        .await;
    assert_eq!(
        refused.err().and_then(|e| e.code()),
        Some(ErrorCode::UNKNOWN_TOPIC)
    );
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    let payloads: Vec<Vec<u8>> = read_all(&client, "payments", 0, 0)
        .await?
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(
        payloads,
        vec![b"long-running".to_vec(), b"wrapped-commit".to_vec()]
    );
    Ok(())
}
