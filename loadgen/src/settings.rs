//! Command-line options and the named workloads of docs/benchmarks.md.

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "Tern's load generator: open-loop rate, HdrHistogram latencies, \
correctness accounting (acked, delivered, lost, duplicated, reordered)"
)]
pub struct Args {
    /// A named workload: seed-target, max-throughput, replicated-max, latency-at-load,
    /// many-partitions, failover, geo-sync, geo-regional, geo-replay, region-loss,
    /// region-loss-regional, idle, chaos,
    /// group-commits. Flags below override its settings.
    #[arg(long)]
    pub workload: Option<String>,
    /// Start a local cluster of this many `tern serve` processes (loopback, free ports,
    /// temporary data directories), stopped afterwards.
    #[arg(long)]
    pub spawn: Option<usize>,
    /// Use running nodes instead: host:port[,host:port...].
    #[arg(long, value_delimiter = ',')]
    pub brokers: Vec<String>,
    /// The `tern` binary for --spawn [default: next to loadgen, else loadgen serves itself].
    #[arg(long)]
    pub tern_bin: Option<std::path::PathBuf>,
    #[arg(long)]
    pub producers: Option<usize>,
    #[arg(long)]
    pub consumers: Option<usize>,
    #[arg(long)]
    pub topics: Option<usize>,
    #[arg(long)]
    pub partitions: Option<u32>,
    #[arg(long)]
    pub replication_factor: Option<u32>,
    /// Bytes of each record's value (at least 24, the loadgen stamp).
    #[arg(long)]
    pub record_size: Option<usize>,
    /// Records per publish request.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Longest wait to fill a batch, in ms.
    #[arg(long)]
    pub linger_ms: Option<u64>,
    /// Keys: `none` (round robin) or `uniform:N` (N distinct keys).
    #[arg(long)]
    pub keys: Option<String>,
    /// Records per second over all producers (open loop).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Closed loop: as fast as acknowledgements allow, with --in-flight requests per producer.
    #[arg(long)]
    pub max: bool,
    /// Requests in flight per producer in --max mode.
    #[arg(long)]
    pub in_flight: Option<usize>,
    /// How producers reach the partitions: `any` (producer i publishes through node i, which
    /// forwards to each partition's leader: forwarding measured) or `leader` (tern-client:
    /// straight to each leader, batched per partition with --batch-size and --linger-ms,
    /// pipelined, idempotent) [default: any].
    #[arg(long)]
    pub client: Option<String>,
    /// Seconds of measured load.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Seconds of load before measuring (excluded from the results).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Topic fsync policy: always or interval.
    #[arg(long)]
    pub fsync: Option<String>,
    /// Write the full result as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Exit non-zero unless at least this many records/s were acknowledged.
    #[arg(long)]
    pub assert_rate: Option<f64>,
    /// Exit non-zero unless p99 (end-to-end when consuming, else publish-ack) is at most this.
    #[arg(long)]
    pub assert_p99_ms: Option<f64>,
    /// With --spawn: the nodes speak TLS (to clients and to each other, with certificates
    /// from a throwaway CA) and require authentication; loadgen uses the bootstrap token.
    #[arg(long)]
    pub secure: bool,
    /// With --spawn: give each node an admin listener and scrape its /metrics this often
    /// during the run (what a Prometheus server does), to measure what scraping costs.
    #[arg(long)]
    pub scrape_ms: Option<u64>,
    /// Spawn a geo cluster: these regions (comma-separated), --nodes-per-region nodes in
    /// each, every pair --rtt-ms apart through tern-wan delay lines (docs/geo.md).
    #[arg(long, value_delimiter = ',')]
    pub regions: Vec<String>,
    #[arg(long)]
    pub nodes_per_region: Option<usize>,
    /// Round-trip time between regions, in ms.
    #[arg(long)]
    pub rtt_ms: Option<u64>,
    /// Producers talk to a node in this region (with --brokers: found through ClusterInfo).
    #[arg(long)]
    pub producer_region: Option<String>,
    /// Consumers talk to a node in this region.
    #[arg(long)]
    pub consumer_region: Option<String>,
    /// The topic's survival goal: zone or region.
    #[arg(long)]
    pub survival: Option<String>,
    /// The topic's leader regions, most preferred first.
    #[arg(long, value_delimiter = ',')]
    pub leader_regions: Vec<String>,
    /// Cut this region off from the others this many seconds into the measured load:
    /// REGION@SECONDS (geo clusters only).
    #[arg(long)]
    pub cut_region: Option<String>,
    /// Idempotent producers that retry: each producer writes one partition with a producer id,
    /// one request in flight, and sends a failed request again unchanged until it is
    /// acknowledged, so every record is written exactly once (the failover workload's default).
    /// Needs an open loop (--rate).
    #[arg(long)]
    pub idempotent: bool,
    /// The chaos workload's schedule seed (printed; the same seed gives the same faults).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The faults the chaos workload draws from, comma-separated: kill, pause, partition,
    /// one-way, bridge, corrupt, move (needs more nodes than replicas), delay (needs
    /// --regions), clock (needs libfaketime), churn (a node joins and the one the churn before
    /// added is removed; needs --spawn without --regions, --netns or --secure) [default: all
    /// that the cluster and machine allow].
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// With --spawn: run each node in its own network namespace on a bridge (needs root,
    /// iproute2 and nftables), so the chaos workload's partitions are made by the kernel
    /// (nftables rules in the node's namespace) instead of by the nodes' fault-injection hook.
    #[arg(long)]
    pub netns: bool,
    /// The libfaketime library the chaos `clock` fault starts nodes under (Debian's
    /// libfaketime; `scripts/test-tools libfaketime` installs it) [default:
    /// /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1].
    #[arg(long)]
    pub libfaketime: Option<std::path::PathBuf>,
    /// Seconds between two faults of the chaos workload, on average.
    #[arg(long)]
    pub fault_every: Option<u64>,
    /// Faults of the chaos workload that may be held at once: with 2 or more, a fault starts
    /// on schedule while others are still held, on other nodes (membership changes during
    /// kills and partitions, two nodes down at once); 1 runs them one after another.
    #[arg(long)]
    pub overlap: Option<usize>,
    /// Members of each of the two groups the chaos workload runs beside its subscriber: a
    /// stream-mode group that commits as it reads, and a queue group that acks, nacks and
    /// rejects to the dead-letter topic (0: no groups) [default: 2].
    #[arg(long)]
    pub group_members: Option<usize>,
    /// TLS and token for --brokers that are secured (as the `tern` CLI takes them).
    #[command(flatten)]
    pub security: tern::cli::SecurityOpts,
}

