//! The replicated metadata: commands and the state they build.

use std::collections::{BTreeMap, BTreeSet};

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
    /// Starts moving a partition's replicas to `target` (the first is the preferred leader),
    /// or redirects a move in progress. The partition's leader carries it out.
    MoveReplicas {
        topic: String,
        uid: u64,
        partition: u32,
        target: Vec<NodeId>,
    },
    /// The partition's group now has exactly the move's target as voters: the move is done.
    FinishMove {
        topic: String,
        uid: u64,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// Takes a node out of the cluster, for good (its id is not reused): at once if it holds no
    /// replica, else it is marked draining, its replicas move away, and the metadata leader
    /// proposes this again once it holds none.
    RemoveNode { id: NodeId },
    /// Issues an idempotent producer id: the command's offset in the metadata log plus one
    /// (unique, never reused, the same on every node). Applying it changes nothing.
    AllocateProducerId,
    /// A consumer group's committed offsets on a topic (of incarnation `uid`): per partition,
    /// the next offset to consume.
    CommitOffsets {
        group: String,
        topic: String,
        uid: u64,
        offsets: Vec<(u32, u64)>,
    },
    /// A queue group's progress on one partition: every record below `floor` is settled (acked
    /// or dead-lettered), and so are those at `settled` above it; `counts` are the delivery
    /// counts of records delivered and not settled yet.
    QueueProgress {
        group: String,
        topic: String,
        uid: u64,
        partition: u32,
        floor: u64,
        settled: Vec<u64>,
        counts: Vec<(u64, u32)>,
    },
}

/// Groups (per group and topic) the metadata keeps offsets for.
pub const GROUPS_MAX: usize = 10_000;
/// Offsets above a queue group's floor it keeps track of, per partition.
pub const QUEUE_WINDOW_MAX: usize = 10_000;

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
            Command::MoveReplicas {
                topic,
                partition,
                target: replicas,
                ..
            }
            | Command::FinishMove {
                topic,
                partition,
                replicas,
                ..
            } => {
                super::validate_topic_name(topic)?;
                if *partition >= PARTITIONS_MAX {
                    return Err(format!("partition {partition}"));
                }
                let mut d = replicas.clone();
                d.sort_unstable();
                d.dedup();
                if d.is_empty()
                    || d.len() != replicas.len()
                    || d.len() > REPLICAS_MAX as usize
                    || d.contains(&0)
                {
                    return Err(format!(
                        "replica list {replicas:?}: 1 to {REPLICAS_MAX} distinct node ids"
                    ));
                }
                Ok(())
            }
            Command::RemoveNode { id } => {
                if *id == 0 {
                    return Err("node id 0".into());
                }
                Ok(())
            }
            Command::AllocateProducerId => Ok(()),
            Command::CommitOffsets {
                group,
                topic,
                offsets,
                ..
            } => {
                super::validate_topic_name(group).map_err(|e| format!("group name: {e}"))?;
                super::validate_topic_name(topic)?;
                if offsets.len() > PARTITIONS_MAX as usize
                    || offsets.iter().any(|(p, _)| *p >= PARTITIONS_MAX)
                {
                    return Err("offsets of unknown partitions".into());
                }
                Ok(())
            }
            Command::QueueProgress {
                group,
                topic,
                partition,
                floor,
                settled,
                counts,
                ..
            } => {
                super::validate_topic_name(group).map_err(|e| format!("group name: {e}"))?;
                super::validate_topic_name(topic)?;
                if *partition >= PARTITIONS_MAX {
                    return Err(format!("partition {partition}"));
                }
                if settled.len() > QUEUE_WINDOW_MAX
                    || counts.len() > QUEUE_WINDOW_MAX
                    || settled.iter().any(|o| o < floor)
                    || counts.iter().any(|(o, _)| o < floor)
                {
                    return Err("queue progress out of bounds".into());
                }
                Ok(())
            }
        }
    }

    /// Whether applying it can change which partitions a node should hold (group positions
    /// and producer ids cannot).
    pub fn places_partitions(&self) -> bool {
        !matches!(
            self,
            Command::CommitOffsets { .. }
                | Command::QueueProgress { .. }
                | Command::AllocateProducerId
        )
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
    /// Nodes being removed: their replicas move to other nodes, then they are removed.
    pub draining: BTreeSet<NodeId>,
    /// Nodes removed from the cluster: their ids are not taken back.
    pub removed: BTreeSet<NodeId>,
    /// Consumer and queue groups' committed positions, by (group, topic).
    pub groups: BTreeMap<(String, String), GroupOffsets>,
}

/// A group's positions on one incarnation of a topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupOffsets {
    pub uid: u64,
    /// Written by a queue group (else a stream-mode consumer group).
    pub queue: bool,
    pub partitions: BTreeMap<u32, Cursor>,
}

/// A group's position in one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The next offset to consume (queue mode: every record below it is settled).
    pub offset: u64,
    /// Queue mode: settled offsets above `offset`.
    pub settled: Vec<u64>,
    /// Queue mode: delivery counts of records delivered and not settled.
    pub counts: Vec<(u64, u32)>,
}

