//! Conformance suite for the partition log's public API: append, read, roll, truncate,
//! retention, reopen, fsync policies, poisoning and the small durable state file.

mod common;

use std::time::Duration;

use common::{batch, run, small_config, step};
use tern::log::{
    Assign, FsyncPolicy, Log, LogConfig, LogError, ReadBound, StateFile, RESET_MARKER,
};
use tern::types::{Offset, Term, TimestampMs};

const T: Assign = Assign::Next(Term(1));

/// Reads every committed-or-written record from `from` and returns (offset, value) pairs.
async fn read_all(log: &Log, from: Offset, bound: ReadBound) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let r = log.read(at, 4096, bound).await.expect("read");
        if r.batches.is_empty() {
            return out;
        }
        for rec in r.records(TimestampMs(0)) {
            out.push((rec.offset.0, rec.value.to_vec()));
        }
        at = r.next_offset();
    }
}

fn value(tag: u64, i: u32, len: usize) -> Vec<u8> {
    let mut v = format!("{tag}:{i}:").into_bytes();
    v.resize(len.max(v.len()), b'x');
    v
}

#[test]
fn append_assigns_offsets_and_reads_back_in_order() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let a = log.append(&batch(1, 3, 10, 1000), T).await.unwrap();
        assert_eq!((a.base, a.last, a.durable), (Offset(0), Offset(2), true));
        let b = log.append(&batch(2, 2, 10, 1000), T).await.unwrap();
        assert_eq!((b.base, b.last), (Offset(3), Offset(4)));
        let p = log.positions();
        assert_eq!(
            (p.start, p.written, p.durable, p.next),
            (Offset(0), Offset(5), Offset(5), Offset(5))
        );
        // Nothing is committed yet, so consumers see nothing.
        assert!(log
            .read(Offset(0), 1 << 20, ReadBound::Committed)
            .await
            .unwrap()
            .batches
            .is_empty());
        log.set_committed(Offset(5)).unwrap();
        let recs = read_all(&log, Offset(0), ReadBound::Committed).await;
        let want: Vec<_> = (0..3)
            .map(|i| (i as u64, value(1, i, 10)))
            .chain((0..2).map(|i| (3 + i as u64, value(2, i, 10))))
            .collect();
        assert_eq!(recs, want);
        // Reading from the middle of a batch yields only the records at and after it.
        let mid = read_all(&log, Offset(1), ReadBound::Committed).await;
        assert_eq!(mid[0].0, 1);
        assert_eq!(mid.len(), 4);
        // The batch carries the stamped term.
        let r = log.read(Offset(0), 1, ReadBound::Written).await.unwrap();
        assert_eq!(
            r.batches.len(),
            1,
            "at least one batch even over the byte budget"
        );
        assert_eq!(r.batches[0].meta().term, Term(1));
    });
}

#[test]
fn positions_are_validated() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log.append(&batch(1, 4, 10, 1000), T).await.unwrap();
        assert!(matches!(
            log.set_committed(Offset(5)),
            Err(LogError::InvalidPosition { .. })
        ));
        log.set_committed(Offset(3)).unwrap();
        assert!(matches!(
            log.set_committed(Offset(2)),
            Err(LogError::InvalidPosition { .. })
        ));
        let p = log.positions();
        assert!(p.committed <= p.durable && p.durable <= p.written && p.written <= p.next);
        // Out-of-range reads are errors, not empty answers.
        assert!(matches!(
            log.read(Offset(5), 100, ReadBound::Written).await,
            Err(LogError::OffsetOutOfRange { .. })
        ));
        // Reading at the end is empty (the caller waits for more).
        assert!(log
            .read(Offset(4), 100, ReadBound::Written)
            .await
            .unwrap()
            .batches
            .is_empty());
    });
}

#[test]
fn segments_roll_by_size_and_time_and_reads_cross_them() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            segment_ms_max: 10_000,
            ..small_config()
        };
        let log = Log::open(dir.path(), cfg).await.unwrap();
        for i in 0..40 {
            log.append(&batch(i, 5, 100, 1000), T).await.unwrap();
        }
        let by_size = log.segment_count();
        let expected = log.size_bytes() / (8 << 10);
        assert!(
            by_size as u64 >= expected,
            "{} B in 8 KiB segments: {by_size} segments",
            log.size_bytes()
        );
        assert!(by_size >= 3);
        // A batch 10 s newer than the active segment's first record rolls it.
        log.append(&batch(99, 1, 10, 11_000), T).await.unwrap();
        assert_eq!(log.segment_count(), by_size + 1);
        log.set_committed(log.positions().durable).unwrap();
        let recs = read_all(&log, Offset(0), ReadBound::Committed).await;
        assert_eq!(recs.len(), 201);
        assert!(
            recs.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "offsets contiguous"
        );
        // Segment files are named by their base offsets, 20 digits.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".log"))
            .collect();
        names.sort();
        assert_eq!(names[0], "00000000000000000000.log");
        assert_eq!(names.len(), log.segment_count());
        assert!(names.iter().all(|n| n.len() == 24));
        // Sealed segments carry index files; the active one does not.
        let indexes = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".index")
            })
            .count();
        assert_eq!(indexes, log.segment_count() - 1);
    });
}

