//! A follower's commit learned from its leader's durable reports, before the leader says.
//!
//! A follower learns that an entry is committed from the leader's next append, which the leader
//! sends once a majority has answered it: one round trip and a half after the leader took the
//! entry. A follower in another region then serves it half a round trip late (geo-sync: 60 ms of
//! a 70 ms end-to-end target on a 40 ms round trip). But in a group of three, the leader and this
//! follower are a majority: once the follower holds the entry durably and the leader has said it
//! does too, the entry is committed, whoever else holds it. A leader tells its far followers
//! what it holds durably as soon as its own write of it is secured ([`Durable`]); the follower
//! counts it with its own log by the rule below and serves reads up to there. Raft's own commit
//! and apply stay openraft's: this moves only where this replica's readers may read to.
//!
//! In a larger group (five voters over three regions: 2 + 2 + 1) the leader and one far
//! follower are not a majority, but the leader knows which of its other followers have
//! answered that they hold an entry (a follower answers an append once it is durable): it
//! names as many of them as the follower needs, with the last entry they all hold, and the
//! follower counts itself, the leader and those it knows as voters. A near follower answers
//! within a millisecond, so a far one still learns the commit about half a round trip before
//! the leader's next append would tell it.
//!
//! The rule is Raft's (§5.4.2, with its Figure 8 caveat): an entry is committed once a majority
//! of the voters hold it *in the term that wrote it*, while that term is current. So the leader
//! reports only entries of its own term, and the follower counts a report only when
//! - its own stored vote is for that leader in that term (it follows that leader now);
//! - its own entry at the index counted is of that term (its log matches the leader's up to
//!   there, by Raft's log matching: an entry of a term comes only from that term's leader);
//! - it holds the entry durably itself;
//! - the group has one configuration (not a joint change), the leader and this follower are
//!   both voters in it, and they with the other voters the report names as holding the entry
//!   ([`Durable::also`]) are a majority of it;
//! - that configuration is the latest up to the entry counted (the follower's view of its
//!   membership may trail its log: entries after the view count only once it covers them).
//!
//! In Figure 8's case (a leader of term 4 re-replicating an entry of term 2), the entry's term
//! is not the reporter's, so nothing counts until an entry of term 4 does.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};

use super::types::{NodeId, Vote};

/// Other holders a report may name: enough for groups of up to nine voters.
pub const ALSO_MAX: usize = 3;

/// A leader's word that its log holds, durably, every entry up to `index`, that the entry at
/// `index` is of its own term `term`, and that the followers in `also` have answered, in this
/// term, that they hold the leader's log up to there too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    pub leader: NodeId,
    pub term: u64,
    pub index: u64,
    pub also: [Option<NodeId>; ALSO_MAX],
}

impl Durable {
    /// The later of two reports: of a later term, else further, else naming more holders.
    pub fn newer(self, other: Option<Durable>) -> Durable {
        let rank = |d: &Durable| (d.term, d.index, d.also.iter().flatten().count());
        match other {
            Some(o) if rank(&o) > rank(&self) => o,
            _ => self,
        }
    }
}

/// The holders besides the leader and `target` that a report to `target` must name for a
/// majority of `voters` (None: the leader or `target` is not a voter, or more are needed than
/// a report can name).
fn others_needed(voters: &[NodeId], leader: NodeId, target: NodeId) -> Option<usize> {
    if !voters.contains(&leader) || !voters.contains(&target) || leader == target {
        return None;
    }
    let needed = (voters.len() / 2 + 1).saturating_sub(2);
    (needed <= ALSO_MAX).then_some(needed)
}

/// A leader's reports to its far followers: what it holds durably now, and what each follower
/// was last told. An append to a far follower carries the report (`raft::network`); a report
/// no append carried soon is sent on its own (`shard::partition::reports`).
#[derive(Default)]
pub struct Reports {
    held: Cell<Option<Durable>>,
    told: RefCell<HashMap<NodeId, Durable>>,
    /// The group's voters, as last seen by the leader (empty during a joint change).
    voters: RefCell<Vec<NodeId>>,
    /// What each follower last answered it holds: (the leader's term, the last index).
    matched: RefCell<HashMap<NodeId, (u64, u64)>>,
    /// A report on its own is due (one wait at a time).
    pub due: Cell<bool>,
}

impl Reports {
    /// What this replica, as leader, holds durably now.
    pub fn hold(&self, d: Durable) {
        self.held.set(Some(d.newer(self.held.get())));
    }

    pub fn held(&self) -> Option<Durable> {
        self.held.get()
    }

