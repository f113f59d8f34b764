//! Thread-per-core: one glommio executor per core, pinned, each owning a disjoint set of
//! partitions and their logs. The network shard reaches a core only through its mailbox.
//!
//! ```text
//! net (tokio) ──MailboxSender──▶ [bounded crossbeam channel + waker] ──▶ core k (glommio)
//!              ◀──────────────── oneshot reply ─────────────────────────┘
//! ```

mod core;
mod mailbox;
pub mod mirror;
mod partition;
pub mod placement;
mod repair;
pub mod request;

use std::time::Duration;

use futures::channel::oneshot;
use glommio::{LocalExecutorBuilder, Placement};

use crate::types::CoreId;

pub use mailbox::MailboxSender;
pub use partition::FOLLOWER_READ_MAX_LAG;
pub use request::{
    AppendAck, Appended, CoreError, CoreRequest, Fetched, ListedOffsets, MemberProgress,
    MemberTarget, MirrorLag, PartitionKey, ProducerSeq, ReplicaSettings, StartAt,
};

/// How long a task queue runs before the executor checks I/O and wakes from other threads:
/// this bounds how late a core busy without pause notices new requests in its mailbox (a
/// queue that runs dry polls at once). It was 1 ms, and glommio 0.9 parks an executor with
/// tasks ready when this timer expires between its arming and the run of the task queues (a
/// thread descheduled that long; see `mailbox.rs`): at 1 ms that happened often enough to
/// put 80–250 ms stalls in `seed-target`'s p99.9 (median 78 ms on one node; 7 ms at 20 ms,
/// docs/benchmarks.md).
const PREEMPT_TIMER: Duration = Duration::from_millis(20);

/// The running cores of a node.
pub struct Shards {
    mailboxes: Vec<MailboxSender>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    wait: Duration,
}

/// Settings of the cores.
pub struct ShardConfig {
    pub cores: usize,
    pub mailbox_capacity: usize,
    pub mailbox_wait: Duration,
    pub io_memory_bytes: usize,
    /// How often each core drives its replicated Raft groups (the heartbeat interval).
    pub raft_tick: Duration,
}

/// Starts the thread that kicks a core whose mailbox has not run for [`mailbox::STALL`] (see
/// the mailbox's notes): it checks four times a second, kicks again at each check while the
/// core stays stalled, logs once per stall, and ends once the cores are gone.
fn watchdog(mailboxes: &[MailboxSender]) -> std::io::Result<()> {
    let watched: Vec<mailbox::Watch> = mailboxes.iter().map(MailboxSender::watch).collect();
    std::thread::Builder::new()
        .name("tern-core-watchdog".into())
        .spawn(move || {
            let mut stalled = vec![false; watched.len()];
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let mut alive = false;
                for (i, w) in watched.iter().enumerate() {
                    let Some(asleep) = w.stalled_for(mailbox::STALL) else {
                        continue;
                    };
                    alive = true;
                    match asleep {
                        Some(asleep) if !stalled[i] => {
                            stalled[i] = true;
                            crate::metrics::NODE.core_stalls.inc();
                            tracing::warn!(
                                core = i,
                                stalled_ms = asleep.as_millis() as u64,
                                "a core's mailbox had not run for its own re-check timer (glommio parked with work ready, or the core was blocked); the watchdog kicked it"
                            );
                        }
                        Some(_) => {}
                        None => stalled[i] = false,
                    }
                }
                if !alive {
                    return;
                }
            }
        })
        .map(|_| ())
}

