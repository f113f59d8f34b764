//! The storage against openraft's own suite, and its restart, snapshot and vote rules.

use super::*;
use bytes::Bytes;
use openraft::entry::RaftEntry;
use openraft::storage::{
    IOFlushed, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine,
};
use openraft::EntryPayload;

use crate::log::{BatchBuilder, LogConfig, Record};
use crate::raft::rt::run_test;
use crate::raft::types::{EntryBatch, PartitionRaft, SnapshotMeta, StoredMembership, Vote};
use crate::raft::GlommioRuntime;
use crate::types::{NodeId, TimestampMs};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft_rt::{AsyncRuntime, Oneshot};

mod reported;

struct Builder;

impl StoreBuilder<PartitionRaft, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), openraft::StorageError<PartitionRaft>>
    {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (ls, sm) = open(log, dir.path()).await.unwrap();
        Ok((dir, ls, sm))
    }
}

/// Saves of the state file from several tasks at once (the log's and the state machine's)
/// all succeed, and the last state wins (they raced on the temporary file: one failed with
/// ENOENT and stopped the group).
#[test]
fn concurrent_state_saves_all_succeed() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, _sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
            .await
            .unwrap();
        let saves = (0..8u64).map(|i| {
            let h = h.0.clone();
            async move {
                h.durable.borrow_mut().purged_end = Some(i);
                h.save().await
            }
        });
        for r in futures::future::join_all(saves).await {
            r.unwrap();
        }
        h.0.durable.borrow_mut().purged_end = Some(99);
        h.0.save().await.unwrap();
        log.close().await.unwrap();
        drop(h);
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, _sm, h) = open_with_handle(log, dir.path(), Rc::new(|| {}))
            .await
            .unwrap();
        assert_eq!(h.0.durable.borrow().purged_end, Some(99));
    });
}

/// A log purged behind a snapshot past its membership entry keeps that membership (and the
/// snapshot) over a restart: before, the reopened replica knew no voters and its group never
/// elected a leader again (found by the metadata log's purge; retention purges the same way).
#[test]
fn a_purge_past_the_membership_entry_keeps_the_membership_over_a_restart() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let membership =
            openraft::Membership::new_with_defaults(vec![[NodeId(1)].into()], [NodeId(1)]);
        {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, mut sm) = open(log.clone(), dir.path()).await.unwrap();
            let entries = vec![
                Entry::new(log_id(1, 0), EntryPayload::Membership(membership.clone())),
                data_entry(1, 1, &["a", "b"]),
                data_entry(1, 2, &["c"]),
            ];
            let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
            ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
            orx.await.unwrap().unwrap();
            let stored = ls.try_get_log_entries(0..3).await.unwrap();
            sm.apply(futures::stream::iter(
                stored.into_iter().map(|e| Ok((e, None))),
            ))
            .await
            .unwrap();
            let mut b = sm.get_snapshot_builder().await;
            let snap = b.build_snapshot().await.unwrap();
            assert_eq!(snap.meta.last_log_id, Some(log_id(1, 2)));
            ls.purge(log_id(1, 2)).await.unwrap();
            log.close().await.unwrap();
        }
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, mut sm) = open(log.clone(), dir.path()).await.unwrap();
        let (applied, kept) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 2)));
        assert_eq!(kept.log_id(), &Some(log_id(1, 0)));
        assert_eq!(kept.membership(), &membership);
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        assert_eq!(current.meta.last_log_id, Some(log_id(1, 2)));
    });
}

