//! `LocalCounter`: a counter that one thread increments and any thread reads, with increments that a signal
//! handler on the same thread cannot lose.
//!
//! DESIGN.md section 4: a load followed by a store is not atomic against a signal handler on the same thread:
//! if the handler increments between them, the interrupted code stores its stale value and the handler's
//! increment is lost. For SRCU-style counters that is fatal (a lost lock count makes a reader invisible), so
//! increments here are a *single instruction*:
//!
//! - x86-64: `add qword ptr [counter], 1` without `lock`. Signals are delivered between instructions, so the
//!   increment is atomic against same-thread handlers; it is not atomic against other CPUs, which is fine
//!   because only the owning thread (and its handlers) write the counter. Cost: like a plain increment
//!   (about 1 ns), against about 2.5 ns for `lock xadd` (reference/perf.md §3a).
//! - elsewhere: a relaxed atomic `fetch_add` (on aarch64 with LSE, one `stadd`).
//!
//! Readers on other threads load the value with `Relaxed` atomic loads; 64-bit aligned stores do not tear.
//! Ordering against other memory accesses is the caller's business (compiler fences for same-thread handlers,
//! `membarrier` for other threads).

use super::atomic::{AtomicU64, Ordering};

/// A 64-bit counter written by one thread (and its signal handlers), read by any.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct LocalCounter(AtomicU64);

impl LocalCounter {
    super::loom_const_fn! {
        /// A counter starting at zero.
        pub fn new() -> Self {
            Self(AtomicU64::new(0))
        }
    }

    /// Add one. Only the owning thread and its signal handlers may call this.
    ///
    /// # Context
    /// The owning thread and its signal handlers only: one instruction, async-signal-safe, never blocks.
    #[inline(always)]
    pub fn inc(&self) {
        #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
        // SAFETY: `self.0` is a valid, aligned 8-byte location; a non-locked `add` to it is one instruction,
        // which a same-thread signal handler cannot split. Other threads only read it.
        unsafe {
            core::arch::asm!("add qword ptr [{0}], 1", in(reg) self.0.as_ptr(), options(nostack));
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Add `n` (same rules as [`inc`](Self::inc)).
    ///
    /// # Context
    /// The owning thread and its signal handlers only: one instruction, async-signal-safe, never blocks.
    #[inline(always)]
    pub fn add(&self, n: u64) {
        #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
        // SAFETY: as in `inc`.
        unsafe {
            core::arch::asm!("add qword ptr [{0}], {1}", in(reg) self.0.as_ptr(), in(reg) n, options(nostack));
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Add one from any thread (an atomic RMW with a full fence): for counters shared by threads that have no
    /// counter of their own.
    ///
    /// # Context
    /// Any thread, any context: one atomic RMW.
    #[inline]
    pub fn shared_inc(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Overwrite the value: only when the owning thread no longer exists (orphan sweep, fork child), so that
    /// no increment can be lost.
    ///
    /// # Context
    /// Any context, once the owner is gone.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    #[inline(always)]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
