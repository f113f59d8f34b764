//! The bytes every loadgen record carries: who sent it, its sequence number, and when it was
//! due, so the consumer side can measure end-to-end latency and account for every record.

/// Magic, producer id, sequence, due time (µs since the Unix epoch).
pub const HEADER_LEN: usize = 4 + 4 + 8 + 8;
const MAGIC: [u8; 4] = *b"LGN1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub producer: u32,
    pub seq: u64,
    pub due_us: u64,
}

/// A value of `size` bytes (at least the header) carrying `s`.
pub fn encode(s: Stamp, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size.max(HEADER_LEN));
    v.extend_from_slice(&MAGIC);
    v.extend_from_slice(&s.producer.to_le_bytes());
    v.extend_from_slice(&s.seq.to_le_bytes());
    v.extend_from_slice(&s.due_us.to_le_bytes());
    v.resize(size.max(HEADER_LEN), b'.');
    v
}

/// The stamp of a loadgen value, or `None` for anything else.
pub fn decode(v: &[u8]) -> Option<Stamp> {
    if v.len() < HEADER_LEN || v[0..4] != MAGIC {
        return None;
    }
    Some(Stamp {
        producer: u32::from_le_bytes(v[4..8].try_into().ok()?),
        seq: u64::from_le_bytes(v[8..16].try_into().ok()?),
        due_us: u64::from_le_bytes(v[16..24].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Stamp {
            producer: 3,
            seq: 99,
            due_us: 1_700_000_000_000_000,
        };
        let v = encode(s, 100);
        assert_eq!(v.len(), 100);
        assert_eq!(decode(&v), Some(s));
        assert_eq!(decode(b"nope"), None);
    }
}