    /// The group's voters as the leader sees them now (None: a joint change). The answers of
    /// nodes no longer voters are forgotten.
    pub fn set_voters(&self, voters: Option<&BTreeSet<NodeId>>) {
        let mut known = self.voters.borrow_mut();
        let same = match voters {
            Some(v) => known.iter().eq(v.iter()),
            None => known.is_empty(),
        };
        if same {
            return;
        }
        *known = voters
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default();
        self.matched.borrow_mut().retain(|n, _| known.contains(n));
    }

    /// Whether some voter other than the leader for which `told_to` holds was told less than
    /// the leader holds: a follower's answer since may let it be told more.
    pub fn some_behind(&self, told_to: impl Fn(NodeId) -> bool) -> bool {
        let Some(held) = self.held.get() else {
            return false;
        };
        let told = self.told.borrow();
        self.voters
            .borrow()
            .iter()
            .filter(|v| **v != held.leader && told_to(**v))
            .any(|v| {
                told.get(v)
                    .is_none_or(|t| (t.term, t.index) < (held.term, held.index))
            })
    }

    /// Whether reports may name other holders: a group of more than three voters.
    pub fn counts_others(&self) -> bool {
        self.voters.borrow().len() > 3
    }

    /// `follower` answered an append of the leader's term `term` that it holds the leader's
    /// log up to `index` (durably: a follower answers once its write is secured).
    pub fn matched(&self, follower: NodeId, term: u64, index: u64) {
        let mut m = self.matched.borrow_mut();
        let at = m.entry(follower).or_insert((term, index));
        if (term, index) > *at {
            *at = (term, index);
        }
    }

    /// The report for `target` from what the leader holds, `d`: `d` itself where the leader
    /// and `target` are a majority, else the last entry that they and the followers answering
    /// furthest hold, naming those (None: too few answered in this term).
    fn for_target(&self, target: NodeId, d: Durable) -> Option<Durable> {
        if !self.counts_others() {
            return Some(d);
        }
        let voters = self.voters.borrow();
        let needed = others_needed(&voters, d.leader, target)?;
        let matched = self.matched.borrow();
        let mut others: Vec<(u64, NodeId)> = voters
            .iter()
            .filter(|v| **v != d.leader && **v != target)
            .filter_map(|v| match matched.get(v) {
                Some((term, index)) if *term == d.term => Some((*index, *v)),
                _ => None,
            })
            .collect();
        if others.len() < needed {
            return None;
        }
        others.sort_unstable_by(|a, b| b.cmp(a));
        let mut r = Durable {
            also: [None; ALSO_MAX],
            ..d
        };
        for (slot, (index, v)) in others.into_iter().take(needed).enumerate() {
            r.index = r.index.min(index);
            r.also[slot] = Some(v);
        }
        Some(r)
    }

    /// The report to tell `target` now, in the leader's term `term`, if it was not told it yet;
    /// noted as told.
    pub fn tell(&self, target: NodeId, term: u64) -> Option<Durable> {
        // (`forget` undoes it when the message carrying it did not get there.)
        let held = self.held.get().filter(|d| d.term == term)?;
        let d = self.for_target(target, held)?;
        let mut told = self.told.borrow_mut();
        if told
            .get(&target)
            .is_some_and(|t| (t.term, t.index) >= (d.term, d.index))
        {
            return None;
        }
        told.insert(target, d);
        Some(d)
    }

    /// `target` may not have got what it was told: tell it again.
    pub fn forget(&self, target: NodeId) {
        self.told.borrow_mut().remove(&target);
    }
}

/// What a follower knows of itself.
pub struct Own<'a> {
    pub me: NodeId,
    /// Its vote as stored: its current term and the node it voted for.
    pub vote: Option<Vote>,
    /// The last entry it holds durably: (index, term).
    pub durable: Option<(u64, u64)>,
    /// The term of its entry at an index, if it holds one there.
    pub term_at: &'a dyn Fn(u64) -> Option<u64>,
    /// The group's voters: one set, or two during a joint change.
    pub voters: &'a [BTreeSet<NodeId>],
    /// The last index of the log that `voters` was read with: a membership change in an
    /// entry after it is not in `voters`, so nothing after it counts.
    pub voters_upto: u64,
}

