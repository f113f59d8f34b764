//! Generates the gRPC code from `proto/` with a vendored protoc, so a build needs only Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .bytes(".")
        .file_descriptor_set_path(out.join("tern_descriptor.bin"))
        .compile_protos(
            &[
                "proto/tern/v1/tern.proto",
                "proto/tern/internal/v1/peer.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
