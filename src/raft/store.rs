//! Raft storage on the partition log: the log *is* the Raft log.
//!
//! Every Raft entry is exactly one record batch, written once: a normal entry is the producer's
//! batch, a blank or membership entry is a one-record control batch. Appending stamps the
//! entry's term and Raft index into the batch header next to its offsets, so the log describes
//! itself: after a restart the index → offset map is rebuilt by reading headers, and nothing
//! else has to agree with the log.
//!
//! - `append` stages the batches in order and reports them flushed (`IOFlushed`) after the one
//!   write + fdatasync that covers them (group commit), or after the write under `interval`.
//! - A follower's divergent tail goes with `Log::truncate_from`, durable before it returns.
//! - The vote (and the purge point) live in a small durable state file beside the segments.
//! - Applying an entry moves the log's committed position (the high watermark) over it, once
//!   this replica's own write of it is secured; consumers read only below it.
//! - Snapshots: retention, not Raft, deletes old data, and groups run with snapshots off, so
//!   entries are never purged and a lagging follower is caught up from the log. Catching up a
//!   follower whose missing entries were already deleted by retention needs segment shipping,
//!   which is not built yet: installing a snapshot the local log does not already cover is
//!   refused with an error rather than leaving a hole.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::rc::Rc;

use bytes::Bytes;
use futures::StreamExt;
use openraft::entry::RaftEntry;
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine, Snapshot,
};
use openraft::{EntryPayload, OptionalSend};
use serde::{Deserialize, Serialize};

use super::producers::ProducerTable;
use super::types::{
    log_id, Entry, EntryBatch, EntryOffsets, LogId, Membership, NodeId, PartitionRaft,
    SnapshotMeta, StoredMembership, Vote,
};
use crate::log::{Assign, Batch, BatchBuilder, Log, LogError, ReadBound, Record, StateFile};
use crate::types::{Offset, Term, TimestampMs};

/// Keys of the control records that carry non-data entries.
const KEY_BLANK: &[u8] = b"raft/blank";
const KEY_MEMBERSHIP: &[u8] = b"raft/membership";
/// Bytes read from the log per read while serving entries.
const READ_CHUNK: usize = 1 << 20;
const STATE_FILE: &str = "raft.state";
/// The newest entries kept in memory, so applying and replicating them does not read them back
/// from disk: at most this many entries and bytes.
const TAIL_ENTRIES_MAX: usize = 4096;
const TAIL_BYTES_MAX: usize = 16 << 20;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Where each entry still in the log sits: `slots[i]` is entry `first + i`.
#[derive(Default, Debug)]
struct EntryMap {
    first: u64,
    slots: VecDeque<Slot>,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    base: Offset,
    term: u64,
}

