//! Grace-period sequence numbers (the kernel's `rcu_seq`), shared by every domain.
//!
//! One 64-bit counter per domain. Its two low bits are the state of the current grace period (0: idle, 1: in
//! progress); the rest counts grace periods. A *cookie* taken with [`GpSeq::snap`] is the value the counter
//! will have reached once a full grace period that started after the snapshot has ended; [`GpSeq::done`]
//! compares against it. Counters are 64-bit and never wrap in practice, but comparisons are wrap-safe anyway.
//!
//! Only the domain's *driver* (whoever holds its driver flag) calls [`GpSeq::start`] and [`GpSeq::end`].
//! Readers of the counter use `Acquire` (pairs with the `Release` in `end`), so a caller that sees its cookie
//! done also sees everything the grace period ordered.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

const STATE_MASK: u64 = 3;

/// A grace-period sequence counter, plus a 32-bit futex word that changes whenever a grace period ends.
#[derive(Debug, Default)]
pub struct GpSeq {
    seq: AtomicU64,
    ends: AtomicU32,
}

impl GpSeq {
    /// A counter with no grace period yet.
    pub const fn new() -> Self {
        Self { seq: AtomicU64::new(0), ends: AtomicU32::new(0) }
    }

    /// The raw counter.
    #[inline]
    pub fn get(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Cookie for "a full grace period starting after now has ended". Any context.
    ///
    /// The full fence (S) orders the caller's earlier accesses (typically: unlinking the object it is about to
    /// retire) before the load of the counter. It pairs with the full ordering of [`start`](Self::start) (an
    /// `AcqRel` RMW followed by the grace period's first heavy barrier): the store-buffering pattern
    /// "updater: unlink; load seq" / "driver: seq++; scan readers". Without (S) the updater's load could be
    /// satisfied before its unlink is visible, read a counter that a grace period already started from, and
    /// take a cookie that this grace period satisfies although its scans may have run before the unlink — a
    /// reader that found the object afterwards would not be waited for. (The kernel's `rcu_seq_snap()` has
    /// the same `smp_mb()`.)
    #[inline]
    pub fn snap(&self) -> u64 {
        core::sync::atomic::fence(Ordering::SeqCst); // S
        (self.get() + 2 * STATE_MASK + 1) & !STATE_MASK
    }

    /// Whether the grace period named by `cookie` has ended. Any context.
    #[inline]
    pub fn done(&self, cookie: u64) -> bool {
        self.get().wrapping_sub(cookie) as i64 >= 0
    }

    /// Whether a grace period is in progress.
    #[inline]
    pub fn in_progress(&self) -> bool {
        self.get() & STATE_MASK != 0
    }

    /// Number of grace periods completed.
    #[inline]
    pub fn completed(&self) -> u64 {
        self.get() >> 2
    }

    /// Driver: a grace period starts.
    pub fn start(&self) {
        debug_assert!(!self.in_progress());
        // Release: nothing to publish yet, but keep the counter's history ordered for pollers.
        self.seq.fetch_add(1, Ordering::AcqRel);
    }

    /// Driver: the grace period ends. Wakes futex waiters on [`GpSeq::ends_word`].
    pub fn end(&self) {
        let s = self.seq.load(Ordering::Relaxed);
        // Release: pairs with the Acquire in `get`: whoever sees the new value sees the grace period's effects.
        self.seq.store((s | STATE_MASK) + 1, Ordering::Release);
        self.ends.fetch_add(1, Ordering::Release);
        crate::sys::futex_wake(&self.ends, i32::MAX);
    }

    /// The futex word that changes at each grace-period end.
    pub fn ends_word(&self) -> &AtomicU32 {
        &self.ends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies() {
        let s = GpSeq::new();
        let c = s.snap();
        assert!(!s.done(c));
        s.start();
        // a GP already running when the cookie is taken does not count
        let c2 = s.snap();
        s.end();
        assert!(s.done(c));
        assert!(!s.done(c2));
        s.start();
        s.end();
        assert!(s.done(c2));
        assert_eq!(s.completed(), 2);
    }
}
