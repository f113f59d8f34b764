//! `tern certs create`: development certificates, no openssl needed.

use std::path::PathBuf;

use clap::Subcommand;

use crate::tls::certs::{create, CreatePlan};
use crate::types::NodeId;

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Write a development CA (reused if DIR already has one) and certificates signed by it:
    /// node-ID.pem for each --node, client-NAME.pem for each --client, each with its -key.pem.
    /// For production, use your own CA (docs/security.md says what a node's certificate needs).
    Create {
        /// Directory to write into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Node ids to issue node certificates for (common name tern-node-ID), e.g. 1,2,3.
        #[arg(long = "node", value_delimiter = ',')]
        nodes: Vec<NodeId>,
        /// Host names and IP addresses the node certificates are valid for (repeat or comma
        /// separate) [default: localhost,127.0.0.1,::1].
        #[arg(long = "host", value_delimiter = ',')]
        hosts: Vec<String>,
        /// Client principals to issue client certificates for (the common name).
        #[arg(long = "client", value_delimiter = ',')]
        clients: Vec<String>,
        /// Days the node and client certificates are valid.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace node and client files that exist.
        #[arg(long)]
        force: bool,
    },
}

pub fn certs(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Create {
            dir,
            nodes,
            mut hosts,
            clients,
            days,
            force,
        } => {
            anyhow::ensure!(
                !nodes.is_empty() || !clients.is_empty(),
                "nothing to create: give --node IDS and/or --client NAMES"
            );
            anyhow::ensure!(nodes.iter().all(|n| n.0 > 0), "node ids start at 1");
            if hosts.is_empty() {
                hosts = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
            }
            let written = create(&CreatePlan {
                dir: &dir,
                nodes: &nodes,
                hosts: &hosts,
                clients: &clients,
                days,
                force,
            })?;
            for f in written {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
    }
}
