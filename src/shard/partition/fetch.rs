//! Reading committed records: a fetch answers at once when records past its offset are
//! committed, else waits (a long poll) until a commit moves past it or its time runs out.

use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{select, Either};

use super::{Freshness, Partition, Waiters};
use crate::log::{Log, LogError, ReadBound};
use crate::shard::request::{CoreError, Fetched, ListedOffsets, StartAt};
use crate::types::Offset;

/// How often a long poll on a replicated partition checks that the replica is still fresh.
const FRESHNESS_RECHECK: Duration = Duration::from_millis(500);

/// What committed reads need of a replica: a partition's (its Raft group's) or a mirror's.
pub(in crate::shard) trait Readable {
    fn log(&self) -> &Log;
    /// Fetches waiting for the committed position to move.
    fn waiters(&self) -> &Waiters;
    fn is_closed(&self) -> bool;
    /// Whether this replica's reads may go stale while a long poll waits (it looks again).
    fn may_go_stale(&self) -> bool;
    fn freshness(&self) -> Freshness;
    /// Whether this replica's log, starting at `start`, started over there without the
    /// partition's earlier records while other replicas hold them (a promoted mirror's
    /// replica that was down at the promotion); a replica left alone answers from its own.
    fn lacks_history_before(&self, _start: Offset) -> bool {
        false
    }
}

impl Readable for Partition {
    fn log(&self) -> &Log {
        &self.log
    }
    fn waiters(&self) -> &Waiters {
        &self.waiters
    }
    fn is_closed(&self) -> bool {
        self.closed.get()
    }
    fn may_go_stale(&self) -> bool {
        self.replicated
    }
    fn freshness(&self) -> Freshness {
        Partition::freshness(self)
    }
    fn lacks_history_before(&self, start: Offset) -> bool {
        self.replicated && self.store.history_from() == Some(start)
    }
}

impl Partition {
    /// Committed batches from `from`, waiting up to `max_wait` for some to arrive; with
    /// `fresh_only`, refused on a stale follower (see [`Partition::freshness`]).
    pub async fn fetch(
        &self,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
        fresh_only: bool,
        whole: bool,
    ) -> Result<Fetched, CoreError> {
        fetch(self, from, max_bytes, max_wait, fresh_only, whole).await
    }

    /// The committed range, and where `at` falls in it. On a replica that started over
    /// without the partition's earlier records (see [`Readable::lacks_history_before`]), a
    /// position that may fall among them is refused (`Stale`): the replicas holding them
    /// answer it.
    pub async fn list_offsets(&self, at: StartAt) -> Result<ListedOffsets, CoreError> {
        let o = list_offsets(&self.log, at).await?;
        // A time may match a record before the start too (timestamps are the producers'
        // and need not grow with offsets), wherever the first match here lies.
        let may_fall_before = match at {
            StartAt::Latest => false,
            StartAt::Time(_) => true,
            _ => o.offset <= o.start,
        };
        if may_fall_before && self.lacks_history_before(o.start) {
            return Err(partial_history(o.start));
        }
        Ok(o)
    }
}

