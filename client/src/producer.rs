//! The idempotent producer: batching, routing to leaders, retrying without duplicates.
//!
//! ```text
//! send(topic, record) ─▶ room (max_buffered) ─▶ partition (explicit, key hash, sticky) ─▶
//!   per-partition worker: gather ≤ linger / records / bytes ─▶ sequence numbers ─▶
//!   Publish to the leader ─┬─ acks ─▶ each record's AckFuture
//!                          └─ retryable failure ─▶ leader hint or new layout, backoff, resend
//!                                                  the same request (same sequence numbers)
//! ```
//!
//! A partition has one request in flight at a time: its sequence numbers then reach the
//! leader in order, and a resend is answered with the offsets of what was already written.
//! If a request is given up (past [`ProducerOptions::retry_for`], or refused for good), its
//! records are failed and the partition continues under a fresh producer id, so later records
//! are neither refused as out of order nor confused with the failed ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::client::Client;
use crate::error::{retryable, Error};
use crate::proto as pb;

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
}

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            linger: Duration::from_millis(5),
            max_batch_records: 500,
            max_batch_bytes: 512 << 10,
            max_buffered: 10_000,
            retry_for: Duration::from_secs(60),
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
                let w = Worker {
                    client: self.inner.client.clone(),
                    options: self.inner.options.clone(),
                    topic: topic.to_string(),
                    partition,
                    partitions,
                    sticky: self.sticky(topic),
                    producer_id: self.inner.producer_id,
                    sequence: 0,
                };
                tokio::spawn(w.run(rx));
                tx
            })
            .clone()
    }
}

/// Sends one partition's records, in order, one request at a time.
struct Worker {
    client: Client,
    options: ProducerOptions,
    topic: String,
    partition: u32,
    /// The topic's partitions when the worker started (for the sticky partitioner).
    partitions: u32,
    sticky: Arc<AtomicU32>,
    /// 0 until the first request (and again after a request was given up).
    producer_id: u64,
    sequence: u32,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Work>) {
        let mut held: Option<Work> = None;
        loop {
            let first = match held.take() {
                Some(w) => w,
                None => match rx.recv().await {
                    Some(w) => w,
                    None => return,
                },
            };
            let first = match first {
                Work::Flush(done) => {
                    let _ = done.send(());
                    continue;
                }
                Work::Record(p) => p,
            };
            // Gather what else comes within the linger, up to the request's limits.
            let o = &self.options;
            let mut bytes = first.record.size();
            let mut batch = vec![first];
            let until = tokio::time::Instant::now() + o.linger;
            while batch.len() < o.max_batch_records {
                let next = match rx.try_recv() {
                    Ok(w) => w,
                    Err(_) => match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(w)) => w,
                        _ => break,
                    },
                };
                match next {
                    Work::Record(p) if bytes + p.record.size() <= o.max_batch_bytes => {
                        bytes += p.record.size();
                        batch.push(p);
                    }
                    other => {
                        // Too big for this request, or a flush: after it.
                        held = Some(other);
                        break;
                    }
                }
            }
            // Records without key or partition move on to the next partition.
            let keyless = batch
                .iter()
                .any(|p| p.record.key.is_none() && p.record.partition.is_none());
            if keyless {
                let _ = self.sticky.compare_exchange(
                    self.partition,
                    (self.partition + 1) % self.partitions.max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            let result = self.publish(&batch).await;
            match result {
                Ok(offsets) => {
                    for (p, offset) in batch.into_iter().zip(offsets) {
                        let _ = p.reply.send(Ok(Ack {
                            partition: self.partition,
                            offset,
                        }));
                    }
                }
                Err(e) => {
                    for p in batch {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Publishes `batch` as one idempotent request, resending it unchanged while failures are
    /// retryable; the offsets, one per record. After any failure the partition goes on under a
    /// new producer id: what the failed request left written (if anything) cannot be confused
    /// with what follows.
    async fn publish(&mut self, batch: &[Pending]) -> Result<Vec<u64>, Error> {
        let r = self.try_publish(batch).await;
        if r.is_err() {
            self.producer_id = 0;
        }
        r
    }

    async fn try_publish(&mut self, batch: &[Pending]) -> Result<Vec<u64>, Error> {
        let client = self.client.clone();
        let retry_for = self.options.retry_for;
        let start = Instant::now();
        if self.producer_id == 0 || u64::from(self.sequence) + batch.len() as u64 > SEQUENCE_MAX {
            self.producer_id = client.init_producer(retry_for).await?;
            self.sequence = 0;
        }
        let req = pb::PublishRequest {
            topic: self.topic.clone(),
            records: batch
                .iter()
                .map(|p| pb::PublishRecord {
                    key: p.record.key.clone(),
                    value: p.record.value.clone(),
                    headers: p
                        .record
                        .headers
                        .iter()
                        .map(|(k, v)| pb::Header {
                            key: k.clone(),
                            value: v.clone(),
                        })
                        .collect(),
                    partition: Some(self.partition),
                    expiry_seconds: None,
                })
                .collect(),
            request_id: 0,
            producer_id: self.producer_id,
            sequence: self.sequence,
        };
        let mut backoff = BACKOFF_MIN;
        // Whether a try may have been written: a later refusal then does not mean "nothing".
        let mut maybe_written = false;
        loop {
            let grpc = client
                .leader_addr(&self.topic, self.partition)
                .ok_or_else(|| tonic::Status::unavailable("no node known"))
                .and_then(|addr| {
                    client
                        .node(&addr)
                        .map_err(|e| tonic::Status::unavailable(e.to_string()))
                });
            let status = match grpc {
                Err(s) => s,
                Ok(mut c) => match c.publish(req.clone()).await {
                    Ok(r) => {
                        let acks = r.into_inner().acks;
                        if acks.len() != batch.len() {
                            return Err(Error::GaveUp {
                                after: start.elapsed(),
                                last: format!(
                                    "the node answered {} acks for {} records (the records may have been written)",
                                    acks.len(),
                                    batch.len()
                                ),
                            });
                        }
                        self.sequence += batch.len() as u32;
                        return Ok(acks.into_iter().map(|a| a.offset).collect());
                    }
                    Err(s) => {
                        maybe_written |= !s.metadata().contains_key("tern-unwritten");
                        s
                    }
                },
            };
            client.failed(&self.topic, self.partition, &status).await;
            let hinted = crate::error::leader_hint(&status).is_some();
            let given_up = if !retryable(&status) && maybe_written {
                Some(Error::GaveUp {
                    after: start.elapsed(),
                    last: format!(
                        "{}: {} (an earlier try may have been written)",
                        status.code(),
                        status.message()
                    ),
                })
            } else if !retryable(&status) {
                Some(Error::Status(status))
            } else if start.elapsed() >= retry_for {
                Some(Error::GaveUp {
                    after: start.elapsed(),
                    last: format!("{}: {}", status.code(), status.message()),
                })
            } else {
                None
            };
            if let Some(e) = given_up {
                return Err(e);
            }
            // A named leader is tried soon; otherwise wait a little longer each time.
            if hinted {
                tokio::time::sleep(BACKOFF_MIN).await;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
