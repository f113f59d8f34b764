//! When a partition counts as under-replicated: the one rule behind `tern cluster status` and
//! the `tern_partition_under_replicated` metric. Like Kafka's in-sync replicas, a follower is
//! in sync when it keeps up in entries *and* in time: a follower that died while nothing was
//! written is no further behind in entries, but its leader stops hearing it.

use std::time::Duration;

/// A follower further behind its leader than this many Raft entries is not in sync.
pub const IN_SYNC_MAX_LAG: u64 = 1_000;

/// How long a leader may go without hearing a follower before it is not in sync: twice the
/// election timeout (heartbeats go out several times per timeout).
pub fn max_silence(election_timeout: Duration) -> Duration {
    election_timeout * 2
}

/// One follower as its leader sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowerLag {
    /// Whether it has matched the leader's log at all.
    pub matched: bool,
    /// Raft entries it is behind.
    pub lag_entries: u64,
    /// How long since it last acknowledged the leader (`None`: never).
    pub silent_for: Option<Duration>,
}

impl FollowerLag {
    pub fn in_sync(&self, max_silence: Duration) -> bool {
        self.matched
            && self.lag_entries <= IN_SYNC_MAX_LAG
            && self.silent_for.is_some_and(|s| s <= max_silence)
    }
}

/// Whether a partition with `replicas` assigned replicas has fewer of them in sync (the leader
/// counts as one) than assigned.
pub fn under_replicated(replicas: usize, in_sync_followers: usize) -> bool {
    1 + in_sync_followers < replicas
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_secs(3);

    fn f(matched: bool, lag_entries: u64, silent_ms: Option<u64>) -> FollowerLag {
        FollowerLag {
            matched,
            lag_entries,
            silent_for: silent_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn a_follower_is_in_sync_when_matched_close_and_heard_lately() {
        assert!(f(true, 0, Some(10)).in_sync(MAX));
        assert!(f(true, IN_SYNC_MAX_LAG, Some(3_000)).in_sync(MAX));
        assert!(!f(false, 0, Some(10)).in_sync(MAX), "unmatched");
        assert!(
            !f(true, IN_SYNC_MAX_LAG + 1, Some(10)).in_sync(MAX),
            "behind"
        );
        assert!(
            !f(true, 0, Some(3_001)).in_sync(MAX),
            "silent: a dead follower"
        );
        assert!(!f(true, 0, None).in_sync(MAX), "never heard");
    }

    #[test]
    fn followers_serve_reads_within_the_in_sync_bound() {
        assert_eq!(IN_SYNC_MAX_LAG, crate::shard::FOLLOWER_READ_MAX_LAG);
    }

    #[test]
    fn a_partition_is_under_replicated_with_fewer_in_sync_than_assigned() {
        assert!(!under_replicated(1, 0));
        assert!(!under_replicated(3, 2));
        assert!(under_replicated(3, 1));
        assert!(under_replicated(2, 0));
        assert_eq!(max_silence(Duration::from_millis(1500)), MAX);
    }
}
