//! The mover: what every node does every half second (and when the metadata changes) to
//! carry out the metadata's moves and removals.
//!
//! ```text
//! a partition it leads is moving ─▶ its core: add the new nodes as learners; once caught up,
//!                                   change the voters (joint consensus) ─▶ FinishMove
//! it leads the metadata group     ─▶ registered nodes learn the metadata log, removed ones
//!                                   leave it; draining nodes' replicas get moves; a drained
//!                                   node is removed (cluster::plan)
//! ```
//!
//! Every step is decided from the committed metadata and the group's own membership, so a
//! move interrupted by a crash or a leader change is finished by whoever leads next.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::propose::{propose, wait_applied};
use super::Result;
use crate::broker::Broker;
use crate::cluster::plan::{self, MetadataGroup};
use crate::cluster::{ClusterState, Command};
use crate::raft::types::{Member, NodeId};
use crate::shard::{CoreError, CoreRequest, MemberProgress, MemberTarget, PartitionKey};

/// How often the mover looks for work (it also runs when the metadata changes).
const EVERY: Duration = Duration::from_millis(500);
/// Longest a membership step may take before the mover tries again.
const STEP_WAIT: Duration = Duration::from_secs(10);
/// Partitions moving at once across the cluster because of drains.
const DRAIN_MOVES_AT_ONCE: usize = 16;

/// Starts the mover of this node.
pub fn spawn(broker: Arc<Broker>) {
    tokio::spawn(async move {
        let mut applied = broker.applied.subscribe();
        let mut pinner = super::pinning::Pinner::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                r = applied.changed() => if r.is_err() { return },
                _ = broker.closed() => return,
            }
            if !broker.is_ready() {
                continue;
            }
            move_partitions(&broker).await;
            pinner.run(&broker).await;
            if let Err(e) = lead_metadata(&broker).await {
                tracing::debug!(error = %e, "metadata membership step");
            }
        }
    });
}

/// Asks a core to move a group towards `target`, bounded in time.
async fn step_members(
    broker: &Broker,
    key: PartitionKey,
    target: MemberTarget,
) -> std::result::Result<MemberProgress, CoreError> {
    let core = broker.shards.core_of(&key);
    let ask = broker
        .shards
        .ask(core, |reply| CoreRequest::Members { key, target, reply });
    tokio::time::timeout(STEP_WAIT, ask)
        .await
        .unwrap_or(Err(CoreError::TimedOut {
            what: "a membership step",
            after: STEP_WAIT,
        }))
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
            if t.mirror.is_some() {
                finish_mirror_move(broker, t, *p, target, key).await;
                continue;
            }
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
                            tracing::warn!(partition = %key, error = %e, "recording a finished move failed; will retry")
                        }
                    }
                }
                Ok(MemberProgress::CatchingUp { node, behind }) => {
                    tracing::debug!(partition = %key, %node, behind, "new replica catching up");
                }
                Err(CoreError::NotLeader { .. } | CoreError::UnknownPartition(_)) => {}
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "moving a partition: will retry")
                }
            }
        }
    }
}