/// A whole, checksummed batch of a format version this build cannot read (written by another
/// build) is not damage: opening refuses with an error and cuts nothing.
#[test]
fn a_batch_of_another_format_version_is_refused_not_cut() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            for i in 0..3 {
                log.append(&batch(i, 2, 50, 1000), T).await.unwrap();
            }
            log.close().await.unwrap();
        }
        let seg = dir.path().join("00000000000000000000.log");
        let mut bytes = std::fs::read(&seg).unwrap();
        let len = bytes.len();
        // The version byte (3) is outside the CRC, which starts at byte 12: the batch stays
        // checksummed, as one written by another build would be.
        let second = tern::log::batch::peek_len(&bytes).unwrap();
        bytes[second + 3] = tern::log::batch::VERSION + 1;
        std::fs::write(&seg, &bytes).unwrap();
        let err = match Log::open(dir.path(), small_config()).await {
            Err(e) => e,
            Ok(_) => panic!("a log with a batch of an unknown version opened"),
        };
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("version"), "{err}");
        assert_eq!(
            std::fs::metadata(&seg).unwrap().len() as usize,
            len,
            "nothing was cut"
        );
    });
}

#[test]
fn reopen_keeps_everything_and_continues_offsets() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            for i in 0..30 {
                log.append(&batch(i, 3, 200, 1000 + i as i64), T)
                    .await
                    .unwrap();
            }
            log.close().await.unwrap();
            assert!(matches!(
                log.append(&batch(0, 1, 1, 0), T).await,
                Err(LogError::Closed)
            ));
            // A wait for what a closed log will never hold fails at once instead of waiting
            // for a flush task that is gone; what it holds is still reported reached.
            assert!(matches!(
                log.wait_written(Offset(91)).await,
                Err(LogError::Closed)
            ));
            assert!(matches!(
                log.wait_durable(Offset(90)).await,
                Err(LogError::Closed)
            ));
            log.wait_durable(Offset(89)).await.unwrap();
        }
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let p = log.positions();
        assert_eq!(p.next, Offset(90));
        assert_eq!(p.durable, Offset(90));
        log.set_committed(Offset(90)).unwrap();
        let recs = read_all(&log, Offset(0), ReadBound::Committed).await;
        assert_eq!(recs.len(), 90);
        assert_eq!(recs[89].1, value(29, 2, 200));
        let a = log.append(&batch(30, 1, 10, 2000), T).await.unwrap();
        assert_eq!(a.base, Offset(90));
    });
}

#[test]
fn timestamp_lookup_finds_first_record_at_or_after() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        // Batch i holds 5 records at timestamp 1000 + 10 i.
        for i in 0..60 {
            log.append(&batch(i, 5, 100, 1000 + 10 * i as i64), T)
                .await
                .unwrap();
        }
        assert!(log.segment_count() > 3);
        log.set_committed(log.positions().durable).unwrap();
        let find = |ts| {
            let log = log.clone();
            async move {
                log.offset_for_timestamp(TimestampMs(ts), ReadBound::Committed)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(find(0).await, Some(Offset(0)));
        assert_eq!(find(1000).await, Some(Offset(0)));
        assert_eq!(find(1001).await, Some(Offset(5)));
        assert_eq!(find(1250).await, Some(Offset(125)));
        assert_eq!(find(1590).await, Some(Offset(295)));
        assert_eq!(find(1591).await, None);
    });
}

