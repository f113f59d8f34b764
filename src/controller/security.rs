//! Users, ACLs and quotas as operators change them (`tern user | acl | quota`): each change is
//! a metadata command, so every node applies it, and it survives restarts.

use std::sync::Arc;

use super::propose::{propose, wait_applied};
use super::{ControllerError, Result};
use crate::broker::Broker;
use crate::cluster::security::{Acl, Quota, User, ACLS_MAX, QUOTAS_MAX, USERS_MAX};
use crate::cluster::Command;

/// Proposes a command and returns once this node has applied it.
async fn change(broker: &Arc<Broker>, cmd: Command) -> Result<()> {
    let at = propose(broker, &cmd).await?;
    wait_applied(broker, at).await
}

/// Adds a user whose token has this SHA-256 (lowercase hex).
pub async fn create_user(broker: &Arc<Broker>, name: &str, token_sha256: String) -> Result<()> {
    let _admin = broker.admin.lock().await;
    let cmd = Command::CreateUser {
        name: name.to_string(),
        user: User {
            token_sha256,
            created_ms: crate::types::TimestampMs::now().0,
        },
    };
    cmd.validate()?;
    let users = &broker.cluster().security.users;
    if users.contains_key(name) {
        return Err(ControllerError::UserExists(name.to_string()));
    }
    if users.len() >= USERS_MAX {
        return Err(ControllerError::Full(format!(
            "the cluster holds its limit of {USERS_MAX} users"
        )));
    }
    change(broker, cmd).await?;
    if !broker.cluster().security.users.contains_key(name) {
        // Another node created it first, under another token.
        return Err(ControllerError::UserExists(name.to_string()));
    }
    Ok(())
}

pub async fn delete_user(broker: &Arc<Broker>, name: &str) -> Result<()> {
    let _admin = broker.admin.lock().await;
    let cmd = Command::DeleteUser {
        name: name.to_string(),
    };
    cmd.validate()?;
    if !broker.cluster().security.users.contains_key(name) {
        return Err(ControllerError::UnknownUser(name.to_string()));
    }
    change(broker, cmd).await
}

/// Adds (`add`) or removes an ACL; answers whether the ACLs changed.
pub async fn change_acl(broker: &Arc<Broker>, acl: Acl, add: bool) -> Result<bool> {
    let _admin = broker.admin.lock().await;
    acl.validate()?;
    let acls = &broker.cluster().security.acls;
    if acls.contains(&acl) == add {
        return Ok(false);
    }
    if add && acls.len() >= ACLS_MAX {
        return Err(ControllerError::Full(format!(
            "the cluster holds its limit of {ACLS_MAX} ACLs"
        )));
    }
    let cmd = if add {
        Command::AddAcl { acl }
    } else {
        Command::RemoveAcl { acl }
    };
    change(broker, cmd).await?;
    Ok(true)
}

/// Sets (or with an empty quota, removes) a principal's quota.
pub async fn set_quota(broker: &Arc<Broker>, principal: &str, quota: Quota) -> Result<()> {
    let _admin = broker.admin.lock().await;
    let cmd = Command::SetQuota {
        principal: principal.to_string(),
        quota,
    };
    cmd.validate()?;
    let quotas = &broker.cluster().security.quotas;
    if !quota.is_empty() && !quotas.contains_key(principal) && quotas.len() >= QUOTAS_MAX {
        return Err(ControllerError::Full(format!(
            "the cluster holds its limit of {QUOTAS_MAX} quotas"
        )));
    }
    change(broker, cmd).await
}
