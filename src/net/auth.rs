//! Who is calling, and may they: every `tern.v1` call is authenticated here and checked
//! against the ACLs in the metadata (`cluster/security.rs`) before it does anything.
//!
//! ```text
//! call ──▶ forwarded by a node? ── yes: mTLS proves the node; the principal it names is trusted
//!               │ no
//!               ▼
//!          bearer token ── SHA-256 ──▶ a user in the metadata (cached per token)
//!          else client certificate ──▶ its CN or SAN
//!          else UNAUTHENTICATED
//!               ▼
//!          superuser? ── else ACLs: some allow, no deny ── else PERMISSION_DENIED
//! ```
//!
//! A token is hashed once: the cache maps it to its principal for as long as the users in the
//! metadata stay the same (a deleted user's token is checked again, and refused, at once).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::broker::{Broker, Origin};
use crate::cluster::security::{Operation, ResourceKind, Security};
use crate::config::Config;
use crate::proto::metadata::{AUTHORIZATION, CLUSTER, FORWARDED, PRINCIPAL};
use crate::tls::ConnInfo;

/// The principal of whoever presents the bootstrap token: always a superuser.
pub const BOOTSTRAP_PRINCIPAL: &str = "admin";
/// Tokens remembered at once (the cache is emptied when full).
const CACHE_MAX: usize = 10_000;
/// Longest `authorization` value taken.
const TOKEN_MAX: usize = 512;

/// Who a call is served for, once authenticated.
#[derive(Clone, Debug)]
pub struct Caller {
    /// `None`: authentication is off, or the call is a node's own work.
    pub principal: Option<Arc<str>>,
    /// ACLs are not checked (authentication off, a superuser, or a node's own work).
    pub superuser: bool,
    /// Another node relayed the call here: it is not passed on again, and quotas were charged
    /// where it came in.
    pub relayed: bool,
}

impl Caller {
    /// How the broker passes the call on.
    pub fn origin(&self) -> Origin {
        if self.relayed {
            Origin::Relayed
        } else {
            Origin::Client(self.principal.clone())
        }
    }

    /// The principal, for logs and quotas (`-` when there is none).
    pub fn name(&self) -> &str {
        self.principal.as_deref().unwrap_or("-")
    }
}

struct Cached {
    principal: Arc<str>,
    users_version: u64,
}

pub struct Auth {
    required: bool,
    superusers: HashSet<String>,
    /// SHA-256 of the bootstrap token.
    bootstrap: Option<[u8; 32]>,
    cache: Mutex<HashMap<String, Cached>>,
    pub quotas: super::quota::Quotas,
}