#[test]
fn truncate_after_drops_the_tail_durably() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            for i in 0..100 {
                log.append(&batch(i, 2, 150, 1000), T).await.unwrap();
            }
            let segs = log.segment_count();
            assert!(segs > 3);
            log.set_committed(Offset(20)).unwrap();
            // Not below committed, not inside a batch.
            assert!(matches!(
                log.truncate_from(Offset(10)).await,
                Err(LogError::BelowCommitted { .. })
            ));
            assert!(matches!(
                log.truncate_from(Offset(21)).await,
                Err(LogError::NotABatchBoundary(_))
            ));
            assert!(
                log.poisoned().is_none(),
                "a refused truncation does not poison"
            );
            // Keep offsets 0..=23 (12 batches): this crosses segment boundaries.
            log.truncate_after(Offset(23)).await.unwrap();
            assert!(log.segment_count() < segs);
            let p = log.positions();
            assert_eq!((p.next, p.written), (Offset(24), Offset(24)));
            assert!(p.durable <= p.written);
            let a = log.append(&batch(100, 2, 150, 1000), T).await.unwrap();
            assert_eq!(a.base, Offset(24));
        }
        // After reopening, the dropped records stay dropped and the new ones are there.
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.positions().next, Offset(26));
        log.set_committed(Offset(26)).unwrap();
        let recs = read_all(&log, Offset(0), ReadBound::Committed).await;
        assert_eq!(recs.len(), 26);
        assert_eq!(recs[23].1, value(11, 1, 150));
        assert_eq!(recs[24].1, value(100, 0, 150));
    });
}

/// Reads racing a truncation see either the old bytes or the cut, never "corruption": the
/// bytes past the cut vanish while a read is under way (a Raft follower truncates while
/// consumers read its committed prefix).
#[test]
fn reads_racing_a_truncation_never_report_corruption() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            fsync: FsyncPolicy::Interval(Duration::from_millis(5)),
            ..LogConfig::default()
        };
        let log = Log::open(dir.path(), config).await.unwrap();
        for round in 0..30u64 {
            let start = log.positions().next;
            for i in 0..40 {
                log.append(&batch(round * 100 + i, 1, 60, 1000), T)
                    .await
                    .unwrap();
            }
            let keep = start.plus(20);
            log.set_committed(keep).unwrap();
            let done = std::rc::Rc::new(std::cell::Cell::new(false));
            let readers: Vec<_> = (0..4)
                .map(|k| {
                    let (log, done) = (log.clone(), done.clone());
                    let bound = if k % 2 == 0 {
                        ReadBound::Committed
                    } else {
                        ReadBound::Written
                    };
                    glommio::spawn_local(async move {
                        let mut reads = 0u32;
                        while !done.get() {
                            // Reads that end at the cut have to look at the batch there.
                            let r = log
                                .read(keep.prev().unwrap(), 4096, bound)
                                .await
                                .expect("a read racing a truncation");
                            assert!(r
                                .batches
                                .iter()
                                .all(|b| b.base_offset() < keep || bound == ReadBound::Written));
                            reads += 1;
                        }
                        reads
                    })
                })
                .collect();
            glommio::yield_if_needed().await;
            log.truncate_from(keep).await.unwrap();
            done.set(true);
            for r in readers {
                assert!(r.await > 0);
            }
            assert_eq!(log.positions().next, keep);
        }
        log.flush().await.unwrap();
        let recs = read_all(&log, Offset(0), ReadBound::Committed).await;
        assert_eq!(recs.len(), 30 * 20);
    });
}

/// A wait for records past the log end does not hold back later waits for less (they used
/// to queue behind it: an append that had to roll then waited forever, holding the append
/// lock), and a truncation fails the waits for records it removed instead of leaving them
/// waiting until the log grows back.
#[test]
fn waits_complete_out_of_order_and_a_truncation_fails_waits_past_it() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        for i in 0..4 {
            log.append(&batch(i, 2, 100, 1000), T).await.unwrap();
        }
        let far = {
            let log = log.clone();
            glommio::spawn_local(async move { log.wait_written(Offset(100)).await })
        };
        glommio::yield_if_needed().await;
        glommio::timer::sleep(Duration::from_millis(10)).await;
        // Appends staged without waiting for each (as a Raft follower stages), so each roll
        // (small_config rolls at 8 KiB) waits for staged bytes to be written: that wait
        // queues after the far one.
        let within = glommio::timer::timeout(Duration::from_secs(20), async {
            let io = |e: LogError| glommio::GlommioError::IoError(std::io::Error::other(e));
            let mut secured = Vec::new();
            for i in 4..100 {
                let (_, s) = log.stage(&batch(i, 1, 300, 1000), T).await.map_err(io)?;
                secured.push(s);
            }
            for s in secured {
                s.await.map_err(io)?;
            }
            log.flush().await.map_err(io)
        })
        .await;
        assert!(
            within.is_ok(),
            "appends behind a far wait completed: {within:?}"
        );
        assert!(log.segment_count() > 2, "the appends rolled segments");
        assert_eq!(log.positions().next, Offset(104));
        // The far wait (for offsets below 100) was met on the way.
        assert_eq!(far.await, Ok(()));
        // A wait past the end, then a truncation below it: the wait fails at once.
        let past = {
            let log = log.clone();
            glommio::spawn_local(async move { log.wait_written(Offset(200)).await })
        };
        glommio::timer::sleep(Duration::from_millis(10)).await;
        log.truncate_from(Offset(50)).await.unwrap();
        assert_eq!(past.await, Err(LogError::Truncated { end: Offset(50) }));
    });
}

