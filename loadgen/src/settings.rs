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
    /// many-partitions, failover. Flags below override its settings.
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
    /// TLS and token for --brokers that are secured (as the `tern` CLI takes them).
    #[command(flatten)]
    pub security: tern::cli::SecurityOpts,
    #[doc(hidden)]
    #[arg(long, hide = true)]
    pub serve_self: bool,
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
                ..base
            },
            "custom" => base,
            other => anyhow::bail!(
                "unknown workload {other:?}: use seed-target, max-throughput, replicated-max, \
                 latency-at-load, many-partitions or failover"
            ),
        })
    }

    /// The workload's settings with every flag applied.
    pub fn resolve(a: &Args) -> anyhow::Result<Settings> {
        let mut s = Settings::named(a.workload.as_deref().unwrap_or("custom"))?;
        if let Some(n) = a.spawn {
            s.nodes = n;
        } else if !a.brokers.is_empty() {
            s.nodes = a.brokers.len();
        }
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
        anyhow::ensure!(s.producers >= 1, "--producers must be at least 1");
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
        if self.kill_every_s.is_some() && !spawned {
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
            "kill_every_s": self.kill_every_s,
        })
    }
}
