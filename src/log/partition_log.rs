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
use super::io::{read_exact, read_small_file, remove_if_exists, write_all_at, SeqReader, Step};
use super::retention::{self, SegmentInfo};
use super::segment::{self, Segment};
use super::stamps::{Stamp, Stamps};
use super::state_file::{sync_dir, StateFile};
use crate::types::{Offset, Term, TimestampMs};

mod flush;
use flush::{flush_loop, sync_loop};
mod read;
mod recovery;
mod trim;

pub use read::{ReadBatches, ReadBound};
pub use recovery::Repair;
use recovery::{create_segment, load_tail};
use trim::retention_loop;
pub use trim::RESET_MARKER;

/// The positions of a log, each an exclusive end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

/// How the base offset of an appended batch is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assign {
    /// The log assigns the next offsets and stamps this term.
    Next(Term),
    /// The log assigns the next offsets and stamps the batch as this Raft entry.
    Entry { term: Term, index: u64 },
    /// The batch already carries its offsets (a Raft follower); they must follow the log end.
    Keep,
}

/// Completes when a staged append is secured by the fsync policy (see [`Log::stage`]).
pub struct Secured(oneshot::Receiver<Result<(), LogError>>);

impl std::future::Future for Secured {
    type Output = Result<(), LogError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map_err(|_| LogError::Closed).and_then(|r| r))
    }
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

type Waiters = VecDeque<(Offset, oneshot::Sender<Result<(), LogError>>)>;

