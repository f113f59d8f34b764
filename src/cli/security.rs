//! `tern user`, `tern acl`, `tern quota` and `tern whoami` (docs/security.md).

use clap::{Args, Subcommand};

use super::{status_error, table, ClientOpts};
use crate::cluster::security::Operation;
use crate::proto::v1 as pb;

#[derive(Subcommand)]
pub enum UserCmd {
    /// Create a user and print its token, once (only its hash is kept).
    Create {
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Delete a user: its token stops working on every node.
    Delete {
        name: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

fn operation(s: &str) -> Result<Operation, String> {
    Operation::parse(s).ok_or_else(|| {
        format!("{s:?}: use publish, subscribe, create, delete, describe, alter or admin")
    })
}

/// One ACL, as the command line gives it.
#[derive(Args)]
pub struct AclArgs {
    /// The principal (a user, or a client certificate's name), or '*' for everyone.
    #[arg(long)]
    principal: String,
    /// A topic: its name, '*' for every topic, or with --prefix a name prefix.
    #[arg(long, group = "resource")]
    topic: Option<String>,
    /// A consumer or queue group: its name, '*', or with --prefix a prefix.
    #[arg(long, group = "resource")]
    group: Option<String>,
    /// The cluster itself (nodes, partitions' placement, users, ACLs, quotas).
    #[arg(long, group = "resource")]
    cluster: bool,
    /// The name is a prefix: every topic or group whose name starts with it.
    #[arg(long)]
    prefix: bool,
    /// What the principal may (or with --deny may not) do: publish, subscribe, create, delete,
    /// describe, alter, admin; repeat or comma separate.
    #[arg(long = "operation", value_delimiter = ',', required = true, value_parser = operation)]
    operations: Vec<Operation>,
    /// Deny instead of allow (a deny wins over every allow).
    #[arg(long)]
    deny: bool,
}

impl AclArgs {
    fn acls(&self) -> anyhow::Result<Vec<pb::Acl>> {
        let (resource, name) = match (&self.topic, &self.group, self.cluster) {
            (Some(t), None, false) => (pb::ResourceType::Topic, t.clone()),
            (None, Some(g), false) => (pb::ResourceType::Group, g.clone()),
            (None, None, true) => (pb::ResourceType::Cluster, String::new()),
            _ => anyhow::bail!("name one resource: --topic NAME, --group NAME or --cluster"),
        };
        anyhow::ensure!(
            !(self.prefix && self.cluster),
            "--prefix applies to --topic and --group"
        );
        Ok(self
            .operations
            .iter()
            .map(|op| pb::Acl {
                principal: self.principal.clone(),
                resource: resource as i32,
                pattern: if self.prefix {
                    pb::PatternType::Prefix
                } else {
                    pb::PatternType::Literal
                } as i32,
                name: name.clone(),
                operation: pb::AclOperation::from(*op) as i32,
                permission: if self.deny {
                    pb::AclPermission::Deny
                } else {
                    pb::AclPermission::Allow
                } as i32,
            })
            .collect())
    }
}

#[derive(Subcommand)]
pub enum AclCmd {
    /// Grant (or with --deny, forbid) operations on a resource.
    Add {
        #[command(flatten)]
        acl: AclArgs,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Remove ACLs given exactly as they were added.
    Remove {
        #[command(flatten)]
        acl: AclArgs,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Every ACL, or those of one principal (with everyone's).
    List {
        #[arg(long, default_value = "")]
        principal: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// Set a principal's rates per second on each node ('*': everyone without their own).
    /// Rates not given are unlimited; giving none removes the quota.
    Set {
        principal: String,
        #[arg(long)]
        publish_bytes: Option<u64>,
        #[arg(long)]
        consume_bytes: Option<u64>,
        #[arg(long)]
        requests: Option<u64>,
        #[command(flatten)]
        opts: ClientOpts,
    },
    List {
        #[command(flatten)]
        opts: ClientOpts,
    },
}

pub async fn user(cmd: UserCmd) -> anyhow::Result<()> {
    match cmd {
        UserCmd::Create { name, opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .create_user(pb::CreateUserRequest { name: name.clone() })
                .await
                .map_err(status_error)?
                .into_inner();
            if opts.json {
                println!("{}", serde_json::json!({"user": name, "token": r.token}));
            } else {
                eprintln!("created user {name}; its token (shown only now, keep it secret):");
                println!("{}", r.token);
            }
        }
        UserCmd::Delete { name, opts } => {
            let mut c = opts.connect().await?;
            c.delete_user(pb::DeleteUserRequest { name: name.clone() })
                .await
                .map_err(status_error)?;
            eprintln!("deleted user {name}");
        }
        UserCmd::List { opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .list_users(pb::ListUsersRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            if opts.json {
                for u in r.users {
                    println!(
                        "{}",
                        serde_json::json!({"user": u.name, "created_ms": u.created_ms})
                    );
                }
            } else {
                let rows: Vec<Vec<String>> = r
                    .users
                    .iter()
                    .map(|u| vec![u.name.clone(), u.created_ms.to_string()])
                    .collect();
                table::print(&["USER", "CREATED_MS"], &rows);
            }
        }
    }
    Ok(())
}

fn enum_name(s: &str, prefix: &str) -> String {
    s.strip_prefix(prefix).unwrap_or(s).to_ascii_lowercase()
}

fn acl_row(a: &pb::Acl) -> Vec<String> {
    let resource = pb::ResourceType::try_from(a.resource)
        .map(|r| enum_name(r.as_str_name(), "RESOURCE_TYPE_"))
        .unwrap_or_default();
    let pattern = pb::PatternType::try_from(a.pattern)
        .map(|r| enum_name(r.as_str_name(), "PATTERN_TYPE_"))
        .unwrap_or_default();
    let op = pb::AclOperation::try_from(a.operation)
        .map(|r| enum_name(r.as_str_name(), "ACL_OPERATION_"))
        .unwrap_or_default();
    let perm = pb::AclPermission::try_from(a.permission)
        .map(|r| enum_name(r.as_str_name(), "ACL_PERMISSION_"))
        .unwrap_or_default();
    vec![
        a.principal.clone(),
        perm,
        op,
        resource,
        pattern,
        a.name.clone(),
    ]
}

pub async fn acl(cmd: AclCmd) -> anyhow::Result<()> {
    match cmd {
        AclCmd::Add { acl, opts } => change(acl, opts, true).await?,
        AclCmd::Remove { acl, opts } => change(acl, opts, false).await?,
        AclCmd::List { principal, opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .list_acls(pb::ListAclsRequest { principal })
                .await
                .map_err(status_error)?
                .into_inner();
            let rows: Vec<Vec<String>> = r.acls.iter().map(acl_row).collect();
            if opts.json {
                for r in rows {
                    println!(
                        "{}",
                        serde_json::json!({"principal": r[0], "permission": r[1], "operation": r[2], "resource": r[3], "pattern": r[4], "name": r[5]})
                    );
                }
            } else {
                table::print(
                    &[
                        "PRINCIPAL",
                        "PERMISSION",
                        "OPERATION",
                        "RESOURCE",
                        "PATTERN",
                        "NAME",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(())
}

async fn change(acl: AclArgs, opts: ClientOpts, add: bool) -> anyhow::Result<()> {
    let acls = acl.acls()?;
    let mut c = opts.connect().await?;
    for a in acls {
        let row = acl_row(&a);
        let req = pb::AclRequest { acl: Some(a) };
        let r = if add {
            c.add_acl(req).await
        } else {
            c.remove_acl(req).await
        }
        .map_err(status_error)?
        .into_inner();
        let what = format!(
            "{} {} {} on {} {}{}",
            row[1],
            row[0],
            row[2],
            row[3],
            row[5],
            if row[4] == "prefix" { "*" } else { "" }
        );
        eprintln!(
            "{}{what}",
            match (add, r.changed) {
                (true, true) => "added: ",
                (true, false) => "already there: ",
                (false, true) => "removed: ",
                (false, false) => "not there: ",
            }
        );
    }
    Ok(())
}

pub async fn quota(cmd: QuotaCmd) -> anyhow::Result<()> {
    let rate = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    match cmd {
        QuotaCmd::Set {
            principal,
            publish_bytes,
            consume_bytes,
            requests,
            opts,
        } => {
            let mut c = opts.connect().await?;
            c.set_quota(pb::SetQuotaRequest {
                principal: principal.clone(),
                quota: Some(pb::Quota {
                    publish_bytes_per_sec: publish_bytes,
                    consume_bytes_per_sec: consume_bytes,
                    requests_per_sec: requests,
                }),
            })
            .await
            .map_err(status_error)?;
            if publish_bytes.is_none() && consume_bytes.is_none() && requests.is_none() {
                eprintln!("removed the quota of {principal}");
            } else {
                eprintln!("set the quota of {principal}");
            }
        }
        QuotaCmd::List { opts } => {
            let mut c = opts.connect().await?;
            let r = c
                .list_quotas(pb::ListQuotasRequest {})
                .await
                .map_err(status_error)?
                .into_inner();
            let rows: Vec<Vec<String>> = r
                .quotas
                .iter()
                .map(|q| {
                    let x = q.quota.unwrap_or_default();
                    vec![
                        q.principal.clone(),
                        rate(x.publish_bytes_per_sec),
                        rate(x.consume_bytes_per_sec),
                        rate(x.requests_per_sec),
                    ]
                })
                .collect();
            if opts.json {
                for r in rows {
                    println!(
                        "{}",
                        serde_json::json!({"principal": r[0], "publish_bytes_per_sec": r[1], "consume_bytes_per_sec": r[2], "requests_per_sec": r[3]})
                    );
                }
            } else {
                table::print(
                    &["PRINCIPAL", "PUBLISH_B/S", "CONSUME_B/S", "REQUESTS/S"],
                    &rows,
                );
            }
        }
    }
    Ok(())
}

pub async fn whoami(opts: ClientOpts) -> anyhow::Result<()> {
    let mut c = opts.connect().await?;
    let r = c
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    if opts.json {
        println!(
            "{}",
            serde_json::json!({"principal": r.principal, "superuser": r.superuser, "auth_required": r.auth_required})
        );
    } else if !r.auth_required {
        println!("authentication is off on this node: every caller may do anything");
    } else {
        println!(
            "{}{}",
            r.principal,
            if r.superuser { " (superuser)" } else { "" }
        );
    }
    Ok(())
}
