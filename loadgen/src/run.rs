//! One load run: consumers subscribe first, producers publish on schedule (open loop) or as
//! fast as acknowledgements allow (closed loop), then everything acknowledged is waited for.
//!
//! Open loop: record `i` of a producer is due at `start + i / rate`; its latency is measured
//! from that due time, not from when it was sent, so a stalled broker shows up as latency
//! instead of as fewer samples (no coordinated omission, as wrk2).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tern::cli::{Client, SecurityOpts};
use tern::proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::accounting::Ledger;
use crate::payload::{self, Stamp};
use crate::settings::Settings;

/// Publish requests one open-loop producer keeps in flight at most (bounds memory; a broker
/// slower than the schedule shows up as latency).
const OPEN_LOOP_REQUESTS_MAX: usize = 4096;
/// Acknowledged records waiting for their delivery from a mirror, at most (the rest of a long
/// run is not timed).
const ACKED_AT_MAX: usize = 4 << 20;
/// How long to wait for acknowledged records to be delivered after the load stops.
const DRAIN: Duration = Duration::from_secs(15);

pub struct Shared {
    pub publish: Mutex<Histogram<u64>>,
    pub e2e: Mutex<Histogram<u64>>,
    pub ledger: Mutex<Ledger>,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Acknowledged records that were due inside the measured window.
    pub acked_measured: AtomicU64,
    pub delivered: AtomicU64,
    /// Measurement starts here (after warm-up)...
    pub measure_from: Instant,
    pub measure_from_wall_us: u64,
    /// ...and load stops here.
    pub end: Instant,
    pub start: Instant,
    wall_at_start_us: u64,
    /// Per partition, the last successful acknowledgment; and the longest time between two of
    /// them inside the measured window: how long a partition took no writes (failover).
    last_ack: Mutex<BTreeMap<(String, u32), Instant>>,
    pub longest_gap: Mutex<Duration>,
    /// Requests an idempotent producer sent again, by the status of the failed try, with the
    /// first message seen for each status.
    pub retried: Mutex<BTreeMap<String, (u64, String)>>,
    /// The first message of each status in `errors`.
    pub first_errors: Mutex<BTreeMap<String, String>>,
    /// When consumers read mirrors: from each measured record's acknowledgment (in the source's
    /// region) to its delivery from a mirror, which bounds the mirror's lag from above.
    pub mirrored: Option<Mutex<Mirrored>>,
}

/// Acknowledgment times of records not delivered yet, and the time from each acknowledgment to
/// the delivery.
pub struct Mirrored {
    /// (producer, seq) → when acknowledged, on the `wall_us` scale.
    acked_at: HashMap<(u32, u64), u64>,
    /// Records delivered before their acknowledgment arrived (no lag to count).
    early: std::collections::HashSet<(u32, u64)>,
    pub ack_to_delivery: Histogram<u64>,
}

impl Shared {
    fn wall_us(&self, at: Instant) -> u64 {
        self.wall_at_start_us + at.saturating_duration_since(self.start).as_micros() as u64
    }

    fn error(&self, status: &tonic::Status, records: u64) {
        let code = format!("{:?}", status.code());
        self.first_errors
            .lock()
            .unwrap()
            .entry(code.clone())
            .or_insert_with(|| status.message().to_string());
        *self.errors.lock().unwrap().entry(code).or_default() += records;
    }

    fn retry(&self, status: &tonic::Status) {
        self.retried
            .lock()
            .unwrap()
            .entry(format!("{:?}", status.code()))
            .or_insert_with(|| (0, status.message().to_string()))
            .0 += 1;
    }

    /// A subscription that failed (counted per failure, under "subscribe CODE").
    fn stream_error(&self, status: &tonic::Status) {
        *self
            .errors
            .lock()
            .unwrap()
            .entry(format!("subscribe {:?}", status.code()))
            .or_default() += 1;
    }
}

pub fn now_wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// How every connection of this run reaches the nodes (TLS, token): set once, before the
/// first connection, from the flags or by a secured spawned cluster.
static SECURITY: std::sync::OnceLock<SecurityOpts> = std::sync::OnceLock::new();

