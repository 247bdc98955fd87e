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
    crate::rcu::kfree::after_fork_child();
    crate::slab::shard::after_fork_child();
    crate::thread::after_fork_child(crate::rcu::reset_slot);
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
    // The slot key first: its destructor runs before the shard's in each round, which does not matter for
    // correctness (each layer's exit work stands alone) but keeps the order stable.
    crate::thread::ensure_exit_key();
    crate::thread::register_exit_check(crate::rcu::slot_may_be_reused);
    crate::slab::shard::ensure_exit_key();
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
