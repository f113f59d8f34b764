//! The metadata log stays bounded: each node checkpoints the metadata state and purges the
//! log behind it; a node that missed the purged entries takes the state from a peer; a node
//! restarts from its checkpoint. Real processes on loopback.

mod node_support;

use std::path::Path;
use std::time::{Duration, Instant};

use node_support::cluster::Cluster;
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tonic::transport::Channel;

/// The metadata log's segments: (base offsets, bytes of every file in the directory).
fn metadata_log(data_dir: &Path) -> (Vec<u64>, u64) {
    let mut bases = Vec::new();
    let mut bytes = 0;
    for e in std::fs::read_dir(data_dir.join("metadata")).unwrap() {
        let e = e.unwrap();
        bytes += e.metadata().unwrap().len();
        let name = e.file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".log") {
            bases.push(stem.parse().unwrap());
        }
    }
    bases.sort();
    (bases, bytes)
}

async fn quotas(c: &mut TernClient<Channel>) -> Vec<(String, Option<u64>)> {
    let mut q: Vec<_> = c
        .list_quotas(pb::ListQuotasRequest {})
        .await
        .expect("list quotas")
        .into_inner()
        .quotas
        .into_iter()
        .map(|p| (p.principal, p.quota.and_then(|q| q.requests_per_sec)))
        .collect();
    q.sort();
    q
}

#[tokio::test]
async fn the_metadata_log_is_purged_behind_checkpoints_and_a_node_that_missed_it_catches_up() {
    // The nodes say (at INFO) where their metadata state came from; the test reads that.
    std::env::set_var(
        "TERN_TEST_LOG",
        "warn,openraft=error,tern::controller::follower=info",
    );
    // A checkpoint every 20 commands, 64 KiB segments: a few hundred commands fill several.
    let mut c = Cluster::start_with(
        3,
        &[
            "--metadata-snapshot-every",
            "20",
            "--metadata-segment-bytes",
            "65536",
        ],
    )
    .await;
    c.kill9(2);
    let mut client = c.client(0).await;
    // Long principals make big commands (~250 bytes each).
    let pad = "x".repeat(180);
    let commands = 1000u64;
    for i in 0..commands {
        client
            .set_quota(pb::SetQuotaRequest {
                principal: format!("p{}-{pad}", i % 40),
                quota: Some(pb::Quota {
                    requests_per_sec: Some(i + 1),
                    ..Default::default()
                }),
            })
            .await
            .expect("set quota");
    }
    let expected = quotas(&mut client).await;
    assert_eq!(expected.len(), 40);
    // The two live nodes purged their logs behind their checkpoints.
    for i in 0..2 {
        let (bases, bytes) = metadata_log(&c.dirs[i]);
        eprintln!(
            "node {}: metadata segments at {bases:?}, {bytes} bytes",
            i + 1
        );
        assert!(
            bases[0] > 0,
            "node {}: the log's first segments were deleted",
            i + 1
        );
        assert!(
            bytes < 8 * 65536,
            "node {}: {bytes} bytes of metadata log after {commands} commands",
            i + 1
        );
        assert!(c.dirs[i].join("metadata-state.json").exists());
    }
    // Node 3 missed everything the others purged: it is sent a snapshot, takes the state
    // from a peer, and then holds the same quotas.
    let logs = tempfile::tempdir().unwrap();
    let log3 = logs.path().join("n3.log");
    c.start_node_logged(2, Some(&log3));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut n3 = c.client(2).await;
        if quotas(&mut n3).await == expected {
            break;
        }
        assert!(Instant::now() < deadline, "node 3 did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let said = std::fs::read_to_string(&log3).unwrap();
    assert!(
        said.contains("metadata state taken from a peer"),
        "node 3 caught up through a peer's state, not a replay: {said}"
    );
    // A restart starts from the checkpoint and the log that is left: the same state.
    c.kill9(0);
    let log1 = logs.path().join("n1.log");
    c.start_node_logged(0, Some(&log1));
    c.wait_formed().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut n1 = c.client(0).await;
        if quotas(&mut n1).await == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 1 lost metadata over a restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(std::fs::read_to_string(&log1)
        .unwrap()
        .contains("metadata state loaded from this node's checkpoint"));
    // And changes keep applying everywhere.
    c.client(1)
        .await
        .set_quota(pb::SetQuotaRequest {
            principal: "late".into(),
            quota: Some(pb::Quota {
                requests_per_sec: Some(7),
                ..Default::default()
            }),
        })
        .await
        .expect("set quota");
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let q = quotas(&mut c.client(i).await).await;
            if q.iter().any(|(p, r)| p == "late" && *r == Some(7)) {
                assert_eq!(q.len(), 41);
                break;
            }
            assert!(Instant::now() < deadline, "node {} missed a change", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A node that joins now (`--join`, not a controller) knows no peer's address but the one
    // it joined through, and the log it is sent starts past everything: it takes the state
    // through that member, and is ready although nothing but control records (its own
    // addition as a learner) follows that state. (It never was: it waited for an address it
    // could only learn from the state; and then, as long as no command came, for the next
    // command past the control records. Found by the chaos harness's `churn`.)
    let expected = quotas(&mut c.client(1).await).await;
    let port = node_support::cluster::free_ports(1)[0];
    let addr4 = format!("127.0.0.1:{port}");
    let log4 = logs.path().join("n4.log");
    let mut args4: Vec<&str> = vec![
        "--node-id",
        "4",
        "--join",
        &c.addrs[1],
        "--metadata-snapshot-every",
        "20",
        "--metadata-segment-bytes",
        "65536",
    ];
    args4.extend(node_support::cluster::TIMING);
    let n4 =
        node_support::TestNode::start_logged(&c.tmp.path().join("n4"), &addr4, &args4, Some(&log4));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut client4 = n4.client().await;
        let info = client4
            .cluster_info(pb::ClusterInfoRequest::default())
            .await
            .map(|r| r.into_inner());
        let ready = info.as_ref().is_ok_and(|i| i.ready);
        let q = quotas(&mut client4).await;
        if ready && q == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the joined node 4 did not catch up (ready {ready}, {} quotas, leader {:?}): {}",
            q.len(),
            info.map(|i| i.metadata_leader),
            std::fs::read_to_string(&log4).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let said = std::fs::read_to_string(&log4).unwrap();
    assert!(
        said.contains("metadata state taken from a peer") && said.contains("joined through"),
        "node 4 took the state through the member it joined: {said}"
    );
}

/// A node alone checkpoints and purges too, and restarts from its checkpoint.
#[tokio::test]
async fn a_node_alone_restarts_from_its_checkpoint_with_its_log_purged() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--metadata-snapshot-every",
        "20",
        "--metadata-segment-bytes",
        "65536",
    ];
    let node = node_support::TestNode::start(dir.path(), &flags);
    let mut c = node.client().await;
    let pad = "y".repeat(200);
    for i in 0..600u64 {
        c.set_quota(pb::SetQuotaRequest {
            principal: format!("q{}-{pad}", i % 30),
            quota: Some(pb::Quota {
                requests_per_sec: Some(i + 1),
                ..Default::default()
            }),
        })
        .await
        .expect("set quota");
    }
    let expected = quotas(&mut c).await;
    assert_eq!(expected.len(), 30);
    let (bases, bytes) = metadata_log(dir.path());
    assert!(bases[0] > 0, "the first segments were deleted: {bases:?}");
    assert!(bytes < 8 * 65536, "{bytes} bytes of metadata log");
    node.kill9();
    let node = node_support::TestNode::start(dir.path(), &flags);
    assert_eq!(quotas(&mut node.client().await).await, expected);
}
