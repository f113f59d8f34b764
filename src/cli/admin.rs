//! `tern topic ...` and `tern cluster ...`.

use clap::Subcommand;

use super::{status_error, table, ClientOpts};
use crate::proto::v1 as pb;

#[derive(Subcommand)]
pub enum TopicCmd {
    /// Create a topic.
    Create {
        name: String,
        /// Partitions [default: the node's default].
        #[arg(long, short)]
        partitions: Option<u32>,
        #[arg(long, default_value_t = 1)]
        replication_factor: u32,
        /// Retention by age in ms; -1 keeps records forever.
        #[arg(long, allow_hyphen_values = true)]
        retention_ms: Option<i64>,
        /// Retention by size per partition in bytes; -1 for no limit.
        #[arg(long, allow_hyphen_values = true)]
        retention_bytes: Option<i64>,
        /// always | interval
        #[arg(long)]
        fsync: Option<String>,
        #[arg(long)]
        fsync_interval_ms: Option<u32>,
        #[arg(long)]
        max_record_bytes: Option<u32>,
        #[arg(long)]
        segment_bytes: Option<u64>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Delete a topic and all its records.
    Delete {
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// List topics.
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show a topic's settings and partitions.
    Describe {
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Nodes, and each partition's leader and replicas.
    Status {
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
        /// Wait until the move is done.
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
        /// Wait until the moves are done.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Remove a node: its replicas move to other nodes, then it leaves the cluster for good.
    RemoveNode {
        id: u64,
        /// Wait until the node is removed.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// How long `--wait` waits for moves to finish.
const WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// Polls the cluster until `done` holds of its ClusterInfo (or WAIT_MAX passes).
async fn wait_until(
    c: &mut pb::tern_client::TernClient<tonic::transport::Channel>,
    what: &str,
    done: impl Fn(&pb::ClusterInfoResponse) -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + WAIT_MAX;
    loop {
        if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest {}).await {
            if done(&r.into_inner()) {
                return Ok(());
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{what} not done after {WAIT_MAX:?} (see `tern cluster status`)"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn nothing_moving(r: &pb::ClusterInfoResponse) -> bool {
    r.topics
        .iter()
        .all(|t| t.partitions.iter().all(|p| p.moving_to.is_empty()))
}

async fn membership(cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Status { .. } => unreachable!("handled by cluster()"),
        ClusterCmd::Move {
            topic,
            partition,
            to,
            wait,
            opts,
        } => {
            let mut c = opts.connect().await?;
            c.move_partition(pb::MovePartitionRequest {
                topic: topic.clone(),
                partition,
                replicas: to.clone(),
            })
            .await
            .map_err(status_error)?;
            if wait {
                wait_until(&mut c, "the move", |r| {
                    r.topics
                        .iter()
                        .filter(|t| t.topic == topic)
                        .flat_map(|t| &t.partitions)
                        .any(|p| {
                            p.partition == partition && p.moving_to.is_empty() && p.replicas == to
                        })
                })
                .await?;
                println!("moved {topic}/{partition} to {to:?}");
            } else {
                println!("moving {topic}/{partition} to {to:?}");
            }
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
            if opts.json {
                let moves: Vec<_> = r
                    .moves
                    .iter()
                    .map(|m| serde_json::json!({"topic": m.topic, "partition": m.partition, "from": m.from, "to": m.to}))
                    .collect();
                println!("{}", serde_json::json!({ "moves": moves }));
            } else if r.moves.is_empty() {
                println!("balanced: nothing to move");
            } else {
                let rows: Vec<Vec<String>> = r
                    .moves
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
            if wait && !r.moves.is_empty() {
                wait_until(&mut c, "the rebalance", nothing_moving).await?;
                if !opts.json {
                    println!("done");
                }
            }
        }
        ClusterCmd::RemoveNode { id, wait, opts } => {
            let mut c = opts.connect().await?;
            c.remove_node(pb::RemoveNodeRequest { node_id: id })
                .await
                .map_err(status_error)?;
            if wait {
                wait_until(&mut c, "the removal", |r| {
                    r.nodes.iter().all(|n| n.id != id)
                })
                .await?;
                println!("node {id} removed");
            } else {
                println!("removing node {id}: its replicas are moving to other nodes");
            }
        }
    }
    Ok(())
}

fn settings(c: &Option<pb::TopicConfig>) -> serde_json::Value {
    let c = (*c).unwrap_or_default();
    serde_json::json!({
        "retention_ms": c.retention_ms,
        "retention_bytes": c.retention_bytes,
        "fsync": if c.fsync_policy == pb::FsyncPolicy::Interval as i32 { "interval" } else { "always" },
        "fsync_interval_ms": c.fsync_interval_ms,
        "max_record_bytes": c.max_record_bytes,
        "segment_bytes": c.segment_bytes,
    })
}

fn topic_json(t: &pb::TopicInfo) -> serde_json::Value {
    serde_json::json!({
        "name": t.name,
        "partitions": t.partitions,
        "replication_factor": t.replication_factor,
        "config": settings(&t.config),
    })
}

fn partition_json(p: &pb::PartitionInfo) -> serde_json::Value {
    serde_json::json!({
        "partition": p.partition, "leader": p.leader, "replicas": p.replicas,
        "start_offset": p.start_offset, "end_offset": p.end_offset, "core": p.core,
    })
}

fn partition_rows(parts: &[pb::PartitionInfo]) -> Vec<Vec<String>> {
    parts
        .iter()
        .map(|p| {
            vec![
                p.partition.to_string(),
                p.leader.to_string(),
                format!("{:?}", p.replicas),
                p.start_offset.to_string(),
                p.end_offset.to_string(),
                p.core.to_string(),
            ]
        })
        .collect()
}

const PARTITION_HEADER: [&str; 6] = ["PARTITION", "LEADER", "REPLICAS", "START", "END", "CORE"];

pub async fn topic(cmd: TopicCmd) -> anyhow::Result<()> {
    match cmd {
        TopicCmd::Create {
            name,
            partitions,
            replication_factor,
            retention_ms,
            retention_bytes,
            fsync,
            fsync_interval_ms,
            max_record_bytes,
            segment_bytes,
            opts,
        } => {
            let fsync_policy = match fsync.as_deref() {
                None => pb::FsyncPolicy::Unspecified,
                Some("always") => pb::FsyncPolicy::Always,
                Some("interval") => pb::FsyncPolicy::Interval,
                Some(other) => anyhow::bail!("unknown --fsync {other:?}: use always or interval"),
            };
            let mut c = opts.connect().await?;
            let r = c
                .create_topic(pb::CreateTopicRequest {
                    name,
                    partitions: partitions.unwrap_or(0),
                    replication_factor,
                    config: Some(pb::TopicConfig {
                        retention_ms,
                        retention_bytes,
                        fsync_policy: fsync_policy as i32,
                        fsync_interval_ms,
                        max_record_bytes,
                        segment_bytes,
                    }),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let t = r.topic.unwrap_or_default();
            if opts.json {
                println!("{}", topic_json(&t));
            } else {
                println!("created topic {} with {} partitions", t.name, t.partitions);
            }
        }
        TopicCmd::Delete { name, opts } => {
            let mut c = opts.connect().await?;
            c.delete_topic(pb::DeleteTopicRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            if opts.json {
                println!("{}", serde_json::json!({ "deleted": name }));
            } else {
                println!("deleted topic {name}");
            }
        }
        TopicCmd::List { opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .list_topics(pb::ListTopicsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if opts.json {
                for t in &r.topics {
                    println!("{}", topic_json(t));
                }
            } else {
                let rows: Vec<Vec<String>> = r
                    .topics
                    .iter()
                    .map(|t| {
                        vec![
                            t.name.clone(),
                            t.partitions.to_string(),
                            t.replication_factor.to_string(),
                        ]
                    })
                    .collect();
                table::print(&["TOPIC", "PARTITIONS", "REPLICATION"], &rows);
            }
        }
        TopicCmd::Describe { name, opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .describe_topic(pb::DescribeTopicRequest { name })
                .await
                .map_err(status_error)?
                .into_inner();
            let t = r.topic.unwrap_or_default();
            if opts.json {
                let mut v = topic_json(&t);
                v["partition_info"] = r.partitions.iter().map(partition_json).collect();
                println!("{v}");
            } else {
                println!(
                    "topic {}  partitions {}  replication {}",
                    t.name, t.partitions, t.replication_factor
                );
                println!("config {}", settings(&t.config));
                table::print(&PARTITION_HEADER, &partition_rows(&r.partitions));
            }
        }
    }
    Ok(())
}

pub async fn cluster(cmd: ClusterCmd) -> anyhow::Result<()> {
    let opts = match cmd {
        ClusterCmd::Status { opts } => opts,
        other => return membership(other).await,
    };
    let mut c = opts.connect().await?;
    let first = c
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    // Ask every node for its own view: a partition's leader reports its followers' lag.
    let mut views: std::collections::BTreeMap<u64, Option<pb::ClusterInfoResponse>> =
        std::collections::BTreeMap::new();
    for n in &first.nodes {
        let view = if n.id == first.node_id {
            Some(first.clone())
        } else {
            ask_node(&n.address).await
        };
        views.insert(n.id, view);
    }
    if views.is_empty() {
        views.insert(first.node_id, Some(first.clone()));
    }
    // Each partition as its leader sees it, else as the asked node sees it.
    let mut topics = Vec::new();
    for t in &first.topics {
        let parts: Vec<pb::PartitionInfo> = t
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
                    .unwrap_or_else(|| p.clone())
            })
            .collect();
        topics.push((t.topic.clone(), parts));
    }
    let meta_leader = views
        .values()
        .flatten()
        .map(|v| v.metadata_leader)
        .find(|l| *l != 0)
        .unwrap_or(0);
    if opts.json {
        let v = serde_json::json!({
            "metadata_leader": meta_leader,
            "nodes": first.nodes.iter().map(|n| serde_json::json!({
                "id": n.id, "address": n.address, "region": n.region, "zone": n.zone,
                "reachable": views.get(&n.id).is_some_and(Option::is_some),
                "draining": n.draining,
            })).collect::<Vec<_>>(),
            "topics": topics.iter().map(|(name, parts)| serde_json::json!({
                "topic": name,
                "partitions": parts.iter().map(|p| {
                    let mut j = partition_json(p);
                    j["moving_to"] = serde_json::json!(p.moving_to);
                    j["lag"] = serde_json::json!(p.followers.iter().map(|f| serde_json::json!({
                        "node": f.node, "lag_entries": f.lag_entries, "matched": f.matched,
                    })).collect::<Vec<_>>());
                    j
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    let nodes: Vec<Vec<String>> = first
        .nodes
        .iter()
        .map(|n| {
            let state = match (views.get(&n.id), n.draining) {
                (Some(Some(_)), false) => "up",
                (Some(Some(_)), true) => "up, draining",
                (_, false) => "unreachable",
                (_, true) => "unreachable, draining",
            };
            vec![
                n.id.to_string(),
                n.address.clone(),
                n.region.clone(),
                n.zone.clone(),
                state.to_string(),
                if n.id == meta_leader { "leader" } else { "" }.to_string(),
            ]
        })
        .collect();
    table::print(
        &["NODE", "ADDRESS", "REGION", "ZONE", "STATE", "METADATA"],
        &nodes,
    );
    for (name, parts) in &topics {
        println!();
        println!("topic {name}");
        let rows: Vec<Vec<String>> = parts
            .iter()
            .map(|p| {
                let mut row = partition_rows(std::slice::from_ref(p)).remove(0);
                row.pop(); // the core is per node; not meaningful across the cluster
                if p.leader != 0 && !views.get(&p.leader).is_some_and(Option::is_some) {
                    row[1] = format!("{} (unreachable)", p.leader);
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
    Ok(())
}

/// A node's ClusterInfo, or `None` if it does not answer within two seconds.
async fn ask_node(addr: &str) -> Option<pb::ClusterInfoResponse> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(2))
        .connect()
        .await
        .ok()?;
    let mut c = pb::tern_client::TernClient::new(ch).max_decoding_message_size(64 << 20);
    c.cluster_info(pb::ClusterInfoRequest {})
        .await
        .ok()
        .map(|r| r.into_inner())
}
