//! What each replica knows of idempotent producers: per producer, the sequence numbers and
//! offsets of its last batches in this partition.
//!
//! The table is built by applying committed entries (every replica alike, and again from the
//! log after a restart), so a new leader knows every batch the old one committed: the dedup
//! state is replicated with the log itself. The leader checks each idempotent append against
//! it, and against its own proposals not yet applied (`Partition`'s pending list).
//!
//! Bounds (the guarantee's window, documented in docs/api.md): the last
//! [`BATCHES_PER_PRODUCER`] batches of each producer, and the [`PRODUCERS_MAX`] producers that
//! wrote most recently to the partition. Entries deleted by retention before a restart are not
//! replayed, so their producers are forgotten then.

use std::collections::{HashMap, VecDeque};

use crate::types::{Offset, ProducerId, RaftIndex, Sequence};

/// Batches remembered per producer: a retry of any of them is recognised.
pub const BATCHES_PER_PRODUCER: usize = 8;
/// Producers remembered per partition (those that wrote least recently are forgotten first).
pub const PRODUCERS_MAX: usize = 10_000;

/// One committed batch of a producer: sequences `first..=last` at offsets from `base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqBatch {
    pub first: i32,
    pub last: i32,
    pub base: Offset,
}

#[derive(Debug, Default)]
struct ProducerState {
    batches: VecDeque<SeqBatch>,
    /// When the producer last wrote (Raft index of its last batch): eviction order.
    touched: u64,
}

/// What the leader should do with an idempotent append of sequences `first..first + count`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next sequences (or the producer is unknown here): append.
    Append,
    /// Already committed: these are the offsets its records got.
    Duplicate(Vec<Offset>),
    /// Proposed earlier and not committed yet: the client should retry later.
    InFlight,
    /// Not the next sequence: `expected` is.
    OutOfOrder { expected: i64 },
}

#[derive(Debug, Default)]
pub struct ProducerTable {
    producers: HashMap<ProducerId, ProducerState>,
}

impl ProducerTable {
    /// Records a committed batch (called when applying it).
    pub fn applied(
        &mut self,
        id: ProducerId,
        first: Sequence,
        count: u32,
        base: Offset,
        index: RaftIndex,
    ) {
        if id == ProducerId::NONE || first.0 < 0 || count == 0 {
            return;
        }
        let last = (first.0 as i64 + count as i64 - 1).min(i32::MAX as i64) as i32;
        let p = self.producers.entry(id).or_default();
        p.batches.push_back(SeqBatch {
            first: first.0,
            last,
            base,
        });
        while p.batches.len() > BATCHES_PER_PRODUCER {
            p.batches.pop_front();
        }
        p.touched = index.0;
        if self.producers.len() > PRODUCERS_MAX {
            self.evict();
        }
    }

    /// Forgets the least recently active tenth of the producers (deterministic: by the index of
    /// their last batch, which every replica applies alike).
    fn evict(&mut self) {
        let mut touched: Vec<u64> = self.producers.values().map(|p| p.touched).collect();
        touched.sort_unstable();
        let cut = touched[touched.len() / 10];
        self.producers.retain(|_, p| p.touched > cut);
    }

