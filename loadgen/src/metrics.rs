//! The spawned nodes' own metrics as loadgen reads them: a node's `/metrics`, the records the
//! nodes forwarded to their leaders, and scraping them as a Prometheus server would.

use std::sync::atomic::Ordering;
use std::time::Duration;

/// A node's /metrics, if it answers.
pub(crate) async fn metrics_of(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).await.ok()?;
    body.starts_with(b"HTTP/1.1 200")
        .then(|| String::from_utf8_lossy(&body).into_owned())
}

/// Records the nodes at `admins` forwarded to their partitions' leaders so far
/// (`tern_publish_forwarded_records_total`); None without admin listeners or when one does not
/// answer.
pub(crate) async fn forwarded(admins: &[String]) -> Option<u64> {
    if admins.is_empty() {
        return None;
    }
    let mut sum = 0u64;
    for a in admins {
        let text = metrics_of(a).await?;
        let v = text.lines().find_map(|l| {
            l.strip_prefix("tern_publish_forwarded_records_total ")?
                .trim()
                .parse::<f64>()
                .ok()
        })?;
        sum += v as u64;
    }
    Some(sum)
}

/// Scrapes done by [`scrape`] so far.
pub(crate) static SCRAPES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// GETs every node's /metrics every `every`, as a Prometheus server would, until aborted.
pub(crate) async fn scrape(admins: Vec<String>, every: Duration) -> u64 {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for a in &admins {
            if metrics_of(a).await.is_some() {
                SCRAPES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
