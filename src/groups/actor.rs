//! One group on one topic, coordinated by one task (an actor): it owns the group's state and
//! takes events (joins, leaves, member requests, acks, fetched records) from a bounded queue.
//! Its decisions are the pure parts: `assign` (stream mode) and `window` (queue mode); what
//! must survive the coordinator goes through the metadata log.
//!
//! The loop and what both modes share are here; `stream` holds stream mode's assignment and
//! commits, `queue` queue mode's windows, dispatch and dead letters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::assign::{self, MemberId};
use super::dead_letter::DeadLetterWriter;
use super::reader::{self, StreamReader, NOT_STARTED, READ_WAIT};
use super::settings::{by_message, delivery_refs, nack_delay, Settings, MESSAGE_BYTES_MAX};
use super::window::{DeadLetter, Taker, Window};
use super::{down, member_name, GroupError, GroupKey, Mode, Out, Registry, Result, EVENTS};
use crate::broker::{Broker, Topic};
use crate::cluster::{Command, GROUPS_MAX};
use crate::controller;
use crate::proto::v1 as pb;
use crate::proto::v1::consume_request::Kind;
use crate::proto::v1::consume_response::Kind as Down;
use crate::shard::CoreError;
use crate::types::{Offset, ProducerId};

mod answers;
mod queue;
mod stream;

/// How often a group checks deadlines and its coordinator role.
const TICK: Duration = Duration::from_millis(100);
/// How often a queue group's progress is written to the metadata (when it changed).
const FLUSH: Duration = Duration::from_millis(200);
/// How often the coordinator checks it still leads the metadata group.
const ROLE_CHECK: Duration = Duration::from_millis(500);
/// A gap between two turns of a group's loop this long means the process stood still (a turn
/// starts at least every `TICK`): the coordinator checks its role before it acts.
const STALLED: Duration = Duration::from_millis(400);
/// A group without members stops after this (its positions are in the metadata).
const IDLE: Duration = Duration::from_secs(30);
/// Longest a metadata write may take before the group gives up on it.
const PROPOSE_WAIT: Duration = Duration::from_secs(5);
/// Members per group.
pub const MEMBERS_MAX: usize = 1000;
/// Deliveries before a failed one is dead-lettered, until a member says otherwise.
const MAX_DELIVERIES_DEFAULT: u32 = 5;
/// Longest a message for a member waits for room in its stream.
const SEND_WAIT: Duration = Duration::from_secs(30);

/// What a group's task takes from its queue.
pub enum Event {
    Join {
        settings: Settings,
        out: Out,
        reply: oneshot::Sender<Result<MemberId>>,
    },
    Request {
        member: MemberId,
        kind: Kind,
    },
    Leave {
        member: MemberId,
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
        result: Result<pb::FetchResponse>,
    },
    /// A record is in the dead-letter topic.
    DeadLettered {
        partition: u32,
        offset: u64,
    },
}

