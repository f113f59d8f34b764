//! The loop of one core: drains its mailbox in batches and runs each request as a task on its
//! own executor. The core owns its partitions outright; nothing here is shared with other
//! threads except the mailbox.
//!
//! ```text
//! mailbox ──drain ≤ 256──▶ appends grouped by partition ──▶ Partition::append (one batch, one fsync)
//!                          fetch / positions / open / close ──▶ one task each
//! ```

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use glommio::channels::local_channel::{LocalReceiver, LocalSender};

use super::mailbox::{LocalMailbox, MailboxReceiver};
use super::mirror::Mirror;
use super::partition::{AppendRequest, Partition};
use super::request::{CoreError, CoreRequest, PartitionKey};
use crate::proto::internal as pb;
use crate::raft::RaftError;
use crate::types::{CoreId, TopicUid};

/// Longest a peer's Raft message may take on this core before it is answered with an error
/// (the rest of its exchange is answered meanwhile); under the transport's call timeout.
const RAFT_MESSAGE_DEADLINE: Duration = Duration::from_secs(5);

/// How often a core without replicated groups wakes (for retention).
const IDLE_TICK: Duration = Duration::from_secs(1);

/// How often a core looks into every replicated group, quiet ones included (see
/// `drive_groups`). Quiet groups need no look in between: a write, a message, a peer's
/// liveness changing or a damaged segment wakes them. Looking into all 5,000 groups of a core
/// every second (their metrics, their leadership) was most of an idle node's CPU at 10,000
/// partitions.
const FULL_SCAN: Duration = Duration::from_secs(10);

/// How often a core runs its once-a-second chores: retention, the leadership summary of its
/// awake groups, and a cheap look for damage found by reads in quiet groups.
const SECOND: Duration = Duration::from_secs(1);

/// Requests taken from the mailbox in one go.
const DRAIN_MAX: usize = 256;

pub(super) type Partitions = Rc<RefCell<HashMap<PartitionKey, Rc<Partition>>>>;
/// Mirror topics' replicas on this core (logs without a Raft group: `shard::mirror`).
type Mirrors = Rc<RefCell<HashMap<PartitionKey, Rc<Mirror>>>>;
/// The appends that arrived together for one partition.
type AppendGroup = (PartitionKey, Vec<AppendRequest>);

/// Runs a core until it is told to shut down or every sender is gone.
///
/// The mailbox task runs in the executor's default task queue and is woken through io_uring
/// (see `mailbox.rs`), not through glommio's wake-ups from other threads: glommio 0.9 lost
/// those for tasks in a `Latency::Matters` queue (1,000 publishes/s stalled after ~2 s for
/// 28 s) and, rarely, in the default queue too. (Only the watchdog's kick of a stalled core
/// uses them, beside the socket.) How soon a *busy* core sees its mailbox is bounded by the
/// executor's preempt timer (`PREEMPT_TIMER` in `shard/mod.rs`).
pub async fn run(core: CoreId, mailbox: MailboxReceiver, raft_tick: Duration) {
    mailbox_loop(core, mailbox.attach(), raft_tick).await
}

