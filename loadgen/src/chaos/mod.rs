//! The chaos workload: a nemesis that injects faults on a schedule drawn from a printed seed
//! while idempotent producers and a subscriber run, then a heal phase and a final read of
//! every replica.
//!
//! ```text
//! seed ──▶ schedule: every ~F s one fault, held 1–3 s, then healed
//!   kill       SIGKILL a node, restart it (same port, same data)
//!   pause      SIGSTOP a node, SIGCONT it
//!   partition  a node cut off both ways (each side refuses the other's Raft and forwarding
//!              calls; with --netns each drops the other's packets: `netns.rs`)
//!   one-way    a node stops hearing the others (they still hear it)
//!   bridge     two nodes cut off from each other, both still reach the third
//!   corrupt    kill a node; flip a byte in, cut short, or delete one of its sealed segment
//!              files (or flip a byte of a state file); restart it
//!   move       a membership change (needs more nodes than replicas): a node's replica of a
//!              partition moves to a node without one (a new learner caught up from the
//!              leader, joint consensus, the old replica removed and its files deleted), then
//!              back again, each through MovePartition while the load runs
//!   delay      20-500 ms more one-way delay on every tern-wan link into and out of a node's
//!              region (a cluster spawned with --regions), then back to what it was
//!   clock      a node's wall clock jumps 10 s to 1 h ahead or behind, then back (nodes run
//!              under libfaketime; their monotonic clocks stay real)
//!   churn      a new node joins (`--join`, the next id), the node the previous churn added
//!              is removed (`tern cluster remove-node --wait`: drained, then gone; its
//!              process must exit by itself), and `tern cluster rebalance --wait` moves
//!              replicas onto the new one
//! heal ──▶ every fault cleared, every node running ──▶ each replica read from its own node
//! ```
//!
//! By default one fault at a time, so a majority of every group is whole between faults.
//! With `--overlap N`, up to N faults are held at once on different nodes (a membership
//! change during a kill, two nodes down together; damage, moves and delays one at a time), so
//! a group may lose its majority for a while: writes then wait, and nothing acknowledged may
//! be lost. Either way the checks must all come out clean: the producers' and the
//! subscriber's accounting (lost, duplicated, reordered), and the final read of every
//! replica: each holds every acknowledged record exactly once, and all replicas hold the same
//! record at every offset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern::proto::internal as ipb;
use tern::proto::v1 as pb;
use tokio::sync::Mutex;

use super::cluster::Cluster;
use super::payload;
use super::settings::Chaos;

mod check;
mod faults;
mod moves;

pub use check::{check_replicas, read_replica};
use faults::*;
use moves::*;

/// The faults the nemesis knows.
pub const KINDS: [&str; 10] = [
    "kill",
    "pause",
    "partition",
    "one-way",
    "bridge",
    "corrupt",
    "move",
    "delay",
    "clock",
    "churn",
];

/// How long a membership change may take before the nemesis calls it failed.
const MOVE_WAIT: Duration = Duration::from_secs(60);

/// How long each step of a `churn` (join, removal, rebalance) may take.
const CHURN_WAIT: Duration = Duration::from_secs(120);

/// A deterministic generator for the schedule (splitmix64): the same seed, the same faults.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the nemesis did, for the report.
#[derive(Default, Clone)]
pub struct Log {
    pub lines: Vec<String>,
    pub counts: BTreeMap<String, u64>,
    /// Faults the nemesis could not carry out as meant (a membership change that did not
    /// complete): not a broken guarantee, but a run that tested less than it says.
    pub failed: Vec<String>,
    /// Per kill: how long the node took from its start to serving again (listening, and
    /// answering ClusterInfo with the metadata leader known), in milliseconds.
    pub restarts_ms: Vec<u64>,
    /// Faults that started while another was held (with `--overlap` above 1), and of them
    /// those where one of the two was a membership change.
    pub overlapped: u64,
    pub moves_overlapped: u64,
    /// Nodes `churn` added to the cluster, and nodes it removed (that then exited).
    pub nodes_joined: u64,
    pub nodes_removed: u64,
}

