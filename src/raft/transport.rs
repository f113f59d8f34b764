//! Raft traffic between nodes: every group's messages to one peer share one connection and
//! travel together.
//!
//! ```text
//! core k (glommio)                       network shard (tokio)                    peer
//! group ── RaftRequest ──try_send──▶ [bounded queue per peer] ── link task ── Exchange(many) ──▶
//!   ▲                                                                │
//!   └──── mailbox: Run(complete the replies of core k) ◀── replies ──┘
//! ```
//!
//! The link task takes everything queued for its peer (up to a bound) and sends it as one
//! `Exchange` call, with a few calls in flight: while they are out, new messages of all groups
//! accumulate into the next one. So the number of calls follows the load, not the number of
//! partitions. Replies go back to the calling core through its mailbox (glommio 0.9 loses
//! wake-ups from other threads, see `shard/mailbox.rs`), one mailbox request per core per call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::channel::oneshot;

use super::error::RaftError;
use super::turns::{Turn, Turns, TURN_WAIT};
use super::types::NodeId;
use crate::proto::internal as pb;
use crate::tls::ClientTls;
use crate::types::{ClusterId, CoreId};

/// Runs a closure on a core (`on_core(core, f)`): answers to a group's calls complete on the
/// core that owns the group. The node wires this to the cores' mailboxes, so this module needs
/// nothing of the shard above it.
pub type OnCore = Arc<
    dyn Fn(CoreId, Box<dyn FnOnce() + Send>) -> futures::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;

/// Messages waiting for one peer; a group finding it full treats the peer as unreachable.
const QUEUE: usize = 4096;
/// Messages and bytes (of batches) one Exchange carries at most.
const EXCHANGE_MESSAGES: usize = 1024;
const EXCHANGE_BYTES: usize = 8 << 20;
/// Exchange calls in flight to one peer: at least `IN_FLIGHT_MIN`, and more the further away
/// it is (one per `IN_FLIGHT_SPACING` of its round trip, up to `IN_FLIGHT_MAX`). While every
/// slot is taken, messages wait for the next call: with 4 calls over a 40 ms round trip, up to
/// 10 ms (geo-sync's publish p99 went from 87 to 58 ms with 16).
const IN_FLIGHT_MIN: usize = 4;
const IN_FLIGHT_MAX: usize = 32;
const IN_FLIGHT_SPACING: Duration = Duration::from_micros(2500);
/// An Exchange that takes longer than this fails (each message also has its own deadline).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest message a node sends or accepts between nodes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The answer to one message: the response's encoding, or why there is none.
pub type Answer = Result<Bytes, RaftError>;

/// A message for a peer, with the way back to the group that sent it.
pub(super) struct Outgoing {
    pub(super) core: CoreId,
    pub(super) message: pb::RaftRequest,
    pub(super) reply: oneshot::Sender<Answer>,
}

struct Link {
    addr: String,
    queue: tokio::sync::mpsc::Sender<Outgoing>,
}

/// This node's side of the inter-node transport. `Send + Sync`: cores hold it to send, the
/// network shard runs its links.
pub struct Transport {
    me: NodeId,
    /// This node's cluster id, sent with every call.
    cluster: Arc<ClusterId>,
    tls: Option<ClientTls>,
    links: Mutex<HashMap<NodeId, Link>>,
    on_core: OnCore,
    runtime: tokio::runtime::Handle,
    /// Peers whose traffic is dropped (fault injection in tests).
    isolated: RwLock<HashSet<NodeId>>,
    /// Nodes' current addresses from the cluster metadata: they win over the address a group's
    /// membership recorded when the node was added (a node that moved keeps its id).
    addresses: RwLock<HashMap<NodeId, String>>,
    /// Whether the last call to each peer got through (absent: no call made yet). A change is
    /// logged once, so a dead peer is reported when it goes, not on every heartbeat.
    reachable: Mutex<HashMap<NodeId, bool>>,
    /// Set when a peer refused this node as removed from the cluster.
    removed: tokio::sync::watch::Sender<bool>,
    /// Random, chosen at start, sent with every exchange: peers see a restart as a change. It
    /// also moves on when a replica on this node closes, is taken for repair or stops on an
    /// error ([`Transport::bump_incarnation`]): the peers' quiet groups it led or followed
    /// wake, as they would after a restart (a quiet follower watches its leader's node, and
    /// must not keep waiting for a leader replica that is gone while the node lives).
    incarnation: std::sync::atomic::AtomicU64,
    /// When each peer's last exchange arrived here, and the incarnation it came with.
    heard: Mutex<HashMap<NodeId, (Instant, u64)>>,
    /// A link with nothing to send for this long sends an exchange without messages, so its
    /// peer knows this node is alive (quiet groups need no heartbeats of their own).
    keepalive: Duration,
    /// Each peer's smoothed round trip (as TCP's: 7/8 the last value plus 1/8 the new one),
    /// and whether it was logged as over `keepalive` (the heartbeat interval).
    round_trips: Mutex<HashMap<NodeId, RoundTrip>>,
    /// Where each peer link's exchanges are (see [`Turns`]).
    turns: Turns,
}