    /// The last committed sequence of a producer.
    pub fn last_sequence(&self, id: ProducerId) -> Option<i32> {
        self.producers
            .get(&id)
            .and_then(|p| p.batches.back())
            .map(|b| b.last)
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Checks sequences `first..first + count` of producer `id`, given `pending`: the ranges of
    /// its batches proposed by this leader and not applied yet, in proposal order.
    pub fn check(
        &self,
        id: ProducerId,
        first: Sequence,
        count: u32,
        pending: &[(i32, i32)],
    ) -> SeqCheck {
        let first = first.0;
        let end = first as i64 + count as i64; // exclusive
        let committed_last = self.last_sequence(id);
        let last = pending
            .iter()
            .map(|p| p.1)
            .chain(committed_last)
            .max()
            .map(|l| l as i64);
        let Some(last) = last else {
            return SeqCheck::Append;
        };
        if first as i64 == last + 1 {
            return SeqCheck::Append;
        }
        if first as i64 > last + 1 {
            return SeqCheck::OutOfOrder { expected: last + 1 };
        }
        // A retry: of a batch in flight, or of committed ones.
        if pending
            .iter()
            .any(|&(f, l)| (f as i64) < end && l as i64 >= first as i64)
        {
            return SeqCheck::InFlight;
        }
        let batches = self.producers.get(&id).map(|p| &p.batches);
        let mut offsets = Vec::with_capacity(count as usize);
        for s in first as i64..end {
            let hit = batches.and_then(|bs| {
                bs.iter()
                    .find(|b| b.first as i64 <= s && s <= b.last as i64)
                    .map(|b| b.base.plus((s - b.first as i64) as u64))
            });
            match hit {
                Some(o) => offsets.push(o),
                // Older than what is remembered, or a different split of the sequences.
                None => return SeqCheck::OutOfOrder { expected: last + 1 },
            }
        }
        SeqCheck::Duplicate(offsets)
    }
}

/// Bytes per producer in [`ProducerTable::encode`]: id, touched, batch count.
const PRODUCER_HEAD: usize = 8 + 8 + 1;
/// Bytes per batch: first, last, base.
const BATCH_BYTES: usize = 4 + 4 + 8;

impl ProducerTable {
    /// Appends the table to `out` in a compact form (producers by id, each with its batches
    /// oldest first), for the applied checkpoint (`raft::store::checkpoint`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut ids: Vec<&ProducerId> = self.producers.keys().collect();
        ids.sort_unstable();
        out.reserve(4 + ids.len() * (PRODUCER_HEAD + 2 * BATCH_BYTES));
        out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids {
            let p = &self.producers[id];
            out.extend_from_slice(&id.0.to_le_bytes());
            out.extend_from_slice(&p.touched.to_le_bytes());
            out.push(p.batches.len() as u8);
            for b in &p.batches {
                out.extend_from_slice(&b.first.to_le_bytes());
                out.extend_from_slice(&b.last.to_le_bytes());
                out.extend_from_slice(&b.base.0.to_le_bytes());
            }
        }
    }

