//! Consumer and queue groups: a member that joins again by itself.
//!
//! ```text
//! join(group, topic) ─▶ task: Consume on a node (relayed to the coordinator) ─▶ deliveries ─▶ channel ─▶ next()
//!                         │ heartbeats, commits, acks, answers revocations
//!                         └ call ends or fails ─▶ joins again on the next node
//! ```
//!
//! Stream mode (a consumer group): the group shares the topic's partitions among its members,
//! each partition read by one member in order. A record counts as consumed once the *next*
//! call of [`GroupConsumer::next`] (or [`GroupConsumer::commit`], or
//! [`GroupConsumer::close`]) is made after it: the caller has finished with it. Consumed
//! positions are committed every [`GroupOptions::commit_interval`], when a partition is taken
//! away, and on `close`. Delivery is at least once: a record being processed when its member
//! lost the partition (or died) is delivered again to whoever gets it.
//!
//! Queue mode (a queue group): every record of every partition goes to one member at a time;
//! the member acknowledges it ([`GroupConsumer::ack`]), rejects it ([`GroupConsumer::nack`]),
//! or lets the ack wait run out, and then it is delivered again, up to `max_deliveries` times
//! before it goes to the dead-letter topic.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;

use crate::client::Client;
use crate::error::Error;
use crate::proto as pb;
use crate::proto::consume_request::Kind as Up;
use crate::proto::consume_response::Kind as Down;

/// How a group shares its topic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupMode {
    /// Each partition to one member, in order; positions are committed.
    #[default]
    Stream,
    /// Each record to one member at a time, acknowledged one by one.
    Queue,
}

/// A member's settings; [`Default`] gives the nodes' defaults and a commit every second.
#[derive(Clone, Debug)]
pub struct GroupOptions {
    pub mode: GroupMode,
    /// Where a partition without a committed position starts: the earliest record (`false`,
    /// the default) or the end.
    pub start_latest: bool,
    /// Shown by DescribeGroup; default `HOSTNAME:pid`.
    pub member_name: Option<String>,
    /// The group drops a member it hears nothing from for this long (the member heartbeats
    /// three times as often). `None`: the nodes' default (10 s); 1 s to 300 s.
    pub session_timeout: Option<Duration>,
    /// Stream: records per delivery message; queue: unacknowledged deliveries held at most.
    /// 0: the nodes' default (100); at most 10,000.
    pub max_in_flight: u32,
    /// Stream: how often consumed positions are committed (`None`: only by
    /// [`GroupConsumer::commit`] and [`GroupConsumer::close`]).
    pub commit_interval: Option<Duration>,
    /// Stream: let the node commit the positions of *delivered* records this often as well
    /// (at most once for a record delivered and not processed when its member dies).
    pub node_auto_commit: Option<Duration>,
    /// Queue: a delivery not acknowledged within this is delivered again. `None`: 30 s.
    pub ack_wait: Option<Duration>,
    /// Queue: deliveries before a record goes to the dead-letter topic. 0: 5.
    pub max_deliveries: u32,
    /// Queue: the dead-letter topic (`None`: `<topic>.dlq`).
    pub dead_letter_topic: Option<String>,
}

impl Default for GroupOptions {
    fn default() -> GroupOptions {
        GroupOptions {
            mode: GroupMode::Stream,
            start_latest: false,
            member_name: None,
            session_timeout: None,
            max_in_flight: 0,
            commit_interval: Some(Duration::from_secs(1)),
            node_auto_commit: None,
            ack_wait: None,
            max_deliveries: 0,
            dead_letter_topic: None,
        }
    }
}

/// A record delivered to a group member.
#[derive(Clone, Debug)]
pub struct Message {
    pub record: pb::Record,
    /// Queue mode: how many times it has been delivered (1 the first time); 0 in stream mode.
    pub deliveries: u32,
}

/// Records buffered between the member's task and `next`.
const BUFFER: usize = 64;
/// Delivery messages read ahead while a commit waits for its confirmation, which comes behind
/// what the node had queued for the member: its queue and a relaying node's (16 messages each)
/// and the connection's buffers.
const MESSAGES_WAITING: usize = 40;
/// Acks and nacks held while the member is joining again.
const HELD_ACKS: usize = 10_000;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a commit waits for its confirmation, and `close` for the group to let go.
const CONFIRM: Duration = Duration::from_secs(10);

