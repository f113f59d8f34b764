//! Decisions the controller takes from the metadata, as pure functions (tested here without
//! nodes): which partitions a node opens and closes, what a drain does next, and who the
//! metadata group's members should be.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::command::Command;
use super::placement::replacement;
use super::state::ClusterState;
use super::topic::TopicSpec;
use crate::raft::types::{Member, NodeId};
use crate::types::{RaftIndex, TopicUid};

/// A partition a node should hold, as the metadata says: (topic, partition).
pub type PartitionId = (String, u32);

/// A partition replica to open on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub topic: String,
    pub partition: u32,
    /// The topic's incarnation.
    pub uid: TopicUid,
    /// The voters to initialize a new group with: the replicas of the partition as the topic
    /// was created, when this node is one of them and the partition never moved. Empty: the
    /// replica joins its group (it was added by a move) and waits for the leader.
    pub voters: BTreeMap<NodeId, Member>,
    /// Of a new group's voters, the one that campaigns first: the first replica in the
    /// topic's most preferred leader region, or the first replica (placement starts
    /// consecutive partitions on different nodes, so leadership starts spread out). `None`
    /// when joining.
    pub first: Option<NodeId>,
}

/// What a node opens and closes to hold what the metadata says it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconcile {
    /// Open replicas that must go: their topic was deleted, their partition moved away, or
    /// they are of another incarnation. (A replaced incarnation is closed, then opened anew.)
    pub close: Vec<PartitionId>,
    pub open: Vec<Open>,
    /// Partitions this node should open but cannot yet: a replica's node is not registered
    /// (its address is unknown), so the group could not be initialized identically everywhere.
    pub waiting: Vec<PartitionId>,
}

/// The difference between what `node` holds and what `open` says is open on it (partition →
/// incarnation).
pub fn reconcile(
    state: &ClusterState,
    node: NodeId,
    open: &HashMap<PartitionId, TopicUid>,
) -> Reconcile {
    let mut want: BTreeMap<PartitionId, &TopicSpec> = BTreeMap::new();
    for spec in state.topics.values() {
        for p in 0..spec.partitions {
            if spec.holds(node, p) {
                want.insert((spec.name.clone(), p), spec);
            }
        }
    }
    let mut plan = Reconcile::default();
    for (id, uid) in open {
        if want.get(id).is_none_or(|s| s.uid != *uid) {
            plan.close.push(id.clone());
        }
    }
    plan.close.sort();
    for ((topic, p), spec) in want {
        if open.get(&(topic.clone(), p)) == Some(&spec.uid) {
            continue;
        }
        // A replica of the group as created initializes it with the creation's replicas; one
        // added by a move (or of a partition moved since) joins it.
        let replicas = &spec.replicas[p as usize];
        let initial = !spec.moved.contains(&p) && replicas.contains(&node);
        let voters: BTreeMap<NodeId, Member> = replicas
            .iter()
            .filter(|_| initial)
            .filter_map(|id| state.nodes.get(id).map(|m| (*id, m.clone())))
            .collect();
        if initial && voters.len() != replicas.len() {
            plan.waiting.push((topic, p));
            continue;
        }
        let first = if initial {
            first_leader(spec, replicas, &voters)
        } else {
            None
        };
        plan.open.push(Open {
            topic,
            partition: p,
            uid: spec.uid,
            voters,
            first,
        });
    }
    plan
}

/// Which of a new group's `replicas` campaigns first (see [`Open::first`]).
fn first_leader(
    spec: &TopicSpec,
    replicas: &[NodeId],
    voters: &BTreeMap<NodeId, Member>,
) -> Option<NodeId> {
    let rank = |id: &NodeId| {
        voters
            .get(id)
            .and_then(|m| spec.placement.leader_rank(&m.region))
            .unwrap_or(usize::MAX)
    };
    // `min_by_key` keeps the first of equals: the replica list's order breaks ties.
    replicas.iter().min_by_key(|id| rank(id)).copied()
}

/// What the metadata leader does next for the draining nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drain {
    /// Commands to propose, in order: removals of drained nodes, moves of replicas.
    pub commands: Vec<Command>,
    /// Replicas no node can take over: (node, topic, partition).
    pub stuck: Vec<(NodeId, String, u32)>,
}

