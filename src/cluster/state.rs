//! What every node knows of the cluster: the state the committed metadata commands build,
//! applied in order, deterministically.

use std::collections::{BTreeMap, BTreeSet};

use super::command::Command;
use super::offsets::{Cursor, GroupOffsets, GROUPS_MAX};
use super::security::{Security, ACLS_MAX, QUOTAS_MAX, USERS_MAX};
use super::topic::TopicSpec;
use crate::raft::types::{Member, NodeId};
use crate::types::TopicUid;

/// What every node knows of the cluster, built by applying the committed commands in order.
/// Applying is deterministic and never fails: a command that does not apply (a topic that
/// already exists) changes nothing, and its proposer sees that.
/// Serialized whole as a node's metadata checkpoint (`controller::checkpoint`) and sent to a
/// node whose metadata log starts past what it had applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, Member>,
    pub topics: BTreeMap<String, TopicSpec>,
    /// Nodes being removed: their replicas move to other nodes, then they are removed.
    pub draining: BTreeSet<NodeId>,
    /// Nodes removed from the cluster: their ids are not taken back.
    pub removed: BTreeSet<NodeId>,
    /// Consumer and queue groups' committed positions, by (group, topic).
    #[serde(with = "pairs")]
    pub groups: BTreeMap<(String, String), GroupOffsets>,
    /// The cluster's id, chosen at bootstrap (`None` until the first leader names it).
    pub cluster_id: Option<String>,
    /// Users, ACLs and quotas.
    pub security: Security,
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
                if let Some(t) = self
                    .topic_mut(&topic, uid, partition)
                    // A mirror being promoted does not move: its cuts name its replicas.
                    .filter(|t| !(t.mirror.is_some() && t.promotion.is_some()))
                {
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
            Command::StopMirror { topic, uid } => {
                if let Some(t) = self.topics.get_mut(&topic).filter(|t| t.uid == uid) {
                    if t.mirror.is_some() && t.promotion.is_none() {
                        t.promotion = Some(Default::default());
                    }
                }
            }
            Command::CutMirror { topic, uid, cuts } => {
                if let Some(t) = self.topics.get_mut(&topic).filter(|t| t.uid == uid) {
                    let fits = cuts.len() == t.partitions as usize;
                    if let Some(p) = t.promotion.as_mut().filter(|p| p.cuts.is_none() && fits) {
                        p.cuts = Some(cuts);
                    }
                }
            }
            Command::PromoteMirror { topic, uid } => {
                if let Some(t) = self.topics.get_mut(&topic).filter(|t| t.uid == uid) {
                    if t.promotion.as_ref().is_some_and(|p| p.cuts.is_some()) {
                        t.mirror = None;
                    }
                }
            }
            Command::AllocateProducerId => {}
            Command::InitCluster { id } => {
                self.cluster_id.get_or_insert(id);
            }
            Command::CreateUser { name, user } => {
                let sec = &mut self.security;
                let hash_taken = sec.user_by_token(&user.token_sha256).is_some();
                if !sec.users.contains_key(&name) && !hash_taken && sec.users.len() < USERS_MAX {
                    sec.users.insert(name, user);
                    sec.users_version += 1;
                }
            }
            Command::DeleteUser { name } => {
                if self.security.users.remove(&name).is_some() {
                    self.security.users_version += 1;
                }
            }
            Command::AddAcl { acl } => {
                if self.security.acls.len() < ACLS_MAX {
                    self.security.acls.insert(acl);
                }
            }
            Command::RemoveAcl { acl } => {
                self.security.acls.remove(&acl);
            }
            Command::SetQuota { principal, quota } => {
                let q = &mut self.security.quotas;
                if quota.is_empty() {
                    q.remove(&principal);
                } else if q.contains_key(&principal) || q.len() < QUOTAS_MAX {
                    q.insert(principal, quota);
                }
            }
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
    fn group_mut(
        &mut self,
        group: String,
        topic: String,
        uid: TopicUid,
    ) -> Option<&mut GroupOffsets> {
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

    fn topic_mut(&mut self, name: &str, uid: TopicUid, partition: u32) -> Option<&mut TopicSpec> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::placement::replacement;
    use crate::cluster::testkit::*;
    use crate::types::{NodeId, Offset};

    #[test]
    fn a_mirror_is_promoted_only_in_order_and_only_once() {
        let mut s = ClusterState::default();
        let mut spec = topic("m", 1, vec![vec![1, 2, 3]]);
        spec.uid = TopicUid(5);
        spec.mirror = Some(crate::cluster::MirrorOf {
            topic: "src".into(),
            addresses: vec!["h:1".into()],
            source_uid: std::num::NonZeroU64::new(7),
        });
        s.apply(Command::CreateTopic { spec });
        let cut = |end: u64| crate::cluster::Cut {
            end: Offset(end),
            term: 2,
            index: 9,
            replicas: ids(&[1, 2, 3]),
        };
        let (name, uid) = ("m".to_string(), TopicUid(5));
        // Cuts and promotion before the stop change nothing.
        s.apply(Command::CutMirror {
            topic: name.clone(),
            uid,
            cuts: vec![cut(10)],
        });
        s.apply(Command::PromoteMirror {
            topic: name.clone(),
            uid,
        });
        assert!(s.topics["m"].mirror.is_some() && s.topics["m"].promotion.is_none());
        // Another incarnation's commands change nothing.
        s.apply(Command::StopMirror {
            topic: name.clone(),
            uid: TopicUid(6),
        });
        assert!(s.topics["m"].promotion.is_none());
        s.apply(Command::StopMirror {
            topic: name.clone(),
            uid,
        });
        // Promotion needs the cuts; a cut list of the wrong length is ignored.
        s.apply(Command::PromoteMirror {
            topic: name.clone(),
            uid,
        });
        assert!(s.topics["m"].mirror.is_some());
        s.apply(Command::CutMirror {
            topic: name.clone(),
            uid,
            cuts: vec![cut(10), cut(11)],
        });
        assert_eq!(s.topics["m"].promotion, Some(Default::default()));
        s.apply(Command::CutMirror {
            topic: name.clone(),
            uid,
            cuts: vec![cut(10)],
        });
        // The first cut stands.
        s.apply(Command::CutMirror {
            topic: name.clone(),
            uid,
            cuts: vec![cut(12)],
        });
        s.apply(Command::PromoteMirror {
            topic: name.clone(),
            uid,
        });
        let t = &s.topics["m"];
        assert!(t.mirror.is_none());
        assert_eq!(
            t.promotion.as_ref().unwrap().cuts.as_ref().unwrap()[0].end,
            Offset(10)
        );
        // A topic that is not a mirror cannot be stopped.
        s.apply(Command::CreateTopic {
            spec: topic("n", 1, vec![vec![1]]),
        });
        s.apply(Command::StopMirror {
            topic: "n".into(),
            uid: TopicUid(7),
        });
        assert!(s.topics["n"].promotion.is_none());
        // Cuts without replicas are refused.
        assert!(Command::CutMirror {
            topic: name,
            uid,
            cuts: vec![crate::cluster::Cut::default()],
        }
        .validate()
        .is_err());
    }

    #[test]
    fn commands_apply_deterministically() {
        let spec = |uid: TopicUid| TopicSpec {
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
            replicas: vec![ids(&[1])],
            created_ms: 0,
            moving: Default::default(),
            moved: Default::default(),
            placement: Default::default(),
            mirror: None,
            promotion: None,
        };
        let mut s = ClusterState::default();
        s.apply(Command::CreateTopic {
            spec: spec(TopicUid(1)),
        });
        // A second create of the name does not replace the first.
        s.apply(Command::CreateTopic {
            spec: spec(TopicUid(2)),
        });
        assert_eq!(s.topics["t"].uid, TopicUid(1));
        // A delete of another incarnation does nothing.
        s.apply(Command::DeleteTopic {
            name: "t".into(),
            uid: TopicUid(2),
        });
        assert!(s.topics.contains_key("t"));
        let enc = Command::DeleteTopic {
            name: "t".into(),
            uid: TopicUid(1),
        }
        .encode();
        let deleted = s.apply(Command::decode(&enc).unwrap());
        assert_eq!(deleted.map(|t| t.uid), Some(TopicUid(1)));
        assert!(s.topics.is_empty());
        assert!(Command::decode(b"{\"op\":\"nope\"}").is_err());
        // Invalid commands change nothing, on every node alike.
        let mut bad = spec(TopicUid(3));
        bad.name = "other".into();
        bad.replicas = vec![ids(&[1, 1])];
        bad.replication_factor = 2;
        let cmd = Command::CreateTopic { spec: bad };
        assert!(cmd.validate().is_err());
        s.apply(cmd);
        assert!(s.topics.is_empty());
    }

    #[test]
    fn a_move_starts_finishes_only_as_recorded_and_validates() {
        let mut s = cluster(
            &[(1, "r"), (2, "r"), (3, "r"), (4, "r")],
            vec![topic("t", 2, vec![vec![1, 2, 3], vec![2, 3, 1]])],
        );
        let mv = |target: Vec<NodeId>| Command::MoveReplicas {
            topic: "t".into(),
            uid: TopicUid(7),
            partition: 0,
            target,
        };
        // Unknown node, wrong length, wrong incarnation, bad partition: nothing changes.
        let before = s.clone();
        s.apply(mv(ids(&[1, 2, 9])));
        s.apply(mv(ids(&[1, 4])));
        s.apply(Command::MoveReplicas {
            topic: "t".into(),
            uid: TopicUid(8),
            partition: 0,
            target: ids(&[4, 2, 3]),
        });
        s.apply(Command::MoveReplicas {
            topic: "t".into(),
            uid: TopicUid(7),
            partition: 2,
            target: ids(&[4, 2, 3]),
        });
        assert_eq!(s, before);
        assert!(mv(ids(&[4, 4, 3])).validate().is_err());
        assert!(mv(vec![]).validate().is_err());
        // A move: node 4 holds the partition from now on (receiving), node 1 until it ends.
        s.apply(mv(ids(&[4, 2, 3])));
        let t = &s.topics["t"];
        assert_eq!(t.moving[&0], ids(&[4, 2, 3]));
        assert!(t.moved.contains(&0));
        assert!(t.holds(NodeId(4), 0) && t.holds(NodeId(1), 0));
        assert_eq!(s.replicas_on(NodeId(4)), 1);
        // Finishing with another list than the move's does nothing.
        let finish = |replicas: Vec<NodeId>| Command::FinishMove {
            topic: "t".into(),
            uid: TopicUid(7),
            partition: 0,
            replicas,
        };
        s.apply(finish(ids(&[4, 2, 1])));
        assert!(s.topics["t"].moving.contains_key(&0));
        s.apply(finish(ids(&[4, 2, 3])));
        let t = &s.topics["t"];
        assert!(t.moving.is_empty());
        assert_eq!(t.replicas[0], ids(&[4, 2, 3]));
        assert!(!t.holds(NodeId(1), 0));
        // Round trip through the log's encoding.
        let c = Command::decode(&mv(ids(&[1, 2, 3])).encode()).unwrap();
        assert_eq!(c, mv(ids(&[1, 2, 3])));
    }

    #[test]
    fn removing_a_node_drains_it_first_and_its_id_is_not_taken_back() {
        let mut s = cluster(
            &[(1, "r"), (2, "r"), (3, "r"), (4, "r")],
            vec![topic("t", 1, vec![vec![1, 2, 3]])],
        );
        s.apply(Command::RemoveNode { id: NodeId(1) });
        assert!(s.draining.contains(&NodeId(1)) && s.nodes.contains_key(&NodeId(1)));
        assert!(!s.placeable().contains_key(&NodeId(1)));
        // Its replica goes to the node that holds none (the draining node is never chosen).
        assert_eq!(
            replacement(&s, &ids(&[2, 3]), &ids(&[1]), &Default::default()),
            Some(NodeId(4))
        );
        s.apply(Command::MoveReplicas {
            topic: "t".into(),
            uid: TopicUid(7),
            partition: 0,
            target: ids(&[4, 2, 3]),
        });
        s.apply(Command::RemoveNode { id: NodeId(1) });
        assert!(
            s.nodes.contains_key(&NodeId(1)),
            "still receiving nothing but holding"
        );
        s.apply(Command::FinishMove {
            topic: "t".into(),
            uid: TopicUid(7),
            partition: 0,
            replicas: ids(&[4, 2, 3]),
        });
        s.apply(Command::RemoveNode { id: NodeId(1) });
        assert!(!s.nodes.contains_key(&NodeId(1)) && s.removed.contains(&NodeId(1)));
        assert!(s.draining.is_empty());
        s.apply(Command::RegisterNode {
            id: NodeId(1),
            member: member("r", "z"),
        });
        assert!(!s.nodes.contains_key(&NodeId(1)), "a removed id came back");
        assert_eq!(
            replacement(&s, &ids(&[2, 3, 4]), &ids(&[]), &Default::default()),
            None
        );
    }
}

/// A map with tuple keys, serialized as a list of (key, value) pairs (JSON keys are strings).
mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}