#[derive(Clone, Debug)]
pub struct Chaos {
    pub seed: u64,
    pub faults: Vec<String>,
    /// The library the `clock` fault needs, when it is among the faults.
    pub libfaketime: Option<std::path::PathBuf>,
    pub every_s: u64,
    /// Members of each checked group (`group.rs`).
    pub group_members: usize,
    /// Faults that may be held at once (`chaos/mod.rs`, `nemesis`): 1 is one after another.
    pub overlap: usize,
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub workload: String,
    pub nodes: usize,
    pub replication_factor: u32,
    pub topics: usize,
    pub partitions: u32,
    pub record_size: usize,
    pub batch_size: usize,
    pub linger_ms: u64,
    pub keys: Option<u64>,
    /// Records/s, or `None` for closed loop.
    pub rate: Option<u64>,
    pub in_flight: usize,
    pub producers: usize,
    pub consumers: usize,
    pub duration_s: u64,
    pub warmup_s: u64,
    pub fsync: String,
    /// Kill a partition leader this often (the failover workload).
    pub kill_every_s: Option<u64>,
    /// Idempotent producers that retry until acknowledged (see `Args::idempotent`).
    pub idempotent: bool,
    /// Producers use tern-client (leader-aware) instead of publishing through one node.
    pub leader_aware: bool,
    /// The chaos workload's nemesis (see `chaos/mod.rs`).
    pub chaos: Option<Chaos>,
    /// The topics' segment size (smaller segments give the chaos workload sealed ones to
    /// damage).
    pub segment_bytes: Option<u64>,
    /// Geo: region names, nodes in each, round trip between regions.
    pub regions: Vec<String>,
    pub nodes_per_region: usize,
    pub rtt_ms: u64,
    pub producer_region: Option<String>,
    pub consumer_region: Option<String>,
    /// Topic placement: survival goal (zone, region) and leader regions.
    pub survival: Option<String>,
    pub leader_regions: Vec<String>,
    /// Cut a region off, this many seconds into the measured load.
    pub cut_region: Option<(String, u64)>,
    /// Every this many seconds, the size of each spawned node's metadata directory is sampled
    /// (the group-commits workload: the metadata log must stay bounded).
    pub metadata_watch_s: Option<u64>,
    /// After producing, one consumer reads everything from the earliest offset (geo-replay).
    pub replay: bool,
    /// Each topic is mirrored into this region (a mirror topic placed there, pulling across
    /// the WAN), and the consumers read the mirrors (geo-regional).
    pub mirror_to: Option<String>,
    /// A region lost for good this many seconds into the measured load: every node of it is
    /// killed, and the mirrors (`mirror_to`) are promoted a few seconds later
    /// (region-loss-regional).
    pub lose_region: Option<(String, u64)>,
}