/// A peer's smoothed round trip (as TCP's: 7/8 the last value plus 1/8 the new one), and
/// whether it is over the heartbeat interval.
#[derive(Clone, Copy, Debug)]
struct RoundTrip {
    smooth: Duration,
    slow: bool,
    /// The least round trip seen lately, and when: the path's own delay, which a stalled or
    /// loaded peer (slower answers, never faster) does not raise. It sizes the pipelines.
    floor: Option<(Duration, Instant)>,
    /// The peer said it takes a link's exchanges in order (`ExchangeResponse.ordered`, in its
    /// last answer): without it, nothing is pipelined to it.
    ordered: bool,
}

/// How long the least round trip seen stands before a later one replaces it.
const FLOOR_WINDOW: Duration = Duration::from_secs(10);

impl RoundTrip {
    fn new() -> RoundTrip {
        RoundTrip {
            smooth: Duration::ZERO,
            slow: false,
            floor: None,
            ordered: false,
        }
    }

    /// The round trip that sizes pipelines to the peer: the least lately, if it takes a link's
    /// exchanges in order.
    fn pipelining(&self) -> Option<Duration> {
        self.floor.filter(|_| self.ordered).map(|(least, _)| least)
    }

    /// Takes in one round trip; `Some(true)` when the smoothed value goes over `interval`,
    /// `Some(false)` when it is back under half of it (a gap between the two, so a round trip
    /// near the interval does not flap).
    fn observe(&mut self, took: Duration, interval: Duration) -> Option<bool> {
        let now = Instant::now();
        match self.floor {
            Some((least, at)) if took >= least && now.duration_since(at) < FLOOR_WINDOW => {}
            _ => self.floor = Some((took, now)),
        }
        self.smooth = (self.smooth * 7 + took) / 8;
        if self.smooth > interval && !self.slow {
            self.slow = true;
            Some(true)
        } else if self.smooth < interval / 2 && self.slow {
            self.slow = false;
            Some(false)
        } else {
            None
        }
    }
}

/// A peer's node as this node last heard it: its incarnation, and how long ago.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heard {
    pub incarnation: u64,
    pub ago: Duration,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("me", &self.me).finish()
    }
}

impl Transport {
    /// Call from inside the tokio runtime that will run the links.
    /// `tls`: connect to peers over TLS, presenting this node's certificate.
    pub fn new(
        me: NodeId,
        cluster: Arc<ClusterId>,
        on_core: OnCore,
        tls: Option<ClientTls>,
        keepalive: Duration,
    ) -> Arc<Transport> {
        Arc::new(Transport {
            me,
            cluster,
            tls,
            links: Mutex::new(HashMap::new()),
            on_core,
            runtime: tokio::runtime::Handle::current(),
            isolated: RwLock::new(HashSet::new()),
            addresses: RwLock::new(HashMap::new()),
            reachable: Mutex::new(HashMap::new()),
            removed: tokio::sync::watch::channel(false).0,
            incarnation: std::sync::atomic::AtomicU64::new(rand::random::<u64>() >> 1 | 1),
            heard: Mutex::new(HashMap::new()),
            keepalive,
            round_trips: Mutex::new(HashMap::new()),
            turns: Turns::new(TURN_WAIT),
        })
    }

