//! One partition on its core: its Raft group over its log, and the readers waiting for new
//! records.
//!
//! ```text
//! partition/
//!   mod.rs         the Partition: opening its log and group, Raft messages, driving, state
//!   batcher.rs     records of one append call → batches (idempotent producers' apart)
//!   append.rs      proposing batches, checking idempotent producers' sequences
//!   fetch.rs       committed reads (long polls), offsets for a start position
//!   membership.rs  moving the group towards a target membership (on its leader)
//!   opening.rs     beside an open: sealed segments verified in the background, a promoted
//!                  mirror's log converted
//!   reports.rs     a leader's durable reports to far followers, which serve reads by them
//!   retention.rs   retention through the group (snapshot, purge)
//! ```
//!
//! An append is a Raft proposal: it is acknowledged once committed (by a quorum of the group's
//! voters, each having secured it under the topic's fsync policy) and applied, which moves the
//! log's committed position. Readers see only records below that position.

mod append;
mod batcher;
mod driving;
pub(super) mod fetch;
mod membership;
mod opening;
mod quiet;
mod reports;
mod retention;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use openraft::error::{ClientWriteError, InitializeError};
use openraft_rt::watch::WatchReceiver;

use super::request::{CoreError, OpenPartition, PartitionKey, ReplicaState};
use crate::log::{Log, LogConfig};
use crate::proto::internal as pb;
use crate::raft::election::ElectionTimer;
use crate::raft::group::{self, NoPeers, PartitionGroup};
use crate::raft::network::{self, GroupNetwork};
use crate::raft::store::StoreHandle;
use crate::raft::types::PartitionRaft;
use crate::raft::RaftError;
use crate::types::{CoreId, ProducerId, RaftIndex, TopicUid};

pub use append::AppendRequest;
use opening::{convert, verify};
pub use quiet::{take_woken, wake as tick_group, Liveness};
use quiet::{Leading, Quiet};

/// Times opening a replica goes again after finding a damaged segment (each cuts the log at
/// the first damage found; later segments go with the cut).
const DAMAGED_OPENS_MAX: u32 = 3;
/// How often a slow open reports the step it is in.
const OPEN_REPORT_EVERY: Duration = Duration::from_secs(10);

/// How long opening a partition waits for its group to elect a leader.
const ELECTION_WAIT: Duration = Duration::from_secs(30);

pub(super) type Waiters = Rc<RefCell<Vec<oneshot::Sender<()>>>>;

pub struct Partition {
    /// The group has other voters (heartbeats and elections are driven by the core).
    replicated: bool,
    timing: crate::raft::Timing,
    /// When this replica starts an election if it hears no leader (see `raft::election`).
    election: RefCell<ElectionTimer>,
    pub key: PartitionKey,
    /// The topic incarnation this group belongs to.
    pub uid: TopicUid,
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
    /// The leader this replica last saw (to count leadership changes).
    leader_seen: Cell<Option<crate::raft::types::NodeId>>,
    /// What opened this replica, and on which core, to open it again after damage (see
    /// [`Partition::damage`]).
    opened_with: OpenPartition,
    core: CoreId,
    /// Times this replica was reopened to repair it (see `shard::repair`).
    repairs: Cell<u32>,
    /// Set once the core has taken this replica to reopen it.
    repairing: Cell<bool>,
    /// Held by a repair while it runs (see `shard::repair`); a Close waits on it.
    repair_gate: Rc<glommio::sync::Semaphore>,
    /// A Close is waiting: a repair running stops.
    close_requested: Cell<bool>,
    /// The term of this replica's current leadership and the last index its log held when
    /// the leadership was first seen (see `Partition::idempotence_ready`).
    tenure: Cell<Option<(u64, u64)>>,
    /// Whether the group is quiet (see `quiet.rs`).
    quiet: Quiet,
    /// The node's transport (liveness of peers); `None` alone.
    transport: Option<std::sync::Arc<crate::raft::transport::Transport>>,
}

/// A damaged replica taken to be reopened (see [`Partition::take_for_repair`]).
pub struct Taken {
    pub open: OpenPartition,
    pub core: CoreId,
    pub repairs: u32,
    pub damaged: Option<std::path::PathBuf>,
}

