//! `tern probe livez|readyz`: asks a node's admin listener whether it is alive or ready, and
//! exits 0 only on 200. Made for container health checks, where no curl is at hand (the
//! image holds the binary and its libraries only).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Probe {
    /// Every core answers.
    Livez,
    /// Caught up with the cluster metadata and serving.
    Readyz,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Which probe.
    #[arg(value_enum)]
    probe: Probe,
    /// The node's admin listener (its --admin-listen; a wildcard address means this host).
    #[arg(long, env = "TERN_ADMIN_LISTEN", default_value = "127.0.0.1:9644")]
    admin: SocketAddr,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    timeout_secs: u64,
}

pub fn probe(a: ProbeArgs) -> anyhow::Result<()> {
    let mut addr = a.admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let path = match a.probe {
        Probe::Livez => "/livez",
        Probe::Readyz => "/readyz",
    };
    let wait = Duration::from_secs(a.timeout_secs.clamp(1, 300));
    let ask = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, wait)?;
        s.set_read_timeout(Some(wait))?;
        s.set_write_timeout(Some(wait))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        // Bounded: a probe answer is a line.
        s.take(64 << 10).read_to_string(&mut answer)?;
        Ok(answer)
    };
    let answer = ask().map_err(|e| anyhow::anyhow!("{path} at {addr}: {e}"))?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    anyhow::ensure!(status == "200", "{path}: {status} {}", body.trim());
    println!("{}", body.trim());
    Ok(())
}
