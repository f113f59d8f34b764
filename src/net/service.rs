//! The `tern.v1.Tern` gRPC service: decodes and validates, then hands over to the broker.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::broker::{relay, Broker, Read, Topic, FORWARDED};
use super::status::{from_peer, is_over_limit, request_too_large};
use super::{controller, groups, reassign, subscribe, validate};
use crate::cluster::Command;
use crate::config::Config;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_client::TernClient;
use crate::proto::v1::tern_server::Tern;
use crate::types::Offset;

/// Default and largest number of records one Fetch returns.
const FETCH_RECORDS_DEFAULT: usize = 500;
const FETCH_RECORDS_MAX: usize = 10_000;
/// Default and largest byte budget of one Fetch.
const FETCH_BYTES_DEFAULT: usize = 1 << 20;
const FETCH_BYTES_MAX: usize = 16 << 20;
/// Partitions one ListOffsets asks at once.
const LIST_OFFSETS_PARALLEL: usize = 32;
/// Publish requests one PublishStream may have in flight.
const PUBLISH_STREAM_IN_FLIGHT: usize = 64;

pub struct TernService {
    pub broker: Arc<Broker>,
}

fn topic_info(t: &Topic) -> pb::TopicInfo {
    let s = &t.spec.settings;
    pb::TopicInfo {
        name: t.spec.name.clone(),
        partitions: t.spec.partitions,
        replication_factor: t.spec.replication_factor,
        config: Some(pb::TopicConfig {
            retention_ms: Some(s.retention_ms.map_or(-1, |v| v as i64)),
            retention_bytes: Some(s.retention_bytes.map_or(-1, |v| v as i64)),
            fsync_policy: match s.fsync_interval_ms {
                None => pb::FsyncPolicy::Always as i32,
                Some(_) => pb::FsyncPolicy::Interval as i32,
            },
            fsync_interval_ms: s.fsync_interval_ms,
            max_record_bytes: Some(s.max_record_bytes),
            segment_bytes: Some(s.segment_bytes),
        }),
    }
}

impl TernService {
    /// Each partition as this node sees it (its replica's view, if it holds one).
    async fn partitions(&self, t: &Topic) -> Result<Vec<pb::PartitionInfo>, Status> {
        let me = self.broker.node_id();
        let mut out = Vec::with_capacity(t.spec.partitions as usize);
        for p in 0..t.spec.partitions {
            let mut info = pb::PartitionInfo {
                partition: p,
                leader: 0,
                replicas: t.replicas(p).to_vec(),
                start_offset: 0,
                end_offset: 0,
                core: t.core(p),
                local: false,
                term: 0,
                followers: Vec::new(),
                moving_to: t.spec.moving.get(&p).cloned().unwrap_or_default(),
            };
            if t.on(me, p) {
                // A replica still opening (just created, or being reconciled) reports no view.
                if let Ok(s) = self.broker.replica_state(t, p).await {
                    let last = s.last_index.unwrap_or(0);
                    info.leader = s.leader.unwrap_or(0);
                    info.start_offset = s.positions.start.0;
                    info.end_offset = s.positions.committed.0;
                    info.local = true;
                    info.term = s.term;
                    info.followers = s
                        .matched
                        .iter()
                        .map(|(node, m)| pb::ReplicaProgress {
                            node: *node,
                            lag_entries: m.map_or(last + 1, |m| last.saturating_sub(m)),
                            matched: m.is_some(),
                        })
                        .collect();
                }
            }
            out.push(info);
        }
        Ok(out)
    }

