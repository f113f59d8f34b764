//! `loadgen`: Tern's load generator. See docs/benchmarks.md for the rules of measurement and the
//! named workloads; `loadgen --help` for the options.

mod accounting;
mod cluster;
mod failover;
mod payload;
mod run;
mod settings;

use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use hdrhistogram::Histogram;
use tern::proto::v1 as pb;

use settings::{Args, Settings};

fn main() {
    let args = Args::parse();
    if args.serve_self {
        // A spawned node when no `tern` binary sits next to loadgen: the same node code.
        let argv: Vec<String> = std::env::args().filter(|a| a != "--serve-self").collect();
        let code = match tern::cli::main_from(argv) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match rt.block_on(main_async(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

async fn main_async(args: Args) -> anyhow::Result<i32> {
    let s = Settings::resolve(&args)?;
    if let Some(why) = s.unsupported(args.spawn.is_some()) {
        anyhow::bail!("{why}");
    }
    anyhow::ensure!(
        !args.secure || args.spawn.is_some(),
        "--secure secures a spawned cluster; for --brokers give --tls-ca and --token"
    );
    if !args.secure {
        run::set_security(args.security.clone());
    }
    let cluster = match (args.spawn, args.brokers.is_empty()) {
        (Some(n), true) => {
            cluster::Cluster::spawn(
                n,
                args.tern_bin.clone(),
                args.secure,
                args.scrape_ms.is_some(),
            )
            .await?
        }
        (None, false) => cluster::Cluster::existing(args.brokers.clone()),
        (Some(_), false) => anyhow::bail!("use either --spawn or --brokers, not both"),
        (None, true) => anyhow::bail!("say where Tern runs: --spawn N or --brokers host:port"),
    };
    anyhow::ensure!(
        args.scrape_ms.is_none() || args.spawn.is_some(),
        "--scrape-ms scrapes the nodes loadgen spawns (--spawn N)"
    );
    let addrs = cluster.addrs.clone();
    let scraper = args.scrape_ms.map(|ms| {
        tokio::spawn(scrape(
            cluster.admins.clone(),
            Duration::from_millis(ms.max(10)),
        ))
    });
    let cpu_before = cluster.cpu_seconds();
    let cluster = std::sync::Arc::new(tokio::sync::Mutex::new(cluster));
    let killer = s.kill_every_s.map(|every| {
        let cluster = cluster.clone();
        let warmup = s.warmup_s;
        let until = Duration::from_secs(s.warmup_s + s.duration_s);
        tokio::spawn(failover::run(
            cluster,
            Duration::from_secs(every),
            warmup,
            until,
        ))
    });
    let mut result = run_on(&s, &addrs).await;
    // The nodes' CPU per 1,000 acknowledged records (a restarted node starts from zero, so
    // not for runs that kill nodes).
    let cpu_after = cluster.lock().await.cpu_seconds();
    let scrapes = match scraper {
        Some(t) => {
            t.abort();
            Some(t.await.unwrap_or_else(|_| SCRAPES.load(Ordering::Relaxed)))
        }
        None => None,
    };
    if let Ok(r) = &mut result {
        if let (Some(a), Some(b), None) = (cpu_before, cpu_after, s.kill_every_s) {
            let cpu = b - a;
            let per_1k = cpu / (r.acked.max(1) as f64 / 1000.0);
            r.lines.push(String::new());
            r.lines.push(format!(
                "node CPU        {cpu:.2} s in all: {per_1k:.4} s per 1,000 acknowledged records"
            ));
            r.json["node_cpu_seconds"] = serde_json::json!(cpu);
            r.json["node_cpu_seconds_per_1k_records"] = serde_json::json!(per_1k);
        }
        if let (Some(n), Some(ms)) = (scrapes, args.scrape_ms) {
            r.lines.push(format!(
                "scrapes         {n} of /metrics (every {ms} ms from each node)"
            ));
            r.json["metrics_scrapes"] = serde_json::json!(n);
        }
    }
    let kills = match killer {
        Some(k) => {
            k.abort();
            k.await.ok()
        }
        None => None,
    };
    if let Ok(c) = std::sync::Arc::try_unwrap(cluster) {
        c.into_inner().stop().await;
    }
    if let Some(k) = kills {
        eprintln!("loadgen: failover: {k} leaders killed with SIGKILL and restarted");
    }
    let report = result?;
    println!("{}", report.table());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json)?)?;
    }
    let mut code = 0;
    if report.lost > 0 {
        eprintln!(
            "loadgen: FAIL: {} acknowledged records were never delivered",
            report.lost
        );
        code = 1;
    }
    if let Some(r) = args.assert_rate {
        if report.rate < r {
            eprintln!(
                "loadgen: FAIL: {:.0} records/s acknowledged, below --assert-rate {r}",
                report.rate
            );
            code = 1;
        }
    }
    if let Some(ms) = args.assert_p99_ms {
        if report.p99_ms > ms {
            eprintln!(
                "loadgen: FAIL: p99 {:.2} ms over --assert-p99-ms {ms}",
                report.p99_ms
            );
            code = 1;
        }
    }
    Ok(code)
}

/// Scrapes done by [`scrape`] so far.
static SCRAPES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// GETs every node's /metrics every `every`, as a Prometheus server would, until aborted.
async fn scrape(admins: Vec<String>, every: Duration) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        for a in &admins {
            let Ok(mut s) = tokio::net::TcpStream::connect(a).await else {
                continue;
            };
            let req = format!("GET /metrics HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\n");
            let mut body = Vec::new();
            if s.write_all(req.as_bytes()).await.is_ok()
                && s.read_to_end(&mut body).await.is_ok()
                && body.starts_with(b"HTTP/1.1 200")
            {
                SCRAPES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

struct Report {
    json: serde_json::Value,
    acked: u64,
    rate: f64,
    /// The p99 the assertion checks: end-to-end when consuming, else publish-ack.
    p99_ms: f64,
    lost: u64,
    lines: Vec<String>,
}

impl Report {
    fn table(&self) -> String {
        self.lines.join("\n")
    }
}

fn percentiles(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.50), "p90_us": h.value_at_quantile(0.90),
        "p99_us": h.value_at_quantile(0.99), "p999_us": h.value_at_quantile(0.999),
        "max_us": h.max(),
    })
}

