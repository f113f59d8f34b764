//! The `tern` command line: `serve` runs a node; the other commands are clients of a node's
//! gRPC API (`--server ADDR`, default 127.0.0.1:7070), printing tables, or JSON with `--json`.

mod admin;
mod certs;
mod cluster;
mod group;
mod probe;
mod pubsub;
mod security;
mod serve;
mod table;

use clap::{Args, Parser, Subcommand};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::proto::v1::tern_client::TernClient;
use crate::tls::ClientTls;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Tern: a geo-distributed, fault-tolerant message broker"
)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node.
    Serve(Box<serve::ServeArgs>),
    /// Create, delete, list and describe topics.
    Topic {
        #[command(subcommand)]
        cmd: admin::TopicCmd,
    },
    /// Publish records: VALUE, or one record per line of standard input.
    Pub(pubsub::PubArgs),
    /// Print records of a topic as they arrive.
    Sub(pubsub::SubArgs),
    /// Consumer and queue groups: list, describe (members, offsets, lag).
    Group {
        #[command(subcommand)]
        cmd: group::GroupCmd,
    },
    /// Inspect the cluster.
    Cluster {
        #[command(subcommand)]
        cmd: cluster::ClusterCmd,
    },
    /// Users (token authentication): create, list, delete.
    User {
        #[command(subcommand)]
        cmd: security::UserCmd,
    },
    /// Access control lists: who may do what to which topics, groups and the cluster.
    Acl {
        #[command(subcommand)]
        cmd: security::AclCmd,
    },
    /// Per-principal rates: publish and consume bytes and requests per second.
    Quota {
        #[command(subcommand)]
        cmd: security::QuotaCmd,
    },
    /// Who this node takes you for.
    Whoami(ClientOpts),
    /// Ask a node's admin listener whether it is alive or ready (exit 0 only if so).
    Probe(probe::ProbeArgs),
    /// Development TLS certificates: a CA, node and client certificates.
    Certs {
        #[command(subcommand)]
        cmd: certs::CertsCmd,
    },
}

/// Options of every client command.
#[derive(Args, Clone)]
pub struct ClientOpts {
    /// Address of a Tern node.
    #[arg(long, env = "TERN_SERVER", default_value = "127.0.0.1:7070")]
    pub server: String,
    /// Print JSON (one object per line) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// This client's region: talk to a node there, found through --server (any node), so
    /// that reads come from a replica in the region (docs/geo.md).
    #[arg(long, env = "TERN_CLIENT_REGION")]
    pub region: Option<String>,
    #[command(flatten)]
    pub security: SecurityOpts,
}

impl ClientOpts {
    /// A client of the whole cluster (the client crate: calls go to the partitions' leaders),
    /// bootstrapped from `--server` once it answered.
    pub async fn cluster_client(&self) -> anyhow::Result<tern_client::Client> {
        // Connecting first words a failure as every command does (unreachable, TLS).
        self.connect().await?;
        let options = tern_client::ClientOptions {
            region: self.region.clone(),
            ..self.security.client_options()?
        };
        tern_client::Client::connect([self.server.clone()], options)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// A client of `--server`, or with `--region` of a node in that region, connected now.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let c = self.security.connect(&self.server).await?;
        match &self.region {
            None => Ok(c),
            Some(region) => {
                let addr = nearest_node(c, region).await?;
                self.security.connect(&addr).await
            }
        }
    }
}

