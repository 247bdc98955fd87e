//! Test-only reentry hooks: the "signal that lands in the worst place, on purpose".
//!
//! With the `test-hooks` feature, the allocator calls [`point`] at named places of its fast and slow paths,
//! including places where it holds a per-thread cache's busy flag or a slab's take right. A test installs a hook
//! with `set_hook` that runs a nested allocation and free right there, exactly as a signal handler arriving at
//! that instruction would. Without the feature, [`point`] is an empty inline function and costs nothing.
//!
//! The hook runs at most once per nesting level: while it runs, nested calls to [`point`] on the same thread do
//! not call it again (the nesting guard is a thread-local depth counter that goes up and comes back down, the
//! third safe pattern of DESIGN.md section 4).

/// Named places in the allocator where a nested call can be injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Point {
    /// Fast allocation path, busy flag held, before popping the per-thread list.
    AllocFast,
    /// Refill, busy flag held, after taking a slab's free objects and before handing them to the list.
    AllocRefill,
    /// Shared path, holding the take right of a slab popped off the partial list.
    AllocShared,
    /// A new slab's pages are allocated but its objects are not linked yet.
    SlabNew,
    /// Fast free path, busy flag held, before pushing onto the per-thread list.
    FreeFast,
    /// Flushing the per-thread list back to slabs, busy flag held.
    FreeFlush,
    /// Draining the deferred list, busy flag held.
    DeferredDrain,
    /// Page allocator, before searching the bitmap.
    PageAlloc,
    /// Page allocator, before clearing bitmap bits.
    PageFree,
    /// Grace-period machinery and RCU readers (used by the reclamation layer).
    Rcu,
    /// Claiming a per-thread slot (`thread`), before it is published in the thread-local word.
    ThreadClaim,
    /// An RCU reader on a thread without a slot, between choosing its phase and counting itself in it.
    RcuOverflowEnter,
    /// Taking a `kfree_rcu` pointer block from another thread's slot (barrier, aging, cache destroy), after the
    /// slot is claimed and quiescent, before the block is taken.
    KfreeSteal,
    /// `kfree_rcu_nolock` and friends, holding the thread's pointer-block slot with a block in it, before the
    /// pointer is written into the block.
    KfreeAppend,
    /// A thread's exit destructor, before it takes its `kfree_rcu` pointer blocks.
    KfreeExit,
    /// A barrier, after the grace period of the `kfree_rcu` blocks queued before it, before it frees them.
    KfreeBarrier,
    /// Shrinking a cache (trim, the worker, an out-of-pages reclaim, destroy), holding a slab taken off the
    /// cache's partial list, before deciding whether to release it.
    Shrink,
    /// Page allocator committing more of the arena: after its system calls, before the committed mark moves.
    PageCommit,
    /// The slab layer's first call building its state: tables mapped and kmalloc caches created, before the
    /// CAS that publishes them.
    SlabStateBuild,
}

#[cfg(feature = "test-hooks")]
mod imp {
    use super::Point;
    use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

    static HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

    thread_local! {
        static DEPTH: AtomicU32 = const { AtomicU32::new(0) };
    }

    /// Install (or with `None`, remove) the hook called at every [`Point`].
    ///
    /// # Context
    /// Normal context (tests): one atomic store.
    pub fn set_hook(hook: Option<fn(Point)>) {
        let p = hook.map_or(core::ptr::null_mut(), |f| f as *mut ());
        // Release: pairs with the Acquire load in `point`.
        HOOK.store(p, Ordering::Release);
    }

    /// Call the installed hook, unless this thread is already inside it.
    ///
    /// # Context
    /// Any context: calls the installed hook, which decides its own rules.
    #[inline(never)]
    pub fn point(at: Point) {
        let p = HOOK.load(Ordering::Acquire);
        if p.is_null() {
            return;
        }
        // SAFETY: `p` was stored by `set_hook` from a `fn(Point)`.
        let f: fn(Point) = unsafe { core::mem::transmute::<*mut (), fn(Point)>(p) };
        DEPTH.with(|d| {
            // An atomic RMW, so a signal handler that nests here cannot lose our increment.
            if d.fetch_add(1, Ordering::Relaxed) == 0 {
                f(at);
            }
            d.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

#[cfg(feature = "test-hooks")]
pub use imp::{point, set_hook};

/// Without the `test-hooks` feature: does nothing.
///
/// # Context
/// Any context: calls the installed hook, which decides its own rules.
#[cfg(not(feature = "test-hooks"))]
#[inline(always)]
pub fn point(_at: Point) {}
