//! openraft's log storage over the partition log: entries are appended as batches (staged,
//! reported flushed after the group fsync), truncated and purged through the log.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::rc::Rc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend};

use super::codec::encode_entry;
use super::entry_map::Slot;
use super::{io_err, Shared};
use crate::log::{Assign, Log};
use crate::raft::types::{Entry, EntryBatch, LogId, PartitionRaft, Vote};
use crate::types::Term;

/// The Raft log storage (and reader) of one partition.
#[derive(Clone)]
pub struct LogStore {
    pub(super) shared: Rc<Shared>,
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
                let shared = self.shared.clone();
                glommio::spawn_local(async move {
                    let secured = secured.await.map_err(io_err);
                    let ok = secured.is_ok();
                    callback.io_completed(secured);
                    let hook = shared.on_secured.borrow().clone();
                    if let (true, Some(hook)) = (ok, hook) {
                        hook(&super::StoreHandle(shared));
                    }
                })
                .detach();
            }
        }
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let committed = self.shared.log.positions().committed;
        let (from, at) = {
            let map = self.shared.map.borrow();
            let mut from = last_log_id.map_or(map.first, |l| l.index + 1);
            // A follower's committed position can be ahead of what openraft knows committed
            // (its leader's durable reports, `raft::early`). openraft cuts after its own
            // commit only before installing a snapshot that conflicts with the log, which
            // restarts the log at the snapshot anyway: the entries before the position stay
            // (they are committed, so the snapshot covers them), the rest goes.
            if map.get(from).is_some_and(|s| s.base < committed) {
                let kept = map.slots.partition_point(|s| s.base < committed);
                tracing::info!(
                    asked = from,
                    from = map.first + kept as u64,
                    "a truncation asked below the committed position cuts from there"
                );
                from = map.first + kept as u64;
            }
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
