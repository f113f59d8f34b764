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
//!
//! ```text
//! groups/
//!   mod.rs          the registry of running groups; join, ack, list, describe
//!   settings.rs     a member's validated settings, bounds on requests
//!   assign.rs       stream mode: who consumes which partition (pure)
//!   window.rs       queue mode: deliveries, acks, redelivery, dead letters (pure)
//!   actor.rs        one group's task
//!   reader.rs       reading partitions for members
//!   edge.rs         records read near a member whose coordinator is in another region
//!   dead_letter.rs  writing dead letters
//!   error.rs        GroupError
//! ```

mod actor;
mod assign;
mod dead_letter;
pub mod edge;
mod error;
mod reader;
mod settings;
mod window;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use actor::MEMBERS_MAX;
pub use assign::MemberId;
pub use error::{GroupError, Result};
pub use settings::{group_name, nack_delay, validate_join, validate_refs, Settings, REFS_MAX};

use crate::broker::Broker;
use crate::cluster::GroupOffsets;
use crate::proto::v1 as pb;
use crate::proto::v1::consume_request::Kind;
use crate::proto::v1::consume_response::Kind as Down;
use actor::Event;

/// (group, topic).
pub type GroupKey = (String, String);
/// A member's stream of messages.
pub type Out = mpsc::Sender<Result<pb::ConsumeResponse>>;

/// Events queued for one group.
const EVENTS: usize = 1024;
/// Groups one node coordinates at once.
pub const ACTIVE_GROUPS_MAX: usize = 10_000;
/// Partitions whose ends a describe asks for at once.
const DESCRIBE_PARALLEL: usize = 32;
/// How long a describe waits for one partition's end.
const DESCRIBE_WAIT: Duration = Duration::from_secs(2);

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

fn down(kind: Down) -> Result<pb::ConsumeResponse> {
    Ok(pb::ConsumeResponse { kind: Some(kind) })
}

fn member_name(id: MemberId) -> String {
    format!("m{id}")
}

struct ActorRef {
    tx: mpsc::Sender<Event>,
    mode: Mode,
}

/// The running groups, and the ids their members get.
#[derive(Default)]
pub struct Registry {
    actors: std::sync::Mutex<HashMap<GroupKey, ActorRef>>,
    next_member: AtomicU64,
}

impl Registry {
    fn actor(&self, key: &GroupKey) -> Option<mpsc::Sender<Event>> {
        self.actors
            .lock()
            .expect("groups lock")
            .get(key)
            .filter(|a| !a.tx.is_closed())
            .map(|a| a.tx.clone())
    }

    /// Drops a stopped group's entry (not a newer one's).
    fn forget(&self, key: &GroupKey) {
        let mut actors = self.actors.lock().expect("groups lock");
        if actors.get(key).is_some_and(|a| a.tx.is_closed()) {
            actors.remove(key);
        }
    }
}

/// The groups this node coordinates (as the metadata leader).
pub struct Groups {
    broker: Arc<Broker>,
    registry: Arc<Registry>,
}

impl Groups {
    pub fn new(broker: Arc<Broker>) -> Groups {
        Groups {
            broker,
            registry: Arc::default(),
        }
    }

    /// Adds a member; answers its id once the group has it.
    pub async fn join(
        &self,
        key: GroupKey,
        mode: Mode,
        settings: Settings,
        out: Out,
    ) -> Result<MemberId> {
        let tx = {
            let mut actors = self.registry.actors.lock().expect("groups lock");
            match actors.get(&key).filter(|a| !a.tx.is_closed()) {
                Some(a) if a.mode != mode => {
                    return Err(GroupError::ModeMismatch {
                        group: key.0,
                        topic: key.1,
                        mode: a.mode,
                    })
                }
                Some(a) => a.tx.clone(),
                None => {
                    actors.retain(|_, a| !a.tx.is_closed());
                    if actors.len() >= ACTIVE_GROUPS_MAX {
                        return Err(GroupError::TooManyGroups(ACTIVE_GROUPS_MAX));
                    }
                    let (tx, rx) = mpsc::channel(EVENTS);
                    let weak = tx.downgrade();
                    tokio::spawn(actor::run(
                        self.broker.clone(),
                        self.registry.clone(),
                        key.clone(),
                        mode,
                        rx,
                        weak,
                    ));
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
        let stopped = || GroupError::Stopped("it stopped meanwhile".into());
        let (reply, answer) = oneshot::channel();
        tx.send(Event::Join {
            settings,
            out,
            reply,
        })
        .await
        .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// A member's request.
    pub async fn request(&self, key: &GroupKey, member: MemberId, kind: Kind) {
        if let Some(tx) = self.registry.actor(key) {
            let _ = tx.send(Event::Request { member, kind }).await;
        }
    }

    pub async fn leave(&self, key: &GroupKey, member: MemberId) {
        if let Some(tx) = self.registry.actor(key) {
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
        let Some(tx) = self.registry.actor(key) else {
            return 0;
        };
        Self::ask(&tx, |reply| Event::Ack { refs, reply })
            .await
            .unwrap_or(0)
    }

    pub async fn nack(&self, key: &GroupKey, refs: Vec<(u32, u64)>, delay: Duration) -> u32 {
        let Some(tx) = self.registry.actor(key) else {
            return 0;
        };
        Self::ask(&tx, |reply| Event::Nack { refs, delay, reply })
            .await
            .unwrap_or(0)
    }

    /// Every group running on this node (its coordinator), as it describes itself.
    pub async fn running(&self) -> Vec<pb::GroupInfo> {
        self.active(|_| true)
            .await
            .into_iter()
            .map(|(_, info)| info)
            .collect()
    }

    /// The running groups `which` selects, as they describe themselves.
    async fn active(&self, which: impl Fn(&GroupKey) -> bool) -> Vec<(GroupKey, pb::GroupInfo)> {
        let actors: Vec<_> = self
            .registry
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

    pub async fn list(&self) -> Vec<pb::GroupSummary> {
        let mut all: BTreeMap<GroupKey, pb::GroupSummary> = BTreeMap::new();
        for ((g, t), o) in &self.broker.cluster().groups {
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
    pub async fn describe(&self, group: &str) -> Result<Vec<pb::GroupInfo>> {
        group_name(group)?;
        let broker = &self.broker;
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
                            committed: o.partitions.get(&p).map(|c| c.offset.0),
                            ..Default::default()
                        })
                        .collect(),
                },
            );
        }
        for ((_, t), info) in self.active(|k| k.0 == group).await {
            infos.insert(t, info);
        }
        if infos.is_empty() {
            return Err(GroupError::NoGroup(group.to_string()));
        }
        let mut out: Vec<pb::GroupInfo> = infos.into_values().collect();
        for info in &mut out {
            use futures::StreamExt;
            let parts: Vec<u32> = info.partitions.iter().map(|p| p.partition).collect();
            let topic = info.topic.clone();
            let ends: Vec<_> = futures::stream::iter(parts.into_iter().map(|p| {
                let topic = topic.clone();
                async move {
                    tokio::time::timeout(DESCRIBE_WAIT, reader::bounds(broker, &topic, p)).await
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
        Ok(out)
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
