//! A scrape: read what the node counts and what each core's replicas know, then write it in
//! the Prometheus text format with `prometheus-client`. Nothing here runs unless something
//! scrapes; the data path only bumps the counters in `crate::metrics`.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::broker::Broker;
use crate::cluster::health::{under_replicated, FollowerLag};
use crate::groups::Groups;
use crate::metrics::{HistogramSnapshot, CODES, NODE, RPCS};
use crate::proto::v1 as pb;
use crate::shard::request::ReplicaState;
use crate::shard::CoreRequest;
use crate::types::CoreId;

/// Replicas one core reports to a scrape at most (a bound on the answer, far above the
/// partitions a node can hold).
const CORE_REPLICAS_MAX: usize = 1_000_000;

/// Labels: (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

/// One replica on this node, as its core reported it.
#[derive(Debug)]
struct Replica {
    topic: Arc<str>,
    partition: u32,
    /// Replicas the metadata assigns to the partition.
    assigned: usize,
    state: ReplicaState,
    /// On the leader: each follower and how far behind it is.
    followers: Vec<(u64, FollowerLag)>,
    under_replicated: bool,
}

impl Replica {
    fn worst_lag(&self) -> u64 {
        if let Some(m) = &self.state.mirror {
            return m.records;
        }
        self.followers
            .iter()
            .map(|(_, f)| if f.matched { f.lag_entries } else { u64::MAX })
            .max()
            .unwrap_or(0)
    }

    fn labels(&self) -> Labels {
        vec![
            ("topic", self.topic.to_string()),
            ("partition", self.partition.to_string()),
        ]
    }
}

/// Everything one scrape shows, read at one moment.
#[derive(Debug)]
pub struct Snapshot {
    node: u64,
    region: String,
    zone: String,
    ready: bool,
    mailbox_depth: Vec<usize>,
    /// The replicas with their own series (at most the configured number, worst first).
    shown: Vec<Replica>,
    replicas: usize,
    leaders: usize,
    /// Mirror topics' replicas (no Raft group).
    mirrors: usize,
    under_replicated: usize,
    leaderless: usize,
    groups: Vec<pb::GroupInfo>,
}

/// Asks every core for nothing: an answer proves its loop runs.
pub async fn cores_answer(broker: &Broker) -> Result<(), crate::shard::CoreError> {
    for core in 0..broker.shards.core_count() {
        broker
            .shards
            .ask(CoreId(core as u32), |reply| CoreRequest::States {
                limit: 0,
                reply,
            })
            .await?;
    }
    Ok(())
}

