//! Where replicas go: a new topic's replica lists, and the node that takes over a replica,
//! within the topic's placement (survival goal, regions, leader regions). Pure functions of the
//! metadata.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::command::REGIONS_MAX;
use super::error::ClusterError;
use super::state::ClusterState;
use crate::raft::types::{Member, NodeId};

/// What a partition must survive losing, as CockroachDB's survival goals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Survival {
    /// No goal: replicas spread over as many regions, then zones, as there are.
    #[default]
    Spread,
    /// A zone: every replica in the home region, no zone holding a quorum of them. Publishes
    /// are acknowledged within the region.
    Zone,
    /// A region: replicas in at least three regions, no region holding a quorum. A publish
    /// waits for the nearest other region.
    Region,
}

impl Survival {
    pub fn name(self) -> &'static str {
        match self {
            Survival::Spread => "spread",
            Survival::Zone => "zone",
            Survival::Region => "region",
        }
    }
}

/// Where a topic's replicas and leaders go.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    #[serde(default)]
    pub survival: Survival,
    /// Regions the replicas may use (empty: any). With zone survival, exactly one: the home
    /// region.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// Regions whose replicas should lead, the most preferred first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leader_regions: Vec<String>,
}

impl Placement {
    pub fn is_default(&self) -> bool {
        *self == Placement::default()
    }

    /// Checks the shape (not whether the nodes can meet it).
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |why: String| Err(ClusterError::Placement(why));
        for (what, list) in [
            ("regions", &self.regions),
            ("leader regions", &self.leader_regions),
        ] {
            if list.len() > REGIONS_MAX {
                return bad(format!("at most {REGIONS_MAX} {what}"));
            }
            let mut seen = BTreeSet::new();
            for r in list {
                if r.is_empty() || r.len() > 64 {
                    return bad(format!("{what}: a region name is 1 to 64 bytes"));
                }
                if !seen.insert(r) {
                    return bad(format!("{what}: {r} is listed twice"));
                }
            }
        }
        if self.survival == Survival::Zone && self.regions.len() > 1 {
            return bad(format!(
                "zone survival keeps every replica in one home region; {} were given",
                self.regions.len()
            ));
        }
        if let Some(r) = self
            .leader_regions
            .iter()
            .find(|r| !self.regions.is_empty() && !self.regions.contains(r))
        {
            return bad(format!(
                "leader region {r} is not among the topic's regions ({})",
                self.regions.join(", ")
            ));
        }
        Ok(())
    }

    /// Whether a replica may go on a node in `region`.
    pub fn allows(&self, region: &str) -> bool {
        self.regions.is_empty() || self.regions.iter().any(|r| r == region)
    }

    /// Why `replicas` break the survival goal, if they do (`None`: they meet it).
    pub fn broken_by(
        &self,
        replicas: &[NodeId],
        nodes: &BTreeMap<NodeId, Member>,
    ) -> Option<String> {
        let place = |id: &NodeId| nodes.get(id).map(|m| (m.region.as_str(), m.zone.as_str()));
        if let Some(id) = replicas
            .iter()
            .find(|id| place(id).is_none_or(|(r, _)| !self.allows(r)))
        {
            return Some(format!(
                "node {id} is outside the topic's regions ({})",
                self.regions.join(", ")
            ));
        }
        let quorum = replicas.len() / 2 + 1;
        let most = |key: &dyn Fn(&NodeId) -> String| {
            let mut count: BTreeMap<String, usize> = BTreeMap::new();
            for id in replicas {
                *count.entry(key(id)).or_default() += 1;
            }
            (count.len(), count.into_values().max().unwrap_or(0))
        };
        match self.survival {
            Survival::Spread => None,
            Survival::Zone => {
                let (_, per_zone) = most(&|id| {
                    let (r, z) = place(id).unwrap_or_default();
                    format!("{r}/{z}")
                });
                let (regions, _) = most(&|id| place(id).unwrap_or_default().0.to_string());
                if regions > 1 {
                    Some("zone survival keeps every replica in one region".into())
                } else if per_zone >= quorum {
                    Some(format!(
                        "zone survival needs no zone to hold a quorum ({quorum} of {}): \
                         the replicas need more zones or a replication factor of at least 3",
                        replicas.len()
                    ))
                } else {
                    None
                }
            }
            Survival::Region => {
                let (regions, per_region) = most(&|id| place(id).unwrap_or_default().0.to_string());
                if regions < 3 || per_region >= quorum {
                    Some(format!(
                        "region survival needs replicas in at least 3 regions, none holding a \
                         quorum ({quorum} of {}); these cover {regions}",
                        replicas.len()
                    ))
                } else {
                    None
                }
            }
        }
    }

    /// Puts a replica of the most preferred leader region that has one first (the preferred
    /// leader), keeping the others' order.
    pub fn order_leader(&self, replicas: &mut [NodeId], nodes: &BTreeMap<NodeId, Member>) {
        for want in &self.leader_regions {
            if let Some(i) = replicas
                .iter()
                .position(|id| nodes.get(id).is_some_and(|m| &m.region == want))
            {
                replicas[..=i].rotate_right(1);
                return;
            }
        }
    }

    /// The rank of `region` among the leader regions (lower is preferred; `None`: not listed).
    pub fn leader_rank(&self, region: &str) -> Option<usize> {
        self.leader_regions.iter().position(|r| r == region)
    }
}

