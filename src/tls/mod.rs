//! TLS for the node's listener and for every connection a node or client makes: rustls (with
//! ring), certificates read from PEM files and reloaded without a restart, and the identity a
//! peer's certificate proves (a node of this cluster, or a client principal).
//!
//! One listener serves clients and other nodes. Nodes always present a certificate signed by
//! the cluster CA whose common name is `tern-node-<id>`; clients present one signed by the
//! client CA when `--tls-client-ca` is set (then it is required). What a connection proved is
//! worked out once, at the handshake, and rides with every call on it as [`ConnInfo`].
//!
//! ```text
//! tls/
//!   mod.rs        ConnInfo, the paths, loading PEM files
//!   server.rs     ServerTls: the listener's config, reloaded on SIGHUP or a changed file
//!   accept.rs     accepted connections: handshakes off the accept loop, a connection limit
//!   connect.rs    ClientTls and channels to other nodes or to a node (CLI, loadgen)
//!   identity.rs   names in a certificate: node ids and principals
//!   certs.rs      `tern certs create`: a development CA, node and client certificates
//! ```

mod accept;
pub mod certs;
mod connect;
mod identity;
mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use accept::{incoming, Conn};
pub use connect::{channel, connect, describe, endpoint, ClientTls};
pub use identity::{node_common_name, CertNames, NODE_CN_PREFIX};
pub use server::ServerTls;
pub use tokio_rustls::rustls;

/// The socket under a TLS stream: reads buffered, because rustls reads at most 4 KiB per call
/// (a syscall each, where the plaintext path's HTTP/2 reads take what is there). 16 KiB is
/// about one full TLS record; at the default connection limit that is at most 160 MiB. It
/// moved `replicated-max` over TLS from 0.84 to 0.92 of the plaintext rate
/// (docs/benchmarks.md).
pub(crate) type TlsSocket = tokio::io::BufReader<tokio::net::TcpStream>;

pub(crate) fn tls_socket(tcp: tokio::net::TcpStream) -> TlsSocket {
    tokio::io::BufReader::with_capacity(16 << 10, tcp)
}

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::types::NodeId;

/// What the other end of a connection proved at the handshake. tonic hands it to every call
/// on the connection (`request.extensions().get::<ConnInfo>()`).
#[derive(Clone, Debug, Default)]
pub struct ConnInfo {
    pub remote: Option<std::net::SocketAddr>,
    /// The connection is TLS.
    pub tls: bool,
    /// A node of this cluster: its certificate chains to the cluster CA and names the node.
    pub node: Option<NodeId>,
    /// The principal a client certificate maps to (its common name, else its first DNS or
    /// email name).
    pub principal: Option<Arc<str>>,
}

/// The files of a node's TLS setup.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsFiles {
    /// The node's certificate chain (PEM), used for clients and for other nodes alike.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs node certificates; other nodes must present one.
    pub cluster_ca: PathBuf,
    /// The CA that signs client certificates; when set, clients must present one.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut v = vec![self.cert.as_path(), self.key.as_path(), &self.cluster_ca];
        v.extend(self.client_ca.as_deref());
        v
    }
}

/// An error loading or using TLS material, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("TLS setup: {0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, TlsError>;

fn file_error(path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// A root store of the CA certificates in a PEM file.
fn read_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// gRPC is HTTP/2: both ends say so in ALPN (grpcio and other clients require it).
const ALPN_H2: &[u8] = b"h2";
