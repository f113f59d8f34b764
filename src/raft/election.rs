//! When a follower that hears no leader starts an election. Pure: the caller gives the time
//! and the randomness, so the rules are tested without clocks or groups.
//!
//! openraft's own timer is off (one task per group); the core's driver calls [`ElectionTimer::due`]
//! for every awake group it owns once per heartbeat, and when a follower's
//! [`ElectionTimer::due_at`] comes, at most [`CHECKS_PER_HEARTBEAT`] times per heartbeat.
//!
//! Three rules, each from a measured problem:
//! - **The timeout counts openraft's leader lease.** A follower grants votes only once the
//!   lease (the longest election timeout) has run out since it last heard a leader, so an
//!   election started earlier cannot win. The delay is therefore the lease plus a random part
//!   as wide as openraft's range: between `max` and `2 × max - min` of the configured timing.
//!   (It was the lease plus a whole random timeout, `max + min` to `2 × max`: the `min` in
//!   it only delayed every failover, by 500 ms with the defaults, and spread nothing.)
//! - **A failed round retries without the lease, and a granted vote holds back the granter.**
//!   After a split vote both candidates used to wait the whole delay again (about 2.9 s
//!   without a leader in the failover runs). A retry now waits a plain random timeout
//!   ([`retry`]), and a follower that granted a (pre-)vote waits as long before campaigning
//!   itself, so it does not split the round it just helped (Raft's rule for granted votes,
//!   extended to pre-votes, whose real vote follows within a round trip and an fsync).
//! - **Elections are checked when due, up to five times per heartbeat.** Checked once per
//!   heartbeat, the random timeouts fell into a few buckets: two followers often timed out at the same check, split
//!   the vote and waited another round ([`tests::checking_five_times_per_heartbeat_splits_fewer_votes`]).

use std::time::{Duration, Instant};

use rand::{Rng, RngExt};

use super::group::Timing;

/// How many times per heartbeat interval the core checks which followers are due.
pub const CHECKS_PER_HEARTBEAT: u32 = 5;

/// One follower's election timeout: when it last heard a leader, and how long it waits.
#[derive(Clone, Copy, Debug)]
pub struct ElectionTimer {
    timing: Timing,
    contact: Instant,
    after: Duration,
    /// The delay after hearing a leader ([`delay`]: with the lease), drawn ahead so that
    /// hearing a leader, which happens on every accepted message, draws nothing.
    after_leader: Duration,
    /// When a leader was last heard (elections do not move it, unlike `contact`).
    heard: Instant,
}

impl ElectionTimer {
    pub fn new(timing: Timing, now: Instant, rng: &mut impl Rng) -> ElectionTimer {
        let after = delay(timing, rng);
        ElectionTimer {
            timing,
            contact: now,
            after,
            after_leader: after,
            heard: now,
        }
    }

    /// The timer of a replica of a group created just now. The group's first candidate
    /// (`first`) campaigns after two heartbeats; the others wait a whole timeout longer than
    /// usual, so the first candidate gets two or three tries (its peers may still be opening
    /// the group) before anyone competes with it. Thousands of partitions created at once then
    /// elect one leader each, mostly at the first try, spread as placement spread the first
    /// replicas, instead of racing their replicas' random timeouts and splitting votes.
    pub fn new_group(timing: Timing, first: bool, now: Instant, rng: &mut impl Rng) -> Self {
        let mut t = ElectionTimer::new(timing, now, rng);
        t.after = if first {
            Duration::from_millis(2 * timing.heartbeat_ms)
        } else {
            t.after + Duration::from_millis(timing.election_max_ms)
        };
        t
    }

    /// A leader was heard (a message from it was accepted): the timeout starts over, lease
    /// included.
    pub fn heard_leader(&mut self, now: Instant) {
        self.contact = now;
        self.heard = now;
        self.after = self.after_leader;
    }

    /// When an election comes due (unless a leader is heard first).
    pub fn due_at(&self) -> Instant {
        self.contact + self.after
    }

    /// How long since this replica last heard a leader (or started).
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.heard)
    }

    /// Whether an election is due at `now`. If so the timer starts over with a new random
    /// timeout, for the next try should this election not succeed.
    pub fn due(&mut self, now: Instant, rng: &mut impl Rng) -> bool {
        if now.saturating_duration_since(self.contact) < self.after {
            return false;
        }
        self.contact = now;
        self.after = retry(self.timing, rng);
        self.after_leader = delay(self.timing, rng);
        true
    }

    /// A quiet follower woke at `now` because its leader's node went silent or restarted
    /// (`shard::partition::quiet`): it has not heard that leader for at least a whole election
    /// timeout of the node's keepalives, so it waits only a random part of the timeouts' range
    /// (every follower of that node's groups wakes at the same tick; this spreads them).
    pub fn woke(&mut self, now: Instant, rng: &mut impl Rng) {
        let spread = self
            .timing
            .election_max_ms
            .saturating_sub(self.timing.election_min_ms);
        self.contact = now;
        self.after = Duration::from_millis(rng.random_range(0..=spread));
        self.after_leader = delay(self.timing, rng);
    }

    /// This replica granted a vote or a pre-vote at `now`: it holds back its own election for
    /// at least a retry delay, so the candidate's round can finish (Raft resets the timer on a
    /// granted vote; a pre-vote grant is followed by the candidate's real vote within a round
    /// trip and an fsync, and campaigning in between would split it).
    pub fn granted_vote(&mut self, now: Instant, rng: &mut impl Rng) {
        let wait = retry(self.timing, rng);
        if now + wait > self.contact + self.after {
            self.contact = now;
            self.after = wait;
        }
    }
}

