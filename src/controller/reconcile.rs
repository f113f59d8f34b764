//! Keeping a node's partitions in line with the metadata: what `cluster::plan::reconcile`
//! says, carried out on the cores (open, close, and delete the files of what went).

use std::path::PathBuf;

use super::follower::Follower;
use crate::cluster::plan::{self, PartitionId};
use crate::cluster::TopicSpec;
use crate::shard::request::OpenPartition;
use crate::shard::{CoreRequest, PartitionKey};

/// Partitions a node opens at once, per core; a reconciling step opens four times as many.
const OPENS_PER_CORE: usize = 8;

impl Follower {
    /// Opens the partitions this node should hold and closes (and removes) the others;
    /// `deleted`: topics whose files go even if never opened here since the last start.
    pub(super) async fn reconcile(&mut self, deleted: Vec<TopicSpec>) {
        let broker = self.broker.clone();
        let reopen_failed = !self.reopen_promoted().await;
        let open = self
            .open
            .iter()
            .map(|(k, (uid, _))| (k.clone(), *uid))
            .collect();
        let diff = plan::reconcile(&self.state, broker.node_id(), &open);
        let mut failed = !diff.waiting.is_empty();
        for (topic, p) in &diff.waiting {
            tracing::debug!(
                topic,
                partition = p,
                "a replica's node is not registered yet"
            );
        }
        for id in diff.close {
            let key = PartitionKey {
                topic: id.0.as_str().into(),
                partition: id.1,
            };
            let core = broker.shards.core_of(&key);
            let k = key.clone();
            // A mirror's pulls stop before its replica closes.
            self.pullers.remove(&id);
            match broker
                .shards
                .ask(core, |reply| CoreRequest::Close { key: k, reply })
                .await
            {
                Ok(()) => {
                    if let Some((_, dir)) = self.open.remove(&id) {
                        remove_dir(dir).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "closing failed; will retry");
                    failed = true;
                }
            }
        }
        for spec in deleted {
            remove_dir(broker.config.data_dir.join("topics").join(spec.dir_name())).await;
        }
        // A bounded number per step: the follower applies the metadata that arrives meanwhile
        // (a node opening thousands of partitions applied nothing else for minutes: group
        // commits and topic creations waited) and comes back for the rest at once.
        let per_step = broker.shards.core_count().max(1) * OPENS_PER_CORE * 4;
        self.more_to_open = diff.open.len() > per_step;
        // Partitions that failed to open last time go last: they cannot hold back the rest.
        let mut to_open = diff.open;
        to_open.sort_by_key(|o| self.open_failures.contains(&(o.topic.clone(), o.partition)));
        let opens = to_open.into_iter().take(per_step).filter_map(|o| {
            let spec = self.state.topics.get(&o.topic)?.clone();
            let promoted = promoted_at(&self.state, &spec, o.partition);
            let broker = broker.clone();
            Some(async move {
                let key = PartitionKey {
                    topic: o.topic.as_str().into(),
                    partition: o.partition,
                };
                let dir = broker.partition_dir(&spec, o.partition);
                let open = OpenPartition {
                    key: key.clone(),
                    uid: o.uid,
                    dir: dir.clone(),
                    config: broker.config.log_config(&spec.settings),
                    replica: broker.replica.clone(),
                    voters: o.voters,
                    first: o.first,
                    mirror: spec.mirror.is_some(),
                    promoted,
                };
                let core = broker.shards.core_of(&key);
                let r = broker
                    .shards
                    .ask(core, move |reply| CoreRequest::Open {
                        open: Box::new(open),
                        reply,
                    })
                    .await;
                let mirror = spec.mirror.map(|of| (key, core, of));
                ((o.topic, o.partition), o.uid, dir, mirror, r)
            })
        });
        // A bounded number at a time: thousands of groups starting at once (log files, Raft
        // state, first elections) starved every core's other work, the metadata group's
        // included, and a cluster creating 2,500 partitions lost its metadata leader.
        let opened: Vec<_> = futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
            futures::stream::iter(opens),
            broker.shards.core_count().max(1) * OPENS_PER_CORE,
        ))
        .await;
        self.opened_some = false;
        for (id, uid, dir, mirror, r) in opened {
            match r {
                Ok(()) => {
                    self.opened_some = true;
                    self.open_failures.remove(&id);
                    if let Some((key, core, of)) = mirror {
                        let puller = crate::mirror::start(broker.clone(), key, core, of, id.1);
                        self.pullers.insert(id.clone(), puller);
                    }
                    self.open.insert(id, (uid, dir));
                }
                Err(e) => {
                    tracing::warn!(topic = %id.0, partition = id.1, error = %e, "opening failed; will retry");
                    self.open_failures.insert(id);
                    failed = true;
                }
            }
        }
        self.failed = failed || reopen_failed;
    }
}

impl Follower {
    /// Closes (keeping their files) the mirror replicas whose topic was promoted since they
    /// opened: reconciling then opens them again, as Raft groups.
    /// Whether every one closed (a failure is retried at the next step).
    async fn reopen_promoted(&mut self) -> bool {
        let mut all = true;
        let promoted: Vec<PartitionId> = self
            .pullers
            .keys()
            .filter(|id| {
                let uid = self.open.get(*id).map(|(uid, _)| *uid);
                self.state
                    .topics
                    .get(&id.0)
                    .is_some_and(|t| t.mirror.is_none() && Some(t.uid) == uid)
            })
            .cloned()
            .collect();
        for id in promoted {
            let key = PartitionKey {
                topic: id.0.as_str().into(),
                partition: id.1,
            };
            let core = self.broker.shards.core_of(&key);
            let k = key.clone();
            match self
                .broker
                .shards
                .ask(core, |reply| CoreRequest::Close { key: k, reply })
                .await
            {
                Ok(()) => {
                    self.pullers.remove(&id);
                    self.open.remove(&id);
                    tracing::info!(partition = %key, "mirror promoted: reopening its replica as a Raft group");
                }
                Err(e) => {
                    tracing::warn!(partition = %key, error = %e, "closing a promoted mirror's replica failed; will retry");
                    all = false;
                }
            }
        }
        all
    }
}

async fn remove_dir(dir: PathBuf) {
    let shown = dir.display().to_string();
    let r = tokio::task::spawn_blocking(move || {
        let r = match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        // The incarnation's directory goes with its last partition.
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
        r
    })
    .await;
    if let Ok(Err(e)) = r {
        tracing::warn!(dir = shown, error = %e, "could not remove a partition's files");
    }
}

/// For a promoted mirror's partition: where its copied log ends and the voters of the group it
/// became (see `raft::store::promote`).
fn promoted_at(
    state: &crate::cluster::ClusterState,
    spec: &TopicSpec,
    p: u32,
) -> Option<(
    crate::raft::store::Promoted,
    std::collections::BTreeMap<crate::raft::types::NodeId, crate::raft::types::Member>,
)> {
    if spec.mirror.is_some() {
        return None;
    }
    let cut = spec.promotion.as_ref()?.cuts.as_ref()?.get(p as usize)?;
    let voters = cut
        .replicas
        .iter()
        .filter_map(|id| state.nodes.get(id).map(|m| (*id, m.clone())))
        .collect();
    Some((
        crate::raft::store::Promoted {
            end: cut.end,
            term: cut.term,
            index: cut.index,
        },
        voters,
    ))
}
