//! Security calls: users, ACLs and quotas (WhoAmI is in `mod.rs`). Authorization is checked
//! by the caller; these convert between the API and the metadata model.

use std::sync::Arc;

use tonic::Status;

use crate::broker::Broker;
use crate::cluster::security::{
    Acl, Operation, PatternKind, Permission, Quota, ResourceKind, EVERYONE,
};
use crate::controller;
use crate::net::auth::{hex, new_token, sha256};
use crate::net::status::{from_cluster, from_controller};
use crate::proto::v1 as pb;

pub async fn create_user(
    broker: &Arc<Broker>,
    r: pb::CreateUserRequest,
) -> Result<pb::CreateUserResponse, Status> {
    crate::cluster::security::validate_user_name(&r.name).map_err(from_cluster)?;
    let token = new_token()?;
    controller::create_user(broker, &r.name, hex(&sha256(token.as_bytes())))
        .await
        .map_err(from_controller)?;
    tracing::info!(user = %r.name, "user created");
    Ok(pb::CreateUserResponse { token })
}

pub async fn delete_user(
    broker: &Arc<Broker>,
    r: pb::DeleteUserRequest,
) -> Result<pb::DeleteUserResponse, Status> {
    controller::delete_user(broker, &r.name)
        .await
        .map_err(from_controller)?;
    tracing::info!(user = %r.name, "user deleted");
    Ok(pb::DeleteUserResponse {})
}

pub fn list_users(broker: &Broker) -> pb::ListUsersResponse {
    pb::ListUsersResponse {
        users: broker
            .cluster()
            .security
            .users
            .iter()
            .map(|(name, u)| pb::UserInfo {
                name: name.clone(),
                created_ms: u.created_ms,
            })
            .collect(),
    }
}

/// An ACL from the API: every field checked.
fn acl_from(a: Option<pb::Acl>) -> Result<Acl, Status> {
    let a = a.ok_or_else(|| Status::invalid_argument("acl is required"))?;
    let resource = match pb::ResourceType::try_from(a.resource) {
        Ok(pb::ResourceType::Topic) => ResourceKind::Topic,
        Ok(pb::ResourceType::Group) => ResourceKind::Group,
        Ok(pb::ResourceType::Cluster) => ResourceKind::Cluster,
        _ => {
            return Err(Status::invalid_argument(
                "acl.resource must be TOPIC, GROUP or CLUSTER",
            ))
        }
    };
    let pattern = match pb::PatternType::try_from(a.pattern) {
        Ok(pb::PatternType::Unspecified | pb::PatternType::Literal) => PatternKind::Literal,
        Ok(pb::PatternType::Prefix) => PatternKind::Prefix,
        Err(_) => return Err(Status::invalid_argument("acl.pattern is unknown")),
    };
    let operation = pb::AclOperation::try_from(a.operation)
        .ok()
        .and_then(|o| Operation::try_from(o).ok())
        .ok_or_else(|| {
            Status::invalid_argument(
                "acl.operation must be one of publish, subscribe, create, delete, describe, \
                 alter, admin",
            )
        })?;
    let permission = match pb::AclPermission::try_from(a.permission) {
        Ok(pb::AclPermission::Unspecified | pb::AclPermission::Allow) => Permission::Allow,
        Ok(pb::AclPermission::Deny) => Permission::Deny,
        Err(_) => return Err(Status::invalid_argument("acl.permission is unknown")),
    };
    let acl = Acl {
        principal: a.principal,
        resource,
        pattern,
        name: a.name,
        operation,
        permission,
    };
    acl.validate().map_err(from_cluster)?;
    Ok(acl)
}

pub fn acl_to(a: &Acl) -> pb::Acl {
    pb::Acl {
        principal: a.principal.clone(),
        resource: match a.resource {
            ResourceKind::Topic => pb::ResourceType::Topic,
            ResourceKind::Group => pb::ResourceType::Group,
            ResourceKind::Cluster => pb::ResourceType::Cluster,
        } as i32,
        pattern: match a.pattern {
            PatternKind::Literal => pb::PatternType::Literal,
            PatternKind::Prefix => pb::PatternType::Prefix,
        } as i32,
        name: a.name.clone(),
        operation: pb::AclOperation::from(a.operation) as i32,
        permission: match a.permission {
            Permission::Allow => pb::AclPermission::Allow,
            Permission::Deny => pb::AclPermission::Deny,
        } as i32,
    }
}

pub async fn change_acl(
    broker: &Arc<Broker>,
    r: pb::AclRequest,
    add: bool,
) -> Result<pb::AclResponse, Status> {
    let acl = acl_from(r.acl)?;
    let changed = controller::change_acl(broker, acl.clone(), add)
        .await
        .map_err(from_controller)?;
    if changed {
        tracing::info!(%acl, added = add, "ACL changed");
    }
    Ok(pb::AclResponse { changed })
}

pub fn list_acls(broker: &Broker, principal: &str) -> pb::ListAclsResponse {
    pb::ListAclsResponse {
        acls: broker
            .cluster()
            .security
            .acls
            .iter()
            .filter(|a| principal.is_empty() || a.principal == principal || a.principal == EVERYONE)
            .map(acl_to)
            .collect(),
    }
}

fn quota_to(q: &Quota) -> pb::Quota {
    pb::Quota {
        publish_bytes_per_sec: q.publish_bytes_per_sec,
        consume_bytes_per_sec: q.consume_bytes_per_sec,
        requests_per_sec: q.requests_per_sec,
    }
}

pub async fn set_quota(
    broker: &Arc<Broker>,
    r: pb::SetQuotaRequest,
) -> Result<pb::SetQuotaResponse, Status> {
    let q = r.quota.unwrap_or_default();
    let quota = Quota {
        publish_bytes_per_sec: q.publish_bytes_per_sec,
        consume_bytes_per_sec: q.consume_bytes_per_sec,
        requests_per_sec: q.requests_per_sec,
    };
    controller::set_quota(broker, &r.principal, quota)
        .await
        .map_err(from_controller)?;
    tracing::info!(principal = %r.principal, ?quota, "quota set");
    Ok(pb::SetQuotaResponse {})
}

pub fn list_quotas(broker: &Broker) -> pb::ListQuotasResponse {
    pb::ListQuotasResponse {
        quotas: broker
            .cluster()
            .security
            .quotas
            .iter()
            .map(|(p, q)| pb::PrincipalQuota {
                principal: p.clone(),
                quota: Some(quota_to(q)),
            })
            .collect(),
    }
}