impl Snapshot {
    /// Reads the node's state; `limit` partitions get their own series.
    pub async fn read(broker: &Broker, groups: &Groups, limit: usize) -> Snapshot {
        let mut all = Vec::new();
        for core in 0..broker.shards.core_count() {
            let states = broker
                .shards
                .ask(CoreId(core as u32), |reply| CoreRequest::States {
                    limit: CORE_REPLICAS_MAX,
                    reply,
                })
                .await
                .unwrap_or_default();
            for (key, state) in states {
                // The metadata group is not a topic's partition.
                let Ok(topic) = broker.topic(&key.topic) else {
                    continue;
                };
                let assigned = topic.replicas(key.partition).len();
                let lags = broker.follower_lags(&state);
                let in_sync = lags.iter().filter(|(_, _, in_sync)| *in_sync).count();
                let under = state.is_leader && under_replicated(assigned, in_sync);
                let followers = lags.into_iter().map(|(n, f, _)| (n.0, f)).collect();
                all.push(Replica {
                    topic: key.topic.clone(),
                    partition: key.partition,
                    assigned,
                    state,
                    followers,
                    under_replicated: under,
                });
            }
        }
        let replicas = all.len();
        let leaders = all.iter().filter(|r| r.state.is_leader).count();
        let mirrors = all.iter().filter(|r| r.state.mirror.is_some()).count();
        let under = all.iter().filter(|r| r.under_replicated).count();
        let leaderless = all
            .iter()
            .filter(|r| r.state.leader.is_none() && r.state.mirror.is_none())
            .count();
        all.sort_by(|a, b| {
            (b.under_replicated, b.worst_lag())
                .cmp(&(a.under_replicated, a.worst_lag()))
                .then_with(|| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)))
        });
        all.truncate(limit);
        let config = &broker.config;
        Snapshot {
            node: config.node_id,
            region: config.region.clone(),
            zone: config.zone.clone(),
            ready: broker.is_ready() && !broker.is_closing(),
            mailbox_depth: broker
                .shards
                .mailboxes()
                .iter()
                .map(|m| m.depth())
                .collect(),
            shown: all,
            replicas,
            leaders,
            mirrors,
            under_replicated: under,
            leaderless,
            groups: groups.running().await,
        }
    }

    /// The Prometheus text exposition of this snapshot.
    pub fn encode(self) -> Result<String, fmt::Error> {
        let mut registry = Registry::with_prefix("tern");
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

/// A family of gauges; written only when it has a series.
fn gauges<V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> fmt::Result {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn gauge<V: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

/// A family of counters (`_total` is added to the name).
fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        m.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    v: u64,
) -> fmt::Result {
    e.encode_descriptor(name, help, unit, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

/// A histogram in seconds, without labels.
struct Histogram(HistogramSnapshot);

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> fmt::Result {
        let s = &self.0;
        encoder.encode_histogram::<NoLabelSet>(s.sum_seconds, s.count, &s.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let e = &mut e;
        let n = &NODE;
        gauges(
            e,
            "node",
            "This node: its id, region and zone as labels; the value is always 1.",
            None,
            [(
                vec![
                    ("node", self.node.to_string()),
                    ("region", self.region.clone()),
                    ("zone", self.zone.clone()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                1i64,
            )],
        )?;
        gauge(
            e,
            "node_ready",
            "1 once the node has caught up with the cluster metadata and serves (as /readyz).",
            i64::from(self.ready),
        )?;

        // Traffic.
        counter(
            e,
            "publish_records",
            "Records acknowledged to publishers that called this node.",
            None,
            n.publish_records.get(),
        )?;
        counter(
            e,
            "publish_forwarded_records",
            "Records this node passed on to their partition's leader on another node, acknowledged there.",
            None,
            n.publish_forwarded.get(),
        )?;
        counter(
            e,
            "publish",
            "Key and value bytes of the records acknowledged to publishers that called this node.",
            Some(&Unit::Bytes),
            n.publish_bytes.get(),
        )?;
        counter(
            e,
            "read_records",
            "Records handed to readers that called this node (Fetch, Subscribe, group deliveries).",
            None,
            n.read_records.get(),
        )?;
        counter(
            e,
            "read",
            "Key and value bytes of the records handed to readers that called this node.",
            Some(&Unit::Bytes),
            n.read_bytes.get(),
        )?;
        {
            let mut m = e.encode_descriptor(
                "request_duration",
                "gRPC calls by service, method and status code: time to the response headers (a \
                 unary call's handling, a stream's opening).",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for (rpc, code, h) in n.requests.seen() {
                let labels: Labels = vec![
                    ("service", RPCS[rpc].0.to_string()),
                    ("method", RPCS[rpc].1.to_string()),
                    ("code", CODES[code].to_string()),
                ];
                Histogram(h).encode(m.encode_family(&labels)?)?;
            }
        }

        // Raft and storage.
        counter(
            e,
            "raft_elections",
            "Elections this node's replicas started after hearing no leader.",
            None,
            n.elections.get(),
        )?;
        counter(
            e,
            "raft_leader_changes",
            "Times a replica on this node saw its group's leader change (or first learned it).",
            None,
            n.leader_changes.get(),
        )?;
        counter(
            e,
            "mirror_pulls",
            "Pulls from their sources that brought mirror replicas on this node new batches.",
            None,
            n.mirror_batches.get(),
        )?;
        counter(
            e,
            "mirror_records_skipped",
            "Offsets mirror replicas on this node skipped: their source deleted them (retention) \
             before they were copied.",
            None,
            n.mirror_records_skipped.get(),
        )?;
        counter(
            e,
            "core_stalls",
            "Times the watchdog found a core asleep past its own timers (glommio) and woke it.",
            None,
            n.core_stalls.get(),
        )?;
        counter(
            e,
            "raft_checkpoints_saved",
            "Applied checkpoints (applied position and idempotent producers) saved by replicas on this node.",
            None,
            n.checkpoints_saved.get(),
        )?;
        counter(
            e,
            "raft_checkpoint_restores",
            "Replicas on this node that started from their applied checkpoint instead of re-applying their log.",
            None,
            n.checkpoint_restores.get(),
        )?;
        counter(
            e,
            "raft_durable_reports",
            "Reports of what they hold durably that leaders on this node sent their followers in other regions, so those serve reads of committed records earlier.",
            None,
            n.durable_reports.get(),
        )?;
        counter(
            e,
            "raft_commits_reported",
            "Times a follower on this node moved its committed position (what its readers may read) by its leader's durable report, before the leader's next append said so.",
            None,
            n.commits_reported.get(),
        )?;
        counter(
            e,
            "replica_repairs",
            "Damaged replicas on this node reopened with their log cut at the damage, to be caught up by their peers.",
            None,
            n.replica_repairs.get(),
        )?;
        Histogram(n.fsync.snapshot()).encode(e.encode_descriptor(
            "fsync_duration",
            "fdatasync of partition log segments.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        Histogram(n.peer_round_trip.snapshot()).encode(e.encode_descriptor(
            "peer_round_trip",
            "Round trips of keepalive exchanges (no Raft messages) to the other nodes; over the Raft heartbeat interval, heartbeats time out.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        counter(
            e,
            "raft_exchanges_reordered",
            "Exchanges of Raft messages from other nodes that arrived ahead of one sent before them and waited for it (a group's appends are taken in the order sent).",
            None,
            n.exchanges_reordered.get(),
        )?;
        counter(
            e,
            "raft_exchanges_gone_ahead",
            "Exchanges of Raft messages from other nodes that went ahead of an earlier one that did not arrive within 50 ms.",
            None,
            n.exchanges_gone_ahead.get(),
        )?;
        counter(
            e,
            "raft_append_conflicts",
            "Appends sent by leaders on this node that a follower refused because its log did not hold the entry before them (the leader sends again from what it has).",
            None,
            n.append_conflicts.get(),
        )?;
        gauges(
            e,
            "core_mailbox_depth",
            "Requests waiting in each core's mailbox.",
            None,
            self.mailbox_depth
                .iter()
                .enumerate()
                .map(|(c, d)| (vec![("core", c.to_string())], *d as i64)),
        )?;

        // Partitions: totals over every replica here, then each shown one.
        gauges(
            e,
            "replicas",
            "Partition replicas on this node, by role.",
            None,
            [
                (vec![("role", "leader".to_string())], self.leaders as i64),
                (
                    vec![("role", "follower".to_string())],
                    (self.replicas - self.leaders - self.mirrors) as i64,
                ),
                (vec![("role", "mirror".to_string())], self.mirrors as i64),
            ],
        )?;
        gauge(
            e,
            "partitions_under_replicated",
            "Partitions led here with fewer replicas in sync than assigned (the leader counts \
             them, so a cluster-wide sum counts each once).",
            self.under_replicated as i64,
        )?;
        gauge(
            e,
            "replicas_leaderless",
            "Replicas on this node that know no leader: their partition may be unavailable.",
            self.leaderless as i64,
        )?;
        gauge(
            e,
            "metrics_partitions_omitted",
            "Replicas on this node without their own series (over --metrics-partitions).",
            (self.replicas - self.shown.len()) as i64,
        )?;
        let shown = &self.shown;
        gauges(
            e,
            "partition_high_watermark",
            "Committed offset (exclusive end) of the partition, as this replica knows it.",
            None,
            shown
                .iter()
                .map(|r| (r.labels(), r.state.positions.committed.0)),
        )?;
        gauges(
            e,
            "partition_log_end_offset",
            "Offset the next record appended to this replica's log gets.",
            None,
            shown.iter().map(|r| (r.labels(), r.state.positions.next.0)),
        )?;
        gauges(
            e,
            "partition_start_offset",
            "First offset this replica still stores.",
            None,
            shown
                .iter()
                .map(|r| (r.labels(), r.state.positions.start.0)),
        )?;
        gauges(
            e,
            "partition_leader",
            "Node id of the partition's leader as this replica knows it (0: none known).",
            None,
            shown
                .iter()
                .map(|r| (r.labels(), r.state.leader.map_or(0, |l| l.0))),
        )?;
        gauges(
            e,
            "partition_replicas",
            "Replicas the metadata assigns to the partition.",
            None,
            shown.iter().map(|r| (r.labels(), r.assigned as i64)),
        )?;
        gauges(
            e,
            "partition_under_replicated",
            "1 when this node leads the partition and fewer replicas than assigned are in sync.",
            None,
            shown
                .iter()
                .filter(|r| r.state.is_leader)
                .map(|r| (r.labels(), i64::from(r.under_replicated))),
        )?;
        gauges(
            e,
            "partition_mirror_lag_records",
            "On a mirror's replica: offsets its source has committed that it does not hold yet.",
            None,
            shown
                .iter()
                .filter_map(|r| r.state.mirror.as_ref().map(|m| (r.labels(), m.records))),
        )?;
        gauges(
            e,
            "partition_mirror_lag_seconds",
            "On a mirror's replica: seconds since it last held everything its source had \
             committed (0 while it does).",
            None,
            shown.iter().filter_map(|r| {
                r.state
                    .mirror
                    .as_ref()
                    .map(|m| (r.labels(), m.since_caught_up.as_secs_f64()))
            }),
        )?;
        gauges(
            e,
            "partition_follower_lag_entries",
            "On the leader: Raft entries each follower is behind (unmatched followers count the \
             whole log).",
            None,
            shown.iter().flat_map(|r| {
                r.followers.iter().map(|(node, f)| {
                    let mut l = r.labels();
                    l.push(("follower", node.to_string()));
                    (l, f.lag_entries)
                })
            }),
        )?;

        // Clients and groups.
        gauge(
            e,
            "connections",
            "Client and peer connections open now.",
            NODE.connections_open.get(),
        )?;
        counter(
            e,
            "connections_accepted",
            "Connections accepted.",
            None,
            n.connections_accepted.get(),
        )?;
        counter(
            e,
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out.",
            None,
            n.handshake_failures.get(),
        )?;
        counters(
            e,
            "auth_failures",
            "Calls refused: unauthenticated (no, unknown or revoked credentials) or denied (by \
             the ACLs).",
            None,
            [
                (
                    vec![("reason", "unauthenticated".to_string())],
                    n.auth.unauthenticated.get(),
                ),
                (vec![("reason", "denied".to_string())], n.auth.denied.get()),
            ],
        )?;
        counters(
            e,
            "quota_throttled",
            "Calls a principal's quota slowed (delayed) or refused with RESOURCE_EXHAUSTED.",
            None,
            [
                (
                    vec![("action", "delayed".to_string())],
                    n.quota_delayed.get(),
                ),
                (
                    vec![("action", "refused".to_string())],
                    n.quota_refused.get(),
                ),
            ],
        )?;
        counter(
            e,
            "group_redeliveries",
            "Queue-group records delivered again (after an ack timeout, a nack or a member \
             leaving).",
            None,
            n.redeliveries.get(),
        )?;
        counter(
            e,
            "group_dead_letters",
            "Queue-group records sent to a dead-letter topic.",
            None,
            n.dead_letters.get(),
        )?;
        gauges(
            e,
            "group_lag_records",
            "Records of a partition the group has not consumed (stream) or settled (queue), for \
             the groups this node coordinates.",
            None,
            self.groups.iter().flat_map(|g| {
                g.partitions.iter().filter_map(|p| {
                    let lag = p.lag?;
                    Some((
                        vec![
                            ("group", g.group.clone()),
                            ("topic", g.topic.clone()),
                            ("partition", p.partition.to_string()),
                        ],
                        lag,
                    ))
                })
            }),
        )?;
        Ok(())
    }
}

// The labels type must encode as a label set.
const _: fn() = || {
    fn is_label_set<T: EncodeLabelSet>() {}
    is_label_set::<Labels>();
};
