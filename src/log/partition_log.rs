//! The partition log: appends with group commit, reads, truncation, retention, recovery.
//!
//! ```text
//!  append ──▶ staged bytes (memory) ──flusher: one write──▶ segment file ──fdatasync──▶ durable
//!   │  offsets assigned here            written ≥ offset          durable ≥ offset
//!   └─ waits: `always` for durable, `interval` for written (a timer fsyncs every N ms)
//! ```
//!
//! Appends from many tasks accumulate while a write is in flight and go out together: one write
//! and one fdatasync for all of them. Three positions are kept apart, each an exclusive end
//! ("every offset below this is ..."): `written` (on disk, readable), `durable` (fdatasync'd),
//! `committed` (settled by replication, set by the caller). `durable ≤ written` always; under
//! `always`, `committed ≤ durable`; under `interval`, `committed ≤ written` (see docs/storage.md).
//!
//! Everything lives on one glommio executor (`Rc`, `RefCell`); no borrow is held across an
//! await. Two async locks order the work: `append_lock` serializes appends, rolls,
//! truncations and deletions (so offsets are assigned in order), and `io_lock` serializes
//! mutations of files (a flush round, an fsync, a roll, a truncation).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::Duration;

use futures::channel::oneshot;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::sync::Semaphore;
use glommio::task::JoinHandle;

use super::batch::{self, Batch, RecordView};
use super::config::{FsyncPolicy, LogConfig};
use super::error::LogError;
use super::index::SparseIndex;
use super::io::{
    open_rw, prepare_dma_dir, read_exact, read_small_file, remove_if_exists, write_all_at,
    write_small_file, SeqReader, Step,
};
use super::retention::{self, SegmentInfo};
use super::segment::{self, Segment};
use super::state_file::sync_dir;
use crate::types::{Offset, Term, TimestampMs};

/// The positions of a log, each an exclusive end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Positions {
    /// The first offset still stored.
    pub start: Offset,
    pub committed: Offset,
    pub durable: Offset,
    pub written: Offset,
    /// The offset the next appended record gets.
    pub next: Offset,
}

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub base: Offset,
    pub last: Offset,
    /// Whether the batch was fdatasync'd when the append completed (always under `always`).
    pub durable: bool,
}

/// How far a read may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadBound {
    /// Only records settled by replication: what consumers see.
    Committed,
    /// Everything written: what a Raft leader ships to followers.
    Written,
}

/// How the base offset of an appended batch is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assign {
    /// The log assigns the next offsets and stamps this term.
    Next(Term),
    /// The batch already carries its offsets (a Raft follower); they must follow the log end.
    Keep,
}

/// Counters for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub appends: u64,
    pub writes: u64,
    pub fsyncs: u64,
    pub rolls: u64,
    pub segments_deleted: u64,
}

/// Batches read from the log.
#[derive(Clone, Debug, Default)]
pub struct ReadBatches {
    /// The offset the read asked for; the first batch may start before it.
    pub from: Offset,
    /// The read's bound (exclusive); the last batch may run past it when the bound falls
    /// inside a batch.
    pub until: Offset,
    pub batches: Vec<Batch>,
}

impl ReadBatches {
    /// Records in `[from, until)`, hiding those whose expiry has passed at `now`.
    pub fn records(&self, now: TimestampMs) -> impl Iterator<Item = RecordView<'_>> {
        let (from, until) = (self.from, self.until);
        self.batches
            .iter()
            .flat_map(|b| b.records())
            .filter(move |r| r.offset >= from && r.offset < until && !r.is_expired(now))
    }

    /// Where the next read continues: after the last batch, or at the bound if that batch runs
    /// past it (its later records were not readable yet).
    pub fn next_offset(&self) -> Offset {
        self.batches
            .last()
            .map_or(self.from, |b| b.last_offset().plus(1).min(self.until))
    }

    pub fn bytes(&self) -> usize {
        self.batches.iter().map(Batch::len).sum()
    }
}

type Waiters = VecDeque<(Offset, oneshot::Sender<Result<(), LogError>>)>;

struct State {
    /// Never empty; the last one is active.
    segments: Vec<Segment>,
    /// Appended bytes of the active segment not yet handed to a write.
    staged: Vec<u8>,
    /// The bytes of the active segment's last partial block already on disk, rewritten with the
    /// next write because O_DIRECT writes whole blocks.
    tail: Vec<u8>,
    next: Offset,
    written: Offset,
    durable: Offset,
    committed: Offset,
    poisoned: Option<String>,
    closed: bool,
    /// Bumped by every truncation, so a read that raced one knows its bytes moved.
    truncations: u64,
    written_waiters: Waiters,
    durable_waiters: Waiters,
    stats: LogStats,
}

