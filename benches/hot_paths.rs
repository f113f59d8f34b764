//! Hot paths every request passes through, outside the log: partition routing and the
//! network shard → core → reply round trip over a mailbox. (Batch encode/decode and CRC are in
//! `benches/log.rs`, group `codec`.) Run: `cargo bench --bench hot_paths`.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tern::shard::placement::{core_for, partition_for_key};
use tern::shard::{CoreError, CoreRequest, PartitionKey, ShardConfig, Shards};

fn bench_routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1));
    let keys: Vec<Vec<u8>> = (0..1024)
        .map(|i| format!("customer-{i:08}").into_bytes())
        .collect();
    let mut i = 0usize;
    g.bench_function("partition_for_key/16B-key/64-partitions", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            partition_for_key(&keys[i], 64)
        })
    });
    let mut p = 0u32;
    g.bench_function("core_for/topic+partition/8-cores", |b| {
        b.iter(|| {
            p = p.wrapping_add(1);
            core_for("orders", p % 4096, 8)
        })
    });
    g.finish();
}

fn bench_round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shards = Shards::start(&ShardConfig {
        cores: 1,
        mailbox_capacity: 4096,
        mailbox_wait: Duration::from_secs(5),
        io_memory_bytes: 1 << 20,
        raft_tick: Duration::from_millis(150),
    })
    .expect("a core starts");
    let key = PartitionKey {
        topic: "bench".into(),
        partition: 0,
    };
    let mut g = c.benchmark_group("shard");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(3));
    // A request the core answers without I/O (an unknown partition): the cost of crossing from
    // tokio to the core and back, sequentially.
    g.bench_function("round-trip/sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let r = shards
                        .ask(tern::types::CoreId(0), |reply| CoreRequest::Positions {
                            key: key.clone(),
                            reply,
                        })
                        .await;
                    assert!(matches!(r, Err(CoreError::UnknownPartition(_))));
                }
                start.elapsed()
            })
        })
    });
    // 64 requests in flight: what batching the mailbox drain buys.
    g.bench_function("round-trip/64-in-flight", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                let mut done = 0;
                while done < iters {
                    let n = (iters - done).min(64);
                    let asks = (0..n).map(|_| {
                        shards.ask(tern::types::CoreId(0), |reply| CoreRequest::Positions {
                            key: key.clone(),
                            reply,
                        })
                    });
                    futures::future::join_all(asks).await;
                    done += n;
                }
                start.elapsed()
            })
        })
    });
    g.finish();
    rt.block_on(shards.shutdown()).unwrap();
}

criterion_group!(benches, bench_routing, bench_round_trip);
criterion_main!(benches);
