//! What the node counts while it works: plain atomics that the data path bumps with relaxed
//! adds (no locks, no allocation, no labels to look up), read and turned into Prometheus
//! metrics only when something scrapes the admin listener (`crate::admin`). Per-partition
//! values (offsets, leaders, lag) are not counted here at all: the scrape asks each core for
//! them.
//!
//! Everything is process-wide (`NODE`): one node per process.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A count that only goes up.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds: 100 µs to 10 s.
pub const LATENCY_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A latency histogram with [`LATENCY_BOUNDS`]; the last slot counts what exceeds them all.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_ns: AtomicU64,
}

/// A histogram read at one moment: the sum, the count, and each bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound, observations above the previous bound and at or below this one), the
    /// last one `+Inf`. Not cumulative: the encoder adds them up.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    pub const fn new() -> Histogram {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BOUNDS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The count is the sum of the buckets read, so the two always agree.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Relaxed);
            total += n;
            buckets.push((LATENCY_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        HistogramSnapshot {
            sum_seconds: self.sum_ns.load(Relaxed) as f64 / 1e9,
            count: total,
            buckets,
        }
    }
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram::new()
    }
}

/// The gRPC methods whose calls are timed one by one, as (service, method). Calls to anything
/// else (reflection, health) are timed together under `other`.
pub const RPCS: &[(&str, &str)] = &[
    ("tern.v1.Tern", "CreateTopic"),
    ("tern.v1.Tern", "DeleteTopic"),
    ("tern.v1.Tern", "ListTopics"),
    ("tern.v1.Tern", "DescribeTopic"),
    ("tern.v1.Tern", "PromoteTopic"),
    ("tern.v1.Tern", "Publish"),
    ("tern.v1.Tern", "InitProducer"),
    ("tern.v1.Tern", "PublishStream"),
    ("tern.v1.Tern", "Subscribe"),
    ("tern.v1.Tern", "Fetch"),
    ("tern.v1.Tern", "FetchStream"),
    ("tern.v1.Tern", "ListOffsets"),
    ("tern.v1.Tern", "Consume"),
    ("tern.v1.Tern", "Ack"),
    ("tern.v1.Tern", "Nack"),
    ("tern.v1.Tern", "ListGroups"),
    ("tern.v1.Tern", "DescribeGroup"),
    ("tern.v1.Tern", "ClusterInfo"),
    ("tern.v1.Tern", "MovePartition"),
    ("tern.v1.Tern", "Rebalance"),
    ("tern.v1.Tern", "RemoveNode"),
    ("tern.v1.Tern", "WhoAmI"),
    ("tern.v1.Tern", "CreateUser"),
    ("tern.v1.Tern", "DeleteUser"),
    ("tern.v1.Tern", "ListUsers"),
    ("tern.v1.Tern", "AddAcl"),
    ("tern.v1.Tern", "RemoveAcl"),
    ("tern.v1.Tern", "ListAcls"),
    ("tern.v1.Tern", "SetQuota"),
    ("tern.v1.Tern", "ListQuotas"),
    ("tern.internal.v1.Peer", "Exchange"),
    ("tern.internal.v1.Peer", "Propose"),
    ("tern.internal.v1.Peer", "SetFault"),
    ("broker.Broker", "Publish"),
    ("broker.Broker", "Subscribe"),
    ("broker.Broker", "Fetch"),
    ("rest", "CreateTopic"),
    ("rest", "DeleteTopic"),
    ("rest", "Publish"),
    ("rest", "Subscribe"),
    ("rest", "Ack"),
    ("rest", "Nack"),
    ("rest", "OpenAPI"),
    ("other", "other"),
];

