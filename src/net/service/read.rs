//! Reads: Fetch, FetchStream and ListOffsets (Subscribe is in `net::subscribe`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tonic::Status;

use super::BoxStream;
use crate::broker::{Broker, BrokerError, Origin, Read, Topic};
use crate::net::auth::{Auth, Caller};
use crate::net::quota::Cost;
use crate::net::status::from_broker;
use crate::net::subscribe::{revoked, until_true};
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

/// What a Fetch asks, checked: the topic and the read, its limits clamped.
fn read_of(
    broker: &Broker,
    r: &pb::FetchRequest,
    origin: &Origin,
) -> Result<(Arc<Topic>, Read), Status> {
    let t = broker.topic(&r.topic).map_err(from_broker)?;
    if r.topic_uid != 0 && r.topic_uid != t.spec.uid.0 {
        return Err(if origin.relayed() {
            // Another node relayed it with its view of the topic: one of the two has not
            // applied the topic's deletion or creation yet; another replica (or a retry) may
            // serve it.
            Status::unavailable(format!(
                "this node's metadata has another topic {:?} (uid {}) than the relaying \
                 node's ({}); retry",
                r.topic, t.spec.uid.0, r.topic_uid
            ))
        } else {
            Status::failed_precondition(format!(
                "topic {:?} is not the one asked for (uid {}, asked {}): it was deleted and \
                 created again",
                r.topic, t.spec.uid.0, r.topic_uid
            ))
        });
    }
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
    Ok((t, read))
}

/// Serves a Fetch: from this node's replica, or relayed (once) to a node that has one.
pub async fn fetch(
    broker: &Arc<Broker>,
    r: pb::FetchRequest,
    origin: &Origin,
) -> Result<pb::FetchResponse, Status> {
    let (t, read) = read_of(broker, &r, origin)?;
    broker
        .read(&t, r.partition, read, origin)
        .await
        .map_err(from_broker)
}

/// Answers a FetchStream may hold ready before the client takes them (each up to the byte
/// budget asked for); the stream reads on once the client has taken one.
const FETCH_STREAM_AHEAD: usize = 1;
/// A FetchStream's long poll when the request names none, and the least it may ask: each poll
/// that finds nothing is answered (empty), so a shorter one would only send empty answers.
const FETCH_STREAM_WAIT_DEFAULT: Duration = Duration::from_millis(500);
const FETCH_STREAM_WAIT_MIN: Duration = Duration::from_millis(100);

/// Serves a FetchStream: the Fetch `r` asked again and again, each from where the last answer
/// ended, every answer sent as soon as it is read. A long poll that finds nothing is answered
/// too (no records, the partition's end): the client learns the stream is alive and how far the
/// partition goes. Ends with the first failed read (its status, as Fetch answers it), when the
/// client goes away, when the node shuts down, the topic is deleted, or the caller may no longer
/// read the topic. Checked before the stream starts: a bad request is refused at once.
pub fn fetch_stream(
    broker: Arc<Broker>,
    auth: Arc<Auth>,
    caller: Caller,
    r: pb::FetchRequest,
) -> Result<BoxStream<pb::FetchResponse>, Status> {
    let (topic, mut read) = read_of(&broker, &r, &caller.origin())?;
    read.max_wait = match r.max_wait_ms {
        0 => FETCH_STREAM_WAIT_DEFAULT,
        _ => read.max_wait.max(FETCH_STREAM_WAIT_MIN),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(FETCH_STREAM_AHEAD);
    let partition = r.partition;
    tokio::spawn(async move {
        let origin = caller.origin();
        let mut closing = broker.closing();
        let (name, uid) = (topic.spec.name.clone(), topic.spec.uid);
        // What ends the stream besides a read: the client gone (None), the node shutting down
        // or the caller's access revoked (Some: told to the client). Raced against every wait,
        // a send to a client that stopped reading included.
        let stop = |closing: &mut tokio::sync::watch::Receiver<bool>| {
            let (broker, auth, caller, name, tx) = (&broker, &auth, &caller, &name, &tx);
            let mut closing = closing.clone();
            async move {
                tokio::select! {
                    // A revoked ACL ends an idle stream too, not only at its next read.
                    status = revoked(broker, auth, caller, name) => Some(status),
                    _ = tx.closed() => None,
                    _ = until_true(&mut closing) => Some(Status::unavailable("the node is shutting down")),
                }
            }
        };
        let why: Option<Status> = 'stream: loop {
            let topic = match broker.topic(&name) {
                Ok(t) if t.spec.uid == uid => t,
                Err(BrokerError::NotReady { .. }) => topic.clone(),
                _ => {
                    let gone = format!("topic {name:?} was deleted; this stream of it ends");
                    break Some(Status::not_found(gone));
                }
            };
            let answer = tokio::select! {
                a = broker.read(&topic, partition, read, &origin) => a.map_err(from_broker),
                why = stop(&mut closing) => break why,
            };
            let answer = match answer {
                Ok(a) => a,
                Err(status) => break Some(status),
            };
            read.from = Offset(answer.next_offset.max(read.from.0));
            let (end, start) = (answer.high_watermark, answer.start_offset);
            if !caller.relayed {
                super::count_read(&answer.records);
            }
            // Each read is a request, and its bytes are consumed, as a Fetch's.
            let mut pause = auth.quotas.read_wait(&broker, &caller, || Cost {
                requests: 1,
                consume_bytes: answered(&answer),
                ..Cost::default()
            });
            tokio::select! {
                sent = tx.send(Ok(answer)) => if sent.is_err() { break None },
                why = stop(&mut closing) => break why,
            }
            // Held back by the caller's quota: empty answers meanwhile, one per long poll, so
            // the client does not take the stream for dead.
            while !pause.is_zero() {
                let step = pause.min(read.max_wait);
                tokio::select! {
                    _ = tokio::time::sleep(step) => {}
                    why = stop(&mut closing) => break 'stream why,
                }
                pause -= step;
                if pause.is_zero() {
                    break;
                }
                let alive = pb::FetchResponse {
                    next_offset: read.from.0,
                    high_watermark: end,
                    start_offset: start,
                    ..Default::default()
                };
                tokio::select! {
                    sent = tx.send(Ok(alive)) => if sent.is_err() { break 'stream None },
                    why = stop(&mut closing) => break 'stream why,
                }
            }
        };
        if let Some(status) = why {
            tokio::select! {
                biased;
                _ = tx.send(Err(status)) => {}
                _ = stop(&mut closing) => {}
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// The bytes a Fetch answer hands over, as consume quotas count them: its records, or its
/// stored batches (a mirror's pull).
pub fn answered(r: &pb::FetchResponse) -> u64 {
    bytes(&r.records) + r.batches.iter().map(|b| b.len() as u64).sum::<u64>()
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
