//! A cluster spread over simulated regions: every node labelled with a region, and all traffic
//! between regions (node to node, client to node) through `tern-wan` delay lines.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tern_wan::{Mesh, Site};
use tonic::transport::Channel;

use super::cluster::free_ports;
use super::TestNode;

/// Raft timing for the regions' 40 ms round trip: the heartbeat interval over twice it (as
/// docs/geo.md, "Timing", asks; the tests' usual 50 ms left heartbeats and appends timing out
/// on a loaded machine), the election timeout 6 × that.
const TIMING: [&str; 4] = [
    "--raft-heartbeat-ms",
    "100",
    "--raft-election-timeout-ms",
    "600",
];

/// Fields drop in order: nodes first, then the proxies, then the directories.
pub struct GeoCluster {
    pub nodes: Vec<Option<TestNode>>,
    pub dirs: Vec<PathBuf>,
    /// Each node's own (in-region) address.
    pub addrs: Vec<String>,
    pub regions: Vec<String>,
    pub mesh: Mesh,
    pub tmp: tempfile::TempDir,
}

impl GeoCluster {
    /// One node per entry of `regions` (its region; zones z1, z2, ... by node), regions `rtt`
    /// apart.
    pub async fn start(regions: &[&str], rtt: Duration) -> GeoCluster {
        let tmp = tempfile::tempdir().unwrap();
        let ports = free_ports(regions.len());
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let sites: Vec<Site> = regions
            .iter()
            .zip(&addrs)
            .map(|(r, a)| Site {
                region: r.to_string(),
                addr: a.parse().unwrap(),
            })
            .collect();
        let mesh = Mesh::uniform(&sites, rtt).await.unwrap();
        let dirs = (0..regions.len())
            .map(|i| tmp.path().join(format!("n{}", i + 1)))
            .collect();
        let mut c = GeoCluster {
            tmp,
            dirs,
            addrs,
            regions: regions.iter().map(|r| r.to_string()).collect(),
            mesh,
            nodes: (0..regions.len()).map(|_| None).collect(),
        };
        for i in 0..regions.len() {
            c.start_node(i);
        }
        c.wait_formed().await;
        c
    }

    /// Starts node `i`: its peers as its region reaches them, its addresses for the others.
    pub fn start_node(&mut self, i: usize) {
        let region = &self.regions[i];
        let peers = (0..self.addrs.len())
            .map(|j| format!("{}={}", j + 1, self.addr_from(region, j)))
            .collect::<Vec<_>>()
            .join(",");
        let id = (i + 1).to_string();
        let zone = format!("z{}", i + 1);
        let region_addresses = self.mesh.region_addresses(i);
        let mut args = vec![
            "--node-id",
            &id,
            "--peers",
            &peers,
            "--region",
            region,
            "--zone",
            &zone,
            "--region-addresses",
            &region_addresses,
            "--fault-injection",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend(TIMING);
        self.nodes[i] = Some(TestNode::start_at(&self.dirs[i], &self.addrs[i], &args));
    }

    /// A counter of node `i`'s `/metrics` (0 when absent).
    pub fn counter(&self, i: usize, name: &str) -> u64 {
        let admin = self.nodes[i].as_ref().expect("node is up").admin.clone();
        super::tools::counter(&admin.expect("an admin listener"), name)
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.kill9();
        }
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .collect()
    }

    /// How a client or node in `region` reaches node `i`.
    pub fn addr_from(&self, region: &str, i: usize) -> String {
        self.mesh.addr(region, i).to_string()
    }

    /// A client of node `i` in its own region (no delay line).
    pub async fn client(&self, i: usize) -> TernClient<Channel> {
        self.nodes[i].as_ref().expect("node is up").client().await
    }

    /// A client in `region` of node `i` (through the delay line when `i` is elsewhere).
    pub async fn client_from(&self, region: &str, i: usize) -> TernClient<Channel> {
        let ch = super::channel(&self.addr_from(region, i)).await.unwrap();
        TernClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub async fn wait_formed(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in self.live() {
            loop {
                let mut c = self.client(i).await;
                if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await {
                    let r = r.into_inner();
                    if r.nodes.len() == self.nodes.len() && r.metadata_leader != 0 && r.ready {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "cluster did not form");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The leader of a partition that a majority of live nodes holding it agree on.
    pub async fn leader(&self, topic: &str, partition: u32) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.leader_now(topic, partition).await {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no leader for {topic}/{partition}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader as most live replicas see it right now, if they agree.
    pub async fn leader_now(&self, topic: &str, partition: u32) -> Option<usize> {
        let mut votes: HashMap<u64, usize> = HashMap::new();
        let mut holders = 0;
        for i in self.live() {
            let mut c = self.client(i).await;
            let Ok(r) = c
                .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
                .await
            else {
                continue;
            };
            for p in r.into_inner().partitions {
                if p.partition == partition && p.local {
                    holders += 1;
                    if p.leader != 0 {
                        *votes.entry(p.leader).or_default() += 1;
                    }
                }
            }
        }
        let live = self.live();
        votes
            .iter()
            .find(|(l, n)| **n * 2 > holders && live.contains(&(**l as usize - 1)))
            .map(|(l, _)| *l as usize - 1)
    }

    /// Cuts node `i` off from the nodes `from` (ids), at its transport (Peer.SetFault).
    pub async fn isolate(&self, i: usize, from: Vec<u64>) {
        super::cluster::set_fault(&self.addrs[i], from).await;
    }
}

/// Creates a topic with a placement.
pub async fn create_placed(
    c: &mut TernClient<Channel>,
    name: &str,
    partitions: u32,
    rf: u32,
    placement: pb::Placement,
) -> pb::TopicInfo {
    c.create_topic(pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: rf,
        config: None,
        placement: Some(placement),
        mirror_of: None,
    })
    .await
    .expect("create topic")
    .into_inner()
    .topic
    .unwrap()
}
