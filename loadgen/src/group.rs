//! A consumer group under the chaos workload: members of one stream-mode group read the
//! topic, commit as they go, and join again (through another node) whenever their call ends.
//! What they see is checked:
//!
//! - a committed offset never goes backwards: a `Committed` answer below one confirmed before,
//!   an assignment starting below a confirmed commit, or the group's committed offset at the
//!   end below the highest confirmed;
//! - a member's reads never go backwards within one assignment;
//! - every acknowledged record reaches the group at least once (after the heal, the group
//!   consumes to the end of every partition).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern::proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::payload;

pub const GROUP: &str = "loadgen-chaos-readers";

/// What the members saw, shared between them.
#[derive(Default)]
pub struct Check {
    /// Per producer, the sequence numbers the group was delivered.
    delivered: Mutex<BTreeMap<u32, BTreeSet<u64>>>,
    /// Per partition, the highest offset a `Committed` answer confirmed.
    confirmed: Mutex<BTreeMap<u32, u64>>,
    pub commit_backwards: AtomicU64,
    pub read_backwards: AtomicU64,
    pub joins: AtomicU64,
    pub records: AtomicU64,
    /// Commits sent.
    pub commits: AtomicU64,
    samples: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Check {
    fn sample(&self, s: String) {
        let mut v = self.samples.lock().unwrap();
        if v.len() < 10 {
            v.push(s);
        }
    }

    fn backwards_commit(&self, s: String) {
        self.commit_backwards.fetch_add(1, Ordering::Relaxed);
        self.sample(s);
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the check found once the group consumed everything.
#[derive(Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub records: u64,
    pub joins: u64,
    pub commits: u64,
    /// Acknowledged records the group was never delivered.
    pub missing: u64,
    pub commit_backwards: u64,
    pub read_backwards: u64,
    /// Whether the group's committed offsets reached the end of every partition in time.
    pub drained: bool,
    pub samples: Vec<String>,
}

impl Outcome {
    /// What fails the run.
    pub fn anomalies(&self) -> u64 {
        self.missing + self.commit_backwards + self.read_backwards + u64::from(!self.drained)
    }
}

fn join_request(topic: &str, name: String) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Join(pb::JoinGroup {
            group: GROUP.into(),
            topic: topic.into(),
            mode: pb::GroupMode::Stream as i32,
            member_name: name,
            session_timeout_ms: 6_000,
            max_in_flight: 200,
            ..Default::default()
        })),
    }
}

/// A member's call: joined, kept alive by a heartbeat every second, and ended when nothing is
/// heard for 15 s (a coordinator paused or cut off does not hold a member forever).
struct Call {
    tx: mpsc::Sender<pb::ConsumeRequest>,
    down: tonic::Streaming<pb::ConsumeResponse>,
    heartbeat: tokio::time::Interval,
    last_heard: Instant,
}

impl Call {
    async fn open(addr: &str, join: pb::ConsumeRequest) -> anyhow::Result<Call> {
        let mut client = super::run::connect(addr).await?;
        let (tx, rx) = mpsc::channel(64);
        tx.send(join).await?;
        let down = client.consume(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Call {
            tx,
            down,
            heartbeat: tokio::time::interval(Duration::from_secs(1)),
            last_heard: Instant::now(),
        })
    }

    /// The next message from the coordinator (an error once the call ended).
    async fn next(&mut self) -> anyhow::Result<Option<pb::consume_response::Kind>> {
        loop {
            tokio::select! {
                m = self.down.message() => {
                    let Some(m) = m? else { anyhow::bail!("the call ended") };
                    self.last_heard = Instant::now();
                    return Ok(m.kind);
                }
                _ = self.heartbeat.tick() => {
                    if self.last_heard.elapsed() > Duration::from_secs(15) {
                        anyhow::bail!("nothing heard for 15 s");
                    }
                    let hb = pb::consume_request::Kind::Heartbeat(pb::Heartbeat {});
                    self.send_kind(hb).await?;
                }
            }
        }
    }

