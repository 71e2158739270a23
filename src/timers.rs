//! Which tokio runtime's timer wheel a component's sleeps and timeouts go
//! into.
//!
//! By default a tokio timer lives in the runtime that creates it. The
//! relay relays on event loops of its own (`crate::event_loop`), which have
//! no timers, and its front runtime has no time driver
//! (`relay::front_runtime`): a time driver costs every wake-up of its
//! runtime, due timers or not (it reads the clock and walks its wheel
//! around each `epoll_wait`), about 700 of the relay's user-space
//! instructions per 64 B round trip when it ran on tokio (callgrind,
//! `docs/relay.md`). Its timers go to the relay's background runtime
//! instead: created there, they can be polled from any thread, and the one
//! that fires wakes its task across threads.
//!
//! A timer created where there is no time driver panics. So every
//! component that may run on an event loop (the relay's sockets and
//! sessions, the Sprites client's WebSocket connects) takes its timers from
//! a [`Timers`] instead of `tokio::time` directly. reqwest's own timeouts
//! are not covered: the relay makes no REST call.

use std::future::IntoFuture;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Sleep, Timeout};

/// Where timers go: the runtime that creates them, or a given one.
#[derive(Clone, Debug, Default)]
pub struct Timers(Option<Handle>);

impl Timers {
    /// In the runtime that creates them (tokio's default).
    pub fn current() -> Self {
        Self(None)
    }

    /// In `handle`'s runtime, whichever runtime polls them.
    pub fn on(handle: Handle) -> Self {
        Self(Some(handle))
    }

    pub fn sleep(&self, duration: Duration) -> Sleep {
        let _in = self.0.as_ref().map(Handle::enter);
        tokio::time::sleep(duration)
    }

    pub fn sleep_until(&self, deadline: Instant) -> Sleep {
        let _in = self.0.as_ref().map(Handle::enter);
        tokio::time::sleep_until(deadline)
    }

    /// `tokio::time::timeout`, its timer here.
    pub fn timeout<F: IntoFuture>(&self, duration: Duration, future: F) -> Timeout<F::IntoFuture> {
        let _in = self.0.as_ref().map(Handle::enter);
        tokio::time::timeout(duration, future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime as the relay's event loop: I/O, no time driver.
    fn no_time_driver() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
    }

    #[test]
    fn timers_on_another_runtime_work_where_there_is_no_time_driver() {
        let timers_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let timers = Timers::on(timers_rt.handle().clone());
        let started = std::time::Instant::now();
        no_time_driver().block_on(async {
            timers.sleep(Duration::from_millis(20)).await;
            timers
                .sleep_until(Instant::now() + Duration::from_millis(20))
                .await;
            let never = std::future::pending::<()>();
            assert!(timers.timeout(Duration::from_millis(20), never).await.is_err());
            assert_eq!(timers.timeout(Duration::from_secs(5), async { 3 }).await, Ok(3));
        });
        assert!(started.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn the_current_runtimes_timers_are_the_default() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let never = std::future::pending::<()>();
            assert!(
                Timers::default()
                    .timeout(Duration::from_millis(5), never)
                    .await
                    .is_err()
            );
        });
    }

    #[test]
    fn without_a_time_driver_the_current_runtimes_timers_panic() {
        // Why the relay passes `Timers` around: this is what a timer made
        // the default way on its event loop does.
        let made = std::panic::catch_unwind(|| {
            no_time_driver().block_on(async {
                Timers::current().sleep(Duration::from_millis(1)).await;
            })
        });
        assert!(made.is_err());
    }
}