/// A snapshot that ends past this replica's log (the leader's retention deleted what it
/// misses) restarts the log, empty, at the snapshot's end, and that survives reopening; a
/// restart cut short after its purge point was saved is redone when the store opens.
#[test]
fn a_snapshot_past_the_log_restarts_it_there_and_a_cut_restart_is_redone() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let membership =
            openraft::Membership::new_with_defaults(vec![[NodeId(1)].into()], [NodeId(1)]);
        let positions = |log: &Log| {
            let p = log.positions();
            (p.start.0, p.next.0, p.committed.0)
        };
        {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, mut sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            let entries = vec![
                Entry::new(log_id(1, 0), EntryPayload::Membership(membership.clone())),
                data_entry(1, 1, &["a", "b"]),
            ];
            let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
            ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
            orx.await.unwrap().unwrap();
            let meta = SnapshotMeta {
                last_log_id: Some(log_id(4, 50)),
                last_membership: StoredMembership::new(Some(log_id(1, 0)), membership.clone()),
            };
            sm.install_snapshot(&meta, LogSnapshot { end: Offset(700) })
                .await
                .unwrap();
            assert_eq!(positions(&log), (700, 700, 700));
            let state = ls.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(4, 50)));
            assert_eq!(state.last_log_id, Some(log_id(4, 50)));
            assert!(ls.try_get_log_entries(0..60).await.unwrap().is_empty());
            // A restart cut short: the next purge point is saved, the log not restarted.
            {
                let mut d = h.0.durable.borrow_mut();
                d.purged = Some(log_id(4, 80));
                d.purged_end = Some(900);
            }
            h.0.save().await.unwrap();
            log.close().await.unwrap();
        }
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (mut ls, _sm) = open(log.clone(), dir.path()).await.unwrap();
        assert_eq!(positions(&log), (900, 900, 900));
        let state = ls.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(4, 80)));
        log.close().await.unwrap();
    });
}

/// A replica that joins its group by a move does not vote until it has applied a
/// membership making it a learner and then one making it a voter; the permission survives
/// reopening; a replica created with its group votes from the start; so does a joining one
/// that already holds state (a restart).
#[test]
fn a_joining_replica_votes_only_after_being_a_learner_then_a_voter() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let m = |voters: &[u64], all: &[u64]| -> Membership {
            openraft::Membership::new_with_defaults(
                vec![voters.iter().copied().map(NodeId).collect()],
                all.iter().copied().map(NodeId),
            )
        };
        {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (_ls, _sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            h.set_member(NodeId(3), true).await.unwrap();
            assert!(!h.may_vote());
            // An old configuration listing node 3 as a voter (its earlier membership).
            h.0.saw_membership(&m(&[1, 2, 3], &[1, 2, 3]), false)
                .await
                .unwrap();
            assert!(!h.may_vote(), "an old configuration let it vote");
            h.0.saw_membership(&m(&[1, 2, 4], &[1, 2, 3, 4]), false)
                .await
                .unwrap();
            assert!(!h.may_vote());
            h.0.saw_membership(&m(&[1, 2, 3], &[1, 2, 3]), false)
                .await
                .unwrap();
            assert!(h.may_vote(), "learner then voter");
            log.close().await.unwrap();
        }
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, _sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
            .await
            .unwrap();
        h.set_member(NodeId(3), true).await.unwrap();
        assert!(h.may_vote(), "the permission was not kept");
        log.close().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, _sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
            .await
            .unwrap();
        h.set_member(NodeId(1), false).await.unwrap();
        assert!(h.may_vote());
        log.close().await.unwrap();
    });
}

/// A damaged replica does not vote until it has applied the last entry it held, or an entry
/// of a term after the vote it had when damaged; the rule survives a restart.
#[test]
fn a_damaged_replica_votes_again_after_its_lost_entry_or_a_later_term() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let open_handle = || async {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (ls, sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            (log, ls, sm, h)
        };
        let (log, mut ls, _sm, h) = open_handle().await;
        ls.save_vote(&Vote::new_committed(2, NodeId(1)))
            .await
            .unwrap();
        assert!(h.may_vote());
        h.0.durable.borrow_mut().note_damage(10);
        h.0.save().await.unwrap();
        assert!(!h.may_vote());
        log.close().await.unwrap();
        drop((ls, h));
        let (log, mut ls, _sm, h) = open_handle().await;
        assert!(!h.may_vote(), "the rule did not survive a restart");
        assert_eq!(h.recovering_to(), Some(10));
        h.0.recovered_through(Some(log_id(2, 9))).await.unwrap();
        assert!(!h.may_vote(), "voting again before entry 10");
        h.0.recovered_through(Some(log_id(3, 5))).await.unwrap();
        assert!(h.may_vote(), "an entry of a later term ends the recovery");
        // The lost entry itself ends it too, within the same term.
        ls.save_vote(&Vote::new_committed(3, NodeId(1)))
            .await
            .unwrap();
        h.0.durable.borrow_mut().note_damage(20);
        h.0.recovered_through(Some(log_id(3, 19))).await.unwrap();
        assert!(!h.may_vote());
        h.0.recovered_through(Some(log_id(3, 20))).await.unwrap();
        assert!(h.may_vote());
        // Unknown (u64::MAX): only a later term ends it.
        h.0.durable.borrow_mut().note_damage(u64::MAX);
        h.0.recovered_through(Some(log_id(3, 1_000_000)))
            .await
            .unwrap();
        assert!(!h.may_vote());
        h.0.recovered_through(Some(log_id(4, 1_000_001)))
            .await
            .unwrap();
        assert!(h.may_vote());
        log.close().await.unwrap();
    });
}

