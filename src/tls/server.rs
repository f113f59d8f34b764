//! The node's TLS: the listener's config, the node's own client config (for calls to other
//! nodes), and the cluster CA check, all loaded together from [`TlsFiles`] and swapped as one
//! when the files change or the node gets SIGHUP. New connections use the new material;
//! established ones keep theirs.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;

use super::{
    file_error, provider, read_certs, read_key, read_roots, rustls, CertNames, ConnInfo, Result,
    TlsError, TlsFiles, ALPN_H2,
};
use crate::types::NodeId;

/// How often the files are checked for changes.
const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Everything loaded from the files at one moment.
struct Loaded {
    server: Arc<rustls::ServerConfig>,
    /// Verifies a chain against the cluster CA only: the proof of being a node.
    cluster: Arc<dyn ClientCertVerifier>,
    /// For this node's calls to other nodes: the cluster CA as roots, the node's certificate.
    client: Arc<rustls::ClientConfig>,
    /// When the files were last modified, as loaded.
    stamps: Vec<Option<SystemTime>>,
}

/// A node's TLS material, reloadable.
pub struct ServerTls {
    files: TlsFiles,
    node: NodeId,
    current: RwLock<Arc<Loaded>>,
    /// The client config other parts of the node connect with; updated on reload.
    client: super::ClientTls,
}

impl ServerTls {
    /// Loads the files; fails with the file and the reason if any is missing or unusable, or
    /// if the node's certificate does not name this node.
    pub fn load(files: TlsFiles, node: NodeId) -> Result<Arc<ServerTls>> {
        let loaded = Arc::new(load(&files, node)?);
        let client = super::ClientTls::shared(loaded.client.clone());
        Ok(Arc::new(ServerTls {
            files,
            node,
            current: RwLock::new(loaded),
            client,
        }))
    }

    fn now(&self) -> Arc<Loaded> {
        self.current.read().expect("tls lock").clone()
    }

    /// The config for the next accepted connection.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.now().server.clone()
    }

    /// The client side of this node: calls to other nodes present this node's certificate and
    /// accept only servers with a certificate from the cluster CA.
    pub fn client(&self) -> super::ClientTls {
        self.client.clone()
    }

    /// What a connection's certificate chain proves: a node of this cluster, and/or a client
    /// principal. (The handshake already checked the chain against the CAs the listener
    /// trusts; being a node takes a chain to the cluster CA in particular.)
    pub fn identify(&self, chain: &[CertificateDer<'static>], info: &mut ConnInfo) {
        let Some((end, intermediates)) = chain.split_first() else {
            return;
        };
        let Some(names) = CertNames::of(end) else {
            return;
        };
        let by_cluster_ca = self
            .now()
            .cluster
            .verify_client_cert(end, intermediates, UnixTime::now())
            .is_ok();
        if by_cluster_ca {
            info.node = names.node();
        }
        info.principal = names.principal().map(Arc::from);
    }

    /// Loads the files again; on failure the old material stays in use.
    pub fn reload(&self) -> Result<()> {
        let loaded = load(&self.files, self.node)?;
        self.client.set(loaded.client.clone());
        *self.current.write().expect("tls lock") = Arc::new(loaded);
        Ok(())
    }

    /// Reloads on SIGHUP and whenever one of the files changes, until the process ends.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler: certificates reload only when their files change");
                    None
                }
            };
            loop {
                let signalled = tokio::select! {
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
                    () = tokio::time::sleep(RELOAD_CHECK) => false,
                };
                if !signalled && stamps(&tls.files) == tls.now().stamps {
                    continue;
                }
                match tls.reload() {
                    Ok(()) => tracing::info!(
                        cert = %tls.files.cert.display(),
                        why = if signalled { "SIGHUP" } else { "a file changed" },
                        "TLS certificates reloaded"
                    ),
                    Err(e) => tracing::error!(
                        error = %e,
                        "TLS certificates not reloaded; the ones loaded before stay in use"
                    ),
                }
            }
        });
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<SystemTime>> {
    files
        .paths()
        .into_iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn load(files: &TlsFiles, node: NodeId) -> Result<Loaded> {
    let stamps = stamps(files);
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let names = CertNames::of(&chain[0])
        .ok_or_else(|| file_error(&files.cert, "the certificate does not parse"))?;
    if names.node() != Some(node) {
        return Err(file_error(
            &files.cert,
            format!(
                "this is node {node}, but the certificate's common name is {:?}; a node's \
                 certificate must be issued to {:?} (tern certs create --node {node})",
                names.common_name.unwrap_or_default(),
                super::node_common_name(node)
            ),
        ));
    }
    let cluster_roots = Arc::new(read_roots(&files.cluster_ca)?);
    let mut trusted = (*cluster_roots).clone();
    if let Some(ca) = &files.client_ca {
        for root in read_roots(ca)?.roots {
            trusted.roots.push(root);
        }
    }
    let config_error = |e: &dyn std::fmt::Display| TlsError::Config(e.to_string());
    let cluster = WebPkiClientVerifier::builder_with_provider(cluster_roots.clone(), provider())
        .build()
        .map_err(|e| config_error(&e))?;
    // Clients must present a certificate only when a client CA is configured; nodes always
    // do, and a certificate that is presented is always verified.
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(trusted), provider());
    if files.client_ca.is_none() {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|e| config_error(&e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(&e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| file_error(&files.key, format!("does not match the certificate: {e}")))?;
    // HTTP/2 for gRPC, HTTP/1.1 for the REST API on the same port.
    server.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(&e))?
        .with_root_certificates(cluster_roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| file_error(&files.key, e))?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        cluster,
        client: Arc::new(client),
        stamps,
    })
}