impl ClusterState {
    /// Applies a command; returns the topic it deleted, if it deleted one.
    pub fn apply(&mut self, cmd: Command) -> Option<TopicSpec> {
        if cmd.validate().is_err() {
            return None;
        }
        match cmd {
            Command::RegisterNode { id, member } => {
                if !self.removed.contains(&id) {
                    self.nodes.insert(id, member);
                }
            }
            Command::MoveReplicas {
                topic,
                uid,
                partition,
                target,
            } => {
                let known = target.iter().all(|id| self.nodes.contains_key(id));
                if let Some(t) = self.topic_mut(&topic, uid, partition) {
                    let idle = !t.moving.contains_key(&partition);
                    let same = t.replicas[partition as usize] == target;
                    if known && target.len() == t.replication_factor as usize && !(idle && same) {
                        t.moving.insert(partition, target);
                        t.moved.insert(partition);
                    }
                }
            }
            Command::FinishMove {
                topic,
                uid,
                partition,
                replicas,
            } => {
                if let Some(t) = self.topic_mut(&topic, uid, partition) {
                    if t.moving.get(&partition) == Some(&replicas) {
                        t.moving.remove(&partition);
                        t.replicas[partition as usize] = replicas;
                    }
                }
            }
            Command::RemoveNode { id } => {
                if self.nodes.contains_key(&id) {
                    if self.replicas_on(id) == 0 {
                        self.nodes.remove(&id);
                        self.draining.remove(&id);
                        self.removed.insert(id);
                    } else {
                        self.draining.insert(id);
                    }
                }
            }
            Command::CreateTopic { spec } => {
                if !self.topics.contains_key(&spec.name) {
                    self.topics.insert(spec.name.clone(), spec);
                }
            }
            Command::DeleteTopic { name, uid } => {
                if self.topics.get(&name).is_some_and(|t| t.uid == uid) {
                    self.groups.retain(|(_, t), _| *t != name);
                    return self.topics.remove(&name);
                }
            }
            Command::AllocateProducerId => {}
            Command::CommitOffsets {
                group,
                topic,
                uid,
                offsets,
            } => {
                let n = self.topics.get(&topic).map_or(0, |t| t.partitions);
                if let Some(g) = self.group_mut(group, topic, uid) {
                    g.queue = false;
                    for (p, o) in offsets.into_iter().filter(|(p, _)| *p < n) {
                        let c = g.partitions.entry(p).or_default();
                        c.offset = o;
                        c.settled.clear();
                        c.counts.clear();
                    }
                }
            }
            Command::QueueProgress {
                group,
                topic,
                uid,
                partition,
                floor,
                settled,
                counts,
            } => {
                let n = self.topics.get(&topic).map_or(0, |t| t.partitions);
                if partition >= n {
                    return None;
                }
                if let Some(g) = self.group_mut(group, topic, uid) {
                    g.queue = true;
                    g.partitions.insert(
                        partition,
                        Cursor {
                            offset: floor,
                            settled,
                            counts,
                        },
                    );
                }
            }
        }
        None
    }
}

impl ClusterState {
    /// A group's positions on a topic, created if there is room; `None` if the topic is not
    /// that incarnation. Positions of an earlier incarnation are dropped.
    fn group_mut(&mut self, group: String, topic: String, uid: u64) -> Option<&mut GroupOffsets> {
        if self.topics.get(&topic).is_none_or(|t| t.uid != uid) {
            return None;
        }
        let key = (group, topic);
        if !self.groups.contains_key(&key) && self.groups.len() >= GROUPS_MAX {
            return None;
        }
        let g = self.groups.entry(key).or_default();
        if g.uid != uid {
            *g = GroupOffsets {
                uid,
                ..GroupOffsets::default()
            };
        }
        Some(g)
    }

    fn topic_mut(&mut self, name: &str, uid: u64, partition: u32) -> Option<&mut TopicSpec> {
        self.topics
            .get_mut(name)
            .filter(|t| t.uid == uid && partition < t.partitions)
    }

    /// The nodes new replicas may go to: registered and not being removed.
    pub fn placeable(&self) -> BTreeMap<NodeId, Member> {
        self.nodes
            .iter()
            .filter(|(id, _)| !self.draining.contains(id))
            .map(|(id, m)| (*id, m.clone()))
            .collect()
    }

