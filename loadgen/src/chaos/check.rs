//! The final read: every replica read from its own node and compared with what was
//! acknowledged.

use super::*;

/// What the final read of every replica found.
#[derive(Default, Debug)]
pub struct Final {
    /// Records read, over all replicas.
    pub records: u64,
    /// Offsets where two replicas hold different records, or one holds a record the others do
    /// not have after they all caught up.
    pub divergent: u64,
    /// Acknowledged records missing from some replica.
    pub lost: u64,
    /// Records present twice in some replica (the same producer and sequence).
    pub duplicated: u64,
    pub samples: Vec<String>,
}

/// One replica's records: `(offset, producer, seq)`.
type Records = Vec<(u64, u32, u64)>;

/// Every replica of every partition: `(topic, partition)` → `(node index, its records)` for
/// the nodes that hold one.
type Replicas = BTreeMap<(String, u32), Vec<(usize, Records)>>;

/// The partitions of `topics` that the node at `addr` holds a replica of (ClusterInfo's
/// `local`).
pub(super) async fn held(addr: &str, topics: &[String]) -> anyhow::Result<Vec<(String, u32)>> {
    Ok(partitions_at(addr, topics)
        .await?
        .into_iter()
        .filter(|(_, p)| p.local)
        .map(|(t, p)| (t, p.partition))
        .collect())
}

/// Every committed record of `topic`/`partition` as the node at `addr` serves it: from its own
/// replica (all are in sync after the heal phase). `(offset, producer, seq)`.
pub async fn read_replica(
    addr: &str,
    topic: &str,
    partition: u32,
) -> anyhow::Result<Vec<(u64, u32, u64)>> {
    let mut c = crate::run::connect(addr).await?;
    let mut out = Vec::new();
    let mut at = 0u64;
    loop {
        let r = c
            .fetch(pb::FetchRequest {
                topic: topic.into(),
                partition,
                offset: at,
                max_records: 10_000,
                max_bytes: 0,
                max_wait_ms: 0,
                raw_batches: false,
                topic_uid: 0,
            })
            .await?
            .into_inner();
        for rec in &r.records {
            if let Some(s) = payload::decode(&rec.value) {
                out.push((rec.offset, s.producer, s.seq));
            }
        }
        if r.records.is_empty() || r.next_offset >= r.high_watermark {
            return Ok(out);
        }
        at = r.next_offset;
    }
}

