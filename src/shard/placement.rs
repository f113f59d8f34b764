//! Which core owns a partition, and which partition a key goes to. Pure functions.

use crate::types::CoreId;

/// FNV-1a, 64 bit: small, fast, stable across builds and platforms (placement is persisted, and
/// clients in other languages can compute key → partition the same way).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash (Lamping & Veach): maps `key` to one of `buckets`, moving only
/// 1/(n+1) of the keys when a bucket is added.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let buckets = buckets.max(1) as i64;
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The core owning `partition` of `topic` on a node with `cores` cores.
pub fn core_for(topic: &str, partition: u32, cores: usize) -> CoreId {
    let mut h = fnv1a(topic.as_bytes());
    h ^= fnv1a(&partition.to_le_bytes()).rotate_left(17);
    CoreId(jump_hash(h, cores as u32))
}

/// The core holding this node's replica of `key`'s group: the metadata group lives on core 0,
/// a partition where [`core_for`] puts it.
pub fn core_of(key: &crate::shard::PartitionKey, cores: usize) -> CoreId {
    if key.is_metadata() {
        return CoreId(0);
    }
    core_for(&key.topic, key.partition, cores)
}

/// The partition a keyed record goes to.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (fnv1a(key) % partitions.max(1) as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn jump_hash_is_balanced_and_stable() {
        let mut counts = [0u32; 4];
        for k in 0..40_000u64 {
            counts[jump_hash(fnv1a(&k.to_le_bytes()), 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
        // Growing from 4 to 5 buckets moves only keys into the new bucket.
        for k in 0..10_000u64 {
            let h = fnv1a(&k.to_le_bytes());
            let (a, b) = (jump_hash(h, 4), jump_hash(h, 5));
            assert!(a == b || b == 4);
        }
    }

    #[test]
    fn placement_is_deterministic_and_in_range() {
        for p in 0..100 {
            let c = core_for("orders", p, 3);
            assert!(c.0 < 3);
            assert_eq!(c, core_for("orders", p, 3));
        }
        assert_eq!(partition_for_key(b"k", 1), 0);
        assert!(partition_for_key(b"k", 7) < 7);
    }
}
