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
//! - Snapshots: Raft takes one only where retention asks (a snapshot carries no records, just
//!   the offset where the log ends there); openraft then purges the entries before it and the
//!   segments that held them go. A follower that needs entries its leader already deleted is
//!   sent that snapshot and restarts its log, empty, where it ends (crash-safe: the purge point
//!   is saved first and the restart redone on open).
//!
//! ```text
//! store/
//!   mod.rs            opening; what the log store and state machine share; the owner's handle
//!   entry_map.rs      Raft index → (offset, term) of every entry still in the log
//!   durable.rs        vote, purge point, may-vote (raft.state)
//!   checkpoint.rs     the applied entry, its membership and producers (raft.applied)
//!   tail.rs           the newest entries in memory
//!   codec.rs          entry ⇄ batch
//!   log_storage.rs    openraft's RaftLogStorage
//!   reported.rs       durable entries reported by a leader, counted by a follower
//!   state_machine.rs  openraft's RaftStateMachine: apply = commit
//! ```

mod checkpoint;
mod codec;
mod durable;
mod entry_map;
mod log_storage;
mod reported;
mod state_machine;
mod tail;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::io;
use std::path::Path;
use std::rc::Rc;

use crate::log::{Log, ReadBound, StateFile};
use crate::raft::producers::ProducerTable;
use crate::raft::types::{log_id, Entry, LogId, Membership, NodeId, StoredMembership};
use crate::types::Offset;

pub use checkpoint::check as check_checkpoint;
pub use checkpoint::EVERY as CHECKPOINT_ENTRIES;
use codec::decode_entry;
use durable::Durable;
use entry_map::{EntryMap, Slot};
pub use log_storage::LogStore;
pub use reported::OnSecured;
pub use state_machine::{LogSnapshot, SnapshotBuilder, StateMachine};
use tail::Tail;

/// Bytes read from the log per read while serving entries.
const READ_CHUNK: usize = 1 << 20;
const STATE_FILE: &str = "raft.state";

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// What the log store and the state machine share: both are views of the same log.
struct Shared {
    log: Log,
    state_file: StateFile,
    /// One save of the state file at a time: two interleaved saves raced on its temporary
    /// file (the second rename found it gone, and the group stopped), and a save that
    /// serialized older state could land last.
    save_lock: glommio::sync::Semaphore,
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
    /// The applied checkpoint (see `checkpoint`), the index it was last saved at, and how
    /// many applied entries apart saves are.
    checkpoint: StateFile,
    checkpointed: Cell<u64>,
    checkpoint_every: Cell<u64>,
    /// Batch bytes applied since the last checkpoint.
    applied_bytes: Cell<u64>,
    /// The part of the log opened from stamps files, whose batches no read has checked yet.
    unverified: Cell<Option<(Offset, Offset)>>,
    /// Runs after each append of entries is secured (see `reported.rs`).
    on_secured: RefCell<Option<OnSecured>>,
    /// The newest durable report of this replica's leader (see `raft::early`).
    report: Cell<Option<crate::raft::early::Durable>>,
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
    /// Saves the applied checkpoint every `entries` applied entries (at least 1).
    pub fn set_checkpoint_entries(&self, entries: u64) {
        self.0.checkpoint_every.set(entries.max(1));
    }

    /// The offsets `[from, to)` opened from sealed segments' stamps files without reading
    /// their batches (once: whoever takes it verifies them, e.g. `Partition::verify`).
    pub fn take_unverified(&self) -> Option<(Offset, Offset)> {
        self.0.unverified.take()
    }

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

    /// Whether this replica may grant votes and campaign (see `Durable::may_vote` and
    /// `Durable::recover_to`).
    pub fn may_vote(&self) -> bool {
        let d = self.0.durable.borrow();
        d.may_vote && d.recover_to.is_none()
    }