/// openraft's own storage conformance suite, run against the partition log.
#[test]
fn passes_openraft_storage_suite() {
    run_test(|| async {
        Suite::test_all(Builder).await.unwrap();
    });
}

fn data_entry(term: u64, index: u64, values: &[&str]) -> Entry {
    let mut b = BatchBuilder::new(1 << 20);
    for v in values {
        b.push(&Record {
            key: None,
            value: Bytes::copy_from_slice(v.as_bytes()),
            headers: Vec::new(),
            timestamp: TimestampMs(1_000),
            ttl_ms: None,
        })
        .unwrap();
    }
    Entry::new(
        log_id(term, index),
        EntryPayload::Normal(EntryBatch(b.finish().unwrap())),
    )
}

/// Entries, their offsets, the vote, a truncation and a purge all survive reopening: the
/// index → offset map is rebuilt from the batch headers alone.
#[test]
fn reopening_recovers_entries_vote_truncation_and_purge() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let members =
            std::collections::BTreeMap::from([(NodeId(1), super::super::types::Member::default())]);
        {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, mut sm) = open(log.clone(), dir.path()).await.unwrap();
            ls.save_vote(&Vote::new_committed(2, NodeId(1)))
                .await
                .unwrap();
            let entries = vec![
                Entry::new(
                    log_id(1, 0),
                    EntryPayload::Membership(openraft::Membership::new_with_defaults(
                        vec![[NodeId(1)].into()],
                        members.keys().copied(),
                    )),
                ),
                Entry::new(log_id(2, 1), EntryPayload::Blank),
                data_entry(2, 2, &["a", "b", "c"]),
                data_entry(2, 3, &["d"]),
                data_entry(2, 4, &["e", "f"]),
            ];
            let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
            ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
            orx.await.unwrap().unwrap();
            // Offsets: membership 0, blank 1, [2,5), [5,6), [6,8).
            let got = ls.try_get_log_entries(2..5).await.unwrap();
            let bases: Vec<u64> = got
                .iter()
                .map(|e| match &e.payload {
                    EntryPayload::Normal(EntryBatch(b)) => b.base_offset().0,
                    _ => panic!("not data"),
                })
                .collect();
            assert_eq!(bases, vec![2, 5, 6]);
            // Those came from the in-memory tail; a fresh view reads the same from disk.
            let (mut disk, _) = open(log.clone(), dir.path()).await.unwrap();
            assert_eq!(
                disk.try_get_log_entries(0..5).await.unwrap(),
                ls.try_get_log_entries(0..5).await.unwrap()
            );
            // Apply the first four: committed moves to 6.
            let applied = ls.try_get_log_entries(0..4).await.unwrap();
            sm.apply(futures::stream::iter(
                applied.into_iter().map(|e| Ok((e, None))),
            ))
            .await
            .unwrap();
            assert_eq!(log.positions().committed, Offset(6));
            assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(2, 3)));
            // Drop the divergent last entry, purge the first.
            ls.truncate_after(Some(log_id(2, 3))).await.unwrap();
            ls.purge(log_id(1, 0)).await.unwrap();
            assert_eq!(log.positions().next, Offset(6));
            log.close().await.unwrap();
        }
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (mut ls, _sm) = open(log, dir.path()).await.unwrap();
        let state = ls.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 0)));
        assert_eq!(state.last_log_id, Some(log_id(2, 3)));
        assert_eq!(
            ls.read_vote().await.unwrap(),
            Some(Vote::new_committed(2, NodeId(1)))
        );
        let all = ls.try_get_log_entries(..).await.unwrap();
        let ids: Vec<LogId> = all.iter().map(|e| e.log_id).collect();
        assert_eq!(ids, vec![log_id(2, 1), log_id(2, 2), log_id(2, 3)]);
        assert!(matches!(all[0].payload, EntryPayload::Blank));
        // The next entry must follow the last one.
        let (otx, _orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
        assert!(ls
            .append(vec![data_entry(3, 9, &["x"])], IOFlushed::signal(otx))
            .await
            .is_err());
    });
}