    /// Waits for an exchange's turn (see [`Turns::turn`]).
    pub async fn turn(&self, from: NodeId, link: u64, seq: u64) -> Turn<'_> {
        self.turns.turn(from, link, seq).await
    }

    /// This node's incarnation (see [`Heard`]).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A replica on this node closed, was taken for repair or stopped: peers wake the quiet
    /// groups shared with this node (see `incarnation`).
    pub fn bump_incarnation(&self) {
        self.incarnation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A peer's exchange arrived (the peer service calls this for every one it accepts).
    pub fn heard_from(&self, peer: NodeId, incarnation: u64) {
        self.heard
            .lock()
            .expect("heard lock")
            .insert(peer, (Instant::now(), incarnation));
    }

    /// Every peer heard from so far: its incarnation and how long ago.
    pub fn heard(&self) -> HashMap<NodeId, Heard> {
        let now = Instant::now();
        self.heard
            .lock()
            .expect("heard lock")
            .iter()
            .map(|(n, (at, inc))| {
                (
                    *n,
                    Heard {
                        incarnation: *inc,
                        ago: now.saturating_duration_since(*at),
                    },
                )
            })
            .collect()
    }

    /// How long ago `peer`'s last exchange arrived (`None`: never).
    pub fn silent_for(&self, peer: NodeId) -> Option<Duration> {
        self.heard
            .lock()
            .expect("heard lock")
            .get(&peer)
            .map(|(at, _)| at.elapsed())
    }

    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// Drops all traffic to and from these nodes (tests); an empty set heals.
    pub fn isolate(&self, peers: HashSet<NodeId>) {
        *self.isolated.write().expect("isolated lock") = peers;
    }

    pub fn is_isolated_from(&self, peer: NodeId) -> bool {
        self.isolated.read().expect("isolated lock").contains(&peer)
    }

    /// Turns true once a peer refuses this node as removed from the cluster.
    pub fn removed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.removed.subscribe()
    }

    /// Whether the last call to `peer` got through; `None` before the first.
    pub fn reachable(&self, peer: NodeId) -> Option<bool> {
        self.reachable
            .lock()
            .expect("reachable lock")
            .get(&peer)
            .copied()
    }

    /// The round trip of an exchange without messages to `peer` (a keepalive: no work on the
    /// peer's cores, so it is the network's and the two nodes' event loops' time). Raft sends
    /// heartbeats with the heartbeat interval as their time limit (openraft's): a peer further
    /// away than that gets heartbeats it cannot answer in time, and its groups' leaders cannot
    /// keep their leases through it. Logged when a peer's smoothed round trip goes over the
    /// interval and when it is back under half of it.
    fn round_trip(&self, peer: NodeId, addr: &str, took: Duration) {
        crate::metrics::NODE.peer_round_trip.observe(took);
        let mut all = self.round_trips.lock().expect("round trips lock");
        // Starting from zero: the first exchange (which may include connecting) weighs an
        // eighth, and a link needs a few slow round trips in a row to be called slow.
        let rt = all.entry(peer).or_insert_with(RoundTrip::new);
        match rt.observe(took, self.keepalive) {
            Some(true) => tracing::warn!(
                node = %peer,
                %addr,
                round_trip_ms = rt.smooth.as_millis() as u64,
                heartbeat_ms = self.keepalive.as_millis() as u64,
                "the round trip to node {peer} is longer than the Raft heartbeat interval: heartbeats to it time out; raise raft_heartbeat_ms above the longest round trip between nodes (docs/geo.md, \"Timing across regions\")"
            ),
            Some(false) => {
                tracing::info!(node = %peer, %addr, round_trip_ms = rt.smooth.as_millis() as u64, "the round trip to node {peer} is under the Raft heartbeat interval again")
            }
            None => {}
        }
    }

    /// What sizes the pipelines to `peer`: the least round trip of keepalive exchanges to it
    /// lately (the network's, without work on its cores; a peer stalled or loaded for a while
    /// does not raise it). `None` before the first, and while the peer has not said it takes a
    /// link's exchanges in order (a node of an older version, during a rolling upgrade): it
    /// gets one append at a time, which needs no order between calls.
    pub fn pipelining_round_trip(&self, peer: NodeId) -> Option<Duration> {
        self.round_trips
            .lock()
            .expect("round trips lock")
            .get(&peer)
            .and_then(RoundTrip::pipelining)
    }

    /// Notes whether `peer` said, in an answer, that it takes a link's exchanges in order.
    fn saw_order(&self, peer: NodeId, ordered: bool) {
        let mut all = self.round_trips.lock().expect("round trips lock");
        let rt = all.entry(peer).or_insert_with(RoundTrip::new);
        rt.ordered = ordered;
    }

    /// Records how a call to `peer` went, and logs when that changes.
    fn saw(&self, peer: NodeId, addr: &str, up: bool, error: Option<&str>) {
        let before = self
            .reachable
            .lock()
            .expect("reachable lock")
            .insert(peer, up);
        match (before, up) {
            (Some(true), true) | (Some(false), false) => {}
            (None, true) => tracing::info!(node = %peer, %addr, "connected to node {peer}"),
            (Some(false), true) => {
                tracing::info!(node = %peer, %addr, "node {peer} is reachable again")
            }
            (None, false) => {
                tracing::warn!(node = %peer, %addr, error = error.unwrap_or(""), "cannot reach node {peer}; will keep trying")
            }
            (Some(true), false) => {
                tracing::warn!(node = %peer, %addr, error = error.unwrap_or(""), "lost contact with node {peer}; will keep trying")
            }
        }
    }

    /// Sets the nodes' addresses as the cluster metadata has them, and opens a link to every
    /// peer that has none: its keepalives tell the peer this node is alive even if no group
    /// ever sends it a message (a leader counts a follower's node alive only once it has heard
    /// from it).
    pub fn set_addresses(self: &Arc<Self>, addresses: HashMap<NodeId, String>) {
        *self.addresses.write().expect("addresses lock") = addresses.clone();
        for (node, addr) in addresses {
            if node != self.me {
                self.link(node, &addr);
            }
        }
    }

    /// The link to `target` at `addr`, started (or restarted at a new address) if need be.
    fn link(self: &Arc<Self>, target: NodeId, addr: &str) -> tokio::sync::mpsc::Sender<Outgoing> {
        let mut links = self.links.lock().expect("links lock");
        if let Some(l) = links.get(&target).filter(|l| l.addr == addr) {
            return l.queue.clone();
        }
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        self.runtime
            .spawn(run_link(self.clone(), target, addr.to_string(), rx));
        links.insert(
            target,
            Link {
                addr: addr.to_string(),
                queue: tx.clone(),
            },
        );
        tx
    }

    /// Queues a message for `target` (at `addr` unless the metadata knows better); never waits.
    pub(super) fn send(
        self: &Arc<Self>,
        target: NodeId,
        addr: &str,
        out: Outgoing,
    ) -> Result<(), RaftError> {
        if self.is_isolated_from(target) {
            return Err(RaftError::CutOff { node: target });
        }
        let addr = {
            let book = self.addresses.read().expect("addresses lock");
            book.get(&target).map_or(addr, String::as_str).to_string()
        };
        let queue = self.link(target, &addr);
        queue.try_send(out).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => {
                RaftError::QueueFull { node: target }
            }
            tokio::sync::mpsc::error::TrySendError::Closed(_) => RaftError::ShuttingDown,
        })
    }

    /// Queues a one-way message for `target` from a group on `core`: its answer is dropped.
    pub fn tell(
        self: &Arc<Self>,
        core: CoreId,
        target: NodeId,
        addr: &str,
        message: pb::RaftRequest,
    ) -> Result<(), RaftError> {
        let (reply, _) = oneshot::channel();
        self.send(
            target,
            addr,
            Outgoing {
                core,
                message,
                reply,
            },
        )
    }

    /// Hands answers back to the core whose groups wait for them. If the core stays saturated
    /// the answers are dropped: the groups time out and retry.
    async fn deliver(&self, core: CoreId, answers: Vec<(oneshot::Sender<Answer>, Answer)>) {
        (self.on_core)(
            core,
            Box::new(move || {
                for (tx, a) in answers {
                    let _ = tx.send(a);
                }
            }),
        )
        .await;
    }
}

