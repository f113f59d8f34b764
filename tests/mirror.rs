//! Mirror topics on real processes: a three-node cluster mirrors a topic of another cluster
//! through a `tern-wan` delay line, which is cut and healed, while nodes of both sides restart.
//! Every replica of the mirror must end up with the source's records at the source's offsets
//! and timestamps, in order, with nothing skipped or repeated; producers are refused.

mod node_support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use node_support::cluster::{create, publish_retrying, Cluster};
use node_support::{try_fetch_all, try_fetch_from};
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tern_wan::{Link, Proxy};
use tonic::transport::Channel;

const SOURCE: &str = "orders";
const MIRROR: &str = "orders-copy";
const PARTITIONS: u32 = 2;

/// What a record is, for comparing a mirror with its source.
type Seen = (u64, i64, Option<Bytes>, Bytes, usize);

fn seen(records: &[pb::Record]) -> Vec<Seen> {
    records
        .iter()
        .map(|r| {
            (
                r.offset,
                r.timestamp_ms,
                r.key.clone(),
                r.value.clone(),
                r.headers.len(),
            )
        })
        .collect()
}

/// Publishes `n` records to each partition of the source, keyed and with a header, in
/// requests of 1 to 5 records (so batches of several sizes), values `tag-p-i`.
async fn publish(c: &mut TernClient<Channel>, tag: &str, n: usize) {
    for p in 0..PARTITIONS {
        let mut i = 0;
        while i < n {
            let k = (i % 5 + 1).min(n - i);
            let records = (i..i + k)
                .map(|j| pb::PublishRecord {
                    key: Some(Bytes::from(format!("k{}", j % 7))),
                    value: Bytes::from(format!("{tag}-{p}-{j}")),
                    headers: vec![pb::Header {
                        key: "h".into(),
                        value: Bytes::from_static(b"v"),
                    }],
                    partition: Some(p),
                    expiry_seconds: None,
                })
                .collect();
            publish_retrying(
                c,
                pb::PublishRequest {
                    topic: SOURCE.into(),
                    records,
                    ..Default::default()
                },
            )
            .await;
            i += k;
        }
    }
}

