//! Reads: committed records and offsets of a partition, from this node's replica (its core),
//! or from another replica over the peer connection when this node holds none. A read relayed
//! here by another node is not relayed again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use prost::Message;

use super::peers::Origin;
use super::{Broker, BrokerError, Result, Topic};
use crate::cluster::health::FollowerLag;
use crate::proto::v1 as pb;
use crate::shard::request::ReplicaState;
use crate::shard::{CoreError, CoreRequest, Fetched, ListedOffsets, StartAt};
use crate::types::{CoreId, NodeId, Offset};

/// How much longer than its long poll a read relayed to another node may take.
const RELAY_SLACK: Duration = Duration::from_secs(10);
/// The longest long poll relayed to another node: a node that dies or is cut off while it
/// holds one costs the reader at most this (plus the slack) before it tries the next replica;
/// a subscription simply polls again.
const RELAYED_WAIT_MAX: Duration = Duration::from_secs(5);

/// Whether a position is relative to the end of what is committed, which a follower's view
/// has by up to a heartbeat later than its leader's.
fn from_end(at: StartAt) -> bool {
    matches!(at, StartAt::Latest | StartAt::Last(_) | StartAt::Time(_))
}

/// How long a follower waits for its leader's offsets before it answers from its own view.
const LEADER_ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// What to read from a partition.
#[derive(Clone, Copy, Debug)]
pub struct Read {
    pub from: Offset,
    pub max_records: usize,
    pub max_bytes: usize,
    /// How long to wait for records when there are none past `from` yet.
    pub max_wait: Duration,
    /// Whole batches as stored (control ones too) instead of records: a mirror's pull.
    pub raw: bool,
}

impl Broker {
    /// Committed batches of a partition this node holds, from its core.
    pub async fn fetch(
        &self,
        topic: &Topic,
        partition: u32,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
        whole: bool,
    ) -> Result<Fetched> {
        self.check_local(topic, partition)?;
        let key = topic.key(partition);
        Ok(self
            .shards
            .ask(topic.core(partition), |reply| CoreRequest::Fetch {
                key,
                from,
                max_bytes,
                max_wait,
                fresh: true,
                whole,
                reply,
            })
            .await?)
    }

    /// Committed records of a partition, at most `max_records`, from this node's replica or
    /// (once: a read another node relayed is not passed on) from another replica.
    pub async fn read(
        &self,
        topic: &Topic,
        partition: u32,
        read: Read,
        origin: &Origin,
    ) -> Result<pb::FetchResponse> {
        if topic.on(self.node_id(), partition) {
            match self
                .fetch(
                    topic,
                    partition,
                    read.from,
                    read.max_bytes,
                    read.max_wait,
                    read.raw,
                )
                .await
            {
                Ok(f) if read.raw => {
                    let (batches, next) = raw_batches(&f, read.max_bytes);
                    return Ok(pb::FetchResponse {
                        records: Vec::new(),
                        next_offset: next,
                        high_watermark: f.high_watermark.0,
                        start_offset: f.start.0,
                        batches,
                        mirror: f.mirror.as_ref().map(mirror_progress),
                    });
                }
                Ok(f) => {
                    let (records, next) = records(
                        &topic.spec.name,
                        partition,
                        &f,
                        read.max_records,
                        read.max_bytes,
                    );
                    return Ok(pb::FetchResponse {
                        records,
                        next_offset: next,
                        high_watermark: f.high_watermark.0,
                        start_offset: f.start.0,
                        batches: Vec::new(),
                        mirror: None,
                    });
                }
                // A stale follower: a client's read goes to the nearest replica that is not.
                Err(BrokerError::Core(CoreError::Stale { .. })) if !origin.relayed() => {}
                Err(e) => return Err(e),
            }
        }
        if origin.relayed() {
            return Err(self.no_replica(topic, partition));
        }
        self.read_elsewhere(topic, partition, read, origin).await
    }

