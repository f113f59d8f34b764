//! The `tern` command line against a real node: the README's quickstart, JSON output, and exit
//! codes on errors.

mod node_support;

use std::io::Write;
use std::process::{Command, Stdio};

use node_support::{tern, TestNode, TERN};

#[test]
fn quickstart_create_publish_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let a = node.addr.as_str();

    let (ok, out, err) = tern(a, &["topic", "create", "orders", "--partitions", "3"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("created topic orders with 3 partitions"),
        "{out}"
    );

    let (ok, out, _) = tern(
        a,
        &["pub", "orders", "--key", "k1", "-H", "source=test", "hello"],
    );
    assert!(ok);
    assert!(
        out.trim().starts_with("orders/") && out.contains('@'),
        "{out}"
    );

    // One record per line of standard input.
    let mut child = Command::new(TERN)
        .args(["pub", "orders", "--key", "k2", "--server", a])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    for i in 0..1000 {
        writeln!(stdin, "line {i}").unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("published 1000 records"));

    let (ok, out, err) = tern(
        a,
        &[
            "sub", "orders", "--from", "earliest", "--count", "1001", "--json",
        ],
    );
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1001);
    let first = lines.iter().find(|v| v["key"] == "k1").unwrap();
    assert_eq!(first["value"], "hello");
    assert_eq!(first["headers"]["source"], "test");
    // Lines of one key arrive in order.
    let k2: Vec<&str> = lines
        .iter()
        .filter(|v| v["key"] == "k2")
        .map(|v| v["value"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..1000).map(|i| format!("line {i}")).collect();
    assert_eq!(k2, want);

    let (ok, out, _) = tern(a, &["topic", "describe", "orders", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ends: u64 = v["partition_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end_offset"].as_u64().unwrap())
        .sum();
    // End offsets count the records and each group's few control records (Raft membership and
    // leader entries, which take offsets but are never delivered).
    assert!((1001..=1001 + 3 * 4).contains(&ends), "{ends}");

    let (ok, out, _) = tern(a, &["topic", "list"]);
    assert!(
        ok && out.contains("orders") && out.starts_with("TOPIC"),
        "{out}"
    );
    let (ok, out, _) = tern(a, &["cluster", "status"]);
    assert!(ok && out.contains(a), "{out}");

    // Errors: a message and a non-zero exit code.
    let (ok, _, err) = tern(a, &["pub", "missing", "x"]);
    assert!(!ok);
    assert!(err.contains("NotFound") && err.contains("missing"), "{err}");
    let (ok, _, err) = tern(a, &["sub", "orders", "--from", "yesterday"]);
    assert!(!ok);
    assert!(err.contains("earliest, latest"), "{err}");
    let (ok, _, _) = tern(a, &["topic", "delete", "orders"]);
    assert!(ok);
    let (ok, out, _) = tern(a, &["topic", "list", "--json"]);
    assert!(ok && out.trim().is_empty(), "{out}");
}

#[test]
fn serve_help_documents_every_option() {
    let out = Command::new(TERN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--data-dir",
        "--cores",
        "--net-threads",
        "--mailbox-capacity",
        "--config",
        "--default-fsync",
    ] {
        assert!(help.contains(flag), "{flag} missing from serve --help");
    }
}

#[test]
fn a_second_node_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _node = TestNode::start(dir.path(), &[]);
    let out = Command::new(TERN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another tern process"));
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let (ok, _, err) = tern("127.0.0.1:1", &["topic", "list"]);
    assert!(!ok);
    assert!(err.contains("cannot reach a Tern node"), "{err}");
}

#[test]
fn group_member_resumes_where_the_group_committed_and_groups_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let a = node.addr.as_str();
    let (ok, _, err) = tern(a, &["topic", "create", "ledger", "--partitions", "2"]);
    assert!(ok, "{err}");
    let publish = |from: u32, to: u32| {
        for i in from..to {
            let (ok, _, err) = tern(
                a,
                &[
                    "pub",
                    "ledger",
                    "-p",
                    &(i % 2).to_string(),
                    &format!("r{i}"),
                ],
            );
            assert!(ok, "{err}");
        }
    };
    let values = |out: &str| -> Vec<String> {
        let mut v: Vec<String> = out
            .lines()
            .map(|l| l.rsplit('\t').next().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    publish(0, 6);
    // `--count` reached: it commits what it printed and leaves.
    let (ok, out, err) = tern(
        a,
        &[
            "sub", "ledger", "--group", "g", "--from", "earliest", "-n", "6",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(values(&out), ["r0", "r1", "r2", "r3", "r4", "r5"]);
    // The next member gets only what came since.
    publish(6, 10);
    let (ok, out, err) = tern(
        a,
        &[
            "sub", "ledger", "--group", "g", "--from", "earliest", "-n", "4",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(values(&out), ["r6", "r7", "r8", "r9"]);

    let (ok, out, err) = tern(a, &["group", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["g", "ledger", "stream", "0"]),
        "{out}"
    );
    let (ok, out, err) = tern(a, &["group", "describe", "g"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("group g  topic ledger  mode stream"),
        "{out}"
    );
    // Bad input: a clear message and a failing exit code.
    let (ok, _, err) = tern(a, &["sub", "ledger", "--group", "g", "--from", "17"]);
    assert!(!ok && err.contains("earliest or latest"), "{err}");
    let (ok, _, err) = tern(a, &["group", "describe", "nobody"]);
    assert!(!ok && err.contains("NotFound"), "{err}");
}

/// Runs `tern ARGS --server ADDR` with `input` on standard input.
fn tern_with_input(addr: &str, args: &[&str], input: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(TERN)
        .args(args)
        .args(["--server", addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tern runs");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Records are bytes: lines that are not UTF-8 (and a whole binary file) come back byte for
/// byte; nothing stops at the first odd line.
#[test]
fn binary_input_round_trips_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let a = node.addr.as_str();
    let (ok, _, err) = tern(a, &["topic", "create", "bytes", "-p", "1"]);
    assert!(ok, "{err}");
    let mut input = Vec::new();
    for i in 0..300u32 {
        input.extend_from_slice(format!("line {i} ").as_bytes());
        // Invalid UTF-8, NUL, CR, and every other byte but the newline.
        input.extend_from_slice(&[0xff, 0xfe, 0x00, b'\r', 0xc3, 0x28]);
        input.push((i % 256) as u8);
        if input.last() == Some(&b'\n') {
            input.pop();
        }
        input.push(b'\n');
    }
    let (ok, _, err) = tern_with_input(a, &["pub", "bytes", "--quiet"], &input);
    assert!(ok, "{err}");
    assert!(err.contains("published 300 records"), "{err}");
    let (ok, out, err) = tern_with_input(
        a,
        &["sub", "bytes", "--from", "earliest", "-n", "300", "--raw"],
        b"",
    );
    assert!(ok, "{err}");
    assert_eq!(out, input, "the values differ from what went in");

    // A whole file as one record, newlines and all.
    let file = dir.path().join("blob.bin");
    let blob: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 256) as u8).collect();
    std::fs::write(&file, &blob).unwrap();
    let (ok, _, err) = tern(a, &["pub", "bytes", "--file", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = tern(a, &["sub", "bytes", "--from", "-1", "-n", "1", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    use base64::Engine;
    let got = base64::engine::general_purpose::STANDARD
        .decode(
            v["value"]["base64"]
                .as_str()
                .expect("binary value as base64"),
        )
        .unwrap();
    assert_eq!(got, blob);
    // `--file -` reads all of standard input as one record.
    let (ok, _, err) = tern_with_input(a, &["pub", "bytes", "--file", "-"], b"a\nb\n");
    assert!(ok, "{err}");
    let (ok, out, _) = tern_with_input(
        a,
        &["sub", "bytes", "--from", "-1", "-n", "1", "--raw"],
        b"",
    );
    assert!(ok);
    assert_eq!(out, b"a\nb\n\n");
}

/// Failures are errors with a non-zero exit: unreadable input, a request over the node's
/// limit (named, with its flag), a partition count of 0.
#[test]
fn failures_to_read_or_publish_exit_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &["--max-request-bytes", "65536"]);
    let a = node.addr.as_str();
    assert!(tern(a, &["topic", "create", "t", "-p", "1"]).0);
    // Standard input that cannot be read (a directory).
    let out = Command::new(TERN)
        .args(["pub", "t", "--server", a])
        .stdin(std::fs::File::open(dir.path()).unwrap())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reading standard input"), "{err}");
    let end_offset = || {
        let (ok, out, _) = tern(a, &["topic", "describe", "t", "--json"]);
        assert!(ok);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["partition_info"][0]["end_offset"].as_u64().unwrap()
    };
    let before = end_offset();
    // Over --max-request-bytes.
    let file = dir.path().join("big");
    std::fs::write(&file, vec![b'x'; 100_000]).unwrap();
    let (ok, _, err) = tern(a, &["pub", "t", "--file", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("--max-request-bytes") && err.contains("65536"),
        "{err}"
    );
    assert!(!err.contains("decoded message length"), "{err}");
    // Nothing was written.
    assert_eq!(end_offset(), before, "something was written");
    // Lines: the failure stops the reading, and the summary counts what failed.
    let mut input = vec![b'x'; 100_000];
    input.extend_from_slice(b"\nafter\n");
    let (ok, _, err) = tern_with_input(a, &["pub", "t"], &input);
    assert!(!ok);
    assert!(err.contains("--max-request-bytes"), "{err}");
    assert!(err.contains("failed (a failed record"), "{err}");
    // A partition count of 0 is refused, not turned into the default.
    let (ok, _, err) = tern(a, &["topic", "create", "zero", "--partitions", "0"]);
    assert!(!ok && err.contains("0"), "{err}");
    let (ok, out, _) = tern(a, &["topic", "list"]);
    assert!(ok && !out.contains("zero"), "{out}");
}

/// Groups start where docs/groups.md says (earliest); a member tailing from latest shows no
/// lag; `--from -N`; a move to the replicas a partition has changes nothing and says so.
#[test]
fn group_defaults_tail_lag_last_n_and_unchanged_moves() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let a = node.addr.as_str();
    assert!(tern(a, &["topic", "create", "jobs", "-p", "2"]).0);
    let input: String = (0..6).map(|i| format!("job{i}\n")).collect();
    let (ok, _, err) = tern_with_input(a, &["pub", "jobs", "-p", "0", "-q"], input.as_bytes());
    assert!(ok, "{err}");
    // A queue member started after the records were published gets them.
    let (ok, out, err) = tern(a, &["sub", "jobs", "--queue", "workers", "-n", "6"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 6, "{out}");
    // The last 2 records of partition 0.
    let (ok, out, err) = tern(
        a,
        &["sub", "jobs", "-p", "0", "--from", "-2", "-n", "2", "--raw"],
    );
    assert!(ok, "{err}");
    assert_eq!(out, "job4\njob5\n");
    // A group member tailing from latest: its partitions show no lag.
    let mut member = Command::new(TERN)
        .args([
            "sub", "jobs", "--group", "tail", "--from", "latest", "--server", a,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (ok, out, _) = tern(a, &["group", "describe", "tail", "--json"]);
        if ok {
            let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
            let parts = v["partitions"].as_array().unwrap();
            let started = parts.iter().all(|p| !p["position"].is_null());
            if started {
                for p in parts {
                    assert_eq!(p["lag"], 0, "{out}");
                }
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the member did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = member.kill();
    let _ = member.wait();
    let (ok, out, err) = tern(a, &["cluster", "move", "jobs", "0", "--to", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("nothing to move"), "{out}");
}

/// A node on a wildcard address advertises something reachable, never 0.0.0.0; more cores
/// than CPUs is warned about.
#[test]
fn a_wildcard_listener_advertises_its_host_name_and_too_many_cores_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let cpus = std::thread::available_parallelism().unwrap().get();
    let cores = (cpus + 2).to_string();
    let node = TestNode::start_logged(
        &dir.path().join("data"),
        "0.0.0.0:0",
        &["--cores", &cores],
        Some(&log),
    );
    let port = node.addr.rsplit(':').next().unwrap();
    let local = format!("127.0.0.1:{port}");
    let (ok, out, err) = tern(&local, &["cluster", "status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let advertised = v["nodes"][0]["address"].as_str().unwrap();
    assert!(
        !advertised.starts_with("0.0.0.0") && advertised.ends_with(&format!(":{port}")),
        "{advertised}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("--cores {cores} on a machine with {cpus} CPUs")),
        "{text}"
    );
}

/// A mirror of a topic on the same node, by the command line: created, shown with its lag,
/// refused to producers, promoted, and then written to; bad sources are clear errors.
#[test]
fn a_mirror_is_created_described_refused_promoted_and_written_by_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let a = node.addr.as_str();
    let (ok, _, err) = tern(a, &["topic", "create", "src", "--partitions", "2"]);
    assert!(ok, "{err}");
    for i in 0..5 {
        let (ok, _, err) = tern(a, &["pub", "src", "--key", "k", &format!("r{i}")]);
        assert!(ok, "{err}");
    }

    let (ok, _, err) = tern(a, &["topic", "create", "m", "--mirror-of", "src"]);
    assert!(!ok);
    assert!(err.contains("SOURCE_TOPIC@HOST:PORT"), "{err}");
    let source = format!("nope@{a}");
    let (ok, _, err) = tern(a, &["topic", "create", "m", "--mirror-of", &source]);
    assert!(!ok);
    assert!(err.contains("no topic \"nope\""), "{err}");

    let source = format!("src@{a}");
    let (ok, out, err) = tern(a, &["topic", "create", "m", "--mirror-of", &source]);
    assert!(ok, "{err}");
    assert!(
        out.contains("with 2 partitions") && out.contains("it mirrors src@"),
        "{out}"
    );

    // The copy arrives; describe shows the source and no lag.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (ok, out, err) = tern(a, &["topic", "describe", "m", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["mirror_of"]["topic"], "src");
        let parts = v["partition_info"].as_array().unwrap();
        let copied: u64 = parts
            .iter()
            .map(|p| p["end_offset"].as_u64().unwrap())
            .sum();
        let lagging = parts
            .iter()
            .any(|p| p["mirror"]["lag_records"].as_u64() != Some(0));
        if copied >= 5 && !lagging {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never copied: {out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (ok, out, _) = tern(a, &["topic", "describe", "m"]);
    assert!(ok);
    assert!(
        out.contains("mirror of src@") && out.contains("LAG MS"),
        "{out}"
    );

    let (ok, _, err) = tern(a, &["pub", "m", "x"]);
    assert!(!ok);
    assert!(err.contains("is a mirror of src@"), "{err}");
    let (ok, _, err) = tern(a, &["topic", "promote", "src"]);
    assert!(!ok);
    assert!(err.contains("not a mirror"), "{err}");

    let (ok, out, err) = tern(a, &["topic", "promote", "m"]);
    assert!(ok, "{err}");
    assert!(out.contains("promoted m"), "{out}");
    let (ok, out, err) = tern(a, &["pub", "m", "--key", "k", "after"]);
    assert!(ok, "{err}");
    assert!(out.trim().starts_with("m/"), "{out}");
    let (ok, out, err) = tern(
        a,
        &["sub", "m", "--from", "earliest", "--count", "6", "--json"],
    );
    assert!(ok, "{err}");
    let values: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["value"].to_string())
        .collect();
    assert_eq!(values.len(), 6, "{out}");
    assert!(values.iter().any(|v| v.contains("after")), "{out}");
    assert!(values.iter().any(|v| v.contains("r4")), "{out}");
}
