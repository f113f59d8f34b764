//! One partition on its core: its Raft group over its log, and the readers waiting for new
//! records.
//!
//! An append is a Raft proposal: it is acknowledged once committed (by a quorum of the group's
//! voters, each having secured it under the topic's fsync policy) and applied, which moves the
//! log's committed position. Readers see only records below that position.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{select, Either};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft_rt::watch::WatchReceiver;

use super::request::{
    AppendAck, Appended, CoreError, Fetched, ListedOffsets, MemberProgress, MemberTarget,
    PartitionKey, ProducerSeq, ReplicaSettings, ReplicaState, Reply, StartAt,
};
use crate::log::batch::HEADER_LEN;
use crate::log::{Batch, BatchBuilder, Log, LogConfig, LogError, ReadBound, Record};
use crate::proto::internal as pb;
use crate::raft::election::ElectionTimer;
use crate::raft::group::{self, NoPeers, PartitionGroup};
use crate::raft::network::{self, GroupNetwork};
use crate::raft::producers::SeqCheck;
use crate::raft::store::StoreHandle;
use crate::raft::types::{EntryBatch, Member, NodeId, PartitionRaft};
use crate::types::{Offset, ProducerId, Sequence};

/// A new voter is added once it is at most this many entries behind the leader.
const CATCH_UP_ENTRIES: u64 = 256;

/// How long opening a partition waits for its group to elect a leader.
const ELECTION_WAIT: Duration = Duration::from_secs(30);

type Waiters = Rc<RefCell<Vec<oneshot::Sender<()>>>>;

/// One append request as the core hands it over: records, idempotent producer, reply.
pub type AppendRequest = (Vec<Record>, Option<ProducerSeq>, Reply<Appended>);

/// A producer's sequence range in one batch: (producer, first, last).
type SeqRange = (ProducerId, i32, i32);

/// Packs the records of one append call into batches. Records of requests without a producer
/// share batches; an idempotent producer's request gets batches of its own, each stamped with
/// the producer and the sequence number of its first record.
struct Batcher {
    batch_max: usize,
    batches: Vec<Result<Batch, CoreError>>,
    /// Per batch: the sequence range it carries, if any.
    seqs: Vec<Option<SeqRange>>,
    builder: BatchBuilder,
    /// While a producer's request is being placed: its id, the sequence of the current batch's
    /// first record and of the next record (i64: the one after the last may pass i32::MAX).
    producer: Option<(ProducerId, i64, i64)>,
    /// The ranges of the producer's request being placed.
    ranges: Vec<SeqRange>,
}

impl Batcher {
    fn new(batch_max: usize) -> Batcher {
        Batcher {
            batch_max,
            batches: Vec::new(),
            seqs: Vec::new(),
            builder: BatchBuilder::new(batch_max),
            producer: None,
            ranges: Vec::new(),
        }
    }

    fn next_builder(&self) -> BatchBuilder {
        let b = BatchBuilder::new(self.batch_max);
        match self.producer {
            Some((id, _, next)) => b.producer(id, Sequence(next as i32)),
            None => b,
        }
    }

    /// Closes the current batch, if it has records.
    fn seal(&mut self) {
        if self.builder.is_empty() {
            return;
        }
        let next = self.next_builder();
        let full = std::mem::replace(&mut self.builder, next);
        self.batches
            .push(full.finish().map_err(|e| CoreError::Log(e.into())));
        let range = self.producer.as_mut().map(|(id, first, next)| {
            let r = (*id, *first as i32, (*next - 1) as i32);
            *first = *next;
            r
        });
        self.ranges.extend(range);
        self.seqs.push(range);
    }

    /// The next records are an idempotent producer's, from sequence `ps.first`.
    fn start_producer(&mut self, ps: &ProducerSeq) {
        self.seal();
        let first = ps.first.0 as i64;
        self.producer = Some((ps.id, first, first));
        self.builder = self.next_builder();
    }

    /// The producer's request is placed: answers the sequence ranges of its batches.
    fn end_producer(&mut self) -> Vec<SeqRange> {
        self.seal();
        self.producer = None;
        self.builder = self.next_builder();
        std::mem::take(&mut self.ranges)
    }

