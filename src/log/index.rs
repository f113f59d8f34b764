//! The sparse offset and time index of one segment, and their file formats.
//!
//! One entry every `index_interval_bytes` of log: the batch that starts at `position` has base
//! offset `segment base + rel_offset`, and every record before it has a timestamp of at most
//! `max_ts_before`. The running maximum makes the time index monotone even when producers send
//! timestamps out of order, so a lookup is a binary search followed by a short scan.
//!
//! The index of the active segment lives in memory only and is rebuilt by the recovery scan;
//! when a segment is sealed its index is written to `.index` and `.timeindex` files, each with
//! a checksum, and a missing or corrupt file is rebuilt by scanning the segment.

use crate::types::{Offset, TimestampMs};

const OFFSET_MAGIC: [u8; 4] = *b"TIDX";
const TIME_MAGIC: [u8; 4] = *b"TTIX";
const FILE_VERSION: u8 = 1;
const FILE_HEADER_LEN: usize = 16;
const SUMMARY_LEN: usize = 24;
const OFFSET_ENTRY_LEN: usize = 8;
const TIME_ENTRY_LEN: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// Offset of the batch starting at `position`, relative to the segment base.
    pub rel_offset: u32,
    /// Byte position of that batch in the segment file.
    pub position: u32,
    /// The largest record timestamp before `position`.
    pub max_ts_before: TimestampMs,
}

/// What a sealed segment's `.index` file records about the segment itself, so that opening it
/// needs no scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Bytes of valid batches in the segment file.
    pub size: u64,
    /// The offset after the segment's last record.
    pub next_offset: Offset,
    pub max_timestamp: TimestampMs,
}

/// The in-memory sparse index of one segment.
#[derive(Clone, Debug, Default)]
pub struct SparseIndex {
    entries: Vec<IndexEntry>,
    interval_bytes: u32,
}

impl SparseIndex {
    pub fn new(interval_bytes: u32) -> Self {
        Self {
            entries: Vec::new(),
            interval_bytes: interval_bytes.max(1),
        }
    }

    pub fn entries(&self) -> &[IndexEntry] {
        &self.entries
    }

    /// Called for every batch appended at `position`; adds an entry when the interval has passed
    /// since the last one (the first batch of a segment is never indexed: position 0 is implied).
    pub fn on_batch(&mut self, rel_offset: u32, position: u32, max_ts_before: TimestampMs) {
        let last_pos = self.entries.last().map_or(0, |e| e.position);
        if position >= last_pos.saturating_add(self.interval_bytes) {
            self.entries.push(IndexEntry {
                rel_offset,
                position,
                max_ts_before,
            });
        }
    }

    /// Position to start scanning for `rel_offset`: the last indexed batch at or before it.
    pub fn position_for_offset(&self, rel_offset: u32) -> u32 {
        let i = self.entries.partition_point(|e| e.rel_offset <= rel_offset);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].position
        }
    }

    /// Position to start scanning for the first record with timestamp ≥ `ts`: every record
    /// before it is older than `ts`.
    pub fn position_for_timestamp(&self, ts: TimestampMs) -> u32 {
        let i = self.entries.partition_point(|e| e.max_ts_before < ts);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].position
        }
    }

    /// Drops entries at or past `position` (after a truncation).
    pub fn truncate_to(&mut self, position: u32) {
        let i = self.entries.partition_point(|e| e.position < position);
        self.entries.truncate(i);
    }

    /// Encodes the `.index` file: header, segment summary, entries.
    pub fn encode_offset_file(&self, summary: &SegmentSummary) -> Vec<u8> {
        let mut body = Vec::with_capacity(SUMMARY_LEN + self.entries.len() * OFFSET_ENTRY_LEN);
        body.extend_from_slice(&summary.size.to_le_bytes());
        body.extend_from_slice(&summary.next_offset.0.to_le_bytes());
        body.extend_from_slice(&summary.max_timestamp.0.to_le_bytes());
        for e in &self.entries {
            body.extend_from_slice(&e.rel_offset.to_le_bytes());
            body.extend_from_slice(&e.position.to_le_bytes());
        }
        frame(OFFSET_MAGIC, self.entries.len(), body)
    }

    /// Encodes the `.timeindex` file: header, entries.
    pub fn encode_time_file(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.entries.len() * TIME_ENTRY_LEN);
        for e in &self.entries {
            body.extend_from_slice(&e.max_ts_before.0.to_le_bytes());
            body.extend_from_slice(&e.rel_offset.to_le_bytes());
        }
        frame(TIME_MAGIC, self.entries.len(), body)
    }

    /// Decodes both files of a sealed segment. `None` when either is corrupt, they disagree, or
    /// they do not fit a segment file of `file_len` bytes: the caller then rebuilds by scanning.
    pub fn decode_files(
        offset_file: &[u8],
        time_file: &[u8],
        interval_bytes: u32,
        base: Offset,
        file_len: u64,
    ) -> Option<(SparseIndex, SegmentSummary)> {
        let (n, body) = unframe(OFFSET_MAGIC, offset_file)?;
        let (m, tbody) = unframe(TIME_MAGIC, time_file)?;
        if n != m
            || body.len() != SUMMARY_LEN + n * OFFSET_ENTRY_LEN
            || tbody.len() != n * TIME_ENTRY_LEN
        {
            return None;
        }
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let summary = SegmentSummary {
            size: u64_at(body, 0),
            next_offset: Offset(u64_at(body, 8)),
            max_timestamp: TimestampMs(u64_at(body, 16) as i64),
        };
        if summary.size > file_len || summary.next_offset < base {
            return None;
        }
        let mut entries = Vec::with_capacity(n);
        for i in 0..n {
            let o = SUMMARY_LEN + i * OFFSET_ENTRY_LEN;
            let t = i * TIME_ENTRY_LEN;
            let e = IndexEntry {
                rel_offset: u32_at(body, o),
                position: u32_at(body, o + 4),
                max_ts_before: TimestampMs(u64_at(tbody, t) as i64),
            };
            if u32_at(tbody, t + 8) != e.rel_offset
                || e.position as u64 >= summary.size
                || base.0 + e.rel_offset as u64 >= summary.next_offset.0
            {
                return None;
            }
            if let Some(p) = entries.last() {
                let p: &IndexEntry = p;
                if e.rel_offset <= p.rel_offset
                    || e.position <= p.position
                    || e.max_ts_before < p.max_ts_before
                {
                    return None;
                }
            }
            entries.push(e);
        }
        Some((
            SparseIndex {
                entries,
                interval_bytes: interval_bytes.max(1),
            },
            summary,
        ))
    }
}

