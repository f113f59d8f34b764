//! The cluster's shape as an operator changes it: moving a partition, removing a node,
//! rebalancing (`tern cluster move | remove-node | rebalance`). Each starts a change in the
//! metadata; the mover carries it out.

use std::sync::Arc;

use super::propose::{propose, wait_applied};
use super::{ControllerError, Result};
use crate::broker::Broker;
use crate::cluster::{self, Command, Move};
use crate::raft::types::NodeId;

/// Moves one `rebalance` call starts at most (call again to continue).
pub const REBALANCE_MOVES_MAX: usize = 256;

/// Starts moving a partition to `target` (`tern cluster move`); returns once the move is in
/// the metadata (the partition's leader then carries it out), with whether anything changed
/// (`false`: the partition has exactly these replicas and is not moving).
pub async fn move_partition(
    broker: &Arc<Broker>,
    topic: &str,
    partition: u32,
    target: Vec<NodeId>,
) -> Result<bool> {
    let _admin = broker.admin.lock().await;
    let t = broker.topic(topic)?;
    t.check_partition(partition)?;
    let state = broker.cluster();
    let rf = t.spec.replication_factor as usize;
    if target.len() != rf {
        return Err(ControllerError::Invalid(format!(
            "topic {topic:?} has replication factor {rf}: give {rf} nodes, not {}",
            target.len()
        )));
    }
    for (i, id) in target.iter().enumerate() {
        if target[..i].contains(id) {
            return Err(ControllerError::Invalid(format!(
                "node {id} is listed twice"
            )));
        }
        if !state.nodes.contains_key(id) {
            return Err(ControllerError::Invalid(format!(
                "node {id} is not in the cluster"
            )));
        }
        if state.draining.contains(id) {
            return Err(ControllerError::Precondition(format!(
                "node {id} is being removed"
            )));
        }
    }
    if t.spec.replicas[partition as usize] == target && !t.spec.moving.contains_key(&partition) {
        return Ok(false);
    }
    if let Some(why) = t.spec.placement.broken_by(&target, &state.nodes) {
        return Err(ControllerError::Precondition(format!(
            "that move breaks topic {topic:?}'s placement: {why}"
        )));
    }
    let cmd = Command::MoveReplicas {
        topic: topic.to_string(),
        uid: t.spec.uid,
        partition,
        target: target.clone(),
    };
    let at = propose(broker, &cmd).await?;
    wait_applied(broker, at).await?;
    tracing::info!(topic, partition, ?target, "partition move started");
    Ok(true)
}

/// Starts removing a node (`tern cluster remove-node`): it is marked draining, its replicas
/// move to other nodes, and it is removed once it holds none.
pub async fn remove_node(broker: &Arc<Broker>, id: NodeId) -> Result<()> {
    let _admin = broker.admin.lock().await;
    let state = broker.cluster();
    if state.removed.contains(&id) {
        return Ok(());
    }
    if !state.nodes.contains_key(&id) {
        return Err(ControllerError::UnknownNode(id));
    }
    // Every replica it holds needs another node to go to.
    let others = state.placeable().len() - usize::from(!state.draining.contains(&id));
    if let Some(t) = state
        .topics
        .values()
        .find(|t| t.replication_factor as usize > others && state.replicas_on(id) > 0)
    {
        return Err(ControllerError::Precondition(format!(
            "topic {:?} has replication factor {} and only {others} other nodes would be left",
            t.name, t.replication_factor
        )));
    }
    if broker.metadata_voters().await == [id] {
        return Err(ControllerError::Precondition(format!(
            "node {id} is the only controller left"
        )));
    }
    let at = propose(broker, &Command::RemoveNode { id }).await?;
    wait_applied(broker, at).await?;
    tracing::info!(node = %id, "node removal started");
    Ok(())
}

/// Starts the moves that even out the replicas per node (`tern cluster rebalance`), at most
/// `max` of them; returns them.
pub async fn rebalance(broker: &Arc<Broker>, max: usize) -> Result<Vec<Move>> {
    let _admin = broker.admin.lock().await;
    let max = max.clamp(1, REBALANCE_MOVES_MAX);
    let moves = cluster::rebalance(&broker.cluster(), max);
    let mut last = None;
    for m in &moves {
        last = Some(propose(broker, &m.command()).await?);
    }
    if let Some(at) = last {
        wait_applied(broker, at).await?;
    }
    tracing::info!(moves = moves.len(), "rebalance started");
    Ok(moves)
}
