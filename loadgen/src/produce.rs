//! The producers of a load run: open loop (on schedule), closed loop (as fast as
//! acknowledgements allow), idempotent (retrying until acknowledged), and through the client
//! crate (`--client leader`); each request's answer accounted in the run's [`Shared`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern::cli::Client;
use tern::proto::v1 as pb;

use crate::payload::{self, Stamp};
use crate::run::{security, Routes, Shared, XorShift, ACKED_AT_MAX, OPEN_LOOP_REQUESTS_MAX};
use crate::settings::Settings;

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
pub(crate) async fn leader_aware_client(
    s: &Settings,
    routes: &Routes,
) -> anyhow::Result<tern_client::Client> {
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
pub(crate) async fn client_loop(
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
pub(crate) struct Nodes {
    clients: Arc<Vec<Client>>,
    current: Arc<AtomicU64>,
}

impl Nodes {
    pub(crate) fn new(addrs: &[String], first: usize) -> anyhow::Result<Nodes> {
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

pub(crate) async fn open_loop(
    id: u32,
    s: &Settings,
    client: Nodes,
    topics: &[String],
    shared: Arc<Shared>,
) {
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
pub(crate) async fn idempotent_loop(
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

pub(crate) async fn closed_loop(
    id: u32,
    s: &Settings,
    client: Nodes,
    topics: &[String],
    shared: Arc<Shared>,
) {
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