    /// Marks this replica damaged before it is reopened to cut the damage: it does not vote
    /// again until it has applied the last entry it holds now (`Durable::recover_to`), which
    /// covers damage the reopening cut cannot tell from a torn write (the last batch).
    pub async fn mark_damaged(&self) -> io::Result<()> {
        let last = self.0.map.borrow().last().map(|l| l.index);
        let Some(last) = last else { return Ok(()) };
        self.0.durable.borrow_mut().note_damage(last);
        self.0.save().await
    }

    /// The entry a damaged replica must apply again before it votes (`Durable::recover_to`).
    pub fn recovering_to(&self) -> Option<u64> {
        self.0.durable.borrow().recover_to
    }

    /// Where this replica's log started over at a promotion, without the records before
    /// (`Durable::history_from`); `None` for a replica that holds the partition's history.
    pub fn history_from(&self) -> Option<Offset> {
        self.0.durable.borrow().history_from.map(Offset)
    }
}

impl Shared {
    /// A damaged replica that has applied (committed, and secured in its own log) the entry it
    /// had to recover votes again.
    async fn recovered_through(&self, applied: Option<LogId>) -> io::Result<()> {
        let done = {
            let mut d = self.durable.borrow_mut();
            match (d.recover_to, applied) {
                (Some(to), Some(a))
                    if a.index >= to || d.recover_term.is_some_and(|t| a.leader_id.term > t) =>
                {
                    d.recover_to = None;
                    d.recover_term = None;
                    true
                }
                _ => false,
            }
        };
        if done {
            tracing::info!(dir = %self.log.dir().display(), "damaged replica caught up; it votes again");
            self.save().await?;
        }
        Ok(())
    }

    /// Saves the applied checkpoint if `applied` is far enough past the last one. Called by
    /// the state machine after applying, when the entries it applied are durable here. A
    /// failed save is only logged: it costs a longer replay after a restart, nothing else.
    async fn maybe_checkpoint(&self, applied: Option<LogId>, membership: &StoredMembership) {
        let Some(at) = applied else { return };
        if at.index < self.checkpointed.get() + self.checkpoint_every.get()
            && self.applied_bytes.get() < checkpoint::EVERY_BYTES
        {
            return;
        }
        self.checkpointed.set(at.index);
        self.applied_bytes.set(0);
        let encoded = checkpoint::encode(at, membership, &self.producers.borrow());
        let saved = match encoded {
            Ok(bytes) => self.checkpoint.write(&bytes).await.map_err(io_err),
            Err(e) => Err(e),
        };
        match saved {
            Ok(()) => crate::metrics::NODE.checkpoints_saved.inc(),
            Err(e) => {
                tracing::warn!(dir = %self.log.dir().display(), error = %e, "cannot save the applied checkpoint; a restart re-applies more of the log");
            }
        }
    }

