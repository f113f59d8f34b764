//! Generates the client side of Tern's public API (`proto/tern/v1`) with a vendored protoc,
//! so a build needs only Rust. Only the client: a program using this crate carries no server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_protos(&["../proto/tern/v1/tern.proto"], &["../proto"])?;
    println!("cargo:rerun-if-changed=../proto/tern/v1");
    Ok(())
}
