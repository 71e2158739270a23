//! The relay's stop signal, as every session loop watches it.
//!
//! A `CancellationToken`'s future takes two locks per poll (the token's
//! state, then its `Notify`'s waiter list); here a poll that finds nothing
//! changed is one atomic load. The token still does the waking: its future
//! is polled once to register the task, and again only when the flag is set
//! or the task's waker changed. (Written when each session polled its stop
//! branch on every turn of its loop, about twice per relayed message; the
//! session loop now polls it only when it woke, `wakeups.rs`.)

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    /// Set before the token is cancelled: whoever sees it false and is then
    /// woken by the token sees it true.
    stopping: Arc<AtomicBool>,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.stopping.store(true, Ordering::Release);
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub async fn triggered(&self) {
        self.token.cancelled().await
    }

    /// A future for a loop that polls it many times.
    pub fn signal(&self) -> Signal {
        Signal {
            stopping: self.stopping.clone(),
            inner: Box::pin(self.token.clone().cancelled_owned()),
            registered: None,
        }
    }
}

/// Resolves once the relay stops; cheap to poll while it does not.
pub struct Signal {
    stopping: Arc<AtomicBool>,
    inner: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker the token will wake, once registered.
    registered: Option<Waker>,
}

impl Future for Signal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let registered = self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if registered && !self.stopping.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        let this = &mut *self;
        let poll = this.inner.as_mut().poll(cx);
        if poll.is_pending() {
            this.registered = Some(cx.waker().clone());
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_registered_signal_wakes_on_trigger() {
        let s = Shutdown::default();
        let signal = s.signal();
        let waiter = tokio::spawn(async move {
            tokio::pin!(signal);
            // Polled many times in one task before the trigger, as a
            // session loop does; only the first poll registers.
            for _ in 0..3 {
                assert!(futures::poll!(&mut signal).is_pending());
                tokio::task::yield_now().await;
            }
            signal.await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        s.trigger();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the trigger")
            .unwrap();
        assert!(s.is_triggered());
    }

    #[tokio::test]
    async fn a_signal_taken_after_the_trigger_is_ready() {
        let s = Shutdown::default();
        s.trigger();
        assert!(futures::poll!(s.signal()).is_ready());
        s.triggered().await;
    }

    #[tokio::test]
    async fn a_new_waker_is_registered() {
        // Moved to another task after its first poll: the new task's waker
        // must be the one woken.
        let s = Shutdown::default();
        let mut signal = s.signal();
        assert!(futures::poll!(&mut signal).is_pending());
        let moved = tokio::spawn(signal);
        tokio::task::yield_now().await;
        s.trigger();
        tokio::time::timeout(Duration::from_secs(5), moved)
            .await
            .expect("the moved signal was woken")
            .unwrap();
    }
}
