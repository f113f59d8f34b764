//! The nodes a run talks to: spawned locally (`--spawn N`) or already running (`--brokers`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Cluster {
    pub addrs: Vec<String>,
    children: Vec<Child>,
    _dirs: Vec<tempfile::TempDir>,
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
    Ok((me, vec!["--serve-self".into(), "serve".into()]))
}

impl Cluster {
    pub async fn spawn(n: usize, tern_bin: Option<PathBuf>) -> anyhow::Result<Cluster> {
        let (program, prefix) = server_program(tern_bin)?;
        let mut c = Cluster {
            addrs: Vec::new(),
            children: Vec::new(),
            _dirs: Vec::new(),
        };
        for i in 0..n {
            let dir = tempfile::tempdir()?;
            let mut child = Command::new(&program)
                .args(&prefix)
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--node-id",
                    &(i + 1).to_string(),
                    "--data-dir",
                ])
                .arg(dir.path())
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| anyhow::anyhow!("starting {}: {e}", program.display()))?;
            let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
            let addr = tokio::time::timeout(Duration::from_secs(30), async {
                while let Some(line) = lines.next_line().await? {
                    if let Some(a) = line.strip_prefix("tern listening on ") {
                        return Ok::<_, anyhow::Error>(a.to_string());
                    }
                }
                anyhow::bail!("node {} exited before listening", i + 1)
            })
            .await
            .map_err(|_| anyhow::anyhow!("node {} did not start within 30 s", i + 1))??;
            // Keep draining its stdout so it never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            eprintln!(
                "loadgen: node {} listening on {addr} (data in {})",
                i + 1,
                dir.path().display()
            );
            c.addrs.push(addr);
            c.children.push(child);
            c._dirs.push(dir);
        }
        Ok(c)
    }

    pub fn existing(addrs: Vec<String>) -> Cluster {
        Cluster {
            addrs,
            children: Vec::new(),
            _dirs: Vec::new(),
        }
    }

    /// Stops spawned nodes with SIGTERM (they flush and exit), bounded in time.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            if let Some(pid) = c.id() {
                // SAFETY: signalling our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
        for c in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(20), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}
