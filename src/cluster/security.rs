//! Who may do what, as the metadata keeps it: users (a token's hash, never the token), ACLs and
//! quotas, per principal. Pure: `net/auth.rs` authenticates callers and asks [`Security`].
//!
//! An ACL names a principal (or `*`, everyone), a resource (a topic, a group, or the cluster)
//! by a literal name, `*`, or a prefix, an operation, and allow or deny. A request is allowed
//! if some ACL allows it and none denies it: deny wins, and nothing is allowed until granted.
//! Superusers (configured per node) are not checked at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::{invalid, ClusterError};
use super::topic::TOPIC_NAME_MAX;

/// Users the metadata holds at most.
pub const USERS_MAX: usize = 10_000;
/// ACLs the metadata holds at most.
pub const ACLS_MAX: usize = 10_000;
/// Principals with a quota of their own, at most.
pub const QUOTAS_MAX: usize = 10_000;
/// Longest principal name (a certificate's subject name may be long).
pub const PRINCIPAL_MAX: usize = 255;
/// Longest user name (`tern user create`).
pub const USER_NAME_MAX: usize = 64;

/// The principal an ACL or quota names for everyone.
pub const EVERYONE: &str = "*";

/// What a request does to a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Publish,
    Subscribe,
    Create,
    Delete,
    Describe,
    Alter,
    Admin,
}

impl Operation {
    pub const ALL: [Operation; 7] = [
        Operation::Publish,
        Operation::Subscribe,
        Operation::Create,
        Operation::Delete,
        Operation::Describe,
        Operation::Alter,
        Operation::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Describe => "describe",
            Operation::Alter => "alter",
            Operation::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.name() == s)
    }

    /// Whether an ACL for `self` also grants `asked`: any right on a resource includes seeing
    /// it (describe), as in Kafka.
    fn grants(self, asked: Operation) -> bool {
        self == asked || asked == Operation::Describe
    }
}

impl From<Operation> for crate::proto::v1::AclOperation {
    fn from(op: Operation) -> Self {
        use crate::proto::v1::AclOperation as P;
        match op {
            Operation::Publish => P::Publish,
            Operation::Subscribe => P::Subscribe,
            Operation::Create => P::Create,
            Operation::Delete => P::Delete,
            Operation::Describe => P::Describe,
            Operation::Alter => P::Alter,
            Operation::Admin => P::Admin,
        }
    }
}

impl TryFrom<crate::proto::v1::AclOperation> for Operation {
    type Error = ();

    /// Every operation but UNSPECIFIED.
    fn try_from(op: crate::proto::v1::AclOperation) -> Result<Self, ()> {
        Operation::ALL
            .into_iter()
            .find(|o| crate::proto::v1::AclOperation::from(*o) == op)
            .ok_or(())
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of thing an ACL protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    Topic,
    Group,
    /// The cluster as a whole (nodes, partitions' placement, users, ACLs, quotas).
    Cluster,
}

impl ResourceKind {
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::Topic => "topic",
            ResourceKind::Group => "group",
            ResourceKind::Cluster => "cluster",
        }
    }
}

/// How an ACL's resource name matches: exactly (`*` matches every name) or as a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternKind {
    Literal,
    Prefix,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Allow,
    Deny,
}

/// One access rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Acl {
    /// A principal's name, or `*` for everyone.
    pub principal: String,
    pub resource: ResourceKind,
    pub pattern: PatternKind,
    /// The resource's name, `*` (literal) for every one; empty for the cluster.
    pub name: String,
    pub operation: Operation,
    pub permission: Permission,
}

