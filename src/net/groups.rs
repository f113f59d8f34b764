//! Consumer groups and queue groups, coordinated by the metadata leader.
//!
//! Each (group, topic) that has members is an actor: one tokio task owning the group's state,
//! fed by a bounded channel of events (joins, leaves, commits, acks, fetched records). Members
//! are `Consume` calls; their records go down the call's bounded channel, so a slow member
//! holds back only its own deliveries. What must survive the coordinator goes through the
//! metadata log (`Command::CommitOffsets`, `Command::QueueProgress`): a new coordinator (after
//! a metadata leader change or a restart) starts from it. Membership itself is not replicated:
//! members' calls end when their coordinator does, and they join the next one.
//!
//! Stream mode: partitions are spread over the members (sticky: a member keeps what it has up
//! to its share). A partition moves only after its member answered `Revoke` (committing where
//! it got to), left, or missed its session timeout, so no partition is consumed by two members
//! at once; the next member starts at the committed offset.
//!
//! Queue mode: per partition, a window of records from the group's floor (every record below
//! it is settled) is handed out one by one to members with room (`max_in_flight`). A delivery
//! not acked within `ack_wait` or nacked is delivered again; one that failed `max_deliveries`
//! times is written to the dead-letter topic (idempotently) and settled.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::broker::{Broker, Outgoing, Topic};
use super::status::{from_core, range_of};
use super::{controller, service, validate};
use crate::cluster::{Command, GroupOffsets, GROUPS_MAX, QUEUE_WINDOW_MAX};
use crate::log::{Header, Record, HEADERS_PER_RECORD_MAX};
use crate::proto::v1 as pb;
use crate::proto::v1::consume_request::Kind;
use crate::proto::v1::consume_response::Kind as Down;
use crate::shard::ProducerSeq;
use crate::types::{ProducerId, Sequence, TimestampMs};

/// What a member's join hears when its group stopped meanwhile.
const STOPPED: &str = "the group coordinator stopped; join again";

/// (group, topic).
pub type GroupKey = (String, String);
/// A member's stream of messages.
pub type Out = mpsc::Sender<Result<pb::ConsumeResponse, Status>>;

/// Events queued for one group.
const EVENTS: usize = 1024;
/// How often a group checks deadlines and its coordinator role.
const TICK: Duration = Duration::from_millis(100);
/// How often a queue group's progress is written to the metadata (when it changed).
const FLUSH: Duration = Duration::from_millis(200);
/// How often the coordinator checks it still leads the metadata group.
const ROLE_CHECK: Duration = Duration::from_millis(500);
/// A group without members stops after this (its positions are in the metadata).
const IDLE: Duration = Duration::from_secs(30);
/// Records held per queue partition (delivered or waiting), and their bytes.
const WINDOW: usize = 1000;
const WINDOW_BYTES: usize = 8 << 20;
/// Bytes per fetch.
const FETCH_BYTES: u32 = 1 << 20;
/// Long poll of a reader.
const FETCH_WAIT_MS: u32 = 1000;
/// Longest a metadata write may take before the group gives up on it.
const PROPOSE_WAIT: Duration = Duration::from_secs(5);
/// Deliveries per Ack/Nack request.
pub const REFS_MAX: usize = 10_000;
/// A stream reader's position before it knows where it starts.
const NOT_STARTED: u64 = u64::MAX;
/// Groups one node coordinates at once, and members per group.
pub const ACTIVE_GROUPS_MAX: usize = 10_000;
pub const MEMBERS_MAX: usize = 1000;
/// Partitions whose end offsets a describe asks for at once.
const DESCRIBE_PARALLEL: usize = 32;
/// Messages a member's stream buffers beyond its in-flight records.
const OUT_SLACK: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Stream,
    Queue,
}

impl Mode {
    pub fn pb(self) -> pb::GroupMode {
        match self {
            Mode::Stream => pb::GroupMode::Stream,
            Mode::Queue => pb::GroupMode::Queue,
        }
    }
}

/// A member's settings (validated `JoinGroup`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub session: Duration,
    pub max_in_flight: u32,
    pub start_latest: bool,
    pub auto_commit: Option<Duration>,
    pub ack_wait: Duration,
    pub max_deliveries: u32,
    pub dlq: String,
}

impl Settings {
    /// Capacity of the member's stream: its in-flight records (one message each at most) and
    /// some control messages.
    pub fn out_capacity(&self, mode: Mode) -> usize {
        match mode {
            Mode::Queue => self.max_in_flight as usize + OUT_SLACK,
            Mode::Stream => OUT_SLACK,
        }
    }
}

/// Checks a JoinGroup; answers its group, mode and settings.
pub fn validate_join(
    broker: &Broker,
    j: pb::JoinGroup,
) -> Result<(GroupKey, Mode, Settings), Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    validate::group_name(&j.group)?;
    let topic = broker.topic(&j.topic)?;
    let mode = match pb::GroupMode::try_from(j.mode) {
        Ok(pb::GroupMode::Stream) => Mode::Stream,
        Ok(pb::GroupMode::Queue) => Mode::Queue,
        _ => return bad("mode: use GROUP_MODE_STREAM or GROUP_MODE_QUEUE".into()),
    };
    if j.member_name.len() > 256 {
        return bad("member_name is at most 256 bytes".into());
    }
    let session = match j.session_timeout_ms {
        0 => 10_000,
        v @ 1000..=300_000 => v,
        v => return bad(format!("session_timeout_ms {v}: use 1000 to 300000")),
    };
    let max_in_flight = match j.max_in_flight {
        0 => 100,
        v @ 1..=10_000 => v,
        v => return bad(format!("max_in_flight {v}: use 1 to 10000")),
    };
    let auto_commit = match j.auto_commit_interval_ms {
        0 => None,
        v @ 100..=3_600_000 => Some(Duration::from_millis(v as u64)),
        v => {
            return bad(format!(
                "auto_commit_interval_ms {v}: use 100 to 3600000, or 0"
            ))
        }
    };
    let ack_wait = match j.ack_wait_ms {
        0 => 30_000,
        v @ 100..=3_600_000 => v,
        v => return bad(format!("ack_wait_ms {v}: use 100 to 3600000")),
    };
    let max_deliveries = match j.max_deliveries {
        0 => 5,
        v @ 1..=1000 => v,
        v => return bad(format!("max_deliveries {v}: use 1 to 1000")),
    };
    let dlq = if j.dead_letter_topic.is_empty() {
        format!("{}.dlq", topic.spec.name)
    } else {
        j.dead_letter_topic
    };
    validate::topic_name(&dlq)?;
    if dlq == topic.spec.name {
        return bad("the dead-letter topic must not be the topic itself".into());
    }
    Ok((
        (j.group, topic.spec.name.clone()),
        mode,
        Settings {
            name: j.member_name,
            session: Duration::from_millis(session as u64),
            max_in_flight,
            start_latest: j.start_latest,
            auto_commit,
            ack_wait: Duration::from_millis(ack_wait as u64),
            max_deliveries,
            dlq,
        },
    ))
}

