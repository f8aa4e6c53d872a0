//! Broker efficiency figures for the benches: CPU seconds per million
//! messages and write amplification, from the broker's own `/metrics`
//! (`msmq_process_*`), read before and after the timed part of a run. They
//! move far less with a noisy machine than messages per second do.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long reading `/metrics` may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest `/metrics` page read.
const SCRAPE_BYTES_MAX: usize = 16 << 20;

/// The broker process's totals at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerTotals {
    pub cpu_seconds: f64,
    pub disk_written_bytes: f64,
    pub written_bytes: f64,
    pub resident_peak_bytes: f64,
}

/// `host:port` and path of a `http://host:port/path` address.
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    Some(match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/metrics"),
    })
}

/// Read the broker's totals; `None` (with a warning) when the page cannot
/// be read, so a bench without metrics still runs.
pub async fn read(url: &str) -> Option<BrokerTotals> {
    match tokio::time::timeout(SCRAPE_TIMEOUT, fetch(url)).await {
        Ok(Ok(page)) => Some(parse(&page)),
        Ok(Err(e)) => {
            eprintln!("bench: no broker efficiency figures from {url}: {e}");
            None
        }
        Err(_) => {
            eprintln!(
                "bench: no broker efficiency figures: {url} did not answer in {SCRAPE_TIMEOUT:?}"
            );
            None
        }
    }
}

async fn fetch(url: &str) -> anyhow::Result<String> {
    let (host, path) =
        split_url(url).ok_or_else(|| anyhow::anyhow!("expected http://host:port/path"))?;
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut page = Vec::new();
    (&mut stream)
        .take(SCRAPE_BYTES_MAX as u64)
        .read_to_end(&mut page)
        .await?;
    let page = String::from_utf8_lossy(&page).into_owned();
    anyhow::ensure!(
        page.starts_with("HTTP/1.") && page.split_whitespace().nth(1) == Some("200"),
        "{}",
        page.lines().next().unwrap_or("no reply")
    );
    Ok(page)
}

fn parse(page: &str) -> BrokerTotals {
    let mut totals = BrokerTotals::default();
    for line in page.lines() {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        match name {
            "msmq_process_cpu_seconds_total" => totals.cpu_seconds = value,
            "msmq_process_disk_written_bytes_total" => totals.disk_written_bytes = value,
            "msmq_process_written_bytes_total" => totals.written_bytes = value,
            "msmq_process_resident_peak_bytes" => totals.resident_peak_bytes = value,
            _ => {}
        }
    }
    totals
}

/// The figures of a run between two readings: `messages` handled,
/// `payload_bytes` acknowledged.
pub fn figures(
    before: Option<BrokerTotals>,
    after: Option<BrokerTotals>,
    messages: u64,
    payload_bytes: u64,
) -> serde_json::Value {
    let (Some(before), Some(after)) = (before, after) else {
        return serde_json::json!({});
    };
    let per_payload = |d: f64| {
        if payload_bytes == 0 {
            serde_json::Value::Null
        } else {
            serde_json::json!(d / payload_bytes as f64)
        }
    };
    let cpu = after.cpu_seconds - before.cpu_seconds;
    serde_json::json!({
        "broker_cpu_seconds": cpu,
        "broker_cpu_seconds_per_million": if messages == 0 { 0.0 } else { cpu * 1e6 / messages as f64 },
        "write_amplification": per_payload(after.disk_written_bytes - before.disk_written_bytes),
        "write_call_amplification": per_payload(after.written_bytes - before.written_bytes),
        "broker_peak_rss_mib": after.resident_peak_bytes / (1024.0 * 1024.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_the_metrics_page() {
        let page = "HTTP/1.1 200 OK\r\n\r\n# HELP x\nmsmq_process_cpu_seconds_total 12.5\n\
                    msmq_process_disk_written_bytes_total 3000\nmsmq_process_written_bytes_total 4000\n\
                    msmq_process_resident_peak_bytes 1048576\nother 1\n";
        let t = parse(page);
        assert_eq!(t.cpu_seconds, 12.5);
        assert_eq!(t.disk_written_bytes, 3000.0);
        let before = BrokerTotals::default();
        let f = figures(Some(before), Some(t), 2_000_000, 1000);
        assert_eq!(f["write_amplification"], 3.0);
        assert_eq!(f["write_call_amplification"], 4.0);
        assert_eq!(f["broker_cpu_seconds_per_million"], 6.25);
        assert_eq!(f["broker_peak_rss_mib"], 1.0);
        assert_eq!(figures(None, Some(t), 1, 1), serde_json::json!({}));
        assert_eq!(
            split_url("http://127.0.0.1:7172/metrics"),
            Some(("127.0.0.1:7172", "/metrics"))
        );
        assert_eq!(split_url("http://h:1"), Some(("h:1", "/metrics")));
        assert_eq!(split_url("https://h:1"), None);
    }
}
