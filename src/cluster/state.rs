//! The replicated metadata: commands and the state they build.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::topic::TopicSpec;
use crate::raft::types::{Member, NodeId};

/// Largest encoded command accepted.
pub const COMMAND_MAX_BYTES: usize = 1 << 20;

/// A change to the cluster metadata: one record of the metadata log, as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// A node says where it is reachable and where it stands.
    RegisterNode { id: NodeId, member: Member },
    /// Creates a topic unless one of that name exists.
    CreateTopic { spec: TopicSpec },
    /// Deletes the topic of that name and incarnation, if it exists.
    DeleteTopic { name: String, uid: u64 },
}

/// Bounds a command must respect: it may come from a peer, and every node applies it.
pub const PARTITIONS_MAX: u32 = 1 << 16;
pub const REPLICAS_MAX: u32 = 16;

impl Command {
    /// Checks a command's shape. An invalid command is refused when proposed and, should one
    /// be in the log anyway, skipped by every node alike when applied.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Command::RegisterNode { id, member } => {
                if *id == 0 {
                    return Err("node id 0".into());
                }
                if member.addr.is_empty() || member.addr.len() > 255 {
                    return Err("node address must be 1 to 255 bytes".into());
                }
                if member.region.len() > 64 || member.zone.len() > 64 {
                    return Err("region and zone are at most 64 bytes".into());
                }
                Ok(())
            }
            Command::CreateTopic { spec } => {
                super::validate_topic_name(&spec.name)?;
                if !(1..=PARTITIONS_MAX).contains(&spec.partitions) {
                    return Err(format!("{} partitions", spec.partitions));
                }
                if !(1..=REPLICAS_MAX).contains(&spec.replication_factor) {
                    return Err(format!("replication factor {}", spec.replication_factor));
                }
                if spec.replicas.len() != spec.partitions as usize {
                    return Err("one replica list per partition".into());
                }
                for r in &spec.replicas {
                    let mut d = r.clone();
                    d.sort_unstable();
                    d.dedup();
                    if d.len() != r.len() || r.len() != spec.replication_factor as usize {
                        return Err(format!("replica list {r:?}"));
                    }
                }
                let s = &spec.settings;
                if s.max_record_bytes == 0 || s.segment_bytes < 1 << 20 {
                    return Err("bad topic settings".into());
                }
                Ok(())
            }
            Command::DeleteTopic { name, .. } => super::validate_topic_name(name),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Command, String> {
        if b.len() > COMMAND_MAX_BYTES {
            return Err(format!("metadata command of {} bytes", b.len()));
        }
        serde_json::from_slice(b).map_err(|e| format!("malformed metadata command: {e}"))
    }
}

/// What every node knows of the cluster, built by applying the committed commands in order.
/// Applying is deterministic and never fails: a command that does not apply (a topic that
/// already exists) changes nothing, and its proposer sees that.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, Member>,
    pub topics: BTreeMap<String, TopicSpec>,
}

impl ClusterState {
    /// Applies a command; returns the topic it deleted, if it deleted one.
    pub fn apply(&mut self, cmd: Command) -> Option<TopicSpec> {
        if cmd.validate().is_err() {
            return None;
        }
        match cmd {
            Command::RegisterNode { id, member } => {
                self.nodes.insert(id, member);
            }
            Command::CreateTopic { spec } => {
                if !self.topics.contains_key(&spec.name) {
                    self.topics.insert(spec.name.clone(), spec);
                }
            }
            Command::DeleteTopic { name, uid } => {
                if self.topics.get(&name).is_some_and(|t| t.uid == uid) {
                    return self.topics.remove(&name);
                }
            }
        }
        None
    }
}

/// Chooses the replicas of each partition: `rf` distinct nodes, spread so that consecutive
/// partitions start on different nodes (leaders spread out), and the replicas of a partition
/// cover as many regions, then zones, as there are.
pub fn assign_replicas(
    nodes: &BTreeMap<NodeId, Member>,
    partitions: u32,
    rf: u32,
) -> Result<Vec<Vec<NodeId>>, String> {
    let n = nodes.len();
    if rf as usize > n {
        return Err(format!(
            "replication factor {rf} needs {rf} nodes; the cluster has {n}"
        ));
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

    fn member(region: &str, zone: &str) -> Member {
        Member {
            addr: "x:1".into(),
            region: region.into(),
            zone: zone.into(),
        }
    }

    #[test]
    fn replicas_are_distinct_spread_and_bounded() {
        let nodes: BTreeMap<_, _> = [
            (1, member("eu", "a")),
            (2, member("eu", "a")),
            (3, member("eu", "b")),
            (4, member("us", "a")),
            (5, member("us", "b")),
            (6, member("ap", "a")),
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

    #[test]
    fn commands_apply_deterministically() {
        let spec = |uid| TopicSpec {
            name: "t".into(),
            uid,
            partitions: 1,
            replication_factor: 1,
            settings: crate::cluster::TopicSettings {
                retention_ms: None,
                retention_bytes: None,
                fsync_interval_ms: None,
                max_record_bytes: 10,
                segment_bytes: 1 << 20,
            },
            replicas: vec![vec![1]],
            created_ms: 0,
        };
        let mut s = ClusterState::default();
        s.apply(Command::CreateTopic { spec: spec(1) });
        // A second create of the name does not replace the first.
        s.apply(Command::CreateTopic { spec: spec(2) });
        assert_eq!(s.topics["t"].uid, 1);
        // A delete of another incarnation does nothing.
        s.apply(Command::DeleteTopic {
            name: "t".into(),
            uid: 2,
        });
        assert!(s.topics.contains_key("t"));
        let enc = Command::DeleteTopic {
            name: "t".into(),
            uid: 1,
        }
        .encode();
        let deleted = s.apply(Command::decode(&enc).unwrap());
        assert_eq!(deleted.map(|t| t.uid), Some(1));
        assert!(s.topics.is_empty());
        assert!(Command::decode(b"{\"op\":\"nope\"}").is_err());
        // Invalid commands change nothing, on every node alike.
        let mut bad = spec(3);
        bad.name = "other".into();
        bad.replicas = vec![vec![1, 1]];
        bad.replication_factor = 2;
        let cmd = Command::CreateTopic { spec: bad };
        assert!(cmd.validate().is_err());
        s.apply(cmd);
        assert!(s.topics.is_empty());
    }
}