/// The next steps of draining: a draining node that holds nothing is removed; the replicas of
/// the others move, each to the best placed node (see [`replacement`]), while fewer than
/// `moving_max` partitions move across the cluster.
pub fn drain(state: &ClusterState, moving_max: usize) -> Drain {
    let mut plan = Drain::default();
    let mut local = state.clone();
    let mut moving: usize = state.topics.values().map(|t| t.moving.len()).sum();
    for id in &state.draining {
        if state.replicas_on(*id) == 0 {
            plan.commands.push(Command::RemoveNode { id: *id });
            continue;
        }
        for t in state.topics.values() {
            for p in 0..t.partitions {
                let replicas = &t.replicas[p as usize];
                if moving >= moving_max {
                    return plan;
                }
                if t.moving.contains_key(&p) || !replicas.contains(id) {
                    continue;
                }
                let others: Vec<NodeId> = replicas.iter().copied().filter(|r| r != id).collect();
                let Some(to) = replacement(&local, &others, &[*id], &t.placement) else {
                    plan.stuck.push((*id, t.name.clone(), p));
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
                local.apply(cmd.clone());
                plan.commands.push(cmd);
                moving += 1;
            }
        }
    }
    plan
}

/// The metadata group as it stands: its voters, learners, and on its leader how far each
/// member's log matches (Raft index) and the last index.
#[derive(Debug, Clone, Default)]
pub struct MetadataGroup {
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub matched: Vec<(NodeId, Option<RaftIndex>)>,
    pub last_index: RaftIndex,
}

/// Who the metadata group's members should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataMembers {
    pub voters: BTreeMap<NodeId, Member>,
    pub learners: BTreeMap<NodeId, Member>,
}

impl MetadataMembers {
    /// Whether the group already has exactly these voters and learners.
    pub fn same_as(&self, group: &MetadataGroup) -> bool {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<_>>();
        self.voters.keys().copied().collect::<BTreeSet<_>>() == set(&group.voters)
            && self.learners.keys().copied().collect::<BTreeSet<_>>() == set(&group.learners)
    }
}

