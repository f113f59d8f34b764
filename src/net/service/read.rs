//! Reads: Fetch and ListOffsets (Subscribe is in `net::subscribe`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tonic::Status;

use crate::broker::{Broker, Origin, Read};
use crate::net::status::from_broker;
use crate::net::validate;
use crate::proto::v1 as pb;
use crate::types::Offset;

/// Default and largest number of records one Fetch returns.
const FETCH_RECORDS_DEFAULT: usize = 500;
const FETCH_RECORDS_MAX: usize = 10_000;
/// Default and largest byte budget of one Fetch.
const FETCH_BYTES_DEFAULT: usize = 1 << 20;
const FETCH_BYTES_MAX: usize = 16 << 20;
/// Partitions one ListOffsets asks at once.
const LIST_OFFSETS_PARALLEL: usize = 32;

/// Serves a Fetch: from this node's replica, or relayed (once) to a node that has one.
pub async fn fetch(
    broker: &Arc<Broker>,
    r: pb::FetchRequest,
    origin: &Origin,
) -> Result<pb::FetchResponse, Status> {
    let t = broker.topic(&r.topic).map_err(from_broker)?;
    t.check_partition(r.partition).map_err(from_broker)?;
    let read = Read {
        from: Offset(r.offset),
        max_records: match r.max_records as usize {
            0 => FETCH_RECORDS_DEFAULT,
            n => n.min(FETCH_RECORDS_MAX),
        },
        max_bytes: match r.max_bytes as usize {
            0 => FETCH_BYTES_DEFAULT,
            n => n.min(FETCH_BYTES_MAX),
        },
        max_wait: Duration::from_millis(
            (r.max_wait_ms as u64).min(broker.config.max_fetch_wait_ms),
        ),
        raw: r.raw_batches,
    };
    broker
        .read(&t, r.partition, read, origin)
        .await
        .map_err(from_broker)
}

/// Serves a ListOffsets: each partition from this node's replica, or from another (once).
pub async fn list_offsets(
    broker: &Arc<Broker>,
    r: pb::ListOffsetsRequest,
    origin: &Origin,
) -> Result<pb::ListOffsetsResponse, Status> {
    let t = broker.topic(&r.topic).map_err(from_broker)?;
    let at = validate::start_at(r.position.as_ref())?;
    let parts: Vec<u32> = if r.partitions.is_empty() {
        (0..t.spec.partitions).collect()
    } else {
        r.partitions
    };
    for p in &parts {
        t.check_partition(*p).map_err(from_broker)?;
    }
    let asks = futures::stream::iter(parts.into_iter().map(|p| {
        let t = t.clone();
        async move {
            let o = broker
                .list_offsets(&t, p, at, origin)
                .await
                .map_err(from_broker)?;
            Ok(pb::PartitionOffsets {
                partition: p,
                start_offset: o.start.0,
                end_offset: o.end.0,
                offset: o.offset.0,
                leader: o.follower_of.map_or(0, |n| n.0),
            })
        }
    }));
    let answers: Vec<Result<pb::PartitionOffsets, Status>> =
        asks.buffered(LIST_OFFSETS_PARALLEL).collect().await;
    Ok(pb::ListOffsetsResponse {
        partitions: answers.into_iter().collect::<Result<_, _>>()?,
    })
}

/// The bytes of records read, as consume quotas count them.
pub fn bytes(records: &[pb::Record]) -> u64 {
    records
        .iter()
        .map(|r| super::payload_bytes(r.key.as_ref(), &r.value, &r.headers))
        .sum::<usize>() as u64
}
