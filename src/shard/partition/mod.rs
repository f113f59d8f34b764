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
//!   retention.rs   retention through the group (snapshot, purge)
//! ```
//!
//! An append is a Raft proposal: it is acknowledged once committed (by a quorum of the group's
//! voters, each having secured it under the topic's fsync policy) and applied, which moves the
//! log's committed position. Readers see only records below that position.

mod append;
mod batcher;
mod fetch;
mod membership;
mod retention;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use openraft::error::{ClientWriteError, InitializeError};
use openraft_rt::watch::WatchReceiver;

use super::request::{CoreError, PartitionKey, ReplicaSettings, ReplicaState};
use crate::log::{Log, LogConfig};
use crate::proto::internal as pb;
use crate::raft::election::ElectionTimer;
use crate::raft::group::{self, NoPeers, PartitionGroup};
use crate::raft::network::{self, GroupNetwork};
use crate::raft::store::StoreHandle;
use crate::raft::types::{Member, NodeId, PartitionRaft};
use crate::raft::RaftError;
use crate::types::{CoreId, ProducerId, RaftIndex, TopicUid};

pub use append::AppendRequest;

/// How long opening a partition waits for its group to elect a leader.
const ELECTION_WAIT: Duration = Duration::from_secs(30);

type Waiters = Rc<RefCell<Vec<oneshot::Sender<()>>>>;

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
}

fn wake(waiters: &Waiters) {
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

impl Partition {
    /// Opens the log in `dir` and starts the partition's Raft group on this core (`core`). A
    /// new group is initialized with `voters` (every replica initializes it identically, which
    /// openraft allows). A group whose only voter is this node is led by it before this
    /// returns; a replicated group elects its leader in the background.
    pub async fn open(
        key: PartitionKey,
        uid: TopicUid,
        dir: &Path,
        config: LogConfig,
        replica: &ReplicaSettings,
        voters: BTreeMap<NodeId, Member>,
        core: CoreId,
    ) -> Result<Partition, CoreError> {
        let alone = voters.len() == 1 && voters.contains_key(&replica.node_id);
        // No voters: this replica joins a group that exists elsewhere (it is being added by a
        // move) and waits for its leader; it never initializes the group itself.
        let joining = voters.is_empty();
        if !joining && !voters.contains_key(&replica.node_id) {
            return Err(CoreError::NotAVoter {
                partition: key.to_string(),
                node: replica.node_id,
            });
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
        let raft_config = group::config_with(&key.to_string(), replica.timing, false)?;
        let started = match &replica.transport {
            Some(t) => {
                let network = GroupNetwork {
                    transport: t.clone(),
                    core,
                    group: pb::Group {
                        topic: key.topic.to_string(),
                        partition: key.partition,
                        uid: uid.0,
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
                let _ = log.close().await;
                return Err(e);
            }
        };
        // From here a failure must not leave the group's tasks and the log running.
        let ready = async {
            store
                .set_member(replica.node_id, joining)
                .await
                .map_err(|e| RaftError::Storage {
                    dir: dir.display().to_string(),
                    error: e.to_string(),
                })?;
            let initialized = raft.is_initialized().await.map_err(stopped)?;
            if !initialized && !joining {
                match raft.initialize(voters).await {
                    Ok(()) => {}
                    // Initialized meanwhile by a message from a peer: fine.
                    Err(openraft::error::RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                    Err(e) => return Err(stopped(e)),
                }
            }
            if !alone {
                return Ok(());
            }
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
            leader_seen: Cell::new(None),
        })
    }

    /// Handles a Raft message from a peer. A replica that joins its group by a move grants no
    /// votes until it has been a learner and then a voter there (see `raft::store`); a message
    /// from a leader it accepts resets its election timer.
    pub async fn handle(&self, body: pb::raft_request::Body) -> crate::raft::transport::Answer {
        use pb::raft_request::Body;
        if matches!(body, Body::Vote(_) | Body::PreVote(_)) && !self.store.may_vote() {
            return Err(RaftError::Refused(format!(
                "{}: this replica is joining its group and does not vote yet",
                self.key
            )));
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
        let (state, leader) = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            (m.state, m.current_leader)
        };
        if leader.is_some() && leader != self.leader_seen.get() {
            self.leader_seen.set(leader);
            crate::metrics::NODE.leader_changes.inc();
        }
        match state {
            openraft::ServerState::Leader if beat => {
                let _ = self.raft.trigger().heartbeat().await;
            }
            openraft::ServerState::Follower | openraft::ServerState::Candidate
                if self.election.borrow_mut().due(now, &mut rand::rng()) =>
            {
                tracing::debug!(partition = %self.key, "no leader heard: starting an election");
                crate::metrics::NODE.elections.inc();
                let _ = self.raft.trigger().elect(true).await;
            }
            _ => {}
        }
    }

    /// If this replica leads a group with other voters, asks the most caught-up of them to
    /// take over (openraft's TransferLeader: it campaigns at once, without waiting for an
    /// election timeout). Whether a transfer was asked.
    pub async fn hand_off(&self) -> bool {
        let to = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.current_leader != Some(m.id) {
                return false;
            }
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            m.replication.as_ref().and_then(|r| {
                r.iter()
                    .filter(|(id, matched)| {
                        **id != m.id && voters.contains(id) && matched.is_some()
                    })
                    .max_by_key(|(_, matched)| matched.as_ref().map(|l| l.index))
                    .map(|(id, _)| *id)
            })
        };
        let Some(to) = to else { return false };
        match self.raft.trigger().transfer_leader(to).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(partition = %self.key, error = %e, "leadership hand-off failed");
                false
            }
        }
    }

    /// What this replica knows of its group.
    pub fn state(&self) -> ReplicaState {
        let m = self.raft.metrics().borrow_watched().clone();
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
            heard: m
                .heartbeat
                .as_ref()
                .map(|h| {
                    h.iter()
                        .filter(|(id, _)| **id != m.id)
                        .map(|(id, at)| (*id, at.as_ref().map(|at| at.elapsed())))
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
}
