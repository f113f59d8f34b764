//! Rebalancing: the moves that even out how many replicas each node holds. Pure.

use std::collections::{BTreeMap, BTreeSet};

use super::command::Command;
use super::state::ClusterState;
use crate::raft::types::NodeId;
use crate::types::TopicUid;

/// A partition move chosen by [`rebalance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub topic: String,
    /// The topic's incarnation.
    pub uid: TopicUid,
    pub partition: u32,
    pub from: Vec<NodeId>,
    pub to: Vec<NodeId>,
}

impl Move {
    /// The metadata command that starts it.
    pub fn command(&self) -> Command {
        Command::MoveReplicas {
            topic: self.topic.clone(),
            uid: self.uid,
            partition: self.partition,
            target: self.to.clone(),
        }
    }
}

/// Moves that even out how many replicas each node holds (to within one), most loaded nodes
/// giving to least loaded ones, without covering fewer regions or zones than before.
/// Partitions already moving are left alone. At most `max` moves.
pub fn rebalance(state: &ClusterState, max: usize) -> Vec<Move> {
    let mut load: BTreeMap<NodeId, usize> = state
        .placeable()
        .keys()
        .map(|id| (*id, state.replicas_on(*id)))
        .collect();
    let place = |id: &NodeId| {
        state
            .nodes
            .get(id)
            .map(|m| (m.region.clone(), m.zone.clone()))
            .unwrap_or_default()
    };
    let spread = |r: &[NodeId]| {
        let regions: BTreeSet<String> = r.iter().map(|id| place(id).0).collect();
        let zones: BTreeSet<(String, String)> = r.iter().map(place).collect();
        (regions.len(), zones.len())
    };
    let mut moves = Vec::new();
    for t in state.topics.values() {
        for p in 0..t.partitions {
            if moves.len() >= max {
                return moves;
            }
            // Moving already, or on a node being removed (its drain moves it).
            if t.moving.contains_key(&p)
                || t.replicas[p as usize]
                    .iter()
                    .any(|id| !load.contains_key(id))
            {
                continue;
            }
            let mut target = t.replicas[p as usize].clone();
            let before = spread(&target);
            // Replace, one at a time, a replica on a node holding 2+ more than the node taking
            // it over, trying the most loaded replicas first.
            loop {
                let mut slots: Vec<usize> = (0..target.len()).collect();
                slots.sort_by_key(|i| (std::cmp::Reverse(load[&target[*i]]), target[*i]));
                let step = slots.into_iter().find_map(|slot| {
                    let from = target[slot];
                    load.iter()
                        .filter(|(id, _)| !target.contains(id))
                        .filter(|(id, _)| {
                            let mut t2 = target.clone();
                            t2[slot] = **id;
                            // Never break the topic's placement (unless it is broken already).
                            let kept = t.placement.broken_by(&t2, &state.nodes).is_none()
                                || t.placement.broken_by(&target, &state.nodes).is_some();
                            spread(&t2) >= before && kept && t.placement.allows(&place(id).0)
                        })
                        .min_by_key(|(id, n)| (**n, **id))
                        .filter(|(_, n)| load[&from] >= **n + 2)
                        .map(|(id, _)| (slot, from, *id))
                });
                let Some((slot, from, to)) = step else {
                    break;
                };
                target[slot] = to;
                *load.get_mut(&from).expect("loaded node") -= 1;
                *load.get_mut(&to).expect("loaded node") += 1;
            }
            if target != t.replicas[p as usize] {
                moves.push(Move {
                    topic: t.name.clone(),
                    uid: t.uid,
                    partition: p,
                    from: t.replicas[p as usize].clone(),
                    to: target,
                });
            }
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testkit::*;
    use crate::types::NodeId;

    #[test]
    fn rebalance_evens_out_replicas_and_keeps_regions_covered() {
        // Four nodes; every partition on nodes 1-3 (node 4 just joined).
        let s = cluster(
            &[(1, "a"), (2, "b"), (3, "c"), (4, "a")],
            vec![topic(
                "t",
                8,
                (0..8).map(|_| vec![1, 2, 3]).collect::<Vec<_>>(),
            )],
        );
        let moves = rebalance(&s, 100);
        let after = carried_out(&s, &moves);
        // Node 4 is in region a: it can only take node 1's replicas without losing a region.
        for r in &after.topics["t"].replicas {
            let regions: BTreeSet<&str> = r.iter().map(|id| s.nodes[id].region.as_str()).collect();
            assert_eq!(regions.len(), 3, "{r:?}");
        }
        let load: Vec<usize> = (1..=4).map(|n| after.replicas_on(NodeId(n))).collect();
        assert_eq!(load, vec![4, 8, 8, 4], "{moves:?}");
        // Balanced already: nothing more to do; the bound holds.
        assert!(rebalance(&after, 100).is_empty());
        assert_eq!(rebalance(&s, 1).len(), 1);
        // Without regions in the way: 24 replicas over 4 nodes, 6 each.
        let flat = cluster(
            &[(1, "a"), (2, "a"), (3, "a"), (4, "a")],
            vec![topic("t", 8, (0..8).map(|_| vec![1, 2, 3]).collect())],
        );
        let after = carried_out(&flat, &rebalance(&flat, 100));
        let load: Vec<usize> = (1..=4).map(|n| after.replicas_on(NodeId(n))).collect();
        assert_eq!(load, vec![6, 6, 6, 6]);
    }
}
