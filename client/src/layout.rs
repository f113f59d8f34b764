//! The cluster as the client last read it: nodes, and each partition's replicas and leader.
//! Pure bookkeeping; [`crate::Client`] does the asking.
//!
//! ```text
//! read (ClusterInfo of one node) ──learn──▶ generation g: leaders it named (its own replicas)
//!   └─ partitions it did not name ──fill_asks──▶ holders to ask ──learn_leaders(g)──▶ named
//! a refusal naming the leader ──hint──▶ named (a fill's answer never replaces it)
//! ```

use std::collections::{BTreeMap, HashMap};

use crate::proto as pb;

/// Partitions a topic may have as far as the client takes them in (a bound on what a node's
/// answer can make it allocate).
pub(crate) const PARTITIONS_MAX: u32 = 1 << 20;

#[derive(Default)]
pub(crate) struct Layout {
    /// Node id → (address as advertised to this client's region, region).
    pub(crate) nodes: BTreeMap<u64, (String, String)>,
    /// Topic → its partitions (index = partition number).
    pub(crate) topics: HashMap<String, Vec<Partition>>,
    /// Counts the reads of the layout taken: a fill of leaders for an earlier read is ignored.
    pub(crate) generation: u64,
}

#[derive(Clone, Default)]
pub(crate) struct Partition {
    /// 0: not known.
    pub(crate) leader: u64,
    pub(crate) replicas: Vec<u64>,
    /// `leader` was named by a node holding a replica in the last read of the layout (not
    /// kept from an earlier one, which may be stale by now).
    pub(crate) named: bool,
}

impl Layout {
    /// Takes `info` (one node's ClusterInfo) as the layout; returns the layout's new
    /// generation.
    pub(crate) fn learn(&mut self, info: pb::ClusterInfoResponse) -> u64 {
        self.generation += 1;
        if !info.nodes.is_empty() {
            self.nodes = info
                .nodes
                .iter()
                .map(|n| (n.id, (n.address.clone(), n.region.clone())))
                .collect();
        }
        let mut topics = HashMap::new();
        for t in info.topics {
            let old = self.topics.get(&t.topic);
            let mut parts: Vec<Partition> = Vec::with_capacity(t.partitions.len());
            for p in t.partitions.iter().filter(|p| p.partition < PARTITIONS_MAX) {
                let i = p.partition as usize;
                if parts.len() <= i {
                    parts.resize(i + 1, Partition::default());
                }
                // A node without a replica does not know the leader: keep what was known.
                let known = old
                    .and_then(|o| o.get(i))
                    .map(|o| o.leader)
                    .filter(|l| p.replicas.contains(l));
                parts[i] = Partition {
                    leader: if p.leader != 0 {
                        p.leader
                    } else {
                        known.unwrap_or(0)
                    },
                    replicas: p.replicas.clone(),
                    named: p.leader != 0,
                };
            }
            if !parts.is_empty() {
                topics.insert(t.topic, parts);
            }
        }
        self.topics = topics;
        self.generation
    }

    /// The nodes to ask for the leaders of the partitions this read did not name: for each
    /// such partition not covered by a node already chosen, one holder not `asked` yet, those
    /// of `region` first and among those a different one on each read (so one that is down is
    /// not asked every time). `asked` begins with the node whose answer this read took; the
    /// others in it and the chosen together are at most `budget`.
    pub(crate) fn fill_asks(
        &self,
        asked: &[u64],
        region: &str,
        budget: usize,
    ) -> Vec<(u64, String)> {
        let mut chosen: Vec<u64> = Vec::new();
        let unnamed = self
            .topics
            .values()
            .flat_map(|parts| parts.iter().filter(|p| !p.named));
        for p in unnamed {
            if asked.len() + chosen.len() > budget {
                break;
            }
            if p.replicas.iter().any(|r| chosen.contains(r)) {
                continue;
            }
            let mut holders: Vec<u64> = p
                .replicas
                .iter()
                .copied()
                .filter(|r| !asked.contains(r) && self.nodes.contains_key(r))
                .collect();
            if holders.is_empty() {
                continue;
            }
            let turn = self.generation as usize % holders.len();
            holders.rotate_left(turn);
            holders.sort_by_key(|r| self.nodes[r].1 != region);
            chosen.push(holders[0]);
        }
        chosen
            .into_iter()
            .map(|id| (id, self.nodes[&id].0.clone()))
            .collect()
    }