/// What the faults share: the cluster, the cuts in force, and which nodes and exclusive
/// kinds a fault in progress holds (with more than one fault at a time).
struct Nemesis {
    cluster: Arc<Mutex<Cluster>>,
    topics: Vec<String>,
    partitions: u32,
    /// The nodes in the cluster (indexes): all spawned ones, plus those `churn` added,
    /// minus those it removed.
    members: std::sync::Mutex<Vec<usize>>,
    /// The nodes `churn` added and has not removed yet, oldest first.
    joined: std::sync::Mutex<Vec<usize>>,
    cuts: std::sync::Mutex<Cuts>,
    /// Nodes a fault has killed or paused: they cannot take cuts until they are back, when
    /// what is in force for them is applied (see [`Nemesis::back`]).
    down: std::sync::Mutex<std::collections::BTreeSet<usize>>,
    /// One computation and delivery of cuts at a time, so two faults touching one node
    /// cannot deliver their sets out of order.
    applying: Mutex<()>,
}

/// Faults of which one runs at a time even when several faults overlap: two damaged
/// replicas of a partition at once is beyond the fault model (a minority), two membership
/// changes would fight over the spare node, and two delays over the region's links.
const EXCLUSIVE: [&str; 4] = ["corrupt", "move", "delay", "churn"];

/// The class of an exclusive fault: `move` and `churn` both change memberships, so they
/// exclude each other too.
fn class(kind: &str) -> &str {
    match kind {
        "churn" => "move",
        k => k,
    }
}

/// What one fault did.
struct Done {
    line: String,
    failed: Option<String>,
    restart_ms: Option<u64>,
    /// Nodes this fault added to the cluster and removed from it.
    joined: u64,
    removed: u64,
}

impl Nemesis {
    /// Cuts each listed node off from its nodes until [`Nemesis::uncut`] with the id returned.
    async fn cut(&self, cuts: Vec<(usize, Vec<usize>)>) -> (u64, anyhow::Result<()>) {
        let (id, nodes) = {
            let mut c = self.cuts.lock().unwrap();
            c.next_id += 1;
            let id = c.next_id;
            let nodes: Vec<usize> = cuts.iter().map(|(n, _)| *n).collect();
            c.held.insert(id, cuts);
            (id, nodes)
        };
        (id, self.apply(&nodes).await)
    }