/// Checks Ack/Nack references.
pub fn validate_refs(
    group: &str,
    topic: &str,
    refs: &[pb::DeliveryRef],
) -> Result<Vec<(u32, u64)>, Status> {
    validate::group_name(group)?;
    validate::topic_name(topic)?;
    if refs.len() > REFS_MAX {
        return Err(Status::invalid_argument(format!(
            "{} deliveries in one request; the limit is {REFS_MAX}",
            refs.len()
        )));
    }
    Ok(delivery_refs(refs))
}

/// (partition, offset) of at most [`REFS_MAX`] deliveries.
fn delivery_refs(refs: &[pb::DeliveryRef]) -> Vec<(u32, u64)> {
    refs.iter()
        .take(REFS_MAX)
        .map(|r| (r.partition, r.offset))
        .collect()
}

/// A nack's redelivery delay, capped at an hour.
pub fn nack_delay(ms: u32) -> Duration {
    Duration::from_millis(ms.min(3_600_000) as u64)
}

enum Event {
    Join {
        settings: Settings,
        out: Out,
        reply: oneshot::Sender<Result<u64, Status>>,
    },
    Request {
        member: u64,
        kind: Kind,
    },
    Leave {
        member: u64,
    },
    Ack {
        refs: Vec<(u32, u64)>,
        reply: oneshot::Sender<u32>,
    },
    Nack {
        refs: Vec<(u32, u64)>,
        delay: Duration,
        reply: oneshot::Sender<u32>,
    },
    Describe {
        reply: oneshot::Sender<pb::GroupInfo>,
    },
    /// A queue partition's fetch ended.
    Fetched {
        partition: u32,
        result: Result<pb::FetchResponse, Status>,
    },
    /// A record is in the dead-letter topic.
    DeadLettered {
        partition: u32,
        offset: u64,
    },
}

struct ActorRef {
    tx: mpsc::Sender<Event>,
    mode: Mode,
}

/// The groups this node coordinates.
#[derive(Default)]
pub struct Groups {
    actors: std::sync::Mutex<HashMap<GroupKey, ActorRef>>,
    next_member: AtomicU64,
}

impl Groups {
    fn actor(&self, key: &GroupKey) -> Option<mpsc::Sender<Event>> {
        self.actors
            .lock()
            .expect("groups lock")
            .get(key)
            .filter(|a| !a.tx.is_closed())
            .map(|a| a.tx.clone())
    }

    /// Adds a member; answers its id once the group has it.
    pub async fn join(
        &self,
        broker: &Arc<Broker>,
        key: GroupKey,
        mode: Mode,
        settings: Settings,
        out: Out,
    ) -> Result<u64, Status> {
        let tx = {
            let mut actors = self.actors.lock().expect("groups lock");
            match actors.get(&key).filter(|a| !a.tx.is_closed()) {
                Some(a) if a.mode != mode => {
                    return Err(Status::failed_precondition(format!(
                        "group {:?} consumes {:?} in {:?} mode; members must all use that mode",
                        key.0, key.1, a.mode
                    )))
                }
                Some(a) => a.tx.clone(),
                None => {
                    actors.retain(|_, a| !a.tx.is_closed());
                    if actors.len() >= ACTIVE_GROUPS_MAX {
                        return Err(Status::resource_exhausted(format!(
                            "this node coordinates {ACTIVE_GROUPS_MAX} groups already"
                        )));
                    }
                    let (tx, rx) = mpsc::channel(EVENTS);
                    let weak = tx.downgrade();
                    tokio::spawn(run(broker.clone(), key.clone(), mode, rx, weak));
                    actors.insert(
                        key.clone(),
                        ActorRef {
                            tx: tx.clone(),
                            mode,
                        },
                    );
                    tx
                }
            }
        };
        let (reply, answer) = oneshot::channel();
        tx.send(Event::Join {
            settings,
            out,
            reply,
        })
        .await
        .map_err(|_| Status::unavailable(STOPPED))?;
        answer.await.map_err(|_| Status::unavailable(STOPPED))?
    }

    /// A member's request.
    pub async fn request(&self, key: &GroupKey, member: u64, kind: Kind) {
        if let Some(tx) = self.actor(key) {
            let _ = tx.send(Event::Request { member, kind }).await;
        }
    }

    pub async fn leave(&self, key: &GroupKey, member: u64) {
        if let Some(tx) = self.actor(key) {
            let _ = tx.send(Event::Leave { member }).await;
        }
    }

