//! Crash tests: torn tails at every byte, garbage after the tail, flipped bits, and a real
//! process killed with SIGKILL while appending. Recovery must keep exactly the valid prefix,
//! and everything whose append completed under `always` must survive.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{batch, run};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tern::log::{Assign, FsyncPolicy, Log, LogConfig, ReadBound};
use tern::types::{Offset, Term, TimestampMs};

const T: Assign = Assign::Next(Term(1));
const SEGMENT: &str = "00000000000000000000.log";

fn one_segment_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 64 << 20,
        index_interval_bytes: 256,
        retention_ms: None,
        ..LogConfig::default()
    }
}

/// Reads every record below `durable` as (offset, value).
async fn all_records(log: &Log) -> Vec<(u64, Vec<u8>)> {
    let p = log.positions();
    log.set_committed(p.durable).unwrap();
    let mut out = Vec::new();
    let mut at = p.start;
    while at < p.durable {
        let r = log.read(at, 1 << 16, ReadBound::Committed).await.unwrap();
        out.extend(
            r.records(TimestampMs(0))
                .map(|r| (r.offset.0, r.value.to_vec())),
        );
        at = r.next_offset();
    }
    out
}

/// Builds a one-segment log of `n` batches of 3 records; returns the byte position where each
/// batch starts and the end of the last one.
async fn build(dir: &Path, n: u64) -> Vec<u64> {
    let log = Log::open(dir, one_segment_config()).await.unwrap();
    let mut bounds = vec![0u64];
    for i in 0..n {
        let b = batch(i, 3, 40 + 13 * i as usize, 1000);
        log.append(&b, T).await.unwrap();
        bounds.push(bounds.last().unwrap() + b.len() as u64);
    }
    log.close().await.unwrap();
    bounds
}

fn copy_with(src: &Path, dst: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let mut data = std::fs::read(dst.join(SEGMENT)).unwrap();
    f(&mut data);
    std::fs::write(dst.join(SEGMENT), data).unwrap();
}

/// Opens `dir`, checks it holds exactly `batches` whole batches (3 records each), that the file
/// was cut back to them, and that appending and reopening work afterwards.
async fn expect_prefix(dir: &Path, batches: u64, valid_bytes: u64, what: &str) {
    let log = Log::open(dir, one_segment_config()).await.unwrap();
    let recs = all_records(&log).await;
    assert_eq!(recs.len() as u64, batches * 3, "{what}: records kept");
    for (k, (off, val)) in recs.iter().enumerate() {
        assert_eq!(*off, k as u64);
        let want = format!("{}:{}:", k / 3, k % 3);
        assert!(val.starts_with(want.as_bytes()), "{what}: record {k}");
    }
    let len = std::fs::metadata(dir.join(SEGMENT)).unwrap().len();
    assert_eq!(
        len, valid_bytes,
        "{what}: file cut back to the valid prefix"
    );
    let a = log.append(&batch(99, 1, 10, 1000), T).await.unwrap();
    assert_eq!(a.base, Offset(batches * 3), "{what}: appends continue");
    drop(log);
    let log = Log::open(dir, one_segment_config()).await.unwrap();
    assert_eq!(
        log.positions().next,
        Offset(batches * 3 + 1),
        "{what}: reopen after repair"
    );
}

#[test]
fn torn_last_batch_at_every_byte() {
    run(|| async {
        let src = tempfile::tempdir().unwrap();
        let bounds = build(src.path(), 6).await;
        let (last_start, end) = (bounds[5], bounds[6]);
        for cut in last_start..end {
            let dst = tempfile::tempdir().unwrap();
            copy_with(src.path(), dst.path(), |d| d.truncate(cut as usize));
            expect_prefix(dst.path(), 5, last_start, &format!("cut at {cut}")).await;
        }
        // Cut at the exact end: nothing is lost.
        let dst = tempfile::tempdir().unwrap();
        copy_with(src.path(), dst.path(), |d| d.truncate(end as usize));
        expect_prefix(dst.path(), 6, end, "cut at end").await;
    });
}

#[test]
fn garbage_after_the_tail_is_cut() {
    run(|| async {
        let src = tempfile::tempdir().unwrap();
        let bounds = build(src.path(), 6).await;
        let end = bounds[6];
        let mut rng = StdRng::seed_from_u64(7);
        for trial in 0..40 {
            let dst = tempfile::tempdir().unwrap();
            let len = rng.random_range(1..5000);
            let garbage: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            copy_with(src.path(), dst.path(), |d| {
                d.truncate(end as usize);
                d.extend_from_slice(&garbage);
            });
            expect_prefix(dst.path(), 6, end, &format!("garbage trial {trial}")).await;
        }
        // A stale but valid-looking batch copied after the tail (wrong offsets) is also cut.
        let dst = tempfile::tempdir().unwrap();
        copy_with(src.path(), dst.path(), |d| {
            d.truncate(end as usize);
            let first = d[..bounds[1] as usize].to_vec();
            d.extend_from_slice(&first);
        });
        expect_prefix(dst.path(), 6, end, "replayed batch").await;
    });
}

