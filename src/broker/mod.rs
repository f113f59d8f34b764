//! The node context: what every request handler and background task of a node shares. It
//! knows the cluster metadata as last applied here, the topics derived from it, this node's
//! cores, and its connections to other nodes; it routes a request to the core that owns the
//! partition or to the node that leads it.
//!
//! ```text
//! broker/
//!   mod.rs       Broker: identity, state, calls in flight, shutdown, stopping on its own
//!   topic.rs     Topic: a topic as this node routes it
//!   publish.rs   records → partitions → the owning core or the leader elsewhere
//!   read.rs      reads and offsets from this node's replica or another's
//!   peers.rs     connections to other nodes; their answers as typed errors
//!   metadata.rs  what this node's replica of the metadata group knows
//!   error.rs     BrokerError
//! ```
//!
//! It speaks Tern's own types; `net` turns its errors into gRPC statuses, and `controller`
//! keeps its metadata up to date.

mod error;
mod metadata;
mod peers;
mod publish;
mod read;
mod topic;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::transport::Channel;

pub use error::{BrokerError, PeerAnswer, Result};
pub use peers::{never_sent, Origin};
pub use read::{mirror_progress, Read};
pub use topic::{Outgoing, Topic};

use crate::cluster::{ClusterState, TopicSpec};
use crate::config::Config;
use crate::raft::transport::Transport;
use crate::raft::types::{Member, NodeId};
use crate::shard::{ReplicaSettings, Shards};
use crate::tls::{ClientTls, ServerTls};
use crate::types::ClusterId;

