//! Where replicas go: a new topic's replica lists, and the node that takes over a replica.
//! Pure functions of the metadata.

use std::collections::BTreeMap;

use super::error::ClusterError;
use super::state::ClusterState;
use crate::raft::types::{Member, NodeId};

/// Chooses the replicas of each partition: `rf` distinct nodes, spread so that consecutive
/// partitions start on different nodes (leaders spread out), and the replicas of a partition
/// cover as many regions, then zones, as there are.
pub fn assign_replicas(
    nodes: &BTreeMap<NodeId, Member>,
    partitions: u32,
    rf: u32,
) -> Result<Vec<Vec<NodeId>>, ClusterError> {
    let n = nodes.len();
    if rf as usize > n {
        return Err(ClusterError::NotEnoughNodes { rf, nodes: n });
    }
    // Interleave nodes across regions, and zones within them, so that any `rf` consecutive
    // nodes of the ring are as spread as possible.
    let mut by_place: BTreeMap<(&str, &str), Vec<NodeId>> = BTreeMap::new();
    for (id, m) in nodes {
        by_place
            .entry((m.region.as_str(), m.zone.as_str()))
            .or_default()
            .push(*id);
    }
    let mut by_region: BTreeMap<&str, Vec<Vec<NodeId>>> = BTreeMap::new();
    for ((region, _), ids) in by_place {
        by_region.entry(region).or_default().push(ids);
    }
    // Within a region: round robin over its zones.
    let regions: Vec<Vec<NodeId>> = by_region.into_values().map(round_robin).collect();
    let ring = round_robin(regions);
    let place = |id: &NodeId| {
        let m = &nodes[id];
        (m.region.as_str(), m.zone.as_str())
    };
    Ok((0..partitions as usize)
        .map(|p| {
            // The preferred leader walks the ring; each further replica is the next node in
            // ring order from a region not used yet, else a zone not used yet, else any.
            let start = p % n;
            let mut chosen = vec![ring[start]];
            while chosen.len() < rf as usize {
                let next = (1..n)
                    .map(|k| (k, ring[(start + k) % n]))
                    .filter(|(_, id)| !chosen.contains(id))
                    .min_by_key(|(k, id)| {
                        let (region, zone) = place(id);
                        let region_used = chosen.iter().any(|c| place(c).0 == region);
                        let zone_used = chosen.iter().any(|c| place(c) == (region, zone));
                        (region_used, zone_used, *k)
                    })
                    .map(|(_, id)| id)
                    .expect("rf <= n leaves a candidate");
                chosen.push(next);
            }
            chosen
        })
        .collect())
}

/// The node that best takes over a replica of a partition held by `others` (plus the one
/// leaving): not among them, then from a region the others do not cover, then a zone, then the
/// node holding the fewest replicas, then the lowest id. `None` if no node is left.
pub fn replacement(state: &ClusterState, others: &[NodeId], exclude: &[NodeId]) -> Option<NodeId> {
    let place = |id: &NodeId| {
        state
            .nodes
            .get(id)
            .map(|m| (m.region.as_str(), m.zone.as_str()))
            .unwrap_or(("", ""))
    };
    state
        .nodes
        .keys()
        .filter(|id| !others.contains(id) && !exclude.contains(id))
        .filter(|id| !state.draining.contains(id))
        .min_by_key(|id| {
            let (region, zone) = place(id);
            let region_used = others.iter().any(|o| place(o).0 == region);
            let zone_used = others.iter().any(|o| place(o) == (region, zone));
            (region_used, zone_used, state.replicas_on(**id), **id)
        })
        .copied()
}

fn round_robin(lists: Vec<Vec<NodeId>>) -> Vec<NodeId> {
    let longest = lists.iter().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::new();
    for i in 0..longest {
        for l in &lists {
            if let Some(id) = l.get(i) {
                out.push(*id);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testkit::*;
    use crate::types::NodeId;

    #[test]
    fn replicas_are_distinct_spread_and_bounded() {
        let nodes: BTreeMap<_, _> = [
            (NodeId(1), member("eu", "a")),
            (NodeId(2), member("eu", "a")),
            (NodeId(3), member("eu", "b")),
            (NodeId(4), member("us", "a")),
            (NodeId(5), member("us", "b")),
            (NodeId(6), member("ap", "a")),
        ]
        .into();
        let a = assign_replicas(&nodes, 12, 3).unwrap();
        let mut leaders = BTreeMap::new();
        for r in &a {
            assert_eq!(r.len(), 3);
            let mut d = r.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3, "{r:?}");
            // Three regions exist: every partition has a replica in each.
            let regions: std::collections::BTreeSet<_> =
                r.iter().map(|id| nodes[id].region.clone()).collect();
            assert_eq!(regions.len(), 3, "{r:?}");
            *leaders.entry(r[0]).or_insert(0) += 1;
        }
        // Preferred leaders spread over all six nodes, twice each.
        assert_eq!(leaders.len(), 6);
        assert!(leaders.values().all(|&c| c == 2), "{leaders:?}");
        assert!(assign_replicas(&nodes, 1, 7).is_err());
    }
}
