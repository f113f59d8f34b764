//! A mirror topic's replica: a log that copies its source partition's committed batches as they
//! are stored there (offsets, timestamps, producer ids and Raft stamps unchanged), with no Raft
//! group of its own. Each replica of a mirror pulls from the source by itself (`crate::mirror`
//! on the network shard) and hands what it pulled to its core here; every replica ends up with
//! the same bytes at the same offsets because the source's committed log is one sequence.
//!
//! Everything such a log holds was committed at the source, so its committed position is its
//! end once the fsync policy has secured it: readers see a prefix of the source.

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::partition::fetch::{self, Readable};
use super::partition::{wake, Freshness, Waiters};
use super::request::{
    CoreError, Fetched, ListedOffsets, MirrorLag, OpenPartition, PartitionKey, ReplicaState,
    StartAt,
};
use crate::log::{Assign, Batch, Log, LogError, Positions};
use crate::types::{Offset, TopicUid};

/// What a pull from the source came to, for the replica to take in.
#[derive(Debug)]
pub enum Pulled {
    /// Committed batches from the source, in order from this replica's end, with the
    /// source's committed range when it answered.
    Batches {
        batches: Vec<Bytes>,
        source_start: Offset,
        source_end: Offset,
        /// Pulled from another replica of the mirror, which answered with its own progress
        /// from the source: this replica's view of the source is the same, older by what the
        /// other replica holds that this one does not.
        via: Option<Upstream>,
    },
    /// The source no longer holds this replica's end (its retention deleted records not
    /// copied yet): the log starts over, empty, at the source's start.
    Restart {
        source_start: Offset,
        source_end: Offset,
    },
    /// The pull failed; why (shown with the lag).
    Failed(String),
    /// The mirror is being promoted: no more batches from the source are taken.
    Stop,
    /// Batches a replica of the same mirror holds, copied to reach the promotion's cut
    /// (`upto`): taken even when stopped, and never past the cut.
    Copied { batches: Vec<Bytes>, upto: Offset },
}

/// Another replica's progress from the source, as it answered a pull.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// That replica's node.
    pub node: crate::types::NodeId,
    /// Its last pull from the source failed.
    pub failing: bool,
    /// It held everything the source had committed when the source last answered it.
    pub caught_up: bool,
    /// The source's committed end when it last answered that replica.
    pub source_end: Offset,
    /// How long before its answer the source last answered it.
    pub contact: Option<Duration>,
}

/// What a replica knows of its source.
#[derive(Debug, Default)]
struct Source {
    /// The source's committed end when it last answered.
    end: Option<Offset>,
    /// When the source last answered.
    contact: Option<Instant>,
    /// When the source last answered while this replica held everything it had committed.
    caught_up: Option<Instant>,
    error: Option<String>,
    /// The replica the last pull went through (`None`: the source).
    via: Option<crate::types::NodeId>,
}

pub struct Mirror {
    pub key: PartitionKey,
    pub uid: TopicUid,
    pub log: Log,
    waiters: Waiters,
    closed: Cell<bool>,
    /// One pull taken in at a time.
    gate: glommio::sync::Semaphore,
    source: RefCell<Source>,
    opened: Instant,
    /// Takes no more from the source (the mirror is being promoted).
    stopped: Cell<bool>,
    /// The source's Raft stamps (term, index) of the last batch in the log.
    last: Cell<Option<(u64, u64)>>,
}

impl Readable for Mirror {
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
        false
    }
    /// A mirror serves what it holds: how far behind its source it is shows as its lag.
    fn freshness(&self) -> Freshness {
        Freshness::default()
    }
}

impl Mirror {
    /// Opens (creating if needed) the mirror's log in `open.dir`. A damaged tail is cut
    /// (`Log::open_repairing`): the source gives it back.
    pub async fn open(open: OpenPartition) -> Result<Mirror, CoreError> {
        // A directory converted by a promotion holds a Raft group's log: never a mirror again
        // (a node replaying old metadata may ask for one a moment before it learns better).
        if open.dir.join("raft.state").exists() {
            return Err(CoreError::Mirror(format!(
                "{} holds a promoted mirror's Raft log; it opens as a partition",
                open.key
            )));
        }
        mark(&open.dir).await?;
        let log = Log::open_repairing(&open.dir, open.config).await?;
        if log.repaired().is_some() {
            log.repair_noted().await?;
        }
        let end = log.positions().next;
        log.commit(end).await?;
        let last = last_stamps(&log).await?;
        tracing::debug!(partition = %open.key, end = end.0, "mirror replica opened");
        Ok(Mirror {
            key: open.key,
            uid: open.uid,
            log,
            waiters: Waiters::default(),
            closed: Cell::new(false),
            gate: glommio::sync::Semaphore::new(1),
            source: RefCell::default(),
            opened: Instant::now(),
            stopped: Cell::new(false),
            last: Cell::new(last),
        })
    }