impl Settings {
    fn named(name: &str) -> anyhow::Result<Settings> {
        let base = Settings {
            workload: name.to_string(),
            nodes: 1,
            replication_factor: 1,
            topics: 1,
            partitions: 6,
            record_size: 1024,
            batch_size: 1,
            linger_ms: 0,
            keys: None,
            rate: Some(1000),
            in_flight: 8,
            producers: 4,
            consumers: 1,
            duration_s: 60,
            warmup_s: 5,
            fsync: "always".into(),
            kill_every_s: None,
            idempotent: false,
            leader_aware: false,
            chaos: None,
            segment_bytes: None,
            regions: Vec::new(),
            nodes_per_region: 1,
            rtt_ms: 40,
            producer_region: None,
            consumer_region: None,
            survival: None,
            leader_regions: Vec::new(),
            cut_region: None,
            replay: false,
            metadata_watch_s: None,
            mirror_to: None,
            lose_region: None,
        };
        let abc = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
        // A zone-survival topic in a (three nodes there, one per zone), mirrored into b
        // (three nodes, zone survival there too); producers in a, consumers read the
        // mirror in b.
        let geo_regional = Settings {
            nodes: 9,
            replication_factor: 3,
            partitions: 3,
            regions: abc(),
            nodes_per_region: 3,
            producer_region: Some("a".into()),
            consumer_region: Some("b".into()),
            survival: Some("zone".into()),
            mirror_to: Some("b".into()),
            duration_s: 30,
            ..base.clone()
        };
        Ok(match name {
            "seed-target" => Settings {
                nodes: 3,
                replication_factor: 3,
                ..base
            },
            "max-throughput" => Settings {
                partitions: 8,
                record_size: 100,
                batch_size: 100,
                rate: None,
                in_flight: 16,
                duration_s: 30,
                ..base
            },
            "replicated-max" => Settings {
                nodes: 3,
                replication_factor: 3,
                rate: None,
                batch_size: 10,
                duration_s: 30,
                ..base
            },
            "latency-at-load" => Settings {
                nodes: 3,
                replication_factor: 3,
                rate: Some(10_000),
                batch_size: 10,
                linger_ms: 1,
                ..base
            },
            "many-partitions" => Settings {
                nodes: 3,
                replication_factor: 3,
                partitions: 1000,
                record_size: 256,
                rate: Some(2000),
                ..base
            },
            "failover" => Settings {
                nodes: 3,
                replication_factor: 3,
                partitions: 3,
                record_size: 256,
                kill_every_s: Some(10),
                // Every record acknowledged exactly once: a request the kill cut off (its
                // outcome unknown) goes again with the same sequence. A request takes every
                // record due, up to 100, while the one before is in flight.
                idempotent: true,
                batch_size: 100,
                ..base
            },
            // A region-survival topic led from a, producers in a, consumers in b.
            "geo-sync" => Settings {
                nodes: 3,
                replication_factor: 3,
                partitions: 3,
                regions: abc(),
                producer_region: Some("a".into()),
                consumer_region: Some("b".into()),
                survival: Some("region".into()),
                leader_regions: vec!["a".into()],
                duration_s: 30,
                ..base
            },
            "geo-regional" => geo_regional,
            // geo-regional, and region a is lost 10 s in (its nodes killed); the mirrors in b
            // are promoted: what the promotion lost, against the lag the mirrors reported.
            "region-loss-regional" => Settings {
                lose_region: Some(("a".into(), 10)),
                duration_s: 20,
                ..geo_regional
            },
            // 100 MB published in a, then read from the earliest offset by a consumer in b.
            "geo-replay" => Settings {
                nodes: 3,
                replication_factor: 3,
                partitions: 3,
                regions: abc(),
                producer_region: Some("a".into()),
                consumer_region: Some("b".into()),
                survival: Some("region".into()),
                leader_regions: vec!["a".into()],
                batch_size: 100,
                linger_ms: 10,
                rate: Some(10_000),
                consumers: 0,
                duration_s: 10,
                warmup_s: 0,
                replay: true,
                ..base
            },
            // The leaders' region is cut off under load; producers in b, consumers in c.
            "region-loss" => Settings {
                nodes: 3,
                replication_factor: 3,
                partitions: 3,
                regions: abc(),
                producer_region: Some("b".into()),
                consumer_region: Some("c".into()),
                survival: Some("region".into()),
                leader_regions: vec!["a".into()],
                cut_region: Some(("a".into(), 10)),
                duration_s: 30,
                ..base
            },
            // Faults from a seed under idempotent producers and a subscriber, then a heal and a
            // final read of every replica (docs/reliability.md).
            "chaos" => Settings {
                nodes: 3,
                replication_factor: 3,
                partitions: 3,
                record_size: 256,
                rate: Some(500),
                idempotent: true,
                batch_size: 100,
                duration_s: 60,
                warmup_s: 2,
                segment_bytes: Some(1 << 20),
                chaos: Some(Chaos {
                    seed: 0,
                    faults: super::chaos::KINDS.iter().map(|k| k.to_string()).collect(),
                    libfaketime: None,
                    every_s: 4,
                    group_members: 2,
                    overlap: 1,
                }),
                ..base
            },
            // An hour of consumer-group commits at about 100/s (a producer at 100 records/s,
            // one record a request, and a stream-group member committing every delivery, a
            // queue member acking each), a node killed and restarted every 5 minutes: the
            // metadata directory's size and the restarts' times must stay flat once the
            // metadata group snapshots (docs/reliability.md).
            "group-commits" => Settings {
                nodes: 3,
                replication_factor: 3,
                partitions: 1,
                record_size: 256,
                rate: Some(100),
                idempotent: true,
                batch_size: 1,
                duration_s: 3600,
                warmup_s: 2,
                chaos: Some(Chaos {
                    seed: 0,
                    faults: vec!["kill".into()],
                    libfaketime: None,
                    every_s: 300,
                    group_members: 1,
                    overlap: 1,
                }),
                metadata_watch_s: Some(60),
                ..base
            },
            // No load: the spawned nodes' own CPU while they hold their partitions and wait.
            "idle" => Settings {
                partitions: 1,
                producers: 0,
                consumers: 0,
                rate: None,
                duration_s: 60,
                warmup_s: 10,
                ..base
            },
            "custom" => base,
            other => anyhow::bail!(
                "unknown workload {other:?}: use seed-target, max-throughput, replicated-max, \
                 latency-at-load, many-partitions, failover, geo-sync, geo-regional, geo-replay, region-loss, region-loss-regional, idle, \
                 chaos or group-commits"
            ),
        })
    }

