//! The metadata controller, seen from one node: proposes metadata commands to the metadata
//! Raft group, follows its committed log, and reconciles the node's partitions with it.
//!
//! ```text
//! CreateTopic (any node) ── propose ──▶ metadata leader (local core 0, or Peer.Propose to it)
//!                                        │ committed by a quorum of controllers
//! every node: follower ── long-poll Fetch on the metadata log ──▶ ClusterState.apply
//!                                        └─▶ reconcile: open / close partitions on its cores
//! ```
//!
//! The metadata group is an ordinary partition (key [`PartitionKey::metadata`], on core 0)
//! whose records are JSON commands; every node replays them into the same state.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::Status;

use super::broker::{Broker, Topic};
use super::status::from_core;
use crate::cluster::{assign_replicas, ClusterState, Command, TopicSettings, TopicSpec};
use crate::log::Record;
use crate::proto::internal as ipb;
use crate::raft::types::{Member, NodeId};
use crate::shard::request::OpenPartition;
use crate::shard::{CoreError, CoreRequest, PartitionKey};
use crate::types::{Offset, TimestampMs};

/// How long a proposal waits to be applied on this node.
const APPLY_WAIT: Duration = Duration::from_secs(15);
/// How long the follower's long poll waits; also how often failed opens are retried.
const FOLLOW_WAIT: Duration = Duration::from_secs(1);
/// When a node that cannot register yet first says why, and how often after that.
const REPORT_FIRST: Duration = Duration::from_secs(5);
const REPORT_EVERY: Duration = Duration::from_secs(15);

fn meta_settings() -> TopicSettings {
    TopicSettings {
        retention_ms: None,
        retention_bytes: None,
        fsync_interval_ms: None,
        max_record_bytes: crate::cluster::COMMAND_MAX_BYTES as u32,
        segment_bytes: 64 << 20,
    }
}

/// Opens the metadata group, starts the follower, and registers this node. A node running
/// alone returns once it has replayed the metadata and opened its partitions.
pub async fn start(broker: Arc<Broker>, member: Member) -> anyhow::Result<()> {
    let voters: BTreeMap<NodeId, Member> = broker
        .controllers
        .iter()
        .map(|(id, addr)| {
            // Every controller initializes the group with the same membership, so it holds
            // only what every node knows from its flags: ids and addresses.
            let m = if broker.alone() {
                member.clone()
            } else {
                Member {
                    addr: addr.clone(),
                    ..Member::default()
                }
            };
            (*id, m)
        })
        .collect();
    let dir = broker.config.data_dir.join("metadata");
    let key = PartitionKey::metadata();
    let meta_core = broker.shards.core_of(&key);
    let replica = broker.replica.clone();
    broker
        .shards
        .ask(meta_core, |reply| CoreRequest::Open {
            open: Box::new(OpenPartition {
                key: key.clone(),
                uid: 0,
                dir,
                config: broker.config.log_config(&meta_settings()),
                replica,
                voters,
            }),
            reply,
        })
        .await
        .map_err(|e| anyhow::anyhow!("opening the metadata group: {e}"))?;
    let mut follower = Follower {
        broker: broker.clone(),
        state: ClusterState::default(),
        next: Offset(0),
        open: HashMap::new(),
        failed: false,
    };
    super::reassign::spawn(broker.clone());
    if broker.alone() {
        // Everything in the log is committed once this node leads: replay all of it now.
        let end = broker
            .shards
            .ask(meta_core, |reply| CoreRequest::Positions { key, reply })
            .await
            .map_err(|e| anyhow::anyhow!("metadata positions: {e}"))?
            .committed;
        while follower.next < end {
            follower
                .step(Duration::ZERO)
                .await
                .map_err(|e| anyhow::anyhow!("replaying the metadata: {}", e.message()))?;
        }
        anyhow::ensure!(
            !follower.failed,
            "some partitions could not be opened (see the log above)"
        );
        tokio::spawn(follower.run());
        register(&broker, &member)
            .await
            .map_err(|e| anyhow::anyhow!("registering this node: {}", e.message()))?;
    } else {
        tokio::spawn(follower.run());
        let b = broker.clone();
        tokio::spawn(async move {
            // Retry until the metadata group has a leader that accepts the registration, and
            // say what it waits for now and then.
            let mut closing = b.closing();
            let started = tokio::time::Instant::now();
            let mut next_report = started + REPORT_FIRST;
            loop {
                match register(&b, &member).await {
                    Ok(()) => break,
                    Err(e) if super::status::is_removed(&e) => {
                        b.stop_for(b.removed_message());
                        return;
                    }
                    Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                        tracing::error!(error = %e.message(), "this node cannot register");
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e.message(), "registration not done yet");
                        if tokio::time::Instant::now() >= next_report {
                            next_report += REPORT_EVERY;
                            let why = match b.metadata_leader().await {
                                None => b.no_metadata_leader().await.message().to_string(),
                                Some(l) => format!(
                                    "the metadata leader (node {l}) answered: {}",
                                    e.message()
                                ),
                            };
                            tracing::info!(
                                waited_s = started.elapsed().as_secs(),
                                "waiting to register in the cluster metadata: {why}"
                            );
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = async { let _ = closing.wait_for(|c| *c).await; } => return,
                }
            }
            tracing::info!("this node is registered in the cluster metadata");
        });
    }
    Ok(())
}

