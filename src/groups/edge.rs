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
use std::time::Duration;

use tokio::time::Instant;

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
    fill_by(topic, d, FILL_WAIT, |p, read, elsewhere| async move {
        // The topic as this node's metadata has it now (it may have caught up meanwhile).
        match broker.topic(topic) {
            Ok(t) if elsewhere => broker.read_elsewhere(&t, p, read, &Origin::default()).await,
            Ok(t) => broker.read(&t, p, read, &Origin::default()).await,
            Err(e) => Err(e),
        }
    })
    .await
}

/// [`fill`] with its reads made by `read(partition, read, elsewhere)`: from the nearest
/// replica, or (`elsewhere`) from another one. Fails when the records cannot be read within
/// `wait`.
async fn fill_by<F, Fut>(
    topic: &str,
    d: &mut pb::Deliveries,
    wait: Duration,
    mut read_by: F,
) -> Result<(), String>
where
    F: FnMut(u32, Read, bool) -> Fut,
    Fut: std::future::Future<Output = crate::broker::Result<pb::FetchResponse>>,
{
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
    let deadline = Instant::now() + wait;
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
                    "partition {p} offset {first} could not be read near this node within {wait:?}{}",
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
            let r = match read_by(p, read, elsewhere).await {
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
    use std::cell::RefCell;

    use super::*;
    use crate::broker::BrokerError;

    /// A replica as a fake read sees it: offsets `start..end` held, `expired` ones hidden.
    #[derive(Clone)]
    struct Replica {
        start: u64,
        end: u64,
        expired: Vec<u64>,
        up: bool,
    }

    impl Replica {
        fn holding(start: u64, end: u64) -> Replica {
            Replica {
                start,
                end,
                expired: Vec::new(),
                up: true,
            }
        }

        fn read(&self, p: u32, read: &Read) -> crate::broker::Result<pb::FetchResponse> {
            if !self.up {
                return Err(BrokerError::NotReady { node: NodeId(9) });
            }
            let from = read.from.0;
            if from < self.start {
                return Err(BrokerError::Core(crate::shard::CoreError::Log(
                    crate::log::LogError::OffsetOutOfRange {
                        requested: read.from,
                        start: Offset(self.start),
                        end: Offset(self.end),
                    },
                )));
            }
            let upto = self.end.min(from + read.max_records as u64).max(from);
            let records = (from..upto)
                .filter(|o| !self.expired.contains(o))
                .map(|o| pb::Record {
                    topic: "t".into(),
                    partition: p,
                    offset: o,
                    timestamp_ms: 1000 + o as i64,
                    key: Some(format!("k{o}").into_bytes().into()),
                    headers: Vec::new(),
                    value: format!("v{o}").into_bytes().into(),
                })
                .collect();
            Ok(pb::FetchResponse {
                records,
                next_offset: upto,
                ..Default::default()
            })
        }
    }

    /// Stripped deliveries of `(partition, offset)`.
    fn deliveries(of: &[(u32, u64)]) -> pb::Deliveries {
        let mut d = pb::Deliveries {
            deliveries: of
                .iter()
                .map(|&(partition, offset)| pb::Delivery {
                    record: Some(pb::Record {
                        topic: "t".into(),
                        partition,
                        offset,
                        ..Default::default()
                    }),
                    delivery_count: 1,
                })
                .collect(),
            partition: 0,
            next_offset: 0,
        };
        strip(&mut d);
        d
    }

    /// (partition, offset, value) of each delivery.
    fn filled(d: &pb::Deliveries) -> Vec<(u32, u64, String)> {
        d.deliveries
            .iter()
            .map(|x| {
                let r = x.record.as_ref().unwrap();
                (
                    r.partition,
                    r.offset,
                    String::from_utf8_lossy(&r.value).into_owned(),
                )
            })
            .collect()
    }

    /// Fills `d` from `near` and `far` (partition → replica), noting each read's replica.
    async fn fill_from(
        d: &mut pb::Deliveries,
        near: &RefCell<BTreeMap<u32, Replica>>,
        far: &RefCell<BTreeMap<u32, Replica>>,
        wait: Duration,
        reads: &RefCell<Vec<bool>>,
    ) -> Result<(), String> {
        fill_by("t", d, wait, |p, read, elsewhere| async move {
            reads.borrow_mut().push(elsewhere);
            let replicas = if elsewhere { far } else { near };
            let r = replicas.borrow().get(&p).cloned().expect("a replica");
            // A real read waits for records (long poll): let the test move meanwhile.
            tokio::task::yield_now().await;
            r.read(p, &read)
        })
        .await
    }

    #[tokio::test]
    async fn records_deleted_or_expired_since_the_coordinator_read_them_are_left_out() {
        // Partition 0 lost offsets 3 and 4 to retention; partition 1's offset 11 expired.
        let mut one = Replica::holding(0, 20);
        one.expired.push(11);
        let near = RefCell::new(BTreeMap::from([(0, Replica::holding(5, 20)), (1, one)]));
        let far = RefCell::new(BTreeMap::new());
        let reads = RefCell::new(Vec::new());
        let mut d = deliveries(&[(0, 3), (0, 4), (0, 7), (1, 10), (1, 11), (1, 12)]);
        fill_from(&mut d, &near, &far, FILL_WAIT, &reads)
            .await
            .expect("filled");
        assert_eq!(
            filled(&d),
            vec![
                (0, 7, "v7".into()),
                (1, 10, "v10".into()),
                (1, 12, "v12".into())
            ]
        );
        let r = d.deliveries[0].record.as_ref().unwrap();
        assert_eq!(r.key.as_deref(), Some(&b"k7"[..]));
        assert_eq!(r.timestamp_ms, 1007);
        assert!(
            reads.borrow().iter().all(|e| !e),
            "all from the near replica"
        );
    }

    #[tokio::test]
    async fn a_replica_that_fails_is_passed_over_for_another() {
        let mut down = Replica::holding(0, 10);
        down.up = false;
        let near = RefCell::new(BTreeMap::from([(0, down)]));
        let far = RefCell::new(BTreeMap::from([(0, Replica::holding(0, 10))]));
        let reads = RefCell::new(Vec::new());
        let mut d = deliveries(&[(0, 2), (0, 8)]);
        fill_from(&mut d, &near, &far, FILL_WAIT, &reads)
            .await
            .expect("filled");
        assert_eq!(filled(&d), vec![(0, 2, "v2".into()), (0, 8, "v8".into())]);
        assert_eq!(*reads.borrow(), vec![false, true]);
    }

    #[tokio::test]
    async fn a_replica_behind_the_coordinator_is_read_again_until_it_has_caught_up() {
        // The near replica holds up to offset 5 at first, all of it from its third read on.
        let near = RefCell::new(BTreeMap::from([(0, Replica::holding(0, 6))]));
        let far = RefCell::new(BTreeMap::new());
        let reads = RefCell::new(Vec::new());
        let mut d = deliveries(&[(0, 4), (0, 9)]);
        let catch_up = async {
            while reads.borrow().len() < 2 {
                tokio::task::yield_now().await;
            }
            near.borrow_mut().get_mut(&0).unwrap().end = 10;
        };
        let (done, ()) = tokio::join!(fill_from(&mut d, &near, &far, FILL_WAIT, &reads), catch_up);
        done.expect("filled");
        assert_eq!(filled(&d), vec![(0, 4, "v4".into()), (0, 9, "v9".into())]);
        assert!(reads.borrow().len() >= 3);
    }

    #[tokio::test]
    async fn records_no_replica_can_serve_fail_the_fill_once_its_wait_is_over() {
        let mut down = Replica::holding(0, 10);
        down.up = false;
        let near = RefCell::new(BTreeMap::from([(0, down.clone())]));
        let far = RefCell::new(BTreeMap::from([(0, down)]));
        let reads = RefCell::new(Vec::new());
        let mut d = deliveries(&[(0, 3), (0, 4)]);
        let e = fill_from(&mut d, &near, &far, Duration::from_secs(2), &reads)
            .await
            .expect_err("no replica serves");
        assert!(
            e.starts_with("partition 0 offset 3 could not be read"),
            "{e}"
        );
        assert!(e.contains("still loading"), "the last error is named: {e}");
        // Both replicas were tried, in turn.
        let r = reads.borrow();
        assert!(r.len() >= 2 && r.windows(2).all(|w| w[0] != w[1]), "{r:?}");
    }

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
