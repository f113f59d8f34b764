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
}

pub fn mailbox(core: u32, capacity: usize) -> (MailboxSender, MailboxReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let waker = Arc::new(AtomicWaker::new());
    (
        MailboxSender {
            core,
            tx,
            waker: waker.clone(),
        },
        MailboxReceiver { rx, waker },
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
        futures::future::poll_fn(|cx| {
            // Register first, then look: a send between the two still wakes us.
            self.waker.register(cx.waker());
            match self.rx.try_recv() {
                Ok(r) => Poll::Ready(Some(r)),
                Err(TryRecvError::Empty) => Poll::Pending,
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
            }
        })
        .await
    }

    /// Another request if one is waiting.
    pub fn try_recv(&self) -> Option<CoreRequest> {
        self.rx.try_recv().ok()
    }
}