    async fn uncut(&self, id: u64) {
        let nodes: Vec<usize> = {
            let mut c = self.cuts.lock().unwrap();
            c.held
                .remove(&id)
                .unwrap_or_default()
                .into_iter()
                .map(|(n, _)| n)
                .collect()
        };
        // A node that does not answer yet (it is being restarted) is tried again for a while.
        for _ in 0..50 {
            if self.apply(&nodes).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("loadgen: chaos: could not heal the cuts of nodes {nodes:?}");
    }

    /// Sets what each of `nodes` refuses to what the faults in force ask of it.
    async fn apply(&self, nodes: &[usize]) -> anyhow::Result<()> {
        let _one = self.applying.lock().await;
        let mut result = Ok(());
        for &node in nodes {
            if self.down.lock().unwrap().contains(&node) {
                // Killed or paused by another fault: it gets its cuts when it is back.
                continue;
            }
            let from = self.cuts.lock().unwrap().of(node);
            if let Err(e) = cut(&self.cluster, node, &from).await {
                // A node `churn` removed meanwhile has exited: nothing to cut.
                if self.members.lock().unwrap().contains(&node) {
                    result = Err(e);
                }
            }
        }
        result
    }

    fn members(&self) -> Vec<usize> {
        self.members.lock().unwrap().clone()
    }

    /// The `churn` fault: a new node joins; `victim` (the node the previous churn added, if
    /// any) is removed, drained first, and must exit by itself; a rebalance then moves
    /// replicas onto the new node. Each step through the `tern` CLI a user would run, waited
    /// for ([`CHURN_WAIT`] each). Says what happened, whether every step completed, and how
    /// many nodes joined and were removed.
    async fn churn(&self, victim: Option<usize>) -> (String, bool, (u64, u64)) {
        let began = Instant::now();
        if victim.is_some() && self.joined.lock().unwrap().len() >= 2 {
            // Earlier removals failed: remove before adding more, or the cluster only grows.
            return self
                .remove(
                    victim,
                    String::from("no node added (two joined nodes wait for removal)"),
                    0,
                )
                .await;
        }
        let joined = self.cluster.lock().await.join_node().await;
        let new = match joined {
            Ok(i) => i,
            Err(e) => {
                return (
                    format!("churn: a new node could not start: {e:#}"),
                    false,
                    (0, 0),
                )
            }
        };
        let id = new as u64 + 1;
        let server = self.server_except(new).await;
        let nodes = self.members().len() + 1;
        let mut what = String::new();
        let registered = self
            .tern(&["cluster", "wait", "--nodes", &nodes.to_string()], &server)
            .await;
        if let Err(e) = registered {
            return (
                format!("churn: node {id} started but did not register: {e}"),
                false,
                (0, 0),
            );
        }
        self.members.lock().unwrap().push(new);
        self.joined.lock().unwrap().push(new);
        what.push_str(&format!("node {id} joined ({:.1?})", began.elapsed()));
        self.remove(victim, what, 1).await
    }

    /// The second half of a `churn`: removes `victim` (if any), then rebalances. `what` says
    /// what the churn did so far, `joined` how many nodes it added.
    async fn remove(
        &self,
        victim: Option<usize>,
        mut what: String,
        joined: u64,
    ) -> (String, bool, (u64, u64)) {
        let mut removed = 0;
        if let Some(v) = victim {
            let vid = (v + 1).to_string();
            let server = self.server_except(v).await;
            // It is leaving: faults from now on neither pick it nor cut others off from it.
            self.members.lock().unwrap().retain(|m| *m != v);
            let t = Instant::now();
            if let Err(e) = self
                .tern(&["cluster", "remove-node", &vid, "--wait"], &server)
                .await
            {
                return (
                    format!("{what}; removing node {vid} FAILED: {e}"),
                    false,
                    (joined, 0),
                );
            }
            let removed_in = t.elapsed();
            self.joined.lock().unwrap().retain(|m| *m != v);
            let status = self
                .cluster
                .lock()
                .await
                .reap_removed(v, Duration::from_secs(30))
                .await;
            removed = 1;
            match status {
                Some(s) => what.push_str(&format!(
                    "; node {vid} drained and removed ({removed_in:.1?}), then exited by itself ({s})"
                )),
                None => {
                    return (
                        format!(
                            "{what}; node {vid} removed ({removed_in:.1?}) but STILL RUNNING 30 s later (killed)"
                        ),
                        false,
                        (joined, 1),
                    )
                }
            }
        }
        let t = Instant::now();
        let server = self.server_except(usize::MAX).await;
        if let Err(e) = self
            .tern(&["cluster", "rebalance", "--wait"], &server)
            .await
        {
            return (
                format!("{what}; rebalance FAILED: {e}"),
                false,
                (joined, removed),
            );
        }
        what.push_str(&format!("; rebalanced ({:.1?})", t.elapsed()));
        (what, true, (joined, removed))
    }

    /// The address of a running member other than `not`.
    async fn server_except(&self, not: usize) -> String {
        let members = self.members();
        let c = self.cluster.lock().await;
        members
            .iter()
            .copied()
            .filter(|i| *i != not && c.pid(*i).is_some())
            .chain(members.iter().copied().filter(|i| *i != not))
            .map(|i| c.addrs[i].clone())
            .next()
            .unwrap_or_default()
    }

    /// Runs `tern ARGS --server SERVER` until it succeeds, for [`CHURN_WAIT`] at most (a
    /// call may meet a node another fault holds, or no metadata leader for a moment); the last
    /// error it printed otherwise.
    async fn tern(&self, args: &[&str], server: &str) -> Result<(), String> {
        let start = Instant::now();
        let mut last = String::from("not run");
        while start.elapsed() < CHURN_WAIT {
            let mut cmd = self.cluster.lock().await.cli();
            cmd.args(args)
                .args(["--server", server])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            let left = CHURN_WAIT.saturating_sub(start.elapsed());
            match tokio::time::timeout(left, cmd.output()).await {
                Ok(Ok(out)) if out.status.success() => return Ok(()),
                Ok(Ok(out)) => {
                    last = String::from_utf8_lossy(&out.stderr).trim().to_string();
                }
                Ok(Err(e)) => last = format!("running the CLI: {e}"),
                Err(_) => last = format!("not done after {CHURN_WAIT:?}"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(format!("`tern {}`: {last}", args.join(" ")))
    }

    /// Marks `node` down (killed or paused) until [`Nemesis::back`].
    fn went_down(&self, node: usize) {
        self.down.lock().unwrap().insert(node);
    }

    /// `node` runs again: the cuts in force for it now are applied (with several faults at
    /// once, another may have cut it off, or healed a cut it had, while it was down; a paused
    /// node kept its old set, and a restarted one starts without).
    async fn back(&self, node: usize) {
        self.down.lock().unwrap().remove(&node);
        for _ in 0..50 {
            if self.apply(&[node]).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("loadgen: chaos: could not give node {} its cuts", node + 1);
    }

    /// Carries out one fault of `kind` on `node` (`n`'s index), held for `hold`; `rng` draws
    /// what the fault needs beyond that (the schedule's own generator when one fault runs at
    /// a time, so a seed gives the same faults as before overlapping existed).
    async fn fault(&self, kind: &str, node: usize, hold: Duration, at: f64, rng: &mut Rng) -> Done {
        let cluster = &self.cluster;
        let members = self.members();
        let mut failed = None;
        let mut restart_ms = None;
        let (mut joined, mut removed) = (0, 0);
        let what = match kind {
            "kill" => {
                self.went_down(node);
                cluster.lock().await.kill9(node).await;
                tokio::time::sleep(hold).await;
                let began = Instant::now();
                restart(cluster, node).await;
                let addr = cluster.lock().await.addrs[node].clone();
                let serving = serving(&addr, began).await;
                self.back(node).await;
                match serving {
                    Some(took) => {
                        restart_ms = Some(took.as_millis() as u64);
                        format!(
                            "kill -9 node {}, restarted after {hold:?}, serving {took:.1?} after its start",
                            node + 1
                        )
                    }
                    None => format!(
                        "kill -9 node {}, restarted after {hold:?}, NOT serving 60 s after its start",
                        node + 1
                    ),
                }
            }
            "pause" => {
                let pid = cluster.lock().await.pid(node);
                self.went_down(node);
                signal(pid, libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal(pid, libc::SIGCONT);
                self.back(node).await;
                format!("paused node {} (SIGSTOP) for {hold:?}", node + 1)
            }
            "partition" | "one-way" => {
                let others: Vec<usize> = members.iter().copied().filter(|j| *j != node).collect();
                let mut cuts = vec![(node, others.clone())];
                if kind == "partition" {
                    cuts.extend(others.iter().map(|&j| (j, vec![node])));
                }
                let (id, r) = self.cut(cuts).await;
                if let Err(e) = r {
                    failed = Some(format!("t={at:6.1}s  {kind} of node {}: {e:#}", node + 1));
                }
                tokio::time::sleep(hold).await;
                self.uncut(id).await;
                match kind {
                    "partition" => format!("node {} cut off both ways for {hold:?}", node + 1),
                    _ => format!(
                        "node {} heard no other node for {hold:?} (they heard it)",
                        node + 1
                    ),
                }
            }
            "bridge" => {
                let others: Vec<usize> = members.iter().copied().filter(|j| *j != node).collect();
                let other = others[rng.below(others.len() as u64) as usize];
                let (id, r) = self
                    .cut(vec![(node, vec![other]), (other, vec![node])])
                    .await;
                if let Err(e) = r {
                    failed = Some(format!("t={at:6.1}s  bridge at node {}: {e:#}", node + 1));
                }
                tokio::time::sleep(hold).await;
                self.uncut(id).await;
                format!(
                    "nodes {} and {} cut off from each other for {hold:?} (both reach the rest)",
                    node + 1,
                    other + 1
                )
            }
            "corrupt" => {
                self.went_down(node);
                cluster.lock().await.kill9(node).await;
                let dir = cluster.lock().await.data_dir(node);
                let did = match dir {
                    Some(d) => corrupt(&d, &self.topics, rng),
                    None => "no data directory".into(),
                };
                tokio::time::sleep(hold).await;
                restart(cluster, node).await;
                self.back(node).await;
                format!("kill -9 node {}; {did}; restarted", node + 1)
            }
            "move" => {
                let topic = self.topics[rng.below(self.topics.len() as u64) as usize].clone();
                let partition = rng.below(u64::from(self.partitions.max(1))) as u32;
                let addrs = cluster.lock().await.addrs.clone();
                let ids: Vec<u64> = members.iter().map(|i| *i as u64 + 1).collect();
                let (what, ok) =
                    move_and_back(&addrs, &ids, &topic, partition, node as u64 + 1, hold).await;
                if !ok {
                    failed = Some(format!("t={at:6.1}s  {what}"));
                }
                what
            }
            "delay" => {
                let extra = Duration::from_millis(20 + rng.below(481));
                let region = cluster.lock().await.regions.get(node).cloned();
                match region {
                    Some(region) => {
                        set_region_delay(cluster, &region, extra).await;
                        tokio::time::sleep(hold).await;
                        set_region_delay(cluster, &region, Duration::ZERO).await;
                        format!(
                            "{extra:?} more one-way delay into and out of region {region} (node {}) for {hold:?}",
                            node + 1
                        )
                    }
                    None => {
                        let what = "delay: this cluster has no WAN links (spawn it with --regions)"
                            .to_string();
                        failed = Some(format!("t={at:6.1}s  {what}"));
                        what
                    }
                }
            }
            "clock" => {
                let secs = (10 + rng.below(3591)) as i64 * if rng.below(2) == 0 { 1 } else { -1 };
                let (set, faked) = {
                    let c = cluster.lock().await;
                    (c.set_clock(node, secs), c.clock_faked(node))
                };
                let what = match &set {
                    Ok(()) if faked => {
                        tokio::time::sleep(hold).await;
                        format!(
                            "node {}'s wall clock {secs:+} s off for {hold:?}, then back",
                            node + 1
                        )
                    }
                    Ok(()) => format!(
                        "clock: node {} does not run under libfaketime (not loaded)",
                        node + 1
                    ),
                    Err(e) => format!("clock: node {}: {e:#}", node + 1),
                };
                let back = cluster.lock().await.set_clock(node, 0);
                if !faked || set.is_err() || back.is_err() {
                    failed = Some(format!("t={at:6.1}s  {what}"));
                }
                what
            }
            "churn" => {
                let victim = self.joined.lock().unwrap().contains(&node).then_some(node);
                let (what, ok, nodes) = self.churn(victim).await;
                (joined, removed) = nodes;
                if !ok {
                    failed = Some(format!("t={at:6.1}s  {what}"));
                }
                what
            }
            other => format!("unknown fault {other}"),
        };
        Done {
            line: format!("t={at:6.1}s  {what}"),
            failed,
            restart_ms,
            joined,
            removed,
        }
    }
}

/// Runs the nemesis from `warmup` after the start until `until`: one of `chaos.faults` every
/// `chaos.every_s` (±50%), from `chaos.seed`, each held 1–3 s and then healed; `partitions`
/// of each of `topics` are what a `move` picks from. With `chaos.overlap` above 1, a fault
/// starts on schedule while up to that many others are still held (on other nodes; of the
/// [`EXCLUSIVE`] kinds one at a time): membership changes during kills, two nodes down at
/// once. The kinds and nodes drawn follow the seed; which node a fault lands on when the one
/// drawn is busy, and the order faults end in, follow the timing.
pub async fn nemesis(
    cluster: Arc<Mutex<Cluster>>,
    topics: Vec<String>,
    partitions: u32,
    chaos: Chaos,
    warmup: Duration,
    until: Duration,
) -> Log {
    let kinds = chaos.faults;
    let every = Duration::from_secs(chaos.every_s);
    let overlap = chaos.overlap.max(1);
    let mut rng = Rng::new(chaos.seed);
    let mut log = Log::default();
    let start = Instant::now();
    tokio::time::sleep(warmup).await;
    let members = cluster.lock().await.live();
    let nemesis = Arc::new(Nemesis {
        cluster,
        topics,
        partitions,
        members: std::sync::Mutex::new(members),
        joined: Default::default(),
        cuts: Default::default(),
        down: Default::default(),
        applying: Mutex::new(()),
    });
    // With overlapping faults: those in progress, and the nodes and exclusive kinds they hold.
    let mut running = tokio::task::JoinSet::new();
    let busy: Arc<std::sync::Mutex<(Vec<usize>, Vec<String>)>> = Default::default();
    let record = |log: &mut Log, kind: String, d: Done| {
        eprintln!("loadgen: chaos: {}", d.line);
        log.lines.push(d.line);
        log.failed.extend(d.failed);
        log.restarts_ms.extend(d.restart_ms);
        log.nodes_joined += d.joined;
        log.nodes_removed += d.removed;
        *log.counts.entry(kind).or_default() += 1;
    };
    while start.elapsed() < until {
        let pause = every.mul_f64(0.5 + rng.below(1000) as f64 / 1000.0);
        tokio::time::sleep(pause).await;
        if start.elapsed() >= until {
            break;
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize].clone();
        let members = nemesis.members();
        let node = members[rng.below(members.len() as u64) as usize];
        // A churn removes the node the one before it added: that node is the one it holds.
        let node = match kind.as_str() {
            "churn" => nemesis
                .joined
                .lock()
                .unwrap()
                .first()
                .copied()
                .unwrap_or(node),
            _ => node,
        };
        let hold = Duration::from_millis(1000 + rng.below(2000));
        let at = start.elapsed().as_secs_f64();
        if overlap == 1 {
            let d = nemesis.fault(&kind, node, hold, at, &mut rng).await;
            record(&mut log, kind, d);
            continue;
        }
        let mut sub = Rng::new(rng.next());
        // Wait for room: fewer than `overlap` faults held, a free node, and no other fault
        // of an exclusive kind like this one.
        let node = loop {
            while let Some(Ok((kind, d))) = running.try_join_next() {
                record(&mut log, kind, d);
            }
            let free = {
                let b = busy.lock().unwrap();
                let kind_free = !EXCLUSIVE.contains(&kind.as_str())
                    || !b.1.iter().any(|k| class(k) == class(&kind));
                let members = nemesis.members();
                let n = members.len();
                let at = members.iter().position(|m| *m == node).unwrap_or(0);
                let node = if kind == "churn" {
                    // Its node is the one to remove (another churn may have removed the one
                    // drawn while this one waited), no other.
                    let node = nemesis
                        .joined
                        .lock()
                        .unwrap()
                        .first()
                        .copied()
                        .unwrap_or(node);
                    (!b.0.contains(&node)).then_some(node)
                } else {
                    (0..n)
                        .map(|k| members[(at + k) % n])
                        .find(|j| !b.0.contains(j))
                };
                node.filter(|_| kind_free && running.len() < overlap)
            };
            match free {
                Some(node) => break Some(node),
                None if start.elapsed() >= until => break None,
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let Some(node) = node else { break };
        let during = {
            let mut b = busy.lock().unwrap();
            let during = b.1.clone();
            b.0.push(node);
            b.1.push(kind.clone());
            during
        };
        if !during.is_empty() {
            log.overlapped += 1;
            if class(&kind) == "move" || during.iter().any(|k| class(k) == "move") {
                log.moves_overlapped += 1;
            }
        }
        let (nemesis, busy) = (nemesis.clone(), busy.clone());
        let at = start.elapsed().as_secs_f64();
        running.spawn(async move {
            let mut d = nemesis.fault(&kind, node, hold, at, &mut sub).await;
            if !during.is_empty() {
                d.line
                    .push_str(&format!(" [started during: {}]", during.join(", ")));
            }
            let mut b = busy.lock().unwrap();
            if let Some(i) = b.0.iter().position(|x| *x == node) {
                b.0.remove(i);
            }
            if let Some(i) = b.1.iter().position(|x| *x == kind) {
                b.1.remove(i);
            }
            (kind, d)
        });
    }
    while let Some(Ok((kind, d))) = running.join_next().await {
        record(&mut log, kind, d);
    }
    log.lines.sort_by(|a, b| {
        let t = |l: &str| {
            l.trim_start_matches("t=")
                .split('s')
                .next()
                .and_then(|x| x.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        t(a).total_cmp(&t(b))
    });
    log
}

/// Waits (up to 60 s from `began`) until the node at `addr` answers ClusterInfo knowing the
/// metadata leader; how long after `began` it did.
async fn serving(addr: &str, began: Instant) -> Option<Duration> {
    while began.elapsed() < Duration::from_secs(60) {
        if let Ok(mut c) = super::run::connect(addr).await {
            if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await {
                if r.into_inner().metadata_leader != 0 {
                    return Some(began.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn set_region_delay(cluster: &Arc<Mutex<Cluster>>, region: &str, extra: Duration) {
    if let Some(mesh) = &cluster.lock().await.mesh {
        mesh.delay_region(region, extra);
    }
}

async fn restart(cluster: &Arc<Mutex<Cluster>>, node: usize) {
    for _ in 0..3 {
        match cluster.lock().await.start_node(node).await {
            Ok(()) => return,
            Err(e) => eprintln!("loadgen: chaos: restarting node {}: {e:#}", node + 1),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Heals everything: every node running and resumed, every isolation cleared, every added
/// delay removed, every wall clock back to real time.
pub async fn heal(cluster: &Arc<Mutex<Cluster>>) {
    {
        let c = cluster.lock().await;
        for i in 0..c.addrs.len() {
            // Only clusters under libfaketime have clocks to set back.
            let _ = c.set_clock(i, 0);
        }
    }
    let regions = cluster.lock().await.regions.clone();
    for r in &regions {
        set_region_delay(cluster, r, Duration::ZERO).await;
    }
    let live = cluster.lock().await.live();
    for i in live {
        let pid = cluster.lock().await.pid(i);
        match pid {
            Some(_) => signal(pid, libc::SIGCONT),
            None => restart(cluster, i).await,
        }
    }
    heal_partitions(cluster).await;
}