/// Completes every waiter whose end `reached` covers. Appends queue their waiters in offset
/// order, but other waits (a reader's, a commit's, a roll's) may queue an end past a later
/// append's: completing only from the front would leave those later waiters behind it, and a
/// roll waiting inside an append (holding the append lock) would then wait forever.
fn wake_reached(q: &mut Waiters, reached: Offset) {
    while q.front().is_some_and(|(o, _)| *o <= reached) {
        let (_, tx) = q.pop_front().expect("front exists");
        let _ = tx.send(Ok(()));
    }
    if q.iter().any(|(o, _)| *o <= reached) {
        let mut kept = VecDeque::with_capacity(q.len());
        for (o, tx) in q.drain(..) {
            if o <= reached {
                let _ = tx.send(Ok(()));
            } else {
                kept.push_back((o, tx));
            }
        }
        *q = kept;
    }
}

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
        wake_reached(&mut self.written_waiters, w);
        wake_reached(&mut self.durable_waiters, d);
    }

    /// Fails everyone waiting for an offset at or past `end`: a truncation removed what they
    /// wait for (left alone, a waiter past the new end would wait until the log grew back).
    fn fail_waiters_past(&mut self, end: Offset) {
        for q in [&mut self.written_waiters, &mut self.durable_waiters] {
            let mut kept = VecDeque::with_capacity(q.len());
            for (o, tx) in q.drain(..) {
                if o > end {
                    let _ = tx.send(Err(LogError::Truncated { end }));
                } else {
                    kept.push_back((o, tx));
                }
            }
            *q = kept;
        }
    }
    /// A receiver completed once every offset below `end` is written or durable.
    fn waiter(&mut self, end: Offset, what: Wait) -> oneshot::Receiver<Result<(), LogError>> {
        let (tx, rx) = oneshot::channel();
        match what {
            Wait::Written => self.written_waiters.push_back((end, tx)),
            Wait::Durable => self.durable_waiters.push_back((end, tx)),
        }
        rx
    }

    /// Fails everyone waiting (the log was poisoned or closed).
    fn fail_waiters(&mut self, e: &LogError) {
        for (_, tx) in self
            .written_waiters
            .drain(..)
            .chain(self.durable_waiters.drain(..))
        {
            let _ = tx.send(Err(e.clone()));
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
    /// Under `interval`: tells the fsync timer that unsynced data exists, so an idle log never
    /// wakes for it.
    sync_signal: Option<LocalSender<()>>,
    /// Background tasks (flusher, fsync timer, retention). They hold only a `Weak` to this, so
    /// they end by themselves once the log is dropped (even outside its executor); `close`
    /// cancels them at once.
    tasks: RefCell<Vec<JoinHandle<()>>>,
    /// Test hook: fail the next write or fsync as the disk would.
    fail_next_io: Cell<bool>,
    /// What a repairing open cut away.
    repaired: Option<Repair>,
    /// Opened by `open_repairing`.
    repairing: bool,
    /// The segment where a read last found bytes that are not a valid batch.
    damaged: RefCell<Option<Rc<Path>>>,
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
        Self::open_with(dir.as_ref(), config, false).await
    }

    /// [`Log::open`] for a replica whose peers hold the same log: a damaged sealed segment, or
    /// a missing one, does not fail the open; the log is cut at the first damage instead, and
    /// [`Log::repaired`] tells what was cut. The owner must not count on anything past the cut
    /// (see `raft::store`: such a replica does not vote until its peers have given it back).
    pub async fn open_repairing(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log, LogError> {
        Self::open_with(dir.as_ref(), config, true).await
    }

    /// Whether this log was opened by [`Log::open_repairing`] (its owner may cut it).
    pub fn repairing(&self) -> bool {
        self.inner.repairing
    }

    /// What [`Log::open_repairing`] cut away when it opened this log (or an earlier open did,
    /// and [`Log::repair_noted`] was not called since), if anything.
    pub fn repaired(&self) -> Option<Repair> {
        self.inner.repaired.clone()
    }

    /// The sealed segments, oldest first: base offset, the offset after them, and file.
    pub fn sealed_segments(&self) -> Vec<(Offset, Offset, Rc<Path>)> {
        let st = self.inner.state.borrow();
        st.segments
            .iter()
            .filter(|s| s.sealed)
            .map(|s| (s.base, s.next_offset, s.path.clone()))
            .collect()
    }

    /// The active segment's base offset and the stamps of its batches, in order.
    pub fn active_stamps(&self) -> (Offset, Vec<Stamp>) {
        let st = self.inner.state.borrow();
        let a = st.active();
        (a.base, a.stamps.to_vec())
    }

    /// The batch stamps of a sealed segment (from [`Log::sealed_segments`]), from its
    /// `.stamps` file: `None` when that is missing or damaged (read its batches instead).
    pub async fn sealed_stamps(
        path: &Path,
        base: Offset,
        next: Offset,
    ) -> Result<Option<Vec<Stamp>>, LogError> {
        segment::read_stamps(path, base, next).await
    }

    /// Whether a read found a damaged segment (see [`Log::damaged_segment`]); allocates nothing.
    pub fn has_damage(&self) -> bool {
        self.inner.damaged.borrow().is_some()
    }

    /// The segment file where a read found damage (it returned `LogError::Corrupt`), if one
    /// did since this log was opened. Its index files are trusted on open, so an owner that
    /// reopens the log to cut the damage removes them first ([`Log::distrust_index`]).
    pub fn damaged_segment(&self) -> Option<PathBuf> {
        self.inner
            .damaged
            .borrow()
            .as_deref()
            .map(Path::to_path_buf)
    }

    /// Removes the index files of segment file `log_path`, so the next open scans the segment
    /// (and finds any damage in it) instead of trusting them. For a closed log.
    pub async fn distrust_index(log_path: &Path) -> Result<(), LogError> {
        segment::remove_index_files(log_path).await
    }

    /// The owner has durably recorded what [`Log::repaired`] says: forget it.
    pub async fn repair_noted(&self) -> Result<(), LogError> {
        StateFile::new(&self.inner.dir, recovery::REPAIR_MARKER)
            .remove()
            .await
    }

    async fn open_with(dir: &Path, config: LogConfig, repair: bool) -> Result<Log, LogError> {
        config.validate()?;
        let dir = dir.to_path_buf();
        // Metadata calls at open only; they are quick and the log is not serving yet.
        std::fs::create_dir_all(&dir).map_err(|e| LogError::io("creating", &dir, e))?;
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
        if trim::finish_reset(&dir, &config).await? {
            bases.clear();
            for entry in std::fs::read_dir(&dir).map_err(|e| LogError::io("listing", &dir, e))? {
                let entry = entry.map_err(|e| LogError::io("listing", &dir, e))?;
                if let Some(base) = segment::parse_log_name(&entry.file_name().to_string_lossy()) {
                    bases.push(base);
                }
            }
        }
        bases.sort();
        let (mut segments, repaired) =
            recovery::open_segments(&dir, &bases, &config, repair).await?;
        if segments.is_empty() {
            segments.push(create_segment(&dir, Offset::ZERO, &config).await?);
        }
        let active = segments.last().unwrap();
        let tail = load_tail(active).await?;
        let end = active.next_offset;
        let start = segments[0].base;
        let (tx, rx) = local_channel::new_bounded(1);
        let (sync_tx, sync_rx) = match config.fsync {
            FsyncPolicy::Interval(_) => {
                let (t, r) = local_channel::new_bounded(1);
                (Some(t), Some(r))
            }
            FsyncPolicy::Always => (None, None),
        };
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
            sync_signal: sync_tx,
            tasks: RefCell::new(Vec::new()),
            fail_next_io: Cell::new(false),
            repaired,
            repairing: repair,
            damaged: RefCell::new(None),
        });
        let weak = Rc::downgrade(&inner);
        let mut tasks = vec![glommio::spawn_local(flush_loop(weak.clone(), rx)).detach()];
        if let (FsyncPolicy::Interval(every), Some(sync_rx)) = (config.fsync, sync_rx) {
            tasks.push(glommio::spawn_local(sync_loop(weak.clone(), every, sync_rx)).detach());
        }
        if config.retention_loop
            && (config.retention_ms.is_some() || config.retention_bytes.is_some())
        {
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
        let p = Positions {
            start: st.start(),
            committed: st.committed,
            durable: st.durable,
            written: st.written,
            next: st.next,
        };
        // The order of the positions (see the module notes): durable ≤ written ≤ next, and
        // committed ≤ what the fsync policy secured.
        debug_assert!(
            p.durable <= p.written && p.written <= p.next,
            "log positions out of order: {p:?}"
        );
        debug_assert!(
            p.committed
                <= match self.inner.config.fsync {
                    FsyncPolicy::Always => p.durable,
                    FsyncPolicy::Interval(_) => p.written,
                },
            "committed past what the fsync policy secured: {p:?}"
        );
        p
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
        let (appended, pending) = self.stage(batch, assign).await?;
        pending.await?;
        Ok(Appended {
            durable: self.inner.state.borrow().durable > appended.last,
            ..appended
        })
    }

    /// Places a batch at the log end (in order with every other append) and returns where it
    /// landed at once, with a future that completes when the fsync policy has secured it. A Raft
    /// follower stages many entries this way and reports them flushed after one fsync.
    pub async fn stage(
        &self,
        batch: &Batch,
        assign: Assign,
    ) -> Result<(Appended, Secured), LogError> {
        let inner = &self.inner;
        let (rx, appended) = {
            let _permit = lock(&inner.append_lock).await?;
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
                Assign::Next(_) | Assign::Entry { .. } => st.next,
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
            // What the batch says where it sits: stamped here, or already (a follower's).
            let (term, raft_index) = match assign {
                Assign::Next(term) => (term, 0),
                Assign::Entry { term, index } => (term, index),
                Assign::Keep => (meta.term, meta.raft_index),
            };
            if !matches!(assign, Assign::Keep) {
                batch::stamp(&mut st.staged[at..at + len], base, term, raft_index);
            }
            let term = term.0;
            st.active_mut().on_append(
                Stamp {
                    base,
                    term,
                    raft_index,
                },
                meta.record_count,
                len,
                meta.first_timestamp,
                meta.max_timestamp,
            );
            let end = base.plus(meta.record_count as u64);
            st.next = end;
            st.stats.appends += 1;
            let rx = st.waiter(
                end,
                match inner.config.fsync {
                    FsyncPolicy::Always => Wait::Durable,
                    FsyncPolicy::Interval(_) => Wait::Written,
                },
            );
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
        Ok((appended, Secured(rx)))
    }

    /// Waits until the fsync policy has secured everything below `end`, then moves the committed
    /// position there (never backwards). A Raft state machine applies this way: an entry can be
    /// committed by a quorum before this replica's own write of it has finished.
    pub async fn commit(&self, end: Offset) -> Result<(), LogError> {
        let what = match self.inner.config.fsync {
            FsyncPolicy::Always => Wait::Durable,
            FsyncPolicy::Interval(_) => Wait::Written,
        };
        self.wait_for(end, what).await?;
        if end > self.inner.state.borrow().committed {
            self.set_committed(end)?;
        }
        Ok(())
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
            // A closed log's flush task is gone: nothing would ever complete the wait.
            if st.closed {
                return Err(LogError::Closed);
            }
            st.waiter(end, what)
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

    /// Waits until every offset below `end` is written, so reads bounded by
    /// [`ReadBound::Written`] see it.
    pub async fn wait_written(&self, end: Offset) -> Result<(), LogError> {
        self.wait_for(end, Wait::Written).await
    }

    /// Waits until `offset` is durable (useful under the `interval` policy).
    pub async fn wait_durable(&self, offset: Offset) -> Result<(), LogError> {
        self.wait_for(offset.plus(1), Wait::Durable).await
    }

    /// Seals the active segment (if it holds anything) and starts a new one at the log end.
    pub async fn roll(&self) -> Result<(), LogError> {
        let _permit = lock(&self.inner.append_lock).await?;
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
        let _io = lock(&inner.io_lock).await?;
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
        let index_files = inner.state.borrow().active().index_files();
        segment::write_index_files(index_files).await?;
        let seg = create_segment(&inner.dir, next, &inner.config).await?;
        let mut st = inner.state.borrow_mut();
        let sealed = st.active_mut();
        sealed.sealed = true;
        sealed.stamps = Stamps::new(sealed.base);
        st.segments.push(seg);
        st.tail.clear();
        st.stats.rolls += 1;
        Ok(())
    }

    /// The end of what the fsync policy has secured: durable under `always`, written under
    /// `interval`. The committed position may not pass it.
    pub fn secured(&self) -> Offset {
        let st = self.inner.state.borrow();
        match self.inner.config.fsync {
            FsyncPolicy::Always => st.durable,
            FsyncPolicy::Interval(_) => st.written,
        }
    }

    /// Sets the committed position (an exclusive end). It only moves forward, and never past
    /// what the fsync policy has secured: durable under `always`, written under `interval`.
    pub fn set_committed(&self, end: Offset) -> Result<(), LogError> {
        let high = self.secured();
        let mut st = self.inner.state.borrow_mut();
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

    /// Flushes and fsyncs everything appended, then refuses further appends.
    pub async fn close(&self) -> Result<(), LogError> {
        let r = self.flush().await;
        {
            let mut st = self.inner.state.borrow_mut();
            st.closed = true;
            st.fail_waiters(&LogError::Closed);
        }
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

/// Takes one of the log's async locks; they close only when the log goes away.
async fn lock(sem: &Semaphore) -> Result<glommio::sync::Permit<'_>, LogError> {
    sem.acquire_permit(1).await.map_err(|_| LogError::Closed)
}
