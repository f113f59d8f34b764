//! The chaos workload, short and seeded (the CI version of the long run in
//! docs/reliability.md): faults of every kind on a spawned three-node cluster under
//! idempotent producers, a subscriber and a committing consumer group, then a heal and a final
//! read of every replica.

use std::process::Command;

#[test]
fn a_short_seeded_chaos_run_loses_duplicates_and_diverges_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    // Seed 8 kills node 2 at 5.6 s (and flips a byte of a state file); where node 2 led a
    // partition it came back leading in the same term, and retries met a leader still
    // re-applying its log (answered out of order, or they could be written twice) until
    // idempotence waited for the whole log. Its 30 s also pause, cut one way and bridge.
    // Whether a run hits that window depends on timing; any seed must pass.
    let seed = std::env::var("TERN_CHAOS_SEED").unwrap_or_else(|_| "8".into());
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--workload",
            "chaos",
            "--spawn",
            "3",
            "--rate",
            "200",
            "--duration",
            "30",
            "--fault-every",
            "3",
            "--seed",
            &seed,
            "--json",
        ])
        .arg(&json)
        .env("RUST_LOG", "error")
        .output()
        .expect("loadgen runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen failed:\n{stdout}\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let records = &r["records"];
    let chaos = &r["chaos"];
    eprintln!("{stdout}");
    assert!(records["acked"].as_u64().unwrap() > 0, "{records}");
    assert_eq!(
        records["acked"], records["sent"],
        "every record acknowledged: {records}"
    );
    for k in ["lost", "duplicated", "reordered"] {
        assert_eq!(records[k], 0, "{k}: {records}");
    }
    for k in ["divergent", "replica_lost", "replica_duplicated"] {
        assert_eq!(chaos[k], 0, "{k}: {chaos}");
    }
    // Every replica was read in full: three copies of everything acknowledged.
    assert!(
        chaos["replica_records"].as_u64().unwrap() >= 3 * records["acked"].as_u64().unwrap(),
        "{chaos}"
    );
    // The consumer group beside them: everything reached it, and nothing went backwards.
    let group = &chaos["group"];
    assert_eq!(group["drained"], true, "{group}");
    for k in ["missing", "commit_backwards", "read_backwards"] {
        assert_eq!(group[k], 0, "{k}: {group}");
    }
    assert!(
        group["records"].as_u64().unwrap() >= records["acked"].as_u64().unwrap(),
        "{group}"
    );
    // The queue group: every record acked by a member or dead-lettered, and some of each.
    let queue = &chaos["queue"];
    assert_eq!(queue["drained"], true, "{queue}");
    assert_eq!(queue["unsettled"], 0, "{queue}");
    assert!(queue["acked"].as_u64().unwrap() > 0, "{queue}");
    assert!(queue["dead_lettered"].as_u64().unwrap() > 0, "{queue}");
    let faults = chaos["faults"].as_array().unwrap();
    assert!(faults.len() >= 5, "only {} faults: {chaos}", faults.len());
}