/// Reads every replica of every partition through the node that holds it (a node without a
/// replica of a partition is not asked: it would relay the read to another), once all
/// replicas of each partition agree on how far it goes (or after `wait`), and compares them
/// with each other and with what was acknowledged (`acked[producer]` = acknowledged sequence
/// numbers).
pub async fn check_replicas(
    addrs: &[(usize, String)],
    topics: &[String],
    partitions: u32,
    replication_factor: usize,
    acked: &BTreeMap<u32, Vec<u64>>,
    wait: Duration,
) -> Final {
    let mut f = Final::default();
    let deadline = Instant::now() + wait;
    let mut replicas: Replicas = BTreeMap::new();
    loop {
        replicas.clear();
        let mut failed = None;
        for (i, a) in addrs.iter().map(|(i, a)| (*i, a)) {
            let mine = match held(a, topics).await {
                Ok(h) => h,
                Err(e) => {
                    failed = Some(format!("{a}: {e:#}"));
                    continue;
                }
            };
            for (t, p) in mine.into_iter().filter(|(_, p)| *p < partitions) {
                match read_replica(a, &t, p).await {
                    Ok(v) => replicas.entry((t, p)).or_default().push((i, v)),
                    Err(e) => failed = Some(format!("{a}: {e:#}")),
                }
            }
        }
        // Every partition through all its replicas: a node that has not opened its replica
        // yet after a restart does not list it, and must not be left out of the check.
        let short: Vec<String> = topics
            .iter()
            .flat_map(|t| (0..partitions).map(move |p| (t.clone(), p)))
            .filter_map(|key| {
                let n = replicas.get(&key).map_or(0, Vec::len);
                (n < replication_factor).then(|| {
                    format!(
                        "{}/{} read from {n} of {replication_factor} replicas",
                        key.0, key.1
                    )
                })
            })
            .collect();
        let agree = failed.is_none()
            && short.is_empty()
            && replicas
                .values()
                .all(|holders| holders.windows(2).all(|w| w[0].1.len() == w[1].1.len()));
        if agree || Instant::now() >= deadline {
            if let Some(e) = failed {
                f.samples.push(format!("a replica could not be read: {e}"));
            }
            f.samples.extend(short);
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    compare(&replicas, replication_factor, acked, &mut f);
    f
}

/// Compares every partition's replicas with each other and with what was acknowledged, into
/// `f`.
pub(super) fn compare(
    replicas: &Replicas,
    replication_factor: usize,
    acked: &BTreeMap<u32, Vec<u64>>,
    f: &mut Final,
) {
    // Divergence: every holder of a partition against its first.
    for (key, holders) in replicas {
        let Some((first, base)) = holders.first() else {
            continue;
        };
        for (i, other) in holders.iter().skip(1) {
            for k in 0..base.len().max(other.len()) {
                if base.get(k) != other.get(k) {
                    f.divergent += 1;
                    if f.samples.len() < 10 {
                        f.samples.push(format!(
                            "{}/{}: node {} has {:?}, node {} has {:?} at position {k}",
                            key.0,
                            key.1,
                            first + 1,
                            base.get(k),
                            i + 1,
                            other.get(k)
                        ));
                    }
                }
            }
        }
    }
    // Per replica: records held twice, and acknowledged records that another replica of the
    // same partition holds but this one lacks. An acknowledged record no replica holds is
    // missing from all of them: counted once per replica a partition should have.
    let acked: std::collections::HashSet<(u32, u64)> = acked
        .iter()
        .flat_map(|(p, seqs)| seqs.iter().map(move |s| (*p, *s)))
        .collect();
    let mut found = std::collections::HashSet::new();
    for holders in replicas.values() {
        let held: Vec<std::collections::HashSet<(u32, u64)>> = holders
            .iter()
            .map(|(_, records)| records.iter().map(|&(_, p, s)| (p, s)).collect())
            .collect();
        let union: std::collections::HashSet<(u32, u64)> = held.iter().flatten().copied().collect();
        for ((_, records), set) in holders.iter().zip(&held) {
            f.records += records.len() as u64;
            f.duplicated += (records.len() - set.len()) as u64;
            f.lost += union
                .iter()
                .filter(|r| acked.contains(r) && !set.contains(r))
                .count() as u64;
        }
        found.extend(union);
    }
    f.lost += (acked.iter().filter(|r| !found.contains(r)).count() * replication_factor) as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: u32) -> (String, u32) {
        ("t".to_string(), p)
    }

    /// The checker finds what it is for: a record one replica lacks, one no replica holds, a
    /// record held twice, and two replicas disagreeing at an offset; and a clean set is clean.
    #[test]
    fn the_replica_check_finds_loss_duplicates_and_divergence() {
        let acked = BTreeMap::from([(1, vec![0, 1, 2, 3])]);
        let clean = |n: u64| -> Records { (0..n).map(|s| (s, 1, s)).collect() };
        let mut replicas: Replicas =
            BTreeMap::from([(key(0), vec![(0, clean(4)), (1, clean(4)), (2, clean(4))])]);
        let mut f = Final::default();
        compare(&replicas, 3, &acked, &mut f);
        assert_eq!(
            (f.records, f.lost, f.duplicated, f.divergent),
            (12, 0, 0, 0)
        );

        // Node 3's replica lacks seq 3; seq 3 is elsewhere, so it is lost once (and diverges
        // at its offset).
        replicas.get_mut(&key(0)).unwrap()[2].1 = clean(3);
        let mut f = Final::default();
        compare(&replicas, 3, &acked, &mut f);
        assert_eq!((f.lost, f.divergent), (1, 1));

        // Seq 4 acknowledged and held by nobody: missing from all three replicas.
        let more = BTreeMap::from([(1, vec![0, 1, 2, 3, 4])]);
        let mut f = Final::default();
        compare(&replicas, 3, &more, &mut f);
        assert_eq!(f.lost, 1 + 3);

        // A record held twice by one replica, and a different record at one offset.
        let mut twice = clean(4);
        twice.push((4, 1, 0));
        let mut other = clean(4);
        other[1] = (1, 2, 9);
        let replicas: Replicas =
            BTreeMap::from([(key(0), vec![(0, clean(4)), (1, twice), (2, other)])]);
        let mut f = Final::default();
        compare(&replicas, 3, &acked, &mut f);
        assert_eq!(f.duplicated, 1);
        // Node 2 has one record more, node 3 one different: two positions diverge.
        assert_eq!(f.divergent, 2);
        // Node 3 lacks seq 1 (it holds producer 2's record there).
        assert_eq!(f.lost, 1);
    }
}