impl EntryMap {
    fn next_index(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    fn get(&self, index: u64) -> Option<Slot> {
        let i = index.checked_sub(self.first)?;
        self.slots.get(usize::try_from(i).ok()?).copied()
    }

    /// The offset after entry `index`, given the log's end (this store is the log's only
    /// writer, so the last entry ends where the log does).
    fn end_of(&self, index: u64, log_end: Offset) -> Option<Offset> {
        self.get(index)?;
        Some(self.get(index + 1).map_or(log_end, |s| s.base))
    }

    fn last(&self) -> Option<LogId> {
        let s = self.slots.back()?;
        Some(log_id(s.term, self.next_index() - 1))
    }

    fn push(&mut self, index: u64, slot: Slot) -> Result<(), LogError> {
        if !self.slots.is_empty() && index != self.next_index() {
            return Err(LogError::Corrupt {
                path: String::new(),
                position: slot.base.0,
                reason: format!(
                    "raft entry {index} follows entry {} in the log",
                    self.next_index() - 1
                ),
            });
        }
        if self.slots.is_empty() {
            self.first = index;
        }
        self.slots.push_back(slot);
        Ok(())
    }

    /// Forgets entries at or after `index`.
    fn truncate(&mut self, index: u64) {
        if self.get(index).is_some() {
            let keep = (index - self.first) as usize;
            self.slots.truncate(keep);
        }
    }

    /// Forgets every entry: the next one is `index + 1`.
    fn restart_after(&mut self, index: u64) {
        self.slots.clear();
        self.first = index + 1;
    }

    /// Forgets entries up to and including `index`.
    fn purge(&mut self, index: u64) {
        while !self.slots.is_empty() && self.first <= index {
            self.slots.pop_front();
            self.first += 1;
        }
        if self.slots.is_empty() {
            self.first = self.first.max(index + 1);
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Durable {
    vote: Option<Vote>,
    purged: Option<LogId>,
    /// The log offset right after the purged entries: where a replica that restarted its log
    /// from a snapshot begins.
    #[serde(default)]
    purged_end: Option<u64>,
    /// Whether this replica may grant votes. A replica that joined its group by a move starts
    /// with an empty log and no memory of votes it may have cast as an earlier member; until it
    /// has applied a membership that made it a learner and then a voter, it must not help a
    /// candidate (a removed member still running with an old configuration that lists this node
    /// could otherwise win with its vote and commit a divergent history).
    #[serde(default = "yes")]
    may_vote: bool,
    #[serde(default)]
    learner_seen: bool,
}

fn yes() -> bool {
    true
}

impl Default for Durable {
    fn default() -> Self {
        Durable {
            vote: None,
            purged: None,
            purged_end: None,
            may_vote: true,
            learner_seen: false,
        }
    }
}

struct Shared {
    log: Log,
    state_file: StateFile,
    durable: RefCell<Durable>,
    map: RefCell<EntryMap>,
    tail: RefCell<Tail>,
    /// The entry retention asked to purge up to: the next snapshot is taken there (not at the
    /// last applied entry), so a follower restarted from it misses only what retention deletes.
    retain_upto: Cell<Option<LogId>>,
    /// This replica's node id, once its owner said (see `Durable::may_vote`).
    me: Cell<Option<NodeId>>,
    /// Idempotent producers' last committed batches, built by applying entries.
    producers: RefCell<ProducerTable>,
}

impl Shared {
    /// Notes a membership this replica applied (`from_snapshot`: installed with a snapshot,
    /// which leaves its log at least as recent as the configuration that added it, so being a
    /// voter there is enough); persists a change of `may_vote`.
    async fn saw_membership(&self, m: &Membership, from_snapshot: bool) -> io::Result<()> {
        let Some(me) = self.me.get() else {
            return Ok(());
        };
        let changed = {
            let mut d = self.durable.borrow_mut();
            if d.may_vote {
                return Ok(());
            }
            let before = (d.learner_seen, d.may_vote);
            if from_snapshot || m.learner_ids().any(|id| id == me) {
                d.learner_seen = true;
            }
            if d.learner_seen && m.voter_ids().any(|id| id == me) {
                d.may_vote = true;
            }
            before != (d.learner_seen, d.may_vote)
        };
        if changed {
            self.save().await?;
        }
        Ok(())
    }
}

/// The owner's handle on a partition's Raft storage (retention).
#[derive(Clone)]
pub struct StoreHandle(Rc<Shared>);

impl StoreHandle {
    /// The last entry that ends at or before `offset`, if any is still in the log.
    pub fn last_entry_before(&self, offset: Offset) -> Option<LogId> {
        let map = self.0.map.borrow();
        let log_end = self.0.log.positions().next;
        let mut found = None;
        // Entries are few per segment compared with records: walk from the front.
        for i in map.first..map.next_index() {
            match map.end_of(i, log_end) {
                Some(end) if end <= offset => {
                    found = map.get(i).map(|s| log_id(s.term, i));
                }
                _ => break,
            }
        }
        found
    }

    /// Takes the next snapshot at `upto` (see `Shared::retain_upto`).
    pub fn snapshot_at(&self, upto: LogId) {
        self.0.retain_upto.set(Some(upto));
    }

    /// Tells the storage which node it belongs to; `joining`: the replica was opened to join
    /// its group by a move. A joining replica with nothing stored yet does not vote until it
    /// has been a learner and then a voter (see `Durable::may_vote`); one with state keeps
    /// what it stored.
    pub async fn set_member(&self, me: NodeId, joining: bool) -> io::Result<()> {
        self.0.me.set(Some(me));
        let fresh = {
            let d = self.0.durable.borrow();
            let map = self.0.map.borrow();
            d.vote.is_none() && d.purged.is_none() && map.slots.is_empty() && !d.learner_seen
        };
        if joining && fresh {
            {
                let mut d = self.0.durable.borrow_mut();
                d.may_vote = false;
                d.learner_seen = false;
            }
            self.0.save().await?;
        }
        Ok(())
    }

    /// The idempotent producers' committed batches (see `raft::producers`).
    pub fn producers(&self) -> std::cell::Ref<'_, ProducerTable> {
        self.0.producers.borrow()
    }

    /// Whether this replica may grant votes (see `Durable::may_vote`).
    pub fn may_vote(&self) -> bool {
        self.0.durable.borrow().may_vote
    }
}

/// The newest entries exactly as stored (stamped), `entries[i]` being entry `first + i`.
#[derive(Default)]
struct Tail {
    first: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
}

fn entry_bytes(e: &Entry) -> usize {
    match &e.payload {
        EntryPayload::Normal(EntryBatch(b)) => b.len(),
        _ => 64,
    }
}

impl Tail {
    fn push(&mut self, e: Entry) {
        if self.entries.is_empty() || e.log_id.index != self.first + self.entries.len() as u64 {
            self.entries.clear();
            self.bytes = 0;
            self.first = e.log_id.index;
        }
        self.bytes += entry_bytes(&e);
        self.entries.push_back(e);
        while self.entries.len() > TAIL_ENTRIES_MAX
            || (self.bytes > TAIL_BYTES_MAX && self.entries.len() > 1)
        {
            let old = self.entries.pop_front().expect("not empty");
            self.bytes -= entry_bytes(&old);
            self.first += 1;
        }
    }

    /// Entries `[start, end)` if all are here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let from = usize::try_from(start.checked_sub(self.first)?).ok()?;
        let to = usize::try_from(end.checked_sub(self.first)?).ok()?;
        (to <= self.entries.len()).then(|| self.entries.range(from..to).cloned().collect())
    }

    /// Forgets entries at or after `index`.
    fn truncate(&mut self, index: u64) {
        while self.first + self.entries.len() as u64 > index {
            match self.entries.pop_back() {
                Some(e) => self.bytes -= entry_bytes(&e),
                None => break,
            }
        }
    }
}

impl Shared {
    async fn save(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec(&*self.durable.borrow()).map_err(io_err)?;
        self.state_file.write(&bytes).await.map_err(io_err)
    }

    /// Reads entries `[start, end)`, which must all be in the map.
    async fn entries(&self, start: u64, end: u64) -> io::Result<Vec<Entry>> {
        if let Some(hit) = self.tail.borrow().get(start, end) {
            return Ok(hit);
        }
        let (mut at, stop) = {
            let map = self.map.borrow();
            match (
                map.get(start),
                map.end_of(end - 1, self.log.positions().next),
            ) {
                (Some(s), Some(e)) => (s.base, e),
                _ => {
                    return Err(io_err(format!(
                        "raft entries [{start}, {end}) are not in the log (it holds [{}, {}))",
                        map.first,
                        map.next_index()
                    )))
                }
            }
        };
        // A leader ships entries it has just staged: wait until they are readable.
        self.log.wait_written(stop).await.map_err(io_err)?;
        let mut out = Vec::with_capacity((end - start) as usize);
        while at < stop {
            let read = self
                .log
                .read(at, READ_CHUNK, ReadBound::Written)
                .await
                .map_err(io_err)?;
            if read.batches.is_empty() {
                return Err(io_err(format!("log ended at {at} before {stop}")));
            }
            for b in &read.batches {
                if b.base_offset() >= stop {
                    break;
                }
                let e = decode_entry(b)?;
                let want = start + out.len() as u64;
                if e.log_id.index != want {
                    return Err(io_err(format!(
                        "batch at offset {} is raft entry {}, expected {want}",
                        b.base_offset(),
                        e.log_id.index
                    )));
                }
                out.push(e);
            }
            at = read.next_offset();
        }
        Ok(out)
    }
}

/// Turns a stored batch back into the Raft entry it is.
fn decode_entry(b: &Batch) -> io::Result<Entry> {
    let meta = b.meta();
    let id = log_id(meta.term.0, meta.raft_index);
    if !meta.control {
        return Ok(Entry::new(id, EntryPayload::Normal(EntryBatch(b.clone()))));
    }
    let rec = b
        .records()
        .next()
        .ok_or_else(|| io_err("empty control batch"))?;
    match rec.key {
        Some(KEY_BLANK) => Ok(Entry::new(id, EntryPayload::Blank)),
        Some(KEY_MEMBERSHIP) => {
            let m = serde_json::from_slice(rec.value).map_err(io_err)?;
            Ok(Entry::new(id, EntryPayload::Membership(m)))
        }
        _ => Err(io_err(format!(
            "control batch at offset {} is no raft entry",
            meta.base_offset
        ))),
    }
}

/// The batch that stores an entry.
fn encode_entry(e: &Entry) -> io::Result<Batch> {
    let (key, value) = match &e.payload {
        EntryPayload::Normal(EntryBatch(b)) => {
            if b.meta().control {
                return Err(io_err("a data entry may not be a control batch"));
            }
            return Ok(b.clone());
        }
        EntryPayload::Blank => (KEY_BLANK, Vec::new()),
        EntryPayload::Membership(m) => (KEY_MEMBERSHIP, serde_json::to_vec(m).map_err(io_err)?),
    };
    let mut builder = BatchBuilder::new(crate::log::batch::HEADER_LEN + 64 + value.len()).control();
    builder
        .push(&Record {
            key: Some(Bytes::from_static(key)),
            value: Bytes::from(value),
            headers: Vec::new(),
            timestamp: TimestampMs::now(),
            ttl_ms: None,
        })
        .map_err(io_err)?;
    builder.finish().map_err(io_err)
}

/// Called after the committed position of the log moved.
pub type OnCommit = Rc<dyn Fn()>;

/// Opens the Raft storage of the partition log in `dir`: the log store and the state machine,
/// both views of the same log.
pub async fn open(log: Log, dir: &Path) -> io::Result<(LogStore, StateMachine)> {
    open_with(log, dir, Rc::new(|| {})).await
}

/// [`open`], calling `on_commit` whenever applying entries moved the committed position.
pub async fn open_with(
    log: Log,
    dir: &Path,
    on_commit: OnCommit,
) -> io::Result<(LogStore, StateMachine)> {
    open_with_handle(log, dir, on_commit)
        .await
        .map(|(ls, sm, _)| (ls, sm))
}

/// [`open_with`], also returning the owner's handle on the storage.
pub async fn open_with_handle(
    log: Log,
    dir: &Path,
    on_commit: OnCommit,
) -> io::Result<(LogStore, StateMachine, StoreHandle)> {
    let state_file = StateFile::new(dir, STATE_FILE);
    state_file.clean().await.map_err(io_err)?;
    let durable: Durable = match state_file.read().await.map_err(io_err)? {
        Some(bytes) => serde_json::from_slice(&bytes).map_err(io_err)?,
        None => Durable::default(),
    };
    let mut map = EntryMap::default();
    let purged = durable.purged.map(|p| p.index);
    if let Some(p) = purged {
        map.purge(p);
    }
    let pos = log.positions();
    let mut at = pos.start;
    while at < pos.next {
        let read = log
            .read(at, READ_CHUNK, ReadBound::Written)
            .await
            .map_err(io_err)?;
        if read.batches.is_empty() {
            break;
        }
        for b in &read.batches {
            let m = b.meta();
            if purged.is_some_and(|p| m.raft_index <= p) {
                continue;
            }
            map.push(
                m.raft_index,
                Slot {
                    base: m.base_offset,
                    term: m.term.0,
                },
            )
            .map_err(io_err)?;
        }
        at = read.next_offset();
    }
    // A crash between saving a snapshot's purge point and restarting the log from it: redo.
    if let Some(end) = durable.purged_end.map(Offset) {
        if log.positions().next < end {
            log.reset_to(end).await.map_err(io_err)?;
        }
    }
    let shared = Rc::new(Shared {
        log,
        state_file,
        durable: RefCell::new(durable),
        map: RefCell::new(map),
        tail: RefCell::default(),
        retain_upto: Cell::new(None),
        me: Cell::new(None),
        producers: RefCell::default(),
    });
    let purged = shared.durable.borrow().purged;
    Ok((
        LogStore {
            shared: shared.clone(),
        },
        StateMachine {
            shared: shared.clone(),
            applied: purged,
            membership: StoredMembership::default(),
            snapshot: None,
            on_commit,
        },
        StoreHandle(shared),
    ))
}

/// The Raft log storage (and reader) of one partition.
#[derive(Clone)]
pub struct LogStore {
    shared: Rc<Shared>,
}

impl LogStore {
    pub fn log(&self) -> &Log {
        &self.shared.log
    }
}

impl RaftLogReader<PartitionRaft> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (first, next) = {
            let map = self.shared.map.borrow();
            (map.first, map.next_index())
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => first,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => next,
        }
        .min(next);
        if start >= end {
            return Ok(Vec::new());
        }
        self.shared.entries(start, end).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.shared.durable.borrow().vote)
    }
}

