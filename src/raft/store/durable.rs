//! The small durable state of a replica beside its log: the vote, the purge point, and whether
//! it may vote (file `raft.state`, a CRC'd file replaced atomically).

use serde::{Deserialize, Serialize};

use crate::raft::types::{LogId, SnapshotMeta, Vote};

#[derive(Serialize, Deserialize)]
pub(super) struct Durable {
    pub(super) vote: Option<Vote>,
    pub(super) purged: Option<LogId>,
    /// The log offset right after the purged entries: where a replica that restarted its log
    /// from a snapshot begins.
    #[serde(default)]
    pub(super) purged_end: Option<u64>,
    /// Whether this replica may grant votes. A replica that joined its group by a move starts
    /// with an empty log and no memory of votes it may have cast as an earlier member; until it
    /// has applied a membership that made it a learner and then a voter, it must not help a
    /// candidate (a removed member still running with an old configuration that lists this node
    /// could otherwise win with its vote and commit a divergent history).
    #[serde(default = "yes")]
    pub(super) may_vote: bool,
    #[serde(default)]
    pub(super) learner_seen: bool,
    /// The last snapshot built or installed, with the log offset it covers: its membership is
    /// this replica's once the log is purged past the membership entry (without it, a replica
    /// restarted after such a purge knew no voters and never elected a leader again).
    #[serde(default)]
    pub(super) snapshot: Option<(SnapshotMeta, u64)>,
    /// Set when this replica's log was damaged and cut (see `docs/storage.md`, "Damaged
    /// replicas"): the highest Raft index it may have held. It neither votes nor campaigns
    /// until it has applied that entry again, taken from a leader: a replica that lost entries
    /// it acknowledged must not help elect a leader that lacks them.
    #[serde(default)]
    pub(super) recover_to: Option<u64>,
    /// The term of this replica's vote when it was found damaged. Applying an entry of a later
    /// term also ends the recovery: that entry's leader was elected after the damage, so its
    /// log holds every entry committed before (Raft's leader completeness), and this replica
    /// now holds that log up to the entry. (Without this, a replica whose lost tail was never
    /// committed, or whose highest index is unknown, could wait forever in an idle group.)
    #[serde(default)]
    pub(super) recover_term: Option<u64>,
    /// Set when this replica's log started over, empty, at a promoted mirror's cut (it was
    /// down while the other replicas agreed on it): the offset it holds the partition from.
    /// The records before it are on the other replicas, so a read of them here is sent to
    /// them instead of being told they are out of range.
    #[serde(default)]
    pub(super) history_from: Option<u64>,
}

impl Durable {
    /// This replica lost entries up to Raft index `lost` (`u64::MAX`: unknown): it does not
    /// vote until it has them back, or an entry of a term after its current vote's.
    pub(super) fn note_damage(&mut self, lost: u64) {
        self.recover_to = self.recover_to.max(Some(lost));
        let term = self.vote.as_ref().map_or(0, |v| v.leader_id().term);
        self.recover_term = self.recover_term.max(Some(term));
    }
}

fn yes() -> bool {
    true
}

impl Default for Durable {
    fn default() -> Self {
        Durable {
            vote: None,
            purged: None,
            purged_end: None,
            may_vote: true,
            learner_seen: false,
            snapshot: None,
            recover_to: None,
            recover_term: None,
            history_from: None,
        }
    }
}
