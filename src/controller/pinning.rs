//! Leader pinning: a leader outside its topic's preferred regions hands leadership to a
//! replica in a better one, once that replica has stayed in sync for a while. Every leader
//! decides for its own partitions (no central scheduler); the waits keep it from flapping
//! when the preferred region comes and goes.
//!
//! ```text
//! every 2 s, per partition this node leads whose topic has leader regions:
//!   followers in sync (cluster::health) ──▶ in sync since when
//!   a follower ranked better than this node, in sync ≥ STABLE, no transfer here for COOLDOWN
//!     ──▶ its core: TransferLeader (openraft: the target campaigns at once)
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::Broker;
use crate::cluster::Placement;
use crate::raft::types::NodeId;
use crate::shard::{CoreRequest, PartitionKey};

/// How often leaders look at their pinned partitions.
pub const EVERY: Duration = Duration::from_secs(2);
/// How long a better-placed follower must stay in sync before it takes over.
pub const STABLE: Duration = Duration::from_secs(10);
/// How long after a transfer the partition is left alone.
pub const COOLDOWN: Duration = Duration::from_secs(30);

/// The follower to hand leadership to, if any: the best-ranked one in a region preferred over
/// `mine` that has been in sync for at least `stable`.
pub fn pin_target(
    placement: &Placement,
    mine: &str,
    followers: &[(NodeId, &str, Option<Duration>)],
    stable: Duration,
) -> Option<NodeId> {
    let rank = |r: &str| placement.leader_rank(r).unwrap_or(usize::MAX);
    let my_rank = rank(mine);
    followers
        .iter()
        .filter(|(_, region, since)| rank(region) < my_rank && since.is_some_and(|s| s >= stable))
        .min_by_key(|(id, region, since)| (rank(region), std::cmp::Reverse(*since), *id))
        .map(|(id, _, _)| *id)
}

/// What the pinner remembers between rounds.
#[derive(Default)]
pub struct Pinner {
    /// (topic, partition, follower) → since when it has been in sync.
    in_sync: HashMap<(String, u32, NodeId), Instant>,
    /// (topic, partition) → when leadership was last handed over from here.
    moved: HashMap<(String, u32), Instant>,
    last: Option<Instant>,
}

impl Pinner {
    /// One round, at most every [`EVERY`].
    pub async fn run(&mut self, broker: &Arc<Broker>) {
        let now = Instant::now();
        if self.last.is_some_and(|l| now.duration_since(l) < EVERY) {
            return;
        }
        self.last = Some(now);
        let state = broker.cluster();
        let me = broker.node_id();
        let region = broker.config.region.clone();
        let mut seen = std::collections::HashSet::new();
        for t in broker.topics() {
            let placement = &t.spec.placement;
            if placement.leader_regions.is_empty() || t.spec.mirror.is_some() {
                continue;
            }
            let mut states = broker.replica_states(&t).await;
            for p in 0..t.spec.partitions {
                if !t.on(me, p) || t.spec.moving.contains_key(&p) {
                    continue;
                }
                let Some(s) = states.remove(&p) else {
                    continue;
                };
                if !s.is_leader {
                    continue;
                }
                let mut followers = Vec::new();
                for (node, _, in_sync) in broker.follower_lags(&s) {
                    let key = (t.spec.name.clone(), p, node);
                    seen.insert(key.clone());
                    let since = match in_sync {
                        true => Some(now.duration_since(*self.in_sync.entry(key).or_insert(now))),
                        false => {
                            self.in_sync.remove(&key);
                            None
                        }
                    };
                    if !s.voters.contains(&node) {
                        continue;
                    }
                    if let Some(m) = state.nodes.get(&node) {
                        followers.push((node, m.region.as_str(), since));
                    }
                }
                let part = (t.spec.name.clone(), p);
                if self
                    .moved
                    .get(&part)
                    .is_some_and(|at| now.duration_since(*at) < COOLDOWN)
                {
                    continue;
                }
                let Some(to) = pin_target(placement, &region, &followers, STABLE) else {
                    continue;
                };
                let key = PartitionKey {
                    topic: t.spec.name.as_str().into(),
                    partition: p,
                };
                let core = broker.shards.core_of(&key);
                let k = key.clone();
                match broker
                    .shards
                    .ask(core, |reply| CoreRequest::TransferLeader {
                        key: k,
                        to,
                        reply,
                    })
                    .await
                {
                    Ok(true) => {
                        tracing::info!(partition = %key, to = %to, "leadership handed to the topic's preferred region");
                        self.moved.insert(part, now);
                    }
                    Ok(false) => {}
                    Err(e) => tracing::debug!(partition = %key, error = %e, "leader pinning"),
                }
            }
        }
        self.in_sync.retain(|k, _| seen.contains(k));
        self.moved
            .retain(|_, at| now.duration_since(*at) < COOLDOWN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_over_only_to_a_better_region_in_sync_long_enough() {
        let p = Placement {
            leader_regions: vec!["a".into(), "b".into()],
            ..Placement::default()
        };
        let s = |secs: u64| Some(Duration::from_secs(secs));
        let stable = Duration::from_secs(10);
        // Leading in c: a follower in a, in sync for 12 s, takes over before one in b.
        let f = [
            (NodeId(2), "b", s(60)),
            (NodeId(1), "a", s(12)),
            (NodeId(3), "c", s(60)),
        ];
        assert_eq!(pin_target(&p, "c", &f, stable), Some(NodeId(1)));
        // The one in a is back only 5 s: b meanwhile (it is better than c).
        let f2 = [(NodeId(2), "b", s(60)), (NodeId(1), "a", s(5))];
        assert_eq!(pin_target(&p, "c", &f2, stable), Some(NodeId(2)));
        // Leading in b: only a is better, and it is not stable yet; out of sync is never chosen.
        assert_eq!(pin_target(&p, "b", &f2, stable), None);
        assert_eq!(pin_target(&p, "b", &[(NodeId(1), "a", None)], stable), None);
        // Leading in the best region already: nothing to do.
        assert_eq!(pin_target(&p, "a", &f, stable), None);
        // No leader regions: nothing ever moves.
        assert_eq!(pin_target(&Placement::default(), "c", &f, stable), None);
    }
}
