//! Random operations on a real log, checked after every step against a simple in-memory model.
//! Seeded: a failure prints the seed, and `TERN_SEED=<seed>` replays exactly that run.

mod common;

use common::{batch, run};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tern::log::{Assign, FsyncPolicy, Log, LogConfig, LogError, ReadBound};
use tern::types::{Offset, Term, TimestampMs};

/// What the log should hold: every record's (tag, index-in-batch) and batch boundaries.
#[derive(Default)]
struct Model {
    start: u64,
    /// records[i] is offset start + i: (batch tag, index in batch, batch base)
    records: Vec<(u64, u32, u64)>,
    committed: u64,
}

impl Model {
    fn next(&self) -> u64 {
        self.start + self.records.len() as u64
    }
    fn batch_bases(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.records.iter().map(|r| r.2).collect();
        v.dedup();
        v
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 4096,
        index_interval_bytes: 256,
        retention_ms: None,
        retention_bytes: None,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}

async fn check_read(log: &Log, m: &Model, from: u64, budget: usize) {
    let r = log
        .read(Offset(from), budget, ReadBound::Committed)
        .await
        .unwrap_or_else(|e| panic!("read at {from}: {e}"));
    let got: Vec<(u64, Vec<u8>)> = r
        .records(TimestampMs(0))
        .map(|rec| (rec.offset.0, rec.value.to_vec()))
        .collect();
    if from < m.committed {
        assert!(
            !got.is_empty(),
            "read at {from} below committed {} returned nothing",
            m.committed
        );
    }
    for (k, (off, val)) in got.iter().enumerate() {
        assert_eq!(*off, from + k as u64, "offsets contiguous from {from}");
        assert!(*off < m.committed, "read past committed");
        let (tag, i, _) = m.records[(off - m.start) as usize];
        let want = format!("{tag}:{i}:");
        assert!(
            val.starts_with(want.as_bytes()),
            "offset {off}: wrong record"
        );
    }
}

async fn run_seed(seed: u64, ops: usize) {
    eprintln!("log model seed {seed} (replay with TERN_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut log = Log::open(dir.path(), config()).await.unwrap();
    let mut m = Model::default();
    let mut tag = 0u64;
    for step in 0..ops {
        let op = rng.random_range(0..100);
        match op {
            0..=44 => {
                tag += 1;
                let n = rng.random_range(1..8);
                let len = rng.random_range(1..400);
                let a = log
                    .append(
                        &batch(tag, n, len, 1000 + step as i64),
                        Assign::Next(Term(1)),
                    )
                    .await
                    .unwrap();
                assert_eq!(a.base.0, m.next(), "step {step}: base offset");
                for i in 0..n {
                    m.records.push((tag, i, a.base.0));
                }
            }
            45..=54 => {
                let p = log.positions();
                let to = rng.random_range(m.committed..=p.durable.0);
                log.set_committed(Offset(to)).unwrap();
                m.committed = to;
            }
            55..=59 => log.roll().await.unwrap(),
            60..=66 => {
                // Truncate at a batch boundary at or above committed, or try a bad one.
                let bases: Vec<u64> = m
                    .batch_bases()
                    .into_iter()
                    .filter(|&b| b >= m.committed)
                    .collect();
                if rng.random_range(0..4) == 0 && m.next() > m.committed + 1 {
                    let at = rng.random_range(m.committed..m.next());
                    match log.truncate_from(Offset(at)).await {
                        Ok(()) => {
                            assert!(bases.contains(&at), "truncated inside a batch at {at}");
                            m.records.truncate((at - m.start) as usize);
                        }
                        Err(LogError::NotABatchBoundary(_)) => assert!(!bases.contains(&at)),
                        Err(e) => panic!("step {step}: truncate at {at}: {e}"),
                    }
                } else if let Some(&at) = bases.get(rng.random_range(0..bases.len().max(1))) {
                    log.truncate_from(Offset(at)).await.unwrap();
                    m.records.truncate((at - m.start) as usize);
                }
            }
            67..=71 => {
                let at = rng.random_range(m.start..=m.next());
                log.delete_before(Offset(at)).await.unwrap();
                let start = log.positions().start.0;
                assert!(
                    start >= m.start && start <= at.max(m.start),
                    "start {start} for delete_before({at})"
                );
                assert!(
                    start <= m.committed.max(m.start),
                    "deleted uncommitted records"
                );
                if start < m.next() {
                    assert_eq!(
                        m.records[(start - m.start) as usize].2,
                        start,
                        "start is a batch base"
                    );
                }
                m.records.drain(..(start - m.start) as usize);
                m.start = start;
            }
            72..=77 => {
                drop(log);
                log = Log::open(dir.path(), config()).await.unwrap();
                // The committed position is replication's to restore; the log starts it at
                // its start. Everything appended was durable (`always`).
                m.committed = m.start;
                let p = log.positions();
                assert_eq!(p.durable.0, m.next());
                log.set_committed(Offset(m.next())).unwrap();
                m.committed = m.next();
            }
            _ => {
                if m.next() > m.start {
                    let from = rng.random_range(m.start..m.next());
                    let budget = rng.random_range(1..6000);
                    check_read(&log, &m, from, budget).await;
                }
            }
        }
        let p = log.positions();
        assert_eq!(p.next.0, m.next(), "step {step}: log end");
        assert_eq!(p.start.0, m.start, "step {step}: log start");
        assert!(p.committed <= p.durable && p.durable <= p.written && p.written <= p.next);
    }
    // Finally every committed record reads back, in order.
    log.set_committed(log.positions().durable).unwrap();
    m.committed = m.next();
    let mut at = m.start;
    while at < m.next() {
        check_read(&log, &m, at, 4096).await;
        let r = log
            .read(Offset(at), 4096, ReadBound::Committed)
            .await
            .unwrap();
        at = r.next_offset().0;
    }
}

#[test]
fn random_operations_match_the_model() {
    let seeds: Vec<u64> = match std::env::var("TERN_SEED") {
        Ok(s) => vec![s.parse().expect("TERN_SEED is a number")],
        Err(_) => {
            let fresh = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            (1..=12).chain([fresh]).collect()
        }
    };
    for seed in seeds {
        run(move || run_seed(seed, 400));
    }
}