    async fn send(&self, r: pb::ConsumeRequest) -> anyhow::Result<()> {
        Ok(self.tx.send(r).await?)
    }

    async fn send_kind(&self, k: pb::consume_request::Kind) -> anyhow::Result<()> {
        self.send(pb::ConsumeRequest { kind: Some(k) }).await
    }
}

/// One member: joins through `addrs[id % n]`, moves to the next node whenever its call ends,
/// until [`Check::stop`].
pub async fn member(id: usize, addrs: Vec<String>, topic: String, check: Arc<Check>) {
    rejoining(id, &addrs, &check.stop, "group", |addr| {
        session(id, addr, &topic, &check)
    })
    .await
}

/// Runs `call` through `addrs[id % n]`, then through the next node each time it ends, until
/// `stop`.
async fn rejoining<'a, F, Fut>(
    id: usize,
    addrs: &'a [String],
    stop: &AtomicBool,
    what: &str,
    mut call: F,
) where
    F: FnMut(&'a str) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut attempt = id;
    while !stop.load(Ordering::Relaxed) {
        let addr = &addrs[attempt % addrs.len()];
        attempt += 1;
        if let Err(e) = call(addr).await {
            if *super::produce::TRACE {
                eprintln!("loadgen: {what} member {id} via {addr}: {e:#}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One call of a member: join, then read, commit and answer revocations until the call ends.
async fn session(id: usize, addr: &str, topic: &str, check: &Check) -> anyhow::Result<()> {
    let join = join_request(topic, format!("chaos-{id}"));
    let mut call = Call::open(addr, join).await?;
    check.joins.fetch_add(1, Ordering::Relaxed);
    // Where this member reads each partition it holds (its next offset).
    let mut position: BTreeMap<u32, u64> = BTreeMap::new();
    while !check.stop.load(Ordering::Relaxed) {
        let kind = call.next().await?;
        use pb::consume_response::Kind;
        match kind {
            Some(Kind::Assigned(a)) => {
                let confirmed = check.confirmed.lock().unwrap().clone();
                for p in a.partitions {
                    if let Some(c) = confirmed.get(&p.partition).filter(|c| p.offset < **c) {
                        check.backwards_commit(format!(
                            "partition {} assigned from {} after {c} was committed",
                            p.partition, p.offset
                        ));
                    }
                    position.insert(p.partition, p.offset);
                }
            }
            Some(Kind::Deliveries(d)) => {
                let p = d.partition;
                let mut at = position.get(&p).copied();
                {
                    let mut delivered = check.delivered.lock().unwrap();
                    for r in d.deliveries.iter().filter_map(|d| d.record.as_ref()) {
                        if at.is_some_and(|a| r.offset < a) {
                            check.read_backwards.fetch_add(1, Ordering::Relaxed);
                            check.sample(format!(
                                "member {id}: partition {p} delivered offset {} after {}",
                                r.offset,
                                at.unwrap_or_default()
                            ));
                        }
                        at = Some(r.offset + 1);
                        if let Some(s) = payload::decode(&r.value) {
                            delivered.entry(s.producer).or_default().insert(s.seq);
                        }
                    }
                }
                check
                    .records
                    .fetch_add(d.deliveries.len() as u64, Ordering::Relaxed);
                position.insert(p, d.next_offset);
                let commit = pb::ConsumeRequest {
                    kind: Some(pb::consume_request::Kind::Commit(pb::Commit {
                        offsets: vec![pb::PartitionOffset {
                            partition: p,
                            offset: d.next_offset,
                        }],
                    })),
                };
                call.send(commit).await?;
                check.commits.fetch_add(1, Ordering::Relaxed);
            }
            Some(Kind::Revoke(r)) => {
                let offsets = r
                    .partitions
                    .iter()
                    .filter_map(|p| {
                        position.remove(p).map(|offset| pb::PartitionOffset {
                            partition: *p,
                            offset,
                        })
                    })
                    .collect();
                let revoked = pb::ConsumeRequest {
                    kind: Some(pb::consume_request::Kind::Revoked(pb::Revoked {
                        partitions: r.partitions,
                        offsets,
                    })),
                };
                call.send(revoked).await?;
            }
            Some(Kind::Committed(c)) => {
                let mut backwards = Vec::new();
                {
                    let mut confirmed = check.confirmed.lock().unwrap();
                    for po in c.offsets {
                        let e = confirmed.entry(po.partition).or_insert(po.offset);
                        if po.offset < *e {
                            backwards.push(format!(
                                "partition {} commit confirmed at {} after {e}",
                                po.partition, po.offset
                            ));
                        }
                        *e = (*e).max(po.offset);
                    }
                }
                for b in backwards {
                    check.backwards_commit(b);
                }
            }
            Some(Kind::Joined(_)) | None => {}
        }
    }
    Ok(())
}

/// `group`'s committed offsets and the partitions' ends, as `addr` describes them.
async fn describe(addr: &str, group: &str, topic: &str) -> anyhow::Result<Vec<pb::GroupPartition>> {
    let mut c = super::run::connect(addr).await?;
    let r = c
        .describe_group(pb::DescribeGroupRequest {
            group: group.into(),
        })
        .await?
        .into_inner();
    Ok(r.topics
        .into_iter()
        .filter(|t| t.topic == topic)
        .flat_map(|t| t.partitions)
        .collect())
}

/// Waits (up to `wait`, asking the nodes in turn) until `group` has settled every one of
/// `partitions`: committed to its end, nothing in flight. Whether it did, and what was last
/// described.
async fn wait_settled(
    addrs: &[String],
    group: &str,
    topic: &str,
    partitions: u32,
    wait: Duration,
) -> (bool, Vec<pb::GroupPartition>) {
    let deadline = Instant::now() + wait;
    let mut last = Vec::new();
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        if let Ok(ps) = describe(&addrs[i % addrs.len()], group, topic).await {
            let settled = ps.len() == partitions as usize
                && ps.iter().all(|p| {
                    p.committed.is_some() && p.committed == p.end_offset && p.in_flight == 0
                });
            last = ps;
            if settled {
                return (true, last);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    (false, last)
}

/// Waits (up to `wait`) until the group has committed the end of every one of `partitions`,
/// then stops the members and checks what they saw against `acked` (per producer, the
/// acknowledged sequence numbers).
pub async fn finish(
    check: &Check,
    addrs: &[String],
    topic: &str,
    partitions: u32,
    acked: &BTreeMap<u32, Vec<u64>>,
    wait: Duration,
) -> Outcome {
    let (drained, last) = wait_settled(addrs, GROUP, topic, partitions, wait).await;
    check.stop();
    let mut o = Outcome {
        records: check.records.load(Ordering::Relaxed),
        joins: check.joins.load(Ordering::Relaxed),
        commits: check.commits.load(Ordering::Relaxed),
        commit_backwards: check.commit_backwards.load(Ordering::Relaxed),
        read_backwards: check.read_backwards.load(Ordering::Relaxed),
        drained,
        ..Outcome::default()
    };
    if !drained {
        o.samples.push(format!(
            "the group did not commit the end of every partition in {wait:?}: {:?}",
            last.iter()
                .map(|p| (p.partition, p.committed, p.end_offset))
                .collect::<Vec<_>>()
        ));
    }
    let confirmed = check.confirmed.lock().unwrap().clone();
    for p in &last {
        if let Some(c) = confirmed.get(&p.partition) {
            if p.committed.is_none_or(|g| g < *c) {
                o.commit_backwards += 1;
                o.samples.push(format!(
                    "partition {}: the group's committed offset is {:?} after {c} was confirmed",
                    p.partition, p.committed
                ));
            }
        }
    }
    let delivered = check.delivered.lock().unwrap();
    for (producer, seqs) in acked {
        let have = delivered.get(producer);
        let missing: Vec<u64> = seqs
            .iter()
            .filter(|s| !have.is_some_and(|h| h.contains(s)))
            .copied()
            .collect();
        if let Some(first) = missing.first() {
            o.samples.push(format!(
                "producer {producer}: {} acknowledged records never delivered to the group (first: seq {first})",
                missing.len()
            ));
        }
        o.missing += missing.len() as u64;
    }
    o.samples
        .extend(check.samples.lock().unwrap().iter().cloned());
    o
}

// ---- Queue mode ----

pub const QUEUE: &str = "loadgen-chaos-queue";
/// Deliveries of a record before it goes to the dead-letter topic.
const MAX_DELIVERIES: u32 = 3;

/// What a queue member does with a record, decided by its producer and sequence so that every
/// member (and every redelivery) treats it alike.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Verdict {
    Ack,
    /// Nack the first delivery, ack a later one.
    NackFirst,
    /// Nack every delivery: it must end in the dead-letter topic.
    Reject,
}

fn verdict(producer: u32, seq: u64) -> Verdict {
    let mut rng = super::chaos::Rng::new(((producer as u64) << 40) ^ seq);
    match rng.below(100) {
        0..=1 => Verdict::Reject,
        2..=9 => Verdict::NackFirst,
        _ => Verdict::Ack,
    }
}

/// What the queue members saw.
#[derive(Default)]
pub struct QueueCheck {
    /// Per producer, the sequence numbers some member acked.
    acked: Mutex<BTreeMap<u32, BTreeSet<u64>>>,
    pub deliveries: AtomicU64,
    pub nacks: AtomicU64,
    pub joins: AtomicU64,
    stop: AtomicBool,
}

/// One queue member: joins through `addrs[id % n]`, acks, nacks and rejects by [`verdict`],
/// and joins again through the next node whenever its call ends, until the check stops.
pub async fn queue_member(id: usize, addrs: Vec<String>, topic: String, check: Arc<QueueCheck>) {
    rejoining(id, &addrs, &check.stop, "queue", |addr| {
        queue_session(id, addr, &topic, &check)
    })
    .await
}

async fn queue_session(
    id: usize,
    addr: &str,
    topic: &str,
    check: &QueueCheck,
) -> anyhow::Result<()> {
    let join = pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Join(pb::JoinGroup {
            group: QUEUE.into(),
            topic: topic.into(),
            mode: pb::GroupMode::Queue as i32,
            member_name: format!("chaos-queue-{id}"),
            session_timeout_ms: 6_000,
            max_in_flight: 200,
            ack_wait_ms: 2_000,
            max_deliveries: MAX_DELIVERIES,
            ..Default::default()
        })),
    };
    let mut call = Call::open(addr, join).await?;
    check.joins.fetch_add(1, Ordering::Relaxed);
    while !check.stop.load(Ordering::Relaxed) {
        let kind = call.next().await?;
        let Some(pb::consume_response::Kind::Deliveries(d)) = kind else {
            continue;
        };
        let (mut acks, mut nacks) = (Vec::new(), Vec::new());
        let mut acked_now = Vec::new();
        for dl in &d.deliveries {
            let Some(r) = dl.record.as_ref() else {
                continue;
            };
            // Queue deliveries mix partitions: each record says its own.
            let at = pb::DeliveryRef {
                partition: r.partition,
                offset: r.offset,
            };
            check.deliveries.fetch_add(1, Ordering::Relaxed);
            let Some(s) = payload::decode(&r.value) else {
                acks.push(at);
                continue;
            };
            match verdict(s.producer, s.seq) {
                Verdict::Reject => nacks.push(at),
                Verdict::NackFirst if dl.delivery_count <= 1 => nacks.push(at),
                _ => {
                    acks.push(at);
                    acked_now.push((s.producer, s.seq));
                }
            }
        }
        if !nacks.is_empty() {
            check.nacks.fetch_add(nacks.len() as u64, Ordering::Relaxed);
            let nack = pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Nack(pb::Nacks {
                    deliveries: nacks,
                    delay_ms: 100,
                })),
            };
            call.send(nack).await?;
        }
        if !acks.is_empty() {
            let ack = pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Ack(pb::Acks {
                    deliveries: acks,
                })),
            };
            call.send(ack).await?;
            let mut acked = check.acked.lock().unwrap();
            for (p, s) in acked_now {
                acked.entry(p).or_default().insert(s);
            }
        }
    }
    Ok(())
}