    /// Whether this replica stopped pulling from its source (a promotion).
    pub fn stopped(&self) -> bool {
        self.stopped.get()
    }

    /// Takes in what a pull brought: appends the batches (each checked whole, CRC included,
    /// and required to continue the log exactly), secures them under the topic's fsync policy
    /// and makes them readable. Answers the log's positions after it.
    pub async fn take(&self, pulled: Pulled) -> Result<Positions, CoreError> {
        let _one = self
            .gate
            .acquire_permit(1)
            .await
            .map_err(|_| CoreError::Log(LogError::Closed))?;
        if self.closed.get() {
            return Err(CoreError::Log(LogError::Closed));
        }
        let now = Instant::now();
        let (source_end, result, via) = match pulled {
            Pulled::Stop => {
                if !self.stopped.replace(true) {
                    tracing::info!(partition = %self.key, end = self.log.positions().next.0, "mirror replica stopped pulling: the mirror is being promoted");
                }
                return Ok(self.log.positions());
            }
            Pulled::Copied { batches, upto } => {
                self.append(batches, upto, true).await?;
                return Ok(self.log.positions());
            }
            // Pulled before the stop and answered after it: not taken.
            _ if self.stopped.get() => return Ok(self.log.positions()),
            Pulled::Failed(why) => {
                self.source.borrow_mut().error = Some(why);
                return Ok(self.log.positions());
            }
            Pulled::Restart {
                source_start,
                source_end,
            } => {
                let p = self.log.positions();
                if source_start > p.next {
                    tracing::warn!(
                        partition = %self.key,
                        end = p.next.0,
                        source_start = source_start.0,
                        lost = source_start.0 - p.next.0,
                        "the mirror's source deleted records before they were copied; starting over at its start"
                    );
                    crate::metrics::NODE
                        .mirror_records_skipped
                        .add(source_start.0 - p.next.0);
                    self.log.reset_to(source_start).await?;
                    self.last.set(None);
                    wake(&self.waiters);
                }
                (source_end, Ok(()), None)
            }
            Pulled::Batches {
                batches,
                source_start: _,
                source_end,
                via,
            } => (
                source_end,
                self.append(batches, source_end, false).await,
                via,
            ),
        };
        let end = self.log.positions().next;
        let mut s = self.source.borrow_mut();
        // From the source itself: it answered now. Through another replica: the source as
        // that replica last saw it, the later of that and this replica's own last contact; and
        // caught up as of then if that replica was (and this one holds all it held).
        let (seen_end, contact, caught_up) = match &via {
            None => (source_end, Some(now), Some(now)),
            Some(up) => {
                let contact = up.contact.and_then(|d| now.checked_sub(d));
                let caught_up = contact.filter(|_| up.caught_up);
                (
                    up.source_end,
                    s.contact.max(contact),
                    s.caught_up.max(caught_up),
                )
            }
        };
        s.end = Some(seen_end.max(s.end.unwrap_or_default()));
        s.contact = contact;
        s.via = via.as_ref().map(|up| up.node);
        match &result {
            Ok(()) => s.error = None,
            Err(e) => s.error = Some(e.to_string()),
        }
        if end >= source_end {
            s.caught_up = caught_up;
        }
        drop(s);
        result.map(|()| self.log.positions())
    }

