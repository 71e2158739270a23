//! The relay's event loop: a thread with an executor and an epoll reactor
//! of its own (sockets registered through mio), on which the relay's sessions run and their sockets
//! ([`TcpStream`]) are read and written. No tokio scheduler or I/O driver is
//! on the path of a relayed message.
//!
//! Why not tokio there: callgrind of the relay on a current-thread tokio
//! runtime (docs/relay.md, session 10) put about half of its ~5 100
//! user-space instructions per relayed 64 B round trip in tokio: parking
//! (the busy-time metrics read the clock around every `epoll_wait`, the
//! driver's turn), the task harness's state transitions, and the readiness
//! registration of every socket read, which takes a lock on the socket's
//! waiter list. The bench's target (added latency no worse than nginx's)
//! was not met on tokio in five sessions of work on the relay's own code.
//! What the relay needs of an event loop is small: a task per session, two
//! sockets each, wake-ups from other threads. That is what is here.
//!
//! What does not run here: whatever needs a tokio runtime (the HTTP server,
//! DNS, the kube client, every timer). Those stay on tokio runtimes, and
//! their futures are awaited here as any future is: a tokio timer or
//! `JoinHandle` that completes on its own thread wakes the task here
//! through the loop's [`mio::Waker`]. A tokio I/O type or timer created on
//! this thread panics (there is no tokio context), as it must: it would
//! belong to no reactor that runs.
//!
//! One thread, so tasks need not be `Send`, and the loop's state is in
//! `RefCell`s of its [`Core`], reached through a thread-local. A task's
//! waker is `Send` and `Sync`, as wakers must be: on the loop's thread it
//! queues the task directly; on another it queues it in [`Remote`] and
//! wakes the loop.

mod tcp;

pub use tcp::TcpStream;

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use std::os::fd::{AsRawFd, RawFd};

use mio::{Poll as MioPoll, Token};
use slab::Slab;

/// The token of the loop's own waker; I/O tokens are slab indices.
const WAKE: Token = Token(usize::MAX);

/// Tasks polled per turn before the reactor is looked at again, so that a
/// task that keeps waking itself cannot starve the sockets.
const TASKS_PER_TURN: usize = 128;

type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;
/// Made on another thread, run on the loop: builds a task's future there
/// (its sockets must be registered on the loop's own reactor).
type Job = Box<dyn FnOnce() -> Option<LocalFuture> + Send>;

/// What other threads reach of a loop.
struct Remote {
    waker: mio::Waker,
    /// Set when `woken` or `jobs` has something, or the loop should stop;
    /// the loop looks into them only then.
    pending: AtomicBool,
    woken: Mutex<Vec<usize>>,
    jobs: Mutex<Vec<Job>>,
    stop: AtomicBool,
}

impl Remote {
    fn notify(&self) {
        // One eventfd write per batch of remote wake-ups, not per wake-up.
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }
}

/// A task's waker.
struct TaskWaker {
    task: usize,
    home: usize,
    /// In a run queue already: a second wake-up before the poll adds nothing.
    queued: AtomicBool,
    remote: Arc<Remote>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(core) = current()
            && core.id == self.home
        {
            core.queue.borrow_mut().push_back(self.task);
            return;
        }
        self.remote
            .woken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.task);
        self.remote.notify();
    }
}

struct Task {
    future: Option<LocalFuture>,
    /// Made once: a poll lends it out rather than cloning it (an atomic
    /// increment and decrement per poll).
    waker: Waker,
    state: Arc<TaskWaker>,
}

/// One loop's state, on its own thread.
pub(crate) struct Core {
    id: usize,
    registry: mio::Registry,
    io: RefCell<Slab<tcp::Slot>>,
    tasks: RefCell<Slab<Task>>,
    queue: RefCell<VecDeque<usize>>,
    remote: Arc<Remote>,
}

thread_local! {
    /// The loop running on this thread, if any.
    static CURRENT: Cell<*const Core> = const { Cell::new(std::ptr::null()) };
}

/// The loop of this thread, if this is a loop's thread.
fn current<'a>() -> Option<&'a Core> {
    // SAFETY: set by `run` to its own `Core` for as long as it runs, and
    // cleared before that `Core` is dropped; everything that reaches it
    // runs inside `run`, on this thread.
    unsafe { CURRENT.get().as_ref() }
}

impl Core {
    fn spawn(&self, future: LocalFuture) {
        let mut tasks = self.tasks.borrow_mut();
        let entry = tasks.vacant_entry();
        let task = entry.key();
        let state = Arc::new(TaskWaker {
            task,
            home: self.id,
            queued: AtomicBool::new(true),
            remote: self.remote.clone(),
        });
        entry.insert(Task {
            future: Some(future),
            waker: Waker::from(state.clone()),
            state,
        });
        self.queue.borrow_mut().push_back(task);
    }

