//! Third-party clients on a three-node cluster (`tests/clients/`): Python grpcio clients of the
//! two seeds' services, generated here from the seeds' own protos with grpcio-tools, and a
//! client that learns `tern.v1` by reflection alone and reads large records with gRPC's
//! default 4 MiB limit. Each call goes through another node, so forwarding is exercised.

mod node_support;

use std::path::Path;
use std::process::Command;

use node_support::cluster::Cluster;
use node_support::tools::tool;

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");

/// Generates Python stubs from `tests/clients/<seed>/broker.proto` into `out`.
fn generate(python: &Path, seed: &str, out: &Path) {
    let src = Path::new(CLIENTS).join(seed);
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(src.join("broker.proto"), out.join("broker.proto")).unwrap();
    let status = Command::new(python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(out)
        .arg("--python_out")
        .arg(out)
        .arg("--grpc_python_out")
        .arg(out)
        .arg(out.join("broker.proto"))
        .status()
        .expect("grpc_tools.protoc runs");
    assert!(status.success(), "grpc_tools.protoc failed for {seed}");
}

/// Runs a client script; fails the test with its output unless it passes.
fn client(python: &Path, script: &str, args: &[String]) {
    let out = Command::new(python)
        .arg(Path::new(CLIENTS).join(script))
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("== {script}\n{text}");
    assert!(
        out.status.success() && text.contains("\nOK"),
        "{script} failed:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn third_party_clients_run_unchanged_on_a_three_node_cluster() {
    let python = tool("grpcio");
    let cluster = Cluster::start_with(3, &["--compat-listen", "127.0.0.1:0"]).await;
    let nodes: Vec<_> = cluster.nodes.iter().flatten().collect();
    let main = nodes
        .iter()
        .map(|n| n.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let compat = nodes
        .iter()
        .map(|n| {
            n.compat
                .clone()
                .expect("--compat-listen prints its address")
        })
        .collect::<Vec<_>>()
        .join(",");
    let gen = cluster.tmp.path().join("generated");

    generate(&python, "thesis", &gen.join("thesis"));
    client(
        &python,
        "thesis_client.py",
        &[gen.join("thesis").display().to_string(), main.clone()],
    );

    generate(&python, "seed", &gen.join("seed"));
    client(
        &python,
        "seed_client.py",
        &[gen.join("seed").display().to_string(), compat],
    );

    client(&python, "reflection_client.py", std::slice::from_ref(&main));

    client(&python, "rest_client.py", std::slice::from_ref(&main));

    // The OpenAPI description against the server: no 5xx, every response as described, and
    // input it calls invalid refused. It creates and deletes topics (an "orders" to start).
    let first = main.split(',').next().unwrap();
    let (ok, _, err) =
        node_support::tern(first, &["topic", "create", "orders", "--partitions", "2"]);
    assert!(ok, "{err}");
    let schemathesis = tool("schemathesis");
    let out = Command::new(schemathesis)
        .arg("run")
        .arg(format!("http://{first}/openapi.json"))
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,negative_data_rejection",
            "--max-examples",
            "100",
            "--workers",
            "1",
            "--seed",
            "1",
        ])
        .current_dir(cluster.tmp.path())
        .output()
        .expect("schemathesis runs");
    let text = String::from_utf8_lossy(&out.stdout);
    println!(
        "== schemathesis\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "schemathesis found failures");
    assert!(
        text.contains(" passed") && !text.contains("failure"),
        "schemathesis ran no test or failed"
    );
}

/// REST carries the same credentials as gRPC: `Authorization: Bearer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_needs_a_token_when_authentication_is_on() {
    let python = tool("grpcio");
    let tmp = tempfile::tempdir().unwrap();
    let token = "tern_rest_bootstrap_token_for_the_test";
    let file = tmp.path().join("token");
    std::fs::write(&file, token).unwrap();
    let node = node_support::TestNode::start(
        &tmp.path().join("n1"),
        &[
            "--auth",
            "required",
            "--bootstrap-token-file",
            file.to_str().unwrap(),
        ],
    );
    client(
        &python,
        "rest_auth.py",
        &[node.addr.clone(), token.to_string()],
    );
}