impl State {
    fn active(&self) -> &Segment {
        self.segments.last().expect("a log always has a segment")
    }
    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("a log always has a segment")
    }
    fn start(&self) -> Offset {
        self.segments[0].base
    }
    fn check_writable(&self) -> Result<(), LogError> {
        if let Some(p) = &self.poisoned {
            return Err(LogError::Poisoned(p.clone()));
        }
        if self.closed {
            return Err(LogError::Closed);
        }
        Ok(())
    }
    fn wake(&mut self) {
        let (w, d) = (self.written, self.durable);
        while self.written_waiters.front().is_some_and(|(o, _)| *o <= w) {
            let (_, tx) = self.written_waiters.pop_front().unwrap();
            let _ = tx.send(Ok(()));
        }
        while self.durable_waiters.front().is_some_and(|(o, _)| *o <= d) {
            let (_, tx) = self.durable_waiters.pop_front().unwrap();
            let _ = tx.send(Ok(()));
        }
    }
    /// Index of the segment holding `offset`.
    fn segment_for(&self, offset: Offset) -> Option<usize> {
        let i = self.segments.partition_point(|s| s.base <= offset);
        i.checked_sub(1)
    }
}

struct Inner {
    dir: PathBuf,
    config: LogConfig,
    state: RefCell<State>,
    append_lock: Semaphore,
    io_lock: Semaphore,
    flush_signal: LocalSender<()>,
    tasks: RefCell<Vec<JoinHandle<()>>>,
    /// Test hook: fail the next write or fsync as the disk would.
    fail_next_io: Cell<bool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in self.tasks.borrow().iter() {
            t.cancel();
        }
    }
}

/// A partition log. Cheap to clone; lives on one executor.
#[derive(Clone)]
pub struct Log {
    inner: Rc<Inner>,
}

impl Log {
    /// Opens the log in `dir` (created if missing), recovering its active segment: every batch
    /// is CRC-checked, a torn or garbage tail is cut off and logged, and missing or damaged
    /// indexes of sealed segments are rebuilt.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log, LogError> {
        config.validate().map_err(LogError::Config)?;
        let dir = dir.as_ref().to_path_buf();
        // Metadata calls at open only; they are quick and the log is not serving yet.
        std::fs::create_dir_all(&dir).map_err(|e| LogError::io("creating", &dir, e))?;
        prepare_dma_dir(&dir).await?;
        let mut bases = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| LogError::io("listing", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LogError::io("listing", &dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(base) = segment::parse_log_name(&name) {
                bases.push(base);
            } else if name.ends_with(".tmp") {
                remove_if_exists(&entry.path()).await?;
            }
        }
        bases.sort();
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len().max(1));
        for (i, &base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let seg = if last {
                recover_active(&dir, base, &config).await?
            } else {
                open_sealed(&dir, base, &config).await?
            };
            if let Some(prev) = segments.last() {
                if seg.base != prev.next_offset {
                    return Err(LogError::Corrupt {
                        path: seg.path.display().to_string(),
                        position: 0,
                        reason: format!(
                            "segment starts at offset {} but the one before ends at {}",
                            seg.base, prev.next_offset
                        ),
                    });
                }
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            segments.push(create_segment(&dir, Offset::ZERO, &config).await?);
        }
        let active = segments.last().unwrap();
        let tail = load_tail(active).await?;
        let end = active.next_offset;
        let start = segments[0].base;
        let (tx, rx) = local_channel::new_bounded(1);
        let inner = Rc::new(Inner {
            dir,
            config: config.clone(),
            state: RefCell::new(State {
                segments,
                staged: Vec::new(),
                tail,
                next: end,
                written: end,
                durable: end,
                committed: start,
                poisoned: None,
                closed: false,
                truncations: 0,
                written_waiters: VecDeque::new(),
                durable_waiters: VecDeque::new(),
                stats: LogStats::default(),
            }),
            append_lock: Semaphore::new(1),
            io_lock: Semaphore::new(1),
            flush_signal: tx,
            tasks: RefCell::new(Vec::new()),
            fail_next_io: Cell::new(false),
        });
        let weak = Rc::downgrade(&inner);
        let mut tasks = vec![glommio::spawn_local(flush_loop(weak.clone(), rx)).detach()];
        if let FsyncPolicy::Interval(every) = config.fsync {
            tasks.push(glommio::spawn_local(sync_loop(weak.clone(), every)).detach());
        }
        if config.retention_ms.is_some() || config.retention_bytes.is_some() {
            let every = Duration::from_millis(config.retention_check_interval_ms);
            tasks.push(glommio::spawn_local(retention_loop(weak, every)).detach());
        }
        *inner.tasks.borrow_mut() = tasks;
        Ok(Log { inner })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    pub fn positions(&self) -> Positions {
        let st = self.inner.state.borrow();
        Positions {
            start: st.start(),
            committed: st.committed,
            durable: st.durable,
            written: st.written,
            next: st.next,
        }
    }

    pub fn stats(&self) -> LogStats {
        self.inner.state.borrow().stats
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.inner.state.borrow().segments.len()
    }

    /// Bytes stored in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.inner
            .state
            .borrow()
            .segments
            .iter()
            .map(|s| s.size)
            .sum()
    }