#[test]
fn truncate_everything_then_append() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        for i in 0..20 {
            log.append(&batch(i, 2, 300, 1000), T).await.unwrap();
        }
        log.truncate_from(Offset(0)).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.positions().next, Offset(0));
        log.append(&batch(7, 1, 10, 1000), T).await.unwrap();
        drop(log);
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log.set_committed(Offset(1)).unwrap();
        let recs = read_all(&log, Offset(0), ReadBound::Committed).await;
        assert_eq!(recs, vec![(0, value(7, 0, 10))]);
    });
}

#[test]
fn follower_appends_keep_leader_offsets() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let b = batch(1, 3, 10, 1000).stamped(Offset(0), Term(5));
        log.append(&b, Assign::Keep).await.unwrap();
        let gap = batch(2, 1, 10, 1000).stamped(Offset(7), Term(5));
        assert!(matches!(
            log.append(&gap, Assign::Keep).await,
            Err(LogError::NonContiguous {
                expected: Offset(3),
                got: Offset(7)
            })
        ));
        let next = batch(2, 1, 10, 1000).stamped(Offset(3), Term(6));
        log.append(&next, Assign::Keep).await.unwrap();
        let r = log
            .read(Offset(0), 1 << 20, ReadBound::Written)
            .await
            .unwrap();
        let terms: Vec<_> = r.batches.iter().map(|b| b.meta().term).collect();
        assert_eq!(terms, vec![Term(5), Term(6)]);
    });
}

/// A follower restarted from a snapshot starts its log over, empty, at the snapshot's end; a
/// reset cut short by a crash (marker written, only some segments gone: a gap) is finished
/// when the log is opened again.
#[test]
fn reset_starts_the_log_over_and_an_interrupted_reset_finishes_on_open() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        for i in 0..40 {
            log.append(&batch(i, 5, 100, 1000), T).await.unwrap();
        }
        log.set_committed(log.positions().durable).unwrap();
        assert!(log.segment_count() > 2);
        log.reset_to(Offset(1000)).await.unwrap();
        let p = log.positions();
        assert_eq!(
            (p.start, p.next, p.committed),
            (Offset(1000), Offset(1000), Offset(1000))
        );
        assert_eq!(log.segment_count(), 1);
        let b = batch(99, 2, 10, 1000).stamped(Offset(1000), Term(3));
        log.append(&b, Assign::Keep).await.unwrap();
        log.set_committed(Offset(1002)).unwrap();
        log.close().await.unwrap();
        drop(log);
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let p = log.positions();
        assert_eq!((p.start, p.next), (Offset(1000), Offset(1002)));
        log.set_committed(Offset(1002)).unwrap();
        let recs = read_all(&log, Offset(1000), ReadBound::Committed).await;
        assert_eq!(recs.len(), 2);
        assert!(!dir.path().join(RESET_MARKER).exists());
        log.close().await.unwrap();
        drop(log);

        // A crash in the middle of a reset: the marker is durable, the oldest segment is gone,
        // the others are still there.
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        for i in 0..40 {
            log.append(&batch(i, 5, 100, 1000), T).await.unwrap();
        }
        log.close().await.unwrap();
        drop(log);
        StateFile::new(dir.path(), RESET_MARKER)
            .write(&5000u64.to_le_bytes())
            .await
            .unwrap();
        let mut segments: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        segments.sort();
        assert!(segments.len() > 2);
        std::fs::remove_file(&segments[0]).unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let p = log.positions();
        assert_eq!((p.start, p.next), (Offset(5000), Offset(5000)));
        assert_eq!(log.segment_count(), 1);
        assert!(!dir.path().join(RESET_MARKER).exists());
        // A damaged marker is reported, not guessed around.
        log.close().await.unwrap();
        drop(log);
        StateFile::new(dir.path(), RESET_MARKER)
            .write(b"not an offset")
            .await
            .unwrap();
        assert!(matches!(
            Log::open(dir.path(), small_config()).await,
            Err(LogError::Corrupt { .. })
        ));
    });
}

