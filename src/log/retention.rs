//! Which closed segments retention deletes: a pure function of the segments, the settings and
//! the clock, so it is tested without disks.

use crate::types::{Offset, TimestampMs};

/// What retention needs to know about a closed segment.
#[derive(Clone, Copy, Debug)]
pub struct SegmentInfo {
    pub size: u64,
    pub max_timestamp: TimestampMs,
    pub next_offset: Offset,
}

/// How many of the oldest closed segments to delete. Segments are deleted from the front only,
/// never the active one, and never one holding records at or past `committed` (a record that
/// replication has not settled must not vanish).
///
/// - by age: a segment goes when its newest record is older than `retention_ms`;
/// - by size: the oldest segment goes while the log, without it, still holds at least
///   `retention_bytes` (so the log keeps at least `retention_bytes` when it has them).
pub fn segments_to_delete(
    closed: &[SegmentInfo],
    active_size: u64,
    committed: Offset,
    retention_ms: Option<u64>,
    retention_bytes: Option<u64>,
    now: TimestampMs,
) -> usize {
    let mut total: u64 = closed.iter().map(|s| s.size).sum::<u64>() + active_size;
    let mut n = 0;
    for s in closed {
        if s.next_offset > committed {
            break;
        }
        let too_old = retention_ms.is_some_and(|ms| {
            s.max_timestamp.0 < now.0.saturating_sub(ms.min(i64::MAX as u64) as i64)
        });
        let too_big = retention_bytes.is_some_and(|max| total - s.size >= max);
        if !(too_old || too_big) {
            break;
        }
        total -= s.size;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs() -> Vec<SegmentInfo> {
        (0..5)
            .map(|i| SegmentInfo {
                size: 100,
                max_timestamp: TimestampMs(1000 * (i + 1)),
                next_offset: Offset(10 * (i as u64 + 1)),
            })
            .collect()
    }

    #[test]
    fn by_age() {
        let s = segs();
        // now - retention = 2500: segments with max ts 1000 and 2000 go.
        assert_eq!(
            segments_to_delete(&s, 0, Offset(100), Some(500), None, TimestampMs(3000)),
            2
        );
        assert_eq!(
            segments_to_delete(&s, 0, Offset(100), None, None, TimestampMs(3000)),
            0
        );
    }

    #[test]
    fn by_size_keeps_at_least_the_limit() {
        let s = segs();
        // 500 closed + 50 active; keep ≥ 220: delete 3 (550 → 250), a 4th would leave 150.
        assert_eq!(
            segments_to_delete(&s, 50, Offset(100), None, Some(220), TimestampMs(0)),
            3
        );
    }

    #[test]
    fn never_past_committed() {
        let s = segs();
        assert_eq!(
            segments_to_delete(&s, 0, Offset(25), Some(0), None, TimestampMs(i64::MAX)),
            2
        );
        assert_eq!(
            segments_to_delete(&s, 0, Offset(0), Some(0), None, TimestampMs(i64::MAX)),
            0
        );
    }
}
