//! Consumer-group membership: rebalancing on leave, expiry and join.

use crate::harness::TestBroker;
use crate::produce_consume::drain;
use msmq_client::{ConsumerOptions, FetchLimits, NewMessage, StartFrom};
use std::collections::BTreeSet;
use std::time::Duration;

fn options(session_ms: u64) -> ConsumerOptions {
    ConsumerOptions {
        session_timeout: Duration::from_millis(session_ms),
        limits: FetchLimits {
            max_messages: 50,
            max_bytes: 1 << 20,
            max_wait_ms: 100,
        },
        ..ConsumerOptions::default()
    }
}

async fn fill(client: &msmq_client::Client, topic: &str, n: usize) -> anyhow::Result<()> {
    fill_named(client, topic, "m", n).await
}

/// `n` messages `{prefix}0`, `{prefix}1`, …
async fn fill_named(
    client: &msmq_client::Client,
    topic: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    let producer = client.producer(topic);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        producer
            .send_batch(
                chunk
                    .iter()
                    .map(|i| NewMessage::new(format!("{prefix}{i}")))
                    .collect(),
            )
            .await?;
    }
    Ok(())
}

fn payloads(messages: &[msmq_client::ReceivedMessage]) -> BTreeSet<String> {
    messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.message.payload).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_to_the_remaining_member_when_one_leaves() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 4).await?;
    fill(&client, "payments", 800).await?;

    let mut a = client
        .consumer("billing", &["payments"], options(10_000))
        .await?;
    let mut b = client
        .consumer("billing", &["payments"], options(10_000))
        .await?;
    b.heartbeat_now().await?;
    a.heartbeat_now().await?;
    let a_parts: BTreeSet<_> = a.assignment().partitions.iter().cloned().collect();
    let b_parts: BTreeSet<_> = b.assignment().partitions.iter().cloned().collect();
    assert_eq!(a_parts.len(), 2);
    assert_eq!(b_parts.len(), 2);
    assert!(
        a_parts.is_disjoint(&b_parts),
        "a partition is served to one member at a time"
    );

    // Each takes some of its own partitions, commits, then b leaves.
    let got_a = drain(&mut a, 100, Duration::from_secs(10)).await?;
    let got_b = drain(&mut b, 100, Duration::from_secs(10)).await?;
    assert!(got_a
        .iter()
        .all(|m| a_parts.iter().any(|tp| tp.partition == m.partition)));
    assert!(got_b
        .iter()
        .all(|m| b_parts.iter().any(|tp| tp.partition == m.partition)));
    b.leave().await?;

    let rest = drain(
        &mut a,
        800 - got_a.len() - got_b.len(),
        Duration::from_secs(20),
    )
    .await?;
    assert_eq!(
        a.assignment().partitions.len(),
        4,
        "a owns every partition now"
    );
    let all: Vec<_> = got_a
        .iter()
        .chain(&got_b)
        .chain(&rest)
        .map(|m| (m.partition, m.offset()))
        .collect();
    let distinct: BTreeSet<_> = all.iter().collect();
    assert_eq!(all.len(), 800, "nothing lost, nothing twice");
    assert_eq!(distinct.len(), 800);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_heartbeating_is_expired() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    fill(&client, "payments", 100).await?;
    let mut alive = client
        .consumer("points", &["payments"], options(600))
        .await?;
    // A second member on its own connection, which then goes silent: its
    // heartbeat task stops with it but the connection stays open.
    let silent_client = broker.client().await?;
    let silent = silent_client
        .consumer("points", &["payments"], options(600))
        .await?;
    alive.heartbeat_now().await?;
    assert_eq!(alive.assignment().partitions.len(), 1);
    drop(silent);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = drain(&mut alive, 100, Duration::from_secs(10)).await?;
    assert_eq!(alive.assignment().partitions.len(), 2);
    assert_eq!(got.len(), 100);
    let description = client.describe_group("points").await?;
    assert_eq!(description.members.len(), 1);
    drop(silent_client);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_leaves_at_once_and_latest_skips_the_backlog() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    fill(&client, "payments", 50).await?;
    let other = broker.client().await?;
    let mut late = other
        .consumer(
            "notify",
            &["payments"],
            ConsumerOptions {
                start: StartFrom::Latest,
                ..options(60_000)
            },
        )
        .await?;
    assert!(late.poll().await?.is_empty(), "latest starts at the end");
    fill(&client, "payments", 10).await?;
    let got = drain(&mut late, 10, Duration::from_secs(10)).await?;
    assert_eq!(got.len(), 10);
    let mut stay = client
        .consumer("notify", &["payments"], options(60_000))
        .await?;
    other.close().await;
    // The closed connection's member is gone well before its 60 s session.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        stay.heartbeat_now().await?;
        if stay.assignment().partitions.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "member of a closed connection not removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It resumes from the group's committed offsets: nothing new.
    assert!(stay.poll().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_is_the_end_at_the_join_not_at_the_first_poll() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 4).await?;
    fill(&client, "payments", 40).await?;
    let latest = || ConsumerOptions {
        start: StartFrom::Latest,
        ..options(60_000)
    };
    // Two members join before anything new is produced; neither has polled.
    let mut a = client.consumer("notify", &["payments"], latest()).await?;
    let other = broker.client().await?;
    let mut b = other.consumer("notify", &["payments"], latest()).await?;
    fill_named(&client, "payments", "new", 100).await?;
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 100 && std::time::Instant::now() < deadline {
        for member in [&mut a, &mut b] {
            got.extend(member.poll().await?);
            member.commit().await?;
        }
    }
    assert_eq!(
        got.len(),
        100,
        "every message produced after the join, once"
    );
    assert_eq!(
        payloads(&got),
        (0..100).map(|i| format!("new{i}")).collect()
    );

    // A pin never replaces a commit: a member joining with `latest` later
    // resumes where the group committed.
    a.leave().await?;
    b.leave().await?;
    fill_named(&client, "payments", "later", 20).await?;
    let mut c = client.consumer("notify", &["payments"], latest()).await?;
    let got = drain(&mut c, 20, Duration::from_secs(10)).await?;
    assert_eq!(
        payloads(&got),
        (0..20).map(|i| format!("later{i}")).collect(),
        "the group's committed offsets still hold"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_newcomer_does_not_move_an_earliest_member_to_the_end() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    fill_named(&client, "payments", "old", 40).await?;
    // The first member starts from the beginning and has not polled yet.
    let mut early = client
        .consumer("audit", &["payments"], options(60_000))
        .await?;
    let other = broker.client().await?;
    let mut late = other
        .consumer(
            "audit",
            &["payments"],
            ConsumerOptions {
                start: StartFrom::Latest,
                ..options(60_000)
            },
        )
        .await?;
    early.heartbeat_now().await?;
    late.heartbeat_now().await?;
    let owned: BTreeSet<u32> = early
        .assignment()
        .partitions
        .iter()
        .map(|p| p.partition)
        .collect();
    assert_eq!(owned.len(), 1, "{:?}", early.assignment());
    let description = client.describe_topic("payments").await?;
    let want: usize = description
        .partitions
        .iter()
        .filter(|p| owned.contains(&p.partition))
        .map(|p| p.end_offset as usize)
        .sum();
    assert!(want > 0);
    let got = drain(&mut early, want, Duration::from_secs(10)).await?;
    assert_eq!(
        got.len(),
        want,
        "the earliest member reads its partition from the start"
    );
    assert!(
        late.poll().await?.is_empty(),
        "the newcomer starts at the end"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_poll_reply_is_read_again_not_skipped() -> anyhow::Result<()> {
    use msmq_client::protocol::{PartitionOffset, Reply, Request};
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    fill(&client, "payments", 30).await?;
    let joined = client
        .request(&Request::JoinGroup {
            group: "billing".into(),
            topics: vec!["payments".into()],
            start: StartFrom::Earliest,
            session_timeout_ms: 10_000,
            broadcast_instance: None,
            tag_filter: None,
            sql_filter: None,
        })
        .await?;
    let Reply::Joined(joined) = joined else {
        panic!("{joined:?}")
    };
    let poll = |positions: Vec<PartitionOffset>| Request::Poll {
        group: "billing".into(),
        member_id: joined.member_id,
        limits: FetchLimits {
            max_messages: 10,
            max_bytes: 1 << 20,
            max_wait_ms: 0,
        },
        positions,
    };
    let first_offsets = |reply: Reply| -> Vec<u64> {
        match reply {
            Reply::Polled(p) => p
                .batches
                .iter()
                .flat_map(|b| b.messages.iter().map(|m| m.offset))
                .collect(),
            other => panic!("{other:?}"),
        }
    };
    // Two polls whose replies "never arrived" (the member saw nothing).
    assert_eq!(
        first_offsets(client.request(&poll(vec![])).await?),
        (0..10).collect::<Vec<_>>()
    );
    assert_eq!(
        first_offsets(client.request(&poll(vec![])).await?),
        (10..20).collect::<Vec<_>>()
    );
    // The member says where it really is: offset 0 again, nothing skipped.
    let at_zero = vec![PartitionOffset {
        topic: "payments".into(),
        partition: 0,
        offset: 0,
    }];
    assert_eq!(
        first_offsets(client.request(&poll(at_zero)).await?),
        (0..10).collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_a_timestamp_replays_from_the_first_message_at_or_after_it() -> anyhow::Result<()>
{
    use msmq_client::protocol::ResetTo;
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("ledger", 2).await?;
    fill(&client, "ledger", 200).await?;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let producer = client.producer("ledger");
    let mut later = BTreeSet::new();
    for i in 0..10 {
        for ack in producer
            .send_batch(
                (0..10)
                    .map(|j| NewMessage::new(format!("late-{i}-{j}")))
                    .collect(),
            )
            .await?
        {
            later.insert((ack.partition, ack.offset));
        }
    }
    let mut consumer = client
        .consumer("audit", &["ledger"], options(10_000))
        .await?;
    assert_eq!(
        drain(&mut consumer, 300, Duration::from_secs(10))
            .await?
            .len(),
        300
    );
    // Live members block a reset.
    let active = client
        .reset_group_offsets("audit", "ledger", ResetTo::Earliest)
        .await;
    assert_eq!(
        active.err().and_then(|e| e.code()),
        Some(msmq_client::ErrorCode::GROUP_ACTIVE)
    );
    consumer.leave().await?;
    let offsets = client
        .reset_group_offsets("audit", "ledger", ResetTo::Timestamp(cut))
        .await?;
    assert_eq!(offsets.len(), 2);
    let mut consumer = client
        .consumer("audit", &["ledger"], options(10_000))
        .await?;
    let replayed = drain(&mut consumer, 100, Duration::from_secs(10)).await?;
    let got: BTreeSet<_> = replayed.iter().map(|m| (m.partition, m.offset())).collect();
    assert_eq!(got, later, "exactly the messages appended after the cut");
    assert!(replayed.iter().all(|m| m.message.timestamp_ms >= cut));
    consumer.leave().await?;
    // Earliest replays everything, latest nothing.
    client
        .reset_group_offsets("audit", "ledger", ResetTo::Earliest)
        .await?;
    let mut consumer = client
        .consumer("audit", &["ledger"], options(10_000))
        .await?;
    assert_eq!(
        drain(&mut consumer, 300, Duration::from_secs(10))
            .await?
            .len(),
        300
    );
    consumer.leave().await?;
    client
        .reset_group_offsets("audit", "ledger", ResetTo::Latest)
        .await?;
    let mut consumer = client
        .consumer("audit", &["ledger"], options(10_000))
        .await?;
    assert!(consumer.poll().await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_members_each_receive_every_message_with_their_own_progress() -> anyhow::Result<()>
{
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("alerts", 3).await?;
    fill(&client, "alerts", 300).await?;
    let broadcast = |instance: &str| ConsumerOptions {
        broadcast_instance: Some(instance.to_string()),
        ..options(10_000)
    };
    let mut members = Vec::new();
    for instance in ["host-a", "host-b", "host-c"] {
        members.push(
            client
                .consumer("notify", &["alerts"], broadcast(instance))
                .await?,
        );
    }
    for member in members.iter_mut() {
        assert_eq!(
            member.assignment().partitions.len(),
            3,
            "a broadcast member owns every partition"
        );
        let got = drain(member, 300, Duration::from_secs(10)).await?;
        let distinct: BTreeSet<_> = got.iter().map(|m| (m.partition, m.offset())).collect();
        assert_eq!(got.len(), 300, "{} got {}", member.group(), got.len());
        assert_eq!(distinct.len(), 300);
    }
    // Each instance keeps its own progress: host-a comes back and sees only
    // what is new; a new instance starts from the beginning.
    let a = members.remove(0);
    a.leave().await?;
    fill(&client, "alerts", 30).await?;
    let mut a = client
        .consumer("notify", &["alerts"], broadcast("host-a"))
        .await?;
    assert_eq!(drain(&mut a, 30, Duration::from_secs(10)).await?.len(), 30);
    assert!(a.poll().await?.is_empty());
    let mut d = client
        .consumer("notify", &["alerts"], broadcast("host-d"))
        .await?;
    assert_eq!(
        drain(&mut d, 330, Duration::from_secs(10)).await?.len(),
        330
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_and_sql_filters_deliver_exactly_the_matching_messages() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    let producer = client.producer("payments");
    let mut want_tag = BTreeSet::new();
    let mut want_sql = BTreeSet::new();
    let mut want_both = BTreeSet::new();
    for i in 0..600u32 {
        let tag = ["TagA", "TagB", "TagC"][(i % 3) as usize];
        let amount = (i * 37) % 3000;
        let region = ["EU", "US", "APAC"][(i % 5 % 3) as usize];
        let mut m = NewMessage::new(format!("m{i}"))
            .with_tag(tag)
            .with_header("region", region);
        if i % 7 != 0 {
            m = m.with_header("amount", amount.to_string());
        }
        let has_amount = i % 7 != 0;
        let tag_ok = tag == "TagA" || tag == "TagB";
        let sql_ok = has_amount && amount > 1000 && region == "EU";
        if tag_ok {
            want_tag.insert(format!("m{i}"));
        }
        if sql_ok {
            want_sql.insert(format!("m{i}"));
        }
        if tag_ok && sql_ok {
            want_both.insert(format!("m{i}"));
        }
        producer.send_batch(vec![m]).await?;
    }
    let filtered = |tag: Option<&str>, sql: Option<&str>| ConsumerOptions {
        tag_filter: tag.map(String::from),
        sql_filter: sql.map(String::from),
        ..options(10_000)
    };
    let cases = [
        ("tags", filtered(Some("TagA || TagB"), None), &want_tag),
        (
            "sql",
            filtered(None, Some("amount > 1000 AND region = 'EU'")),
            &want_sql,
        ),
        (
            "both",
            filtered(
                Some("TagA || TagB"),
                Some("amount > 1000 AND region = 'EU'"),
            ),
            &want_both,
        ),
    ];
    for (group, opts, want) in cases {
        let mut consumer = client.consumer(group, &["payments"], opts).await?;
        let got = drain(&mut consumer, want.len(), Duration::from_secs(10)).await?;
        let got: BTreeSet<String> = got
            .iter()
            .map(|m| String::from_utf8(m.message.payload.clone()).unwrap())
            .collect();
        assert_eq!(&got, want, "group {group}");
        assert!(
            consumer.poll().await?.is_empty(),
            "nothing more for {group}"
        );
        consumer.commit().await?;
        consumer.leave().await?;
        // Progress covers the left-out messages too: no lag.
        let lag: u64 = client
            .describe_topic("payments")
            .await?
            .groups
            .iter()
            .filter(|g| g.group == group)
            .flat_map(|g| g.partitions.iter().map(|p| p.lag))
            .sum();
        assert_eq!(lag, 0, "group {group}");
    }
    // Per-message-ack consumers are filtered the same way.
    let mut acking = client
        .consumer(
            "acking",
            &["payments"],
            filtered(None, Some("region IN ('US') AND amount IS NULL")),
        )
        .await?;
    let mut got = BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let batch = acking.receive(Duration::from_secs(30)).await?;
        if batch.is_empty() && !got.is_empty() {
            break;
        }
        for d in &batch {
            got.insert(String::from_utf8(d.message.payload.clone())?);
        }
        acking.ack(&batch).await?;
    }
    let want: BTreeSet<String> = (0..600u32)
        .filter(|i| i % 7 == 0 && i % 5 % 3 == 1)
        .map(|i| format!("m{i}"))
        .collect();
    assert_eq!(got, want);
    // Invalid expressions are refused when subscribing.
    for (tag, sql) in [
        (None, Some("amount >")),
        (None, Some("region = 'EU")),
        (Some("A || "), None),
    ] {
        let err = client
            .consumer("bad", &["payments"], filtered(tag, sql))
            .await
            .err()
            .expect("refused");
        assert_eq!(
            err.code(),
            Some(msmq_client::ErrorCode::INVALID_ARGUMENT),
            "{err}"
        );
        assert!(err.to_string().contains("filter"), "{err}");
    }
    Ok(())
}

/// Poll until `idle` passes with nothing new, committing each poll.
async fn drain_until_idle(
    consumer: &mut msmq_client::Consumer,
    idle: Duration,
) -> anyhow::Result<Vec<msmq_client::ReceivedMessage>> {
    let mut got = Vec::new();
    let mut quiet_since = std::time::Instant::now();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while quiet_since.elapsed() < idle && std::time::Instant::now() < deadline {
        let batch = consumer.poll().await?;
        consumer.commit().await?;
        if !batch.is_empty() {
            quiet_since = std::time::Instant::now();
        }
        got.extend(batch);
    }
    Ok(got)
}

/// With the default prefetch, a member fetches far ahead of its polls; what
/// it polled comes in offset order, once, and its commits cover only that:
/// after it leaves, the next member starts right after the last message
/// polled, whatever was prefetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetched_messages_come_in_order_and_commits_cover_only_what_was_polled(
) -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 1).await?;
    fill(&client, "payments", 1000).await?;
    let small = |max_messages| ConsumerOptions {
        limits: FetchLimits {
            max_messages,
            max_bytes: 1 << 20,
            max_wait_ms: 100,
        },
        ..ConsumerOptions::default()
    };
    assert!(small(1).prefetch.is_on(), "prefetch is on by default");
    let mut first = client.consumer("billing", &["payments"], small(10)).await?;
    let polled = first.poll().await?;
    // A commit in the background counts once awaited, like a plain one.
    first.commit_in_background().await??;
    assert_eq!(
        polled.iter().map(|m| m.offset()).collect::<Vec<_>>(),
        (0..10).collect::<Vec<u64>>()
    );
    // Let the prefetch run ahead, then leave with it full.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.leave().await?;

    let mut next = client
        .consumer("billing", &["payments"], small(100))
        .await?;
    let rest = drain_until_idle(&mut next, Duration::from_millis(500)).await?;
    assert_eq!(
        rest.iter().map(|m| m.offset()).collect::<Vec<_>>(),
        (10..1000).collect::<Vec<u64>>(),
        "every later message once, in order, from the first one not polled"
    );
    Ok(())
}

/// A member whose prefetch holds messages of a partition it then loses
/// drops them: after the rebalance it polls only its own partitions, and
/// no message reaches both members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_loses_a_partition_drops_what_it_prefetched_of_it() -> anyhow::Result<()> {
    let broker = TestBroker::start()?;
    let client = broker.client().await?;
    client.create_topic("payments", 2).await?;
    fill(&client, "payments", 400).await?;
    let mut options = options(10_000);
    options.limits.max_messages = 10;
    let mut a = client
        .consumer("billing", &["payments"], options.clone())
        .await?;
    let first = a.poll().await?;
    a.commit().await?;
    assert!(!first.is_empty());
    // a's prefetch now holds much of both partitions.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut b = client.consumer("billing", &["payments"], options).await?;
    b.heartbeat_now().await?;
    a.heartbeat_now().await?;
    let a_parts: BTreeSet<u32> = a
        .assignment()
        .partitions
        .iter()
        .map(|p| p.partition)
        .collect();
    let b_parts: BTreeSet<u32> = b
        .assignment()
        .partitions
        .iter()
        .map(|p| p.partition)
        .collect();
    assert_eq!(
        (a_parts.len(), b_parts.len()),
        (1, 1),
        "{a_parts:?} {b_parts:?}"
    );

    let after_a = drain_until_idle(&mut a, Duration::from_millis(500)).await?;
    let got_b = drain_until_idle(&mut b, Duration::from_millis(500)).await?;
    assert!(
        after_a.iter().all(|m| a_parts.contains(&m.partition)),
        "after the rebalance a polls only its own partition"
    );
    let key = |m: &msmq_client::ReceivedMessage| (m.partition, m.offset());
    let a_keys: BTreeSet<_> = first.iter().chain(&after_a).map(key).collect();
    let b_keys: BTreeSet<_> = got_b.iter().map(key).collect();
    assert!(
        a_keys.is_disjoint(&b_keys),
        "no message reaches both members: {:?}",
        a_keys.intersection(&b_keys).collect::<Vec<_>>()
    );
    assert_eq!(
        first.len() + after_a.len() + got_b.len(),
        400,
        "every message once"
    );
    Ok(())
}
