//! The idempotent producer: batching, routing to leaders, retrying without duplicates.
//!
//! ```text
//! send(topic, record) ─▶ room (max_buffered) ─▶ partition (explicit, key hash, sticky) ─▶
//!   per-partition worker: gather ≤ linger / records / bytes ─▶ sequence numbers ─▶
//!   PublishStream to the leader, ≤ max_in_flight requests ─┬─ acks, in order ─▶ AckFutures
//!     └─ retryable failure ─▶ leader hint or new layout, backoff, a new stream, the whole
//!                             window sent again in order (same sequence numbers)
//! ```
//!
//! A partition's requests travel in order on one stream, so their sequence numbers reach the
//! leader in order, and a resend is answered with the offsets of what was already written
//! (the nodes remember a producer's last 8 batches per partition; the window is at most 8).
//! If a request is given up (past [`ProducerOptions::retry_for`], or refused for good), its
//! records are failed and the partition continues under a fresh producer id, so later records
//! are neither refused as out of order nor confused with the failed ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::client::Client;
use crate::error::Error;
use worker::Worker;

mod worker;

/// Settings of a [`Producer`].
#[derive(Clone, Debug)]
pub struct ProducerOptions {
    /// How long a partition's first waiting record waits for others to share its request.
    pub linger: Duration,
    /// Records per request at most (1 to 10,000).
    pub max_batch_records: usize,
    /// Bytes of keys and values per request at most (a record larger than this goes alone).
    pub max_batch_bytes: usize,
    /// Records sent and not yet acknowledged, over all partitions; `send` waits for room.
    pub max_buffered: usize,
    /// How long a request is retried before its records fail with [`Error::GaveUp`].
    pub retry_for: Duration,
    /// Requests per partition sent and not yet answered (1 to 8; 1: one at a time). While
    /// the window is full, the next request gathers records.
    pub max_in_flight: usize,
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            linger: Duration::from_millis(5),
            max_batch_records: 500,
            max_batch_bytes: 512 << 10,
            max_buffered: 10_000,
            retry_for: Duration::from_secs(60),
            max_in_flight: 5,
        }
    }
}

/// A record to publish.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<(String, Bytes)>,
    /// The partition; `None`: the key's hash, or (without a key) the partition the producer is
    /// filling for this topic.
    pub partition: Option<u32>,
    /// Hidden from readers this many seconds after it is written.
    pub expiry_seconds: Option<u32>,
}

