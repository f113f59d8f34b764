//! LEB128 varints and zigzag, with every read bounded by the input.

/// At most 10 bytes encode a `u64`.
pub const MAX_VARINT_LEN: usize = 10;

/// Appends `v` as an unsigned LEB128 varint.
pub fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` zigzag-encoded, so small negative numbers stay short.
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_u64(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Bytes `v` takes as a varint.
pub fn len_u64(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads an unsigned varint from the front of `buf`: `(value, bytes used)`, or `None` when the
/// input ends early, runs past 10 bytes or overflows 64 bits.
pub fn get_u64(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().take(MAX_VARINT_LEN).enumerate() {
        let low = (b & 0x7f) as u64;
        if i == MAX_VARINT_LEN - 1 && low > 1 {
            return None; // would overflow 64 bits
        }
        v |= low << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Reads a zigzag varint.
pub fn get_i64(buf: &[u8]) -> Option<(i64, usize)> {
    get_u64(buf).map(|(u, n)| (((u >> 1) as i64) ^ -((u & 1) as i64), n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_edges() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            u32::MAX as u64,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut b = Vec::new();
            put_u64(&mut b, v);
            assert_eq!(b.len(), len_u64(v));
            assert_eq!(get_u64(&b), Some((v, b.len())));
        }
        for v in [0i64, -1, 1, -64, 64, i64::MIN, i64::MAX] {
            let mut b = Vec::new();
            put_i64(&mut b, v);
            assert_eq!(get_i64(&b), Some((v, b.len())));
        }
    }

    #[test]
    fn rejects_truncated_and_overlong() {
        assert_eq!(get_u64(&[]), None);
        assert_eq!(get_u64(&[0x80]), None);
        assert_eq!(get_u64(&[0xff; 11]), None);
        // 10th byte carrying more than one bit overflows.
        let mut b = vec![0xff; 9];
        b.push(0x02);
        assert_eq!(get_u64(&b), None);
    }
}
