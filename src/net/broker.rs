//! The node's request logic on the network shard: topics, routing to the owning core, and
//! combining the cores' answers. gRPC types stay in `service.rs`; this speaks Tern's own types.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::Status;

use tonic::transport::Channel;

use super::status::from_core;
use crate::cluster::{ClusterState, TopicSpec};
use crate::config::Config;
use crate::log::{Positions, Record};
use crate::proto::v1 as pb;
use crate::proto::v1::tern_client::TernClient;
use crate::raft::transport::Transport;
use crate::raft::types::{Member, NodeId};
use crate::shard::placement::{core_for, partition_for_key};
use crate::shard::request::ReplicaState;
use crate::shard::{
    Appended, CoreError, CoreRequest, Fetched, PartitionKey, ProducerSeq, ReplicaSettings, Shards,
};
use crate::types::{Offset, TimestampMs};

/// A topic as the network shard sees it.
pub struct Topic {
    pub spec: TopicSpec,
    pub name: Arc<str>,
    /// Cores of this node: where a partition's replica lives if this node holds one.
    cores: usize,
    /// Round-robin position for records without key or partition.
    next: AtomicU32,
}

impl Topic {
    fn new(spec: TopicSpec, cores: usize) -> Topic {
        Topic {
            name: spec.name.clone().into(),
            spec,
            cores,
            next: AtomicU32::new(0),
        }
    }

    pub fn key(&self, partition: u32) -> PartitionKey {
        PartitionKey {
            topic: self.name.clone(),
            partition,
        }
    }

    /// NOT_FOUND unless `partition` exists.
    pub fn check_partition(&self, partition: u32) -> Result<(), Status> {
        if partition < self.spec.partitions {
            return Ok(());
        }
        Err(Status::not_found(format!(
            "partition {partition} does not exist; topic {:?} has partitions 0 to {}",
            self.spec.name,
            self.spec.partitions - 1
        )))
    }

    /// The core that holds `partition` on this node (if this node holds it).
    pub fn core(&self, partition: u32) -> u32 {
        core_for(&self.spec.name, partition, self.cores).0
    }