async fn apply(sm: &mut StateMachine, entries: Vec<Entry>) -> Result<(), io::Error> {
    sm.apply(futures::stream::iter(
        entries.into_iter().map(|e| Ok((e, None))),
    ))
    .await
}

fn producer_entry(term: u64, index: u64, seq: i32) -> Entry {
    let mut b = BatchBuilder::new(1 << 20)
        .producer(crate::types::ProducerId(7), crate::types::Sequence(seq));
    for v in ["x", "y"] {
        b.push(&Record {
            key: None,
            value: Bytes::copy_from_slice(v.as_bytes()),
            headers: Vec::new(),
            timestamp: TimestampMs(1_000),
            ttl_ms: None,
        })
        .unwrap();
    }
    Entry::new(
        log_id(term, index),
        EntryPayload::Normal(EntryBatch(b.finish().unwrap())),
    )
}

/// Appends a membership entry at 0, then entries 1 to 7 of producer 7, entry i holding its
/// sequences 2(i-1) and 2(i-1)+1 (two records each: entry i starts at offset 1 + 2(i-1)),
/// and waits until they are flushed.
async fn append_producer_log(ls: &mut LogStore, membership: &crate::raft::types::Membership) {
    let mut entries = vec![Entry::new(
        log_id(1, 0),
        EntryPayload::Membership(membership.clone()),
    )];
    entries.extend((1..8).map(|i| producer_entry(1, i, 2 * (i as i32 - 1))));
    let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
    ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
    orx.await.unwrap().unwrap();
}

/// A restart starts from the applied checkpoint: the applied entry, its membership, the
/// idempotent producers and the committed position come back, so only the entries after it
/// are applied again (before, the whole log was, and a restarted leader kept its producers
/// waiting while it did). A log that no longer holds the checkpoint's entry (cut by repair,
/// or by a crash before its bytes were durable) ignores it and is applied from the start.
#[test]
fn a_restart_starts_from_the_applied_checkpoint_unless_the_log_lost_its_entry() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let membership =
            openraft::Membership::new_with_defaults(vec![[NodeId(1)].into()], [NodeId(1)]);
        let p7 = crate::types::ProducerId(7);
        let committed_at_5;
        {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, mut sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            h.0.checkpoint_every.set(4);
            append_producer_log(&mut ls, &membership).await;
            apply(&mut sm, ls.try_get_log_entries(0..6).await.unwrap())
                .await
                .unwrap();
            committed_at_5 = log.positions().committed;
            // Past the checkpoint at 5 but not far enough for the next one.
            apply(&mut sm, ls.try_get_log_entries(6..8).await.unwrap())
                .await
                .unwrap();
            assert_eq!(h.producers().last_sequence(p7), Some(13));
            log.close().await.unwrap();
        }
        {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, mut sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            let (applied, m) = sm.applied_state().await.unwrap();
            assert_eq!(applied, Some(log_id(1, 5)), "starts from the checkpoint");
            assert_eq!(m.log_id(), &Some(log_id(1, 0)));
            assert_eq!(m.membership(), &membership);
            assert_eq!(log.positions().committed, committed_at_5);
            assert_eq!(h.producers().last_sequence(p7), Some(9));
            assert_eq!(
                h.producers().check(p7, crate::types::Sequence(8), 2, &[]),
                crate::raft::producers::SeqCheck::Duplicate(vec![
                    Offset(committed_at_5.0 - 2),
                    Offset(committed_at_5.0 - 1)
                ]),
                "a retry of the checkpoint's last batch is known, with its offsets"
            );
            // What openraft applies next: the entries after the checkpoint.
            apply(&mut sm, ls.try_get_log_entries(6..8).await.unwrap())
                .await
                .unwrap();
            assert_eq!(h.producers().last_sequence(p7), Some(13));
            log.close().await.unwrap();
        }
        {
            // The log loses entries 4.. (as a repair's cut would; entry 4 starts at offset
            // 1 + 2 * 3): the checkpoint at 5 is not in it any more.
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            log.truncate_from(Offset(7)).await.unwrap();
            log.close().await.unwrap();
        }
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, mut sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
            .await
            .unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied, None, "a checkpoint past the log is ignored");
        assert!(h.producers().is_empty());
    });
}