    /// Notes the leaders `info` names for partitions whose leader the read of `generation`
    /// did not name (and that the named node holds a replica of, as the layout says); nothing
    /// if the layout was read again since.
    pub(crate) fn learn_leaders(&mut self, info: &pb::ClusterInfoResponse, generation: u64) {
        if self.generation != generation {
            return;
        }
        for t in &info.topics {
            let Some(parts) = self.topics.get_mut(&t.topic) else {
                continue;
            };
            for p in t.partitions.iter().filter(|p| p.local && p.leader != 0) {
                if let Some(known) = parts.get_mut(p.partition as usize) {
                    if !known.named && known.replicas.contains(&p.leader) {
                        known.leader = p.leader;
                        known.named = true;
                    }
                }
            }
        }
    }

    /// A node refused a request for `topic`/`partition` naming `leader`: noted, and not
    /// replaced by a fill's answer. `false`: the node or the partition is not known.
    pub(crate) fn hint(&mut self, topic: &str, partition: u32, leader: u64) -> bool {
        if !self.nodes.contains_key(&leader) {
            return false;
        }
        let Some(p) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.get_mut(partition as usize))
        else {
            return false;
        };
        p.leader = leader;
        p.named = true;
        true
    }

    /// The leader of `topic`/`partition`, when known and a known node.
    pub(crate) fn leader(&self, topic: &str, partition: u32) -> Option<u64> {
        let p = self.topics.get(topic)?.get(partition as usize)?;
        (p.leader != 0 && self.nodes.contains_key(&p.leader)).then_some(p.leader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, region: &str) -> pb::NodeInfo {
        pb::NodeInfo {
            id,
            address: format!("n{id}:7070"),
            region: region.into(),
            ..Default::default()
        }
    }

    /// One node's answer: `parts` as (leader it names, replicas, held by the answering node).
    fn info(from: u64, parts: &[(u64, &[u64], bool)]) -> pb::ClusterInfoResponse {
        pb::ClusterInfoResponse {
            node_id: from,
            ready: true,
            nodes: vec![
                node(1, "a"),
                node(2, "a"),
                node(3, "b"),
                node(4, "b"),
                node(5, "c"),
            ],
            topics: vec![pb::TopicPartitions {
                topic: "t".into(),
                partitions: parts
                    .iter()
                    .enumerate()
                    .map(|(i, (leader, replicas, local))| pb::PartitionInfo {
                        partition: i as u32,
                        leader: *leader,
                        replicas: replicas.to_vec(),
                        local: *local,
                        ..Default::default()
                    })
                    .collect(),
            }],
            ..Default::default()
        }
    }

    fn leaders(l: &Layout) -> Vec<(u64, bool)> {
        l.topics["t"].iter().map(|p| (p.leader, p.named)).collect()
    }

    #[test]
    fn a_read_keeps_an_unnamed_leader_only_while_it_is_still_a_replica() {
        let mut l = Layout::default();
        l.learn(info(1, &[(1, &[1, 3, 5], true), (3, &[2, 3, 4], false)]));
        assert_eq!(leaders(&l), [(1, true), (3, true)]);
        // Node 1 names neither now; partition 1 lost its replica 3.
        l.learn(info(1, &[(0, &[1, 3, 5], true), (0, &[2, 4, 5], false)]));
        assert_eq!(leaders(&l), [(1, false), (0, false)]);
        assert_eq!(l.leader("t", 0), Some(1));
        assert_eq!(l.leader("t", 1), None);
        assert_eq!(l.leader("t", 2), None);
        assert_eq!(l.leader("u", 0), None);
    }

    #[test]
    fn fill_asks_one_holder_per_partition_of_the_clients_region_first_rotating() {
        let mut l = Layout::default();
        // Node 5 answered: it names the leader of partition 0 only.
        let read = info(
            5,
            &[
                (5, &[1, 3, 5], true),
                (0, &[1, 2, 3], false),
                (0, &[2, 3, 4], false),
                (0, &[1, 3, 4], false),
            ],
        );
        let mut picks = Vec::new();
        for _ in 0..4 {
            l.learn(read.clone());
            let asks = l.fill_asks(&[5], "b", 16);
            // Partition 1 (holders 1, 2, 3): region b's only holder, 3, on every read; it
            // holds partitions 2 and 3 too, so nobody else is asked.
            assert_eq!(asks, [(3, "n3:7070".to_string())]);
            let asks = l.fill_asks(&[5, 3], "b", 16);
            // Without 3: one of partition 1's holders (1, 2; both in a, a different one on
            // each read), then for the partition of 2 and 3 it does not hold, node 4 (in b).
            let ids: Vec<u64> = asks.iter().map(|a| a.0).collect();
            assert_eq!(ids.len(), 2, "{ids:?}");
            assert!([1, 2].contains(&ids[0]) && ids[1] == 4, "{ids:?}");
            picks.push(ids[0]);
        }
        assert!(picks.contains(&1) && picks.contains(&2), "{picks:?}");
        // The budget counts every node asked besides the one that answered.
        assert!(l.fill_asks(&[5], "b", 0).is_empty());
        assert_eq!(l.fill_asks(&[5, 3], "b", 1).len(), 0);
        assert_eq!(l.fill_asks(&[5, 3], "b", 2).len(), 1);
        assert_eq!(l.fill_asks(&[5, 3], "b", 3).len(), 2);
        // A partition already named is not asked about.
        assert!(l.hint("t", 1, 1) && l.hint("t", 2, 2) && l.hint("t", 3, 4));
        assert!(l.fill_asks(&[5], "b", 16).is_empty());
    }

    #[test]
    fn fill_answers_of_an_earlier_read_or_for_a_hinted_partition_are_not_taken() {
        let mut l = Layout::default();
        let g = l.learn(info(
            1,
            &[
                (0, &[2, 3, 4], false),
                (0, &[2, 3, 4], false),
                (0, &[2, 3, 4], false),
            ],
        ));
        // A refusal named partition 1's leader after the read.
        assert!(l.hint("t", 1, 4));
        assert!(!l.hint("t", 1, 9), "an unknown node is not taken");
        assert!(!l.hint("t", 7, 2), "nor an unknown partition");
        let answer = info(
            3,
            &[
                (3, &[2, 3, 4], true),
                (3, &[2, 3, 4], true),
                (5, &[2, 3, 4], true),
            ],
        );
        // An answer for an earlier generation changes nothing.
        l.learn_leaders(&answer, g - 1);
        assert_eq!(leaders(&l), [(0, false), (4, true), (0, false)]);
        l.learn_leaders(&answer, g);
        // Partition 0 learnt; 1 keeps the hint; 2's named leader (5) is not one of its
        // replicas as the layout says, so it is not believed.
        assert_eq!(leaders(&l), [(3, true), (4, true), (0, false)]);
        // A newer read: the answer to the older one is dropped.
        let g2 = l.learn(info(1, &[(0, &[2, 3, 4], false)]));
        assert_eq!(g2, g + 1);
        l.learn_leaders(&answer, g);
        assert_eq!(l.leader("t", 0), Some(3), "kept: still a replica");
        assert!(!l.topics["t"][0].named);
        // Partitions the answering node does not hold are not taken from it.
        let hearsay = info(2, &[(4, &[2, 3, 4], false)]);
        l.learn_leaders(&hearsay, g2);
        assert_eq!(leaders(&l), [(3, false)]);
    }
}
