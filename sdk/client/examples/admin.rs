//! List topics with their offsets and every group's lag.
//!
//! ```text
//! cargo run -p msmq-client --example admin
//! ```

use msmq_client::{Client, ClientOptions};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let client = Client::connect(ClientOptions::from_env()).await?;
    let (protocol, version) = client.ping().await?;
    println!("broker {version}, protocol {protocol}");
    for topic in client.list_topics().await? {
        let d = client.describe_topic(&topic.name).await?;
        let end: u64 = d.partitions.iter().map(|p| p.end_offset).sum();
        println!(
            "{} ({} partitions, {end} messages)",
            topic.name, topic.partitions
        );
        for g in &d.groups {
            let lag: u64 = g.partitions.iter().map(|p| p.lag).sum();
            println!("  group {}: lag {lag}", g.group);
        }
    }
    for g in client.list_groups().await? {
        println!(
            "group {} with {} live members on {:?}",
            g.group, g.members, g.topics
        );
    }
    client.close().await;
    Ok(())
}