    /// Why the log refuses writes, if it does.
    pub fn poisoned(&self) -> Option<String> {
        self.inner.state.borrow().poisoned.clone()
    }

    /// Appends a batch and completes when it is durable (`always`) or written (`interval`).
    pub async fn append(&self, batch: &Batch, assign: Assign) -> Result<Appended, LogError> {
        let inner = &self.inner;
        let (rx, appended) = {
            let _permit = inner
                .append_lock
                .acquire_permit(1)
                .await
                .map_err(|_| LogError::Closed)?;
            inner.state.borrow().check_writable()?;
            let len = batch.len();
            if len > inner.config.batch_bytes_max {
                return Err(LogError::BatchTooLarge {
                    len,
                    max: inner.config.batch_bytes_max,
                });
            }
            let meta = batch.meta();
            if self.needs_roll(len, meta.max_timestamp) {
                self.roll_held().await?;
            }
            // Back-pressure: bounded memory for bytes not yet written.
            loop {
                let (staged, next) = {
                    let st = inner.state.borrow();
                    (st.staged.len(), st.next)
                };
                if staged == 0 || staged + len <= inner.config.pending_bytes_max {
                    break;
                }
                self.wait_for(next, Wait::Written).await?;
            }
            let mut st = inner.state.borrow_mut();
            st.check_writable()?;
            let base = match assign {
                Assign::Next(_) => st.next,
                Assign::Keep => {
                    if meta.base_offset != st.next {
                        return Err(LogError::NonContiguous {
                            expected: st.next,
                            got: meta.base_offset,
                        });
                    }
                    meta.base_offset
                }
            };
            let at = st.staged.len();
            st.staged.extend_from_slice(batch.bytes());
            if let Assign::Next(term) = assign {
                batch::stamp(&mut st.staged[at..at + len], base, term);
            }
            st.active_mut().on_append(
                base,
                meta.record_count,
                len,
                meta.first_timestamp,
                meta.max_timestamp,
            );
            let end = base.plus(meta.record_count as u64);
            st.next = end;
            st.stats.appends += 1;
            let (tx, rx) = oneshot::channel();
            match inner.config.fsync {
                FsyncPolicy::Always => st.durable_waiters.push_back((end, tx)),
                FsyncPolicy::Interval(_) => st.written_waiters.push_back((end, tx)),
            }
            let _ = inner.flush_signal.try_send(());
            (
                rx,
                Appended {
                    base,
                    last: end.prev().expect("a batch has a record"),
                    durable: false,
                },
            )
        };
        rx.await.map_err(|_| LogError::Closed)??;
        Ok(Appended {
            durable: self.inner.state.borrow().durable > appended.last,
            ..appended
        })
    }

    fn needs_roll(&self, incoming: usize, incoming_max_ts: TimestampMs) -> bool {
        let st = self.inner.state.borrow();
        let a = st.active();
        if a.is_empty() {
            return false;
        }
        let c = &self.inner.config;
        a.size + incoming as u64 > c.segment_bytes_max
            || a.first_timestamp.is_some_and(|first| {
                incoming_max_ts.0.saturating_sub(first.0) >= c.segment_ms_max as i64
            })
    }

    /// Waits until every offset below `end` is written or durable.
    async fn wait_for(&self, end: Offset, what: Wait) -> Result<(), LogError> {
        let rx = {
            let mut st = self.inner.state.borrow_mut();
            if let Some(p) = &st.poisoned {
                return Err(LogError::Poisoned(p.clone()));
            }
            let reached = match what {
                Wait::Written => st.written >= end,
                Wait::Durable => st.durable >= end,
            };
            if reached {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            match what {
                Wait::Written => st.written_waiters.push_back((end, tx)),
                Wait::Durable => st.durable_waiters.push_back((end, tx)),
            }
            rx
        };
        let _ = self.inner.flush_signal.try_send(());
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Makes everything appended so far durable, whatever the policy.
    pub async fn flush(&self) -> Result<(), LogError> {
        let next = self.inner.state.borrow().next;
        self.wait_for(next, Wait::Written).await?;
        if let FsyncPolicy::Interval(_) = self.inner.config.fsync {
            self.inner.sync_now().await?;
        }
        self.wait_for(next, Wait::Durable).await
    }

    /// Waits until `offset` is durable (useful under the `interval` policy).
    pub async fn wait_durable(&self, offset: Offset) -> Result<(), LogError> {
        self.wait_for(offset.plus(1), Wait::Durable).await
    }

    /// Seals the active segment (if it holds anything) and starts a new one at the log end.
    pub async fn roll(&self) -> Result<(), LogError> {
        let _permit = self
            .inner
            .append_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LogError::Closed)?;
        self.inner.state.borrow().check_writable()?;
        self.roll_held().await
    }

    /// Seals the active segment and starts a new one at the log end. Caller holds `append_lock`.
    async fn roll_held(&self) -> Result<(), LogError> {
        let inner = &self.inner;
        if inner.state.borrow().active().is_empty() {
            // An empty segment already starts at the log end.
            return Ok(());
        }
        let next = inner.state.borrow().next;
        self.wait_for(next, Wait::Written).await?;
        let _io = inner
            .io_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LogError::Closed)?;
        let r = self.roll_locked().await;
        if let Err(e) = &r {
            inner.poison(e);
        }
        r
    }