/// gRPC status codes 0 (OK) to 16 (UNAUTHENTICATED), by their names.
pub const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The index in [`RPCS`] of a request: a gRPC path such as `/tern.v1.Tern/Publish`, or a REST
/// route (`POST /topics/{topic}/publish` is `rest`, `Publish`).
pub fn rpc_index(method: &str, path: &str) -> usize {
    let other = RPCS.len() - 1;
    let rest = |name: &str| {
        RPCS.iter()
            .position(|(s, m)| *s == "rest" && *m == name)
            .unwrap_or(other)
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        ("POST", ["topics"]) => return rest("CreateTopic"),
        ("DELETE", ["topics", _]) => return rest("DeleteTopic"),
        ("POST", ["topics", _, "publish"]) => return rest("Publish"),
        ("GET", ["topics", _, "subscribe"]) => return rest("Subscribe"),
        ("POST", ["topics", _, "ack"]) => return rest("Ack"),
        ("POST", ["topics", _, "nack"]) => return rest("Nack"),
        ("GET", ["openapi.json"]) => return rest("OpenAPI"),
        _ => {}
    }
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return other;
    };
    RPCS.iter()
        .position(|(s, m)| *s == service && *m == method)
        .unwrap_or(other)
}

/// Request latency by method and status code.
pub struct Requests {
    table: [[Histogram; CODES.len()]; RPCS.len()],
}

impl Requests {
    const fn new() -> Requests {
        Requests {
            table: [const { [const { Histogram::new() }; CODES.len()] }; RPCS.len()],
        }
    }

    /// Records one call; a code outside 0..=16 counts as UNKNOWN.
    pub fn observe(&self, rpc: usize, code: usize, d: Duration) {
        let code = if code < CODES.len() { code } else { 2 };
        if let Some(row) = self.table.get(rpc) {
            row[code].observe(d);
        }
    }

    /// Every (rpc, code) that has seen a call.
    pub fn seen(&self) -> impl Iterator<Item = (usize, usize, HistogramSnapshot)> + '_ {
        self.table.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().filter_map(move |(c, h)| {
                let s = h.snapshot();
                (s.count > 0).then_some((r, c, s))
            })
        })
    }
}

/// Why a call was refused before it ran.
#[derive(Debug, Default)]
pub struct Refusals {
    /// No or an unknown token, or a certificate that names no user.
    pub unauthenticated: Counter,
    /// The principal may not do this.
    pub denied: Counter,
}

/// Everything this node counts.
pub struct Node {
    pub publish_records: Counter,
    /// Records this node passed on to their partition's leader elsewhere, acknowledged there
    /// (`broker::publish`): each costs this node about as much as the leader.
    pub publish_forwarded: Counter,
    pub publish_bytes: Counter,
    /// Records and bytes handed to readers: Fetch, Subscribe and group deliveries.
    pub read_records: Counter,
    pub read_bytes: Counter,
    pub requests: Requests,
    /// Elections this node's replicas started, and leaders they saw change.
    pub elections: Counter,
    pub leader_changes: Counter,
    /// Applied checkpoints saved, and replicas that started from theirs (`raft::store`).
    pub checkpoints_saved: Counter,
    pub checkpoint_restores: Counter,
    /// Durable reports this node's leaders sent their far followers, and followers' committed
    /// positions moved by one before their leader's next append said so (`raft::early`).
    pub durable_reports: Counter,
    pub commits_reported: Counter,
    /// Damaged replicas reopened to repair them (`shard::core::repair`).
    pub replica_repairs: Counter,
    /// Cores the watchdog found asleep past their own timers and woke (`shard::mailbox`).
    pub core_stalls: Counter,
    pub fsync: Histogram,
    /// Round trips of keepalive exchanges (no messages) to peers (`raft::transport`).
    pub peer_round_trip: Histogram,
    /// Exchanges from peers that arrived ahead of one sent before them on their link and
    /// waited for it, and those that went ahead after waiting in vain (`raft::transport`).
    pub exchanges_reordered: Counter,
    pub exchanges_gone_ahead: Counter,
    /// Appends a follower refused because its log did not hold the entry before them; the
    /// leader then sends again from what the follower has (`raft::network`).
    pub append_conflicts: Counter,
    pub connections_open: Gauge,
    pub connections_accepted: Counter,
    /// TLS handshakes that failed or timed out.
    pub handshake_failures: Counter,
    pub auth: Refusals,
    /// Calls a quota slowed, and calls it refused.
    pub quota_delayed: Counter,
    pub quota_refused: Counter,
    pub redeliveries: Counter,
    pub dead_letters: Counter,
    /// Pulls a mirror's replicas took in with new batches, and offsets they skipped because
    /// their source deleted them before they were copied (`shard::mirror`).
    pub mirror_batches: Counter,
    pub mirror_records_skipped: Counter,
}