/// A random election delay: the leader lease (the longest timeout) plus a random part as wide
/// as the range of timeouts.
pub fn delay(t: Timing, rng: &mut impl Rng) -> Duration {
    let spread = t.election_max_ms.saturating_sub(t.election_min_ms);
    let extra = rng.random_range(0..=spread);
    Duration::from_millis(t.election_max_ms + extra)
}

/// The delay before trying again after an election, or after granting a vote: a plain random
/// timeout (min to max). No leader has been heard since, so the lease has run out and is not
/// waited again; a failed round (a split vote, or a pre-vote refused by a follower whose lease
/// had not quite run out) costs 0.5-1 s with the defaults, not another 1-1.5 s.
pub fn retry(t: Timing, rng: &mut impl Rng) -> Duration {
    Duration::from_millis(
        rng.random_range(t.election_min_ms..=t.election_max_ms.max(t.election_min_ms)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn timing() -> Timing {
        // What `--raft-election-timeout-ms 1500` with a 150 ms heartbeat gives openraft.
        Timing {
            heartbeat_ms: 150,
            election_min_ms: 500,
            election_max_ms: 1000,
        }
    }

    #[test]
    fn delays_cover_the_lease_plus_a_random_timeout() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let t = timing();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            let d = delay(t, &mut rng).as_millis() as u64;
            assert!((1000..=1500).contains(&d), "{d}");
            seen.insert(d / 100);
        }
        assert!(seen.len() >= 5, "delays do not spread: {seen:?}");
    }

    #[test]
    fn an_election_is_due_only_after_silence_and_then_starts_over() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let start = Instant::now();
        let mut timer = ElectionTimer::new(timing(), start, &mut rng);
        // Never within the lease (the longest timeout) of the last leader heard.
        assert!(!timer.due(start + Duration::from_millis(999), &mut rng));
        // A leader heard late resets the silence.
        timer.heard_leader(start + Duration::from_millis(900));
        assert!(!timer.due(start + Duration::from_millis(1899), &mut rng));
        let at = start + Duration::from_millis(2500);
        assert!(timer.due(at, &mut rng));
        // The next try waits a random timeout, without the lease: none was heard since.
        assert!(!timer.due(at + Duration::from_millis(499), &mut rng));
        assert!(timer.due(at + Duration::from_millis(1000), &mut rng));
        // A leader heard again brings the lease back.
        let heard = at + Duration::from_millis(1100);
        timer.heard_leader(heard);
        assert!(!timer.due(heard + Duration::from_millis(999), &mut rng));
        assert!(timer.due(heard + Duration::from_millis(1500), &mut rng));
    }

    /// The split-vote fix for pre-votes: a follower that granted another's (pre-)vote does not
    /// campaign before that candidate's round can finish, even if its own timeout was about
    /// to run out; and a grant never brings its election forward.
    #[test]
    fn granting_a_vote_holds_back_the_own_election() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let start = Instant::now();
        let mut timer = ElectionTimer::new(timing(), start, &mut rng);
        // Granted 990 ms after the last leader: due at the earliest 500 ms later, not at 1 s.
        let granted = start + Duration::from_millis(990);
        timer.granted_vote(granted, &mut rng);
        assert!(!timer.due(granted + Duration::from_millis(499), &mut rng));
        assert!(timer.due(granted + Duration::from_millis(1000), &mut rng));
        // Just after hearing a leader (the whole lease ahead), a grant changes nothing.
        let heard = granted + Duration::from_millis(2000);
        timer.heard_leader(heard);
        timer.granted_vote(heard, &mut rng);
        assert!(!timer.due(heard + Duration::from_millis(999), &mut rng));
        assert!(timer.due(heard + Duration::from_millis(1500), &mut rng));
    }

    /// A new group's first candidate campaigns well before any other replica could, and
    /// retries once (its peers may still be opening the group) before any of them.
    #[test]
    fn a_new_groups_first_candidate_campaigns_before_the_others() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let t = timing();
        let start = Instant::now();
        for _ in 0..1_000 {
            let mut first = ElectionTimer::new_group(t, true, start, &mut rng);
            let mut other = ElectionTimer::new_group(t, false, start, &mut rng);
            assert!(!first.due(start + Duration::from_millis(299), &mut rng));
            let tried = start + Duration::from_millis(300);
            assert!(first.due(tried, &mut rng));
            // Its retry comes within the longest timeout...
            assert!(first.due(tried + Duration::from_millis(t.election_max_ms), &mut rng));
            // ...and no other replica campaigns before twice that from the start.
            assert!(!other.due(start + Duration::from_millis(1999), &mut rng));
            assert!(other.due(start + Duration::from_millis(2500), &mut rng));
        }
    }

    /// The fraction of pairs of followers, silent since the same moment, that start their
    /// elections at the same check of the driver (and so may split the vote).
    fn same_check(checks_per_heartbeat: u32, seed: u64) -> f64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let t = timing();
        let tick = t.heartbeat_ms / checks_per_heartbeat as u64;
        let check = |d: Duration| (d.as_millis() as u64).div_ceil(tick);
        let trials = 20_000;
        let same = (0..trials)
            .filter(|_| check(delay(t, &mut rng)) == check(delay(t, &mut rng)))
            .count();
        same as f64 / trials as f64
    }

    /// The split-vote fix: with checks five times per heartbeat, two followers time out at the
    /// same check far less often than with one check per heartbeat.
    #[test]
    fn checking_five_times_per_heartbeat_splits_fewer_votes() {
        let once = same_check(1, 42);
        let five = same_check(CHECKS_PER_HEARTBEAT, 42);
        assert!(once > 0.2, "one check per heartbeat: {once}");
        assert!(five < 0.08, "five checks per heartbeat: {five}");
        assert!(once > 3.0 * five, "{once} vs {five}");
    }
}
