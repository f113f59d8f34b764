//! A partition's Raft group: openraft over the partition log, on the core that owns it.

use std::path::Path;
use std::sync::Arc;

use openraft::network::RaftNetworkFactory;
use openraft::{Config, SnapshotPolicy};

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
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0 {
            return Err("heartbeat interval must be > 0 ms".into());
        }
        if self.election_min_ms <= self.heartbeat_ms * 2 {
            return Err(format!(
                "election timeout ({} ms) must be more than twice the heartbeat ({} ms)",
                self.election_min_ms, self.heartbeat_ms
            ));
        }
        if self.election_max_ms <= self.election_min_ms {
            return Err(format!(
                "election timeout max ({} ms) must exceed min ({} ms)",
                self.election_max_ms, self.election_min_ms
            ));
        }
        Ok(())
    }
}

/// Entries one AppendEntries carries at most (each is a whole batch).
pub const MAX_PAYLOAD_ENTRIES: u64 = 256;

/// The openraft configuration of a partition group.
pub fn config(name: &str, timing: Timing) -> Result<Arc<Config>, String> {
    timing.validate()?;
    let config = Config {
        cluster_name: name.to_string(),
        heartbeat_interval: timing.heartbeat_ms,
        election_timeout_min: timing.election_min_ms,
        election_timeout_max: timing.election_max_ms,
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        // Retention deletes old data; Raft never snapshots or purges (see store.rs).
        snapshot_policy: SnapshotPolicy::Never,
        // A rejoining partitioned node must not depose a healthy leader.
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    config
        .validate()
        .map(Arc::new)
        .map_err(|e| format!("raft config: {e}"))
}

/// Opens the Raft storage on `log` (whose files are in `dir`) and starts the group's tasks on
/// the current core.
pub async fn start<N>(
    id: NodeId,
    config: Arc<Config>,
    network: N,
    log: Log,
    dir: &Path,
) -> Result<PartitionGroup, String>
where
    N: RaftNetworkFactory<PartitionRaft>,
    N::Network: openraft::network::NetSnapshot<PartitionRaft, SnapshotData = LogSnapshot>,
{
    let (log_store, sm) = store::open(log, dir)
        .await
        .map_err(|e| format!("opening raft storage in {}: {e}", dir.display()))?;
    PartitionGroup::new(id, config, network, log_store, sm)
        .await
        .map_err(|e| format!("starting raft group: {e}"))
}
