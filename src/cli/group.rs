//! `tern group list|describe`, and `tern sub --group G` / `--queue G` (a member of a consumer
//! or queue group).

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use tokio_stream::StreamExt;

use super::pubsub::{print_record, SubArgs};
use super::{status_error, table, ClientOpts};
use crate::proto::v1 as pb;
use crate::proto::v1::consume_request::Kind as Up;
use crate::proto::v1::consume_response::Kind as Down;

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

/// How a session ended.
enum End {
    /// Enough records, or Ctrl-C.
    Done,
    /// The call ended (coordinator moved, node restarted): join again.
    Lost(String),
}

/// Runs a group member until `--count` records or Ctrl-C, joining again when the coordinator
/// changes.
pub async fn consume(a: SubArgs) -> anyhow::Result<()> {
    let (group, mode) = match (&a.group, &a.queue) {
        (Some(g), None) => (g.clone(), pb::GroupMode::Stream),
        (None, Some(g)) => (g.clone(), pb::GroupMode::Queue),
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
    let join = pb::JoinGroup {
        group,
        topic: a.topic.clone(),
        mode: mode as i32,
        member_name: format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "tern-cli".into()),
            std::process::id()
        ),
        session_timeout_ms: a.session_timeout_ms,
        max_in_flight: a.max_in_flight,
        start_latest,
        auto_commit_interval_ms: a.auto_commit_ms,
        ack_wait_ms: a.ack_wait_ms,
        max_deliveries: a.max_deliveries,
        dead_letter_topic: a.dlq.clone().unwrap_or_default(),
    };
    let mut seen = 0u64;
    if a.count == Some(0) {
        return Ok(());
    }
    loop {
        match session(&a, join.clone(), &mut seen).await? {
            End::Done => return Ok(()),
            End::Lost(why) => {
                eprintln!("tern: group call ended ({why}); joining again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn session(a: &SubArgs, join: pb::JoinGroup, seen: &mut u64) -> anyhow::Result<End> {
    let queue = join.mode == pb::GroupMode::Queue as i32;
    let session_ms = if join.session_timeout_ms == 0 {
        10_000
    } else {
        join.session_timeout_ms
    };
    let mut c = match a.opts.connect().await {
        Ok(c) => c,
        Err(e) => return Ok(End::Lost(e.to_string())),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ConsumeRequest>(64);
    let up = |k: Up| pb::ConsumeRequest { kind: Some(k) };
    tx.send(up(Up::Join(join))).await?;
    let mut stream = match c
        .consume(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) if retryable(&s) => return Ok(End::Lost(s.message().to_string())),
        Err(s) => return Err(status_error(s)),
    };
    // Stream mode: the next offset to consume of each partition this member has.
    let mut positions: BTreeMap<u32, u64> = BTreeMap::new();
    let mut dirty = false;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(session_ms as u64 / 3));
    let mut commit = tokio::time::interval(Duration::from_millis(a.commit_interval_ms.max(10)));
    let offsets = |positions: &BTreeMap<u32, u64>| -> Vec<pb::PartitionOffset> {
        positions
            .iter()
            .map(|(p, o)| pb::PartitionOffset {
                partition: *p,
                offset: *o,
            })
            .collect()
    };
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            msg = stream.next() => {
                let msg = match msg {
                    None => return Ok(End::Lost("the call ended".into())),
                    Some(Err(s)) if retryable(&s) => return Ok(End::Lost(s.message().to_string())),
                    Some(Err(s)) => return Err(status_error(s)),
                    Some(Ok(m)) => m,
                };
                match msg.kind {
                    Some(Down::Assigned(asg)) => {
                        for p in asg.partitions {
                            positions.insert(p.partition, p.offset);
                        }
                    }
                    Some(Down::Revoke(r)) => {
                        let offsets: Vec<pb::PartitionOffset> = r
                            .partitions
                            .iter()
                            .filter_map(|p| positions.remove(p).map(|offset| pb::PartitionOffset { partition: *p, offset }))
                            .collect();
                        tx.send(up(Up::Revoked(pb::Revoked { partitions: r.partitions, offsets }))).await?;
                    }
                    Some(Down::Deliveries(d)) => {
                        let mut acks = Vec::new();
                        let mut done = false;
                        let (partition, next) = (d.partition, d.next_offset);
                        let whole = a.count.is_none_or(|n| *seen + d.deliveries.len() as u64 <= n);
                        for d in d.deliveries {
                            let Some(r) = d.record else { continue };
                            if done {
                                break;
                            }
                            print_record(&a.opts, a.raw, &r, queue.then_some(d.delivery_count));
                            if queue {
                                acks.push(pb::DeliveryRef { partition: r.partition, offset: r.offset });
                            } else {
                                positions.insert(r.partition, r.offset + 1);
                                dirty = true;
                            }
                            *seen += 1;
                            done = a.count.is_some_and(|n| *seen >= n);
                        }
                        if !queue && whole && positions.contains_key(&partition) {
                            // Past control records too.
                            positions.insert(partition, next);
                            dirty = true;
                        }
                        if !acks.is_empty() {
                            match a.ack {
                                AckMode::Print => tx.send(up(Up::Ack(pb::Acks { deliveries: acks }))).await?,
                                AckMode::Nack => tx.send(up(Up::Nack(pb::Nacks { deliveries: acks, delay_ms: a.nack_delay_ms }))).await?,
                                AckMode::Never => {}
                            }
                        }
                        if done {
                            return finish(tx, stream, queue, offsets(&positions)).await;
                        }
                    }
                    Some(Down::Joined(_)) | Some(Down::Committed(_)) | None => {}
                }
            }
            _ = heartbeat.tick() => {
                tx.send(up(Up::Heartbeat(pb::Heartbeat {}))).await?;
            }
            _ = commit.tick() => {
                if dirty {
                    dirty = false;
                    tx.send(up(Up::Commit(pb::Commit { offsets: offsets(&positions) }))).await?;
                }
            }
            _ = &mut ctrl_c => {
                return finish(tx, stream, queue, offsets(&positions)).await;
            }
        }
    }
}

/// Leaves the group: stream mode commits what was printed first (and waits, bounded, for the
/// commit to be replicated); queue mode's acks were sent already and go before the leave.
async fn finish(
    tx: tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
    mut stream: tonic::Streaming<pb::ConsumeResponse>,
    queue: bool,
    offsets: Vec<pb::PartitionOffset>,
) -> anyhow::Result<End> {
    if !queue && !offsets.is_empty() {
        tx.send(pb::ConsumeRequest {
            kind: Some(Up::Commit(pb::Commit { offsets })),
        })
        .await?;
        let wait = async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m.kind, Some(Down::Committed(_))) {
                    return;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .is_err()
        {
            eprintln!("tern: the final commit was not confirmed within 5 s");
        }
    }
    // Closing our side leaves the group once the node has read everything before it (acks
    // included); the node then ends the call.
    drop(tx);
    let drain = async { while let Some(Ok(_)) = stream.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    Ok(End::Done)
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    )
}
