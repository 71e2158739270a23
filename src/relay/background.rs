//! A runtime on a thread of its own for the relay's work that is not
//! relaying: every timer of the relay (the sessions' pings, keepalives and
//! idleness, connect, write and close timeouts, the Sprites client's
//! retries), DNS for upstream connections, the caches' watch of Users and
//! Sprites, and the session-lease writes.
//!
//! Why: a runtime's time driver costs every wake-up of that runtime (it
//! reads the clock and walks its wheel around each `epoll_wait`), whether
//! or not a timer is due. The relay wakes twice per relayed round trip, so
//! on the event loop that cost is paid per message: about 6 µs more CPU per
//! 64 B round trip for the bench's tokio pipe with one idle timer
//! registered, and about 700 user-space instructions per round trip for the
//! relay with the driver there and no timer in it (`docs/relay.md`). So
//! neither the relay's event loops (`crate::event_loop`) nor its front
//! runtime (`relay::front_runtime`) has timers, and timers made here
//! through [`Background::timers`] are polled from them; one firing wakes
//! its task across threads. The kube client's connections (with their read
//! timeouts) live here for the same reason.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::timers::Timers;

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

    /// Timers in this runtime's wheel: every timer of the relay's event
    /// loop, which has no time driver (`crate::timers`).
    pub fn timers(&self) -> Timers {
        Timers::on(self.handle.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::Instant;

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
            let sleep = bg
                .timers()
                .sleep_until(Instant::now() + Duration::from_millis(50));
            sleep.await;
            // Reset after firing, as the session does for its next deadline.
            let sleep = bg
                .timers()
                .sleep_until(Instant::now() + Duration::from_secs(3600));
            tokio::pin!(sleep);
            sleep.as_mut().reset(Instant::now() + Duration::from_millis(20));
            sleep.await;
            assert_eq!(bg.spawn(async { 7 }).await.unwrap(), 7);
        });
        assert!(started.elapsed() >= Duration::from_millis(70));
    }
}
