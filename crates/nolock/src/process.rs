//! The composition root: what belongs to the whole process rather than to one layer.
//!
//! - **Process hooks**, registered before `main` by an `.init_array` constructor (and again, idempotently, by
//!   [`crate::init`]): the thread-exit keys of the per-thread slots and of the slab shards, the RCU exit check,
//!   and the `pthread_atfork` handlers. Registering them from a normal context, before any nolock path runs,
//!   means no nolock path ever has to.
//! - **Fork**: the child handler brings every layer back to a consistent state with one thread, bottom up:
//!   the background workers are marked gone, the `kfree_rcu` rings and slots are repaired, the slab shards of
//!   dead threads are drained (their pointer blocks queued), then the per-thread
//!   slots of dead threads are closed in every RCU domain and freed, and the grace-period machinery is reset
//!   (see `rcu::after_fork_child`).

use core::sync::atomic::{AtomicU8, Ordering};

extern "C" fn atfork_child() {
    crate::background::after_fork_child();
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