    /// Asks a group's task; `None` if it is not running (or stopped meanwhile).
    async fn ask<T>(
        tx: &mpsc::Sender<Event>,
        event: impl FnOnce(oneshot::Sender<T>) -> Event,
    ) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        tx.send(event(reply)).await.ok()?;
        answer.await.ok()
    }

    pub async fn ack(&self, key: &GroupKey, refs: Vec<(u32, u64)>) -> u32 {
        let Some(tx) = self.actor(key) else { return 0 };
        Self::ask(&tx, |reply| Event::Ack { refs, reply })
            .await
            .unwrap_or(0)
    }

    pub async fn nack(&self, key: &GroupKey, refs: Vec<(u32, u64)>, delay: Duration) -> u32 {
        let Some(tx) = self.actor(key) else { return 0 };
        Self::ask(&tx, |reply| Event::Nack { refs, delay, reply })
            .await
            .unwrap_or(0)
    }

    /// The running groups `which` selects, as they describe themselves.
    async fn active(&self, which: impl Fn(&GroupKey) -> bool) -> Vec<(GroupKey, pb::GroupInfo)> {
        let actors: Vec<_> = self
            .actors
            .lock()
            .expect("groups lock")
            .iter()
            .filter(|(k, _)| which(k))
            .map(|(k, a)| (k.clone(), a.tx.clone()))
            .collect();
        let mut out = Vec::new();
        for (k, tx) in actors {
            if let Some(info) = Self::ask(&tx, |reply| Event::Describe { reply }).await {
                out.push((k, info));
            }
        }
        out
    }

    pub async fn list(&self, broker: &Broker) -> Vec<pb::GroupSummary> {
        let mut all: BTreeMap<GroupKey, pb::GroupSummary> = BTreeMap::new();
        for ((g, t), o) in &broker.cluster().groups {
            all.insert(
                (g.clone(), t.clone()),
                pb::GroupSummary {
                    group: g.clone(),
                    topic: t.clone(),
                    mode: saved_mode(o) as i32,
                    members: 0,
                },
            );
        }
        for (k, info) in self.active(|_| true).await {
            all.insert(
                k.clone(),
                pb::GroupSummary {
                    group: k.0,
                    topic: k.1,
                    mode: info.mode,
                    members: info.members.len() as u32,
                },
            );
        }
        all.into_values().collect()
    }

    /// A group's members and positions on each topic it consumes, with lag.
    pub async fn describe(&self, broker: &Arc<Broker>, group: &str) -> Vec<pb::GroupInfo> {
        let mut infos: BTreeMap<String, pb::GroupInfo> = BTreeMap::new();
        for ((g, t), o) in &broker.cluster().groups {
            if g != group {
                continue;
            }
            let Ok(topic) = broker.topic(t) else { continue };
            infos.insert(
                t.clone(),
                pb::GroupInfo {
                    group: g.clone(),
                    topic: t.clone(),
                    mode: saved_mode(o) as i32,
                    members: vec![],
                    partitions: (0..topic.spec.partitions)
                        .map(|p| pb::GroupPartition {
                            partition: p,
                            committed: o.partitions.get(&p).map(|c| c.offset),
                            ..Default::default()
                        })
                        .collect(),
                },
            );
        }
        for ((_, t), info) in self.active(|k| k.0 == group).await {
            infos.insert(t, info);
        }
        let mut out: Vec<pb::GroupInfo> = infos.into_values().collect();
        for info in &mut out {
            use futures::StreamExt;
            let parts: Vec<u32> = info.partitions.iter().map(|p| p.partition).collect();
            let topic = info.topic.clone();
            let ends: Vec<_> = futures::stream::iter(parts.into_iter().map(|p| {
                let broker = broker.clone();
                let topic = topic.clone();
                async move {
                    tokio::time::timeout(Duration::from_secs(2), bounds(&broker, &topic, p)).await
                }
            }))
            .buffered(DESCRIBE_PARALLEL)
            .collect()
            .await;
            for (p, end) in info.partitions.iter_mut().zip(ends) {
                if let Ok(Ok((start, end))) = end {
                    if p.committed.is_some_and(|c| c > end) {
                        // A replica that has not caught up since it started: no answer.
                        continue;
                    }
                    p.end_offset = Some(end);
                    // From the committed offset; with none, from where the member reading it
                    // started (a member tailing from the end has no lag to show); with no
                    // reader either, from the start.
                    let from = p.committed.or(p.position).unwrap_or(start).max(start);
                    p.lag = Some(end.saturating_sub(from));
                }
            }
        }
        out
    }
}

/// The mode of a group known only by its stored positions.
fn saved_mode(o: &GroupOffsets) -> pb::GroupMode {
    if o.queue {
        pb::GroupMode::Queue
    } else {
        pb::GroupMode::Stream
    }
}

/// A partition's offset range: (start, end).
async fn bounds(broker: &Arc<Broker>, topic: &str, partition: u32) -> Result<(u64, u64), Status> {
    let req = pb::FetchRequest {
        topic: topic.to_string(),
        partition,
        offset: u64::MAX,
        max_records: 1,
        max_bytes: 1,
        max_wait_ms: 0,
    };
    match service::fetch(broker, req, false).await {
        Ok(r) => Ok((r.start_offset, r.high_watermark)),
        Err(s) => range_of(&s).ok_or(s),
    }
}

/// Where a partition without a committed position starts.
async fn start_offset(
    broker: &Arc<Broker>,
    topic: &str,
    partition: u32,
    latest: bool,
) -> Option<u64> {
    bounds(broker, topic, partition)
        .await
        .ok()
        .map(|(s, e)| if latest { e } else { s })
}

/// Reads a partition from `at`; moves into the range if retention passed `at`.
async fn read(
    broker: &Arc<Broker>,
    topic: &str,
    partition: u32,
    at: u64,
    max_records: u32,
    max_wait_ms: u32,
) -> Result<pb::FetchResponse, Status> {
    let req = pb::FetchRequest {
        topic: topic.to_string(),
        partition,
        offset: at,
        max_records,
        max_bytes: FETCH_BYTES,
        max_wait_ms,
    };
    match service::fetch(broker, req, false).await {
        Err(s) if s.code() == tonic::Code::OutOfRange => match range_of(&s) {
            // Deleted by retention: go on from the first record still stored.
            Some((start, _)) if at < start => Ok(pb::FetchResponse {
                records: vec![],
                next_offset: start,
                high_watermark: start,
                start_offset: start,
            }),
            _ => Err(s),
        },
        r => r,
    }
}

fn down(kind: Down) -> Result<pb::ConsumeResponse, Status> {
    Ok(pb::ConsumeResponse { kind: Some(kind) })
}

struct Member {
    settings: Settings,
    out: Out,
    last_seen: Instant,
    /// Stream mode: a reader per partition it consumes; how far each delivered.
    readers: HashMap<u32, (tokio::task::JoinHandle<()>, Arc<AtomicU64>)>,
    /// Queue mode: deliveries it holds.
    in_flight: u32,
    last_auto_commit: Instant,
    /// A `Committed` answer is waiting for room in its stream.
    answer_waiting: Arc<std::sync::atomic::AtomicBool>,
}