/// The address of a node in `region` (as advertised to that region), asked of the node `c`
/// talks to; one of them at random when there are several.
pub async fn nearest_node(mut c: Client, region: &str) -> anyhow::Result<String> {
    let info = c
        .cluster_info(crate::proto::v1::ClusterInfoRequest {
            region: region.to_string(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let here: Vec<&crate::proto::v1::NodeInfo> = info
        .nodes
        .iter()
        .filter(|n| n.region == region && !n.draining)
        .collect();
    if here.is_empty() {
        let mut regions: Vec<&str> = info.nodes.iter().map(|n| n.region.as_str()).collect();
        regions.sort();
        regions.dedup();
        anyhow::bail!(
            "no node in region {region:?}; the cluster's regions are: {}",
            regions.join(", ")
        );
    }
    let pick = rand::random_range(0..here.len());
    Ok(here[pick].address.clone())
}

/// How a client reaches a secured node: TLS (`--tls-ca`, and a certificate for mutual TLS)
/// and a bearer token. Shared by the CLI and loadgen.
#[derive(Args, Clone, Debug, Default)]
pub struct SecurityOpts {
    /// Connect over TLS, trusting the CA in this PEM file.
    #[arg(long, env = "TERN_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS; with --tls-key.
    #[arg(long, env = "TERN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "TERN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name to check the node's certificate against, if not the host of the address.
    #[arg(long, env = "TERN_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// Bearer token (`tern user create`); prefer the TERN_TOKEN variable, which other users
    /// of the machine cannot read in the process list.
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A client of a node's API that sends the configured credentials with every call.
pub type Client = TernClient<InterceptedService<Channel, Credentials>>;

/// Adds the bearer token to every call.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Credentials {
    pub fn bearer(token: &str) -> anyhow::Result<Credentials> {
        let token = token.trim();
        anyhow::ensure!(!token.is_empty(), "the token is empty");
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| anyhow::anyhow!("the token has characters a header cannot carry"))?;
        Ok(Credentials {
            authorization: Some(value),
        })
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.authorization {
            r.metadata_mut()
                .insert(crate::proto::metadata::AUTHORIZATION, v.clone());
        }
        Ok(r)
    }
}

impl SecurityOpts {
    /// The same TLS and token as settings of the client crate.
    pub fn client_options(&self) -> anyhow::Result<tern_client::ClientOptions> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
        };
        let tls = match self.ca()? {
            None => None,
            Some(ca) => {
                let mut t = tern_client::Tls::new(read(ca)?);
                if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                    t = t.identity(read(cert)?, read(key)?);
                }
                if let Some(name) = &self.tls_server_name {
                    t = t.server_name(name.clone());
                }
                Some(t)
            }
        };
        Ok(tern_client::ClientOptions {
            tls,
            token: self.token.clone(),
            ..tern_client::ClientOptions::default()
        })
    }

    /// The CA to trust, if TLS is asked for (and a client certificate only with one).
    fn ca(&self) -> anyhow::Result<Option<&std::path::Path>> {
        anyhow::ensure!(
            self.tls_ca.is_some() || self.tls_cert.is_none(),
            "--tls-cert needs --tls-ca (the CA that signed the node's certificate)"
        );
        Ok(self.tls_ca.as_deref())
    }

    fn tls(&self) -> anyhow::Result<Option<ClientTls>> {
        let Some(ca) = self.ca()? else {
            return Ok(None);
        };
        let pair = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        Ok(Some(ClientTls::from_files(
            ca,
            pair,
            self.tls_server_name.clone(),
        )?))
    }

    fn credentials(&self) -> anyhow::Result<Credentials> {
        match &self.token {
            Some(t) => Credentials::bearer(t),
            None => Ok(Credentials::default()),
        }
    }

    fn wrap(&self, channel: Channel) -> anyhow::Result<Client> {
        Ok(TernClient::with_interceptor(channel, self.credentials()?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    /// A client of the node at `addr`, connected now.
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Client> {
        let endpoint = client_endpoint(addr)?;
        let tls = self.tls()?;
        let channel = crate::tls::connect(&endpoint, tls.as_ref())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach a Tern node at {addr}: {}",
                    crate::tls::describe(&e)
                )
            })?;
        self.wrap(channel)
    }

    /// A client of the node at `addr` that connects on first use.
    pub fn connect_lazy(&self, addr: &str) -> anyhow::Result<Client> {
        let endpoint = client_endpoint(addr)?;
        self.wrap(crate::tls::channel(&endpoint, self.tls()?.as_ref()))
    }
}

fn client_endpoint(addr: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    Ok(crate::tls::endpoint(bare)
        .map_err(|e| anyhow::anyhow!(e))?
        .connect_timeout(std::time::Duration::from_secs(5)))
}

/// Turns a gRPC status into a one-line error for the terminal.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    // A failure of the call itself (not the node's answer) carries the local error.
    if std::error::Error::source(&s).is_some() {
        let what = if crate::broker::never_sent(&s) {
            "cannot reach the node"
        } else {
            "lost the connection to the node during the call"
        };
        let why = std::error::Error::source(&s)
            .map(crate::tls::describe)
            .unwrap_or_else(|| s.message().to_string());
        let hint = if why.contains("broken pipe") || why.contains("reset by peer") {
            "; a node with TLS closes plaintext connections: if it uses TLS, give --tls-ca"
        } else {
            ""
        };
        return anyhow::anyhow!("Unavailable: {what} ({why}){hint}");
    }
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// Makes a failed write to a closed standard output (`tern sub … | head`) end the process
/// quietly with status 0; every other panic is reported as before.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let text = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.contains("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Parses the command line and runs the command; the process exit code follows the result.
pub fn main() -> anyhow::Result<()> {
    main_from(std::env::args())
}

/// Like [`main`], with the arguments given (the first is the program name).
pub fn main_from<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    match cli.cmd {
        Cmd::Serve(args) => serve::run(*args),
        Cmd::Certs { cmd } => certs::certs(cmd),
        Cmd::Probe(a) => probe::probe(a),
        other => {
            // A client command piped into `head` should stop quietly when the pipe closes, as
            // Unix tools do. Not by restoring SIGPIPE's default: a write to a socket the node
            // closed (a plaintext client at a TLS port, a node that died) would then kill the
            // process without a word. Printing to a closed stdout panics; that panic exits 0.
            quiet_on_closed_stdout();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                match other {
                    Cmd::Topic { cmd } => admin::topic(cmd).await,
                    Cmd::Cluster { cmd } => cluster::cluster(cmd).await,
                    Cmd::Group { cmd } => group::group(cmd).await,
                    Cmd::Pub(a) => pubsub::publish(a).await,
                    Cmd::Sub(a) => pubsub::subscribe(a).await,
                    Cmd::User { cmd } => security::user(cmd).await,
                    Cmd::Acl { cmd } => security::acl(cmd).await,
                    Cmd::Quota { cmd } => security::quota(cmd).await,
                    Cmd::Whoami(opts) => security::whoami(opts).await,
                    Cmd::Serve(_) | Cmd::Certs { .. } | Cmd::Probe(_) => {
                        unreachable!("handled above")
                    }
                }
            })
        }
    }
}
