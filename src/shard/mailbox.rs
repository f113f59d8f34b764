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
//!
//! The re-check is a glommio timer, and once (a debug build on a machine loaded far past its
//! two cores, under the chaos harness) a core slept in `io_uring_wait_cqes` for twenty
//! minutes without its timer firing, and its node stopped answering. glommio 0.9 can park with
//! runnable tasks: `run_task_queues` returns "ran nothing" when its preempt timer has already
//! expired on entry (the thread was descheduled between arming it and running tasks),
//! and the executor then sleeps until some completion comes, however many tasks are ready. If
//! the task that was just made ready is this mailbox's (its re-check timer fired, so no timer
//! is left), nothing may ever come. So the mailbox stamps each time it runs
//! ([`Watch::stalled_for`]), and a watchdog thread (`Shards::start`) kicks a core whose
//! mailbox has not run for [`STALL`], through both of the ways an executor wakes: a byte on
//! the socket (an io_uring read, when one is pending) and the mailbox task's waker (glommio's
//! own cross-thread wake-up, an eventfd), again every check until the core runs.

use std::io::Write;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use futures::task::AtomicWaker;
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
    /// When the mailbox last ran ([`LocalMailbox::recv`], milliseconds since [`epoch`]).
    woke_ms: AtomicU64,
    /// The mailbox task's waker, for the watchdog's kick.
    waker: AtomicWaker,
    /// The core's mailbox is gone (the core stopped): nothing to watch.
    gone: AtomicBool,
}

/// A core whose mailbox has not run for this long is kicked by the watchdog (a healthy core's
/// mailbox runs every [`RECHECK`] at least, idle or busy).
pub const STALL: Duration = Duration::from_secs(1);

/// The process's clock origin for [`Bell::woke_ms`].
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
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
        woke_ms: AtomicU64::new(now_ms()),
        waker: AtomicWaker::new(),
        gone: AtomicBool::new(false),
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
    /// A handle on the core's wake-up for the watchdog, which does not keep the mailbox open.
    pub fn watch(&self) -> Watch {
        Watch(Arc::downgrade(&self.bell))
    }

    /// Requests waiting in the mailbox now.
    pub fn depth(&self) -> usize {
        self.tx.len()
    }

    /// Sends a request, waiting up to `wait` while the mailbox is full (back-pressure), then
    /// failing with `Busy`. Never queues without bound.
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

/// The watchdog's view of a core's wake-up (see [`STALL`]).
pub struct Watch(std::sync::Weak<Bell>);

impl Watch {
    /// `None` once the core is gone. Otherwise, if the core's mailbox has not run for longer
    /// than `limit`, kicks it (a byte on its socket, and its task woken from this thread) and
    /// tells how long it has not run.
    pub fn stalled_for(&self, limit: Duration) -> Option<Option<Duration>> {
        let bell = self.0.upgrade()?;
        if bell.gone.load(Ordering::SeqCst) {
            return None;
        }
        let asleep = now_ms().saturating_sub(bell.woke_ms.load(Ordering::SeqCst));
        if asleep <= limit.as_millis() as u64 {
            return Some(None);
        }
        bell.waiting.store(false, Ordering::SeqCst);
        // WouldBlock means unread bytes are already there; a byte that arrives when the core
        // is not waiting only makes its next wait return at once.
        let _ = (&bell.ring).write(&[1]);
        bell.waker.wake();
        Some(Some(Duration::from_millis(asleep)))
    }
}

impl MailboxReceiver {
    /// Binds the wake-up socket to the current executor: call on the core's thread.
    pub fn attach(self) -> LocalMailbox {
        // SAFETY: the fd comes from a socket we own and hand over whole.
        let socket = unsafe { glommio::net::UnixStream::from_raw_fd(self.listen.into_raw_fd()) };
        // The core's start (its ring and memory set up) does not count as a stall.
        self.bell.woke_ms.store(now_ms(), Ordering::SeqCst);
        LocalMailbox {
            rx: self.rx,
            bell: self.bell,
            socket,
            rescued: 0,
        }
    }
}

impl Drop for LocalMailbox {
    /// A core that stops (or whose thread panics) is not waiting for anything: the watchdog
    /// must not take it for a sleeping one.
    fn drop(&mut self) {
        self.bell.gone.store(true, Ordering::SeqCst);
        self.bell.waiting.store(false, Ordering::SeqCst);
        // Dropped here, on the core's thread: a glommio waker dropped on another thread after
        // its executor is gone would be queued to that executor and never freed.
        drop(self.bell.waker.take());
    }
}

