//! `tern serve`: the wiring. Starts the cores (`shard`), the transport between nodes
//! (`raft::transport`, handed a way to run work on the cores), the node context (`broker`), the
//! metadata (`controller`), the `groups` and the gRPC edge (`net`); stops them in order on
//! SIGTERM or SIGINT (stop accepting, finish in-flight calls, flush every log, exit 0), or on
//! its own when the node was removed from the cluster (exit 1, saying why).

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::broker::Broker;
use crate::config::Config;
use crate::groups::Groups;
use crate::net;
use crate::raft::transport::Transport;
use crate::shard::{ShardConfig, Shards};
use crate::tls::ServerTls;
use crate::types::{ClusterId, CoreId, NodeId};

/// How long in-flight calls get to finish after a shutdown signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Runs a node until it is told to stop.
pub fn run(mut config: Config) -> anyhow::Result<()> {
    config.settle(host_name().as_deref())?;
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("creating data dir {}: {e}", config.data_dir.display()))?;
    // glommio opens directories by absolute path only (a relative one fails with EBADF).
    config.data_dir = std::fs::canonicalize(&config.data_dir)
        .map_err(|e| anyhow::anyhow!("resolving data dir {}: {e}", config.data_dir.display()))?;
    let _lock = lock_data_dir(&config)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let role = if !config.peers.is_empty() {
        format!("controllers {}", config.peers)
    } else if !config.join.is_empty() {
        format!("joining through {}", config.join)
    } else {
        "alone".to_string()
    };
    tracing::info!(
        "tern {} starting: node {} ({}/{}), {role}, {} cores, data in {}",
        env!("CARGO_PKG_VERSION"),
        config.node_id,
        config.region,
        config.zone,
        config.core_count(),
        config.data_dir.display(),
    );
    if config.core_count() > cpus {
        tracing::warn!(
            "--cores {} on a machine with {cpus} CPUs: each core is a thread pinned to a CPU, \
             so cores will share CPUs and wait for each other; use at most {cpus}",
            config.core_count()
        );
    }
    let startup = Startup::watch();
    startup.at("starting the cores");
    let shards = Shards::start(&ShardConfig {
        cores: config.core_count(),
        mailbox_capacity: config.mailbox_capacity,
        mailbox_wait: config.mailbox_wait(),
        io_memory_bytes: config.io_memory_bytes,
        raft_tick: Duration::from_millis(config.raft_heartbeat_ms),
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.net_threads)
        .thread_name("tern-net")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {}: {e}", config.listen))?;
        let addr = listener.local_addr()?;
        let admin_listener = match config.admin_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("listening on {a} (--admin-listen): {e}"))?,
            ),
            None => None,
        };
        let compat_listener = match config.compat_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("listening on {a} (--compat-listen): {e}"))?,
            ),
            None => None,
        };
        if let Some(l) = &compat_listener {
            let compat_addr = l.local_addr()?;
            tracing::info!(%compat_addr, "the Raft seeds' broker.Broker service");
            println!("tern compat listening on {compat_addr}");
        }
        // In a cluster the peers list says where this node is reached.
        let advertised = match (
            &config.advertised_address,
            config.peer_map()?.remove(&NodeId(config.node_id)),
        ) {
            (Some(a), _) => a.clone(),
            (None, Some(a)) => a,
            (None, None) => advertise(addr)?,
        };
        let tls = match config.tls_files()? {
            Some(files) => {
                let tls = ServerTls::load(files, NodeId(config.node_id))?;
                tls.spawn_reloader();
                Some(tls)
            }
            None => None,
        };
        let auth = Arc::new(net::auth::Auth::from_config(&config)?);
        if !addr.ip().is_loopback() && !auth.required() {
            tracing::warn!(%addr, "listening beyond loopback with auth none: anyone who reaches this port may publish, read, delete topics and remove nodes (--auth required; docs/security.md)");
        }
        if !addr.ip().is_loopback() && tls.is_none() {
            tracing::warn!(%addr, "listening beyond loopback without TLS: traffic is readable and forgeable on the network, and any host that reaches this port can pose as a node (docs/security.md)");
        }
        let cores = shards.core_count();
        let cluster_id = Arc::new(load_cluster_id(&config)?);
        let transport = if !config.clustered() {
            None
        } else {
            Some(Transport::new(
                NodeId(config.node_id),
                cluster_id.clone(),
                on_core(&shards, config.mailbox_wait()),
                tls.as_ref().map(|t| t.client()),
                Duration::from_millis(config.raft_heartbeat_ms),
            ))
        };
        let broker = Broker::new(
            config.clone(),
            shards,
            advertised,
            transport,
            tls,
            cluster_id,
        )?;
        // A node alone has loaded the metadata and opened its partitions when this returns; a
        // node of a cluster does that in the background, since its peers need it to serve.
        startup.at(if broker.alone() {
            "opening the metadata group, replaying it and opening the partitions"
        } else {
            "opening this node's replica of the metadata group"
        });
        crate::controller::start(broker.clone()).await?;
        startup.at("starting the gRPC server");
        let groups = Arc::new(Groups::new(broker.clone()));
        let (server, stop_tx) = spawn_server(
            broker.clone(),
            groups.clone(),
            auth,
            listener,
            compat_listener,
        );
        if let Some(admin) = admin_listener {
            let admin_addr = admin.local_addr()?;
            let mut rx = stop_tx.subscribe();
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            let broker = broker.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::admin::serve(broker, groups, admin, stop).await {
                    tracing::error!(error = %e, "the admin listener stopped");
                }
            });
            tracing::info!(%admin_addr, "admin listener: /metrics, /livez, /readyz");
            println!("tern admin listening on {admin_addr}");
        }
        tracing::info!(%addr, cores, data_dir = %config.data_dir.display(), "tern is serving");
        // Scripts and tests read the bound address (port 0 picks a free one) from this line.
        println!("tern listening on {addr}");
        startup.done();
        let mut failure = None;
        tokio::select! {
            _ = shutdown_signal() => {}
            why = broker.must_stop() => failure = Some(why),
            r = server => {
                // The server stopped on its own: that is an error (e.g. the socket failed).
                broker.shards.shutdown().await?;
                return match r {
                    Ok(Ok(())) => Err(anyhow::anyhow!("the gRPC server stopped unexpectedly")),
                    Ok(Err(e)) => Err(e),
                    Err(e) => Err(e.into()),
                };
            }
        }
        if failure.is_none() {
            hand_off(&broker).await;
        }
        tracing::info!("shutting down: no new connections, finishing in-flight calls");
        broker.begin_shutdown();
        let _ = stop_tx.send(true);
        // Wait for calls, not for idle client connections (those may stay open for minutes).
        if !broker.drain(DRAIN_GRACE).await {
            tracing::warn!("in-flight calls did not finish within {DRAIN_GRACE:?}");
        }
        broker.shards.shutdown().await?;
        tracing::info!("every log flushed; bye");
        match failure {
            Some(why) => Err(anyhow::anyhow!(why)),
            None => Ok::<(), anyhow::Error>(()),
        }
    })
}

