//! Accounting groups: the kernel's memory cgroup (`memcg`) kmem accounting, for nolock memory.
//!
//! A [`MemGroup`] counts the bytes charged to it: [`current`](MemGroup::current) (the cgroup's
//! `memory.current`), its high-water mark [`peak`](MemGroup::peak) (`memory.peak`), and an optional
//! [`limit`](MemGroup::limit) (`memory.max`). What is charged:
//!
//! - a single allocation: [`kmalloc_charged_nolock`] charges the usable size of the object it returns
//!   ([`crate::ksize`]: the size class, or the page run), and [`kfree_charged_nolock`] uncharges it (the
//!   kernel's `__GFP_ACCOUNT`);
//! - every object of a cache built with [`KmemCacheBuilder::memcg`](crate::KmemCacheBuilder::memcg): the
//!   cache's [`object_size`](crate::KmemCache::object_size) on each `alloc_nolock`, uncharged on each
//!   `free_nolock` (the kernel's `SLAB_ACCOUNT`);
//! - anything else a user accounts by hand with [`MemGroup::try_charge`] / [`MemGroup::uncharge`] (a BPF map
//!   charges its allocator's memory this way).
//!
//! A charge that would pass the limit fails: the allocation returns a real `None` and the group counts it in
//! [`MemGroupStats::limit_hits`] (the cgroup's `memory.events` `max`), apart from allocations that failed
//! because memory ran out ([`MemGroupStats::oom`]). Nothing is reclaimed and nothing waits: a full group
//! fails at once, as a `__GFP_NOWAIT` charge does in the kernel.
//!
//! # Design
//!
//! Every figure is an atomic word of the group, changed by atomic read-modify-write only, so a charge or an
//! uncharge may come from any thread and from a signal handler that interrupted another charge on the same
//! thread (DESIGN.md section 4: no load-then-store on shared state). There is no lock, no per-thread stock and
//! no hierarchy:
//!
//! - without a limit a charge is one `fetch_add` (wait-free); with one it is a compare-and-swap loop that adds
//!   only if the sum stays within the limit (lock-free: a retry means another charge or uncharge succeeded), so
//!   a limit is never overshot, not even for a moment, and a charge never fails because of a concurrent charge
//!   that itself failed;
//! - `peak` follows `current` with a `fetch_max` after each successful charge; it may lag a concurrent charge
//!   by one update, never exceed the true maximum;
//! - an uncharge is one `fetch_sub`; uncharging more than was charged is a caller bug, which debug builds
//!   assert on, and the counter saturates at zero rather than wrap.
//!
//! # Ordering
//!
//! The counters order nothing but themselves: all accesses are `Relaxed`. The memory being charged is
//! published by the allocator's own orderings; a reader of `current` sees some value that the counter had
//! between its start and its end.
//!
//! # Context
//!
//! Every function here may be called from any context (the crate default): async-signal-safe, reentrant, no
//! lock, no allocation, no system call beyond what the underlying allocation makes. The uncharged paths of
//! `kmalloc_nolock` and `KmemCache` are untouched: a cache without a group pays one never-taken branch.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::page::Gfp;
use crate::slab::kmalloc::{kfree_nolock, kmalloc_nolock, ksize};

/// No limit.
const UNLIMITED: usize = usize::MAX;

/// An accounting group: the memory cgroup analogue (see the [module](self) documentation).
#[derive(Debug)]
pub struct MemGroup {
    current: AtomicUsize,
    peak: AtomicUsize,
    limit: AtomicUsize,
    charges: AtomicU64,
    uncharges: AtomicU64,
    limit_hits: AtomicU64,
    oom: AtomicU64,
}

/// Why a charge failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitExceeded {
    /// Bytes asked for.
    pub bytes: usize,
    /// Bytes charged when the charge was refused.
    pub current: usize,
    /// The limit.
    pub limit: usize,
}

/// A snapshot of a group's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemGroupStats {
    /// Bytes charged now (`memory.current`).
    pub current: usize,
    /// The most bytes ever charged at once since creation or the last [`MemGroup::reset_peak`]
    /// (`memory.peak`).
    pub peak: usize,
    /// The limit, if any (`memory.max`).
    pub limit: Option<usize>,
    /// Successful charges.
    pub charges: u64,
    /// Uncharges.
    pub uncharges: u64,
    /// Charges refused because they would have passed the limit (`memory.events` `max`).
    pub limit_hits: u64,
    /// Allocations for this group that failed because memory ran out (not because of the limit).
    pub oom: u64,
}

impl Default for MemGroup {
    fn default() -> Self {
        Self::new()
    }
}

impl MemGroup {
    /// A group with no limit.
    pub const fn new() -> Self {
        Self::with_limit_opt(None)
    }

    /// A group whose charges may not pass `limit` bytes.
    pub const fn with_limit(limit: usize) -> Self {
        Self::with_limit_opt(Some(limit))
    }

    const fn with_limit_opt(limit: Option<usize>) -> Self {
        MemGroup {
            current: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            limit: AtomicUsize::new(match limit {
                Some(l) => l,
                None => UNLIMITED,
            }),
            charges: AtomicU64::new(0),
            uncharges: AtomicU64::new(0),
            limit_hits: AtomicU64::new(0),
            oom: AtomicU64::new(0),
        }
    }

