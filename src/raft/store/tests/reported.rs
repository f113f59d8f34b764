//! A follower's committed position moved by its leader's durable reports (`raft::early`).

use super::*;
use crate::raft::store::reported::secured_last;

/// A store of node 2 that voted for node 1 in term 2.
async fn follower_of_1_in_term_2(dir: &Path) -> (Log, LogStore, StateMachine, StoreHandle) {
    let log = Log::open(dir, LogConfig::default()).await.unwrap();
    let (mut ls, sm, h) = open_with_handle(log.clone(), dir, Rc::new(|| {}))
        .await
        .unwrap();
    h.set_member(NodeId(2), false).await.unwrap();
    ls.save_vote(&Vote::new_committed(2, NodeId(1)))
        .await
        .unwrap();
    (log, ls, sm, h)
}

/// A follower's committed position moves by its leader's durable report and its own secured
/// entries, only as far as both hold entries of the leader's term (`raft::early`); applying
/// the same entries afterwards leaves it there. A leader reports its own term's entries only.
#[test]
fn a_follower_commits_what_its_leaders_report_and_its_own_log_prove() {
    run_test(|| async {
        let voters = vec![[NodeId(1), NodeId(2), NodeId(3)].into_iter().collect()];
        let dir = tempfile::tempdir().unwrap();
        let (log, mut ls, mut sm, h) = follower_of_1_in_term_2(dir.path()).await;
        let secured = Rc::new(Cell::new(0));
        let seen = secured.clone();
        h.on_secured(Some(Rc::new(move |_: &StoreHandle| {
            seen.set(seen.get() + 1)
        })));
        // Offsets: a 0, b 1 (term 1); c 2, d 3, e 4 (term 2).
        let entries = vec![
            data_entry(1, 1, &["a"]),
            data_entry(1, 2, &["b"]),
            data_entry(2, 3, &["c", "d"]),
            data_entry(2, 4, &["e"]),
        ];
        let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
        ls.append(entries.clone(), IOFlushed::signal(otx))
            .await
            .unwrap();
        orx.await.unwrap().unwrap();
        // The hook runs just after the flush is reported.
        glommio::yield_if_needed().await;
        for _ in 0..100 {
            if secured.get() > 0 {
                break;
            }
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(secured.get(), 1, "the hook ran once for the append");
        assert_eq!(h.leader_report(), None, "a follower reports nothing");
        let committed = || log.positions().committed.0;
        assert_eq!(h.commit_reported(&voters, u64::MAX), None, "no report yet");
        let report = |term, index| crate::raft::early::Durable {
            leader: NodeId(1),
            term,
            index,
            ..Default::default()
        };
        // Index 2 is of term 1: the leader of term 2 holding it proves nothing.
        h.take_report(report(2, 2));
        assert_eq!(h.commit_reported(&voters, u64::MAX), None);
        assert_eq!(committed(), 0);
        h.take_report(report(2, 3));
        assert_eq!(h.commit_reported(&voters, u64::MAX), Some(Offset(4)));
        // An older report is not kept; the position stays.
        h.take_report(report(2, 2));
        assert_eq!(h.commit_reported(&voters, u64::MAX), None);
        assert_eq!(committed(), 4);
        // The leader holds more than this log: up to what this log holds.
        h.take_report(report(2, 9));
        assert_eq!(h.commit_reported(&voters, u64::MAX), Some(Offset(5)));
        // Applying the entries later leaves the position where it is.
        apply(&mut sm, entries).await.unwrap();
        assert_eq!(committed(), 5);
        // The same log as the leader of term 2 reports its last entry; of term 3, nothing.
        h.set_member(NodeId(1), false).await.unwrap();
        assert_eq!(h.leader_report(), Some(report(2, 4)));
        ls.save_vote(&Vote::new_committed(3, NodeId(1)))
            .await
            .unwrap();
        assert_eq!(h.leader_report(), None);
        log.close().await.unwrap();
    });
}

/// The last entry secured, from where each entry begins and how far the log is secured.
#[test]
fn the_last_entry_secured_is_the_last_one_ending_at_or_before_the_secured_end() {
    let mut map = EntryMap::default();
    // Entries 5, 6, 7 at offsets 10, 12, 15; the log ends at 20.
    for (i, base, term) in [(5, 10, 1), (6, 12, 2), (7, 15, 2)] {
        map.push(
            i,
            Slot {
                base: Offset(base),
                term,
            },
        )
        .unwrap();
    }
    let at = |secured| secured_last(&map, Offset(20), Offset(secured));
    assert_eq!(at(10), None);
    assert_eq!(at(11), None, "entry 5 ends at 12");
    assert_eq!(at(12), Some((5, 1)));
    assert_eq!(at(14), Some((5, 1)));
    assert_eq!(at(15), Some((6, 2)));
    assert_eq!(at(19), Some((6, 2)));
    assert_eq!(at(20), Some((7, 2)));
    assert_eq!(at(25), Some((7, 2)));
    assert_eq!(
        secured_last(&EntryMap::default(), Offset(0), Offset(0)),
        None
    );
}

/// A truncation openraft asks below a committed position moved by a report (it cuts after its
/// own commit before installing a conflicting snapshot) keeps the entries before the position.
#[test]
fn a_truncation_below_a_reported_commit_cuts_from_the_committed_position() {
    run_test(|| async {
        let voters = vec![[NodeId(1), NodeId(2), NodeId(3)].into_iter().collect()];
        let dir = tempfile::tempdir().unwrap();
        let (log, mut ls, _sm, h) = follower_of_1_in_term_2(dir.path()).await;
        let entries = vec![
            data_entry(2, 1, &["a"]),
            data_entry(2, 2, &["b"]),
            data_entry(2, 3, &["c"]),
        ];
        let (otx, orx) = <GlommioRuntime as AsyncRuntime>::Oneshot::channel();
        ls.append(entries, IOFlushed::signal(otx)).await.unwrap();
        orx.await.unwrap().unwrap();
        h.take_report(crate::raft::early::Durable {
            leader: NodeId(1),
            term: 2,
            index: 2,
            ..Default::default()
        });
        assert_eq!(h.commit_reported(&voters, u64::MAX), Some(Offset(2)));
        ls.truncate_after(Some(log_id(2, 1))).await.unwrap();
        let state = ls.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2, 2)));
        assert_eq!(log.positions().next, Offset(2));
        log.close().await.unwrap();
    });
}