    /// Reads a partition from its other replicas, nearest (and heard from) first.
    pub async fn read_elsewhere(
        &self,
        topic: &Topic,
        partition: u32,
        read: Read,
        origin: &Origin,
    ) -> Result<pb::FetchResponse> {
        let wait = read.max_wait.min(RELAYED_WAIT_MAX);
        let req = pb::FetchRequest {
            topic: topic.spec.name.clone(),
            partition,
            offset: read.from.0,
            max_records: read.max_records as u32,
            max_bytes: read.max_bytes as u32,
            max_wait_ms: wait.as_millis() as u32,
            raw_batches: read.raw,
            // The replica's node reads the same topic, not one created again meanwhile.
            topic_uid: topic.spec.uid.0,
        };
        self.on_replica(topic, partition, |mut c| {
            let mut call = self.relay(req.clone(), origin);
            // Plus its bytes at 1 MB/s: a big read over a slow link is not cut short.
            call.set_timeout(wait + RELAY_SLACK + Duration::from_micros(read.max_bytes as u64));
            async move { c.fetch(call).await }
        })
        .await
    }

    /// A partition's committed range and where `at` falls in it, from this node's replica or
    /// (once) from another.
    pub async fn list_offsets(
        &self,
        topic: &Topic,
        partition: u32,
        at: StartAt,
        origin: &Origin,
    ) -> Result<ListedOffsets> {
        if topic.on(self.node_id(), partition) {
            // A position relative to the end is the leader's: a follower's commit index lags
            // by up to a heartbeat, and "latest" taken there would hand a subscriber records
            // acknowledged before it subscribed.
            let leader = match from_end(at) {
                true => self.leader_elsewhere(topic, partition).await,
                false => None,
            };
            if let (Some(l), false) = (leader, origin.relayed()) {
                if let Some(o) = self.at_leader(l, topic, partition, at, origin).await? {
                    return Ok(o);
                }
            }
            let key = topic.key(partition);
            let asked = self
                .shards
                .ask(topic.core(partition), |reply| CoreRequest::ListOffsets {
                    key,
                    at,
                    reply,
                })
                .await;
            match asked {
                Ok(mut o) => {
                    // A relayed call is answered here; the caller may ask the leader (below).
                    o.follower_of = leader;
                    return Ok(o);
                }
                // A replica without the partition's earlier records: the others answer.
                Err(CoreError::Stale { .. }) if !origin.relayed() => {}
                Err(e) => return Err(e.into()),
            }
        }
        if origin.relayed() {
            return Err(self.no_replica(topic, partition));
        }
        let req = pb::ListOffsetsRequest {
            topic: topic.spec.name.clone(),
            partitions: vec![partition],
            position: Some(start_position(at)),
        };
        let r = self
            .on_replica(topic, partition, |mut c| {
                let call = self.relay(req.clone(), origin);
                async move { c.list_offsets(call).await }
            })
            .await?;
        let o = Self::listed(topic, partition, r)?;
        // A follower answered from its own view: its leader's is current.
        if let (Some(l), true) = (o.follower_of, from_end(at)) {
            if let Some(o) = self.at_leader(l, topic, partition, at, origin).await? {
                return Ok(o);
            }
        }
        Ok(o)
    }