/// The metadata group's target membership: its voters are the controllers still in the
/// cluster (a removed one leaves); every other registered node learns. A removed node stays on
/// as a learner while `reachable` says it can be reached and it has not received the whole log,
/// so that it learns it was removed (and stops) rather than going quiet. `controllers` gives
/// the addresses of controllers the metadata does not list yet.
pub fn metadata_members(
    state: &ClusterState,
    group: &MetadataGroup,
    controllers: &BTreeMap<NodeId, String>,
    reachable: impl Fn(NodeId) -> bool,
) -> MetadataMembers {
    let member_of = |id: &NodeId| {
        state.nodes.get(id).cloned().unwrap_or_else(|| Member {
            addr: controllers.get(id).cloned().unwrap_or_default(),
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
    for (id, matched) in &group.matched {
        let behind = matched.is_none_or(|m| m < group.last_index);
        if state.removed.contains(id) && reachable(*id) && behind {
            learners.insert(*id, member_of(id));
        }
    }
    MetadataMembers { voters, learners }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testkit::*;
    use crate::types::NodeId;

    fn opened(plan: &Reconcile) -> Vec<(String, u32, usize)> {
        plan.open
            .iter()
            .map(|o| (o.topic.clone(), o.partition, o.voters.len()))
            .collect()
    }

    #[test]
    fn reconcile_opens_what_the_node_holds_and_closes_the_rest() {
        let s = cluster(
            &[(1, "r"), (2, "r"), (3, "r")],
            vec![topic("t", 3, vec![vec![1, 2], vec![2, 3], vec![3, 1]])],
        );
        let none = HashMap::new();
        let plan = reconcile(&s, NodeId(1), &none);
        // Partitions 0 and 2, initialized with their creation's two voters.
        assert_eq!(opened(&plan), vec![("t".into(), 0, 2), ("t".into(), 2, 2)]);
        assert!(plan.close.is_empty() && plan.waiting.is_empty());
        // What is open already stays; what it no longer holds, or of another incarnation, goes.
        let open = HashMap::from([
            (("t".to_string(), 0), TopicUid(7)),
            (("t".to_string(), 1), TopicUid(7)),
            (("t".to_string(), 2), TopicUid(6)),
            (("gone".to_string(), 0), TopicUid(3)),
        ]);
        let plan = reconcile(&s, NodeId(1), &open);
        assert_eq!(
            plan.close,
            vec![
                ("gone".to_string(), 0),
                ("t".to_string(), 1),
                ("t".to_string(), 2)
            ]
        );
        assert_eq!(opened(&plan), vec![("t".into(), 2, 2)]);
    }

    /// A new group's first candidate is its first replica (placement rotates it, so leadership
    /// starts spread out), or the first replica in the topic's most preferred leader region.
    #[test]
    fn a_new_group_campaigns_first_from_its_first_replica_or_its_pinned_region() {
        let nodes = [(1, "a"), (2, "b"), (3, "c")];
        let t = topic("t", 3, vec![vec![1, 2, 3], vec![2, 3, 1], vec![3, 1, 2]]);
        let s = cluster(&nodes, vec![t.clone()]);
        let firsts = |s: &ClusterState| -> Vec<Option<NodeId>> {
            reconcile(s, NodeId(1), &HashMap::new())
                .open
                .iter()
                .map(|o| o.first)
                .collect()
        };
        assert_eq!(
            firsts(&s),
            vec![Some(NodeId(1)), Some(NodeId(2)), Some(NodeId(3))]
        );
        let mut pinned = t;
        pinned.placement.leader_regions = vec!["c".into(), "b".into()];
        let s = cluster(&nodes, vec![pinned]);
        assert_eq!(firsts(&s), vec![Some(NodeId(3)); 3]);
        // A replica that joins by a move has no first candidate: its group has a leader.
        let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c"), (4, "a")], vec![]);
        s.apply(Command::CreateTopic {
            spec: topic("m", 1, vec![vec![1, 2, 3]]),
        });
        s.apply(Command::MoveReplicas {
            topic: "m".into(),
            uid: TopicUid(7),
            partition: 0,
            target: ids(&[4, 2, 3]),
        });
        assert_eq!(
            reconcile(&s, NodeId(4), &HashMap::new()).open[0].first,
            None
        );
    }

    #[test]
    fn a_replica_added_by_a_move_joins_and_one_with_an_unknown_peer_waits() {
        let mut s = cluster(
            &[(1, "r"), (2, "r"), (3, "r"), (4, "r")],
            vec![topic("t", 1, vec![vec![1, 2, 3]])],
        );
        s.apply(Command::MoveReplicas {
            topic: "t".into(),
            uid: TopicUid(7),
            partition: 0,
            target: ids(&[4, 2, 3]),
        });
        // Node 4 receives the partition: it joins the group (no voters of its own).
        assert_eq!(
            opened(&reconcile(&s, NodeId(4), &HashMap::new())),
            vec![("t".into(), 0, 0)]
        );
        // Node 1 still holds it until the move ends; a moved partition never re-initializes.
        assert_eq!(
            opened(&reconcile(&s, NodeId(1), &HashMap::new())),
            vec![("t".into(), 0, 0)]
        );
        // A replica of a new topic whose peer is not registered waits.
        let s = cluster(&[(1, "r")], vec![topic("u", 1, vec![vec![1, 9]])]);
        let plan = reconcile(&s, NodeId(1), &HashMap::new());
        assert!(plan.open.is_empty());
        assert_eq!(plan.waiting, vec![("u".to_string(), 0)]);
    }

    #[test]
    fn a_drain_moves_replicas_within_its_bound_then_removes_the_node() {
        let mut s = cluster(
            &[(1, "a"), (2, "b"), (3, "c"), (4, "a")],
            vec![topic("t", 3, vec![vec![1, 2, 3]; 3])],
        );
        s.apply(Command::RemoveNode { id: NodeId(1) });
        let plan = drain(&s, 2);
        // Two moves at most at once, each to node 4 (node 1's region), nothing removed yet.
        assert_eq!(plan.commands.len(), 2, "{plan:?}");
        for c in &plan.commands {
            match c {
                Command::MoveReplicas { target, .. } => assert_eq!(target, &ids(&[4, 2, 3])),
                other => panic!("{other:?}"),
            }
        }
        // Once every replica moved off it, the node goes.
        let mut after = s.clone();
        for p in 0..3 {
            for cmd in [
                Command::MoveReplicas {
                    topic: "t".into(),
                    uid: TopicUid(7),
                    partition: p,
                    target: ids(&[4, 2, 3]),
                },
                Command::FinishMove {
                    topic: "t".into(),
                    uid: TopicUid(7),
                    partition: p,
                    replicas: ids(&[4, 2, 3]),
                },
            ] {
                after.apply(cmd);
            }
        }
        assert_eq!(
            drain(&after, 2).commands,
            vec![Command::RemoveNode { id: NodeId(1) }]
        );
        // With no node to take a replica over, it is reported, not moved.
        let mut tight = cluster(&[(1, "a"), (2, "b")], vec![topic("t", 1, vec![vec![1, 2]])]);
        tight.apply(Command::RemoveNode { id: NodeId(1) });
        let plan = drain(&tight, 16);
        assert!(plan.commands.is_empty());
        assert_eq!(plan.stuck, vec![(NodeId(1), "t".to_string(), 0)]);
    }

    #[test]
    fn metadata_members_follow_the_registered_and_removed_nodes() {
        let mut s = cluster(&[(1, "r"), (2, "r"), (3, "r"), (4, "r")], vec![]);
        s.apply(Command::RemoveNode { id: NodeId(3) });
        let group = MetadataGroup {
            voters: ids(&[1, 2, 3]),
            learners: vec![],
            matched: vec![
                (NodeId(2), Some(RaftIndex(10))),
                (NodeId(3), Some(RaftIndex(8))),
                (NodeId(4), None),
            ],
            last_index: RaftIndex(10),
        };
        let controllers = BTreeMap::new();
        // Node 3 was removed: it votes no more; reachable and behind, it learns on.
        let m = metadata_members(&s, &group, &controllers, |_| true);
        assert_eq!(m.voters.keys().copied().collect::<Vec<_>>(), ids(&[1, 2]));
        assert_eq!(m.learners.keys().copied().collect::<Vec<_>>(), ids(&[3, 4]));
        // Unreachable (it stopped), or caught up: it goes.
        let m = metadata_members(&s, &group, &controllers, |id| id != NodeId(3));
        assert_eq!(m.learners.keys().copied().collect::<Vec<_>>(), ids(&[4]));
        assert!(!m.same_as(&group));
        let settled = MetadataGroup {
            voters: ids(&[1, 2]),
            learners: ids(&[4]),
            ..group
        };
        assert!(m.same_as(&settled));
    }
}
