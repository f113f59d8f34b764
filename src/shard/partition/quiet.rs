//! Quiet groups: an idle group's leader stops sending heartbeats, and its followers stop their
//! election timers, for as long as the leader's node is alive (CockroachDB's quiescence, with
//! node liveness from the transport's keepalives).
//!
//! Heartbeats were one Raft message per group per heartbeat interval, each handled by openraft
//! on both sides: about 0.04% of a core per idle replica, so 10,000 idle partitions would have
//! taken four cores. Nodes now tell each other they are alive once per heartbeat interval per
//! node pair (`raft::transport`: an exchange without messages when nothing else went), and an
//! idle group sends nothing.
//!
//! ```text
//! leader:   Active ──beat, idle──▶ Quieting (heartbeats say `quiet`) ──every follower acked──▶ Silent
//!             ▲                                                                                 │
//!             └──── a write, a membership change, a follower restarted or silent, not leading ──┘
//! follower: a heartbeat with `quiet` ──▶ quiet under (leader, its incarnation): no election timer
//!           any other message from a leader, or the leader's node silent for an election
//!           timeout or restarted ──▶ the timer runs again (after a random part of a timeout)
//! ```
//!
//! A leader goes quiet only when its log has not moved for two election timeouts (a partition
//! written every second stays awake), every entry is committed and applied, every follower and
//! learner whose node is alive has every entry, no membership change is under way, and no
//! idempotent write is pending. A follower whose node is down does not keep the group awake;
//! the leader wakes when it comes back. Safety does not depend on any of it: a quiet follower
//! still handles votes, and a leader's next write goes out as it always does (its entries carry
//! no `quiet`, so followers wake). What quiet changes is only when a follower campaigns: a
//! follower whose leader's node dies wakes within an election timeout of the node's last
//! keepalive and campaigns after a random part of a timeout more, about when it would have
//! without quiet.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use openraft_rt::watch::WatchReceiver;

use super::Partition;
use crate::raft::transport::Heard;
use crate::raft::types::NodeId;
use crate::shard::request::PartitionKey;

/// Woken groups a core has not looked at yet, at most this many; beyond it the core's next
/// full scan (within `shard::core::FULL_SCAN`, 10 s) finds them.
const WOKEN_MAX: usize = 65_536;

thread_local! {
    /// Quiet groups of this core (each core is a thread) woken since its driver last looked:
    /// the driver ticks only groups that are awake (`shard::core::drive_groups`).
    static WOKEN: RefCell<Vec<PartitionKey>> = const { RefCell::new(Vec::new()) };
}

/// Tells this core's driver to tick `key` again (a quiet group woken, a replica opened or
/// reopened on this core).
pub fn wake(key: &PartitionKey) {
    WOKEN.with(|w| {
        let mut w = w.borrow_mut();
        if w.len() < WOKEN_MAX {
            w.push(key.clone());
        }
    });
}

/// The groups woken since the last call (see [`wake`]).
pub fn take_woken() -> Vec<PartitionKey> {
    WOKEN.with(|w| std::mem::take(&mut *w.borrow_mut()))
}

/// Which nodes this core counts as alive at one tick of its driver: heard from within `window`
/// (the longest election timeout), with the incarnation they last came with.
#[derive(Debug, Default)]
pub struct Liveness {
    pub heard: HashMap<NodeId, Heard>,
    pub window: Duration,
}

impl Liveness {
    /// The incarnation of `node` if it is alive.
    pub fn alive(&self, node: NodeId) -> Option<u64> {
        self.heard
            .get(&node)
            .filter(|h| h.ago < self.window)
            .map(|h| h.incarnation)
    }

    /// Whether `node` is known to be down: heard from once, silent since for the window. A
    /// node never heard from is not known down (a leader then still waits for its follower
    /// there to match and to acknowledge the quiet heartbeat).
    pub fn down(&self, node: NodeId) -> bool {
        self.heard.get(&node).is_some_and(|h| h.ago >= self.window)
    }
}