    /// The workload's settings with every flag applied.
    pub fn resolve(a: &Args) -> anyhow::Result<Settings> {
        let mut s = Settings::named(a.workload.as_deref().unwrap_or("custom"))?;
        if !a.regions.is_empty() {
            s.regions = a.regions.clone();
        }
        if let Some(n) = a.nodes_per_region {
            s.nodes_per_region = n;
        }
        if let Some(ms) = a.rtt_ms {
            s.rtt_ms = ms;
        }
        if !a.brokers.is_empty() {
            // Running nodes: no regions of loadgen's own making.
            s.regions.clear();
        }
        if !s.regions.is_empty() {
            anyhow::ensure!(
                (1..=16).contains(&s.nodes_per_region),
                "--nodes-per-region must be 1..=16"
            );
            anyhow::ensure!(s.rtt_ms <= 10_000, "--rtt-ms must be at most 10000");
            s.nodes = s.regions.len() * s.nodes_per_region;
            if let Some(n) = a.spawn {
                anyhow::ensure!(
                    n == s.nodes,
                    "--spawn {n} disagrees with {} regions × {} nodes",
                    s.regions.len(),
                    s.nodes_per_region
                );
            }
        } else if let Some(n) = a.spawn {
            s.nodes = n;
        } else if !a.brokers.is_empty() {
            s.nodes = a.brokers.len();
        }
        if a.producer_region.is_some() {
            s.producer_region = a.producer_region.clone();
        }
        if a.consumer_region.is_some() {
            s.consumer_region = a.consumer_region.clone();
        }
        if a.survival.is_some() {
            s.survival = a.survival.clone();
        }
        if !a.leader_regions.is_empty() {
            s.leader_regions = a.leader_regions.clone();
        }
        if let Some(c) = &a.cut_region {
            let (r, at) = c
                .split_once('@')
                .and_then(|(r, at)| Some((r.to_string(), at.parse().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("--cut-region {c}: use REGION@SECONDS"))?;
            s.cut_region = Some((r, at));
        }
        if let Some(sv) = &s.survival {
            anyhow::ensure!(
                sv == "zone" || sv == "region",
                "--survival {sv}: use zone or region"
            );
        }
        for r in s
            .producer_region
            .iter()
            .chain(&s.consumer_region)
            .chain(s.cut_region.as_ref().map(|c| &c.0))
        {
            anyhow::ensure!(
                s.regions.is_empty() || s.regions.contains(r),
                "region {r} is not one of --regions {}",
                s.regions.join(",")
            );
        }
        anyhow::ensure!(
            s.cut_region.is_none() || !s.regions.is_empty(),
            "--cut-region needs a geo cluster loadgen spawns (--regions)"
        );
        macro_rules! set {
            ($($flag:ident => $field:ident),*) => { $( if let Some(v) = a.$flag.clone() { s.$field = v; } )* };
        }
        set!(producers => producers, consumers => consumers, topics => topics,
             partitions => partitions, replication_factor => replication_factor,
             record_size => record_size, batch_size => batch_size, linger_ms => linger_ms,
             in_flight => in_flight, duration => duration_s, warmup => warmup_s, fsync => fsync);
        if let Some(k) = &a.keys {
            s.keys = match k.as_str() {
                "none" => None,
                k => match k.strip_prefix("uniform:").and_then(|n| n.parse().ok()) {
                    Some(n) if n > 0 => Some(n),
                    _ => anyhow::bail!("--keys {k}: use none or uniform:N"),
                },
            };
        }
        if a.max {
            s.rate = None;
        } else if let Some(r) = a.rate {
            s.rate = Some(r);
        }
        if a.idempotent {
            s.idempotent = true;
        }
        match a.client.as_deref() {
            None | Some("any") => {}
            Some("leader") => {
                anyhow::ensure!(
                    s.chaos.is_none() && s.kill_every_s.is_none() && !s.idempotent,
                    "--client leader is for load runs; the failover and chaos workloads and \
                     --idempotent keep their own producers"
                );
                s.leader_aware = true;
            }
            Some(c) => anyhow::bail!("--client {c}: use any or leader"),
        }
        if let Some(c) = s.chaos.as_mut() {
            c.seed = a.seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            if !a.faults.is_empty() {
                for f in &a.faults {
                    anyhow::ensure!(
                        super::chaos::KINDS.contains(&f.as_str()),
                        "--faults {f}: use {}",
                        super::chaos::KINDS.join(", ")
                    );
                }
                c.faults = a.faults.clone();
            }
            // Delays are added on the tern-wan links between regions: a cluster spawned
            // with --regions has them; without, the default set leaves delay out.
            if s.regions.is_empty() {
                anyhow::ensure!(
                    !a.faults.iter().any(|f| f == "delay"),
                    "--faults delay needs a cluster through the WAN simulator: give --regions \
                     (for example --regions r1,r2,r3 --rtt-ms 0, one node each)"
                );
                c.faults.retain(|f| f != "delay");
            }
            // Clock jumps need the nodes started under libfaketime.
            let lib = a
                .libfaketime
                .clone()
                .unwrap_or_else(|| super::cluster::LIBFAKETIME.into());
            if c.faults.iter().any(|f| f == "clock") {
                if lib.exists() {
                    c.libfaketime = Some(lib);
                } else {
                    anyhow::ensure!(
                        !a.faults.iter().any(|f| f == "clock"),
                        "--faults clock needs libfaketime, and {} does not exist (install \
                         Debian's libfaketime, e.g. with scripts/test-tools libfaketime, or \
                         give --libfaketime)",
                        lib.display()
                    );
                    eprintln!(
                        "loadgen: chaos: the clock fault is left out: {} does not exist \
                         (scripts/test-tools libfaketime installs it)",
                        lib.display()
                    );
                    c.faults.retain(|f| f != "clock");
                }
            }
            // Nodes that join must be started like the spawned ones: plainly, on loopback.
            let no_joins = if a.spawn.is_none() || !a.brokers.is_empty() {
                Some("--spawn")
            } else if !s.regions.is_empty() {
                Some("no --regions")
            } else if a.netns {
                Some("no --netns")
            } else if a.secure {
                Some("no --secure")
            } else {
                None
            };
            if let Some(need) = no_joins {
                anyhow::ensure!(
                    !a.faults.iter().any(|f| f == "churn"),
                    "--faults churn starts nodes that join the cluster: it needs {need}"
                );
                c.faults.retain(|f| f != "churn");
            }
            // A move needs a node without a replica to move to.
            if s.nodes <= s.replication_factor as usize {
                anyhow::ensure!(
                    !a.faults.iter().any(|f| f == "move"),
                    "--faults move needs more nodes than the replication factor ({}): spawn {}",
                    s.replication_factor,
                    s.replication_factor + 1
                );
                c.faults.retain(|f| f != "move");
            }
            if let Some(e) = a.fault_every {
                anyhow::ensure!(
                    (1..=600).contains(&e),
                    "--fault-every must be 1..=600 seconds"
                );
                c.every_s = e;
            }
            if let Some(m) = a.group_members {
                anyhow::ensure!(m <= 16, "--group-members must be 0..=16");
                c.group_members = m;
            }
            if let Some(o) = a.overlap {
                anyhow::ensure!(
                    (1..=s.nodes).contains(&o),
                    "--overlap must be 1..={} (one fault per node at most)",
                    s.nodes
                );
                c.overlap = o;
            }
            anyhow::ensure!(
                c.group_members == 0 || s.topics == 1,
                "the chaos workload's consumer group reads one topic: give --topics 1 or --group-members 0"
            );
        } else {
            anyhow::ensure!(
                a.seed.is_none()
                    && a.faults.is_empty()
                    && a.libfaketime.is_none()
                    && a.fault_every.is_none()
                    && a.group_members.is_none()
                    && a.overlap.is_none(),
                "--seed, --faults, --libfaketime, --fault-every, --overlap and --group-members are for the \
                 chaos workload"
            );
        }
        anyhow::ensure!(
            !s.idempotent || s.rate.is_some(),
            "--idempotent producers run an open loop: give --rate, not --max"
        );
        anyhow::ensure!(
            s.producers >= 1 || s.workload == "idle",
            "--producers must be at least 1"
        );
        anyhow::ensure!(
            s.batch_size >= 1 && s.batch_size <= 10_000,
            "--batch-size must be 1..=10000"
        );
        anyhow::ensure!(
            s.record_size >= super::payload::HEADER_LEN,
            "--record-size must be at least 24"
        );
        anyhow::ensure!(s.rate != Some(0), "--rate must be positive (or use --max)");
        anyhow::ensure!(s.in_flight >= 1, "--in-flight must be at least 1");
        anyhow::ensure!(
            s.topics >= 1 && s.partitions >= 1,
            "--topics and --partitions must be positive"
        );
        Ok(s)
    }

    /// What cannot run as asked, said plainly.
    pub fn unsupported(&self, spawned: bool) -> Option<String> {
        if self.replication_factor as usize > self.nodes {
            return Some(format!(
                "replication factor {} needs at least {} nodes; this run has {}",
                self.replication_factor, self.replication_factor, self.nodes
            ));
        }
        if (self.kill_every_s.is_some() || self.chaos.is_some()) && !spawned {
            return Some(format!(
                "workload {:?} kills nodes, so it needs a cluster it started itself: use --spawn",
                self.workload
            ));
        }
        None
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "workload": self.workload, "nodes": self.nodes,
            "replication_factor": self.replication_factor, "topics": self.topics,
            "partitions": self.partitions, "record_size": self.record_size,
            "batch_size": self.batch_size, "linger_ms": self.linger_ms, "keys": self.keys,
            "rate": self.rate, "closed_loop": self.rate.is_none(), "in_flight": self.in_flight,
            "producers": self.producers, "consumers": self.consumers,
            "duration_s": self.duration_s, "warmup_s": self.warmup_s, "fsync": self.fsync,
            "kill_every_s": self.kill_every_s, "idempotent": self.idempotent,
            "chaos": self.chaos.as_ref().map(|c| serde_json::json!({"seed": c.seed, "faults": c.faults, "every_s": c.every_s, "group_members": c.group_members})),
            "segment_bytes": self.segment_bytes,
            "regions": self.regions, "nodes_per_region": self.nodes_per_region,
            "rtt_ms": self.rtt_ms, "producer_region": self.producer_region,
            "consumer_region": self.consumer_region, "survival": self.survival,
            "leader_regions": self.leader_regions,
            "cut_region": self.cut_region.as_ref().map(|(r, at)| serde_json::json!({"region": r, "at_s": at})),
            "replay": self.replay,
            "mirror_to": self.mirror_to,
            "metadata_watch_s": self.metadata_watch_s,
        })
    }
}
