//! Changing the metadata: a command is appended to the metadata log through its leader (here,
//! or `Peer.Propose` to the leader), and a change returns once this node has applied it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{ControllerError, Result};
use crate::broker::{Broker, BrokerError};
use crate::cluster::Command;
use crate::log::Record;
use crate::proto::internal as ipb;
use crate::raft::types::NodeId;
use crate::shard::{CoreError, CoreRequest, PartitionKey};
use crate::types::{Offset, TimestampMs};

/// How long a proposal waits to be applied on this node.
pub const APPLY_WAIT: Duration = Duration::from_secs(15);

/// Appends a command to the metadata log through its leader; returns its offset. While the
/// metadata group has no leader this node can reach (an election, a leader that just died or
/// was removed), waits up to two election timeouts for one: nothing was written by a refused
/// attempt, so going again is safe.
pub async fn propose(broker: &Arc<Broker>, cmd: &Command) -> Result<Offset> {
    cmd.validate()?;
    let deadline = tokio::time::Instant::now() + broker.leader_wait();
    loop {
        match propose_once(broker, cmd).await {
            Err(e) if e.unwritten() && tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "metadata proposal: waiting for a leader");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(ControllerError::Broker(BrokerError::Core(CoreError::NotLeader {
                leader: None,
            }))) => return Err(no_metadata_leader(broker).await),
            other => return other,
        }
    }
}

/// One attempt: proposes here if this node leads, else forwards to the leader it knows.
async fn propose_once(broker: &Arc<Broker>, cmd: &Command) -> Result<Offset> {
    match propose_local(broker, cmd).await {
        Err(CoreError::NotLeader { leader }) => {
            let Some(l) = leader.filter(|l| *l != broker.node_id()) else {
                return Err(CoreError::NotLeader { leader: None }.into());
            };
            forward_proposal(broker, l, cmd).await
        }
        r => Ok(r?),
    }
}

/// Appends a command to the metadata log if this node leads the metadata group.
pub async fn propose_local(broker: &Broker, cmd: &Command) -> Result<Offset, CoreError> {
    let record = Record {
        key: None,
        value: Bytes::from(cmd.encode()),
        headers: Vec::new(),
        timestamp: TimestampMs::now(),
        ttl_ms: None,
    };
    let key = PartitionKey::metadata();
    let ack = broker
        .shards
        .ask(broker.shards.core_of(&key), |reply| CoreRequest::Append {
            key,
            records: vec![record],
            producer: None,
            reply,
        })
        .await?
        .into_result()?;
    Ok(*ack
        .offsets
        .first()
        .expect("an append of one record answers one offset"))
}

/// Sends a command to the metadata leader (`Peer.Propose`), over the connection to it that
/// forwarding uses too.
async fn forward_proposal(broker: &Broker, leader: NodeId, cmd: &Command) -> Result<Offset> {
    let mut client = ipb::peer_client::PeerClient::new(broker.peer_channel(leader)?);
    let mut req = tonic::Request::new(ipb::ProposeRequest {
        from: broker.node_id().0,
        command: Bytes::from(cmd.encode()),
        forwarded: true,
        cluster: broker.cluster_id.get().to_string(),
    });
    req.set_timeout(APPLY_WAIT);
    let r = client
        .propose(req)
        .await
        .map_err(|s| BrokerError::from_peer(leader, s))?;
    Ok(Offset(r.into_inner().offset))
}

/// Sends a command to the member at `addr` (its id unknown yet), which proposes it or passes
/// it to the leader: how a node that knows no leader registers.
pub async fn propose_through(broker: &Broker, addr: &str, cmd: &Command) -> Result<Offset> {
    let through = |why: String, removed: bool| ControllerError::Through {
        addr: addr.to_string(),
        why,
        removed,
    };
    let endpoint = crate::tls::endpoint(addr).map_err(ControllerError::Invalid)?;
    let channel = crate::tls::connect(&endpoint, broker.client_tls().as_ref())
        .await
        .map_err(|e| through(crate::tls::describe(&e), false))?;
    let mut client = ipb::peer_client::PeerClient::new(channel);
    let mut req = tonic::Request::new(ipb::ProposeRequest {
        from: broker.node_id().0,
        command: Bytes::from(cmd.encode()),
        forwarded: false,
        cluster: broker.cluster_id.get().to_string(),
    });
    req.set_timeout(APPLY_WAIT);
    match client.propose(req).await {
        Ok(r) => Ok(Offset(r.into_inner().offset)),
        Err(s) => {
            let e = BrokerError::from_peer(NodeId::default(), s);
            let removed = matches!(&e, BrokerError::Peer(p) if p.removed);
            Err(through(e.to_string(), removed))
        }
    }
}

/// Waits until this node has applied the metadata log past `offset`.
pub async fn wait_applied(broker: &Broker, offset: Offset) -> Result<()> {
    let mut rx = broker.applied.subscribe();
    let applied = async move { rx.wait_for(|a| *a > offset.0).await.map(|_| ()) };
    match tokio::time::timeout(APPLY_WAIT, applied).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(BrokerError::ShuttingDown.into()),
        Err(_) => Err(ControllerError::NotApplied {
            offset: offset.0,
            waited: APPLY_WAIT,
        }),
    }
}

/// Handles `Peer.Propose`: a forwarded command is proposed here (this node was taken for the
/// metadata leader) or refused; an unforwarded one (from a joining node) may be passed on once.
/// A registration of a removed node is refused.
pub async fn handle_propose(
    broker: &Arc<Broker>,
    command: &[u8],
    forwarded: bool,
) -> Result<Offset> {
    let cmd = Command::decode(command)?;
    if let Command::RegisterNode { id, .. } = &cmd {
        if broker.cluster().removed.contains(id) {
            return Err(ControllerError::Removed(*id));
        }
    }
    if !forwarded {
        return propose(broker, &cmd).await;
    }
    cmd.validate()?;
    Ok(propose_local(broker, &cmd).await?)
}

/// Waits (two election timeouts at most) until the metadata group has a leader and this node
/// has caught up with the metadata; says what is missing otherwise.
pub async fn wait_metadata_leader(broker: &Broker) -> Result<NodeId> {
    let deadline = tokio::time::Instant::now() + broker.leader_wait();
    loop {
        if let Some(l) = broker.metadata_leader().await.filter(|_| broker.is_ready()) {
            return Ok(l);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(no_metadata_leader(broker).await);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Why there is no metadata leader (or this node does not serve yet), as far as it can tell.
pub async fn no_metadata_leader(broker: &Broker) -> ControllerError {
    let me = broker.node_id();
    if broker.metadata_leader().await.is_some() {
        return ControllerError::CatchingUp { node: me };
    }
    let voters = broker.metadata_voters().await;
    let unreachable = voters
        .iter()
        .copied()
        .filter(|n| *n != me)
        .filter(|n| {
            broker
                .transport()
                .is_some_and(|t| t.reachable(*n) != Some(true))
        })
        .collect();
    ControllerError::NoMetadataLeader {
        me,
        voters,
        unreachable,
    }
}
