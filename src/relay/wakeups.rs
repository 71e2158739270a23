//! Which of a session's event sources woke it: one waker per source, so that
//! the session loop polls only the sources that woke, as `FuturesUnordered`
//! does for its futures.
//!
//! Why not `tokio::select!`: it polls every branch on every wake-up. In the
//! session that meant, per relayed message, a poll of the socket that did not
//! wake (taking its readiness waiter lock), a poll of the timer and the
//! macro's own bookkeeping: about 1 200 of the relay's 8 600 user-space
//! instructions per 64 B round trip (callgrind, `docs/relay.md`).
//!
//! The contract a caller keeps: poll a source only when [`Wakeups::take`]
//! says it is due, with [`Wakeups::context`] for that source; [`mark`] a
//! source that must be polled although nothing woke it (it is new, was reset,
//! or its last poll returned `Ready` without registering a waker). Any other
//! poll of the same source with another waker would leave its wake-up going
//! to a waker that does not set the flag.
//!
//! [`mark`]: Wakeups::mark

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, RawWaker, RawWakerVTable, Waker};

/// Up to 8 sources (the index rides in the low bits of the waker's pointer).
pub struct Wakeups<const N: usize> {
    shared: Arc<Shared>,
    wakers: [Waker; N],
    /// The sources due, taken from `shared.due` by [`Wakeups::register`]:
    /// only the polling task reads and writes these, so `take` and `mark`
    /// are plain bit operations.
    due: u32,
}

/// One allocation for all of a session's sources: a waker per source in an
/// `Arc` of its own cost the relay 1.8 KiB of RSS per idle session in the
/// bench (six small blocks between the session's large ones), not the 0.3
/// KiB they hold.
#[repr(align(8))]
struct Shared {
    /// Bit `i`: source `i` woke since the task last looked.
    due: AtomicU32,
    /// The task that polls the sources. Fixed for the life of this
    /// allocation, so a wake-up reads it without a lock or a swap; a task
    /// that shows up with another waker gets a new allocation
    /// ([`Wakeups::register`]). A task's waker on the relay's event loop
    /// (`crate::event_loop`) is the same on every poll, as a tokio task's
    /// is, so in the relay that happens once, on the first poll.
    task: Waker,
}

const INDEX_BITS: usize = 0b111;

/// A source's waker: a counted reference to `Shared` whose pointer carries
/// the source's index in its low bits (`Shared` is 8-aligned, so they are
/// free).
fn source_waker(shared: &Arc<Shared>, i: usize) -> Waker {
    let ptr = Arc::into_raw(shared.clone()).map_addr(|a| a | i).cast::<()>();
    // SAFETY: the pointer came from `Arc::into_raw` with a strong count of
    // its own, as the vtable's functions expect.
    unsafe { Waker::from_raw(RawWaker::new(ptr, &VTABLE)) }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone_raw, wake_raw, wake_by_ref_raw, drop_raw);

fn untag(ptr: *const ()) -> (*const Shared, u32) {
    (
        ptr.map_addr(|a| a & !INDEX_BITS).cast::<Shared>(),
        1 << (ptr.addr() & INDEX_BITS),
    )
}

unsafe fn clone_raw(ptr: *const ()) -> RawWaker {
    // SAFETY: `ptr` holds a strong count of a live `Arc<Shared>`
    // (`source_waker`); the clone takes one more.
    unsafe { Arc::increment_strong_count(untag(ptr).0) };
    RawWaker::new(ptr, &VTABLE)
}

unsafe fn wake_raw(ptr: *const ()) {
    // SAFETY: as for `wake_by_ref_raw` then `drop_raw`: this consumes the
    // waker's count.
    unsafe {
        wake_by_ref_raw(ptr);
        drop_raw(ptr);
    }
}

unsafe fn wake_by_ref_raw(ptr: *const ()) {
    let (shared, bit) = untag(ptr);
    // SAFETY: the waker's count keeps `Shared` alive.
    let shared = unsafe { &*shared };
    // Release: what the source did before waking is seen by the task that
    // takes the bit (`register`, Acquire).
    shared.due.fetch_or(bit, Ordering::Release);
    shared.task.wake_by_ref();
}

unsafe fn drop_raw(ptr: *const ()) {
    // SAFETY: gives back the count the waker held.
    unsafe { Arc::decrement_strong_count(untag(ptr).0) };
}

/// Every source of `N`.
const fn all<const N: usize>() -> u32 {
    ((1u64 << N) - 1) as u32
}

impl<const N: usize> Wakeups<N> {
    /// Every source starts due: each must be polled once to register.
    pub fn new() -> Self {
        const { assert!(N <= INDEX_BITS + 1) };
        // Bound to no task yet: the first `register` binds the real one.
        Self::bound_to(Waker::noop().clone())
    }

    fn bound_to(task: Waker) -> Self {
        let shared = Arc::new(Shared {
            due: AtomicU32::new(0),
            task,
        });
        let wakers = std::array::from_fn(|i| source_waker(&shared, i));
        Self {
            shared,
            wakers,
            due: all::<N>(),
        }
    }

