//! # nolock: allocate and retire memory from any context
//!
//! `nolock` lets userspace code allocate and free memory where `malloc` cannot go: inside a signal handler that
//! interrupted the allocator itself, on a real-time thread that must never block, or while holding arbitrary
//! locks. It re-creates in userspace the Linux kernel's answer to the same problem — `alloc_pages_nolock`,
//! `kmalloc_nolock` / `kfree_nolock` and `KmemCache` — over a reserved virtual-memory arena, with per-thread
//! caches guarded by reentrancy flags instead of locks.
//!
//! ```
//! use nolock::{Gfp, kfree_nolock, kmalloc_nolock, ksize};
//!
//! // Safe to run inside a signal handler, even one that interrupted this very call on the same thread.
//! let p = kmalloc_nolock(120, Gfp::ZERO).expect("None only means: out of memory");
//! assert_eq!(ksize(p.as_ptr()), 128); // the kmalloc-128 class
//! // SAFETY: p came from kmalloc_nolock and is not used afterwards.
//! unsafe { kfree_nolock(p.as_ptr()) };
//!
//! // Or without raw pointers:
//! let b = nolock::NBox::try_new([0u8; 64]).expect("out of memory");
//! drop(b);
//! ```
//!
//! ## The "nolock" contract
//!
//! Every `*_nolock` function (and `NBox`'s constructors and drop):
//! 1. never blocks, never spins on a lock, never waits for another thread, never calls `malloc`;
//! 2. may be called from any context, including a signal handler that interrupted any instruction of this
//!    library on the same thread;
//! 3. fails (`None`) only when memory is exhausted, never because something was busy;
//! 4. frees never fail and never lose an object: a free that cannot be done now is deferred;
//! 5. a thread's very first call may be in a signal handler.
//!
//! ## Context rules: the default and the exceptions
//!
//! **Unless its documentation has a `# Context` section, a public function may be called from any context**:
//! any thread, a signal handler that interrupted any instruction of this library on the same thread, a thread
//! holding arbitrary locks. It is async-signal-safe and reentrant, never blocks, takes no lock, does not
//! allocate through the global allocator and makes no system call (it is a computation, a load, or lock-free
//! atomic operations).
//!
//! A function that departs from that in any way has a `# Context` section that says how: normal context only
//! (`synchronize_*`, barriers, cache creation and destroy, `init`, `trim`, `prefault`), may block or sleep,
//! makes system calls (and which), may be called only by the owning thread (the per-thread counters and
//! busy flags in `sync`), or is reentrant only under conditions.
//!
//! Limits worth knowing: per-thread state lives in `const`-initialised thread-locals, which need no allocation
//! when nolock is linked into the executable (the usual case); built into a `cdylib` that is `dlopen`ed, the
//! first touch of a thread-local on each thread may go through the dynamic loader, which can allocate. At most
//! [`MAX_SHARDS`] threads have per-thread caches at once; further threads use the (slower, still lock-free)
//! shared path. A signal handler that leaves the library by `longjmp` leaves its busy flag set: that thread's
//! list for that cache is then bypassed (and leaked at destroy), never corrupted.
//!
//! ## Layers
//!
//! Bottom up; each imports only what is below it (docs/DESIGN.md section 5 draws it):
//!
//! - [`sync`] (hidden: internal), `sys`, `hooks`: the lock-free building blocks (llist, tagged stack, slab
//!   free-list word, RCU and SRCU counting cores; loom-checked), the system calls, the test reentry points.
//! - [`thread`]: per-thread slots (the userspace "CPU number"), claimed from a static table on a thread's first
//!   call; each layer keeps its per-thread state in its own table indexed by slot.
//! - [`page`]: the arena and `alloc_pages_nolock` — lock-free bitmap allocation, page descriptors, returning
//!   memory to the OS off the nolock path; [`Config`] and the arena's process-wide state.
//! - [`rcu`]: RCU, SRCU-fast, Tasks Trace, `call_rcu_nolock`, grace-period cookies ([`GracePeriod`]), the
//!   grace-period worker.
//! - [`slab`]: `KmemCache`, kmalloc size classes, per-thread caches, `kmalloc_nolock` / `kfree_nolock`,
//!   `kfree_rcu_nolock` (its pointer blocks are slab objects), and its [`debug`] checks: red zones, poison,
//!   double-free and bad-pointer reports, fault injection, hardened free lists, and [`memcg`]: accounting
//!   groups (the memory cgroup's kmem accounting) that charged allocations and caches are charged to.
//! - Typed owners over the layers: [`NBox`], [`RcuPtr`] (in [`rcu_ptr`]), [`NolockAlloc`] (a `GlobalAlloc`);
//!   [`stats`].
//! - The background worker (shrink, purge) and the composition root that wires the layers together (process
//!   hooks, fork, [`trim`]).
//!
//! Start with [`init`] from `main` to get the background worker that gives free memory back to the OS, or call
//! [`trim`] yourself.

#![warn(missing_docs)]

#[doc(hidden)]
pub mod sync;