/// Committed batches of replica `r` from `from`, waiting up to `max_wait` for some to arrive;
/// with `fresh_only`, refused on a stale replica (see [`Partition::freshness`]). `whole`: batches
/// of control records only are answered too (a mirror copies every batch), not waited past.
pub(in crate::shard) async fn fetch(
    r: &impl Readable,
    from: Offset,
    max_bytes: usize,
    max_wait: Duration,
    fresh_only: bool,
    whole: bool,
) -> Result<Fetched, CoreError> {
    let log = r.log();
    let deadline = Instant::now() + max_wait;
    let mut from = from;
    loop {
        if r.is_closed() {
            return Err(CoreError::Log(LogError::Closed));
        }
        let fresh = r.freshness();
        if let Some(e) = fresh.stale.filter(|_| fresh_only) {
            return Err(e);
        }
        let p = log.positions();
        // A follower that knows its leader has committed further than it has may be
        // asked for an offset the leader already acknowledged: wait for it to arrive
        // rather than call it out of range.
        let arriving = fresh.behind > 0 && from > p.committed;
        if from < p.start && fresh_only && r.lacks_history_before(p.start) {
            // Not out of range for the partition: the other replicas hold these records.
            return Err(partial_history(p.start));
        }
        if from < p.start || (from > p.committed && !arriving) {
            return Err(CoreError::Log(crate::log::LogError::OffsetOutOfRange {
                requested: from,
                start: p.start,
                end: p.committed,
            }));
        }
        let now = Instant::now();
        if (from < p.committed || now >= deadline) && !arriving {
            let read = log.read(from, max_bytes, ReadBound::Committed).await?;
            if now < deadline
                && !whole
                && !read.batches.is_empty()
                && read.batches.iter().all(|b| b.meta().control)
            {
                // Only control records (never delivered): skip them and keep waiting.
                from = read.next_offset();
                continue;
            }
            return Ok(Fetched {
                batches: read.batches,
                from,
                until: read.until,
                start: p.start,
                high_watermark: p.committed,
                mirror: None,
            });
        }
        if arriving && now >= deadline {
            return Ok(Fetched {
                batches: Vec::new(),
                from,
                until: p.committed,
                start: p.start,
                high_watermark: p.committed,
                mirror: None,
            });
        }
        let (tx, rx) = oneshot::channel();
        if r.waiters().borrow().len() >= 64 {
            // Drops waiters whose fetch gave up (timed out), so idle partitions do not
            // accumulate them.
            r.waiters().borrow_mut().retain(|w| !w.is_canceled());
        }
        r.waiters().borrow_mut().push(tx);
        // A follower looks again now and then: it may go stale while its reader waits.
        let wait = match r.may_go_stale() {
            true => (deadline - now).min(FRESHNESS_RECHECK),
            false => deadline - now,
        };
        let timer = glommio::timer::sleep(wait);
        futures::pin_mut!(timer);
        match select(rx, timer).await {
            Either::Left(_) | Either::Right(_) => {}
        }
    }
}

/// Refuses, on a replica whose log started over at `start` without the partition's earlier
/// records, what only the replicas holding them can answer: the read goes to them.
fn partial_history(start: Offset) -> CoreError {
    CoreError::Stale {
        leader: None,
        why: format!(
            "holding the partition from offset {start} only (it started over at its mirror's \
             promotion)"
        ),
    }
}

/// The committed range of `log`, and where `at` falls in it.
pub(in crate::shard) async fn list_offsets(
    log: &Log,
    at: StartAt,
) -> Result<ListedOffsets, CoreError> {
    let p = log.positions();
    let offset = match at {
        StartAt::Earliest => p.start,
        StartAt::Latest => p.committed,
        StartAt::Offset(o) => o,
        StartAt::Time(t) => log
            .offset_for_timestamp(t, ReadBound::Committed)
            .await?
            .unwrap_or(p.committed),
        StartAt::Last(n) => offset_of_last(log, n, p.start, p.committed).await?,
    };
    Ok(ListedOffsets {
        start: p.start,
        end: p.committed,
        offset,
        follower_of: None,
    })
}

/// The offset from which the last `n` data records before `end` are read (from `start` if
/// there are fewer). Control records take offsets but are not data: the range is widened over
/// them, reading only the part added each time.
async fn offset_of_last(
    log: &Log,
    n: u64,
    start: Offset,
    end: Offset,
) -> Result<Offset, CoreError> {
    let mut from = end;
    let mut data = 0u64;
    while data < n && from > start {
        let wider = Offset(from.0.saturating_sub(n - data).max(start.0));
        data += data_records(log, wider, from).await?;
        from = wider;
    }
    Ok(from)
}

/// Data records (not control records) with offsets in `[from, until)`.
async fn data_records(log: &Log, from: Offset, until: Offset) -> Result<u64, CoreError> {
    let mut at = from;
    let mut data = 0;
    while at < until {
        let r = log.read(at, 1 << 20, ReadBound::Committed).await?;
        let Some(last) = r.batches.last() else { break };
        let next = last.meta().next_offset();
        for b in &r.batches {
            let m = b.meta();
            if !m.control {
                let lo = m.base_offset.max(at);
                let hi = m.next_offset().min(until);
                data += hi.0.saturating_sub(lo.0);
            }
        }
        at = next;
    }
    Ok(data)
}
