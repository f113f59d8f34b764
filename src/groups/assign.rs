//! Stream mode: which member consumes which partition. Pure, and tested by a property test.
//!
//! Each member has a share: the partitions divided by the members, the first members (in id
//! order) taking one more when it does not divide evenly. The assignment is sticky: a member
//! keeps what it holds up to its share; only what it holds beyond its share is revoked, and
//! free partitions go to members under their share. A partition being revoked keeps its owner
//! until the member answers (or is dropped), so no partition is ever given to two members.

use std::collections::{BTreeMap, BTreeSet};

/// A group member, as the coordinator numbers them.
pub type MemberId = u64;

/// What the coordinator does next to move towards a balanced assignment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Partitions to take back from members over their share (they answer `Revoked`).
    pub revoke: Vec<(MemberId, u32)>,
    /// Free partitions for members under their share.
    pub assign: Vec<(MemberId, u32)>,
}

/// The changes, given each partition's owner (`owner[p]`), the partitions being revoked, and
/// the members.
pub fn rebalance(
    owner: &[Option<MemberId>],
    revoking: &BTreeSet<u32>,
    members: &BTreeSet<MemberId>,
) -> Changes {
    let mut changes = Changes::default();
    if members.is_empty() {
        return changes;
    }
    let ids: Vec<MemberId> = members.iter().copied().collect();
    let n = owner.len();
    let m = ids.len();
    let share = |i: usize| n / m + usize::from(i < n % m);
    let mut held: BTreeMap<MemberId, Vec<u32>> = BTreeMap::new();
    for (p, o) in owner.iter().enumerate() {
        if let Some(o) = o {
            if !revoking.contains(&(p as u32)) {
                held.entry(*o).or_default().push(p as u32);
            }
        }
    }
    // Members over their share give partitions back.
    let mut counts: Vec<usize> = Vec::with_capacity(m);
    for (i, id) in ids.iter().enumerate() {
        let mine = held.remove(id).unwrap_or_default();
        let s = share(i);
        changes
            .revoke
            .extend(mine.iter().skip(s).map(|p| (*id, *p)));
        counts.push(mine.len().min(s));
    }
    // Free partitions go to members under their share.
    for (p, o) in owner.iter().enumerate() {
        if o.is_some() {
            continue;
        }
        if let Some(i) = (0..m).find(|&i| counts[i] < share(i)) {
            counts[i] += 1;
            changes.assign.push((ids[i], p as u32));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Applies changes the way the coordinator does: assignments at once; revocations once the
    /// member answers (here: at once).
    fn settle(owner: &mut [Option<MemberId>], members: &BTreeSet<MemberId>) -> usize {
        let mut moves = 0;
        for _ in 0..4 {
            let c = rebalance(owner, &BTreeSet::new(), members);
            if c == Changes::default() {
                return moves;
            }
            for (m, p) in c.revoke {
                assert_eq!(owner[p as usize], Some(m), "revoked from a non-owner");
                owner[p as usize] = None;
                moves += 1;
            }
            for (m, p) in c.assign {
                assert_eq!(
                    owner[p as usize], None,
                    "partition {p} given to two members"
                );
                owner[p as usize] = Some(m);
            }
        }
        panic!("no fixed point within four rounds");
    }

    fn balanced(owner: &[Option<MemberId>], members: &BTreeSet<MemberId>) {
        if members.is_empty() {
            return;
        }
        let mut count: BTreeMap<MemberId, usize> = members.iter().map(|m| (*m, 0)).collect();
        for (p, o) in owner.iter().enumerate() {
            let o = o.unwrap_or_else(|| panic!("partition {p} left unassigned"));
            *count.get_mut(&o).expect("owned by a member") += 1;
        }
        let (lo, hi) = (count.values().min(), count.values().max());
        assert!(hi.unwrap() - lo.unwrap() <= 1, "unbalanced: {count:?}");
    }

    proptest! {
        /// From any state, with members joining and leaving: every partition ends with one
        /// member, shares differ by one at most, and only what is held beyond a share moves.
        #[test]
        fn assignments_are_balanced_sticky_and_exclusive(
            n in 0usize..40,
            first in proptest::collection::btree_set(1u64..12, 1..6),
            later in proptest::collection::btree_set(1u64..12, 0..6),
        ) {
            let mut owner = vec![None; n];
            settle(&mut owner, &first);
            balanced(&owner, &first);
            // Members change: the leavers' partitions are freed (the coordinator does so).
            for o in owner.iter_mut() {
                if o.is_some_and(|m| !later.contains(&m)) {
                    *o = None;
                }
            }
            let before = owner.clone();
            // Sticky: exactly what stayers hold beyond their new share is revoked, no more.
            let ids: Vec<MemberId> = later.iter().copied().collect();
            let expected: usize = ids.iter().enumerate().map(|(i, id)| {
                let share = if ids.is_empty() { 0 } else { n / ids.len() + usize::from(i < n % ids.len()) };
                before.iter().filter(|o| **o == Some(*id)).count().saturating_sub(share)
            }).sum();
            let moved = settle(&mut owner, &later);
            prop_assert_eq!(moved, expected);
            if later.is_empty() {
                prop_assert!(owner.iter().all(Option::is_none));
            } else {
                balanced(&owner, &later);
            }
            // Nobody that stayed lost a partition it was allowed to keep.
            for (p, (b, a)) in before.iter().zip(&owner).enumerate() {
                if let (Some(b), Some(a)) = (b, a) {
                    if b != a {
                        prop_assert!(
                            before.iter().filter(|o| **o == Some(*b)).count()
                                > owner.iter().filter(|o| **o == Some(*b)).count(),
                            "partition {} moved from {} to {} without {} giving up its excess", p, b, a, b
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_partition_being_revoked_is_not_given_away() {
        let members: BTreeSet<MemberId> = [1, 2].into();
        let owner = vec![Some(1), Some(1), Some(1), Some(1)];
        let c = rebalance(&owner, &BTreeSet::new(), &members);
        assert_eq!(c.revoke, vec![(1, 2), (1, 3)]);
        assert!(
            c.assign.is_empty(),
            "nothing is free until member 1 answers"
        );
        // While 2 and 3 are being revoked, nothing more happens.
        let revoking: BTreeSet<u32> = [2, 3].into();
        assert_eq!(rebalance(&owner, &revoking, &members), Changes::default());
        // Once answered, member 2 gets them.
        let owner = vec![Some(1), Some(1), None, None];
        let c = rebalance(&owner, &BTreeSet::new(), &members);
        assert_eq!(c.assign, vec![(2, 2), (2, 3)]);
    }
}
