//! A partition's Raft group: openraft over the partition log, on the core that owns it.

use std::path::Path;
use std::sync::Arc;

use openraft::network::RaftNetworkFactory;
use openraft::{Config, SnapshotPolicy};

use super::error::RaftError;
use super::store::{self, LogSnapshot, StateMachine};
use super::types::{NodeId, PartitionRaft};
use crate::log::Log;

/// The Raft handle of a partition group.
pub type PartitionGroup = openraft::Raft<PartitionRaft, StateMachine>;

/// Election and heartbeat timing, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
}

impl Default for Timing {
    /// Near Redpanda's: a 150 ms heartbeat and an election after about 1.5 s of silence.
    fn default() -> Self {
        Timing {
            heartbeat_ms: 150,
            election_min_ms: 1_500,
            election_max_ms: 3_000,
        }
    }
}

impl Timing {
    pub fn validate(&self) -> Result<(), RaftError> {
        if self.heartbeat_ms == 0 {
            return Err(RaftError::HeartbeatZero);
        }
        if self.election_min_ms < self.heartbeat_ms * 2 {
            return Err(RaftError::ElectionTooShort {
                election_ms: self.election_min_ms,
                heartbeat_ms: self.heartbeat_ms,
            });
        }
        if self.election_max_ms <= self.election_min_ms {
            return Err(RaftError::ElectionRange {
                min_ms: self.election_min_ms,
                max_ms: self.election_max_ms,
            });
        }
        Ok(())
    }
}

/// Entries one AppendEntries carries at most (each is a whole batch).
pub const MAX_PAYLOAD_ENTRIES: u64 = 256;

/// The openraft configuration of a partition group.
pub fn config(name: &str, timing: Timing) -> Result<Arc<Config>, RaftError> {
    config_with(name, timing, true)
}

/// The configuration of a group; `ticking: false` turns off openraft's own timer (a task per
/// group waking every fifth of a heartbeat), for a group that needs no heartbeats or election
/// timeouts: one whose only voter is this node. Its elections are then triggered explicitly.
pub fn config_with(name: &str, timing: Timing, ticking: bool) -> Result<Arc<Config>, RaftError> {
    timing.validate()?;
    let config = Config {
        enable_tick: ticking,
        cluster_name: name.to_string(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_min_ms,
        election_timeout_max: timing.election_max_ms,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        // Raft takes snapshots only where retention asks (see store/mod.rs), never on its own.
        snapshot_policy: SnapshotPolicy::Never,
        // A rejoining partitioned node must not depose a healthy leader.
        enable_pre_vote: Some(true),
        // A replica that cut its damaged log (`raft::store`, "Damaged replicas" in
        // docs/storage.md) reports a shorter log than its leader saw it hold. openraft treats
        // that as a bug and panics the leader's core unless reversion is allowed; here it is
        // expected, and safe: such a replica neither votes nor campaigns until it has the lost
        // entries back, so the leader just replicates them again.
        allow_log_reversion: Some(true),
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| RaftError::Config(e.to_string()))
}

/// Opens the Raft storage on `log` (whose files are in `dir`) and starts the group's tasks on
/// the current core.
pub async fn start<N>(
    id: NodeId,
    config: Arc<Config>,
    network: N,
    log: Log,
    dir: &Path,
) -> Result<PartitionGroup, RaftError>
where
    N: RaftNetworkFactory<PartitionRaft>,
    N::Network: openraft::network::NetSnapshot<PartitionRaft, SnapshotData = LogSnapshot>,
{
    start_with(id, config, network, log, dir, std::rc::Rc::new(|| {}))
        .await
        .map(|(raft, _)| raft)
}

/// [`start`], calling `on_commit` whenever the group's committed position moves; also returns
/// the handle its owner applies retention through.
pub async fn start_with<N>(
    id: NodeId,
    config: Arc<Config>,
    network: N,
    log: Log,
    dir: &Path,
    on_commit: store::OnCommit,
) -> Result<(PartitionGroup, store::StoreHandle), RaftError>
where
    N: RaftNetworkFactory<PartitionRaft>,
    N::Network: openraft::network::NetSnapshot<PartitionRaft, SnapshotData = LogSnapshot>,
{
    let (log_store, sm, handle) =
        store::open_with_handle(log, dir, on_commit)
            .await
            .map_err(|e| RaftError::Storage {
                dir: dir.display().to_string(),
                error: e.to_string(),
            })?;
    PartitionGroup::new(id, config, network, log_store, sm)
        .await
        .map(|raft| (raft, handle))
        .map_err(|e| RaftError::Stopped(format!("starting: {e}")))
}

/// The network of a group whose only voter is this node: there is nobody to call. Every call
/// fails as unreachable (openraft backs off); it is never made while the group has one member.
pub struct NoPeers;

/// The (never connected) client of [`NoPeers`].
pub struct NoPeer(NodeId);

#[derive(Debug)]
struct NoRoute(NodeId);

impl std::fmt::Display for NoRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no transport to node {}", self.0)
    }
}

impl std::error::Error for NoRoute {}

impl NoPeer {
    fn unreachable(&self) -> openraft::error::Unreachable<PartitionRaft> {
        openraft::error::Unreachable::new(&NoRoute(self.0))
    }
}

impl RaftNetworkFactory<PartitionRaft> for NoPeers {
    type Network = NoPeer;

    async fn new_client(&mut self, target: NodeId, _node: &super::types::Member) -> NoPeer {
        NoPeer(target)
    }
}

impl openraft::network::v2::RaftNetworkV2<PartitionRaft> for NoPeer {
    type SnapshotData = LogSnapshot;

    async fn append_entries(
        &mut self,
        _rpc: openraft::raft::AppendEntriesRequest<PartitionRaft>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::AppendEntriesResponse<PartitionRaft>,
        openraft::error::RPCError<PartitionRaft>,
    > {
        Err(self.unreachable().into())
    }

    async fn vote(
        &mut self,
        _rpc: openraft::raft::VoteRequest<PartitionRaft>,
        _option: openraft::network::RPCOption,
    ) -> Result<openraft::raft::VoteResponse<PartitionRaft>, openraft::error::RPCError<PartitionRaft>>
    {
        Err(self.unreachable().into())
    }

    async fn full_snapshot(
        &mut self,
        _vote: super::types::Vote,
        _snapshot: openraft::alias::SnapshotOf<PartitionRaft, LogSnapshot>,
        _cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed> + 'static,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::SnapshotResponse<PartitionRaft>,
        openraft::error::StreamingError<PartitionRaft>,
    > {
        Err(openraft::error::StreamingError::Unreachable(
            self.unreachable(),
        ))
    }
}