/// One timer per core drives every replicated Raft group on it (openraft's own tick is a
/// timer per group waking every fifth of a heartbeat: 300 idle partitions cost a core). Every
/// `heartbeat`, leaders send heartbeats; a follower that has not heard a leader for its
/// election timeout starts a (pre-vote) election. The core ticks once per heartbeat, and in
/// between only when a follower's election comes due, at most every fifth of a heartbeat
/// (elections checked only once per heartbeat fell into a few buckets: two followers often
/// timed out together, split the vote and waited another round). It used to tick every fifth
/// of a heartbeat whenever a group was awake, though a follower that hears its leader is a
/// whole timeout from due: five wake-ups per heartbeat where one does.
///
/// A core without replicated groups (a node alone, or a core whose partitions all live
/// elsewhere) does not tick: it wakes every [`IDLE_TICK`] for retention only, and at once when
/// a partition opens (`opened`). Each wake of an idle executor costs ~0.1 ms of CPU; ticking
/// every 30 ms on two cores was most of an idle node's 1% of a core.
async fn drive_groups(
    core: CoreId,
    partitions: Partitions,
    heartbeat: Duration,
    stop: Rc<std::cell::Cell<bool>>,
    opened: LocalReceiver<()>,
) {
    // The shortest time between two ticks.
    let tick = heartbeat / crate::raft::election::CHECKS_PER_HEARTBEAT;
    let mut next_beat = std::time::Instant::now();
    // The earliest election due among the awake followers, as of the last tick.
    let mut next_due: Option<std::time::Instant> = None;
    let mut leadership = LeadershipLog::new(core);
    let mut idle = false;
    // The groups ticked: every replicated group but the quiet ones (`partition::quiet`), which
    // are looked at only in a full scan (every `FULL_SCAN`, and whenever a peer's liveness
    // changes) or when something wakes them (a write, a message: `partition::take_woken`).
    let mut awake: Vec<Rc<Partition>> = Vec::new();
    let mut awake_keys: HashSet<PartitionKey> = HashSet::new();
    let mut scanned: Option<std::time::Instant> = None;
    let mut chores: Option<std::time::Instant> = None;
    let mut alive_before: Vec<(crate::raft::types::NodeId, u64)> = Vec::new();
    loop {
        if idle {
            let sleep = glommio::timer::sleep(IDLE_TICK);
            let woken = opened.recv();
            futures::pin_mut!(sleep, woken);
            futures::future::select(sleep, woken).await;
        } else {
            // The next beat, or a follower's election due before it. With only quiet groups
            // a tick per heartbeat is enough to notice a dead leader's node or a woken group
            // (a woken leader heartbeats at its next beat; its followers' timers run at
            // least a lease).
            // Never less than a tick after the last pass ended: a pass longer than a
            // heartbeat (an overloaded core) would otherwise loop without yielding, starving
            // the mailbox and the groups' own tasks.
            let at = next_due
                .map_or(next_beat, |due| due.min(next_beat))
                .max(std::time::Instant::now() + tick);
            glommio::timer::sleep(at.saturating_duration_since(std::time::Instant::now())).await;
        }
        if stop.get() {
            return;
        }
        let now = std::time::Instant::now();
        let (transport, window, replicated) = {
            let all = partitions.borrow();
            let first = all.values().find(|p| p.replicated());
            (
                first.and_then(|p| p.transport().cloned()),
                first.map_or(Duration::ZERO, |p| p.liveness_window()),
                first.is_some(),
            )
        };
        idle = !replicated;
        // Which peers are alive, once per tick for every group (quiet groups rely on it).
        let live = super::partition::Liveness {
            heard: transport.map(|t| t.heard()).unwrap_or_default(),
            window,
        };
        let mut alive: Vec<(crate::raft::types::NodeId, u64)> = live
            .heard
            .keys()
            .filter_map(|n| live.alive(*n).map(|i| (*n, i)))
            .collect();
        alive.sort_unstable();
        // A replica opened (or reopened) since is woken (`tick_group`), not looked for: a full
        // scan on each of the thousands of opens of a big topic kept the cores busy scanning.
        let full = scanned.is_none_or(|at| now.saturating_duration_since(at) >= FULL_SCAN)
            || alive != alive_before;
        let second = full || chores.is_none_or(|at| now.saturating_duration_since(at) >= SECOND);
        if second {
            chores = Some(now);
        }
        if full {
            awake = partitions
                .borrow()
                .values()
                .filter(|p| p.replicated())
                .cloned()
                .collect();
            awake_keys = awake.iter().map(|p| p.key.clone()).collect();
            scanned = Some(now);
            alive_before = alive;
            super::partition::take_woken();
        } else {
            for key in super::partition::take_woken() {
                if awake_keys.contains(&key) {
                    continue;
                }
                if let Some(p) = partitions.borrow().get(&key).filter(|p| p.replicated()) {
                    awake.push(p.clone());
                    awake_keys.insert(key);
                }
            }
            if second {
                // A read (a fetch, the check of a segment after opening) that found a damaged
                // segment in a quiet group: ticked, so its next beat repairs it.
                for p in partitions.borrow().values() {
                    if p.replicated() && p.found_damage() && awake_keys.insert(p.key.clone()) {
                        awake.push(p.clone());
                    }
                }
            }
        }
        // Idle, every wake is a beat (retention and the leadership summary run on beats). A
        // full scan is a beat too: silent leaders look at their followers' liveness only on
        // beats, and a scan may be the only time they are ticked.
        let beat = now >= next_beat || idle || full || second;
        next_due = None;
        for p in awake.clone() {
            // Damage is looked for on beats only (not on ticks for a follower's election):
            // a repair a few ms later loses nothing.
            let damaged = if beat { p.damage() } else { None };
            if let Some(why) = damaged {
                // Taken now, so the next tick does not take it again.
                let taken = p.take_for_repair();
                glommio::spawn_local(super::repair::repair(partitions.clone(), p, why, taken))
                    .detach();
                continue;
            }
            if let Some(due) = p.drive(now, beat, &live).await {
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
            }
        }
        // The next beat a heartbeat after this pass ended: a core whose passes take long (more
        // groups than it can drive) spaces its beats out rather than beating back to back and
        // leaving no time for the groups' own work (with a fixed interval, 500 new partitions
        // on three debug-build nodes took three times as long to elect their leaders).
        if beat {
            next_beat = std::time::Instant::now() + heartbeat;
        }
        // Quiet groups, and replicas closed or taken for repair, leave the ticked set.
        let mut closed = Vec::new();
        awake.retain(|p| {
            let keep = !p.asleep();
            if !keep {
                awake_keys.remove(&p.key);
                if p.is_closed() {
                    closed.push(p.key.clone());
                }
            }
            keep
        });
        // A replica closed and opened again (a repair, a close and an open of the same key)
        // whose wake was taken while the closed one was still here: ticked from now.
        for key in closed {
            if let Some(p) = partitions.borrow().get(&key).filter(|p| !p.is_closed()) {
                if p.replicated() && awake_keys.insert(key) {
                    awake.push(p.clone());
                }
            }
        }
        // The leadership summary: every group on a full scan, the awake ones once a second (a
        // quiet group's leadership does not change while it stays quiet).
        if full {
            leadership.observe(partitions.borrow().values(), true, now);
        } else if second {
            leadership.observe(awake.iter(), false, now);
        }
        // Retention once a second: walking every partition on every beat was most of an idle
        // node's CPU at 10,000 partitions.
        if second || idle {
            // Retention, in tasks of their own: a purge may wait for a snapshot.
            let due: Vec<Rc<Partition>> = partitions
                .borrow()
                .values()
                .filter(|p| p.retention_due(now))
                .cloned()
                .collect();
            for p in due {
                glommio::spawn_local(async move { p.retained().await }).detach();
            }
        }
    }
}