/// A leader's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Leading {
    /// Heartbeats as usual.
    Active,
    /// Heartbeats announce quiet; silent once every follower acknowledged one sent after
    /// `since`.
    Quieting { since: Instant },
    /// No heartbeats while the log stays at `last_index` and the followers' nodes stay as
    /// they were: alive with these incarnations, or down (`None`).
    Silent {
        last_index: u64,
        followers: Vec<(NodeId, Option<u64>)>,
    },
}

/// A replica's quiet state (see the module's doc).
pub(super) struct Quiet {
    /// Whether quiet is allowed for this group at all (not for the metadata group, whose
    /// leader's quorum contact gates the controller; not for a replica alone).
    pub(super) allowed: bool,
    /// Shared with the group's network: its heartbeats carry `quiet` while set.
    pub(super) announce: Rc<Cell<bool>>,
    pub(super) leading: RefCell<Leading>,
    /// As a follower: quiet under this leader node and incarnation.
    pub(super) following: Cell<Option<(NodeId, u64)>>,
    /// As a leader: the last log index seen at a beat, and since when it has stayed there.
    /// A group goes quiet only after its log has not moved for `quiet_after`: a partition
    /// written every second or so stays awake rather than pay a wake (a lease round trip) on
    /// nearly every write.
    pub(super) unchanged: Cell<(Option<u64>, Option<Instant>)>,
    pub(super) quiet_after: Duration,
}

impl Quiet {
    pub(super) fn new(allowed: bool, quiet_after: Duration) -> Quiet {
        Quiet {
            allowed,
            announce: Rc::new(Cell::new(false)),
            leading: RefCell::new(Leading::Active),
            following: Cell::new(None),
            unchanged: Cell::new((None, None)),
            quiet_after,
        }
    }

    /// At a leader's beat: whether its log has stayed at `last` for `quiet_after`.
    pub(super) fn settled(&self, last: Option<u64>, now: Instant) -> bool {
        match self.unchanged.get() {
            (seen, Some(since)) if seen == last => {
                now.saturating_duration_since(since) >= self.quiet_after
            }
            _ => {
                self.unchanged.set((last, Some(now)));
                false
            }
        }
    }

    /// Back to heartbeats (a write or a membership change is coming, or the group is not
    /// idle any more).
    pub(super) fn wake_leader(&self) {
        self.announce.set(false);
        let mut l = self.leading.borrow_mut();
        if *l != Leading::Active {
            *l = Leading::Active;
        }
    }

    /// Whether this replica, leading or following, is quiet now.
    pub(super) fn is_quiet(&self) -> bool {
        self.following.get().is_some() || matches!(*self.leading.borrow(), Leading::Silent { .. })
    }
}

/// The quiet side of a replica: whether the driver may skip it, and the leader's and
/// follower's steps (called from `Partition::drive` and `Partition::handle`).
impl Partition {
    /// Whether the core's driver may leave this group out of its ticks: it is quiet (a silent
    /// leader that still leads, or a follower quiet under its leader), or closed.
    pub fn asleep(&self) -> bool {
        if self.closed.get() || self.quiet.following.get().is_some() {
            return true;
        }
        if !matches!(*self.quiet.leading.borrow(), Leading::Silent { .. }) {
            return false;
        }
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        m.current_leader == Some(m.id)
    }

    /// Wakes a quiet leader (a write, a membership change, a hand-off is coming): heartbeats
    /// again from its core's next tick.
    pub(super) fn wake_leader(&self) {
        self.quiet.wake_leader();
        wake(&self.key);
    }

