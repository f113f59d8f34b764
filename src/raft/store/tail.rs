//! The newest entries kept in memory, exactly as stored, so applying and replicating them does
//! not read them back from disk. Bounded in entries and bytes.

use std::collections::VecDeque;

use openraft::EntryPayload;

use crate::raft::types::{Entry, EntryBatch};

/// The newest entries kept: at most this many entries and bytes.
const TAIL_ENTRIES_MAX: usize = 4096;
const TAIL_BYTES_MAX: usize = 16 << 20;

/// The newest entries exactly as stored (stamped), `entries[i]` being entry `first + i`.
#[derive(Default)]
pub(super) struct Tail {
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
    pub(super) fn push(&mut self, e: Entry) {
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
    pub(super) fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let from = usize::try_from(start.checked_sub(self.first)?).ok()?;
        let to = usize::try_from(end.checked_sub(self.first)?).ok()?;
        (to <= self.entries.len()).then(|| self.entries.range(from..to).cloned().collect())
    }

    /// Forgets entries at or after `index`.
    pub(super) fn truncate(&mut self, index: u64) {
        while self.first + self.entries.len() as u64 > index {
            match self.entries.pop_back() {
                Some(e) => self.bytes -= entry_bytes(&e),
                None => break,
            }
        }
    }
}