/// Records this node's address and labels in the metadata, unless they are there already. A
/// node joining a cluster, which knows no metadata leader yet, sends its registration through
/// the member it was told to join; once registered, the metadata leader makes it a learner of
/// the metadata group and it receives the metadata log.
async fn register(broker: &Arc<Broker>, member: &Member) -> Result<(), Status> {
    let me = broker.node_id();
    let removed = || {
        Status::failed_precondition(format!(
            "node {me} was removed from the cluster; a removed node id cannot join again"
        ))
    };
    let state = broker.cluster();
    if state.removed.contains(&me) {
        return Err(removed());
    }
    if state.nodes.get(&me) == Some(member) {
        return Ok(());
    }
    let cmd = Command::RegisterNode {
        id: me,
        member: member.clone(),
    };
    // A joined node that restarts may know a leader (from its vote) but no address for it
    // (its metadata replica catches up only once the leader reaches it, which may need this
    // very registration if its address changed): then it goes through the join address.
    let join = &broker.config.join;
    let direct = match broker.metadata_leader().await {
        Some(_) => propose(broker, &cmd).await,
        None => Err(Status::unavailable("no metadata leader known")),
    };
    let at = match direct {
        Ok(at) => at,
        Err(e) if super::status::is_removed(&e) => return Err(e),
        Err(e) => {
            // Through the member it was told to join, or any other controller.
            let via: Vec<String> = if !join.is_empty() {
                vec![join.clone()]
            } else {
                broker
                    .controllers
                    .iter()
                    .filter(|(id, _)| **id != me)
                    .map(|(_, a)| a.clone())
                    .collect()
            };
            let mut last = e;
            let mut done = None;
            for addr in via {
                match propose_through(broker, &addr, &cmd).await {
                    Ok(at) => {
                        done = Some(at);
                        break;
                    }
                    Err(e) if super::status::is_removed(&e) => return Err(e),
                    Err(e) => last = e,
                }
            }
            done.ok_or(last)?
        }
    };
    wait_applied(broker, at).await?;
    if broker.cluster().removed.contains(&me) {
        return Err(removed());
    }
    Ok(())
}

/// Sends a command to the member at `addr`, which proposes it or passes it to the leader.
async fn propose_through(broker: &Broker, addr: &str, cmd: &Command) -> Result<Offset, Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::invalid_argument(format!("join address {addr:?}: {e}")))?
        .connect_timeout(Duration::from_secs(2));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("joining through {addr}: {e}")))?;
    let mut client = ipb::peer_client::PeerClient::new(channel);
    let mut req = tonic::Request::new(ipb::ProposeRequest {
        from: broker.node_id(),
        command: Bytes::from(cmd.encode()),
        forwarded: false,
    });
    req.set_timeout(APPLY_WAIT);
    Ok(Offset(client.propose(req).await?.into_inner().offset))
}

/// Appends a command to the metadata log through its leader; returns its offset. While the
/// metadata group has no leader (an election), waits up to two election timeouts for one:
/// nothing was written, so going again is safe.
pub async fn propose(broker: &Arc<Broker>, cmd: &Command) -> Result<Offset, Status> {
    cmd.validate().map_err(super::status::from_cluster)?;
    let wait = Duration::from_millis(2 * broker.config.raft_election_timeout_ms);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match propose_once(broker, cmd).await {
            Err(CoreError::NotLeader { leader: None })
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(CoreError::NotLeader { leader: None }) => {
                return Err(broker.no_metadata_leader().await)
            }
            Err(e) => return Err(from_core(e)),
            Ok(Ok(at)) => return Ok(at),
            Ok(Err(status)) => return Err(status),
        }
    }
}

