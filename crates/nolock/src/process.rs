//! The composition root: what belongs to the whole process rather than to one layer, and the wiring between
//! layers that must not know each other.
//!
//! - **Process hooks**, registered before `main` by an `.init_array` constructor (and again, idempotently, by
//!   [`crate::init`]): the layers' slot hooks with `thread` (the slab layer's, then RCU's: what each does with
//!   a slot when its thread exits, dies or is lost in a fork), the thread-exit key, the slab layer's
//!   `kfree_rcu` hook with the RCU layer ([`crate::rcu::GpClient`]: the grace-period worker frees and ages
//!   pointer blocks, barriers flush them, without the RCU layer naming the slab layer), and the
//!   `pthread_atfork` handlers. Registering them from a normal context, before any nolock path runs, means no
//!   nolock path ever has to.
//! - **Normal-context initialisation** ([`init_normal_context`], from [`crate::init`] and cache creation): the
//!   hooks, the membarrier registration, the background worker (the grace-period worker is started by
//!   [`crate::init`], type-safe cache creation and the normal-context RCU calls).
//! - **`trim`**: this thread's cached objects back to their slabs, every cache's empty slabs released, free
//!   pages purged, inside the background worker's fork-excluding critical section.
//! - **Fork**: the child handler brings every layer back to a consistent state with one thread, bottom up:
//!   the background workers are marked gone, shrinks of vanished threads ended, the `kfree_rcu` rings and
//!   block-slot claims are repaired, then every slot of a thread that is gone goes through every layer's
//!   `reset` (the slab layer hands its objects back and queues its pointer blocks, RCU closes its sections in
//!   every domain) and is freed, and the grace-period machinery is reset (see `rcu::after_fork_child`). What
//!   the forking thread's own interrupted call holds (fork from a signal handler) is left to it; the child's
//!   first blocking call takes it over (docs/DESIGN.md section 10).

use core::sync::atomic::{AtomicU8, Ordering};

/// Work that needs a normal context, done at the first opportunity (idempotent).
///
/// # Context
/// Normal context: may register fork handlers, make `membarrier` system calls and spawn the background
/// worker. It does not start the grace-period worker: [`crate::init`], type-safe cache creation and the
/// normal-context RCU calls do, so that creating a plain cache adds no RCU thread to a process (the C
/// library creates caches in every program it is preloaded into).
pub(crate) fn init_normal_context() {
    ensure_process_hooks();
    crate::sys::membarrier::register();
    crate::background::ensure_started();
}

/// [`crate::trim`]: give memory back now.
///
/// # Context
/// Normal context only: `madvise` system calls; waits for a shrink in progress on another thread.
pub(crate) fn trim() -> crate::TrimReport {
    let Some(s) = crate::slab::tables::state() else {
        return crate::TrimReport::default();
    };
    crate::slab::thread_cache::drain_current(s);
    let mut r = crate::TrimReport::default();
    if crate::background::enter_critical() {
        r.slabs_released = crate::slab::shrink::reclaim_empty_slabs_wait(s);
        r.pages_purged = s.pages.purge(false);
        crate::background::leave_critical();
    }
    r
}

extern "C" fn atfork_child() {
    crate::background::after_fork_child();
    if let Some(s) = crate::slab::tables::state_if_init() {
        crate::slab::shrink::after_fork_child(s);
    }
    crate::slab::kfree_rcu::after_fork_child();
    // Every layer's `reset` for the slots of the threads that are gone, in registration order: the slab layer
    // hands their objects back and queues their pointer blocks, then RCU closes their read-side sections.
    crate::thread::after_fork_child();
    crate::rcu::after_fork_child();
}

static PROCESS_HOOKS: AtomicU8 = AtomicU8::new(0);

/// Create the exit keys and register the fork handlers (once).
///
/// # Context
/// Normal context: `pthread_atfork` may allocate.
pub(crate) fn ensure_process_hooks() {
    if PROCESS_HOOKS.swap(1, Ordering::AcqRel) != 0 {
        return;
    }
    // The layers that keep per-thread state, in the order their exit and reset hooks run: the slab layer first
    // (handing a thread's objects and pointer blocks back may queue RCU callbacks), then RCU (whose exit hook
    // keeps a slot whose thread left a read-side section open out of circulation).
    crate::thread::register_layer(&crate::slab::SLOT_HOOKS);
    crate::thread::register_layer(&crate::rcu::SLOT_HOOKS);
    crate::thread::ensure_exit_key();
    // The slab layer's `kfree_rcu` pointer blocks: the grace-period worker frees and ages them, barriers flush
    // them, through this hook.
    crate::rcu::register_client(&crate::slab::kfree_rcu::GP_CLIENT);
    // Cache creation is a normal context: it starts what `init` starts.
    crate::slab::set_normal_context_init(init_normal_context);
    // SAFETY: registering plain extern "C" functions as the fork handlers.
    unsafe {
        libc::pthread_atfork(
            Some(crate::background::before_fork),
            Some(crate::background::after_fork_parent),
            Some(atfork_child),
        )
    };
}

extern "C" fn nolock_ctor() {
    ensure_process_hooks();
}

/// Runs before `main` (and when a shared object containing nolock is loaded): registers the process hooks in
/// a normal context, so that no nolock path ever has to.
#[used]
#[unsafe(link_section = ".init_array")]
static NOLOCK_CTOR: extern "C" fn() = nolock_ctor;