/// A member of a consumer or queue group; see [`Client::join_group`].
pub struct GroupConsumer {
    mode: GroupMode,
    rx: mpsc::Receiver<Item>,
    cmd: mpsc::Sender<Cmd>,
    shared: Arc<Mutex<Shared>>,
    /// Stream mode: the record `next` returned last, not yet counted as consumed.
    pending: Option<Consumed>,
    task: tokio::task::JoinHandle<()>,
}

/// What the member's task and its handle share.
#[derive(Default)]
struct Shared {
    /// Stream mode: the partitions this member has, each with the assignment it came with.
    assigned: HashMap<u32, u64>,
    /// Stream mode: the next offset to consume in each partition (consumed up to it).
    positions: BTreeMap<u32, u64>,
    /// Positions moved since the last commit.
    dirty: bool,
    member_id: String,
}

impl Shared {
    /// Counts a record (or a run of control records) as consumed. Its position is kept even
    /// if the partition was taken away meanwhile (so that this member does not process it
    /// again should it get the partition back), but committed only while assigned.
    fn consume(&mut self, c: Consumed) {
        let p = self.positions.entry(c.partition).or_insert(0);
        if c.next > *p {
            *p = c.next;
            if self.assigned.get(&c.partition) == Some(&c.assignment) {
                self.dirty = true;
            }
        }
    }

