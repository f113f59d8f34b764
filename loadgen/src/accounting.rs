//! Correctness accounting: which records were acknowledged, which were delivered, and how
//! often each was delivered and in what order.

use std::collections::HashMap;

/// A growable bitset indexed by sequence number.
#[derive(Default, Clone)]
pub struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was already set.
    pub fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }

    /// The indexes of the set bits, in order.
    pub fn ones(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, bits) in self.0.iter().enumerate() {
            for b in 0..64 {
                if bits & (1 << b) != 0 {
                    out.push(w as u64 * 64 + b);
                }
            }
        }
        out
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Bits set here and not in `other`.
    pub fn count_missing_from(&self, other: &Bits) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.0.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

/// Everything seen, per producer.
#[derive(Default)]
pub struct Ledger {
    pub acked: HashMap<u32, Bits>,
    pub delivered: HashMap<u32, Bits>,
    /// partition → last offset delivered.
    last: HashMap<u32, u64>,
    pub duplicated: u64,
    pub reordered: u64,
    /// The first few out-of-order deliveries: (partition, offset, previous offset).
    pub reorder_samples: Vec<(u32, u64, u64)>,
}

impl Ledger {
    pub fn ack(&mut self, producer: u32, seq: u64) {
        self.acked.entry(producer).or_default().set(seq);
    }

    /// A delivery of `producer`'s record `seq` at `offset` of `partition`. Order is judged by
    /// offsets: within a partition each delivery must come after the previous one. (A producer
    /// with several requests in flight has no order between them, as in Kafka.)
    pub fn deliver(&mut self, producer: u32, partition: u32, offset: u64, seq: u64) {
        if self.delivered.entry(producer).or_default().set(seq) {
            self.duplicated += 1;
        }
        match self.last.get_mut(&partition) {
            Some(last) if offset <= *last => {
                self.reordered += 1;
                if self.reorder_samples.len() < 10 {
                    self.reorder_samples.push((partition, offset, *last));
                }
            }
            Some(last) => *last = offset,
            None => {
                self.last.insert(partition, offset);
            }
        }
    }

    pub fn acked_count(&self) -> u64 {
        self.acked.values().map(Bits::count).sum()
    }

    pub fn delivered_count(&self) -> u64 {
        self.delivered.values().map(Bits::count).sum()
    }

    /// Every producer's acknowledged sequence numbers.
    pub fn acked_seqs(&self) -> std::collections::BTreeMap<u32, Vec<u64>> {
        self.acked.iter().map(|(p, b)| (*p, b.ones())).collect()
    }

    /// Acknowledged but never delivered.
    pub fn lost(&self) -> u64 {
        let empty = Bits::default();
        self.acked
            .iter()
            .map(|(p, a)| a.count_missing_from(self.delivered.get(p).unwrap_or(&empty)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lost_duplicated_reordered() {
        let mut l = Ledger::default();
        for s in 0..10 {
            l.ack(1, s);
        }
        for (off, s) in [
            (0, 0),
            (1, 1),
            (2, 2),
            (4, 5),
            (3, 4),
            (5, 4),
            (6, 6),
            (7, 7),
            (8, 8),
        ] {
            l.deliver(1, 0, off, s);
        }
        assert_eq!(l.acked_count(), 10);
        assert_eq!(l.delivered_count(), 8);
        assert_eq!(l.duplicated, 1);
        assert_eq!(l.reordered, 1); // offset 3 after offset 4
        assert_eq!(l.lost(), 2); // 3 and 9
    }
}
