//! The `tern` command line against a real node: the README's quickstart, JSON output, and exit
//! codes on errors.

mod node_support;

use std::io::Write;
use std::process::{Command, Stdio};

use node_support::{TestNode, TERN};

fn tern(addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TERN)
        .args(args)
        .args(["--server", addr])
        .output()
        .expect("tern runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

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