/// Partition names a leadership summary lists before "and N more".
const NAMES_LISTED: usize = 5;
/// Least time between two leadership summaries of a core (changes in between are summed).
const SUMMARY_EVERY: Duration = Duration::from_secs(2);

/// Tells the operator which of this core's replicated groups this node gained or lost the
/// leadership of, and how many elections there were: one summary line per core at most every
/// [`SUMMARY_EVERY`], so a failover of a thousand partitions is a few lines, not a thousand.
struct LeadershipLog {
    core: CoreId,
    /// Each group's leadership and term when last looked at.
    seen: HashMap<PartitionKey, (bool, u64)>,
    gained: Vec<String>,
    lost: Vec<String>,
    elections: usize,
    last_summary: std::time::Instant,
}

impl LeadershipLog {
    fn new(core: CoreId) -> Self {
        LeadershipLog {
            core,
            seen: HashMap::new(),
            gained: Vec::new(),
            lost: Vec::new(),
            elections: 0,
            last_summary: std::time::Instant::now(),
        }
    }

    /// Looks at `groups`' leadership: every replicated group of the core if `all` (groups
    /// gone are forgotten), or only some (the awake ones).
    fn observe<'a>(
        &mut self,
        groups: impl Iterator<Item = &'a Rc<Partition>>,
        all: bool,
        now: std::time::Instant,
    ) {
        let mut present = HashSet::new();
        for p in groups.filter(|p| p.replicated()) {
            let (leads, term) = p.leadership();
            if all {
                present.insert(p.key.clone());
            }
            let before = match self.seen.get_mut(&p.key) {
                Some(seen) => Some(std::mem::replace(seen, (leads, term))),
                None => self.seen.insert(p.key.clone(), (leads, term)),
            };
            let (led, old_term) = before.unwrap_or((false, term));
            if term > old_term {
                self.elections += 1;
            }
            match (led, leads) {
                (false, true) => self.gained.push(p.key.to_string()),
                (true, false) => self.lost.push(p.key.to_string()),
                _ => {}
            }
        }
        if all {
            self.seen.retain(|k, _| present.contains(k));
        }
        let changed = !self.gained.is_empty() || !self.lost.is_empty() || self.elections > 0;
        if !changed || now.duration_since(self.last_summary) < SUMMARY_EVERY {
            return;
        }
        let leading = self.seen.values().filter(|(leads, _)| *leads).count();
        let names = |v: &[String]| {
            let mut s = v[..v.len().min(NAMES_LISTED)].join(", ");
            if v.len() > NAMES_LISTED {
                s.push_str(&format!(" and {} more", v.len() - NAMES_LISTED));
            }
            s
        };
        let mut parts = Vec::new();
        if !self.gained.is_empty() {
            parts.push(format!("now leads {}", names(&self.gained)));
        }
        if !self.lost.is_empty() {
            parts.push(format!("no longer leads {}", names(&self.lost)));
        }
        if self.elections > 0 {
            parts.push(format!("{} elections", self.elections));
        }
        tracing::info!(
            "leadership on core {}: {}; it leads {leading} of its {} groups",
            self.core,
            parts.join("; "),
            self.seen.len(),
        );
        self.gained.clear();
        self.lost.clear();
        self.elections = 0;
        self.last_summary = now;
    }
}

