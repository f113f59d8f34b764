//! Repairing a damaged replica at run time (see `Partition::damage` and docs/storage.md,
//! "Damaged replicas"): the replica is marked as recovering what it holds, closed, the damaged
//! segment loses its index files (so the open scans it and finds the damage), and it is opened
//! again, repairing: the log is cut at the damage and the leader gives back the rest.
//!
//! The closed replica stays in its core's map while this runs: requests to it get errors, and
//! an Open for it finds it there (never a second open of the same files). A Close waits until
//! the repair has finished or given up, so nothing reopens files that the close is about to
//! have deleted.

use std::rc::Rc;
use std::time::Duration;

use super::core::Partitions;
use super::partition::{Partition, Taken};
use super::request::PartitionKey;

/// The longest wait between two tries to reopen a replica (and before a repeated repair).
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Reopens the damaged replica `p`, taken with `Partition::take_for_repair`.
pub(super) async fn repair(partitions: Partitions, p: Rc<Partition>, why: String, taken: Taken) {
    let Taken {
        open,
        core,
        repairs,
        damaged,
    } = taken;
    let Ok(_gate) = p.repair_gate().acquire_static_permit(1).await else {
        return;
    };
    let ours = || {
        !p.close_requested()
            && partitions
                .borrow()
                .get(&p.key)
                .is_some_and(|q| Rc::ptr_eq(q, &p))
    };
    if !ours() {
        return;
    }
    tracing::warn!(partition = %p.key, %why, repairs, "reopening a damaged replica to repair it");
    if let Err(e) = p.mark_damaged().await {
        // Without the mark, reopening could leave it voting on a log it cannot vouch for.
        tracing::error!(partition = %p.key, error = %e, "could not mark a damaged replica; it stays closed");
        let _ = p.close().await;
        return;
    }
    if let Err(e) = p.close().await {
        tracing::warn!(partition = %p.key, error = %e, "closing a damaged replica");
    }
    if let Some(path) = damaged {
        tracing::error!(partition = %p.key, segment = %path.display(), "a read found this segment damaged; its bytes were not served");
        if let Err(e) = crate::log::Log::distrust_index(&path).await {
            tracing::warn!(partition = %p.key, error = %e, "could not remove a damaged segment's index");
        }
    }
    // A replica damaged again and again (a group that stops each time it starts) is reopened
    // less and less often.
    let mut delay = Duration::from_secs(1u64 << repairs.min(5)).min(BACKOFF_MAX);
    if repairs > 0 {
        glommio::timer::sleep(delay).await;
    }
    loop {
        if !ours() {
            return;
        }
        match Partition::open(open.clone(), core).await {
            Ok(fresh) => {
                fresh.set_repairs(repairs + 1);
                if ours() {
                    crate::metrics::NODE.replica_repairs.inc();
                    super::partition::tick_group(&p.key);
                    partitions
                        .borrow_mut()
                        .insert(p.key.clone(), Rc::new(fresh));
                } else {
                    let _ = fresh.close().await;
                }
                return;
            }
            Err(e) => {
                tracing::error!(partition = %p.key, error = %e, retry_in = ?delay, "reopening a damaged replica failed");
                glommio::timer::sleep(delay).await;
                delay = (delay * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Before a Close of `key`: if its replica is being repaired, asks the repair to stop and
/// waits until it has.
pub(super) async fn wait_for_repair(partitions: &Partitions, key: &PartitionKey) {
    let Some(p) = partitions.borrow().get(key).cloned() else {
        return;
    };
    p.request_close();
    let _ = p.repair_gate().acquire_static_permit(1).await;
}