    /// Appends `batches` (none past `source_end`); `upto`: a batch past it ends the append
    /// quietly instead of failing it (copying up to a promotion's cut from a replica that may
    /// hold more).
    async fn append(
        &self,
        batches: Vec<Bytes>,
        source_end: Offset,
        upto: bool,
    ) -> Result<(), CoreError> {
        let mut next = self.log.positions().next;
        let mut secured = Vec::with_capacity(batches.len());
        let mut failed = None;
        for bytes in batches {
            let b = match Batch::decode(bytes) {
                Ok(b) => b,
                Err(e) => {
                    failed = Some(CoreError::Mirror(format!(
                        "the source sent a bad batch: {e}"
                    )));
                    break;
                }
            };
            let m = b.meta();
            // The batch holding the end, which this replica has (a read starts in it).
            if m.next_offset() <= next {
                continue;
            }
            if upto && m.next_offset() > source_end {
                break;
            }
            // The source's Raft entries follow each other: a batch of another history (a
            // source topic created again, addresses of two clusters) is refused.
            let stamps = (m.term.0, m.raft_index);
            if let Some((term, index)) = self.last.get().filter(|_| !upto) {
                if stamps.1 != index + 1 || stamps.0 < term {
                    failed = Some(CoreError::Mirror(format!(
                        "the source's batch at offset {} is Raft entry {} of term {}, which does \
                         not follow this mirror's last (entry {index} of term {term}): is it \
                         the same topic?",
                        m.base_offset.0, stamps.1, stamps.0
                    )));
                    break;
                }
            }
            if m.base_offset != next || m.next_offset() > source_end {
                failed = Some(CoreError::Mirror(format!(
                    "the source sent a batch at offsets [{}, {}), expected one at {} below its \
                     end {}",
                    m.base_offset.0,
                    m.next_offset().0,
                    next.0,
                    source_end.0
                )));
                break;
            }
            match self.log.stage(&b, Assign::Keep).await {
                Ok((_, s)) => {
                    secured.push(s);
                    self.last.set(Some((m.term.0, m.raft_index)));
                }
                Err(e) => {
                    failed = Some(e.into());
                    break;
                }
            }
            next = m.next_offset();
        }
        // What was staged is secured and made readable even when a later batch was refused.
        let staged_end = self.log.positions().next;
        for s in secured {
            s.await?;
        }
        if staged_end > self.log.positions().committed {
            self.log.commit(staged_end).await?;
            crate::metrics::NODE.mirror_batches.inc();
            wake(&self.waiters);
        }
        failed.map_or(Ok(()), Err)
    }

    pub async fn fetch(
        &self,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
        whole: bool,
    ) -> Result<Fetched, CoreError> {
        let mut f = fetch::fetch(self, from, max_bytes, max_wait, false, whole).await?;
        // For another replica pulling whole batches through this one.
        if whole {
            f.mirror = Some(self.lag());
        }
        Ok(f)
    }

    pub async fn list_offsets(&self, at: StartAt) -> Result<ListedOffsets, CoreError> {
        fetch::list_offsets(&self.log, at).await
    }

    /// How far behind its source this replica is.
    pub fn lag(&self) -> MirrorLag {
        let s = self.source.borrow();
        let end = self.log.positions().next;
        let source_end = s.end.unwrap_or_default();
        let behind = source_end.0.saturating_sub(end.0);
        MirrorLag {
            source_end,
            records: behind,
            since_caught_up: s.caught_up.unwrap_or(self.opened).elapsed(),
            contact: s.contact.map(|at| at.elapsed()),
            error: s.error.clone(),
            stopped: self.stopped.get(),
            last: self.last.get(),
            via: s.via,
        }
    }

    /// The replica's state as the node reports it: no leader, no group; its positions and lag.
    pub fn state(&self) -> ReplicaState {
        ReplicaState {
            positions: self.log.positions(),
            uid: self.uid,
            mirror: Some(self.lag()),
            ..ReplicaState::default()
        }
    }

    /// Flushes and closes the log; waiting reads end.
    pub async fn close(&self) -> Result<(), CoreError> {
        self.closed.set(true);
        wake(&self.waiters);
        self.log.close().await.map_err(CoreError::Log)
    }
}

/// The Raft stamps (term, index) of the last batch in `log`, if it holds any: from the stamps
/// kept for the active segment, or the last sealed segment's stamps file (read from the
/// batches if it has none).
async fn last_stamps(log: &Log) -> Result<Option<(u64, u64)>, CoreError> {
    let (_, active) = log.active_stamps();
    if let Some(s) = active.last() {
        return Ok(Some((s.term, s.raft_index)));
    }
    for (base, next, path) in log.sealed_segments().into_iter().rev() {
        if let Some(stamps) = Log::sealed_stamps(&path, base, next).await? {
            if let Some(s) = stamps.last() {
                return Ok(Some((s.term, s.raft_index)));
            }
            continue;
        }
        // No stamps file: read the segment's batches for its last one.
        let mut at = base;
        let mut last = None;
        while at < next {
            let r = log
                .read(at, 1 << 20, crate::log::ReadBound::Written)
                .await?;
            let Some(b) = r.batches.last() else { break };
            let m = b.meta();
            last = Some((m.term.0, m.raft_index));
            at = r.next_offset();
        }
        if last.is_some() {
            return Ok(last);
        }
    }
    Ok(None)
}

/// The file that says a partition's directory holds a mirror's log (its batches carry their
/// source's Raft stamps), until a promotion converts it (`raft::store::promote`).
pub const MARKER: &str = "mirror";

/// Creates the directory and its mirror marker, durably, before the log's first segment
/// (once per replica: a stat on later opens).
async fn mark(dir: &std::path::Path) -> Result<(), CoreError> {
    let marker = dir.join(MARKER);
    if marker.exists() {
        return Ok(());
    }
    let io = |e: std::io::Error| {
        CoreError::Mirror(format!("cannot mark {} as a mirror's: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::File::create(&marker)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}
