//! `LocalTryLock`: the userspace `local_trylock_t`, a per-thread "busy" flag that signal handlers respect, plus
//! a claim protocol that lets another thread take over the protected state.
//!
//! **Owner side.** The thread that owns the protected state (a per-thread object list, a pointer block) calls
//! [`try_lock`](LocalTryLock::try_lock) before its first read of that state and
//! [`unlock`](LocalTryLock::unlock) after its last write. Both are plain byte stores and loads ordered by
//! compiler fences: a signal handler runs between two instructions of the same thread, so program order is all
//! it can observe. A handler (or any nested context) that finds the flag set gets [`TryLock::Busy`] and must
//! keep off the state — the caller then takes another route (next size class, deferred list, shared path).
//!
//! **Claim side.** Another thread that must take the state over (cache destroy, draining a pointer block)
//! calls [`claim`](LocalTryLock::claim) on every lock it wants, then one `heavy_barrier()` (membarrier), then
//! [`wait_unlocked`](LocalTryLock::wait_unlocked) on each. This is an asymmetric Dekker pair:
//!
//! ```text
//! owner:    busy = 1; compiler fence; r1 = claimed      claimer:  claimed = 1; membarrier(); r2 = busy
//! ```
//!
//! membarrier makes the owner's thread execute a full fence somewhere inside the call, so `r1 == 0 && r2 == 0`
//! is impossible: either the owner sees the claim (and gets [`TryLock::Claimed`], backing off as for busy), or
//! the claimer sees `busy` and waits for the owner's bounded critical section to end. After that the claimer
//! has the state to itself until it calls [`unclaim`](LocalTryLock::unclaim).

use super::atomic::{AtomicU8, Ordering};
use super::signal_fence;

/// The flag pair. Zeroed memory is unlocked and unclaimed.
#[derive(Debug, Default)]
#[repr(C)]
pub struct LocalTryLock {
    busy: AtomicU8,
    claimed: AtomicU8,
}

/// Outcome of [`LocalTryLock::try_lock`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryLock {
    /// The caller holds the lock.
    Locked,
    /// A context on this thread that we interrupted holds it.
    Busy,
    /// Another thread has claimed the state.
    Claimed,
}

impl LocalTryLock {
    super::loom_const_fn! {
        /// An unlocked, unclaimed flag pair.
        pub fn new() -> Self {
            Self { busy: AtomicU8::new(0), claimed: AtomicU8::new(0) }
        }
    }

    /// Owner: take the lock if no nested-over context holds it and nobody claimed the state.
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, never blocks.
    #[inline(always)]
    pub fn try_lock(&self) -> TryLock {
        if self.busy.load(Ordering::Relaxed) != 0 {
            return TryLock::Busy;
        }
        self.busy.store(1, Ordering::Relaxed);
        signal_fence();
        // Pairs with the claimer's `claimed` store + heavy barrier (see the module documentation).
        if self.claimed.load(Ordering::Relaxed) != 0 {
            self.busy.store(0, Ordering::Release);
            return TryLock::Claimed;
        }
        TryLock::Locked
    }

    /// Owner: release the lock.
    ///
    /// # Context
    /// The owning thread, after a successful `try_lock`: async-signal-safe.
    #[inline(always)]
    pub fn unlock(&self) {
        signal_fence();
        // Release: pairs with the claimer's Acquire loads in `wait_unlocked`/`is_locked`, so a claimer that saw
        // the owner inside its section and then sees it out also sees everything written inside (a plain `mov`
        // on x86-64, like a relaxed store).
        self.busy.store(0, Ordering::Release);
        signal_fence();
    }

    /// Whether some context holds the lock right now.
    #[inline]
    pub fn is_locked(&self) -> bool {
        self.busy.load(Ordering::Acquire) != 0
    }

    /// Claimer: mark the state as claimed. Follow with one `heavy_barrier()` for all claims, then
    /// [`wait_unlocked`](Self::wait_unlocked).
    ///
    /// # Context
    /// Any thread; never blocks. Must be followed by a heavy barrier before `wait_unlocked`.
    pub fn claim(&self) {
        self.claimed.store(1, Ordering::Relaxed);
    }

    /// Claimer, exclusive: mark the state as claimed unless another claimer holds it (a CAS). Follow with one
    /// `heavy_barrier()` for all claims, then [`wait_unlocked`](Self::wait_unlocked), then
    /// [`unclaim`](Self::unclaim). Claimers that use only this never hold the state at the same time.
    ///
    /// # Context
    /// Any thread; never blocks.
    pub fn try_claim(&self) -> bool {
        // Acquire: pairs with the Release store in `unclaim`: the previous claimer's work on the state is
        // visible to us.
        self.claimed.compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok()
    }

    /// Claimer: wait (yielding) until the owner's critical section is over. Returns false if it did not end
    /// within `patience` yields **and** one second (the owner left its section without unlocking, e.g. by
    /// `longjmp` out of a signal handler): the state must then be left alone. The time floor matters on a
    /// loaded machine, where a live owner preempted inside its few-instruction section can outlast any count
    /// of yields.
    ///
    /// # Context
    /// Normal context: yields (blocks for at most `patience` yields or one second, whichever is longer).
    pub fn wait_unlocked(&self, mut patience: u32) -> bool {
        #[cfg(not(loom))]
        let start = std::time::Instant::now();
        // Acquire: pairs with the Release store in `unlock`.
        while self.busy.load(Ordering::Acquire) != 0 {
            if patience == 0 {
                #[cfg(not(loom))]
                if start.elapsed() < std::time::Duration::from_secs(1) {
                    super::thread::yield_now();
                    continue;
                }
                return false;
            }
            patience -= 1;
            super::thread::yield_now();
        }
        true
    }

    /// Claimer: give the state back to its owner.
    ///
    /// # Context
    /// The claiming thread; never blocks.
    pub fn unclaim(&self) {
        self.claimed.store(0, Ordering::Release);
    }

    /// Claimer or creator: force both flags clear (the state is being reset for a new user).
    ///
    /// # Context
    /// Only while nobody else can use the lock (a slot being set up); never blocks.
    pub fn reset(&self) {
        self.busy.store(0, Ordering::Release);
        self.claimed.store(0, Ordering::Release);
    }
}