    async fn roll_locked(&self) -> Result<(), LogError> {
        let inner = &self.inner;
        let (file, path, size, next) = {
            let st = inner.state.borrow();
            let a = st.active();
            (a.file.clone(), a.path.clone(), a.written_size, st.next)
        };
        // Cut the zero padding of the last block: a sealed segment is exactly its batches.
        file.truncate(size)
            .await
            .map_err(|e| LogError::io("truncating", &path, e))?;
        inner.fsync(&file, &path).await?;
        {
            let mut st = inner.state.borrow_mut();
            st.durable = st.durable.max(next);
            st.wake();
        }
        let (summary, offset_file, time_file, ipath, tpath) = {
            let st = inner.state.borrow();
            let a = st.active();
            (
                a.summary(),
                a.index.encode_offset_file(&a.summary()),
                a.index.encode_time_file(),
                a.index_path("index"),
                a.index_path("timeindex"),
            )
        };
        debug_assert_eq!(summary.size, size);
        write_small_file(&ipath, &offset_file).await?;
        write_small_file(&tpath, &time_file).await?;
        let seg = create_segment(&inner.dir, next, &inner.config).await?;
        let mut st = inner.state.borrow_mut();
        st.active_mut().sealed = true;
        st.segments.push(seg);
        st.tail.clear();
        st.stats.rolls += 1;
        Ok(())
    }

    /// Sets the committed position (an exclusive end). It only moves forward, and never past
    /// what the fsync policy has secured: durable under `always`, written under `interval`.
    pub fn set_committed(&self, end: Offset) -> Result<(), LogError> {
        let mut st = self.inner.state.borrow_mut();
        let high = match self.inner.config.fsync {
            FsyncPolicy::Always => st.durable,
            FsyncPolicy::Interval(_) => st.written,
        };
        if end < st.committed || end > high {
            return Err(LogError::InvalidPosition {
                what: "committed",
                value: end,
                low: st.committed,
                high,
            });
        }
        st.committed = end;
        Ok(())
    }