impl Acl {
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.principal != EVERYONE {
            validate_principal(&self.principal)?;
        }
        match self.resource {
            ResourceKind::Cluster => {
                if !self.name.is_empty() || self.pattern != PatternKind::Literal {
                    return Err(invalid("a cluster ACL names no resource"));
                }
            }
            ResourceKind::Topic | ResourceKind::Group => {
                let wildcard = self.name == "*" && self.pattern == PatternKind::Literal;
                if !wildcard {
                    validate_resource_name(&self.name)?;
                }
            }
        }
        Ok(())
    }

    fn matches(&self, principal: &str, kind: ResourceKind, name: &str, op: Operation) -> bool {
        (self.principal == EVERYONE || self.principal == principal)
            && self.resource == kind
            && self.operation.grants(op)
            && match self.pattern {
                PatternKind::Literal => self.name == name || self.name == "*",
                PatternKind::Prefix => name.starts_with(&self.name),
            }
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let perm = match self.permission {
            Permission::Allow => "allow",
            Permission::Deny => "deny",
        };
        write!(f, "{perm} {} {} on ", self.principal, self.operation)?;
        match (self.resource, self.pattern) {
            (ResourceKind::Cluster, _) => write!(f, "the cluster"),
            (k, PatternKind::Literal) => write!(f, "{} {}", k.name(), self.name),
            (k, PatternKind::Prefix) => write!(f, "{} {}*", k.name(), self.name),
        }
    }
}

/// A user that authenticates with a token: only the token's SHA-256 is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Lowercase hex of SHA-256 of the token.
    pub token_sha256: String,
    pub created_ms: i64,
}

/// Limits on what one principal may use, per second, on each node. Absent: unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consume_bytes_per_sec: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_sec: Option<u64>,
}

impl Quota {
    pub fn is_empty(&self) -> bool {
        *self == Quota::default()
    }

    pub fn validate(&self) -> Result<(), ClusterError> {
        let rates = [
            self.publish_bytes_per_sec,
            self.consume_bytes_per_sec,
            self.requests_per_sec,
        ];
        if rates.iter().flatten().any(|r| *r == 0) {
            return Err(invalid(
                "a rate of 0 per second would allow nothing (revoke ACLs to forbid)",
            ));
        }
        Ok(())
    }
}

/// Users, ACLs and quotas, as the metadata holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub users: BTreeMap<String, User>,
    pub acls: BTreeSet<Acl>,
    /// Per principal, or `*` for every principal without one of its own.
    pub quotas: BTreeMap<String, Quota>,
    /// Counts changes to users (a cached token is checked again after one).
    pub users_version: u64,
}

impl Security {
    /// Whether `principal` may do `op` on the resource: some ACL allows it and none denies it.
    pub fn allows(&self, principal: &str, kind: ResourceKind, name: &str, op: Operation) -> bool {
        let mut allowed = false;
        for a in &self.acls {
            if a.matches(principal, kind, name, op) {
                match a.permission {
                    Permission::Deny => return false,
                    Permission::Allow => allowed = true,
                }
            }
        }
        allowed
    }

    /// Whether some ACL allows `principal` to do `op` on some resource of this kind (what
    /// denies leaves it is checked per resource).
    pub fn may_somewhere(&self, principal: &str, kind: ResourceKind, op: Operation) -> bool {
        self.acls.iter().any(|a| {
            (a.principal == EVERYONE || a.principal == principal)
                && a.resource == kind
                && a.operation == op
                && a.permission == Permission::Allow
        })
    }

    /// The user a token's SHA-256 (lowercase hex) belongs to.
    pub fn user_by_token(&self, token_sha256: &str) -> Option<&str> {
        self.users
            .iter()
            .find(|(_, u)| u.token_sha256 == token_sha256)
            .map(|(n, _)| n.as_str())
    }

    /// The quota that applies to `principal`: its own, else everyone's.
    pub fn quota_of(&self, principal: &str) -> Option<&Quota> {
        self.quotas
            .get(principal)
            .or_else(|| self.quotas.get(EVERYONE))
    }
}

/// A principal's name: from a user, or a client certificate's subject (CN or SAN). Printable
/// ASCII, so it travels in gRPC metadata when a call is forwarded.
pub fn validate_principal(name: &str) -> Result<(), ClusterError> {
    if name.is_empty() || name.len() > PRINCIPAL_MAX {
        return Err(ClusterError::InvalidName(format!(
            "a principal is 1 to {PRINCIPAL_MAX} bytes"
        )));
    }
    if name == EVERYONE
        || name.starts_with(' ')
        || name.ends_with(' ')
        || !name.chars().all(|c| c.is_ascii_graphic() || c == ' ')
    {
        return Err(ClusterError::InvalidName(format!(
            "principal {name:?}: printable ASCII (spaces inside only), and not \"*\""
        )));
    }
    Ok(())
}