    /// The positions of the assigned partitions.
    fn offsets(&self) -> Vec<pb::PartitionOffset> {
        self.positions
            .iter()
            .filter(|(p, _)| self.assigned.contains_key(p))
            .map(|(p, o)| pb::PartitionOffset {
                partition: *p,
                offset: *o,
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
struct Consumed {
    partition: u32,
    assignment: u64,
    next: u64,
}

enum Item {
    Record(Message, Option<Consumed>),
    /// Stream mode: the partition goes on past control records.
    Advance(Consumed),
    Failed(Error),
}

enum Cmd {
    /// An ack or a nack, as sent up the call.
    Settle(Up),
    Commit(oneshot::Sender<Result<(), Error>>),
    Close(oneshot::Sender<Result<(), Error>>),
}

impl GroupConsumer {
    /// The next record; `None` once the member has ended (after an error it returned).
    /// In stream mode, calling it counts the record it returned before as consumed.
    pub async fn next(&mut self) -> Option<Result<Message, Error>> {
        self.settle();
        loop {
            match self.rx.recv().await? {
                Item::Failed(e) => return Some(Err(e)),
                Item::Advance(c) => {
                    let mut shared = self.shared.lock().unwrap();
                    if shared.assigned.get(&c.partition) == Some(&c.assignment) {
                        shared.consume(c);
                    }
                }
                Item::Record(m, None) => return Some(Ok(m)),
                Item::Record(m, Some(c)) => {
                    let shared = self.shared.lock().unwrap();
                    // A record of a partition taken away since (or of an earlier session,
                    // or already consumed before a rejoin) is not this member's to process.
                    if shared.assigned.get(&c.partition) != Some(&c.assignment)
                        || shared
                            .positions
                            .get(&c.partition)
                            .is_some_and(|p| m.record.offset < *p)
                    {
                        continue;
                    }
                    drop(shared);
                    self.pending = Some(c);
                    return Some(Ok(m));
                }
            }
        }
    }

    fn settle(&mut self) {
        if let Some(c) = self.pending.take() {
            self.shared.lock().unwrap().consume(c);
        }
    }

    /// Queue mode: settles a delivery. The acknowledgment is sent, not confirmed: one lost
    /// (the member's call broke) means the record is delivered again.
    pub async fn ack(&self, m: &Message) -> Result<(), Error> {
        let deliveries = vec![delivery_ref(m)];
        self.send(Cmd::Settle(Up::Ack(pb::Acks { deliveries })))
            .await
    }

    /// Queue mode: rejects a delivery; it is delivered again after `delay` (to any member),
    /// or goes to the dead-letter topic once it has been delivered `max_deliveries` times.
    pub async fn nack(&self, m: &Message, delay: Duration) -> Result<(), Error> {
        let ms = delay.as_millis().min(u128::from(u32::MAX)) as u32;
        let deliveries = vec![delivery_ref(m)];
        self.send(Cmd::Settle(Up::Nack(pb::Nacks {
            deliveries,
            delay_ms: ms,
        })))
        .await
    }

    /// Stream mode: commits what has been consumed (every record `next` returned) and waits
    /// until the group has it replicated.
    pub async fn commit(&mut self) -> Result<(), Error> {
        if self.mode != GroupMode::Stream {
            return Ok(());
        }
        self.settle();
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Commit(tx)).await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Leaves the group: stream mode commits what was consumed first (and waits for it, for
    /// up to 10 s); queue-mode acks already sent go before the leave.
    pub async fn close(mut self) -> Result<(), Error> {
        self.settle();
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Close(tx)).await?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// The partitions this member has now (stream mode).
    pub fn assignment(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .shared
            .lock()
            .unwrap()
            .assigned
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    /// The member id the group gave this member's current session ("" while joining).
    pub fn member_id(&self) -> String {
        self.shared.lock().unwrap().member_id.clone()
    }

    async fn send(&self, c: Cmd) -> Result<(), Error> {
        self.cmd.send(c).await.map_err(|_| Error::Closed)
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn delivery_ref(m: &Message) -> pb::DeliveryRef {
    pb::DeliveryRef {
        partition: m.record.partition,
        offset: m.record.offset,
    }
}

impl Client {
    /// Joins `group` on `topic` as a member and follows what the group gives it; see
    /// [`GroupConsumer`]. The member joins through a node of the client's region when there
    /// is one (the node relays to the group's coordinator), and joins again through the next
    /// node when its call ends. Settings the nodes refuse (a session timeout out of range, a
    /// group already of the other mode) end it with that error at the first `next`.
    pub async fn join_group(
        &self,
        group: &str,
        topic: &str,
        options: GroupOptions,
    ) -> Result<GroupConsumer, Error> {
        if group.is_empty() || topic.is_empty() {
            return Err(Error::Invalid("the group and topic need names".into()));
        }
        if options.commit_interval.is_some_and(|d| d.is_zero()) {
            return Err(Error::Invalid("commit_interval must be above zero".into()));
        }
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis().min(u32::MAX as u128) as u32);
        let join = pb::JoinGroup {
            group: group.to_string(),
            topic: topic.to_string(),
            mode: match options.mode {
                GroupMode::Stream => pb::GroupMode::Stream,
                GroupMode::Queue => pb::GroupMode::Queue,
            } as i32,
            member_name: options.member_name.clone().unwrap_or_else(|| {
                format!(
                    "{}:{}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "tern-client".into()),
                    std::process::id()
                )
            }),
            session_timeout_ms: ms(options.session_timeout),
            max_in_flight: options.max_in_flight,
            start_latest: options.start_latest,
            auto_commit_interval_ms: ms(options.node_auto_commit),
            ack_wait_ms: ms(options.ack_wait),
            max_deliveries: options.max_deliveries,
            dead_letter_topic: options.dead_letter_topic.clone().unwrap_or_default(),
        };
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (items, rx) = mpsc::channel(BUFFER);
        let (cmd, cmds) = mpsc::channel(BUFFER);
        let member = Member {
            client: self.clone(),
            join,
            options,
            shared: shared.clone(),
            items,
            cmds,
            held: Vec::new(),
            assignments: 0,
        };
        Ok(GroupConsumer {
            mode: member.options.mode,
            rx,
            cmd,
            shared,
            pending: None,
            task: tokio::spawn(member.run()),
        })
    }
}

/// The member's task.
struct Member {
    client: Client,
    join: pb::JoinGroup,
    options: GroupOptions,
    shared: Arc<Mutex<Shared>>,
    items: mpsc::Sender<Item>,
    cmds: mpsc::Receiver<Cmd>,
    /// Acks and nacks made while no call was up.
    held: Vec<Up>,
    /// Assignments received, for telling one from the next.
    assignments: u64,
}

/// How a session (one Consume call) ended.
enum End {
    /// Closed, or the handle was dropped.
    Done,
    /// The call ended or could not be made: join again.
    Lost(tonic::Status),
}

/// Commits waiting for their confirmation: each partition's offset still unconfirmed.
struct Waiter {
    left: HashMap<u32, u64>,
    /// Sent again once: the node may drop a confirmation while the call is full.
    resent: bool,
    reply: oneshot::Sender<Result<(), Error>>,
    until: tokio::time::Instant,
}

impl Member {
    async fn run(mut self) {
        let mut k = 0usize;
        let mut backoff = BACKOFF_MIN;
        loop {
            let nodes = self.client.read_nodes();
            let addr = nodes[k % nodes.len()].clone();
            let began = tokio::time::Instant::now();
            let status = match self.session(&addr).await {
                End::Done => return,
                End::Lost(s) => s,
            };
            if !rejoinable(&status) {
                self.fail(Error::Status(status)).await;
                return;
            }
            if self.items.is_closed() {
                return;
            }
            if began.elapsed() > Duration::from_secs(10) {
                backoff = BACKOFF_MIN;
            }
            self.client.refresh().await;
            k += 1;
            // Keep taking acks (and a close) while waiting to join again.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    c = self.cmds.recv() => match c {
                        None => return,
                        Some(Cmd::Settle(u)) => self.hold(u),
                        Some(Cmd::Commit(reply)) => {
                            let _ = reply.send(Err(Error::Status(tonic::Status::unavailable(
                                "the member is joining its group again; its positions are committed once it has",
                            ))));
                        }
                        Some(Cmd::Close(reply)) => {
                            let unsaved = self.options.mode == GroupMode::Stream && self.shared.lock().unwrap().dirty;
                            let _ = reply.send(if unsaved {
                                Err(Error::GaveUp {
                                    after: Duration::ZERO,
                                    last: "closed while joining its group again: what was consumed since the last commit is delivered again".into(),
                                })
                            } else if !self.held.is_empty() {
                                Err(Error::GaveUp {
                                    after: Duration::ZERO,
                                    last: format!("closed while joining its group again: {} acknowledgments were not sent (those records are delivered again)", self.held.len()),
                                })
                            } else {
                                Ok(())
                            });
                            return;
                        }
                    }
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Hands the error to `next`, answering the handle's commands with it meanwhile (the
    /// handle may be waiting in `commit` or `close` rather than in `next`).
    async fn fail(mut self, e: Error) {
        let items = self.items.clone();
        let send = items.send(Item::Failed(e.clone()));
        tokio::pin!(send);
        loop {
            tokio::select! {
                _ = &mut send => break,
                c = self.cmds.recv() => match c {
                    None => return,
                    Some(Cmd::Commit(reply)) | Some(Cmd::Close(reply)) => {
                        let _ = reply.send(Err(e.clone()));
                    }
                    Some(Cmd::Settle(_)) => {}
                },
            }
        }
    }

    fn hold_request(&mut self, r: pb::ConsumeRequest) {
        if let Some(up) = r.kind {
            self.hold(up);
        }
    }

    fn hold(&mut self, up: Up) {
        if self.held.len() < HELD_ACKS {
            self.held.push(up);
        }
    }

    async fn session(&mut self, addr: &str) -> End {
        let queue = self.options.mode == GroupMode::Queue;
        let (tx, rx) = mpsc::channel::<pb::ConsumeRequest>(BUFFER);
        let up = |k: Up| pb::ConsumeRequest { kind: Some(k) };
        let _ = tx.try_send(up(Up::Join(self.join.clone())));
        let mut stream = match self.client.node(addr) {
            Err(e) => return End::Lost(tonic::Status::unavailable(e.to_string())),
            Ok(mut c) => match c
                .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                Ok(s) => s.into_inner(),
                Err(s) => return End::Lost(s),
            },
        };
        for h in std::mem::take(&mut self.held) {
            if tx.send(up(h)).await.is_err() {
                break;
            }
        }
        let session_ms = match self.join.session_timeout_ms {
            0 => 10_000,
            ms => ms,
        };
        let mut heartbeat =
            tokio::time::interval(Duration::from_millis(u64::from(session_ms / 3).max(100)));
        let mut commit = tokio::time::interval(
            self.options
                .commit_interval
                .unwrap_or(Duration::from_secs(3600)),
        );
        let mut expiry = tokio::time::interval(Duration::from_millis(500));
        let mut waiters: Vec<Waiter> = Vec::new();
        // Deliveries on their way to `next`: the call is read only while few wait, so a slow
        // reader slows the group's deliveries, while heartbeats, acks and commits go on.
        let mut buf: VecDeque<Item> = VecDeque::new();
        let per_message = match self.join.max_in_flight {
            0 => 100,
            n => n as usize,
        };
        let read_ahead = MESSAGES_WAITING * per_message;
        let items = self.items.clone();
        let end = loop {
            tokio::select! {
                permit = items.reserve(), if !buf.is_empty() => match permit {
                    Err(_) => break End::Done,
                    Ok(permit) => {
                        if let Some(item) = buf.pop_front() {
                            permit.send(item);
                        }
                    }
                },
                msg = stream.next(), if buf.len() < BUFFER || (!waiters.is_empty() && buf.len() < read_ahead) => {
                    let msg = match msg {
                        None => break End::Lost(tonic::Status::unavailable("the group call ended")),
                        Some(Err(s)) => break End::Lost(s),
                        Some(Ok(m)) => m,
                    };
                    match msg.kind {
                        Some(Down::Joined(j)) => self.shared.lock().unwrap().member_id = j.member_id,
                        Some(Down::Assigned(a)) => {
                            self.assignments += 1;
                            let mut shared = self.shared.lock().unwrap();
                            for p in a.partitions {
                                shared.assigned.insert(p.partition, self.assignments);
                                // Consumed further in an earlier session than the group has
                                // committed: go on from there (and commit it).
                                let pos = shared.positions.entry(p.partition).or_insert(p.offset);
                                if *pos < p.offset {
                                    *pos = p.offset;
                                }
                                // Committed even with nothing consumed: a partition started
                                // at "latest" would otherwise start at a later end after a
                                // rejoin, skipping what came in between.
                                shared.dirty = true;
                            }
                        }
                        Some(Down::Revoke(r)) => {
                            let offsets = {
                                let mut shared = self.shared.lock().unwrap();
                                r.partitions
                                    .iter()
                                    .filter_map(|p| {
                                        shared.assigned.remove(p)?;
                                        let offset = shared.positions.remove(p)?;
                                        Some(pb::PartitionOffset { partition: *p, offset })
                                    })
                                    .collect()
                            };
                            for w in &mut waiters {
                                for p in &r.partitions {
                                    w.left.remove(p);
                                }
                            }
                            if tx.send(up(Up::Revoked(pb::Revoked { partitions: r.partitions, offsets }))).await.is_err() {
                                break End::Lost(tonic::Status::unavailable("the group call ended"));
                            }
                        }
                        Some(Down::Deliveries(d)) => {
                            let assignment = self.shared.lock().unwrap().assigned.get(&d.partition).copied();
                            let count = d.deliveries.len();
                            let mut last = None;
                            for (i, dl) in d.deliveries.into_iter().enumerate() {
                                let Some(record) = dl.record else { continue };
                                let consumed = match (queue, assignment) {
                                    (true, _) => None,
                                    (false, None) => continue,
                                    (false, Some(a)) => Some(Consumed {
                                        partition: d.partition,
                                        assignment: a,
                                        next: if i + 1 == count { d.next_offset.max(record.offset.saturating_add(1)) } else { record.offset.saturating_add(1) },
                                    }),
                                };
                                last = Some(record.offset);
                                buf.push_back(Item::Record(Message { record, deliveries: dl.delivery_count }, consumed));
                            }
                            if let (false, Some(a), None) = (queue, assignment, last) {
                                buf.push_back(Item::Advance(Consumed { partition: d.partition, assignment: a, next: d.next_offset }));
                            }
                        }
                        Some(Down::Committed(c)) => {
                            for o in c.offsets {
                                for w in &mut waiters {
                                    if w.left.get(&o.partition).is_some_and(|want| o.offset >= *want) {
                                        w.left.remove(&o.partition);
                                    }
                                }
                            }
                            answer(&mut waiters, false);
                        }
                        None => {}
                    }
                }
                c = self.cmds.recv() => match c {
                    None => break End::Done,
                    Some(Cmd::Settle(u)) => {
                        // A call that just ended: held for the next one.
                        if let Err(e) = tx.send(up(u)).await {
                            self.hold_request(e.0);
                        }
                    }
                    Some(Cmd::Commit(reply)) => {
                        let offsets = self.take_offsets();
                        waiters.push(Waiter {
                            left: offsets.iter().map(|o| (o.partition, o.offset)).collect(),
                            resent: false,
                            reply,
                            until: tokio::time::Instant::now() + CONFIRM,
                        });
                        if !offsets.is_empty() {
                            let _ = tx.send(up(Up::Commit(pb::Commit { offsets }))).await;
                        }
                        answer(&mut waiters, false);
                    }
                    Some(Cmd::Close(reply)) => {
                        let r = self.leave(tx, stream, queue).await;
                        let _ = reply.send(r);
                        return End::Done;
                    }
                },
                _ = heartbeat.tick() => {
                    let _ = tx.send(up(Up::Heartbeat(pb::Heartbeat {}))).await;
                }
                _ = commit.tick(), if !queue && self.options.commit_interval.is_some() => {
                    if self.shared.lock().unwrap().dirty {
                        let offsets = self.take_offsets();
                        if !offsets.is_empty() {
                            let _ = tx.send(up(Up::Commit(pb::Commit { offsets }))).await;
                        }
                    }
                }
                _ = expiry.tick(), if !waiters.is_empty() => {
                    let half = tokio::time::Instant::now() + CONFIRM / 2;
                    if waiters.iter().any(|w| !w.resent && w.until <= half) {
                        for w in waiters.iter_mut() {
                            w.resent = true;
                        }
                        let offsets = self.take_offsets();
                        if !offsets.is_empty() {
                            let _ = tx.send(up(Up::Commit(pb::Commit { offsets }))).await;
                        }
                    }
                    answer(&mut waiters, false);
                }
            }
        };
        answer(&mut waiters, true);
        // A new session gets its partitions anew; what was buffered for this one is not
        // processed (`next` drops it).
        self.shared.lock().unwrap().assigned.clear();
        end
    }

    /// The assigned partitions' positions, marked as sent.
    fn take_offsets(&self) -> Vec<pb::PartitionOffset> {
        let mut shared = self.shared.lock().unwrap();
        shared.dirty = false;
        shared.offsets()
    }

    /// Commits (stream mode) and leaves: closing the request stream leaves the group once the
    /// node has read what came before; the node then ends the call.
    async fn leave(
        &mut self,
        tx: mpsc::Sender<pb::ConsumeRequest>,
        mut stream: tonic::Streaming<pb::ConsumeResponse>,
        queue: bool,
    ) -> Result<(), Error> {
        let mut result = Ok(());
        let offsets = if queue {
            Vec::new()
        } else {
            self.take_offsets()
        };
        if !offsets.is_empty() {
            let mut left: HashMap<u32, u64> =
                offsets.iter().map(|o| (o.partition, o.offset)).collect();
            let _ = tx
                .send(pb::ConsumeRequest {
                    kind: Some(Up::Commit(pb::Commit { offsets })),
                })
                .await;
            let wait = async {
                while let Some(Ok(m)) = stream.next().await {
                    match m.kind {
                        Some(Down::Committed(c)) => {
                            for o in c.offsets {
                                if left.get(&o.partition).is_some_and(|w| o.offset >= *w) {
                                    left.remove(&o.partition);
                                }
                            }
                        }
                        Some(Down::Revoke(r)) => {
                            for p in r.partitions {
                                left.remove(&p);
                            }
                        }
                        _ => {}
                    }
                    if left.is_empty() {
                        return true;
                    }
                }
                false
            };
            if !matches!(tokio::time::timeout(CONFIRM, wait).await, Ok(true)) {
                result = Err(Error::GaveUp {
                    after: CONFIRM,
                    last: "the final commit was not confirmed".into(),
                });
            }
        }
        drop(tx);
        let drain = async { while let Some(Ok(_)) = stream.next().await {} };
        let _ = tokio::time::timeout(CONFIRM / 2, drain).await;
        result
    }
}

/// Answers the commits that are confirmed, past their time, or (`ended`) left without a call.
fn answer(waiters: &mut Vec<Waiter>, ended: bool) {
    let now = tokio::time::Instant::now();
    let mut i = 0;
    while i < waiters.len() {
        let w = &waiters[i];
        let result = if w.left.is_empty() {
            Some(Ok(()))
        } else if ended || now >= w.until {
            Some(Err(Error::GaveUp {
                after: CONFIRM,
                last: if ended {
                    "the group call ended before the commit was confirmed".into()
                } else {
                    "the commit was not confirmed".into()
                },
            }))
        } else {
            None
        };
        match result {
            Some(r) => {
                let _ = waiters.swap_remove(i).reply.send(r);
            }
            None => i += 1,
        }
    }
}

/// Whether a member whose call ended this way joins again: the node went away or could not
/// coordinate now. Refusals of the group's own limits (too many members or groups,
/// RESOURCE_EXHAUSTED) and of the settings are for good.
fn rejoinable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    )
}
