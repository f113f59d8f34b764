//! The `tern.internal.v1.Peer` service: Raft messages from other nodes, metadata proposals,
//! and the fault-injection hook of the tests.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::controller;
use crate::proto::internal as pb;
use crate::proto::internal::peer_server::Peer;
use crate::shard::{CoreRequest, PartitionKey};
use crate::types::{CoreId, NodeId};

/// Messages one Exchange may carry.
const EXCHANGE_MESSAGES_MAX: usize = 4096;

pub struct PeerService {
    pub broker: Arc<Broker>,
}

impl PeerService {
    /// A call from node `from` is taken only if it comes from this cluster (by the id it
    /// carries), (with TLS) the connection's certificate proves it is that node, and the node
    /// was not removed from the cluster.
    fn check_peer<T>(&self, from: u64, cluster: &str, request: &Request<T>) -> Result<(), Status> {
        let from = NodeId(from);
        if self.broker.cluster_id.foreign(cluster) {
            return Err(Status::permission_denied(format!(
                "node {from} belongs to cluster {cluster}; this node belongs to cluster {}",
                self.broker.cluster_id.get()
            )));
        }
        if self.broker.tls.is_some() {
            let proven = request
                .extensions()
                .get::<crate::tls::ConnInfo>()
                .and_then(|c| c.node);
            if proven != Some(from) {
                return Err(Status::permission_denied(match proven {
                    Some(n) => format!(
                        "the call says it comes from node {from}, but the connection's \
                         certificate is node {n}'s"
                    ),
                    None => format!(
                        "calls between nodes need a certificate from the cluster CA issued to \
                         {:?}; this connection has none",
                        crate::tls::node_common_name(from)
                    ),
                }));
            }
        }
        let Some(t) = self.broker.transport() else {
            return Err(Status::failed_precondition(
                "this node runs alone and takes no Raft traffic",
            ));
        };
        if t.is_isolated_from(from) {
            return Err(Status::unavailable(format!(
                "node {from} is cut off (fault injection)"
            )));
        }
        if self.broker.cluster().removed.contains(&from) {
            return Err(super::status::removed(from));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn exchange(
        &self,
        request: Request<pb::ExchangeRequest>,
    ) -> Result<Response<pb::ExchangeResponse>, Status> {
        let r = request.get_ref();
        self.check_peer(r.from, &r.cluster, &request)?;
        let r = request.into_inner();
        let me = self.broker.node_id();
        if r.to != me.0 {
            return Err(Status::failed_precondition(format!(
                "this is node {me}, not node {}",
                r.to
            )));
        }
        let transport = self
            .broker
            .transport()
            .ok_or_else(|| Status::failed_precondition("this node takes no Raft traffic"))?;
        transport.heard_from(NodeId(r.from), r.incarnation);
        if r.messages.len() > EXCHANGE_MESSAGES_MAX {
            return Err(Status::invalid_argument(format!(
                "{} messages in one exchange; at most {EXCHANGE_MESSAGES_MAX}",
                r.messages.len()
            )));
        }
        let mut replies = Vec::with_capacity(r.messages.len());
        let mut by_core: HashMap<CoreId, Vec<(PartitionKey, u64, pb::RaftRequest)>> =
            HashMap::new();
        for m in r.messages {
            let Some(g) = &m.group else {
                replies.push(pb::RaftReply {
                    call_id: m.call_id,
                    body: Some(pb::raft_reply::Body::Error("message without group".into())),
                });
                continue;
            };
            let key = PartitionKey {
                topic: g.topic.as_str().into(),
                partition: g.partition,
            };
            let core = self.broker.shards.core_of(&key);
            let uid = g.uid;
            by_core.entry(core).or_default().push((key, uid, m));
        }
        // The cores take this exchange's messages after those of the exchanges sent before it
        // on the same link (a group's pipelined appends must reach it in order).
        // The cores are handed their messages side by side: one with a full mailbox does not
        // hold up the others.
        let turn = transport.turn(NodeId(r.from), r.link, r.seq).await;
        let submitted = by_core.into_iter().map(|(core, messages)| {
            let ids: Vec<u64> = messages.iter().map(|m| m.2.call_id).collect();
            let shards = &self.broker.shards;
            async move {
                let answer = shards
                    .submit(core, |reply| CoreRequest::Raft { messages, reply })
                    .await;
                (ids, answer)
            }
        });
        let submitted = futures::future::join_all(submitted).await;
        drop(turn);
        let asks = submitted.into_iter().map(|(ids, answer)| async move {
            match answer {
                Ok(answer) => (ids, answer.await),
                Err(e) => (ids, Err(e)),
            }
        });
        for (ids, r) in futures::future::join_all(asks).await {
            match r {
                Ok(mut rs) => replies.append(&mut rs),
                Err(e) => {
                    let e = e.to_string();
                    replies.extend(ids.into_iter().map(|call_id| pb::RaftReply {
                        call_id,
                        body: Some(pb::raft_reply::Body::Error(e.clone())),
                    }));
                }
            }
        }
        Ok(Response::new(pb::ExchangeResponse {
            replies,
            ordered: true,
        }))
    }

    async fn propose(
        &self,
        request: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let r = request.get_ref();
        self.check_peer(r.from, &r.cluster, &request)?;
        let r = request.into_inner();
        let _call = self.broker.track();
        let at = controller::handle_propose(&self.broker, &r.command, r.forwarded)
            .await
            .map_err(super::status::from_controller)?;
        Ok(Response::new(pb::ProposeResponse { offset: at.0 }))
    }

    async fn metadata_state(
        &self,
        request: Request<pb::MetadataStateRequest>,
    ) -> Result<Response<pb::MetadataStateResponse>, Status> {
        let r = request.get_ref();
        self.check_peer(r.from, &r.cluster, &request)?;
        let (next, state) = self.broker.applied_view();
        if r.probe {
            // What this replica has committed, if more than it has applied: a leader elected
            // after a restart of everyone may still be applying, and a node that took its
            // applied point for the target would be ready too early.
            let s = self
                .broker
                .metadata_replica()
                .await
                .ok_or_else(|| Status::unavailable("the metadata replica is not open"))?;
            // A leader answers with the end of its log: just elected (or restored in its old
            // term after a restart of everyone), it may hold committed entries above its
            // commit index, and a target taken from that index was too low (the asker called
            // itself ready and denied a topic those entries created).
            let committed = if s.is_leader {
                s.positions.next
            } else {
                s.positions.committed
            };
            return Ok(Response::new(pb::MetadataStateResponse {
                checkpoint: Default::default(),
                next: next.max(committed).0,
            }));
        }
        let c = controller::checkpoint::Checkpoint::new(next, (*state).clone());
        Ok(Response::new(pb::MetadataStateResponse {
            checkpoint: c.encode().into(),
            next: next.0,
        }))
    }

    async fn set_fault(
        &self,
        request: Request<pb::SetFaultRequest>,
    ) -> Result<Response<pb::SetFaultResponse>, Status> {
        if !self.broker.config.fault_injection {
            return Err(Status::permission_denied(
                "fault injection is off (start the node with --fault-injection)",
            ));
        }
        let from_node = request
            .extensions()
            .get::<crate::tls::ConnInfo>()
            .and_then(|c| c.node);
        if self.broker.tls.is_some() && from_node.is_none() {
            return Err(Status::permission_denied(
                "with TLS, only a node of this cluster (by its certificate) may inject faults",
            ));
        }
        let Some(t) = self.broker.transport() else {
            return Err(Status::failed_precondition("this node runs alone"));
        };
        let peers: HashSet<NodeId> = request
            .into_inner()
            .isolate_from
            .into_iter()
            .map(NodeId)
            .collect();
        tracing::warn!(
            ?peers,
            "fault injection: traffic with these nodes is dropped"
        );
        t.isolate(peers);
        Ok(Response::new(pb::SetFaultResponse {}))
    }
}