impl RaftLogStorage<PartitionRaft> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionRaft>, io::Error> {
        let purged = self.shared.durable.borrow().purged;
        let last = self.shared.map.borrow().last().or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.shared.durable.borrow_mut().vote = Some(*vote);
        self.shared.save().await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<PartitionRaft>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut last = None;
        for e in entries {
            {
                let map = self.shared.map.borrow();
                let purged = self.shared.durable.borrow().purged;
                let expected = if !map.slots.is_empty() {
                    Some(map.next_index())
                } else {
                    purged.map(|p| p.index + 1)
                };
                if expected.is_some_and(|x| x != e.log_id.index) {
                    return Err(io_err(format!(
                        "raft entry {} appended where {} belongs",
                        e.log_id.index,
                        expected.unwrap_or_default()
                    )));
                }
            }
            // Stamp a copy here (this store is the log's only writer, so its end is where the
            // entry goes): the copy kept in the tail is then byte for byte what is stored.
            let term = e.log_id.leader_id.term;
            let base = self.shared.log.positions().next;
            let batch = encode_entry(&e)?.stamped_entry(base, Term(term), e.log_id.index);
            let (appended, secured) = self
                .shared
                .log
                .stage(&batch, Assign::Keep)
                .await
                .map_err(io_err)?;
            self.shared
                .map
                .borrow_mut()
                .push(
                    e.log_id.index,
                    Slot {
                        base: appended.base,
                        term: e.log_id.leader_id.term,
                    },
                )
                .map_err(io_err)?;
            let stored = match e.payload {
                EntryPayload::Normal(_) => {
                    Entry::new(e.log_id, EntryPayload::Normal(EntryBatch(batch)))
                }
                payload => Entry::new(e.log_id, payload),
            };
            self.shared.tail.borrow_mut().push(stored);
            last = Some(secured);
        }
        match last {
            None => callback.io_completed(Ok(())),
            // The log writes in order: once the last entry is secured, all of them are.
            Some(secured) => {
                glommio::spawn_local(async move {
                    callback.io_completed(secured.await.map_err(io_err));
                })
                .detach();
            }
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let (from, at) = {
            let map = self.shared.map.borrow();
            let from = last_log_id.map_or(map.first, |l| l.index + 1);
            match map.get(from) {
                Some(s) => (from, s.base),
                None => return Ok(()),
            }
        };
        self.shared.log.truncate_from(at).await.map_err(io_err)?;
        self.shared.map.borrow_mut().truncate(from);
        self.shared.tail.borrow_mut().truncate(from);
        Ok(())
    }

