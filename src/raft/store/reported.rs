//! What the store tells of its durable entries and takes from its leader's reports (see
//! `raft::early`): the leader's report to send, and a follower's committed position moved by
//! one.

use std::collections::BTreeSet;
use std::rc::Rc;

use super::entry_map::EntryMap;
use super::{Shared, StoreHandle};
use crate::raft::early::{self, Durable};
use crate::raft::types::NodeId;
use crate::types::Offset;

/// Called after each append of entries is secured here (see [`StoreHandle::on_secured`]).
pub type OnSecured = Rc<dyn Fn(&StoreHandle)>;

impl Shared {
    /// The last entry this log holds securely (durable under `always`, written under
    /// `interval`, as Raft counts it): (index, term).
    fn secured_last(&self) -> Option<(u64, u64)> {
        secured_last(
            &self.map.borrow(),
            self.log.positions().next,
            self.log.secured(),
        )
    }
}

/// The last entry of `map` that ends at or before `secured`, given the log's end `next`:
/// (index, term).
pub(super) fn secured_last(map: &EntryMap, next: Offset, secured: Offset) -> Option<(u64, u64)> {
    if next <= secured {
        return map.last().map(|l| (l.index, l.leader_id.term));
    }
    // Entry `first + i` ends where entry `first + i + 1` begins: the entries secured are those
    // followed by an entry that begins at or before `secured`.
    let begun = map.slots.partition_point(|s| s.base <= secured);
    let index = map.first + (begun as u64).checked_sub(2)?;
    map.get(index).map(|s| (index, s.term))
}

impl StoreHandle {
    /// Sets what runs after each append of entries is secured here (None: nothing).
    pub fn on_secured(&self, f: Option<OnSecured>) {
        *self.0.on_secured.borrow_mut() = f;
    }

    /// This replica's report as its group's leader: what it holds securely, if it leads the
    /// term of its last entry secured (only such entries count, see `raft::early`).
    pub fn leader_report(&self) -> Option<Durable> {
        let me = self.0.me.get()?;
        let vote = self.0.durable.borrow().vote?;
        let leader = vote.leader_id();
        if !vote.is_committed() || leader.voted_for != me {
            return None;
        }
        let (index, term) = self.0.secured_last()?;
        (term == leader.term).then_some(Durable {
            leader: me,
            term,
            index,
            also: Default::default(),
        })
    }

    /// Whether a leader ever reported to this replica (one in another region).
    pub fn has_report(&self) -> bool {
        self.0.report.get().is_some()
    }

    /// Keeps the newest of the leader's reports.
    pub fn take_report(&self, report: Durable) {
        let kept = self.0.report.get();
        self.0.report.set(Some(report.newer(kept)));
    }

    /// Moves the log's committed position (what readers here may read) over what the leader's
    /// last report and this log prove committed, given the group's `voters` as seen with the
    /// log up to `voters_upto`; the new position, if it moved.
    pub fn commit_reported(&self, voters: &[BTreeSet<NodeId>], voters_upto: u64) -> Option<Offset> {
        let report = self.0.report.get()?;
        let me = self.0.me.get()?;
        let vote = self.0.durable.borrow().vote;
        let upto = {
            let map = self.0.map.borrow();
            let term_at = |i: u64| map.get(i).map(|s| s.term);
            early::committed(
                &early::Own {
                    me,
                    vote,
                    durable: self.0.secured_last(),
                    term_at: &term_at,
                    voters,
                    voters_upto,
                },
                report,
            )?
        };
        let end = self
            .0
            .map
            .borrow()
            .end_of(upto, self.0.log.positions().next)?;
        if end <= self.0.log.positions().committed {
            return None;
        }
        match self.0.log.set_committed(end) {
            Ok(()) => Some(end),
            Err(e) => {
                tracing::warn!(error = %e, "a committed position learned from the leader's report does not fit the log");
                None
            }
        }
    }
}