    pub fn replicas(&self, partition: u32) -> &[NodeId] {
        self.spec
            .replicas
            .get(partition as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// Whether `node` holds a replica of `partition`.
    pub fn on(&self, node: NodeId, partition: u32) -> bool {
        self.replicas(partition).contains(&node)
    }
}

/// A record to publish, with its routing decided by the caller or not.
pub struct Outgoing {
    pub partition: Option<u32>,
    pub record: Record,
}

pub struct Broker {
    pub config: Config,
    pub shards: Shards,
    /// This node's identity in the partitions' Raft groups, and its transport to peers.
    pub(super) replica: ReplicaSettings,
    /// The metadata group's voters (id → address); just this node when it runs alone.
    pub(super) controllers: BTreeMap<NodeId, String>,
    /// The cluster metadata as last applied here, and the topics derived from it.
    pub(super) state: RwLock<Arc<ClusterState>>,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Offset in the metadata log up to which commands are applied here.
    pub(super) applied: tokio::sync::watch::Sender<u64>,
    /// Connections to other nodes (forwarding, metadata proposals), by node, with the address
    /// each was made for.
    peers: std::sync::Mutex<HashMap<NodeId, (String, Channel)>>,
    /// Whether this node has caught up with the metadata once since it started (until then a
    /// topic it does not know may exist: UNAVAILABLE, not NOT_FOUND).
    pub(super) ready: std::sync::atomic::AtomicBool,
    /// Serializes this node's metadata proposals (so checks and proposals do not interleave).
    pub(super) admin: tokio::sync::Mutex<()>,
    /// Set when the node starts shutting down; long-lived calls (subscriptions) end on it.
    closing: tokio::sync::watch::Sender<bool>,
    /// Calls being served (not counting subscriptions), so shutdown can wait for them.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The consumer and queue groups this node coordinates (as the metadata leader).
    pub(super) groups: super::groups::Groups,
}

/// Counts one call as in flight until dropped.
pub struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Metadata a forwarded request carries, so it is not forwarded again.
pub const FORWARDED: &str = "tern-forwarded";

/// A request a node forwards to another: marked, so that one does not forward it again.
pub fn forwarded<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r
}

impl Broker {
    /// Opens the metadata group and starts following it. A node that runs alone has replayed
    /// the metadata and opened every partition when this returns; a node of a cluster does
    /// that in the background (its peers need it to serve first).
    pub async fn start(
        config: Config,
        shards: Shards,
        advertised: String,
        transport: Option<Arc<Transport>>,
    ) -> anyhow::Result<Arc<Broker>> {
        let me = config.node_id;
        let member = Member {
            addr: advertised.clone(),
            region: config.region.clone(),
            zone: config.zone.clone(),
        };
        let replica = ReplicaSettings {
            node_id: me,
            member: member.clone(),
            timing: config.raft_timing(),
            transport,
        };
        // A node joining a running cluster starts knowing no controller: it learns the
        // members from the metadata log once the leader brings it in.
        let controllers: BTreeMap<NodeId, String> = if !config.peers.is_empty() {
            config.peer_map()?
        } else if config.join.is_empty() {
            BTreeMap::from([(me, advertised.clone())])
        } else {
            BTreeMap::new()
        };
        let broker = Arc::new(Broker {
            config,
            shards,
            replica,
            controllers,
            state: RwLock::new(Arc::new(ClusterState::default())),
            topics: RwLock::new(HashMap::new()),
            applied: tokio::sync::watch::channel(0).0,
            peers: std::sync::Mutex::new(HashMap::new()),
            ready: std::sync::atomic::AtomicBool::new(false),
            admin: tokio::sync::Mutex::new(()),
            closing: tokio::sync::watch::channel(false).0,
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            groups: Default::default(),
        });
        super::controller::start(broker.clone(), member).await?;
        Ok(broker)
    }

    pub fn node_id(&self) -> NodeId {
        self.replica.node_id
    }

    /// Whether this node runs without peers.
    pub fn alone(&self) -> bool {
        self.transport().is_none()
    }

    /// The transport to other nodes; `None` when this node runs alone.
    pub fn transport(&self) -> Option<&Arc<Transport>> {
        self.replica.transport.as_ref()
    }

    pub fn cluster(&self) -> Arc<ClusterState> {
        self.state.read().expect("state lock").clone()
    }

    /// Replaces the topics with those of `state` (keeping the `Topic` of an unchanged one).
    pub(super) fn set_state(&self, state: Arc<ClusterState>) {
        if let Some(t) = self.transport() {
            t.set_addresses(
                state
                    .nodes
                    .iter()
                    .map(|(id, m)| (*id, m.addr.clone()))
                    .collect(),
            );
        }
        let n = self.shards.core_count();
        let mut topics = self.topics.write().expect("topic map lock");
        let mut next = HashMap::with_capacity(state.topics.len());
        for (name, spec) in &state.topics {
            let t = match topics.remove(name) {
                Some(t) if t.spec == *spec => t,
                _ => Arc::new(Topic::new(spec.clone(), n)),
            };
            next.insert(name.clone(), t);
        }
        *topics = next;
        *self.state.write().expect("state lock") = state;
    }

    pub(super) fn partition_dir(&self, spec: &TopicSpec, partition: u32) -> PathBuf {
        self.config
            .data_dir
            .join("topics")
            .join(spec.dir_name())
            .join(partition.to_string())
    }

