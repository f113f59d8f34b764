//! A partition on one voter: what an append refuses writes nothing, and idempotent requests
//! arriving together are checked against each other.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;

use super::*;
use crate::log::{LogError, ReadBound, Record};
use crate::raft::types::Member;
use crate::shard::request::{ProducerSeq, ReplicaSettings};
use crate::types::{CoreId, NodeId, Offset, ProducerId, Sequence, TopicUid};

fn rec(len: usize) -> Record {
    Record {
        value: Bytes::from(vec![7u8; len]),
        ..Record::default()
    }
}

/// Partition t/0 of a one-voter group on node 1.
async fn single_voter(dir: &Path, config: crate::log::LogConfig) -> Partition {
    let replica = ReplicaSettings {
        node_id: NodeId(1),
        member: Default::default(),
        timing: Default::default(),
        checkpoint_entries: crate::raft::CHECKPOINT_ENTRIES,
        transport: None,
        quiet: true,
    };
    let key = PartitionKey {
        topic: "t".into(),
        partition: 0,
    };
    let voters = BTreeMap::from([(NodeId(1), Member::default())]);
    let open = OpenPartition {
        key,
        uid: TopicUid(0),
        dir: dir.to_path_buf(),
        config,
        replica,
        voters,
        first: None,
        mirror: false,
        promoted: None,
    };
    Partition::open(open, CoreId(0)).await.unwrap()
}

#[test]
fn a_request_with_an_oversized_record_writes_nothing_of_itself() {
    crate::raft::rt::run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::log::LogConfig {
            batch_bytes_max: 4096,
            pending_bytes_max: 1 << 20,
            retention_ms: None,
            ..crate::log::LogConfig::default()
        };
        let p = single_voter(dir.path(), config).await;
        let (ok_tx, ok_rx) = oneshot::channel();
        let (bad_tx, bad_rx) = oneshot::channel();
        // Together: a good request (3 records, spilling over two batches), then a
        // request whose second record fits no batch.
        p.append(vec![
            (vec![rec(2000), rec(2000), rec(10)], None, ok_tx),
            (vec![rec(10), rec(5000)], None, bad_tx),
        ])
        .await;
        let ok = ok_rx.await.unwrap().unwrap().into_result().unwrap();
        // Consecutive offsets after the group's control entries (membership, blank).
        let first = ok.offsets[0];
        assert_eq!(ok.offsets, vec![first, first.plus(1), first.plus(2)]);
        let bad = bad_rx.await.unwrap();
        assert!(
            matches!(bad, Err(CoreError::Log(LogError::BatchTooLarge { .. }))),
            "{bad:?}"
        );
        // Exactly the good request's records are stored and committed.
        let pos = p.log.positions();
        assert_eq!(pos.next, pos.committed);
        let read = p
            .log
            .read(Offset(0), 1 << 20, ReadBound::Committed)
            .await
            .unwrap();
        let data: usize = read
            .batches
            .iter()
            .filter(|b| !b.meta().control)
            .map(|b| b.record_count() as usize)
            .sum();
        assert_eq!(data, 3);
        p.close().await.unwrap();
    });
}

#[test]
fn idempotent_requests_arriving_together_are_checked_against_each_other() {
    crate::raft::rt::run_test(|| async {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::log::LogConfig {
            retention_ms: None,
            ..crate::log::LogConfig::default()
        };
        let p = single_voter(dir.path(), config).await;
        let id = ProducerId(7);
        let seq = |first: i32| {
            Some(ProducerSeq {
                id,
                first: Sequence(first),
            })
        };
        let (a_tx, a_rx) = oneshot::channel();
        let (dup_tx, dup_rx) = oneshot::channel();
        let (next_tx, next_rx) = oneshot::channel();
        let (last_tx, last_rx) = oneshot::channel();
        // In one call: sequences 0..2, the same again (a retry through another node),
        // then 2..3 (pipelined), then a request ending at i32::MAX.
        p.append(vec![
            (vec![rec(10), rec(10)], seq(0), a_tx),
            (vec![rec(10), rec(10)], seq(0), dup_tx),
            (vec![rec(10)], seq(2), next_tx),
        ])
        .await;
        let a = a_rx.await.unwrap().unwrap().into_result().unwrap();
        assert!(matches!(dup_rx.await.unwrap(), Err(CoreError::InFlight)));
        let next = next_rx.await.unwrap().unwrap().into_result().unwrap();
        assert_eq!(next.offsets, vec![a.offsets[1].plus(1)]);
        // Sent again once committed: answered with the same offsets.
        let (again_tx, again_rx) = oneshot::channel();
        p.append(vec![(vec![rec(10), rec(10)], seq(0), again_tx)])
            .await;
        let again = again_rx.await.unwrap().unwrap().into_result().unwrap();
        assert_eq!(again.offsets, a.offsets);
        // A producer whose sequence reaches i32::MAX (no overflow past its last).
        let big = Some(ProducerSeq {
            id: ProducerId(8),
            first: Sequence(i32::MAX - 1),
        });
        p.append(vec![(vec![rec(10), rec(10)], big, last_tx)]).await;
        assert_eq!(
            last_rx
                .await
                .unwrap()
                .unwrap()
                .into_result()
                .unwrap()
                .offsets
                .len(),
            2
        );
        p.close().await.unwrap();
    });
}