#[cfg(not(loom))]
mod alloc;
#[cfg(all(not(loom), feature = "allocator-api2"))]
pub mod allocator_api;
#[cfg(not(loom))]
mod background;
#[cfg(not(loom))]
mod boxed;
#[cfg(not(loom))]
mod global;
#[cfg(all(not(loom), feature = "test-hooks"))]
pub mod hooks;
#[cfg(all(not(loom), not(feature = "test-hooks")))]
mod hooks;
#[cfg(not(loom))]
pub mod hybrid;
#[cfg(not(loom))]
pub use slab::memcg;
#[cfg(not(loom))]
pub mod page;
#[cfg(not(loom))]
mod pages;
#[cfg(not(loom))]
mod process;
pub mod queue;
#[cfg(not(loom))]
pub mod rcu;
#[cfg(not(loom))]
pub mod rcu_ptr;
#[cfg(not(loom))]
mod report;
#[cfg(not(loom))]
pub mod slab;
#[cfg(not(loom))]
pub mod stats;
#[cfg(not(loom))]
mod sys;
#[cfg(not(loom))]
pub mod thread;
#[cfg(not(loom))]
pub mod typed;

#[cfg(not(loom))]
pub use alloc::NolockAlloc;
#[cfg(all(not(loom), feature = "allocator-api2"))]
pub use allocator_api::Kmalloc;
#[cfg(not(loom))]
pub use boxed::NBox;
#[cfg(not(loom))]
pub use global::{Config, ConfigError, DEFAULT_ARENA_SIZE};
#[cfg(not(loom))]
pub use hybrid::HybridAlloc;
#[cfg(not(loom))]
pub use page::{Gfp, PagesError, PrefaultError};
#[cfg(not(loom))]
pub use pages::{MAX_ORDER, alloc_pages_nolock, free_pages_nolock, prefault, try_free_pages_nolock};
#[cfg(not(loom))]
pub use rcu_ptr::RcuPtr;
#[cfg(not(loom))]
pub use slab::cache::{CacheError, CacheName, CacheStats, DestroyReport, MAX_CACHES};
#[cfg(not(loom))]
pub use slab::debug;
#[cfg(not(loom))]
pub use slab::debug::{FaultInjection, FreeError, FreeErrorKind};
#[cfg(not(loom))]
pub use typed::{CacheBox, TypedCache};

/// Maximum number of threads with their own per-thread caches at once: the thread slots
/// ([`thread::MAX_THREADS`]). Further threads use the (slower, still lock-free) shared path.
#[cfg(not(loom))]
pub const MAX_SHARDS: usize = thread::MAX_THREADS;
#[cfg(not(loom))]
pub use slab::kmalloc::{
    KMALLOC_MAX_CACHE_SIZE, KMALLOC_SIZES, ZERO_SIZE_LIMIT, ZERO_SIZE_PTR, kfree_nolock, kmalloc_layout_nolock,
    kmalloc_nolock, ksize, try_kfree_nolock,
};
#[cfg(not(loom))]
pub use slab::{KmemCache, KmemCacheBuilder, SlabFlags, kmem_cache_alloc_nolock, kmem_cache_free_nolock};

#[cfg(not(loom))]
pub use rcu::classic::{
    GpStats, RcuCookie, RcuReadGuard, call_rcu, call_rcu_nolock, cond_synchronize_rcu, get_state_synchronize_rcu,
    poll_state_synchronize_rcu, rcu_barrier, rcu_read_lock, rcu_read_lock_held, rcu_stats, start_poll_synchronize_rcu,
    synchronize_rcu,
};
#[cfg(not(loom))]
pub use rcu::srcu::{SrcuFast, SrcuFastGuard, call_srcu_fast_nolock};
#[cfg(not(loom))]
pub use rcu::tasks_trace::{
    RCU_TASKS_TRACE, call_rcu_tasks_trace, rcu_barrier_tasks_trace, rcu_read_lock_tasks_trace,
    rcu_trace_implies_rcu_gp, synchronize_rcu_tasks_trace,
};
#[cfg(not(loom))]
pub use rcu::{GracePeriod, RcuCallback, RcuHead};
#[cfg(not(loom))]
pub use slab::kfree_rcu::{kfree_rcu_nolock, kfree_srcu_fast_nolock};

/// Set up nolock from a normal context: map the arena, register the thread-exit and fork hooks, register the
/// membarrier, and start the background worker (unless disabled by [`Config::background`] or
/// `NOLOCK_BACKGROUND=0`). Calling it is optional — everything also works without it — but without the worker,
/// free memory returns to the OS only when you call [`trim`].
///
/// # Context
/// Normal context only: may spawn a thread. Idempotent.
#[cfg(not(loom))]
pub fn init() {
    let _ = global::get();
    process::init_normal_context();
    rcu::gp_worker::ensure_started();
}

/// What [`trim`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
#[cfg(not(loom))]
pub struct TrimReport {
    /// Empty slabs released to the page allocator.
    pub slabs_released: usize,
    /// Pages given back to the OS.
    pub pages_purged: usize,
}

/// Give memory back now: return this thread's cached free objects to their slabs, release every entirely free
/// slab of every cache, and `madvise` every free page back to the OS.
///
/// # Context
/// Normal context only: makes `madvise` system calls. Runs concurrently with allocations on other threads.
#[cfg(not(loom))]
pub fn trim() -> TrimReport {
    process::trim()
}

/// Passes the background worker has completed in this process (each shrinks caches, purges pages that stayed
/// free for an interval unless the purge is off, and commits memory ahead of need).
#[cfg(not(loom))]
pub fn worker_passes() -> u64 {
    background::passes()
}

/// Whether the background worker is running in this process.
#[cfg(not(loom))]
pub fn worker_running() -> bool {
    background::is_running()
}
