//! Where each Raft entry still in the log sits: its first offset and term, by Raft index.
//! Rebuilt from the batch headers when the store opens (the log describes itself).

use std::collections::VecDeque;

use crate::log::LogError;
use crate::raft::types::{log_id, LogId};
use crate::types::Offset;

/// Where each entry still in the log sits: `slots[i]` is entry `first + i`.
#[derive(Default, Debug)]
pub(super) struct EntryMap {
    pub(super) first: u64,
    pub(super) slots: VecDeque<Slot>,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) base: Offset,
    pub(super) term: u64,
}

impl EntryMap {
    pub(super) fn next_index(&self) -> u64 {
        self.first + self.slots.len() as u64
    }

    pub(super) fn get(&self, index: u64) -> Option<Slot> {
        let i = index.checked_sub(self.first)?;
        self.slots.get(usize::try_from(i).ok()?).copied()
    }

    /// The offset after entry `index`, given the log's end (this store is the log's only
    /// writer, so the last entry ends where the log does).
    pub(super) fn end_of(&self, index: u64, log_end: Offset) -> Option<Offset> {
        self.get(index)?;
        Some(self.get(index + 1).map_or(log_end, |s| s.base))
    }

    pub(super) fn last(&self) -> Option<LogId> {
        let s = self.slots.back()?;
        Some(log_id(s.term, self.next_index() - 1))
    }

    pub(super) fn push(&mut self, index: u64, slot: Slot) -> Result<(), LogError> {
        if !self.slots.is_empty() && index != self.next_index() {
            return Err(LogError::Corrupt {
                path: String::new(),
                position: slot.base.0,
                reason: format!(
                    "raft entry {index} follows entry {} in the log",
                    self.next_index() - 1
                ),
            });
        }
        if self.slots.is_empty() {
            self.first = index;
        }
        self.slots.push_back(slot);
        Ok(())
    }

    /// Forgets entries at or after `index`.
    pub(super) fn truncate(&mut self, index: u64) {
        if self.get(index).is_some() {
            let keep = (index - self.first) as usize;
            self.slots.truncate(keep);
        }
    }

    /// Forgets every entry: the next one is `index + 1`.
    pub(super) fn restart_after(&mut self, index: u64) {
        self.slots.clear();
        self.first = index + 1;
    }

    /// Forgets entries up to and including `index`.
    pub(super) fn purge(&mut self, index: u64) {
        while !self.slots.is_empty() && self.first <= index {
            self.slots.pop_front();
            self.first += 1;
        }
        if self.slots.is_empty() {
            self.first = self.first.max(index + 1);
        }
    }
}