/// What the queue check found.
#[derive(Debug, Default, serde::Serialize)]
pub struct QueueOutcome {
    pub deliveries: u64,
    pub nacks: u64,
    pub joins: u64,
    pub acked: u64,
    pub dead_lettered: u64,
    /// Acknowledged records that were neither acked by a member nor dead-lettered.
    pub unsettled: u64,
    /// Whether the queue settled every partition to its end in time.
    pub drained: bool,
    pub samples: Vec<String>,
}

impl QueueOutcome {
    /// What fails the run.
    pub fn anomalies(&self) -> u64 {
        self.unsettled + u64::from(!self.drained)
    }
}

/// Every loadgen record in `topic` (all partitions), as `(producer, seq)`.
async fn read_topic(addr: &str, topic: &str) -> anyhow::Result<BTreeMap<u32, BTreeSet<u64>>> {
    let mut c = super::run::connect(addr).await?;
    let partitions = c
        .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
        .await?
        .into_inner()
        .topic
        .map_or(0, |t| t.partitions);
    let mut out: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for partition in 0..partitions {
        for (_, producer, seq) in super::chaos::read_replica(addr, topic, partition).await? {
            out.entry(producer).or_default().insert(seq);
        }
    }
    Ok(out)
}

/// Waits (up to `wait`) until the queue has settled every partition to its end, stops the
/// members, reads the dead-letter topic, and checks that every acknowledged record was acked
/// by a member or dead-lettered.
pub async fn queue_finish(
    check: &QueueCheck,
    addrs: &[String],
    topic: &str,
    partitions: u32,
    acked_by_broker: &BTreeMap<u32, Vec<u64>>,
    wait: Duration,
) -> QueueOutcome {
    let (drained, last) = wait_settled(addrs, QUEUE, topic, partitions, wait).await;
    check.stop.store(true, Ordering::Relaxed);
    let mut o = QueueOutcome {
        deliveries: check.deliveries.load(Ordering::Relaxed),
        nacks: check.nacks.load(Ordering::Relaxed),
        joins: check.joins.load(Ordering::Relaxed),
        drained,
        ..QueueOutcome::default()
    };
    if !drained {
        o.samples.push(format!(
            "the queue did not settle every partition in {wait:?}: {:?}",
            last.iter()
                .map(|p| (p.partition, p.committed, p.end_offset, p.in_flight))
                .collect::<Vec<_>>()
        ));
    }
    let dlq = format!("{topic}.dlq");
    let mut dead = BTreeMap::new();
    for a in addrs {
        match read_topic(a, &dlq).await {
            Ok(d) => {
                dead = d;
                break;
            }
            Err(e) => o.samples.push(format!("reading {dlq} via {a}: {e:#}")),
        }
    }
    let acked = check.acked.lock().unwrap();
    o.acked = acked.values().map(|s| s.len() as u64).sum();
    o.dead_lettered = dead.values().map(|s| s.len() as u64).sum();
    for (producer, seqs) in acked_by_broker {
        let (a, d) = (acked.get(producer), dead.get(producer));
        let unsettled: Vec<u64> = seqs
            .iter()
            .filter(|s| !a.is_some_and(|a| a.contains(s)) && !d.is_some_and(|d| d.contains(s)))
            .copied()
            .collect();
        if let Some(first) = unsettled.first() {
            o.samples.push(format!(
                "producer {producer}: {} records neither acked nor dead-lettered (first: seq {first}, verdict {:?})",
                unsettled.len(),
                verdict(*producer, *first)
            ));
        }
        o.unsettled += unsettled.len() as u64;
    }
    o
}