    /// Reads whole batches from the one holding `from`, up to about `max_bytes` (at least one
    /// batch when any is available), never past `bound`. Every batch is CRC-checked; a corrupt
    /// one is an error, never returned.
    pub async fn read(
        &self,
        from: Offset,
        max_bytes: usize,
        bound: ReadBound,
    ) -> Result<ReadBatches, LogError> {
        let (limit, epoch) = {
            let st = self.inner.state.borrow();
            if from < st.start() || from > st.next {
                return Err(LogError::OffsetOutOfRange {
                    requested: from,
                    start: st.start(),
                    end: st.next,
                });
            }
            let limit = match bound {
                ReadBound::Committed => st.committed,
                ReadBound::Written => st.written,
            };
            (limit, st.truncations)
        };
        let mut out = ReadBatches {
            from,
            until: limit,
            batches: Vec::new(),
        };
        let mut bytes = 0usize;
        let mut cursor = from;
        'segments: while cursor < limit {
            let (file, path, base, pos, end) = {
                let st = self.inner.state.borrow();
                let Some(i) = st.segment_for(cursor) else {
                    let start = st.start();
                    return Err(LogError::OffsetOutOfRange {
                        requested: cursor,
                        start,
                        end: st.next,
                    });
                };
                let s = &st.segments[i];
                let rel = (cursor.0 - s.base.0).min(u32::MAX as u64) as u32;
                (
                    s.file.clone(),
                    s.path.clone(),
                    s.base,
                    s.index.position_for_offset(rel),
                    s.written_size,
                )
            };
            let chunk = max_bytes.saturating_sub(bytes);
            let mut r = SeqReader::new(file, path.clone(), pos as u64, end, chunk);
            let before = cursor;
            loop {
                match r.next().await? {
                    Step::End => break,
                    Step::Invalid { position, error } => {
                        if self.inner.state.borrow().truncations != epoch {
                            // A truncation cut the bytes under this read: what was read before
                            // it is still valid, the rest is gone.
                            break 'segments;
                        }
                        return Err(LogError::Corrupt {
                            path: path.display().to_string(),
                            position,
                            reason: error.to_string(),
                        });
                    }
                    Step::Batch { batch, .. } => {
                        if batch.last_offset() < cursor {
                            continue;
                        }
                        if batch.base_offset() >= limit {
                            break 'segments;
                        }
                        if !out.batches.is_empty() && bytes + batch.len() > max_bytes {
                            break 'segments;
                        }
                        bytes += batch.len();
                        cursor = batch.last_offset().plus(1);
                        out.batches.push(batch);
                        if bytes >= max_bytes {
                            break 'segments;
                        }
                    }
                }
            }
            if cursor == before {
                // Nothing readable in this segment beyond `cursor` (it was the base of an empty
                // active segment, or the segment shrank under us).
                tracing::trace!(segment = base.0, "read found nothing past {cursor}");
                break;
            }
        }
        Ok(out)
    }

    /// The first offset whose record has a timestamp at or after `ts`, among records below
    /// `bound`; `None` when every such record is older.
    pub async fn offset_for_timestamp(
        &self,
        ts: TimestampMs,
        bound: ReadBound,
    ) -> Result<Option<Offset>, LogError> {
        let (limit, candidates) = {
            let st = self.inner.state.borrow();
            let limit = match bound {
                ReadBound::Committed => st.committed,
                ReadBound::Written => st.written,
            };
            let c: Vec<_> = st
                .segments
                .iter()
                .filter(|s| s.max_timestamp >= ts && s.base < limit)
                .map(|s| {
                    (
                        s.file.clone(),
                        s.path.clone(),
                        s.index.position_for_timestamp(ts),
                        s.written_size,
                    )
                })
                .collect();
            (limit, c)
        };
        for (file, path, pos, end) in candidates {
            let mut r = SeqReader::new(file, path.clone(), pos as u64, end, 64 << 10);
            loop {
                match r.next().await? {
                    Step::End => break,
                    Step::Invalid { position, error } => {
                        return Err(LogError::Corrupt {
                            path: path.display().to_string(),
                            position,
                            reason: error.to_string(),
                        })
                    }
                    Step::Batch { batch, .. } => {
                        if batch.base_offset() >= limit {
                            return Ok(None);
                        }
                        if batch.meta().max_timestamp < ts {
                            continue;
                        }
                        if let Some(r) = batch
                            .records()
                            .find(|r| r.timestamp >= ts && r.offset < limit)
                        {
                            return Ok(Some(r.offset));
                        }
                    }
                }
            }
        }
        Ok(None)
    }

    /// Drops every record after `last_kept` (a Raft follower discarding a divergent tail).
    pub async fn truncate_after(&self, last_kept: Offset) -> Result<(), LogError> {
        self.truncate_from(last_kept.plus(1)).await
    }

    /// Drops every record at or after `first_dropped`, which must start a batch (or be the log
    /// end). Durable when this returns: a crash cannot bring the dropped records back.
    pub async fn truncate_from(&self, first_dropped: Offset) -> Result<(), LogError> {
        let inner = &self.inner;
        let _permit = inner
            .append_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LogError::Closed)?;
        let next = {
            let st = inner.state.borrow();
            st.check_writable()?;
            if first_dropped < st.start() || first_dropped > st.next {
                return Err(LogError::OffsetOutOfRange {
                    requested: first_dropped,
                    start: st.start(),
                    end: st.next,
                });
            }
            if first_dropped < st.committed {
                return Err(LogError::BelowCommitted {
                    at: first_dropped,
                    committed: st.committed,
                });
            }
            st.next
        };
        if first_dropped == next {
            return Ok(());
        }
        self.wait_for(next, Wait::Written).await?;
        let _io = inner
            .io_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LogError::Closed)?;
        let r = self.truncate_locked(first_dropped).await;
        if let Err(e) = &r {
            if !matches!(e, LogError::NotABatchBoundary(_)) {
                inner.poison(e);
            }
        }
        r
    }

    async fn truncate_locked(&self, first_dropped: Offset) -> Result<(), LogError> {
        let inner = &self.inner;
        // Find the byte position of the batch starting at `first_dropped`.
        let (idx, file, path, base, pos_hint, end) = {
            let st = inner.state.borrow();
            let i = st
                .segment_for(first_dropped)
                .expect("checked against start");
            let s = &st.segments[i];
            let rel = (first_dropped.0 - s.base.0) as u32;
            (
                i,
                s.file.clone(),
                s.path.clone(),
                s.base,
                s.index.position_for_offset(rel),
                s.written_size,
            )
        };
        let cut = if first_dropped == base {
            0
        } else {
            let mut r = SeqReader::new(file.clone(), path.clone(), pos_hint as u64, end, 64 << 10);
            loop {
                match r.next().await? {
                    Step::Batch { position, batch } => {
                        if batch.base_offset() == first_dropped {
                            break position;
                        }
                        if batch.base_offset() > first_dropped
                            || batch.last_offset() >= first_dropped
                        {
                            return Err(LogError::NotABatchBoundary(first_dropped));
                        }
                    }
                    Step::End => return Err(LogError::NotABatchBoundary(first_dropped)),
                    Step::Invalid { position, error } => {
                        return Err(LogError::Corrupt {
                            path: path.display().to_string(),
                            position,
                            reason: error.to_string(),
                        })
                    }
                }
            }
        };
        // Later segments go first, newest first, each removal made durable, so a crash leaves a
        // contiguous prefix of segments.
        loop {
            let victim = {
                let st = inner.state.borrow();
                (st.segments.len() > idx + 1).then(|| st.segments.last().unwrap().path.clone())
            };
            let Some(vpath) = victim else { break };
            remove_segment_files(&vpath).await?;
            sync_dir(&inner.dir).await?;
            inner.state.borrow_mut().segments.pop();
        }
        // The containing segment becomes active again: its index files describe a longer
        // segment, so they go before the file shrinks.
        let sealed = inner.state.borrow().segments[idx].sealed;
        if sealed {
            remove_if_exists(&path.with_extension("index")).await?;
            remove_if_exists(&path.with_extension("timeindex")).await?;
            sync_dir(&inner.dir).await?;
        }
        file.truncate(cut)
            .await
            .map_err(|e| LogError::io("truncating", &path, e))?;
        inner.fsync(&file, &path).await?;
        let scan =
            segment::scan(&file, &path, base, cut, inner.config.index_interval_bytes).await?;
        if scan.stopped.is_some() || scan.next_offset != first_dropped {
            return Err(LogError::Corrupt {
                path: path.display().to_string(),
                position: scan.valid_size,
                reason: "segment changed while truncating".into(),
            });
        }
        let seg = segment::from_scan(base, file, path, scan, false);
        let tail = load_tail(&seg).await?;
        let mut st = inner.state.borrow_mut();
        *st.active_mut() = seg;
        st.tail = tail;
        st.next = first_dropped;
        st.written = first_dropped;
        st.durable = st.durable.min(first_dropped);
        st.truncations += 1;
        Ok(())
    }

    /// Deletes whole segments whose records all lie before `offset` (and are committed).
    /// Returns how many were deleted. The active segment is never deleted.
    pub async fn delete_before(&self, offset: Offset) -> Result<usize, LogError> {
        let n = {
            let st = self.inner.state.borrow();
            let limit = offset.min(st.committed);
            let closed = &st.segments[..st.segments.len() - 1];
            closed.iter().take_while(|s| s.next_offset <= limit).count()
        };
        self.delete_front(n).await
    }

    /// Applies retention at `now`: rolls an idle active segment that is older than
    /// `segment_ms_max`, then deletes closed segments past `retention_ms` or `retention_bytes`.
    pub async fn enforce_retention(&self, now: TimestampMs) -> Result<usize, LogError> {
        let c = &self.inner.config;
        let idle_and_old = {
            let st = self.inner.state.borrow();
            let a = st.active();
            !a.is_empty()
                && a.first_timestamp
                    .is_some_and(|f| now.0.saturating_sub(f.0) >= c.segment_ms_max as i64)
        };
        if idle_and_old {
            let _permit = self
                .inner
                .append_lock
                .acquire_permit(1)
                .await
                .map_err(|_| LogError::Closed)?;
            self.inner.state.borrow().check_writable()?;
            self.roll_held().await?;
        }
        let n = {
            let st = self.inner.state.borrow();
            let closed: Vec<SegmentInfo> = st.segments[..st.segments.len() - 1]
                .iter()
                .map(|s| SegmentInfo {
                    size: s.size,
                    max_timestamp: s.max_timestamp,
                    next_offset: s.next_offset,
                })
                .collect();
            retention::segments_to_delete(
                &closed,
                st.active().size,
                st.committed,
                c.retention_ms,
                c.retention_bytes,
                now,
            )
        };
        self.delete_front(n).await
    }

    async fn delete_front(&self, n: usize) -> Result<usize, LogError> {
        if n == 0 {
            return Ok(0);
        }
        let _permit = self
            .inner
            .append_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LogError::Closed)?;
        let mut deleted = 0;
        for _ in 0..n {
            // Readers holding the file keep reading; the name goes now.
            let seg = {
                let mut st = self.inner.state.borrow_mut();
                if st.segments.len() < 2 {
                    break;
                }
                st.stats.segments_deleted += 1;
                st.segments.remove(0)
            };
            tracing::info!(segment = %seg.path.display(), next_offset = seg.next_offset.0, "retention deletes segment");
            remove_segment_files(&seg.path).await?;
            deleted += 1;
        }
        sync_dir(&self.inner.dir).await?;
        Ok(deleted)
    }

    /// Flushes and fsyncs everything appended, then refuses further appends.
    pub async fn close(&self) -> Result<(), LogError> {
        let r = self.flush().await;
        let mut guard = self.inner.state.borrow_mut();
        let st = &mut *guard;
        st.closed = true;
        for (_, tx) in st
            .written_waiters
            .drain(..)
            .chain(st.durable_waiters.drain(..))
        {
            let _ = tx.send(Err(LogError::Closed));
        }
        drop(guard);
        for t in self.inner.tasks.borrow().iter() {
            t.cancel();
        }
        r
    }

    /// Test hook: the next write or fsync fails as a failing disk would.
    #[doc(hidden)]
    pub fn inject_io_failure(&self) {
        self.inner.fail_next_io.set(true);
    }
}