pub(super) fn wake(waiters: &Waiters) {
    for w in waiters.borrow_mut().drain(..) {
        let _ = w.send(());
    }
}

/// An openraft error that stopped what was asked, as this module's error.
fn stopped(e: impl std::fmt::Display) -> CoreError {
    CoreError::Raft(RaftError::Stopped(e.to_string()))
}

fn from_write_error(
    e: openraft::error::RaftError<PartitionRaft, ClientWriteError<PartitionRaft>>,
) -> CoreError {
    use openraft::error::RaftError as OpenraftError;
    match e {
        OpenraftError::APIError(ClientWriteError::ForwardToLeader(f)) => CoreError::NotLeader {
            leader: f.leader_id,
        },
        OpenraftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
            CoreError::LeaderChanged {
                leader: f.leader_id,
            }
        }
        other => stopped(other),
    }
}

/// Raft entries a follower may be behind its leader's commit and still serve reads: the same
/// bound as a follower in sync (`cluster::health::IN_SYNC_MAX_LAG`, checked equal there).
pub const FOLLOWER_READ_MAX_LAG: u64 = 1_000;

/// How current a replica's reads are (see [`Partition::freshness`]).
#[derive(Debug, Default)]
pub struct Freshness {
    /// Raft entries this follower knows are committed but has not applied.
    pub behind: u64,
    /// Why it should not serve reads, if so.
    pub stale: Option<CoreError>,
}

impl Partition {
    /// Opens the log in `dir` and starts the partition's Raft group on this core (`core`). A
    /// new group is initialized with `voters` (every replica initializes it identically, which
    /// openraft allows). A group whose only voter is this node is led by it before this
    /// returns; a replicated group elects its leader in the background.
    ///
    /// A replica with peers whose log turns out damaged while its group starts (the storage
    /// reads every batch header) is opened again with that segment's index distrusted, so the
    /// repairing open cuts the log there (see `Log::open_repairing`).
    pub async fn open(open: OpenPartition, core: CoreId) -> Result<Partition, CoreError> {
        // An open that takes long says every 10 s which step it waits in (on a core that still
        // runs; a core that does not is the watchdog's to report).
        let stage = std::cell::Cell::new("opening the log");
        let began = Instant::now();
        let report = async {
            loop {
                glommio::timer::sleep(OPEN_REPORT_EVERY).await;
                tracing::warn!(partition = %open.key, step = stage.get(), "opening this partition has taken {:.0?}", began.elapsed());
            }
        };
        let opening = Self::open_tries(&open, core, &stage);
        futures::pin_mut!(report, opening);
        match futures::future::select(opening, report).await {
            futures::future::Either::Left((r, _)) => r,
            futures::future::Either::Right((never, _)) => never,
        }
    }

