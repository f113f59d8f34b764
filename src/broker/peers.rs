//! Connections to other nodes, and their answers as typed errors: a status from a call to
//! another node is parsed here once (its code, message and Tern's metadata), so nothing above
//! reads status metadata.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::Channel;

use super::{Broker, BrokerError, PeerAnswer, Result, Topic};
use crate::proto::metadata;
use crate::proto::v1::tern_client::TernClient;
use crate::raft::types::{Member, NodeId};

/// Whom a call is served for, as the broker passes it on to another node.
#[derive(Clone, Debug)]
pub enum Origin {
    /// A client's call first served here, with its principal (`None`: authentication is off,
    /// or it is this node's own work). A relay carries the principal; the receiving node
    /// trusts it only from a node proven by its certificate.
    Client(Option<std::sync::Arc<str>>),
    /// Relayed here by another node: served here or refused, never passed on again.
    Relayed,
}

impl Default for Origin {
    fn default() -> Origin {
        Origin::Client(None)
    }
}

impl Origin {
    pub fn relayed(&self) -> bool {
        matches!(self, Origin::Relayed)
    }
}

impl super::Broker {
    /// A call to another node on behalf of `origin`: marked forwarded (the receiver does not
    /// pass it on), with this cluster's id and the caller's principal.
    pub fn relay<T>(&self, msg: T, origin: &Origin) -> tonic::Request<T> {
        use tonic::metadata::MetadataValue;
        let mut r = tonic::Request::new(msg);
        let md = r.metadata_mut();
        md.insert(metadata::FORWARDED, MetadataValue::from_static("1"));
        if let Ok(v) = MetadataValue::try_from(self.cluster_id.get()) {
            if !self.cluster_id.get().is_empty() {
                md.insert(metadata::CLUSTER, v);
            }
        }
        if let Origin::Client(Some(p)) = origin {
            // Principals are printable ASCII (checked when authenticated), so this holds.
            // "*" is no principal, and the receiver refuses it.
            let v = MetadataValue::try_from(&**p).unwrap_or(MetadataValue::from_static("*"));
            md.insert(metadata::PRINCIPAL, v);
        }
        r
    }
}

/// Whether a call failed before it reached the other side (the connection could not be made).
pub fn never_sent(s: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

impl BrokerError {
    /// What a call to `node` that ended with `s` comes to. The peer's own answers (statuses
    /// decoded from its response carry no local source) keep their code, message and
    /// metadata; failures of the call itself become `Unreachable` (never sent) or `Midway`.
    pub fn from_peer(node: NodeId, s: tonic::Status) -> BrokerError {
        if std::error::Error::source(&s).is_some() {
            let why = format!("{:?}: {}", s.code(), s.message());
            return if never_sent(&s) {
                BrokerError::Unreachable { node, why }
            } else {
                BrokerError::Midway { node, why }
            };
        }
        let get = |key: &str| s.metadata().get(key).and_then(|v| v.to_str().ok());
        let range = get(metadata::OFFSET_RANGE).and_then(|v| {
            let (a, b) = v.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        });
        BrokerError::Peer(PeerAnswer {
            node,
            code: s.code(),
            message: s.message().to_string(),
            leader: get(metadata::LEADER).and_then(|v| v.parse().ok()),
            unwritten: get(metadata::UNWRITTEN).is_some(),
            removed: get(metadata::REMOVED).is_some(),
            range,
        })
    }
}

/// A node not heard from for this many heartbeat intervals (keepalives go every interval) is
/// tried after those that were, for reads it could serve.
const SILENT_HEARTBEATS: u64 = 4;
/// ... and never for less than this.
const SILENT_MIN: Duration = Duration::from_millis(500);

impl Broker {
    /// A connection to another node, made lazily and reused.
    pub fn peer_channel(&self, node: NodeId) -> Result<Channel> {
        let addr = self
            .cluster()
            .nodes
            .get(&node)
            .map(|m| m.addr_for(&self.config.region).to_string())
            .or_else(|| self.controllers.get(&node).cloned())
            .ok_or(BrokerError::NoAddress { node })?;
        let mut peers = self.peers.lock().expect("peers lock");
        if let Some((a, c)) = peers.get(&node) {
            if *a == addr {
                return Ok(c.clone());
            }
        }
        let endpoint =
            crate::tls::endpoint(&addr).map_err(|why| BrokerError::Unreachable { node, why })?;
        let channel = crate::tls::channel(&endpoint, self.client_tls().as_ref());
        peers.insert(node, (addr, channel.clone()));
        Ok(channel)
    }

    /// A client of another node's public API (forwarding).
    pub fn peer_client(&self, node: NodeId) -> Result<TernClient<Channel>> {
        Ok(TernClient::new(self.peer_channel(node)?)
            .max_decoding_message_size(self.config.max_request_bytes.max(32 << 20))
            .max_encoding_message_size(self.config.max_request_bytes))
    }

    /// Makes a call to another node's public API; its failure as a typed error.
    pub async fn call_peer<T, F, Fut>(&self, node: NodeId, call: F) -> Result<T>
    where
        F: FnOnce(TernClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.peer_client(node)?;
        call(client)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| BrokerError::from_peer(node, s))
    }

    /// Other nodes of `nodes`, the nearest to this one first (same zone, same region, then
    /// in the given order), nodes this one has not heard from lately last: a read relayed to a
    /// node cut off or dead waits for a timeout (a region cut left readers in the other regions
    /// stalled about ten seconds on the lost region's nodes, which came first in replica order).
    pub fn nearest_first(&self, nodes: &[NodeId]) -> Vec<NodeId> {
        let state = self.cluster();
        nearest_order(nodes, self.node_id(), self.member(), &state.nodes, |n| {
            self.heard_from(n)
        })
    }

    /// Whether this node heard from `node` lately (within a few heartbeats; always true on a
    /// node without peers).
    pub fn heard_from(&self, node: NodeId) -> bool {
        let silent_after = Duration::from_millis(SILENT_HEARTBEATS * self.config.raft_heartbeat_ms)
            .max(SILENT_MIN);
        self.transport()
            .is_none_or(|t| t.silent_for(node).is_some_and(|d| d <= silent_after))
    }

    /// Runs a read on another replica of a partition: the nearest first (same zone, then same
    /// region, then the replica list's order), then the others while they cannot serve it
    /// (unreachable, not open yet, stale).
    pub async fn on_replica<T, F, Fut>(&self, topic: &Topic, p: u32, call: F) -> Result<T>
    where
        F: Fn(TernClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let me = self.node_id();
        let mut last = None;
        for node in self.nearest_first(topic.replicas(p)) {
            match self.call_peer(node, &call).await {
                Ok(v) => return Ok(v),
                Err(e) if e.retryable() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| BrokerError::NoReplica {
            node: me,
            topic: topic.spec.name.clone(),
            partition: p,
            replicas: topic.replicas(p).to_vec(),
        }))
    }
}