/// The address other nodes and clients are told to use when none is configured: the bound
/// one, or for a wildcard listener (0.0.0.0, ::) this machine's host name and the port.
fn advertise(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    if !addr.ip().is_unspecified() {
        return Ok(addr.to_string());
    }
    let name = host_name().ok_or_else(|| {
        anyhow::anyhow!(
            "listening on {addr}, and this machine's host name is unknown: give \
                 --advertised-address HOST:PORT (where clients and nodes reach this node)"
        )
    })?;
    let advertised = format!("{name}:{}", addr.port());
    tracing::info!(%addr, %advertised, "listening on all interfaces; advertising the host name (set --advertised-address to choose)");
    Ok(advertised)
}

/// Longest a graceful shutdown waits for the followers to take over its leaderships.
const HAND_OFF_WAIT: Duration = Duration::from_secs(5);

/// Before a graceful shutdown: hands every leadership here to an in-sync follower, and waits
/// (bounded) until they have taken over, so clients see a leader change rather than an
/// election timeout's worth of unavailability. The node keeps serving meanwhile (it forwards
/// to the new leaders).
async fn hand_off(broker: &Broker) {
    let asked = broker.shards.hand_off().await;
    if asked == 0 {
        return;
    }
    let started = std::time::Instant::now();
    let mut left = asked;
    while started.elapsed() < HAND_OFF_WAIT {
        left = broker.shards.leading().await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(
        asked,
        still_leading = left,
        "handed leaderships to followers in {:.0?}",
        started.elapsed()
    );
}

/// This machine's host name, if it has one.
pub fn host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    std::ffi::CStr::from_bytes_until_nul(&buf)
        .ok()
        .and_then(|c| c.to_str().ok())
        .filter(|n| rc == 0 && !n.is_empty())
        .map(str::to_string)
}

