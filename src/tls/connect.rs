//! Channels to a node, in plaintext or TLS. Every connection a node or a client makes goes
//! through [`channel`] or [`connect`], so TLS is one switch, not a branch at every call site.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{provider, read_certs, read_key, read_roots, rustls, Result, TlsError, ALPN_H2};
use rustls::pki_types::ServerName;

/// The client side of TLS: which CAs to trust, which certificate to present. A node's is
/// shared with its [`super::ServerTls`] and changes when that reloads.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<RwLock<Arc<rustls::ClientConfig>>>,
    /// The name to verify the server's certificate against, instead of the address's host.
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    pub(super) fn shared(config: Arc<rustls::ClientConfig>) -> ClientTls {
        ClientTls {
            config: Arc::new(RwLock::new(config)),
            server_name: None,
        }
    }

    pub(super) fn set(&self, config: Arc<rustls::ClientConfig>) {
        *self.config.write().expect("tls lock") = config;
    }

    /// A client's TLS: trust the CA in `ca` (PEM), and present `cert` and `key` if given
    /// (both or neither). `server_name` overrides the host name checked in the server's
    /// certificate (for connecting by an address the certificate does not list).
    pub fn from_files(
        ca: &Path,
        cert_and_key: Option<(&Path, &Path)>,
        server_name: Option<String>,
    ) -> Result<ClientTls> {
        let roots = read_roots(ca)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match cert_and_key {
            Some((cert, key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .map_err(|e| super::file_error(key, e))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClientTls {
            config: Arc::new(RwLock::new(Arc::new(config))),
            server_name,
        })
    }

    fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.read().expect("tls lock").clone()
    }
}

/// An error with its causes, innermost last: tonic's own text for a failed connection is
/// just "transport error", and the reason (refused, a certificate not trusted) is below it.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// An endpoint for `addr` (`HOST:PORT`) with Tern's connection settings.
pub fn endpoint(addr: &str) -> std::result::Result<Endpoint, String> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .map_err(|e| format!("bad address {addr:?}: {e}"))
}

/// A channel that connects when first used (and again after a failure), over TLS when `tls`
/// is given.
pub fn channel(endpoint: &Endpoint, tls: Option<&ClientTls>) -> Channel {
    match tls {
        None => endpoint.connect_lazy(),
        Some(tls) => endpoint.connect_with_connector_lazy(connector(tls.clone())),
    }
}

/// A channel connected now: fails if the node cannot be reached or the handshake fails.
pub async fn connect(
    endpoint: &Endpoint,
    tls: Option<&ClientTls>,
) -> std::result::Result<Channel, tonic::transport::Error> {
    match tls {
        None => endpoint.connect().await,
        Some(tls) => {
            endpoint
                .connect_with_connector(connector(tls.clone()))
                .await
        }
    }
}

type Connecting = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = std::io::Result<
                    TokioIo<tokio_rustls::client::TlsStream<super::TlsSocket>>,
                >,
            > + Send,
    >,
>;

/// Connects TCP, then TLS with the config current at that moment (so a reload applies to the
/// next connection), checking the server's certificate against the host of the address.
fn connector(
    tls: ClientTls,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<super::TlsSocket>>,
    Error = std::io::Error,
    Future = Connecting,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: Uri| -> Connecting {
        let tls = tls.clone();
        Box::pin(async move {
            let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri
                .port_u16()
                .ok_or_else(|| invalid(format!("no port in {uri}")))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = tls.server_name.clone().unwrap_or(host);
            let name = ServerName::try_from(name)
                .map_err(|e| invalid(format!("not a valid TLS server name: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls.config())
                .connect(name, super::tls_socket(tcp))
                .await?;
            Ok(TokioIo::new(stream))
        })
    })
}
