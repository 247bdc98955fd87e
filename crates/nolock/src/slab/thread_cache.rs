//! Per-thread caches of free objects (the userspace `kmem_cache_cpu`), one table entry per thread slot.
//!
//! # What this file owns
//!
//! The slab layer's per-thread table: for every thread slot of `crate::thread`, a [`ThreadCaches`] entry that
//! holds one [`ThreadCache`] per cache id: a LIFO list of free objects linked through their link words, its
//! length, a deferred-free list and counters. The table lives in the slab layer's mapping (`tables`), indexed
//! by slot; this file also holds what the slab layer does when a slot's thread goes away ([`SLOT_HOOKS`],
//! registered with `crate::thread` by the composition root), and the take-over of one cache's lists in every
//! thread (cache destroy).
//!
//! # Who may touch a list
//!
//! The owner thread edits its lists with plain (relaxed) loads and stores, so the fast paths (`alloc`, `free`)
//! cost a few instructions. A list is guarded against signal handlers on the same thread by its `busy` byte
//! (the `local_trylock_t` "acquired" flag): the owner sets it before its first read of the list and clears it
//! after its last write, with compiler fences around, and a nested context that finds it set keeps off (next
//! size class, deferred free, or the shared path). Counters that a nested context also changes are atomic
//! RMWs on the cache instead.
//!
//! Another thread may need to take over a list (cache destroy). It sets the `claimed` byte, calls
//! `heavy_barrier()` (membarrier), then waits for `busy` to be clear: the owner checks `claimed` after setting
//! `busy`, with only a compiler fence between, and the barrier makes the pair an asymmetric Dekker: either the
//! owner sees the claim and backs off, or the claimer sees `busy` and waits for the bounded operation to end.
//!
//! # Life cycle (the slot's, see `crate::thread`)
//!
//! - **first call**: the thread claims its slot (possibly in a signal handler); its entry here is zeroed or as
//!   the slot's previous owner left it: every list empty and unlocked. Nothing is claimed here.
//! - **exit** ([`SLOT_HOOKS`]`.exit`, on the exiting thread, after it stopped counting as having a slot):
//!   every cached object goes back to its slab and the `kfree_rcu` pointer blocks are queued. Each list is
//!   drained under its lock like any owner operation: a cache destroy may be claiming the same lists at that
//!   moment (exit destructors still run after `std::thread::scope` returns), and a claimed list is left to the
//!   destroy. A list whose busy flag is still set (a signal handler left the allocator by `longjmp`) keeps the
//!   slot out of circulation until its thread is gone.
//! - **orphans and fork** ([`SLOT_HOOKS`]`.reset`, called by the orphan sweep and the fork child for a slot
//!   whose thread no longer exists): drained the same way; a busy flag that the dead thread left set is cleared
//!   as its own unlock would have, and the list it guarded, possibly left mid-edit, is leaked, never walked.
//!
//! A thread without a slot (more than `MAX_THREADS` at once, or past its exit destructor) works on the shared
//! path: slower, never failing.

use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::cache::MAX_CACHES;
use super::tables::{self, SlabState};
use crate::sync::llist::Llist;
use crate::sync::local_lock::{LocalTryLock, TryLock};

/// Yields a claimer waits for an owner's critical section to end before declaring it stuck.
const CLAIM_PATIENCE: u32 = 100_000;

/// One thread's list of free objects of one cache (the kernel's `kmem_cache_cpu`, per thread). See the module
/// documentation for who touches what.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub struct ThreadCache {
    /// Held by the owner around every edit of `freelist`/`count`/counters; claimed by a thread taking over.
    pub lock: LocalTryLock,
    /// Objects on `freelist`.
    pub count: AtomicU32,
    /// First free object (0: empty); the rest follow through link words.
    pub freelist: AtomicUsize,
    /// Frees that arrived while `busy` was set; drained by the owner when it clears `busy`.
    pub deferred: Llist,
    /// Allocations served from `freelist` (busy-guarded).
    pub alloc_fast: AtomicU64,
    /// Allocations that refilled `freelist` from a slab (busy-guarded).
    pub alloc_refill: AtomicU64,
    /// Frees pushed on `freelist` (busy-guarded).
    pub free_fast: AtomicU64,
    /// Times `freelist` was flushed back to slabs (busy-guarded).
    pub flushes: AtomicU64,
    /// The cache's `high` mark, copied here by the first full-path free so that the free fast path never
    /// touches the cache itself; 0 until then (which sends every free down the full path). Owner-written,
    /// busy-guarded; zeroed by `reset_all` when the cache id is reused.
    pub high: AtomicU32,
    /// The cache's link offset, copied with `high` (meaningful only once `high != 0`).
    pub link_off: AtomicU32,
}

