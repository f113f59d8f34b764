//! The README's shell blocks, run as written: the quickstart against a node, and the
//! three-node cluster block (its ports swapped for free ones from the OS) in a scratch
//! directory. A README that does not paste fails here.

mod node_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use node_support::{TestNode, TERN};

/// The shell block that follows the `<!-- test: NAME ... -->` marker in README.md.
fn block(name: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let marker = format!("<!-- test: {name}");
    let start = readme
        .find(&marker)
        .unwrap_or_else(|| panic!("README.md has no block marked {marker:?}"));
    let rest = &readme[start..];
    let fence = rest
        .find("```sh\n")
        .expect("a ```sh block after the marker")
        + 6;
    let end = rest[fence..].find("```").expect("the block ends") + fence;
    rest[fence..end].to_string()
}

/// Runs a block under bash (`-e`: the first failing command fails it), with the `tern` under
/// test first on the PATH; background jobs are killed at the end.
fn run(script: &str, dir: &Path, envs: &[(&str, &str)]) -> (bool, String, String) {
    let bin_dir = Path::new(TERN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let full =
        format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{script}");
    let out = Command::new("timeout")
        .args(["600", "bash", "-c", &full])
        .current_dir(dir)
        .env("PATH", path)
        .env("RUST_LOG", "warn,openraft=error")
        .envs(envs.iter().copied())
        .output()
        .expect("bash runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_quickstart_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let (ok, out, err) = run(
        &block("quickstart"),
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &[("TERN_SERVER", &node.addr)],
    );
    assert!(ok, "the quickstart failed:\n{out}\n{err}");
    assert!(
        out.contains("created topic orders with 3 partitions, replication factor 1"),
        "{out}"
    );
    assert!(err.contains("published 1000 records to orders"), "{err}");
    assert!(err.contains("published 1 records to orders"), "{err}");
    // The queue member prints its 10 records (it starts at earliest, as groups do).
    let queue_lines = out
        .lines()
        .filter(|l| l.starts_with("orders/") && l.contains('\t'))
        .count();
    assert!(
        queue_lines >= 1002 + 2 + 1002 + 10,
        "{queue_lines} record lines:\n{out}"
    );
    // The group committed what it printed: no lag left.
    let described = out
        .split("group billing  topic orders")
        .nth(1)
        .expect("group describe billing printed");
    for p in 0..3 {
        let row = described
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&p.to_string()))
            .unwrap_or_else(|| panic!("no row for partition {p}:\n{described}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[3], "0", "partition {p} has lag: {row}");
    }
    assert!(out.contains("\"metadata_leader\":1"), "{out}");
    assert!(out.contains("deleted topic orders"), "{out}");
}

#[test]
fn the_rest_block_runs_as_written() {
    node_support::tools::tool("curl");
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let (ok, out, err) = run(
        &block("rest"),
        Path::new(env!("CARGO_MANIFEST_DIR")),
        &[("TERN_SERVER", &node.addr)],
    );
    assert!(ok, "the REST block failed:\n{out}\n{err}");
    assert!(out.contains(r#""name":"events","partitions":1"#), "{out}");
    // Published, read by the long poll and by SSE (an event with the message id), delivered to
    // the group and acked, then deleted.
    let id = out
        .split(r#"{"messageId":""#)
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the publish answered a message id");
    assert!(
        out.contains(&format!(r#"[{{"messageId":"{id}","partition":0"#)),
        "{out}"
    );
    assert!(out.contains(&format!("id: {id}\ndata: ")), "{out}");
    assert!(
        out.contains(&format!(r#"{{"messageId":"{id}-workers"}}"#)),
        "{out}"
    );
    assert!(out.trim_end().ends_with("204"), "{out}");
}

/// The block with each of its loopback addresses (`127.0.0.1:70xx`) on a free port instead
/// (the block's own may be taken here).
fn on_free_ports(script: &str) -> String {
    let mut ports = BTreeMap::new();
    for (i, _) in script.match_indices("127.0.0.1:70") {
        let addr = &script[i..i + "127.0.0.1:7070".len()];
        ports.entry(addr.to_string()).or_insert(0);
    }
    let free = node_support::cluster::free_ports(ports.len());
    for (port, (_, p)) in free.into_iter().zip(ports.iter_mut()) {
        *p = port;
    }
    let mut script = script.to_string();
    for (addr, port) in &ports {
        script = script.replace(addr, &format!("127.0.0.1:{port}"));
    }
    script
}

#[test]
fn the_secured_block_runs_as_written() {
    let script = on_free_ports(&block("secured"));
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(&script, dir.path(), &[]);
    assert!(ok, "the secured block failed:\n{out}\n{err}");
    assert!(out.contains("cluster ready: 3 nodes"), "{out}");
    let token = std::fs::read_to_string(dir.path().join("alice.token")).unwrap();
    assert!(token.trim().starts_with("tern_"), "{token}");
    // The publish's ack (payments/<partition>@<offset>), then the record read back.
    assert!(
        out.lines()
            .any(|l| l.starts_with("payments/") && l.contains('@')),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("payments/") && l.ends_with("paid")),
        "{out}"
    );
    assert!(out.contains("refused: alice may not delete"), "{out}");
    assert!(err.contains("PermissionDenied"), "{err}");
    assert!(out.contains("refused: no token"), "{out}");
    assert!(err.contains("Unauthenticated"), "{err}");
}

#[test]
fn the_cluster_block_runs_as_written() {
    let script = on_free_ports(&block("cluster"));
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = run(&script, dir.path(), &[]);
    assert!(ok, "the cluster block failed:\n{out}\n{err}");
    assert!(out.contains("cluster ready: 3 nodes"), "{out}");
    assert!(out.contains("cluster ready: 4 nodes"), "{out}");
    assert!(
        out.contains("created topic orders with 3 partitions, replication factor 3"),
        "{out}"
    );
    assert!(out.contains("orders/"), "{out}");
    assert!(out.contains("node 1 removed"), "{out}");
    // Node 1 stopped on its own, saying why.
    assert!(err.contains("node 1 was removed from the cluster"), "{err}");
    // The last command read the first record through the joined node.
    let last = out.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("orders/") && last.ends_with("hello"),
        "{out}"
    );
}
