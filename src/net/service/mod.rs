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
//!   security.rs WhoAmI, users, ACLs, quotas
//! ```
//!
//! Every call is authenticated and checked against the ACLs first (`net/auth.rs`), and
//! charged to its principal's quota (`net/quota.rs`), before it does anything.

mod admin;
pub(in crate::net) mod consume;
mod publish;
mod read;
mod security;
mod topics;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::{Auth, Caller};
use super::quota::Cost;
use crate::broker::Broker;
use crate::cluster::security::{Operation, ResourceKind};
use crate::groups::Groups;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_server::Tern;

pub use read::bytes as read_bytes;

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct TernService {
    pub broker: Arc<Broker>,
    pub groups: Arc<Groups>,
    pub auth: Arc<Auth>,
}

use Operation as Op;
use ResourceKind::{Cluster, Group, Topic};

/// A record's bytes as quotas count them: key, value and headers.
fn payload_bytes(
    key: Option<&bytes::Bytes>,
    value: &bytes::Bytes,
    headers: &[pb::Header],
) -> usize {
    value.len()
        + key.map_or(0, |k| k.len())
        + headers
            .iter()
            .map(|h| h.key.len() + h.value.len())
            .sum::<usize>()
}

/// Counts records handed to a client (not those handed to a node that relays them on: that
/// node counts them when it hands them to its client).
pub(super) fn count_read<'a>(records: impl IntoIterator<Item = &'a pb::Record>) {
    let (mut n, mut bytes) = (0u64, 0usize);
    for r in records {
        n += 1;
        bytes += r.value.len() + r.key.as_ref().map_or(0, |k| k.len());
    }
    if n > 0 {
        let m = &crate::metrics::NODE;
        m.read_records.add(n);
        m.read_bytes.add(bytes as u64);
    }
}

/// One request's worth of the requests/s quota.
const ONE_REQUEST: Cost = Cost {
    requests: 1,
    publish_bytes: 0,
    consume_bytes: 0,
};

impl TernService {
    /// Authenticates, authorizes `op` on the resource, and admits the call under the caller's
    /// requests/s quota.
    async fn check<T>(
        &self,
        request: &Request<T>,
        kind: ResourceKind,
        name: &str,
        op: Operation,
    ) -> Result<Caller, Status> {
        let caller = self.auth.check(&self.broker, request, kind, name, op)?;
        self.auth
            .quotas
            .admit(&self.broker, &caller, || ONE_REQUEST)
            .await?;
        Ok(caller)
    }

    /// Authenticates and admits a call whose resources are checked one by one after.
    pub(in crate::net) async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.auth.authenticate(&self.broker, request)?;
        self.auth
            .quotas
            .admit(&self.broker, &caller, || ONE_REQUEST)
            .await?;
        Ok(caller)
    }
}