const _: () = assert!(core::mem::size_of::<ThreadCache>() == 64, "one cache line per list");

/// Increment a counter that only the busy-flag holder writes (a plain load and store, no lock prefix).
#[inline(always)]
pub fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// One thread's lists: its [`ThreadCache`] of every cache id. Zeroed memory is a valid entry (every list empty,
/// unlocked, unclaimed).
#[repr(C, align(64))]
pub struct ThreadCaches {
    lists: [ThreadCache; MAX_CACHES],
}

const _: () = assert!(MAX_CACHES == 256, "ThreadCaches::list indexes with a u8");
const _: () = assert!(core::mem::size_of::<ThreadCaches>() == 16 << 10, "a power of two: the table index is a shift");

impl ThreadCaches {
    /// The list of cache `id`.
    #[inline(always)]
    pub fn list(&self, id: u16) -> &ThreadCache {
        // Cache ids are below MAX_CACHES = 256, so the u8 index needs no bounds check.
        &self.lists[usize::from(id as u8)]
    }
}

thread_local! {
    /// The calling thread's entry, `g.slab.thread(slot)` for its slot, cached so that the fast paths reach their
    /// list with one thread-local load (as `this_cpu_ptr` does) instead of a chain of loads through the global
    /// state. It holds no state of its own: [`current`] sets it from the slot (a signal handler that sets it
    /// meanwhile stores the same value), the exit hook clears it before it drains the lists, and null only
    /// sends a call to the full path, which asks `crate::thread` again.
    static MINE: AtomicPtr<ThreadCaches> = const { AtomicPtr::new(core::ptr::null_mut()) };
}

/// The calling thread's lists, if it has a slot and has used its lists before (never claims anything).
#[inline(always)]
pub fn current_if_any() -> Option<&'static ThreadCaches> {
    let p = MINE.with(|m| m.load(Ordering::Relaxed));
    // SAFETY: only entries of the published global state's table (never unmapped) are stored, by `current`.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The calling thread's lists, claiming its slot on the thread's first call. `None`: the thread is past its exit
