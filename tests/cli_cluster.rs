//! The `tern` command line against a three-node cluster of real processes: a plain `tern sub`
//! follows its partitions when their replicas move away from its node or its node dies, and
//! ends clearly when the topic is deleted, any node serves a subscription, `tern pub` gets every record through a
//! leader kill exactly once, and a removed node stops saying why.

mod node_support;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node_support::cluster::{Cluster, TIMING};
use node_support::{tern, TERN};

fn ok(addr: &str, args: &[&str]) -> String {
    let (ok, out, err) = tern(addr, args);
    assert!(ok, "tern {args:?} failed: {err}");
    out
}

/// A `tern sub --json` running in the background; its stdout and stderr go to files.
struct Subscriber {
    child: Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Subscriber {
    fn start(dir: &std::path::Path, name: &str, addr: &str, args: &[&str]) -> Subscriber {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = Command::new(TERN)
            .arg("sub")
            .args(args)
            .args(["--json", "--server", addr])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Subscriber { child, out, err }
    }

    /// (partition, value) of every record printed so far.
    fn records(&self) -> Vec<(u64, String)> {
        std::fs::read_to_string(&self.out)
            .unwrap()
            .lines()
            .filter(|l| l.ends_with('}'))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["partition"].as_u64().unwrap(),
                    v["value"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn wait_for(&self, n: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.records().len() < n {
            assert!(
                Instant::now() < deadline,
                "{what}: the subscriber printed {} of {n} records; stderr: {}",
                self.records().len(),
                std::fs::read_to_string(&self.err).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes `values` one request each to partition `p` through `addr`.
fn publish(addr: &str, topic: &str, p: u32, values: impl Iterator<Item = String>) {
    let mut child = Command::new(TERN)
        .args(["pub", topic, "--partition", &p.to_string(), "--quiet"])
        .args(["--server", addr])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for v in values {
        writeln!(stdin, "{v}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Checks that the subscriber saw `want` values per partition, each once and in order.
fn assert_in_order(got: &[(u64, String)], want: &[(u32, Vec<String>)]) {
    for (p, values) in want {
        let seen: Vec<&String> = got
            .iter()
            .filter(|(q, _)| *q == *p as u64)
            .map(|(_, v)| v)
            .collect();
        let want: Vec<&String> = values.iter().collect();
        assert_eq!(seen, want, "partition {p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_subscriber_follows_its_partitions_through_moves_and_ends_when_the_topic_is_deleted(
) {
    let cluster = Cluster::start(3).await;
    let a1 = cluster.addrs[0].as_str();
    let tmp = tempfile::tempdir().unwrap();
    // Two replicas of each partition: node 1 holds some of them at first, none at the end.
    ok(a1, &["topic", "create", "moving", "-p", "3", "-r", "2"]);
    let sub = Subscriber::start(tmp.path(), "sub", a1, &["moving", "--from", "earliest"]);
    let mut want: Vec<(u32, Vec<String>)> = (0..3).map(|p| (p, Vec::new())).collect();
    // Published through node 1 too: right after a partition moved off it, node 1 must send
    // its publishes to the new leader (not answer with itself as the leader).
    let round = |tag: &str, want: &mut Vec<(u32, Vec<String>)>| {
        for (p, values) in want.iter_mut() {
            let new: Vec<String> = (0..20).map(|i| format!("{tag}-{p}-{i}")).collect();
            publish(a1, "moving", *p, new.iter().cloned());
            values.extend(new);
        }
    };
    round("before", &mut want);
    sub.wait_for(60, "before the moves");
    // Move every partition off node 1 (the subscriber's node), publishing between moves.
    for p in 0..3 {
        ok(
            a1,
            &[
                "cluster",
                "move",
                "moving",
                &p.to_string(),
                "--to",
                "2,3",
                "--wait",
            ],
        );
        round(&format!("after-move-{p}"), &mut want);
    }
    let info = ok(a1, &["topic", "describe", "moving", "--json"]);
    let v: serde_json::Value = serde_json::from_str(info.trim()).unwrap();
    for p in v["partition_info"].as_array().unwrap() {
        assert_eq!(p["replicas"], serde_json::json!([2, 3]), "{info}");
    }
    let total = want.iter().map(|(_, v)| v.len()).sum();
    sub.wait_for(
        total,
        "after every partition moved off the subscriber's node",
    );
    assert_in_order(&sub.records(), &want);

    // Deleting the topic ends the subscription with a clear message, also when a topic of
    // the same name is created right after.
    let mut sub = sub;
    ok(a1, &["topic", "delete", "moving"]);
    ok(a1, &["topic", "create", "moving", "-p", "1", "-r", "1"]);
    publish(
        &cluster.addrs[2],
        "moving",
        0,
        ["new".to_string()].into_iter(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = sub.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber still runs after the delete"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let err = std::fs::read_to_string(&sub.err).unwrap();
    assert!(
        err.contains("NotFound") && err.contains("was deleted"),
        "{err}"
    );
    assert_eq!(
        sub.records().len(),
        total,
        "a record of the new topic was delivered"
    );
}

/// A plain `tern sub` whose node is killed -9 goes on through another node, each partition
/// from where it got to: every record printed once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_subscriber_goes_on_through_another_node_when_its_node_dies() {
    let mut cluster = Cluster::start(3).await;
    let (a1, a2) = (cluster.addrs[0].clone(), cluster.addrs[1].clone());
    let tmp = tempfile::tempdir().unwrap();
    ok(&a1, &["topic", "create", "tail", "-p", "2", "-r", "3"]);
    let sub = Subscriber::start(tmp.path(), "sub", &a1, &["tail", "--from", "earliest"]);
    let mut want: Vec<(u32, Vec<String>)> = (0..2).map(|p| (p, Vec::new())).collect();
    let round = |tag: &str, want: &mut Vec<(u32, Vec<String>)>| {
        for (p, values) in want.iter_mut() {
            let new: Vec<String> = (0..20).map(|i| format!("{tag}-{p}-{i}")).collect();
            publish(&a2, "tail", *p, new.iter().cloned());
            values.extend(new);
        }
    };
    round("before", &mut want);
    sub.wait_for(40, "before the kill");
    cluster.kill9(0);
    round("after", &mut want);
    sub.wait_for(80, "after its node was killed");
    assert_in_order(&sub.records(), &want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_a_subscription_and_a_fetch() {
    let cluster = Cluster::start(3).await;
    let tmp = tempfile::tempdir().unwrap();
    // One replica, on one node: the two others hold none.
    ok(
        &cluster.addrs[0],
        &["topic", "create", "solo", "-p", "1", "-r", "1"],
    );
    let info = ok(&cluster.addrs[0], &["topic", "describe", "solo", "--json"]);
    let v: serde_json::Value = serde_json::from_str(info.trim()).unwrap();
    let holder = v["partition_info"][0]["replicas"][0].as_u64().unwrap() as usize;
    let values: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
    publish(&cluster.addrs[0], "solo", 0, values.iter().cloned());
    let mut all = values.clone();
    for (i, addr) in cluster.addrs.iter().enumerate() {
        let late = [format!("late-{i}-a"), format!("late-{i}-b")];
        let n = (all.len() + late.len()).to_string();
        let sub = Subscriber::start(
            tmp.path(),
            &format!("n{i}"),
            addr,
            &["solo", "--from", "earliest", "-n", &n],
        );
        // Two more, published while the subscription runs.
        publish(addr, "solo", 0, late.iter().cloned());
        all.extend(late);
        sub.wait_for(all.len(), &format!("through node {}", i + 1));
        let got: Vec<String> = sub.records().into_iter().map(|(_, v)| v).collect();
        assert_eq!(got, all, "through node {}", i + 1);
    }
    // `--from -N` through a node without a replica: the last N records.
    let other = (holder % 3) + 1;
    let (ok_, out, err) = tern(
        &cluster.addrs[other - 1],
        &["sub", "solo", "--from", "-2", "-n", "2", "--raw"],
    );
    assert!(ok_, "{err}");
    assert_eq!(out, "late-2-a\nlate-2-b\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_pub_gets_every_record_through_a_leader_kill_exactly_once() {
    let mut cluster = Cluster::start(3).await;
    ok(
        &cluster.addrs[0],
        &["topic", "create", "failover", "-p", "1", "-r", "3"],
    );
    let leader = cluster.leader("failover", 0).await;
    let through = (leader + 1) % 3;
    const N: usize = 2000;
    let mut child = Command::new(TERN)
        .args([
            "pub",
            "failover",
            "--quiet",
            "--server",
            &cluster.addrs[through],
        ])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A steady trickle, so that records are in flight when the leader dies.
    let feeder = std::thread::spawn(move || {
        for i in 0..N {
            writeln!(stdin, "r{i}").unwrap();
            stdin.flush().unwrap();
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    std::thread::sleep(Duration::from_millis(600));
    cluster.kill9(leader);
    feeder.join().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern pub failed: {err}");
    assert!(err.contains(&format!("published {N} records")), "{err}");
    assert!(!err.contains("Unknown"), "a call ended with UNKNOWN: {err}");
    // Every record once, in order, on the surviving nodes.
    for node in cluster.live() {
        let (ok_, out, e) = tern(
            &cluster.addrs[node],
            &[
                "sub",
                "failover",
                "--from",
                "earliest",
                "-n",
                &N.to_string(),
                "--raw",
            ],
        );
        assert!(ok_, "{e}");
        let got: Vec<&str> = out.lines().collect();
        let want: Vec<String> = (0..N).map(|i| format!("r{i}")).collect();
        assert_eq!(got, want, "node {}", node + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_stops_and_will_not_start_again() {
    let mut cluster = Cluster::start(3).await;
    // Node 3 again, with its log kept.
    let log = cluster.tmp.path().join("n3.log");
    cluster.kill9(2);
    let id = "3".to_string();
    let peers = cluster.peers.clone();
    let mut args = vec!["--node-id", &id, "--peers", &peers];
    args.extend(TIMING);
    let mut node3 = node_support::TestNode::start_logged(
        &cluster.dirs[2],
        &cluster.addrs[2],
        &args,
        Some(&log),
    );
    cluster.wait_formed().await;
    ok(
        &cluster.addrs[0],
        &["topic", "create", "kept", "-p", "2", "-r", "2"],
    );
    let out = ok(
        &cluster.addrs[0],
        &["cluster", "remove-node", "3", "--wait"],
    );
    assert!(out.contains("node 3 removed"), "{out}");
    let status = node3
        .wait_exit(Duration::from_secs(30))
        .expect("the removed node stops on its own");
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("node 3 was removed from the cluster") && text.contains("--join"),
        "{text}"
    );
    // Started again as it was, it stops again, saying why.
    let again = Command::new(TERN)
        .args(["serve", "--listen", &cluster.addrs[2], "--data-dir"])
        .arg(&cluster.dirs[2])
        .args(&args)
        .args(["--cores", "2"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waited = Instant::now();
    let out = again.wait_with_output().unwrap();
    assert!(waited.elapsed() < Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node 3 was removed from the cluster"), "{err}");
    // The others serve on.
    let (ok_, out, err) = tern(&cluster.addrs[1], &["pub", "kept", "x"]);
    assert!(ok_ && out.starts_with("kept/"), "{err}");
}
