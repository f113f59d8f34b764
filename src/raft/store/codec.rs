//! A Raft entry as a record batch and back: a normal entry is the producer's batch; a blank or
//! membership entry is a one-record control batch whose key says which.

use std::io;

use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::EntryPayload;

use super::io_err;
use crate::log::{Batch, BatchBuilder, Record};
use crate::raft::types::{log_id, Entry, EntryBatch};
use crate::types::TimestampMs;

/// Keys of the control records that carry non-data entries.
const KEY_BLANK: &[u8] = b"raft/blank";
const KEY_MEMBERSHIP: &[u8] = b"raft/membership";

/// Turns a stored batch back into the Raft entry it is.
pub(super) fn decode_entry(b: &Batch) -> io::Result<Entry> {
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
pub(super) fn encode_entry(e: &Entry) -> io::Result<Batch> {
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