impl Auth {
    /// The node's settings: `--auth`, the superusers, and the bootstrap token (from
    /// `bootstrap_token_file`, else `TERN_BOOTSTRAP_TOKEN`).
    pub fn from_config(config: &Config) -> anyhow::Result<Auth> {
        let token = match &config.bootstrap_token_file {
            Some(path) => Some(crate::config::read_token_file(path, "bootstrap token")?),
            None => std::env::var("TERN_BOOTSTRAP_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        };
        if let Some(t) = &token {
            anyhow::ensure!(
                (16..=TOKEN_MAX).contains(&t.len()) && t.chars().all(|c| c.is_ascii_graphic()),
                "the bootstrap token must be 16 to {TOKEN_MAX} printable characters without \
                 spaces"
            );
        }
        if config.auth_required() && token.is_none() && config.superusers.is_empty() {
            tracing::warn!(
                "auth is required but no bootstrap token (--bootstrap-token-file or \
                 TERN_BOOTSTRAP_TOKEN) or superuser is configured: no one can create users or \
                 grant ACLs"
            );
        }
        Ok(Auth {
            required: config.auth_required(),
            superusers: config.superusers.iter().cloned().collect(),
            bootstrap: token.map(|t| sha256(t.as_bytes())),
            cache: Mutex::new(HashMap::new()),
            quotas: Default::default(),
        })
    }

    pub fn required(&self) -> bool {
        self.required
    }

    fn is_superuser(&self, principal: &str) -> bool {
        (principal == BOOTSTRAP_PRINCIPAL && self.bootstrap.is_some())
            || self.superusers.contains(principal)
    }

    /// Who is calling. A forwarded call is taken from another node of this cluster only
    /// (proven by its certificate when authentication is on), in the name of the principal it
    /// carries.
    pub fn authenticate<T>(&self, broker: &Broker, request: &Request<T>) -> Result<Caller, Status> {
        let r = self.identify(broker, request);
        if r.is_err() {
            crate::metrics::NODE.auth.unauthenticated.inc();
        }
        r
    }

    fn identify<T>(&self, broker: &Broker, request: &Request<T>) -> Result<Caller, Status> {
        let md = request.metadata();
        let conn = request.extensions().get::<ConnInfo>();
        if md.contains_key(FORWARDED) {
            if let Some(c) = md.get(CLUSTER).and_then(|v| v.to_str().ok()) {
                if broker.cluster_id.foreign(c) {
                    return Err(Status::permission_denied(format!(
                        "the call was forwarded by a node of cluster {c}; this is cluster {}",
                        broker.cluster_id.get()
                    )));
                }
            }
            if !self.required {
                return Ok(Caller {
                    principal: None,
                    superuser: true,
                    relayed: true,
                });
            }
            if conn.and_then(|c| c.node).is_none() {
                return Err(Status::unauthenticated(
                    "forwarded calls are taken only from nodes of this cluster, proven by their \
                     certificate (mutual TLS)",
                ));
            }
            return Ok(match md.get(PRINCIPAL).map(|v| v.to_str()) {
                Some(Err(_)) => {
                    return Err(Status::unauthenticated(
                        "a forwarded principal must be ASCII",
                    ))
                }
                Some(Ok(p)) if crate::cluster::security::validate_principal(p).is_err() => {
                    return Err(Status::unauthenticated(format!(
                        "forwarded principal {p:?} is not valid"
                    )))
                }
                Some(Ok(p)) => Caller {
                    superuser: self.is_superuser(p),
                    principal: Some(Arc::from(p)),
                    relayed: true,
                },
                // The forwarding node's own work (a group's reader).
                None => Caller {
                    principal: None,
                    superuser: true,
                    relayed: true,
                },
            });
        }
        if !self.required {
            return Ok(Caller {
                principal: None,
                superuser: true,
                relayed: false,
            });
        }
        let principal = if let Some(token) = bearer(md)? {
            self.token_principal(token, &broker.cluster().security)?
        } else if let Some(p) = conn.and_then(|c| c.principal.clone()) {
            if conn.and_then(|c| c.node).is_some() {
                // A node calling for itself.
                return Ok(Caller {
                    principal: None,
                    superuser: true,
                    relayed: false,
                });
            }
            if let Err(e) = crate::cluster::security::validate_principal(&p) {
                return Err(Status::unauthenticated(format!(
                    "the client certificate's name cannot be a principal: {e}"
                )));
            }
            p
        } else {
            return Err(Status::unauthenticated(
                "this node requires authentication: present a token (--token or TERN_TOKEN) or \
                 a client certificate",
            ));
        };
        Ok(Caller {
            superuser: self.is_superuser(&principal),
            principal: Some(principal),
            relayed: false,
        })
    }

    /// The principal a token stands for: the bootstrap token's, or a user's.
    fn token_principal(&self, token: &str, security: &Security) -> Result<Arc<str>, Status> {
        let version = security.users_version;
        {
            let cache = self.cache.lock().expect("token cache lock");
            if let Some(c) = cache.get(token) {
                if c.users_version == version {
                    return Ok(c.principal.clone());
                }
            }
        }
        let digest = sha256(token.as_bytes());
        let principal: Arc<str> = if self.bootstrap.is_some_and(|b| constant_eq(&b, &digest)) {
            Arc::from(BOOTSTRAP_PRINCIPAL)
        } else {
            match security.user_by_token(&hex(&digest)) {
                Some(name) => Arc::from(name),
                None => return Err(Status::unauthenticated("unknown or revoked token")),
            }
        };
        let mut cache = self.cache.lock().expect("token cache lock");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(
            token.to_string(),
            Cached {
                principal: principal.clone(),
                users_version: version,
            },
        );
        Ok(principal)
    }

    /// Whether the caller may do `op` on the resource, per the ACLs in the metadata.
    pub fn allowed(
        &self,
        broker: &Broker,
        caller: &Caller,
        kind: ResourceKind,
        name: &str,
        op: Operation,
    ) -> bool {
        if caller.superuser {
            return true;
        }
        let Some(p) = &caller.principal else {
            return false;
        };
        broker.cluster().security.allows(p, kind, name, op)
    }

    /// As [`Auth::allowed`], as a status.
    pub fn authorize(
        &self,
        broker: &Broker,
        caller: &Caller,
        kind: ResourceKind,
        name: &str,
        op: Operation,
    ) -> Result<(), Status> {
        if self.allowed(broker, caller, kind, name, op) {
            return Ok(());
        }
        let what = match kind {
            ResourceKind::Cluster => "the cluster".to_string(),
            k => format!("{} {name:?}", k.name()),
        };
        crate::metrics::NODE.auth.denied.inc();
        Err(Status::permission_denied(format!(
            "principal {:?} may not {op} {what} (tern acl add)",
            caller.name()
        )))
    }

    /// Authenticates and authorizes in one step.
    pub fn check<T>(
        &self,
        broker: &Broker,
        request: &Request<T>,
        kind: ResourceKind,
        name: &str,
        op: Operation,
    ) -> Result<Caller, Status> {
        let caller = self.authenticate(broker, request)?;
        self.authorize(broker, &caller, kind, name, op)?;
        Ok(caller)
    }
}

/// The token of an `authorization: Bearer …` header, if there is one.
fn bearer(md: &MetadataMap) -> Result<Option<&str>, Status> {
    let Some(v) = md.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || Status::unauthenticated("the authorization metadata must be \"Bearer TOKEN\"");
    let v = v.to_str().map_err(|_| bad())?;
    if v.len() > TOKEN_MAX + 7 {
        return Err(bad());
    }
    let (scheme, token) = v.split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(bad());
    }
    Ok(Some(token.trim()))
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn constant_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new user token: `tern_` and 32 random bytes in hex.
pub fn new_token() -> Result<String, Status> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Status::internal("the system's random generator failed"))?;
    Ok(format!("tern_{}", hex(&b)))
}