/// A mirror's replicas each copy the source by themselves, with no group to change: its move
/// is done once every new replica is open and within `FOLLOWER_READ_MAX_LAG` offsets of its
/// source. The first new replica's node records it, having asked the others (moves of a mirror
/// being promoted are not finished: they were refused from the promotion's start, and one
/// begun before it waits).
async fn finish_mirror_move(
    broker: &Arc<Broker>,
    t: &crate::cluster::TopicSpec,
    p: u32,
    target: &[NodeId],
    key: PartitionKey,
) {
    let current = &t.replicas[p as usize];
    let new: Vec<NodeId> = target
        .iter()
        .copied()
        .filter(|n| !current.contains(n))
        .collect();
    if new.first() != Some(&broker.node_id()) || t.promotion.is_some() {
        return;
    }
    let Ok(topic) = broker.topic(&t.name) else {
        return;
    };
    let ready = |m: &crate::shard::MirrorLag| {
        m.contact.is_some() && m.records <= crate::shard::FOLLOWER_READ_MAX_LAG
    };
    let here = broker
        .replica_state(&topic, p)
        .await
        .is_ok_and(|s| s.mirror.as_ref().is_some_and(ready));
    if !here {
        return;
    }
    for node in &new[1..] {
        let req = crate::proto::v1::DescribeTopicRequest {
            name: t.name.clone(),
        };
        let r = broker
            .call_peer(*node, |mut c| async move { c.describe_topic(req).await })
            .await;
        let caught_up = r.is_ok_and(|r| {
            r.partitions.iter().any(|x| {
                x.partition == p
                    && x.local
                    && x.mirror.as_ref().is_some_and(|m| {
                        m.contact_ms.is_some()
                            && m.lag_records <= crate::shard::FOLLOWER_READ_MAX_LAG
                    })
            })
        });
        if !caught_up {
            return;
        }
    }
    let cmd = Command::FinishMove {
        topic: t.name.clone(),
        uid: t.uid,
        partition: p,
        replicas: target.to_vec(),
    };
    match propose(broker, &cmd).await {
        Ok(_) => tracing::info!(partition = %key, replicas = ?target, "mirror partition moved"),
        Err(e) => {
            tracing::warn!(partition = %key, error = %e, "recording a finished move failed; will retry")
        }
    }
}

/// Names the cluster (the first metadata leader does, once): every call between nodes carries
/// the id from then on.
async fn name_cluster(broker: &Arc<Broker>) -> Result<()> {
    let id = match broker.cluster_id.get() {
        "" => new_cluster_id(),
        known => known.to_string(),
    };
    let at = propose(broker, &Command::InitCluster { id }).await?;
    wait_applied(broker, at).await
}

/// A random cluster id: 128 bits, in the 8-4-4-4-12 hex form of a UUID.
fn new_cluster_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // The OS's generator failed (it does not, in practice): the time is unique enough to
        // tell clusters apart, which is all the id is for.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = t.to_le_bytes();
    }
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// On the metadata leader: keeps the metadata group's membership in line with the registered
/// nodes, and drives the removal of draining nodes.
async fn lead_metadata(broker: &Arc<Broker>) -> Result<()> {
    let key = PartitionKey::metadata();
    let core = broker.shards.core_of(&key);
    let group = broker
        .shards
        .ask(core, |reply| CoreRequest::Replica {
            key: key.clone(),
            reply,
        })
        .await?;
    if !group.is_leader {
        return Ok(());
    }
    let state = broker.cluster();
    if state.cluster_id.is_none() {
        name_cluster(broker).await?;
    }
    let now = MetadataGroup {
        voters: group.voters,
        learners: group.learners,
        matched: group.matched,
        last_index: group.last_index.unwrap_or_default(),
    };
    let reachable = |id: NodeId| {
        broker
            .transport()
            .is_some_and(|t| t.reachable(id) == Some(true))
    };
    let target = plan::metadata_members(&state, &now, &broker.controllers, reachable);
    if !target.same_as(&now) && !target.voters.is_empty() {
        let target = MemberTarget {
            voters: target.voters,
            learners: target.learners,
        };
        if let Err(e) = step_members(broker, key, target).await {
            tracing::warn!(error = %e, "changing the metadata group's members");
        }
    }
    drain(broker, &state).await
}

/// Moves the replicas off draining nodes (a bounded number at a time) and removes the nodes
/// that hold none any more.
async fn drain(broker: &Arc<Broker>, state: &ClusterState) -> Result<()> {
    if state.draining.is_empty() {
        return Ok(());
    }
    let plan = plan::drain(state, DRAIN_MOVES_AT_ONCE);
    for (node, topic, partition) in &plan.stuck {
        tracing::warn!(%node, topic, partition, "no node can take this replica over");
    }
    for cmd in plan.commands {
        propose(broker, &cmd).await?;
        if let Command::RemoveNode { id } = cmd {
            tracing::info!(node = %id, "node removed from the cluster");
        }
    }
    Ok(())
}
