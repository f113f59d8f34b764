//! Delivery semantics on real `tern serve` processes: idempotent producers (retries written
//! once, also through leader kills and restarts).

mod node_support;

use std::time::{Duration, Instant};

use node_support::cluster::{check_acked, create, read_all, record, Cluster, Writer};
use node_support::{fetch_all, TestNode};
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tonic::transport::Channel;
use tonic::Code;

fn idem(
    topic: &str,
    partition: u32,
    producer_id: u64,
    sequence: u32,
    values: &[&str],
) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.into(),
        records: values
            .iter()
            .map(|v| record(partition, v.to_string()))
            .collect(),
        request_id: 0,
        producer_id,
        sequence,
    }
}

async fn offsets(
    c: &mut TernClient<Channel>,
    req: pb::PublishRequest,
) -> Result<Vec<u64>, tonic::Status> {
    Ok(c.publish(req)
        .await?
        .into_inner()
        .acks
        .into_iter()
        .map(|a| a.offset)
        .collect())
}

#[tokio::test]
async fn idempotent_producer_retries_are_answered_not_rewritten_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    node_support::create_topic(&mut c, "idem", 2).await;
    let a = c
        .init_producer(pb::InitProducerRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    let b = c
        .init_producer(pb::InitProducerRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    assert!(a > 0 && b > a, "producer ids {a}, {b}");

    let first = offsets(&mut c, idem("idem", 0, a, 0, &["a0", "a1", "a2"]))
        .await
        .unwrap();
    // Offsets count Raft's own entries too: relative to the first record's.
    let o = first[0];
    assert_eq!(first, vec![o, o + 1, o + 2]);
    // The same request again (a retry): the same offsets, nothing written.
    let again = offsets(&mut c, idem("idem", 0, a, 0, &["a0", "a1", "a2"]))
        .await
        .unwrap();
    assert_eq!(again, first);
    // A retry of part of it too.
    assert_eq!(
        offsets(&mut c, idem("idem", 0, a, 1, &["a1"]))
            .await
            .unwrap(),
        vec![o + 1]
    );
    // Another producer interleaves; sequences are per producer and partition.
    assert_eq!(
        offsets(&mut c, idem("idem", 0, b, 0, &["b0"]))
            .await
            .unwrap(),
        vec![o + 3]
    );
    assert_eq!(
        offsets(&mut c, idem("idem", 1, a, 0, &["p1"]))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        offsets(&mut c, idem("idem", 0, a, 3, &["a3"]))
            .await
            .unwrap(),
        vec![o + 4]
    );

    // A gap is refused and writes nothing.
    let s = offsets(&mut c, idem("idem", 0, a, 9, &["a9"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("expected 4"), "{s:?}");
    // Malformed idempotent requests: bad argument, nothing written.
    let mut mixed = idem("idem", 0, a, 4, &["x", "y"]);
    mixed.records[1].partition = Some(1);
    let s = offsets(&mut c, mixed).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let mut unrouted = idem("idem", 0, a, 4, &["x"]);
    unrouted.records[0].partition = None;
    assert_eq!(
        offsets(&mut c, unrouted).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let s = offsets(&mut c, idem("idem", 0, a, i32::MAX as u32, &["x", "y"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = offsets(&mut c, idem("idem", 0, 0, 5, &["x"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let s = offsets(&mut c, idem("idem", 0, u64::MAX, 0, &["x"]))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    // Publishing without a producer id is unaffected.
    let plain = offsets(
        &mut c,
        pb::PublishRequest {
            topic: "idem".into(),
            records: vec![record(0, "plain".into())],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(plain, vec![o + 5]);

    // kill -9 and restart: the producers' state is rebuilt from the log.
    node.kill9();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        match offsets(&mut c, idem("idem", 0, a, 0, &["a0", "a1", "a2"])).await {
            Ok(o) => break o,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    assert_eq!(again, vec![o, o + 1, o + 2]);
    assert_eq!(
        offsets(&mut c, idem("idem", 0, b, 0, &["b0"]))
            .await
            .unwrap(),
        vec![o + 3]
    );
    let a4 = offsets(&mut c, idem("idem", 0, a, 4, &["a4"]))
        .await
        .unwrap();
    assert!(a4[0] > o + 5, "{a4:?}");
    // A producer id issued after the restart is new.
    let c2 = c
        .init_producer(pb::InitProducerRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    assert!(c2 > b);
    let values: Vec<String> = fetch_all(&mut c, "idem", 0)
        .await
        .iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect();
    assert_eq!(values, ["a0", "a1", "a2", "b0", "a3", "plain", "a4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_retrying_through_leader_kills_writes_every_record_once() {
    let mut cluster = Cluster::start(3).await;
    create(&mut cluster.client(0).await, "exactly", 1, 3).await;
    create(&mut cluster.client(0).await, "once", 1, 3).await;
    // Deterministic first: acknowledged records sent again to the next leader after a kill are
    // recognised there (the producer state came with the log), not written again.
    let mut c = cluster.client(0).await;
    let p = c
        .init_producer(pb::InitProducerRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    let req = idem("once", 0, p, 0, &["x0", "x1", "x2"]);
    let first = loop {
        match offsets(&mut c, req.clone()).await {
            Ok(o) => break o,
            Err(s) if s.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    let old = cluster.leader("once", 0).await;
    cluster.kill9(old);
    let new = cluster.leader("once", 0).await;
    let mut c = cluster.client(new).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        match offsets(&mut c, req.clone()).await {
            Ok(o) => break o,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    assert_eq!(
        again, first,
        "the new leader answers the retry with the same offsets"
    );
    let log = read_all(&mut c, "once", 0, 3).await;
    assert_eq!(log, ["x0", "x1", "x2"]);
    cluster.start_node(old);
    cluster.wait_formed().await;

    // Then under load, through three leader kills.
    let writer = Writer::start_idempotent(cluster.addrs.clone(), "exactly");
    for round in 0..3 {
        let before = writer.acked();
        let deadline = Instant::now() + Duration::from_secs(30);
        while writer.acked() < before + 60 {
            assert!(Instant::now() < deadline, "round {round}: acks stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let leader = cluster.leader("exactly", 0).await;
        cluster.kill9(leader);
        eprintln!("round {round}: killed the leader, node {}", leader + 1);
        let at_kill = writer.acked();
        let deadline = Instant::now() + Duration::from_secs(30);
        while writer.acked() < at_kill + 10 {
            assert!(
                Instant::now() < deadline,
                "round {round}: no acks after the kill"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cluster.start_node(leader);
    }
    let retries = writer.retries();
    let acked = writer.finish().await;
    eprintln!("{retries} requests sent again after a failure");
    // Every node: each sequence number once, in order, none missing (a request that failed
    // at the end may be written without its ack, but only after everything acknowledged).
    for node in 0..3 {
        let log = read_all(&mut cluster.client(node).await, "exactly", 0, acked.len()).await;
        let dups = check_acked(&log, &acked);
        assert_eq!(dups, 0, "node {}: duplicates", node + 1);
        let expected: Vec<String> = (0..log.len() as u64).map(|s| s.to_string()).collect();
        assert_eq!(
            log,
            expected,
            "node {}: not every sequence once in order",
            node + 1
        );
        eprintln!(
            "node {}: {} records, {} acknowledged, no duplicates",
            node + 1,
            log.len(),
            acked.len()
        );
    }
}
