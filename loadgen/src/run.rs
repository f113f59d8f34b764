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

use hdrhistogram::Histogram;
use tern::cli::{Client, SecurityOpts};
use tern::proto::v1 as pb;
use tokio_stream::StreamExt;

use crate::accounting::Ledger;
use crate::payload;
use crate::produce::{
    client_loop, closed_loop, idempotent_loop, leader_aware_client, open_loop, Nodes,
};
use crate::settings::Settings;

/// Publish requests one open-loop producer keeps in flight at most (bounds memory; a broker
/// slower than the schedule shows up as latency).
pub(crate) const OPEN_LOOP_REQUESTS_MAX: usize = 4096;
/// Acknowledged records waiting for their delivery from a mirror, at most (the rest of a long
/// run is not timed).
pub(crate) const ACKED_AT_MAX: usize = 4 << 20;
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
    pub(crate) wall_at_start_us: u64,
    /// Per partition, the last successful acknowledgment; and the longest time between two of
    /// them inside the measured window: how long a partition took no writes (failover).
    pub(crate) last_ack: Mutex<BTreeMap<(String, u32), Instant>>,
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
    pub(crate) acked_at: HashMap<(u32, u64), u64>,
    /// Records delivered before their acknowledgment arrived (no lag to count).
    pub(crate) early: std::collections::HashSet<(u32, u64)>,
    pub ack_to_delivery: Histogram<u64>,
}

impl Shared {
    pub(crate) fn wall_us(&self, at: Instant) -> u64 {
        self.wall_at_start_us + at.saturating_duration_since(self.start).as_micros() as u64
    }

    pub(crate) fn error(&self, status: &tonic::Status, records: u64) {
        let code = format!("{:?}", status.code());
        self.first_errors
            .lock()
            .unwrap()
            .entry(code.clone())
            .or_insert_with(|| status.message().to_string());
        *self.errors.lock().unwrap().entry(code).or_default() += records;
    }

    pub(crate) fn retry(&self, status: &tonic::Status) {
        self.retried
            .lock()
            .unwrap()
            .entry(format!("{:?}", status.code()))
            .or_insert_with(|| (0, status.message().to_string()))
            .0 += 1;
    }

    /// A subscription that failed (counted per failure, under "subscribe CODE").
    pub(crate) fn stream_error(&self, status: &tonic::Status) {
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

pub(crate) fn security() -> &'static SecurityOpts {
    SECURITY.get_or_init(SecurityOpts::default)
}

pub async fn connect(addr: &str) -> anyhow::Result<Client> {
    security().connect(addr).await
}

/// A small xorshift for key choice: deterministic per producer, no dependency.
pub(crate) struct XorShift(pub(crate) u64);
impl XorShift {
    pub(crate) fn next(&mut self) -> u64 {
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
