//! The deployment files are checked by the tools that consume them: the Kubernetes manifests by
//! `kubernetes-validate --strict` (and a broken one is refused), the Prometheus config and
//! alerts by `promtool`, the Grafana dashboard's expressions by `promtool` too, and every
//! metric the dashboard and alerts name is one docs/operations.md lists.

mod node_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use node_support::tools::tool;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn check(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const MANIFESTS: [&str; 4] = [
    "configmap.yaml",
    "service.yaml",
    "statefulset.yaml",
    "pdb.yaml",
];

#[test]
fn kubernetes_manifests_validate_and_a_broken_one_does_not() {
    let validate = tool("kubernetes-validate");
    let dir = Path::new(ROOT).join("deploy/k8s");
    let (ok, out) = check(
        Command::new(&validate)
            .arg("--strict")
            .args(MANIFESTS.iter().map(|m| dir.join(m))),
    );
    assert!(ok, "{out}");
    assert_eq!(out.matches("passed").count(), 5, "{out}");
    // Every manifest is listed in the kustomization.
    let kustomization = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    for m in MANIFESTS {
        assert!(kustomization.contains(m), "{m}");
    }
    // The validator does fail: a misspelt field in a copy of the StatefulSet.
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.yaml");
    let sts = std::fs::read_to_string(dir.join("statefulset.yaml")).unwrap();
    std::fs::write(&broken, sts.replacen("replicas: 3", "replica: 3", 1)).unwrap();
    let (ok, out) = check(Command::new(&validate).arg("--strict").arg(&broken));
    assert!(!ok, "a misspelt field passed: {out}");
}

/// Metric names (`tern_...`) in a PromQL expression, without histogram suffixes.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("tern_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        i = end;
    }
    out
}

/// The metric names docs/operations.md lists in its table.
fn documented() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/operations.md")).unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `tern_"))
        .filter_map(|l| l.split('`').next())
        .map(|n| format!("tern_{n}"))
        .collect()
}

#[test]
fn prometheus_config_alerts_and_the_dashboard_are_valid_and_name_documented_metrics() {
    let promtool = tool("promtool");
    let deploy = Path::new(ROOT).join("deploy");
    let (ok, out) = check(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(deploy.join("prometheus/prometheus.yml")),
    );
    assert!(ok, "{out}");
    let (ok, out) = check(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(deploy.join("prometheus/alerts.yml")),
    );
    assert!(ok, "{out}");

    // Every dashboard expression parses: promtool checks them as recording rules.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy.join("grafana/tern.json")).unwrap())
            .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "tern");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(exprs.len() >= 15, "{}", exprs.len());
    let rules = serde_json::json!({
        "groups": [{
            "name": "dashboard",
            "rules": exprs.iter().enumerate().map(|(i, e)| serde_json::json!({
                "record": format!("dashboard:expr_{i}"),
                "expr": e,
            })).collect::<Vec<_>>(),
        }]
    });
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dashboard.rules.json");
    std::fs::write(&file, rules.to_string()).unwrap();
    let (ok, out) = check(Command::new(&promtool).args(["check", "rules"]).arg(&file));
    assert!(ok, "{out}");
    // And a broken expression is caught the same way.
    std::fs::write(
        &file,
        r#"{"groups":[{"name":"x","rules":[{"record":"x:y","expr":"sum(rate(tern_x[1m])"}]}]}"#,
    )
    .unwrap();
    assert!(!check(Command::new(&promtool).args(["check", "rules"]).arg(&file)).0);

    // Only documented metrics.
    let docs = documented();
    assert!(docs.len() >= 25, "{docs:?}");
    let alerts = std::fs::read_to_string(deploy.join("prometheus/alerts.yml")).unwrap();
    let mut named = metric_names(&alerts);
    for e in &exprs {
        named.extend(metric_names(e));
    }
    let unknown: Vec<_> = named.difference(&docs).collect();
    assert!(unknown.is_empty(), "not in docs/operations.md: {unknown:?}");
}

#[test]
fn the_compose_file_parses() {
    let compose = if Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok()
    {
        Command::new("docker-compose")
    } else {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    };
    let mut compose = compose;
    let (ok, out) = check(
        compose
            .current_dir(Path::new(ROOT).join("deploy"))
            .args(["config", "-q"]),
    );
    assert!(ok, "{out}");
}
