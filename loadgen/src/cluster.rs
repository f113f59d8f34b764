//! The nodes a run talks to: spawned locally (`--spawn N`) or already running (`--brokers`).
//!
//! A spawned cluster of more than one node gets loopback ports from the OS up front (each
//! node must know its peers' addresses when it starts), and is used once every node knows
//! every other and the metadata group has a leader. The failover workload kills nodes with
//! SIGKILL and restarts them on the same port and data directory.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tern::proto::v1 as pb;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Cluster {
    pub addrs: Vec<String>,
    /// Each spawned node's admin listener (`--scrape-ms`, and the forwarded count), when it
    /// has one.
    pub admins: Vec<String>,
    program: PathBuf,
    prefix: Vec<String>,
    /// Per node: its extra arguments (listen, id, peers).
    node_args: Vec<Vec<String>>,
    children: Vec<Option<Child>>,
    dirs: Vec<tempfile::TempDir>,
    /// Certificates and the bootstrap token of a secured cluster (kept until the run ends).
    _secrets: Option<tempfile::TempDir>,
    /// A geo cluster's delay lines between regions, and each node's region.
    pub mesh: Option<tern_wan::Mesh>,
    pub regions: Vec<String>,
    /// Nodes started under libfaketime (the chaos `clock` fault): the library, and the
    /// directory of each node's clock file.
    clock: Option<(PathBuf, tempfile::TempDir)>,
    /// The nodes' network namespaces (`--netns`): partitions are then made by the kernel.
    pub netns: Option<super::netns::Netns>,
    /// Clock ticks the nodes killed so far had used (a restarted node's /proc starts at 0).
    ticks_gone: u64,
    /// What `add_node_args` added to every node, for the nodes that join later.
    extra: Vec<String>,
    /// Nodes removed from the cluster (`tern cluster remove-node`): never started again.
    pub removed: std::collections::BTreeSet<usize>,
}

/// User + system clock ticks process `pid` has used, from /proc.
fn proc_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after ')'.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Set by `Cluster::fake_wall_clocks`.
static FAKE_CLOCKS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Where Debian's libfaketime puts its multithreaded library (`scripts/test-tools
/// libfaketime` installs it).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Certificates from a throwaway CA and a random bootstrap token in `dir`; each node's flags
/// for TLS and required authentication. Sets loadgen's own connections to use them.
fn secure_flags(dir: &std::path::Path, n: usize) -> anyhow::Result<Vec<Vec<String>>> {
    let nodes: Vec<tern::types::NodeId> = (1..=n as u64).map(tern::types::NodeId).collect();
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    tern::tls::certs::create(&tern::tls::certs::CreatePlan {
        dir,
        nodes: &nodes,
        hosts: &hosts,
        clients: &[],
        days: 7,
        force: true,
    })?;
    let token = tern::net::auth::new_token().map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    let token_file = dir.join("bootstrap.token");
    std::fs::write(&token_file, &token)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
    }
    super::run::set_security(tern::cli::SecurityOpts {
        tls_ca: Some(dir.join("ca.pem")),
        token: Some(token),
        ..Default::default()
    });
    let path = |name: String| dir.join(name).to_string_lossy().into_owned();
    Ok((1..=n)
        .map(|id| {
            vec![
                "--tls-cert".into(),
                path(format!("node-{id}.pem")),
                "--tls-key".into(),
                path(format!("node-{id}-key.pem")),
                "--tls-cluster-ca".into(),
                path("ca.pem".into()),
                "--auth".into(),
                "required".into(),
                "--bootstrap-token-file".into(),
                path("bootstrap.token".into()),
            ]
        })
        .collect())
}

