//! Tools the tests use beyond Rust (promtool, kubernetes-validate), installed on first use by
//! `scripts/test-tools`. A test that needs one fails when it cannot be had: nothing is
//! skipped.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The path of `tool`, installing it first if needed. (Found from the crate that includes
/// this file, the workspace root or a member of it such as loadgen.)
pub fn tool(tool: &str) -> PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|d| d.join("scripts/test-tools"))
        .find(|p| p.exists())
        .expect("scripts/test-tools in the workspace");
    let out = Command::new(script)
        .arg(tool)
        .output()
        .expect("scripts/test-tools runs");
    assert!(
        out.status.success(),
        "scripts/test-tools {tool} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// One HTTP/1.1 GET: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// The counter `name` (no labels) of the node whose admin listener is `admin` (0: absent).
pub fn counter(admin: &str, name: &str) -> u64 {
    let (_, body) = http_get(admin, "/metrics").expect("scrape");
    sample(&body, name, &[]).map_or(0, |v| v as u64)
}

/// The value of the sample `name{labels}` in a Prometheus text exposition, where the sample
/// has at least the labels given.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}
