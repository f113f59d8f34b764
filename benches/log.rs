//! Storage benchmarks: append throughput (100 B and 1 KiB records, 1 and 100 records per batch,
//! `always` and `interval`, one append in flight and 32 in flight), sequential reads, and the
//! batch codec. Run: `cargo bench --bench log` (filter with a name, e.g. `-- append/always`).
//!
//! Throughput is reported in records/s ("elem/s"); MB/s = records/s × record size.

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutor, LocalExecutorBuilder, Placement};
use tern::log::batch::validate;
use tern::log::{Assign, Batch, BatchBuilder, FsyncPolicy, Log, LogConfig, ReadBound, Record};
use tern::types::{Offset, Term, TimestampMs};

fn executor() -> LocalExecutor {
    LocalExecutorBuilder::new(Placement::Unbound)
        .make()
        .expect("executor")
}

fn make_batch(records: usize, value_len: usize) -> Batch {
    let mut b = BatchBuilder::new(64 << 20);
    for i in 0..records {
        b.push(&Record {
            key: Some(Bytes::from(format!("key-{i}"))),
            value: Bytes::from(vec![0xab; value_len]),
            headers: vec![],
            timestamp: TimestampMs(1_700_000_000_000),
            ttl_ms: None,
        })
        .unwrap();
    }
    b.finish().unwrap()
}

fn config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes_max: 256 << 20,
        fsync,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn bench_append(c: &mut Criterion) {
    let ex = executor();
    let mut g = c.benchmark_group("append");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for (policy_name, policy) in [
        ("always", FsyncPolicy::Always),
        ("interval", FsyncPolicy::Interval(Duration::from_millis(10))),
    ] {
        for value_len in [100usize, 1024] {
            for per_batch in [1usize, 100] {
                for in_flight in [1usize, 32] {
                    let id = BenchmarkId::new(
                        policy_name,
                        format!("{value_len}B/{per_batch}per-batch/{in_flight}in-flight"),
                    );
                    g.throughput(Throughput::Elements(per_batch as u64));
                    let dir = tempfile::tempdir().unwrap();
                    let log = ex.run(Log::open(dir.path(), config(policy))).unwrap();
                    let batch = make_batch(per_batch, value_len);
                    g.bench_function(id, |b| {
                        b.iter_custom(|iters| {
                            ex.run(async {
                                let start = Instant::now();
                                let tasks: Vec<_> = (0..in_flight as u64)
                                    .map(|w| {
                                        let log = log.clone();
                                        let batch = batch.clone();
                                        let n = iters / in_flight as u64
                                            + u64::from(w < iters % in_flight as u64);
                                        glommio::spawn_local(async move {
                                            for _ in 0..n {
                                                log.append(&batch, Assign::Next(Term(1)))
                                                    .await
                                                    .unwrap();
                                            }
                                        })
                                    })
                                    .collect();
                                for t in tasks {
                                    t.await;
                                }
                                let elapsed = start.elapsed();
                                // Keep the disk footprint bounded across iterations.
                                let p = log.positions();
                                log.set_committed(p.durable.max(p.committed)).ok();
                                log.roll().await.unwrap();
                                log.delete_before(p.next).await.unwrap();
                                elapsed
                            })
                        })
                    });
                    ex.run(log.close()).unwrap();
                }
            }
        }
    }
    g.finish();
}

fn bench_read(c: &mut Criterion) {
    let ex = executor();
    let dir = tempfile::tempdir().unwrap();
    let log = ex
        .run(Log::open(dir.path(), config(FsyncPolicy::Always)))
        .unwrap();
    let batch = make_batch(100, 1024);
    let total_bytes: u64 = ex.run(async {
        for _ in 0..640 {
            log.append(&batch, Assign::Next(Term(1))).await.unwrap();
        }
        log.set_committed(log.positions().durable).unwrap();
        log.size_bytes()
    });
    let mut g = c.benchmark_group("read");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Bytes(total_bytes));
    g.bench_function("sequential/1KiB-records/1MiB-reads", |b| {
        b.iter(|| {
            ex.run(async {
                let mut at = Offset(0);
                let end = log.positions().committed;
                let mut n = 0usize;
                while at < end {
                    let r = log.read(at, 1 << 20, ReadBound::Committed).await.unwrap();
                    n += r.batches.len();
                    at = r.next_offset();
                }
                n
            })
        })
    });
    g.finish();
}

fn bench_codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    for (records, value_len) in [(1usize, 100usize), (100, 100), (100, 1024)] {
        let batch = make_batch(records, value_len);
        let bytes = batch.bytes().clone();
        let input: Vec<Record> = batch.records().map(|r| r.to_record()).collect();
        g.throughput(Throughput::Elements(records as u64));
        g.bench_function(format!("encode/{records}x{value_len}B"), |b| {
            b.iter(|| {
                let mut bb = BatchBuilder::new(64 << 20);
                for r in &input {
                    bb.push(r).unwrap();
                }
                bb.finish().unwrap()
            })
        });
        g.bench_function(format!("validate/{records}x{value_len}B"), |b| {
            b.iter(|| validate(&bytes).unwrap())
        });
        g.bench_function(format!("crc32c-only/{records}x{value_len}B"), |b| {
            b.iter(|| crc32c::crc32c(&bytes[12..]))
        });
        g.bench_function(format!("validate+iterate/{records}x{value_len}B"), |b| {
            b.iter(|| {
                let batch = Batch::decode(bytes.clone()).unwrap();
                batch.records().map(|r| r.value.len()).sum::<usize>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_append, bench_read, bench_codec);
criterion_main!(benches);