#[test]
fn flipped_bits_keep_exactly_the_prefix_before_them() {
    run(|| async {
        let src = tempfile::tempdir().unwrap();
        let bounds = build(src.path(), 6).await;
        let end = bounds[6];
        let mut rng = StdRng::seed_from_u64(11);
        for trial in 0..60 {
            let pos = rng.random_range(0..end) as usize;
            let bit = rng.random_range(0..8);
            let hit = bounds.iter().rposition(|&b| b <= pos as u64).unwrap() as u64;
            let dst = tempfile::tempdir().unwrap();
            copy_with(src.path(), dst.path(), |d| {
                d.truncate(end as usize);
                d[pos] ^= 1 << bit;
            });
            expect_prefix(
                dst.path(),
                hit,
                bounds[hit as usize],
                &format!("flip {pos}:{bit} (trial {trial})"),
            )
            .await;
        }
    });
}

/// Not a test on its own: the child process of `kill_9_while_appending_loses_no_ack`. It
/// appends from several tasks at once and prints `ACK <base> <last>` after each append
/// completes, until it is killed.
#[test]
fn crash_child_appender() {
    let Ok(dir) = std::env::var("TERN_CRASH_CHILD_DIR") else {
        return;
    };
    // Under `interval` an append completes after its O_DIRECT write, before any fsync: a
    // process crash (not a power loss) must still keep it.
    let fsync = match std::env::var("TERN_CRASH_CHILD_FSYNC").as_deref() {
        Ok("interval") => FsyncPolicy::Interval(Duration::from_secs(3600)),
        _ => FsyncPolicy::Always,
    };
    run(move || async move {
        let log = Log::open(
            &dir,
            LogConfig {
                segment_bytes_max: 64 << 10,
                retention_ms: None,
                fsync,
                ..LogConfig::default()
            },
        )
        .await
        .unwrap();
        let tasks: Vec<_> = (0..8u64)
            .map(|w| {
                let log = log.clone();
                glommio::spawn_local(async move {
                    for i in 0.. {
                        let tag = w * 1_000_000 + i;
                        let a = log.append(&batch(tag, 2, 100, 1000), T).await.unwrap();
                        println!("ACK {} {} {tag}", a.base.0, a.last.0);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    });
}

/// Rounds 0 and 1 append under `always`, round 2 under `interval` (fsync every hour, so nothing
/// is fsync'd before the kill).
#[test]
fn kill_9_while_appending_loses_no_ack() {
    let exe = std::env::current_exe().unwrap();
    for round in 0..3u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut acked: Vec<(u64, u64, u64)> = Vec::new();
        // Each round restarts on the same directory twice, so recovery of a recovered log is
        // exercised too.
        for life in 0..2u64 {
            let mut child = Command::new(&exe)
                .args([
                    "--exact",
                    "crash_child_appender",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("TERN_CRASH_CHILD_DIR", dir.path())
                .env(
                    "TERN_CRASH_CHILD_FSYNC",
                    if round == 2 { "interval" } else { "always" },
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let mut lines = BufReader::new(stdout).lines();
            let deadline = Instant::now() + Duration::from_millis(300 + 250 * ((round + life) % 3));
            let hard_stop = Instant::now() + Duration::from_secs(30);
            let mut seen = 0;
            while Instant::now() < deadline || seen < 50 {
                assert!(Instant::now() < hard_stop, "child made no progress");
                let Some(Ok(line)) = lines.next() else { break };
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let v: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
                    acked.push((v[0], v[1], v[2]));
                    seen += 1;
                }
            }
            // SIGKILL: no destructors, no flush.
            child.kill().unwrap();
            // Lines already written before the kill were acknowledged too.
            for line in lines.map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("ACK ") {
                    let v: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
                    acked.push((v[0], v[1], v[2]));
                }
            }
            child.wait().unwrap();
        }
        assert!(
            acked.len() >= 100,
            "round {round}: only {} acks",
            acked.len()
        );
        eprintln!(
            "round {round}: {} acknowledged appends checked",
            acked.len()
        );
        let path = dir.path().to_path_buf();
        let acked2 = acked.clone();
        run(move || async move {
            let log = Log::open(&path, LogConfig::default()).await.unwrap();
            let recs = all_records(&log).await;
            for (base, last, tag) in &acked2 {
                for (k, off) in (*base..=*last).enumerate() {
                    let (o, val) = recs.get(off as usize).unwrap_or_else(|| {
                        panic!("acked offset {off} lost: log has {} records", recs.len())
                    });
                    assert_eq!(*o, off);
                    let want = format!("{tag}:{k}:");
                    assert!(
                        val.starts_with(want.as_bytes()),
                        "offset {off} holds the wrong record"
                    );
                }
            }
        });
    }
}