    /// Forgets entries up to `log_id` (openraft purges only what a snapshot covers and no
    /// replication still reads), then deletes the log's segments that hold nothing else.
    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let end = {
            let map = self.shared.map.borrow();
            map.end_of(log_id.index, self.shared.log.positions().next)
        };
        {
            let mut d = self.shared.durable.borrow_mut();
            if d.purged.is_some_and(|p| p.index >= log_id.index) {
                return Ok(());
            }
            d.purged = Some(log_id);
            if let Some(end) = end {
                d.purged_end = Some(end.0);
            }
        }
        self.shared.save().await?;
        self.shared.map.borrow_mut().purge(log_id.index);
        if let Some(end) = end {
            let deleted = self.shared.log.delete_before(end).await.map_err(io_err)?;
            tracing::debug!(upto = %log_id, deleted, "purged raft entries and their segments");
        }
        Ok(())
    }
}

/// The state machine of a partition: the log itself. Applying an entry commits its records.
pub struct StateMachine {
    shared: Rc<Shared>,
    applied: Option<LogId>,
    membership: StoredMembership,
    /// The last snapshot built or installed, and the log offset it covers.
    snapshot: Option<(SnapshotMeta, Offset)>,
    on_commit: OnCommit,
}

/// What a snapshot of a partition carries: the log offset it covers. The records themselves
/// stay in the log (see the module notes on segment shipping).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogSnapshot {
    pub end: Offset,
}

