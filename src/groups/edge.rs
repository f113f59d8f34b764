//! Group records from the member's region: a member whose call enters a node in another region
//! than its coordinator's (the metadata leader) gets its records from a replica near that node,
//! not carried across the WAN from the coordinator.
//!
//! The entry node relays the member's Consume call asking for references
//! (`tern-references`); the coordinator sends its deliveries with each record's key, headers
//! and value left out ([`strip`]: partition, offset, timestamp and delivery count stay); the
//! entry node reads those records from the nearest replica of each partition (its own, or one
//! in its region) and puts them back ([`fill`]) before the member sees them. Coordination
//! (assignments, commits, acks, redelivery) stays with the coordinator; only the bytes come
//! from nearby. Any replica's copy is the coordinator's: a delivered record is committed, and a
//! committed offset holds the same record on every replica (follower reads serve only
//! committed records, and wait for them).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::broker::{Broker, Origin, Read};
use crate::proto::v1 as pb;
use crate::raft::types::NodeId;
use crate::types::Offset;

/// How long the entry node tries to read the records of one delivery message (its replica may
/// be a heartbeat behind the coordinator's; a dead one is passed over for the next nearest).
const FILL_WAIT: Duration = Duration::from_secs(10);
/// One read's long poll.
const READ_WAIT: Duration = Duration::from_secs(1);
/// Bytes per read.
const READ_BYTES: usize = 4 << 20;
/// Records per read.
const READ_RECORDS: u64 = 10_000;
/// Wait after a failed read.
const RETRY: Duration = Duration::from_millis(100);

/// Whether records for a member entering here should come from this node's region: the
/// coordinator `node` is in another region (both labelled).
pub fn fill_here(broker: &Broker, coordinator: NodeId) -> bool {
    let me = &broker.member().region;
    !me.is_empty()
        && broker
            .cluster()
            .nodes
            .get(&coordinator)
            .is_some_and(|m| !m.region.is_empty() && m.region != *me)
}

/// Leaves out what [`fill`] reads again near the member: each record's key, headers and value.
pub fn strip(d: &mut pb::Deliveries) {
    for r in d.deliveries.iter_mut().filter_map(|d| d.record.as_mut()) {
        r.key = None;
        r.headers.clear();
        r.value = Default::default();
    }
}

/// Moves the deliveries of the wanted offsets below `end` to `gone`.
fn drop_below(offsets: &mut BTreeMap<u64, Vec<usize>>, end: u64, gone: &mut Vec<usize>) {
    let rest = offsets.split_off(&end);
    gone.extend(std::mem::replace(offsets, rest).into_values().flatten());
}