/// destructor or every slot is taken; use the shared path.
///
/// # Context
/// Any context (the first call on a thread claims its slot, see `crate::thread::current`).
#[inline]
pub fn current(g: &'static SlabState) -> Option<&'static ThreadCaches> {
    let slot = crate::thread::current()?;
    let t = g.slab.thread(slot);
    MINE.with(|m| m.store(t as *const ThreadCaches as *mut ThreadCaches, Ordering::Relaxed));
    Some(t)
}

/// The tag of `t` as slab descriptors store it (`PageDesc::owner`): its slot + 1 (0 means "none").
#[inline]
pub fn tag(g: &SlabState, t: &ThreadCaches) -> u32 {
    g.slab.slot_of(t) + 1
}

/// Return every object of the calling thread's lists to its slab (`trim`). Each list under its lock, like any
/// owner operation: a signal handler that lands in the middle finds it busy and defers; what it deferred is
/// drained by the next round.
///
/// # Context
/// Normal context (reentrant: a handler that lands in it keeps off the list being drained).
pub(crate) fn drain_current(g: &SlabState) {
    let Some(me) = current_if_any() else { return };
    for id in 0..g.cache_count() {
        let (tc, c) = (me.list(id), g.cache(id));
        while c.is_active()
            && (tc.count.load(Ordering::Relaxed) != 0 || !tc.deferred.is_empty())
            && tc.lock.try_lock() == TryLock::Locked
        {
            c.drain_list(g, me, tc);
            tc.lock.unlock();
        }
    }
}

// -------------------------------------------------------------------------------------------------------------
// A slot's thread goes away: exit, orphan sweep, fork child
// -------------------------------------------------------------------------------------------------------------

/// What the slab layer does with a slot's lists and pointer blocks when its thread goes away (see the module
/// documentation). Registered with `crate::thread` by `process`.
pub(crate) static SLOT_HOOKS: crate::thread::SlotHooks =
    crate::thread::SlotHooks { exit: slot_exit, reset: slot_reset };

/// On the exiting thread: hand its objects and pointer blocks back. False if a busy flag was left set (the slot
/// stays out of circulation until the thread is gone, then `slot_reset` runs).
fn slot_exit(slot: u32) -> bool {
    // From here on this thread's calls (a signal handler that lands in the drain included) take the full path,
    // where `crate::thread` gives them no slot: the shared path.
    MINE.with(|m| m.store(core::ptr::null_mut(), Ordering::Relaxed));
    crate::sync::signal_fence();
    let blocks = super::kfree_rcu::drain_slot(slot, false);
    let lists = tables::state_if_init().is_none_or(|g| drain_lists(g, slot, false));
    blocks && lists
}

/// The slot's thread no longer exists: hand back what it left, whatever state it stopped in.
fn slot_reset(slot: u32) {
    super::kfree_rcu::drain_slot(slot, true);
    if let Some(g) = tables::state_if_init() {
        drain_lists(g, slot, true);
    }
}

/// Return every object cached in `slot`'s lists to its slab. Each list is drained under its lock, like any
/// owner operation, because a cache destroy may be taking the same lists over at the same moment: a list the
/// destroy claimed is left to it, and the destroy waits for a list drained here.
///
/// `dead`: the slot's thread no longer exists (orphan sweep, fork child), so a busy flag still set was left by
/// a context that will never clear it: it is cleared here as that context's unlock would have, and the list,
/// which it may have left mid-edit, is dropped (its objects leaked, never walked). Otherwise (the thread's own
/// exit) such a list is left as it is and the result says so (false).
fn drain_lists(g: &SlabState, slot: u32, dead: bool) -> bool {
    let t = g.slab.thread(slot);
    let mut consistent = true;
    for id in 0..g.cache_count() {
        let tc = t.list(id);
        let stale = dead && tc.lock.is_locked();
        if stale {
            tc.lock.unlock();
        }
        match tc.lock.try_lock() {
            TryLock::Locked => {
                if stale {
                    tc.freelist.store(0, Ordering::Relaxed);
                    tc.count.store(0, Ordering::Relaxed);
                }
                if tc.count.load(Ordering::Relaxed) != 0 || !tc.deferred.is_empty() {
                    g.cache(id).drain_list(g, t, tc);
                }
                tc.lock.unlock();
            }
            // A cache destroy claimed the list: it drains it.
            TryLock::Claimed => {}
            TryLock::Busy => consistent = false,
        }
    }
    consistent
}

// -------------------------------------------------------------------------------------------------------------
// One cache's lists in every thread: destroy and creation
// -------------------------------------------------------------------------------------------------------------

/// Take over the list of cache `id` in every thread: mark them claimed, wait out in-flight operations, and
/// return their objects. Used by cache destroy. Blocks (normal context).
pub fn claim_and_drain_all(g: &SlabState, id: u16) {
    let n = crate::thread::count();
    for i in 0..n {
        g.slab.thread(i).list(id).lock.claim();
    }
    // Pairs with the owners' try_lock (see `sync::local_lock`).
    crate::sys::membarrier::heavy_barrier();
    for i in 0..n {
        let t = g.slab.thread(i);
        let tc = t.list(id);
        if !tc.lock.wait_unlocked(CLAIM_PATIENCE) {
            // The owner left the allocator without clearing busy (e.g. longjmp out of a signal handler): its
            // list is leaked rather than touched.
            super::debug::report_stuck_shard(i, g.cache(id).name());
            continue;
        }
        if tc.count.load(Ordering::Acquire) != 0 || !tc.deferred.is_empty() {
            g.cache(id).drain_list(g, t, tc);
        }
    }
}

/// Reset the list of cache `id` in every thread for a new cache with that id (before it is published).
pub fn reset_all(g: &SlabState, id: u16) {
    for i in 0..crate::thread::count() {
        let tc = g.slab.thread(i).list(id);
        tc.freelist.store(0, Ordering::Relaxed);
        tc.count.store(0, Ordering::Relaxed);
        tc.alloc_fast.store(0, Ordering::Relaxed);
        tc.alloc_refill.store(0, Ordering::Relaxed);
        tc.free_fast.store(0, Ordering::Relaxed);
        tc.flushes.store(0, Ordering::Relaxed);
        tc.high.store(0, Ordering::Relaxed);
        tc.link_off.store(0, Ordering::Relaxed);
        tc.lock.reset();
    }
}