    /// Call first in every poll of the task, before any [`Wakeups::take`]:
    /// it takes the sources that woke since the last call. A source that
    /// wakes after this wakes the task again.
    ///
    /// If the task's waker is not the one the sources wake (the first poll;
    /// a caller that moved these to another task), the sources get new
    /// wakers for the new one and all become due: each is polled again
    /// with its new waker, which replaces the old one wherever that was
    /// registered. An old waker that fires meanwhile wakes the old task
    /// spuriously, which a waker may always do, and sets a flag nobody
    /// reads; the poll that follows sees the event itself.
    pub fn register(&mut self, cx: &Context<'_>) {
        if !self.shared.task.will_wake(cx.waker()) {
            *self = Self::bound_to(cx.waker().clone());
            return;
        }
        // A plain load first: on most polls nothing else woke.
        if self.shared.due.load(Ordering::Relaxed) != 0 {
            self.due |= self.shared.due.swap(0, Ordering::Acquire);
        }
    }

    /// Whether source `i` is due; clears it. The caller then polls it.
    pub fn take(&mut self, i: usize) -> bool {
        let bit = 1 << i;
        let due = self.due & bit != 0;
        self.due &= !bit;
        due
    }

    /// Makes source `i` due without a wake-up.
    pub fn mark(&mut self, i: usize) {
        self.due |= 1 << i;
    }

    /// The context to poll source `i` with.
    pub fn context(&self, i: usize) -> Context<'_> {
        Context::from_waker(&self.wakers[i])
    }
}

impl<const N: usize> Default for Wakeups<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn task() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    /// Wakeups bound to `waker`'s task, whose sources were all polled once:
    /// none due.
    fn settled<const N: usize>(waker: &Waker) -> Wakeups<N> {
        let mut w = Wakeups::<N>::new();
        w.register(&Context::from_waker(waker));
        (0..N).for_each(|i| assert!(w.take(i)));
        w
    }

    #[test]
    fn every_source_starts_due_once() {
        let (_, waker) = task();
        let mut w = Wakeups::<3>::new();
        w.register(&Context::from_waker(&waker));
        assert!((0..3).all(|i| w.take(i)));
        assert!((0..3).all(|i| !w.take(i)));
    }

    #[test]
    fn a_wake_makes_only_its_source_due_and_wakes_the_task() {
        let (count, waker) = task();
        let mut w = settled::<3>(&waker);
        w.context(1).waker().wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // Seen at the task's next poll, not before.
        assert!(!w.take(1));
        w.register(&Context::from_waker(&waker));
        assert!(!w.take(0));
        assert!(w.take(1));
        assert!(!w.take(1));
        assert!(!w.take(2));
        // A clone held by a driver (as the event loop's reactor holds it) wakes
        // the same source.
        let held = w.context(2).waker().clone();
        held.wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        w.register(&Context::from_waker(&waker));
        assert!(w.take(2));
    }

    #[test]
    fn wakes_between_polls_are_all_taken_at_the_next() {
        let (count, waker) = task();
        let mut w = settled::<4>(&waker);
        w.context(3).waker().wake_by_ref();
        w.context(0).waker().wake_by_ref();
        w.context(3).waker().wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
        w.register(&Context::from_waker(&waker));
        assert_eq!(
            (0..4).map(|i| w.take(i)).collect::<Vec<_>>(),
            [true, false, false, true]
        );
        // Nothing woke since: the next poll has nothing due.
        w.register(&Context::from_waker(&waker));
        assert!((0..4).all(|i| !w.take(i)));
    }

    #[test]
    fn mark_makes_a_source_due_without_waking() {
        let (count, waker) = task();
        let mut w = settled::<2>(&waker);
        w.mark(1);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        w.register(&Context::from_waker(&waker));
        assert!(!w.take(0));
        assert!(w.take(1));
    }

    #[test]
    fn another_tasks_waker_rebinds_every_source_and_makes_it_due() {
        let (first, first_waker) = task();
        let mut w = settled::<2>(&first_waker);
        let old = w.context(0).waker().clone();
        let (second, second_waker) = task();
        w.register(&Context::from_waker(&second_waker));
        assert!(w.take(0) && w.take(1), "polled again with the new wakers");
        // The new wakers wake the new task.
        w.context(1).waker().wake_by_ref();
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        w.register(&Context::from_waker(&second_waker));
        assert!(!w.take(0) && w.take(1));
        // One still registered somewhere wakes the old task, spuriously,
        // and makes nothing due here: the source was polled again anyway.
        old.wake();
        assert_eq!(first.0.load(Ordering::SeqCst), 1);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
        w.register(&Context::from_waker(&second_waker));
        assert!(!w.take(0) && !w.take(1));
    }

    #[test]
    fn wakers_outlive_the_wakeups_and_hold_their_allocation_until_dropped() {
        let (count, waker) = task();
        let w = settled::<8>(&waker);
        let shared = Arc::downgrade(&w.shared);
        // Clones as drivers hold them; the last source's index is 7, the
        // largest the pointer's low bits carry.
        let held: Vec<Waker> = (0..8).map(|i| w.context(i).waker().clone()).collect();
        drop(w);
        assert!(shared.upgrade().is_some());
        held[7].wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        let due = shared.upgrade().unwrap().due.load(Ordering::SeqCst);
        assert_eq!(due, 1 << 7);
        drop(held);
        assert!(shared.upgrade().is_none(), "the last waker frees it");
    }

    #[test]
    fn a_sources_waker_is_stable_so_drivers_need_not_clone_it_again() {
        let w = Wakeups::<2>::new();
        assert!(w.context(0).waker().will_wake(w.context(0).waker()));
        assert!(!w.context(0).waker().will_wake(w.context(1).waker()));
    }
}