impl Member {
    /// Stops a reader; the handle resolves once it can send nothing more.
    fn stop_reader(&mut self, p: u32) -> Option<tokio::task::JoinHandle<()>> {
        self.readers.remove(&p).map(|(task, _)| {
            task.abort();
            task
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        for (task, _) in self.readers.values() {
            task.abort();
        }
    }
}

enum SlotState {
    /// May be delivered from this time on.
    Ready(Instant),
    Out {
        member: u64,
        deadline: Instant,
    },
    /// Being written to the dead-letter topic.
    Dead,
}

struct Slot {
    record: pb::Record,
    count: u32,
    state: SlotState,
    bytes: usize,
}

/// A queue group's view of one partition.
#[derive(Default)]
struct QueuePart {
    /// Where the next fetch starts; `None` until known.
    next_fetch: Option<u64>,
    fetching: bool,
    /// Records from the floor on that are not settled.
    window: BTreeMap<u64, Slot>,
    bytes: usize,
    /// Settled offsets above the floor.
    settled: BTreeSet<u64>,
    /// Delivery counts loaded from the metadata, for records not fetched yet.
    counts: HashMap<u64, u32>,
    dirty: bool,
}

impl QueuePart {
    fn floor(&self) -> Option<u64> {
        self.window.keys().next().copied().or(self.next_fetch)
    }

    fn settle(&mut self, offset: u64) -> bool {
        match self.window.remove(&offset) {
            Some(slot) => {
                self.bytes -= slot.bytes;
                self.settled.insert(offset);
                if let Some(f) = self.floor() {
                    self.settled = self.settled.split_off(&f);
                }
                self.dirty = true;
                true
            }
            None => false,
        }
    }
}

/// A record on its way to the dead-letter topic.
struct DeadLetter {
    partition: u32,
    offset: u64,
    record: pb::Record,
    deliveries: u32,
    why: &'static str,
}

struct Group {
    broker: Arc<Broker>,
    key: GroupKey,
    mode: Mode,
    /// The topic's incarnation the group was loaded for.
    topic: Arc<Topic>,
    members: BTreeMap<u64, Member>,
    /// The settings queue behaviour follows (the last member to join sets them).
    settings: Option<Settings>,
    // Stream mode.
    committed: Vec<Option<u64>>,
    owner: Vec<Option<u64>>,
    revoking: HashMap<u32, Instant>,
    // Queue mode.
    parts: Vec<QueuePart>,
    /// Rotates where deliveries start (fairness across members and partitions).
    turn: usize,
    /// To the task writing dead letters, once there was one.
    dead: Option<mpsc::UnboundedSender<DeadLetter>>,
    producer: ProducerId,
    events: mpsc::WeakSender<Event>,
}

/// Runs a group until it has had no member for a while, or this node stops coordinating.
async fn run(
    broker: Arc<Broker>,
    key: GroupKey,
    mode: Mode,
    mut rx: mpsc::Receiver<Event>,
    events: mpsc::WeakSender<Event>,
) {
    let mut group = match Group::load(broker.clone(), key.clone(), mode, events).await {
        Ok(g) => g,
        Err(s) => {
            refuse_joins(rx, s).await;
            forget(&broker, &key);
            return;
        }
    };
    tracing::info!(group = %key.0, topic = %key.1, ?mode, "coordinating group");
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = broker.closing();
    let mut last_flush = Instant::now();
    let mut last_role = Instant::now();
    let mut idle_since = Some(Instant::now());
    let reason = loop {
        tokio::select! {
            e = rx.recv() => match e {
                Some(e) => group.handle(e).await,
                None => break "no events",
            },
            _ = tick.tick() => {
                // What members sent before now counts before their deadlines are checked.
                for _ in 0..EVENTS {
                    match rx.try_recv() {
                        Ok(e) => group.handle(e).await,
                        Err(_) => break,
                    }
                }
                let now = Instant::now();
                group.expire(now).await;
                if now.duration_since(last_flush) >= FLUSH {
                    last_flush = now;
                    group.flush().await;
                }
                if now.duration_since(last_role) >= ROLE_CHECK {
                    last_role = now;
                    if !broker.coordinates().await {
                        break "this node no longer leads the metadata group";
                    }
                    if broker.topic(&key.1).map(|t| t.spec.uid).ok() != Some(group.topic.spec.uid) {
                        break "the topic was deleted";
                    }
                }
                if group.members.is_empty() {
                    let since = *idle_since.get_or_insert(now);
                    if now.duration_since(since) >= IDLE && !group.busy() {
                        break "idle";
                    }
                } else {
                    idle_since = None;
                }
            }
            _ = closing.changed() => break "the node is shutting down",
        }
        group.dispatch();
    };
    tracing::info!(group = %key.0, topic = %key.1, reason, "no longer coordinating group");
    group.flush().await;
    for (_, m) in std::mem::take(&mut group.members) {
        let s = Status::unavailable(format!(
            "the group coordinator stopped ({reason}); join again"
        ));
        tell(&m.out, s);
    }
    refuse_joins(rx, Status::unavailable(STOPPED)).await;
    forget(&broker, &key);
}

/// Closes a stopping group's queue and refuses the joins still in it.
async fn refuse_joins(mut rx: mpsc::Receiver<Event>, s: Status) {
    rx.close();
    while let Some(e) = rx.recv().await {
        if let Event::Join { reply, .. } = e {
            let _ = reply.send(Err(s.clone()));
        }
    }
}

/// Drops a stopped group's entry (not a newer one's).
fn forget(broker: &Broker, key: &GroupKey) {
    let mut actors = broker.groups.actors.lock().expect("groups lock");
    if actors.get(key).is_some_and(|a| a.tx.is_closed()) {
        actors.remove(key);
    }
}

impl Group {
    /// Starts from the replicated positions, once this node has applied every metadata entry
    /// committed before it took over (a barrier entry of its own, which also issues the
    /// producer id its dead letters are written with).
    async fn load(
        broker: Arc<Broker>,
        key: GroupKey,
        mode: Mode,
        events: mpsc::WeakSender<Event>,
    ) -> Result<Group, Status> {
        let at = tokio::time::timeout(
            PROPOSE_WAIT,
            controller::propose_local(&broker, &Command::AllocateProducerId),
        )
        .await
        .map_err(|_| Status::unavailable("the metadata group did not answer; retry"))?
        .map_err(|e| match e {
            crate::shard::CoreError::NotLeader { .. } => Status::unavailable(
                "this node is no longer the group coordinator (metadata leader); join again",
            ),
            e => from_core(e),
        })?;
        controller::wait_applied(&broker, at).await?;
        let topic = broker.topic(&key.1)?;
        let n = topic.spec.partitions as usize;
        let state = broker.cluster();
        if !state.groups.contains_key(&key) && state.groups.len() >= GROUPS_MAX {
            return Err(Status::resource_exhausted(format!(
                "the cluster keeps positions for {GROUPS_MAX} groups already"
            )));
        }
        let saved = state.groups.get(&key).filter(|g| g.uid == topic.spec.uid);
        let mut committed = vec![None; n];
        let mut parts: Vec<QueuePart> = (0..n).map(|_| QueuePart::default()).collect();
        if let Some(g) = saved {
            for (p, c) in &g.partitions {
                let p = *p as usize;
                if p < n {
                    committed[p] = Some(c.offset);
                    parts[p].next_fetch = Some(c.offset);
                    parts[p].settled = c.settled.iter().copied().collect();
                    parts[p].counts = c.counts.iter().copied().collect();
                }
            }
        }
        Ok(Group {
            broker,
            key,
            mode,
            topic,
            members: BTreeMap::new(),
            settings: None,
            committed,
            owner: vec![None; n],
            revoking: HashMap::new(),
            parts,
            turn: 0,
            dead: None,
            producer: ProducerId(at.0 as i64 + 1),
            events,
        })
    }

    /// Work that must not be dropped by stopping: dead letters being written.
    fn busy(&self) -> bool {
        self.parts.iter().any(|p| {
            p.dirty
                || p.window
                    .values()
                    .any(|s| matches!(s.state, SlotState::Dead))
        })
    }

    async fn handle(&mut self, e: Event) {
        match e {
            Event::Join {
                settings,
                out,
                reply,
            } => {
                if self.members.len() >= MEMBERS_MAX {
                    let _ = reply.send(Err(Status::resource_exhausted(format!(
                        "group {:?} has {MEMBERS_MAX} members already",
                        self.key.0
                    ))));
                    return;
                }
                let id = self
                    .broker
                    .groups
                    .next_member
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                let joined = down(Down::Joined(pb::Joined {
                    member_id: member_name(id),
                    coordinator: self.broker.node_id(),
                }));
                if out.try_send(joined).is_err() {
                    let _ = reply.send(Err(Status::unavailable("the member's call closed")));
                    return;
                }
                tracing::debug!(group = %self.key.0, member = id, name = %settings.name, "member joined");
                self.settings = Some(settings.clone());
                self.members.insert(
                    id,
                    Member {
                        settings,
                        out,
                        last_seen: Instant::now(),
                        readers: HashMap::new(),
                        in_flight: 0,
                        last_auto_commit: Instant::now(),
                        answer_waiting: Default::default(),
                    },
                );
                let _ = reply.send(Ok(id));
                self.rebalance();
            }
            Event::Request { member, kind } => {
                let Some(m) = self.members.get_mut(&member) else {
                    return;
                };
                m.last_seen = Instant::now();
                match kind {
                    Kind::Heartbeat(_) => {}
                    Kind::Join(_) => {
                        self.remove(
                            member,
                            Some(Status::failed_precondition(
                                "already joined: a call joins one group once",
                            )),
                        );
                    }
                    Kind::Commit(c) => {
                        let offsets = self.accept_offsets(member, &c.offsets);
                        self.commit(member, offsets).await;
                    }
                    Kind::Revoked(r) => {
                        let offsets = self.accept_offsets(member, &r.offsets);
                        self.commit(member, offsets).await;
                        for p in r.partitions {
                            if self.owner.get(p as usize) == Some(&Some(member))
                                && self.revoking.remove(&p).is_some()
                            {
                                self.owner[p as usize] = None;
                            }
                        }
                        self.rebalance();
                    }
                    Kind::Ack(a) => {
                        self.ack(delivery_refs(&a.deliveries));
                    }
                    Kind::Nack(n) => {
                        self.nack(delivery_refs(&n.deliveries), nack_delay(n.delay_ms));
                    }
                }
            }
            Event::Leave { member } => self.remove(member, None),
            Event::Ack { refs, reply } => {
                let _ = reply.send(self.ack(refs));
            }
            Event::Nack { refs, delay, reply } => {
                let _ = reply.send(self.nack(refs, delay));
            }
            Event::Describe { reply } => {
                let _ = reply.send(self.describe());
            }
            Event::Fetched { partition, result } => self.fetched(partition, result),
            Event::DeadLettered { partition, offset } => {
                if let Some(part) = self.parts.get_mut(partition as usize) {
                    part.settle(offset);
                }
            }
        }
    }

    /// A member's offsets for partitions it consumes (others are ignored).
    fn accept_offsets(&self, member: u64, offsets: &[pb::PartitionOffset]) -> Vec<(u32, u64)> {
        if self.mode != Mode::Stream {
            return Vec::new();
        }
        offsets
            .iter()
            .filter(|o| self.owner.get(o.partition as usize) == Some(&Some(member)))
            .map(|o| (o.partition, o.offset))
            .collect()
    }

    /// Writes offsets to the metadata; answers the member once they are replicated.
    async fn commit(&mut self, member: u64, offsets: Vec<(u32, u64)>) {
        if offsets.is_empty() {
            return;
        }
        let changed: Vec<(u32, u64)> = offsets
            .iter()
            .copied()
            .filter(|(p, o)| self.committed[*p as usize] != Some(*o))
            .collect();
        if !changed.is_empty() {
            let cmd = Command::CommitOffsets {
                group: self.key.0.clone(),
                topic: self.key.1.clone(),
                uid: self.topic.spec.uid,
                offsets: changed.clone(),
            };
            if !self.propose(&cmd).await {
                return;
            }
            for (p, o) in changed {
                self.committed[p as usize] = Some(o);
            }
        }
        if let Some(m) = self.members.get(&member) {
            let msg = down(Down::Committed(pb::Committed {
                offsets: offsets
                    .into_iter()
                    .map(|(partition, offset)| pb::PartitionOffset { partition, offset })
                    .collect(),
            }));
            send_behind(&m.out, msg, Some(&m.answer_waiting));
        }
    }

    async fn propose(&self, cmd: &Command) -> bool {
        match tokio::time::timeout(PROPOSE_WAIT, controller::propose_local(&self.broker, cmd)).await
        {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(group = %self.key.0, "group positions not written: {e}");
                false
            }
            Err(_) => {
                tracing::warn!(group = %self.key.0, "group positions not written within {PROPOSE_WAIT:?}");
                false
            }
        }
    }

    /// Takes a member out: its partitions go to others, its deliveries are delivered again.
    fn remove(&mut self, member: u64, why: Option<Status>) {
        let Some(m) = self.members.remove(&member) else {
            return;
        };
        tracing::debug!(group = %self.key.0, member, "member left");
        if let Some(s) = why {
            tell(&m.out, s);
        }
        drop(m);
        for p in 0..self.owner.len() {
            if self.owner[p] == Some(member) {
                self.owner[p] = None;
                self.revoking.remove(&(p as u32));
            }
        }
        let now = Instant::now();
        let mut failed = Vec::new();
        for (pi, part) in self.parts.iter().enumerate() {
            for (o, s) in &part.window {
                if matches!(s.state, SlotState::Out { member: m, .. } if m == member) {
                    failed.push((pi as u32, *o));
                }
            }
        }
        for (p, o) in failed {
            self.fail(p, o, "the member holding it left", now);
        }
        self.rebalance();
    }

    /// Stream mode: spreads the partitions over the members.
    fn rebalance(&mut self) {
        if self.mode != Mode::Stream || self.members.is_empty() {
            return;
        }
        let ids: Vec<u64> = self.members.keys().copied().collect();
        let n = self.owner.len();
        let m = ids.len();
        let quota = |i: usize| n / m + usize::from(i < n % m);
        let mut held: HashMap<u64, Vec<u32>> = HashMap::new();
        for (p, o) in self.owner.iter().enumerate() {
            if let Some(o) = o {
                if !self.revoking.contains_key(&(p as u32)) {
                    held.entry(*o).or_default().push(p as u32);
                }
            }
        }
        // Members over their share give partitions back.
        let mut counts: Vec<usize> = Vec::with_capacity(m);
        for (i, id) in ids.iter().enumerate() {
            let mine = held.remove(id).unwrap_or_default();
            let q = quota(i);
            for &p in mine.iter().skip(q) {
                self.revoke(*id, p);
            }
            counts.push(mine.len().min(q));
        }
        // Free partitions go to members under their share.
        for p in 0..n {
            if self.owner[p].is_some() {
                continue;
            }
            if let Some(i) = (0..m).find(|&i| counts[i] < quota(i)) {
                counts[i] += 1;
                self.assign(ids[i], p as u32);
            }
        }
    }

    fn revoke(&mut self, member: u64, p: u32) {
        let Some(m) = self.members.get_mut(&member) else {
            return;
        };
        let reader = m.stop_reader(p);
        self.revoking.insert(p, Instant::now());
        let out = m.out.clone();
        // After every record of it the reader queued for the member: the reader is stopped
        // first (an abort takes effect at its next await, so wait for it to end).
        tokio::spawn(async move {
            if let Some(r) = reader {
                let _ = r.await;
            }
            let _ = out
                .send(down(Down::Revoke(pb::Revoke {
                    partitions: vec![p],
                })))
                .await;
        });
    }

    fn assign(&mut self, member: u64, p: u32) {
        let Some(m) = self.members.get_mut(&member) else {
            return;
        };
        self.owner[p as usize] = Some(member);
        // Unknown (nothing to auto-commit) until the reader knows where it starts.
        let delivered = Arc::new(AtomicU64::new(NOT_STARTED));
        let task = tokio::spawn(stream_reader(
            self.broker.clone(),
            self.key.1.clone(),
            p,
            self.committed[p as usize],
            m.settings.start_latest,
            m.settings.max_in_flight,
            m.out.clone(),
            delivered.clone(),
        ));
        m.readers.insert(p, (task, delivered));
    }

    /// Settles deliveries; answers how many were outstanding.
    fn ack(&mut self, refs: Vec<(u32, u64)>) -> u32 {
        let mut n = 0;
        for (p, o) in refs {
            let Some(part) = self.parts.get_mut(p as usize) else {
                continue;
            };
            let holder = match part.window.get(&o).map(|s| &s.state) {
                Some(SlotState::Out { member, .. }) => Some(*member),
                Some(SlotState::Ready(_)) => None,
                _ => continue,
            };
            if part.settle(o) {
                n += 1;
                if let Some(m) = holder.and_then(|h| self.members.get_mut(&h)) {
                    m.in_flight = m.in_flight.saturating_sub(1);
                }
            }
        }
        n
    }

    fn nack(&mut self, refs: Vec<(u32, u64)>, delay: Duration) -> u32 {
        let at = Instant::now() + delay;
        let mut n = 0;
        for (p, o) in refs {
            let out = self
                .parts
                .get(p as usize)
                .and_then(|part| part.window.get(&o))
                .is_some_and(|s| matches!(s.state, SlotState::Out { .. }));
            if out {
                self.fail(p, o, "nacked", at);
                n += 1;
            }
        }
        n
    }

    /// A delivery failed: deliver it again from `at`, or dead-letter it once it has been
    /// delivered `max_deliveries` times.
    fn fail(&mut self, p: u32, o: u64, why: &'static str, at: Instant) {
        let max = self.settings.as_ref().map_or(5, |s| s.max_deliveries);
        let part = &mut self.parts[p as usize];
        let Some(slot) = part.window.get_mut(&o) else {
            return;
        };
        part.dirty = true;
        if let SlotState::Out { member, .. } = slot.state {
            if let Some(m) = self.members.get_mut(&member) {
                m.in_flight = m.in_flight.saturating_sub(1);
            }
        }
        if slot.count >= max {
            slot.state = SlotState::Dead;
            let letter = DeadLetter {
                partition: p,
                offset: o,
                record: slot.record.clone(),
                deliveries: slot.count,
                why,
            };
            self.dead_letter(letter);
        } else {
            slot.state = SlotState::Ready(at);
        }
    }

    fn dead_letter(&mut self, letter: DeadLetter) {
        let tx = self.dead.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let writer = DeadLetterWriter {
                broker: self.broker.clone(),
                group: self.key.0.clone(),
                source: self.topic.clone(),
                dlq: self
                    .settings
                    .as_ref()
                    .map_or_else(|| format!("{}.dlq", self.key.1), |s| s.dlq.clone()),
                producer: self.producer,
                sequences: HashMap::new(),
            };
            tokio::spawn(writer.run(rx, self.events.clone()));
            tx
        });
        // Bounded by the windows: each record is sent here once.
        let _ = tx.send(letter);
    }

    /// Deadlines: sessions, revokes, acks; auto commits.
    async fn expire(&mut self, now: Instant) {
        let gone: Vec<(u64, Status)> = self
            .members
            .iter()
            .filter_map(|(id, m)| {
                if now.duration_since(m.last_seen) > m.settings.session {
                    return Some((
                        *id,
                        Status::deadline_exceeded("session timeout: nothing heard from the member"),
                    ));
                }
                let late = self.revoking.iter().any(|(p, since)| {
                    self.owner[*p as usize] == Some(*id)
                        && now.duration_since(*since) > m.settings.session
                });
                late.then(|| {
                    (
                        *id,
                        Status::deadline_exceeded(
                            "did not answer Revoke within the session timeout",
                        ),
                    )
                })
            })
            .collect();
        for (id, s) in gone {
            tracing::info!(group = %self.key.0, member = id, "removing member: {}", s.message());
            self.remove(id, Some(s));
        }
        let mut expired = Vec::new();
        for (pi, part) in self.parts.iter().enumerate() {
            for (o, s) in &part.window {
                if matches!(s.state, SlotState::Out { deadline, .. } if deadline <= now) {
                    expired.push((pi as u32, *o));
                }
            }
        }
        for (p, o) in expired {
            self.fail(p, o, "not acked within ack_wait", now);
        }
        // Auto commits: the offsets of delivered records.
        let mut commits = Vec::new();
        for (id, m) in &mut self.members {
            let Some(every) = m.settings.auto_commit else {
                continue;
            };
            if now.duration_since(m.last_auto_commit) < every {
                continue;
            }
            m.last_auto_commit = now;
            let offsets: Vec<(u32, u64)> = m
                .readers
                .iter()
                .map(|(p, (_, d))| (*p, d.load(Ordering::Acquire)))
                .filter(|(p, o)| {
                    *o != NOT_STARTED
                        && !self.revoking.contains_key(p)
                        && self.committed[*p as usize] != Some(*o)
                })
                .collect();
            if !offsets.is_empty() {
                commits.push((*id, offsets));
            }
        }
        for (id, offsets) in commits {
            self.commit(id, offsets).await;
        }
    }

    /// Queue mode: writes changed partitions' progress to the metadata.
    async fn flush(&mut self) {
        if self.mode != Mode::Queue {
            return;
        }
        for p in 0..self.parts.len() {
            let part = &self.parts[p];
            if !part.dirty {
                continue;
            }
            let Some(floor) = part.floor() else { continue };
            let cmd = Command::QueueProgress {
                group: self.key.0.clone(),
                topic: self.key.1.clone(),
                uid: self.topic.spec.uid,
                partition: p as u32,
                floor,
                settled: part
                    .settled
                    .iter()
                    .copied()
                    .take(QUEUE_WINDOW_MAX)
                    .collect(),
                counts: part
                    .window
                    .iter()
                    .filter(|(_, s)| s.count > 1 || matches!(s.state, SlotState::Ready(_)))
                    .map(|(o, s)| (*o, s.count))
                    .take(QUEUE_WINDOW_MAX)
                    .collect(),
            };
            if self.propose(&cmd).await {
                self.parts[p].dirty = false;
            } else {
                return;
            }
        }
    }

    /// Queue mode: fetches where windows have room; hands ready records to members with room.
    fn dispatch(&mut self) {
        if self.mode != Mode::Queue {
            return;
        }
        for p in 0..self.parts.len() {
            self.fetch_more(p);
        }
        if self.members.is_empty() {
            return;
        }
        let now = Instant::now();
        let ids: Vec<u64> = self.members.keys().copied().collect();
        let np = self.parts.len();
        let mut batches: HashMap<u64, Vec<pb::Delivery>> = HashMap::new();
        // Round robin: one record to each member with room per pass.
        let mut progress = true;
        while progress {
            progress = false;
            for k in 0..ids.len() {
                let id = ids[(self.turn + k) % ids.len()];
                let m = self.members.get_mut(&id).expect("listed");
                if m.in_flight >= m.settings.max_in_flight {
                    continue;
                }
                let found = (0..np).find_map(|j| {
                    let p = (self.turn + j) % np;
                    self.parts[p]
                        .window
                        .iter()
                        .find(|(_, s)| matches!(s.state, SlotState::Ready(at) if at <= now))
                        .map(|(o, _)| (p, *o))
                });
                let Some((p, o)) = found else { break };
                let part = &mut self.parts[p];
                let slot = part.window.get_mut(&o).expect("found");
                // A first delivery is not written down (a successor that does not know of it
                // delivers the record again as its first).
                part.dirty |= slot.count > 0;
                slot.count += 1;
                slot.state = SlotState::Out {
                    member: id,
                    deadline: now + m.settings.ack_wait,
                };
                m.in_flight += 1;
                batches.entry(id).or_default().push(pb::Delivery {
                    record: Some(slot.record.clone()),
                    delivery_count: slot.count,
                });
                progress = true;
            }
        }
        self.turn = self.turn.wrapping_add(1);
        for (id, deliveries) in batches {
            let m = self.members.get_mut(&id).expect("listed");
            let refs: Vec<(u32, u64)> = deliveries
                .iter()
                .filter_map(|d| d.record.as_ref().map(|r| (r.partition, r.offset)))
                .collect();
            let msg = down(Down::Deliveries(pb::Deliveries {
                deliveries,
                ..Default::default()
            }));
            if m.out.try_send(msg).is_err() {
                // Its stream is full or closed: they go to others.
                m.in_flight = m.in_flight.saturating_sub(refs.len() as u32);
                for (p, o) in refs {
                    if let Some(slot) = self.parts[p as usize].window.get_mut(&o) {
                        slot.count = slot.count.saturating_sub(1);
                        slot.state = SlotState::Ready(now);
                    }
                }
            }
        }
    }

    /// Queue mode: fetches more of partition `p` if its window has room and there are
    /// members (one fetch at a time; the answer comes back as an event).
    fn fetch_more(&mut self, p: usize) {
        let part = &mut self.parts[p];
        let held = part.window.len() + part.settled.len();
        if part.fetching || held >= WINDOW || part.bytes >= WINDOW_BYTES || self.members.is_empty()
        {
            return;
        }
        part.fetching = true;
        let room = (WINDOW - held) as u32;
        let broker = self.broker.clone();
        let topic = self.key.1.clone();
        let latest = self.settings.as_ref().is_some_and(|s| s.start_latest);
        let at = part.next_fetch;
        let events = self.events.clone();
        let p = p as u32;
        tokio::spawn(async move {
            let at = match at {
                Some(a) => Some(a),
                None => start_offset(&broker, &topic, p, latest).await,
            };
            let result = match at {
                Some(at) => read(&broker, &topic, p, at, room, FETCH_WAIT_MS).await,
                None => Err(Status::unavailable("partition bounds unknown")),
            };
            if result.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Some(tx) = events.upgrade() {
                let _ = tx
                    .send(Event::Fetched {
                        partition: p,
                        result,
                    })
                    .await;
            }
        });
    }

    fn fetched(&mut self, p: u32, result: Result<pb::FetchResponse, Status>) {
        let Some(part) = self.parts.get_mut(p as usize) else {
            return;
        };
        part.fetching = false;
        let r = match result {
            Ok(r) => r,
            Err(s) => {
                tracing::debug!(group = %self.key.0, partition = p, "queue fetch failed: {s}");
                return;
            }
        };
        let now = Instant::now();
        let from = part.next_fetch.unwrap_or(0);
        for rec in r.records {
            if rec.offset < from || part.settled.contains(&rec.offset) {
                continue;
            }
            let bytes = rec.value.len() + rec.key.as_ref().map_or(0, |k| k.len()) + 64;
            let count = part.counts.remove(&rec.offset).unwrap_or(0);
            part.bytes += bytes;
            part.window.insert(
                rec.offset,
                Slot {
                    record: rec,
                    count,
                    state: SlotState::Ready(now),
                    bytes,
                },
            );
        }
        if part.next_fetch.is_none() {
            // Where a new group starts: written down with the first progress.
            part.dirty = true;
        }
        if r.next_offset > from || part.next_fetch.is_none() {
            part.next_fetch = Some(r.next_offset.max(from));
        }
        if let Some(f) = part.floor() {
            part.settled = part.settled.split_off(&f);
            part.counts.retain(|o, _| *o >= f);
        }
    }

    fn describe(&self) -> pb::GroupInfo {
        pb::GroupInfo {
            group: self.key.0.clone(),
            topic: self.key.1.clone(),
            mode: self.mode.pb() as i32,
            members: self
                .members
                .iter()
                .map(|(id, m)| pb::GroupMember {
                    member_id: member_name(*id),
                    name: m.settings.name.clone(),
                    partitions: (0..self.owner.len() as u32)
                        .filter(|p| self.owner[*p as usize] == Some(*id))
                        .collect(),
                    in_flight: m.in_flight,
                })
                .collect(),
            partitions: (0..self.owner.len())
                .map(|p| {
                    let (committed, in_flight) = match self.mode {
                        Mode::Stream => (self.committed[p], 0),
                        Mode::Queue => (
                            self.parts[p].floor().or(self.committed[p]),
                            self.parts[p]
                                .window
                                .values()
                                .filter(|s| matches!(s.state, SlotState::Out { .. }))
                                .count() as u32,
                        ),
                    };
                    // Where the owner's reader got to, once it knows where it started.
                    let position = self.owner[p]
                        .filter(|_| self.mode == Mode::Stream)
                        .and_then(|m| self.members.get(&m))
                        .and_then(|m| m.readers.get(&(p as u32)))
                        .map(|(_, at)| at.load(Ordering::Acquire))
                        .filter(|at| *at != NOT_STARTED);
                    pb::GroupPartition {
                        partition: p as u32,
                        committed,
                        end_offset: None,
                        lag: None,
                        member_id: self.owner[p].map(member_name).unwrap_or_default(),
                        in_flight,
                        position,
                    }
                })
                .collect(),
        }
    }
}