/// Waits until every live node of `mirror` serves exactly the source's records of every
/// partition (same offsets, timestamps, keys, values, headers).
async fn wait_mirrored(source: &Cluster, mirror: &Cluster, what: &str) {
    let mut src = source.client(0).await;
    let mut want = Vec::new();
    for p in 0..PARTITIONS {
        want.push(seen(&try_fetch_all(&mut src, SOURCE, p).await.unwrap()));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in mirror.live() {
        let mut c = mirror.client(i).await;
        for (p, want) in want.iter().enumerate() {
            loop {
                let got = try_fetch_all(&mut c, MIRROR, p as u32).await;
                match got {
                    Ok(got) if seen(&got) == *want => break,
                    Ok(got) => {
                        let got = seen(&got);
                        // Never anything the source does not have at that offset.
                        assert!(
                            want.starts_with(&got),
                            "{what}: node {} partition {p} holds records the source does not \
                             have there: got {} records, first difference at {:?}",
                            i + 1,
                            got.len(),
                            got.iter().zip(want.iter()).position(|(a, b)| a != b)
                        );
                    }
                    Err(s) => assert!(
                        matches!(s.code(), tonic::Code::Unavailable | tonic::Code::NotFound),
                        "{what}: fetch from node {}: {s:?}",
                        i + 1
                    ),
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: node {} partition {p} did not catch up with its source",
                    i + 1
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Partition `p` of `topic` as DescribeTopic on the node `c` talks to shows it.
async fn describe_partition(
    c: &mut TernClient<Channel>,
    topic: &str,
    p: u32,
) -> Option<pb::PartitionInfo> {
    let r = c
        .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
        .await
        .ok()?
        .into_inner();
    r.partitions.into_iter().find(|x| x.partition == p)
}

/// Partition `p` of the mirror as node `i` (0-based) shows it: replicas, moves, and whether it
/// holds one (`local`) with its progress.
async fn placement(c: &Cluster, i: usize, p: u32) -> Option<pb::PartitionInfo> {
    describe_partition(&mut c.client(i).await, MIRROR, p).await
}

/// The mirror's progress on node `i`, partition `p`, as DescribeTopic shows it.
async fn progress(c: &Cluster, i: usize, p: u32) -> Option<pb::MirrorProgress> {
    placement(c, i, p).await.and_then(|x| x.mirror)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_in_another_cluster_copies_offsets_through_cuts_and_restarts() {
    let mut source = Cluster::start(1).await;
    let mut src = source.client(0).await;
    create(&mut src, SOURCE, PARTITIONS, 1).await;
    publish(&mut src, "a", 40).await;
    let link = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        source.addrs[0].parse().unwrap(),
        Link::delay(Duration::from_millis(10)),
        Link::delay(Duration::from_millis(10)),
    )
    .await
    .unwrap();

    let mut mirror = Cluster::start(3).await;
    let mut m = mirror.client(0).await;
    // A source that is not there, and a partition count that is not the source's, are refused
    // before anything is created.
    let bad = |topic: &str, partitions: u32| pb::CreateTopicRequest {
        name: MIRROR.into(),
        partitions,
        replication_factor: 3,
        mirror_of: Some(pb::MirrorOf {
            topic: topic.into(),
            addresses: vec![link.addr().to_string()],
        }),
        ..Default::default()
    };
    let e = m.create_topic(bad("nope", 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = m.create_topic(bad(SOURCE, 3)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let created = m
        .create_topic(bad(SOURCE, 0))
        .await
        .expect("create the mirror")
        .into_inner()
        .topic
        .unwrap();
    assert_eq!(created.partitions, PARTITIONS);
    assert_eq!(created.mirror_of.unwrap().topic, SOURCE);
    wait_mirrored(&source, &mirror, "first copy").await;
    // One replica of each partition pulls from the source; the others pull through it, so
    // each batch crosses the link once.
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in 0..PARTITIONS {
        loop {
            let mut via = Vec::new();
            for i in mirror.live() {
                via.push(progress(&mirror, i, p).await.map(|g| g.via));
            }
            let direct = via.iter().filter(|v| **v == Some(0)).count();
            let through = via.iter().filter(|v| v.is_some_and(|n| n != 0)).count();
            if (direct, through) == (1, 2) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "partition {p}: replicas pull through {via:?} (0: the source)"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The replica pulled through is killed (-9) while the source goes on: the others pull from
    // the source meanwhile, and it catches up when it is back; nothing skipped or repeated.
    let mut upstream = None;
    for i in mirror.live() {
        if progress(&mirror, i, 0).await.is_some_and(|g| g.via == 0) {
            upstream = Some(i);
        }
    }
    let upstream = upstream.expect("a replica pulls from the source");
    mirror.kill9(upstream);
    publish(&mut src, "a2", 20).await;
    wait_mirrored(&source, &mirror, "with the replica pulled through down").await;
    mirror.start_node(upstream);
    wait_mirrored(&source, &mirror, "with the replica pulled through back").await;
    let mut m = mirror.client(0).await;

    // Read-only to producers.
    let e = m
        .publish(pb::PublishRequest {
            topic: MIRROR.into(),
            records: vec![node_support::rec(None, "x".into())],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("mirror"), "{e:?}");

    // Cut off: the source goes on; the mirror says how stale it is, and a mirror node restarts
    // meanwhile.
    link.cut();
    publish(&mut src, "b", 30).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = progress(&mirror, 1, 0).await;
        if p.as_ref()
            .is_some_and(|p| p.lag_ms >= 2_000 && p.contact_ms.is_some_and(|c| c >= 2_000))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut never showed as lag: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mirror.kill9(2);
    mirror.start_node(2);
    link.heal();
    wait_mirrored(&source, &mirror, "after the cut").await;
    let p = progress(&mirror, 0, 1).await.expect("mirror progress");
    assert_eq!(p.lag_records, 0, "{p:?}");
    assert!(p.error.is_empty(), "{p:?}");

    // The source restarts, and more arrives, from an idempotent producer too.
    source.kill9(0);
    source.start_node(0);
    source.wait_formed().await;
    let mut src = source.client(0).await;
    publish(&mut src, "c", 20).await;
    let producer = src
        .init_producer(pb::InitProducerRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    let idempotent = pb::PublishRequest {
        topic: SOURCE.into(),
        records: (0..3)
            .map(|i| node_support::cluster::record(0, format!("idem-{i}")))
            .collect(),
        producer_id: producer,
        sequence: 0,
        ..Default::default()
    };
    let first: Vec<u64> = src
        .publish(idempotent.clone())
        .await
        .unwrap()
        .into_inner()
        .acks
        .iter()
        .map(|a| a.offset)
        .collect();
    wait_mirrored(&source, &mirror, "after the source restarted").await;

    // Disaster: the source is gone. The mirror is promoted and takes writes, continuing the
    // source's offsets; the producer's retry is recognised, not written twice.
    let mut ends = Vec::new();
    for p in 0..PARTITIONS {
        ends.push(try_fetch_all(&mut src, SOURCE, p).await.unwrap().len());
    }
    let source_end = |c: &mut TernClient<Channel>, p: u32| {
        let mut c = c.clone();
        async move {
            c.list_offsets(pb::ListOffsetsRequest {
                topic: SOURCE.into(),
                partitions: vec![p],
                position: None,
            })
            .await
            .unwrap()
            .into_inner()
            .partitions[0]
                .end_offset
        }
    };
    let mut src_ends = Vec::new();
    for p in 0..PARTITIONS {
        src_ends.push(source_end(&mut src, p).await);
    }
    // Control records (a restarted source's new term) count too: wait until every replica
    // holds the source's whole log.
    for i in mirror.live() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut c = mirror.client(i).await;
        loop {
            let r = c
                .describe_topic(pb::DescribeTopicRequest {
                    name: MIRROR.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let held: Vec<u64> = r.partitions.iter().map(|p| p.end_offset).collect();
            if held == src_ends {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: {held:?} != {src_ends:?}",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    drop(src);
    source.kill9(0);
    let promoted = m
        .promote_topic(pb::PromoteTopicRequest {
            name: MIRROR.into(),
        })
        .await
        .expect("promote")
        .into_inner();
    assert_eq!(
        promoted.ends, src_ends,
        "the mirror had everything: nothing lost"
    );
    assert!(promoted.topic.unwrap().mirror_of.is_none());
    // Promoting again answers the same.
    let again = m
        .promote_topic(pb::PromoteTopicRequest {
            name: MIRROR.into(),
        })
        .await
        .expect("promote again")
        .into_inner();
    assert_eq!(again.ends, src_ends);

    let retry = pb::PublishRequest {
        topic: MIRROR.into(),
        ..idempotent
    };
    let acks = publish_retrying_acks(&mut m, retry).await;
    assert_eq!(acks, first, "the retry after promotion was written again");
    let fresh = publish_retrying_acks(
        &mut m,
        pb::PublishRequest {
            topic: MIRROR.into(),
            records: vec![node_support::cluster::record(0, "after".into())],
            ..Default::default()
        },
    )
    .await;
    assert!(
        fresh[0] >= src_ends[0],
        "a new record got offset {} inside the copied range (cut {})",
        fresh[0],
        src_ends[0]
    );
    // Every replica holds the copied records and the new one after them, in order.
    for i in mirror.live() {
        let mut c = mirror.client(i).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rs = try_fetch_all(&mut c, MIRROR, 0).await.unwrap_or_default();
            if rs.last().is_some_and(|r| r.value == "after") {
                assert_eq!(rs.len(), ends[0] + 1, "node {}", i + 1);
                assert_eq!(rs.last().unwrap().offset, fresh[0]);
                let offsets: Vec<u64> = rs.iter().map(|r| r.offset).collect();
                assert!(offsets.windows(2).all(|w| w[0] < w[1]), "node {}", i + 1);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never served the promoted topic's new record",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A one-node source cluster whose topic has `n` records per partition (values tagged `tag`),
/// and a cluster of `nodes` nodes holding its mirror with `rf` replicas, caught up.
async fn source_and_mirror(tag: &str, n: usize, nodes: usize, rf: u32) -> (Cluster, Cluster) {
    let source = Cluster::start(1).await;
    let mut src = source.client(0).await;
    create(&mut src, SOURCE, PARTITIONS, 1).await;
    publish(&mut src, tag, n).await;
    let mirror = Cluster::start(nodes).await;
    create_mirror(&mut mirror.client(0).await, &source.addrs[0], rf).await;
    wait_mirrored(&source, &mirror, "first copy").await;
    (source, mirror)
}

/// Creates the mirror of the source topic at `address`, with `rf` replicas.
async fn create_mirror(m: &mut TernClient<Channel>, address: &str, rf: u32) {
    m.create_topic(pb::CreateTopicRequest {
        name: MIRROR.into(),
        replication_factor: rf,
        mirror_of: Some(pb::MirrorOf {
            topic: SOURCE.into(),
            addresses: vec![address.to_string()],
        }),
        ..Default::default()
    })
    .await
    .expect("create the mirror");
}

/// Publishes (retrying while the partition has no leader yet) and answers the offsets.
async fn publish_retrying_acks(c: &mut TernClient<Channel>, req: pb::PublishRequest) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.publish(req.clone()).await {
            Ok(r) => return r.into_inner().acks.iter().map(|a| a.offset).collect(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("publish failed: {s:?}"),
        }
    }
}

/// A replica down while its mirror is promoted: the promotion goes on with the majority (after
/// waiting for every replica a while), and the replica, short of the cut when it returns,
/// reopens as a member of the promoted group: it takes the new records, in order after the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_down_during_the_promotion_rejoins_the_promoted_topic() {
    let (mut source, mut mirror) = source_and_mirror("a", 20, 3, 3).await;
    let mut src = source.client(0).await;
    let mut m = mirror.client(0).await;

    // Node 3 goes down; the source goes on; the others copy it.
    mirror.kill9(2);
    publish(&mut src, "b", 20).await;
    wait_mirrored(&source, &mirror, "without node 3").await;
    let promoted = m
        .promote_topic(pb::PromoteTopicRequest {
            name: MIRROR.into(),
        })
        .await
        .expect("promote with a replica down")
        .into_inner();
    let mut src_ends = Vec::new();
    for p in 0..PARTITIONS {
        let r = src
            .list_offsets(pb::ListOffsetsRequest {
                topic: SOURCE.into(),
                partitions: vec![p],
                position: None,
            })
            .await
            .unwrap()
            .into_inner();
        src_ends.push(r.partitions[0].end_offset);
    }
    assert_eq!(promoted.ends, src_ends);
    let after = publish_retrying_acks(
        &mut m,
        pb::PublishRequest {
            topic: MIRROR.into(),
            records: vec![node_support::cluster::record(0, "after".into())],
            ..Default::default()
        },
    )
    .await;
    assert!(after[0] >= src_ends[0]);

    // The source is gone for good. Node 3 returns: its replica (a mirror's, short of the cut,
    // with nothing to pull from) reopens in the promoted group, starting at the cut, and
    // receives what was written after the promotion.
    drop(src);
    source.kill9(0);
    mirror.start_node(2);
    let mut c = mirror.client(2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .fetch(pb::FetchRequest {
                topic: MIRROR.into(),
                partition: 0,
                offset: src_ends[0],
                max_records: 100,
                ..Default::default()
            })
            .await;
        if let Ok(r) = &r {
            let values: Vec<&[u8]> = r.get_ref().records.iter().map(|r| &r.value[..]).collect();
            if values.contains(&&b"after"[..]) {
                assert_eq!(values, vec![&b"after"[..]], "node 3 after the cut");
                assert_eq!(r.get_ref().records[0].offset, after[0]);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node 3 never served the promoted topic's record: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Node 3's log starts at the cut, but the partition does not: a read of the records
    // before it, entering node 3, is served by the replicas that hold them (not refused as
    // out of range), the same records at the same offsets as node 1 serves them.
    assert!(src_ends[0] > 0, "partition 0 holds copied records");
    let through_3 = read_before(&mut c, src_ends[0]).await;
    assert!(!through_3.is_empty());
    assert_eq!(through_3, read_before(&mut m, src_ends[0]).await);
    // And "earliest", or the first record at or after time 0, asked of node 3 is the
    // partition's start, not the cut.
    use pb::start_position::Position;
    for at in [Position::Earliest(true), Position::TimestampMs(0)] {
        for (node, c) in [("node 3", &mut c), ("node 1", &mut m)] {
            let r = c
                .list_offsets(pb::ListOffsetsRequest {
                    topic: MIRROR.into(),
                    partitions: vec![0],
                    position: Some(pb::StartPosition { position: Some(at) }),
                })
                .await
                .unwrap_or_else(|s| panic!("{at:?} through {node}: {s:?}"))
                .into_inner();
            let o = &r.partitions[0];
            assert_eq!((o.start_offset, o.offset), (0, 0), "{at:?} through {node}");
        }
    }
    // Node 3 remembers that it started over, across a kill -9: once it answers again, its
    // "earliest" is still the partition's start, not the cut.
    mirror.kill9(2);
    mirror.start_node(2);
    let mut c = mirror.client(2).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let earliest = loop {
        let r = c
            .list_offsets(pb::ListOffsetsRequest {
                topic: MIRROR.into(),
                partitions: vec![0],
                position: Some(pb::StartPosition {
                    position: Some(Position::Earliest(true)),
                }),
            })
            .await;
        match r {
            Ok(r) => break r.into_inner().partitions[0].offset,
            Err(s) => assert!(Instant::now() < deadline, "node 3 never answered: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(earliest, 0, "earliest through node 3 after its restart");
    // The group goes on taking writes with node 3 in it.
    publish_retrying_acks(
        &mut m,
        pb::PublishRequest {
            topic: MIRROR.into(),
            records: vec![node_support::cluster::record(1, "later".into())],
            ..Default::default()
        },
    )
    .await;
}

/// The records of the mirror's partition 0 before offset `end`, as (offset, value), read
/// through the node `c` talks to.
async fn read_before(c: &mut TernClient<Channel>, end: u64) -> Vec<(u64, Vec<u8>)> {
    let (mut out, mut from) = (Vec::new(), 0);
    while from < end {
        let r = c
            .fetch(pb::FetchRequest {
                topic: MIRROR.into(),
                partition: 0,
                offset: from,
                max_records: 100,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("reading partition 0 at {from}: {s:?}"))
            .into_inner();
        assert!(r.next_offset > from, "no progress at {from}: {r:?}");
        out.extend(
            r.records
                .iter()
                .filter(|r| r.offset < end)
                .map(|r| (r.offset, r.value.to_vec())),
        );
        from = r.next_offset;
    }
    out
}

/// The source topic deleted and created again under the same name: the mirror copies nothing
/// of the new topic (another uid; its offsets start over and its Raft entries do not follow
/// the ones copied), says why in its progress, and still serves what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_topic_created_again_is_not_copied() {
    // Requests of 1 to 5 records: fewer Raft entries than offsets.
    let (source, mirror) = source_and_mirror("old", 40, 1, 1).await;
    let mut src = source.client(0).await;
    let mut m = mirror.client(0).await;
    let mut had = Vec::new();
    for p in 0..PARTITIONS {
        had.push(seen(&try_fetch_all(&mut m, MIRROR, p).await.unwrap()));
    }

    src.delete_topic(pb::DeleteTopicRequest {
        name: SOURCE.into(),
    })
    .await
    .expect("delete the source");
    create(&mut src, SOURCE, PARTITIONS, 1).await;
    // One record per request, past the mirror's end: the new topic has batches at the
    // offsets the mirror would ask for next.
    for p in 0..PARTITIONS {
        for i in 0..80 {
            publish_retrying_acks(
                &mut src,
                pb::PublishRequest {
                    topic: SOURCE.into(),
                    records: vec![node_support::cluster::record(p, format!("new-{p}-{i}"))],
                    ..Default::default()
                },
            )
            .await;
        }
    }
    // Refused: the mirror asks for the topic it was created from (its uid), and the source
    // answers that this one is another. (Behind that, the Raft stamps: the batch at the
    // mirror's end is there, but it does not follow the last one copied.)
    let deadline = Instant::now() + Duration::from_secs(30);
    for p in 0..PARTITIONS {
        loop {
            let progress = progress(&mirror, 0, p).await;
            if progress
                .as_ref()
                .is_some_and(|g| g.error.contains("deleted and created again"))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "partition {p}: the mirror never said it refused the new topic: {progress:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Long enough for several pulls to have been refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (p, had) in had.iter().enumerate() {
        let now = seen(&try_fetch_all(&mut m, MIRROR, p as u32).await.unwrap());
        assert_eq!(
            &now, had,
            "partition {p}: the mirror took records of the topic created again"
        );
    }
}

/// A mirror's partition moved to a node that held none of it while the source takes writes,
/// that node killed (-9) and restarted during the move: the new replica copies the partition
/// from offset 0 (through the replicas already in its region, or from the source), the move
/// finishes only once it has caught up, the node left out stops holding it, and every replica
/// holds the source's records at the source's offsets, in order, with nothing skipped or
/// repeated, before and after the move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_partition_moved_to_another_node_copies_it_whole() {
    let (source, mut mirror) = source_and_mirror("a", 30, 4, 3).await;
    let mut src = source.client(0).await;
    let mut m = mirror.client(0).await;

    let before = placement(&mirror, 0, 0).await.expect("partition 0");
    let spare = (1..=4u64)
        .find(|n| !before.replicas.contains(n))
        .expect("a node without a replica");
    let left_out = before.replicas[0];
    let target: Vec<u64> = before.replicas[1..]
        .iter()
        .copied()
        .chain([spare])
        .collect();
    // A target of the wrong size, or naming a node not in the cluster, changes nothing.
    for bad in [vec![spare], vec![before.replicas[1], before.replicas[2], 9]] {
        let e = m
            .move_partition(pb::MovePartitionRequest {
                topic: MIRROR.into(),
                partition: 0,
                replicas: bad.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
    }
    m.move_partition(pb::MovePartitionRequest {
        topic: MIRROR.into(),
        partition: 0,
        replicas: target.clone(),
    })
    .await
    .expect("move the mirror's partition");
    // The new replica's node is killed (-9) while it catches up, and the source goes on
    // meanwhile; back, the replica resumes from what it had written.
    mirror.kill9(spare as usize - 1);
    publish(&mut src, "b", 30).await;
    mirror.start_node(spare as usize - 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = placement(&mirror, 0, 0).await;
        if p.as_ref()
            .is_some_and(|p| p.replicas == target && p.moving_to.is_empty())
        {
            break;
        }
        if Instant::now() >= deadline {
            let new = placement(&mirror, spare as usize - 1, 0).await;
            panic!("the move to {target:?} did not finish: {p:?}; node {spare}: {new:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    publish(&mut src, "c", 20).await;
    wait_mirrored(&source, &mirror, "after the move").await;
    // The new replica is its node's own (reads there are served from it), caught up; the node
    // left out no longer holds one.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let new = placement(&mirror, spare as usize - 1, 0).await;
        let old = placement(&mirror, left_out as usize - 1, 0).await;
        let new_ok = new.as_ref().is_some_and(|p| {
            p.local
                && p.mirror
                    .as_ref()
                    .is_some_and(|g| g.lag_records == 0 && g.error.is_empty())
        });
        let old_ok = old.as_ref().is_some_and(|p| !p.local);
        if new_ok && old_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {spare} (new): {new:?}; node {left_out} (left out): {old:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Partition 1 was not moved and has gone on too.
    let p1 = placement(&mirror, 0, 1).await.expect("partition 1");
    assert_eq!(p1.replicas.len(), 3);
}

/// Where partition `p` of `topic` starts and ends on the node `c` talks to.
async fn bounds(c: &mut TernClient<Channel>, topic: &str, p: u32) -> (u64, u64) {
    let x = describe_partition(c, topic, p).await.expect("partition");
    (x.start_offset, x.end_offset)
}

/// The source's retention deletes records while the mirror is cut off from it: when the link
/// heals, the source refuses the mirror's next offset, its leader confirms where the log now
/// starts, and the mirror starts over there (what was deleted cannot be copied) and copies the
/// rest at the source's offsets, in order; it goes on with what the source takes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_starts_over_where_the_source_now_starts_after_retention_deleted_its_next_records()
{
    let source = Cluster::start_with(1, &["--retention-check-interval-ms", "200"]).await;
    let mut src = source.client(0).await;
    src.create_topic(pb::CreateTopicRequest {
        name: SOURCE.into(),
        partitions: 1,
        replication_factor: 1,
        config: Some(pb::TopicConfig {
            segment_bytes: Some(1 << 20),
            retention_bytes: Some(1 << 20),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("create the source");
    let put = |c: &TernClient<Channel>, tag: &'static str, n: usize, size: usize| {
        let mut c = c.clone();
        async move {
            for i in 0..n {
                let value = format!("{tag}-{i}-{}", "x".repeat(size));
                publish_retrying(
                    &mut c,
                    pb::PublishRequest {
                        topic: SOURCE.into(),
                        records: vec![node_support::cluster::record(0, value)],
                        ..Default::default()
                    },
                )
                .await;
            }
        }
    };
    put(&src, "a", 10, 10).await;
    let link = Proxy::start(
        "127.0.0.1:0".parse().unwrap(),
        source.addrs[0].parse().unwrap(),
        Link::delay(Duration::from_millis(5)),
        Link::delay(Duration::from_millis(5)),
    )
    .await
    .unwrap();
    let mirror = Cluster::start(1).await;
    let mut m = mirror.client(0).await;
    create_mirror(&mut m, &link.addr().to_string(), 1).await;
    let src0 = src.clone();
    let same = |m: &TernClient<Channel>, what: &'static str| {
        let (mut m, mut src) = (m.clone(), src0.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let (start, _) = bounds(&mut src, SOURCE, 0).await;
                let want = seen(&try_fetch_from(&mut src, SOURCE, 0, start).await.unwrap());
                let (m_start, _) = bounds(&mut m, MIRROR, 0).await;
                let got = try_fetch_from(&mut m, MIRROR, 0, m_start).await;
                if let Ok(got) = &got {
                    if m_start == start && seen(got) == want {
                        return start;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: the mirror starts at {m_start} (the source at {start}) and holds \
                     {:?} records, the source {}",
                    got.map(|g| g.len()),
                    want.len()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(same(&m, "first copy").await, 0);
    let (_, copied) = bounds(&mut src, SOURCE, 0).await;

    link.cut();
    // About 3 MB in records of 40 kB: segments of 1 MiB roll, and retention keeps about 1 MiB.
    put(&src, "b", 75, 40_000).await;
    let (mirror_end, source_start) = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (start, _) = bounds(&mut src, SOURCE, 0).await;
            let (_, end) = bounds(&mut m, MIRROR, 0).await;
            if start > end {
                break (end, start);
            }
            assert!(
                Instant::now() < deadline,
                "the source's retention never passed the mirror's end {end} (source start {start})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert_eq!(
        mirror_end, copied,
        "the mirror copied nothing while cut off"
    );
    link.heal();
    let start = same(&m, "after the source deleted what came next").await;
    assert!(start >= source_start, "{start} < {source_start}");
    let p = progress(&mirror, 0, 0).await.expect("mirror progress");
    assert!(p.error.is_empty() && p.lag_records == 0, "{p:?}");
    // And on with what the source takes next.
    put(&src, "c", 5, 10).await;
    same(&m, "after more records").await;
}