    /// [`Partition::open`], opened again (up to [`DAMAGED_OPENS_MAX`] times) while a damaged
    /// segment turns up; `stage` tells the step it waits in.
    async fn open_tries(
        open: &OpenPartition,
        core: CoreId,
        stage: &std::cell::Cell<&'static str>,
    ) -> Result<Partition, CoreError> {
        let mut tries = 0;
        loop {
            match Self::open_once(open, core, stage).await {
                Ok(p) => return Ok(p),
                Err((e, Some(damaged))) if tries < DAMAGED_OPENS_MAX => {
                    tracing::warn!(partition = %open.key, segment = %damaged.display(), error = %e, "damaged segment found while opening; opening again to cut it");
                    stage.set("distrusting a damaged segment's index");
                    Log::distrust_index(&damaged).await?;
                    tries += 1;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// [`Partition::open`] once; a failure says which segment a read found damaged, if one
    /// did in a replica with peers.
    async fn open_once(
        open: &OpenPartition,
        core: CoreId,
        stage: &std::cell::Cell<&'static str>,
    ) -> Result<Partition, (CoreError, Option<std::path::PathBuf>)> {
        stage.set("opening the log");
        let OpenPartition {
            key,
            uid,
            dir,
            config,
            replica,
            voters,
            ..
        } = open.clone();
        let dir = dir.as_path();
        let replica = &replica;
        let alone = voters.len() == 1 && voters.contains_key(&replica.node_id);
        let began = Instant::now();
        // No voters: this replica joins a group that exists elsewhere (it is being added by a
        // move) and waits for its leader; it never initializes the group itself.
        let joining = voters.is_empty();
        if !joining && !voters.contains_key(&replica.node_id) {
            return Err((
                CoreError::NotAVoter {
                    partition: key.to_string(),
                    node: replica.node_id,
                },
                None,
            ));
        }
        // Retention goes through the group (`retain`), never behind its back.
        let config = LogConfig {
            retention_loop: false,
            ..config
        };
        // A replica with peers cuts a damaged log and is caught up by them (`raft::store`); a
        // replica alone has no one to recover from, so its damage is reported, not cut.
        let log = if alone {
            Log::open(dir, config).await
        } else {
            Log::open_repairing(dir, config).await
        }
        .map_err(|e| (CoreError::from(e), None))?;
        if let Some((at, voters)) = &open.promoted {
            stage.set("converting a promoted mirror's log");
            if let Err(e) = convert(&log, dir, *at, replica.node_id, voters.clone()).await {
                let _ = log.close().await;
                return Err((e, None));
            }
        }
        let log_opened = began.elapsed();
        stage.set("starting the Raft group (reading its state)");
        let waiters: Waiters = Rc::default();
        let on_commit = {
            let w = waiters.clone();
            Rc::new(move || wake(&w))
        };
        // A group whose only voter is this node needs no timer: an idle partition then costs no
        // CPU at all (openraft's tick wakes every fifth of a heartbeat, per group).
        // Replicated groups are driven by their core's timer (`core::drive_groups`), not by a
        // timer each.
        let raft_config = group::config_with(&key.to_string(), replica.timing, false)
            .map_err(|e| (CoreError::from(e), None))?;
        let quiet = Quiet::new(
            !alone && key != PartitionKey::metadata() && replica.quiet,
            Duration::from_millis(2 * replica.timing.election_max_ms),
        );
        let reports: Rc<crate::raft::early::Reports> = Rc::default();
        let group = pb::Group {
            topic: key.topic.to_string(),
            partition: key.partition,
            uid: uid.0,
        };
        let started = match &replica.transport {
            Some(t) => {
                let network = GroupNetwork {
                    transport: t.clone(),
                    core,
                    group: group.clone(),
                    quiet: quiet.announce.clone(),
                    entries_ttl: Duration::from_millis(replica.timing.election_min_ms),
                    reports: reports.clone(),
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
                .map_err(CoreError::from)
            }
            None if alone => group::start_with(
                replica.node_id,
                raft_config,
                NoPeers,
                log.clone(),
                dir,
                on_commit,
            )
            .await
            .map_err(CoreError::from),
            None => Err(CoreError::NoTransport(key.to_string())),
        };
        let (raft, store) = match started {
            Ok(started) => started,
            Err(e) => {
                let damaged = log.damaged_segment().filter(|_| !alone);
                let _ = log.close().await;
                return Err((e, damaged));
            }
        };
        store.set_checkpoint_entries(replica.checkpoint_entries);
        // Data partitions only: the metadata's followers apply what they hold as committed.
        if let Some(t) = replica
            .transport
            .as_ref()
            .filter(|_| key != PartitionKey::metadata())
        {
            let out = reports::Outbox {
                metrics: raft.metrics(),
                transport: t.clone(),
                core,
                group,
                reports,
            };
            store.on_secured(Some(reports::on_secured(out, waiters.clone())));
        }
        tracing::debug!(
            partition = %key,
            log_ms = log_opened.as_millis() as u64,
            total_ms = began.elapsed().as_millis() as u64,
            "partition opened"
        );
        // From here a failure must not leave the group's tasks and the log running.
        let ready = async {
            stage.set("recording this replica's membership");
            store
                .set_member(replica.node_id, joining)
                .await
                .map_err(|e| RaftError::Storage {
                    dir: dir.display().to_string(),
                    error: e.to_string(),
                })?;
            stage.set("asking the Raft group whether it is initialized");
            let initialized = raft.is_initialized().await.map_err(stopped)?;
            let created = !initialized && !joining;
            if created {
                stage.set("initializing the Raft group");
                match raft.initialize(voters).await {
                    Ok(()) => {}
                    // Initialized meanwhile by a message from a peer: fine.
                    Err(openraft::error::RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                    Err(e) => return Err(stopped(e)),
                }
            }
            if !alone {
                return Ok(created);
            }
            stage.set("electing this replica, alone in its group");
            if !raft.is_leader() {
                raft.trigger().elect(false).await.map_err(stopped)?;
            }
            raft.wait(Some(ELECTION_WAIT))
                .state(openraft::ServerState::Leader, "partition leader elected")
                .await
                .map_err(|_| CoreError::TimedOut {
                    what: "electing the leader of a one-voter group",
                    after: ELECTION_WAIT,
                })?;
            Ok::<bool, CoreError>(created)
        }
        .await;
        let created = match ready {
            Ok(created) => created,
            Err(e) => {
                stage.set("stopping the Raft group after a failed start");
                let _ = raft.shutdown().await;
                let _ = log.close().await;
                return Err((e, None));
            }
        };
        let election = match open.first {
            Some(first) if created => ElectionTimer::new_group(
                replica.timing,
                first == replica.node_id,
                Instant::now(),
                &mut rand::rng(),
            ),
            _ => ElectionTimer::new(replica.timing, Instant::now(), &mut rand::rng()),
        };
        if let Some((from, to)) = store.take_unverified() {
            glommio::spawn_local(verify(log.clone(), key.to_string(), from, to)).detach();
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
            election: RefCell::new(election),
            retained: Cell::new(Instant::now()),
            retaining: Cell::new(false),
            pending: RefCell::default(),
            leader_seen: Cell::new(None),
            opened_with: open.clone(),
            core,
            repairs: Cell::new(0),
            repairing: Cell::new(false),
            repair_gate: Rc::new(glommio::sync::Semaphore::new(1)),
            close_requested: Cell::new(false),
            tenure: Cell::new(None),
            quiet,
            transport: replica.transport.clone(),
        })
    }

    /// Why this replica should be reopened to repair it, if it should: a read found a damaged
    /// segment, or its Raft group stopped on a storage error. Only replicas with peers are
    /// repaired (they cut the damage and are caught up; see `Log::open_repairing`).
    pub fn damage(&self) -> Option<String> {
        if !self.replicated || self.repairing.get() || self.closed.get() {
            return None;
        }
        if let Some(path) = self.log.damaged_segment() {
            return Some(format!("damaged segment {}", path.display()));
        }
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        match &m.running_state {
            Err(fatal) => Some(format!("raft group stopped: {fatal}")),
            Ok(()) => None,
        }
    }

    /// Whether this replica was closed (it then leaves its core's driver).
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Whether a read found a damaged segment in this replica's log, not yet taken for repair
    /// (the cheap part of [`Partition::damage`]: it reads no metrics).
    pub fn found_damage(&self) -> bool {
        self.replicated && !self.repairing.get() && !self.closed.get() && self.log.has_damage()
    }

    /// Takes this replica to reopen it: what opened it, on which core, and the damaged segment
    /// a read found, if any. It is then never taken again.
    pub fn take_for_repair(&self) -> Taken {
        self.repairing.set(true);
        if let Some(t) = &self.transport {
            t.bump_incarnation();
        }
        Taken {
            open: self.opened_with.clone(),
            core: self.core,
            repairs: self.repairs.get(),
            damaged: self.log.damaged_segment(),
        }
    }

    /// Notes how many times this replica was reopened to repair it (a repeated repair waits
    /// longer).
    pub fn set_repairs(&self, n: u32) {
        self.repairs.set(n);
    }

    /// The gate a repair of this replica holds while it runs.
    pub fn repair_gate(&self) -> Rc<glommio::sync::Semaphore> {
        self.repair_gate.clone()
    }

    /// A Close is waiting for this replica: a repair of it stops.
    pub fn request_close(&self) {
        self.close_requested.set(true);
    }

    pub fn close_requested(&self) -> bool {
        self.close_requested.get()
    }

    /// Marks the replica as one that must recover what it holds before it votes again (see
    /// `StoreHandle::mark_damaged`); before it is closed for repair.
    pub async fn mark_damaged(&self) -> Result<(), CoreError> {
        self.store.mark_damaged().await.map_err(|e| {
            CoreError::Raft(RaftError::Storage {
                dir: self.log.dir().display().to_string(),
                error: e.to_string(),
            })
        })
    }

    /// Handles a Raft message from a peer. A replica that joins its group by a move grants no
    /// votes until it has been a learner and then a voter there (see `raft::store`); a message
    /// from a leader it accepts resets its election timer.
    pub async fn handle(
        &self,
        body: pb::raft_request::Body,
        quiet: bool,
    ) -> crate::raft::transport::Answer {
        use pb::raft_request::Body;
        if let Body::Durable(r) = &body {
            reports::take(&self.store, &self.raft.metrics(), &self.waiters, r);
            return Ok(bytes::Bytes::new());
        }
        // A report an append carries counts once the append is taken (its vote too).
        let carried = match &body {
            Body::Append(a) => a.durable.clone(),
            _ => None,
        };
        if matches!(
            body,
            Body::Vote(_) | Body::PreVote(_) | Body::TransferLeader(_)
        ) && !self.store.may_vote()
        {
            let why = match self.store.recovering_to() {
                Some(to) => format!("its log was damaged and it has not recovered entry {to} yet"),
                None => "it is joining its group".to_string(),
            };
            return Err(RaftError::Refused(format!(
                "{}: this replica does not vote: {why}",
                self.key
            )));
        }
        // Quiet under a leader whose node is alive (same incarnation): a pre-vote is refused, as
        // a replica that hears its leader refuses one (Raft's pre-vote rule). Without this, a
        // replica that woke on its own while its leader was silent could depose a leader that
        // is there: an extra election, and a write stalled for it.
        // Only a pre-vote for the next term, from another node: the leader itself, or a
        // candidate past the next term (an election this replica missed), proves the leader it
        // follows stale.
        if let (Body::PreVote(v), Some((leader, incarnation)), Some(t)) =
            (&body, self.quiet.following.get(), &self.transport)
        {
            let term = self.raft.metrics().borrow_watched().current_term;
            let next_term_from_another = crate::raft::wire::decode_vote(v).is_ok_and(|r| {
                let l = r.vote.leader_id();
                l.voted_for != leader && l.term <= term + 1
            });
            if next_term_from_another {
                let live = Liveness {
                    heard: t.heard(),
                    window: self.liveness_window(),
                };
                if live.alive(leader) == Some(incarnation) {
                    return Err(RaftError::Refused(format!(
                        "{}: quiet under its leader (node {leader}), which is alive",
                        self.key
                    )));
                }
            }
        }
        // A message to a quiet group: its core ticks it again (it goes back to sleep at once if
        // the message leaves it quiet).
        let was_quiet = self.quiet.is_quiet();
        if was_quiet {
            quiet::wake(&self.key);
        }
        // A vote, a pre-vote, a transfer or a snapshot: whatever it changes, this replica
        // is not quiet under its leader any more (its election timer runs again).
        let append = matches!(body, Body::Append(_));
        if !append {
            self.quiet.following.set(None);
        }
        let mut contact = network::Contact::None;
        let answer = network::handle(&self.raft, body, &mut contact).await;
        if let Some(r) = &carried {
            reports::take(&self.store, &self.raft.metrics(), &self.waiters, r);
        }
        // Woken again after the message: the driver may have looked between the wake above
        // and the message's effect, found the group still quiet and dropped it.
        if was_quiet {
            quiet::wake(&self.key);
        }
        match contact {
            network::Contact::None => {}
            network::Contact::Leader => {
                self.election.borrow_mut().heard_leader(Instant::now());
                self.heard_leader(quiet);
            }
            network::Contact::GrantedVote => self
                .election
                .borrow_mut()
                .granted_vote(Instant::now(), &mut rand::rng()),
        }
        answer
    }

    /// Whether this replica may serve reads: a follower that has not heard its leader for
    /// twice the longest election timeout, or is more than `FOLLOWER_READ_MAX_LAG` entries behind
    /// what its leader reports committed, is stale (a reader goes to another replica rather
    /// than wait on it, as KAFKA-14372's consumer did for minutes).
    pub fn freshness(&self) -> Freshness {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let leading = m.current_leader == Some(m.id);
        if !self.replicated || leading {
            return Freshness::default();
        }
        let behind = m
            .cluster_committed
            .as_ref()
            .map_or(0, |c| c.index)
            .saturating_sub(m.local_committed.as_ref().map_or(0, |c| c.index));
        let silent = self.election.borrow().silent_for(Instant::now());
        let max_silence = Duration::from_millis(self.timing.election_max_ms * 2);
        let why = if m.current_leader.is_none() {
            Some("without a leader".to_string())
        } else if silent > max_silence && self.quiet.following.get().is_none() {
            Some(format!(
                "out of touch with its leader for {} ms",
                silent.as_millis()
            ))
        } else if behind > FOLLOWER_READ_MAX_LAG {
            Some(format!("{behind} entries behind its leader"))
        } else {
            None
        };
        Freshness {
            behind,
            stale: why.map(|why| CoreError::Stale {
                leader: m.current_leader.filter(|l| *l != m.id),
                why,
            }),
        }
    }

    /// The node's transport, if it has peers.
    pub fn transport(&self) -> Option<&std::sync::Arc<crate::raft::transport::Transport>> {
        self.transport.as_ref()
    }

    /// How long a peer's node may be silent and still count as alive for quiet groups: the
    /// longest election timeout (a follower without quiet campaigns about then too).
    pub fn liveness_window(&self) -> Duration {
        Duration::from_millis(self.timing.election_max_ms)
    }

    /// Whether the group has other voters (and so needs heartbeats and elections).
    pub fn replicated(&self) -> bool {
        self.replicated
    }

    /// What this replica knows of its group.
    pub fn state(&self) -> ReplicaState {
        let m = self.raft.metrics().borrow_watched().clone();
        let silent = matches!(*self.quiet.leading.borrow(), Leading::Silent { .. });
        let leader = m.current_leader;
        ReplicaState {
            leader,
            is_leader: leader == Some(m.id),
            term: m.current_term,
            last_index: m.last_log_index.map(RaftIndex),
            applied_index: m.last_applied.map(|l| RaftIndex(l.index)),
            voters: m.membership_config.membership().voter_ids().collect(),
            learners: m.membership_config.membership().learner_ids().collect(),
            matched: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .filter(|(id, _)| **id != m.id)
                        .map(|(id, l)| (*id, l.as_ref().map(|l| RaftIndex(l.index))))
                        .collect()
                })
                .unwrap_or_default(),
            // A silent leader hears its followers only through their nodes' keepalives.
            heard: m
                .heartbeat
                .as_ref()
                .map(|h| {
                    h.iter()
                        .filter(|(id, _)| **id != m.id)
                        .map(|(id, at)| match (&self.transport, silent) {
                            (Some(t), true) => (*id, t.silent_for(*id)),
                            _ => (*id, at.as_ref().map(|at| at.elapsed())),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            quiet: self.quiet.is_quiet(),
            positions: self.log.positions(),
            uid: self.uid,
            quorum_acked: m.last_quorum_acked.map(|at| at.elapsed()),
            mirror: None,
        }
    }

    /// Stops the Raft group, then flushes and closes the log.
    pub async fn close(&self) -> Result<(), CoreError> {
        self.closed.set(true);
        // Peers' quiet groups shared with this node wake (a quiet follower here is gone, or
        // a quiet leader: see `Transport::bump_incarnation`).
        if let Some(t) = &self.transport {
            t.bump_incarnation();
        }
        wake(&self.waiters);
        self.store.on_secured(None);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(partition = %self.key, error = %e, "raft group did not stop cleanly");
        }
        self.log.close().await.map_err(CoreError::Log)
    }
}