impl Shards {
    /// Starts one pinned executor per core.
    pub fn start(cfg: &ShardConfig) -> anyhow::Result<Shards> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut mailboxes = Vec::with_capacity(cfg.cores);
        let mut threads = Vec::with_capacity(cfg.cores);
        for i in 0..cfg.cores {
            let (tx, rx) = mailbox::mailbox(i as u32, cfg.mailbox_capacity)?;
            let (started_tx, started_rx) = std::sync::mpsc::channel();
            let tick = cfg.raft_tick;
            let builder = LocalExecutorBuilder::new(Placement::Fixed(i % cpus))
                .name(&format!("tern-core-{i}"))
                .io_memory(cfg.io_memory_bytes)
                .preempt_timer(PREEMPT_TIMER);
            let handle = std::thread::Builder::new()
                .name(format!("tern-core-{i}"))
                .spawn(move || match builder.make() {
                    Ok(ex) => {
                        let _ = started_tx.send(Ok(()));
                        ex.run(core::run(CoreId(i as u32), rx, tick));
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e.to_string()));
                    }
                })?;
            match started_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => anyhow::bail!(
                    "core {i} cannot start its executor: {e} (glommio needs io_uring and a \
                     memlock limit of a few MiB: `ulimit -l`, or --ulimit memlock=-1 in Docker)"
                ),
                Err(_) => anyhow::bail!("core {i} died while starting"),
            }
            mailboxes.push(tx);
            threads.push(handle);
        }
        // glommio refuses to start an executor without io_uring, so reaching here proves it
        // works (containers need it allowed by their seccomp profile: docs/operations.md).
        tracing::info!(
            cores = cfg.cores,
            io_memory_bytes = cfg.io_memory_bytes,
            "io_uring in use: each core runs a glommio executor on its own rings"
        );
        watchdog(&mailboxes)?;
        Ok(Shards {
            mailboxes,
            threads: std::sync::Mutex::new(threads),
            wait: cfg.mailbox_wait,
        })
    }

    pub fn core_count(&self) -> usize {
        self.mailboxes.len()
    }

    /// The core holding this node's replica of `key`'s group.
    pub fn core_of(&self, key: &PartitionKey) -> CoreId {
        placement::core_of(key, self.mailboxes.len())
    }

    /// Every core's mailbox, in core order.
    pub fn mailboxes(&self) -> Vec<MailboxSender> {
        self.mailboxes.clone()
    }

    pub fn mailbox(&self, core: CoreId) -> &MailboxSender {
        &self.mailboxes[core.0 as usize % self.mailboxes.len()]
    }

    /// Sends a request to a core and waits for the answer.
    pub async fn ask<T>(
        &self,
        core: CoreId,
        make: impl FnOnce(request::Reply<T>) -> CoreRequest,
    ) -> Result<T, CoreError> {
        self.submit(core, make).await?.await
    }

    /// Puts a request in a core's mailbox (waiting while it is full) and returns the pending
    /// answer. Requests submitted one after another reach the core in that order.
    pub async fn submit<T>(
        &self,
        core: CoreId,
        make: impl FnOnce(request::Reply<T>) -> CoreRequest,
    ) -> Result<impl std::future::Future<Output = Result<T, CoreError>>, CoreError> {
        let (tx, rx) = oneshot::channel();
        self.mailbox(core).send(make(tx), self.wait).await?;
        Ok(async move { rx.await.map_err(|_| CoreError::ShuttingDown)? })
    }

    /// Hands every leadership on this node to a follower (see `CoreRequest::HandOff`);
    /// answers how many transfers were asked.
    pub async fn hand_off(&self) -> usize {
        let mut moved = 0;
        for core in (0..self.mailboxes.len() as u32).map(CoreId) {
            moved += self
                .ask(core, |reply| CoreRequest::HandOff { reply })
                .await
                .unwrap_or(0);
        }
        moved
    }

    /// How many groups on this node lead (with other voters to hand over to, or not).
    pub async fn leading(&self) -> usize {
        let mut n = 0;
        for core in (0..self.mailboxes.len() as u32).map(CoreId) {
            n += self
                .ask(core, |reply| CoreRequest::States {
                    limit: usize::MAX,
                    reply,
                })
                .await
                .map_or(0, |s| {
                    s.iter()
                        .filter(|(_, s)| s.is_leader && !s.matched.is_empty())
                        .count()
                });
        }
        n
    }

    /// Flushes every core's logs and stops the cores; later requests get `ShuttingDown`.
    pub async fn shutdown(&self) -> Result<(), CoreError> {
        let mut result = Ok(());
        for core in (0..self.mailboxes.len() as u32).map(CoreId) {
            if let Err(e) = self
                .ask(core, |reply| CoreRequest::Shutdown { reply })
                .await
            {
                result = Err(e);
            }
        }
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        result
    }
}
