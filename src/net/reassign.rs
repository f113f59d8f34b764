//! Moving replicas between nodes, and nodes in and out of the cluster.
//!
//! ```text
//! tern cluster move / rebalance / remove-node ─▶ metadata: MoveReplicas, RemoveNode (draining)
//!
//! every node, every 500 ms (the mover):
//!   a partition it leads is moving ─▶ its core: add the new nodes as learners; once caught
//!                                     up, change the voters (joint consensus) ─▶ FinishMove
//!   it leads the metadata group    ─▶ registered nodes become learners of the metadata group,
//!                                     removed ones leave it; a draining node's replicas get
//!                                     moves; a drained node is removed
//! every node (reconcile): opens the partitions it holds or receives, closes the others
//! ```
//!
//! Every step is decided from the committed metadata and the group's own membership, so a
//! move interrupted by a crash or a leader change is finished by whoever leads next.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::broker::Broker;
use super::controller::{propose, wait_applied};
use super::status::from_core;
use crate::cluster::{self, ClusterState, Command, Move};
use crate::raft::types::{Member, NodeId};
use crate::shard::{CoreError, CoreRequest, MemberProgress, MemberTarget, PartitionKey};

/// How often the mover looks for work (it also runs when the metadata changes).
const EVERY: Duration = Duration::from_millis(500);
/// Longest a membership step may take before the mover tries again.
const STEP_WAIT: Duration = Duration::from_secs(10);
/// Partitions moving at once across the cluster because of drains.
const DRAIN_MOVES_AT_ONCE: usize = 16;
/// Moves one `rebalance` call starts at most (call again to continue).
pub const REBALANCE_MOVES_MAX: usize = 256;

/// Starts the mover of this node.
pub fn spawn(broker: Arc<Broker>) {
    tokio::spawn(async move {
        let mut closing = broker.closing();
        let mut applied = broker.applied.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                r = applied.changed() => if r.is_err() { return },
                _ = async { let _ = closing.wait_for(|c| *c).await; } => return,
            }
            if !broker.ready.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            move_partitions(&broker).await;
            if let Err(e) = lead_metadata(&broker).await {
                tracing::debug!(error = %e.message(), "metadata membership step");
            }
        }
    });
}

/// Asks a core to move a group towards `target`, bounded in time.
async fn step_members(
    broker: &Broker,
    key: PartitionKey,
    target: MemberTarget,
) -> Result<MemberProgress, CoreError> {
    let core = broker.shards.core_of(&key);
    let ask = broker
        .shards
        .ask(core, |reply| CoreRequest::Members { key, target, reply });
    tokio::time::timeout(STEP_WAIT, ask)
        .await
        .unwrap_or_else(|_| Err(CoreError::Raft("membership step timed out".into())))
}

/// Carries out the moves of the partitions this node leads.
async fn move_partitions(broker: &Arc<Broker>) {
    let state = broker.cluster();
    let me = broker.node_id();
    for t in state.topics.values() {
        for (p, target) in &t.moving {
            if !t.holds(me, *p) {
                continue;
            }
            let voters: BTreeMap<NodeId, Member> = target
                .iter()
                .filter_map(|id| state.nodes.get(id).map(|m| (*id, m.clone())))
                .collect();
            if voters.len() != target.len() {
                continue;
            }
            let key = PartitionKey {
                topic: t.name.as_str().into(),
                partition: *p,
            };
            let target_members = MemberTarget {
                voters,
                learners: BTreeMap::new(),
            };
            match step_members(broker, key.clone(), target_members).await {
                Ok(MemberProgress::Done) => {
                    let cmd = Command::FinishMove {
                        topic: t.name.clone(),
                        uid: t.uid,
                        partition: *p,
                        replicas: target.clone(),
                    };
                    match propose(broker, &cmd).await {
                        Ok(_) => {
                            tracing::info!(partition = %key, replicas = ?target, "partition moved")
                        }
                        Err(e) => {
                            tracing::warn!(partition = %key, error = %e.message(), "recording a finished move failed; will retry")
                        }
                    }
                }
                Ok(MemberProgress::CatchingUp { node, behind }) => {
                    tracing::debug!(partition = %key, node, behind, "new replica catching up");
                }
                Err(CoreError::NotLeader { .. } | CoreError::UnknownPartition(_)) => {}
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "moving a partition: will retry")
                }
            }
        }
    }
}

/// On the metadata leader: keeps the metadata group's membership in line with the registered
/// nodes, and drives the removal of draining nodes.
async fn lead_metadata(broker: &Arc<Broker>) -> Result<(), Status> {
    let key = PartitionKey::metadata();
    let core = broker.shards.core_of(&key);
    let group = broker
        .shards
        .ask(core, |reply| CoreRequest::Replica {
            key: key.clone(),
            reply,
        })
        .await
        .map_err(from_core)?;
    if !group.is_leader {
        return Ok(());
    }
    let state = broker.cluster();
    // Voters are the controllers still in the cluster; every other registered node learns.
    let member_of = |id: &NodeId| {
        state.nodes.get(id).cloned().unwrap_or_else(|| Member {
            addr: broker.controllers.get(id).cloned().unwrap_or_default(),
            ..Member::default()
        })
    };
    let voters: BTreeMap<NodeId, Member> = group
        .voters
        .iter()
        .filter(|id| !state.removed.contains(id))
        .map(|id| (*id, member_of(id)))
        .collect();
    let mut learners: BTreeMap<NodeId, Member> = state
        .nodes
        .iter()
        .filter(|(id, _)| !voters.contains_key(id))
        .map(|(id, m)| (*id, m.clone()))
        .collect();
    // A removed node stays on as a learner while it can be reached and has not received the
    // whole log, so it learns that it was removed (and stops) rather than going quiet.
    let last = group.last_index.unwrap_or(0);
    for (id, matched) in &group.matched {
        let reachable = broker
            .transport()
            .is_some_and(|t| t.reachable(*id) == Some(true));
        if state.removed.contains(id) && reachable && matched.is_none_or(|m| m < last) {
            learners.insert(*id, member_of(id));
        }
    }
    // Nothing to change (the common case): no core round trip.
    let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<_>>();
    let same = voters.keys().copied().collect::<BTreeSet<_>>() == set(&group.voters)
        && learners.keys().copied().collect::<BTreeSet<_>>() == set(&group.learners);
    if !same && !voters.is_empty() {
        let target = MemberTarget { voters, learners };
        match step_members(broker, key, target).await {
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "changing the metadata group's members"),
        }
    }
    drain(broker, &state).await
}