/// The program that serves: `--tern-bin`, else `tern` next to this executable, else this
/// executable itself (it embeds the same node code, run with the hidden `--serve-self`).
fn server_program(tern_bin: Option<PathBuf>) -> anyhow::Result<(PathBuf, Vec<String>)> {
    if let Some(p) = tern_bin {
        return Ok((p, vec!["serve".into()]));
    }
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name("tern");
    if sibling.exists() {
        return Ok((sibling, vec!["serve".into()]));
    }
    Ok((me, vec![crate::SERVE_SELF.into(), "serve".into()]))
}

/// Loopback ports for the nodes, outside the ephemeral range (see `tern_wan::ports`).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    Ok(tern_wan::ports::free_ports(n)?)
}

impl Cluster {
    /// A geo cluster: `per_region` nodes in each of `regions` (zones z1, z2, ... within one),
    /// every pair of regions `rtt` apart through tern-wan delay lines. Each node advertises its
    /// proxies to the other regions, and knows its peers as its own region reaches them.
    pub async fn spawn_geo(
        regions: &[String],
        per_region: usize,
        rtt: Duration,
        tern_bin: Option<PathBuf>,
        extra: &[&str],
    ) -> anyhow::Result<Cluster> {
        let n = regions.len() * per_region;
        anyhow::ensure!((2..=64).contains(&n), "a geo cluster has 2..=64 nodes");
        let (program, prefix) = server_program(tern_bin)?;
        let ports = free_ports(n)?;
        let region_of: Vec<String> = (0..n).map(|i| regions[i / per_region].clone()).collect();
        let sites: Vec<tern_wan::Site> = ports
            .iter()
            .zip(&region_of)
            .map(|(p, r)| tern_wan::Site {
                region: r.clone(),
                addr: std::net::SocketAddr::from(([127, 0, 0, 1], *p)),
            })
            .collect();
        let mesh = tern_wan::Mesh::uniform(&sites, rtt).await?;
        let node_args = (0..n)
            .map(|i| {
                let peers = (0..n)
                    .map(|j| format!("{}={}", j + 1, mesh.addr(&region_of[i], j)))
                    .collect::<Vec<_>>()
                    .join(",");
                vec![
                    "--listen".into(),
                    format!("127.0.0.1:{}", ports[i]),
                    "--node-id".into(),
                    (i + 1).to_string(),
                    "--peers".into(),
                    peers,
                    "--region".into(),
                    region_of[i].clone(),
                    "--zone".into(),
                    format!("z{}", i % per_region + 1),
                    "--region-addresses".into(),
                    mesh.region_addresses(i),
                ]
            })
            .collect();
        let mut c = Cluster::of(program, prefix, node_args)?;
        c.add_node_args(extra);
        c.mesh = Some(mesh);
        c.regions = region_of;
        for i in 0..n {
            c.start_node(i).await?;
        }
        c.wait_formed().await?;
        Ok(c)
    }

    /// How a client in `region` reaches the nodes: the region's own first (directly), then
    /// the others (through the delay lines). All nodes as they are without regions.
    pub fn addrs_from(&self, region: Option<&str>) -> Vec<String> {
        let (Some(region), Some(mesh)) = (region, &self.mesh) else {
            return self.addrs.clone();
        };
        let mut order: Vec<usize> = (0..self.addrs.len()).collect();
        order.sort_by_key(|i| self.regions[*i] != region);
        order
            .into_iter()
            .map(|i| mesh.addr(region, i).to_string())
            .collect()
    }

    /// The nodes of region `of` (all, without regions) as region `from` reaches them.
    pub fn addrs_of_from(&self, of: Option<&str>, from: &str) -> Vec<String> {
        let Some(mesh) = &self.mesh else {
            return self.addrs.clone();
        };
        (0..self.addrs.len())
            .filter(|i| of.is_none_or(|r| self.regions[*i] == r))
            .map(|i| mesh.addr(from, i).to_string())
            .collect()
    }

    /// Bytes that have crossed between regions (0 without regions).
    pub fn wan_bytes(&self) -> u64 {
        self.mesh.as_ref().map_or(0, |m| m.wan_bytes())
    }