struct Member {
    settings: Settings,
    out: Out,
    last_seen: Instant,
    /// Stream mode: a reader per partition it consumes; how far each delivered.
    readers: HashMap<u32, (tokio::task::JoinHandle<()>, Arc<AtomicU64>)>,
    last_auto_commit: Instant,
    /// `Committed` answers waiting for room in its stream.
    answers: Arc<std::sync::Mutex<answers::HeldAnswers>>,
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

pub struct Group {
    broker: Arc<Broker>,
    registry: Arc<Registry>,
    key: GroupKey,
    mode: Mode,
    /// The topic's incarnation the group was loaded for.
    topic: Arc<Topic>,
    members: BTreeMap<MemberId, Member>,
    /// The settings queue behaviour follows (the last member to join sets them).
    settings: Option<Settings>,
    /// Stream mode: each partition's committed offset, owner, and revocations under way.
    committed: Vec<Option<u64>>,
    owner: Vec<Option<MemberId>>,
    revoking: HashMap<u32, Instant>,
    /// Queue mode.
    window: Window,
    /// To the task writing dead letters, once there was one.
    dead: Option<mpsc::UnboundedSender<DeadLetter>>,
    producer: ProducerId,
    events: mpsc::WeakSender<Event>,
}

/// Runs a group until it has had no member for a while, or this node stops coordinating.
pub async fn run(
    broker: Arc<Broker>,
    registry: Arc<Registry>,
    key: GroupKey,
    mode: Mode,
    mut rx: mpsc::Receiver<Event>,
    events: mpsc::WeakSender<Event>,
) {
    let loaded = Group::load(broker.clone(), registry.clone(), key.clone(), mode, events).await;
    let mut group = match loaded {
        Ok(g) => g,
        Err(e) => {
            refuse_joins(rx, e).await;
            registry.forget(&key);
            return;
        }
    };
    tracing::info!(group = %key.0, topic = %key.1, ?mode, "coordinating group");
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_flush = Instant::now();
    let mut last_role = Instant::now();
    let mut idle_since = Some(Instant::now());
    let mut last_turn = Instant::now();
    let reason = loop {
        let event = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => Some(e),
                None => break "no events",
            },
            _ = tick.tick() => None,
            _ = broker.closed() => break "the node is shutting down",
        };
        // A turn starts within a tick of the last one's end. Much later, and this process
        // stood still (paused, starved): another node may have taken over the metadata group
        // and moved the group on meanwhile, so what this coordinator holds (committed offsets,
        // members' deadlines) may be stale. It makes sure it still coordinates before acting
        // on anything: handing the partitions of members it now finds expired out from a stale
        // committed offset would move the group back.
        if last_turn.elapsed() >= STALLED {
            last_role = Instant::now();
            if !broker.coordinates().await {
                break "this node stood still, and no longer leads the metadata group";
            }
        }
        match event {
            Some(e) => group.handle(e).await,
            None => {
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
                    if now.duration_since(since) >= IDLE && !group.window.busy() {
                        break "idle";
                    }
                } else {
                    idle_since = None;
                }
            }
        }
        group.dispatch();
        last_turn = Instant::now();
    };
    tracing::info!(group = %key.0, topic = %key.1, reason, "no longer coordinating group");
    group.flush().await;
    for (_, m) in std::mem::take(&mut group.members) {
        tell(&m.out, GroupError::Stopped(reason.into()));
    }
    refuse_joins(rx, GroupError::Stopped("it stopped meanwhile".into())).await;
    registry.forget(&key);
}

/// Closes a stopping group's queue and refuses the joins still in it.
async fn refuse_joins(mut rx: mpsc::Receiver<Event>, e: GroupError) {
    rx.close();
    while let Some(ev) = rx.recv().await {
        if let Event::Join { reply, .. } = ev {
            let _ = reply.send(Err(e.clone()));
        }
    }
}

