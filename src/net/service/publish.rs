//! Publishing: Publish, PublishStream, InitProducer.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Status, Streaming};

use super::BoxStream;
use crate::broker::{Broker, Origin};
use crate::cluster::security::{Operation, ResourceKind};
use crate::cluster::Command;
use crate::controller;
use crate::net::auth::{Auth, Caller};
use crate::net::quota::Cost;
use crate::net::status::{
    from_broker, from_controller, is_over_limit, is_unwritten, leader_of, request_too_large,
};
use crate::net::validate;
use crate::proto::v1 as pb;

/// Publish requests one PublishStream may have in flight.
const PUBLISH_STREAM_IN_FLIGHT: usize = 64;

/// Validates and routes a publish request; the returned future resolves to the answer.
pub async fn submit(
    broker: &Arc<Broker>,
    req: pb::PublishRequest,
    origin: &Origin,
) -> Result<impl std::future::Future<Output = Result<pb::PublishResponse, Status>> + use<>, Status>
{
    let topic = broker.topic(&req.topic).map_err(from_broker)?;
    let request_id = req.request_id;
    let producer = validate::producer(&req)?;
    let records = validate::publish(req, &topic, &broker.config)?;
    // Counted where the client's call entered the cluster, once acknowledged (a relayed copy
    // is not counted again on the node it was relayed to).
    let counted = matches!(origin, Origin::Client(_)).then(|| {
        let bytes: usize = records
            .iter()
            .map(|r| r.record.value.len() + r.record.key.as_ref().map_or(0, |k| k.len()))
            .sum();
        bytes as u64
    });
    let pending = broker
        .submit(&topic, records, producer, origin)
        .await
        .map_err(from_broker)?;
    Ok(async move {
        let acks = pending.await.map_err(from_broker)?;
        if let Some(bytes) = counted {
            let m = &crate::metrics::NODE;
            m.publish_records.add(acks.len() as u64);
            m.publish_bytes.add(bytes);
        }
        Ok(pb::PublishResponse {
            acks: acks
                .into_iter()
                .map(|(partition, offset)| pb::RecordAck {
                    partition,
                    offset: offset.0,
                })
                .collect(),
            request_id,
            error: None,
        })
    })
}

/// What a publish request costs its principal: one request and its records' bytes.
pub fn cost(req: &pb::PublishRequest) -> Cost {
    let bytes: usize = req
        .records
        .iter()
        .map(|r| super::payload_bytes(r.key.as_ref(), &r.value, &r.headers))
        .sum();
    Cost {
        requests: 1,
        publish_bytes: bytes as u64,
        consume_bytes: 0,
    }
}

pub async fn init_producer(broker: &Arc<Broker>) -> Result<pb::InitProducerResponse, Status> {
    let at = controller::propose(broker, &Command::AllocateProducerId)
        .await
        .map_err(from_controller)?;
    Ok(pb::InitProducerResponse {
        producer_id: crate::cluster::producer_id(broker.cluster_id.get(), at),
    })
}

/// Requests are routed in arrival order (so per-partition order holds) and answered as they
/// complete, with a bounded window in flight.
pub fn stream(
    broker: Arc<Broker>,
    auth: Arc<Auth>,
    caller: Caller,
    mut inbound: Streaming<pb::PublishRequest>,
) -> BoxStream<pb::PublishResponse> {
    let origin = caller.origin();
    let (tx, rx) = tokio::sync::mpsc::channel(PUBLISH_STREAM_IN_FLIGHT);
    tokio::spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(PUBLISH_STREAM_IN_FLIGHT));
        let failed = |id: u64, s: Status| pb::PublishResponse {
            acks: vec![],
            request_id: id,
            error: Some(pb::Error {
                code: s.code() as i32,
                message: s.message().to_string(),
                unwritten: is_unwritten(&s),
                leader: leader_of(&s).map_or(0, |l| l.0),
            }),
        };
        while let Some(item) = inbound.next().await {
            let req = match item {
                Ok(r) => r,
                Err(status) => {
                    let status = if is_over_limit(&status) {
                        request_too_large(&status, broker.config.max_request_bytes)
                    } else {
                        status
                    };
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let id = req.request_id;
            let call = broker.track();
            let admitted = match auth.authorize(
                &broker,
                &caller,
                ResourceKind::Topic,
                &req.topic,
                Operation::Publish,
            ) {
                Ok(()) => auth.quotas.admit(&broker, &caller, || cost(&req)).await,
                Err(s) => Err(s),
            };
            let submitted = match admitted {
                Ok(()) => submit(&broker, req, &origin).await,
                Err(s) => Err(s),
            };
            match submitted {
                Ok(pending) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let _call = call;
                        let resp = pending.await.unwrap_or_else(|s| failed(id, s));
                        let _ = tx.send(Ok(resp)).await;
                        drop(permit);
                    });
                }
                Err(s) => {
                    if tx.send(Ok(failed(id, s))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
