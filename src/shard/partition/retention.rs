//! Retention through the group: the entries retention would delete are purged from the Raft
//! log behind a snapshot taken at that point, which deletes their segments.

use std::time::{Duration, Instant};

use openraft_rt::watch::WatchReceiver;

use super::Partition;
use crate::raft::types::PartitionRaft;
use crate::shard::request::CoreError;

impl Partition {
    /// Whether retention is due (the topic has retention, its check interval passed and it is
    /// not running): if so, it counts as started, and the caller runs [`Partition::retained`].
    pub fn retention_due(&self, now: Instant) -> bool {
        let c = self.log.config();
        if c.retention_ms.is_none() && c.retention_bytes.is_none() {
            return false;
        }
        let every = Duration::from_millis(c.retention_check_interval_ms);
        if self.retaining.get() || now.saturating_duration_since(self.retained.get()) < every {
            return false;
        }
        self.retaining.set(true);
        self.retained.set(now);
        true
    }

    /// Runs retention (after [`Partition::retention_due`] said so).
    pub async fn retained(&self) {
        if let Err(e) = self.retain(crate::types::TimestampMs::now()).await {
            tracing::warn!(partition = %self.key, error = %e, "retention failed");
        }
        self.retaining.set(false);
    }

    /// Applies retention through the group: the entries retention would delete are purged
    /// from the Raft log (openraft does so once no replication still reads them, behind a
    /// snapshot taken at that point), which deletes their segments. A follower that later
    /// needs them is sent that snapshot and starts its log where it ends.
    pub async fn retain(&self, now: crate::types::TimestampMs) -> Result<(), CoreError> {
        let Some(end) = self.log.retention_point(now).await? else {
            return Ok(());
        };
        self.purge_before(end).await
    }

    /// Purges the Raft log up to its last entry that ends at or before `end`, behind a
    /// snapshot taken there (whole segments below it are deleted; a follower that needs what
    /// went is sent the snapshot). Returns once the purge is asked for, or, if the snapshot is
    /// not built within 5 s, without purging (the next call tries again).
    pub async fn purge_before(&self, end: crate::types::Offset) -> Result<(), CoreError> {
        let Some(upto) = self.store.last_entry_before(end) else {
            return Ok(());
        };
        let covered = |m: &openraft::RaftMetrics<PartitionRaft>| {
            m.snapshot.is_some_and(|s| s.index >= upto.index)
        };
        if !covered(&self.raft.metrics().borrow_watched()) {
            self.store.snapshot_at(upto);
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(super::stopped)?;
            // Built in the background: purge once it is there (else at the next check).
            let built = self
                .raft
                .wait(Some(Duration::from_secs(5)))
                .metrics(covered, "snapshot before a purge")
                .await;
            if built.is_err() {
                return Ok(());
            }
        }
        tracing::debug!(partition = %self.key, upto = %upto, "purging the raft log");
        self.raft
            .trigger()
            .purge_log(upto.index)
            .await
            .map_err(super::stopped)
    }
}