    async fn save(&self) -> io::Result<()> {
        let _one = self
            .save_lock
            .acquire_permit(1)
            .await
            .map_err(|e| io_err(format!("state file lock: {e}")))?;
        // Serialized under the lock: the last save to finish holds the newest state.
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

/// Whether a state file's payload is a replica's durable state (for the fuzzer: reading it
/// must refuse bad bytes, never panic).
#[doc(hidden)]
pub fn check_state(payload: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<Durable>(payload)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Makes a damaged log safe to run on (see `Durable::recover_to`): notes the highest entry a
/// cut (by `Log::open_repairing`) dropped, or, when the front of the log is gone (a segment
/// file deleted), starts the log over where the purge point says. `recover_to` is durable
/// before the cut is forgotten and before the log is restarted.
async fn heal(
    log: &Log,
    state_file: &StateFile,
    durable: &mut Durable,
    map: &mut EntryMap,
) -> io::Result<()> {
    let purged = durable.purged.map(|p| p.index);
    let repaired = log.repaired();
    // Unknown: only an entry of a later term ends the recovery (`Durable::recover_term`).
    let mut lost = repaired
        .as_ref()
        .map(|r| r.last_raft_index.unwrap_or(u64::MAX));
    let expected_first = purged.map_or(0, |p| p + 1);
    let mut restart = None;
    if !map.slots.is_empty() && map.first > expected_first {
        let start = match purged {
            None => Some(0),
            Some(p) => durable.purged_end.or_else(|| {
                durable
                    .snapshot
                    .as_ref()
                    .filter(|(meta, _)| meta.last_log_id.map(|l| l.index) == Some(p))
                    .map(|(_, end)| *end)
            }),
        };
        if !log.repairing() {
            return Err(io_err(format!(
                "the log's first raft entry is {} but entries from {expected_first} are \
                 missing (a replica alone is not cut: nothing could give back what it lost)",
                map.first
            )));
        }
        let Some(start) = start else {
            return Err(io_err(format!(
                "the log's first raft entry is {} but entries from {expected_first} are \
                 missing, and nothing says at which offset they ended",
                map.first
            )));
        };
        tracing::warn!(
            dir = %log.dir().display(),
            first = map.first,
            expected = expected_first,
            "the front of the log is missing; starting the log over, empty, to be caught up"
        );
        lost = lost.max(Some(map.next_index() - 1));
        restart = Some(Offset(start));
    }
    let Some(lost) = lost else { return Ok(()) };
    if let Some(r) = &repaired {
        tracing::warn!(
            dir = %log.dir().display(),
            from = r.from.0,
            file = %r.path,
            reason = %r.reason,
            recover_to = lost,
            "damaged log cut; this replica will not vote until its peers have given back entry {lost}"
        );
    }
    durable.note_damage(lost);
    let bytes = serde_json::to_vec(&*durable).map_err(io_err)?;
    state_file.write(&bytes).await.map_err(io_err)?;
    log.repair_noted().await.map_err(io_err)?;
    if let Some(start) = restart {
        log.reset_to(start).await.map_err(io_err)?;
        *map = EntryMap::default();
        if let Some(p) = purged {
            map.purge(p);
        }
    }
    Ok(())
}

/// Where a promoted mirror's log continues as a Raft group: the offset after the last copied
/// record, and the source's stamps (term, index) of the batch ending there ((0, 0): none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promoted {
    pub end: Offset,
    pub term: u64,
    pub index: u64,
}

/// Turns a mirror's log (batches copied with their source's offsets and Raft stamps) into the
/// log of a new Raft group of `voters` that continues from `at`, as if a snapshot at `at` had
/// been installed: the copied entries count as purged (their source's membership entries are
/// not this group's), the group's membership is `voters`, and the idempotent producers'
/// table is rebuilt from the copied batches (a producer's retry after the promotion is
/// recognised). Every replica of the partition writes the same state, so none is ahead.
///
/// Done once: a log that has Raft state already is left alone. The state file is written
/// last, so a crash before it redoes the whole conversion. A log longer than `at` is cut
/// there; one that does not reach it (a replica that was down while the others agreed on the
/// cut) starts over, empty, at `at`, as a follower restarted from a snapshot does.
pub async fn promote(
    log: &Log,
    dir: &Path,
    at: Promoted,
    me: NodeId,
    voters: std::collections::BTreeMap<NodeId, crate::raft::types::Member>,
) -> io::Result<()> {
    let state_file = StateFile::new(dir, STATE_FILE);
    state_file.clean().await.map_err(io_err)?;
    if state_file.read().await.map_err(io_err)?.is_some() {
        return Ok(());
    }
    let p = log.positions();
    let mut started_over = false;
    if p.start <= at.end && at.end < p.next {
        log.truncate_from(at.end).await.map_err(io_err)?;
    } else if p.next < at.end || p.start > at.end {
        tracing::warn!(dir = %dir.display(), end = p.next.0, cut = at.end.0, "this replica of a promoted mirror does not hold the records up to the cut; its log starts over at the cut");
        log.reset_to(at.end).await.map_err(io_err)?;
        started_over = true;
    }
    // The producers' last batches, from the copied log.
    let mut producers = ProducerTable::default();
    let mut from = log.positions().start;
    while from < at.end {
        let read = log
            .read(from, READ_CHUNK, ReadBound::Written)
            .await
            .map_err(io_err)?;
        if read.batches.is_empty() {
            break;
        }
        for b in &read.batches {
            let m = b.meta();
            producers.applied(
                m.producer_id,
                m.base_sequence,
                m.record_count,
                m.base_offset,
                crate::types::RaftIndex(m.raft_index),
            );
        }
        from = read.next_offset();
    }
    let purged = log_id(at.term, at.index);
    let ids: std::collections::BTreeSet<NodeId> = voters.keys().copied().collect();
    let membership = Membership::new(vec![ids], voters).map_err(io_err)?;
    let membership = StoredMembership::new(Some(purged), membership);
    let meta = crate::raft::types::SnapshotMeta {
        last_log_id: Some(purged),
        last_membership: membership.clone(),
    };
    let bytes = checkpoint::encode(purged, &membership, &producers)?;
    checkpoint::file(dir).write(&bytes).await.map_err(io_err)?;
    let durable = Durable {
        // Elections continue past the source's terms: the next leader's entries are stamped
        // with a later term than the copied ones.
        vote: Some(crate::raft::types::Vote::new(at.term, me)),
        purged: Some(purged),
        purged_end: Some(at.end.0),
        snapshot: Some((meta, at.end.0)),
        // A replica that started over knows none of the copied producers: it does not help
        // elect a leader, nor campaign, until it has applied an entry of a leader elected
        // after the promotion (which knows them; see `Durable::recover_to`).
        recover_to: started_over.then_some(at.index + 1),
        recover_term: started_over.then_some(at.term),
        history_from: started_over.then_some(at.end.0),
        ..Durable::default()
    };
    let bytes = serde_json::to_vec(&durable).map_err(io_err)?;
    state_file.write(&bytes).await.map_err(io_err)?;
    tracing::info!(dir = %dir.display(), end = at.end.0, "mirror replica promoted: a Raft group continues from its copied log");
    Ok(())
}

/// The applied checkpoint, if this log can vouch for it: past the purge point, with its entry
/// in the log under the same term (see `checkpoint`). Anything else is ignored with a note,
/// and the log is re-applied from the purge point.
async fn read_checkpoint(
    file: &StateFile,
    purged: Option<LogId>,
    snapshot_at_purge: bool,
    map: &EntryMap,
    log: &Log,
) -> Option<checkpoint::Checkpoint> {
    let dir = log.dir().display();
    let bytes = match file.read().await {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(%dir, error = %e, "applied checkpoint unreadable; re-applying the log");
            return None;
        }
    };
    let c = match checkpoint::decode(&bytes) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%dir, error = %e, "applied checkpoint damaged; re-applying the log");
            return None;
        }
    };
    let held = map
        .get(c.applied.index)
        .is_some_and(|s| s.term == c.applied.leader_id.term);
    // Written with a snapshot at the purge point (a promoted mirror's: `promote`): it is the
    // state there.
    if snapshot_at_purge && Some(c.applied) == purged {
        return Some(c);
    }
    if Some(c.applied) <= purged || !held {
        tracing::debug!(%dir, applied = %c.applied, "applied checkpoint not in this log; re-applying it");
        return None;
    }
    Some(c)
}

