//! The background worker: the userspace stand-in for the kernel's kthreads and deferred work.
//!
//! One thread, started from a normal context ([`crate::init`], `KmemCache` creation), that periodically
//! - shrinks caches in which slabs became entirely free since the last pass (keeping a small reserve),
//! - purges pages that stayed free and dirty for a whole interval (`madvise(MADV_DONTNEED)`), unless the purge
//!   is turned off (`Config::purge_interval(None)`, `NOLOCK_PURGE=never`, `NOLOCK_PURGE_INTERVAL_MS=0`),
//! - commits arena memory ahead of need, so that allocations do not have to (see [`crate::page`]),
//! - sweeps the thread slots of threads that died without running their exit destructor (every layer hands
//!   back what they left: the slab layer their cached objects).
//!
//! A pass runs every purge interval (100 ms by default; every 100 ms when the purge is off).
//!
//! `*_nolock` paths never depend on it for correctness: it only gives memory back to the OS. Asking it for an
//! early pass (`slab::shrink::request_shrink`, from free paths) is one atomic increment and no system call: the worker
//! notices before it sleeps again, or at the end of its interval.
//!
//! Fork: the worker does not exist in a child; the atfork child handler marks it stopped and the next normal
//! context call starts a new one. The prepare handler waits (bounded) for the worker to leave the part of a
//! pass that holds slabs or pages in hand, so a fork does not leak them into the child.

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use core::time::Duration;

use crate::global;
use crate::slab::shrink::SHRINK_WANTED;

static RUNNING_PID: AtomicI32 = AtomicI32::new(0);
static IN_CRITICAL: AtomicU32 = AtomicU32::new(0);
static FORK_PENDING: AtomicBool = AtomicBool::new(false);
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Empty slabs each cache keeps when the worker shrinks it.
const KEEP_EMPTY_SLABS: usize = 2;

/// Passes completed in this process (see [`crate::worker_passes`]).
pub fn passes() -> u64 {
    PASSES.load(Ordering::Relaxed)
}

/// Start the worker if it is enabled and not running in this process.
///
/// # Context
/// Normal context only: spawns a thread.
pub fn ensure_started() {
    if global::background_enabled() {
        crate::sys::start_once(&RUNNING_PID, "nolock-worker", run);
    }
}

/// Whether the worker runs in this process.
pub fn is_running() -> bool {
    RUNNING_PID.load(Ordering::Acquire) == crate::sys::getpid()
}

fn run() {
    let purge = global::settings().purge_interval;
    let every = purge.unwrap_or(global::DEFAULT_PURGE_INTERVAL);
    let mut pass: u64 = 0;
    loop {
        // Acquire: pairs with the Release increment in `slab::shrink::request_shrink`.
        let seen = SHRINK_WANTED.load(Ordering::Acquire);
        if RUNNING_PID.load(Ordering::Acquire) != crate::sys::getpid() {
            return;
        }
        one_pass(pass, purge.is_some());
        pass += 1;
        PASSES.fetch_add(1, Ordering::Relaxed);
        crate::sys::futex_wait(&SHRINK_WANTED, seen, Some(every));
    }
}

fn one_pass(pass: u64, purge: bool) {
    let Some(g) = global::get_if_init() else {
        return;
    };
    let slab = crate::slab::tables::state_if_init();
    // Outside the critical section: commits hold no pages in hand.
    g.pages.commit_ahead();
    if let Some(s) = slab {
        s.slab.lock_ahead();
    }
    if !enter_critical() {
        return;
    }
    if let Some(s) = slab {
        crate::slab::cache::for_each_cache(s, |c| {
            let events = c.counters.empty_events.load(Ordering::Relaxed);
            if events != c.shrunk_at.load(Ordering::Relaxed) {
                c.shrink(s, KEEP_EMPTY_SLABS);
            }
        });
    }
    if purge {
        g.pages.purge(true);
    }
    if pass.is_multiple_of(10) {
        crate::thread::sweep_orphans();
    }
    leave_critical();
}

/// Enter a section that holds slabs or pages in hand; false if a fork is about to happen (skip the work).
pub fn enter_critical() -> bool {
    // SeqCst pair with `before_fork`: either we see FORK_PENDING or it sees our count.
    IN_CRITICAL.fetch_add(1, Ordering::SeqCst);
    if FORK_PENDING.load(Ordering::SeqCst) {
        IN_CRITICAL.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    true
}

/// Leave the section entered by [`enter_critical`].
pub fn leave_critical() {
    IN_CRITICAL.fetch_sub(1, Ordering::SeqCst);
}

/// atfork prepare handler: keep new critical sections from starting and wait (at most 100 ms) for running ones.
pub extern "C" fn before_fork() {
    FORK_PENDING.store(true, Ordering::SeqCst);
    let start = std::time::Instant::now();
    while IN_CRITICAL.load(Ordering::SeqCst) != 0 && start.elapsed() < Duration::from_millis(100) {
        std::thread::yield_now();
    }
}

/// atfork parent handler.
pub extern "C" fn after_fork_parent() {
    FORK_PENDING.store(false, Ordering::SeqCst);
}

/// atfork child handler: the worker thread does not exist here, and neither do the parent's memory locks
/// (nor its `mlockall(MCL_FUTURE)`), so commits stop being locked.
pub fn after_fork_child() {
    FORK_PENDING.store(false, Ordering::SeqCst);
    IN_CRITICAL.store(0, Ordering::SeqCst);
    RUNNING_PID.store(0, Ordering::Release);
    if let Some(g) = global::get_if_init() {
        g.pages.after_fork_child();
    }
    if let Some(s) = crate::slab::tables::state_if_init() {
        s.slab.after_fork_child();
    }
}
