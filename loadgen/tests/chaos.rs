//! The chaos workload, short and seeded (the CI version of the long run in
//! docs/reliability.md): faults of every kind on a spawned three-node cluster under
//! idempotent producers, a subscriber and a committing consumer group, then a heal and a final
//! read of every replica.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Runs the chaos workload (200 records/s, a fault every ~3 s unless `args` say otherwise) with `args` after the common
/// ones, from `TERN_CHAOS_SEED` or else `default_seed`, and checks everything it checks:
/// nothing lost, duplicated, reordered or divergent, both groups clean, every fault carried
/// out. Returns the report's `chaos` object.
fn chaos_run(default_seed: &str, args: &[&str]) -> serde_json::Value {
    let seed = std::env::var("TERN_CHAOS_SEED").unwrap_or_else(|_| default_seed.into());
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("result.json");
    // A fault every ~3 s unless the test says otherwise.
    let every: &[&str] = if args.contains(&"--fault-every") {
        &[]
    } else {
        &["--fault-every", "3"]
    };
    let child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--workload",
            "chaos",
            "--rate",
            "200",
            "--seed",
            &seed,
            "--json",
        ])
        .arg(&json)
        .args(every)
        .args(args)
        .env("RUST_LOG", "error")
        // The nodes (which inherit it) save their applied checkpoints every 64 entries rather
        // than 4,096, so that the kills of a 30 s run restart replicas from them.
        .env("TERN_RAFT_CHECKPOINT_ENTRIES", "64")
        // Its own process group: a run that overstays is killed with the nodes it spawned.
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("loadgen runs");
    let out = finish_within(child, std::time::Duration::from_secs(600));
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
    assert_eq!(
        chaos["failed_faults"].as_array().map(Vec::len),
        Some(0),
        "faults not carried out: {chaos}"
    );
    // Every replica was read in full: three copies of everything acknowledged (at least: on
    // a fourth node, without a replica, the read is relayed to one).
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
    chaos.clone()
}

