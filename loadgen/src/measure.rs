//! One measured run: the load, the readers and the faults a workload asks for, and the report
//! (the table loadgen prints and its JSON); the `idle` workload's run.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tern::proto::v1 as pb;

use crate::geo::{lose_region, mirror_topics, placement, replay, wait_pinned};
use crate::settings::Settings;
use crate::{chaos, cluster, group, run};

pub(crate) struct Report {
    pub(crate) json: serde_json::Value,
    pub(crate) acked: u64,
    pub(crate) rate: f64,
    /// The p99 the assertion checks: end-to-end when consuming, else publish-ack.
    pub(crate) p99_ms: f64,
    pub(crate) lost: u64,
    /// Records delivered twice or out of order, and (chaos) what the final read of every
    /// replica found wrong.
    pub(crate) anomalies: u64,
    pub(crate) lines: Vec<String>,
}

impl Report {
    pub(crate) fn table(&self) -> String {
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

/// The `idle` workload: topics created, no load; the spawned nodes' CPU over the measured
/// time, as a share of one core per node (the target for one idle node is under 0.3%).
pub(crate) async fn run_idle(s: &Settings, cluster: &cluster::Cluster) -> anyhow::Result<Report> {
    let addr = cluster
        .addrs
        .first()
        .ok_or_else(|| anyhow::anyhow!("no node address"))?;
    anyhow::ensure!(
        cluster.cpu_seconds().is_some(),
        "the idle workload reads the CPU time of nodes it spawned: use --spawn"
    );
    let mut admin = run::connect(addr).await?;
    let suffix = run::now_wall_us() % 1_000_000;
    for i in 0..s.topics {
        let name = format!("loadgen-{suffix}-{i}");
        admin
            .create_topic(pb::CreateTopicRequest {
                name: name.clone(),
                partitions: s.partitions,
                replication_factor: s.replication_factor,
                config: None,
                placement: None,
                mirror_of: None,
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating topic {name}: {}", e.message()))?;
    }
    eprintln!(
        "loadgen: workload idle: {} node(s), {} topic(s) × {} partitions (RF {}); {} s to settle, {} s measured",
        cluster.addrs.len(),
        s.topics,
        s.partitions,
        s.replication_factor,
        s.warmup_s,
        s.duration_s
    );
    tokio::time::sleep(Duration::from_secs(s.warmup_s)).await;
    let before = cluster.cpu_seconds().unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(s.duration_s)).await;
    let after = cluster.cpu_seconds().unwrap_or_default();
    let nodes = cluster.addrs.len().max(1) as f64;
    let cpu = after - before;
    let percent = cpu / s.duration_s.max(1) as f64 / nodes * 100.0;
    let lines = vec![
        format!(
            "workload        idle ({} node(s), {} partitions in all, RF {})",
            cluster.addrs.len(),
            s.topics as u64 * s.partitions as u64,
            s.replication_factor
        ),
        format!("node CPU        {cpu:.3} s in {} s", s.duration_s),
        format!("per node        {percent:.3}% of a core"),
    ];
    Ok(Report {
        lines,
        json: serde_json::json!({
            "settings": s.to_json(),
            "node_cpu_seconds": cpu,
            "idle_core_percent_per_node": percent,
        }),
        acked: 0,
        rate: 0.0,
        p99_ms: 0.0,
        lost: 0,
        anomalies: 0,
    })
}

pub(crate) async fn run_on(
    s: &Settings,
    routes: &run::Routes,
    cluster: std::sync::Arc<tokio::sync::Mutex<cluster::Cluster>>,
) -> anyhow::Result<Report> {
    let addrs = &routes.producers;
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
                    segment_bytes: s.segment_bytes,
                    ..Default::default()
                }),
                placement: placement(s),
                mirror_of: None,
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
    if placement(s).is_some() && !s.leader_regions.is_empty() {
        // Leaders settle in their regions (pinning moves them within about 10 s).
        wait_pinned(&mut admin, &topics, s, &cluster).await;
    }
    let wan_before = cluster.lock().await.wan_bytes();
    let nemesis = s.chaos.as_ref().map(|c| {
        eprintln!(
            "loadgen: chaos: seed {} (faults: {}; one every ~{} s; up to {} at once)",
            c.seed,
            c.faults.join(", "),
            c.every_s,
            c.overlap
        );
        tokio::spawn(chaos::nemesis(
            cluster.clone(),
            topics.clone(),
            s.partitions,
            c.clone(),
            Duration::from_millis(200) + Duration::from_secs(s.warmup_s),
            Duration::from_secs(s.warmup_s + s.duration_s),
        ))
    });
    // The chaos workload's consumer group reads and commits throughout (checked in group.rs).
    let group_check = match &s.chaos {
        Some(c) if c.group_members > 0 => {
            let check = std::sync::Arc::new(group::Check::default());
            let addrs = cluster.lock().await.addrs.clone();
            let queue = std::sync::Arc::new(group::QueueCheck::default());
            for id in 0..c.group_members {
                tokio::spawn(group::member(
                    id,
                    addrs.clone(),
                    topics[0].clone(),
                    check.clone(),
                ));
                tokio::spawn(group::queue_member(
                    id,
                    addrs.clone(),
                    topics[0].clone(),
                    queue.clone(),
                ));
            }
            Some((check, queue))
        }
        _ => None,
    };
    let watch = s.metadata_watch_s.map(|every| {
        let dirs: Vec<Option<std::path::PathBuf>> = {
            let c = cluster.try_lock().expect("nothing holds the cluster yet");
            (0..c.addrs.len())
                .map(|i| c.data_dir(i).map(|d| d.join("metadata")))
                .collect()
        };
        let until = Duration::from_secs(s.warmup_s + s.duration_s);
        tokio::spawn(watch_metadata(dirs, Duration::from_secs(every), until))
    });
    let read = match &s.mirror_to {
        Some(region) => mirror_topics(s, routes, &topics, region, &cluster).await?,
        None => topics.clone(),
    };
    let loser = match (&s.lose_region, &s.mirror_to) {
        (Some((region, at)), Some(_)) => {
            let after = Duration::from_millis(200) + Duration::from_secs(s.warmup_s + at);
            Some(tokio::spawn(lose_region(
                cluster.clone(),
                region.clone(),
                after,
                routes.consumers.clone(),
                read.clone(),
            )))
        }
        _ => None,
    };
    let shared = run::run(s, routes, &topics, &read).await?;
    let loss = match loser {
        Some(l) => Some(l.await.map_err(|e| anyhow::anyhow!("region loss: {e}"))??),
        None => None,
    };
    let metadata_sizes = match watch {
        Some(w) => w.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let chaos_result = match nemesis {
        Some(n) => {
            let log = n.await.unwrap_or_default();
            chaos::heal(&cluster).await;
            let acked = shared.ledger.lock().unwrap().acked_seqs();
            let live = cluster.lock().await.live_addrs();
            let addrs: Vec<String> = live.iter().map(|(_, a)| a.clone()).collect();
            let fin = chaos::check_replicas(
                &live,
                &topics,
                s.partitions,
                s.replication_factor as usize,
                &acked,
                Duration::from_secs(60),
            )
            .await;
            let group = match &group_check {
                Some((check, queue)) => Some((
                    group::finish(
                        check,
                        &addrs,
                        &topics[0],
                        s.partitions,
                        &acked,
                        Duration::from_secs(60),
                    )
                    .await,
                    group::queue_finish(
                        queue,
                        &addrs,
                        &topics[0],
                        s.partitions,
                        &acked,
                        Duration::from_secs(60),
                    )
                    .await,
                )),
                None => None,
            };
            Some((log, fin, group))
        }
        None => None,
    };
    let wan = cluster.lock().await.wan_bytes() - wan_before;
    let longest_gap = *shared.longest_gap.lock().unwrap();
    let measured_s = Duration::from_secs(s.duration_s).as_secs_f64();
    let acked_measured = shared.acked_measured.load(Ordering::Relaxed);
    let rate = acked_measured as f64 / measured_s;
    let (lost_all, acked, delivered, duplicated, reordered, reorder_samples) = {
        let l = shared.ledger.lock().unwrap();
        (
            l.lost(),
            l.acked_count() as u64,
            l.delivered_count(),
            l.duplicated,
            l.reordered,
            l.reorder_samples.clone(),
        )
    };
    let publish = shared.publish.lock().unwrap().clone();
    let e2e = shared.e2e.lock().unwrap().clone();
    let errors = shared.errors.lock().unwrap().clone();
    let retried = shared.retried.lock().unwrap().clone();
    let lost = if s.consumers > 0 { lost_all } else { 0 };
    let counts = serde_json::json!({
        "sent": shared.sent.load(Ordering::Relaxed),
        "acked": acked,
        "delivered": delivered,
        "lost": lost,
        "duplicated": duplicated,
        "reordered": reordered,
        "reorder_samples": reorder_samples,
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
        "retried": retried
            .iter()
            .map(|(code, (n, first))| (code.clone(), serde_json::json!({"requests": n, "first": first})))
            .collect::<serde_json::Map<_, _>>(),
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
            counts["sent"], counts["acked"], counts["delivered"], lost, duplicated, reordered
        ),
        format!(
            "errors          {}",
            if errors.is_empty() {
                "none".to_string()
            } else {
                let first = shared.first_errors.lock().unwrap().clone();
                errors
                    .iter()
                    .map(|(code, n)| match first.get(code) {
                        Some(m) => format!("{code} {n} (first: {m})"),
                        None => format!("{code} {n}"),
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        ),
        format!(
            "retried         {}",
            if retried.is_empty() {
                "none".to_string()
            } else {
                retried
                    .iter()
                    .map(|(code, (n, first))| format!("{code} {n} (first: {first})"))
                    .collect::<Vec<_>>()
                    .join("; ")
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
    let mut json = json;
    if let Some(m) = &shared.mirrored {
        // From the acknowledgment in the source's region to the delivery from a mirror: the
        // mirror's lag plus its commit and the delivery, so at least the lag.
        let h = m.lock().unwrap().ack_to_delivery.clone();
        lines.push(row("ack-to-mirror", &h));
        json["ack_to_mirror_delivery_latency"] = percentiles(&h);
    }
    if !s.regions.is_empty() {
        let per = wan as f64 / acked.max(1) as f64;
        lines.push(String::new());
        lines.push(format!(
            "wan             {:.1} MB crossed between regions ({per:.0} B per acknowledged record)",
            wan as f64 / 1e6
        ));
        json["wan_bytes"] = serde_json::json!(wan);
    }
    let mut anomalies = duplicated + reordered;
    if let (Some(c), Some((log, fin, group))) = (&s.chaos, chaos_result) {
        anomalies += fin.divergent + fin.lost + fin.duplicated;
        lines.push(String::new());
        lines.push(format!(
            "chaos           seed {}: {} faults ({})",
            c.seed,
            log.lines.len(),
            log.counts
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        lines.extend(log.lines.iter().map(|l| format!("                {l}")));
        if c.overlap > 1 {
            lines.push(format!(
                "                {} faults started while others were held ({} with a membership change)",
                log.overlapped, log.moves_overlapped
            ));
        }
        if log.nodes_joined > 0 {
            lines.push(format!(
                "                nodes joined the cluster: {}; removed from it: {}",
                log.nodes_joined, log.nodes_removed
            ));
        }
        if !log.failed.is_empty() {
            lines.push(format!(
                "                {} faults not carried out as meant (the run tested less):",
                log.failed.len()
            ));
            lines.extend(log.failed.iter().map(|l| format!("                {l}")));
        }
        if !log.restarts_ms.is_empty() {
            let mut r = log.restarts_ms.clone();
            r.sort_unstable();
            lines.push(format!(
                "restarts        {} kills: serving again {} ms after the start (in order; median {} ms)",
                r.len(),
                log.restarts_ms.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
                r[r.len() / 2]
            ));
            json["restarts_ms"] = serde_json::json!(log.restarts_ms);
        }
        lines.push(format!(
            "replicas        {} records read from all replicas after the heal: {} divergent, {} acknowledged missing, {} duplicated",
            fin.records, fin.divergent, fin.lost, fin.duplicated
        ));
        lines.extend(fin.samples.iter().map(|l| format!("                {l}")));
        json["chaos"] = serde_json::json!({
            "seed": c.seed,
            "overlap": c.overlap,
            "overlapped": log.overlapped,
            "moves_overlapped": log.moves_overlapped,
            "nodes_joined": log.nodes_joined,
            "nodes_removed": log.nodes_removed,
            "faults": log.lines,
            "fault_counts": log.counts,
            "failed_faults": log.failed,
            "replica_records": fin.records,
            "divergent": fin.divergent,
            "replica_lost": fin.lost,
            "replica_duplicated": fin.duplicated,
            "samples": fin.samples,
        });
        if let Some((g, q)) = group {
            anomalies += g.anomalies() + q.anomalies();
            lines.push(format!(
                "group           {} members joined {} times, {} records delivered, {} commits: {} acknowledged never delivered, {} commits backwards, {} reads backwards, {}",
                c.group_members,
                g.joins,
                g.records,
                g.commits,
                g.missing,
                g.commit_backwards,
                g.read_backwards,
                if g.drained { "committed to the end" } else { "did NOT commit to the end" }
            ));
            lines.extend(g.samples.iter().map(|l| format!("                {l}")));
            lines.push(format!(
                "queue           {} members joined {} times, {} deliveries ({} nacked): {} acked, {} dead-lettered, {} neither, {}",
                c.group_members,
                q.joins,
                q.deliveries,
                q.nacks,
                q.acked,
                q.dead_lettered,
                q.unsettled,
                if q.drained { "settled to the end" } else { "did NOT settle to the end" }
            ));
            lines.extend(q.samples.iter().map(|l| format!("                {l}")));
            for (key, mut v) in [
                ("group", serde_json::to_value(&g)?),
                ("queue", serde_json::to_value(&q)?),
            ] {
                v["members"] = serde_json::json!(c.group_members);
                json["chaos"][key] = v;
            }
        }
    }
    if !metadata_sizes.is_empty() {
        lines.push(String::new());
        lines.push(
            "metadata        each node's metadata directory (MB), sampled while the load ran:"
                .into(),
        );
        for (t, sizes) in &metadata_sizes {
            lines.push(format!(
                "                t={t:5} s  {}",
                sizes
                    .iter()
                    .map(|b| format!("{:.2}", *b as f64 / 1e6))
                    .collect::<Vec<_>>()
                    .join(" / ")
            ));
        }
        json["metadata_bytes"] = serde_json::json!(metadata_sizes);
    }
    // A lost region: what it acknowledged and its mirrors did not hold is the promotion's
    // loss, expected and judged against the lag the mirrors reported.
    let mut lost = lost;
    if let Some(l) = &loss {
        let over = lost.saturating_sub(l.lag_records);
        lines.push(format!(
            "promotion       {lost} acknowledged records of the lost region were not in the mirrors; they reported {} records behind (up to {} ms; their sources last answered {} ms before the loss) and were promoted in {:.1} s: {}",
            l.lag_records,
            l.lag_ms,
            l.silent_before_loss_ms,
            l.promoted_in.as_secs_f64(),
            if over == 0 {
                "within the reported lag".to_string()
            } else {
                format!("{over} beyond the reported lag")
            }
        ));
        json["region_loss"] = serde_json::json!({
            "lost": lost,
            "reported_lag_records": l.lag_records,
            "reported_lag_ms": l.lag_ms,
            "sources_silent_before_loss_ms": l.silent_before_loss_ms,
            "promoted_in_s": l.promoted_in.as_secs_f64(),
            "beyond_reported_lag": over,
        });
        lost = over;
    }
    if s.replay {
        let r = replay(s, routes, &topics, &cluster).await?;
        lines.extend(r.0);
        json["replay"] = r.1;
    }
    Ok(Report {
        json,
        acked,
        rate,
        p99_ms,
        lost,
        anomalies,
        lines,
    })
}

/// Samples the size of each of `dirs` every `every` until `until` has passed: (seconds since
/// the start, bytes per directory; 0 for a node without one or while it cannot be read).
async fn watch_metadata(
    dirs: Vec<Option<std::path::PathBuf>>,
    every: Duration,
    until: Duration,
) -> Vec<(u64, Vec<u64>)> {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() + every <= until {
        tokio::time::sleep(every).await;
        let sizes = dirs
            .iter()
            .map(|d| d.as_deref().map_or(0, dir_bytes))
            .collect();
        out.push((start.elapsed().as_secs(), sizes));
    }
    out
}

/// The bytes of the files under `dir` (recursively; what cannot be read counts 0).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map_or(0, |m| m.len()),
                })
                .sum()
        })
        .unwrap_or(0)
}
