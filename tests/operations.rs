//! The admin listener on real processes: `/metrics` passes `promtool check metrics` and shows
//! what the load did, under-replication shows (in the metrics and in `tern cluster status`)
//! while a follower is down and clears once it is back, `/readyz` waits for the metadata,
//! and `--metrics-partitions` bounds the per-partition series.

mod node_support;

use std::process::Command;
use std::time::{Duration, Instant};

use node_support::cluster::{
    create, idem, offsets, offsets_retrying, publish_retrying, record, Cluster, TIMING,
};
use node_support::tools::{http_get, sample, tool};
use node_support::{tern, TestNode};
use tern::proto::v1 as pb;

const ADMIN: [&str; 2] = ["--admin-listen", "127.0.0.1:0"];

fn scrape(node: &TestNode) -> String {
    let admin = node.admin.as_deref().expect("started with --admin-listen");
    let (code, body) = http_get(admin, "/metrics").expect("scrape");
    assert_eq!(code, 200, "{body}");
    body
}

/// `promtool check metrics` on an exposition: exits 0 and prints no problem.
fn promtool_passes(text: &str) {
    use std::io::Write;
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{text}"))
}

/// Polls `check` on a node's scrape until it holds (30 s at most).
async fn until(node: &TestNode, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(node);
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}; last scrape:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader of each partition of `topic` as node 1 sees it, once every partition has one.
async fn leaders(
    client: &mut pb::tern_client::TernClient<tonic::transport::Channel>,
    topic: &str,
) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = client
            .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
            .await
            .expect("describe")
            .into_inner();
        let leaders: Vec<u64> = d.partitions.iter().map(|p| p.leader).collect();
        if leaders.iter().all(|l| *l != 0) {
            return leaders;
        }
        assert!(Instant::now() < deadline, "no leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_the_load_and_show_under_replication() {
    let mut c = Cluster::start_with(3, &ADMIN).await;
    let mut client = c.client(0).await;
    create(&mut client, "ops", 2, 3).await;
    let leaders_before = leaders(&mut client, "ops").await;
    // 10 publish calls to node 1: 50 records to partition 0, 20 to partition 1.
    for i in 0..10u32 {
        let p = u32::from(i >= 5);
        let n = if p == 0 { 10 } else { 4 };
        publish_retrying(
            &mut client,
            pb::PublishRequest {
                topic: "ops".into(),
                records: (0..n).map(|j| record(p, format!("r{i}-{j}"))).collect(),
                ..Default::default()
            },
        )
        .await;
    }
    // Every record read through node 2 (a follower may apply the last commits a moment after
    // the leader: read again until it has them all, counting everything handed out).
    let mut reader = c.client(1).await;
    let mut read = 0;
    for (p, want) in [(0, 50), (1, 20)] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = reader
                .fetch(pb::FetchRequest {
                    topic: "ops".into(),
                    partition: p,
                    offset: 0,
                    max_records: 1000,
                    ..Default::default()
                })
                .await
                .expect("fetch")
                .into_inner();
            read += r.records.len();
            if r.records.len() == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{p}: {} records",
                r.records.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let read = read as f64;

    let nodes: Vec<&TestNode> = c.nodes.iter().map(|n| n.as_ref().unwrap()).collect();
    let texts: Vec<String> = nodes.iter().map(|n| scrape(n)).collect();
    for t in &texts {
        promtool_passes(t);
    }
    // Every metric a node exports is documented.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .unwrap();
    for t in &texts {
        for name in t.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
            let name = name.split(' ').next().unwrap();
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} is not in docs/operations.md"
            );
        }
    }
    let sum = |name: &str| -> f64 { texts.iter().map(|t| value(t, name, &[])).sum() };
    // Counted once, where the client called.
    assert_eq!(value(&texts[0], "tern_publish_records_total", &[]), 70.0);
    assert_eq!(sum("tern_publish_records_total"), 70.0);
    // Forwarded by node 1 to the other nodes' leaders, when leadership stayed put throughout.
    let forwarded = [50.0, 20.0]
        .iter()
        .zip(&leaders_before)
        .filter(|(_, l)| **l != 1)
        .map(|(n, _)| n)
        .sum::<f64>();
    if leaders(&mut client, "ops").await == leaders_before {
        assert_eq!(
            value(&texts[0], "tern_publish_forwarded_records_total", &[]),
            forwarded,
            "leaders {leaders_before:?}"
        );
    }
    assert_eq!(
        sum("tern_publish_forwarded_records_total"),
        value(&texts[0], "tern_publish_forwarded_records_total", &[])
    );
    assert_eq!(value(&texts[1], "tern_read_records_total", &[]), read);
    assert_eq!(sum("tern_read_records_total"), read);
    assert!(value(&texts[0], "tern_publish_bytes_total", &[]) >= 70.0 * 4.0);
    // One call each, answered OK, on the node called.
    assert_eq!(
        value(
            &texts[0],
            "tern_request_duration_seconds_count",
            &[("method", "Publish"), ("code", "OK")]
        ),
        10.0
    );
    assert_eq!(
        value(
            &texts[0],
            "tern_request_duration_seconds_bucket",
            &[("method", "Publish"), ("code", "OK"), ("le", "+Inf")]
        ),
        10.0
    );
    assert!(value(&texts[0], "tern_fsync_duration_seconds_count", &[]) > 0.0);
    // Every node holds both partitions; exactly one leads each, and has every record.
    for p in ["0", "1"] {
        let labels = [("topic", "ops"), ("partition", p)];
        let records = if p == "0" { 50.0 } else { 20.0 };
        let mut leaders = 0;
        for t in &texts {
            assert_eq!(value(t, "tern_partition_replicas", &labels), 3.0);
            if let Some(u) = sample(t, "tern_partition_under_replicated", &labels) {
                leaders += 1;
                assert_eq!(u, 0.0, "{p} under-replicated with every node up");
                // Offsets count Raft's own entries too (one per leader term at least).
                let hw = value(t, "tern_partition_high_watermark", &labels);
                assert!(hw > records && hw < records + 10.0, "{p}: {hw}");
                assert!(value(t, "tern_partition_log_end_offset", &labels) >= hw);
            }
        }
        assert_eq!(leaders, 1, "partition {p}");
    }
    assert_eq!(sum("tern_partitions_under_replicated"), 0.0);
    assert_eq!(
        texts
            .iter()
            .map(|t| value(t, "tern_replicas", &[("role", "leader")]))
            .sum::<f64>(),
        // Two topic partitions, each led once (the metadata group is not counted).
        2.0
    );

    // A follower of partition 0 goes down: its leader reports the partition under-replicated,
    // and so does `tern cluster status`.
    let leader = c.leader("ops", 0).await;
    let follower = (0..3).find(|i| *i != leader).unwrap();
    c.kill9(follower);
    let labels = [("topic", "ops"), ("partition", "0")];
    let text = until(
        c.nodes[leader].as_ref().unwrap(),
        "the leader reports ops/0 under-replicated",
        |t| sample(t, "tern_partition_under_replicated", &labels) == Some(1.0),
    )
    .await;
    assert!(value(&text, "tern_partitions_under_replicated", &[]) >= 1.0);
    let (ok, out, err) = tern(&c.addrs[leader], &["cluster", "status"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("under-replicated partitions:") && out.contains("ops/0"),
        "{out}"
    );

    // Back up and caught up: nothing is under-replicated any more.
    c.start_node(follower);
    until(
        c.nodes[leader].as_ref().unwrap(),
        "ops/0 in sync again",
        |t| sample(t, "tern_partitions_under_replicated", &[]) == Some(0.0),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out, err) = tern(&c.addrs[leader], &["cluster", "status"]);
        assert!(ok, "{err}");
        if out.contains("under-replicated partitions: none") {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_metadata_and_livez_does_not() {
    let tmp = tempfile::tempdir().unwrap();
    let ports = node_support::cluster::free_ports(3);
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let start = |i: usize| {
        let id = (i + 1).to_string();
        let mut args = vec!["--node-id", &id, "--peers", &peers];
        args.extend(TIMING);
        args.extend(ADMIN);
        TestNode::start_at(
            &tmp.path().join(format!("n{i}")),
            &format!("127.0.0.1:{}", ports[i]),
            &args,
        )
    };
    // Alone, node 1 cannot elect a metadata leader: it serves probes but is not ready.
    let first = start(0);
    let admin = first.admin.clone().unwrap();
    for _ in 0..3 {
        let (code, body) = http_get(&admin, "/readyz").unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("catching up"), "{body}");
        assert_eq!(http_get(&admin, "/livez").unwrap().0, 200);
        assert_eq!(
            value(&scrape(&first), "tern_node_ready", &[]),
            0.0,
            "the metric agrees"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _others = [start(1), start(2)];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(&admin, "/readyz").unwrap();
        if code == 200 {
            assert_eq!(body.trim(), "ready");
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value(&scrape(&first), "tern_node_ready", &[]), 1.0);
    // Anything else is 404.
    assert_eq!(http_get(&admin, "/nope").unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_partitions_bounds_the_series_and_totals_cover_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = ADMIN.to_vec();
    args.extend(["--metrics-partitions", "3"]);
    let node = TestNode::start(tmp.path(), &args);
    let mut c = node.client().await;
    create(&mut c, "wide", 8, 1).await;
    let text = until(&node, "8 replicas open", |t| {
        sample(t, "tern_replicas", &[("role", "leader")]) == Some(8.0)
    })
    .await;
    promtool_passes(&text);
    let shown = text
        .lines()
        .filter(|l| l.starts_with("tern_partition_high_watermark{"))
        .count();
    assert_eq!(shown, 3, "{text}");
    assert_eq!(value(&text, "tern_metrics_partitions_omitted", &[]), 5.0);
    // Bad values are refused at start with a clear message.
    let out = Command::new(node_support::TERN)
        .args(["serve", "--metrics-partitions", "many"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--metrics-partitions"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_its_leaderships_over_without_an_election_timeout() {
    let mut c = Cluster::start_with(3, &ADMIN).await;
    let mut client = c.client(0).await;
    create(&mut client, "handoff", 2, 3).await;
    for p in 0..2 {
        publish_retrying(
            &mut client,
            pb::PublishRequest {
                topic: "handoff".into(),
                records: vec![record(p, format!("before-{p}"))],
                ..Default::default()
            },
        )
        .await;
    }
    let leader = c.leader("handoff", 0).await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let elections = |c: &Cluster| -> f64 {
        survivors
            .iter()
            .map(|i| {
                value(
                    &scrape(c.nodes[*i].as_ref().unwrap()),
                    "tern_raft_elections_total",
                    &[],
                )
            })
            .sum()
    };
    let before = elections(&c);
    // SIGTERM: the node hands its leaderships over, then stops cleanly.
    let status = c.nodes[leader].take().unwrap().terminate();
    assert!(status.success(), "{status:?}");
    let next = c.leader("handoff", 0).await;
    assert_ne!(next, leader);
    let mut s = c.client(survivors[0]).await;
    for p in 0..2 {
        publish_retrying(
            &mut s,
            pb::PublishRequest {
                topic: "handoff".into(),
                records: vec![record(p, format!("after-{p}"))],
                ..Default::default()
            },
        )
        .await;
    }
    // Nobody had to time out and campaign: the new leaders were asked to take over.
    assert_eq!(elections(&c), before, "a survivor started an election");
}

/// A node killed with SIGKILL mid-stream restarts from its replicas' applied checkpoints
/// (saved every 16 entries here), not by re-applying their logs, and loses nothing: every
/// record is there in order, and the idempotent producer's state came back with it (the last
/// batch sent again is answered with its first offsets and not written twice, the next
/// sequence goes on, and a gap is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_restarts_from_its_checkpoints_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = ADMIN.to_vec();
    args.extend(["--raft-checkpoint-entries", "16"]);
    let node = TestNode::start(dir.path(), &args);
    let mut c = node.client().await;
    node_support::create_topic(&mut c, "ckpt", 1).await;
    let producer_id = c
        .init_producer(pb::InitProducerRequest {})
        .await
        .unwrap()
        .into_inner()
        .producer_id;
    // Batches of two records; sequence = the first record's number.
    let batch = |seq: u32| {
        let values = [format!("r{seq}"), format!("r{}", seq + 1)];
        idem("ckpt", 0, producer_id, seq, &[&values[0], &values[1]])
    };
    let mut last = Vec::new();
    for b in 0..100u32 {
        last = offsets(&mut c, batch(2 * b)).await.unwrap();
    }
    let saved = value(&scrape(&node), "tern_raft_checkpoints_saved_total", &[]);
    assert!(
        saved >= 5.0,
        "100 entries, a checkpoint every 16: {saved} saved"
    );
    node.kill9();

    let node = TestNode::start(dir.path(), &args);
    let mut c = node.client().await;
    // The node may still be opening its partition: retried while it answers UNAVAILABLE.
    let again = offsets_retrying(&mut c, batch(198)).await;
    assert_eq!(again, last, "the retried batch was written again");
    let restores = value(&scrape(&node), "tern_raft_checkpoint_restores_total", &[]);
    assert!(restores >= 1.0, "no replica started from its checkpoint");
    let next = offsets(&mut c, batch(200)).await.unwrap();
    // After the retried batch (a new leader's term may put a control record in between).
    assert!(
        next[0] > last[1] && next[1] == next[0] + 1,
        "{next:?} after {last:?}"
    );
    let gap = offsets(&mut c, batch(210)).await.unwrap_err();
    assert_eq!(gap.code(), tonic::Code::FailedPrecondition, "{gap:?}");
    let values = node_support::cluster::values(&node_support::fetch_all(&mut c, "ckpt", 0).await);
    let expected: Vec<String> = (0..202).map(|i| format!("r{i}")).collect();
    assert_eq!(values, expected);
}
