//! Tern's Rust client.
//!
//! - [`Client`]: knows the cluster from `ClusterInfo` (nodes, regions, each partition's
//!   replicas and leader; a node names the leaders of its own replicas, so the holders of
//!   the other partitions are asked too) and sends each call to the node that can answer it without a hop:
//!   a partition's publishes to its leader, reads to a replica in the client's region. It
//!   learns again when a node answers UNAVAILABLE (with the `tern-leader` it names, or by
//!   asking the cluster anew).
//! - [`Producer`]: idempotent publishing with batching and automatic retry. Records are
//!   grouped per partition (up to [`ProducerOptions::linger`], a record and byte limit per
//!   request), each partition's requests go out in order on one stream to its leader, a few at
//!   a time ([`ProducerOptions::max_in_flight`]), the partitions in parallel, and a
//!   bounded number of records wait for acknowledgment ([`ProducerOptions::max_buffered`];
//!   `send` waits for room). Every request carries the producer id and per-partition sequence
//!   numbers, so a request sent again after a timeout, a lost connection or a leader change is
//!   written once: no loss, no duplicates.
//! - [`Subscription`]: the records of a topic's partitions in order, from a start position,
//!   resumed from the next offset of every partition on another node when its call ends.
//!
//! ```no_run
//! # async fn example() -> Result<(), tern_client::Error> {
//! use tern_client::{Client, ClientOptions, Producer, ProducerOptions, Record, Start};
//!
//! let client = Client::connect(["127.0.0.1:7070"], ClientOptions::default()).await?;
//! let producer = Producer::new(&client, ProducerOptions::default()).await?;
//! let ack = producer.send("orders", Record::new("hello").key("customer-7")).await?;
//! let ack = ack.await?; // durable on a quorum of the partition's replicas
//! println!("partition {} offset {}", ack.partition, ack.offset);
//!
//! let mut sub = client.subscribe("orders", Start::Earliest).await?;
//! while let Some(record) = sub.next().await {
//!     let record = record?;
//!     println!("{} {:?}", record.offset, record.value);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - [`GroupConsumer`]: a member of a consumer group (each partition to one member, positions
//!   committed) or a queue group (each record to one member at a time, acknowledged), which
//!   joins again through another node when its call ends.
//!
//! ```no_run
//! # async fn example(client: tern_client::Client) -> Result<(), tern_client::Error> {
//! use tern_client::{GroupMode, GroupOptions};
//!
//! let mut member = client.join_group("billing", "orders", GroupOptions::default()).await?;
//! while let Some(m) = member.next().await {
//!     let m = m?; // the one before it counts as consumed; positions are committed each second
//!     println!("{}/{} {:?}", m.record.partition, m.record.offset, m.record.value);
//! }
//!
//! let options = GroupOptions { mode: GroupMode::Queue, ..GroupOptions::default() };
//! let mut worker = client.join_group("mailers", "emails", options).await?;
//! while let Some(m) = worker.next().await {
//!     let m = m?;
//!     worker.ack(&m).await?; // or nack(&m, delay): delivered again, dead-lettered at last
//! }
//! # Ok(())
//! # }
//! ```
//!
//! TLS and mTLS: [`ClientOptions::tls`] with a [`Tls`] (the CA, a client certificate); a
//! bearer token: [`ClientOptions::token`].

mod client;
mod error;
mod group;
mod layout;
mod producer;
mod subscription;

/// The generated types and client of Tern's public API (`proto/tern/v1/tern.proto`).
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tern.v1");
}

pub use client::{Client, ClientOptions, Tls};
pub use error::Error;
pub use group::{GroupConsumer, GroupMode, GroupOptions, Message};
pub use producer::{Ack, AckFuture, Producer, ProducerOptions, Record};
pub use subscription::{Start, Subscription};

/// The partition a keyed record goes to, as the nodes compute it: FNV-1a (64-bit) of the key,
/// modulo the number of partitions.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_where_the_nodes_send_them() {
        // FNV-1a's published values: "" and "a".
        assert_eq!(
            partition_for_key(b"", u32::MAX),
            (0xcbf29ce484222325u64 % u64::from(u32::MAX)) as u32
        );
        assert_eq!(
            partition_for_key(b"a", 7),
            (0xaf63dc4c8601ec8cu64 % 7) as u32
        );
        assert_eq!(partition_for_key(b"anything", 1), 0);
        assert_eq!(partition_for_key(b"anything", 0), 0);
    }
}
