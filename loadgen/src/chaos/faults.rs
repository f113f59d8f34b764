//! The faults themselves: cuts at a node's transport, signals, and damage to a stopped
//! node's files.

use super::*;

/// Cuts node `node` off from `from` (node indexes) at its transport; empty heals it.
pub(super) async fn set_fault(addr: &str, from: &[usize]) -> anyhow::Result<()> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await?;
    ipb::peer_client::PeerClient::new(ch)
        .set_fault(ipb::SetFaultRequest {
            isolate_from: from.iter().map(|i| *i as u64 + 1).collect(),
        })
        .await?;
    Ok(())
}

/// Cuts node `node` off from `from` (node indexes; empty heals it): in the kernel when the
/// nodes run in network namespaces (`--netns`), else at the node's transport.
pub(super) async fn cut(
    cluster: &Arc<Mutex<Cluster>>,
    node: usize,
    from: &[usize],
) -> anyhow::Result<()> {
    let addr = {
        let c = cluster.lock().await;
        if let Some(ns) = &c.netns {
            return ns.refuse(node, from);
        }
        c.addrs[node].clone()
    };
    set_fault(&addr, from).await
}

/// Clears every node's isolation (retrying a node that does not answer yet).
pub(super) async fn heal_partitions(cluster: &Arc<Mutex<Cluster>>) {
    {
        let c = cluster.lock().await;
        if let Some(ns) = &c.netns {
            for i in 0..c.addrs.len() {
                if let Err(e) = ns.refuse(i, &[]) {
                    eprintln!("loadgen: chaos: healing node {}: {e:#}", i + 1);
                }
            }
            return;
        }
    }
    let addrs = cluster.lock().await.live_addrs();
    for (_, a) in &addrs {
        for _ in 0..50 {
            if set_fault(a, &[]).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub(super) fn signal(pid: Option<u32>, sig: i32) {
    if let Some(pid) = pid {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// Damages one file of node `i`'s replicas of `topics` (the node is down): a sealed segment
/// has a byte flipped, is cut short, or is deleted; without a sealed segment, one byte of a
/// state file (`raft.state`) is flipped. Says what it did.
pub(super) fn corrupt(dir: &Path, topics: &[String], rng: &mut Rng) -> String {
    let mut partitions: Vec<PathBuf> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir.join("topics")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if topics.iter().any(|t| name.starts_with(&format!("{t}."))) {
                if let Ok(ps) = std::fs::read_dir(e.path()) {
                    partitions.extend(ps.flatten().map(|p| p.path()));
                }
            }
        }
    }
    partitions.sort();
    if partitions.is_empty() {
        return "no replica files yet; nothing damaged".into();
    }
    let p = &partitions[rng.below(partitions.len() as u64) as usize];
    let mut sealed: Vec<PathBuf> = std::fs::read_dir(p)
        .map(|es| {
            es.flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "log"))
                .filter(|f| f.with_extension("index").exists())
                .collect()
        })
        .unwrap_or_default();
    sealed.sort();
    let short = |f: &Path| {
        format!(
            "{}/{}",
            p.file_name().unwrap_or_default().to_string_lossy(),
            f.file_name().unwrap_or_default().to_string_lossy()
        )
    };
    if sealed.is_empty() {
        let state = p.join("raft.state");
        return match flip_state(&state, rng) {
            Ok(at) => format!("flipped byte {at} of {}", short(&state)),
            Err(e) => format!("could not damage {}: {e}", short(&state)),
        };
    }
    let f = &sealed[rng.below(sealed.len() as u64) as usize];
    let r = match rng.below(3) {
        0 => flip(f, rng).map(|at| format!("flipped byte {at} of {}", short(f))),
        1 => std::fs::metadata(f).and_then(|m| {
            let to = rng.below(m.len().max(1));
            std::fs::OpenOptions::new()
                .write(true)
                .open(f)?
                .set_len(to)?;
            Ok(format!("cut {} from {} to {to} bytes", short(f), m.len()))
        }),
        _ => std::fs::remove_file(f).map(|()| format!("deleted {}", short(f))),
    };
    r.unwrap_or_else(|e| format!("could not damage {}: {e}", short(f)))
}

/// Flips a bit of a state file's header or payload (not of the zero padding after it, which
/// no reader looks at).
pub(super) fn flip_state(path: &Path, rng: &mut Rng) -> std::io::Result<u64> {
    let mut bytes = std::fs::read(path)?;
    let used = bytes
        .get(4..8)
        .map_or(bytes.len(), |l| {
            12 + u32::from_le_bytes(l.try_into().expect("4 bytes")) as usize
        })
        .min(bytes.len());
    if used == 0 {
        return Ok(0);
    }
    let at = rng.below(used as u64);
    bytes[at as usize] ^= 1 << rng.below(8);
    std::fs::write(path, bytes)?;
    Ok(at)
}

pub(super) fn flip(path: &Path, rng: &mut Rng) -> std::io::Result<u64> {
    let mut bytes = std::fs::read(path)?;
    if bytes.is_empty() {
        return Ok(0);
    }
    let at = rng.below(bytes.len() as u64);
    bytes[at as usize] ^= 1 << rng.below(8);
    std::fs::write(path, bytes)?;
    Ok(at)
}

/// The cuts the faults in progress hold: per fault, (node, the nodes it refuses). A node
/// refuses the union of what every fault asks of it, so two faults at once heal separately.
#[derive(Default)]
pub(super) struct Cuts {
    pub(super) next_id: u64,
    pub(super) held: BTreeMap<u64, Vec<(usize, Vec<usize>)>>,
}

impl Cuts {
    /// What node `node` refuses now.
    pub(super) fn of(&self, node: usize) -> Vec<usize> {
        let mut from: Vec<usize> = self
            .held
            .values()
            .flatten()
            .filter(|(n, _)| *n == node)
            .flat_map(|(_, f)| f.iter().copied())
            .collect();
        from.sort_unstable();
        from.dedup();
        from
    }
}