async fn mailbox_loop(core: CoreId, mut mailbox: LocalMailbox, raft_tick: Duration) {
    let partitions: Partitions = Rc::new(RefCell::new(HashMap::new()));
    let mirrors: Mirrors = Rc::new(RefCell::new(HashMap::new()));
    let stop_driver = Rc::new(std::cell::Cell::new(false));
    let (opened, opened_rx) = glommio::channels::local_channel::new_bounded(1);
    let opened = Rc::new(opened);
    glommio::spawn_local(drive_groups(
        core,
        partitions.clone(),
        raft_tick,
        stop_driver.clone(),
        opened_rx,
    ))
    .detach();
    tracing::debug!(%core, "core started");
    while let Some(first) = mailbox.recv().await {
        let mut batch = Vec::with_capacity(16);
        batch.push(first);
        while batch.len() < DRAIN_MAX {
            match mailbox.try_recv() {
                Some(r) => batch.push(r),
                None => break,
            }
        }
        tracing::trace!(%core, requests = batch.len(), "mailbox drained");
        // Appends per partition in arrival order, so they become one batch each.
        let mut appends: Vec<AppendGroup> = Vec::new();
        for req in batch {
            match req {
                CoreRequest::Append {
                    key,
                    records,
                    producer,
                    reply,
                } => match appends.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push((records, producer, reply)),
                    None => appends.push((key, vec![(records, producer, reply)])),
                },
                CoreRequest::Shutdown { reply } => {
                    if mailbox.rescued() > 0 {
                        tracing::info!(
                            %core,
                            rescued = mailbox.rescued(),
                            "requests found by the mailbox re-check (lost wake-ups)"
                        );
                    }
                    stop_driver.set(true);
                    mailbox.stopping();
                    let r = shutdown(core, &partitions, &mirrors).await;
                    let _ = reply.send(r);
                    return;
                }
                CoreRequest::Run(f) => f(),
                other => {
                    let replicas = Replicas {
                        partitions: partitions.clone(),
                        mirrors: mirrors.clone(),
                    };
                    glommio::spawn_local(handle(core, other, replicas, opened.clone())).detach();
                }
            }
        }
        for (key, requests) in appends {
            let p = partitions.borrow().get(&key).cloned();
            match p {
                Some(p) => {
                    glommio::spawn_local(async move { p.append(requests).await }).detach();
                }
                None => {
                    let error = match mirrors.borrow().contains_key(&key) {
                        true => CoreError::Mirror(format!("{key} is a read-only mirror")),
                        false => CoreError::UnknownPartition(key.to_string()),
                    };
                    for (_, _, reply) in requests {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
    if mailbox.rescued() > 0 {
        tracing::info!(
            %core,
            rescued = mailbox.rescued(),
            "requests found by the mailbox re-check (lost wake-ups)"
        );
    }
    // Every sender is gone: the node is going away without a shutdown request.
    stop_driver.set(true);
    let _ = shutdown(core, &partitions, &mirrors).await;
}

fn lookup(partitions: &Partitions, key: &PartitionKey) -> Result<Rc<Partition>, CoreError> {
    partitions
        .borrow()
        .get(key)
        .cloned()
        .ok_or_else(|| CoreError::UnknownPartition(key.to_string()))
}

/// Every replica on a core: Raft partitions and mirrors.
struct Replicas {
    partitions: Partitions,
    mirrors: Mirrors,
}

impl Replicas {
    fn mirror(&self, key: &PartitionKey) -> Option<Rc<Mirror>> {
        self.mirrors.borrow().get(key).cloned()
    }

    /// The partition `key`, for what only a Raft group does.
    fn group(&self, key: &PartitionKey) -> Result<Rc<Partition>, CoreError> {
        lookup(&self.partitions, key).map_err(|e| match self.mirror(key) {
            Some(_) => CoreError::NoGroup(key.to_string()),
            None => e,
        })
    }
}

/// `wake_driver` wakes the group driver when a partition opens (it may be replicated).
async fn handle(
    core: CoreId,
    req: CoreRequest,
    replicas: Replicas,
    wake_driver: Rc<LocalSender<()>>,
) {
    let partitions = replicas.partitions.clone();
    match req {
        CoreRequest::Open { open, reply } => {
            let (key, uid) = (open.key.clone(), open.uid);
            let held = {
                let (p, m) = (partitions.borrow(), replicas.mirrors.borrow());
                p.get(&key)
                    .map(|p| (p.uid, false))
                    .or_else(|| m.get(&key).map(|m| (m.uid, true)))
            };
            if let Some((held_uid, mirror)) = held {
                let r = if held_uid != uid {
                    Err(CoreError::OlderIncarnation(key.to_string()))
                } else if mirror != open.mirror {
                    // A promoted mirror is reopened as a partition by its promotion.
                    Err(CoreError::Mirror(format!(
                        "{key} is open as a {}",
                        if mirror { "mirror" } else { "partition" }
                    )))
                } else {
                    Ok(())
                };
                let _ = reply.send(r);
                return;
            }
            if open.mirror {
                let r = Mirror::open(*open).await.map(|m| {
                    replicas.mirrors.borrow_mut().insert(key, Rc::new(m));
                });
                let _ = reply.send(r);
                return;
            }
            let opened = Partition::open(*open, core).await;
            let r = match opened {
                Ok(p) => {
                    super::partition::tick_group(&key);
                    partitions.borrow_mut().insert(key, Rc::new(p));
                    // Full: a wake-up is already pending.
                    let _ = wake_driver.try_send(());
                    Ok(())
                }
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Close { key, reply } if replicas.mirror(&key).is_some() => {
            let m = replicas.mirrors.borrow_mut().remove(&key);
            let r = match m {
                Some(m) => m.close().await,
                None => Ok(()),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Close { key, reply } => {
            super::repair::wait_for_repair(&partitions, &key).await;
            let p = partitions.borrow_mut().remove(&key);
            let r = match p {
                Some(p) => p.close().await,
                None => Ok(()),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Fetch {
            key,
            from,
            max_bytes,
            max_wait,
            fresh,
            whole,
            reply,
        } => {
            let r = match lookup(&partitions, &key) {
                Err(_) if replicas.mirror(&key).is_some() => {
                    let m = replicas.mirror(&key).expect("checked");
                    m.fetch(from, max_bytes, max_wait, whole).await
                }
                Ok(p) => p.fetch(from, max_bytes, max_wait, fresh, whole).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Raft { messages, reply } => {
            let answers = messages.into_iter().map(|(key, uid, m)| {
                let p = replicas.group(&key);
                async move {
                    let quiet = m.quiet;
                    let answer = match (p, m.body) {
                        (Ok(p), Some(body)) if p.uid == TopicUid(uid) => {
                            // One slow or stuck group must not hold back the answers of every
                            // other group in the same exchange (the peer would find this node
                            // unreachable for all of them).
                            let handled =
                                glommio::timer::timeout(RAFT_MESSAGE_DEADLINE, async {
                                    Ok(p.handle(body, quiet).await)
                                })
                                .await;
                            handled.unwrap_or_else(|_| {
                                tracing::warn!(partition = %key, "a peer's raft message was not handled within {RAFT_MESSAGE_DEADLINE:?}");
                                Err(RaftError::Refused(format!(
                                    "{key}: not handled within {RAFT_MESSAGE_DEADLINE:?}"
                                )))
                            })
                        }
                        (Ok(_), Some(_)) => {
                            Err(RaftError::Refused(format!("{key}: another incarnation")))
                        }
                        (Err(e), _) => Err(RaftError::Refused(e.to_string())),
                        (_, None) => Err(RaftError::Malformed {
                            what: "raft message",
                            error: "no body".into(),
                        }),
                    };
                    pb::RaftReply {
                        call_id: m.call_id,
                        // On the wire an error is its text.
                        body: Some(match answer {
                            Ok(b) => pb::raft_reply::Body::Ok(b),
                            Err(e) => pb::raft_reply::Body::Error(e.to_string()),
                        }),
                    }
                }
            });
            let replies = futures::future::join_all(answers).await;
            let _ = reply.send(Ok(replies));
        }
        CoreRequest::Mirror { key, pulled, reply } => {
            let r = match replicas.mirror(&key) {
                Some(m) => m.take(pulled).await,
                None => Err(CoreError::UnknownPartition(key.to_string())),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Members { key, target, reply } => {
            let r = match replicas.group(&key) {
                Ok(p) => p.change_members(target).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Replica { key, reply } => {
            let r = match (lookup(&partitions, &key), replicas.mirror(&key)) {
                (Err(_), Some(m)) => Ok(m.state()),
                (r, _) => r.map(|p| p.state()),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Replicas { keys, reply } => {
            let states = keys
                .iter()
                .map(
                    |key| match (lookup(&partitions, key), replicas.mirror(key)) {
                        (Err(_), Some(m)) => Some(m.state()),
                        (r, _) => r.ok().map(|p| p.state()),
                    },
                )
                .collect();
            let _ = reply.send(Ok(states));
        }
        CoreRequest::States { limit, reply } => {
            let mut states: Vec<_> = partitions
                .borrow()
                .iter()
                .take(limit)
                .map(|(k, p)| (k.clone(), p.state()))
                .collect();
            let room = limit.saturating_sub(states.len());
            states.extend(
                replicas
                    .mirrors
                    .borrow()
                    .iter()
                    .take(room)
                    .map(|(k, m)| (k.clone(), m.state())),
            );
            let _ = reply.send(Ok(states));
        }
        CoreRequest::TransferLeader { key, to, reply } => match replicas.group(&key) {
            Ok(p) => {
                let _ = reply.send(Ok(p.transfer_to(to).await));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        CoreRequest::HandOff { reply } => {
            let all: Vec<Rc<Partition>> = partitions.borrow().values().cloned().collect();
            let mut moved = 0;
            for p in all {
                moved += usize::from(p.hand_off().await);
            }
            let _ = reply.send(Ok(moved));
        }
        CoreRequest::Positions { key, reply } => {
            let r = match (lookup(&partitions, &key), replicas.mirror(&key)) {
                (Err(_), Some(m)) => Ok(m.log.positions()),
                (r, _) => r.map(|p| p.log.positions()),
            };
            let _ = reply.send(r);
        }
        CoreRequest::Compact { key, before, reply } => {
            let r = match replicas.group(&key) {
                Ok(p) => p.purge_before(before).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        }
        CoreRequest::ListOffsets { key, at, reply } => {
            let r = match lookup(&partitions, &key) {
                Err(_) if replicas.mirror(&key).is_some() => {
                    let m = replicas.mirror(&key).expect("checked");
                    m.list_offsets(at).await
                }
                Ok(p) => p.list_offsets(at).await,
                Err(e) => Err(e),
            };
            let _ = reply.send(r);
        }
        // Handled by the mailbox loop itself; never routed here.
        CoreRequest::Append { reply, .. } => drop(reply),
        CoreRequest::Shutdown { reply } => drop(reply),
        CoreRequest::Run(f) => drop(f),
    }
}

async fn shutdown(
    core: CoreId,
    partitions: &Partitions,
    mirrors: &Mirrors,
) -> Result<(), CoreError> {
    let all: Vec<Rc<Partition>> = partitions.borrow_mut().drain().map(|(_, p)| p).collect();
    let mut result = Ok(());
    let all_mirrors: Vec<Rc<Mirror>> = mirrors.borrow_mut().drain().map(|(_, m)| m).collect();
    for m in all_mirrors {
        if let Err(e) = m.close().await {
            tracing::error!(%core, partition = %m.key, error = %e, "flush on shutdown failed");
            result = Err(e);
        }
    }
    for p in all {
        if let Err(e) = p.close().await {
            tracing::error!(%core, partition = %p.key, error = %e, "flush on shutdown failed");
            result = Err(e);
        }
    }
    tracing::debug!(%core, "core stopped");
    result
}