impl Record {
    pub fn new(value: impl Into<Bytes>) -> Record {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    pub fn key(mut self, key: impl Into<Bytes>) -> Record {
        self.key = Some(key.into());
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Record {
        self.headers.push((key.into(), value.into()));
        self
    }

    pub fn partition(mut self, p: u32) -> Record {
        self.partition = Some(p);
        self
    }

    /// Hides the record from readers `seconds` after it is written.
    pub fn expiry_seconds(mut self, seconds: u32) -> Record {
        self.expiry_seconds = Some(seconds);
        self
    }

    /// Bytes it adds to a request: its fields, and a little for their framing.
    fn size(&self) -> usize {
        16 + self.key.as_ref().map_or(0, Bytes::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Where a record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub partition: u32,
    pub offset: u64,
}

/// Resolves once the record is acknowledged (durable on a quorum of its partition's
/// replicas) or has failed.
pub struct AckFuture {
    rx: oneshot::Receiver<Result<Ack, Error>>,
}

impl std::future::Future for AckFuture {
    type Output = Result<Ack, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}

/// Who waits for a sent record: its sender's answer, and the room it holds.
struct Waiting {
    reply: oneshot::Sender<Result<Ack, Error>>,
    _room: OwnedSemaphorePermit,
}

/// A record on its way, with what answers its sender and holds its room.
struct Pending {
    record: Record,
    reply: oneshot::Sender<Result<Ack, Error>>,
    _room: OwnedSemaphorePermit,
}

enum Work {
    Record(Pending),
    /// Answered once everything queued before it is settled.
    Flush(oneshot::Sender<()>),
}

/// Records queued per partition worker (beyond that, `send` waits).
const WORKER_QUEUE: usize = 1024;
/// The largest `max_batch_bytes` (a node refuses requests over its `max_request_bytes`,
/// 16 MiB by default).
const BATCH_BYTES_MAX: usize = 8 << 20;
/// Sequence numbers a producer id may use in a partition (the nodes take 0..=i32::MAX).
const SEQUENCE_MAX: u64 = i32::MAX as u64;
/// Requests of a partition in flight at most: the nodes remember each producer's last 8
/// batches per partition, so a resend of any request in the window is recognised.
const IN_FLIGHT_MAX: usize = 8;
/// Times a request refused as out of order is sent again (a node that forwards requests it
/// does not lead may let one overtake another).
const REORDERED_MAX: u32 = 3;
/// How long a partition's stream stays open with nothing on its way.
const STREAM_IDLE: Duration = Duration::from_secs(5);
/// How often a stream opened to a node not known to lead its partition (the leader was not
/// known yet, or not reachable) looks whether the leader is known now.
const LEADER_LOOK: Duration = Duration::from_secs(1);
/// How often a stream opened to the leader looks whether another node leads now. A node that
/// stopped leading passes the requests on to the new leader without an error, so nothing
/// else would tell.
const LEADER_RELOOK: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// An idempotent producer. Cheap to clone; clones share batches and sequence numbers.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Shared>,
}

struct Shared {
    client: Client,
    /// The id every partition starts under (sequence numbers are per partition).
    producer_id: u64,
    options: ProducerOptions,
    room: Arc<Semaphore>,
    workers: Mutex<HashMap<(String, u32), mpsc::Sender<Work>>>,
    /// Per topic: the partition records without key or partition go to now.
    sticky: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

impl Producer {
    /// A producer with its own producer id (asked of the cluster).
    pub async fn new(client: &Client, options: ProducerOptions) -> Result<Producer, Error> {
        if !(1..=10_000).contains(&options.max_batch_records) {
            return Err(Error::Invalid("max_batch_records must be 1..=10000".into()));
        }
        if !(1..=IN_FLIGHT_MAX).contains(&options.max_in_flight) {
            return Err(Error::Invalid(format!(
                "max_in_flight must be 1..={IN_FLIGHT_MAX}"
            )));
        }
        if !(1..=BATCH_BYTES_MAX).contains(&options.max_batch_bytes) || options.max_buffered == 0 {
            return Err(Error::Invalid(format!(
                "max_batch_bytes must be 1..={BATCH_BYTES_MAX} and max_buffered at least 1"
            )));
        }
        let producer_id = client.init_producer(options.retry_for).await?;
        Ok(Producer {
            inner: Arc::new(Shared {
                client: client.clone(),
                producer_id,
                room: Arc::new(Semaphore::new(options.max_buffered)),
                options,
                workers: Mutex::default(),
                sticky: Mutex::default(),
            }),
        })
    }

    /// Queues `record` for `topic` (waiting while `max_buffered` records are unacknowledged);
    /// the returned future resolves to where it was written.
    pub async fn send(&self, topic: &str, record: Record) -> Result<AckFuture, Error> {
        let partitions = self.inner.client.partitions(topic).await?;
        if partitions == 0 {
            return Err(Error::NoTopic(topic.to_string()));
        }
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p >= partitions => {
                return Err(Error::Invalid(format!(
                    "topic {topic:?} has {partitions} partitions; there is no partition {p}"
                )))
            }
            (Some(p), _) => p,
            (None, Some(k)) => crate::partition_for_key(k, partitions),
            (None, None) => self.sticky(topic).load(Ordering::Relaxed) % partitions,
        };
        let room = self
            .inner
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Closed)?;
        let (reply, rx) = oneshot::channel();
        let worker = self.worker(topic, partition, partitions);
        worker
            .send(Work::Record(Pending {
                record,
                reply,
                _room: room,
            }))
            .await
            .map_err(|_| Error::Closed)?;
        Ok(AckFuture { rx })
    }

    /// Waits until every record sent before the call is acknowledged or has failed.
    pub async fn flush(&self) {
        let workers: Vec<mpsc::Sender<Work>> = self
            .inner
            .workers
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for w in workers {
            let (tx, rx) = oneshot::channel();
            if w.send(Work::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    fn sticky(&self, topic: &str) -> Arc<AtomicU32> {
        self.inner
            .sticky
            .lock()
            .unwrap()
            .entry(topic.to_string())
            .or_default()
            .clone()
    }

    fn worker(&self, topic: &str, partition: u32, partitions: u32) -> mpsc::Sender<Work> {
        let mut workers = self.inner.workers.lock().unwrap();
        workers
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(WORKER_QUEUE);
                // The worker holds no reference to the producer: once every clone of it is
                // dropped, the queues close and the workers end after what they hold.
                let w = Worker::new(
                    self.inner.client.clone(),
                    self.inner.options.clone(),
                    (topic.to_string(), partition, partitions),
                    self.sticky(topic),
                    self.inner.producer_id,
                );
                tokio::spawn(w.run(rx));
                tx
            })
            .clone()
    }
}