    fn poll_task(&self, task: usize) {
        // Taken out while it runs: it may spawn or end other tasks.
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(t) = tasks.get_mut(task) else {
                // Ended; a late wake-up.
                return;
            };
            let Some(future) = t.future.take() else {
                return;
            };
            t.state.queued.store(false, Ordering::Release);
            (future, std::mem::replace(&mut t.waker, Waker::noop().clone()))
        };
        let mut cx = Context::from_waker(&waker);
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx)));
        match polled {
            Ok(Poll::Pending) => {
                if let Some(t) = self.tasks.borrow_mut().get_mut(task) {
                    t.future = Some(future);
                    t.waker = waker;
                }
            }
            Ok(Poll::Ready(())) => {
                self.tasks.borrow_mut().try_remove(task);
                drop(future);
            }
            Err(_) => {
                // As tokio does with a task that panics: that task ends,
                // the others go on. The panic message is already printed.
                tracing::error!(task, "a task of the relay's event loop panicked");
                self.tasks.borrow_mut().try_remove(task);
                drop(future);
            }
        }
    }

    /// Moves what other threads queued onto this loop.
    fn take_remote(&self) {
        // A plain load first: on most turns nothing came from elsewhere, and
        // a swap is a locked instruction on every turn.
        if !self.remote.pending.load(Ordering::Acquire) || !self.remote.pending.swap(false, Ordering::AcqRel)
        {
            return;
        }
        let woken = std::mem::take(&mut *self.remote.woken.lock().unwrap_or_else(|e| e.into_inner()));
        for task in woken {
            self.queue.borrow_mut().push_back(task);
        }
        let jobs = std::mem::take(&mut *self.remote.jobs.lock().unwrap_or_else(|e| e.into_inner()));
        for job in jobs {
            if let Some(future) = job() {
                self.spawn(future);
            }
        }
    }
}

/// A running loop: it stops when the last clone of this is dropped,
/// dropping the tasks it still has (on its thread).
#[derive(Clone)]
pub struct EventLoop {
    spawner: Spawner,
    _owner: Arc<Owner>,
}

/// Spawns onto a loop from any thread, without keeping it running: what the
/// loop's own tasks may hold (a task holding the [`EventLoop`] would keep
/// its loop, and so itself, alive).
#[derive(Clone)]
pub struct Spawner {
    remote: Arc<Remote>,
}

/// Stops the loop when the last [`EventLoop`] goes.
struct Owner(Arc<Remote>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
        self.0.notify();
    }
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

impl EventLoop {
    /// Starts a loop on a new thread named `name`.
    pub fn start(name: &str) -> std::io::Result<Self> {
        let poll = MioPoll::new()?;
        let registry = poll.registry().try_clone()?;
        let remote = Arc::new(Remote {
            waker: mio::Waker::new(poll.registry(), WAKE)?,
            pending: AtomicBool::new(false),
            woken: Mutex::default(),
            jobs: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let for_core = remote.clone();
        std::thread::Builder::new().name(name.into()).spawn(move || {
            let core = Core {
                id,
                registry,
                io: RefCell::new(Slab::new()),
                tasks: RefCell::new(Slab::new()),
                queue: RefCell::new(VecDeque::new()),
                remote: for_core,
            };
            run(core, poll)
        })?;
        Ok(Self {
            _owner: Arc::new(Owner(remote.clone())),
            spawner: Spawner { remote },
        })
    }

    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
    }

    /// [`Spawner::spawn_with`].
    pub fn spawn_with<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Option<Fut> + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        self.spawner.spawn_with(make)
    }
}

impl Spawner {
    /// Runs `make` on the loop's thread and the future it returns as a task
    /// there (None: nothing to run). The future need not be `Send`: it is
    /// made where it runs, and sockets made in it belong to this loop. After
    /// the loop stopped, nothing runs.
    pub fn spawn_with<F, Fut>(&self, make: F)
    where
        F: FnOnce() -> Option<Fut> + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || make().map(|f| Box::pin(f) as LocalFuture));
        self.remote
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job);
        self.remote.notify();
    }
}

/// Spawns `future` on the loop of this thread; gives it back if this is not
/// a loop's thread.
pub fn spawn_local<F: Future<Output = ()> + 'static>(future: F) -> Result<(), F> {
    match current() {
        Some(core) => {
            core.spawn(Box::pin(future));
            Ok(())
        }
        None => Err(future),
    }
}