    /// How many partitions `node` holds or is receiving.
    pub fn replicas_on(&self, node: NodeId) -> usize {
        self.topics
            .values()
            .map(|t| (0..t.partitions).filter(|p| t.holds(node, *p)).count())
            .sum()
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

/// A partition move chosen by [`rebalance`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub topic: String,
    /// The topic's incarnation.
    pub uid: u64,
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
                            spread(&t2) >= before
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
            moving: Default::default(),
            moved: Default::default(),
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

    fn topic(name: &str, partitions: u32, replicas: Vec<Vec<NodeId>>) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            uid: 7,
            partitions,
            replication_factor: replicas[0].len() as u32,
            settings: crate::cluster::TopicSettings {
                retention_ms: None,
                retention_bytes: None,
                fsync_interval_ms: None,
                max_record_bytes: 10,
                segment_bytes: 1 << 20,
            },
            replicas,
            created_ms: 0,
            moving: Default::default(),
            moved: Default::default(),
        }
    }

    fn cluster(nodes: &[(NodeId, &str)], topics: Vec<TopicSpec>) -> ClusterState {
        let mut s = ClusterState::default();
        for (id, region) in nodes {
            s.apply(Command::RegisterNode {
                id: *id,
                member: member(region, "z"),
            });
        }
        for spec in topics {
            s.apply(Command::CreateTopic { spec });
        }
        s
    }

    #[test]
    fn a_move_starts_finishes_only_as_recorded_and_validates() {
        let mut s = cluster(
            &[(1, "r"), (2, "r"), (3, "r"), (4, "r")],
            vec![topic("t", 2, vec![vec![1, 2, 3], vec![2, 3, 1]])],
        );
        let mv = |target: Vec<NodeId>| Command::MoveReplicas {
            topic: "t".into(),
            uid: 7,
            partition: 0,
            target,
        };
        // Unknown node, wrong length, wrong incarnation, bad partition: nothing changes.
        let before = s.clone();
        s.apply(mv(vec![1, 2, 9]));
        s.apply(mv(vec![1, 4]));
        s.apply(Command::MoveReplicas {
            topic: "t".into(),
            uid: 8,
            partition: 0,
            target: vec![4, 2, 3],
        });
        s.apply(Command::MoveReplicas {
            topic: "t".into(),
            uid: 7,
            partition: 2,
            target: vec![4, 2, 3],
        });
        assert_eq!(s, before);
        assert!(mv(vec![4, 4, 3]).validate().is_err());
        assert!(mv(vec![]).validate().is_err());
        // A move: node 4 holds the partition from now on (receiving), node 1 until it ends.
        s.apply(mv(vec![4, 2, 3]));
        let t = &s.topics["t"];
        assert_eq!(t.moving[&0], vec![4, 2, 3]);
        assert!(t.moved.contains(&0));
        assert!(t.holds(4, 0) && t.holds(1, 0));
        assert_eq!(s.replicas_on(4), 1);
        // Finishing with another list than the move's does nothing.
        let finish = |replicas: Vec<NodeId>| Command::FinishMove {
            topic: "t".into(),
            uid: 7,
            partition: 0,
            replicas,
        };
        s.apply(finish(vec![4, 2, 1]));
        assert!(s.topics["t"].moving.contains_key(&0));
        s.apply(finish(vec![4, 2, 3]));
        let t = &s.topics["t"];
        assert!(t.moving.is_empty());
        assert_eq!(t.replicas[0], vec![4, 2, 3]);
        assert!(!t.holds(1, 0));
        // Round trip through the log's encoding.
        let c = Command::decode(&mv(vec![1, 2, 3]).encode()).unwrap();
        assert_eq!(c, mv(vec![1, 2, 3]));
    }

    #[test]
    fn removing_a_node_drains_it_first_and_its_id_is_not_taken_back() {
        let mut s = cluster(
            &[(1, "r"), (2, "r"), (3, "r"), (4, "r")],
            vec![topic("t", 1, vec![vec![1, 2, 3]])],
        );
        s.apply(Command::RemoveNode { id: 1 });
        assert!(s.draining.contains(&1) && s.nodes.contains_key(&1));
        assert!(!s.placeable().contains_key(&1));
        // Its replica goes to the node that holds none (the draining node is never chosen).
        assert_eq!(replacement(&s, &[2, 3], &[1]), Some(4));
        s.apply(Command::MoveReplicas {
            topic: "t".into(),
            uid: 7,
            partition: 0,
            target: vec![4, 2, 3],
        });
        s.apply(Command::RemoveNode { id: 1 });
        assert!(
            s.nodes.contains_key(&1),
            "still receiving nothing but holding"
        );
        s.apply(Command::FinishMove {
            topic: "t".into(),
            uid: 7,
            partition: 0,
            replicas: vec![4, 2, 3],
        });
        s.apply(Command::RemoveNode { id: 1 });
        assert!(!s.nodes.contains_key(&1) && s.removed.contains(&1));
        assert!(s.draining.is_empty());
        s.apply(Command::RegisterNode {
            id: 1,
            member: member("r", "z"),
        });
        assert!(!s.nodes.contains_key(&1), "a removed id came back");
        assert_eq!(replacement(&s, &[2, 3, 4], &[]), None);
    }

    /// The state after the moves started and finished.
    fn carried_out(s: &ClusterState, moves: &[Move]) -> ClusterState {
        let mut after = s.clone();
        for m in moves {
            after.apply(m.command());
            after.apply(Command::FinishMove {
                topic: m.topic.clone(),
                uid: m.uid,
                partition: m.partition,
                replicas: m.to.clone(),
            });
        }
        after
    }

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
        let load: Vec<usize> = (1..=4).map(|n| after.replicas_on(n)).collect();
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
        let load: Vec<usize> = (1..=4).map(|n| after.replicas_on(n)).collect();
        assert_eq!(load, vec![6, 6, 6, 6]);
    }
}