#[derive(Clone, Copy)]
enum Wait {
    Written,
    Durable,
}

impl Inner {
    fn injected(&self, op: &'static str, path: &Path) -> Result<(), LogError> {
        if self.fail_next_io.replace(false) {
            return Err(LogError::io(op, path, "injected failure"));
        }
        Ok(())
    }

    async fn fsync(&self, file: &glommio::io::DmaFile, path: &Path) -> Result<(), LogError> {
        self.injected("syncing", path)?;
        file.fdatasync()
            .await
            .map_err(|e| LogError::io("syncing", path, e))?;
        self.state.borrow_mut().stats.fsyncs += 1;
        Ok(())
    }

    /// After a failed write or fsync nothing can be assumed about what reached the disk: the
    /// log refuses every later append, and everyone waiting is told.
    fn poison(&self, e: &LogError) {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        if st.poisoned.is_none() {
            tracing::error!(dir = %self.dir.display(), error = %e, "partition log poisoned");
            st.poisoned = Some(e.to_string());
        }
        let msg = st.poisoned.clone().unwrap();
        for (_, tx) in st
            .written_waiters
            .drain(..)
            .chain(st.durable_waiters.drain(..))
        {
            let _ = tx.send(Err(LogError::Poisoned(msg.clone())));
        }
    }