    /// Validates and routes a publish request; the returned future resolves to the answer.
    async fn publish_submit(
        broker: &Arc<Broker>,
        req: pb::PublishRequest,
        forwarded: bool,
    ) -> Result<
        impl std::future::Future<Output = Result<pb::PublishResponse, Status>> + use<>,
        Status,
    > {
        let topic = broker.topic(&req.topic)?;
        let request_id = req.request_id;
        let producer = validate::producer(&req)?;
        let records = validate::publish(req, &topic, &broker.config)?;
        let pending = broker.submit(&topic, records, producer, forwarded).await?;
        Ok(async move {
            let acks = pending.await?;
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
}

/// Serves a Fetch: from this node's replica, or forwarded (once) to a node that has one.
pub(super) async fn fetch(
    broker: &Arc<Broker>,
    r: pb::FetchRequest,
    relayed: bool,
) -> Result<pb::FetchResponse, Status> {
    let t = broker.topic(&r.topic)?;
    t.check_partition(r.partition)?;
    let read = Read {
        from: Offset(r.offset),
        max_records: match r.max_records as usize {
            0 => FETCH_RECORDS_DEFAULT,
            n => n.min(FETCH_RECORDS_MAX),
        },
        max_bytes: match r.max_bytes as usize {
            0 => FETCH_BYTES_DEFAULT,
            n => n.min(FETCH_BYTES_MAX),
        },
        max_wait: Duration::from_millis(
            (r.max_wait_ms as u64).min(broker.config.max_fetch_wait_ms),
        ),
    };
    broker.read(&t, r.partition, read, relayed).await
}

/// Serves a ListOffsets: each partition from this node's replica, or from another (once).
async fn list_offsets(
    broker: &Arc<Broker>,
    r: pb::ListOffsetsRequest,
    relayed: bool,
) -> Result<pb::ListOffsetsResponse, Status> {
    let t = broker.topic(&r.topic)?;
    let at = validate::start_at(r.position.as_ref())?;
    let parts: Vec<u32> = if r.partitions.is_empty() {
        (0..t.spec.partitions).collect()
    } else {
        r.partitions
    };
    for p in &parts {
        t.check_partition(*p)?;
    }
    let asks = futures::stream::iter(parts.into_iter().map(|p| {
        let t = t.clone();
        async move {
            let o = broker.list_offsets(&t, p, at, relayed).await?;
            Ok(pb::PartitionOffsets {
                partition: p,
                start_offset: o.start.0,
                end_offset: o.end.0,
                offset: o.offset.0,
            })
        }
    }));
    let answers: Vec<Result<pb::PartitionOffsets, Status>> =
        futures::StreamExt::buffered(asks, LIST_OFFSETS_PARALLEL)
            .collect()
            .await;
    Ok(pb::ListOffsetsResponse {
        partitions: answers.into_iter().collect::<Result<_, _>>()?,
    })
}

/// The node coordinating groups: the metadata leader. A call relayed here by another node is
/// not relayed again (two nodes with different views must not pass it back and forth).
async fn coordinator<T>(broker: &Broker, request: &Request<T>) -> Result<u64, Status> {
    let relayed = request.metadata().contains_key(FORWARDED);
    match broker.metadata_leader().await {
        Some(l) if l == broker.node_id() || !relayed => Ok(l),
        _ => Err(Status::unavailable(
            "no metadata leader (the group coordinator) here right now; retry",
        )),
    }
}

/// A client of the group coordinator when it is another node (the call goes there), or
/// `None` when this node coordinates.
async fn coordinator_elsewhere<T>(
    broker: &Broker,
    request: &Request<T>,
) -> Result<Option<(u64, TernClient<Channel>)>, Status> {
    let c = coordinator(broker, request).await?;
    if c == broker.node_id() {
        return Ok(None);
    }
    broker.peer_client(c).map(|client| Some((c, client)))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Tern for TernService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let _call = self.broker.track();
        let r = request.into_inner();
        let cfg: &Config = &self.broker.config;
        validate::topic_name(&r.name)?;
        let partitions = validate::partition_count(r.partitions, cfg)?;
        let settings = validate::topic_settings(r.config.as_ref(), &cfg.topic_defaults)?;
        self.broker.wait_metadata_leader().await?;
        let nodes = self.broker.cluster().placeable().len().max(1) as u32;
        let rf = validate::replication_factor(
            r.replication_factor,
            cfg.topic_defaults.replication_factor,
            nodes,
        )?;
        let t = controller::create_topic(&self.broker, r.name, partitions, rf, settings).await?;
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(topic_info(&t)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let _call = self.broker.track();
        let r = request.into_inner();
        self.broker.topic(&r.name)?;
        controller::delete_topic(&self.broker, &r.name).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let _call = self.broker.track();
        Ok(Response::new(pb::ListTopicsResponse {
            topics: self.broker.topics().iter().map(|t| topic_info(t)).collect(),
        }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let _call = self.broker.track();
        let r = request.into_inner();
        let t = self.broker.topic(&r.name)?;
        Ok(Response::new(pb::DescribeTopicResponse {
            topic: Some(topic_info(&t)),
            partitions: self.partitions(&t).await?,
        }))
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let _call = self.broker.track();
        let forwarded = request.metadata().contains_key(FORWARDED);
        let resp = Self::publish_submit(&self.broker, request.into_inner(), forwarded)
            .await?
            .await?;
        Ok(Response::new(resp))
    }

    async fn init_producer(
        &self,
        _: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        let _call = self.broker.track();
        let at = controller::propose(&self.broker, &Command::AllocateProducerId).await?;
        Ok(Response::new(pb::InitProducerResponse {
            producer_id: at.0 + 1,
        }))
    }

    type PublishStreamStream = BoxStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let broker = self.broker.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(PUBLISH_STREAM_IN_FLIGHT);
        tokio::spawn(async move {
            // Requests are routed in arrival order (so per-partition order holds) and answered
            // as they complete, with a bounded window in flight.
            let permits = Arc::new(tokio::sync::Semaphore::new(PUBLISH_STREAM_IN_FLIGHT));
            let failed = |id: u64, s: Status| pb::PublishResponse {
                acks: vec![],
                request_id: id,
                error: Some(pb::Error {
                    code: s.code() as i32,
                    message: s.message().to_string(),
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
                match TernService::publish_submit(&broker, req, false).await {
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let stream = subscribe::start(self.broker.clone(), request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let _call = self.broker.track();
        let forwarded = request.metadata().contains_key(FORWARDED);
        fetch(&self.broker, request.into_inner(), forwarded)
            .await
            .map(Response::new)
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let _call = self.broker.track();
        let relayed = request.metadata().contains_key(FORWARDED);
        list_offsets(&self.broker, request.into_inner(), relayed)
            .await
            .map(Response::new)
    }

    type ConsumeStream = BoxStream<pb::ConsumeResponse>;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let broker = self.broker.clone();
        let coordinator = coordinator(&broker, &request).await?;
        let mut inbound = request.into_inner();
        if coordinator != broker.node_id() {
            // The metadata leader coordinates groups: relay the call to it.
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            let mut closing = broker.closing();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        m = inbound.message() => match m {
                            Ok(Some(m)) => {
                                if tx.send(m).await.is_err() {
                                    break;
                                }
                            }
                            _ => break,
                        },
                        _ = closing.changed() => break,
                    }
                }
            });
            let resp = broker
                .peer_client(coordinator)?
                .consume(relay(ReceiverStream::new(rx)))
                .await
                .map_err(|s| from_peer(coordinator, s))?;
            // A lost connection to the coordinator reads as one, not as an h2 error.
            let relay = resp.into_inner().map(move |r| {
                r.map_err(|s| match s.code() {
                    tonic::Code::Unknown | tonic::Code::Cancelled => Status::unavailable(format!(
                        "lost the group coordinator (node {coordinator}): {}; join again",
                        s.message()
                    )),
                    _ => s,
                })
            });
            return Ok(Response::new(Box::pin(relay)));
        }
        let first = inbound
            .message()
            .await?
            .and_then(|m| m.kind)
            .ok_or_else(|| Status::invalid_argument("the first request must be a join"))?;
        let pb::consume_request::Kind::Join(join) = first else {
            return Err(Status::invalid_argument("the first request must be a join"));
        };
        let (key, mode, settings) = groups::validate_join(&broker, join)?;
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(settings.out_capacity(mode));
        let member = broker
            .groups
            .join(&broker, key.clone(), mode, settings, out_tx)
            .await?;
        let b = broker.clone();
        tokio::spawn(async move {
            let mut closing = b.closing();
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(pb::ConsumeRequest { kind: Some(kind) })) => {
                            b.groups.request(&key, member, kind).await
                        }
                        Ok(Some(_)) => {}
                        _ => break,
                    },
                    _ = closing.changed() => break,
                }
            }
            b.groups.leave(&key, member).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let _call = self.broker.track();
        if let Some((node, mut c)) = coordinator_elsewhere(&self.broker, &request).await? {
            return c
                .ack(relay(request.into_inner()))
                .await
                .map_err(|s| from_peer(node, s));
        }
        let r = request.into_inner();
        let refs = groups::validate_refs(&r.group, &r.topic, &r.deliveries)?;
        let acked = self.broker.groups.ack(&(r.group, r.topic), refs).await;
        Ok(Response::new(pb::AckResponse { acked }))
    }

    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        let _call = self.broker.track();
        if let Some((node, mut c)) = coordinator_elsewhere(&self.broker, &request).await? {
            return c
                .nack(relay(request.into_inner()))
                .await
                .map_err(|s| from_peer(node, s));
        }
        let r = request.into_inner();
        let refs = groups::validate_refs(&r.group, &r.topic, &r.deliveries)?;
        let delay = groups::nack_delay(r.delay_ms);
        let nacked = self
            .broker
            .groups
            .nack(&(r.group, r.topic), refs, delay)
            .await;
        Ok(Response::new(pb::NackResponse { nacked }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let _call = self.broker.track();
        if let Some((node, mut c)) = coordinator_elsewhere(&self.broker, &request).await? {
            return c
                .list_groups(relay(request.into_inner()))
                .await
                .map_err(|s| from_peer(node, s));
        }
        Ok(Response::new(pb::ListGroupsResponse {
            groups: self.broker.groups.list(&self.broker).await,
        }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let _call = self.broker.track();
        if let Some((node, mut c)) = coordinator_elsewhere(&self.broker, &request).await? {
            return c
                .describe_group(relay(request.into_inner()))
                .await
                .map_err(|s| from_peer(node, s));
        }
        let r = request.into_inner();
        validate::group_name(&r.group)?;
        let topics = self.broker.groups.describe(&self.broker, &r.group).await;
        if topics.is_empty() {
            return Err(Status::not_found(format!(
                "group {:?} has no members and no committed positions",
                r.group
            )));
        }
        Ok(Response::new(pb::DescribeGroupResponse { topics }))
    }

    async fn cluster_info(
        &self,
        _: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let _call = self.broker.track();
        let mut topics = Vec::new();
        for t in self.broker.topics() {
            topics.push(pb::TopicPartitions {
                topic: t.spec.name.clone(),
                partitions: self.partitions(&t).await?,
            });
        }
        let meta = self.broker.metadata_replica().await;
        let state = self.broker.cluster();
        let nodes = state
            .nodes
            .iter()
            .map(|(id, m)| pb::NodeInfo {
                id: *id,
                address: m.addr.clone(),
                region: m.region.clone(),
                zone: m.zone.clone(),
                draining: state.draining.contains(id),
            })
            .collect();
        Ok(Response::new(pb::ClusterInfoResponse {
            nodes,
            topics,
            node_id: self.broker.node_id(),
            metadata_leader: self.broker.metadata_leader().await.unwrap_or(0),
            ready: self.broker.is_ready(),
            controllers: meta.map(|m| m.voters).unwrap_or_default(),
        }))
    }

    async fn move_partition(
        &self,
        request: Request<pb::MovePartitionRequest>,
    ) -> Result<Response<pb::MovePartitionResponse>, Status> {
        let _call = self.broker.track();
        let r = request.into_inner();
        if r.replicas.len() > crate::cluster::REPLICAS_MAX as usize {
            return Err(Status::invalid_argument(format!(
                "at most {} replicas",
                crate::cluster::REPLICAS_MAX
            )));
        }
        let unchanged =
            !reassign::move_partition(&self.broker, &r.topic, r.partition, r.replicas).await?;
        Ok(Response::new(pb::MovePartitionResponse { unchanged }))
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        let _call = self.broker.track();
        let max = match request.into_inner().max_moves {
            0 => reassign::REBALANCE_MOVES_MAX,
            n => n as usize,
        };
        let moves = reassign::rebalance(&self.broker, max)
            .await?
            .into_iter()
            .map(|m| pb::PartitionMove {
                topic: m.topic,
                partition: m.partition,
                from: m.from,
                to: m.to,
            })
            .collect();
        Ok(Response::new(pb::RebalanceResponse { moves }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let _call = self.broker.track();
        reassign::remove_node(&self.broker, request.into_inner().node_id).await?;
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }
}
