//! Groups: Consume, Ack, Nack, ListGroups, DescribeGroup. The metadata leader coordinates
//! every group; any other node relays these calls to it (a relayed call is not relayed again:
//! two nodes with different views must not pass it back and forth).

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Status;

use super::BoxStream;
use crate::broker::{Broker, BrokerError};
use crate::cluster::security::{Operation, ResourceKind};
use crate::groups::{self, Groups};
use crate::net::auth::{Auth, Caller};
use crate::net::status::{from_broker, from_group};
use crate::proto::v1 as pb;
use crate::raft::types::NodeId;

/// Messages a relayed Consume call buffers towards the coordinator.
const RELAY_DEPTH: usize = 16;

/// The node coordinating groups: the metadata leader.
async fn coordinator(broker: &Broker, caller: &Caller) -> Result<NodeId, Status> {
    match broker.metadata_leader().await {
        Some(l) if l == broker.node_id() || !caller.relayed => Ok(l),
        _ => Err(from_group(groups::GroupError::NoCoordinator)),
    }
}

/// The coordinator when it is another node (the call goes there), or `None` when this node
/// coordinates.
pub async fn elsewhere(broker: &Broker, caller: &Caller) -> Result<Option<NodeId>, Status> {
    let c = coordinator(broker, caller).await?;
    Ok((c != broker.node_id()).then_some(c))
}

/// A call relayed to the coordinator, its answer (or failure) as this node passes it on.
pub async fn relayed<T, F, Fut>(broker: &Broker, node: NodeId, call: F) -> Result<T, Status>
where
    F: FnOnce(crate::proto::v1::tern_client::TernClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    broker.call_peer(node, call).await.map_err(from_broker)
}

/// A member's call: `inbound` is the member's requests (a join first), from a Consume call or
/// from the REST API. `references`: the call was relayed by a node that reads the records
/// itself (`groups::edge`); deliveries go without keys, headers and values.
pub async fn consume(
    broker: Arc<Broker>,
    groups: Arc<Groups>,
    auth: Arc<Auth>,
    caller: Caller,
    mut inbound: impl futures::Stream<Item = Result<pb::ConsumeRequest, Status>>
        + Send
        + Unpin
        + 'static,
    references: bool,
) -> Result<BoxStream<pb::ConsumeResponse>, Status> {
    let coordinator = coordinator(&broker, &caller).await?;
    if coordinator != broker.node_id() {
        // The metadata leader coordinates groups: relay the call to it. In another region,
        // it sends references and this node reads the records near the member.
        let first = inbound.next().await;
        let topic = match &first {
            Some(Ok(pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Join(j)),
            })) => Some(j.topic.clone()),
            _ => None,
        };
        let fill = topic.filter(|_| groups::edge::fill_here(&broker, coordinator));
        let (tx, rx) = tokio::sync::mpsc::channel(RELAY_DEPTH);
        let b = broker.clone();
        tokio::spawn(async move {
            let Some(Ok(first)) = first else { return };
            if tx.send(first).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    m = inbound.next() => match m {
                        Some(Ok(m)) => {
                            if tx.send(m).await.is_err() {
                                break;
                            }
                        }
                        _ => break,
                    },
                    _ = b.closed() => break,
                }
            }
        });
        let (b2, origin) = (broker.clone(), caller.origin());
        let ask_references = fill.is_some();
        let stream = broker
            .call_peer(coordinator, |mut c| async move {
                let mut call = b2.relay(ReceiverStream::new(rx), &origin);
                if ask_references {
                    call.metadata_mut().insert(
                        crate::proto::metadata::REFERENCES,
                        tonic::metadata::MetadataValue::from_static("1"),
                    );
                }
                c.consume(call).await
            })
            .await
            .map_err(from_broker)?;
        // A lost connection to the coordinator reads as one, not as an h2 error.
        let relay = stream.map(move |r| {
            r.map_err(|s| match BrokerError::from_peer(coordinator, s) {
                BrokerError::Peer(p) => Status::new(p.code, p.message),
                e => Status::unavailable(format!(
                    "lost the group coordinator (node {coordinator}): {e}; join again"
                )),
            })
        });
        let relay: BoxStream<pb::ConsumeResponse> = match fill {
            None => Box::pin(relay),
            Some(topic) => Box::pin(filled(broker.clone(), topic, relay)),
        };
        return Ok(throttled(broker, auth, caller, relay));
    }
    let join_first = || Status::invalid_argument("the first request must be a join");
    let first = inbound
        .next()
        .await
        .transpose()?
        .and_then(|m| m.kind)
        .ok_or_else(join_first)?;
    let pb::consume_request::Kind::Join(join) = first else {
        return Err(join_first());
    };
    // Reading a topic in a group: subscribe on both.
    auth.authorize(
        &broker,
        &caller,
        ResourceKind::Topic,
        &join.topic,
        Operation::Subscribe,
    )?;
    auth.authorize(
        &broker,
        &caller,
        ResourceKind::Group,
        &join.group,
        Operation::Subscribe,
    )?;
    let (key, mode, settings) = groups::validate_join(&broker, join).map_err(from_group)?;
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(settings.out_capacity(mode));
    let member = groups
        .join(key.clone(), mode, settings, out_tx)
        .await
        .map_err(from_group)?;
    let b = broker.clone();
    tokio::spawn(async move {
        let broker = b;
        loop {
            tokio::select! {
                m = inbound.next() => match m {
                    Some(Ok(pb::ConsumeRequest { kind: Some(kind) })) => {
                        groups.request(&key, member, kind).await
                    }
                    Some(Ok(_)) => {}
                    _ => break,
                },
                _ = broker.closed() => break,
            }
        }
        groups.leave(&key, member).await;
    });
    let out = ReceiverStream::new(out_rx).map(move |r| {
        let mut r = r.map_err(from_group)?;
        if let (true, Some(pb::consume_response::Kind::Deliveries(d))) = (references, &mut r.kind) {
            groups::edge::strip(d);
        }
        Ok(r)
    });
    Ok(throttled(broker, auth, caller, out))
}