/// Sends `msg` down a member's stream, after what is queued for it: at once if there is
/// room, else from a task that waits (at most 30 s) for room. `waiting`, if given, allows one
/// such task at a time (a second message is dropped meanwhile).
fn send_behind(
    out: &Out,
    msg: Result<pb::ConsumeResponse, Status>,
    waiting: Option<&Arc<std::sync::atomic::AtomicBool>>,
) {
    let Err(mpsc::error::TrySendError::Full(msg)) = out.try_send(msg) else {
        return;
    };
    if waiting.is_some_and(|w| w.swap(true, Ordering::AcqRel)) {
        return;
    }
    let out = out.clone();
    let waiting = waiting.cloned();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(30), out.send(msg)).await;
        if let Some(w) = waiting {
            w.store(false, Ordering::Release);
        }
    });
}

/// Ends a member's call with `s`, after what is queued for it.
fn tell(out: &Out, s: Status) {
    send_behind(out, Err(s), None);
}

fn member_name(id: u64) -> String {
    format!("m{id}")
}

/// Stream mode: reads one partition for one member, from `start` (else the start or end of
/// the partition), and sends its records down the member's stream (waiting while it is full).
#[allow(clippy::too_many_arguments)]
async fn stream_reader(
    broker: Arc<Broker>,
    topic: String,
    p: u32,
    start: Option<u64>,
    latest: bool,
    max_records: u32,
    out: Out,
    delivered: Arc<AtomicU64>,
) {
    let mut at = match start {
        Some(o) => o,
        None => loop {
            if let Some(o) = start_offset(&broker, &topic, p, latest).await {
                break o;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        },
    };
    delivered.store(at, Ordering::Release);
    let assigned = down(Down::Assigned(pb::Assigned {
        partitions: vec![pb::PartitionOffset {
            partition: p,
            offset: at,
        }],
    }));
    if out.send(assigned).await.is_err() {
        return;
    }
    let mut first = true;
    loop {
        // The first read does not wait: a partition that starts with control records only
        // (Raft's, never delivered) tells the member at once where it continues, so the
        // member can commit past them.
        let wait = if first { 0 } else { FETCH_WAIT_MS };
        first = false;
        match read(&broker, &topic, p, at, max_records, wait).await {
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
                    if out.send(msg).await.is_err() {
                        return;
                    }
                }
                at = next;
                delivered.store(at, Ordering::Release);
            }
            Err(s) => {
                tracing::debug!(topic, partition = p, "group reader: {s}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Writes dead letters to the dead-letter topic, one at a time, as an idempotent producer: a
/// write that failed goes again with the same sequence number, so it lands once.
struct DeadLetterWriter {
    broker: Arc<Broker>,
    group: String,
    source: Arc<Topic>,
    dlq: String,
    producer: ProducerId,
    /// The next sequence number per dead-letter partition.
    sequences: HashMap<u32, i32>,
}

impl DeadLetterWriter {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<DeadLetter>,
        events: mpsc::WeakSender<Event>,
    ) {
        while let Some(letter) = rx.recv().await {
            let (group, dlq) = (self.group.clone(), self.dlq.clone());
            let (partition, offset) = (letter.partition, letter.offset);
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.write(&letter).await {
                    Ok(()) => break,
                    Err(s) if s.code() == tonic::Code::InvalidArgument => {
                        // It can never be written (e.g. larger than the dead-letter topic takes).
                        tracing::error!(
                            group,
                            dlq,
                            partition,
                            offset,
                            "dead letter refused, record dropped: {s}"
                        );
                        break;
                    }
                    Err(s) => {
                        tracing::warn!(
                            group,
                            dlq,
                            partition,
                            offset,
                            "dead letter not written yet: {s}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        if events.upgrade().is_none() {
                            return;
                        }
                    }
                }
            }
            let Some(tx) = events.upgrade() else { return };
            let _ = tx.send(Event::DeadLettered { partition, offset }).await;
        }
    }

    /// The dead-letter topic, created (one partition, room for the source's largest record
    /// and the headers added to it) if it does not exist.
    async fn topic(&self) -> Result<Arc<Topic>, Status> {
        match self.broker.topic(&self.dlq) {
            Err(s) if s.code() == tonic::Code::NotFound => {}
            r => return r,
        }
        let broker = &self.broker;
        let mut settings = validate::topic_settings(None, &broker.config.topic_defaults)?;
        settings.max_record_bytes = (self.source.spec.settings.max_record_bytes)
            .saturating_add(64 << 10)
            .min(8 << 20);
        let nodes = broker.cluster().nodes.len().max(1) as u32;
        let rf = self.source.spec.replication_factor.min(nodes);
        match controller::create_topic(broker, self.dlq.clone(), 1, rf, settings).await {
            Err(s) if s.code() == tonic::Code::AlreadyExists => broker.topic(&self.dlq),
            r => r,
        }
    }

    async fn write(&mut self, letter: &DeadLetter) -> Result<(), Status> {
        let topic = self.topic().await?;
        let rec = &letter.record;
        let dp = letter.partition % topic.spec.partitions;
        let seq = *self.sequences.entry(dp).or_insert(0);
        let mut headers: Vec<Header> = rec
            .headers
            .iter()
            .take(HEADERS_PER_RECORD_MAX - 6)
            .map(|h| Header {
                name: h.key.clone(),
                value: h.value.clone(),
            })
            .collect();
        for (name, value) in [
            ("tern-dlq-reason", letter.why.to_string()),
            ("tern-dlq-topic", rec.topic.clone()),
            ("tern-dlq-partition", rec.partition.to_string()),
            ("tern-dlq-offset", rec.offset.to_string()),
            ("tern-dlq-deliveries", letter.deliveries.to_string()),
            ("tern-dlq-group", self.group.clone()),
        ] {
            headers.push(Header {
                name: name.to_string(),
                value: Bytes::from(value),
            });
        }
        let record = Record {
            key: rec.key.clone(),
            value: rec.value.clone(),
            headers,
            timestamp: TimestampMs::now(),
            ttl_ms: None,
        };
        let pending = self
            .broker
            .submit(
                &topic,
                vec![Outgoing {
                    partition: Some(dp),
                    record,
                }],
                Some(ProducerSeq {
                    id: self.producer,
                    first: Sequence(seq),
                }),
                false,
            )
            .await?;
        pending.await?;
        self.sequences.insert(dp, seq + 1);
        Ok(())
    }
}
