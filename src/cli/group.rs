//! `tern group list|describe`, and `tern sub --group G` / `--queue G` (a member of a consumer
//! or queue group).

use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use tern_client::{GroupMode, GroupOptions};

use super::pubsub::{client_error, print_record, SubArgs};
use super::{status_error, table, ClientOpts};
use crate::proto::v1 as pb;

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Groups with members or committed positions.
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Members, assignments, committed offsets and lag of a group.
    Describe {
        group: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// What a queue-group member does with each delivery once it has printed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum AckMode {
    /// Acknowledge it.
    #[default]
    Print,
    /// Reject it: it is delivered again (after --nack-delay-ms), and dead-lettered after
    /// --max-deliveries.
    Nack,
    /// Neither: it is delivered again after --ack-wait-ms.
    Never,
}

pub async fn group(cmd: GroupCmd) -> anyhow::Result<()> {
    match cmd {
        GroupCmd::List { opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .list_groups(pb::ListGroupsRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if opts.json {
                for g in r.groups {
                    println!(
                        "{}",
                        serde_json::json!({"group": g.group, "topic": g.topic, "mode": mode_name(g.mode), "members": g.members})
                    );
                }
            } else {
                let rows: Vec<Vec<String>> = r
                    .groups
                    .iter()
                    .map(|g| {
                        vec![
                            g.group.clone(),
                            g.topic.clone(),
                            mode_name(g.mode).to_string(),
                            g.members.to_string(),
                        ]
                    })
                    .collect();
                table::print(&["GROUP", "TOPIC", "MODE", "MEMBERS"], &rows);
            }
        }
        GroupCmd::Describe { group, opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .describe_group(pb::DescribeGroupRequest { group })
                .await
                .map_err(status_error)?
                .into_inner();
            for t in r.topics {
                if opts.json {
                    println!("{}", describe_json(&t));
                    continue;
                }
                println!(
                    "group {}  topic {}  mode {}  members {}",
                    t.group,
                    t.topic,
                    mode_name(t.mode),
                    t.members.len()
                );
                let rows: Vec<Vec<String>> = t
                    .members
                    .iter()
                    .map(|m| {
                        vec![
                            m.member_id.clone(),
                            m.name.clone(),
                            join(&m.partitions),
                            m.in_flight.to_string(),
                        ]
                    })
                    .collect();
                if !rows.is_empty() {
                    table::print(&["MEMBER", "NAME", "PARTITIONS", "IN-FLIGHT"], &rows);
                }
                let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                let rows: Vec<Vec<String>> = t
                    .partitions
                    .iter()
                    .map(|p| {
                        vec![
                            p.partition.to_string(),
                            opt(p.committed),
                            opt(p.end_offset),
                            opt(p.lag),
                            if p.member_id.is_empty() {
                                "-".into()
                            } else {
                                p.member_id.clone()
                            },
                            p.in_flight.to_string(),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "PARTITION",
                        "COMMITTED",
                        "END",
                        "LAG",
                        "MEMBER",
                        "IN-FLIGHT",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(())
}

fn describe_json(t: &pb::GroupInfo) -> serde_json::Value {
    serde_json::json!({
        "group": t.group,
        "topic": t.topic,
        "mode": mode_name(t.mode),
        "members": t.members.iter().map(|m| serde_json::json!({
            "member_id": m.member_id, "name": m.name, "partitions": m.partitions, "in_flight": m.in_flight,
        })).collect::<Vec<_>>(),
        "partitions": t.partitions.iter().map(|p| serde_json::json!({
            "partition": p.partition, "committed": p.committed, "position": p.position,
            "end_offset": p.end_offset, "lag": p.lag, "member_id": p.member_id,
            "in_flight": p.in_flight,
        })).collect::<Vec<_>>(),
    })
}

fn mode_name(m: i32) -> &'static str {
    match pb::GroupMode::try_from(m) {
        Ok(pb::GroupMode::Stream) => "stream",
        Ok(pb::GroupMode::Queue) => "queue",
        _ => "-",
    }
}

fn join(v: &[u32]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

/// Runs a group member (the client crate's, which joins again through another node when its
/// call ends) until `--count` records or Ctrl-C.
pub async fn consume(a: SubArgs) -> anyhow::Result<()> {
    let (group, mode) = match (&a.group, &a.queue) {
        (Some(g), None) => (g.clone(), GroupMode::Stream),
        (None, Some(g)) => (g.clone(), GroupMode::Queue),
        _ => anyhow::bail!("use one of --group and --queue"),
    };
    if !a.partition.is_empty() {
        anyhow::bail!("--partition does not go with a group: the group assigns partitions");
    }
    // Groups start a partition without a committed position at earliest unless told otherwise
    // (docs/groups.md), so a queue or group started after the records were published sees them.
    let start_latest = match a.from.as_deref().unwrap_or("earliest") {
        "latest" => true,
        "earliest" => false,
        f => anyhow::bail!("--from {f}: a group starts a partition without a committed offset at earliest or latest"),
    };
    if a.count == Some(0) {
        return Ok(());
    }
    let ms = |v: u32| (v > 0).then(|| Duration::from_millis(u64::from(v)));
    let options = GroupOptions {
        mode,
        start_latest,
        member_name: Some(format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "tern-cli".into()),
            std::process::id()
        )),
        session_timeout: ms(a.session_timeout_ms),
        max_in_flight: a.max_in_flight,
        commit_interval: Some(Duration::from_millis(a.commit_interval_ms.max(10))),
        node_auto_commit: ms(a.auto_commit_ms),
        ack_wait: ms(a.ack_wait_ms),
        max_deliveries: a.max_deliveries,
        dead_letter_topic: a.dlq.clone(),
    };
    let client = a.opts.cluster_client().await?;
    let mut member = client
        .join_group(&group, &a.topic, options)
        .await
        .map_err(client_error)?;
    let queue = mode == GroupMode::Queue;
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let m = tokio::select! {
            m = member.next() => m,
            _ = &mut ctrl_c => break,
        };
        let Some(m) = m else { break };
        let m = m.map_err(client_error)?;
        print_record(&a.opts, a.raw, &m.record, queue.then_some(m.deliveries));
        if queue {
            match a.ack {
                AckMode::Print => member.ack(&m).await,
                AckMode::Nack => {
                    member
                        .nack(&m, Duration::from_millis(u64::from(a.nack_delay_ms)))
                        .await
                }
                AckMode::Never => Ok(()),
            }
            .map_err(client_error)?;
        }
        seen += 1;
        if a.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    // Stream mode commits what was printed (and waits for it); queue acks go before the leave.
    if let Err(e) = member.close().await {
        eprintln!("tern: {e}");
    }
    Ok(())
}