/// Moves the replicas off draining nodes (a bounded number at a time) and removes the nodes
/// that hold none any more.
async fn drain(broker: &Arc<Broker>, state: &ClusterState) -> Result<(), Status> {
    if state.draining.is_empty() {
        return Ok(());
    }
    let mut local = state.clone();
    let mut moving: usize = state.topics.values().map(|t| t.moving.len()).sum();
    for id in &state.draining {
        if state.replicas_on(*id) == 0 {
            propose(broker, &Command::RemoveNode { id: *id }).await?;
            tracing::info!(node = id, "node removed from the cluster");
            continue;
        }
        for t in state.topics.values() {
            for p in 0..t.partitions {
                let replicas = &t.replicas[p as usize];
                if moving >= DRAIN_MOVES_AT_ONCE {
                    return Ok(());
                }
                if t.moving.contains_key(&p) || !replicas.contains(id) {
                    continue;
                }
                let others: Vec<NodeId> = replicas.iter().copied().filter(|r| r != id).collect();
                let Some(to) = cluster::replacement(&local, &others, &[*id]) else {
                    tracing::warn!(node = id, topic = %t.name, partition = p, "no node can take this replica over");
                    continue;
                };
                let target: Vec<NodeId> = replicas
                    .iter()
                    .map(|r| if r == id { to } else { *r })
                    .collect();
                let cmd = Command::MoveReplicas {
                    topic: t.name.clone(),
                    uid: t.uid,
                    partition: p,
                    target,
                };
                propose(broker, &cmd).await?;
                local.apply(cmd);
                moving += 1;
            }
        }
    }
    Ok(())
}

/// Starts moving a partition to `target` (`tern cluster move`); returns once the move is in
/// the metadata (the partition's leader then carries it out), with whether anything changed
/// (`false`: the partition has exactly these replicas and is not moving).
pub async fn move_partition(
    broker: &Arc<Broker>,
    topic: &str,
    partition: u32,
    target: Vec<NodeId>,
) -> Result<bool, Status> {
    let _admin = broker.admin.lock().await;
    let t = broker.topic(topic)?;
    t.check_partition(partition)?;
    let state = broker.cluster();
    let rf = t.spec.replication_factor as usize;
    if target.len() != rf {
        return Err(Status::invalid_argument(format!(
            "topic {topic:?} has replication factor {rf}: give {rf} nodes, not {}",
            target.len()
        )));
    }
    for (i, id) in target.iter().enumerate() {
        if target[..i].contains(id) {
            return Err(Status::invalid_argument(format!(
                "node {id} is listed twice"
            )));
        }
        if !state.nodes.contains_key(id) {
            return Err(Status::invalid_argument(format!(
                "node {id} is not in the cluster"
            )));
        }
        if state.draining.contains(id) {
            return Err(Status::failed_precondition(format!(
                "node {id} is being removed"
            )));
        }
    }
    if t.spec.replicas[partition as usize] == target && !t.spec.moving.contains_key(&partition) {
        return Ok(false);
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
pub async fn remove_node(broker: &Arc<Broker>, id: NodeId) -> Result<(), Status> {
    let _admin = broker.admin.lock().await;
    let state = broker.cluster();
    if state.removed.contains(&id) {
        return Ok(());
    }
    if !state.nodes.contains_key(&id) {
        return Err(Status::not_found(format!(
            "node {id} is not in the cluster"
        )));
    }
    // Every replica it holds needs another node to go to.
    let others = state.placeable().len() - usize::from(!state.draining.contains(&id));
    if let Some(t) = state
        .topics
        .values()
        .find(|t| t.replication_factor as usize > others && state.replicas_on(id) > 0)
    {
        return Err(Status::failed_precondition(format!(
            "topic {:?} has replication factor {} and only {others} other nodes would be left",
            t.name, t.replication_factor
        )));
    }
    let meta = broker
        .shards
        .ask(broker.shards.core_of(&PartitionKey::metadata()), |reply| {
            CoreRequest::Replica {
                key: PartitionKey::metadata(),
                reply,
            }
        })
        .await
        .map_err(from_core)?;
    if meta.voters == [id] {
        return Err(Status::failed_precondition(format!(
            "node {id} is the only controller left"
        )));
    }
    let at = propose(broker, &Command::RemoveNode { id }).await?;
    wait_applied(broker, at).await?;
    tracing::info!(node = id, "node removal started");
    Ok(())
}

/// Starts the moves that even out the replicas per node (`tern cluster rebalance`), at most
/// `max` of them; returns them.
pub async fn rebalance(broker: &Arc<Broker>, max: usize) -> Result<Vec<Move>, Status> {
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
