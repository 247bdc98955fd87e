//! Synchronisation building blocks: the atomics facade and the lock-free structures everything else is made of.
//!
//! **Internal**: public (and hidden from the documentation) only so that the loom models and tests can run
//! this exact code; it is not part of the API and may change in any release.
//!
//! Every structure here is lock-free and *reentrant*: a signal handler that interrupts any of its operations on
//! the same thread may run any operation on the same structure, because each operation changes shared state with
//! one atomic instruction at its linearisation point and holds nothing in between that another caller waits for.
//!
//! - [`llist`]: the kernel's `llist`, a multi-producer stack with push by CAS and take-all by swap (ABA-free
//!   because nothing pops single nodes). Used for deferred frees.
//! - [`tagged`]: a Treiber stack of 32-bit indices whose head carries a 32-bit tag in the same 64-bit word, so
//!   single pops are ABA-safe with a plain 64-bit CAS. Used for lists of slabs and of free shards.
//! - [`local_counter`]: a per-thread counter whose increments are single instructions, so a signal handler on
//!   the same thread cannot lose them (SRCU lock/unlock counts, queue counts).
//! - [`local_lock`]: the per-thread busy flag that signal handlers respect (`local_trylock_t`), with a claim
//!   protocol for other threads.
//! - [`page_bitmap`]: the summary-bit protocol of the page allocator's bitmap.
//! - [`rcu_core`], [`srcu_core`]: the reader words/counters and grace-period scans of RCU and SRCU-fast.
//! - [`slab_freelist`]: the state word of one slab: free-object list head (as an index), in-use count and flags,
//!   changed together by one 64-bit CAS. This replaces SLUB's `cmpxchg_double` on (freelist, counters).
//!
//! Under `--cfg loom` only this module is compiled, with loom's atomics, so the loom models in `tests/loom.rs`
//! exercise exactly the code the allocator runs.

/// Define a constructor that is a `const fn` normally and a plain `fn` under `--cfg loom` (loom's atomics
/// cannot be built in a constant): one body for both, instead of a `#[cfg(loom)]` twin.
macro_rules! loom_const_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[cfg(not(loom))]
        $vis const fn $name($($arg: $ty),*) -> $ret $body

        $(#[$m])*
        #[cfg(loom)]
        $vis fn $name($($arg: $ty),*) -> $ret $body
    };
}
pub(crate) use loom_const_fn;

pub mod thread {
    //! `std::thread::yield_now`, or loom's (a scheduling point of the model) under `--cfg loom`.
    #[cfg(not(loom))]
    pub use std::thread::yield_now;

    #[cfg(loom)]
    pub use loom::thread::yield_now;
}

pub mod atomic {
    //! `core::sync::atomic`, or loom's checked atomics under `--cfg loom`.
    #[cfg(not(loom))]
    pub use core::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
    #[cfg(loom)]
    pub use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
}

pub mod llist;
pub mod local_counter;
pub mod local_lock;
pub mod page_bitmap;
pub mod rcu_core;
pub mod rcu_head;
pub mod slab_freelist;
pub mod srcu_core;
pub mod tagged;

/// Order this thread's memory accesses against a signal handler that interrupts it (the C `atomic_signal_fence`).
/// Costs nothing at run time: it only stops the compiler from moving accesses across it.
#[inline(always)]
pub fn signal_fence() {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
}