/// A damaged checkpoint is ignored (the log is applied from the start), never a reason not to
/// open.
#[test]
fn a_damaged_checkpoint_is_ignored() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        for name in ["raft.applied", "raft.applied.copy"] {
            std::fs::write(dir.path().join(name), b"TSTA\x05\x00\x00\x00garbage!").unwrap();
        }
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, mut sm) = open(log, dir.path()).await.unwrap();
        assert_eq!(sm.applied_state().await.unwrap().0, None);
    });
}

/// Reopens the log in `dir` and its Raft store, checks that every sealed segment's stamps
/// came from its stamps file (none had to be read from the batches), and reads the log ids of
/// entries 0..=40. Returns them, the log, and its sealed segments.
async fn reopened_from_stamps(
    dir: &Path,
    config: LogConfig,
) -> (Vec<LogId>, Log, Vec<(Offset, Offset, Rc<Path>)>) {
    let log = Log::open(dir, config).await.unwrap();
    let sealed = log.sealed_segments();
    let (mut ls, _sm, h) = open_with_handle(log.clone(), dir, Rc::new(|| {}))
        .await
        .unwrap();
    assert_eq!(
        h.take_unverified(),
        Some((Offset(0), sealed.last().unwrap().1)),
        "every sealed segment came from its stamps file"
    );
    let ids = ls
        .try_get_log_entries(0..41)
        .await
        .unwrap()
        .iter()
        .map(|e| e.log_id)
        .collect();
    (ids, log, sealed)
}

/// A restart maps the sealed segments' entries from their stamps files, not their batches:
/// a flipped byte inside a sealed segment does not stop the open (that part is handed on to
/// be verified in the background, and a read of it still refuses the bad batch), while
/// without the stamps file the same open reads the batches and finds the damage. The map is
/// the same from stamps as from batches.
#[test]
fn a_restart_maps_sealed_segments_from_their_stamps_files() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes_max: 4096,
            ..LogConfig::default()
        };
        let value = "v".repeat(500);
        {
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            let (mut ls, _sm) = open(log.clone(), dir.path()).await.unwrap();
            let entries = (0..=40)
                .map(|i| data_entry(1 + i / 20, i, &[&value, &value]))
                .collect::<Vec<_>>();
            let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
            ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
            orx.await.unwrap().unwrap();
            log.close().await.unwrap();
        }
        let sealed = {
            let (ids, log, sealed) = reopened_from_stamps(dir.path(), config.clone()).await;
            assert!(sealed.len() >= 4, "{} sealed segments", sealed.len());
            let want: Vec<_> = (0..=40).map(|i| log_id(1 + i / 20, i)).collect();
            assert_eq!(ids, want);
            log.close().await.unwrap();
            sealed
        };
        let (_, _, victim) = &sealed[1];
        let mut bytes = std::fs::read(victim).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(victim, bytes).unwrap();
        {
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            let (mut ls, _sm) = open(log.clone(), dir.path()).await.unwrap();
            let last = ls.get_log_state().await.unwrap().last_log_id;
            assert_eq!(
                last,
                Some(log_id(3, 40)),
                "opened without reading the damage"
            );
            let damaged = sealed[1].0 .0 as usize;
            let read = log
                .read(Offset(damaged as u64), 1 << 20, ReadBound::Written)
                .await;
            assert!(read.is_err(), "a read of the damaged segment is refused");
            assert_eq!(log.damaged_segment().as_deref(), Some(&**victim));
            log.close().await.unwrap();
        }
        std::fs::remove_file(victim.with_extension("stamps")).unwrap();
        let log = Log::open(dir.path(), config).await.unwrap();
        let opened = open(log.clone(), dir.path()).await;
        assert!(
            opened.is_err(),
            "without its stamps the segment's batches are read, and the damage found"
        );
        log.close().await.unwrap();
    });
}

/// Large entries are checkpointed by bytes applied, whatever the entry count: a restart never
/// re-applies much more than `EVERY_BYTES` of log.
#[test]
fn a_checkpoint_is_saved_after_enough_bytes_whatever_the_entry_count() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let value = "v".repeat(900 << 10);
        let n = 24;
        {
            let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
            let (mut ls, mut sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
                .await
                .unwrap();
            h.set_checkpoint_entries(u64::MAX / 2);
            let entries = (0..n)
                .map(|i| data_entry(1, i, &[&value]))
                .collect::<Vec<_>>();
            let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
            ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
            orx.await.unwrap().unwrap();
            for i in 0..n {
                apply(&mut sm, ls.try_get_log_entries(i..i + 1).await.unwrap())
                    .await
                    .unwrap();
            }
            log.close().await.unwrap();
        }
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (_ls, mut sm) = open(log.clone(), dir.path()).await.unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        // 16 MiB is crossed by the 19th entry of 900 KiB (index 18).
        assert_eq!(applied, Some(log_id(1, 18)));
        log.close().await.unwrap();
    });
}

