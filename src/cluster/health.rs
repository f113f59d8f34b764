//! When a partition counts as under-replicated: the one rule behind `tern cluster status` and
//! the `tern_partition_under_replicated` metric.

/// A follower further behind its leader than this many Raft entries is not in sync.
pub const IN_SYNC_MAX_LAG: u64 = 1_000;

/// One follower as its leader sees it: whether it has matched the leader's log at all, and
/// how many entries it is behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerLag {
    pub matched: bool,
    pub lag_entries: u64,
}

impl FollowerLag {
    pub fn in_sync(&self) -> bool {
        self.matched && self.lag_entries <= IN_SYNC_MAX_LAG
    }
}

/// Whether a partition with `replicas` assigned replicas, seen from its leader with these
/// followers, has fewer replicas in sync (the leader counts as one) than assigned.
pub fn under_replicated(replicas: usize, followers: impl IntoIterator<Item = FollowerLag>) -> bool {
    let in_sync = 1 + followers.into_iter().filter(FollowerLag::in_sync).count();
    in_sync < replicas
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(matched: bool, lag_entries: u64) -> FollowerLag {
        FollowerLag {
            matched,
            lag_entries,
        }
    }

    #[test]
    fn a_partition_is_under_replicated_when_a_follower_is_missing_unmatched_or_far_behind() {
        assert!(!under_replicated(1, []));
        assert!(!under_replicated(3, [f(true, 0), f(true, IN_SYNC_MAX_LAG)]));
        assert!(under_replicated(3, [f(true, 0)]), "a follower missing");
        assert!(under_replicated(3, [f(true, 0), f(false, 0)]), "unmatched");
        assert!(
            under_replicated(3, [f(true, 0), f(true, IN_SYNC_MAX_LAG + 1)]),
            "too far behind"
        );
    }
}