/// [`open_with`], also returning the owner's handle on the storage.
pub async fn open_with_handle(
    log: Log,
    dir: &Path,
    on_commit: OnCommit,
) -> io::Result<(LogStore, StateMachine, StoreHandle)> {
    let state_file = StateFile::new(dir, STATE_FILE);
    state_file.clean().await.map_err(io_err)?;
    let mut durable: Durable = match state_file.read().await.map_err(io_err)? {
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
    // Below the purge point's end every batch is purged, whatever its stamps say (a promoted
    // mirror's copied batches carry their source's).
    let purged_below = durable.purged_end.map(Offset);
    let push = |map: &mut EntryMap, index: u64, base: Offset, term: u64| {
        if purged.is_some_and(|p| index <= p) || purged_below.is_some_and(|e| base < e) {
            return Ok(());
        }
        map.push(index, Slot { base, term }).map_err(io_err)
    };
    // Sealed segments from their stamps files, without reading their batches (a restart then
    // costs the active segment, not the whole log); the batches are verified in the
    // background afterwards (`StoreHandle::unverified`). A missing or damaged stamps file
    // ends this: from there the batches are read.
    for (base, next, path) in log.sealed_segments() {
        if base != at {
            break;
        }
        let Some(stamps) = Log::sealed_stamps(&path, base, next)
            .await
            .map_err(io_err)?
        else {
            break;
        };
        for s in stamps {
            push(&mut map, s.raft_index, s.base, s.term)?;
        }
        at = next;
    }
    let unverified = (at > pos.start).then_some((pos.start, at));
    // The active segment's stamps are in memory: its recovery read every batch of it.
    let (active, stamps) = log.active_stamps();
    if active == at {
        for s in stamps.iter().take_while(|s| s.base < pos.written) {
            push(&mut map, s.raft_index, s.base, s.term)?;
        }
        at = at.max(pos.written);
    }
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
            push(&mut map, m.raft_index, m.base_offset, m.term.0)?;
        }
        at = read.next_offset();
    }
    heal(&log, &state_file, &mut durable, &mut map).await?;
    // A crash between saving a snapshot's purge point and restarting the log from it: redo.
    if let Some(end) = durable.purged_end.map(Offset) {
        if log.positions().next < end {
            log.reset_to(end).await.map_err(io_err)?;
        }
    }
    let checkpoint_file = checkpoint::file(dir);
    checkpoint_file.clean().await.map_err(io_err)?;
    let snapshot_at_purge = durable.purged.is_some()
        && durable
            .snapshot
            .as_ref()
            .is_some_and(|(meta, _)| meta.last_log_id == durable.purged);
    let found = read_checkpoint(
        &checkpoint_file,
        durable.purged,
        snapshot_at_purge,
        &map,
        &log,
    )
    .await;
    let purged = durable.purged;
    let durable_end = durable.purged_end;
    // The membership the purged entries held comes from the last snapshot (the log after the
    // purge point holds any later one); the snapshot itself serves again if it is the one the
    // log was purged behind.
    let kept = durable.snapshot.clone();
    let mut membership = kept
        .as_ref()
        .map(|(meta, _)| meta.last_membership.clone())
        .filter(|m| m.log_id().is_some() && *m.log_id() <= purged)
        .unwrap_or_default();
    let snapshot = kept
        .filter(|(meta, _)| purged.is_some() && meta.last_log_id == purged)
        .map(|(meta, end)| (meta, Offset(end)));
    let mut applied = purged;
    let mut producers = ProducerTable::default();
    if let Some(c) = found {
        crate::metrics::NODE.checkpoint_restores.inc();
        // Applied before the restart: committed, and held by this log (checked). The log's
        // committed position starts there, as it was.
        let end = match Some(c.applied) == purged {
            // Applied at the purge point: everything before the log's restart point.
            true => durable_end.map(Offset),
            false => map.end_of(c.applied.index, log.positions().next),
        };
        if let Some(end) = end.filter(|e| *e > log.positions().committed) {
            log.commit(end).await.map_err(io_err)?;
        }
        if c.membership.log_id() >= membership.log_id() {
            membership = c.membership;
        }
        applied = Some(c.applied);
        producers = c.producers;
    }
    let shared = Rc::new(Shared {
        log,
        state_file,
        save_lock: glommio::sync::Semaphore::new(1),
        durable: RefCell::new(durable),
        map: RefCell::new(map),
        tail: RefCell::default(),
        retain_upto: Cell::new(None),
        me: Cell::new(None),
        producers: RefCell::new(producers),
        checkpoint: checkpoint_file,
        checkpointed: Cell::new(applied.map_or(0, |a| a.index)),
        checkpoint_every: Cell::new(checkpoint::EVERY),
        applied_bytes: Cell::new(0),
        unverified: Cell::new(unverified),
        on_secured: RefCell::default(),
        report: Cell::new(None),
    });
    Ok((
        LogStore {
            shared: shared.clone(),
        },
        StateMachine {
            shared: shared.clone(),
            applied,
            membership,
            snapshot,
            on_commit,
        },
        StoreHandle(shared),
    ))
}