    /// One group-commit round: everything staged goes out in one write (and, under `always`,
    /// one fdatasync). Returns whether there was anything to do.
    async fn flush_round(&self) -> Result<bool, LogError> {
        let _io = self
            .io_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LogError::Closed)?;
        let (file, path, tail, staged, pos, new_size, end) = {
            let mut st = self.state.borrow_mut();
            if st.staged.is_empty() || st.poisoned.is_some() {
                return Ok(false);
            }
            let a = st.active();
            let (file, path) = (a.file.clone(), a.path.clone());
            let pos = file.align_down(a.written_size);
            let new_size = a.written_size + st.staged.len() as u64;
            let tail = std::mem::take(&mut st.tail);
            let staged = std::mem::take(&mut st.staged);
            // The new partial last block, which the next round rewrites.
            let keep = (new_size - file.align_down(new_size)) as usize;
            st.tail = if keep <= staged.len() {
                staged[staged.len() - keep..].to_vec()
            } else {
                let from_tail = keep - staged.len();
                let mut t = tail[tail.len() - from_tail..].to_vec();
                t.extend_from_slice(&staged);
                t
            };
            (file, path, tail, staged, pos, new_size, st.next)
        };
        self.injected("writing", &path)?;
        write_all_at(&file, &path, &[&tail, &staged], pos).await?;
        {
            // Hand the buffer back so its capacity is reused by later appends.
            let mut st = self.state.borrow_mut();
            if st.staged.is_empty() {
                let mut staged = staged;
                staged.clear();
                st.staged = staged;
            }
        }
        {
            let mut st = self.state.borrow_mut();
            st.active_mut().written_size = new_size;
            st.written = end;
            st.stats.writes += 1;
            st.wake();
        }
        if self.config.fsync == FsyncPolicy::Always {
            self.fsync(&file, &path).await?;
            let mut st = self.state.borrow_mut();
            st.durable = st.durable.max(end);
            st.wake();
        }
        Ok(true)
    }

    /// fdatasync of everything written so far (the `interval` policy's timer, and `flush`).
    async fn sync_now(&self) -> Result<(), LogError> {
        let _io = self
            .io_lock
            .acquire_permit(1)
            .await
            .map_err(|_| LogError::Closed)?;
        let (file, path, target) = {
            let st = self.state.borrow();
            if st.durable >= st.written || st.poisoned.is_some() {
                return Ok(());
            }
            let a = st.active();
            (a.file.clone(), a.path.clone(), st.written)
        };
        let r = self.fsync(&file, &path).await;
        if let Err(e) = &r {
            self.poison(e);
            return r;
        }
        let mut st = self.state.borrow_mut();
        st.durable = st.durable.max(target);
        st.wake();
        Ok(())
    }
}

async fn flush_loop(weak: Weak<Inner>, rx: local_channel::LocalReceiver<()>) {
    while rx.recv().await.is_some() {
        let Some(inner) = weak.upgrade() else { return };
        loop {
            match inner.flush_round().await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    inner.poison(&e);
                    break;
                }
            }
        }
    }
}

async fn sync_loop(weak: Weak<Inner>, every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let _ = inner.sync_now().await;
    }
}

async fn retention_loop(weak: Weak<Inner>, every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let log = Log { inner };
        if let Err(e) = log.enforce_retention(TimestampMs::now()).await {
            tracing::warn!(dir = %log.dir().display(), error = %e, "retention failed");
        }
    }
}

async fn remove_segment_files(log_path: &Path) -> Result<(), LogError> {
    remove_if_exists(&log_path.with_extension("index")).await?;
    remove_if_exists(&log_path.with_extension("timeindex")).await?;
    remove_if_exists(log_path).await
}

