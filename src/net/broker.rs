//! The node's request logic on the network shard: topics, routing to the owning core, and
//! combining the cores' answers. gRPC types stay in `service.rs`; this speaks Tern's own types.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::Status;

use tonic::transport::Channel;

use super::status::{from_core, from_peer, leader_of, mark_unwritten, unwritten};
use crate::cluster::{ClusterState, TopicSpec};
use crate::config::Config;
use crate::log::Record;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_client::TernClient;
use crate::raft::transport::Transport;
use crate::raft::types::{Member, NodeId};
use crate::shard::placement::{core_for, partition_for_key};
use crate::shard::request::ReplicaState;
use crate::shard::{
    Appended, CoreError, CoreRequest, Fetched, ListedOffsets, PartitionKey, ProducerSeq,
    ReplicaSettings, Shards, StartAt,
};
use crate::types::Offset;

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

    /// The partition's replicas and the nodes it is moving to (one of which may lead already).
    pub fn replicas_and_targets(&self, partition: u32) -> Vec<NodeId> {
        let mut all = self.replicas(partition).to_vec();
        for n in self.spec.moving.get(&partition).into_iter().flatten() {
            if !all.contains(n) {
                all.push(*n);
            }
        }
        all
    }
}

/// What to read from a partition.
#[derive(Clone, Copy, Debug)]
pub struct Read {
    pub from: Offset,
    pub max_records: usize,
    pub max_bytes: usize,
    /// How long to wait for records when there are none past `from` yet.
    pub max_wait: Duration,
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
    /// Set when the node must stop on its own (it was removed from the cluster): why.
    fatal: tokio::sync::watch::Sender<Option<String>>,
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
pub fn relay<T>(msg: T) -> tonic::Request<T> {
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
            fatal: tokio::sync::watch::channel(None).0,
        });
        if let Some(t) = broker.transport() {
            // A peer that refuses this node as removed: stop.
            let mut removed = t.removed();
            let b = broker.clone();
            tokio::spawn(async move {
                if removed.wait_for(|r| *r).await.is_ok() {
                    b.stop_for(b.removed_message());
                }
            });
        }
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

    /// Asks the node to stop on its own, saying why (the first reason wins).
    pub fn stop_for(&self, why: String) {
        self.fatal.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            tracing::error!("{why}");
            *f = Some(why);
            true
        });
    }

    /// Resolves with the reason once the node must stop on its own.
    pub async fn must_stop(&self) -> String {
        let mut rx = self.fatal.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// What a node that was removed from the cluster says as it stops.
    pub fn removed_message(&self) -> String {
        format!(
            "node {id} was removed from the cluster (`tern cluster remove-node {id}`), so it \
             stops. A removed id cannot join again: to bring this machine back, delete its data \
             directory ({dir}) and start it with a new --node-id and --join HOST:PORT of a \
             member",
            id = self.node_id(),
            dir = self.config.data_dir.display()
        )
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
                // No replica here: to the partition's leader (the preferred one first).
                pending.push(Box::pin(async move {
                    let r = broker
                        .publish_elsewhere(&topic, p, recs, producer, None, forwarded)
                        .await;
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

    /// Publishes records of one partition where its leader is, waiting (bounded, two election
    /// timeouts) through an election or a dead leader: appends here if this node leads,
    /// otherwise forwards to the leader it learns of (from its own replica, from `hint`, or
    /// from the answers of the partition's other replicas, tried in turn while none is known
    /// or reachable).
    ///
    /// An attempt that wrote nothing (a refusal because the node does not lead, a connection
    /// that could not be made) is simply made again elsewhere. An attempt that may have
    /// written (the leader changed mid-write, a connection lost midway) is made again only for
    /// an idempotent producer, whose retries the leader deduplicates; anyone else gets the
    /// status and decides. A request forwarded to this node is not forwarded again: it is
    /// appended here or refused with the leader named, so a stale view cannot loop.
    async fn publish_elsewhere(
        &self,
        topic: &Topic,
        p: u32,
        records: Vec<Record>,
        producer: Option<ProducerSeq>,
        mut hint: Option<NodeId>,
        forwarded: bool,
    ) -> Result<Vec<Offset>, Status> {
        let me = self.node_id();
        let deadline = tokio::time::Instant::now() + self.leader_wait();
        let mut records = Some(records);
        let mut request: Option<pb::PublishRequest> = None;
        // Index into the replicas when asking them in turn.
        let mut turn = 0usize;
        // This node's replica refused although it named itself or no one as leader (it was
        // just removed from the group, or an election is on): ask the others.
        let mut local_stale = false;
        let mut last: Option<Status> = None;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| {
                    let mut s = Status::unavailable(format!(
                        "{}/{p} has no leader that this node could reach within {:?}; retry",
                        topic.name,
                        self.leader_wait()
                    ));
                    mark_unwritten(&mut s);
                    s
                }));
            }
            let target = match hint.take() {
                Some(l) if l == me && topic.on(me, p) => Some(me),
                Some(l) if l != me => Some(l),
                _ if topic.on(me, p) && !local_stale => {
                    match self.replica_state(topic, p).await.map(|s| s.leader) {
                        Ok(Some(l)) => Some(l),
                        _ => None,
                    }
                }
                _ => {
                    let others: Vec<NodeId> = topic
                        .replicas_and_targets(p)
                        .into_iter()
                        .filter(|n| *n != me)
                        .collect();
                    let next = others.get(turn % others.len().max(1)).copied();
                    turn += 1;
                    next
                }
            };
            let Some(target) = target else {
                // No leader known yet: an election is on.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            if target == me {
                let key = topic.key(p);
                let Some(recs) = records.take() else {
                    return Err(Status::internal("records lost on the way to the core"));
                };
                match self
                    .shards
                    .ask(topic.core(p), |reply| CoreRequest::Append {
                        key,
                        records: recs,
                        producer,
                        reply,
                    })
                    .await
                {
                    Ok(Appended::Done(ack)) => return Ok(ack.offsets),
                    Ok(Appended::NotLeader { leader, records: r }) => {
                        records = Some(r);
                        local_stale = leader.is_none_or(|l| l == me);
                        hint = leader.filter(|l| *l != me);
                        last = Some(from_core(CoreError::NotLeader { leader }));
                        if hint.is_none() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    Err(e) => return Err(from_core(e)),
                }
                continue;
            }
            if forwarded {
                // One hop only: send the caller to the leader this node knows.
                return Err(from_core(CoreError::NotLeader {
                    leader: Some(target),
                }));
            }
            let req = request.get_or_insert_with(|| {
                publish_request(
                    &topic.spec.name,
                    p,
                    records.as_deref().unwrap_or(&[]),
                    producer,
                )
            });
            let mut call = relay(req.clone());
            call.set_timeout(FORWARD_TIMEOUT);
            let answer = match self.peer_client(target) {
                Ok(mut c) => c.publish(call).await.map_err(|s| from_peer(target, s)),
                Err(s) => Err(s),
            };
            match answer {
                Ok(resp) => {
                    return Ok(resp
                        .into_inner()
                        .acks
                        .into_iter()
                        .map(|a| Offset(a.offset))
                        .collect())
                }
                Err(s) if unwritten(&s) || (producer.is_some() && retryable(&s)) => {
                    hint = leader_of(&s).filter(|l| *l != target);
                    if hint.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    last = Some(s);
                }
                Err(s) => return Err(s),
            }
        }
    }

    /// How long a publish waits for a partition without a leader to elect one: twice the
    /// election timeout (an election starts within 4/3 of it).
    fn leader_wait(&self) -> Duration {
        Duration::from_millis(self.config.raft_election_timeout_ms * 2)
    }

    /// Runs a read on a replica of a partition this node does not hold: the preferred replica
    /// first, then the others while they cannot serve it (unreachable, not open yet).
    pub async fn on_replica<T, F, Fut>(&self, topic: &Topic, p: u32, call: F) -> Result<T, Status>
    where
        F: Fn(TernClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let me = self.node_id();
        let mut last = None;
        for node in topic.replicas(p).iter().copied().filter(|n| *n != me) {
            let answer = match self.peer_client(node) {
                Ok(c) => call(c).await.map_err(|s| from_peer(node, s)),
                Err(s) => Err(s),
            };
            match answer {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == tonic::Code::Unavailable => last = Some(s),
                Err(s) => return Err(s),
            }
        }
        Err(last.unwrap_or_else(|| {
            Status::unavailable(format!(
                "no replica of {}/{p} can be reached from this node",
                topic.name
            ))
        }))
    }

    /// Committed batches of a partition this node holds, from its core.
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

    /// Committed records of a partition, at most `max_records`, from this node's replica or
    /// (once: a `relayed` read is not passed on) from another replica.
    pub async fn read(
        &self,
        topic: &Topic,
        partition: u32,
        read: Read,
        relayed: bool,
    ) -> Result<pb::FetchResponse, Status> {
        if topic.on(self.node_id(), partition) {
            let f = self
                .fetch(topic, partition, read.from, read.max_bytes, read.max_wait)
                .await?;
            let (records, next) =
                super::convert::records(&topic.spec.name, partition, &f, read.max_records);
            return Ok(pb::FetchResponse {
                records,
                next_offset: next,
                high_watermark: f.high_watermark.0,
                start_offset: f.start.0,
            });
        }
        if relayed {
            return Err(self.no_replica(topic, partition));
        }
        let req = pb::FetchRequest {
            topic: topic.spec.name.clone(),
            partition,
            offset: read.from.0,
            max_records: read.max_records as u32,
            max_bytes: read.max_bytes as u32,
            max_wait_ms: read.max_wait.as_millis() as u32,
        };
        self.on_replica(topic, partition, |mut c| {
            let mut call = relay(req.clone());
            call.set_timeout(read.max_wait + FORWARD_TIMEOUT);
            async move { c.fetch(call).await.map(|r| r.into_inner()) }
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
        relayed: bool,
    ) -> Result<ListedOffsets, Status> {
        if topic.on(self.node_id(), partition) {
            let key = topic.key(partition);
            return self
                .shards
                .ask(topic.core(partition), |reply| CoreRequest::ListOffsets {
                    key,
                    at,
                    reply,
                })
                .await
                .map_err(from_core);
        }
        if relayed {
            return Err(self.no_replica(topic, partition));
        }
        let req = pb::ListOffsetsRequest {
            topic: topic.spec.name.clone(),
            partitions: vec![partition],
            position: Some(super::convert::start_position(at)),
        };
        let r = self
            .on_replica(topic, partition, |mut c| {
                let call = relay(req.clone());
                async move { c.list_offsets(call).await.map(|r| r.into_inner()) }
            })
            .await?;
        let p = r
            .partitions
            .into_iter()
            .find(|p| p.partition == partition)
            .ok_or_else(|| Status::internal("a replica answered for other partitions"))?;
        Ok(ListedOffsets {
            start: Offset(p.start_offset),
            end: Offset(p.end_offset),
            offset: Offset(p.offset),
        })
    }

    /// UNAVAILABLE unless this node holds a replica of the partition.
    fn check_local(&self, topic: &Topic, partition: u32) -> Result<(), Status> {
        if topic.on(self.node_id(), partition) {
            return Ok(());
        }
        Err(self.no_replica(topic, partition))
    }

    fn no_replica(&self, topic: &Topic, partition: u32) -> Status {
        let mut s = Status::unavailable(format!(
            "node {} holds no replica of {}/{partition} (its replicas are on nodes {:?}); retry",
            self.node_id(),
            topic.name,
            topic.replicas(partition)
        ));
        mark_unwritten(&mut s);
        s
    }

    /// The metadata group's leader as this node knows it.
    /// A leader cut off from a majority keeps believing it leads (openraft does not step
    /// down): this node counts itself only while a quorum acknowledged it within an election
    /// timeout.
    pub async fn metadata_leader(&self) -> Option<NodeId> {
        let s = self.metadata_replica().await?;
        if s.is_leader && !self.quorum_fresh(&s) {
            return None;
        }
        s.leader
    }

    fn quorum_fresh(&self, s: &ReplicaState) -> bool {
        let fresh = Duration::from_millis(self.config.raft_election_timeout_ms);
        s.voters.len() <= 1 || s.quorum_acked.is_some_and(|a| a < fresh)
    }

    /// Waits (two election timeouts at most) until the metadata group has a leader and this
    /// node has caught up with the metadata; UNAVAILABLE saying what is missing otherwise.
    pub async fn wait_metadata_leader(&self) -> Result<NodeId, Status> {
        let deadline = tokio::time::Instant::now() + self.leader_wait();
        loop {
            if let Some(l) = self.metadata_leader().await.filter(|_| self.is_ready()) {
                return Ok(l);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.no_metadata_leader().await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// UNAVAILABLE saying why there is no metadata leader, as far as this node can tell.
    pub async fn no_metadata_leader(&self) -> Status {
        let me = self.node_id();
        let mut voters: Vec<NodeId> = self
            .metadata_replica()
            .await
            .map(|m| m.voters)
            .unwrap_or_default();
        if voters.is_empty() {
            voters = self.controllers.keys().copied().collect();
        }
        let list = |ids: &[NodeId]| {
            ids.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = if self.metadata_leader().await.is_some() {
            Status::unavailable(format!(
                "node {me} is still catching up with the cluster metadata (it just started or \
                 joined); retry"
            ))
        } else {
            let unreachable: Vec<NodeId> = voters
                .iter()
                .copied()
                .filter(|n| *n != me)
                .filter(|n| {
                    self.transport()
                        .is_some_and(|t| t.reachable(*n) != Some(true))
                })
                .collect();
            let reach = if unreachable.is_empty() {
                String::new()
            } else {
                format!("; node {me} cannot reach nodes {}", list(&unreachable))
            };
            Status::unavailable(format!(
                "the cluster has no metadata leader: its controllers (nodes {}) elect one once a \
                 majority of them is up and they reach each other{reach}. Start the missing \
                 nodes, or wait for them with `tern cluster wait`",
                list(&voters)
            ))
        };
        mark_unwritten(&mut s);
        s
    }

    /// Whether this node has caught up with the metadata since it started and serves.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// What this node's replica of the metadata group knows of it.
    pub async fn metadata_replica(&self) -> Option<ReplicaState> {
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
        s.is_leader && self.quorum_fresh(&s)
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
}

/// How long a forwarded publish may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// The forwarded form of one partition's records (routed to that partition).
fn publish_request(
    topic: &str,
    partition: u32,
    records: &[Record],
    producer: Option<ProducerSeq>,
) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.to_string(),
        records: records
            .iter()
            .map(|r| pb::PublishRecord {
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r
                    .headers
                    .iter()
                    .map(|h| pb::Header {
                        key: h.name.clone(),
                        value: h.value.clone(),
                    })
                    .collect(),
                partition: Some(partition),
                expiry_seconds: r.ttl_ms.map(|ms| ms.div_ceil(1000) as u32),
            })
            .collect(),
        request_id: 0,
        producer_id: producer.map_or(0, |p| p.id.0 as u64),
        sequence: producer.map_or(0, |p| p.first.0 as u32),
    }
}

/// Whether a failed call may succeed when made again (for callers whose retries are safe).
pub fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::ResourceExhausted
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
    )
}
