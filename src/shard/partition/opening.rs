//! What opening a replica does beside starting its group: the sealed segments opened from
//! their stamps files are verified in the background, and a promoted mirror's log is converted
//! once into a Raft log.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::log::Log;
use crate::raft::types::NodeId;
use crate::raft::RaftError;
use crate::shard::request::CoreError;

/// Bytes a background verification reads at a time, and its pause between two reads (at
/// most about 200 MB/s per core, beside the partitions' own traffic).
const VERIFY_CHUNK: usize = 1 << 20;
const VERIFY_PAUSE: Duration = Duration::from_millis(5);

thread_local! {
    /// One background verification at a time per core (each holds a read buffer of
    /// `VERIFY_CHUNK`): a node opening thousands of partitions verifies them one by one.
    static VERIFYING: Rc<glommio::sync::Semaphore> = Rc::new(glommio::sync::Semaphore::new(1));
}

/// Reads the batches of the sealed segments that the Raft store opened from their stamps files
/// (`log::stamps`), in the background and at a bounded pace, checking every CRC as any read
/// does: damage in them is found soon after a start, as the open found it when it read the
/// whole log. A read that meets damage marks the segment, and the core repairs the replica
/// (`Partition::damage`); a replica closed meanwhile ends it.
pub(super) async fn verify(
    log: Log,
    partition: String,
    from: crate::types::Offset,
    to: crate::types::Offset,
) {
    let gate = VERIFYING.with(Rc::clone);
    let Ok(_turn) = gate.acquire_permit(1).await else {
        return;
    };
    let began = Instant::now();
    let (mut at, mut bytes) = (from, 0u64);
    while at < to {
        match log
            .read(at, VERIFY_CHUNK, crate::log::ReadBound::Written)
            .await
        {
            Ok(read) if !read.batches.is_empty() => {
                bytes += read
                    .batches
                    .iter()
                    .map(|b| b.bytes().len() as u64)
                    .sum::<u64>();
                at = read.next_offset();
            }
            Ok(_) => break,
            Err(e) => {
                tracing::debug!(%partition, at = at.0, error = %e, "background verification stopped");
                return;
            }
        }
        glommio::timer::sleep(VERIFY_PAUSE).await;
    }
    tracing::info!(
        %partition,
        bytes,
        ms = began.elapsed().as_millis() as u64,
        "sealed segments verified"
    );
}

/// Converts a promoted mirror's log, once, if this directory holds one (its marker is removed
/// after the conversion; see `raft::store::promote`).
pub(super) async fn convert(
    log: &Log,
    dir: &std::path::Path,
    at: crate::raft::store::Promoted,
    me: NodeId,
    voters: std::collections::BTreeMap<NodeId, crate::raft::types::Member>,
) -> Result<(), CoreError> {
    let marker = dir.join(crate::shard::mirror::MARKER);
    if !marker.exists() {
        return Ok(());
    }
    let storage = |e: std::io::Error| {
        CoreError::Raft(RaftError::Storage {
            dir: dir.display().to_string(),
            error: e.to_string(),
        })
    };
    crate::raft::store::promote(log, dir, at, me, voters)
        .await
        .map_err(storage)?;
    std::fs::remove_file(&marker).map_err(storage)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(storage)
}
