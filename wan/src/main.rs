//! `tern-wan`: delaying TCP proxies, for trying Tern across simulated regions by hand
//! (docs/geo.md). Each `--route LISTEN=TARGET` forwards LISTEN to TARGET with the given one-way
//! delay each way; the bytes carried are printed every `--report-s` and at Ctrl-C.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tern_wan::{Link, Proxy};

#[derive(Parser)]
#[command(name = "tern-wan", about = "A WAN simulator: delaying TCP proxies")]
struct Args {
    /// LISTEN=TARGET, e.g. 127.0.0.1:7170=127.0.0.1:7070 (port 0 takes a free port); repeat.
    #[arg(long = "route", required = true, value_name = "LISTEN=TARGET")]
    routes: Vec<String>,
    /// One-way delay from the client to the target, in ms.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// One-way delay back [default: --delay-ms].
    #[arg(long)]
    back_delay_ms: Option<u64>,
    /// Each chunk's delay varies within ± this many ms (order is kept).
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Bandwidth of each direction of each connection, in kilobytes per second [default: unlimited].
    #[arg(long)]
    bandwidth_kbps: Option<u64>,
    /// Print the bytes carried this often, in seconds (0: only at the end).
    #[arg(long, default_value_t = 0)]
    report_s: u64,
}

async fn parse_route(s: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let (l, t) = s
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("route {s:?} is not LISTEN=TARGET"))?;
    let l = l
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("route {s:?}: listen address: {e}"))?;
    let t = tokio::net::lookup_host(t.trim())
        .await
        .map_err(|e| anyhow::anyhow!("route {s:?}: target: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("route {s:?}: the target has no address"))?;
    Ok((l, t))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(a.delay_ms <= 60_000, "--delay-ms is at most 60000");
    anyhow::ensure!(
        a.jitter_ms <= a.delay_ms,
        "--jitter-ms is at most --delay-ms"
    );
    let link = |ms: u64| Link {
        delay: Duration::from_millis(ms),
        jitter: Duration::from_millis(a.jitter_ms),
        bandwidth: a.bandwidth_kbps.map(|k| k * 1000),
    };
    let mut proxies = Vec::new();
    for r in &a.routes {
        let (listen, target) = parse_route(r).await?;
        let p = Proxy::start(
            listen,
            target,
            link(a.delay_ms),
            link(a.back_delay_ms.unwrap_or(a.delay_ms)),
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
        println!("route {} -> {}", p.addr(), p.target());
        proxies.push(p);
    }
    let report = |proxies: &[Proxy]| {
        for p in proxies {
            let c = p.counters();
            println!(
                "{} -> {}: {} bytes forward, {} back, {} connections",
                p.addr(),
                p.target(),
                c.forward.load(std::sync::atomic::Ordering::Relaxed),
                c.backward.load(std::sync::atomic::Ordering::Relaxed),
                c.connections.load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    };
    let every = Duration::from_secs(a.report_s.max(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(every), if a.report_s > 0 => report(&proxies),
        }
    }
    report(&proxies);
    Ok(())
}
