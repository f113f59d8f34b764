//! Names in a certificate: the node id of a cluster certificate, the principal of a client's.

use x509_parser::extensions::GeneralName;

use crate::types::NodeId;

/// A node certificate's common name is this followed by the node id.
pub const NODE_CN_PREFIX: &str = "tern-node-";

/// The common name of node `id`'s certificate.
pub fn node_common_name(id: NodeId) -> String {
    format!("{NODE_CN_PREFIX}{id}")
}

/// The names a certificate carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CertNames {
    pub common_name: Option<String>,
    /// DNS names, then email addresses, from the subject alternative names.
    pub alt_names: Vec<String>,
}

impl CertNames {
    /// Reads the names of a DER certificate; `None` if it does not parse.
    pub fn of(der: &[u8]) -> Option<CertNames> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let mut dns = Vec::new();
        let mut email = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns.push(n.to_string()),
                    GeneralName::RFC822Name(n) => email.push(n.to_string()),
                    _ => {}
                }
            }
        }
        dns.extend(email);
        Some(CertNames {
            common_name,
            alt_names: dns,
        })
    }

    /// The node a certificate names (`tern-node-<id>`), if any. Whether it may speak for that
    /// node depends on who signed it: the caller checks the chain against the cluster CA.
    pub fn node(&self) -> Option<NodeId> {
        let id: u64 = self
            .common_name
            .as_deref()?
            .strip_prefix(NODE_CN_PREFIX)?
            .parse()
            .ok()?;
        (id > 0).then_some(NodeId(id))
    }

    /// The principal a client certificate maps to: its common name, else its first DNS or
    /// email name (as NATS's `verify_and_map` does).
    pub fn principal(&self) -> Option<String> {
        self.common_name
            .clone()
            .filter(|cn| !cn.is_empty())
            .or_else(|| self.alt_names.first().cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: Option<&str>, sans: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn node_names_and_principals() {
        let n = CertNames::of(&cert(Some("tern-node-7"), &["10.0.0.7"])).unwrap();
        assert_eq!(n.node(), Some(NodeId(7)));
        for cn in [
            "tern-node-0",
            "tern-node-x",
            "tern-node-",
            "node-7",
            "tern-node-7a",
        ] {
            let n = CertNames::of(&cert(Some(cn), &[])).unwrap();
            assert_eq!(n.node(), None, "{cn}");
        }
        let alice = CertNames::of(&cert(Some("alice"), &["alice.example"])).unwrap();
        assert_eq!(alice.principal().as_deref(), Some("alice"));
        let by_san = CertNames::of(&cert(None, &["svc.example", "other.example"])).unwrap();
        assert_eq!(by_san.common_name, None);
        assert_eq!(by_san.principal().as_deref(), Some("svc.example"));
        assert_eq!(CertNames::of(b"not a certificate"), None);
    }
}
