//! The failover workload's chaos: every interval, SIGKILL the node leading a partition, then
//! restart it (same port, same data) half an interval later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tern::proto::v1 as pb;
use tokio::sync::Mutex;

use super::cluster::Cluster;

/// Kills leaders on schedule from `warmup_s` after the start until `until`; returns how many
/// nodes it killed.
pub async fn run(
    cluster: Arc<Mutex<Cluster>>,
    every: Duration,
    warmup_s: u64,
    until: Duration,
) -> usize {
    let start = Instant::now();
    let mut kills = 0;
    tokio::time::sleep(Duration::from_secs(warmup_s) + every / 2).await;
    while start.elapsed() + every / 2 < until {
        let addrs = cluster.lock().await.addrs.clone();
        let Some(victim) = leader_of_first_partition(&addrs).await else {
            eprintln!("loadgen: failover: no partition leader found; not killing");
            tokio::time::sleep(every).await;
            continue;
        };
        eprintln!(
            "loadgen: failover: kill -9 node {} (a partition leader)",
            victim + 1
        );
        cluster.lock().await.kill9(victim).await;
        kills += 1;
        tokio::time::sleep(every / 2).await;
        if let Err(e) = cluster.lock().await.start_node(victim).await {
            eprintln!("loadgen: failover: restarting node {}: {e:#}", victim + 1);
        }
        tokio::time::sleep(every / 2).await;
    }
    kills
}

/// The node (index) that leads partition 0 of the newest loadgen topic, by its own report.
async fn leader_of_first_partition(addrs: &[String]) -> Option<usize> {
    for (i, addr) in addrs.iter().enumerate() {
        let Ok(mut c) = super::run::connect(addr).await else {
            continue;
        };
        let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await else {
            continue;
        };
        let r = r.into_inner();
        let me = r.node_id;
        let leads = r
            .topics
            .iter()
            .filter(|t| t.topic.starts_with("loadgen-"))
            .flat_map(|t| t.partitions.iter())
            .any(|p| p.partition == 0 && p.local && p.leader == me);
        if leads {
            return Some(i);
        }
    }
    None
}