/// Waits for `child` and its output; kills it and fails if it has not ended within `limit`
/// (a run that hangs fails here, with what it printed, instead of holding CI until its own
/// time limit).
fn finish_within(
    mut child: std::process::Child,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::io::Read;
    // Drain both pipes on their own threads so a chatty run never blocks on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() >= deadline {
            // The whole group: loadgen and the nodes it spawned (which hold its pipes).
            // SAFETY: signalling a process group this test created.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            let stdout = String::from_utf8_lossy(&out_t.join().unwrap()).into_owned();
            let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
            let tail = |s: &str| {
                s.lines()
                    .rev()
                    .take(60)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            panic!(
                "loadgen did not finish within {limit:?}\n--- stdout (end) ---\n{}\n--- stderr (end) ---\n{}",
                tail(&stdout),
                tail(&stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// `scripts/test-tools`, shared with the root crate's tests.
#[path = "../../tests/node_support/tools.rs"]
mod tools;

/// Debian's libfaketime, installed by the project's script if missing (the `clock` fault
/// needs it; without it the default fault set would differ from machine to machine).
fn libfaketime() -> String {
    tools::tool("libfaketime").to_string_lossy().into_owned()
}

#[test]
fn a_short_seeded_chaos_run_loses_duplicates_and_diverges_nothing() {
    // Seed 8 once killed node 2 at 5.6 s where it led a partition; it came back leading in the
    // same term, and retries met a leader still re-applying its log (answered out of order, or
    // they could be written twice) until idempotence waited for the whole log. Whether a run
    // hits such a window depends on timing; any seed must pass.
    let lib = libfaketime();
    let chaos = chaos_run(
        "8",
        &["--spawn", "3", "--duration", "30", "--libfaketime", &lib],
    );
    let faults = chaos["faults"].as_array().unwrap();
    assert!(faults.len() >= 5, "only {} faults: {chaos}", faults.len());
}

/// Wall clocks jumping between kills: a node's wall clock goes 10 s to 1 h ahead or behind
/// for 1-3 s (libfaketime; monotonic clocks stay real) while the load runs. Raft's timing
/// uses monotonic clocks only, so nothing may be lost, doubled, reordered or diverge, and
/// the groups (whose sessions must not expire by a jump) stay clean. The harness checks that
/// each node it jumps has libfaketime loaded, so a jump cannot silently do nothing.
#[test]
fn wall_clock_jumps_between_kills_lose_nothing() {
    let lib = libfaketime();
    let chaos = chaos_run(
        "3",
        &[
            "--spawn",
            "3",
            "--duration",
            "20",
            "--faults",
            "clock,kill",
            "--libfaketime",
            &lib,
        ],
    );
    let n = chaos["fault_counts"]["clock"].as_u64().unwrap_or(0);
    assert!(n >= 2, "fewer than two clock jumps: {chaos}");
}

/// Membership changes and delays under load, between kills, on four nodes that talk through
/// tern-wan (four regions of one node, no delay of their own), replication factor 3: a
/// replica moved to the node without one (caught up from scratch; the old one deletes its
/// copy) and back, and 20-500 ms more one-way delay into and out of a node; the same checks as
/// above.
#[test]
fn membership_changes_and_delays_between_kills_lose_nothing() {
    let chaos = chaos_run(
        "1",
        &[
            "--spawn",
            "4",
            "--regions",
            "r1,r2,r3,r4",
            "--rtt-ms",
            "0",
            "--duration",
            "25",
            "--faults",
            "move,delay,kill",
        ],
    );
    for kind in ["move", "delay"] {
        let n = chaos["fault_counts"][kind].as_u64().unwrap_or(0);
        assert!(n >= 1, "no {kind} fault: {chaos}");
    }
}

/// Partitions made by the kernel: each node in its own network namespace on a bridge
/// (`--netns`), cut off by nftables rules that drop its packets from the others (a stalled
/// TCP connection, not a refused call); the same checks as above. Seed 6: a partition, a
/// one-way cut and two bridges. (Kills are left out here: with them (seed 5), 2 of about 60
/// runs on a heavily loaded machine left a node whose cores slept past their timers, and
/// the run never ended; see docs/reliability.md, "Known problems".)
#[test]
fn kernel_partitions_in_network_namespaces_lose_nothing() {
    let chaos = chaos_run(
        "6",
        &[
            "--spawn",
            "3",
            "--netns",
            "--duration",
            "20",
            "--faults",
            "partition,one-way,bridge",
        ],
    );
    let counts = &chaos["fault_counts"];
    let cuts: u64 = ["partition", "one-way", "bridge"]
        .iter()
        .map(|k| counts[k].as_u64().unwrap_or(0))
        .sum();
    assert!(cuts >= 1, "no partition: {chaos}");
}

/// Nodes joining and leaving while other faults are held: `churn` starts a node that joins
/// (`--join`), removes the one the churn before added (`tern cluster remove-node --wait`: its
/// replicas drained to other nodes, then its process must exit by itself) and rebalances,
/// while kills, pauses and partitions run two at a time (`--overlap 2`, a fault every ~1 s,
/// each held 1-3 s) on three controllers; the same checks as above.
#[test]
fn nodes_join_and_leave_during_overlapping_faults_lose_nothing() {
    let chaos = chaos_run(
        "4",
        &[
            "--spawn",
            "3",
            "--duration",
            "30",
            "--overlap",
            "2",
            "--fault-every",
            "1",
            "--faults",
            "churn,kill,pause,partition",
        ],
    );
    let removed = chaos["nodes_removed"].as_u64().unwrap_or(0);
    assert!(removed >= 1, "no node was removed: {chaos}");
    assert!(
        chaos["overlapped"].as_u64().unwrap_or(0) >= 1,
        "no faults overlapped: {chaos}"
    );
}
