//! RCU Tasks Trace, built on SRCU-fast (as in Linux 7.0): one global SRCU-fast domain for sleepable readers
//! (the sleepable BPF programs of the kernel).
//!
//! Its grace period is **guaranteed to imply an RCU grace period**: each one begins by waiting for a full RCU
//! grace period (see `srcu` step `WAIT_RCU`), so an RCU reader that began before a Tasks Trace grace period
//! started has ended when that grace period completes. Memory freed after a Tasks Trace grace period is
//! therefore safe from both sleepable and non-sleepable readers, with no chained `call_rcu`.

use core::ptr::NonNull;

use super::srcu::{SrcuFast, SrcuFastGuard};
use super::{RcuCallback, RcuHead};

/// The global Tasks Trace domain.
pub static RCU_TASKS_TRACE: SrcuFast = SrcuFast::new_implying_rcu();

/// Enter a Tasks Trace read-side section (`rcu_read_lock_tasks_trace`); it may sleep.
///
/// # Context
/// Any context: async-signal-safe, reentrant, no fence.
#[inline]
pub fn rcu_read_lock_tasks_trace() -> SrcuFastGuard<'static> {
    RCU_TASKS_TRACE.read_lock_fast()
}

/// Wait for a Tasks Trace grace period, which also implies an RCU grace period.
///
/// # Context
/// Normal context only: blocks.
pub fn synchronize_rcu_tasks_trace() {
    RCU_TASKS_TRACE.synchronize();
}

/// Queue `func(head)` to run after a Tasks Trace grace period.
///
/// # Safety
/// As [`crate::rcu::classic::call_rcu_nolock`].
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free.
#[inline]
pub unsafe fn call_rcu_tasks_trace(head: NonNull<RcuHead>, func: RcuCallback) {
    // SAFETY: forwarded.
    unsafe { RCU_TASKS_TRACE.call_srcu_fast_nolock(head, func) }
}

/// Wait until every Tasks Trace callback queued before the call has run.
///
/// # Context
/// Normal context only: blocks.
pub fn rcu_barrier_tasks_trace() {
    RCU_TASKS_TRACE.barrier();
}

/// Whether a Tasks Trace grace period implies an RCU grace period (`rcu_trace_implies_rcu_gp`): always.
pub const fn rcu_trace_implies_rcu_gp() -> bool {
    true
}
