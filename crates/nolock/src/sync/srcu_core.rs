//! The counting core of SRCU-fast: per-reader counters, the domain index, and the grace-period scans.
//!
//! It lives here (not in `rcu::srcu`) so that the loom models in `tests/loom.rs` run exactly this code with
//! loom's atomics. The only thing loom cannot model is `membarrier`: the scans take the barrier as a closure,
//! which the real domain implements with `heavy_barrier()` (and readers carry no fence), while the loom model
//! passes a `SeqCst` fence and puts one in its readers — the classic SRCU pairing that `membarrier` replaces.
//!
//! A reader increments `lock[idx]` of its own counters on entry and `unlock[idx]` of the same index on exit.
//! "No readers on index `i`" is: the sum of `unlock[i]` over all readers, a barrier, then the sum of `lock[i]`
//! equal to it. A grace period is: barrier (start); wait for no readers on the inactive index; flip; barrier;
//! wait for no readers on the previous index; barrier (end). See `rcu::srcu` for why this is enough.

use super::atomic::{AtomicU64, Ordering};
use super::local_counter::LocalCounter;

/// One reader's counters (one per thread per domain).
#[derive(Debug, Default)]
#[repr(C)]
pub struct SrcuReader {
    lock: [LocalCounter; 2],
    unlock: [LocalCounter; 2],
}

impl SrcuReader {
    super::loom_const_fn! {
        /// Counters at zero.
        pub fn new() -> Self {
            Self { lock: [LocalCounter::new(), LocalCounter::new()], unlock: [LocalCounter::new(), LocalCounter::new()] }
        }
    }

    /// Enter on index `idx` (owning thread only).
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, no fence.
    #[inline(always)]
    pub fn lock(&self, idx: usize) {
        self.lock[idx].inc();
    }

    /// Leave a section entered on `idx` (owning thread only).
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, no fence.
    #[inline(always)]
    pub fn unlock(&self, idx: usize) {
        self.unlock[idx].inc();
    }

    /// Enter on `idx` from any thread (shared counters of readers without their own).
    ///
    /// # Context
    /// Any thread, any context: one atomic RMW.
    #[inline]
    pub fn shared_lock(&self, idx: usize) {
        self.lock[idx].shared_inc();
    }

    /// Leave from any thread.
    ///
    /// # Context
    /// Any thread, any context: one atomic RMW.
    #[inline]
    pub fn shared_unlock(&self, idx: usize) {
        self.unlock[idx].shared_inc();
    }

    /// The unlock counter of `idx` (for guards that increment it later).
    #[inline(always)]
    pub fn unlock_counter(&self, idx: usize) -> &LocalCounter {
        &self.unlock[idx]
    }

    /// Sections entered and not left, both indexes (meaningful for the owning thread).
    pub fn nesting(&self) -> u64 {
        // A signal handler may run whole sections between our loads. Each of its sections is complete before we
        // resume, so if the lock sum is the same before and after reading the unlock sum, no section began (and
        // hence none ended) in between, and the two sums are consistent.
        loop {
            let l = self.lock[0].get().wrapping_add(self.lock[1].get());
            let u = self.unlock[0].get().wrapping_add(self.unlock[1].get());
            if self.lock[0].get().wrapping_add(self.lock[1].get()) == l {
                return l.wrapping_sub(u);
            }
        }
    }

    /// Close every section the (dead) owner left open, as if it had left them now: `unlock[i] = lock[i]`. A
    /// scan that summed the unlocks before this sees the sections still open, one that sums them after sees
    /// them closed; either is a legal view of a reader that leaves, so no scan can be fooled.
    ///
    /// # Context
    /// Only when the owning thread no longer exists (orphan sweep, fork child).
    pub fn close_open_sections(&self) {
        for i in 0..2 {
            self.unlock[i].set(self.lock[i].get());
        }
    }

    fn locks(&self, i: usize) -> u64 {
        self.lock[i].get()
    }

    fn unlocks(&self, i: usize) -> u64 {
        self.unlock[i].get()
    }
}

/// The domain's index counter; `idx & 1` is the index new readers use.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct SrcuIndex(AtomicU64);

impl SrcuIndex {
    super::loom_const_fn! {
        /// Index 0.
        pub fn new() -> Self {
            Self(AtomicU64::new(0))
        }
    }

    /// The index a new reader uses.
    #[inline(always)]
    pub fn current(&self) -> usize {
        (self.0.load(Ordering::Relaxed) & 1) as usize
    }

    /// The other index.
    #[inline]
    pub fn other(&self) -> usize {
        self.current() ^ 1
    }

    /// Switch readers to the other index.
    ///
    /// # Context
    /// Grace-period side (the domain's driver); one atomic RMW.
    pub fn flip(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Whether readers may still be inside sections on index `i`.
///
/// # Context
/// Grace-period side: calls `barrier` once (a `membarrier` in nolock, so normal context there).
pub fn readers_active<'a, I>(readers: impl Fn() -> I, i: usize, barrier: impl FnOnce()) -> bool
where
    I: Iterator<Item = &'a SrcuReader>,
{
    let unlocks = readers().fold(0u64, |s, r| s.wrapping_add(r.unlocks(i)));
    barrier();
    let locks = readers().fold(0u64, |s, r| s.wrapping_add(r.locks(i)));
    locks != unlocks
}

/// Grace-period step 2–3: if no reader is left on the inactive index, flip and return true.
///
/// # Context
/// Grace-period side: calls `barrier` (normal context in nolock).
pub fn scan_inactive_and_flip<'a, I>(index: &SrcuIndex, readers: impl Fn() -> I, barrier: impl Fn()) -> bool
where
    I: Iterator<Item = &'a SrcuReader>,
{
    if readers_active(&readers, index.other(), &barrier) {
        return false;
    }
    index.flip();
    barrier();
    true
}

/// Grace-period step 4: whether no reader is left on the index that was active before the flip.
///
/// # Context
/// Grace-period side: calls `barrier` (normal context in nolock).
pub fn scan_previous<'a, I>(index: &SrcuIndex, readers: impl Fn() -> I, barrier: impl Fn()) -> bool
where
    I: Iterator<Item = &'a SrcuReader>,
{
    !readers_active(readers, index.other(), barrier)
}

/// A whole grace period, blocking: `wait()` is called while readers hold it (the loom models yield there).
///
/// # Context
/// Blocks (calls `wait`) until the readers are gone: normal context.
pub fn grace_period<'a, I>(index: &SrcuIndex, readers: impl Fn() -> I, barrier: impl Fn(), wait: impl Fn())
where
    I: Iterator<Item = &'a SrcuReader>,
{
    barrier();
    while !scan_inactive_and_flip(index, &readers, &barrier) {
        wait();
    }
    while !scan_previous(index, &readers, &barrier) {
        wait();
    }
    barrier();
}
