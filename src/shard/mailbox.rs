//! A core's mailbox: a bounded lock-free channel plus a wake-up that io_uring delivers, so a
//! tokio thread can hand work to a glommio executor that sleeps when idle (no polling).
//!
//! The wake-up is a byte on a socketpair whose read end the core awaits through glommio (an
//! io_uring read), written only when the core has said it is about to wait (an eventcount):
//!
//! ```text
//! sender: push request; if waiting.swap(false) { write 1 byte }
//! core:   try_recv; waiting = true; try_recv again; await a byte on the socket
//! ```
//!
//! Either the core's second look sees the request, or the sender sees `waiting` and writes the
//! byte. glommio 0.9's own wake-ups from foreign threads (`Waker::wake` from tokio) were lost
//! now and then: requests sat in a sleeping core's mailbox until its next timer (see
//! `core::run`). A periodic re-check remains as a last resort, and counts anything it finds.

use std::io::Write;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use futures::AsyncReadExt;

use super::request::{CoreError, CoreRequest};

/// The sending side, held by the network shard. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct MailboxSender {
    core: u32,
    tx: Sender<CoreRequest>,
    bell: Arc<Bell>,
}

/// The wake-up shared by both sides.
struct Bell {
    /// The core is about to wait (or waiting) for a byte.
    waiting: AtomicBool,
    /// Write end of the socketpair (non-blocking).
    ring: StdUnixStream,
}

impl Bell {
    fn ring(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            // WouldBlock means unread bytes are already there: the core will wake anyway.
            let _ = (&self.ring).write(&[1]);
        }
    }
}

/// The receiving side, sent to the core's thread and attached there.
pub struct MailboxReceiver {
    rx: Receiver<CoreRequest>,
    bell: Arc<Bell>,
    /// Read end of the socketpair.
    listen: StdUnixStream,
}

/// The receiving side attached to its core's executor.
pub struct LocalMailbox {
    rx: Receiver<CoreRequest>,
    bell: Arc<Bell>,
    socket: glommio::net::UnixStream,
    /// Times the safety re-check found requests that no wake-up had announced.
    rescued: u64,
}

/// How often a waiting mailbox looks again even without a wake-up. glommio 0.9 can lose a
/// wake-up sent from another thread (see `core::run`); this bounds the cost of one to 250 ms,
/// and `rescued` counts how often it happens. Each wake of an idle executor costs ~0.1 ms of
/// CPU (glommio issues a membarrier before sleeping): at 10 ms this alone was 2.7% of a core.
const RECHECK: Duration = Duration::from_millis(250);

pub fn mailbox(core: u32, capacity: usize) -> std::io::Result<(MailboxSender, MailboxReceiver)> {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let (ring, listen) = StdUnixStream::pair()?;
    ring.set_nonblocking(true)?;
    listen.set_nonblocking(true)?;
    let bell = Arc::new(Bell {
        waiting: AtomicBool::new(false),
        ring,
    });
    Ok((
        MailboxSender {
            core,
            tx,
            bell: bell.clone(),
        },
        MailboxReceiver { rx, bell, listen },
    ))
}

impl MailboxSender {
    /// Sends a request, waiting up to `wait` while the mailbox is full (back-pressure), then
    /// failing with `Busy`. Never queues without bound.
    /// Requests waiting in the mailbox now.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    pub async fn send(&self, req: CoreRequest, wait: Duration) -> Result<(), CoreError> {
        let deadline = Instant::now() + wait;
        let mut req = req;
        let mut pause = Duration::from_micros(50);
        loop {
            match self.tx.try_send(req) {
                Ok(()) => {
                    self.bell.ring();
                    return Ok(());
                }
                Err(TrySendError::Disconnected(_)) => return Err(CoreError::ShuttingDown),
                Err(TrySendError::Full(r)) => {
                    // Make sure the core is awake to drain it.
                    self.bell.ring();
                    if Instant::now() >= deadline {
                        return Err(CoreError::Busy(crate::types::CoreId(self.core)));
                    }
                    req = r;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
            }
        }
    }
}

impl MailboxReceiver {
    /// Binds the wake-up socket to the current executor: call on the core's thread.
    pub fn attach(self) -> LocalMailbox {
        // SAFETY: the fd comes from a socket we own and hand over whole.
        let socket = unsafe { glommio::net::UnixStream::from_raw_fd(self.listen.into_raw_fd()) };
        LocalMailbox {
            rx: self.rx,
            bell: self.bell,
            socket,
            rescued: 0,
        }
    }
}

impl LocalMailbox {
    /// Waits for the next request; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<CoreRequest> {
        loop {
            match self.rx.try_recv() {
                Ok(r) => return Some(r),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            self.bell.waiting.store(true, Ordering::SeqCst);
            match self.rx.try_recv() {
                Ok(r) => {
                    self.bell.waiting.store(false, Ordering::SeqCst);
                    return Some(r);
                }
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            let mut buf = [0u8; 64];
            let rang = {
                let read = self.socket.read(&mut buf);
                let timer = glommio::timer::sleep(RECHECK);
                futures::pin_mut!(read, timer);
                match futures::future::select(read, timer).await {
                    // End of stream: every sender is gone (the write end closed).
                    futures::future::Either::Left((Ok(0), _)) => return self.rx.try_recv().ok(),
                    futures::future::Either::Left(_) => true,
                    futures::future::Either::Right(_) => false,
                }
            };
            self.bell.waiting.store(false, Ordering::SeqCst);
            if !rang {
                if let Ok(r) = self.rx.try_recv() {
                    self.rescued += 1;
                    tracing::debug!(
                        rescued = self.rescued,
                        "mailbox request found without a wake-up"
                    );
                    return Some(r);
                }
            }
        }
    }

    /// Times a request was found by the periodic re-check instead of a wake-up.
    pub fn rescued(&self) -> u64 {
        self.rescued
    }

    /// Another request if one is waiting.
    pub fn try_recv(&self) -> Option<CoreRequest> {
        self.rx.try_recv().ok()
    }
}
