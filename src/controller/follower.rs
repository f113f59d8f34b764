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

use super::checkpoint;
use super::Result;
use crate::broker::Broker;
use crate::cluster::plan::PartitionId;
use crate::cluster::{ClusterState, Command};
use crate::proto::internal as ipb;
use crate::shard::{CoreRequest, StartAt};
use crate::types::{Offset, TopicUid};
use tonic::transport::Channel;

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
    /// Reconciling left partitions to open (it opens a bounded number per step): the next
    /// step comes at once and reconciles again.
    pub(super) more_to_open: bool,
    /// The last reconcile opened at least one partition (then the next step comes at once
    /// while more are to open; without progress it waits as usual).
    pub(super) opened_some: bool,
    /// Partitions whose last open failed: tried after the others.
    pub(super) open_failures: std::collections::HashSet<PartitionId>,
    /// The pulls of the mirror replicas open here (stopped when dropped).
    pub(super) pullers: HashMap<PartitionId, crate::mirror::Puller>,
    /// Where this node's last checkpoint of the state stands (`checkpoint.rs`).
    checkpointed: Offset,
    /// Until this node is ready: which metadata leader was asked in which term, and where it
    /// said its log ends (see `reached_the_leader`), the point to reach.
    catch_up_to: Option<(crate::raft::types::NodeId, u64, Offset)>,
}

impl Follower {
    /// Starts from this node's checkpoint of the metadata state, if it has one (else from the
    /// beginning of the metadata log). A damaged checkpoint is an error: the log behind it may
    /// be purged.
    pub fn new(broker: Arc<Broker>) -> anyhow::Result<Follower> {
        let mut f = Follower {
            broker,
            state: ClusterState::default(),
            next: Offset(0),
            open: HashMap::new(),
            failed: false,
            more_to_open: false,
            opened_some: false,
            open_failures: Default::default(),
            pullers: HashMap::new(),
            checkpointed: Offset(0),
            catch_up_to: None,
        };
        if let Some(c) = checkpoint::load(&f.broker.config.data_dir).map_err(anyhow::Error::msg)? {
            tracing::info!(
                next = c.next.0,
                "metadata state loaded from this node's checkpoint"
            );
            f.adopt(c);
        }
        Ok(f)
    }

    /// Takes a checkpoint's state as applied; the next step reconciles the partitions with it.
    fn adopt(&mut self, c: checkpoint::Checkpoint) {
        self.state = c.state;
        self.next = c.next;
        self.checkpointed = c.next;
        self.failed = true;
        self.broker.set_state(Arc::new(self.state.clone()));
        self.broker.set_applied_view(self.next);
        self.broker.applied.send_if_modified(|a| {
            let moved = *a < c.next.0;
            *a = (*a).max(c.next.0);
            moved
        });
    }

    /// Every `metadata_snapshot_every` commands: writes the state to this node's checkpoint,
    /// then purges the metadata log behind it.
    async fn checkpoint_if_due(&mut self) -> Result<()> {
        let every = self.broker.config.metadata_snapshot_every;
        if self.next.0.saturating_sub(self.checkpointed.0) < every {
            return Ok(());
        }
        let c = checkpoint::Checkpoint::new(self.next, self.state.clone());
        if let Err(e) = checkpoint::save(&self.broker.config.data_dir, &c).await {
            // The log is not purged: nothing is lost, and the next step tries again.
            tracing::warn!(error = %e, "cannot write the metadata checkpoint");
            return Ok(());
        }
        self.checkpointed = self.next;
        let before = self.next;
        self.broker
            .ask_metadata(|key, reply| CoreRequest::Compact { key, before, reply })
            .await?;
        tracing::debug!(
            next = self.next.0,
            "metadata checkpoint written; log purged behind it"
        );
        Ok(())
    }