    /// A cluster of nodes not started yet: one data directory each.
    fn of(
        program: PathBuf,
        prefix: Vec<String>,
        node_args: Vec<Vec<String>>,
    ) -> anyhow::Result<Cluster> {
        let n = node_args.len();
        let mut c = Cluster {
            _secrets: None,
            addrs: vec![String::new(); n],
            admins: Vec::new(),
            program,
            prefix,
            node_args,
            children: (0..n).map(|_| None).collect(),
            dirs: (0..n)
                .map(|_| tempfile::tempdir())
                .collect::<Result<_, _>>()?,
            mesh: None,
            regions: Vec::new(),
            clock: None,
            netns: None,
            ticks_gone: 0,
            extra: Vec::new(),
            removed: Default::default(),
        };
        if let Some(lib) = FAKE_CLOCKS.get() {
            c.clock = Some((lib.clone(), tempfile::tempdir()?));
            for i in 0..n {
                c.set_clock(i, 0)?;
            }
        }
        Ok(c)
    }

    /// Starts the nodes of clusters spawned from now on under libfaketime at `lib` (which
    /// the settings checked exists), each wall clock offset by what its clock file says
    /// (`set_clock`); monotonic clocks stay real.
    pub fn fake_wall_clocks(lib: PathBuf) {
        let _ = FAKE_CLOCKS.set(lib);
    }

    fn clock_file(&self, i: usize) -> Option<PathBuf> {
        let (_, dir) = self.clock.as_ref()?;
        Some(dir.path().join(format!("node-{}", i + 1)))
    }

