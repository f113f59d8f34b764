//! The layers are checked, not hoped for: every `crate::` path in `src/` must point at a
//! module at or below the layer of the module it is written in. The order (see
//! docs/architecture.md, "Import rules"):
//!
//! ```text
//! types, proto, metrics → tls → log → raft → shard → cluster → config → broker → controller
//!   → groups → net → admin → node → cli
//! ```
//!
//! A `super::` path that climbs out of a top-level module counts as a `crate::` path.

use std::path::{Path, PathBuf};

/// Top-level modules, lowest first; modules on one line share a layer.
const LAYERS: &[&[&str]] = &[
    &["types", "proto", "metrics"],
    &["tls"],
    &["log"],
    &["raft"],
    &["shard"],
    &["cluster"],
    &["config"],
    &["broker"],
    &["mirror"],
    &["controller"],
    &["groups"],
    &["net"],
    &["admin"],
    &["node"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for `lib.rs`, `main.rs`).
fn owner(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// How deep a file sits inside its top-level module (`super` climbs this many levels before
/// leaving it): `src/x.rs` and `src/x/mod.rs` are 0, `src/x/y.rs` is 1, and so on.
fn depth(src: &Path, file: &Path) -> usize {
    let rel = file.strip_prefix(src).unwrap();
    let parts = rel.components().count();
    let is_mod = file.file_name().is_some_and(|n| n == "mod.rs");
    parts.saturating_sub(1 + usize::from(is_mod))
}

/// Every top-level module a file names through `crate::` (also inside `crate::{a, b}`) or
/// through `super::` chains that leave its own module.
fn imports(text: &str, depth: usize) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((n + 1, name));
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push((n + 1, name));
            }
            rest = after;
        }
        let mut rest = code;
        while let Some(i) = rest.find("super::") {
            let mut after = &rest[i..];
            let mut climbs = 0;
            while let Some(a) = after.strip_prefix("super::") {
                climbs += 1;
                after = a;
            }
            // Inline modules (`mod tests { use super::*; }`) climb one more level than the
            // file: only a name that is a top-level module counts as leaving it.
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if climbs > depth && layer(&name).is_some() {
                found.push((n + 1, name));
            }
            rest = &rest[i + "super::".len() * climbs.max(1)..];
        }
    }
    found
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    for file in &files {
        let Some(module) = owner(&src, file) else {
            continue;
        };
        let Some(own) = layer(&module) else {
            unknown.push(format!("{}: module {module} has no layer", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, target) in imports(&text, depth(&src, file)) {
            match layer(&target) {
                Some(l) if l > own => wrong.push(format!(
                    "{}:{line}: {module} imports {target}, a layer above it",
                    file.display()
                )),
                Some(_) => {}
                None => unknown.push(format!(
                    "{}:{line}: {target} is no top-level module with a layer",
                    file.display()
                )),
            }
        }
    }
    assert!(unknown.is_empty(), "{}", unknown.join("\n"));
    assert!(
        wrong.is_empty(),
        "imports that point up:\n{}",
        wrong.join("\n")
    );
}

/// The checker itself: an upward import in a sample is found, a downward one is not.
#[test]
fn the_checker_finds_upward_imports() {
    let sample = "use crate::log::Log;\nuse crate::{net, types::Offset};\n// crate::cli\n";
    let names: Vec<String> = imports(sample, 0).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["log", "net", "types"]);
    let nested = "use super::super::groups::Groups;\nuse super::Local;\n";
    let names: Vec<String> = imports(nested, 1).into_iter().map(|(_, n)| n).collect();
    assert_eq!(names, ["groups"]);
    assert!(layer("net") > layer("broker"));
}
