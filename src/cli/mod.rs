//! The `tern` command line: `serve` runs a node; the other commands are clients of a node's
//! gRPC API (`--server ADDR`, default 127.0.0.1:7070), printing tables, or JSON with `--json`.

mod admin;
mod cluster;
mod group;
mod producer;
mod pubsub;
mod serve;
mod table;

use clap::{Args, Parser, Subcommand};

use crate::proto::v1::tern_client::TernClient;

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
}

impl ClientOpts {
    pub async fn connect(&self) -> anyhow::Result<TernClient<tonic::transport::Channel>> {
        let url = if self.server.contains("://") {
            self.server.clone()
        } else {
            format!("http://{}", self.server)
        };
        let client = TernClient::connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach a Tern node at {}: {e}", self.server))?;
        Ok(client
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }
}

/// A client of the node at `addr` that connects on first use.
pub fn connect_lazy(addr: &str) -> anyhow::Result<TernClient<tonic::transport::Channel>> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| anyhow::anyhow!("bad address {addr:?}: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(TernClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
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
        return anyhow::anyhow!("Unavailable: {what} ({})", s.message());
    }
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
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
        other => {
            // A client command piped into `head` should stop quietly when the pipe closes, as
            // Unix tools do, not panic on the failed write (Rust ignores SIGPIPE by default;
            // the server keeps ignoring it).
            // SAFETY: restoring a signal's default disposition; no handler code is involved.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
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
                    Cmd::Serve(_) => unreachable!("handled above"),
                }
            })
        }
    }
}