/// [`Broker::nearest_first`]'s order: the nodes of `nodes` other than `me` (whose labels are
/// `mine`), those `heard` from first, each part by distance (same zone, same region, another
/// region, unknown), ties in the given order.
fn nearest_order(
    nodes: &[NodeId],
    me: NodeId,
    mine: &Member,
    members: &BTreeMap<NodeId, Member>,
    heard: impl Fn(NodeId) -> bool,
) -> Vec<NodeId> {
    let mut order: Vec<NodeId> = nodes.iter().copied().filter(|n| *n != me).collect();
    // Stable: equals keep the replica list's order.
    order.sort_by_key(|n| {
        let distance = match members.get(n) {
            Some(m) if m.region == mine.region && m.zone == mine.zone => 0,
            Some(m) if m.region == mine.region => 1,
            Some(_) => 2,
            None => 3,
        };
        (!heard(*n), distance)
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testkit::{ids, member as at};

    /// Nearest first, but a node not heard from lately goes after every one heard from, however
    /// near: a read relayed to a dead or cut-off node waits for a timeout.
    #[test]
    fn nodes_not_heard_from_go_last_then_nearest_first_then_in_the_given_order() {
        let members: BTreeMap<NodeId, Member> = [
            (1, at("a", "z1")),
            (2, at("b", "z1")),
            (3, at("a", "z2")),
            (4, at("a", "z1")),
            (5, at("a", "z1")),
            (6, at("c", "z1")),
        ]
        .into_iter()
        .map(|(n, m)| (NodeId(n), m))
        .collect();
        let me = NodeId(5);
        let mine = members[&me].clone();
        // 7 is not in the metadata (unknown labels): after every known node.
        let nodes = ids(&[6, 2, 1, 7, 3, 5, 4]);
        let all = nearest_order(&nodes, me, &mine, &members, |_| true);
        assert_eq!(
            all,
            ids(&[1, 4, 3, 6, 2, 7]),
            "by distance, ties in given order"
        );
        // Node 1 (same zone) and node 3 silent: behind every node heard from.
        let silent = ids(&[1, 3]);
        let order = nearest_order(&nodes, me, &mine, &members, |n| !silent.contains(&n));
        assert_eq!(order, ids(&[4, 6, 2, 7, 1, 3]));
        // Nobody heard from: distance alone.
        assert_eq!(nearest_order(&nodes, me, &mine, &members, |_| false), all);
        // Unlabelled nodes (one-region clusters): the given order, without this node.
        let blank: BTreeMap<NodeId, Member> = members.keys().map(|n| (*n, at("", ""))).collect();
        assert_eq!(
            nearest_order(&nodes, me, &at("", ""), &blank, |_| true),
            ids(&[6, 2, 1, 3, 4, 7])
        );
    }
}
