//! The small durable state of a replica beside its log: the vote, the purge point, and whether
//! it may vote (file `raft.state`, a CRC'd file replaced atomically).

use serde::{Deserialize, Serialize};

use crate::raft::types::{LogId, Vote};

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
        }
    }
}