    /// A follower quiet under `leader`: whether it stays quiet (the leader's node alive, same
    /// incarnation). If not, it wakes: its election timer runs again, from a random part of a
    /// timeout (every follower of the dead node's groups wakes at the same tick; campaigning
    /// together they would split the votes).
    pub(super) fn quiet_under_live_leader(
        &self,
        leader: Option<NodeId>,
        live: &Liveness,
        now: Instant,
    ) -> bool {
        let Some((node, incarnation)) = self.quiet.following.get() else {
            return false;
        };
        if leader == Some(node) && live.alive(node) == Some(incarnation) {
            return true;
        }
        self.quiet.following.set(None);
        self.election.borrow_mut().woke(now, &mut rand::rng());
        tracing::debug!(partition = %self.key, leader = %node, "the quiet group's leader is gone: its election timer runs again");
        false
    }

    /// A message from the leader was accepted: quiet if it announced quiet, awake otherwise.
    pub(super) fn heard_leader(&self, quiet: bool) {
        if !quiet || !self.quiet.allowed {
            self.quiet.following.set(None);
            return;
        }
        let leader = self.raft.metrics().borrow_watched().current_leader;
        let incarnation = leader.and_then(|l| {
            self.transport
                .as_ref()
                .and_then(|t| t.heard().get(&l).map(|h| h.incarnation))
        });
        self.quiet.following.set(leader.zip(incarnation));
    }

    /// On a leader's beat: whether it skips the heartbeat because its group is quiet. Moves
    /// the leader's quiet state on (see `quiet.rs`).
    pub(super) fn stays_silent(&self, now: Instant, live: &Liveness) -> bool {
        if !self.quiet.allowed {
            return false;
        }
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let last = m.last_log_index;
        // The cheap check first: a silent leader whose log and followers did not change.
        if let Leading::Silent {
            last_index,
            followers,
        } = &*self.quiet.leading.borrow()
        {
            if last == Some(*last_index) && followers.iter().all(|(n, inc)| live.alive(*n) == *inc)
            {
                return true;
            }
        }
        let idle = self.quiet.settled(last, now)
            && last.is_some()
            && m.local_committed.map(|c| c.index) == last
            && m.cluster_committed.map(|c| c.index) == last
            && m.last_applied.map(|c| c.index) == last
            && m.membership_config.log_id() == m.committed_membership_config.log_id()
            && m.membership_config.membership().get_joint_config().len() == 1
            && self.pending.borrow().is_empty()
            && m.replication.as_ref().is_some_and(|r| {
                r.iter()
                    .filter(|(id, _)| **id != m.id)
                    // A follower whose node is down does not hold the group awake; when it
                    // comes back (alive again, or another incarnation) the leader wakes.
                    .all(|(id, matched)| {
                        matched.as_ref().map(|l| l.index) == last || live.down(*id)
                    })
            });
        if !idle {
            drop(m);
            self.quiet.wake_leader();
            return false;
        }
        let since = match &*self.quiet.leading.borrow() {
            Leading::Quieting { since } => Some(*since),
            _ => None,
        };
        let Some(since) = since else {
            // Announce: this beat's heartbeats carry `quiet`.
            self.quiet.announce.set(true);
            *self.quiet.leading.borrow_mut() = Leading::Quieting { since: now };
            return false;
        };
        // Silent once every follower acknowledged a heartbeat sent after `since`.
        let waited = now.saturating_duration_since(since);
        let acked = m.heartbeat.as_ref().is_some_and(|h| {
            h.iter()
                .filter(|(id, _)| **id != m.id && !live.down(**id))
                .all(|(_, at)| at.as_ref().is_some_and(|at| at.elapsed() < waited))
        });
        if !acked {
            return false;
        }
        let followers = m
            .replication
            .as_ref()
            .map(|r| {
                r.keys()
                    .filter(|id| **id != m.id)
                    .map(|id| (*id, live.alive(*id)))
                    .collect()
            })
            .unwrap_or_default();
        *self.quiet.leading.borrow_mut() = Leading::Silent {
            last_index: last.unwrap_or_default(),
            followers,
        };
        true
    }
}