/// A follower's divergent tail cut inside a sealed segment (which becomes active again and
/// loses its stamps file) and replaced by entries of a later term, across new sealed
/// segments: after a restart the map says what the log holds, from the stamps files of the
/// segments sealed since, never from a stale one.
#[test]
fn stamps_follow_a_truncation_into_a_sealed_segment() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig {
            segment_bytes_max: 4096,
            ..LogConfig::default()
        };
        let value = "v".repeat(500);
        let append = |ls: &mut LogStore, entries: Vec<Entry>| {
            let mut ls = ls.clone();
            async move {
                let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
                ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
                orx.await.unwrap().unwrap();
            }
        };
        {
            let log = Log::open(dir.path(), config.clone()).await.unwrap();
            let (mut ls, _sm) = open(log.clone(), dir.path()).await.unwrap();
            let first = (0..=30)
                .map(|i| data_entry(1, i, &[&value, &value]))
                .collect();
            append(&mut ls, first).await;
            assert!(log.sealed_segments().len() >= 4);
            // Entries 6.. go (entry 6 lies in a sealed segment), and term 2 writes 6..=40.
            ls.truncate_after(Some(log_id(1, 5))).await.unwrap();
            let second = (6..=40).map(|i| data_entry(2, i, &[&value])).collect();
            append(&mut ls, second).await;
            log.close().await.unwrap();
        }
        // Every sealed segment, the truncated one too, came from a stamps file.
        let (ids, log, _) = reopened_from_stamps(dir.path(), config).await;
        let want: Vec<_> = (0..=40)
            .map(|i| log_id(if i < 6 { 1 } else { 2 }, i))
            .collect();
        assert_eq!(ids, want);
        log.close().await.unwrap();
    });
}

/// A snapshot installed on a replica whose log already holds the snapshot's point (it had the
/// entries but had not applied them yet: its leader sent a snapshot because it had purged what
/// it would have sent first) keeps the log, and records the idempotent producers of the
/// entries it skips applying: before, they were left out, and a leader of a later term
/// answered the producer's next batch as out of order.
#[test]
fn a_snapshot_over_held_entries_records_their_producers() {
    run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let membership =
            openraft::Membership::new_with_defaults(vec![[NodeId(1)].into()], [NodeId(1)]);
        let p7 = crate::types::ProducerId(7);
        let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
        let (mut ls, mut sm, h) = open_with_handle(log.clone(), dir.path(), Rc::new(|| {}))
            .await
            .unwrap();
        append_producer_log(&mut ls, &membership).await;
        apply(&mut sm, ls.try_get_log_entries(0..3).await.unwrap())
            .await
            .unwrap();
        assert_eq!(h.producers().last_sequence(p7), Some(3));
        let next = log.positions().next;
        // The snapshot at entry 6: held by this log, so it is kept.
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(1, 6)),
            last_membership: StoredMembership::new(Some(log_id(1, 0)), membership.clone()),
        };
        let end_of_6 = Offset(1 + 2 * 6);
        sm.install_snapshot(&meta, LogSnapshot { end: end_of_6 })
            .await
            .unwrap();
        assert_eq!(log.positions().next, next, "the log is kept");
        assert_eq!(h.producers().last_sequence(p7), Some(11));
        assert_eq!(
            h.producers().check(p7, crate::types::Sequence(10), 2, &[]),
            crate::raft::producers::SeqCheck::Duplicate(vec![Offset(11), Offset(12)]),
            "a retry of the snapshot's last batch is known, with its offsets"
        );
        assert_eq!(
            h.producers().check(p7, crate::types::Sequence(12), 2, &[]),
            crate::raft::producers::SeqCheck::Append
        );
        // Applying on from there adds entry 7 once.
        apply(&mut sm, ls.try_get_log_entries(7..8).await.unwrap())
            .await
            .unwrap();
        assert_eq!(h.producers().last_sequence(p7), Some(13));
        log.close().await.unwrap();
    });
}
