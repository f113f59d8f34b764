//! Generates the gRPC code from `proto/` with a vendored protoc, so a build needs only Rust.
//!
//! Four passes, because the two seed services share a package (`broker`) with different
//! messages, and because only the public services go into the descriptor sets that reflection
//! serves (the node-to-node protocol is not listed to clients).

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let pass = |file: &str, include: &str, dir: &Path, descriptor: Option<&str>| {
        std::fs::create_dir_all(dir)?;
        let mut b = tonic_prost_build::configure().bytes(".").out_dir(dir);
        if let Some(name) = descriptor {
            b = b.file_descriptor_set_path(out.join(name));
        }
        b.compile_protos(&[file], &[include])
    };
    pass(
        "proto/tern/v1/tern.proto",
        "proto",
        &out,
        Some("tern_descriptor.bin"),
    )?;
    pass("proto/tern/internal/v1/peer.proto", "proto", &out, None)?;
    pass(
        "proto/broker/thesis/broker.proto",
        "proto/broker/thesis",
        &out.join("thesis"),
        Some("thesis_descriptor.bin"),
    )?;
    pass(
        "proto/broker/seed/broker.proto",
        "proto/broker/seed",
        &out.join("seed"),
        Some("seed_descriptor.bin"),
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