pub fn set_security(s: SecurityOpts) {
    let _ = SECURITY.set(s);
}

fn security() -> &'static SecurityOpts {
    SECURITY.get_or_init(SecurityOpts::default)
}

pub async fn connect(addr: &str) -> anyhow::Result<Client> {
    security().connect(addr).await
}

/// A small xorshift for key choice: deterministic per producer, no dependency.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the load; returns the shared counters for the report.
/// Where producers and consumers connect: every address they may use, those of their own
/// region first (`local` of them; a client starts at one of those and moves on to the
/// others only when its node fails).
pub struct Routes {
    pub producers: Vec<String>,
    pub producers_local: usize,
    pub consumers: Vec<String>,
    pub consumers_local: usize,
}

/// Runs the load on `topics`; consumers read `read` (the topics themselves, or their mirrors:
/// the same records at the same offsets).
pub async fn run(
    s: &Settings,
    routes: &Routes,
    topics: &[String],
    read: &[String],
) -> anyhow::Result<Arc<Shared>> {
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs(s.warmup_s);
    let end = measure_from + Duration::from_secs(s.duration_s);
    let wall_at_start_us = now_wall_us() + 200_000;
    let shared = Arc::new(Shared {
        publish: Mutex::new(histogram()),
        e2e: Mutex::new(histogram()),
        ledger: Mutex::new(Ledger::default()),
        errors: Mutex::new(BTreeMap::new()),
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        acked_measured: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        measure_from,
        measure_from_wall_us: wall_at_start_us + s.warmup_s * 1_000_000,
        end,
        start,
        wall_at_start_us,
        last_ack: Mutex::new(BTreeMap::new()),
        longest_gap: Mutex::new(Duration::ZERO),
        retried: Mutex::new(BTreeMap::new()),
        first_errors: Mutex::new(BTreeMap::new()),
        mirrored: (read != topics).then(|| {
            Mutex::new(Mirrored {
                acked_at: HashMap::new(),
                early: Default::default(),
                ack_to_delivery: histogram(),
            })
        }),
    });

    // Consumers first, from the start of the (new, empty) topics, so they see every record.
    // Consumer i reads through node i + 1 (producers start at node i): reads and writes go
    // through different nodes, as in a cluster.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut consumers = Vec::new();
    for i in 0..s.consumers {
        let parts: Vec<(String, u32)> = read
            .iter()
            .flat_map(|t| {
                (0..s.partitions)
                    .filter(|p| *p as usize % s.consumers == i)
                    .map(|p| (t.clone(), p))
            })
            .collect();
        if parts.is_empty() {
            continue;
        }
        consumers.push(tokio::spawn(consume(
            routes.consumers.clone(),
            (i + 1) % routes.consumers_local.max(1),
            parts,
            shared.clone(),
            stop_rx.clone(),
        )));
    }

    let progress = tokio::spawn(progress(shared.clone()));
    let mut producers = Vec::new();
    if s.leader_aware {
        let client = leader_aware_client(s, routes).await?;
        for id in 0..s.producers as u32 {
            let producer = tern_client::Producer::new(
                &client,
                tern_client::ProducerOptions {
                    linger: Duration::from_millis(s.linger_ms),
                    max_batch_records: s.batch_size,
                    max_buffered: if s.rate.is_some() {
                        OPEN_LOOP_REQUESTS_MAX
                    } else {
                        s.in_flight * s.batch_size
                    },
                    ..tern_client::ProducerOptions::default()
                },
            )
            .await?;
            let s = s.clone();
            let topics = topics.to_vec();
            let shared = shared.clone();
            producers.push(tokio::spawn(async move {
                client_loop(id, &s, producer, &topics, shared).await
            }));
        }
    } else {
        for id in 0..s.producers as u32 {
            let client = Nodes::new(
                &routes.producers,
                id as usize % routes.producers_local.max(1),
            )?;
            let s = s.clone();
            let topics = topics.to_vec();
            let shared = shared.clone();
            producers.push(tokio::spawn(async move {
                match s.rate {
                    Some(_) if s.idempotent => {
                        idempotent_loop(id, &s, client, &topics, shared).await
                    }
                    Some(_) => open_loop(id, &s, client, &topics, shared).await,
                    None => closed_loop(id, &s, client, &topics, shared).await,
                }
            }));
        }
    }
    for p in producers {
        p.await?;
    }
    progress.abort();
    // Wait until everything acknowledged has been delivered (or the drain time runs out).
    if s.consumers > 0 {
        let deadline = Instant::now() + DRAIN;
        while Instant::now() < deadline {
            let (acked, missing) = {
                let l = shared.ledger.lock().unwrap();
                (l.acked_count(), l.lost())
            };
            if acked > 0 && missing == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = stop_tx.send(true);
    for c in consumers {
        let _ = c.await;
    }
    Ok(shared)
}

/// Follows its partitions through one node; when the stream fails (the node died), it
/// subscribes again through the next node from the offsets it has reached, so nothing
/// acknowledged is missed because a node went away.
async fn consume(
    addrs: Vec<String>,
    first: usize,
    parts: Vec<(String, u32)>,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut next: BTreeMap<(String, u32), u64> = BTreeMap::new();
    let mut node = first;
    loop {
        if *stop.borrow() {
            return;
        }
        let addr = &addrs[node % addrs.len()];
        let add = parts
            .iter()
            .map(|(t, p)| pb::TopicSubscription {
                topic: t.clone(),
                from: Some(pb::StartPosition {
                    position: Some(match next.get(&(t.clone(), *p)) {
                        Some(o) => pb::start_position::Position::Offset(*o),
                        None => pb::start_position::Position::Earliest(true),
                    }),
                }),
                partitions: vec![*p],
            })
            .collect::<Vec<_>>();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(pb::SubscribeRequest {
                add,
                remove: vec![],
            })
            .await;
        let stream = match connect(addr).await {
            Ok(mut c) => c
                .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner()),
            Err(_) => Err(tonic::Status::unavailable(format!("cannot reach {addr}"))),
        };
        let mut stream = match stream {
            Ok(st) => st,
            Err(status) => {
                shared.stream_error(&status);
                node += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        loop {
            let item = tokio::select! {
                n = stream.next() => n,
                _ = stop.changed() => return,
            };
            let resp = match item {
                Some(Ok(r)) => r,
                Some(Err(status)) => {
                    shared.stream_error(&status);
                    break;
                }
                None => break,
            };
            // The stamps' scale, read off the monotonic clock: a wall clock being stepped or
            // slewed (as it was, 5 ms a second, in runs of 2026-12-06) does not skew latency.
            let now = shared.wall_us(Instant::now());
            let mut e2e = shared.e2e.lock().unwrap();
            let mut ledger = shared.ledger.lock().unwrap();
            let mut mirrored = shared.mirrored.as_ref().map(|m| m.lock().unwrap());
            for r in &resp.records {
                next.insert((r.topic.clone(), r.partition), r.offset + 1);
                let Some(st) = payload::decode(&r.value) else {
                    continue;
                };
                if st.due_us >= shared.measure_from_wall_us {
                    let _ = e2e.record(now.saturating_sub(st.due_us).max(1));
                }
                if let Some(m) = mirrored.as_mut() {
                    match m.acked_at.remove(&(st.producer, st.seq)) {
                        Some(at) => {
                            let _ = m.ack_to_delivery.record(now.saturating_sub(at).max(1));
                        }
                        None if m.early.len() < ACKED_AT_MAX => {
                            m.early.insert((st.producer, st.seq));
                        }
                        None => {}
                    }
                }
                ledger.deliver(st.producer, r.partition, r.offset, st.seq);
            }
            shared
                .delivered
                .fetch_add(resp.records.len() as u64, Ordering::Relaxed);
        }
        // The stream ended: go on through the next node.
        node += 1;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// A record's key (from `--keys`) and value (its stamp, padded to the record size).
fn record_parts(
    s: &Settings,
    id: u32,
    seq: u64,
    due_us: u64,
    rng: &mut XorShift,
) -> (Option<Bytes>, Bytes) {
    let key = s.keys.map(|n| Bytes::from(format!("k{}", rng.next() % n)));
    let stamp = Stamp {
        producer: id,
        seq,
        due_us,
    };
    (key, Bytes::from(payload::encode(stamp, s.record_size)))
}

fn make_request(
    s: &Settings,
    id: u32,
    topic: &str,
    seqs: std::ops::Range<u64>,
    dues_us: &[u64],
    rng: &mut XorShift,
) -> pb::PublishRequest {
    let records = seqs
        .zip(dues_us)
        .map(|(seq, &due_us)| {
            let (key, value) = record_parts(s, id, seq, due_us, rng);
            pb::PublishRecord {
                key,
                value,
                headers: vec![],
                partition: None,
                expiry_seconds: None,
            }
        })
        .collect();
    pb::PublishRequest {
        topic: topic.to_string(),
        records,
        request_id: 0,
        ..Default::default()
    }
}

/// Records the answer to one publish request of `n` records starting at `first_seq`, each
/// with its due (or send) instant.
fn on_answer(
    shared: &Shared,
    topic: &str,
    id: u32,
    first_seq: u64,
    dues: &[Instant],
    r: Result<tonic::Response<pb::PublishResponse>, tonic::Status>,
) {
    match r {
        Ok(resp) => {
            let mut partitions: Vec<u32> =
                resp.get_ref().acks.iter().map(|a| a.partition).collect();
            partitions.sort_unstable();
            partitions.dedup();
            acked(shared, topic, id, first_seq, dues, &partitions);
        }
        Err(status) => shared.error(&status, dues.len() as u64),
    }
}

/// Records acknowledged records `first_seq..` (with their due instants), written to
/// `partitions` of `topic`.
fn acked(
    shared: &Shared,
    topic: &str,
    id: u32,
    first_seq: u64,
    dues: &[Instant],
    partitions: &[u32],
) {
    let now = Instant::now();
    if now >= shared.measure_from && now < shared.end {
        let mut last = shared.last_ack.lock().unwrap();
        let mut longest = shared.longest_gap.lock().unwrap();
        for p in partitions {
            let key = (topic.to_string(), *p);
            if let Some(prev) = last.insert(key, now) {
                *longest = (*longest).max(now.saturating_duration_since(prev));
            }
        }
    }
    let mut h = shared.publish.lock().unwrap();
    let mut measured = 0;
    for due in dues {
        if *due >= shared.measure_from && *due < shared.end {
            let _ = h.record(now.saturating_duration_since(*due).as_micros().max(1) as u64);
            measured += 1;
        }
    }
    drop(h);
    let mut l = shared.ledger.lock().unwrap();
    for k in 0..dues.len() as u64 {
        l.ack(id, first_seq + k);
    }
    drop(l);
    if let Some(m) = &shared.mirrored {
        let at = shared.wall_us(now);
        let mut m = m.lock().unwrap();
        for (k, due) in dues.iter().enumerate() {
            let key = (id, first_seq + k as u64);
            if *due < shared.measure_from || *due >= shared.end {
                continue;
            }
            if m.early.remove(&key) {
                // Delivered before the acknowledgment came back: no lag.
                let _ = m.ack_to_delivery.record(1);
            } else if m.acked_at.len() < ACKED_AT_MAX {
                m.acked_at.insert(key, at);
            }
        }
    }
    shared.acked.fetch_add(dues.len() as u64, Ordering::Relaxed);
    shared.acked_measured.fetch_add(measured, Ordering::Relaxed);
}

/// The tern-client client leader-aware producers share: bootstrapped from the producers'
/// nodes (their region's first), with this run's TLS and token.
async fn leader_aware_client(s: &Settings, routes: &Routes) -> anyhow::Result<tern_client::Client> {
    let options = tern_client::ClientOptions {
        region: s.producer_region.clone(),
        ..security().client_options()?
    };
    Ok(tern_client::Client::connect(routes.producers.clone(), options).await?)
}

/// A producer on tern-client: each record sent at its due time (open loop) or as soon as the
/// producer has room (closed loop, `in_flight × batch_size` records unacknowledged), to the
/// partition its key (or the sticky partitioner) picks; the client batches per partition and
/// sends straight to the leaders.
async fn client_loop(
    id: u32,
    s: &Settings,
    producer: tern_client::Producer,
    topics: &[String],
    shared: Arc<Shared>,
) {
    let interval = s
        .rate
        .map(|r| Duration::from_secs_f64(s.producers as f64 / r as f64));
    let due = |i: u64| match interval {
        Some(iv) => shared.start + iv.mul_f64(i as f64),
        None => Instant::now(),
    };
    let total =
        interval.map(|iv| ((shared.end - shared.start).as_secs_f64() / iv.as_secs_f64()) as u64);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    let mut answers = tokio::task::JoinSet::new();
    tokio::time::sleep_until(shared.start.into()).await;
    let mut seq = 0u64;
    loop {
        if total.is_some_and(|t| seq >= t) || (total.is_none() && Instant::now() >= shared.end) {
            break;
        }
        let at = due(seq);
        if interval.is_some() {
            tokio::time::sleep_until(at.into()).await;
        }
        let topic = topics[seq as usize % topics.len()].clone();
        let (key, value) = record_parts(s, id, seq, shared.wall_us(at), &mut rng);
        let record = tern_client::Record {
            key,
            ..tern_client::Record::new(value)
        };
        shared.sent.fetch_add(1, Ordering::Relaxed);
        match producer.send(&topic, record).await {
            Ok(ack) => {
                let shared = shared.clone();
                answers.spawn(async move {
                    match ack.await {
                        Ok(a) => acked(&shared, &topic, id, seq, &[at], &[a.partition]),
                        Err(e) => shared.error(&client_status(e), 1),
                    }
                });
            }
            Err(e) => shared.error(&client_status(e), 1),
        }
        while answers.try_join_next().is_some() {}
        seq += 1;
    }
    producer.flush().await;
    while answers.join_next().await.is_some() {}
}

/// A tern-client error as the status it reports under.
fn client_status(e: tern_client::Error) -> tonic::Status {
    match e {
        tern_client::Error::Status(s) => s,
        e => tonic::Status::unknown(e.to_string()),
    }
}

/// A producer's clients, one per node: it publishes through one and moves to the next when a
/// request fails (the node may be down; any node forwards to the partition's leader).
#[derive(Clone)]
struct Nodes {
    clients: Arc<Vec<Client>>,
    current: Arc<AtomicU64>,
}

impl Nodes {
    fn new(addrs: &[String], first: usize) -> anyhow::Result<Nodes> {
        let clients = addrs
            .iter()
            .map(|a| security().connect_lazy(a))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Nodes {
            clients: Arc::new(clients),
            current: Arc::new(AtomicU64::new(first as u64)),
        })
    }

    /// The client in use, and its position (to report a failure of exactly that one).
    fn get(&self) -> (u64, Client) {
        let i = self.current.load(Ordering::Relaxed);
        (i, self.clients[i as usize % self.clients.len()].clone())
    }

    /// Moves to the next node after a failure of client `i` (once per failure wave).
    fn failed(&self, i: u64) {
        let _ = self
            .current
            .compare_exchange(i, i + 1, Ordering::Relaxed, Ordering::Relaxed);
    }
}

async fn open_loop(id: u32, s: &Settings, client: Nodes, topics: &[String], shared: Arc<Shared>) {
    let rate = s.rate.expect("open loop has a rate") as f64 / s.producers as f64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    // A batch holds the records due within the linger time, at most batch_size.
    let per_batch = (s.batch_size as u64)
        .min((s.linger_ms as f64 / 1000.0 * rate).floor() as u64 + 1)
        .max(1);
    let window = Arc::new(tokio::sync::Semaphore::new(OPEN_LOOP_REQUESTS_MAX));
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    let mut seq = 0u64;
    let mut batch_no = 0usize;
    loop {
        let due = |i: u64| shared.start + interval.mul_f64(i as f64);
        if due(seq) >= shared.end {
            break;
        }
        let total = ((shared.end - shared.start).as_secs_f64() * rate) as u64;
        let n = per_batch.min(total.saturating_sub(seq)).max(1);
        let dues: Vec<Instant> = (seq..seq + n).map(due).collect();
        tokio::time::sleep_until((*dues.last().unwrap()).into()).await;
        let Ok(permit) = window.clone().acquire_owned().await else {
            break;
        };
        let dues_us: Vec<u64> = dues.iter().map(|d| shared.wall_us(*d)).collect();
        let topic = &topics[batch_no % topics.len()];
        let req = make_request(s, id, topic, seq..seq + n, &dues_us, &mut rng);
        shared.sent.fetch_add(n, Ordering::Relaxed);
        let nodes = client.clone();
        let shared2 = shared.clone();
        let first = seq;
        let topic = topic.clone();
        tokio::spawn(async move {
            let (i, mut c) = nodes.get();
            let r = c.publish(req).await;
            if r.is_err() {
                nodes.failed(i);
            }
            on_answer(&shared2, &topic, id, first, &dues, r);
            drop(permit);
        });
        seq += n;
        batch_no += 1;
    }
    // Wait for every request still in flight.
    let _ = window.acquire_many(OPEN_LOOP_REQUESTS_MAX as u32).await;
}

/// `LOADGEN_TRACE=1`: idempotent producers print every try and its outcome (read once, not per
/// request).
pub(crate) static TRACE: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::env::var_os("LOADGEN_TRACE").is_some());

/// How long an idempotent producer waits before sending a failed request again.
const RETRY_BACKOFF: Duration = Duration::from_millis(20);
/// How long after the load's end an idempotent producer keeps retrying its last request.
const RETRY_AFTER_END: Duration = Duration::from_secs(30);
/// A request that has no answer by then is abandoned and sent again (same sequence).
const IDEMPOTENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a failed publish may go again unchanged: anything but a refusal of the request
/// itself. An idempotent producer's retry is never written twice, whatever the first try did.
pub(crate) fn retriable(status: &tonic::Status) -> bool {
    !matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::NotFound
            | tonic::Code::OutOfRange
            | tonic::Code::AlreadyExists
    )
}

/// An idempotent producer: a producer id, one partition, one request in flight holding every
/// record due (up to the batch size), and a request that failed sent again unchanged (same
/// producer id and sequence, through the next node) until it is acknowledged. However a try
/// ended — refused, cut off by a killed node, timed out — each record is written exactly once.
async fn idempotent_loop(
    id: u32,
    s: &Settings,
    nodes: Nodes,
    topics: &[String],
    shared: Arc<Shared>,
) {
    let rate = s.rate.expect("idempotent producers have a rate") as f64 / s.producers as f64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let topic = &topics[id as usize % topics.len()];
    let partition = id % s.partitions;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    let give_up = shared.end + RETRY_AFTER_END;
    let producer_id = loop {
        let (i, mut c) = nodes.get();
        match c.init_producer(pb::InitProducerRequest {}).await {
            Ok(r) => break r.into_inner().producer_id,
            Err(status) if Instant::now() < give_up => {
                shared.retry(&status);
                nodes.failed(i);
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            Err(status) => {
                shared.error(&status, 0);
                return;
            }
        }
    };
    let due = |i: u64| shared.start + interval.mul_f64(i as f64);
    let total = ((shared.end - shared.start).as_secs_f64() * rate) as u64;
    let mut seq = 0u64;
    while seq < total {
        tokio::time::sleep_until(due(seq).into()).await;
        let now = Instant::now();
        let mut n = 1;
        while n < s.batch_size as u64 && seq + n < total && due(seq + n) <= now {
            n += 1;
        }
        let dues: Vec<Instant> = (seq..seq + n).map(due).collect();
        let dues_us: Vec<u64> = dues.iter().map(|d| shared.wall_us(*d)).collect();
        let mut req = make_request(s, id, topic, seq..seq + n, &dues_us, &mut rng);
        for r in &mut req.records {
            r.partition = Some(partition);
        }
        req.producer_id = producer_id;
        // Sequences count records from 0 in the partition (they wrap after 2^32, as Kafka's).
        req.sequence = seq as u32;
        shared.sent.fetch_add(n, Ordering::Relaxed);
        loop {
            let (i, mut c) = nodes.get();
            let mut call = tonic::Request::new(req.clone());
            call.set_timeout(IDEMPOTENT_TIMEOUT);
            match c.publish(call).await {
                Err(status) if retriable(&status) && Instant::now() < give_up => {
                    if *TRACE {
                        eprintln!("loadgen: trace: t={:.3} producer {producer_id} p{partition} seq {seq}+{n} via node {}: retry after {:?}: {}", shared.start.elapsed().as_secs_f64(), i % nodes.clients.len() as u64 + 1, status.code(), status.message());
                    }
                    shared.retry(&status);
                    nodes.failed(i);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
                r => {
                    if *TRACE {
                        match &r {
                            Ok(a) => eprintln!("loadgen: trace: t={:.3} producer {producer_id} p{partition} seq {seq}+{n} via node {}: acked at {:?}", shared.start.elapsed().as_secs_f64(), i % nodes.clients.len() as u64 + 1, a.get_ref().acks.first().map(|a| a.offset)),
                            Err(e) => eprintln!("loadgen: trace: t={:.3} producer {producer_id} p{partition} seq {seq}+{n} via node {}: FAILED {:?}: {}", shared.start.elapsed().as_secs_f64(), i % nodes.clients.len() as u64 + 1, e.code(), e.message()),
                        }
                    }
                    if r.is_err() {
                        nodes.failed(i);
                    }
                    on_answer(&shared, topic, id, seq, &dues, r);
                    break;
                }
            }
        }
        seq += n;
    }
}

async fn closed_loop(id: u32, s: &Settings, client: Nodes, topics: &[String], shared: Arc<Shared>) {
    tokio::time::sleep_until(shared.start.into()).await;
    let next_seq = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..s.in_flight {
        let nodes = client.clone();
        let s = s.clone();
        let topics = topics.to_vec();
        let shared = shared.clone();
        let next_seq = next_seq.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = XorShift(0x2545_f491_4f6c_dd1d ^ (((id as u64) << 16) | (w as u64 + 1)));
            let mut batch_no = w;
            while Instant::now() < shared.end {
                let n = s.batch_size as u64;
                let seq = next_seq.fetch_add(n, Ordering::Relaxed);
                let sent_at = Instant::now();
                let stamp = vec![shared.wall_us(sent_at); n as usize];
                let topic = &topics[batch_no % topics.len()];
                let req = make_request(&s, id, topic, seq..seq + n, &stamp, &mut rng);
                shared.sent.fetch_add(n, Ordering::Relaxed);
                let (i, mut c) = nodes.get();
                let r = c.publish(req).await;
                if r.is_err() {
                    nodes.failed(i);
                    // Do not spin on a node that is down.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                on_answer(&shared, topic, id, seq, &vec![sent_at; n as usize], r);
                batch_no += s.in_flight;
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// A line a second: acknowledged rate, p99 so far, errors.
async fn progress(shared: Arc<Shared>) {
    let mut last = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let acked = shared.acked.load(Ordering::Relaxed);
        let p99 = shared.publish.lock().unwrap().value_at_quantile(0.99);
        let e2e = shared.e2e.lock().unwrap().value_at_quantile(0.99);
        let errors: u64 = shared.errors.lock().unwrap().values().sum();
        let t = shared.start.elapsed().as_secs();
        let phase = if Instant::now() < shared.measure_from {
            " (warm-up)"
        } else {
            ""
        };
        eprintln!(
            "[{t:>4}s]{phase} acked {:>9}/s  p99 publish {:>8.2} ms  p99 e2e {:>8.2} ms  errors {errors}",
            acked - last,
            p99 as f64 / 1000.0,
            e2e as f64 / 1000.0
        );
        last = acked;
    }
}
