//! A core's mailbox: a bounded lock-free channel plus a waker, so a tokio thread can hand work
//! to a glommio executor that sleeps when idle (it parks on an eventfd; no polling).

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use futures::task::AtomicWaker;

use super::request::{CoreError, CoreRequest};

/// The sending side, held by the network shard. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct MailboxSender {
    core: u32,
    tx: Sender<CoreRequest>,
    waker: Arc<AtomicWaker>,
}

/// The receiving side, owned by the core's mailbox task.
pub struct MailboxReceiver {
    rx: Receiver<CoreRequest>,
    waker: Arc<AtomicWaker>,
    /// Times the safety re-check found requests that no wake-up had announced.
    rescued: std::cell::Cell<u64>,
}

/// How often a waiting mailbox looks again even without a wake-up. glommio 0.9 can lose a
/// wake-up sent from another thread (see `core::run`); this bounds the cost of one to 250 ms,
/// and `rescued` counts how often it happens. Each wake of an idle executor costs ~0.1 ms of
/// CPU (glommio issues a membarrier before sleeping): at 10 ms this alone was 2.7% of a core.
const RECHECK: Duration = Duration::from_millis(250);

pub fn mailbox(core: u32, capacity: usize) -> (MailboxSender, MailboxReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let waker = Arc::new(AtomicWaker::new());
    (
        MailboxSender {
            core,
            tx,
            waker: waker.clone(),
        },
        MailboxReceiver {
            rx,
            waker,
            rescued: std::cell::Cell::new(0),
        },
    )
}

impl MailboxSender {
    /// Sends a request, waiting up to `wait` while the mailbox is full (back-pressure), then
    /// failing with `Busy`. Never queues without bound.
    pub async fn send(&self, req: CoreRequest, wait: Duration) -> Result<(), CoreError> {
        let deadline = Instant::now() + wait;
        let mut req = req;
        let mut pause = Duration::from_micros(50);
        loop {
            match self.tx.try_send(req) {
                Ok(()) => {
                    self.waker.wake();
                    return Ok(());
                }
                Err(TrySendError::Disconnected(_)) => return Err(CoreError::ShuttingDown),
                Err(TrySendError::Full(r)) => {
                    // Make sure the core is awake to drain it.
                    self.waker.wake();
                    if Instant::now() >= deadline {
                        return Err(CoreError::Busy(self.core));
                    }
                    req = r;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
            }
        }
    }

    /// Requests waiting in the mailbox (for metrics).
    pub fn depth(&self) -> usize {
        self.tx.len()
    }
}

impl MailboxReceiver {
    /// Waits for the next request; `None` once every sender is gone.
    pub async fn recv(&self) -> Option<CoreRequest> {
        loop {
            let woken = futures::future::poll_fn(|cx| {
                // Register first, then look: a send between the two still wakes us.
                self.waker.register(cx.waker());
                match self.rx.try_recv() {
                    Ok(r) => Poll::Ready(Some(r)),
                    Err(TryRecvError::Empty) => Poll::Pending,
                    Err(TryRecvError::Disconnected) => Poll::Ready(None),
                }
            });
            let timer = glommio::timer::sleep(RECHECK);
            futures::pin_mut!(woken, timer);
            match futures::future::select(woken, timer).await {
                futures::future::Either::Left((r, _)) => return r,
                futures::future::Either::Right(_) => match self.rx.try_recv() {
                    Ok(r) => {
                        self.rescued.set(self.rescued.get() + 1);
                        tracing::debug!(
                            rescued = self.rescued.get(),
                            "mailbox request found without a wake-up"
                        );
                        return Some(r);
                    }
                    Err(TryRecvError::Empty) => continue,
                    Err(TryRecvError::Disconnected) => return None,
                },
            }
        }
    }

    /// Times a request was found by the periodic re-check instead of a wake-up.
    pub fn rescued(&self) -> u64 {
        self.rescued.get()
    }

    /// Another request if one is waiting.
    pub fn try_recv(&self) -> Option<CoreRequest> {
        self.rx.try_recv().ok()
    }
}
