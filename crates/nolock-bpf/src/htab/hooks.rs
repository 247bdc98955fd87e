//! Test-only hook points inside map operations: "a signal that lands in the worst place, on purpose".
//!
//! With the crate's `test-hooks` feature, writers call [`point`] at the named places below; a test installs a
//! hook with [`set_hook`] that raises a signal (or calls the map directly), so a nested operation runs exactly
//! there, the way a signal handler arriving at that instruction would. Without the feature [`point`] is an
//! empty inline function.
//!
//! The hook runs at most once per nesting level: while it runs, nested [`point`] calls on the same thread do
//! not call it again (a thread-local depth that goes up and comes back down).

/// Named places inside a map operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Point {
    /// A writer holds its bucket lock (locked modes) or has entered its section (lock-free mode).
    Locked,
    /// A writer's walk found its position, before it inserts or claims.
    AfterSeek,
    /// A new element is initialised and linked into nothing yet, before the head CAS.
    BeforeInsert,
    /// A remover won its claim, before it completes the removal.
    AfterClaim,
    /// A completion froze the element, before it swings the predecessor's link.
    AfterFreeze,
    /// An element was unlinked, before it is retired.
    BeforeRetire,
}

#[cfg(all(feature = "test-hooks", not(loom)))]
mod imp {
    use super::Point;
    use core::cell::Cell;
    use core::sync::atomic::{AtomicPtr, Ordering};

    static HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

    thread_local! {
        static DEPTH: Cell<u32> = const { Cell::new(0) };
    }

    /// Install (or with `None` remove) the hook.
    pub fn set_hook(f: Option<fn(Point)>) {
        let p = f.map_or(core::ptr::null_mut(), |f| f as *mut ());
        // Release: pairs with the Acquire load in `point`, so the hook's own statics are set up before it runs.
        HOOK.store(p, Ordering::Release);
    }

    /// Call the hook at `p`, unless a hook already runs on this thread.
    #[inline]
    pub fn point(p: Point) {
        // Acquire: pairs with the Release store in `set_hook`.
        let h = HOOK.load(Ordering::Acquire);
        if h.is_null() {
            return;
        }
        let busy = DEPTH.with(|d| {
            let v = d.get();
            d.set(v + 1);
            v != 0
        });
        if !busy {
            // SAFETY: `h` was stored from a `fn(Point)` by `set_hook`.
            let f: fn(Point) = unsafe { core::mem::transmute::<*mut (), fn(Point)>(h) };
            f(p);
        }
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

#[cfg(not(all(feature = "test-hooks", not(loom))))]
mod imp {
    use super::Point;

    /// Without the `test-hooks` feature: does nothing.
    #[inline(always)]
    pub fn point(_: Point) {}
}

pub use imp::point;
#[cfg(all(feature = "test-hooks", not(loom)))]
pub use imp::set_hook;
