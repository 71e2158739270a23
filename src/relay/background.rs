//! A runtime on a thread of its own for the relay's work that is not
//! relaying: the sessions' timers, the caches' watch of Users and Sprites,
//! and the session-lease writes.
//!
//! Why: a timer registered in a tokio runtime costs every wake-up of that
//! runtime's event loop (the driver reads the clock again and walks its
//! wheel before and after each `epoll_wait`), whether or not the timer is
//! due. Every session holds one (its next ping, at most every few seconds)
//! and the relay wakes twice per relayed round trip, so on the event loop
//! that cost is paid per message: the bench's tokio pipe spent about 6 µs
//! more CPU per 64 B round trip with one idle timer registered than without
//! (`docs/relay.md`). Here the sessions' timers sit in this runtime's wheel
//! instead; one firing wakes its session across threads, which happens
//! once per ping interval, not per message. The kube client's connections
//! (with their read timeouts) live here for the same reason.
//!
//! Short-lived timers (a connect or close timeout, a write that has to
//! wait) stay on the event loop: they exist only while they matter.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Sleep};

pub struct Background {
    handle: Handle,
    /// Dropped with this: the thread then ends, and its runtime with it.
    _stop: oneshot::Sender<()>,
}

impl Background {
    pub fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("relay-background")
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("relay-background".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stopped.await;
                })
            })?;
        Ok(Self { handle, _stop: stop })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub fn spawn<F>(&self, f: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }

    /// A sleep in this runtime's timer wheel, to be polled from anywhere.
    pub fn sleep_until(&self, deadline: Instant) -> Sleep {
        let _in = self.handle.enter();
        tokio::time::sleep_until(deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn its_sleeps_fire_for_another_runtime_and_its_tasks_run() {
        let bg = Background::start().unwrap();
        // The event loop: a runtime with no timer of its own.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        rt.block_on(async {
            let sleep = bg.sleep_until(Instant::now() + Duration::from_millis(50));
            sleep.await;
            // Reset after firing, as the session does for its next deadline.
            let sleep = bg.sleep_until(Instant::now() + Duration::from_secs(3600));
            tokio::pin!(sleep);
            sleep.as_mut().reset(Instant::now() + Duration::from_millis(20));
            sleep.await;
            assert_eq!(bg.spawn(async { 7 }).await.unwrap(), 7);
        });
        assert!(started.elapsed() >= Duration::from_millis(70));
    }
}