    /// The offsets as the leader `leader` answers them, or `None` when it cannot now (the
    /// caller uses a follower's view instead).
    async fn at_leader(
        &self,
        leader: NodeId,
        topic: &Topic,
        partition: u32,
        at: StartAt,
        origin: &Origin,
    ) -> Result<Option<ListedOffsets>> {
        match self
            .list_offsets_at(leader, topic, partition, at, origin)
            .await
        {
            Ok(o) => Ok(Some(o)),
            Err(e) if e.retryable() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The leader of a partition this node holds a follower replica of, as the replica knows
    /// it; `None` when this node leads it or no leader is known.
    async fn leader_elsewhere(&self, topic: &Topic, partition: u32) -> Option<NodeId> {
        let s = self.replica_state(topic, partition).await.ok()?;
        s.leader.filter(|l| !s.is_leader && *l != self.node_id())
    }

    /// A partition's offsets as node `node` answers them (relayed: it does not pass it on).
    async fn list_offsets_at(
        &self,
        node: NodeId,
        topic: &Topic,
        partition: u32,
        at: StartAt,
        origin: &Origin,
    ) -> Result<ListedOffsets> {
        let req = pb::ListOffsetsRequest {
            topic: topic.spec.name.clone(),
            partitions: vec![partition],
            position: Some(start_position(at)),
        };
        let r = self
            .call_peer(node, |mut c| {
                let mut call = self.relay(req, origin);
                call.set_timeout(LEADER_ASK_TIMEOUT);
                async move { c.list_offsets(call).await }
            })
            .await?;
        Self::listed(topic, partition, r)
    }

    /// The one partition's offsets out of a ListOffsets answer.
    fn listed(topic: &Topic, partition: u32, r: pb::ListOffsetsResponse) -> Result<ListedOffsets> {
        let p = r
            .partitions
            .into_iter()
            .find(|p| p.partition == partition)
            .ok_or_else(|| BrokerError::BadAnswer {
                node: topic
                    .replicas(partition)
                    .first()
                    .copied()
                    .unwrap_or_default(),
                what: format!(
                    "offsets of other partitions than {}/{partition}",
                    topic.name
                ),
            })?;
        Ok(ListedOffsets {
            start: Offset(p.start_offset),
            end: Offset(p.end_offset),
            offset: Offset(p.offset),
            follower_of: (p.leader != 0).then_some(NodeId(p.leader)),
        })
    }

    /// What this node's replica knows of a partition's group: one of its replicas or one it is
    /// moving to (a new replica catching up).
    pub async fn replica_state(&self, topic: &Topic, partition: u32) -> Result<ReplicaState> {
        if !topic.spec.holds(self.node_id(), partition) {
            return Err(self.no_replica(topic, partition));
        }
        let key = topic.key(partition);
        Ok(self
            .shards
            .ask(topic.core(partition), |reply| CoreRequest::Replica {
                key,
                reply,
            })
            .await?)
    }

    /// The states of this node's replicas of `topic`'s partitions, asked of each core once
    /// (a replica still opening is left out), those of partitions moving here included.
    pub async fn replica_states(&self, topic: &Topic) -> HashMap<u32, ReplicaState> {
        let me = self.node_id();
        let mut by_core: BTreeMap<CoreId, Vec<u32>> = BTreeMap::new();
        for p in (0..topic.spec.partitions).filter(|p| topic.spec.holds(me, *p)) {
            by_core.entry(topic.core(p)).or_default().push(p);
        }
        let mut asked = Vec::with_capacity(by_core.len());
        for (core, parts) in by_core {
            let keys = parts.iter().map(|p| topic.key(*p)).collect();
            match self
                .shards
                .submit(core, |reply| CoreRequest::Replicas { keys, reply })
                .await
            {
                Ok(answer) => asked.push((parts, answer)),
                Err(_) => continue,
            }
        }
        let mut out = HashMap::new();
        for (parts, answer) in asked {
            if let Ok(states) = answer.await {
                out.extend(
                    parts
                        .into_iter()
                        .zip(states)
                        .filter_map(|(p, s)| Some((p, s?))),
                );
            }
        }
        out
    }

    /// On a leader: each follower, how far behind it is, and whether it is in sync
    /// (`cluster::health`, with this node's election timeout). Empty on a follower.
    pub fn follower_lags(&self, s: &ReplicaState) -> Vec<(NodeId, FollowerLag, bool)> {
        let max_silence = crate::cluster::health::max_silence(Duration::from_millis(
            self.config.raft_election_timeout_ms,
        ));
        let last = s.last_index.map_or(0, |i| i.0);
        s.matched
            .iter()
            .map(|(node, m)| {
                let lag = FollowerLag {
                    matched: m.is_some(),
                    lag_entries: m.map_or(last + 1, |m| last.saturating_sub(m.0)),
                    silent_for: s
                        .heard
                        .iter()
                        .find(|(n, _)| n == node)
                        .and_then(|(_, d)| *d),
                };
                (*node, lag, lag.in_sync(max_silence))
            })
            .collect()
    }

    /// An error unless this node holds a replica of the partition.
    fn check_local(&self, topic: &Topic, partition: u32) -> Result<()> {
        if topic.on(self.node_id(), partition) {
            return Ok(());
        }
        Err(self.no_replica(topic, partition))
    }

    fn no_replica(&self, topic: &Topic, partition: u32) -> BrokerError {
        BrokerError::NoReplica {
            node: self.node_id(),
            topic: topic.spec.name.clone(),
            partition,
            replicas: topic.replicas(partition).to_vec(),
        }
    }
}

/// The committed, unexpired data records of a fetch, at most `max_records` of them and at most
/// `max_bytes` as encoded in a response (but always the first, however large: a record larger
/// than the budget comes alone); returns them and the offset where the next fetch continues.
/// Control records (Raft leader and membership entries) take offsets but are never delivered.
///
/// The log reads whole batches and a batch may hold a whole publish request (up to
/// `--max-request-bytes`), so this is where a response is held to what the client asked for:
/// a client with gRPC's default 4 MiB receive limit can read any batch record by record.
pub fn records(
    topic: &str,
    partition: u32,
    f: &Fetched,
    max_records: usize,
    max_bytes: usize,
) -> (Vec<pb::Record>, u64) {
    let now = crate::types::TimestampMs::now();
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut next = f.from;
    for batch in &f.batches {
        let control = batch.meta().control;
        for r in batch.records() {
            if r.offset < f.from || r.offset >= f.until {
                continue;
            }
            if out.len() >= max_records {
                return (out, next.0);
            }
            if control || r.is_expired(now) {
                next = r.offset.plus(1);
                continue;
            }
            let record = pb::Record {
                topic: topic.to_string(),
                partition,
                offset: r.offset.0,
                timestamp_ms: r.timestamp.0,
                key: r.key.map(|k| batch.bytes().slice_ref(k)),
                headers: r
                    .headers()
                    .map(|(k, v)| pb::Header {
                        key: k.to_string(),
                        value: batch.bytes().slice_ref(v),
                    })
                    .collect(),
                value: batch.bytes().slice_ref(r.value),
            };
            // As a repeated field: a tag byte, the length's varint, the message.
            let len = record.encoded_len();
            let size = 1 + prost::length_delimiter_len(len) + len;
            if !out.is_empty() && bytes + size > max_bytes {
                return (out, next.0);
            }
            bytes += size;
            next = r.offset.plus(1);
            out.push(record);
        }
    }
    (out, next.0)
}

/// The committed batches of a fetch as stored, control batches included, the first whole
/// however large and the others while they fit in `max_bytes`; and the offset where the next
/// fetch continues (the end of the last one).
/// A mirror replica's progress from its source, as the API shows it.
pub fn mirror_progress(m: &crate::shard::MirrorLag) -> pb::MirrorProgress {
    pb::MirrorProgress {
        source_end: m.source_end.0,
        lag_records: m.records,
        lag_ms: m.since_caught_up.as_millis() as u64,
        contact_ms: m.contact.map(|d| d.as_millis() as u64),
        error: m.error.clone().unwrap_or_default(),
        stopped: m.stopped,
        last_term: m.last.map_or(0, |l| l.0),
        last_index: m.last.map_or(0, |l| l.1),
        via: m.via.map_or(0, |n| n.0),
    }
}

pub fn raw_batches(f: &Fetched, max_bytes: usize) -> (Vec<bytes::Bytes>, u64) {
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut next = f.from;
    for b in &f.batches {
        let m = b.meta();
        if m.next_offset() <= f.from {
            continue;
        }
        if m.next_offset() > f.until || (!out.is_empty() && bytes + m.len > max_bytes) {
            break;
        }
        bytes += m.len;
        next = m.next_offset();
        out.push(b.bytes().clone());
    }
    (out, next.0)
}

/// A start position as the API spells it.
pub fn start_position(at: StartAt) -> pb::StartPosition {
    use pb::start_position::Position;
    let p = match at {
        StartAt::Earliest => Position::Earliest(true),
        StartAt::Latest => Position::Latest(true),
        StartAt::Offset(o) => Position::Offset(o.0),
        StartAt::Time(t) => Position::TimestampMs(t.0),
        StartAt::Last(n) => Position::Last(n),
    };
    pb::StartPosition { position: Some(p) }
}
