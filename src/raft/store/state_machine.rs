//! The state machine of a partition is its log: applying an entry moves the committed
//! position over it (and records idempotent producers' batches); snapshots say where the log
//! ends, and installing one past this replica's log restarts the log there.

use std::io;
use std::rc::Rc;

use futures::StreamExt;
use openraft::entry::RaftEntry;
use openraft::storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend};

use super::{io_err, OnCommit, Shared};
use crate::raft::types::{
    EntryBatch, EntryOffsets, LogId, PartitionRaft, SnapshotMeta, StoredMembership,
};
use crate::types::Offset;

/// The state machine of a partition: the log itself. Applying an entry commits its records.
pub struct StateMachine {
    pub(super) shared: Rc<Shared>,
    pub(super) applied: Option<LogId>,
    pub(super) membership: StoredMembership,
    /// The last snapshot built or installed, and the log offset it covers.
    pub(super) snapshot: Option<(SnapshotMeta, Offset)>,
    pub(super) on_commit: OnCommit,
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

impl StateMachine {
    /// Records the idempotent producers of the entries after the applied one up to `upto`,
    /// read from this replica's log (which holds them), a bounded batch of entries at a time.
    async fn record_producers_upto(&mut self, upto: Option<LogId>) -> Result<(), io::Error> {
        const STEP: u64 = 256;
        let Some(upto) = upto else { return Ok(()) };
        let first = self.shared.map.borrow().first;
        let mut next = self.applied.map_or(first, |a| a.index + 1).max(first);
        while next <= upto.index {
            let end = (next + STEP).min(upto.index + 1);
            for e in self.shared.entries(next, end).await? {
                if let EntryPayload::Normal(EntryBatch(b)) = &e.payload {
                    let m = b.meta();
                    self.shared.producers.borrow_mut().applied(
                        m.producer_id,
                        m.base_sequence,
                        m.record_count,
                        m.base_offset,
                        crate::types::RaftIndex(e.log_id.index),
                    );
                }
            }
            next = end;
        }
        Ok(())
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
            // What a replica applies is one history: entries in index order, each of a term
            // no older than the one before (a term has one leader, and it only appends).
            if let Some(prev) = self.applied {
                assert!(
                    id.index > prev.index && id.leader_id.term >= prev.leader_id.term,
                    "applying {id} after {prev}: not one history"
                );
            }
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
            if offsets.is_none() {
                tracing::warn!(dir = %self.shared.log.dir().display(), entry = %id, "an applied entry is not in this replica's log as that entry (term or index differ): its producers are not recorded");
            }
            if let Some(o) = offsets {
                commit_to = Some(Offset(o.end));
                if let EntryPayload::Normal(EntryBatch(b)) = &entry.payload {
                    let applied = &self.shared.applied_bytes;
                    applied.set(applied.get() + b.bytes().len() as u64);
                    let m = b.meta();
                    self.shared.producers.borrow_mut().applied(
                        m.producer_id,
                        m.base_sequence,
                        m.record_count,
                        Offset(o.base),
                        crate::types::RaftIndex(id.index),
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
        self.shared.recovered_through(self.applied).await?;
        self.shared
            .maybe_checkpoint(self.applied, &self.membership)
            .await;
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
        self.shared.durable.borrow_mut().snapshot = Some((meta.clone(), end.0));
        if let Err(e) = self.shared.save().await {
            // The snapshot still serves; only a restart after a purge past the membership
            // would miss it, and the purge saves the state file again.
            tracing::warn!(error = %e, "cannot keep the snapshot's membership in the state file");
        }
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
                d.snapshot = Some((meta.clone(), snapshot.end.0));
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
        if covered {
            // The log keeps the entries between what this replica applied and the snapshot's
            // point, and the snapshot says they are applied: record their producers as
            // applying them would have (a leader of a later term checks its producers'
            // sequences against this table, and one without them refused a producer's next
            // batch as out of order).
            self.record_producers_upto(meta.last_log_id).await?;
        }
        self.shared
            .saw_membership(meta.last_membership.membership(), true)
            .await?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.snapshot = Some((meta.clone(), snapshot.end));
        if covered {
            self.shared.durable.borrow_mut().snapshot = Some((meta.clone(), snapshot.end.0));
            self.shared.save().await?;
        }
        if snapshot.end > self.shared.log.positions().committed {
            self.shared.log.commit(snapshot.end).await.map_err(io_err)?;
            (self.on_commit)();
        }
        self.shared.recovered_through(self.applied).await?;
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