pub struct SnapshotBuilder {
    meta: SnapshotMeta,
    end: Offset,
}

impl RaftSnapshotBuilder<PartitionRaft> for SnapshotBuilder {
    type SnapshotData = LogSnapshot;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::alias::SnapshotOf<PartitionRaft, LogSnapshot>, io::Error> {
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: LogSnapshot { end: self.end },
        })
    }
}

impl RaftStateMachine<PartitionRaft> for StateMachine {
    type SnapshotData = LogSnapshot;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: futures::Stream<Item = Result<EntryResponder<PartitionRaft>, io::Error>>
            + Unpin
            + OptionalSend,
    {
        let mut commit_to = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let id = entry.log_id;
            let offsets = {
                let map = self.shared.map.borrow();
                map.get(id.index)
                    .filter(|s| s.term == id.leader_id.term)
                    .zip(map.end_of(id.index, self.shared.log.positions().next))
                    .map(|(s, end)| EntryOffsets {
                        base: s.base.0,
                        end: end.0,
                    })
            };
            if let Some(o) = offsets {
                commit_to = Some(Offset(o.end));
                if let EntryPayload::Normal(EntryBatch(b)) = &entry.payload {
                    let m = b.meta();
                    self.shared.producers.borrow_mut().applied(
                        m.producer_id,
                        m.base_sequence,
                        m.record_count,
                        Offset(o.base),
                        id.index,
                    );
                }
            }
            if let Some(m) = entry.get_membership() {
                self.shared.saw_membership(&m, false).await?;
                self.membership = StoredMembership::new(Some(id), m);
            }
            self.applied = Some(id);
            if let Some(r) = responder {
                r.send(offsets.unwrap_or_default());
            }
        }
        if let Some(end) = commit_to {
            if end > self.shared.log.positions().committed {
                self.shared.log.commit(end).await.map_err(io_err)?;
                (self.on_commit)();
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // At the point retention asked for, when it is applied here and no membership change
        // came after it (the snapshot must carry the membership of its point); else at the last
        // applied entry.
        let point = self.shared.retain_upto.take().and_then(|upto| {
            let membership_at = self.membership.log_id().map_or(0, |l| l.index);
            let upto = if membership_at > upto.index {
                (*self.membership.log_id())?
            } else {
                upto
            };
            (Some(upto) <= self.applied).then_some(upto)
        });
        let at = point.or(self.applied);
        let end = at
            .and_then(|id| {
                let log_end = self.shared.log.positions().next;
                self.shared.map.borrow().end_of(id.index, log_end)
            })
            .unwrap_or(self.shared.log.positions().committed);
        let meta = SnapshotMeta {
            last_log_id: at,
            last_membership: self.membership.clone(),
        };
        self.snapshot = Some((meta.clone(), end));
        SnapshotBuilder { meta, end }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: LogSnapshot,
    ) -> Result<(), io::Error> {
        let next = self.shared.log.positions().next;
        let held = meta
            .last_log_id
            .map(|id| (id, self.shared.map.borrow().get(id.index)));
        let covered = match held {
            // This replica's log holds the snapshot's last entry: it keeps its log.
            Some((id, Some(slot))) => slot.term == id.leader_id.term && snapshot.end <= next,
            Some((_, None)) => false,
            None => true,
        };
        if !covered {
            // Behind the snapshot (the leader's retention deleted what this replica misses),
            // or diverged from it: the log starts over, empty, where the snapshot ends.
            let id = meta.last_log_id.expect("checked above");
            tracing::info!(upto = %id, offset = snapshot.end.0, "restarting this replica's log from a snapshot");
            {
                let mut d = self.shared.durable.borrow_mut();
                d.purged = Some(id);
                d.purged_end = Some(snapshot.end.0);
            }
            self.shared.save().await?;
            self.shared.map.borrow_mut().restart_after(id.index);
            self.shared.tail.borrow_mut().truncate(0);
            self.shared
                .log
                .reset_to(snapshot.end)
                .await
                .map_err(io_err)?;
            (self.on_commit)();
        }
        self.shared
            .saw_membership(meta.last_membership.membership(), true)
            .await?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.snapshot = Some((meta.clone(), snapshot.end));
        if snapshot.end > self.shared.log.positions().committed {
            self.shared.log.commit(snapshot.end).await.map_err(io_err)?;
            (self.on_commit)();
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::alias::SnapshotOf<PartitionRaft, LogSnapshot>>, io::Error> {
        let Some((meta, end)) = self.snapshot.clone() else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: LogSnapshot { end },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogConfig;
    use crate::raft::GlommioRuntime;
    use openraft::testing::log::{StoreBuilder, Suite};
    use openraft_rt::{AsyncRuntime, Oneshot};

    struct Builder;

    impl StoreBuilder<PartitionRaft, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(
            &self,
        ) -> Result<
            (tempfile::TempDir, LogStore, StateMachine),
            openraft::StorageError<PartitionRaft>,
        > {
            let dir = tempfile::tempdir().unwrap();
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (ls, sm) = open(log, dir.path()).await.unwrap();
            Ok((dir, ls, sm))
        }
    }

    /// A snapshot that ends past this replica's log (the leader's retention deleted what it
    /// misses) restarts the log, empty, at the snapshot's end, and that survives reopening; a
    /// restart cut short after its purge point was saved is redone when the store opens.
    #[test]
    fn a_snapshot_past_the_log_restarts_it_there_and_a_cut_restart_is_redone() {
        GlommioRuntime::run(async {
            let dir = tempfile::tempdir().unwrap();
            let membership = openraft::Membership::new_with_defaults(vec![[1u64].into()], [1u64]);
            let positions = |log: &Log| {
                let p = log.positions();
                (p.start.0, p.next.0, p.committed.0)
            };
            {
                let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
                let (mut ls, mut sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                    .await
                    .unwrap();
                let entries = vec![
                    Entry::new(log_id(1, 0), EntryPayload::Membership(membership.clone())),
                    data_entry(1, 1, &["a", "b"]),
                ];
                let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
                ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
                orx.await.unwrap().unwrap();
                let meta = SnapshotMeta {
                    last_log_id: Some(log_id(4, 50)),
                    last_membership: StoredMembership::new(Some(log_id(1, 0)), membership.clone()),
                };
                sm.install_snapshot(&meta, LogSnapshot { end: Offset(700) })
                    .await
                    .unwrap();
                assert_eq!(positions(&log), (700, 700, 700));
                let state = ls.get_log_state().await.unwrap();
                assert_eq!(state.last_purged_log_id, Some(log_id(4, 50)));
                assert_eq!(state.last_log_id, Some(log_id(4, 50)));
                assert!(ls.try_get_log_entries(0..60).await.unwrap().is_empty());
                // A restart cut short: the next purge point is saved, the log not restarted.
                {
                    let mut d = h.0.durable.borrow_mut();
                    d.purged = Some(log_id(4, 80));
                    d.purged_end = Some(900);
                }
                h.0.save().await.unwrap();
                log.close().await.unwrap();
            }
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, _sm) = open(log.clone(), dir.path()).await.unwrap();
            assert_eq!(positions(&log), (900, 900, 900));
            let state = ls.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(4, 80)));
            log.close().await.unwrap();
        });
    }

    /// A replica that joins its group by a move does not vote until it has applied a
    /// membership making it a learner and then one making it a voter; the permission survives
    /// reopening; a replica created with its group votes from the start; so does a joining one
    /// that already holds state (a restart).
    #[test]
    fn a_joining_replica_votes_only_after_being_a_learner_then_a_voter() {
        GlommioRuntime::run(async {
            let dir = tempfile::tempdir().unwrap();
            let m = |voters: &[u64], all: &[u64]| -> Membership {
                openraft::Membership::new_with_defaults(
                    vec![voters.iter().copied().collect()],
                    all.iter().copied(),
                )
            };
            {
                let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
                let (_ls, _sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                    .await
                    .unwrap();
                h.set_member(3, true).await.unwrap();
                assert!(!h.may_vote());
                // An old configuration listing node 3 as a voter (its earlier membership).
                h.0.saw_membership(&m(&[1, 2, 3], &[1, 2, 3]), false)
                    .await
                    .unwrap();
                assert!(!h.may_vote(), "an old configuration let it vote");
                h.0.saw_membership(&m(&[1, 2, 4], &[1, 2, 3, 4]), false)
                    .await
                    .unwrap();
                assert!(!h.may_vote());
                h.0.saw_membership(&m(&[1, 2, 3], &[1, 2, 3]), false)
                    .await
                    .unwrap();
                assert!(h.may_vote(), "learner then voter");
                log.close().await.unwrap();
            }
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (_ls, _sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            h.set_member(3, true).await.unwrap();
            assert!(h.may_vote(), "the permission was not kept");
            log.close().await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (_ls, _sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            h.set_member(1, false).await.unwrap();
            assert!(h.may_vote());
            log.close().await.unwrap();
        });
    }

    /// openraft's own storage conformance suite, run against the partition log.
    #[test]
    fn passes_openraft_storage_suite() {
        GlommioRuntime::run(async {
            Suite::test_all(Builder).await.unwrap();
        });
    }

    fn data_entry(term: u64, index: u64, values: &[&str]) -> Entry {
        let mut b = BatchBuilder::new(1 << 20);
        for v in values {
            b.push(&Record {
                key: None,
                value: Bytes::copy_from_slice(v.as_bytes()),
                headers: Vec::new(),
                timestamp: TimestampMs(1_000),
                ttl_ms: None,
            })
            .unwrap();
        }
        Entry::new(
            log_id(term, index),
            EntryPayload::Normal(EntryBatch(b.finish().unwrap())),
        )
    }

    /// Entries, their offsets, the vote, a truncation and a purge all survive reopening: the
    /// index → offset map is rebuilt from the batch headers alone.
    #[test]
    fn reopening_recovers_entries_vote_truncation_and_purge() {
        GlommioRuntime::run(async {
            let dir = tempfile::tempdir().unwrap();
            let members =
                std::collections::BTreeMap::from([(1u64, super::super::types::Member::default())]);
            {
                let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
                let (mut ls, mut sm) = open(log.clone(), dir.path()).await.unwrap();
                ls.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
                let entries = vec![
                    Entry::new(
                        log_id(1, 0),
                        EntryPayload::Membership(openraft::Membership::new_with_defaults(
                            vec![[1u64].into()],
                            members.keys().copied(),
                        )),
                    ),
                    Entry::new(log_id(2, 1), EntryPayload::Blank),
                    data_entry(2, 2, &["a", "b", "c"]),
                    data_entry(2, 3, &["d"]),
                    data_entry(2, 4, &["e", "f"]),
                ];
                let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
                ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
                orx.await.unwrap().unwrap();
                // Offsets: membership 0, blank 1, [2,5), [5,6), [6,8).
                let got = ls.try_get_log_entries(2..5).await.unwrap();
                let bases: Vec<u64> = got
                    .iter()
                    .map(|e| match &e.payload {
                        EntryPayload::Normal(EntryBatch(b)) => b.base_offset().0,
                        _ => panic!("not data"),
                    })
                    .collect();
                assert_eq!(bases, vec![2, 5, 6]);
                // Those came from the in-memory tail; a fresh view reads the same from disk.
                let (mut disk, _) = open(log.clone(), dir.path()).await.unwrap();
                assert_eq!(
                    disk.try_get_log_entries(0..5).await.unwrap(),
                    ls.try_get_log_entries(0..5).await.unwrap()
                );
                // Apply the first four: committed moves to 6.
                let applied = ls.try_get_log_entries(0..4).await.unwrap();
                sm.apply(futures::stream::iter(
                    applied.into_iter().map(|e| Ok((e, None))),
                ))
                .await
                .unwrap();
                assert_eq!(log.positions().committed, Offset(6));
                assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(2, 3)));
                // Drop the divergent last entry, purge the first.
                ls.truncate_after(Some(log_id(2, 3))).await.unwrap();
                ls.purge(log_id(1, 0)).await.unwrap();
                assert_eq!(log.positions().next, Offset(6));
                log.close().await.unwrap();
            }
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, _sm) = open(log, dir.path()).await.unwrap();
            let state = ls.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(1, 0)));
            assert_eq!(state.last_log_id, Some(log_id(2, 3)));
            assert_eq!(
                ls.read_vote().await.unwrap(),
                Some(Vote::new_committed(2, 1))
            );
            let all = ls.try_get_log_entries(..).await.unwrap();
            let ids: Vec<LogId> = all.iter().map(|e| e.log_id).collect();
            assert_eq!(ids, vec![log_id(2, 1), log_id(2, 2), log_id(2, 3)]);
            assert!(matches!(all[0].payload, EntryPayload::Blank));
            // The next entry must follow the last one.
            let (otx, _orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
            assert!(ls
                .append(vec![data_entry(3, 9, &["x"])], IOFlushed::signal(otx))
                .await
                .is_err());
        });
    }
}
