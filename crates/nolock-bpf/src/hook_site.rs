//! Test-only hook points: "a signal that lands in the worst place, on purpose", one mechanism for every
//! module of this crate that has named points (`memalloc`, `htab`, `task_storage`).
//!
//! [`hook_points!`] gives a module, for its own enum of points, a `set_hook(Option<fn(Point)>)` (with the
//! crate's `test-hooks` feature) and an always-inlined point function that calls the installed hook (an empty
//! function without the feature, and under loom). A test's hook raises a signal or calls the structure
//! directly, so a nested operation runs exactly at that point. The hook runs at most once per nesting level:
//! while it runs, nested points on the same thread do not call it again (a thread-local depth that goes up
//! and comes back down, restored before the hook returns, so a handler that interrupts it sees it balanced).

/// Define `set_hook` and the point function `$point_fn` for the enum `$point` of the invoking module.
macro_rules! hook_points {
    ($point:ident, $point_fn:ident) => {
        #[cfg(all(feature = "test-hooks", not(loom)))]
        mod hook_imp {
            use core::cell::Cell;
            use core::sync::atomic::{AtomicPtr, Ordering};

            static HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());
            thread_local! {
                static DEPTH: Cell<u32> = const { Cell::new(0) };
            }

            /// Install (or with `None` remove) the hook called at every point of this module (tests only).
            ///
            /// # Context
            /// Normal context (tests): one atomic store. The hook runs wherever the code reaches a point.
            pub fn set_hook(hook: Option<fn(super::$point)>) {
                // Release: pairs with the Acquire load in `point`, so the hook's own statics are set up before
                // it runs.
                HOOK.store(hook.map_or(core::ptr::null_mut(), |f| f as *mut ()), Ordering::Release);
            }

            #[inline(never)]
            pub(super) fn point(at: super::$point) {
                // Acquire: pairs with the Release store in `set_hook`.
                let p = HOOK.load(Ordering::Acquire);
                if p.is_null() {
                    return;
                }
                let nested = DEPTH.with(|d| {
                    let v = d.get();
                    d.set(v + 1);
                    v != 0
                });
                if !nested {
                    // SAFETY: only `set_hook` stores here, and it stores a `fn(Point)`.
                    let f: fn(super::$point) = unsafe { core::mem::transmute::<*mut (), fn(super::$point)>(p) };
                    f(at);
                }
                DEPTH.with(|d| d.set(d.get() - 1));
            }
        }

        #[cfg(all(feature = "test-hooks", not(loom)))]
        pub use hook_imp::set_hook;

        /// A named point: calls the installed hook (feature `test-hooks`), else nothing.
        #[inline(always)]
        pub(crate) fn $point_fn(_at: $point) {
            #[cfg(all(feature = "test-hooks", not(loom)))]
            hook_imp::point(_at);
        }
    };
}
