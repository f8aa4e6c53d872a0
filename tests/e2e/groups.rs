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
    let producer = client.producer(topic);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        producer
            .send_batch(
                chunk
                    .iter()
                    .map(|i| NewMessage::new(format!("m{i}")))
                    .collect(),
            )
            .await?;
    }
    Ok(())
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