/// A user's name (`tern user create NAME`): 1 to 64 of `[a-zA-Z0-9._@-]`, not starting with
/// `tern-node-` (the names nodes' certificates carry).
pub fn validate_user_name(name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= USER_NAME_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
        && !name.starts_with("tern-node-");
    if ok {
        Ok(())
    } else {
        Err(ClusterError::InvalidName(format!(
            "user name {name:?}: 1 to {USER_NAME_MAX} of letters, digits, '.', '_', '@' and \
             '-', not starting with \"tern-node-\""
        )))
    }
}

/// A topic or group name (or prefix) in an ACL.
fn validate_resource_name(name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= TOPIC_NAME_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ClusterError::InvalidName(format!(
            "resource name {name:?}: 1 to {TOPIC_NAME_MAX} of letters, digits, '.', '_' and \
             '-', or \"*\" for every one"
        )))
    }
}

/// A cluster id: 1 to 64 of `[a-z0-9-]`.
pub fn valid_cluster_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Whether `hex` is a SHA-256 in lowercase hex.
pub fn valid_sha256_hex(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(
        principal: &str,
        kind: ResourceKind,
        pattern: PatternKind,
        name: &str,
        op: Operation,
        permission: Permission,
    ) -> Acl {
        Acl {
            principal: principal.into(),
            resource: kind,
            pattern,
            name: name.into(),
            operation: op,
            permission,
        }
    }

    #[test]
    fn nothing_is_allowed_until_granted_and_deny_wins() {
        use Operation::*;
        use PatternKind::*;
        use Permission::*;
        use ResourceKind::*;
        let mut s = Security::default();
        assert!(!s.allows("alice", Topic, "orders", Publish));
        s.acls
            .insert(acl("alice", Topic, Prefix, "ord", Publish, Allow));
        assert!(s.allows("alice", Topic, "orders", Publish));
        assert!(
            s.allows("alice", Topic, "orders", Describe),
            "publish implies describe"
        );
        assert!(!s.allows("alice", Topic, "orders", Subscribe));
        assert!(!s.allows("bob", Topic, "orders", Publish));
        assert!(
            !s.allows("alice", Group, "orders", Publish),
            "another kind of resource"
        );
        assert!(
            !s.allows("alice", Topic, "or", Publish),
            "shorter than the prefix"
        );
        s.acls
            .insert(acl("*", Topic, Literal, "orders", Publish, Deny));
        assert!(!s.allows("alice", Topic, "orders", Publish), "deny wins");
        assert!(s.allows("alice", Topic, "orders-eu", Publish));
        s.acls
            .insert(acl("bob", Topic, Literal, "*", Subscribe, Allow));
        assert!(s.allows("bob", Topic, "anything", Subscribe));
        s.acls
            .insert(acl("bob", Cluster, Literal, "", Admin, Allow));
        assert!(s.allows("bob", Cluster, "", Admin));
        assert!(!s.allows("bob", Cluster, "", Alter));
    }

    #[test]
    fn names_are_checked() {
        use Operation::*;
        use PatternKind::*;
        use Permission::*;
        use ResourceKind::*;
        assert!(acl("a", Cluster, Literal, "x", Admin, Allow)
            .validate()
            .is_err());
        assert!(acl("a", Cluster, Literal, "", Admin, Allow)
            .validate()
            .is_ok());
        assert!(acl("a", Topic, Prefix, "*", Admin, Allow)
            .validate()
            .is_err());
        assert!(acl("a", Topic, Literal, "*", Admin, Allow)
            .validate()
            .is_ok());
        assert!(acl("a", Topic, Literal, "", Admin, Allow)
            .validate()
            .is_err());
        assert!(acl("a\n", Topic, Literal, "t", Admin, Allow)
            .validate()
            .is_err());
        assert!(validate_user_name("alice@example.com").is_ok());
        assert!(validate_user_name("tern-node-1").is_err());
        assert!(validate_user_name("a b").is_err());
        assert!(valid_cluster_id("3f2a-09"));
        assert!(!valid_cluster_id("A"));
        assert!(valid_sha256_hex(&"a".repeat(64)));
        assert!(!valid_sha256_hex(&"A".repeat(64)));
    }
}