/// Replaces a small file as a whole: a crash leaves the old content or the new, synced.
pub(crate) fn write_durably(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Where a node keeps the id of the cluster it belongs to, under its data directory.
pub const CLUSTER_ID_FILE: &str = "cluster.id";

pub struct Broker {
    pub config: Config,
    pub shards: Shards,
    /// This node's identity in the partitions' Raft groups, and its transport to peers.
    pub replica: ReplicaSettings,
    /// The metadata group's voters (id → address) as the flags give them; just this node when
    /// it runs alone; none for a node that joins (it learns them from the metadata).
    pub controllers: BTreeMap<NodeId, String>,
    /// The cluster metadata as last applied here, and the topics derived from it.
    state: RwLock<Arc<ClusterState>>,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Offset in the metadata log up to which commands are applied here.
    pub applied: tokio::sync::watch::Sender<u64>,
    /// The applied metadata state and the offset it reaches, as one pair (a node whose
    /// metadata log starts past what it applied asks a peer for it).
    applied_view: std::sync::Mutex<(crate::types::Offset, Arc<ClusterState>)>,
    /// Connections to other nodes (forwarding, metadata proposals), by node, with the address
    /// each was made for.
    peers: std::sync::Mutex<HashMap<NodeId, (String, Channel)>>,
    /// Whether this node has caught up with the metadata once since it started (until then a
    /// topic it does not know may exist: UNAVAILABLE, not NOT_FOUND).
    pub ready: AtomicBool,
    /// Serializes this node's metadata changes (so checks and proposals do not interleave).
    pub admin: tokio::sync::Mutex<()>,
    /// Set when the node starts shutting down; long-lived calls (subscriptions) end on it.
    closing: tokio::sync::watch::Sender<bool>,
    /// Calls being served (not counting subscriptions), so shutdown can wait for them.
    in_flight: Arc<AtomicUsize>,
    /// Set when the node must stop on its own (it was removed from the cluster): why.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// The node's TLS, when configured: its listener and its calls to other nodes.
    pub tls: Option<Arc<ServerTls>>,
    /// The cluster's id, once known (from `DATA_DIR/cluster.id` or the metadata).
    pub cluster_id: Arc<ClusterId>,
}

/// Counts one call as in flight until dropped.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Broker {
    /// The context of a node reached at `advertised`, knowing no metadata yet (the
    /// controller fills it in).
    pub fn new(
        config: Config,
        shards: Shards,
        advertised: String,
        transport: Option<Arc<Transport>>,
        tls: Option<Arc<ServerTls>>,
        cluster_id: Arc<ClusterId>,
    ) -> anyhow::Result<Arc<Broker>> {
        let me = NodeId(config.node_id);
        let replica = ReplicaSettings {
            node_id: me,
            member: Member {
                addr: advertised.clone(),
                region: config.region.clone(),
                zone: config.zone.clone(),
                region_addrs: config.region_address_map()?,
            },
            timing: config.raft_timing(),
            checkpoint_entries: config.raft_checkpoint_entries,
            transport,
            quiet: config.raft_quiet,
        };
        let controllers: BTreeMap<NodeId, String> = if !config.peers.is_empty() {
            config.peer_map()?
        } else if config.join.is_empty() {
            BTreeMap::from([(me, advertised)])
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
            applied_view: std::sync::Mutex::new((crate::types::Offset(0), Arc::default())),
            peers: std::sync::Mutex::new(HashMap::new()),
            ready: AtomicBool::new(false),
            admin: tokio::sync::Mutex::new(()),
            closing: tokio::sync::watch::channel(false).0,
            in_flight: Arc::new(AtomicUsize::new(0)),
            fatal: tokio::sync::watch::channel(None).0,
            tls,
            cluster_id,
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
        Ok(broker)
    }

    /// How this node connects to others: TLS with its certificate, or plaintext.
    pub fn client_tls(&self) -> Option<ClientTls> {
        self.tls.as_ref().map(|t| t.client())
    }

    pub fn node_id(&self) -> NodeId {
        self.replica.node_id
    }

    /// Where and what this node is, as it registers in the metadata.
    pub fn member(&self) -> &Member {
        &self.replica.member
    }

    /// Whether this node runs without peers.
    pub fn alone(&self) -> bool {
        self.transport().is_none()
    }

    /// The transport to other nodes; `None` when this node runs alone.
    pub fn transport(&self) -> Option<&Arc<Transport>> {
        self.replica.transport.as_ref()
    }

    /// The applied metadata state and the metadata offset it reaches.
    pub fn applied_view(&self) -> (crate::types::Offset, Arc<ClusterState>) {
        self.applied_view.lock().expect("applied view lock").clone()
    }

    /// Pairs the current state with the offset applied (the follower calls this after each
    /// step, after `set_state`).
    pub fn set_applied_view(&self, next: crate::types::Offset) {
        let state = self.cluster();
        *self.applied_view.lock().expect("applied view lock") = (next, state);
    }

    pub fn cluster(&self) -> Arc<ClusterState> {
        self.state.read().expect("state lock").clone()
    }

    /// Replaces the metadata and the topics derived from it (keeping the `Topic` of an
    /// unchanged one).
    pub fn set_state(&self, state: Arc<ClusterState>) {
        if let Some(id) = &state.cluster_id {
            self.learn_cluster_id(id);
        }
        if let Some(t) = self.transport() {
            t.set_addresses(
                state
                    .nodes
                    .iter()
                    .map(|(id, m)| (*id, m.addr_for(&self.config.region).to_string()))
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

    /// Takes the cluster id the metadata holds: kept in `DATA_DIR/cluster.id` the first time,
    /// so a restarted node refuses another cluster's calls before it has caught up. A node
    /// whose files name another cluster stops.
    fn learn_cluster_id(&self, id: &str) {
        let new = self.cluster_id.get().is_empty();
        if let Err(known) = self.cluster_id.learn(id) {
            self.stop_for(format!(
                "this node's data directory ({}) belongs to cluster {known}, but the metadata \
                 it replicated names cluster {id}",
                self.config.data_dir.display()
            ));
            return;
        }
        if new {
            let path = self.config.data_dir.join(CLUSTER_ID_FILE);
            if let Err(e) = write_durably(&path, id.as_bytes()) {
                tracing::error!(path = %path.display(), error = %e, "cannot keep the cluster id");
            }
            tracing::info!(cluster = id, "cluster id");
        }
    }

    /// Whether this node has caught up with the metadata since it started and serves.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Where a partition's files live on this node.
    pub fn partition_dir(&self, spec: &TopicSpec, partition: u32) -> PathBuf {
        self.config
            .data_dir
            .join("topics")
            .join(spec.dir_name())
            .join(partition.to_string())
    }

    /// The topic named `name`.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        crate::cluster::validate_topic_name(name)?;
        self.topics
            .read()
            .expect("topic map lock")
            .get(name)
            .cloned()
            .ok_or_else(|| {
                if self.is_ready() {
                    BrokerError::NoTopic(name.to_string())
                } else {
                    BrokerError::NotReady {
                        node: self.node_id(),
                    }
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
    /// Whether the node has begun to shut down.
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    pub fn begin_shutdown(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once the node starts shutting down.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// Resolves once the node starts shutting down (for `select!`).
    pub async fn closed(&self) {
        let mut rx = self.closing();
        let _ = rx.wait_for(|c| *c).await;
    }
}