    /// Sets node `i`'s wall clock `secs` seconds off real time (it reads its clock file at
    /// most a second later).
    pub fn set_clock(&self, i: usize, secs: i64) -> anyhow::Result<()> {
        let Some(file) = self.clock_file(i) else {
            anyhow::bail!("the nodes were not started under libfaketime");
        };
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("{secs:+}\n"))?;
        std::fs::rename(&tmp, &file)?;
        Ok(())
    }

    /// Whether node `i`'s process has libfaketime loaded (what makes `set_clock` act).
    pub fn clock_faked(&self, i: usize) -> bool {
        let (Some(pid), Some((lib, _))) = (self.pid(i), self.clock.as_ref()) else {
            return false;
        };
        let name = lib.file_name().map(|n| n.to_string_lossy().into_owned());
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .is_ok_and(|maps| name.is_some_and(|n| maps.contains(&n)))
    }

    pub async fn spawn(
        n: usize,
        tern_bin: Option<PathBuf>,
        secure: bool,
        admin: bool,
        netns: bool,
        extra: &[&str],
    ) -> anyhow::Result<Cluster> {
        anyhow::ensure!((1..=64).contains(&n), "--spawn must be 1..=64");
        let (program, prefix) = server_program(tern_bin)?;
        let spaces = if netns {
            Some(super::netns::Netns::create(n)?)
        } else {
            None
        };
        let mut node_args: Vec<Vec<String>> = if let Some(ns) = &spaces {
            let peers = (0..n)
                .map(|i| format!("{}={}", i + 1, ns.addr(i)))
                .collect::<Vec<_>>()
                .join(",");
            (0..n)
                .map(|i| {
                    vec![
                        "--listen".into(),
                        ns.addr(i),
                        "--node-id".into(),
                        (i + 1).to_string(),
                        "--peers".into(),
                        peers.clone(),
                    ]
                })
                .collect()
        } else if n == 1 {
            vec![vec![
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--node-id".into(),
                "1".into(),
            ]]
        } else {
            let ports = free_ports(n)?;
            let peers = ports
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
                .collect::<Vec<_>>()
                .join(",");
            ports
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    vec![
                        "--listen".into(),
                        format!("127.0.0.1:{p}"),
                        "--node-id".into(),
                        (i + 1).to_string(),
                        "--peers".into(),
                        peers.clone(),
                    ]
                })
                .collect()
        };
        if admin {
            for args in node_args.iter_mut() {
                args.extend(["--admin-listen".to_string(), "127.0.0.1:0".to_string()]);
            }
        }
        let secrets = if secure {
            let dir = tempfile::tempdir()?;
            let flags = secure_flags(dir.path(), n)?;
            for (args, f) in node_args.iter_mut().zip(flags) {
                args.extend(f);
            }
            Some(dir)
        } else {
            None
        };
        let mut c = Cluster::of(program, prefix, node_args)?;
        c._secrets = secrets;
        c.netns = spaces;
        c.add_node_args(extra);
        for i in 0..n {
            c.start_node(i).await?;
        }
        if n > 1 {
            c.wait_formed().await?;
        }
        Ok(c)
    }

    /// Starts (or restarts) node `i` and waits until it listens.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.removed.contains(&i),
            "node {} was removed from the cluster",
            i + 1
        );
        let dir = self.dirs[i].path().to_path_buf();
        let mut command = match &self.netns {
            Some(ns) => ns.command(i, &self.program),
            None => Command::new(&self.program),
        };
        if let (Some((lib, _)), Some(file)) = (&self.clock, self.clock_file(i)) {
            command
                .env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", file)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_CACHE_DURATION", "1");
        }
        let mut child = command
            .args(&self.prefix)
            .args(&self.node_args[i])
            .arg("--data-dir")
            .arg(&dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,openraft=error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", self.program.display()))?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut admin = None;
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line.strip_prefix("tern admin listening on ") {
                    admin = Some(a.to_string());
                } else if let Some(a) = line.strip_prefix("tern listening on ") {
                    return Ok::<_, anyhow::Error>(a.to_string());
                }
            }
            anyhow::bail!("node {} exited before listening", i + 1)
        })
        .await
        .map_err(|_| anyhow::anyhow!("node {} did not start within 30 s", i + 1))??;
        if let Some(a) = admin {
            if self.admins.len() <= i {
                self.admins.resize(i + 1, String::new());
            }
            self.admins[i] = a;
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        eprintln!(
            "loadgen: node {} listening on {addr} (data in {})",
            i + 1,
            dir.display()
        );
        self.addrs[i] = addr;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Waits until every node lists every node and knows the metadata leader.
    async fn wait_formed(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for addr in &self.addrs {
            loop {
                if let Ok(mut c) = super::run::connect(addr).await {
                    if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await {
                        let r = r.into_inner();
                        if r.nodes.len() == self.addrs.len() && r.metadata_leader != 0 {
                            break;
                        }
                    }
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the spawned cluster did not form within 60 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// CPU seconds (user + system) the spawned nodes have used, from /proc: the running ones,
    /// and what the killed ones had used when they were killed. `None` without spawned nodes
    /// or where /proc cannot be read.
    pub fn cpu_seconds(&self) -> Option<f64> {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 || self.children.is_empty() {
            return None;
        }
        let mut total = self.ticks_gone;
        for c in self.children.iter().flatten() {
            total += proc_ticks(c.id()?)?;
        }
        Some(total as f64 / ticks as f64)
    }

    pub fn existing(addrs: Vec<String>) -> Cluster {
        Cluster {
            admins: Vec::new(),
            addrs,
            program: PathBuf::new(),
            prefix: Vec::new(),
            node_args: Vec::new(),
            children: Vec::new(),
            dirs: Vec::new(),
            _secrets: None,
            mesh: None,
            regions: Vec::new(),
            clock: None,
            netns: None,
            ticks_gone: 0,
            extra: Vec::new(),
            removed: Default::default(),
        }
    }

    /// The process id of spawned node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children.get(i)?.as_ref()?.id()
    }

    /// The data directory of spawned node `i`.
    pub fn data_dir(&self, i: usize) -> Option<PathBuf> {
        self.dirs.get(i).map(|d| d.path().to_path_buf())
    }

    /// Adds `args` to every spawned node's command line (from its next start).
    pub fn add_node_args(&mut self, args: &[&str]) {
        for a in self.node_args.iter_mut() {
            a.extend(args.iter().map(|s| s.to_string()));
        }
        self.extra.extend(args.iter().map(|s| s.to_string()));
    }

    /// Why nodes cannot join this cluster during a run (`None` if they can): a joining node
    /// would need its own network namespace, WAN links or certificate.
    pub fn why_no_joins(&self) -> Option<&'static str> {
        if self.children.is_empty() {
            Some("the cluster was not spawned by loadgen")
        } else if self.netns.is_some() {
            Some("the nodes run in network namespaces (--netns)")
        } else if self.mesh.is_some() {
            Some("the nodes talk through the WAN simulator (--regions)")
        } else if self._secrets.is_some() {
            Some("the cluster is secured (--secure)")
        } else {
            None
        }
    }

    /// Starts a new node that joins the running cluster (`--join` through a node still in it)
    /// with the next node id and a new data directory, and waits until it listens. Its index
    /// (its id is the index + 1).
    pub async fn join_node(&mut self) -> anyhow::Result<usize> {
        if let Some(why) = self.why_no_joins() {
            anyhow::bail!("no node can join: {why}");
        }
        let via = self
            .live()
            .into_iter()
            .find(|i| self.children[*i].is_some())
            .map(|i| self.addrs[i].clone())
            .ok_or_else(|| anyhow::anyhow!("no running node to join through"))?;
        let i = self.addrs.len();
        let port = free_ports(1)?[0];
        let mut args: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--node-id".into(),
            (i + 1).to_string(),
            "--join".into(),
            via,
        ];
        args.extend(self.extra.iter().cloned());
        self.node_args.push(args);
        self.addrs.push(String::new());
        self.children.push(None);
        self.dirs.push(tempfile::tempdir()?);
        if self.clock.is_some() {
            self.set_clock(i, 0)?;
        }
        self.start_node(i).await?;
        Ok(i)
    }

    /// The nodes still in the cluster (not removed), running or not.
    pub fn live(&self) -> Vec<usize> {
        (0..self.addrs.len())
            .filter(|i| !self.removed.contains(i))
            .collect()
    }

    /// The addresses of the nodes still in the cluster, with their indexes.
    pub fn live_addrs(&self) -> Vec<(usize, String)> {
        self.live()
            .into_iter()
            .map(|i| (i, self.addrs[i].clone()))
            .collect()
    }

    /// Marks node `i` removed from the cluster and waits (up to `within`) for its process to
    /// exit by itself, as a removed node does; its exit status, or `None` if it was still
    /// running (it is then killed).
    pub async fn reap_removed(
        &mut self,
        i: usize,
        within: Duration,
    ) -> Option<std::process::ExitStatus> {
        self.removed.insert(i);
        let mut child = self.children.get_mut(i)?.take()?;
        let ticks = child.id().and_then(proc_ticks).unwrap_or(0);
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => {
                self.ticks_gone += ticks;
                status.ok()
            }
            Err(_) => {
                self.ticks_gone += child.id().and_then(proc_ticks).unwrap_or(ticks);
                let _ = child.kill().await;
                None
            }
        }
    }

    /// A command running this cluster's program as the `tern` CLI (`tern cluster ...`).
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(self.prefix.iter().filter(|a| *a != "serve"));
        c.kill_on_drop(true);
        c
    }

    /// SIGKILL to node `i` (no flush, no goodbye).
    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            // What it used counts: read it just before the kill.
            self.ticks_gone += c.id().and_then(proc_ticks).unwrap_or(0);
            let _ = c.kill().await;
        }
    }

    /// Stops spawned nodes with SIGTERM (they flush and exit), bounded in time.
    pub async fn stop(mut self) {
        for c in self.children.iter_mut().flatten() {
            if let Some(pid) = c.id() {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for c in self.children.iter_mut().flatten() {
            if tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}
