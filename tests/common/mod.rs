//! Helpers shared by the storage tests.
#![allow(dead_code)]

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use tern::log::{Batch, BatchBuilder, FsyncPolicy, LogConfig, Record};
use tern::types::TimestampMs;

/// How long a storage test body may run before it counts as hung. The slowest takes seconds;
/// a hang must fail the test in bounded time (and say where it stopped, from [`step`]) rather
/// than hold the whole test run until CI's limit.
const HANG_LIMIT: Duration = Duration::from_secs(180);

thread_local! {
    /// Where the test body on this executor thread notes the last [`step`] it reached.
    static STEP: std::cell::RefCell<Option<Arc<Mutex<&'static str>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Notes the step a test body has reached, which [`run`] reports if the body hangs.
pub fn step(name: &'static str) {
    STEP.with(|s| {
        if let Some(at) = s.borrow().as_ref() {
            *at.lock().unwrap_or_else(|e| e.into_inner()) = name;
        }
    });
}

/// Runs an async test body on its own glommio executor thread. A body that does not finish
/// within [`HANG_LIMIT`] (including a panic whose unwinding hangs) fails the test, naming the
/// last [`step`] it reached.
pub fn run<F, Fut>(f: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (done_tx, done_rx) = mpsc::channel();
    let at = Arc::new(Mutex::new("the start"));
    let noted = at.clone();
    std::thread::spawn(move || {
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let executor = LocalExecutorBuilder::new(Placement::Unbound)
                .io_memory(2 << 20)
                // glommio 0.9 can park for good with a task ready after a stall as long as
                // this (see `OFFLINE_PREEMPT_TIMER`); CI once hung an hour that way.
                .preempt_timer(tern::raft::rt::OFFLINE_PREEMPT_TIMER)
                .make()
                .expect("executor starts");
            STEP.with(|s| *s.borrow_mut() = Some(noted));
            // `f` is called inside the executor, as glommio's own `spawn` does.
            executor.run(async move { f().await });
        }));
        let _ = done_tx.send(ran);
    });
    match done_rx.recv_timeout(HANG_LIMIT) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!(
            "the test body did not finish within {HANG_LIMIT:?}, a hang; its last step: {}",
            at.lock().unwrap_or_else(|e| e.into_inner())
        ),
    }
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
