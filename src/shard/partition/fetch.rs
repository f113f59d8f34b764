//! Reading committed records: a fetch answers at once when records past its offset are
//! committed, else waits (a long poll) until a commit moves past it or its time runs out.

use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{select, Either};

use super::Partition;
use crate::log::{LogError, ReadBound};
use crate::shard::request::{CoreError, Fetched, ListedOffsets, StartAt};
use crate::types::Offset;

/// How often a long poll on a replicated partition checks that the replica is still fresh.
const FRESHNESS_RECHECK: Duration = Duration::from_millis(500);

impl Partition {
    /// Committed batches from `from`, waiting up to `max_wait` for some to arrive; with
    /// `fresh_only`, refused on a stale follower (see [`Partition::freshness`]).
    pub async fn fetch(
        &self,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
        fresh_only: bool,
    ) -> Result<Fetched, CoreError> {
        let deadline = Instant::now() + max_wait;
        let mut from = from;
        loop {
            if self.closed.get() {
                return Err(CoreError::Log(LogError::Closed));
            }
            let fresh = self.freshness();
            if let Some(e) = fresh.stale.filter(|_| fresh_only) {
                return Err(e);
            }
            let p = self.log.positions();
            // A follower that knows its leader has committed further than it has may be
            // asked for an offset the leader already acknowledged: wait for it to arrive
            // rather than call it out of range.
            let arriving = fresh.behind > 0 && from > p.committed;
            if from < p.start || (from > p.committed && !arriving) {
                return Err(CoreError::Log(crate::log::LogError::OffsetOutOfRange {
                    requested: from,
                    start: p.start,
                    end: p.committed,
                }));
            }
            let now = Instant::now();
            if (from < p.committed || now >= deadline) && !arriving {
                let r = self.log.read(from, max_bytes, ReadBound::Committed).await?;
                if now < deadline
                    && !r.batches.is_empty()
                    && r.batches.iter().all(|b| b.meta().control)
                {
                    // Only control records (never delivered): skip them and keep waiting.
                    from = r.next_offset();
                    continue;
                }
                return Ok(Fetched {
                    batches: r.batches,
                    from,
                    until: r.until,
                    start: p.start,
                    high_watermark: p.committed,
                });
            }
            if arriving && now >= deadline {
                return Ok(Fetched {
                    batches: Vec::new(),
                    from,
                    until: p.committed,
                    start: p.start,
                    high_watermark: p.committed,
                });
            }
            let (tx, rx) = oneshot::channel();
            if self.waiters.borrow().len() >= 64 {
                self.prune_waiters();
            }
            self.waiters.borrow_mut().push(tx);
            // A follower looks again now and then: it may go stale while its reader waits.
            let wait = match self.replicated {
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

    /// The committed range, and where `at` falls in it.
    pub async fn list_offsets(&self, at: StartAt) -> Result<ListedOffsets, CoreError> {
        let p = self.log.positions();
        let offset = match at {
            StartAt::Earliest => p.start,
            StartAt::Latest => p.committed,
            StartAt::Offset(o) => o,
            StartAt::Time(t) => self
                .log
                .offset_for_timestamp(t, ReadBound::Committed)
                .await?
                .unwrap_or(p.committed),
            StartAt::Last(n) => self.offset_of_last(n, p.start, p.committed).await?,
        };
        Ok(ListedOffsets {
            start: p.start,
            end: p.committed,
            offset,
            follower_of: None,
        })
    }

    /// The offset from which the last `n` data records before `end` are read (from `start` if
    /// there are fewer). Control records take offsets but are not data: the range is widened
    /// over them, reading only the part added each time.
    async fn offset_of_last(
        &self,
        n: u64,
        start: Offset,
        end: Offset,
    ) -> Result<Offset, CoreError> {
        let mut from = end;
        let mut data = 0u64;
        while data < n && from > start {
            let wider = Offset(from.0.saturating_sub(n - data).max(start.0));
            data += self.data_records(wider, from).await?;
            from = wider;
        }
        Ok(from)
    }

    /// Data records (not control records) with offsets in `[from, until)`.
    async fn data_records(&self, from: Offset, until: Offset) -> Result<u64, CoreError> {
        let mut at = from;
        let mut data = 0;
        while at < until {
            let r = self.log.read(at, 1 << 20, ReadBound::Committed).await?;
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

    /// Drops waiters whose fetch gave up (timed out), so idle partitions do not accumulate them.
    fn prune_waiters(&self) {
        self.waiters.borrow_mut().retain(|w| !w.is_canceled());
    }
}
