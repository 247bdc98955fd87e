//! The counting core of the RCU domain: a reader's nesting/phase word and the global phase counter.
//!
//! Kept apart from `rcu::classic` so that the loom models run this exact code (see `srcu_core` for how loom
//! stands in for `membarrier`).
//!
//! A reader word holds a nesting count in its low 32 bits and a phase in bit 32. The outermost
//! [`RcuReaderWord::enter`] copies the global [`RcuGpCtr`] (phase + a count of one); nested ones add one;
//! [`RcuReaderWord::exit`] subtracts one. Only the owning thread writes the word, with a load and a store: a
//! signal handler that runs whole sections in between restores the word, so nothing is lost (DESIGN.md §4).
//! A grace period waits until no reader is inside a section begun in the other phase, flips the phase, and
//! waits again.

use super::atomic::{AtomicU64, Ordering};

const NEST_MASK: u64 = 0xffff_ffff;
const PHASE: u64 = 1 << 32;

/// The global phase counter: what an outermost reader stores.
#[derive(Debug)]
#[repr(transparent)]
pub struct RcuGpCtr(AtomicU64);

impl RcuGpCtr {
    super::loom_const_fn! {
        /// Phase 0, count 1.
        pub fn new() -> Self {
            Self(AtomicU64::new(1))
        }
    }

    /// Switch the phase new readers take.
    ///
    /// # Context
    /// Grace-period side (the domain's driver); one atomic RMW.
    pub fn flip(&self) {
        self.0.fetch_xor(PHASE, Ordering::SeqCst);
    }

    /// The current value.
    #[inline(always)]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// The phase (0 or 1) that readers entering now take.
    pub fn phase(&self) -> usize {
        ((self.get() & PHASE) >> 32) as usize
    }

    /// Whether `word` is inside a section begun in the phase opposite to the current one.
    pub fn is_old(&self, word: u64) -> bool {
        word & NEST_MASK != 0 && (word ^ self.get()) & PHASE != 0
    }
}

impl Default for RcuGpCtr {
    fn default() -> Self {
        Self::new()
    }
}

/// One thread's reader word.
#[derive(Debug, Default)]
#[repr(transparent)]
pub struct RcuReaderWord(AtomicU64);

impl RcuReaderWord {
    super::loom_const_fn! {
        /// Outside any section.
        pub fn new() -> Self {
            Self(AtomicU64::new(0))
        }
    }

    /// Enter a section (owning thread). Returns the word's new value; it is outermost when its nesting is 1.
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, no fence, no RMW.
    #[inline(always)]
    pub fn enter(&self, gp: &RcuGpCtr) -> u64 {
        let v = self.0.load(Ordering::Relaxed);
        let new = if v & NEST_MASK == 0 { gp.get() } else { v + 1 };
        self.0.store(new, Ordering::Relaxed);
        new
    }

    /// Leave a section (owning thread). Returns the value before leaving.
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, no fence, no RMW.
    #[inline(always)]
    pub fn exit(&self) -> u64 {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v - 1, Ordering::Relaxed);
        v
    }

    /// The raw word (for grace-period scans).
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Whether the owner is inside a section.
    pub fn nested(&self) -> bool {
        self.get() & NEST_MASK != 0
    }

    /// Clear the word: its thread is gone (orphan sweep, fork child), so no section of it is open.
    ///
    /// # Context
    /// Only when the owning thread no longer exists.
    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Phase of a word.
    pub fn phase_of(word: u64) -> usize {
        ((word & PHASE) >> 32) as usize
    }

    /// Whether `word` is an outermost section (nesting 1).
    pub fn is_outermost(word: u64) -> bool {
        word & NEST_MASK == 1
    }
}

/// Whether any of `readers` is inside a section begun in the phase opposite to `gp`'s.
pub fn old_readers<'a>(gp: &RcuGpCtr, mut readers: impl Iterator<Item = &'a RcuReaderWord>) -> bool {
    readers.any(|r| gp.is_old(r.get()))
}

/// A whole RCU grace period, blocking (for models; the domain runs the same steps as a state machine).
///
/// # Context
/// Blocks (calls `wait`) until the readers are gone: normal context.
pub fn grace_period<'a, I>(gp: &RcuGpCtr, readers: impl Fn() -> I, barrier: impl Fn(), wait: impl Fn())
where
    I: Iterator<Item = &'a RcuReaderWord>,
{
    barrier();
    while old_readers(gp, readers()) {
        wait();
    }
    // Flip fences: scans before the flip, flip before the next scans (see `rcu::classic`).
    super::atomic::fence(Ordering::SeqCst);
    gp.flip();
    super::atomic::fence(Ordering::SeqCst);
    while old_readers(gp, readers()) {
        wait();
    }
    barrier();
}
