//! `tern certs create`: a development CA and the node and client certificates signed by it,
//! so a secured cluster (and its tests) need no openssl. Keys are ECDSA P-256.
//!
//! For production, use your own PKI: what Tern needs is in docs/security.md (a node's
//! certificate has the common name `tern-node-<id>` and the node's host names or addresses as
//! subject alternative names, for server and client authentication).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::types::NodeId;

/// A CA that can sign.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
}

/// A signed certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a leaf certificate is for.
pub enum Leaf<'a> {
    /// A node: `tern-node-<id>`, valid for these hosts, server and client authentication.
    Node { id: NodeId, hosts: &'a [String] },
    /// A client principal: the common name, client authentication.
    Client { name: &'a str },
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("certificate generation: {e}")
}

impl Ca {
    /// A new self-signed CA, valid for `days`.
    pub fn create(name: &str, days: u32) -> anyhow::Result<Ca> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, 0, days);
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> anyhow::Result<Ca> {
        let key = KeyPair::from_pem(key_pem).map_err(err)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(err)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Signs a leaf valid from `start_days` (negative: in the past) for `days`.
    pub fn issue(&self, leaf: &Leaf, start_days: i64, days: u32) -> anyhow::Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        match leaf {
            Leaf::Node { id, hosts } => {
                params
                    .distinguished_name
                    .push(DnType::CommonName, super::node_common_name(*id));
                for h in hosts.iter() {
                    params.subject_alt_names.push(match h.parse() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(h.as_str().try_into().map_err(err)?),
                    });
                }
                params.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Leaf::Client { name } => {
                params.distinguished_name.push(DnType::CommonName, *name);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        validity(&mut params, start_days, days);
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn validity(params: &mut CertificateParams, start_days: i64, days: u32) {
    let start = time::OffsetDateTime::now_utc() + time::Duration::days(start_days)
        - time::Duration::minutes(5);
    params.not_before = start;
    params.not_after = start + time::Duration::days(days as i64);
}

/// What `tern certs create` writes into a directory.
pub struct CreatePlan<'a> {
    pub dir: &'a Path,
    pub nodes: &'a [NodeId],
    pub hosts: &'a [String],
    pub clients: &'a [String],
    pub days: u32,
    /// Overwrite existing node and client files.
    pub force: bool,
}

/// Creates (or reuses) `ca.pem`/`ca-key.pem` in the directory and writes `node-<id>.pem`,
/// `node-<id>-key.pem`, `client-<name>.pem`, `client-<name>-key.pem`. Keys are written
/// readable by the owner only. Returns the files written.
pub fn create(plan: &CreatePlan) -> anyhow::Result<Vec<PathBuf>> {
    for name in plan.clients {
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)),
            "client name {name:?}: 1 to 64 of A-Z a-z 0-9 - _ . @"
        );
        anyhow::ensure!(
            !name.starts_with(super::NODE_CN_PREFIX),
            "client name {name:?}: names starting with {:?} are for nodes",
            super::NODE_CN_PREFIX
        );
    }
    anyhow::ensure!(
        (1..=36_500).contains(&plan.days),
        "--days must be within 1..=36500"
    );
    std::fs::create_dir_all(plan.dir)
        .map_err(|e| anyhow::anyhow!("creating {}: {e}", plan.dir.display()))?;
    let ca_cert = plan.dir.join("ca.pem");
    let ca_key = plan.dir.join("ca-key.pem");
    let mut written = Vec::new();
    let ca = if ca_cert.exists() && ca_key.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        };
        Ca::load(&read(&ca_cert)?, &read(&ca_key)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", ca_cert.display()))?
    } else {
        let ca = Ca::create("Tern development CA", plan.days.max(3650))?;
        write(&ca_cert, &ca.cert_pem, false, true)?;
        write(&ca_key, &ca.key_pem(), true, true)?;
        written.extend([ca_cert, ca_key]);
        ca
    };
    let mut leaves: Vec<(String, Leaf)> = plan
        .nodes
        .iter()
        .map(|id| {
            (
                format!("node-{id}"),
                Leaf::Node {
                    id: *id,
                    hosts: plan.hosts,
                },
            )
        })
        .collect();
    leaves.extend(
        plan.clients
            .iter()
            .map(|n| (format!("client-{n}"), Leaf::Client { name: n })),
    );
    for (stem, leaf) in &leaves {
        let cert = plan.dir.join(format!("{stem}.pem"));
        let key = plan.dir.join(format!("{stem}-key.pem"));
        for p in [&cert, &key] {
            anyhow::ensure!(
                plan.force || !p.exists(),
                "{} exists; give --force to replace it",
                p.display()
            );
        }
        let issued = ca.issue(leaf, 0, plan.days)?;
        write(&cert, &issued.cert_pem, false, plan.force)?;
        write(&key, &issued.key_pem, true, plan.force)?;
        written.extend([cert, key]);
    }
    Ok(written)
}

/// Writes a file; a key is created readable by its owner only.
fn write(path: &Path, text: &str, secret: bool, replace: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(if secret { 0o600 } else { 0o644 });
    if replace {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}