#[tonic::async_trait]
impl Tern for TernService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Topic, &request.get_ref().name, Op::Create)
            .await?;
        topics::create(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Topic, &request.get_ref().name, Op::Delete)
            .await?;
        topics::delete(&self.broker, request.into_inner()).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn promote_topic(
        &self,
        request: Request<pb::PromoteTopicRequest>,
    ) -> Result<Response<pb::PromoteTopicResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Topic, &request.get_ref().name, Op::Alter)
            .await?;
        topics::promote(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let _call = self.broker.track();
        let caller = self.caller(&request).await?;
        Ok(Response::new(pb::ListTopicsResponse {
            topics: self
                .broker
                .topics()
                .iter()
                .filter(|t| {
                    self.auth
                        .allowed(&self.broker, &caller, Topic, &t.spec.name, Op::Describe)
                })
                .map(|t| topics::topic_info(t))
                .collect(),
        }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Topic, &request.get_ref().name, Op::Describe)
            .await?;
        topics::describe(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let _call = self.broker.track();
        let caller = self.auth.check(
            &self.broker,
            &request,
            Topic,
            &request.get_ref().topic,
            Op::Publish,
        )?;
        self.auth
            .quotas
            .admit(&self.broker, &caller, || publish::cost(request.get_ref()))
            .await?;
        let resp = publish::submit(&self.broker, request.into_inner(), &caller.origin())
            .await?
            .await?;
        Ok(Response::new(resp))
    }

    async fn init_producer(
        &self,
        request: Request<pb::InitProducerRequest>,
    ) -> Result<Response<pb::InitProducerResponse>, Status> {
        let _call = self.broker.track();
        let caller = self.caller(&request).await?;
        // A producer id is a metadata write: only for callers that may publish somewhere.
        if !caller.superuser
            && !caller.principal.as_deref().is_some_and(|p| {
                self.broker
                    .cluster()
                    .security
                    .may_somewhere(p, Topic, Op::Publish)
            })
        {
            return Err(Status::permission_denied(format!(
                "principal {:?} may not publish to any topic, so it gets no producer id",
                caller.name()
            )));
        }
        publish::init_producer(&self.broker)
            .await
            .map(Response::new)
    }

    type PublishStreamStream = BoxStream<pb::PublishResponse>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let caller = self.auth.authenticate(&self.broker, &request)?;
        Ok(Response::new(publish::stream(
            self.broker.clone(),
            self.auth.clone(),
            caller,
            request.into_inner(),
        )))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.caller(&request).await?;
        let stream = super::subscribe::start(
            self.broker.clone(),
            self.auth.clone(),
            caller,
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(stream))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let _call = self.broker.track();
        let caller = self
            .check(&request, Topic, &request.get_ref().topic, Op::Subscribe)
            .await?;
        let r = read::fetch(&self.broker, request.into_inner(), &caller.origin()).await?;
        if !caller.relayed {
            count_read(&r.records);
        }
        self.auth.quotas.used(&self.broker, &caller, || Cost {
            consume_bytes: read::answered(&r),
            ..Cost::default()
        });
        Ok(Response::new(r))
    }

    type FetchStreamStream = BoxStream<pb::FetchResponse>;

    async fn fetch_stream(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStreamStream>, Status> {
        let caller = self
            .check(&request, Topic, &request.get_ref().topic, Op::Subscribe)
            .await?;
        read::fetch_stream(
            self.broker.clone(),
            self.auth.clone(),
            caller,
            request.into_inner(),
        )
        .map(Response::new)
    }

    async fn list_offsets(
        &self,
        request: Request<pb::ListOffsetsRequest>,
    ) -> Result<Response<pb::ListOffsetsResponse>, Status> {
        let _call = self.broker.track();
        let caller = self
            .check(&request, Topic, &request.get_ref().topic, Op::Describe)
            .await?;
        read::list_offsets(&self.broker, request.into_inner(), &caller.origin())
            .await
            .map(Response::new)
    }

    type ConsumeStream = BoxStream<pb::ConsumeResponse>;

    async fn consume(
        &self,
        request: Request<Streaming<pb::ConsumeRequest>>,
    ) -> Result<Response<Self::ConsumeStream>, Status> {
        let caller = self.caller(&request).await?;
        // Only a relaying node asks for references: it reads the records itself.
        let references = caller.relayed
            && request
                .metadata()
                .contains_key(crate::proto::metadata::REFERENCES);
        consume::consume(
            self.broker.clone(),
            self.groups.clone(),
            self.auth.clone(),
            caller,
            request.into_inner(),
            references,
        )
        .await
        .map(Response::new)
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let _call = self.broker.track();
        let caller = self
            .check(&request, Group, &request.get_ref().group, Op::Subscribe)
            .await?;
        if let Some(node) = consume::elsewhere(&self.broker, &caller).await? {
            let r = self.broker.relay(request.into_inner(), &caller.origin());
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
        let caller = self
            .check(&request, Group, &request.get_ref().group, Op::Subscribe)
            .await?;
        if let Some(node) = consume::elsewhere(&self.broker, &caller).await? {
            let r = self.broker.relay(request.into_inner(), &caller.origin());
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
        let caller = self.caller(&request).await?;
        let mut groups = if let Some(node) = consume::elsewhere(&self.broker, &caller).await? {
            let r = self.broker.relay(request.into_inner(), &caller.origin());
            consume::relayed(
                &self.broker,
                node,
                |mut c| async move { c.list_groups(r).await },
            )
            .await?
            .groups
        } else {
            self.groups.list().await
        };
        groups.retain(|g| {
            self.auth
                .allowed(&self.broker, &caller, Group, &g.group, Op::Describe)
        });
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let _call = self.broker.track();
        let caller = self
            .check(&request, Group, &request.get_ref().group, Op::Describe)
            .await?;
        if let Some(node) = consume::elsewhere(&self.broker, &caller).await? {
            let r = self.broker.relay(request.into_inner(), &caller.origin());
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
        request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let _call = self.broker.track();
        let caller = self.caller(&request).await?;
        let region = &request.get_ref().region;
        if region.len() > 64 {
            return Err(Status::invalid_argument(
                "a region name is at most 64 bytes",
            ));
        }
        let mut info = admin::cluster_info(&self.broker, region).await;
        info.topics.retain(|t| {
            self.auth
                .allowed(&self.broker, &caller, Topic, &t.topic, Op::Describe)
        });
        Ok(Response::new(info))
    }

    async fn move_partition(
        &self,
        request: Request<pb::MovePartitionRequest>,
    ) -> Result<Response<pb::MovePartitionResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Alter).await?;
        admin::move_partition(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn rebalance(
        &self,
        request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Alter).await?;
        admin::rebalance(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Alter).await?;
        admin::remove_node(&self.broker, request.into_inner()).await?;
        Ok(Response::new(pb::RemoveNodeResponse {}))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = self.caller(&request).await?;
        Ok(Response::new(pb::WhoAmIResponse {
            principal: caller.principal.as_deref().unwrap_or("").to_string(),
            superuser: caller.superuser,
            auth_required: self.auth.required(),
        }))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Admin).await?;
        security::create_user(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Admin).await?;
        security::delete_user(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Describe).await?;
        Ok(Response::new(security::list_users(&self.broker)))
    }

    async fn add_acl(
        &self,
        request: Request<pb::AclRequest>,
    ) -> Result<Response<pb::AclResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Admin).await?;
        security::change_acl(&self.broker, request.into_inner(), true)
            .await
            .map(Response::new)
    }

    async fn remove_acl(
        &self,
        request: Request<pb::AclRequest>,
    ) -> Result<Response<pb::AclResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Admin).await?;
        security::change_acl(&self.broker, request.into_inner(), false)
            .await
            .map(Response::new)
    }

    async fn list_acls(
        &self,
        request: Request<pb::ListAclsRequest>,
    ) -> Result<Response<pb::ListAclsResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Describe).await?;
        Ok(Response::new(security::list_acls(
            &self.broker,
            &request.into_inner().principal,
        )))
    }

    async fn set_quota(
        &self,
        request: Request<pb::SetQuotaRequest>,
    ) -> Result<Response<pb::SetQuotaResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Admin).await?;
        security::set_quota(&self.broker, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn list_quotas(
        &self,
        request: Request<pb::ListQuotasRequest>,
    ) -> Result<Response<pb::ListQuotasResponse>, Status> {
        let _call = self.broker.track();
        self.check(&request, Cluster, "", Op::Describe).await?;
        Ok(Response::new(security::list_quotas(&self.broker)))
    }
}