/// One attempt: proposes here if this node leads, else forwards to the leader it knows. A core
/// error says nothing was written (retry is safe); a status is the forwarded call's answer.
async fn propose_once(
    broker: &Arc<Broker>,
    cmd: &Command,
) -> Result<Result<Offset, Status>, CoreError> {
    match propose_local(broker, cmd).await {
        Err(CoreError::NotLeader { leader }) => {
            let Some(l) = leader.filter(|l| *l != broker.node_id()) else {
                return Err(CoreError::NotLeader { leader: None });
            };
            Ok(forward_proposal(broker, l, cmd).await)
        }
        Ok(at) => Ok(Ok(at)),
        Err(e) => Ok(Err(from_core(e))),
    }
}

/// Appends a command to the metadata log if this node leads the metadata group.
pub async fn propose_local(broker: &Broker, cmd: &Command) -> Result<Offset, CoreError> {
    let record = Record {
        key: None,
        value: Bytes::from(cmd.encode()),
        headers: Vec::new(),
        timestamp: TimestampMs::now(),
        ttl_ms: None,
    };
    let key = PartitionKey::metadata();
    let ack = broker
        .shards
        .ask(broker.shards.core_of(&key), |reply| CoreRequest::Append {
            key,
            records: vec![record],
            producer: None,
            reply,
        })
        .await?
        .into_result()?;
    ack.offsets
        .first()
        .copied()
        .ok_or_else(|| CoreError::Raft("empty metadata append".into()))
}

/// Sends a command to the metadata leader (`Peer.Propose`), over the connection to it that
/// forwarding uses too.
async fn forward_proposal(
    broker: &Broker,
    leader: NodeId,
    cmd: &Command,
) -> Result<Offset, Status> {
    let mut client = ipb::peer_client::PeerClient::new(broker.peer_channel(leader)?);
    let mut req = tonic::Request::new(ipb::ProposeRequest {
        from: broker.node_id(),
        command: Bytes::from(cmd.encode()),
        forwarded: true,
    });
    req.set_timeout(APPLY_WAIT);
    let r = client
        .propose(req)
        .await
        .map_err(|s| super::status::from_peer(leader, s))?;
    Ok(Offset(r.into_inner().offset))
}

/// Waits until this node has applied the metadata log past `offset`.
pub async fn wait_applied(broker: &Broker, offset: Offset) -> Result<(), Status> {
    let mut rx = broker.applied.subscribe();
    let applied = async move { rx.wait_for(|a| *a > offset.0).await.map(|_| ()) };
    match tokio::time::timeout(APPLY_WAIT, applied).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Status::unavailable("the node is shutting down")),
        Err(_) => Err(Status::unavailable(format!(
            "the metadata change at offset {} was not applied on this node within {APPLY_WAIT:?}",
            offset.0
        ))),
    }
}

/// Creates a topic through the metadata group; returns it once this node has applied it.
pub async fn create_topic(
    broker: &Arc<Broker>,
    name: String,
    partitions: u32,
    replication_factor: u32,
    settings: TopicSettings,
) -> Result<Arc<Topic>, Status> {
    let _admin = broker.admin.lock().await;
    let state = broker.cluster();
    if state.topics.contains_key(&name) {
        return Err(Status::already_exists(format!(
            "topic {name:?} already exists"
        )));
    }
    if state.topics.len() >= broker.config.max_topics {
        return Err(Status::resource_exhausted(format!(
            "the cluster holds its limit of {} topics",
            broker.config.max_topics
        )));
    }
    let replicas = assign_replicas(&state.placeable(), partitions, replication_factor)
        .map_err(super::status::from_cluster)?;
    let uid = rand::random::<u64>() | 1;
    let spec = TopicSpec {
        name: name.clone(),
        uid,
        partitions,
        replication_factor,
        settings,
        replicas,
        created_ms: TimestampMs::now().0,
        moving: Default::default(),
        moved: Default::default(),
    };
    let at = propose(broker, &Command::CreateTopic { spec }).await?;
    wait_applied(broker, at).await?;
    let topic = broker.topic(&name)?;
    if topic.spec.uid != uid {
        return Err(Status::already_exists(format!(
            "topic {name:?} already exists"
        )));
    }
    // Replicated partitions elect their leaders in the background: wait (bounded) for them, so
    // a publish right after creation finds a leader.
    wait_for_leaders(broker, &topic).await;
    tracing::info!(topic = %name, partitions, replication_factor, "topic created");
    Ok(topic)
}