    /// This node's metadata log starts past what it applied (a leader sent it a snapshot after
    /// the others purged their logs): takes the state from a peer that has applied at least up
    /// to where the log now starts. The peers are the metadata leader and the nodes this node
    /// knows an address for, then the member it joined through: a node that joined after the
    /// purge knows no node's address but that one.
    async fn catch_up_from_peer(&mut self, start: Offset) -> Result<()> {
        let me = self.broker.node_id();
        let mut candidates: Vec<crate::raft::types::NodeId> = Vec::new();
        if let Some(l) = self.broker.metadata_leader().await {
            candidates.push(l);
        }
        let known = self.broker.cluster();
        for id in known.nodes.keys().chain(self.broker.controllers.keys()) {
            if !candidates.contains(id) {
                candidates.push(*id);
            }
        }
        let mut peers: Vec<(String, Channel)> = candidates
            .into_iter()
            .filter(|n| *n != me)
            .filter_map(|n| Some((format!("node {n}"), self.broker.peer_channel(n).ok()?)))
            .collect();
        let join = &self.broker.config.join;
        if !join.is_empty() {
            match crate::tls::endpoint(join) {
                Ok(e) => peers.push((
                    format!("{join} (joined through)"),
                    crate::tls::channel(&e, self.broker.client_tls().as_ref()),
                )),
                Err(e) => tracing::warn!(%join, error = %e, "the join address is not usable"),
            }
        }
        for (node, channel) in peers {
            let c = match self.metadata_state_at(channel, false).await {
                Ok(r) => match checkpoint::Checkpoint::decode(&r.checkpoint) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "a peer sent a bad metadata state");
                        continue;
                    }
                },
                Err(e) => {
                    tracing::debug!(%node, error = %e, "no metadata state from this peer");
                    continue;
                }
            };
            if c.next < start || c.next < self.next {
                continue;
            }
            tracing::info!(%node, next = c.next.0, "metadata state taken from a peer (this node's metadata log starts past what it had applied)");
            checkpoint::save(&self.broker.config.data_dir, &c)
                .await
                .map_err(|e| {
                    super::ControllerError::Precondition(format!(
                        "saving the metadata checkpoint: {e}"
                    ))
                })?;
            self.adopt(c);
            return Ok(());
        }
        Err(super::ControllerError::Precondition(format!(
            "this node's metadata log starts at {start}, past the {} it applied, and no peer has \
             sent a state that reaches it yet",
            self.next
        )))
    }

    /// Follows until the node shuts down.
    pub async fn run(mut self) {
        let broker = self.broker.clone();
        loop {
            tokio::select! {
                r = self.step(if self.more_to_open && self.opened_some { Duration::ZERO } else { FOLLOW_WAIT }) => {
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
        let end = self.broker.metadata_positions().await?.committed;
        while self.next < end {
            self.step(Duration::ZERO).await?;
        }
        // Started from a checkpoint with nothing committed past it: the partitions it names
        // are still to be opened.
        // (A bounded number per call: again while that opens some.)
        while self.failed || self.more_to_open {
            let before = self.open.len();
            self.reconcile(Vec::new()).await;
            if self.open.len() == before {
                break;
            }
        }
        Ok(!self.failed)
    }

    /// Applies what is committed past `next` (waiting up to `wait` for something), then
    /// reconciles the partitions if anything changed or an earlier attempt failed.
    async fn step(&mut self, wait: Duration) -> Result<()> {
        let from = self.next;
        // Caught up once: a leader was known before this read, and the read reaches the end
        // of what this replica has committed (which a leader's first message brings up to date).
        let leader_known = self.broker.alone()
            || self.broker.is_ready()
            || self.broker.metadata_leader().await.is_some();
        let fetched = match self
            .broker
            .ask_metadata(|key, reply| CoreRequest::Fetch {
                key,
                from,
                max_bytes: READ_BYTES,
                max_wait: wait,
                fresh: false,
                whole: false,
                reply,
            })
            .await
        {
            Ok(f) => f,
            Err(e) => {
                let start = self.broker.metadata_positions().await?.start;
                if start > self.next {
                    return self.catch_up_from_peer(start).await;
                }
                return Err(e.into());
            }
        };
        let mut changed = false;
        let mut moved = false;
        let mut deleted = Vec::new();
        // A long poll skips batches of control records only (a new leader's blank entry, a
        // membership change) and reads on from after them: they are applied too. (Without
        // this a node whose log ended in one never counted itself caught up until the next
        // command came.)
        if fetched.from > self.next {
            self.next = fetched.from;
        }
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
        if moved || self.failed || self.more_to_open {
            self.reconcile(deleted).await;
        }
        self.broker.set_applied_view(self.next);
        self.checkpoint_if_due().await?;
        let before = self.broker.applied.send_replace(self.next.0);
        assert!(
            before <= self.next.0,
            "the applied metadata went back from {before} to {}",
            self.next
        );
        if leader_known
            && self.next >= fetched.high_watermark
            && !self.failed
            && !self.more_to_open
            && !self.broker.is_ready()
            && self.reached_the_leader().await
        {
            tracing::debug!(
                next = self.next.0,
                high_watermark = fetched.high_watermark.0,
                "caught up"
            );
            let was = self.broker.ready.swap(true, Ordering::AcqRel);
            if !was {
                tokio::spawn(log_caught_up(self.broker.clone()));
            }
        }
        Ok(())
    }

    /// Whether this node has applied at least what the metadata leader had when first asked.
    /// A restarted follower's own commit index is only what the leader's first messages
    /// brought (256 entries each): reaching it is not being caught up, and a node that called
    /// itself ready there answered NOT_FOUND for topics created while it was down. The leader
    /// is asked once (again after a failed try, or when the leader or term changed); its answer is a
    /// fixed target, not raised by what commits meanwhile.
    ///
    /// The target is the end of the leader's log, not its commit index: a leader just elected
    /// (or restored in its old term after a restart of everyone: openraft restores a leader
    /// from its own vote) may have entries above its commit index that are committed already,
    /// and a node that took the commit index for the target denied topics they created. A
    /// leader never drops its own log, so everything in it gets committed and applied.
    async fn reached_the_leader(&mut self) -> bool {
        if self.broker.alone() {
            return true;
        }
        let Some(leader) = self.broker.metadata_leader().await else {
            return false;
        };
        // Asked again in a new term: a leader that lost and regained leadership may have had
        // its uncommitted tail replaced, and the end it gave may never be reached.
        let term = self.broker.metadata_replica().await.map_or(0, |s| s.term);
        if let Some((asked, in_term, t)) = self.catch_up_to {
            if asked == leader && in_term == term {
                return self.next >= t;
            }
        }
        let target = if leader == self.broker.node_id() {
            match self.broker.metadata_replica().await {
                Some(s) if s.is_leader => s.positions.next,
                _ => return false,
            }
        } else {
            match self.metadata_state(leader, true).await {
                Ok(r) if r.next > 0 || r.checkpoint.is_empty() => Offset(r.next),
                // A node from before probes sends its whole checkpoint.
                Ok(r) => match checkpoint::Checkpoint::decode(&r.checkpoint) {
                    Ok(c) => c.next,
                    Err(_) => return false,
                },
                Err(e) => {
                    tracing::debug!(%leader, error = %e, "the metadata leader did not say where it stands");
                    return false;
                }
            }
        };
        tracing::debug!(%leader, target = target.0, next = self.next.0, "the metadata leader's log end, to reach before serving");
        self.catch_up_to = Some((leader, term, target));
        self.next >= target
    }

    /// Asks `node` for its metadata state: the whole checkpoint, or only where it stands
    /// (`probe`). Ten seconds at most, as long as a whole state may take (a node from before
    /// probes sends its checkpoint either way).
    async fn metadata_state(
        &self,
        node: crate::raft::types::NodeId,
        probe: bool,
    ) -> std::result::Result<ipb::MetadataStateResponse, String> {
        let channel = self.broker.peer_channel(node).map_err(|e| e.to_string())?;
        self.metadata_state_at(channel, probe).await
    }

    /// [`Follower::metadata_state`] of the node at the other end of `channel`.
    async fn metadata_state_at(
        &self,
        channel: Channel,
        probe: bool,
    ) -> std::result::Result<ipb::MetadataStateResponse, String> {
        let mut client = ipb::peer_client::PeerClient::new(channel)
            .max_decoding_message_size(checkpoint::BYTES_MAX as usize);
        let mut req = tonic::Request::new(ipb::MetadataStateRequest {
            from: self.broker.node_id().0,
            cluster: self.broker.cluster_id.get().to_string(),
            probe,
        });
        req.set_timeout(Duration::from_secs(10));
        client
            .metadata_state(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| s.message().to_string())
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