    /// Set or remove the limit. Memory already charged above a new limit stays charged; further charges fail
    /// until enough is uncharged.
    pub fn set_limit(&self, limit: Option<usize>) {
        self.limit.store(limit.unwrap_or(UNLIMITED), Ordering::Relaxed);
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<usize> {
        let l = self.limit.load(Ordering::Relaxed);
        (l != UNLIMITED).then_some(l)
    }

    /// Bytes charged now.
    #[inline]
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// The most bytes charged at once since creation or the last [`reset_peak`](Self::reset_peak).
    #[inline]
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Restart the peak from the current figure (writing to `memory.peak`).
    pub fn reset_peak(&self) {
        self.peak.store(self.current(), Ordering::Relaxed);
    }

    /// Charge `bytes`, unless that would pass the limit (then nothing is charged and the refusal is counted in
    /// [`MemGroupStats::limit_hits`]).
    #[inline]
    pub fn try_charge(&self, bytes: usize) -> Result<(), LimitExceeded> {
        let limit = self.limit.load(Ordering::Relaxed);
        let now = if limit == UNLIMITED {
            self.current.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes)
        } else {
            let mut cur = self.current.load(Ordering::Relaxed);
            loop {
                let new = match cur.checked_add(bytes) {
                    Some(n) if n <= limit => n,
                    _ => {
                        self.limit_hits.fetch_add(1, Ordering::Relaxed);
                        return Err(LimitExceeded { bytes, current: cur, limit });
                    }
                };
                match self.current.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => break new,
                    Err(c) => cur = c,
                }
            }
        };
        self.peak.fetch_max(now, Ordering::Relaxed);
        self.charges.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Uncharge `bytes` charged before.
    #[inline]
    pub fn uncharge(&self, bytes: usize) {
        let old = self.current.fetch_sub(bytes, Ordering::Relaxed);
        if old < bytes {
            // More uncharged than charged: a caller bug. Put back what went below zero (one more RMW, so a
            // concurrent charge is not lost) and keep the counter at or above zero.
            debug_assert!(old >= bytes, "MemGroup: uncharge of {bytes} bytes with only {old} charged");
            self.current.fetch_add(bytes - old, Ordering::Relaxed);
        }
        self.uncharges.fetch_add(1, Ordering::Relaxed);
    }

    /// Count an allocation for this group that failed because memory ran out.
    #[inline]
    pub fn note_oom(&self) {
        self.oom.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of the group's figures (each read on its own, not one atomic snapshot).
    pub fn stats(&self) -> MemGroupStats {
        MemGroupStats {
            current: self.current(),
            peak: self.peak(),
            limit: self.limit(),
            charges: self.charges.load(Ordering::Relaxed),
            uncharges: self.uncharges.load(Ordering::Relaxed),
            limit_hits: self.limit_hits.load(Ordering::Relaxed),
            oom: self.oom.load(Ordering::Relaxed),
        }
    }

    /// Allocate for a charged object: `alloc`, then charge `size(p)`; on a refused charge free it again.
    #[inline]
    pub(crate) fn alloc_charged(
        &self,
        alloc: impl FnOnce() -> Option<NonNull<u8>>,
        size: impl FnOnce(NonNull<u8>) -> usize,
        free: impl FnOnce(NonNull<u8>),
    ) -> Option<NonNull<u8>> {
        // Allocate first and charge what was really handed out: "try the next bucket" may serve a larger
        // class than asked for, and the uncharge at free time must match.
        let Some(p) = alloc() else {
            self.note_oom();
            return None;
        };
        if self.try_charge(size(p)).is_err() {
            free(p);
            return None;
        }
        Some(p)
    }
}

/// [`kmalloc_nolock`] charged to `group`: `None` when memory is exhausted (counted in the group's `oom`) or
/// when the charge would pass the group's limit (counted in `limit_hits`). Free it with
/// [`kfree_charged_nolock`] and the same group.
///
/// # Context
/// As [`kmalloc_nolock`].
#[inline]
pub fn kmalloc_charged_nolock(size: usize, flags: Gfp, group: &MemGroup) -> Option<NonNull<u8>> {
    group.alloc_charged(
        || kmalloc_nolock(size, flags),
        |p| ksize(p.as_ptr()),
        // SAFETY: `p` was just allocated and never handed out.
        |p| unsafe { kfree_nolock(p.as_ptr()) },
    )
}

/// Free memory from [`kmalloc_charged_nolock`] and uncharge it from `group`.
///
/// # Safety
/// As [`kfree_nolock`]; `ptr` was allocated by [`kmalloc_charged_nolock`] with `group` (or is null).
///
/// # Context
/// As [`kfree_nolock`].
#[inline]
pub unsafe fn kfree_charged_nolock(ptr: *mut u8, group: &MemGroup) {
    let n = ksize(ptr);
    // SAFETY: forwarded from the caller.
    unsafe { kfree_nolock(ptr) };
    if n != 0 {
        group.uncharge(n);
    }
}