impl LocalMailbox {
    /// Waits for the next request; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<CoreRequest> {
        loop {
            self.bell.woke_ms.store(now_ms(), Ordering::SeqCst);
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
                Err(TryRecvError::Disconnected) => {
                    self.bell.waiting.store(false, Ordering::SeqCst);
                    return None;
                }
                Err(TryRecvError::Empty) => {}
            }
            // Taken each time (a no-op when it is the same waker): the watchdog wakes it.
            futures::future::poll_fn(|cx| {
                self.bell.waker.register(cx.waker());
                std::task::Poll::Ready(())
            })
            .await;
            let mut buf = [0u8; 64];
            let rang = {
                let read = self.socket.read(&mut buf);
                let timer = glommio::timer::sleep(RECHECK);
                futures::pin_mut!(read, timer);
                match futures::future::select(read, timer).await {
                    // End of stream: every sender is gone (the write end closed).
                    futures::future::Either::Left((Ok(0), _)) => {
                        self.bell.waiting.store(false, Ordering::SeqCst);
                        return self.rx.try_recv().ok();
                    }
                    futures::future::Either::Left(_) => true,
                    futures::future::Either::Right(_) => false,
                }
            };
            self.bell.waiting.store(false, Ordering::SeqCst);
            self.bell.woke_ms.store(now_ms(), Ordering::SeqCst);
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

    /// The core is shutting down (closing its partitions may take a while, without the
    /// mailbox running): not a stall.
    pub fn stopping(&self) {
        self.bell.gone.store(true, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);
    impl futures::task::ArcWake for Count {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The watchdog leaves alone a core whose mailbox ran recently, waiting or not; kicks one
    /// whose mailbox has not run past the limit, through the socket and the task's waker
    /// (whether or not it said it waits: glommio can park with the task ready and no read
    /// pending), again at each check while it stays stalled; and stops once the core is gone.
    #[test]
    fn the_watchdog_kicks_a_core_whose_mailbox_has_not_run() {
        let (tx, rx) = mailbox(0, 4).unwrap();
        let watch = tx.watch();
        let bell = rx.bell.clone();
        let mut listen = rx.listen.try_clone().unwrap();
        let mut buf = [0u8; 8];
        let count = Arc::new(Count(Default::default()));
        bell.waker.register(&futures::task::waker(count.clone()));
        // Ran just now: nothing, waiting or not.
        bell.woke_ms.store(now_ms(), Ordering::SeqCst);
        assert_eq!(watch.stalled_for(Duration::from_secs(2)), Some(None));
        bell.waiting.store(true, Ordering::SeqCst);
        assert_eq!(watch.stalled_for(Duration::from_secs(2)), Some(None));
        assert!(listen.read(&mut buf).is_err(), "nothing was written");
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        // Not run past the limit, though not waiting: kicked both ways.
        bell.waiting.store(false, Ordering::SeqCst);
        bell.woke_ms.store(0, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        let slept = watch.stalled_for(Duration::from_millis(10)).unwrap();
        assert!(
            slept.is_some_and(|d| d >= Duration::from_millis(30)),
            "{slept:?}"
        );
        assert_eq!(listen.read(&mut buf).unwrap(), 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Still stalled at the next check: kicked again (the waker registered anew, as the
        // mailbox does each time it waits).
        bell.waker.register(&futures::task::waker(count.clone()));
        assert!(watch
            .stalled_for(Duration::from_millis(10))
            .unwrap()
            .is_some());
        assert_eq!(listen.read(&mut buf).unwrap(), 1);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        // Ran again: left alone.
        bell.woke_ms.store(now_ms(), Ordering::SeqCst);
        assert_eq!(watch.stalled_for(Duration::from_secs(2)), Some(None));
        // The core stopped (its mailbox dropped) while senders remain: nothing to watch.
        bell.gone.store(true, Ordering::SeqCst);
        bell.woke_ms.store(0, Ordering::SeqCst);
        assert_eq!(watch.stalled_for(Duration::ZERO), None);
        // Every side dropped: the watch ends.
        bell.gone.store(false, Ordering::SeqCst);
        drop((tx, rx, bell));
        assert_eq!(watch.stalled_for(Duration::ZERO), None);
    }
}