    /// Places a record: (batch, index in it). The record fits an empty batch (checked).
    fn push(&mut self, r: &Record) -> Result<(usize, u32), CoreError> {
        if self.builder.push(r).is_err() {
            self.seal();
            self.builder.push(r).map_err(|e| CoreError::Log(e.into()))?;
        }
        if let Some((_, _, next)) = &mut self.producer {
            *next += 1;
        }
        Ok((self.batches.len(), self.builder.record_count() - 1))
    }

    fn finish(mut self) -> (Vec<Result<Batch, CoreError>>, Vec<Option<SeqRange>>) {
        self.seal();
        (self.batches, self.seqs)
    }
}

pub struct Partition {
    /// The group has other voters (heartbeats and elections are driven by the core).
    replicated: bool,
    timing: crate::raft::Timing,
    /// When this replica starts an election if it hears no leader (see `raft::election`).
    election: RefCell<ElectionTimer>,
    pub key: PartitionKey,
    /// The topic incarnation this group belongs to.
    pub uid: u64,
    pub log: Log,
    pub raft: PartitionGroup,
    /// Retention goes through the Raft storage (see [`Partition::retain`]).
    store: StoreHandle,
    /// Fetches waiting for the commit position to move.
    waiters: Waiters,
    /// Set once the partition starts closing: waiting fetches end instead of waiting on.
    closed: Cell<bool>,
    /// When retention last ran, and whether it is running.
    retained: Cell<Instant>,
    retaining: Cell<bool>,
    /// Idempotent producers' batches proposed here and not yet answered: (first, last) sequence.
    pending: RefCell<HashMap<ProducerId, Vec<(i32, i32)>>>,
}

fn wake(waiters: &Waiters) {
    for w in waiters.borrow_mut().drain(..) {
        let _ = w.send(());
    }
}

fn from_write_error(e: RaftError<PartitionRaft, ClientWriteError<PartitionRaft>>) -> CoreError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => CoreError::NotLeader {
            leader: f.leader_id,
        },
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => CoreError::LeaderChanged {
            leader: f.leader_id,
        },
        other => CoreError::Raft(other.to_string()),
    }
}