/// Waits up to a few seconds until every partition this node holds knows a leader.
async fn wait_for_leaders(broker: &Broker, topic: &Topic) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for p in 0..topic.spec.partitions {
        if !topic.on(broker.node_id(), p) {
            continue;
        }
        loop {
            match broker.replica_state(topic, p).await {
                Ok(s) if s.leader.is_some() => break,
                _ if tokio::time::Instant::now() >= deadline => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// Deletes a topic through the metadata group; returns once this node has applied it.
pub async fn delete_topic(broker: &Arc<Broker>, name: &str) -> Result<(), Status> {
    let _admin = broker.admin.lock().await;
    let topic = broker.topic(name)?;
    let at = propose(
        broker,
        &Command::DeleteTopic {
            name: name.to_string(),
            uid: topic.spec.uid,
        },
    )
    .await?;
    wait_applied(broker, at).await?;
    tracing::info!(topic = name, "topic deleted");
    Ok(())
}

/// Handles `Peer.Propose`: a forwarded command is proposed here (this node was taken for the
/// metadata leader) or refused; an unforwarded one (from a joining node) may be passed on once.
pub async fn handle_propose(
    broker: &Arc<Broker>,
    command: &[u8],
    forwarded: bool,
) -> Result<Offset, Status> {
    let cmd = Command::decode(command).map_err(super::status::from_cluster)?;
    if let Command::RegisterNode { id, .. } = &cmd {
        if broker.cluster().removed.contains(id) {
            return Err(super::status::removed(*id));
        }
    }
    if !forwarded {
        return propose(broker, &cmd).await;
    }
    cmd.validate().map_err(super::status::from_cluster)?;
    propose_local(broker, &cmd).await.map_err(from_core)
}

/// Follows the metadata log on this node and keeps its partitions in line with it.
struct Follower {
    broker: Arc<Broker>,
    state: ClusterState,
    /// Next metadata offset to read.
    next: Offset,
    /// Partitions open on this node: key → (incarnation, directory).
    open: HashMap<PartitionKey, (u64, PathBuf)>,
    /// Some partition failed to open or close: retry at the next step.
    failed: bool,
}

impl Follower {
    async fn run(mut self) {
        let mut closing = self.broker.closing();
        loop {
            tokio::select! {
                r = self.step(FOLLOW_WAIT) => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e.message(), "following the metadata failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                _ = async { let _ = closing.wait_for(|c| *c).await; } => return,
            }
        }
    }

    /// Applies what is committed past `next` (waiting up to `wait` for something), then
    /// reconciles the partitions if anything changed or an earlier attempt failed.
    async fn step(&mut self, wait: Duration) -> Result<(), Status> {
        let key = PartitionKey::metadata();
        let from = self.next;
        // Caught up once: a leader was known before this read, and the read reaches the end
        // of what this replica has committed (which a leader's first message brings up to date).
        let leader_known = self.broker.alone()
            || self.broker.ready.load(std::sync::atomic::Ordering::Acquire)
            || self.broker.metadata_leader().await.is_some();
        let core = self.broker.shards.core_of(&key);
        let fetched = self
            .broker
            .shards
            .ask(core, |reply| CoreRequest::Fetch {
                key,
                from,
                max_bytes: 4 << 20,
                max_wait: wait,
                reply,
            })
            .await
            .map_err(from_core)?;
        let mut changed = false;
        let mut moved = false;
        let mut deleted = Vec::new();
        for batch in &fetched.batches {
            let control = batch.meta().control;
            for r in batch.records() {
                if r.offset < self.next || r.offset >= fetched.until {
                    continue;
                }
                self.next = r.offset.plus(1);
                if control {
                    continue;
                }
                match Command::decode(r.value) {
                    Ok(cmd) => {
                        moved |= cmd.places_partitions();
                        deleted.extend(self.state.apply(cmd));
                        changed = true;
                    }
                    Err(e) => {
                        tracing::error!(offset = r.offset.0, error = %e, "skipping a metadata record")
                    }
                }
            }
        }
        if changed {
            self.broker.set_state(Arc::new(self.state.clone()));
            if self.state.removed.contains(&self.broker.node_id()) {
                self.broker.stop_for(self.broker.removed_message());
            }
        }
        if moved || self.failed {
            self.reconcile(deleted).await;
        }
        self.broker.applied.send_replace(self.next.0);
        if leader_known && self.next >= fetched.high_watermark && !self.failed {
            let was = self
                .broker
                .ready
                .swap(true, std::sync::atomic::Ordering::AcqRel);
            if !was {
                tokio::spawn(log_caught_up(self.broker.clone()));
            }
        }
        Ok(())
    }

    /// Opens the partitions this node should hold and closes (and removes) the others.
    async fn reconcile(&mut self, deleted: Vec<TopicSpec>) {
        let broker = self.broker.clone();
        let me = broker.node_id();
        let mut failed = false;
        // What should be open here.
        let mut want: HashMap<PartitionKey, (&TopicSpec, u32)> = HashMap::new();
        for spec in self.state.topics.values() {
            for p in 0..spec.partitions {
                if spec.holds(me, p) {
                    let key = PartitionKey {
                        topic: spec.name.as_str().into(),
                        partition: p,
                    };
                    want.insert(key, (spec, p));
                }
            }
        }
        // Close what should not be (deleted, moved away, or another incarnation).
        let stale: Vec<PartitionKey> = self
            .open
            .iter()
            .filter(|(k, (uid, _))| want.get(*k).is_none_or(|(s, _)| s.uid != *uid))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            let core = broker.shards.core_of(&key);
            let k = key.clone();
            match broker
                .shards
                .ask(core, |reply| CoreRequest::Close { key: k, reply })
                .await
            {
                Ok(()) => {
                    if let Some((_, dir)) = self.open.remove(&key) {
                        remove_dir(dir).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "closing failed; will retry");
                    failed = true;
                }
            }
        }
        // The files of deleted topics, also those never opened here since the last restart.
        for spec in deleted {
            remove_dir(broker.config.data_dir.join("topics").join(spec.dir_name())).await;
        }
        // Open what is missing.
        let opens = want
            .iter()
            .filter(|(k, _)| !self.open.contains_key(*k))
            .map(|(key, (spec, p))| {
                let core = broker.shards.core_of(key);
                // A replica of the group as created initializes it with the creation's
                // replicas; one added by a move (or of a partition moved since) joins it.
                let replicas = &spec.replicas[*p as usize];
                let initial = !spec.moved.contains(p) && replicas.contains(&me);
                let voters: BTreeMap<NodeId, Member> = replicas
                    .iter()
                    .filter(|_| initial)
                    .filter_map(|id| self.state.nodes.get(id).map(|m| (*id, m.clone())))
                    .collect();
                let expected = if initial { replicas.len() } else { 0 };
                let dir = broker.partition_dir(spec, *p);
                let key = key.clone();
                let uid = spec.uid;
                let config = broker.config.log_config(&spec.settings);
                let replica = broker.replica.clone();
                let broker = broker.clone();
                async move {
                    if voters.len() != expected {
                        return (
                            key,
                            uid,
                            dir,
                            Err(CoreError::Raft(
                                "a replica's node is not registered yet".into(),
                            )),
                        );
                    }
                    let d = dir.clone();
                    let k = key.clone();
                    let r = broker
                        .shards
                        .ask(core, move |reply| CoreRequest::Open {
                            open: Box::new(OpenPartition {
                                key: k,
                                uid,
                                dir: d,
                                config,
                                replica,
                                voters,
                            }),
                            reply,
                        })
                        .await;
                    (key, uid, dir, r)
                }
            });
        for (key, uid, dir, r) in futures::future::join_all(opens).await {
            match r {
                Ok(()) => {
                    self.open.insert(key, (uid, dir));
                }
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "opening failed; will retry");
                    failed = true;
                }
            }
        }
        self.failed = failed;
    }
}

/// Says once, when the node has first caught up with the metadata, what it holds.
async fn log_caught_up(broker: Arc<Broker>) {
    let me = broker.node_id();
    let topics = broker.topics();
    let (mut partitions, mut records) = (0usize, 0u64);
    for t in &topics {
        for p in (0..t.spec.partitions).filter(|p| t.on(me, *p)) {
            partitions += 1;
            if let Ok(o) = broker
                .list_offsets(t, p, crate::shard::StartAt::Latest, true)
                .await
            {
                records += o.end.0.saturating_sub(o.start.0);
            }
        }
    }
    let state = broker.cluster();
    tracing::info!(
        "caught up with the cluster metadata: {} nodes, {} topics; this node holds {partitions} \
         partitions with {records} records (offsets, counting Raft's few control records)",
        state.nodes.len(),
        topics.len(),
    );
}

async fn remove_dir(dir: PathBuf) {
    let r = tokio::task::spawn_blocking(move || {
        let r = match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        // The incarnation's directory goes with its last partition.
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        r.map_err(|e| format!("removing {}: {e}", dir.display()))
    })
    .await;
    if let Ok(Err(e)) = r {
        tracing::warn!(error = %e, "could not remove a partition's files");
    }
}