#[test]
fn delete_before_removes_whole_committed_segments_only() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        for i in 0..40 {
            log.append(&batch(i, 5, 100, 1000), T).await.unwrap();
        }
        let segs = log.segment_count();
        // Nothing committed: nothing may be deleted.
        assert_eq!(log.delete_before(Offset(150)).await.unwrap(), 0);
        log.set_committed(log.positions().durable).unwrap();
        let n = log.delete_before(Offset(150)).await.unwrap();
        assert!(n > 0);
        assert_eq!(log.segment_count(), segs - n);
        let start = log.positions().start;
        assert!(start <= Offset(150) && start > Offset(0));
        assert!(matches!(
            log.read(Offset(0), 100, ReadBound::Committed).await,
            Err(LogError::OffsetOutOfRange { .. })
        ));
        let recs = read_all(&log, start, ReadBound::Committed).await;
        assert_eq!(recs.len() as u64, 200 - start.0);
        // The active segment survives any request.
        log.delete_before(Offset(10_000)).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        drop(log);
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.positions().next, Offset(200));
    });
}

#[test]
fn retention_by_age_and_size() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            retention_ms: Some(1_000),
            retention_check_interval_ms: 3_600_000,
            ..small_config()
        };
        let log = Log::open(dir.path(), cfg).await.unwrap();
        // Timestamps 0..39 s: one batch per second.
        for i in 0..40 {
            log.append(&batch(i, 5, 100, i as i64 * 1000), T)
                .await
                .unwrap();
        }
        log.set_committed(log.positions().durable).unwrap();
        let segs = log.segment_count();
        // At t = 20.5 s, segments whose newest record is older than 19.5 s go.
        let n = log.enforce_retention(TimestampMs(20_500)).await.unwrap();
        assert!(n > 0 && n < segs);
        let start = log.positions().start;
        let first = read_all(&log, start, ReadBound::Committed).await;
        // Every remaining record is at most one segment older than the cutoff.
        assert!(first.len() as u64 == 200 - start.0);

        let dir2 = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            retention_bytes: Some(20_000),
            retention_check_interval_ms: 3_600_000,
            ..small_config()
        };
        let log = Log::open(dir2.path(), cfg).await.unwrap();
        for i in 0..60 {
            log.append(&batch(i, 5, 100, 1000), T).await.unwrap();
        }
        log.set_committed(log.positions().durable).unwrap();
        let before = log.size_bytes();
        assert!(before > 30_000);
        log.enforce_retention(TimestampMs(2000)).await.unwrap();
        let after = log.size_bytes();
        assert!(
            after >= 20_000,
            "size retention keeps at least the limit: {after}"
        );
        assert!(
            after < 20_000 + 8 * 1024 + 1024,
            "and at most about one segment more: {after}"
        );
    });
}

#[test]
fn retention_runs_in_the_background_and_rolls_idle_segments() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            retention_ms: Some(1),
            segment_ms_max: 1,
            retention_check_interval_ms: 20,
            ..small_config()
        };
        let log = Log::open(dir.path(), cfg).await.unwrap();
        // Old records (timestamp 1000 ms after the epoch).
        for i in 0..5 {
            log.append(&batch(i, 5, 100, 1000), T).await.unwrap();
        }
        log.set_committed(log.positions().durable).unwrap();
        // The background task rolls the idle active segment and deletes it; bounded wait.
        let mut waited = 0;
        while log.positions().start < Offset(25) && waited < 5_000 {
            glommio::timer::sleep(Duration::from_millis(20)).await;
            waited += 20;
        }
        assert_eq!(
            log.positions().start,
            Offset(25),
            "all expired records deleted"
        );
        assert_eq!(log.segment_count(), 1);
        assert!(log.stats().segments_deleted >= 1);
    });
}