/// How the transport runs the completion of a group's calls on that group's core: through the
/// core's mailbox (glommio 0.9 loses wake-ups from other threads).
fn on_core(shards: &Shards, wait: Duration) -> crate::raft::transport::OnCore {
    let mailboxes = shards.mailboxes();
    Arc::new(move |core: CoreId, f: Box<dyn FnOnce() + Send>| {
        let mailbox = mailboxes[core.0 as usize % mailboxes.len()].clone();
        Box::pin(async move {
            let _ = mailbox.send(crate::shard::CoreRequest::Run(f), wait).await;
        })
    })
}

type ServerTask = tokio::task::JoinHandle<anyhow::Result<()>>;

fn spawn_server(
    broker: Arc<Broker>,
    groups: Arc<Groups>,
    auth: Arc<net::auth::Auth>,
    listener: tokio::net::TcpListener,
    compat: Option<tokio::net::TcpListener>,
) -> (ServerTask, tokio::sync::watch::Sender<bool>) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(net::serve(broker, groups, auth, listener, compat, {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }));
    (server, stop_tx)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Takes an exclusive lock on the data directory, so two nodes never share one.
/// Says, at warn level, which step a start is stuck in when it takes more than 10 s (a start
/// takes well under a second; a stuck one should say where).
struct Startup {
    stage: Arc<std::sync::Mutex<Option<&'static str>>>,
}

impl Startup {
    fn watch() -> Startup {
        let stage = Arc::new(std::sync::Mutex::new(Some("starting")));
        let s = Arc::downgrade(&stage);
        let started = std::time::Instant::now();
        let _ = std::thread::Builder::new()
            .name("tern-startup".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(10));
                let Some(stage) = s.upgrade() else { return };
                let Some(at) = *stage.lock().expect("startup lock") else {
                    return;
                };
                tracing::warn!("still starting after {:.0?}: {at}", started.elapsed());
            });
        Startup { stage }
    }

    fn at(&self, stage: &'static str) {
        *self.stage.lock().expect("startup lock") = Some(stage);
    }

    fn done(&self) {
        *self.stage.lock().expect("startup lock") = None;
    }
}

/// The cluster id this node's data directory belongs to, if it has learned one.
fn load_cluster_id(config: &Config) -> anyhow::Result<ClusterId> {
    let path = config.data_dir.join(crate::broker::CLUSTER_ID_FILE);
    let id = ClusterId::default();
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim();
            anyhow::ensure!(
                crate::cluster::valid_cluster_id(s),
                "{} does not hold a cluster id (found {s:?})",
                path.display()
            );
            let _ = id.learn(s);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    }
    Ok(id)
}

fn lock_data_dir(config: &Config) -> anyhow::Result<std::fs::File> {
    let path = config.data_dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    anyhow::ensure!(
        rc == 0,
        "data directory {} is in use by another tern process",
        config.data_dir.display()
    );
    Ok(f)
}