    /// A connection to another node, made lazily and reused.
    pub(super) fn peer_channel(&self, node: NodeId) -> Result<Channel, Status> {
        let addr = self
            .cluster()
            .nodes
            .get(&node)
            .map(|m| m.addr.clone())
            .or_else(|| self.controllers.get(&node).cloned())
            .ok_or_else(|| Status::unavailable(format!("node {node} has no known address")))?;
        let mut peers = self.peers.lock().expect("peers lock");
        if let Some((a, c)) = peers.get(&node) {
            if *a == addr {
                return Ok(c.clone());
            }
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(format!("address of node {node}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        peers.insert(node, (addr, channel.clone()));
        Ok(channel)
    }

    /// A client of another node's public API (forwarding).
    pub(super) fn peer_client(&self, node: NodeId) -> Result<TernClient<Channel>, Status> {
        Ok(TernClient::new(self.peer_channel(node)?)
            .max_decoding_message_size(self.config.max_request_bytes.max(32 << 20))
            .max_encoding_message_size(self.config.max_request_bytes))
    }

    /// Marks a call in flight for as long as the guard lives.
    pub fn track(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    /// Waits until no call is in flight, or `grace` has passed; returns whether all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while self.in_flight.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Tells long-lived calls to end: the node is shutting down.
    pub fn begin_shutdown(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once the node starts shutting down.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// The topic named `name`: INVALID_ARGUMENT for a malformed name, NOT_FOUND for none.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, Status> {
        super::validate::topic_name(name)?;
        self.topics
            .read()
            .expect("topic map lock")
            .get(name)
            .cloned()
            .ok_or_else(|| {
                if self.ready.load(Ordering::Acquire) {
                    Status::not_found(format!("topic {name:?} does not exist"))
                } else {
                    Status::unavailable(
                        "this node is still loading the cluster metadata (it just started); retry",
                    )
                }
            })
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self
            .topics
            .read()
            .expect("topic map lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Routes records to their partitions and returns the pending answer: (partition, offset)
    /// per record, in request order. Each record goes to its explicit partition, else the hash
    /// of its key, else round robin; records for one partition keep their order and become one
    /// batch. Requests submitted one after another are appended in that order per partition
    /// (what PublishStream relies on) while leadership stays put.
    ///
    /// A partition led by another node is forwarded to it (once: a `forwarded` request is
    /// answered UNAVAILABLE with the leader instead, so a stale view cannot loop).
    ///
    /// An idempotent `producer`'s records all go to one partition (see `validate::producer`).
    pub async fn submit(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        records: Vec<Outgoing>,
        producer: Option<ProducerSeq>,
        forwarded: bool,
    ) -> Result<impl std::future::Future<Output = Result<Vec<(u32, Offset)>, Status>> + use<>, Status>
    {
        let n = topic.spec.partitions;
        let mut groups: Vec<(u32, Vec<usize>, Vec<Record>)> = Vec::new();
        let mut routes = Vec::with_capacity(records.len());
        let rr = topic.next.fetch_add(1, Ordering::Relaxed) % n;
        for (i, out) in records.into_iter().enumerate() {
            let p = match (out.partition, &out.record.key) {
                (Some(p), _) => p,
                (None, Some(k)) => partition_for_key(k, n),
                // Keyless records of one request stay together (one batch); successive
                // requests rotate over the partitions.
                (None, None) => rr,
            };
            let g = match groups.iter().position(|g| g.0 == p) {
                Some(g) => g,
                None => {
                    groups.push((p, Vec::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].1.push(i);
            groups[g].2.push(out.record);
            routes.push(p);
        }
        let me = self.node_id();
        let mut pending: Vec<futures::future::BoxFuture<'static, _>> =
            Vec::with_capacity(groups.len());
        for (p, idx, recs) in groups {
            let broker = self.clone();
            let topic = topic.clone();
            if !topic.on(me, p) {
                // No replica here: straight to the partition's (preferred) leader.
                let target = topic.replicas(p).first().copied();
                pending.push(Box::pin(async move {
                    let r = match target {
                        Some(t) if !forwarded => {
                            broker
                                .forward_publish(t, &topic.name, p, recs, producer)
                                .await
                        }
                        _ => Err(Status::unavailable(format!(
                            "this node holds no replica of {}/{p}",
                            topic.name
                        ))),
                    };
                    (idx, r)
                }));
                continue;
            }
            let key = topic.key(p);
            let answer = self
                .shards
                .submit(topic.core(p), move |reply| CoreRequest::Append {
                    key,
                    records: recs,
                    producer,
                    reply,
                })
                .await
                .map_err(from_core)?;
            pending.push(Box::pin(async move {
                let r = match answer.await {
                    Ok(Appended::Done(ack)) => Ok(ack.offsets),
                    // A node alone leads all its partitions: this is the moment of its start.
                    Ok(Appended::NotLeader { leader, .. }) if broker.alone() => {
                        Err(from_core(CoreError::NotLeader { leader }))
                    }
                    Ok(Appended::NotLeader { leader, records }) => {
                        broker
                            .publish_elsewhere(&topic, p, records, producer, leader, forwarded)
                            .await
                    }
                    Err(e) => Err(from_core(e)),
                };
                (idx, r)
            }));
        }
        Ok(async move {
            let mut out = vec![(0u32, Offset(0)); routes.len()];
            for (idx, ack) in futures::future::join_all(pending).await {
                let offsets = ack?;
                if offsets.len() != idx.len() {
                    return Err(Status::internal(
                        "the leader acknowledged a different count",
                    ));
                }
                for (i, off) in idx.into_iter().zip(offsets) {
                    out[i] = (routes[i], off);
                }
            }
            Ok(out)
        })
    }

    /// Publishes records that this node's replica refused, unwritten, because it does not
    /// lead: forwards them to the leader, or, while there is none (an election), waits for one
    /// (bounded) and goes again. Nothing was written by a refused attempt, so going again
    /// cannot duplicate.
    async fn publish_elsewhere(
        &self,
        topic: &Topic,
        p: u32,
        mut records: Vec<Record>,
        producer: Option<ProducerSeq>,
        mut leader: Option<NodeId>,
        forwarded: bool,
    ) -> Result<Vec<Offset>, Status> {
        let me = self.node_id();
        let deadline = tokio::time::Instant::now() + self.leader_wait();
        loop {
            match leader {
                Some(l) if l != me && !forwarded => {
                    return self
                        .forward_publish(l, &topic.spec.name, p, records, producer)
                        .await
                }
                Some(l) if l != me => return Err(from_core(CoreError::NotLeader { leader })),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(from_core(CoreError::NotLeader { leader }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            leader = self.replica_state(topic, p).await?.leader;
            if leader != Some(me) {
                continue;
            }
            // This node leads now: append here.
            let key = topic.key(p);
            match self
                .shards
                .ask(topic.core(p), |reply| CoreRequest::Append {
                    key,
                    records,
                    producer,
                    reply,
                })
                .await
            {
                Ok(Appended::Done(ack)) => return Ok(ack.offsets),
                Ok(Appended::NotLeader {
                    leader: l,
                    records: r,
                }) => {
                    leader = l;
                    records = r;
                }
                Err(e) => return Err(from_core(e)),
            }
        }
    }

    /// How long a publish waits for a partition without a leader to elect one: twice the
    /// election timeout (an election starts within 4/3 of it).
    fn leader_wait(&self) -> Duration {
        Duration::from_millis(self.config.raft_election_timeout_ms * 2)
    }

    /// Publishes records of one partition through node `to` (its leader, as far as we know).
    /// If that node names another leader, tries that one once more.
    async fn forward_publish(
        &self,
        to: NodeId,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
        producer: Option<ProducerSeq>,
    ) -> Result<Vec<Offset>, Status> {
        let req = pb::PublishRequest {
            topic: topic.to_string(),
            records: records
                .into_iter()
                .map(|r| pb::PublishRecord {
                    key: r.key,
                    value: r.value,
                    headers: r
                        .headers
                        .into_iter()
                        .map(|h| pb::Header {
                            key: h.name,
                            value: h.value,
                        })
                        .collect(),
                    partition: Some(partition),
                    expiry_seconds: r.ttl_ms.map(|ms| ms.div_ceil(1000) as u32),
                })
                .collect(),
            request_id: 0,
            producer_id: producer.map_or(0, |p| p.id.0 as u64),
            sequence: producer.map_or(0, |p| p.first.0 as u32),
        };
        let mut target = to;
        for attempt in 0..2 {
            let mut request = forwarded(req.clone());
            request.set_timeout(FORWARD_TIMEOUT);
            match self.peer_client(target)?.publish(request).await {
                Ok(resp) => {
                    return Ok(resp
                        .into_inner()
                        .acks
                        .into_iter()
                        .map(|a| Offset(a.offset))
                        .collect())
                }
                Err(s) => {
                    let next = leader_of(&s);
                    match next {
                        Some(l) if attempt == 0 && l != target && l != self.node_id() => target = l,
                        _ => return Err(s),
                    }
                }
            }
        }
        Err(Status::unavailable("no leader reachable"))
    }

    pub async fn fetch(
        &self,
        topic: &Topic,
        partition: u32,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<Fetched, Status> {
        self.check_local(topic, partition)?;
        let key = topic.key(partition);
        self.shards
            .ask(topic.core(partition), |reply| CoreRequest::Fetch {
                key,
                from,
                max_bytes,
                max_wait,
                reply,
            })
            .await
            .map_err(from_core)
    }

    pub async fn positions(&self, topic: &Topic, partition: u32) -> Result<Positions, Status> {
        Ok(self.replica_state(topic, partition).await?.positions)
    }

    /// UNAVAILABLE unless this node holds a replica of the partition (reads are served by
    /// replicas; see `service.rs` for forwarding).
    fn check_local(&self, topic: &Topic, partition: u32) -> Result<(), Status> {
        if topic.on(self.node_id(), partition) {
            return Ok(());
        }
        Err(Status::unavailable(format!(
            "this node holds no replica of {}/{partition}; its replicas are on nodes {:?}",
            topic.name,
            topic.replicas(partition)
        )))
    }

    /// The metadata group's leader as this node knows it.
    pub async fn metadata_leader(&self) -> Option<NodeId> {
        self.metadata_replica().await.and_then(|s| s.leader)
    }

    /// What this node's replica of the metadata group knows of it.
    async fn metadata_replica(&self) -> Option<ReplicaState> {
        let key = PartitionKey::metadata();
        self.shards
            .ask(self.shards.core_of(&key), |reply| CoreRequest::Replica {
                key,
                reply,
            })
            .await
            .ok()
    }

    /// Whether this node leads the metadata group and a quorum acknowledged it within an
    /// election timeout (a leader cut off from the others would otherwise go on coordinating
    /// groups next to the new leader).
    pub async fn coordinates(&self) -> bool {
        let Some(s) = self.metadata_replica().await else {
            return false;
        };
        let fresh = Duration::from_millis(self.config.raft_election_timeout_ms);
        s.is_leader && (s.voters.len() <= 1 || s.quorum_acked.is_some_and(|a| a < fresh))
    }

    /// What this node's replica knows of a partition's group.
    pub async fn replica_state(
        &self,
        topic: &Topic,
        partition: u32,
    ) -> Result<ReplicaState, Status> {
        self.check_local(topic, partition)?;
        let key = topic.key(partition);
        self.shards
            .ask(topic.core(partition), |reply| CoreRequest::Replica {
                key,
                reply,
            })
            .await
            .map_err(from_core)
    }

    pub async fn offset_for_timestamp(
        &self,
        topic: &Topic,
        partition: u32,
        timestamp: TimestampMs,
    ) -> Result<Option<Offset>, Status> {
        self.check_local(topic, partition)?;
        let key = topic.key(partition);
        self.shards
            .ask(topic.core(partition), |reply| {
                CoreRequest::OffsetForTimestamp {
                    key,
                    timestamp,
                    reply,
                }
            })
            .await
            .map_err(from_core)
    }
}

/// How long a forwarded publish may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// The leader a status names (metadata `tern-leader`), if any.
pub fn leader_of(s: &Status) -> Option<NodeId> {
    s.metadata()
        .get("tern-leader")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}
