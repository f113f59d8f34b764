//! Membership changes under load: a replica moved to a node without one and back.

use super::*;

/// The `move` fault: moves node `node`'s replica of `topic`/`partition` (or, if it holds none,
/// another's) to the first node without one, waits `hold`, and moves it back (the replicas in their first order), each step
/// waited for. Says what happened, and whether both steps completed within [`MOVE_WAIT`].
pub(super) async fn move_and_back(
    addrs: &[String],
    members: &[u64],
    topic: &str,
    partition: u32,
    node: u64,
    hold: Duration,
) -> (String, bool) {
    let name = format!("{topic}/{partition}");
    let before = match partition_info(addrs, topic, partition).await {
        Ok(p) => p.replicas,
        Err(e) => return (format!("move of {name}: cannot describe it: {e:#}"), false),
    };
    if before.is_empty() {
        return (format!("move of {name}: it has no replicas listed"), false);
    }
    // The node drawn, or if it holds no replica of this partition, one that does.
    let node = if before.contains(&node) {
        node
    } else {
        before[node as usize % before.len()]
    };
    let Some(spare) = members.iter().copied().find(|n| !before.contains(n)) else {
        return (
            format!("move of {name}: every node holds a replica ({before:?}); nothing to move to"),
            false,
        );
    };
    let to: Vec<u64> = before
        .iter()
        .map(|r| if *r == node { spare } else { *r })
        .collect();
    let moved = match move_to(addrs, topic, partition, &to).await {
        Ok(took) => took,
        Err(e) => {
            // Whatever state it is in, ask for the first replicas back before going on.
            let _ = move_to(addrs, topic, partition, &before).await;
            return (format!("move of {name} to {to:?} FAILED: {e}"), false);
        }
    };
    tokio::time::sleep(hold).await;
    match move_to(addrs, topic, partition, &before).await {
        Ok(back) => (
            format!(
                "{name}: replica moved from node {node} to node {spare} ({moved:.1?}), held {hold:?}, moved back to {before:?} ({back:.1?})"
            ),
            true,
        ),
        Err(e) => (
            format!("{name}: replica moved from node {node} to node {spare}, moving it back FAILED: {e}"),
            false,
        ),
    }
}

/// The partition as a node holding a replica of it describes it (ClusterInfo); any node will
/// do for the replica list, which comes from the metadata.
pub(super) async fn partition_info(
    addrs: &[String],
    topic: &str,
    partition: u32,
) -> anyhow::Result<pb::PartitionInfo> {
    let mut last = anyhow::anyhow!("no node answered");
    for a in addrs {
        match describe_partition(a, topic, partition).await {
            Ok(p) => return Ok(p),
            Err(e) => last = e,
        }
    }
    Err(last)
}

pub(super) async fn describe_partition(
    addr: &str,
    topic: &str,
    partition: u32,
) -> anyhow::Result<pb::PartitionInfo> {
    partitions_at(addr, &[topic.to_string()])
        .await?
        .into_iter()
        .map(|(_, p)| p)
        .find(|p| p.partition == partition)
        .ok_or_else(|| anyhow::anyhow!("{addr} does not list {topic}/{partition}"))
}

/// The partitions of `topics` as the node at `addr` describes them (ClusterInfo).
pub(super) async fn partitions_at(
    addr: &str,
    topics: &[String],
) -> anyhow::Result<Vec<(String, pb::PartitionInfo)>> {
    let mut c = crate::run::connect(addr).await?;
    let info = c
        .cluster_info(pb::ClusterInfoRequest::default())
        .await?
        .into_inner();
    Ok(info
        .topics
        .into_iter()
        .filter(|t| topics.contains(&t.topic))
        .flat_map(|t| {
            let topic = t.topic;
            t.partitions.into_iter().map(move |p| (topic.clone(), p))
        })
        .collect())
}

/// Asks for `topic`/`partition` to have replicas `to` (node ids; node `i` of the cluster is
/// id `i + 1`) and waits until the move is done and, as one of them sees it, one of them
/// leads. How long it took, or what was still missing after [`MOVE_WAIT`].
pub(super) async fn move_to(
    addrs: &[String],
    topic: &str,
    partition: u32,
    to: &[u64],
) -> Result<Duration, String> {
    let start = Instant::now();
    let mut asked = false;
    let mut missing = String::from("not asked yet");
    // A node that will hold a replica: its view has the leader.
    let viewer = |k: usize| addrs[(to[k % to.len()] as usize - 1) % addrs.len()].clone();
    let mut k = 0;
    while start.elapsed() < MOVE_WAIT {
        if !asked {
            match crate::run::connect(&viewer(k)).await {
                Ok(mut c) => {
                    let req = pb::MovePartitionRequest {
                        topic: topic.into(),
                        partition,
                        replicas: to.to_vec(),
                    };
                    match c.move_partition(req).await {
                        Ok(_) => asked = true,
                        // Refused for good: asking again changes nothing.
                        Err(s) if !crate::produce::retriable(&s) => {
                            return Err(format!("MovePartition refused: {}", s.message()));
                        }
                        Err(s) => missing = format!("MovePartition: {}", s.message()),
                    }
                }
                Err(e) => missing = format!("connecting: {e:#}"),
            }
        }
        if asked {
            match describe_partition(&viewer(k), topic, partition).await {
                Ok(p) if p.replicas == to && p.moving_to.is_empty() && to.contains(&p.leader) => {
                    return Ok(start.elapsed());
                }
                Ok(p) => {
                    missing = format!(
                        "replicas {:?}, moving to {:?}, leader {}",
                        p.replicas, p.moving_to, p.leader
                    )
                }
                Err(e) => missing = format!("{e:#}"),
            }
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("not done after {MOVE_WAIT:?}: {missing}"))
}
