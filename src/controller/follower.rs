//! Following the metadata on one node: a long poll on the metadata log applies each committed
//! command to this node's copy of the state, then the node reconciles its partitions with it.
//!
//! ```text
//! metadata log (core 0) ── long-poll Fetch ──▶ ClusterState.apply ──▶ broker.set_state
//!                                                    └─▶ reconcile: open / close partitions
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Result;
use crate::broker::Broker;
use crate::cluster::plan::PartitionId;
use crate::cluster::{ClusterState, Command};
use crate::shard::{CoreRequest, PartitionKey, StartAt};
use crate::types::{Offset, TopicUid};

/// How long the follower's long poll waits; also how often failed opens are retried.
const FOLLOW_WAIT: Duration = Duration::from_secs(1);
/// Bytes of metadata read at once.
const READ_BYTES: usize = 4 << 20;

/// Follows the metadata log on this node and keeps its partitions in line with it.
pub struct Follower {
    pub(super) broker: Arc<Broker>,
    pub(super) state: ClusterState,
    /// Next metadata offset to read.
    next: Offset,
    /// Partitions open on this node: incarnation and directory.
    pub(super) open: HashMap<PartitionId, (TopicUid, PathBuf)>,
    /// Some partition failed to open or close: retry at the next step.
    pub(super) failed: bool,
}

impl Follower {
    pub fn new(broker: Arc<Broker>) -> Follower {
        Follower {
            broker,
            state: ClusterState::default(),
            next: Offset(0),
            open: HashMap::new(),
            failed: false,
        }
    }

    /// Follows until the node shuts down.
    pub async fn run(mut self) {
        let broker = self.broker.clone();
        loop {
            tokio::select! {
                r = self.step(FOLLOW_WAIT) => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "following the metadata failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                _ = broker.closed() => return,
            }
        }
    }

    /// Replays everything committed, then whether some partition could not be opened (a
    /// node alone, at start: everything in its log is committed once it leads).
    pub async fn replay(&mut self) -> Result<bool> {
        let key = PartitionKey::metadata();
        let end = self
            .broker
            .shards
            .ask(self.broker.shards.core_of(&key), |reply| {
                CoreRequest::Positions { key, reply }
            })
            .await?
            .committed;
        while self.next < end {
            self.step(Duration::ZERO).await?;
        }
        Ok(!self.failed)
    }

    /// Applies what is committed past `next` (waiting up to `wait` for something), then
    /// reconciles the partitions if anything changed or an earlier attempt failed.
    async fn step(&mut self, wait: Duration) -> Result<()> {
        let key = PartitionKey::metadata();
        let from = self.next;
        // Caught up once: a leader was known before this read, and the read reaches the end
        // of what this replica has committed (which a leader's first message brings up to date).
        let leader_known = self.broker.alone()
            || self.broker.is_ready()
            || self.broker.metadata_leader().await.is_some();
        let core = self.broker.shards.core_of(&key);
        let fetched = self
            .broker
            .shards
            .ask(core, |reply| CoreRequest::Fetch {
                key,
                from,
                max_bytes: READ_BYTES,
                max_wait: wait,
                reply,
            })
            .await?;
        let mut changed = false;
        let mut moved = false;
        let mut deleted = Vec::new();
        for batch in &fetched.batches {
            let control = batch.meta().control;
            for r in batch.records() {
                if r.offset < self.next || r.offset >= fetched.until {
                    continue;
                }
                self.next = r.offset.plus(1);
                if control {
                    continue;
                }
                match Command::decode(r.value) {
                    Ok(cmd) => {
                        moved |= cmd.places_partitions();
                        deleted.extend(self.state.apply(cmd));
                        changed = true;
                    }
                    Err(e) => {
                        tracing::error!(offset = r.offset.0, error = %e, "skipping a metadata record")
                    }
                }
            }
        }
        if changed {
            self.broker.set_state(Arc::new(self.state.clone()));
            if self.state.removed.contains(&self.broker.node_id()) {
                self.broker.stop_for(self.broker.removed_message());
            }
        }
        if moved || self.failed {
            self.reconcile(deleted).await;
        }
        let before = self.broker.applied.send_replace(self.next.0);
        assert!(
            before <= self.next.0,
            "the applied metadata went back from {before} to {}",
            self.next
        );
        if leader_known && self.next >= fetched.high_watermark && !self.failed {
            let was = self.broker.ready.swap(true, Ordering::AcqRel);
            if !was {
                tokio::spawn(log_caught_up(self.broker.clone()));
            }
        }
        Ok(())
    }
}

/// Says once, when the node has first caught up with the metadata, what it holds.
async fn log_caught_up(broker: Arc<Broker>) {
    let me = broker.node_id();
    let topics = broker.topics();
    let (mut partitions, mut records) = (0usize, 0u64);
    for t in &topics {
        for p in (0..t.spec.partitions).filter(|p| t.on(me, *p)) {
            partitions += 1;
            if let Ok(o) = broker
                .list_offsets(t, p, StartAt::Latest, &crate::broker::Origin::Relayed)
                .await
            {
                records += o.end.0.saturating_sub(o.start.0);
            }
        }
    }
    let state = broker.cluster();
    tracing::info!(
        "caught up with the cluster metadata: {} nodes, {} topics; this node holds {partitions} \
         partitions with {records} records (offsets, counting Raft's few control records)",
        state.nodes.len(),
        topics.len(),
    );
}