/// The last entry `report` and this follower's own log prove committed, if any.
pub fn committed(own: &Own, report: Durable) -> Option<u64> {
    let vote = own.vote?;
    let leader = vote.leader_id();
    if leader.term != report.term || leader.voted_for != report.leader {
        return None;
    }
    let [voters] = own.voters else {
        return None;
    };
    if report.leader == own.me || !voters.contains(&own.me) || !voters.contains(&report.leader) {
        return None;
    }
    // This follower, the leader and the other voters named, each once.
    let mut holders: BTreeSet<NodeId> = [own.me, report.leader].into();
    holders.extend(report.also.iter().flatten().filter(|v| voters.contains(v)));
    if holders.len() < voters.len() / 2 + 1 {
        return None;
    }
    let (held, _) = own.durable?;
    let upto = held.min(report.index).min(own.voters_upto);
    ((own.term_at)(upto) == Some(report.term)).then_some(upto)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower (node 2) of a group of `voters`, holding entries of the given terms from
    /// index 1, durably up to `durable`, having voted for node `leader` in term `term`.
    struct Follower {
        terms: Vec<u64>,
        durable: u64,
        vote: Option<Vote>,
        voters: Vec<BTreeSet<NodeId>>,
        voters_upto: u64,
    }

    impl Follower {
        fn new(terms: &[u64], durable: u64, term: u64, leader: u64) -> Follower {
            Follower {
                terms: terms.to_vec(),
                durable,
                vote: Some(Vote::new_committed(term, NodeId(leader))),
                voters: vec![nodes(&[1, 2, 3])],
                voters_upto: u64::MAX,
            }
        }

        fn committed(&self, report: Durable) -> Option<u64> {
            let term_at = |i: u64| {
                let i = usize::try_from(i.checked_sub(1)?).ok()?;
                self.terms.get(i).copied()
            };
            let durable = (self.durable > 0)
                .then(|| (self.durable, term_at(self.durable).unwrap_or_default()));
            committed(
                &Own {
                    me: NodeId(2),
                    vote: self.vote,
                    durable,
                    term_at: &term_at,
                    voters: &self.voters,
                    voters_upto: self.voters_upto,
                },
                report,
            )
        }
    }

    fn nodes(ids: &[u64]) -> BTreeSet<NodeId> {
        ids.iter().map(|i| NodeId(*i)).collect()
    }

    fn report(leader: u64, term: u64, index: u64) -> Durable {
        Durable {
            leader: NodeId(leader),
            term,
            index,
            also: [None; ALSO_MAX],
        }
    }

    fn naming(mut d: Durable, also: &[u64]) -> Durable {
        for (slot, v) in also.iter().enumerate() {
            d.also[slot] = Some(NodeId(*v));
        }
        d
    }

    #[test]
    fn the_leader_and_this_follower_holding_an_entry_of_the_term_commit_it() {
        let f = Follower::new(&[1, 1, 2, 2, 2], 5, 2, 1);
        assert_eq!(f.committed(report(1, 2, 5)), Some(5));
        // Each side counts only what it holds: the lower of the two.
        assert_eq!(f.committed(report(1, 2, 4)), Some(4));
        let f = Follower::new(&[1, 1, 2, 2, 2], 4, 2, 1);
        assert_eq!(f.committed(report(1, 2, 9)), Some(4));
    }

    #[test]
    fn entries_not_yet_durable_here_do_not_count() {
        let f = Follower::new(&[2, 2, 2], 0, 2, 1);
        assert_eq!(f.committed(report(1, 2, 3)), None);
    }

    #[test]
    fn an_entry_of_an_earlier_term_is_not_committed_by_a_later_leader_holding_it() {
        // Raft's Figure 8: the leader of term 4 holds index 2 of term 2 and so does this
        // follower; a majority holds it, yet a node with index 2 of term 3 could still be
        // elected and overwrite it. Only once an entry of term 4 is counted are both committed.
        let f = Follower::new(&[1, 2], 2, 4, 1);
        assert_eq!(f.committed(report(1, 4, 2)), None);
        assert_eq!(
            f.committed(report(1, 2, 2)),
            None,
            "the report's term is not current"
        );
        let f = Follower::new(&[1, 2, 4], 3, 4, 1);
        assert_eq!(f.committed(report(1, 4, 3)), Some(3));
        // Counted up to the leader's report only: up to index 2 this follower holds term 2.
        assert_eq!(f.committed(report(1, 4, 2)), None);
    }

    #[test]
    fn a_report_from_a_node_this_follower_does_not_follow_in_that_term_counts_for_nothing() {
        let f = Follower::new(&[3, 3, 3], 3, 3, 1);
        // Another node claiming the term.
        assert_eq!(f.committed(report(3, 3, 3)), None);
        // The same leader, an older term (this follower has moved on).
        let f = Follower::new(&[3, 3, 3], 3, 4, 1);
        assert_eq!(f.committed(report(1, 3, 3)), None);
        // A newer term than this follower knows.
        let f = Follower::new(&[3, 3, 3], 3, 3, 1);
        assert_eq!(f.committed(report(1, 4, 3)), None);
        // No vote stored at all.
        let mut f = Follower::new(&[3, 3, 3], 3, 3, 1);
        f.vote = None;
        assert_eq!(f.committed(report(1, 3, 3)), None);
    }

    #[test]
    fn two_voters_count_only_where_they_are_a_majority_and_configurations_are_one() {
        let mut f = Follower::new(&[2, 2], 2, 2, 1);
        f.voters = vec![nodes(&[1, 2])];
        assert_eq!(f.committed(report(1, 2, 2)), Some(2));
        f.voters = vec![nodes(&[1, 2, 3, 4, 5])];
        assert_eq!(f.committed(report(1, 2, 2)), None, "two of five");
        f.voters = vec![nodes(&[1, 2, 3, 4])];
        assert_eq!(f.committed(report(1, 2, 2)), None, "two of four");
        f.voters = vec![nodes(&[1, 2, 3]), nodes(&[1, 2, 4])];
        assert_eq!(f.committed(report(1, 2, 2)), None, "a joint change");
        f.voters = vec![nodes(&[1, 3, 4])];
        assert_eq!(
            f.committed(report(1, 2, 2)),
            None,
            "this node is not a voter"
        );
        f.voters = vec![nodes(&[2, 3, 4])];
        assert_eq!(
            f.committed(report(1, 2, 2)),
            None,
            "the leader is not a voter"
        );
        f.voters = vec![];
        assert_eq!(f.committed(report(1, 2, 2)), None, "no configuration");
    }

    #[test]
    fn in_a_larger_group_the_voters_the_report_names_count_toward_the_majority() {
        let mut f = Follower::new(&[2, 2, 2], 3, 2, 1);
        f.voters = vec![nodes(&[1, 2, 3, 4, 5])];
        assert_eq!(f.committed(naming(report(1, 2, 3), &[3])), Some(3));
        assert_eq!(f.committed(naming(report(1, 2, 2), &[4])), Some(2));
        // Only distinct voters other than this follower and the leader count.
        assert_eq!(f.committed(naming(report(1, 2, 3), &[2])), None, "itself");
        assert_eq!(
            f.committed(naming(report(1, 2, 3), &[1])),
            None,
            "the leader"
        );
        assert_eq!(
            f.committed(naming(report(1, 2, 3), &[9])),
            None,
            "not a voter"
        );
        assert_eq!(
            f.committed(naming(report(1, 2, 3), &[9, 1, 2])),
            None,
            "none of them count"
        );
        // Seven voters need two named.
        f.voters = vec![nodes(&[1, 2, 3, 4, 5, 6, 7])];
        assert_eq!(f.committed(naming(report(1, 2, 3), &[3])), None);
        assert_eq!(
            f.committed(naming(report(1, 2, 3), &[3, 3])),
            None,
            "one twice"
        );
        assert_eq!(f.committed(naming(report(1, 2, 3), &[3, 7])), Some(3));
        // The rest of the rule holds as for three voters: an entry of another term does not
        // count, nor does a joint change.
        let mut f = Follower::new(&[1, 2], 2, 4, 1);
        f.voters = vec![nodes(&[1, 2, 3, 4, 5])];
        assert_eq!(f.committed(naming(report(1, 4, 2), &[3])), None);
        let mut f = Follower::new(&[2, 2], 2, 2, 1);
        f.voters = vec![nodes(&[1, 2, 3, 4, 5]), nodes(&[1, 2, 3])];
        assert_eq!(f.committed(naming(report(1, 2, 2), &[3])), None);
    }

    #[test]
    fn a_leader_of_five_names_the_followers_answering_furthest_and_their_common_entry() {
        let r = Reports::default();
        r.set_voters(Some(&(1..=5).map(NodeId).collect()));
        r.hold(report(1, 2, 10));
        assert_eq!(r.tell(NodeId(2), 2), None, "no other follower answered yet");
        r.matched(NodeId(3), 2, 8);
        // An answer of an earlier term says nothing of this term's log.
        r.matched(NodeId(5), 1, 20);
        assert_eq!(r.tell(NodeId(2), 2), Some(naming(report(1, 2, 8), &[3])));
        assert_eq!(r.tell(NodeId(2), 2), None, "told already");
        r.matched(NodeId(4), 2, 12);
        // Node 4 holds past the leader's durable end: the leader's end bounds the report.
        assert_eq!(r.tell(NodeId(2), 2), Some(naming(report(1, 2, 10), &[4])));
        // A report to node 4 cannot count node 4's own answer.
        assert_eq!(r.tell(NodeId(4), 2), Some(naming(report(1, 2, 8), &[3])));
        // An older answer does not replace a newer one.
        r.matched(NodeId(3), 2, 5);
        r.forget(NodeId(4));
        assert_eq!(r.tell(NodeId(4), 2), Some(naming(report(1, 2, 8), &[3])));
        // A joint change: no voters known, nothing is named, as in a group of three.
        r.set_voters(None);
        r.hold(report(1, 2, 11));
        assert_eq!(r.tell(NodeId(2), 2), Some(report(1, 2, 11)));
        // Three voters: the leader's own report, whatever the followers answered.
        let r = Reports::default();
        r.set_voters(Some(&(1..=3).map(NodeId).collect()));
        r.hold(report(1, 2, 10));
        assert_eq!(r.tell(NodeId(2), 2), Some(report(1, 2, 10)));
        // The voters change: node 5 leaves, and its answers are forgotten.
        let r = Reports::default();
        r.set_voters(Some(&(1..=5).map(NodeId).collect()));
        r.hold(report(1, 2, 10));
        r.matched(NodeId(5), 2, 10);
        assert!(r.some_behind(|_| true));
        assert_eq!(r.tell(NodeId(2), 2), Some(naming(report(1, 2, 10), &[5])));
        r.set_voters(Some(&[1, 2, 3, 4, 6].map(NodeId).into()));
        r.forget(NodeId(2));
        assert_eq!(
            r.tell(NodeId(2), 2),
            None,
            "node 5's answer no longer counts"
        );
        r.matched(NodeId(6), 2, 9);
        assert_eq!(r.tell(NodeId(2), 2), Some(naming(report(1, 2, 9), &[6])));
        assert!(r.some_behind(|v| v == NodeId(2)), "node 2 was told 9 of 10");
        assert!(!r.some_behind(|v| v == NodeId(9)), "not a voter");
        // A target or leader outside the voters gets nothing in a larger group.
        let r = Reports::default();
        r.set_voters(Some(&(1..=5).map(NodeId).collect()));
        r.hold(report(1, 2, 10));
        r.matched(NodeId(3), 2, 10);
        assert_eq!(r.tell(NodeId(9), 2), None);
    }

    #[test]
    fn entries_past_the_membership_view_do_not_count() {
        // The view of {1, 2, 3} was read with the log up to index 3; entries 4 and 5 could
        // hold a change to {1, 4, 5} (a catch-up batch), which this view does not show.
        let mut f = Follower::new(&[2, 2, 2, 2, 2], 5, 2, 1);
        f.voters_upto = 3;
        assert_eq!(f.committed(report(1, 2, 5)), Some(3));
        f.voters_upto = 0;
        assert_eq!(f.committed(report(1, 2, 5)), None);
    }

    #[test]
    fn a_node_does_not_count_its_own_report() {
        let f = Follower::new(&[2, 2], 2, 2, 2);
        assert_eq!(f.committed(report(2, 2, 2)), None);
    }

    #[test]
    fn each_follower_is_told_each_report_once_and_only_in_its_term() {
        let r = Reports::default();
        assert_eq!(r.tell(NodeId(2), 2), None, "nothing held");
        r.hold(report(1, 2, 5));
        assert_eq!(r.tell(NodeId(2), 3), None, "another term's append");
        assert_eq!(r.tell(NodeId(2), 2), Some(report(1, 2, 5)));
        assert_eq!(r.tell(NodeId(2), 2), None, "told already");
        assert_eq!(r.tell(NodeId(3), 2), Some(report(1, 2, 5)));
        r.hold(report(1, 2, 4));
        assert_eq!(
            r.held(),
            Some(report(1, 2, 5)),
            "an older one does not replace it"
        );
        r.hold(report(1, 2, 6));
        assert_eq!(r.tell(NodeId(2), 2), Some(report(1, 2, 6)));
        r.forget(NodeId(2));
        assert_eq!(r.tell(NodeId(2), 2), Some(report(1, 2, 6)), "told again");
    }

    #[test]
    fn the_newer_report_wins() {
        let a = report(1, 2, 5);
        assert_eq!(a.newer(None), a);
        assert_eq!(a.newer(Some(report(1, 2, 7))), report(1, 2, 7));
        assert_eq!(a.newer(Some(report(1, 2, 3))), a);
        assert_eq!(a.newer(Some(report(3, 3, 1))), report(3, 3, 1));
    }
}
