//! A running cluster changes shape: a fourth node joins and replicas move to it (rebalance, and
//! an explicit move that takes a partition's leader out under load), then a controller is
//! removed. Every acknowledged record survives, in order.

mod node_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use node_support::cluster::{check_acked, create, read_all, record, Cluster, Writer, TIMING};
use node_support::TestNode;
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tonic::transport::Channel;

/// The tests of this file run one at a time: each runs a multi-node cluster, and two at once on
/// a 2-vCPU machine starve each other's nodes (a re-added replica was once seen still behind at
/// the test's deadline under that load).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The lock that keeps these tests apart; `TERN_TEST_PARALLEL=1` lets them overlap (a stress
/// setting for looking for timing bugs).
async fn serial() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    match std::env::var_os("TERN_TEST_PARALLEL") {
        Some(_) => None,
        None => Some(SERIAL.lock().await),
    }
}

/// Starts node `id` on a port from the OS, joining the cluster through `member`.
fn start_joined(dir: &std::path::Path, id: u64, member: &str) -> TestNode {
    let id = id.to_string();
    let mut args = vec!["--node-id", &id, "--join", member];
    args.extend(TIMING);
    TestNode::start(dir, &args)
}

async fn info(c: &mut TernClient<Channel>) -> pb::ClusterInfoResponse {
    c.cluster_info(pb::ClusterInfoRequest::default())
        .await
        .expect("cluster info")
        .into_inner()
}