impl Partition {
    /// Opens the log in `dir` and starts the partition's Raft group on this core (`core`). A
    /// new group is initialized with `voters` (every replica initializes it identically, which
    /// openraft allows). A group whose only voter is this node is led by it before this
    /// returns; a replicated group elects its leader in the background.
    pub async fn open(
        key: PartitionKey,
        uid: u64,
        dir: &Path,
        config: LogConfig,
        replica: &ReplicaSettings,
        voters: BTreeMap<NodeId, Member>,
        core: u32,
    ) -> Result<Partition, CoreError> {
        let alone = voters.len() == 1 && voters.contains_key(&replica.node_id);
        // No voters: this replica joins a group that exists elsewhere (it is being added by a
        // move) and waits for its leader; it never initializes the group itself.
        let joining = voters.is_empty();
        if !joining && !voters.contains_key(&replica.node_id) {
            return Err(CoreError::Raft(format!(
                "{key}: this node ({}) is not among the voters",
                replica.node_id
            )));
        }
        // Retention goes through the group (`retain`), never behind its back.
        let config = LogConfig {
            retention_loop: false,
            ..config
        };
        let log = Log::open(dir, config).await?;
        let waiters: Waiters = Rc::default();
        let on_commit = {
            let w = waiters.clone();
            Rc::new(move || wake(&w))
        };
        // A group whose only voter is this node needs no timer: an idle partition then costs no
        // CPU at all (openraft's tick wakes every fifth of a heartbeat, per group).
        // Replicated groups are driven by their core's timer (`core::drive_groups`), not by a
        // timer each.
        let raft_config =
            group::config_with(&key.to_string(), replica.timing, false).map_err(CoreError::Raft)?;
        let started = match &replica.transport {
            Some(t) => {
                let network = GroupNetwork {
                    transport: t.clone(),
                    core,
                    group: pb::Group {
                        topic: key.topic.to_string(),
                        partition: key.partition,
                        uid,
                    },
                };
                group::start_with(
                    replica.node_id,
                    raft_config,
                    network,
                    log.clone(),
                    dir,
                    on_commit,
                )
                .await
            }
            None if alone => {
                group::start_with(
                    replica.node_id,
                    raft_config,
                    NoPeers,
                    log.clone(),
                    dir,
                    on_commit,
                )
                .await
            }
            None => Err(format!("{key}: replicated, but this node has no transport")),
        };
        let (raft, store) = match started {
            Ok(started) => started,
            Err(e) => {
                let _ = log.close().await;
                return Err(CoreError::Raft(e));
            }
        };
        // From here a failure must not leave the group's tasks and the log running.
        let ready = async {
            store
                .set_member(replica.node_id, joining)
                .await
                .map_err(|e| CoreError::Raft(format!("{key}: {e}")))?;
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| CoreError::Raft(e.to_string()))?;
            if !initialized && !joining {
                match raft.initialize(voters).await {
                    Ok(()) => {}
                    // Initialized meanwhile by a message from a peer: fine.
                    Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                    Err(e) => return Err(CoreError::Raft(e.to_string())),
                }
            }
            if !alone {
                return Ok(());
            }
            if !raft.is_leader() {
                raft.trigger()
                    .elect(false)
                    .await
                    .map_err(|e| CoreError::Raft(e.to_string()))?;
            }
            raft.wait(Some(ELECTION_WAIT))
                .state(openraft::ServerState::Leader, "partition leader elected")
                .await
                .map_err(|e| CoreError::Raft(format!("{key}: {e}")))?;
            Ok::<(), CoreError>(())
        }
        .await;
        if let Err(e) = ready {
            let _ = raft.shutdown().await;
            let _ = log.close().await;
            return Err(e);
        }
        Ok(Self {
            key,
            uid,
            log,
            raft,
            store,
            waiters,
            closed: Cell::new(false),
            replicated: !alone,
            timing: replica.timing,
            election: RefCell::new(ElectionTimer::new(
                replica.timing,
                Instant::now(),
                &mut rand::rng(),
            )),
            retained: Cell::new(Instant::now()),
            retaining: Cell::new(false),
            pending: RefCell::default(),
        })
    }

    /// Handles a Raft message from a peer. A replica that joins its group by a move grants no
    /// votes until it has been a learner and then a voter there (see `raft::store`); a message
    /// from a leader it accepts resets its election timer.
    pub async fn handle(&self, body: pb::raft_request::Body) -> crate::raft::transport::Answer {
        use pb::raft_request::Body;
        if matches!(body, Body::Vote(_) | Body::PreVote(_)) && !self.store.may_vote() {
            return Err(format!(
                "{}: this replica is joining its group and does not vote yet",
                self.key
            ));
        }
        let mut contact = false;
        let answer = network::handle(&self.raft, body, &mut contact).await;
        if contact {
            self.election.borrow_mut().heard_leader(Instant::now());
        }
        answer
    }

    /// Whether the group has other voters (and so needs heartbeats and elections).
    pub fn replicated(&self) -> bool {
        self.replicated
    }

    /// Whether this replica leads its group, and the group's current term.
    pub fn leadership(&self) -> (bool, u64) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        (m.current_leader == Some(m.id), m.current_term)
    }

    /// One step of the core's Raft driver: a leader sends heartbeats; a follower that has not
    /// heard a leader for its election timeout starts an election (pre-vote first, so a node
    /// that cannot win does not disturb the others).
    pub async fn drive(&self, now: Instant, beat: bool) {
        let state = self.raft.metrics().borrow_watched().state;
        match state {
            openraft::ServerState::Leader if beat => {
                let _ = self.raft.trigger().heartbeat().await;
            }
            openraft::ServerState::Follower | openraft::ServerState::Candidate
                if self.election.borrow_mut().due(now, &mut rand::rng()) =>
            {
                tracing::debug!(partition = %self.key, "no leader heard: starting an election");
                let _ = self.raft.trigger().elect(true).await;
            }
            _ => {}
        }
    }

    /// Moves the group one step towards `target` (on its leader): adds missing nodes as
    /// learners; once every new voter has caught up, changes the voters (openraft's joint
    /// consensus, committed by the old and the new majority); then drops learners not wanted.
    /// Safe to repeat, also by a new leader after a change was interrupted: each step compares
    /// the group's current membership with the target.
    pub async fn change_members(&self, target: MemberTarget) -> Result<MemberProgress, CoreError> {
        use openraft::ChangeMembers;
        use std::collections::BTreeSet;
        if target.voters.is_empty() {
            return Err(CoreError::Raft(format!(
                "{}: a group needs a voter",
                self.key
            )));
        }
        let metrics = self.raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(metrics.id) {
            return Err(CoreError::NotLeader {
                leader: metrics.current_leader,
            });
        }
        let membership = metrics.membership_config.membership().clone();
        // 1. Every wanted node receives the log.
        for (id, member) in target.voters.iter().chain(&target.learners) {
            if membership.get_node(id).is_none() {
                self.raft
                    .add_learner(*id, member.clone(), false)
                    .await
                    .map_err(from_write_error)?;
            }
        }
        // 2. New voters must have caught up first: a lagging one would stall commits while
        //    the joint configuration needs it.
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let wanted: BTreeSet<NodeId> = target.voters.keys().copied().collect();
        let joint = membership.get_joint_config().len() > 1;
        if voters != wanted || joint {
            let last = metrics.last_log_index.unwrap_or(0);
            let matched = |id: &NodeId| {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
            };
            for id in wanted.difference(&voters) {
                // A learner that has accepted nothing yet is not caught up, however short the
                // log (its replica may not even be open yet).
                let behind = matched(id).map(|m| last.saturating_sub(m));
                match behind {
                    Some(b) if b <= CATCH_UP_ENTRIES => {}
                    _ => {
                        return Ok(MemberProgress::CatchingUp {
                            node: *id,
                            behind: behind.unwrap_or(last + 1),
                        })
                    }
                }
            }
            tracing::info!(partition = %self.key, from = ?voters, to = ?wanted, "changing voters");
            self.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(wanted.clone()), false)
                .await
                .map_err(from_write_error)?;
        }
        // 3. Learners nobody wants any more.
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .clone();
        let stale: BTreeSet<NodeId> = membership
            .learner_ids()
            .filter(|id| !wanted.contains(id) && !target.learners.contains_key(id))
            .collect();
        if !stale.is_empty() {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(stale), false)
                .await
                .map_err(from_write_error)?;
        }
        Ok(MemberProgress::Done)
    }

    /// Whether retention is due (the topic has retention, its check interval passed and it is
    /// not running): if so, it counts as started, and the caller runs [`Partition::retained`].
    pub fn retention_due(&self, now: Instant) -> bool {
        let c = self.log.config();
        if c.retention_ms.is_none() && c.retention_bytes.is_none() {
            return false;
        }
        let every = Duration::from_millis(c.retention_check_interval_ms);
        if self.retaining.get() || now.saturating_duration_since(self.retained.get()) < every {
            return false;
        }
        self.retaining.set(true);
        self.retained.set(now);
        true
    }

    /// Runs retention (after [`Partition::retention_due`] said so).
    pub async fn retained(&self) {
        if let Err(e) = self.retain(crate::types::TimestampMs::now()).await {
            tracing::warn!(partition = %self.key, error = %e, "retention failed");
        }
        self.retaining.set(false);
    }

    /// Applies retention through the group: the entries retention would delete are purged
    /// from the Raft log (openraft does so once no replication still reads them, behind a
    /// snapshot taken at that point), which deletes their segments. A follower that later
    /// needs them is sent that snapshot and starts its log where it ends.
    pub async fn retain(&self, now: crate::types::TimestampMs) -> Result<(), CoreError> {
        let Some(end) = self.log.retention_point(now).await? else {
            return Ok(());
        };
        let Some(upto) = self.store.last_entry_before(end) else {
            return Ok(());
        };
        let covered = |m: &openraft::RaftMetrics<PartitionRaft>| {
            m.snapshot.is_some_and(|s| s.index >= upto.index)
        };
        if !covered(&self.raft.metrics().borrow_watched()) {
            self.store.snapshot_at(upto);
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(|e| CoreError::Raft(e.to_string()))?;
            // Built in the background: purge once it is there (else at the next check).
            let built = self
                .raft
                .wait(Some(Duration::from_secs(5)))
                .metrics(covered, "snapshot for retention")
                .await;
            if built.is_err() {
                return Ok(());
            }
        }
        tracing::debug!(partition = %self.key, upto = %upto, "retention purges");
        self.raft
            .trigger()
            .purge_log(upto.index)
            .await
            .map_err(|e| CoreError::Raft(e.to_string()))
    }

    /// What this replica knows of its group.
    pub fn state(&self) -> ReplicaState {
        let m = self.raft.metrics().borrow_watched().clone();
        let leader = m.current_leader;
        ReplicaState {
            leader,
            is_leader: leader == Some(m.id),
            term: m.current_term,
            last_index: m.last_log_index,
            applied_index: m.last_applied.map(|l| l.index),
            voters: m.membership_config.membership().voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .filter(|(id, _)| **id != m.id)
                        .map(|(id, l)| (*id, l.as_ref().map(|l| l.index)))
                        .collect()
                })
                .unwrap_or_default(),
            positions: self.log.positions(),
            uid: self.uid,
            quorum_acked: m.last_quorum_acked.map(|at| at.elapsed()),
        }
    }

    /// Stops the Raft group, then flushes and closes the log.
    pub async fn close(&self) -> Result<(), CoreError> {
        self.closed.set(true);
        wake(&self.waiters);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(partition = %self.key, error = %e, "raft group did not stop cleanly");
        }
        self.log.close().await.map_err(CoreError::Log)
    }

    /// Appends the records of several requests that arrived together, as few batches as the
    /// batch size limit allows (normally one), sharing one fsync; then answers each request
    /// with its records' offsets. A request refused whole because this replica does not lead
    /// gets its records back ([`Appended::NotLeader`]); one refused after part of it was
    /// proposed (its records spanned batches and leadership moved between them) gets
    /// `LeaderChanged`: part of it may be committed, so it must not be resent as if unwritten.
    ///
    /// An idempotent producer's request gets batches of its own, carrying its id and sequence
    /// numbers; it is first checked against the producer's committed batches and the ones
    /// still in flight: a retry of committed records is answered with their offsets and
    /// written again nowhere (see `raft::producers`).
    pub async fn append(&self, requests: Vec<AppendRequest>) {
        let batch_max = self.log.config().batch_bytes_max;
        let idempotent_ready = if requests.iter().any(|r| r.1.is_some()) {
            Some(self.idempotence_ready().await)
        } else {
            None
        };
        // Build batches; remember which (batch, index) each record landed in.
        let mut batcher = Batcher::new(batch_max);
        let mut places: Vec<Vec<(usize, u32)>> = Vec::with_capacity(requests.len());
        // Requests answered without writing: offsets of a retry already committed, or why not.
        let mut answered: Vec<Option<Result<Vec<Offset>, CoreError>>> =
            (0..requests.len()).map(|_| None).collect();
        for (ri, (records, producer, _)) in requests.iter().enumerate() {
            places.push(Vec::with_capacity(records.len()));
            // A request with a record too large for any batch is refused whole, before any of
            // its records is placed: nothing of it is written.
            let biggest = records
                .iter()
                .map(Record::encoded_len_bound)
                .max()
                .unwrap_or(0);
            if HEADER_LEN + biggest > batch_max {
                answered[ri] = Some(Err(CoreError::Log(LogError::BatchTooLarge {
                    len: HEADER_LEN + biggest,
                    max: batch_max,
                })));
                continue;
            }
            if let Some(ps) = producer {
                let check = match &idempotent_ready {
                    Some(Err(e)) => Err(e.clone()),
                    _ => self.check_sequences(ps, records.len()),
                };
                match check {
                    Ok(None) => batcher.start_producer(ps),
                    Ok(Some(offsets)) => {
                        answered[ri] = Some(Ok(offsets));
                        continue;
                    }
                    Err(e) => {
                        answered[ri] = Some(Err(e));
                        continue;
                    }
                }
            }
            for r in records {
                match batcher.push(r) {
                    Ok(place) => places[ri].push(place),
                    Err(e) => {
                        answered[ri] = Some(Err(e));
                        break;
                    }
                }
            }
            if producer.is_some() {
                // In flight from now on: a later request of this call (a retry through another
                // node, or the next of a pipelined stream) is checked against them.
                let mut pending = self.pending.borrow_mut();
                for (id, f, l) in batcher.end_producer() {
                    pending.entry(id).or_default().push((f, l));
                }
            }
        }
        let (batches, batch_seqs) = batcher.finish();
        // `pending` holds the idempotent batches until their writes end (whatever the outcome).
        // Propose every batch at once: Raft orders them as proposed, and one fsync covers all.
        let appends = batches.iter().map(|b| async {
            match b {
                Ok(b) => self
                    .raft
                    .client_write(EntryBatch(b.clone()))
                    .await
                    .map(|r| Offset(r.data.base))
                    .map_err(from_write_error),
                Err(e) => Err(e.clone()),
            }
        });
        tracing::trace!(partition = %self.key, batches = batches.len(), "appending");
        let results = futures::future::join_all(appends).await;
        tracing::trace!(partition = %self.key, "appended");
        if batch_seqs.iter().any(Option::is_some) {
            let mut pending = self.pending.borrow_mut();
            for (id, f, l) in batch_seqs.iter().flatten() {
                if let Some(v) = pending.get_mut(id) {
                    if let Some(i) = v.iter().position(|x| *x == (*f, *l)) {
                        v.remove(i);
                    }
                    if v.is_empty() {
                        pending.remove(id);
                    }
                }
            }
        }
        for (ri, (records, _, reply)) in requests.into_iter().enumerate() {
            if let Some(early) = answered[ri].take() {
                let answer = match early {
                    Ok(offsets) => Ok(Appended::Done(AppendAck { offsets })),
                    // Nothing of it was written: the caller may send it to the leader.
                    Err(CoreError::NotLeader { leader }) if places[ri].is_empty() => {
                        Ok(Appended::NotLeader { leader, records })
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(answer);
                continue;
            }
            let outcomes = || places[ri].iter().map(|&(bi, _)| &results[bi]);
            let refused =
                |r: &Result<Offset, CoreError>| matches!(r, Err(CoreError::NotLeader { .. }));
            let answer = if !places[ri].is_empty() && outcomes().all(refused) {
                let leader = match outcomes().next() {
                    Some(Err(CoreError::NotLeader { leader })) => *leader,
                    _ => None,
                };
                Ok(Appended::NotLeader { leader, records })
            } else if let Some(Err(CoreError::NotLeader { leader })) =
                outcomes().find(|r| refused(r))
            {
                Err(CoreError::LeaderChanged { leader: *leader })
            } else {
                places[ri]
                    .iter()
                    .map(|&(bi, i)| match &results[bi] {
                        Ok(base) => Ok(base.plus(i as u64)),
                        Err(e) => Err(e.clone()),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|offsets| Appended::Done(AppendAck { offsets }))
            };
            let _ = reply.send(answer);
        }
    }

    /// Checks an idempotent request of `count` records against the producer's committed
    /// batches and those in flight: `None` to append it, the offsets of a retry already
    /// committed, or why it is refused.
    fn check_sequences(
        &self,
        ps: &ProducerSeq,
        count: usize,
    ) -> Result<Option<Vec<Offset>>, CoreError> {
        let pending = self.pending.borrow();
        let mine = pending.get(&ps.id).map_or(&[][..], |v| &v[..]);
        match self
            .store
            .producers()
            .check(ps.id, ps.first.0, count as u32, mine)
        {
            SeqCheck::Append => Ok(None),
            SeqCheck::Duplicate(offsets) => {
                tracing::debug!(partition = %self.key, producer = ps.id.0, first = ps.first.0, "retried sequences answered, not written again");
                Ok(Some(offsets))
            }
            SeqCheck::InFlight => Err(CoreError::InFlight),
            SeqCheck::OutOfOrder { expected } => Err(CoreError::OutOfOrder {
                producer: ps.id.0,
                expected,
                got: ps.first.0 as i64,
            }),
        }
    }

    /// Whether this replica may check idempotent producers' sequences: it leads, and has
    /// applied every entry of earlier terms (the first entry of its own term is applied), so
    /// its producer table holds every committed batch. A new leader is given a moment.
    async fn idempotence_ready(&self) -> Result<(), CoreError> {
        let ready = |m: &openraft::RaftMetrics<PartitionRaft>| {
            m.current_leader == Some(m.id)
                && m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
        };
        let m = self.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(m.id) {
            return Err(CoreError::NotLeader {
                leader: m.current_leader,
            });
        }
        if ready(&m) {
            return Ok(());
        }
        self.raft
            .wait(Some(Duration::from_millis(2 * self.timing.election_max_ms)))
            .metrics(ready, "leader applied its first entry")
            .await
            .map(|_| ())
            .map_err(|_| CoreError::NotLeader {
                leader: self.raft.metrics().borrow_watched().current_leader,
            })
    }

    /// Committed batches from `from`, waiting up to `max_wait` for some to arrive.
    pub async fn fetch(
        &self,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<Fetched, CoreError> {
        let deadline = Instant::now() + max_wait;
        let mut from = from;
        loop {
            if self.closed.get() {
                return Err(CoreError::Log(LogError::Closed));
            }
            let p = self.log.positions();
            if from < p.start || from > p.committed {
                return Err(CoreError::Log(crate::log::LogError::OffsetOutOfRange {
                    requested: from,
                    start: p.start,
                    end: p.committed,
                }));
            }
            let now = Instant::now();
            if from < p.committed || now >= deadline {
                let r = self.log.read(from, max_bytes, ReadBound::Committed).await?;
                if now < deadline
                    && !r.batches.is_empty()
                    && r.batches.iter().all(|b| b.meta().control)
                {
                    // Only control records (never delivered): skip them and keep waiting.
                    from = r.next_offset();
                    continue;
                }
                return Ok(Fetched {
                    batches: r.batches,
                    from,
                    until: r.until,
                    start: p.start,
                    high_watermark: p.committed,
                });
            }
            let (tx, rx) = oneshot::channel();
            if self.waiters.borrow().len() >= 64 {
                self.prune_waiters();
            }
            self.waiters.borrow_mut().push(tx);
            let timer = glommio::timer::sleep(deadline - now);
            futures::pin_mut!(timer);
            match select(rx, timer).await {
                Either::Left(_) | Either::Right(_) => {}
            }
        }
    }

    /// The committed range, and where `at` falls in it.
    pub async fn list_offsets(&self, at: StartAt) -> Result<ListedOffsets, CoreError> {
        let p = self.log.positions();
        let offset = match at {
            StartAt::Earliest => p.start,
            StartAt::Latest => p.committed,
            StartAt::Offset(o) => o,
            StartAt::Time(t) => self
                .log
                .offset_for_timestamp(t, ReadBound::Committed)
                .await?
                .unwrap_or(p.committed),
            StartAt::Last(n) => self.offset_of_last(n, p.start, p.committed).await?,
        };
        Ok(ListedOffsets {
            start: p.start,
            end: p.committed,
            offset,
        })
    }

    /// The offset from which the last `n` data records before `end` are read (from `start` if
    /// there are fewer). Control records take offsets but are not data: the range is widened
    /// over them, reading only the part added each time.
    async fn offset_of_last(
        &self,
        n: u64,
        start: Offset,
        end: Offset,
    ) -> Result<Offset, CoreError> {
        let mut from = end;
        let mut data = 0u64;
        while data < n && from > start {
            let wider = Offset(from.0.saturating_sub(n - data).max(start.0));
            data += self.data_records(wider, from).await?;
            from = wider;
        }
        Ok(from)
    }

    /// Data records (not control records) with offsets in `[from, until)`.
    async fn data_records(&self, from: Offset, until: Offset) -> Result<u64, CoreError> {
        let mut at = from;
        let mut data = 0;
        while at < until {
            let r = self.log.read(at, 1 << 20, ReadBound::Committed).await?;
            let Some(last) = r.batches.last() else { break };
            let next = last.meta().next_offset();
            for b in &r.batches {
                let m = b.meta();
                if !m.control {
                    let lo = m.base_offset.max(at);
                    let hi = m.next_offset().min(until);
                    data += hi.0.saturating_sub(lo.0);
                }
            }
            at = next;
        }
        Ok(data)
    }

    /// Drops waiters whose fetch gave up (timed out), so idle partitions do not accumulate them.
    fn prune_waiters(&self) {
        self.waiters.borrow_mut().retain(|w| !w.is_canceled());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(len: usize) -> Record {
        Record {
            value: Bytes::from(vec![7u8; len]),
            ..Record::default()
        }
    }

    /// Partition t/0 of a one-voter group on node 1.
    async fn single_voter(dir: &Path, config: crate::log::LogConfig) -> Partition {
        let replica = ReplicaSettings {
            node_id: 1,
            member: Default::default(),
            timing: Default::default(),
            transport: None,
        };
        let key = PartitionKey {
            topic: "t".into(),
            partition: 0,
        };
        let voters = BTreeMap::from([(1, Member::default())]);
        Partition::open(key, 0, dir, config, &replica, voters, 0)
            .await
            .unwrap()
    }

    #[test]
    fn a_request_with_an_oversized_record_writes_nothing_of_itself() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async {
                let dir = tempfile::tempdir().unwrap();
                let config = crate::log::LogConfig {
                    batch_bytes_max: 4096,
                    pending_bytes_max: 1 << 20,
                    retention_ms: None,
                    ..crate::log::LogConfig::default()
                };
                let p = single_voter(dir.path(), config).await;
                let (ok_tx, ok_rx) = oneshot::channel();
                let (bad_tx, bad_rx) = oneshot::channel();
                // Together: a good request (3 records, spilling over two batches), then a
                // request whose second record fits no batch.
                p.append(vec![
                    (vec![rec(2000), rec(2000), rec(10)], None, ok_tx),
                    (vec![rec(10), rec(5000)], None, bad_tx),
                ])
                .await;
                let ok = ok_rx.await.unwrap().unwrap().into_result().unwrap();
                // Consecutive offsets after the group's control entries (membership, blank).
                let first = ok.offsets[0];
                assert_eq!(ok.offsets, vec![first, first.plus(1), first.plus(2)]);
                let bad = bad_rx.await.unwrap();
                assert!(
                    matches!(bad, Err(CoreError::Log(LogError::BatchTooLarge { .. }))),
                    "{bad:?}"
                );
                // Exactly the good request's records are stored and committed.
                let pos = p.log.positions();
                assert_eq!(pos.next, pos.committed);
                let read = p
                    .log
                    .read(Offset(0), 1 << 20, ReadBound::Committed)
                    .await
                    .unwrap();
                let data: usize = read
                    .batches
                    .iter()
                    .filter(|b| !b.meta().control)
                    .map(|b| b.record_count() as usize)
                    .sum();
                assert_eq!(data, 3);
                p.close().await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn idempotent_requests_arriving_together_are_checked_against_each_other() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async {
                let dir = tempfile::tempdir().unwrap();
                let config = crate::log::LogConfig {
                    retention_ms: None,
                    ..crate::log::LogConfig::default()
                };
                let p = single_voter(dir.path(), config).await;
                let id = ProducerId(7);
                let seq = |first: i32| {
                    Some(ProducerSeq {
                        id,
                        first: Sequence(first),
                    })
                };
                let (a_tx, a_rx) = oneshot::channel();
                let (dup_tx, dup_rx) = oneshot::channel();
                let (next_tx, next_rx) = oneshot::channel();
                let (last_tx, last_rx) = oneshot::channel();
                // In one call: sequences 0..2, the same again (a retry through another node),
                // then 2..3 (pipelined), then a request ending at i32::MAX.
                p.append(vec![
                    (vec![rec(10), rec(10)], seq(0), a_tx),
                    (vec![rec(10), rec(10)], seq(0), dup_tx),
                    (vec![rec(10)], seq(2), next_tx),
                ])
                .await;
                let a = a_rx.await.unwrap().unwrap().into_result().unwrap();
                assert!(matches!(dup_rx.await.unwrap(), Err(CoreError::InFlight)));
                let next = next_rx.await.unwrap().unwrap().into_result().unwrap();
                assert_eq!(next.offsets, vec![a.offsets[1].plus(1)]);
                // Sent again once committed: answered with the same offsets.
                let (again_tx, again_rx) = oneshot::channel();
                p.append(vec![(vec![rec(10), rec(10)], seq(0), again_tx)])
                    .await;
                let again = again_rx.await.unwrap().unwrap().into_result().unwrap();
                assert_eq!(again.offsets, a.offsets);
                // A producer whose sequence reaches i32::MAX (no overflow past its last).
                let big = Some(ProducerSeq {
                    id: ProducerId(8),
                    first: Sequence(i32::MAX - 1),
                });
                p.append(vec![(vec![rec(10), rec(10)], big, last_tx)]).await;
                assert_eq!(
                    last_rx
                        .await
                        .unwrap()
                        .unwrap()
                        .into_result()
                        .unwrap()
                        .offsets
                        .len(),
                    2
                );
                p.close().await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