/// Exchange calls one link keeps in flight to a peer this far away (see `IN_FLIGHT_MIN`).
fn exchanges_in_flight(round_trip: Option<Duration>) -> usize {
    let far = round_trip.map_or(0, |rt| rt.as_micros() / IN_FLIGHT_SPACING.as_micros());
    (far as usize).clamp(IN_FLIGHT_MIN, IN_FLIGHT_MAX)
}

fn body_bytes(m: &pb::RaftRequest) -> usize {
    match &m.body {
        Some(pb::raft_request::Body::Append(a)) => a
            .entries
            .iter()
            .map(|e| match &e.payload {
                Some(pb::entry::Payload::Batch(b)) => b.len(),
                _ => 64,
            })
            .sum::<usize>(),
        _ => 64,
    }
}

/// Sends everything queued for one peer, in batches, over one reused connection.
async fn run_link(
    transport: Arc<Transport>,
    target: NodeId,
    addr: String,
    mut queue: tokio::sync::mpsc::Receiver<Outgoing>,
) {
    let endpoint = match crate::tls::endpoint(&addr) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(%target, %addr, error = %e, "bad peer address");
            while let Some(out) = queue.recv().await {
                let _ = out.reply.send(Err(RaftError::Unreachable {
                    node: target,
                    why: e.clone(),
                }));
            }
            return;
        }
    };
    let client =
        pb::peer_client::PeerClient::new(crate::tls::channel(&endpoint, transport.tls.as_ref()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_MAX));
    // This link's exchanges are numbered, so the peer takes them in order (`Transport::turn`).
    let link = rand::random::<u64>() | 1;
    let mut seq = 0;
    loop {
        // Wait for a free slot first: what queues meanwhile joins the next call.
        let calls = exchanges_in_flight(transport.pipelining_round_trip(target));
        let Ok(slot) = slots
            .clone()
            .acquire_many_owned((IN_FLIGHT_MAX / calls) as u32)
            .await
        else {
            return;
        };
        // Nothing to send for a keepalive interval: an exchange without messages, so the peer
        // knows this node is alive.
        let first = match tokio::time::timeout(transport.keepalive, queue.recv()).await {
            Ok(Some(m)) => Some(m),
            Ok(None) => return,
            Err(_) if transport.is_isolated_from(target) => continue,
            Err(_) => None,
        };
        let mut bytes = first.as_ref().map_or(0, |f| body_bytes(&f.message));
        let mut batch: Vec<Outgoing> = first.into_iter().collect();
        while batch.len() < EXCHANGE_MESSAGES && bytes < EXCHANGE_BYTES {
            match queue.try_recv() {
                Ok(m) => {
                    bytes += body_bytes(&m.message);
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let mut client = client.clone();
        let transport = transport.clone();
        let addr = addr.clone();
        seq += 1;
        tokio::spawn(async move {
            let mut messages = Vec::with_capacity(batch.len());
            let mut waiting = Vec::with_capacity(batch.len());
            for (i, out) in batch.into_iter().enumerate() {
                let mut m = out.message;
                m.call_id = i as u64;
                messages.push(m);
                waiting.push(Some((out.core, out.reply)));
            }
            let mut request = tonic::Request::new(pb::ExchangeRequest {
                from: transport.me.0,
                to: target.0,
                messages,
                cluster: transport.cluster.get().to_string(),
                incarnation: transport.incarnation(),
                link,
                seq,
            });
            request.set_timeout(CALL_TIMEOUT);
            let keepalive = waiting.is_empty();
            let started = Instant::now();
            let result = client.exchange(request).await;
            if keepalive && result.is_ok() {
                transport.round_trip(target, &addr, started.elapsed());
            }
            let mut answers: Vec<Option<Answer>> = (0..waiting.len()).map(|_| None).collect();
            match &result {
                Ok(_) => transport.saw(target, &addr, true, None),
                Err(s) if s.metadata().contains_key(crate::proto::metadata::REMOVED) => {
                    transport.removed.send_replace(true);
                }
                Err(s) => {
                    // It may come back as another version: nothing is pipelined to it until
                    // its answers say it keeps order again.
                    transport.saw_order(target, false);
                    transport.saw(target, &addr, false, Some(s.message()));
                }
            }
            match result {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    transport.saw_order(target, resp.ordered);
                    for r in resp.replies {
                        let Some(slot) = answers.get_mut(r.call_id as usize) else {
                            continue;
                        };
                        *slot = Some(match r.body {
                            Some(pb::raft_reply::Body::Ok(b)) => Ok(b),
                            Some(pb::raft_reply::Body::Error(e)) => Err(RaftError::Remote(e)),
                            None => Err(RaftError::Remote("an empty reply".into())),
                        });
                    }
                }
                Err(status) => {
                    tracing::debug!(%target, code = ?status.code(), message = status.message(), "exchange failed");
                    let e = RaftError::Unreachable {
                        node: target,
                        why: status.message().to_string(),
                    };
                    for a in answers.iter_mut() {
                        *a = Some(Err(e.clone()));
                    }
                }
            }
            drop(slot);
            // Group the answers by core: one mailbox request per core.
            let mut by_core: HashMap<CoreId, Vec<(oneshot::Sender<Answer>, Answer)>> =
                HashMap::new();
            for (w, a) in waiting.into_iter().zip(answers) {
                // A one-way message's sender does not wait (see `Transport::tell`).
                if let Some((core, tx)) = w.filter(|(_, tx)| !tx.is_canceled()) {
                    let a = a.unwrap_or_else(|| {
                        Err(RaftError::Remote("no reply for this message".into()))
                    });
                    by_core.entry(core).or_default().push((tx, a));
                }
            }
            for (core, answers) in by_core {
                transport.deliver(core, answers).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_peer_does_not_look_further_away() {
        let ms = Duration::from_millis;
        let mut rt = RoundTrip::new();
        for _ in 0..10 {
            rt.observe(ms(40), ms(150));
        }
        // A peer paused for seconds answers late: its smoothed round trip rises, its least
        // one (which sizes the pipelines) does not.
        rt.observe(ms(2700), ms(150));
        assert!(rt.smooth > ms(300));
        assert_eq!(rt.floor.map(|(f, _)| f), Some(ms(40)));
        // A nearer path shows at once.
        rt.observe(ms(1), ms(150));
        assert_eq!(rt.floor.map(|(f, _)| f), Some(ms(1)));
    }

    #[test]
    fn nothing_is_pipelined_to_a_peer_that_does_not_keep_order() {
        let ms = Duration::from_millis;
        let mut rt = RoundTrip::new();
        rt.observe(ms(40), ms(150));
        // An older node's answers do not say `ordered`: one append, the fewest calls.
        assert_eq!(rt.pipelining(), None);
        assert_eq!(exchanges_in_flight(rt.pipelining()), IN_FLIGHT_MIN);
        assert_eq!(crate::raft::network::appends_in_flight(rt.pipelining()), 1);
        rt.ordered = true;
        assert_eq!(rt.pipelining(), Some(ms(40)));
        assert_eq!(crate::raft::network::appends_in_flight(rt.pipelining()), 21);
        // Restarted as an older version again.
        rt.ordered = false;
        assert_eq!(rt.pipelining(), None);
    }

    #[test]
    fn a_peer_further_away_gets_more_exchanges_in_flight() {
        let ms = Duration::from_millis;
        assert_eq!(exchanges_in_flight(None), IN_FLIGHT_MIN);
        assert_eq!(exchanges_in_flight(Some(ms(1))), IN_FLIGHT_MIN);
        assert_eq!(exchanges_in_flight(Some(ms(40))), 16);
        assert_eq!(exchanges_in_flight(Some(ms(500))), IN_FLIGHT_MAX);
        // Each call takes IN_FLIGHT_MAX / n permits: never more than n at once, never none.
        for n in IN_FLIGHT_MIN..=IN_FLIGHT_MAX {
            let per = IN_FLIGHT_MAX / n;
            assert!(per >= 1 && IN_FLIGHT_MAX / per >= n && IN_FLIGHT_MAX / per < 2 * n);
        }
    }

    #[test]
    fn a_round_trip_over_the_heartbeat_is_reported_once_and_not_for_one_slow_exchange() {
        let ms = Duration::from_millis;
        let interval = ms(100);
        let mut rt = RoundTrip {
            smooth: ms(40),
            ..RoundTrip::new()
        };
        // One exchange delayed by a loaded machine does not make the peer slow.
        assert_eq!(rt.observe(ms(400), interval), None);
        for _ in 0..20 {
            assert_eq!(rt.observe(ms(40), interval), None);
        }
        // A link that stays slower than the interval is reported once.
        let reports: Vec<_> = (0..30)
            .filter_map(|_| rt.observe(ms(150), interval))
            .collect();
        assert_eq!(reports, vec![true]);
        // Just under the interval again is not enough to call it back ...
        assert!((0..30).all(|_| rt.observe(ms(90), interval).is_none()));
        // ... under half of it is, once.
        let reports: Vec<_> = (0..30)
            .filter_map(|_| rt.observe(ms(30), interval))
            .collect();
        assert_eq!(reports, vec![false]);
    }
}
