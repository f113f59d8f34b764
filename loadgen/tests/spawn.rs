//! The loadgen end to end: spawns three-node clusters, runs short loads through them, and
//! reports without losing (or duplicating) anything.

use std::process::Command;

/// One spawned cluster at a time: each is three debug-build nodes, and two of them side by
/// side on a two-core machine starved the 500-partition test's elections (2 of 3 runs gave
/// records up after a minute; alone, it passes in about 30 s).
static ONE_CLUSTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs loadgen with `args` (and `--json`); asserts it succeeded. Its stdout and the JSON.
fn loadgen(args: &[&str]) -> (String, serde_json::Value) {
    let _one = ONE_CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed:\n{stdout}\n{stderr}");
    let r = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (stdout, r)
}

#[test]
fn seed_target_runs_on_a_spawned_three_node_cluster() {
    let (stdout, r) = loadgen(&[
        "--workload",
        "seed-target",
        "--spawn",
        "3",
        "--rate",
        "200",
        "--duration",
        "3",
        "--warmup",
        "1",
    ]);
    assert!(stdout.contains("workload        seed-target"), "{stdout}");
    assert_eq!(r["settings"]["nodes"], 3);
    assert_eq!(r["settings"]["replication_factor"], 3);
    assert_eq!(r["nodes"].as_array().unwrap().len(), 3);
    let records = &r["records"];
    assert_eq!(records["lost"], 0, "{records}");
    assert!(records["acked"].as_u64().unwrap() > 0, "{records}");
}

/// Leader-aware producers (tern-client) on a topic of many partitions created just before the
/// load: the client learns the layout while leaders are still being elected, so its first
/// requests go through nodes that forward them, pipelined. Every record is written once.
/// (250 partitions: with 500, three debug-build nodes on two cores took 30-60 s to elect
/// every leader, and some runs gave records up after the client's minute of retries.)
#[test]
fn leader_aware_producers_write_each_record_once_while_leaders_settle() {
    let (_, r) = loadgen(&[
        "--workload",
        "many-partitions",
        "--spawn",
        "3",
        "--partitions",
        "250",
        "--rate",
        "2000",
        "--duration",
        "4",
        "--warmup",
        "1",
        "--client",
        "leader",
    ]);
    let records = &r["records"];
    assert_eq!(records["lost"], 0, "{records}");
    assert_eq!(records["duplicated"], 0, "{records}");
    assert_eq!(
        records["acked"], records["sent"],
        "{records}\n{}",
        r["errors"]
    );
}