/// Whether this thread runs an event loop.
#[cfg(test)]
fn is_loop_thread() -> bool {
    current().is_some()
}

/// epoll_wait(2) on mio's epoll, as a plain syscall: glibc's wrapper is a
/// cancellation point and, in a process with more than one thread, switches
/// asynchronous cancellation on and off around the call (as `tcp::sys_recv`
/// explains), about 60 user-space instructions per relayed round trip; and
/// mio's `Poll::poll` copies its events into its own type before they are
/// looked at. Registration stays mio's.
fn sys_epoll_wait(
    epoll: RawFd,
    events: &mut [libc::epoll_event],
    timeout_ms: libc::c_int,
) -> std::io::Result<usize> {
    // SAFETY: the kernel writes at most `events.len()` entries into `events`.
    let n = unsafe {
        libc::syscall(
            libc::SYS_epoll_wait,
            libc::c_long::from(epoll),
            events.as_mut_ptr(),
            events.len() as libc::c_long,
            libc::c_long::from(timeout_ms),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn run(core: Core, poll: MioPoll) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CURRENT.set(std::ptr::null());
        }
    }
    CURRENT.set(&core);
    let _reset = Reset;
    let epoll = poll.as_raw_fd();
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        for _ in 0..TASKS_PER_TURN {
            let Some(task) = core.queue.borrow_mut().pop_front() else {
                break;
            };
            core.poll_task(task);
        }
        core.take_remote();
        if core.remote.stop.load(Ordering::Acquire) {
            break;
        }
        // Tasks still queued: look at the sockets without waiting.
        let timeout = if core.queue.borrow().is_empty() { -1 } else { 0 };
        let n = match sys_epoll_wait(epoll, &mut events, timeout) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "the relay's event loop cannot poll: it stops");
                break;
            }
        };
        for event in &events[..n] {
            // mio registers a socket with its token as the event's data.
            let token = event.u64 as usize;
            if token == WAKE.0 {
                // `take_remote` on the next turn.
                continue;
            }
            tcp::dispatch(&core, token, event.events);
        }
    }
    // The tasks (and their sockets) go while this is still their loop.
    let tasks = std::mem::take(&mut *core.tasks.borrow_mut());
    drop(tasks);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn runs_tasks_spawned_from_another_thread_and_wakes_them_from_there() {
        let lp = EventLoop::start("test-loop").unwrap();
        let (tx, rx) = mpsc::channel();
        let (wake_tx, wake_rx) = mpsc::channel::<Waker>();
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        lp.spawn_with(move || {
            assert!(is_loop_thread());
            let mut sent = false;
            Some(std::future::poll_fn(move |cx| {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                if !sent {
                    wake_tx.send(cx.waker().clone()).unwrap();
                    sent = true;
                }
                if n == 0 {
                    return Poll::Pending;
                }
                tx.send(n).unwrap();
                Poll::Ready(())
            }))
        });
        let waker = wake_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(!is_loop_thread());
        // Two wake-ups before the loop polls again are one poll.
        waker.wake_by_ref();
        waker.wake();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_task_that_panics_ends_alone() {
        let lp = EventLoop::start("test-loop").unwrap();
        lp.spawn_with(|| Some(async { panic!("on purpose") }));
        let (tx, rx) = mpsc::channel();
        lp.spawn_with(move || {
            Some(async move {
                tx.send(7).unwrap();
            })
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 7);
    }

    #[test]
    fn spawn_local_runs_on_the_loop_and_is_refused_elsewhere() {
        assert!(spawn_local(async {}).is_err());
        let lp = EventLoop::start("test-loop").unwrap();
        let (tx, rx) = mpsc::channel();
        lp.spawn_with(move || {
            Some(async move {
                spawn_local(async move { tx.send(1).unwrap() })
                    .map_err(|_| ())
                    .unwrap();
            })
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
    }

    #[test]
    fn the_loop_stops_with_its_last_handle_and_drops_its_tasks() {
        struct Flag(mpsc::Sender<()>);
        impl Drop for Flag {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let lp = EventLoop::start("test-loop").unwrap();
        let (tx, rx) = mpsc::channel();
        let (started_tx, started) = mpsc::channel();
        lp.spawn_with(move || {
            let flag = Flag(tx);
            Some(async move {
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await;
                drop(flag);
            })
        });
        started.recv_timeout(Duration::from_secs(5)).unwrap();
        let second = lp.clone();
        drop(lp);
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "a handle is left"
        );
        drop(second);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the pending task was dropped");
    }
}
