//! The `tern.v1.Tern` gRPC service: each call decodes and validates, hands over to the node's
//! context (`broker`), the controller or the groups, and turns their errors into statuses.
//!
//! ```text
//! service/
//!   mod.rs      the Tern trait: one line per call, tracking calls in flight
//!   topics.rs   create, delete, list, describe
//!   publish.rs  Publish, PublishStream, InitProducer
//!   read.rs     Fetch, ListOffsets
//!   consume.rs  Consume, Ack, Nack, ListGroups, DescribeGroup (relayed to the coordinator)
//!   admin.rs    ClusterInfo, MovePartition, Rebalance, RemoveNode
//! ```

mod admin;
mod consume;
mod publish;
mod read;
mod topics;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::broker::{relay, Broker};
use crate::groups::Groups;
use crate::proto::metadata::FORWARDED;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_server::Tern;

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct TernService {
    pub broker: Arc<Broker>,
    pub groups: Arc<Groups>,
}

/// Whether another node relayed this call here (it is not relayed again).
fn relayed<T>(r: &Request<T>) -> bool {
    r.metadata().contains_key(FORWARDED)
}

#[tonic::async_trait]
impl Tern for TernService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let _call = self.broker.track();
        topics::create(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let _call = self.broker.track();
        topics::delete(&self.broker, request.into_inner()).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let _call = self.broker.track();
        Ok(Response::new(pb::ListTopicsResponse {
            topics: self
                .broker
                .topics()
                .iter()
                .map(|t| topics::topic_info(t))
                .collect(),
        }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let _call = self.broker.track();
        topics::describe(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let _call = self.broker.track();
        let forwarded = relayed(&request);
        let resp = publish::submit(&self.broker, request.into_inner(), forwarded)
            .await?
            .await?;
        Ok(Response::new(resp))
    }

    async fn init_producer(
        &self,
        _: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        let _call = self.broker.track();
        publish::init_producer(&self.broker)
            .await
            .map(Response::new)
    }

    type PublishStreamStream = BoxStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        Ok(Response::new(publish::stream(
            self.broker.clone(),
            request.into_inner(),
        )))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let stream = super::subscribe::start(self.broker.clone(), request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let _call = self.broker.track();
        let relayed = relayed(&request);
        read::fetch(&self.broker, request.into_inner(), relayed)
            .await
            .map(Response::new)
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let _call = self.broker.track();
        let relayed = relayed(&request);
        read::list_offsets(&self.broker, request.into_inner(), relayed)
            .await
            .map(Response::new)
    }

    type ConsumeStream = BoxStream<pb::ConsumeResponse>;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        consume::consume(self.broker.clone(), self.groups.clone(), request)
            .await
            .map(Response::new)
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let _call = self.broker.track();
        if let Some(node) = consume::elsewhere(&self.broker, &request).await? {
            let r = relay(request.into_inner());
            return consume::relayed(&self.broker, node, |mut c| async move { c.ack(r).await })
                .await
                .map(Response::new);
        }
        consume::ack(&self.groups, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        let _call = self.broker.track();
        if let Some(node) = consume::elsewhere(&self.broker, &request).await? {
            let r = relay(request.into_inner());
            return consume::relayed(&self.broker, node, |mut c| async move { c.nack(r).await })
                .await
                .map(Response::new);
        }
        consume::nack(&self.groups, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let _call = self.broker.track();
        if let Some(node) = consume::elsewhere(&self.broker, &request).await? {
            let r = relay(request.into_inner());
            return consume::relayed(
                &self.broker,
                node,
                |mut c| async move { c.list_groups(r).await },
            )
            .await
            .map(Response::new);
        }
        Ok(Response::new(pb::ListGroupsResponse {
            groups: self.groups.list().await,
        }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let _call = self.broker.track();
        if let Some(node) = consume::elsewhere(&self.broker, &request).await? {
            let r = relay(request.into_inner());
            return consume::relayed(&self.broker, node, |mut c| async move {
                c.describe_group(r).await
            })
            .await
            .map(Response::new);
        }
        consume::describe(&self.groups, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn cluster_info(
        &self,
        _: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let _call = self.broker.track();
        Ok(Response::new(admin::cluster_info(&self.broker).await))
    }

    async fn move_partition(
        &self,
        request: Request<pb::MovePartitionRequest>,
    ) -> Result<Response<pb::MovePartitionResponse>, Status> {
        let _call = self.broker.track();
        admin::move_partition(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        let _call = self.broker.track();
        admin::rebalance(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let _call = self.broker.track();
        admin::remove_node(&self.broker, request.into_inner()).await?;
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }
}