/// Puts back the records [`strip`] left out, read from the nearest replica of each partition
/// (after a failure there, from the others, and back). A record no replica near holds any
/// more (expired, or deleted by retention since the coordinator read it) is left out of the
/// message, as a reader skips such records. Fails only when the records cannot be read within
/// [`FILL_WAIT`].
pub async fn fill(broker: &Broker, topic: &str, d: &mut pb::Deliveries) -> Result<(), String> {
    // Partition → offset → the deliveries of that record (a record is delivered once per
    // message, but nothing here depends on it).
    let mut wanted: BTreeMap<u32, BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for (i, del) in d.deliveries.iter().enumerate() {
        if let Some(r) = &del.record {
            wanted
                .entry(r.partition)
                .or_default()
                .entry(r.offset)
                .or_default()
                .push(i);
        }
    }
    let deadline = Instant::now() + FILL_WAIT;
    let mut gone: Vec<usize> = Vec::new();
    for (p, mut offsets) in wanted {
        let mut at = offsets.keys().next().copied().unwrap_or(0);
        let mut last_error = String::new();
        let mut elsewhere = false;
        while let Some(&last) = offsets.keys().next_back() {
            let now = Instant::now();
            if now >= deadline {
                let first = offsets.keys().next().copied().unwrap_or(at);
                return Err(format!(
                    "partition {p} offset {first} could not be read near this node within {FILL_WAIT:?}{}",
                    if last_error.is_empty() { String::new() } else { format!(": {last_error}") }
                ));
            }
            let read = Read {
                from: Offset(at),
                max_records: (last + 1).saturating_sub(at).clamp(1, READ_RECORDS) as usize,
                max_bytes: READ_BYTES,
                max_wait: (deadline - now).min(READ_WAIT),
                raw: false,
            };
            // The topic as this node's metadata has it now (it may have caught up meanwhile).
            let result = match broker.topic(topic) {
                Ok(t) if elsewhere => broker.read_elsewhere(&t, p, read, &Origin::default()).await,
                Ok(t) => broker.read(&t, p, read, &Origin::default()).await,
                Err(e) => Err(e),
            };
            let r = match result {
                Ok(r) => r,
                // Deleted by retention since the coordinator read it.
                Err(e) if e.range().is_some_and(|(start, _)| at < start) => {
                    let start = e.range().map_or(at, |(s, _)| s);
                    drop_below(&mut offsets, start, &mut gone);
                    at = start;
                    continue;
                }
                Err(e) => {
                    last_error = e.to_string();
                    // Another replica may serve what this one cannot (not open, repaired).
                    elsewhere = !elsewhere;
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            for rec in r.records {
                if let Some(slots) = offsets.remove(&rec.offset) {
                    for i in slots {
                        if let Some(slot) = d.deliveries[i].record.as_mut() {
                            slot.key = rec.key.clone();
                            slot.headers = rec.headers.clone();
                            slot.value = rec.value.clone();
                            slot.timestamp_ms = rec.timestamp_ms;
                        }
                    }
                }
            }
            // The read covers everything below its next offset: a wanted offset there that it
            // did not return is a record readers no longer see (expired).
            drop_below(&mut offsets, r.next_offset, &mut gone);
            // On from the next wanted offset (queue redeliveries leave gaps between them).
            at = r
                .next_offset
                .max(at)
                .max(offsets.keys().next().copied().unwrap_or(0));
        }
    }
    if !gone.is_empty() {
        tracing::debug!(
            topic,
            records = gone.len(),
            "delivered records no longer readable near the member were left out"
        );
        let gone: std::collections::HashSet<usize> = gone.into_iter().collect();
        let mut i = 0;
        d.deliveries.retain(|_| {
            let keep = !gone.contains(&i);
            i += 1;
            keep
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_below_a_bound_are_dropped_with_their_deliveries() {
        let mut offsets: BTreeMap<u64, Vec<usize>> =
            [(1, vec![0]), (3, vec![1, 2]), (5, vec![3])].into();
        let mut gone = vec![9];
        drop_below(&mut offsets, 4, &mut gone);
        assert_eq!(gone, vec![9, 0, 1, 2]);
        assert_eq!(offsets, [(5, vec![3])].into());
        drop_below(&mut offsets, 5, &mut gone);
        assert_eq!(offsets.len(), 1, "the bound itself stays");
    }

    #[test]
    fn strip_keeps_what_identifies_a_delivery() {
        let mut d = pb::Deliveries {
            deliveries: vec![pb::Delivery {
                record: Some(pb::Record {
                    topic: "t".into(),
                    partition: 3,
                    offset: 42,
                    timestamp_ms: 7,
                    key: Some(b"k".to_vec().into()),
                    headers: vec![pb::Header {
                        key: "h".into(),
                        value: b"v".to_vec().into(),
                    }],
                    value: vec![1u8; 100].into(),
                }),
                delivery_count: 2,
            }],
            partition: 3,
            next_offset: 43,
        };
        strip(&mut d);
        let r = d.deliveries[0].record.as_ref().unwrap();
        assert_eq!((r.partition, r.offset, r.timestamp_ms), (3, 42, 7));
        assert!(r.key.is_none() && r.headers.is_empty() && r.value.is_empty());
        assert_eq!(d.deliveries[0].delivery_count, 2);
        assert_eq!((d.partition, d.next_offset), (3, 43));
    }
}
