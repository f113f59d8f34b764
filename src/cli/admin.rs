//! `tern topic ...`.

use clap::Subcommand;

use super::{status_error, table, ClientOpts};
use crate::proto::v1 as pb;

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum TopicCmd {
    /// Create a topic.
    Create {
        name: String,
        /// Partitions [default: the node's default, 1].
        #[arg(long, short, value_parser = clap::value_parser!(u32).range(1..))]
        partitions: Option<u32>,
        /// Replicas of each partition [default: the node's default, min(3, nodes)].
        #[arg(long, short, value_parser = clap::value_parser!(u32).range(1..))]
        replication_factor: Option<u32>,
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
        /// What each partition must survive: zone (every replica in the home region, across
        /// zones) or region (replicas in at least three regions) [default: spread as widely as
        /// the nodes allow].
        #[arg(long, value_parser = ["zone", "region"])]
        survival: Option<String>,
        /// Regions the replicas may use, comma-separated; with --survival zone, the home
        /// region [default: any; the home region is the connected node's].
        #[arg(long, value_delimiter = ',')]
        regions: Vec<String>,
        /// Regions whose replicas should lead, most preferred first (leader pinning).
        #[arg(long, value_delimiter = ',')]
        leader_regions: Vec<String>,
        /// Make the topic a read-only mirror of SOURCE@ADDRESS[,ADDRESS...]: a topic of this
        /// or another cluster, copied with its offsets and timestamps (docs/geo.md). It takes
        /// the source's partition count.
        #[arg(long, value_name = "SOURCE@ADDRESSES", value_parser = parse_mirror_of)]
        mirror_of: Option<pb::MirrorOf>,
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
    /// Turn a mirror into a normal, writable topic (disaster recovery): it stops following
    /// its source and continues from what its replicas copied.
    Promote {
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// `SOURCE@HOST:PORT[,HOST:PORT...]` as a mirror's source.
fn parse_mirror_of(s: &str) -> Result<pb::MirrorOf, String> {
    let (topic, addresses) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?}: expected SOURCE_TOPIC@HOST:PORT[,HOST:PORT...]"))?;
    let addresses: Vec<String> = addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if topic.is_empty() || addresses.is_empty() {
        return Err(format!(
            "{s:?}: expected SOURCE_TOPIC@HOST:PORT[,HOST:PORT...]"
        ));
    }
    Ok(pb::MirrorOf {
        topic: topic.to_string(),
        addresses,
    })
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

fn placement(p: &Option<pb::Placement>) -> serde_json::Value {
    let p = p.clone().unwrap_or_default();
    let survival = match pb::Survival::try_from(p.survival) {
        Ok(pb::Survival::Zone) => "zone",
        Ok(pb::Survival::Region) => "region",
        _ => "spread",
    };
    serde_json::json!({
        "survival": survival,
        "regions": p.regions,
        "leader_regions": p.leader_regions,
    })
}

fn topic_json(t: &pb::TopicInfo) -> serde_json::Value {
    serde_json::json!({
        "name": t.name,
        "partitions": t.partitions,
        "replication_factor": t.replication_factor,
        "config": settings(&t.config),
        "placement": placement(&t.placement),
        "mirror_of": t.mirror_of.as_ref().map(|m| serde_json::json!({
            "topic": m.topic, "addresses": m.addresses,
        })),
    })
}

/// A mirror's source as printed: `topic@address,...`.
fn source_name(m: &pb::MirrorOf) -> String {
    format!("{}@{}", m.topic, m.addresses.join(","))
}

pub fn partition_json(p: &pb::PartitionInfo) -> serde_json::Value {
    serde_json::json!({
        "partition": p.partition, "leader": (p.leader != 0).then_some(p.leader),
        "replicas": p.replicas,
        "start_offset": p.start_offset, "end_offset": p.end_offset, "core": p.core,
        "mirror": p.mirror.as_ref().map(|m| serde_json::json!({
            "source_end": m.source_end, "lag_records": m.lag_records, "lag_ms": m.lag_ms,
            "contact_ms": m.contact_ms, "error": (!m.error.is_empty()).then_some(&m.error),
            "via": (m.via != 0).then_some(m.via),
        })),
    })
}

/// A mirror's partitions: their offsets and how far behind the source each is here.
fn mirror_rows(parts: &[pb::PartitionInfo]) -> Vec<Vec<String>> {
    parts
        .iter()
        .map(|p| {
            let (source_end, lag, lag_ms, error) = match &p.mirror {
                Some(m) => (
                    m.source_end.to_string(),
                    m.lag_records.to_string(),
                    m.lag_ms.to_string(),
                    m.error.clone(),
                ),
                None => ("-".into(), "-".into(), "-".into(), String::new()),
            };
            vec![
                p.partition.to_string(),
                format!("{:?}", p.replicas),
                p.start_offset.to_string(),
                p.end_offset.to_string(),
                source_end,
                lag,
                lag_ms,
                error,
            ]
        })
        .collect()
}

const MIRROR_HEADER: [&str; 8] = [
    "PARTITION",
    "REPLICAS",
    "START",
    "END",
    "SOURCE END",
    "LAG",
    "LAG MS",
    "ERROR",
];

/// A node id as printed: 0 (none or unknown) as "-".
pub fn node(id: u64) -> String {
    if id == 0 {
        "-".to_string()
    } else {
        id.to_string()
    }
}

pub fn partition_rows(parts: &[pb::PartitionInfo]) -> Vec<Vec<String>> {
    parts
        .iter()
        .map(|p| {
            vec![
                p.partition.to_string(),
                node(p.leader),
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
            survival,
            regions,
            leader_regions,
            mirror_of,
            opts,
        } => {
            let survival = match survival.as_deref() {
                Some("zone") => pb::Survival::Zone,
                Some("region") => pb::Survival::Region,
                _ => pb::Survival::Unspecified,
            };
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
                    replication_factor: replication_factor.unwrap_or(0),
                    config: Some(pb::TopicConfig {
                        retention_ms,
                        retention_bytes,
                        fsync_policy: fsync_policy as i32,
                        fsync_interval_ms,
                        max_record_bytes,
                        segment_bytes,
                    }),
                    placement: Some(pb::Placement {
                        survival: survival as i32,
                        regions,
                        leader_regions,
                    }),
                    mirror_of,
                })
                .await
                .map_err(status_error)?
                .into_inner();
            let t = r.topic.unwrap_or_default();
            if opts.json {
                println!("{}", topic_json(&t));
            } else {
                let why = if replication_factor.is_none() {
                    " (the default: min(3, nodes))"
                } else {
                    ""
                };
                println!(
                    "created topic {} with {} partitions, replication factor {}{why}",
                    t.name, t.partitions, t.replication_factor
                );
                if let Some(m) = &t.mirror_of {
                    println!("it mirrors {} (read-only until promoted)", source_name(m));
                }
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
        TopicCmd::Promote { name, opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .promote_topic(pb::PromoteTopicRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if opts.json {
                println!(
                    "{}",
                    serde_json::json!({ "promoted": name, "ends": r.ends })
                );
            } else {
                println!(
                    "promoted {name}: it takes writes now; its partitions continue from offsets {:?}",
                    r.ends
                );
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
                println!("placement {}", placement(&t.placement));
                match &t.mirror_of {
                    Some(m) => {
                        println!(
                            "mirror of {} (read-only; lag as this node's replicas see it)",
                            source_name(m)
                        );
                        table::print(&MIRROR_HEADER, &mirror_rows(&r.partitions));
                    }
                    None => table::print(&PARTITION_HEADER, &partition_rows(&r.partitions)),
                }
            }
        }
    }
    Ok(())
}