    /// Reads what [`encode`](Self::encode) wrote, refusing anything it could not have written
    /// (bounds, an empty or backwards batch, a repeated producer, trailing bytes).
    pub fn decode(buf: &[u8]) -> Result<Self, String> {
        let mut r = Reader(buf);
        let n = r.u32()? as usize;
        if n > PRODUCERS_MAX {
            return Err(format!("{n} producers, over {PRODUCERS_MAX}"));
        }
        let mut producers = HashMap::with_capacity(n);
        for _ in 0..n {
            let id = ProducerId(r.u64()? as i64);
            let touched = r.u64()?;
            let count = r.take(1)?[0] as usize;
            if id == ProducerId::NONE || count == 0 || count > BATCHES_PER_PRODUCER {
                return Err(format!("producer {} with {count} batches", id.0));
            }
            let mut batches = VecDeque::with_capacity(count);
            for _ in 0..count {
                let first = r.u32()? as i32;
                let last = r.u32()? as i32;
                let base = Offset(r.u64()?);
                if first < 0 || last < first {
                    return Err(format!("producer {}: batch {first}..={last}", id.0));
                }
                batches.push_back(SeqBatch { first, last, base });
            }
            if producers
                .insert(id, ProducerState { batches, touched })
                .is_some()
            {
                return Err(format!("producer {} twice", id.0));
            }
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes after the table", r.0.len()));
        }
        Ok(ProducerTable { producers })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the producer table ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ProducerId = ProducerId(5);

    #[test]
    fn next_sequences_append_retries_are_duplicates_with_their_offsets() {
        let mut t = ProducerTable::default();
        assert_eq!(t.check(P, Sequence(0), 3, &[]), SeqCheck::Append);
        t.applied(P, Sequence(0), 3, Offset(10), RaftIndex(1));
        t.applied(P, Sequence(3), 2, Offset(20), RaftIndex(2));
        assert_eq!(t.check(P, Sequence(5), 1, &[]), SeqCheck::Append);
        assert_eq!(
            t.check(P, Sequence(0), 3, &[]),
            SeqCheck::Duplicate(vec![Offset(10), Offset(11), Offset(12)])
        );
        // A retry spanning two batches.
        assert_eq!(
            t.check(P, Sequence(2), 2, &[]),
            SeqCheck::Duplicate(vec![Offset(12), Offset(20)])
        );
        assert_eq!(
            t.check(P, Sequence(7), 1, &[]),
            SeqCheck::OutOfOrder { expected: 5 }
        );
        // Overlapping the committed end and going past it.
        assert_eq!(
            t.check(P, Sequence(4), 3, &[]),
            SeqCheck::OutOfOrder { expected: 5 }
        );
    }

    #[test]
    fn pending_batches_count_and_retries_of_them_are_in_flight() {
        let mut t = ProducerTable::default();
        t.applied(P, Sequence(0), 2, Offset(0), RaftIndex(1));
        let pending = [(2, 4)];
        assert_eq!(t.check(P, Sequence(5), 1, &pending), SeqCheck::Append);
        assert_eq!(t.check(P, Sequence(2), 3, &pending), SeqCheck::InFlight);
        assert_eq!(
            t.check(P, Sequence(2), 1, &[]),
            SeqCheck::Append,
            "not pending any more and not committed: it was never written"
        );
        assert_eq!(
            t.check(ProducerId(6), Sequence(0), 1, &[(0, 0)]),
            SeqCheck::InFlight
        );
    }

    #[test]
    fn the_table_survives_encoding_and_bad_bytes_are_refused() {
        let mut t = ProducerTable::default();
        for i in 0..12 {
            t.applied(
                P,
                Sequence(i * 2),
                2,
                Offset(i as u64 * 10),
                RaftIndex(i as u64),
            );
        }
        t.applied(ProducerId(9), Sequence(0), 1, Offset(500), RaftIndex(20));
        let mut buf = Vec::new();
        t.encode(&mut buf);
        let back = ProducerTable::decode(&buf).unwrap();
        for (id, first, count) in [(P, 16, 4), (P, 22, 2), (ProducerId(9), 0, 1), (P, 2, 1)] {
            assert_eq!(
                back.check(id, Sequence(first), count, &[]),
                t.check(id, Sequence(first), count, &[])
            );
        }
        assert_eq!(back.last_sequence(P), Some(23));
        assert_eq!(back.len(), 2);
        for cut in 0..buf.len() {
            assert!(ProducerTable::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(ProducerTable::decode(&longer).is_err());
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = ProducerTable::default();
        for i in 0..(BATCHES_PER_PRODUCER as i32 + 4) {
            t.applied(P, Sequence(i), 1, Offset(i as u64), RaftIndex(i as u64));
        }
        // The oldest batches are forgotten: their retries are no longer recognised.
        assert_eq!(
            t.check(P, Sequence(0), 1, &[]),
            SeqCheck::OutOfOrder { expected: 12 }
        );
        assert!(matches!(
            t.check(P, Sequence(11), 1, &[]),
            SeqCheck::Duplicate(_)
        ));
        for i in 0..(PRODUCERS_MAX as i64 + 1) {
            t.applied(
                ProducerId(100 + i),
                Sequence(0),
                1,
                Offset(0),
                RaftIndex(100 + i as u64),
            );
        }
        assert!(t.len() <= PRODUCERS_MAX);
        // The most recent ones are kept.
        assert!(t
            .last_sequence(ProducerId(100 + PRODUCERS_MAX as i64))
            .is_some());
    }
}
