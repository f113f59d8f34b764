//! Network namespaces for a spawned cluster (`--netns`): each node runs in its own namespace,
//! joined to the others by a veth pair on one bridge, so the chaos workload's partitions are
//! made by the kernel (nftables rules that drop a node's incoming packets from the nodes it
//! is cut off from) instead of by the nodes' fault-injection hook. loadgen stays in the
//! host's namespace, on the bridge, so clients reach every node throughout.
//!
//! ```text
//!  host namespace: loadgen ── bridge tn<pid> 10.<a>.<b>.1/24
//!                               ├── veth ── namespace tern-<pid>-1: node 1 on 10.<a>.<b>.11:7070
//!                               ├── veth ── namespace tern-<pid>-2: node 2 on 10.<a>.<b>.12:7070
//!                               └── ...
//! ```
//!
//! Needs root (CAP_NET_ADMIN), `ip`, `nft` and `iptables`. Everything is removed when the value
//! drops.

use std::process::Command;

/// The port every node listens on inside its own namespace.
pub const PORT: u16 = 7070;

pub struct Netns {
    bridge: String,
    names: Vec<String>,
    ips: Vec<String>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    run_input(args, None)
}

fn run_input(args: &[&str], input: Option<&str>) -> anyhow::Result<()> {
    use std::io::Write;
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("{}: {e} (--netns needs iproute2 and nftables)", args[0]))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "`{}` failed: {} (--netns needs root: CAP_NET_ADMIN)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Netns {
    /// Creates `n` namespaces on a new bridge, with an address on it for this process.
    pub fn create(n: usize) -> anyhow::Result<Netns> {
        anyhow::ensure!((2..=200).contains(&n), "--netns needs 2..=200 nodes");
        let pid = std::process::id();
        // A subnet of 10/8 per loadgen process, so that runs side by side do not collide.
        let (a, b) = (100 + (pid / 250) % 100, pid % 250);
        let mut ns = Netns {
            bridge: format!("tn{pid}"),
            names: Vec::new(),
            ips: Vec::new(),
        };
        let subnet = format!("10.{a}.{b}");
        let host = format!("{subnet}.1/24");
        run(&["ip", "link", "add", &ns.bridge, "type", "bridge"])?;
        // Where br_netfilter is loaded, frames between bridge ports go through the host's
        // iptables FORWARD chain, whose policy Docker sets to DROP: let ours through, as
        // Docker does for its own bridge. (Without br_netfilter the rule is never consulted.)
        if let Err(e) = run(&forward_rule("-I", &ns.bridge)) {
            eprintln!("loadgen: --netns: {e:#}; nodes may not reach each other");
        }
        run(&["ip", "addr", "add", &host, "dev", &ns.bridge])?;
        run(&["ip", "link", "set", &ns.bridge, "up"])?;
        for i in 0..n {
            let name = format!("tern-{pid}-{}", i + 1);
            let ip = format!("{subnet}.{}", 11 + i);
            let (outer, inner) = (format!("tv{pid}o{i}"), format!("tv{pid}i{i}"));
            run(&["ip", "netns", "add", &name])?;
            ns.names.push(name.clone());
            run(&[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ])?;
            run(&["ip", "link", "set", &outer, "master", &ns.bridge])?;
            run(&["ip", "link", "set", &outer, "up"])?;
            run(&["ip", "link", "set", &inner, "netns", &name])?;
            let exec = |args: &[&str]| {
                let mut all = vec!["ip", "netns", "exec", &name];
                all.extend_from_slice(args);
                run(&all)
            };
            exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &inner])?;
            exec(&["ip", "link", "set", &inner, "up"])?;
            exec(&["ip", "link", "set", "lo", "up"])?;
            ns.ips.push(ip);
        }
        Ok(ns)
    }

    /// Node `i`'s address (it listens on [`PORT`] there).
    pub fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", self.ips[i])
    }

    /// A command that runs `program` in node `i`'s namespace (`ip netns exec` execs it, so
    /// the child's pid is the program's).
    pub fn command(&self, i: usize, program: &std::path::Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.names[i]]).arg(program);
        c
    }

    /// Node `i` drops every packet that comes from the nodes `from` (empty: none), replacing
    /// what it dropped before.
    pub fn refuse(&self, i: usize, from: &[usize]) -> anyhow::Result<()> {
        let name = &self.names[i];
        // Deleting a table that is not there fails: that is fine.
        let _ = run(&[
            "ip", "netns", "exec", name, "nft", "delete", "table", "inet", "chaos",
        ]);
        if from.is_empty() {
            return Ok(());
        }
        let sources = from
            .iter()
            .map(|j| self.ips[*j].as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet chaos {{\n  chain input {{\n    type filter hook input priority 0; \
             policy accept;\n    ip saddr {{ {sources} }} drop\n  }}\n}}\n"
        );
        run_input(
            &["ip", "netns", "exec", name, "nft", "-f", "-"],
            Some(&rules),
        )
    }
}

/// The iptables command that adds (`-I`) or deletes (`-D`) the rule letting frames between
/// the ports of `bridge` through the host's FORWARD chain.
fn forward_rule<'a>(op: &'a str, bridge: &'a str) -> [&'a str; 9] {
    [
        "iptables", op, "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT",
    ]
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&forward_rule("-D", &self.bridge));
        for name in &self.names {
            // The namespace's veth end goes with it, and its peer on the bridge with that.
            let _ = run(&["ip", "netns", "delete", name]);
        }
        let _ = run(&["ip", "link", "delete", &self.bridge]);
    }
}
