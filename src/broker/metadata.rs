//! What this node's replica of the metadata group knows: its leader (the controller, and the
//! coordinator of groups), its voters, and whether a quorum still follows this node.

use std::time::Duration;

use super::Broker;
use crate::log::Positions;
use crate::raft::types::NodeId;
use crate::shard::request::{ReplicaState, Reply};
use crate::shard::{CoreError, CoreRequest, PartitionKey};

impl Broker {
    /// The metadata group's leader as this node knows it. A leader cut off from a majority
    /// keeps believing it leads (openraft does not step down): this node counts itself only
    /// while a quorum acknowledged it within an election timeout.
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

    /// Asks the core that holds this node's replica of the metadata group.
    pub async fn ask_metadata<T>(
        &self,
        make: impl FnOnce(PartitionKey, Reply<T>) -> CoreRequest,
    ) -> Result<T, CoreError> {
        let key = PartitionKey::metadata();
        self.shards
            .ask(self.shards.core_of(&key), |reply| make(key, reply))
            .await
    }

    /// What this node's replica of the metadata group knows of it.
    pub async fn metadata_replica(&self) -> Option<ReplicaState> {
        self.ask_metadata(|key, reply| CoreRequest::Replica { key, reply })
            .await
            .ok()
    }

    /// Where this node's replica of the metadata log stands: its start, and its committed end.
    pub async fn metadata_positions(&self) -> Result<Positions, CoreError> {
        self.ask_metadata(|key, reply| CoreRequest::Positions { key, reply })
            .await
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

    /// The metadata group's voters as this node knows them (else the controllers of its flags).
    pub async fn metadata_voters(&self) -> Vec<NodeId> {
        let voters = self
            .metadata_replica()
            .await
            .map(|m| m.voters)
            .unwrap_or_default();
        if voters.is_empty() {
            return self.controllers.keys().copied().collect();
        }
        voters
    }
}
