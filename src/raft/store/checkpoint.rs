//! The applied checkpoint (file `raft.applied`): where this replica's state machine stood at
//! an applied entry (its id, the membership then, and the idempotent producers' table), saved
//! every [`EVERY`] applied entries or [`EVERY_BYTES`] applied bytes, whichever comes first.
//!
//! Without it a restarted replica re-applied its whole log: openraft only knows what the state
//! machine says it applied, and the producer table is built by applying. A leader answers
//! idempotent producers only once it has applied what its log held (see
//! `Partition::idempotence_ready`), so with an 85 MB log a restarted node that led kept its
//! producers waiting for seconds, longer as the log grew. With the checkpoint a restart
//! re-applies at most [`EVERY`] entries or [`EVERY_BYTES`] bytes plus what was not yet
//! committed. (Entries alone were not a bound: the `failover` workload's batches of 100
//! records make 10 entries a second, so 4,096 entries were 100 MB of log and seven minutes,
//! and its 1,000 s runs never saved a checkpoint.)
//!
//! The checkpoint is trusted only where the log still holds its entry with the same term
//! (Raft's log matching: then the log up to it is the one that built the state), and only past
//! the purge point (a snapshot there is newer). A log cut by repair, or restarted from a
//! snapshot, no longer holds it, and the replica re-applies from the purge point as before. A
//! damaged checkpoint costs only that replay: it is never a reason not to start.

use std::io;

use serde::{Deserialize, Serialize};

use crate::log::StateFile;
use crate::raft::producers::ProducerTable;
use crate::raft::types::{LogId, StoredMembership};

pub(super) const FILE: &str = "raft.applied";
/// Applied entries between two checkpoints by default (`--raft-checkpoint-entries`): a restart
/// re-applies at most this many (plus the uncommitted tail). A checkpoint is one small write
/// and fdatasync of two files.
pub const EVERY: u64 = 4096;
/// Applied batch bytes between two checkpoints, whatever the entry count: what a restart
/// reads and applies again stays below this (and the save's cost, the producer table, stays
/// small beside the log it covers).
pub const EVERY_BYTES: u64 = 16 << 20;
/// The producer table is bounded (10,000 producers of 8 batches: about 1.5 MB).
const BYTES_MAX: usize = 8 << 20;

pub(super) fn file(dir: &std::path::Path) -> StateFile {
    StateFile::with_limit(dir, FILE, BYTES_MAX)
}

#[derive(Serialize, Deserialize)]
struct Head {
    applied: LogId,
    membership: StoredMembership,
}

pub(super) struct Checkpoint {
    pub(super) applied: LogId,
    pub(super) membership: StoredMembership,
    pub(super) producers: ProducerTable,
}

/// `[head length: u32][head: JSON][producer table]`.
pub(super) fn encode(
    applied: LogId,
    membership: &StoredMembership,
    producers: &ProducerTable,
) -> io::Result<Vec<u8>> {
    let head = serde_json::to_vec(&Head {
        applied,
        membership: membership.clone(),
    })
    .map_err(super::io_err)?;
    let mut out = Vec::with_capacity(4 + head.len() + 64);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    producers.encode(&mut out);
    Ok(out)
}

pub(super) fn decode(buf: &[u8]) -> Result<Checkpoint, String> {
    let len = buf
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
        .ok_or("no head length")?;
    let head = buf
        .get(4..4usize.saturating_add(len))
        .ok_or("the head ends early")?;
    let head: Head = serde_json::from_slice(head).map_err(|e| e.to_string())?;
    if head.membership.log_id().is_some_and(|m| m > head.applied) {
        return Err(format!(
            "membership at {:?} is after the applied entry {}",
            head.membership.log_id(),
            head.applied
        ));
    }
    let producers = ProducerTable::decode(&buf[4 + len..])?;
    Ok(Checkpoint {
        applied: head.applied,
        membership: head.membership,
        producers,
    })
}

/// Whether a checkpoint's payload decodes (for the fuzzer: bad bytes are refused, never a
/// panic).
#[doc(hidden)]
pub fn check(payload: &[u8]) -> Result<(), String> {
    decode(payload).map(|_| ())
}