/// Waits (bounded) until the node behind `c` reports what `done` wants.
async fn wait_for(
    c: &mut TernClient<Channel>,
    what: &str,
    done: impl Fn(&pb::ClusterInfoResponse) -> bool,
) -> pb::ClusterInfoResponse {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await {
            let r = r.into_inner();
            if done(&r) {
                return r;
            }
        }
        assert!(Instant::now() < deadline, "{what}: not within 90 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn replicas(r: &pb::ClusterInfoResponse, topic: &str) -> BTreeMap<u32, Vec<u64>> {
    r.topics
        .iter()
        .filter(|t| t.topic == topic)
        .flat_map(|t| &t.partitions)
        .map(|p| (p.partition, p.replicas.clone()))
        .collect()
}

fn nothing_moving(r: &pb::ClusterInfoResponse) -> bool {
    r.topics
        .iter()
        .all(|t| t.partitions.iter().all(|p| p.moving_to.is_empty()))
}

/// The leader of a partition as a majority of its replicas report it.
async fn leader_of(clients: &mut [TernClient<Channel>], topic: &str, partition: u32) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut votes: BTreeMap<u64, usize> = BTreeMap::new();
        let mut replicas = Vec::new();
        for c in clients.iter_mut() {
            if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await {
                for p in r
                    .into_inner()
                    .topics
                    .into_iter()
                    .filter(|t| t.topic == topic)
                    .flat_map(|t| t.partitions)
                    .filter(|p| p.partition == partition && p.local)
                {
                    replicas = p.replicas.clone();
                    if p.leader != 0 {
                        *votes.entry(p.leader).or_default() += 1;
                    }
                }
            }
        }
        if let Some((l, _)) = votes
            .iter()
            .find(|(l, n)| **n * 2 > replicas.len() && replicas.contains(l))
        {
            return *l;
        }
        assert!(
            Instant::now() < deadline,
            "no leader for {topic}/{partition}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `n` records to each partition of `topic` but the first (the writer's) through `c`.
async fn fill(c: &mut TernClient<Channel>, topic: &str, partitions: u32, n: usize) {
    for p in 1..partitions {
        for chunk in 0..n / 50 {
            let records = (0..50)
                .map(|i| record(p, format!("{p}-{}", chunk * 50 + i)))
                .collect();
            c.publish(pb::PublishRequest {
                topic: topic.into(),
                records,
                request_id: 0,
                ..Default::default()
            })
            .await
            .expect("fill");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_fourth_node_move_replicas_to_it_then_remove_a_controller() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(3).await;
    // 4 partitions × 3 replicas: with 4 nodes, 3 each.
    create(&mut cluster.client(0).await, "grow", 4, 3).await;
    fill(&mut cluster.client(1).await, "grow", 4, 200).await;
    // Partition 0 takes writes the whole time.
    let writer = Writer::start(cluster.addrs.clone(), "grow");

    eprintln!("phase: join");
    // A fourth node joins through node 2.
    let dir4 = cluster.tmp.path().join("n4");
    let node4 = start_joined(&dir4, 4, &cluster.addrs[1]);
    let mut c4 = node4.client().await;
    let mut c2 = cluster.client(1).await;
    wait_for(&mut c2, "node 4 registered", |r| {
        r.nodes.iter().any(|n| n.id == 4)
    })
    .await;
    // It receives the metadata log: it knows the topic and the metadata leader.
    wait_for(&mut c4, "node 4 caught up with the metadata", |r| {
        r.nodes.len() == 4 && r.metadata_leader != 0 && r.topics.iter().any(|t| t.topic == "grow")
    })
    .await;

    eprintln!("phase: rebalance");
    // Rebalance: three replicas move to node 4.
    let moves = c2
        .rebalance(pb::RebalanceRequest { max_moves: 0 })
        .await
        .expect("rebalance")
        .into_inner()
        .moves;
    assert_eq!(moves.len(), 3, "{moves:?}");
    assert!(moves
        .iter()
        .all(|m| m.to.contains(&4) && !m.from.contains(&4)));
    let after = wait_for(&mut c2, "the rebalance", nothing_moving).await;
    let placed = replicas(&after, "grow");
    let on4 = placed.values().filter(|r| r.contains(&4)).count();
    assert_eq!(on4, 3, "{placed:?}");
    for n in 1..=4u64 {
        let held = placed.values().filter(|r| r.contains(&n)).count();
        assert_eq!(held, 3, "node {n}: {placed:?}");
    }
    eprintln!("after rebalance: {placed:?}");

    eprintln!("phase: move the leader out");
    // An explicit move that takes partition 0's leader out, while it takes writes.
    let mut all = vec![
        cluster.client(0).await,
        cluster.client(1).await,
        cluster.client(2).await,
        c4.clone(),
    ];
    let leader = leader_of(&mut all, "grow", 0).await;
    let before = placed[&0].clone();
    let spare = (1..=4u64).find(|n| !before.contains(n)).unwrap();
    let target: Vec<u64> = before
        .iter()
        .map(|n| if *n == leader { spare } else { *n })
        .collect();
    let at_move = writer.acked();
    c2.move_partition(pb::MovePartitionRequest {
        topic: "grow".into(),
        partition: 0,
        replicas: target.clone(),
    })
    .await
    .expect("move partition 0");
    let after = wait_for(&mut c2, "moving partition 0", |r| {
        nothing_moving(r) && replicas(r, "grow")[&0] == target
    })
    .await;
    eprintln!(
        "partition 0 moved {before:?} -> {target:?} (leader {leader} out); {} records acked meanwhile",
        writer.acked() - at_move
    );
    assert_eq!(replicas(&after, "grow")[&0], target);

    // Bad requests change nothing.
    let e = c2
        .move_partition(pb::MovePartitionRequest {
            topic: "grow".into(),
            partition: 1,
            replicas: vec![1, 2],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = c2
        .move_partition(pb::MovePartitionRequest {
            topic: "grow".into(),
            partition: 1,
            replicas: vec![1, 2, 9],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let e = c2
        .remove_node(pb::RemoveNodeRequest { node_id: 9 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");

    eprintln!("phase: remove node 1");
    // Remove node 1, a controller: its replicas move to the others, then it leaves.
    c2.remove_node(pb::RemoveNodeRequest { node_id: 1 })
        .await
        .expect("remove node 1");
    let after = wait_for(&mut c2, "removing node 1", |r| {
        r.nodes.iter().all(|n| n.id != 1) && nothing_moving(r)
    })
    .await;
    let placed = replicas(&after, "grow");
    assert!(
        placed.values().all(|r| r.len() == 3 && !r.contains(&1)),
        "{placed:?}"
    );
    eprintln!("after removing node 1: {placed:?}");
    // Writes go on: enough acks after the removal.
    let at_removal = writer.acked();
    writer
        .wait_acked(
            at_removal + 20,
            Duration::from_secs(30),
            "no writes after removing node 1",
        )
        .await;
    let acked = writer.finish().await;
    eprintln!("{} records acknowledged through the changes", acked.len());

    // Every acknowledged record of partition 0 is on every replica, in order; the other
    // partitions hold the same records on every replica.
    let clients = [
        (2u64, cluster.client(1).await),
        (3, cluster.client(2).await),
        (4, c4.clone()),
    ];
    for (id, c) in clients.iter() {
        let mut c = c.clone();
        for (p, nodes) in &placed {
            if !nodes.contains(id) {
                continue;
            }
            let min = if *p == 0 { acked.len() } else { 200 };
            let log = read_all(&mut c, "grow", *p, min).await;
            // A replica that has not caught up within read_all's deadline is reported as such
            // (with what it holds), not as a lost record.
            let first = log.first().cloned().unwrap_or_default();
            let last = log.last().cloned().unwrap_or_default();
            let view = view_of(&mut c, "grow", *p).await;
            assert!(
                log.len() >= min,
                "node {id} partition {p} holds {} records ({first}..{last}), {min} expected; its view: {view:?}",
                log.len()
            );
            if *p == 0 {
                let dups = check_acked(&log, &acked);
                eprintln!(
                    "node {id} partition 0: {} records, {dups} duplicates",
                    log.len()
                );
            } else {
                let want: Vec<String> = (0..200).map(|i| format!("{p}-{i}")).collect();
                assert_eq!(log, want, "node {id} partition {p}");
            }
        }
    }

    eprintln!("phase: create after removal");
    // The metadata group goes on without node 1: a new topic lands on nodes 2, 3 and 4 only.
    create(&mut c4, "after", 3, 3).await;
    let r = info(&mut c2).await;
    let placed = replicas(&r, "after");
    assert!(placed.values().all(|r| !r.contains(&1)), "{placed:?}");
    // Node 1's copies of the topic's partitions are gone from its disk.
    let topics = cluster.dirs[0].join("topics");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<_> = std::fs::read_dir(&topics)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "node 1 still has {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.kill9(0);

    eprintln!("phase: restarts");
    // kill -9 a controller and the joined node; the joined node comes back on another port
    // (its new address reaches the others through the metadata): everything acknowledged is
    // there, and the partition takes writes again.
    node4.kill9();
    cluster.kill9(1);
    cluster.start_node(1);
    // Through another member this time: any will do.
    let node4 = start_joined(&dir4, 4, &cluster.addrs[2]);
    let mut c4 = node4.client().await;
    let mut c2 = cluster.client(1).await;
    wait_for(&mut c4, "node 4 back with its new address", |r| {
        r.metadata_leader != 0 && r.nodes.iter().any(|n| n.id == 4 && n.address == node4.addr)
    })
    .await;
    for (id, c) in [(2u64, &mut c2), (4, &mut c4)] {
        let log = read_all(c, "grow", 0, acked.len()).await;
        check_acked(&log, &acked);
        eprintln!(
            "node {id} after restart: {} records of partition 0",
            log.len()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c4
            .publish(pb::PublishRequest {
                topic: "grow".into(),
                records: vec![record(0, u64::MAX.to_string())],
                request_id: 0,
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "no writes after restarts: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Describes partition 0 of `topic` as the node behind `c` sees it.
async fn view(c: &mut TernClient<Channel>, topic: &str) -> Option<pb::PartitionInfo> {
    let r = c
        .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
        .await
        .ok()?
        .into_inner();
    r.partitions
        .into_iter()
        .find(|p| p.partition == 0 && p.local)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_retention_restarts_its_log_from_a_snapshot() {
    let _serial = serial().await;
    let mut cluster = Cluster::start_with(3, &["--retention-check-interval-ms", "200"]).await;
    let mut c = cluster.client(0).await;
    c.create_topic(pb::CreateTopicRequest {
        name: "short".into(),
        partitions: 1,
        replication_factor: 3,
        config: Some(pb::TopicConfig {
            retention_bytes: Some(2 << 20),
            segment_bytes: Some(1 << 20),
            ..Default::default()
        }),
        placement: None,
        mirror_of: None,
    })
    .await
    .expect("create");
    let mut clients = vec![
        cluster.client(0).await,
        cluster.client(1).await,
        cluster.client(2).await,
    ];
    let leader = leader_of(&mut clients, "short", 0).await as usize - 1;
    let follower = (leader + 1) % 3;
    cluster.kill9(follower);
    // 8 MiB while it is down: retention deletes the oldest segments on the other two.
    let mut c = cluster.client(leader).await;
    let mut next = 0u64;
    let mut publish = |c: &mut TernClient<Channel>, n: usize| {
        let records: Vec<_> = (0..n)
            .map(|_| {
                let mut r = record(0, format!("{next:08}"));
                next += 1;
                let mut v = r.value.to_vec();
                v.resize(64 << 10, b'.');
                r.value = v.into();
                r
            })
            .collect();
        let mut c = c.clone();
        async move {
            c.publish(pb::PublishRequest {
                topic: "short".into(),
                records,
                request_id: 0,
                ..Default::default()
            })
            .await
            .expect("publish")
        }
    };
    for _ in 0..32 {
        publish(&mut c, 4).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let start = loop {
        let v = view(&mut c, "short").await.expect("leader's view");
        if v.start_offset > 0 {
            break v.start_offset;
        }
        assert!(
            Instant::now() < deadline,
            "retention never deleted anything"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("leader's log starts at {start}");
    // The follower comes back: it cannot get the deleted entries; it restarts its log from a
    // snapshot where the leader's log begins (or later) and catches up from there.
    cluster.start_node(follower);
    for _ in 0..4 {
        publish(&mut c, 4).await;
    }
    let leader_view = view(&mut c, "short").await.unwrap();
    let mut f = cluster.client(follower).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let fv = loop {
        if let Some(v) = view(&mut f, "short").await {
            if v.end_offset >= leader_view.end_offset {
                break v;
            }
        }
        assert!(Instant::now() < deadline, "the follower never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "follower: [{}, {}); leader: [{}, {})",
        fv.start_offset, fv.end_offset, leader_view.start_offset, leader_view.end_offset
    );
    assert!(fv.start_offset > 0 && fv.start_offset <= leader_view.end_offset);
    // What the follower holds is exactly the leader's records from there on (retention goes on
    // deleting on both: compare from where both still have records).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (Some(a), Some(b)) = (view(&mut f, "short").await, view(&mut c, "short").await) else {
            panic!("a replica's view is missing");
        };
        let from = a.start_offset.max(b.start_offset);
        let got = node_support::try_fetch_from(&mut f, "short", 0, from).await;
        let want = node_support::try_fetch_from(&mut c, "short", 0, from).await;
        match (got, want) {
            (Ok(got), Ok(want)) => {
                let pairs = |rs: Vec<pb::Record>| {
                    rs.into_iter()
                        .map(|r| (r.offset, r.value))
                        .collect::<Vec<_>>()
                };
                let (got, want) = (pairs(got), pairs(want));
                assert!(!want.is_empty());
                assert_eq!(got.len(), want.len());
                assert!(
                    got == want,
                    "the follower's records differ from the leader's"
                );
                break;
            }
            (g, w) => {
                let out_of_range = |r: &Result<_, tonic::Status>| {
                    r.as_ref()
                        .is_err_and(|e| e.code() == tonic::Code::OutOfRange)
                };
                assert!(out_of_range(&g) || g.is_ok(), "{:?}", g.err());
                assert!(out_of_range(&w) || w.is_ok(), "{:?}", w.err());
                assert!(Instant::now() < deadline, "retention kept moving");
            }
        }
    }
    // It is a full replica again: with the leader gone, it and the third node go on.
    cluster.kill9(leader);
    let mut f = cluster.client(follower).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while f
        .publish(pb::PublishRequest {
            topic: "short".into(),
            records: vec![record(0, "after".into())],
            request_id: 0,
            ..Default::default()
        })
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "no writes after the leader died");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Describes a partition as the node behind `c` sees it (if it holds a replica).
async fn view_of(c: &mut TernClient<Channel>, topic: &str, p: u32) -> Option<pb::PartitionInfo> {
    let r = c
        .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
        .await
        .ok()?
        .into_inner();
    r.partitions
        .into_iter()
        .find(|q| q.partition == p && q.local)
}
