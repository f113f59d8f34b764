//! One partition's worker: its window of requests on a PublishStream to the leader, answers
//! in order, retries with the same sequence numbers, and moving the stream to a new leader.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::{
    Ack, Pending, ProducerOptions, Waiting, Work, BACKOFF_MAX, BACKOFF_MIN, IN_FLIGHT_MAX,
    LEADER_LOOK, LEADER_RELOOK, REORDERED_MAX, SEQUENCE_MAX, STREAM_IDLE,
};
use crate::client::Client;
use crate::error::{retryable, Error};
use crate::proto as pb;

/// A request of the partition's window: sent (or waiting to be sent again) and not settled.
struct InFlight {
    /// Its `request_id` on the stream (the same on every resend).
    id: u64,
    req: pb::PublishRequest,
    /// Its records' senders, in order (the records themselves are in `req`).
    waiting: Vec<Waiting>,
    /// When it was first sent (`None`: not yet): retries count from here.
    first_sent: Option<Instant>,
    /// When it was last sent: its answer is due `request_timeout` later.
    sent: tokio::time::Instant,
    /// Whether a try may have been written (a later refusal then does not mean "nothing").
    maybe_written: bool,
    /// Out-of-order refusals so far.
    reordered: u32,
}

/// A PublishStream to the partition's leader.
struct Conn {
    tx: mpsc::Sender<pb::PublishRequest>,
    rx: tonic::Streaming<pb::PublishResponse>,
    _slot: crate::client::StreamSlot,
    /// The node it is open to (0: a node the layout does not name).
    node: u64,
    /// That node leads the partition as far as the client knows.
    to_leader: bool,
}

/// Sends one partition's records in order: up to `max_in_flight` requests on one
/// PublishStream to the leader, answered in order.
///
/// When a request fails and a retry may help, the stream is dropped and every request of the
/// window is sent again, in order, with its sequence numbers, on a new stream: what was
/// already written is answered with its offsets. When a request is given up, its records
/// fail; if it may have been written, so do the requests after it (their fate is as unknown);
/// otherwise those were refused as out of order, and are sent again under a fresh producer id.
pub(super) struct Worker {
    client: Client,
    options: ProducerOptions,
    topic: String,
    partition: u32,
    /// The topic's partitions when the worker started (for the sticky partitioner).
    partitions: u32,
    sticky: Arc<AtomicU32>,
    /// 0 until the first request (and again after a request was given up).
    producer_id: u64,
    /// The next request's first sequence number.
    sequence: u32,
    next_id: u64,
    window: VecDeque<InFlight>,
    /// Answers that came before those of requests ahead of them.
    answers: HashMap<u64, Result<Vec<u64>, tonic::Status>>,
    conn: Option<Conn>,
    /// After a failure: when the window is sent again.
    retry_at: Option<tokio::time::Instant>,
    backoff: Duration,
    /// When a request was last settled: the stream closes [`STREAM_IDLE`] later if none is
    /// on its way.
    active: tokio::time::Instant,
    /// Requests of the window (from its head) sent on the current stream.
    sent: usize,
    /// Only the head is sent until it is acknowledged: at first, and after any failure. A
    /// node that forwards requests to the leader may let one overtake another, and a leader
    /// that does not know a producer yet takes its first request whatever its sequence
    /// numbers; so the first request of a producer id, and a resend, go alone.
    careful: bool,
    /// When the stream's node was last compared with the partition's leader.
    looked: tokio::time::Instant,
    /// The leader is another node: nothing more is sent on this stream; once its window is
    /// answered it closes, and the next request opens a stream to the leader (requests on
    /// two streams at once could overtake each other).
    moving: bool,
}

