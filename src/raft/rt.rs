//! openraft's `AsyncRuntime` on glommio.
//!
//! A Raft group lives on the core that owns its partition, so everything here
//! runs inside that core's `LocalExecutor`: tasks are glommio tasks, timers
//! are glommio timers (io_uring timeouts), time is `std::time::Instant`.
//! The channels and the mutex are tokio's `sync` primitives (through
//! openraft-rt-tokio's wrappers): they are runtime-agnostic wakers-and-queues
//! and need no tokio reactor.
//!
//! `new`/`block_on` build and run a fresh executor on the calling thread; they
//! exist for tests and tools. A node never calls them: its Raft groups are
//! created inside the already running core executors.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use glommio::timer::Timer;
use openraft_rt::{AsyncRuntime, OptionalSend};

/// The glommio runtime for openraft.
pub struct GlommioRuntime {
    executor: glommio::LocalExecutor,
}

impl fmt::Debug for GlommioRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GlommioRuntime").finish_non_exhaustive()
    }
}

/// A spawned task ended without output: it was cancelled (its executor stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinError;

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("task was cancelled before it finished")
    }
}

impl std::error::Error for JoinError {}

/// The handle of a detached glommio task. Dropping it does not cancel the task.
pub struct JoinHandle<T>(glommio::task::JoinHandle<T>);

impl<T> Future for JoinHandle<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|out| out.ok_or(JoinError))
    }
}

/// A sleep on a glommio timer.
pub struct Sleep(Timer);

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// The deadline of a [`Timeout`] passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl fmt::Display for Elapsed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline elapsed")
    }
}

impl std::error::Error for Elapsed {}

pin_project_lite::pin_project! {
    /// A future raced against a glommio timer. The future is polled first, so
    /// one that is ready at the deadline still wins.
    pub struct Timeout<F> {
        #[pin]
        future: F,
        timer: Timer,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match Pin::new(this.timer).poll(cx) {
            Poll::Ready(_) => Poll::Ready(Err(Elapsed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn until(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The preempt timer of executors that serve no one (tests and tools: one task queue, no
/// fairness to keep). glommio 0.9 parks an executor with tasks ready when its preempt timer has
/// expired on entry to `run_task_queues` (the thread was descheduled between arming it and
/// running them: `shard::mailbox` tells the story), and if the task made ready held the last
/// timer, it sleeps for good; a storage test in CI once hung so for an hour. The cores of a
/// node have a watchdog thread for that (`shard::Shards::start`); these executors make it
/// need a ten-second stall instead of glommio's default 100 ms.
pub const OFFLINE_PREEMPT_TIMER: Duration = Duration::from_secs(10);

/// How long a unit test's body may run on its executor before [`run_test`] calls it a hang.
#[cfg(test)]
const TEST_HANG_LIMIT: Duration = Duration::from_secs(180);

/// Runs a unit test's async body on an offline executor ([`GlommioRuntime`]) on a thread of
/// its own, and fails the test if the body has not finished within [`TEST_HANG_LIMIT`]
/// (instead of holding the whole test run until CI's limit). A panic in the body fails the
/// test as it would have.
#[cfg(test)]
pub(crate) fn run_test<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            GlommioRuntime::new(1).block_on(async move { body().await })
        }));
        let _ = done_tx.send(ran);
    });
    match done_rx.recv_timeout(TEST_HANG_LIMIT) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("the test body did not finish within {TEST_HANG_LIMIT:?}: a hang"),
    }
}

impl AsyncRuntime for GlommioRuntime {
    type JoinError = JoinError;
    type JoinHandle<T: OptionalSend + 'static> = JoinHandle<T>;
    type Sleep = Sleep;
    type Instant = Instant;
    type TimeoutError = Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = Timeout<T>;
    type ThreadLocalRng = rand::rngs::ThreadRng;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        JoinHandle(glommio::spawn_local(future).detach())
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Sleep(Timer::new(duration))
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        Sleep(Timer::new(until(deadline)))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Timeout {
            future,
            timer: Timer::new(duration),
        }
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Self::timeout(until(deadline), future)
    }

    fn is_panic(_join_error: &Self::JoinError) -> bool {
        // A panicking glommio task takes its executor down with it; a join
        // handle only ever sees cancellation.
        false
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        rand::rng()
    }

    type Mpsc = openraft_rt_tokio::TokioMpsc;
    type Watch = openraft_rt_tokio::TokioWatch;
    type Oneshot = openraft_rt_tokio::TokioOneshot;
    type Mutex<T: OptionalSend + 'static> = openraft_rt_tokio::TokioMutex<T>;

    fn new(_threads: usize) -> Self {
        // Small I/O memory: a runtime made here is for tests and tools.
        let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(1 << 20)
            .preempt_timer(OFFLINE_PREEMPT_TIMER)
            .make()
            .expect("a glommio executor (io_uring) on this thread");
        GlommioRuntime { executor }
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.executor.run(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// openraft-rt's own conformance suite: spawn, timers, select, channels,
    /// watch, oneshot, mutex, task-locals and the deterministic RNG wrapper.
    #[test]
    fn passes_openraft_rt_suite() {
        openraft_rt::testing::Suite::<GlommioRuntime>::test_all();
    }

    #[test]
    #[should_panic(expected = "the body's own panic")]
    fn a_test_body_that_panics_fails_its_test_with_its_message() {
        run_test(|| async { panic!("the body's own panic") });
    }

    #[test]
    fn a_ready_future_beats_an_elapsed_deadline() {
        let mut rt = GlommioRuntime::new(1);
        let out = rt.block_on(async { GlommioRuntime::timeout(Duration::ZERO, async { 7 }).await });
        assert_eq!(out, Ok(7));
    }
}