/// The coordinator's deliveries with their records read near this node (`groups::edge`); the
/// stream ends with UNAVAILABLE if they cannot be (the member joins again: stream mode goes on
/// from its committed offsets, queue mode redelivers what was not acked).
fn filled(
    broker: Arc<Broker>,
    topic: String,
    relay: impl futures::Stream<Item = Result<pb::ConsumeResponse, Status>> + Send + 'static,
) -> impl futures::Stream<Item = Result<pb::ConsumeResponse, Status>> + Send + 'static {
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    relay
        .then(move |r| {
            let (broker, topic, failed) = (broker.clone(), topic.clone(), failed.clone());
            async move {
                // Nothing after a failure: a gap must not reach the member.
                if failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
                let mut r = match r {
                    Ok(r) => r,
                    Err(s) => {
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Some(Err(s));
                    }
                };
                if let Some(pb::consume_response::Kind::Deliveries(d)) = &mut r.kind {
                    if let Err(e) = groups::edge::fill(&broker, &topic, d).await {
                        tracing::warn!(topic, error = %e, "a group member's records could not be read near it");
                        failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Some(Err(Status::unavailable(format!(
                            "the delivered records could not be read near this node ({e}); join again"
                        ))));
                    }
                }
                Some(Ok(r))
            }
        })
        .take_while(Option::is_some)
        .filter_map(|r| r)
}

/// A group's deliveries to a member, counted, and paced by its principal's consume quota.
fn throttled(
    broker: Arc<Broker>,
    auth: Arc<Auth>,
    caller: Caller,
    stream: impl futures::Stream<Item = Result<pb::ConsumeResponse, Status>> + Send + 'static,
) -> BoxStream<pb::ConsumeResponse> {
    if caller.relayed {
        return Box::pin(stream);
    }
    Box::pin(stream.then(move |r| {
        let (broker, auth, caller) = (broker.clone(), auth.clone(), caller.clone());
        async move {
            if let Ok(pb::ConsumeResponse {
                kind: Some(pb::consume_response::Kind::Deliveries(d)),
            }) = &r
            {
                super::count_read(d.deliveries.iter().filter_map(|d| d.record.as_ref()));
                if caller.principal.is_none() {
                    return r;
                }
                let bytes = || {
                    d.deliveries
                        .iter()
                        .filter_map(|d| d.record.as_ref())
                        .map(|r| super::payload_bytes(r.key.as_ref(), &r.value, &r.headers))
                        .sum::<usize>() as u64
                };
                let pause = auth.quotas.consume_wait(&broker, &caller, bytes);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            r
        }
    }))
}

pub async fn ack(groups: &Groups, r: pb::AckRequest) -> Result<pb::AckResponse, Status> {
    let refs = groups::validate_refs(&r.group, &r.topic, &r.deliveries).map_err(from_group)?;
    let acked = groups.ack(&(r.group, r.topic), refs).await;
    Ok(pb::AckResponse { acked })
}

pub async fn nack(groups: &Groups, r: pb::NackRequest) -> Result<pb::NackResponse, Status> {
    let refs = groups::validate_refs(&r.group, &r.topic, &r.deliveries).map_err(from_group)?;
    let delay = groups::nack_delay(r.delay_ms);
    let nacked = groups.nack(&(r.group, r.topic), refs, delay).await;
    Ok(pb::NackResponse { nacked })
}

pub async fn describe(
    groups: &Groups,
    r: pb::DescribeGroupRequest,
) -> Result<pb::DescribeGroupResponse, Status> {
    let topics = groups.describe(&r.group).await.map_err(from_group)?;
    Ok(pb::DescribeGroupResponse { topics })
}