impl Worker {
    pub(super) fn new(
        client: Client,
        options: ProducerOptions,
        (topic, partition, partitions): (String, u32, u32),
        sticky: Arc<AtomicU32>,
        producer_id: u64,
    ) -> Worker {
        Worker {
            client,
            options,
            topic,
            partition,
            partitions,
            sticky,
            producer_id,
            sequence: 0,
            next_id: 1,
            window: VecDeque::new(),
            answers: HashMap::new(),
            conn: None,
            retry_at: None,
            backoff: BACKOFF_MIN,
            active: tokio::time::Instant::now(),
            sent: 0,
            careful: true,
            looked: tokio::time::Instant::now(),
            moving: false,
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Work>) {
        let max_records = self.options.max_batch_records;
        let mut forming: Vec<Pending> = Vec::new();
        let mut forming_bytes = 0;
        let mut until = tokio::time::Instant::now();
        let mut held: Option<Pending> = None;
        // Flushes waiting for every request with an id below theirs to settle.
        let mut flushes: Vec<(u64, oneshot::Sender<()>)> = Vec::new();
        let mut closed = false;
        loop {
            self.follow_leader();
            let settled_below = self.window.front().map_or(self.next_id, |r| r.id);
            let (settled, waiting) = std::mem::take(&mut flushes)
                .into_iter()
                .partition(|(bound, _)| *bound <= settled_below);
            flushes = waiting;
            for (_, done) in settled {
                let _ = done.send(());
            }
            if forming.is_empty() {
                if let Some(p) = held.take() {
                    forming_bytes = p.record.size();
                    forming.push(p);
                    until = tokio::time::Instant::now() + self.options.linger;
                }
            }
            let room = self.window.len() < self.options.max_in_flight
                && self.retry_at.is_none()
                && !self.moving;
            let full = forming.len() >= max_records || held.is_some() || closed;
            if !forming.is_empty() && room && (full || tokio::time::Instant::now() >= until) {
                forming_bytes = 0;
                self.send_new(std::mem::take(&mut forming)).await;
                continue;
            }
            if closed && forming.is_empty() && held.is_none() && self.window.is_empty() {
                for (_, done) in flushes {
                    let _ = done.send(());
                }
                return;
            }
            let answer_due = self.window.front().map_or(until, |r| {
                r.sent + self.client.inner.options.request_timeout
            });
            let answering = self.conn.is_some() && !self.window.is_empty();
            let idle = self.conn.is_some() && self.window.is_empty();
            tokio::select! {
                biased;
                answer = next_answer(&mut self.conn), if answering => self.on_answer(answer).await,
                _ = tokio::time::sleep_until(answer_due), if answering => {
                    self.failed(tonic::Status::deadline_exceeded(
                        "no answer to a publish within the request timeout",
                    ))
                    .await
                }
                _ = tokio::time::sleep_until(self.retry_at.unwrap_or(until)), if self.retry_at.is_some() => {
                    self.resend().await
                }
                work = rx.recv(), if !closed && held.is_none() && forming.len() < max_records => {
                    match work {
                        None => closed = true,
                        Some(Work::Flush(done)) => {
                            // Sent without waiting for the linger.
                            until = tokio::time::Instant::now();
                            flushes.push((self.next_id + u64::from(!forming.is_empty()), done));
                        }
                        Some(Work::Record(p)) => {
                            let size = p.record.size();
                            if !forming.is_empty() && forming_bytes + size > self.options.max_batch_bytes {
                                held = Some(p);
                            } else {
                                if forming.is_empty() {
                                    until = tokio::time::Instant::now() + self.options.linger;
                                }
                                forming_bytes += size;
                                forming.push(p);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(until), if !forming.is_empty() && room => {}
                // A partition that stopped receiving records gives its stream back.
                _ = tokio::time::sleep_until(self.active + STREAM_IDLE), if idle => self.conn = None,
            }
        }
    }

    /// Moves the stream to the partition's leader when it is open to another node: a forwarded
    /// request costs the forwarding node as much as the leader. Looks every [`LEADER_LOOK`]
    /// (or [`LEADER_RELOOK`] on a stream opened to the leader), reading the layout again in
    /// the background for the next look; a stream to move is closed once its window is
    /// answered.
    fn follow_leader(&mut self) {
        let Some(conn) = &mut self.conn else {
            self.moving = false;
            return;
        };
        let every = if conn.to_leader {
            LEADER_RELOOK
        } else {
            LEADER_LOOK
        };
        let now = tokio::time::Instant::now();
        if !self.moving && now >= self.looked + every {
            self.looked = now;
            match self.client.leader(&self.topic, self.partition) {
                Some(l) if l != conn.node => self.moving = true,
                Some(_) => conn.to_leader = true,
                // The layout may not know (ClusterInfo names the leaders of the answering
                // node's replicas only): the stream stays where it is.
                None => {}
            }
            // At most one background read per 10 s for all of the client's partitions.
            self.client.refresh_soon(LEADER_RELOOK);
        }
        if self.moving && self.window.is_empty() {
            self.conn = None;
            self.moving = false;
        }
    }

    /// Gives `batch` the next sequence numbers and sends it (opening a stream if there is
    /// none).
    async fn send_new(&mut self, batch: Vec<Pending>) {
        // The id is taken first: a flush waiting for it is answered even if the batch fails
        // before it is sent.
        let id = self.next_id;
        self.next_id += 1;
        if self.producer_id == 0 || u64::from(self.sequence) + batch.len() as u64 > SEQUENCE_MAX {
            match self.client.init_producer(self.options.retry_for).await {
                Ok(id) => {
                    self.producer_id = id;
                    self.sequence = 0;
                    // The first request under an id goes alone (see `careful`).
                    self.careful = true;
                }
                Err(e) => {
                    for p in batch {
                        let _ = p.reply.send(Err(e.clone()));
                    }
                    return;
                }
            }
        }
        // Records without key or partition move on to the next partition.
        if batch
            .iter()
            .any(|p| p.record.key.is_none() && p.record.partition.is_none())
        {
            let _ = self.sticky.compare_exchange(
                self.partition,
                (self.partition + 1) % self.partitions.max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let (req, waiting) = self.request(id, batch);
        self.sequence += waiting.len() as u32;
        self.window.push_back(InFlight {
            id,
            req,
            waiting,
            first_sent: None,
            sent: tokio::time::Instant::now(),
            maybe_written: false,
            reordered: 0,
        });
        if self.conn.is_some() {
            self.transmit().await;
        } else {
            self.open().await;
        }
    }

    /// Sends the window's requests not yet sent on the stream, in order: all of them, or
    /// while `careful` only the head.
    async fn transmit(&mut self) {
        let Some(conn) = &self.conn else {
            return;
        };
        let limit = if self.careful { 1 } else { self.window.len() };
        let now = tokio::time::Instant::now();
        let mut closed = false;
        while self.sent < limit.min(self.window.len()) {
            let r = &mut self.window[self.sent];
            r.sent = now;
            r.first_sent.get_or_insert_with(Instant::now);
            // The channel holds a whole window (at most IN_FLIGHT_MAX).
            if conn.tx.try_send(r.req.clone()).is_err() {
                closed = true;
                break;
            }
            self.sent += 1;
        }
        if closed {
            self.failed(tonic::Status::unavailable("the publish stream closed"))
                .await;
        }
    }

    /// The request carrying `batch`'s records (moved into it), and what waits for them.
    fn request(&self, id: u64, batch: Vec<Pending>) -> (pb::PublishRequest, Vec<Waiting>) {
        let mut waiting = Vec::with_capacity(batch.len());
        let records = batch
            .into_iter()
            .map(|p| {
                waiting.push(Waiting {
                    reply: p.reply,
                    _room: p._room,
                });
                let r = p.record;
                pb::PublishRecord {
                    key: r.key,
                    value: r.value,
                    headers: r
                        .headers
                        .into_iter()
                        .map(|(key, value)| pb::Header { key, value })
                        .collect(),
                    partition: Some(self.partition),
                    expiry_seconds: r.expiry_seconds,
                }
            })
            .collect();
        let req = pb::PublishRequest {
            topic: self.topic.clone(),
            records,
            request_id: id,
            producer_id: self.producer_id,
            sequence: self.sequence,
        };
        (req, waiting)
    }

    /// Opens a stream to the partition's leader and sends the whole window on it, in order.
    async fn open(&mut self) {
        let leader = self.client.leader(&self.topic, self.partition);
        if leader.is_none() {
            // Just created, or after an election: the stream opens at a replica (which
            // passes the requests on), and moves once a read of the layout names the leader.
            self.client.refresh_soon(Duration::from_millis(200));
        }
        let target = self.client.leader_addr(&self.topic, self.partition);
        let node_id = target.as_ref().map_or(0, |(id, _)| *id);
        let to_leader = leader.is_some_and(|l| l == node_id);
        let node = match target {
            None => Err(tonic::Status::unavailable("no node known")),
            Some((_, addr)) => self
                .client
                .stream_node(&addr)
                .map_err(|e| tonic::Status::unavailable(e.to_string())),
        }
        .map_err(unwritten);
        let (mut grpc, slot) = match node {
            Ok(n) => n,
            Err(s) => return self.failed(s).await,
        };
        let (tx, rx) = mpsc::channel(IN_FLIGHT_MAX);
        let timeout = self.client.inner.options.request_timeout;
        let opened = tokio::time::timeout(
            timeout,
            grpc.publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
        )
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(
                "the node did not open a publish stream within the request timeout",
            ))
        })
        // Requests go on the stream only once it is open: nothing was sent.
        .map_err(unwritten);
        match opened {
            Ok(r) => {
                self.conn = Some(Conn {
                    tx,
                    rx: r.into_inner(),
                    _slot: slot,
                    node: node_id,
                    to_leader,
                });
                self.looked = tokio::time::Instant::now();
                self.moving = false;
                self.sent = 0;
                self.transmit().await;
            }
            Err(s) => self.failed(s).await,
        }
    }

    /// After a failure's backoff: sends the window again (under a fresh producer id if the
    /// last one was given up).
    async fn resend(&mut self) {
        self.retry_at = None;
        if self.window.is_empty() {
            return;
        }
        if self.producer_id == 0 {
            match self.client.init_producer(self.options.retry_for).await {
                Ok(id) => {
                    self.producer_id = id;
                    self.sequence = 0;
                    for r in &mut self.window {
                        r.req.producer_id = id;
                        r.req.sequence = self.sequence;
                        self.sequence += r.waiting.len() as u32;
                    }
                }
                Err(e) => {
                    for r in self.window.drain(..) {
                        for p in r.waiting {
                            let _ = p.reply.send(Err(e.clone()));
                        }
                    }
                    return;
                }
            }
        }
        self.open().await;
    }

    async fn on_answer(&mut self, answer: Option<Result<pb::PublishResponse, tonic::Status>>) {
        let resp = match answer {
            None => {
                return self
                    .failed(tonic::Status::unavailable(
                        "the node ended the publish stream",
                    ))
                    .await
            }
            Some(Err(s)) => return self.failed(s).await,
            Some(Ok(r)) => r,
        };
        if !self.window.iter().any(|r| r.id == resp.request_id) {
            return;
        }
        let result = match resp.error {
            Some(e) => {
                // The metadata a unary call's status would carry.
                let mut s = tonic::Status::new(tonic::Code::from(e.code), e.message);
                if e.unwritten {
                    s = unwritten(s);
                }
                if let Ok(v) = tonic::metadata::MetadataValue::try_from(e.leader.to_string()) {
                    if e.leader != 0 {
                        s.metadata_mut().insert(crate::error::LEADER, v);
                    }
                }
                Err(s)
            }
            None => Ok(resp.acks.into_iter().map(|a| a.offset).collect()),
        };
        self.answers.insert(resp.request_id, result);
        // Settle the window's head while its answer is here.
        while let Some(head) = self.window.front() {
            let Some(result) = self.answers.remove(&head.id) else {
                break;
            };
            match result {
                Ok(offsets) if offsets.len() == head.waiting.len() => {
                    let head = self.window.pop_front().expect("a head");
                    for (p, offset) in head.waiting.into_iter().zip(offsets) {
                        let _ = p.reply.send(Ok(Ack {
                            partition: self.partition,
                            offset,
                        }));
                    }
                    self.backoff = BACKOFF_MIN;
                    self.active = tokio::time::Instant::now();
                    self.sent = self.sent.saturating_sub(1);
                    self.careful = false;
                }
                Ok(offsets) => {
                    let n = head.waiting.len();
                    self.give_up(Error::GaveUp {
                        after: since(head.first_sent),
                        last: format!(
                            "the node answered {} acks for {n} records (the records may have been written)",
                            offsets.len()
                        ),
                    }, true);
                    return;
                }
                Err(s) => return self.failed(s).await,
            }
        }
        self.transmit().await;
    }

    /// Drops the stream and what it answered; the next one starts with the head alone.
    fn drop_stream(&mut self) {
        self.conn = None;
        self.answers.clear();
        self.sent = 0;
        self.careful = true;
    }

    /// The window's head (or its stream) failed with `status`: the window is sent again
    /// after a backoff, or the head is given up.
    async fn failed(&mut self, status: tonic::Status) {
        // What was sent behind the head went on being handled by the node after the head
        // failed: its fate is unknown.
        for r in self.window.iter_mut().take(self.sent).skip(1) {
            r.maybe_written = true;
        }
        self.drop_stream();
        self.client
            .failed(&self.topic, self.partition, &status)
            .await;
        let Some(head) = self.window.front_mut() else {
            return;
        };
        let out_of_order = status.code() == tonic::Code::FailedPrecondition
            && status.message().starts_with("out-of-order sequence");
        if out_of_order {
            head.reordered += 1;
        } else if retryable(&status) {
            // A refusal (a status no retry can change) means nothing of this try was
            // written; a retryable failure without `tern-unwritten` may have been.
            head.maybe_written |= !status.metadata().contains_key(crate::error::UNWRITTEN);
        }
        let retry = retryable(&status) || (out_of_order && head.reordered <= REORDERED_MAX);
        // A head that was never sent (no node, no stream) starts its retry clock now.
        let after = head.first_sent.get_or_insert_with(Instant::now).elapsed();
        if retry && after < self.options.retry_for {
            // A named leader is tried soon; otherwise wait a little longer each time.
            let delay = if crate::error::leader_hint(&status).is_some() {
                BACKOFF_MIN
            } else {
                let d = self.backoff;
                self.backoff = (d * 2).min(BACKOFF_MAX);
                d
            };
            self.retry_at = Some(tokio::time::Instant::now() + delay);
            return;
        }
        let maybe_written = head.maybe_written;
        let e = if maybe_written {
            Error::GaveUp {
                after,
                last: format!(
                    "{}: {} (an earlier try may have been written)",
                    status.code(),
                    status.message()
                ),
            }
        } else if !retryable(&status) {
            Error::Status(status)
        } else {
            Error::GaveUp {
                after,
                last: format!("{}: {}", status.code(), status.message()),
            }
        };
        self.give_up(e, maybe_written);
    }

    /// Fails the window's head with `e`. If it may have been written, the requests after it
    /// fail too; otherwise those that may have been written (sent on a stream that failed)
    /// fail, and the rest, never written, are sent again under a fresh producer id: what the
    /// failed request left cannot be confused with what follows.
    fn give_up(&mut self, e: Error, maybe_written: bool) {
        self.drop_stream();
        self.producer_id = 0;
        self.backoff = BACKOFF_MIN;
        let Some(head) = self.window.pop_front() else {
            return;
        };
        for p in head.waiting {
            let _ = p.reply.send(Err(e.clone()));
        }
        let (fail, keep): (VecDeque<InFlight>, VecDeque<InFlight>) = self
            .window
            .drain(..)
            .partition(|r| maybe_written || r.maybe_written);
        self.window = keep;
        for r in fail {
            let e = Error::GaveUp {
                after: since(r.first_sent),
                last: "a request sent before it on the partition was given up, and this one \
                       may have been written"
                    .into(),
            };
            for p in r.waiting {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
        if !self.window.is_empty() {
            self.retry_at = Some(tokio::time::Instant::now());
        }
    }
}

/// `s`, marked as a failure before anything was sent.
fn unwritten(mut s: tonic::Status) -> tonic::Status {
    s.metadata_mut().insert(
        crate::error::UNWRITTEN,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    s
}

/// How long since a request was first sent (zero if it was not).
fn since(first_sent: Option<Instant>) -> Duration {
    first_sent.map_or(Duration::ZERO, |t| t.elapsed())
}

/// The next answer on the stream (never called without one).
async fn next_answer(
    conn: &mut Option<Conn>,
) -> Option<Result<pb::PublishResponse, tonic::Status>> {
    match conn {
        Some(c) => c.rx.message().await.transpose(),
        None => std::future::pending().await,
    }
}