#[test]
fn expired_records_are_hidden_from_reads() {
    run(|| async {
        use bytes::Bytes;
        use tern::log::{BatchBuilder, Record};
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let mut b = BatchBuilder::new(1 << 20);
        for (i, ttl) in [None, Some(500u64), None, Some(5_000)]
            .into_iter()
            .enumerate()
        {
            b.push(&Record {
                value: Bytes::from(vec![i as u8]),
                timestamp: TimestampMs(1000),
                ttl_ms: ttl,
                ..Record::default()
            })
            .unwrap();
        }
        log.append(&b.finish().unwrap(), T).await.unwrap();
        log.set_committed(Offset(4)).unwrap();
        let r = log
            .read(Offset(0), 1 << 20, ReadBound::Committed)
            .await
            .unwrap();
        let at = |now| {
            r.records(TimestampMs(now))
                .map(|r| r.offset.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(at(1400), vec![0, 1, 2, 3]);
        assert_eq!(at(1500), vec![0, 2, 3]);
        assert_eq!(at(6000), vec![0, 2]);
    });
}

#[test]
fn group_commit_shares_fsyncs() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        let before = log.stats();
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let log = log.clone();
                glommio::spawn_local(
                    async move { log.append(&batch(i, 1, 20, 1000), T).await.unwrap() },
                )
            })
            .collect();
        let mut bases = Vec::new();
        for t in tasks {
            bases.push(t.await.base.0);
        }
        // Offsets follow the order the appends were issued in.
        assert_eq!(bases, (0..100).collect::<Vec<_>>());
        let s = log.stats();
        let fsyncs = s.fsyncs - before.fsyncs;
        assert!(
            (1..50).contains(&fsyncs),
            "100 concurrent appends took {fsyncs} fsyncs"
        );
        assert_eq!(log.positions().durable, Offset(100));
    });
}

#[test]
fn interval_policy_completes_on_write_and_syncs_later() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            fsync: FsyncPolicy::Interval(Duration::from_millis(30)),
            ..small_config()
        };
        let log = Log::open(dir.path(), cfg).await.unwrap();
        let fsyncs_before = log.stats().fsyncs;
        for i in 0..50 {
            let a = log.append(&batch(i, 2, 50, 1000), T).await.unwrap();
            assert!(log.positions().written > a.last);
        }
        // 50 appends under `interval` did not each fsync.
        assert!(log.stats().fsyncs - fsyncs_before < 25);
        // Committed may run ahead of durable under `interval`.
        log.set_committed(Offset(100)).unwrap();
        // The timer makes it durable; wait_durable tells the appender when.
        log.wait_durable(Offset(99)).await.unwrap();
        assert_eq!(log.positions().durable, Offset(100));
        log.close().await.unwrap();
    });
}

#[test]
fn a_failed_write_poisons_the_log() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log.append(&batch(1, 1, 10, 1000), T).await.unwrap();
        log.inject_io_failure();
        let e = log.append(&batch(2, 1, 10, 1000), T).await.unwrap_err();
        assert!(matches!(e, LogError::Poisoned(_)), "{e}");
        assert!(log.poisoned().is_some());
        let e = log.append(&batch(3, 1, 10, 1000), T).await.unwrap_err();
        assert!(matches!(e, LogError::Poisoned(_)));
        assert!(matches!(
            log.truncate_from(Offset(1)).await,
            Err(LogError::Poisoned(_))
        ));
        // Data acknowledged before the failure is still readable.
        let r = log
            .read(Offset(0), 1 << 20, ReadBound::Written)
            .await
            .unwrap();
        assert_eq!(r.batches.len(), 1);
        drop(log);
        // Reopening recovers what reached the disk.
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        assert!(log.positions().next >= Offset(1));
    });
}

#[test]
fn oversized_batches_are_refused_without_effect() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            batch_bytes_max: 4096,
            ..small_config()
        };
        let log = Log::open(dir.path(), cfg).await.unwrap();
        let e = log.append(&batch(1, 10, 1000, 1000), T).await.unwrap_err();
        assert!(matches!(e, LogError::BatchTooLarge { .. }));
        assert_eq!(log.positions().next, Offset(0));
        assert!(log.poisoned().is_none());
    });
}

#[test]
fn bad_config_is_refused() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            segment_bytes_max: 10,
            ..small_config()
        };
        assert!(matches!(
            Log::open(dir.path(), cfg).await,
            Err(LogError::Config(_))
        ));
    });
}

#[test]
fn sealed_segment_indexes_are_rebuilt_when_missing_or_damaged() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            for i in 0..40 {
                log.append(&batch(i, 5, 100, 1000 + i as i64), T)
                    .await
                    .unwrap();
            }
            log.close().await.unwrap();
        }
        let mut idx: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "index" || e == "timeindex")
            })
            .collect();
        idx.sort();
        assert!(idx.len() >= 4);
        std::fs::remove_file(&idx[0]).unwrap();
        let mut damaged = std::fs::read(&idx[2]).unwrap();
        damaged[20] ^= 0xff;
        std::fs::write(&idx[2], damaged).unwrap();
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log.set_committed(log.positions().durable).unwrap();
        assert_eq!(
            read_all(&log, Offset(0), ReadBound::Committed).await.len(),
            200
        );
        assert_eq!(
            log.offset_for_timestamp(TimestampMs(1020), ReadBound::Committed)
                .await
                .unwrap(),
            Some(Offset(100))
        );
        assert!(idx[0].exists(), "rebuilt index is written back");
    });
}