/// `[magic 4][version 1][reserved 3][count u32][crc32c u32 of body]` then the body.
fn frame(magic: [u8; 4], count: usize, body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(FILE_HEADER_LEN + body.len());
    out.extend_from_slice(&magic);
    out.extend_from_slice(&[FILE_VERSION, 0, 0, 0]);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a framed file (which may carry zero padding after the body) and returns the entry
/// count and body.
fn unframe(magic: [u8; 4], buf: &[u8]) -> Option<(usize, &[u8])> {
    if buf.len() < FILE_HEADER_LEN || buf[0..4] != magic || buf[4..8] != [FILE_VERSION, 0, 0, 0] {
        return None;
    }
    let count = u32::from_le_bytes(buf[8..12].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf[12..16].try_into().ok()?);
    let entry_len = if magic == OFFSET_MAGIC {
        OFFSET_ENTRY_LEN
    } else {
        TIME_ENTRY_LEN
    };
    let extra = if magic == OFFSET_MAGIC {
        SUMMARY_LEN
    } else {
        0
    };
    let body_len = count.checked_mul(entry_len)?.checked_add(extra)?;
    let body = buf.get(FILE_HEADER_LEN..FILE_HEADER_LEN.checked_add(body_len)?)?;
    (crc32c::crc32c(body) == crc).then_some((count, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SparseIndex {
        let mut ix = SparseIndex::new(100);
        let mut ts = 0;
        for i in 0..50u32 {
            ix.on_batch(i, i * 40, TimestampMs(ts));
            ts += 10;
        }
        ix
    }

    #[test]
    fn lookups() {
        let ix = sample();
        // Entries every ≥100 bytes: batches at 120 (rel 3), 240 (rel 6), ...
        assert_eq!(ix.entries()[0].position, 120);
        assert_eq!(ix.position_for_offset(0), 0);
        assert_eq!(ix.position_for_offset(3), 120);
        assert_eq!(ix.position_for_offset(5), 120);
        assert_eq!(ix.position_for_offset(6), 240);
        assert_eq!(ix.position_for_timestamp(TimestampMs(0)), 0);
        assert_eq!(ix.position_for_timestamp(TimestampMs(31)), 120);
    }

    #[test]
    fn files_round_trip_and_reject_damage() {
        let ix = sample();
        let summary = SegmentSummary {
            size: 2000,
            next_offset: Offset(1050),
            max_timestamp: TimestampMs(490),
        };
        let mut of = ix.encode_offset_file(&summary);
        let tf = ix.encode_time_file();
        of.extend_from_slice(&[0; 100]); // padding is ignored
        let (back, s) = SparseIndex::decode_files(&of, &tf, 100, Offset(1000), 2000).unwrap();
        assert_eq!(back.entries(), ix.entries());
        assert_eq!(s, summary);
        // A file shorter than the summary claims is rejected.
        assert!(SparseIndex::decode_files(&of, &tf, 100, Offset(1000), 1999).is_none());
        for i in 0..of.len() - 100 {
            let mut bad = of.clone();
            bad[i] ^= 0x10;
            assert!(
                SparseIndex::decode_files(&bad, &tf, 100, Offset(1000), 2000).is_none(),
                "flip at {i}"
            );
        }
        assert!(
            SparseIndex::decode_files(&of[..of.len() - 101], &tf, 100, Offset(1000), 2000)
                .is_none()
        );
    }

    #[test]
    fn truncate_drops_entries_at_and_after() {
        let mut ix = sample();
        ix.truncate_to(240);
        assert_eq!(ix.entries().len(), 1);
    }
}