/// Creates an empty segment file and makes its name durable.
async fn create_segment(dir: &Path, base: Offset, config: &LogConfig) -> Result<Segment, LogError> {
    let path: Rc<Path> = dir.join(segment::file_name(base, "log")).into();
    let file = Rc::new(open_rw(&path).await?);
    sync_dir(dir).await?;
    Ok(Segment {
        base,
        file,
        path,
        written_size: 0,
        size: 0,
        next_offset: base,
        first_timestamp: None,
        max_timestamp: TimestampMs(i64::MIN),
        index: SparseIndex::new(config.index_interval_bytes),
        sealed: false,
    })
}

/// Opens a sealed segment from its index files, or rebuilds them by scanning. A sealed segment
/// holds only whole, fsync'd batches, so damage in it is reported, not cut away.
async fn open_sealed(dir: &Path, base: Offset, config: &LogConfig) -> Result<Segment, LogError> {
    let path: Rc<Path> = dir.join(segment::file_name(base, "log")).into();
    let file = Rc::new(open_rw(&path).await?);
    let len = file
        .file_size()
        .await
        .map_err(|e| LogError::io("sizing", &path, e))?;
    let ipath = path.with_extension("index");
    let tpath = path.with_extension("timeindex");
    if let (Some(of), Some(tf)) = (
        read_small_file(&ipath).await?,
        read_small_file(&tpath).await?,
    ) {
        if let Some((index, summary)) =
            SparseIndex::decode_files(&of, &tf, config.index_interval_bytes, base, len)
        {
            if summary.size == len {
                return Ok(Segment {
                    base,
                    file,
                    path,
                    written_size: len,
                    size: len,
                    next_offset: summary.next_offset,
                    first_timestamp: None,
                    max_timestamp: summary.max_timestamp,
                    index,
                    sealed: true,
                });
            }
        }
    }
    tracing::warn!(segment = %path.display(), "index missing or damaged; rebuilding by scan");
    let scan = segment::scan(&file, &path, base, len, config.index_interval_bytes).await?;
    if let Some((position, reason)) = scan.stopped {
        return Err(LogError::Corrupt {
            path: path.display().to_string(),
            position,
            reason,
        });
    }
    let seg = segment::from_scan(base, file, path, scan, true);
    write_small_file(&ipath, &seg.index.encode_offset_file(&seg.summary())).await?;
    write_small_file(&tpath, &seg.index.encode_time_file()).await?;
    Ok(seg)
}

/// Recovers the active segment: keeps the longest valid prefix of batches, cuts the rest off
/// the file (a torn write, garbage, or zero padding), and makes the result durable.
async fn recover_active(dir: &Path, base: Offset, config: &LogConfig) -> Result<Segment, LogError> {
    let path: Rc<Path> = dir.join(segment::file_name(base, "log")).into();
    let file = Rc::new(open_rw(&path).await?);
    // Index files of the active segment are stale by definition (it was re-opened for writing
    // after a truncation, or a crash came between sealing it and creating the next one).
    remove_if_exists(&path.with_extension("index")).await?;
    remove_if_exists(&path.with_extension("timeindex")).await?;
    let len = file
        .file_size()
        .await
        .map_err(|e| LogError::io("sizing", &path, e))?;
    let scan = segment::scan(&file, &path, base, len, config.index_interval_bytes).await?;
    if scan.valid_size < len {
        let dropped = read_exact(
            &file,
            &path,
            scan.valid_size,
            (len - scan.valid_size) as usize,
        )
        .await?;
        let reason = scan.stopped.as_ref().map_or("", |(_, r)| r.as_str());
        if dropped.iter().any(|&b| b != 0) {
            tracing::warn!(
                segment = %path.display(),
                valid_bytes = scan.valid_size,
                dropped_bytes = len - scan.valid_size,
                next_offset = scan.next_offset.0,
                reason,
                "recovery dropped a torn or corrupt tail"
            );
        } else {
            tracing::debug!(segment = %path.display(), padding = len - scan.valid_size, "recovery cut zero padding");
        }
        file.truncate(scan.valid_size)
            .await
            .map_err(|e| LogError::io("truncating", &path, e))?;
    }
    // What is on disk now becomes the durable prefix.
    file.fdatasync()
        .await
        .map_err(|e| LogError::io("syncing", &path, e))?;
    sync_dir(dir).await?;
    Ok(segment::from_scan(base, file, path, scan, false))
}

/// Reads the bytes of the segment's last partial block, which the next write rewrites.
async fn load_tail(seg: &Segment) -> Result<Vec<u8>, LogError> {
    let start = seg.file.align_down(seg.written_size);
    let len = (seg.written_size - start) as usize;
    let b = read_exact(&seg.file, &seg.path, start, len).await?;
    if b.len() != len {
        return Err(LogError::io(
            "reading",
            &seg.path,
            "short read of the tail block",
        ));
    }
    Ok(b.to_vec())
}
