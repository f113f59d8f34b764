//! Generated gRPC code for `proto/`.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("tern.v1");
}

/// The node-to-node protocol (`proto/tern/internal/v1/peer.proto`).
pub mod internal {
    tonic::include_proto!("tern.internal.v1");
}

/// The thesis seed's `broker.Broker` (`proto/broker/thesis/broker.proto`), on the main port.
pub mod thesis {
    include!(concat!(env!("OUT_DIR"), "/thesis/broker.rs"));
}

/// The Raft seeds' `broker.Broker` (`proto/broker/seed/broker.proto`), on `--compat-listen`.
pub mod seed {
    include!(concat!(env!("OUT_DIR"), "/seed/broker.rs"));
}

/// The encoded file descriptor sets, for gRPC server reflection: `tern.v1` (the node-to-node
/// protocol is left out on purpose), and each seed service's.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tern_descriptor");
pub const THESIS_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("thesis_descriptor");
pub const SEED_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("seed_descriptor");

/// Metadata keys Tern puts on requests and statuses (the protocol between nodes and with
/// clients, beside the messages). Parsed into typed errors where they arrive; no control flow
/// reads them elsewhere.
pub mod metadata {
    /// On a request a node relays to another: the other does not relay it again.
    pub const FORWARDED: &str = "tern-forwarded";
    /// On a status: the node id of the partition's leader, when the answering node knows it.
    pub const LEADER: &str = "tern-leader";
    /// On a status: the request was not carried out at all; sending it again cannot duplicate.
    pub const UNWRITTEN: &str = "tern-unwritten";
    /// On a status: the calling node was removed from the cluster.
    pub const REMOVED: &str = "tern-removed";
    /// On an OUT_OF_RANGE status: the partition's range, `START-END`.
    pub const OFFSET_RANGE: &str = "tern-offset-range";
    /// On a request: `Bearer <token>`, the caller's credentials.
    pub const AUTHORIZATION: &str = "authorization";
    /// On a request a node relays: the principal the first node authenticated. Trusted only
    /// from a node that proved itself with a cluster certificate.
    pub const PRINCIPAL: &str = "tern-principal";
    /// On a request from a node: the id of the cluster it belongs to.
    pub const CLUSTER: &str = "tern-cluster";
    /// On a Consume call a node relays to the group coordinator: send records without their
    /// keys, headers and values; the relaying node reads them near the member
    /// (`groups::edge`).
    pub const REFERENCES: &str = "tern-references";
    /// On a RESOURCE_EXHAUSTED status for a client over its quota: milliseconds to wait.
    pub const RETRY_AFTER_MS: &str = "retry-after-ms";
}