#[test]
fn damage_inside_a_sealed_segment_is_reported_not_hidden() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), small_config()).await.unwrap();
            for i in 0..40 {
                log.append(&batch(i, 5, 100, 1000), T).await.unwrap();
            }
            log.close().await.unwrap();
        }
        let first = dir.path().join("00000000000000000000.log");
        let mut data = std::fs::read(&first).unwrap();
        data[1000] ^= 0x01;
        std::fs::write(&first, data).unwrap();
        // With a valid index the segment opens, but reading the damaged batch is an error.
        let log = Log::open(dir.path(), small_config()).await.unwrap();
        log.set_committed(log.positions().durable).unwrap();
        let mut at = Offset(0);
        let err = loop {
            match log.read(at, 4096, ReadBound::Committed).await {
                Ok(r) if r.batches.is_empty() => panic!("read past the damage"),
                Ok(r) => at = r.next_offset(),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
        drop(log);
        // Without the index, opening refuses instead of silently dropping later segments.
        std::fs::remove_file(dir.path().join("00000000000000000000.index")).unwrap();
        assert!(matches!(
            Log::open(dir.path(), small_config()).await,
            Err(LogError::Corrupt { .. })
        ));
    });
}

/// Writes `n` one-record batches stamped as Raft entries 1..=n (as the Raft store appends).
async fn raft_entries(log: &Log, n: u64) {
    for i in 1..=n {
        log.append(
            &batch(i, 1, 600, 1000),
            Assign::Entry {
                term: Term(1),
                index: i,
            },
        )
        .await
        .unwrap();
    }
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn a_repairing_open_cuts_at_the_first_damage_and_reports_what_it_held() {
    run(|| async {
        // Each case damages a copy of the same log: 60 entries over several segments.
        let template = tempfile::tempdir().unwrap();
        step("writing the template");
        {
            let log = Log::open(template.path(), small_config()).await.unwrap();
            raft_entries(&log, 60).await;
            log.close().await.unwrap();
        }
        let copy = || {
            let d = tempfile::tempdir().unwrap();
            for e in std::fs::read_dir(template.path()).unwrap().flatten() {
                std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
            }
            d
        };
        let segs = segment_files(template.path());
        assert!(segs.len() >= 4, "{} segments", segs.len());
        let name = |i: usize| segs[i].file_name().unwrap().to_owned();
        let base = |i: usize| -> u64 {
            name(i)
                .to_string_lossy()
                .strip_suffix(".log")
                .unwrap()
                .parse()
                .unwrap()
        };

        // A clean log: nothing to report.
        step("a clean log");
        let d = copy();
        let log = Log::open_repairing(d.path(), small_config()).await.unwrap();
        assert_eq!(log.repaired(), None);
        assert_eq!(log.positions().next, Offset(60));
        drop(log);

        // A sealed segment cut short (its index no longer fits it): cut there; everything
        // after goes; the report names the last entry the log held.
        step("a sealed segment cut short");
        let d = copy();
        let victim = d.path().join(name(1));
        let len = std::fs::metadata(&victim).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        assert!(matches!(
            Log::open(d.path(), small_config()).await,
            Err(LogError::Corrupt { .. })
        ));
        let log = Log::open_repairing(d.path(), small_config()).await.unwrap();
        let r = log.repaired().expect("a repair");
        assert_eq!(r.last_raft_index, Some(60));
        let p = log.positions();
        assert!(p.next.0 >= base(1) && p.next.0 < base(2), "{p:?}");
        assert_eq!(r.from, p.next);
        assert_eq!(segment_files(d.path()).len(), 2);
        let recs = read_all(&log, Offset(0), ReadBound::Written).await;
        assert_eq!(
            recs.len() as u64,
            p.next.0,
            "every record before the cut reads"
        );
        // Appending goes on from the cut.
        step("appending after the cut");
        log.append(&batch(99, 1, 100, 1000), T).await.unwrap();
        log.close().await.unwrap();
        drop(log);
        // Until the owner notes it, the cut is reported again (a crash before noting).
        step("reopening before the cut is noted");
        let log = Log::open_repairing(d.path(), small_config()).await.unwrap();
        assert_eq!(log.repaired().map(|r| r.last_raft_index), Some(Some(60)));
        step("noting the cut");
        log.repair_noted().await.unwrap();
        log.close().await.unwrap();
        drop(log);
        let log = Log::open_repairing(d.path(), small_config()).await.unwrap();
        assert_eq!(log.repaired(), None);
        drop(log);

        // A segment file deleted in the middle: the log ends where the one before it ends.
        step("a segment file deleted");
        let d = copy();
        std::fs::remove_file(d.path().join(name(2))).unwrap();
        assert!(matches!(
            Log::open(d.path(), small_config()).await,
            Err(LogError::Corrupt { .. })
        ));
        let log = Log::open_repairing(d.path(), small_config()).await.unwrap();
        let r = log.repaired().expect("a repair");
        assert_eq!(r.last_raft_index, Some(60));
        assert_eq!(log.positions().next, Offset(base(2)));
        drop(log);

        // A flipped bit in the active segment with whole batches after it: damage, not a torn
        // write, so it is reported (a plain open cuts it as it always did).
        step("a flipped bit");
        let d = copy();
        let active = d.path().join(name(segs.len() - 1));
        let mut bytes = std::fs::read(&active).unwrap();
        assert!(
            bytes.len() > 400,
            "the active segment holds several batches"
        );
        bytes[100] ^= 0x40;
        std::fs::write(&active, &bytes).unwrap();
        let log = Log::open_repairing(d.path(), small_config()).await.unwrap();
        let r = log.repaired().expect("a repair");
        assert_eq!(r.last_raft_index, Some(60));
        assert!(log.positions().next < Offset(60));
        drop(log);

        // A torn tail (the last batch half written) is not damage: nothing is reported.
        step("a torn tail");
        let d = copy();
        let active = d.path().join(name(segs.len() - 1));
        // (The file ends in zero padding to the block; the batches end at the last non-zero.)
        let bytes = std::fs::read(&active).unwrap();
        let len = bytes.iter().rposition(|&b| b != 0).unwrap() as u64 + 1;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap()
            .set_len(len - 20)
            .unwrap();
        let log = Log::open_repairing(d.path(), small_config()).await.unwrap();
        assert_eq!(log.repaired(), None);
        assert_eq!(log.positions().next, Offset(59));
    });
}

#[test]
fn state_file_replaces_atomically_and_detects_damage() {
    run(|| async {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path(), "vote");
        assert_eq!(f.read().await.unwrap(), None);
        f.write(b"term=3 voted_for=2").await.unwrap();
        f.write(b"term=4 voted_for=1").await.unwrap();
        assert_eq!(f.read().await.unwrap().unwrap(), b"term=4 voted_for=1");
        // A temp file left by a crash mid-write does not affect the current contents.
        std::fs::write(dir.path().join("vote.tmp"), b"half").unwrap();
        f.clean().await.unwrap();
        assert!(!dir.path().join("vote.tmp").exists());
        assert_eq!(f.read().await.unwrap().unwrap(), b"term=4 voted_for=1");
        // Damage to one of the two files is repaired from the other, whichever it is.
        let flip = |name: &str| {
            let mut raw = std::fs::read(dir.path().join(name)).unwrap();
            raw[14] ^= 1;
            std::fs::write(dir.path().join(name), raw).unwrap();
        };
        flip("vote");
        assert_eq!(f.read().await.unwrap().unwrap(), b"term=4 voted_for=1");
        assert_eq!(
            std::fs::read(dir.path().join("vote")).unwrap(),
            std::fs::read(dir.path().join("vote.copy")).unwrap(),
            "the damaged file was rewritten"
        );
        flip("vote.copy");
        assert_eq!(f.read().await.unwrap().unwrap(), b"term=4 voted_for=1");
        std::fs::remove_file(dir.path().join("vote")).unwrap();
        assert_eq!(f.read().await.unwrap().unwrap(), b"term=4 voted_for=1");
        // A crash between the two renames: the main file holds the newer contents and wins.
        let newer = std::fs::read(dir.path().join("vote")).unwrap();
        f.write(b"term=5 voted_for=3").await.unwrap();
        std::fs::write(dir.path().join("vote.copy"), newer).unwrap();
        assert_eq!(f.read().await.unwrap().unwrap(), b"term=5 voted_for=3");
        assert_eq!(
            std::fs::read(dir.path().join("vote")).unwrap(),
            std::fs::read(dir.path().join("vote.copy")).unwrap()
        );
        // Both damaged: reported, never read as a default.
        flip("vote");
        flip("vote.copy");
        assert!(matches!(f.read().await, Err(LogError::Corrupt { .. })));
        f.remove().await.unwrap();
        assert_eq!(f.read().await.unwrap(), None);
        assert!(f.write(&vec![0; 2 << 20]).await.is_err());
    });
}
