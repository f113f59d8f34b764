//! Reading a partition for a group: the stream-mode reader that feeds one member one partition,
//! and the reads both modes make (from the local replica or another node's).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{down, Out, Result};
use crate::broker::{Broker, BrokerError, Origin, Read};
use crate::proto::v1 as pb;
use crate::proto::v1::consume_response::Kind as Down;
use crate::shard::StartAt;
use crate::types::Offset;

/// Bytes per read.
const READ_BYTES: usize = 1 << 20;
/// Long poll of a reader.
pub const READ_WAIT: Duration = Duration::from_secs(1);
/// A stream reader's position before it knows where it starts.
pub const NOT_STARTED: u64 = u64::MAX;
/// Wait after a failed read.
const RETRY: Duration = Duration::from_millis(200);

/// Where a partition without a committed position starts: its first record, or its end.
pub async fn start_offset(
    broker: &Broker,
    topic: &str,
    partition: u32,
    latest: bool,
) -> Result<u64> {
    let t = broker.topic(topic)?;
    let at = if latest {
        StartAt::Latest
    } else {
        StartAt::Earliest
    };
    Ok(broker
        .list_offsets(&t, partition, at, &Origin::default())
        .await?
        .offset
        .0)
}

/// Reads a partition from `at`; moves into the range if retention passed `at`.
pub async fn read(
    broker: &Broker,
    topic: &str,
    partition: u32,
    at: u64,
    max_records: u32,
    max_wait: Duration,
) -> Result<pb::FetchResponse> {
    let t = broker.topic(topic)?;
    let read = Read {
        from: Offset(at),
        max_records: max_records as usize,
        max_bytes: READ_BYTES,
        max_wait,
        raw: false,
    };
    match broker.read(&t, partition, read, &Origin::default()).await {
        // Deleted by retention: go on from the first record still stored.
        Err(e) if e.range().is_some_and(|(start, _)| at < start) => {
            let start = e.range().map_or(at, |(s, _)| s);
            Ok(pb::FetchResponse {
                records: vec![],
                next_offset: start,
                high_watermark: start,
                start_offset: start,
                batches: Vec::new(),
                mirror: None,
            })
        }
        r => Ok(r?),
    }
}

/// A partition's range, as the describe of a group shows it: (start, end).
pub async fn bounds(
    broker: &Broker,
    topic: &str,
    partition: u32,
) -> Result<(u64, u64), BrokerError> {
    let t = broker.topic(topic)?;
    let o = broker
        .list_offsets(&t, partition, StartAt::Latest, &Origin::default())
        .await?;
    Ok((o.start.0, o.end.0))
}

/// Stream mode: reads one partition for one member, from `start` (else the start or end of
/// the partition), and sends its records down the member's stream (waiting while it is full).
/// `delivered` tells the coordinator how far it got.
pub struct StreamReader {
    pub broker: Arc<Broker>,
    pub topic: String,
    pub partition: u32,
    pub start: Option<u64>,
    pub latest: bool,
    pub max_records: u32,
    pub out: Out,
    pub delivered: Arc<AtomicU64>,
}

impl StreamReader {
    pub async fn run(self) {
        let p = self.partition;
        let mut at = match self.start {
            Some(o) => o,
            None => loop {
                match start_offset(&self.broker, &self.topic, p, self.latest).await {
                    Ok(o) => break o,
                    Err(e) => {
                        tracing::debug!(topic = self.topic, partition = p, "group reader: {e}")
                    }
                }
                tokio::time::sleep(RETRY).await;
            },
        };
        self.delivered.store(at, Ordering::Release);
        let assigned = down(Down::Assigned(pb::Assigned {
            partitions: vec![pb::PartitionOffset {
                partition: p,
                offset: at,
            }],
        }));
        if self.out.send(assigned).await.is_err() {
            return;
        }
        // The first read does not wait: a partition that starts with control records only
        // (Raft's, never delivered) tells the member at once where it continues, so the member
        // can commit past them.
        let mut wait = Duration::ZERO;
        loop {
            match read(&self.broker, &self.topic, p, at, self.max_records, wait).await {
                Ok(r) => {
                    let next = r.next_offset.max(at);
                    // Records, or a move past control records only (so the member can commit
                    // the partition's end).
                    if !r.records.is_empty() || next > at {
                        let msg = down(Down::Deliveries(pb::Deliveries {
                            deliveries: r
                                .records
                                .into_iter()
                                .filter(|rec| rec.offset >= at)
                                .map(|rec| pb::Delivery {
                                    record: Some(rec),
                                    delivery_count: 0,
                                })
                                .collect(),
                            partition: p,
                            next_offset: next,
                        }));
                        if self.out.send(msg).await.is_err() {
                            return;
                        }
                    }
                    at = next;
                    self.delivered.store(at, Ordering::Release);
                }
                Err(e) => {
                    tracing::debug!(topic = self.topic, partition = p, "group reader: {e}");
                    tokio::time::sleep(RETRY).await;
                }
            }
            wait = READ_WAIT;
        }
    }
}
