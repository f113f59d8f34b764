//! `loadgen`: Tern's load generator. See docs/benchmarks.md for the rules of measurement and the
//! named workloads; `loadgen --help` for the options.

mod accounting;
mod chaos;
mod cluster;
mod failover;
mod geo;
mod group;
mod measure;
mod metrics;
mod netns;
mod payload;
mod produce;
mod run;
mod settings;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use tern::proto::v1 as pb;

use geo::routes;
use measure::{run_idle, run_on};
use metrics::{forwarded, scrape, SCRAPES};
use settings::{Args, Settings};

/// The first argument that makes loadgen run as `tern` (see `cluster::server_program`).
pub const SERVE_SELF: &str = "--serve-self";

fn main() {
    // A spawned node (or the `tern` CLI a chaos fault runs) when no `tern` binary sits next
    // to loadgen: the same code, given `tern`'s own arguments after `--serve-self`.
    if std::env::args().nth(1).as_deref() == Some(SERVE_SELF) {
        let argv: Vec<String> = std::env::args().filter(|a| a != SERVE_SELF).collect();
        let code = match tern::cli::main_from(argv) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        };
        std::process::exit(code);
    }
    let args = Args::parse();
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
    // The chaos workload cuts nodes off through their test hook.
    let node_flags: &[&str] = if s.chaos.is_some() {
        &["--fault-injection"]
    } else {
        &[]
    };
    if let Some(lib) = s.chaos.as_ref().and_then(|c| c.libfaketime.clone()) {
        anyhow::ensure!(
            args.spawn.is_some() || !s.regions.is_empty(),
            "the clock fault starts the nodes it spawns under libfaketime: use --spawn or \
             --regions"
        );
        cluster::Cluster::fake_wall_clocks(lib);
    }
    anyhow::ensure!(
        !args.netns || (args.spawn.unwrap_or(0) > 1 && s.regions.is_empty()),
        "--netns puts the nodes of a spawned cluster (--spawn N, N > 1, no --regions) in \
         network namespaces"
    );
    // The certificates name localhost and 127.0.0.1, and admin listeners bind loopback
    // inside each namespace: neither reaches across the bridge.
    anyhow::ensure!(
        !args.netns || (!args.secure && args.scrape_ms.is_none()),
        "--netns is not supported with --secure or --scrape-ms yet"
    );
    let cluster = if !s.regions.is_empty() {
        anyhow::ensure!(
            !args.secure && args.scrape_ms.is_none(),
            "--secure and --scrape-ms are not supported with --regions yet"
        );
        cluster::Cluster::spawn_geo(
            &s.regions,
            s.nodes_per_region,
            Duration::from_millis(s.rtt_ms),
            args.tern_bin.clone(),
            node_flags,
        )
        .await?
    } else {
        match (args.spawn, args.brokers.is_empty()) {
            (Some(n), true) => {
                cluster::Cluster::spawn(
                    n,
                    args.tern_bin.clone(),
                    args.secure,
                    // An admin listener for the scrapes, and for the forwarded count at the end
                    // (unreachable from here inside network namespaces).
                    args.scrape_ms.is_some() || !args.netns,
                    args.netns,
                    node_flags,
                )
                .await?
            }
            (None, false) => cluster::Cluster::existing(args.brokers.clone()),
            (Some(_), false) => anyhow::bail!("use either --spawn or --brokers, not both"),
            (None, true) => anyhow::bail!("say where Tern runs: --spawn N or --brokers host:port"),
        }
    };
    anyhow::ensure!(
        args.scrape_ms.is_none() || args.spawn.is_some(),
        "--scrape-ms scrapes the nodes loadgen spawns (--spawn N)"
    );
    if s.workload == "idle" {
        let r = run_idle(&s, &cluster).await;
        cluster.stop().await;
        let r = r?;
        println!("{}", r.table());
        if let Some(path) = &args.json {
            std::fs::write(path, serde_json::to_string_pretty(&r.json)?)?;
        }
        return Ok(0);
    }
    let routes = routes(&cluster, &s).await?;
    let scraper = args.scrape_ms.map(|ms| {
        tokio::spawn(scrape(
            cluster.admins.clone(),
            Duration::from_millis(ms.max(10)),
        ))
    });
    let cpu_before = cluster.cpu_seconds();
    let forwarded_before = forwarded(&cluster.admins).await;
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
    let cutter = s.cut_region.clone().map(|(region, at)| {
        let cluster = cluster.clone();
        let after = Duration::from_millis(200) + Duration::from_secs(s.warmup_s + at);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Some(m) = &cluster.lock().await.mesh {
                m.cut_region(&region);
                eprintln!("loadgen: region {region} cut off from the others");
            }
        })
    });
    let mut result = run_on(&s, &routes, cluster.clone()).await;
    if let Some(c) = cutter {
        c.abort();
    }
    // The nodes' CPU per 1,000 acknowledged records (killed nodes count what they had used
    // when killed: `Cluster::kill9`).
    let cpu_after = cluster.lock().await.cpu_seconds();
    let admins = cluster.lock().await.admins.clone();
    let forwarded_after = forwarded(&admins).await;
    let scrapes = match scraper {
        Some(t) => {
            t.abort();
            Some(t.await.unwrap_or_else(|_| SCRAPES.load(Ordering::Relaxed)))
        }
        None => None,
    };
    if let Ok(r) = &mut result {
        if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
            let cpu = b - a;
            let per_1k = cpu / (r.acked.max(1) as f64 / 1000.0);
            r.lines.push(String::new());
            r.lines.push(format!(
                "node CPU        {cpu:.2} s in all: {per_1k:.4} s per 1,000 acknowledged records"
            ));
            r.json["node_cpu_seconds"] = serde_json::json!(cpu);
            r.json["node_cpu_seconds_per_1k_records"] = serde_json::json!(per_1k);
        }
        if let (Some(a), Some(b)) = (forwarded_before, forwarded_after) {
            // A node restarted meanwhile (failover) counts from 0 again: then at least this.
            let n = b.saturating_sub(a);
            let share = 100.0 * n as f64 / r.acked.max(1) as f64;
            r.lines.push(format!(
                "forwarded       {n} records passed on to their leader by the node they entered ({share:.1}% of acknowledged)"
            ));
            r.json["forwarded_records"] = serde_json::json!(n);
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
    if report.anomalies > 0 {
        eprintln!(
            "loadgen: FAIL: {} records duplicated, reordered or divergent",
            report.anomalies
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json)?)?;
    }
    let mut code = 0;
    if report.anomalies > 0 {
        code = 1;
    }
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
