//! Generated gRPC code for `proto/`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("tern.v1");
}

/// The node-to-node protocol (`proto/tern/internal/v1/peer.proto`).
pub mod internal {
    tonic::include_proto!("tern.internal.v1");
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tern_descriptor");