pub static NODE: Node = Node {
    publish_records: Counter::new(),
    publish_forwarded: Counter::new(),
    publish_bytes: Counter::new(),
    read_records: Counter::new(),
    read_bytes: Counter::new(),
    requests: Requests::new(),
    elections: Counter::new(),
    leader_changes: Counter::new(),
    checkpoints_saved: Counter::new(),
    checkpoint_restores: Counter::new(),
    durable_reports: Counter::new(),
    commits_reported: Counter::new(),
    replica_repairs: Counter::new(),
    core_stalls: Counter::new(),
    fsync: Histogram::new(),
    peer_round_trip: Histogram::new(),
    exchanges_reordered: Counter::new(),
    exchanges_gone_ahead: Counter::new(),
    append_conflicts: Counter::new(),
    connections_open: Gauge::new(),
    connections_accepted: Counter::new(),
    handshake_failures: Counter::new(),
    auth: Refusals {
        unauthenticated: Counter::new(),
        denied: Counter::new(),
    },
    quota_delayed: Counter::new(),
    quota_refused: Counter::new(),
    redeliveries: Counter::new(),
    dead_letters: Counter::new(),
    mirror_batches: Counter::new(),
    mirror_records_skipped: Counter::new(),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_their_own_observations_and_count_matches() {
        let h = Histogram::new();
        h.observe(Duration::from_micros(50)); // first bucket
        h.observe(Duration::from_millis(3)); // 0.005
        h.observe(Duration::from_millis(5)); // 0.005: a bound is inclusive
        h.observe(Duration::from_secs(60)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets[0], (0.0001, 1));
        let at = |b: f64| s.buckets.iter().find(|(x, _)| *x == b).unwrap().1;
        assert_eq!(at(0.0025), 0);
        assert_eq!(at(0.005), 2);
        assert_eq!(at(10.0), 0);
        assert_eq!(s.buckets.last().unwrap(), &(f64::INFINITY, 1));
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        assert!((s.sum_seconds - 60.00805).abs() < 1e-9);
    }

    #[test]
    fn paths_map_to_their_method_or_other() {
        let at = |m, p| RPCS[rpc_index(m, p)];
        assert_eq!(
            at("POST", "/tern.v1.Tern/Publish"),
            ("tern.v1.Tern", "Publish")
        );
        assert_eq!(
            at("POST", "/tern.internal.v1.Peer/Exchange"),
            ("tern.internal.v1.Peer", "Exchange")
        );
        assert_eq!(
            at("POST", "/broker.Broker/Fetch"),
            ("broker.Broker", "Fetch")
        );
        assert_eq!(at("POST", "/topics/orders/publish"), ("rest", "Publish"));
        assert_eq!(at("GET", "/topics/orders/subscribe"), ("rest", "Subscribe"));
        assert_eq!(at("DELETE", "/topics/orders"), ("rest", "DeleteTopic"));
        assert_eq!(at("POST", "/topics"), ("rest", "CreateTopic"));
        let other = RPCS.len() - 1;
        assert_eq!(rpc_index("POST", "/grpc.health.v1.Health/Check"), other);
        assert_eq!(rpc_index("GET", "/topics/orders/publish"), other);
        assert_eq!(rpc_index("GET", "/topics/a/b/c"), other);
        assert_eq!(rpc_index("POST", "nonsense"), other);
    }

    #[test]
    fn every_tern_rpc_is_timed_by_name() {
        let proto = include_str!("../proto/tern/v1/tern.proto");
        let names: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| {
                l.split(|c: char| c == '(' || c.is_whitespace())
                    .next()
                    .unwrap()
            })
            .collect();
        assert!(names.len() > 20, "{names:?}");
        for n in names {
            assert!(
                RPCS.contains(&("tern.v1.Tern", n)),
                "{n} is missing from metrics::RPCS"
            );
        }
    }

    #[test]
    fn an_unknown_code_counts_as_unknown() {
        let r = Requests::new();
        r.observe(0, 99, Duration::from_millis(1));
        let seen: Vec<_> = r.seen().collect();
        assert_eq!(seen.len(), 1);
        assert_eq!((seen[0].0, seen[0].1), (0, 2));
    }
}