/// Chooses the replicas of each partition: `rf` distinct nodes, spread so that consecutive
/// partitions start on different nodes (leaders spread out), and the replicas of a partition
/// cover as many regions, then zones, as there are.
pub fn assign_replicas(
    all: &BTreeMap<NodeId, Member>,
    partitions: u32,
    rf: u32,
    placement: &Placement,
) -> Result<Vec<Vec<NodeId>>, ClusterError> {
    placement.validate()?;
    let nodes: BTreeMap<NodeId, Member> = all
        .iter()
        .filter(|(_, m)| placement.allows(&m.region))
        .map(|(id, m)| (*id, m.clone()))
        .collect();
    let nodes = &nodes;
    let n = nodes.len();
    if rf as usize > n {
        if !placement.regions.is_empty() {
            return Err(ClusterError::Placement(format!(
                "replication factor {rf} needs {rf} nodes in the topic's regions ({}); they have {n}",
                placement.regions.join(", ")
            )));
        }
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
    let assigned: Vec<Vec<NodeId>> = (0..partitions as usize)
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
                        // The least used region, so that no region gathers a quorum.
                        let region_used = chosen.iter().filter(|c| place(c).0 == region).count();
                        let zone_used = chosen.iter().any(|c| place(c) == (region, zone));
                        (region_used, zone_used, *k)
                    })
                    .map(|(_, id)| id)
                    .expect("rf <= n leaves a candidate");
                chosen.push(next);
            }
            placement.order_leader(&mut chosen, nodes);
            chosen
        })
        .collect();
    // The spread is the widest the nodes allow: if the first partition breaks the goal, the
    // nodes cannot meet it.
    if let Some(why) = assigned.first().and_then(|r| placement.broken_by(r, nodes)) {
        return Err(ClusterError::Placement(why));
    }
    Ok(assigned)
}

