//! The core driver's side of a replica: its leadership, one step of the driver (heartbeats,
//! elections, quiet), and leadership hand-offs.

use std::time::{Duration, Instant};

use openraft_rt::watch::WatchReceiver;

use super::quiet::{Leading, Liveness};
use super::Partition;
use crate::raft::types::NodeId;

impl Partition {
    /// Whether this replica leads its group, and the group's current term.
    pub fn leadership(&self) -> (bool, u64) {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        (m.current_leader == Some(m.id), m.current_term)
    }

    /// One step of the core's Raft driver: a leader sends heartbeats unless its group is quiet;
    /// a follower that has not heard a leader for its election timeout starts an election
    /// (pre-vote first, so a node that cannot win does not disturb the others), unless it is
    /// quiet under a leader whose node is alive (`quiet.rs`).
    ///
    /// Returns when this replica's election comes due, if it is a follower whose timer runs
    /// (the core's driver ticks again then).
    pub async fn drive(&self, now: Instant, beat: bool, live: &Liveness) -> Option<Instant> {
        // Quiet groups first, without reading the group's metrics: a core with thousands of
        // idle groups ticks through them.
        if let Some((node, incarnation)) = self.quiet.following.get() {
            if live.alive(node) == Some(incarnation) {
                return None;
            }
        } else if !beat && matches!(*self.quiet.leading.borrow(), Leading::Silent { .. }) {
            return None;
        }
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
                self.quiet.following.set(None);
                if !self.stays_silent(now, live) && !self.followers_heard_lately(now) {
                    let _ = self.raft.trigger().heartbeat().await;
                }
            }
            openraft::ServerState::Leader => {}
            _ if {
                self.quiet.wake_leader();
                self.quiet_under_live_leader(leader, live, now)
            } => {}
            openraft::ServerState::Follower | openraft::ServerState::Candidate => {
                let due = self.election.borrow_mut().due(now, &mut rand::rng());
                // A replica that may not vote may not campaign either: its own vote counts.
                if due && self.store.may_vote() {
                    tracing::debug!(partition = %self.key, "no leader heard: starting an election");
                    crate::metrics::NODE.elections.inc();
                    let _ = self.raft.trigger().elect(true).await;
                }
                return Some(self.election.borrow().due_at());
            }
            _ => {}
        }
        None
    }

    /// Whether every follower acknowledged an append sent within the last two heartbeats: a
    /// heartbeat now would tell them nothing (an append restarts a follower's election timer
    /// as a heartbeat does, and openraft sends a new commit index by itself). A group written
    /// a few times a second then sends no heartbeats of its own, which at 1,000 such groups was
    /// most of the messages between the nodes.
    fn followers_heard_lately(&self, now: Instant) -> bool {
        let window = Duration::from_millis(2 * self.timing.heartbeat_ms);
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let Some(acked) = m.heartbeat.as_ref() else {
            return false;
        };
        let mut followers = 0;
        for (_, sent) in acked.iter().filter(|(id, _)| **id != m.id) {
            followers += 1;
            match sent {
                Some(at) if now.saturating_duration_since(**at) < window => {}
                _ => return false,
            }
        }
        followers > 0
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
        self.ask_transfer(to, "leadership hand-off failed").await
    }

    /// If this replica leads, asks voter `to` to take over; whether it asked.
    pub async fn transfer_to(&self, to: NodeId) -> bool {
        {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == to);
            if m.current_leader != Some(m.id) || !voter || to == m.id {
                return false;
            }
        }
        self.ask_transfer(to, "leadership transfer failed").await
    }

    /// Wakes the group (a quiet leader sends nothing) and asks `to` to take over; whether it
    /// was asked.
    async fn ask_transfer(&self, to: NodeId, failed: &str) -> bool {
        self.wake_leader();
        match self.raft.trigger().transfer_leader(to).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(partition = %self.key, error = %e, "{failed}");
                false
            }
        }
    }
}