fn row(name: &str, h: &Histogram<u64>) -> String {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{name:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}   ({} samples)",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        ms(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    )
}

async fn run_on(s: &Settings, addrs: &[String]) -> anyhow::Result<Report> {
    let addr = addrs
        .first()
        .ok_or_else(|| anyhow::anyhow!("no node address"))?;
    let mut admin = run::connect(addr).await?;
    let suffix = run::now_wall_us() % 1_000_000;
    let topics: Vec<String> = (0..s.topics)
        .map(|i| format!("loadgen-{suffix}-{i}"))
        .collect();
    for t in &topics {
        admin
            .create_topic(pb::CreateTopicRequest {
                name: t.clone(),
                partitions: s.partitions,
                replication_factor: s.replication_factor,
                config: Some(pb::TopicConfig {
                    fsync_policy: match s.fsync.as_str() {
                        "interval" => pb::FsyncPolicy::Interval as i32,
                        _ => pb::FsyncPolicy::Always as i32,
                    },
                    ..Default::default()
                }),
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating topic {t}: {}", e.message()))?;
    }
    eprintln!(
        "loadgen: workload {} on {addr}: {} producers, {} consumers, {} topic(s) × {} partitions, {} B records, batches of {}, {}",
        s.workload,
        s.producers,
        s.consumers,
        s.topics,
        s.partitions,
        s.record_size,
        s.batch_size,
        match s.rate {
            Some(r) => format!("{r} records/s open loop"),
            None => format!("closed loop, {} requests in flight per producer", s.in_flight),
        }
    );
    let shared = run::run(s, addrs, &topics).await?;
    let longest_gap = *shared.longest_gap.lock().unwrap();
    let measured_s = Duration::from_secs(s.duration_s).as_secs_f64();
    let acked_measured = shared.acked_measured.load(Ordering::Relaxed);
    let rate = acked_measured as f64 / measured_s;
    let ledger = shared.ledger.lock().unwrap();
    let publish = shared.publish.lock().unwrap().clone();
    let e2e = shared.e2e.lock().unwrap().clone();
    let errors = shared.errors.lock().unwrap().clone();
    let lost = if s.consumers > 0 { ledger.lost() } else { 0 };
    let counts = serde_json::json!({
        "sent": shared.sent.load(Ordering::Relaxed),
        "acked": ledger.acked_count(),
        "delivered": ledger.delivered_count(),
        "lost": lost,
        "duplicated": ledger.duplicated,
        "reordered": ledger.reordered,
        "reorder_samples": ledger.reorder_samples,
    });
    let p99_ms = if s.consumers > 0 {
        e2e.value_at_quantile(0.99)
    } else {
        publish.value_at_quantile(0.99)
    } as f64
        / 1000.0;
    let mb_s = rate * s.record_size as f64 / 1e6;
    let json = serde_json::json!({
        "settings": s.to_json(),
        "nodes": addrs,
        "achieved_rate": rate,
        "achieved_mb_s": mb_s,
        "target_rate": s.rate,
        "records": counts,
        "publish_ack_latency": percentiles(&publish),
        "end_to_end_latency": percentiles(&e2e),
        "errors": errors,
        "longest_ack_gap_ms": longest_gap.as_secs_f64() * 1000.0,
    });
    let mut lines = vec![
        String::new(),
        format!("workload        {}", s.workload),
        format!(
            "rate            {rate:.0} records/s acknowledged ({mb_s:.1} MB/s){}",
            s.rate.map_or(String::new(), |r| format!(", target {r}"))
        ),
        format!(
            "records         sent {}  acked {}  delivered {}  lost {}  duplicated {}  reordered {}",
            counts["sent"],
            counts["acked"],
            counts["delivered"],
            lost,
            ledger.duplicated,
            ledger.reordered
        ),
        format!(
            "errors          {}",
            if errors.is_empty() {
                "none".to_string()
            } else {
                format!("{errors:?}")
            }
        ),
        format!(
            "longest gap     {:.0} ms without an acknowledgment on some partition",
            longest_gap.as_secs_f64() * 1000.0
        ),
        String::new(),
        format!(
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "p50", "p90", "p99", "p99.9", "max"
        ),
        row("publish-ack", &publish),
    ];
    if s.consumers > 0 {
        lines.push(row("end-to-end", &e2e));
    }
    Ok(Report {
        json,
        acked: ledger.acked_count() as u64,
        rate,
        p99_ms,
        lost,
        lines,
    })
}