/// The node that best takes over a replica of a partition held by `others` (plus the one
/// leaving): not among them, then from a region the others do not cover, then a zone, then the
/// node holding the fewest replicas, then the lowest id. `None` if no node is left.
pub fn replacement(
    state: &ClusterState,
    others: &[NodeId],
    exclude: &[NodeId],
    placement: &Placement,
) -> Option<NodeId> {
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
        .filter(|id| placement.allows(place(id).0))
        .min_by_key(|id| {
            let (region, zone) = place(id);
            let region_used = others.iter().any(|o| place(o).0 == region);
            let zone_used = others.iter().any(|o| place(o) == (region, zone));
            let mut with: Vec<NodeId> = others.to_vec();
            with.push(**id);
            let breaks = placement.broken_by(&with, &state.nodes).is_some();
            (
                breaks,
                region_used,
                zone_used,
                state.replicas_on(**id),
                **id,
            )
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
        let a = assign_replicas(&nodes, 12, 3, &Placement::default()).unwrap();
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
        assert!(assign_replicas(&nodes, 1, 7, &Placement::default()).is_err());
    }

    fn geo_nodes() -> BTreeMap<NodeId, Member> {
        [
            (NodeId(1), member("a", "1")),
            (NodeId(2), member("a", "2")),
            (NodeId(3), member("a", "3")),
            (NodeId(4), member("b", "1")),
            (NodeId(5), member("b", "2")),
            (NodeId(6), member("c", "1")),
            (NodeId(7), member("c", "2")),
        ]
        .into()
    }

    fn regions(r: &[NodeId], nodes: &BTreeMap<NodeId, Member>) -> Vec<String> {
        r.iter().map(|id| nodes[id].region.clone()).collect()
    }

    #[test]
    fn zone_survival_keeps_replicas_home_across_zones() {
        let nodes = geo_nodes();
        let p = Placement {
            survival: Survival::Zone,
            regions: vec!["a".into()],
            ..Placement::default()
        };
        for r in assign_replicas(&nodes, 6, 3, &p).unwrap() {
            assert_eq!(regions(&r, &nodes), ["a", "a", "a"]);
            let zones: BTreeSet<_> = r.iter().map(|id| nodes[id].zone.clone()).collect();
            assert_eq!(zones.len(), 3, "{r:?}");
        }
        // Region b has two zones: three replicas there put a quorum in one zone.
        let b = Placement {
            regions: vec!["b".into()],
            ..p.clone()
        };
        let e = assign_replicas(&nodes, 1, 3, &b).unwrap_err();
        assert!(matches!(e, ClusterError::Placement(_)), "{e}");
        // One replica survives nothing.
        assert!(assign_replicas(&nodes, 1, 1, &p).is_err());
    }

    #[test]
    fn region_survival_needs_three_regions_and_pins_leaders() {
        let nodes = geo_nodes();
        let p = Placement {
            survival: Survival::Region,
            leader_regions: vec!["b".into(), "a".into()],
            ..Placement::default()
        };
        for r in assign_replicas(&nodes, 8, 3, &p).unwrap() {
            let rs: BTreeSet<_> = regions(&r, &nodes).into_iter().collect();
            assert_eq!(rs.len(), 3, "{r:?}");
            assert_eq!(nodes[&r[0]].region, "b", "the pinned region leads: {r:?}");
        }
        // Five replicas over three regions: 2 + 2 + 1, no region a quorum.
        for r in assign_replicas(&nodes, 4, 5, &p).unwrap() {
            assert!(p.broken_by(&r, &nodes).is_none(), "{r:?}");
        }
        let two = Placement {
            survival: Survival::Region,
            regions: vec!["a".into(), "b".into()],
            ..Placement::default()
        };
        assert!(assign_replicas(&nodes, 1, 3, &two).is_err());
        let bad = Placement {
            regions: vec!["a".into()],
            leader_regions: vec!["b".into()],
            ..Placement::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn an_explicit_region_list_confines_replicas_and_their_replacements() {
        let nodes = geo_nodes();
        let p = Placement {
            regions: vec!["b".into(), "c".into()],
            ..Placement::default()
        };
        let a = assign_replicas(&nodes, 4, 3, &p).unwrap();
        for r in &a {
            assert!(regions(r, &nodes).iter().all(|g| g != "a"), "{r:?}");
        }
        let mut state = ClusterState {
            nodes: nodes.clone(),
            ..ClusterState::default()
        };
        state.topics.insert(
            "t".into(),
            crate::cluster::testkit::topic("t", 1, vec![a[0].iter().map(|n| n.0).collect()]),
        );
        // Replace a replica: only a node of b or c will do.
        let leaving = a[0][0];
        let others: Vec<NodeId> = a[0][1..].to_vec();
        let to = replacement(&state, &others, &[leaving], &p).unwrap();
        assert_ne!(nodes[&to].region, "a");
        // Region survival prefers the node that keeps three regions.
        let s = Placement {
            survival: Survival::Region,
            ..Placement::default()
        };
        let to = replacement(&state, &[NodeId(1), NodeId(4)], &[NodeId(6)], &s).unwrap();
        assert_eq!(nodes[&to].region, "c");
    }
}
