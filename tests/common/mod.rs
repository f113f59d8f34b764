//! Helpers shared by the storage tests.
#![allow(dead_code)]

use std::future::Future;

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use tern::log::{Batch, BatchBuilder, FsyncPolicy, LogConfig, Record};
use tern::types::TimestampMs;

/// Runs an async test body on its own glommio executor thread.
pub fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(2 << 20)
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("test body completes");
}

/// A batch of `n` records whose values encode (tag, i) so content can be checked after reads.
pub fn batch(tag: u64, n: u32, value_len: usize, ts: i64) -> Batch {
    let mut b = BatchBuilder::new(64 << 20);
    for i in 0..n {
        let mut v = format!("{tag}:{i}:").into_bytes();
        v.resize(value_len.max(v.len()), b'x');
        b.push(&Record {
            key: Some(Bytes::from(format!("key-{tag}-{i}"))),
            value: Bytes::from(v),
            headers: vec![],
            timestamp: TimestampMs(ts),
            ttl_ms: None,
        })
        .expect("record fits");
    }
    b.finish().expect("non-empty")
}

/// Small segments so tests roll often; retention off unless a test turns it on.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 << 10,
        index_interval_bytes: 512,
        retention_ms: None,
        retention_bytes: None,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    }
}