impl Group {
    /// Starts from the replicated positions, once this node has applied every metadata entry
    /// committed before it took over (a barrier entry of its own, which also issues the
    /// producer id its dead letters are written with).
    async fn load(
        broker: Arc<Broker>,
        registry: Arc<Registry>,
        key: GroupKey,
        mode: Mode,
        events: mpsc::WeakSender<Event>,
    ) -> Result<Group> {
        let at = tokio::time::timeout(
            PROPOSE_WAIT,
            controller::propose_local(&broker, &Command::AllocateProducerId),
        )
        .await
        .map_err(|_| GroupError::MetadataSilent)?
        .map_err(|e| match e {
            CoreError::NotLeader { .. } => GroupError::NotCoordinator,
            e => GroupError::Broker(e.into()),
        })?;
        controller::wait_applied(&broker, at).await?;
        let topic = broker.topic(&key.1)?;
        let n = topic.spec.partitions as usize;
        let state = broker.cluster();
        if !state.groups.contains_key(&key) && state.groups.len() >= GROUPS_MAX {
            return Err(GroupError::PositionsFull(GROUPS_MAX));
        }
        let saved = state
            .groups
            .get(&key)
            .filter(|g| g.uid == topic.spec.uid)
            .map(|g| g.partitions.clone())
            .unwrap_or_default();
        let mut committed = vec![None; n];
        for (p, c) in &saved {
            if let Some(slot) = committed.get_mut(*p as usize) {
                *slot = Some(c.offset.0);
            }
        }
        Ok(Group {
            window: Window::new(n, &saved, MAX_DELIVERIES_DEFAULT),
            broker,
            registry,
            key,
            mode,
            topic,
            members: BTreeMap::new(),
            settings: None,
            committed,
            owner: vec![None; n],
            revoking: HashMap::new(),
            dead: None,
            producer: ProducerId(at.0 as i64 + 1),
            events,
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
                    let _ = reply.send(Err(GroupError::TooManyMembers {
                        group: self.key.0.clone(),
                        max: MEMBERS_MAX,
                    }));
                    return;
                }
                let id = self.registry.next_member.fetch_add(1, Ordering::Relaxed) + 1;
                let joined = down(Down::Joined(pb::Joined {
                    member_id: member_name(id),
                    coordinator: self.broker.node_id().0,
                }));
                if out.try_send(joined).is_err() {
                    let _ = reply.send(Err(GroupError::CallClosed));
                    return;
                }
                tracing::debug!(group = %self.key.0, member = id, name = %settings.name, "member joined");
                self.window.set_max_deliveries(settings.max_deliveries);
                self.settings = Some(settings.clone());
                self.members.insert(
                    id,
                    Member {
                        settings,
                        out,
                        last_seen: Instant::now(),
                        readers: HashMap::new(),
                        last_auto_commit: Instant::now(),
                        answers: Default::default(),
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
                    Kind::Join(_) => self.remove(member, Some(GroupError::AlreadyJoined)),
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
                        self.window.ack(&delivery_refs(&a.deliveries));
                    }
                    Kind::Nack(n) => {
                        self.nack(&delivery_refs(&n.deliveries), nack_delay(n.delay_ms));
                    }
                    Kind::Leave(l) => {
                        let hold = delivery_refs(&l.hold);
                        let hold = (!l.hold_all).then_some(hold.as_slice());
                        self.window.leave_holding(member, hold, Instant::now());
                        self.remove(member, None);
                    }
                }
            }
            Event::Leave { member } => self.remove(member, None),
            Event::Ack { refs, reply } => {
                let _ = reply.send(self.window.ack(&refs));
            }
            Event::Nack { refs, delay, reply } => {
                let _ = reply.send(self.nack(&refs, delay));
            }
            Event::Describe { reply } => {
                let _ = reply.send(self.describe());
            }
            Event::Fetched { partition, result } => match result {
                Ok(r) => self
                    .window
                    .fetched(partition, r.records, r.next_offset, Instant::now()),
                Err(e) => {
                    tracing::debug!(group = %self.key.0, partition, "queue fetch failed: {e}");
                    self.window.fetch_failed(partition);
                }
            },
            Event::DeadLettered { partition, offset } => {
                self.window.dead_lettered(partition, offset)
            }
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
    fn remove(&mut self, member: MemberId, why: Option<GroupError>) {
        let Some(m) = self.members.remove(&member) else {
            return;
        };
        tracing::debug!(group = %self.key.0, member, "member left");
        if let Some(e) = why {
            tell(&m.out, e);
        }
        drop(m);
        for p in 0..self.owner.len() {
            if self.owner[p] == Some(member) {
                self.owner[p] = None;
                self.revoking.remove(&(p as u32));
            }
        }
        // A member that left by a Leave request holds nothing here any more
        // (`Window::leave_holding`); any other departure fails what it held.
        for letter in self.window.release(member, Instant::now()) {
            self.dead_letter(letter);
        }
        self.rebalance();
    }

    /// Deadlines: sessions, revokes, acks; auto commits.
    async fn expire(&mut self, now: Instant) {
        let gone: Vec<(MemberId, GroupError)> = self
            .members
            .iter()
            .filter_map(|(id, m)| {
                if now.duration_since(m.last_seen) > m.settings.session {
                    return Some((*id, GroupError::SessionTimeout));
                }
                let late = self.revoking.iter().any(|(p, since)| {
                    self.owner[*p as usize] == Some(*id)
                        && now.duration_since(*since) > m.settings.session
                });
                late.then_some((*id, GroupError::RevokeTimeout))
            })
            .collect();
        for (id, e) in gone {
            tracing::info!(group = %self.key.0, member = id, "removing member: {e}");
            self.remove(id, Some(e));
        }
        for letter in self.window.expire(now) {
            self.dead_letter(letter);
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

    fn describe(&self) -> pb::GroupInfo {
        let queue = self.mode == Mode::Queue;
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
                    in_flight: if queue { self.window.in_flight(*id) } else { 0 },
                })
                .collect(),
            partitions: (0..self.owner.len())
                .map(|p| {
                    let (committed, in_flight) = if queue {
                        (
                            self.window.floor(p as u32).or(self.committed[p]),
                            self.window.out_of(p as u32),
                        )
                    } else {
                        (self.committed[p], 0)
                    };
                    // Where the owner's reader got to, once it knows where it started.
                    let position = self.owner[p]
                        .filter(|_| !queue)
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

/// Ends a member's call with `e`, after what is queued for it: at once if there is room,
/// else from a task that waits (bounded) for room.
fn tell(out: &Out, e: GroupError) {
    let Err(mpsc::error::TrySendError::Full(msg)) = out.try_send(Err(e)) else {
        return;
    };
    let out = out.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(SEND_WAIT, out.send(msg)).await;
    });
}
