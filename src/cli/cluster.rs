//! `tern cluster ...`: status, wait, move, rebalance, remove-node.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Subcommand;

use super::admin::{node, partition_json, partition_rows};
use super::{status_error, table, Client, ClientOpts, SecurityOpts};
use crate::proto::v1 as pb;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Nodes, and each partition's leader, replicas and follower lag.
    Status {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Wait until the cluster serves: a metadata leader is elected, the node asked has caught
    /// up, and every controller (or --nodes nodes) has registered. For scripts, after starting
    /// nodes.
    Wait {
        /// Wait for at least this many registered nodes [default: every controller].
        #[arg(long)]
        nodes: Option<usize>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Move a partition's replicas to other nodes (the first listed is the preferred leader).
    Move {
        topic: String,
        partition: u32,
        /// The new replicas, e.g. `--to 2,3,4`.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<u64>,
        /// Wait until the move is done and the partition has a leader among its new replicas.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Move replicas from the nodes holding the most to those holding the fewest.
    Rebalance {
        /// Moves to start at most [default: the server's limit, 256].
        #[arg(long)]
        max_moves: Option<u32>,
        /// Wait until the moves are done and every partition has a leader among its replicas.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Remove a node: its replicas move to other nodes, then it leaves the cluster for good
    /// (the node stops; its id cannot join again).
    RemoveNode {
        id: u64,
        /// Wait until the node is removed and every partition has a leader on another node.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// How long `--wait` waits for moves to finish.
const WAIT_MAX: Duration = Duration::from_secs(600);
/// How long one node gets to answer when asked for its view.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `tern cluster status` waits for a metadata leader to be elected before it reports
/// that there is none.
const LEADER_GRACE: Duration = Duration::from_secs(5);

/// The cluster as its nodes see it: the asked node's ClusterInfo, every node's own, and each
/// partition as its leader reports it (a leader reports its followers' lag).
struct View {
    asked: pb::ClusterInfoResponse,
    /// Each registered node's ClusterInfo, `None` where it did not answer.
    views: BTreeMap<u64, Option<pb::ClusterInfoResponse>>,
    topics: Vec<(String, Vec<pb::PartitionInfo>)>,
    metadata_leader: u64,
}

impl View {
    async fn read(c: &mut Client, security: &SecurityOpts) -> Result<View, tonic::Status> {
        let asked = c
            .cluster_info(pb::ClusterInfoRequest::default())
            .await?
            .into_inner();
        let mut views = BTreeMap::new();
        for n in &asked.nodes {
            let view = if n.id == asked.node_id {
                Some(asked.clone())
            } else {
                ask_node(&n.address, security).await
            };
            views.insert(n.id, view);
        }
        if views.is_empty() {
            views.insert(asked.node_id, Some(asked.clone()));
        }
        let mut topics = Vec::new();
        for t in &asked.topics {
            let parts = t
                .partitions
                .iter()
                .map(|p| {
                    views
                        .iter()
                        .filter_map(|(id, v)| v.as_ref().map(|v| (*id, v)))
                        .find_map(|(id, v)| {
                            v.topics
                                .iter()
                                .find(|vt| vt.topic == t.topic)
                                .and_then(|vt| {
                                    vt.partitions.iter().find(|q| q.partition == p.partition)
                                })
                                .filter(|q| q.local && q.leader == id)
                                .cloned()
                        })
                        .unwrap_or_else(|| pb::PartitionInfo {
                            // No node reports leading it: unknown, whatever followers believe.
                            leader: 0,
                            ..p.clone()
                        })
                })
                .collect();
            topics.push((t.topic.clone(), parts));
        }
        let metadata_leader = views
            .values()
            .flatten()
            .map(|v| v.metadata_leader)
            .find(|l| *l != 0)
            .unwrap_or(0);
        Ok(View {
            asked,
            views,
            topics,
            metadata_leader,
        })
    }

    fn reachable(&self, id: u64) -> bool {
        self.views.get(&id).is_some_and(Option::is_some)
    }

    /// Why the partitions are not settled yet (`None` once they are): each has a leader, among
    /// its replicas, that reports leading it, and none is moving.
    fn unsettled(&self, topic: Option<&str>) -> Option<String> {
        for (name, parts) in &self.topics {
            if topic.is_some_and(|t| t != name) {
                continue;
            }
            for p in parts {
                let id = format!("{name}/{}", p.partition);
                if !p.moving_to.is_empty() {
                    return Some(format!("{id} is moving to {:?}", p.moving_to));
                }
                if p.leader == 0 {
                    return Some(format!("{id} has no leader yet"));
                }
                if !p.replicas.contains(&p.leader) {
                    return Some(format!(
                        "{id} is led by node {}, which is not among its replicas {:?}",
                        p.leader, p.replicas
                    ));
                }
            }
        }
        None
    }

    /// Why the cluster does not serve yet (`None` once it does).
    fn not_ready(&self, nodes: Option<usize>) -> Option<String> {
        let controllers = &self.asked.controllers;
        if self.metadata_leader == 0 {
            return Some(no_leader(controllers));
        }
        if !self.asked.ready {
            return Some(format!(
                "node {} is still catching up with the cluster metadata",
                self.asked.node_id
            ));
        }
        let registered: Vec<u64> = self.asked.nodes.iter().map(|n| n.id).collect();
        match nodes {
            Some(n) if registered.len() < n => Some(format!(
                "{} of {n} nodes registered ({})",
                registered.len(),
                ids(&registered)
            )),
            Some(_) => None,
            None => {
                let missing: Vec<u64> = controllers
                    .iter()
                    .copied()
                    .filter(|c| !registered.contains(c))
                    .collect();
                (!missing.is_empty())
                    .then(|| format!("controllers {} have not registered yet", ids(&missing)))
            }
        }
    }
}

fn ids(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

fn no_leader(controllers: &[u64]) -> String {
    let who = if controllers.is_empty() {
        "the controllers".to_string()
    } else {
        format!("the controllers (nodes {})", ids(controllers))
    };
    format!(
        "no metadata leader (no quorum): {who} elect one once a majority of them is up and \
         they reach each other"
    )
}

/// A node's ClusterInfo, or `None` if it does not answer in time.
async fn ask_node(addr: &str, security: &SecurityOpts) -> Option<pb::ClusterInfoResponse> {
    let mut c = security.connect_lazy(addr).ok()?;
    let mut req = tonic::Request::new(pb::ClusterInfoRequest::default());
    req.set_timeout(ASK_TIMEOUT);
    tokio::time::timeout(ASK_TIMEOUT, c.cluster_info(req))
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
}

/// Reads the cluster's view until `why_not` finds nothing missing, or `max` passes; the error
/// says what was still missing.
async fn wait_until(
    c: &mut Client,
    security: &SecurityOpts,
    what: &str,
    max: Duration,
    why_not: impl Fn(&View) -> Option<String>,
) -> anyhow::Result<View> {
    let deadline = Instant::now() + max;
    loop {
        let missing = match View::read(c, security).await {
            Ok(v) => match why_not(&v) {
                None => return Ok(v),
                Some(m) => m,
            },
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not done after {max:?}: {missing} (see `tern cluster status`)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn cluster(cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Status { opts } => status(opts).await,
        ClusterCmd::Wait {
            nodes,
            timeout,
            opts,
        } => {
            // The node may not listen yet: connect lazily and keep asking.
            let mut c = opts.security.connect_lazy(&opts.server)?;
            let v = wait_until(
                &mut c,
                &opts.security,
                "waiting for the cluster",
                Duration::from_secs(timeout),
                |v| v.not_ready(nodes),
            )
            .await?;
            if opts.json {
                println!(
                    "{}",
                    serde_json::json!({"ready": true, "nodes": v.asked.nodes.len(), "metadata_leader": v.metadata_leader})
                );
            } else {
                println!(
                    "cluster ready: {} nodes, metadata leader node {}",
                    v.asked.nodes.len(),
                    v.metadata_leader
                );
            }
            Ok(())
        }
        ClusterCmd::Move {
            topic,
            partition,
            to,
            wait,
            opts,
        } => {
            let mut c = opts.connect().await?;
            let r = c
                .move_partition(pb::MovePartitionRequest {
                    topic: topic.clone(),
                    partition,
                    replicas: to.clone(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if r.unchanged {
                println!("{topic}/{partition} already has replicas {to:?}: nothing to move");
                return Ok(());
            }
            if !wait {
                println!("moving {topic}/{partition} to {to:?}");
                return Ok(());
            }
            wait_until(&mut c, &opts.security, "the move", WAIT_MAX, |v| {
                let p = v
                    .topics
                    .iter()
                    .filter(|(t, _)| *t == topic)
                    .flat_map(|(_, ps)| ps)
                    .find(|p| p.partition == partition)?;
                if p.replicas != to || !p.moving_to.is_empty() {
                    return Some(format!("{topic}/{partition} is still moving"));
                }
                if !to.contains(&p.leader) {
                    return Some(format!(
                        "{topic}/{partition} has no leader among {to:?} yet"
                    ));
                }
                None
            })
            .await?;
            println!("moved {topic}/{partition} to {to:?}");
            Ok(())
        }
        ClusterCmd::Rebalance {
            max_moves,
            wait,
            opts,
        } => {
            let mut c = opts.connect().await?;
            let r = c
                .rebalance(pb::RebalanceRequest {
                    max_moves: max_moves.unwrap_or(0),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_moves(&opts, &r.moves);
            if wait && !r.moves.is_empty() {
                wait_until(&mut c, &opts.security, "the rebalance", WAIT_MAX, |v| {
                    v.unsettled(None)
                })
                .await?;
                if !opts.json {
                    println!("done: every partition has moved and has a leader");
                }
            }
            Ok(())
        }
        ClusterCmd::RemoveNode { id, wait, opts } => {
            let mut c = opts.connect().await?;
            c.remove_node(pb::RemoveNodeRequest { node_id: id })
                .await
                .map_err(status_error)?;
            if !wait {
                println!("removing node {id}: its replicas are moving to other nodes");
                return Ok(());
            }
            wait_until(&mut c, &opts.security, "the removal", WAIT_MAX, |v| {
                if v.asked.nodes.iter().any(|n| n.id == id) {
                    return Some(format!("node {id} still holds replicas"));
                }
                v.unsettled(None)
            })
            .await?;
            println!("node {id} removed");
            Ok(())
        }
    }
}

fn print_moves(opts: &ClientOpts, moves: &[pb::PartitionMove]) {
    if opts.json {
        let moves: Vec<_> = moves
            .iter()
            .map(|m| serde_json::json!({"topic": m.topic, "partition": m.partition, "from": m.from, "to": m.to}))
            .collect();
        println!("{}", serde_json::json!({ "moves": moves }));
    } else if moves.is_empty() {
        println!("balanced: nothing to move");
    } else {
        let rows: Vec<Vec<String>> = moves
            .iter()
            .map(|m| {
                vec![
                    m.topic.clone(),
                    m.partition.to_string(),
                    format!("{:?}", m.from),
                    format!("{:?}", m.to),
                ]
            })
            .collect();
        table::print(&["TOPIC", "PARTITION", "FROM", "TO"], &rows);
    }
}

async fn status(opts: ClientOpts) -> anyhow::Result<()> {
    let mut c = opts.connect().await?;
    let mut v = View::read(&mut c, &opts.security)
        .await
        .map_err(status_error)?;
    // Right after a metadata leader dies the others are electing one (about 2 s with the
    // default timings): look again for a while before reporting that there is none.
    let deadline = std::time::Instant::now() + LEADER_GRACE;
    while v.metadata_leader == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        v = View::read(&mut c, &opts.security)
            .await
            .map_err(status_error)?;
    }
    if opts.json {
        let j = serde_json::json!({
            "cluster_id": v.asked.cluster_id,
            "metadata_leader": (v.metadata_leader != 0).then_some(v.metadata_leader),
            "ready": v.asked.ready,
            "nodes": v.asked.nodes.iter().map(|n| serde_json::json!({
                "id": n.id, "address": n.address, "region": n.region, "zone": n.zone,
                "reachable": v.reachable(n.id),
                "draining": n.draining,
            })).collect::<Vec<_>>(),
            "topics": v.topics.iter().map(|(name, parts)| serde_json::json!({
                "topic": name,
                "partitions": parts.iter().map(|p| {
                    let mut j = partition_json(p);
                    j["moving_to"] = serde_json::json!(p.moving_to);
                    j["under_replicated"] = serde_json::json!(under_replicated(p));
                    j["quiet"] = serde_json::json!(p.quiet);
                    j["lag"] = serde_json::json!(p.followers.iter().map(|f| serde_json::json!({
                        "node": f.node, "lag_entries": f.lag_entries, "matched": f.matched,
                        "silent_ms": f.silent_ms, "in_sync": f.in_sync,
                    })).collect::<Vec<_>>());
                    j
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{j}");
    } else {
        print_status(&v);
    }
    // Without a metadata leader nothing can change in the cluster: say so, and fail.
    if v.metadata_leader == 0 {
        anyhow::bail!("{}", no_leader(&v.asked.controllers));
    }
    Ok(())
}

/// Whether a partition, as its leader reports it, has fewer replicas in sync than assigned
/// (`cluster::health`, the rule the metrics use too). A partition without a leader is
/// unavailable, which `tern cluster status` reports apart.
fn under_replicated(p: &pb::PartitionInfo) -> bool {
    let in_sync = p.followers.iter().filter(|f| f.in_sync).count();
    p.leader != 0 && crate::cluster::health::under_replicated(p.replicas.len(), in_sync)
}

fn print_status(v: &View) {
    let nodes: Vec<Vec<String>> = v
        .asked
        .nodes
        .iter()
        .map(|n| {
            let state = match (v.reachable(n.id), n.draining) {
                (true, false) => "up",
                (true, true) => "up, draining",
                (false, false) => "unreachable",
                (false, true) => "unreachable, draining",
            };
            vec![
                n.id.to_string(),
                n.address.clone(),
                n.region.clone(),
                n.zone.clone(),
                state.to_string(),
                if n.id == v.metadata_leader {
                    "leader"
                } else {
                    ""
                }
                .to_string(),
            ]
        })
        .collect();
    if !v.asked.cluster_id.is_empty() {
        println!("cluster {}", v.asked.cluster_id);
    }
    if !nodes.is_empty() {
        table::print(
            &["NODE", "ADDRESS", "REGION", "ZONE", "STATE", "METADATA"],
            &nodes,
        );
    }
    let (mut under, mut leaderless) = (Vec::new(), Vec::new());
    for (name, parts) in &v.topics {
        for p in parts {
            if p.leader == 0 {
                leaderless.push(format!("{name}/{}", p.partition));
            } else if under_replicated(p) {
                under.push(format!("{name}/{}", p.partition));
            }
        }
    }
    if !v.topics.is_empty() {
        println!();
        // The first few by name (thousands of names made the line useless); `--json` has all.
        const NAMED: usize = 10;
        let list = |v: &[String]| match v.len() {
            0 => "none".to_string(),
            n if n <= NAMED => format!("{n} ({})", v.join(", ")),
            n => format!("{n} ({}, and {} more)", v[..NAMED].join(", "), n - NAMED),
        };
        println!("under-replicated partitions: {}", list(&under));
        println!("partitions without a leader: {}", list(&leaderless));
        let (quiet, all) = v
            .topics
            .iter()
            .flat_map(|(_, ps)| ps)
            .fold((0, 0), |(q, a), p| (q + usize::from(p.quiet), a + 1));
        println!("quiet partitions (idle, no heartbeats): {quiet} of {all}");
    }
    for (name, parts) in &v.topics {
        println!();
        println!("topic {name}");
        let rows: Vec<Vec<String>> = parts
            .iter()
            .map(|p| {
                let mut row = partition_rows(std::slice::from_ref(p)).remove(0);
                row.pop(); // the core is per node; not meaningful across the cluster
                if p.leader != 0 && !v.reachable(p.leader) {
                    row[1] = format!("{} (unreachable)", node(p.leader));
                }
                if !p.moving_to.is_empty() {
                    row[2] = format!("{:?} -> {:?}", p.replicas, p.moving_to);
                }
                let lag = if p.leader == 0 {
                    "no leader".to_string()
                } else if p.followers.is_empty() {
                    "-".to_string()
                } else {
                    p.followers
                        .iter()
                        .map(|f| match f.matched {
                            true => format!("{}:{}", f.node, f.lag_entries),
                            false => format!("{}:?", f.node),
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                row.push(lag);
                row
            })
            .collect();
        table::print(
            &[
                "PARTITION",
                "LEADER",
                "REPLICAS",
                "START",
                "END",
                "LAG (node:entries)",
            ],
            &rows,
        );
    }
}
