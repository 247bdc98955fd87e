//! Freeing: the fast path at the top, then what it falls back to.
//!
//! # The fast path
//!
//! [`CacheInner::free_fast`] is the one free fast path, for `kfree_nolock` and `KmemCache::free_nolock` alike:
//! if the address is exactly an object of a plain (non-debug, non-hardened) slab, and the calling thread has
//! used its lists, push it onto the thread's list of its cache under the busy flag ([`ThreadCache::try_push`]
//! via [`CacheInner::free_to_list`]). It reads the link offset and `high` mark from the list itself (copied
//! there by the first full-path free), so a power-of-two class is freed without touching the cache. Every other
//! outcome is one call into cold code: a busy list defers, a claimed one frees to the slab, and a full list, a
//! list not set up yet, or an object already at the head (a double free) goes, lock held, to `free_locked`.
//!
//! # The slow paths (all cold)
//!
//! - **full path** (`free_checked`, `free_slot`): validation (an object of the cache, at an object's start;
//!   debug checks), hardened caches (`free_hardened`: a free of an object whose link word decodes to a link is
//!   refused; caches with a free map: a free of an object whose map byte says free is refused), and the
//!   outcomes above.
//! - **flush**: the list grew past `high`: check the whole list and, in the same walk, cut the excess into runs
//!   of objects that share a slab (`scan_flush`, here); then give each run back to its slab with one CAS
//!   (`push_run`). A list with more runs than the walk records (frees in no particular order) is grouped by
//!   slab instead (`flush_grouped`: an on-stack table of chains, one per slab), so a slab still gets one push
//!   for all its objects. A push that makes a full slab non-full lists it; one that empties a slab counts an *empty
//!   event* so the background worker knows to shrink the cache. A list that fails the walk goes to
//!   `flush_checked`, which finds the damage with `check_chain` (in `checks`), cuts and reports it.
//! - **deferred**: the list is busy (a handler interrupted its owner): push on the list's deferred `Llist`; the
//!   owner drains it into its list the moment it clears busy (`drain_deferred`, checked like any chain).
//! - **shared**: no thread list: push straight onto the object's slab.
//! - **drain** (`drain_list`): a whole list and its deferred list back to the slabs (thread exit and reset,
//!   `trim`, cache destroy).
//!
//! Who can meet whom here: as for allocation (see `alloc`); a free onto a slab a shrink holds, see `shrink`.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::cache::{CacheInner, FLAG_DEBUG, FLAG_FREE_KEY, FLAG_HARDENED, FLAG_MAP_KEY};
use super::debug::{self, FreeError, FreeErrorKind};
use super::tables::SlabState;
use super::thread_cache::{self, ThreadCache, ThreadCaches, bump};
use crate::hooks::{self, Point};
use crate::page::desc::Info;
use crate::sync::local_lock::TryLock;
use crate::sync::slab_freelist::{LinkCodec, PushError};
use crate::sys::PAGE_SHIFT;

/// The free key: written into the second word of a freed object of a keyed cache (`FLAG_FREE_KEY`: the plain
/// kmalloc classes of 16 bytes or more, and plain `KmemCache`s whose free objects hold nothing), cleared by
/// every allocation. A free that finds it there refuses the object as a double
/// free — wherever the first free put it (this thread's list, another thread's, a slab) — where the cheap
/// head-of-list check alone would let `free(a); free(b); free(a)` hand `a` out twice. (glibc's tcache keeps
/// the same kind of key.) A live object whose second word the program set to exactly this value is refused
/// too: reported, counted and leaked, never corrupting. Caches that cannot carry it in the object (free
/// contents that keep meaning, 8-byte objects) keep the same mark in their slabs' free map ([`FREE_MARK`],
/// `FLAG_MAP_KEY`), checked on the full path.
pub const FREE_KEY: u64 = 0x6e6f_6c6f_636b_f7ee;

/// The free key's word in `slot` (its second word; the link word is the first).
#[inline(always)]
fn free_key_word(slot: usize) -> &'static AtomicU64 {
    // SAFETY: `slot` is an object of a keyed class (16 bytes or more, 8-aligned) that the caller owns or is
    // freeing; arena memory is never unmapped. Like link words, the word is accessed atomically while free.
    unsafe { &*((slot + 8) as *const AtomicU64) }
}

/// Claim the free of `slot` (an object of a keyed class): false if it holds the free key already (a double
/// free; nothing written), otherwise write the key and return true.
#[inline(always)]
fn take_free_key(slot: usize) -> bool {
    let w = free_key_word(slot);
    if w.load(Ordering::Relaxed) == FREE_KEY {
        return false;
    }
    w.store(FREE_KEY, Ordering::Relaxed);
    true
}

/// The free map's byte of a free object (see `FLAG_MAP_KEY`); an allocated object's is 0.
pub const FREE_MARK: u8 = 0xf7;

/// Claim the free of an object of a free-map cache whose map byte is `b`: false if it is marked free already (a
/// double free; nothing written), otherwise mark it and return true.
#[inline(always)]
fn take_map_mark(b: &core::sync::atomic::AtomicU8) -> bool {
    if b.load(Ordering::Relaxed) == FREE_MARK {
        return false;
    }
    b.store(FREE_MARK, Ordering::Relaxed);
    true
}

/// Clear the free key of `slot`, an object of a keyed class being allocated.
#[inline(always)]
pub(super) fn clear_free_key(slot: usize) {
    free_key_word(slot).store(0, Ordering::Relaxed);
}

/// Outcome of [`ThreadCache::try_push`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Push {
    /// Pushed; the lock is released.
    Done,
    /// Pushed, and frees deferred by a nested context are waiting: the caller drains them. The lock is released.
    DoneDrain,
    /// A context this one interrupted holds the lock: the caller defers the free.
    Busy,
    /// Another thread claimed the list: the caller frees straight to the slab.
    Claimed,
    /// Not pushed: the list would pass its `high` mark, is not set up yet, or starts with this very object (a
    /// double free). **The caller holds the lock**: it finishes the free on the full path and unlocks.
    Locked,
}

impl ThreadCache {
    /// Free fast path: take the lock and push `slot` (a validated object of this list's cache) unless the list
    /// would pass its `high` mark, is not set up yet, or already starts with `slot`.
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, never blocks.
    #[inline(always)]
    pub fn try_push(&self, slot: usize) -> Push {
        match self.lock.try_lock() {
            TryLock::Locked => {}
            TryLock::Busy => return Push::Busy,
            TryLock::Claimed => return Push::Claimed,
        }
        let head = self.freelist.load(Ordering::Relaxed);
        let count = self.count.load(Ordering::Relaxed) + 1;
        if head == slot || count > self.high.load(Ordering::Relaxed) {
            return Push::Locked;
        }
        hooks::point(Point::FreeFast);
        // `high != 0`, so `link_off` is the cache's.
        self.push_locked(slot, head, count, self.link_off.load(Ordering::Relaxed) as usize);
        self.lock.unlock();
        if self.deferred.is_empty() { Push::Done } else { Push::DoneDrain }
    }

    /// Put `slot` in front of the list, whose first object is `head`; the list then holds `count` objects.
    ///
    /// # Context
    /// The holder of the lock.
    #[inline(always)]
    pub fn push_locked(&self, slot: usize, head: usize, count: u32, link_off: usize) {
        // SAFETY: `slot` is a validated object of this list's cache given up by the caller; `link_off` is in
        // bounds and pointer-aligned.
        let link = unsafe { &*((slot + link_off) as *const AtomicUsize) };
        link.store(head, Ordering::Relaxed);
        self.freelist.store(slot, Ordering::Relaxed);
        self.count.store(count, Ordering::Relaxed);
        bump(&self.free_fast);
    }
}

impl CacheInner {
    /// The free fast path shared by `kfree_nolock` (`only: None`) and `KmemCache::free_nolock` (`only: Some(id)`):
    /// if `addr` is exactly an object of a plain (non-debug) cache, of cache `only` if given, and the calling
    /// thread has used its lists, free it through the thread's list and return true. Otherwise do nothing and return
    /// false: the caller takes its full path, which validates and reports.
    ///
    /// # Context
    /// Any context: async-signal-safe, reentrant, never blocks.
    #[inline(always)]
    pub fn free_fast(g: &SlabState, addr: usize, only: Option<u16>) -> bool {
        if g.arena.contains(addr)
            && let info = g.arena.info_of(addr)
            && info.is_plain_slab()
            && only.is_none_or(|id| id == info.cache_id())
            && let Some(t) = thread_cache::current_if_any()
        {
            let id = info.cache_id();
            let shift = info.stride_shift();
            // Power-of-two stride, slab aligned to it, no tail: one mask test, no load from the cache. Otherwise
            // the cache's reciprocal says whether `addr` starts a slot.
            let slot_ok = if shift != 0 {
                addr & ((1usize << shift) - 1) == 0
            } else {
                g.cache(id).index_of(addr - g.arena.page_addr(info.head() as usize)).is_some()
            };
            if slot_ok {
                // Slabs of caches whose objects carry the free key say so in their descriptor, and so do slabs
                // that keep the mark in a free map (whose stride is never a power-of-two shift, so the cache is
                // at hand). An object marked free already: the full path reports the double free.
                if info.is_keyed() {
                    if !take_free_key(addr) {
                        return false;
                    }
                } else if info.is_mapped() && !take_map_mark(g.cache(id).cfg().map_byte(addr)) {
                    return false;
                }
                // The cache itself is looked up only on the way out to a slow path, not on the push.
                match t.list(id).try_push(addr) {
                    Push::Done => {}
                    other => g.cache(id).free_declined(g, t, id, addr, other),
                }
                return true;
            }
        }
        false
    }

    /// The fast push of `free_fast` declined (`outcome` is not `Done`): finish the free on the matching path.
    #[cold]
    #[inline(never)]
    fn free_declined(&self, g: &SlabState, t: &ThreadCaches, id: u16, slot: usize, outcome: Push) {
        let tc = t.list(id);
        match outcome {
            Push::Done => {}
            Push::DoneDrain => self.drain_deferred(g, t, tc),
            Push::Busy => self.free_deferred(tc, slot),
            Push::Claimed => self.free_shared(g, slot),
            Push::Locked => {
                self.free_locked(g, t, tc, slot, true);
            }
        }
    }

    /// Free a validated slot through the list `id` of `t` (the calling thread's): the fast push, or one
    /// call for each other case. With `report`, a double free is reported here rather than left to the caller
    /// (so that the free fast paths end in tail calls). Returns false for a double free.
    ///
    /// # Context
    /// Any context, on the thread that owns `t`.
    #[inline(always)]
    pub fn free_to_list(&self, g: &SlabState, t: &ThreadCaches, id: u16, slot: usize, report: bool) -> bool {
        let tc = t.list(id);
        match tc.try_push(slot) {
            Push::Done => true,
            Push::DoneDrain => {
                self.drain_deferred(g, t, tc);
                true
            }
            Push::Busy => {
                self.free_deferred(tc, slot);
                true
            }
            Push::Claimed => {
                self.free_shared(g, slot);
                true
            }
            Push::Locked => self.free_locked(g, t, tc, slot, report),
        }
    }

    /// The fast push declined and the caller holds the list's lock: set the list up on its first full-path
    /// free, refuse a double free, push, flush past `high`, unlock, drain what nested contexts deferred.
    #[cold]
    #[inline(never)]
    pub(super) fn free_locked(
        &self,
        g: &SlabState,
        t: &ThreadCaches,
        tc: &ThreadCache,
        slot: usize,
        report: bool,
    ) -> bool {
        hooks::point(Point::FreeFast);
        let c = self.cfg();
        if tc.high.load(Ordering::Relaxed) == 0 {
            // First full-path free on this list since the cache id was set up: give the fast path its copy.
            tc.link_off.store(c.link_off, Ordering::Relaxed);
            tc.high.store(c.high, Ordering::Relaxed);
        }
        let head = tc.freelist.load(Ordering::Relaxed);
        if head == slot {
            tc.lock.unlock();
            if report {
                debug::report(&self.double_free(slot + c.obj_off as usize));
            }
            return false;
        }
        let count = tc.count.load(Ordering::Relaxed) + 1;
        tc.push_locked(slot, head, count, c.link_off as usize);
        self.pushed_unlock(g, t, tc, count);
        true
    }

    /// The lock holder pushed an object and the list now holds `count`: flush past `high`, unlock, drain what
    /// nested contexts deferred meanwhile (the tail of every full-path push, plain or hardened).
    #[inline(always)]
    fn pushed_unlock(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache, count: u32) {
        let high = self.cfg().high;
        if count > high {
            self.flush(g, t, tc, high / 2);
        }
        tc.lock.unlock();
        if !tc.deferred.is_empty() {
            self.drain_deferred(g, t, tc);
        }
    }

    /// Validate `addr` (an object of this cache, id `id`, on the slab `info` describes) and free it; a refused
    /// free is counted in `bad_frees` and returned. Any context.
    pub fn free_checked(&self, g: &'static SlabState, id: u16, addr: usize, info: Info) -> Result<(), FreeError> {
        match self.validate(g, addr, info) {
            Ok(slot) if self.free_slot(g, id, slot) => Ok(()),
            Ok(_) => Err(self.double_free(addr)),
            Err(e) => {
                self.counters.bad_frees.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Check that `addr` is an allocated object of this cache, whose slab head page is `info.head()`.
    /// Returns its slot.
    #[inline(always)]
    pub fn validate(&self, g: &SlabState, addr: usize, info: Info) -> Result<usize, FreeError> {
        let c = self.cfg();
        let base = g.pages.page_addr(info.head() as usize);
        let rel = addr.wrapping_sub(base).wrapping_sub(c.obj_off as usize);
        let Some(_) = self.index_of(rel) else {
            return Err(self.interior_error(g, addr, info));
        };
        let slot = addr - c.obj_off as usize;
        if c.flags & FLAG_DEBUG != 0 {
            debug::on_free(self, addr, slot)?;
        }
        Ok(slot)
    }

    #[cold]
    pub(super) fn interior_error(&self, g: &SlabState, addr: usize, info: Info) -> FreeError {
        let c = self.cfg();
        let base = g.pages.page_addr(info.head() as usize);
        let off = addr - base;
        let idx = off / c.stride as usize;
        let start = base + idx * c.stride as usize + c.obj_off as usize;
        FreeError::new(FreeErrorKind::InteriorPointer { object: start, offset: addr as isize - start as isize }, addr)
            .in_cache(c.name)
    }

    /// Free a validated slot. `id` is this cache's id. Any context. Returns false (freeing nothing) when the
    /// slot is already the head of this thread's list: the cheap double-free check SLUB also makes.
    #[inline(never)]
    pub fn free_slot(&self, g: &'static SlabState, id: u16, slot: usize) -> bool {
        let flags = self.cfg().flags;
        if flags & FLAG_HARDENED != 0 {
            return self.free_hardened(g, id, slot);
        }
        if flags & FLAG_FREE_KEY != 0 && !take_free_key(slot) {
            return false;
        }
        if flags & FLAG_MAP_KEY != 0 && !take_map_mark(self.cfg().map_byte(slot)) {
            return false;
        }
        match thread_cache::current(g) {
            Some(t) => self.free_to_list(g, t, id, slot, false),
            None => {
                self.free_shared(g, slot);
                true
            }
        }
    }

    /// `free_slot` for a hardened cache. The slot's link word tells whether it is free already: an allocated
    /// object's was cleared at allocation (or holds the user's data), a free one's decodes to 0 or to a slot of
    /// this cache — whichever list holds it, this thread's, another's, or a slab's. Such a free is refused (a
    /// double free; false). Otherwise the slot goes on this thread's list with an encoded link, or takes the
    /// same detours as the plain path (deferred, shared).
    #[cold]
    #[inline(never)]
    pub(super) fn free_hardened(&self, g: &'static SlabState, id: u16, slot: usize) -> bool {
        let now = self.next_of(slot);
        if now == 0 || self.is_slot(g, now, None) {
            return false;
        }
        let Some(t) = thread_cache::current(g) else {
            self.free_shared(g, slot);
            return true;
        };
        let tc = t.list(id);
        match tc.lock.try_lock() {
            TryLock::Locked => {}
            TryLock::Busy => {
                self.free_deferred(tc, slot);
                return true;
            }
            TryLock::Claimed => {
                self.free_shared(g, slot);
                return true;
            }
        }
        hooks::point(Point::FreeFast);
        let count = tc.count.load(Ordering::Relaxed) + 1;
        self.set_next(slot, tc.freelist.load(Ordering::Relaxed));
        tc.freelist.store(slot, Ordering::Relaxed);
        tc.count.store(count, Ordering::Relaxed);
        bump(&tc.free_fast);
        self.pushed_unlock(g, t, tc, count);
        true
    }

    /// A double free caught by `free_slot`: count it and build the error.
    #[cold]
    pub fn double_free(&self, addr: usize) -> FreeError {
        self.counters.bad_frees.fetch_add(1, Ordering::Relaxed);
        FreeError::new(FreeErrorKind::DoubleFree, addr).in_cache(self.cfg().name)
    }

    /// The list is busy: leave the object on the deferred list for the owner.
    #[cold]
    #[inline(never)]
    pub(super) fn free_deferred(&self, tc: &ThreadCache, slot: usize) {
        self.counters.deferred.fetch_add(1, Ordering::Relaxed);
        tc.deferred.push(slot, self.link(slot));
    }

    /// Push one object straight onto its slab.
    #[cold]
    #[inline(never)]
    pub fn free_shared(&self, g: &SlabState, slot: usize) {
        self.counters.shared_frees.fetch_add(1, Ordering::Relaxed);
        let head = g.pages.info_of(slot).head();
        self.push_run(g, head, slot, slot, 1, 0);
    }

    /// Give the objects of the thread's list back to their slabs, all but `keep` (from the head). Busy flag held.
    ///
    /// The whole list is checked first (every link a slot of this cache, no loop, as long as counted), so that a
    /// double free or a damaged link found here is cut out before it reaches a slab. A sound list is checked
    /// and grouped into runs of one slab in the same walk (`scan_flush`); one that is not goes to
    /// `flush_checked`, which finds the damage, cuts and reports it.
    #[cold]
    #[inline(never)]
    pub(super) fn flush(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache, keep: u32) {
        hooks::point(Point::FreeFlush);
        let first = tc.freelist.load(Ordering::Relaxed);
        let counted = tc.count.load(Ordering::Relaxed);
        let mut runs = [Run::default(); FLUSH_RUNS];
        match self.scan_flush(g, first, counted, counted.saturating_sub(keep), &mut runs) {
            Some(scan) => {
                if scan.left > 0 {
                    // More runs than the buffer holds: the list is fragmented (frees in no particular order).
                    // Group the objects by slab instead, so that a slab gets one push for all its objects.
                    self.flush_grouped(g, t, tc, counted.saturating_sub(keep));
                    bump(&tc.flushes);
                    return;
                }
                let tag = thread_cache::tag(g, t);
                for (i, r) in runs[..scan.nruns].iter().enumerate() {
                    let next = if i + 1 < scan.nruns { runs[i + 1].first } else { scan.rest };
                    // Detach the run first: `push_run` rewrites the link of `last`.
                    tc.freelist.store(next, Ordering::Relaxed);
                    tc.count.store(tc.count.load(Ordering::Relaxed) - r.k, Ordering::Relaxed);
                    self.push_run(g, r.head, r.first, r.last, r.k as u16, tag);
                }
            }
            None if first == 0 && counted == 0 => {}
            None => self.flush_checked(g, t, tc, keep),
        }
        bump(&tc.flushes);
    }

    /// A flush's check and grouping in one walk. Follows exactly `n` objects from `first` (the thread's list and
    /// its count), checking each as it is reached (a slot of this cache) and that the last one ends the list,
    /// and records the runs of the first `group` objects (at most `FLUSH_RUNS`; the rest of them are grouped
    /// later). Reads only. `None`: the list is not sound — a damaged link, another length, or a loop (the count
    /// bound catches it, as in `chain_sound`) — and the caller takes the diagnosing path (`check_chain`).
    ///
    /// # Context
    /// The owner of the list (busy held); any context.
    pub(super) fn scan_flush(
        &self,
        g: &SlabState,
        first: usize,
        n: u32,
        group: u32,
        runs: &mut [Run; FLUSH_RUNS],
    ) -> Option<Scan> {
        if self.codec().is_hardened() {
            self.scan_flush_in::<true>(g, first, n, group, runs)
        } else {
            self.scan_flush_in::<false>(g, first, n, group, runs)
        }
    }

    /// `scan_flush` for a cache whose links are encoded (`CODED`) or not.
    #[inline(never)]
    pub(super) fn scan_flush_in<const CODED: bool>(
        &self,
        g: &SlabState,
        first: usize,
        n: u32,
        group: u32,
        runs: &mut [Run; FLUSH_RUNS],
    ) -> Option<Scan> {
        let finder = self.slab_finder::<CODED>(g);
        let sh = finder.shape;
        if n == 0 {
            return None;
        }
        let (mut base, head) = finder.slot_slab(first)?;
        // `node` is the `seen`-th object, checked; while `grouping`, it is the last one of `run`.
        // `delta` and `ahead` as in `chain_sound`.
        let (mut node, mut seen, mut delta, mut ahead) = (first, 1u32, 0usize, false);
        let mut run = Run { first, last: first, head, k: 1 };
        let mut scan = Scan { nruns: 0, rest: 0, left: 0 };
        let mut grouping = group > 0;
        loop {
            let end = if grouping { group } else { n };
            if ahead {
                let (at, steps) = sh.run_ahead(base, node, delta, end - seen);
                node = at;
                seen += steps;
                if grouping {
                    run.last = node;
                    run.k += steps;
                }
            }
            if seen == end {
                if !grouping {
                    break;
                }
                grouping = false;
                runs[scan.nruns] = run;
                scan.nruns += 1;
                // SAFETY: `node` is a checked slot of this cache on the caller's list.
                scan.rest = unsafe { sh.load(node) };
                if seen == n {
                    break;
                }
                continue;
            }
            // SAFETY: as above.
            let next = unsafe { sh.load(node) };
            let rel = next.wrapping_sub(base);
            if rel < sh.slab_bytes {
                if !sh.slot_ok(rel) {
                    return None;
                }
                let d = next.wrapping_sub(node);
                ahead = d == delta;
                delta = d;
                if grouping {
                    run.last = next;
                    run.k += 1;
                }
            } else {
                let (b, h) = finder.slot_slab(next)?;
                base = b;
                (delta, ahead) = (0, false);
                if grouping {
                    runs[scan.nruns] = run;
                    scan.nruns += 1;
                    run = Run { first: next, last: next, head: h, k: 1 };
                    if scan.nruns == FLUSH_RUNS {
                        // The buffer is full: the run just started, and what follows it, are grouped later.
                        grouping = false;
                        scan.rest = next;
                        scan.left = group - seen;
                    }
                }
            }
            node = next;
            seen += 1;
        }
        // SAFETY: as above.
        (unsafe { sh.load(node) } == 0).then_some(scan)
    }

    /// `flush` of a list `scan_flush` found unsound: check it with `check_chain` (which cuts the damage out and
    /// reports it), then give back all but `keep`.
    #[cold]
    #[inline(never)]
    pub(super) fn flush_checked(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache, keep: u32) {
        let mut obj = tc.freelist.load(Ordering::Relaxed);
        let counted = tc.count.load(Ordering::Relaxed);
        let len = if obj != 0 {
            self.check_chain(g, obj, Some(counted), None, self.codec()).0
        } else {
            if counted != 0 {
                self.report_length(counted, 0);
            }
            0
        };
        if len != counted {
            if len == 0 {
                tc.freelist.store(0, Ordering::Relaxed);
                obj = 0;
            }
            tc.count.store(len, Ordering::Relaxed);
        }
        self.flush_runs(g, t, tc, obj, len.saturating_sub(keep));
    }

    /// Give back the first `left` objects of the thread's list, checked already, grouped by slab: each object is
    /// linked into the chain of its slab in a small direct-mapped table on the stack (`GROUP_SLABS` entries,
    /// indexed by the slab's number; a slab that finds its entry taken by another pushes that one's chain
    /// first), and each chain goes back with one push. Frees in random order then cost about one push per slab
    /// rather than one per object when their objects come from a few dozen slabs.
    ///
    /// # Context
    /// The owner of the list (busy held); any context. No allocation: the table is on the stack (768 bytes).
    #[inline(never)]
    pub(super) fn flush_grouped(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache, left: u32) {
        if self.codec().is_hardened() {
            self.flush_grouped_in::<true>(g, t, tc, left);
        } else {
            self.flush_grouped_in::<false>(g, t, tc, left);
        }
    }

    /// `flush_grouped` for a cache whose links are encoded (`CODED`) or not.
    #[inline(always)]
    fn flush_grouped_in<const CODED: bool>(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache, left: u32) {
        let finder = self.slab_finder::<CODED>(g);
        let sh = finder.shape;
        // Slabs are aligned to their size (up to 64 pages), so consecutive slabs get consecutive entries.
        let shift = (sh.slab_bytes >> PAGE_SHIFT).trailing_zeros();
        let tag = thread_cache::tag(g, t);
        // One chain per entry (`k == 0`: empty): `first` its most recently added object, `last` the first one
        // (whose link `push_run` rewrites).
        let mut tab = [Run::default(); GROUP_SLABS];
        // The entry of the previous object and its slab's start: the next object is often in the same slab.
        let (mut hint, mut hint_base) = (0usize, usize::MAX);
        let mut obj = tc.freelist.load(Ordering::Relaxed);
        let mut taken = 0u32;
        while taken < left && obj != 0 {
            // SAFETY: `obj` is a checked slot of this cache on our list (busy held).
            let next = unsafe { sh.load(obj) };
            taken += 1;
            let e = if obj.wrapping_sub(hint_base) < sh.slab_bytes {
                &mut tab[hint]
            } else {
                let head = finder.head_of(obj);
                hint = (head >> shift) as usize % GROUP_SLABS;
                hint_base = finder.page_addr(head);
                let e = &mut tab[hint];
                if e.k > 0 && e.head != head {
                    // The objects taken so far are off the list from here on: the push rewrites links.
                    self.push_run(g, e.head, e.first, e.last, e.k as u16, tag);
                    e.k = 0;
                }
                if e.k == 0 {
                    *e = Run { first: obj, last: obj, head, k: 0 };
                }
                e
            };
            if e.k > 0 {
                // SAFETY: as above; `obj` has left the list (its successor is read).
                unsafe { sh.store(obj, e.first) };
                e.first = obj;
            }
            // A sound list holds no object twice, so a chain never exceeds its slab's capacity (a u16).
            e.k += 1;
            obj = next;
        }
        // Detach what was taken, then give back the chains still in the table. Until this store the list still
        // starts with objects some of which are back in their slabs; nothing reads it meanwhile: the busy flag
        // keeps nested contexts off, a claimer waits for it, and a list whose busy flag is never cleared (its
        // context left by `longjmp`, or a fork child's thread that is gone) is dropped unwalked
        // (`thread_cache`).
        tc.freelist.store(obj, Ordering::Relaxed);
        tc.count.store(tc.count.load(Ordering::Relaxed) - taken, Ordering::Relaxed);
        for r in tab.iter().filter(|r| r.k > 0) {
            self.push_run(g, r.head, r.first, r.last, r.k as u16, tag);
        }
    }

    /// Give back `left` objects of the thread's list, from `obj` (its head), checked already: one push per run of
    /// objects that share a slab.
    pub(super) fn flush_runs(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache, mut obj: usize, mut left: u32) {
        let slab_bytes = (self.cfg().slab_pages as usize) << PAGE_SHIFT;
        while left > 0 && obj != 0 {
            let head = g.pages.info_of(obj).head();
            let base = g.pages.page_addr(head as usize);
            let first = obj;
            let mut last = obj;
            let mut k: u16 = 1;
            let mut next = self.next_of(obj);
            left -= 1;
            while left > 0 && next != 0 && next.wrapping_sub(base) < slab_bytes && k < u16::MAX {
                last = next;
                next = self.next_of(next);
                k += 1;
                left -= 1;
            }
            // Detach the run first: `push_run` rewrites the link of `last`.
            tc.freelist.store(next, Ordering::Relaxed);
            tc.count.store(tc.count.load(Ordering::Relaxed) - u32::from(k), Ordering::Relaxed);
            self.push_run(g, head, first, last, k, thread_cache::tag(g, t));
            obj = next;
        }
    }

    /// Push the chain `first ..= last` (`k` objects of the slab at `head`) onto the slab.
    pub(super) fn push_run(&self, g: &SlabState, head: u32, first: usize, last: usize, k: u16, owner_tag: u32) {
        let d = g.pages.desc(head as usize);
        let geo = self.geometry(g, head);
        // `first` is a checked slot, so the reciprocal gives its index exactly (no division on the flush path).
        let idx = (((first - geo.base) as u64).wrapping_mul(self.cfg().recip) >> 32) as u32;
        debug_assert_eq!(idx as usize, (first - geo.base) / geo.stride);
        // SAFETY: the chain's objects belong to this slab (checked at free time) and are given up by the caller.
        match unsafe { d.slab.push_chain_coded(&geo, self.codec(), idx, last, k) } {
            Ok(p) => {
                if p.listed_now {
                    self.list_push(g, head);
                }
                if p.empty_now {
                    let events = self.counters.empty_events.fetch_add(1, Ordering::Relaxed) + 1;
                    if events.wrapping_sub(self.shrunk_at.load(Ordering::Relaxed)) == KICK_AFTER_EMPTY {
                        super::shrink::request_shrink();
                    }
                }
                let owner = d.owner.load(Ordering::Relaxed);
                if owner_tag != 0 && owner != 0 && owner != owner_tag {
                    self.counters.remote.fetch_add(u64::from(k), Ordering::Relaxed);
                }
            }
            Err(e) => {
                // The slab's counters say these objects were not in use: a double free that got past the checks
                // (debug mode catches it earlier). The objects are dropped rather than corrupting the slab.
                self.counters.bad_frees.fetch_add(u64::from(k), Ordering::Relaxed);
                let kind = match e {
                    PushError::Underflow => FreeErrorKind::DoubleFree,
                    PushError::Dead => FreeErrorKind::NotAllocated,
                };
                debug::report(&FreeError::new(kind, first + self.cfg().obj_off as usize).in_cache(self.cfg().name));
            }
        }
    }

    /// Move frees deferred by nested contexts onto the thread's list. Called right after clearing busy.
    #[cold]
    #[inline(never)]
    pub(super) fn drain_deferred(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache) {
        loop {
            let locked = match tc.lock.try_lock() {
                // A nested context holds it and will drain when it unlocks.
                TryLock::Busy => return,
                TryLock::Locked => true,
                TryLock::Claimed => false,
            };
            let chain = tc.deferred.take_all();
            if chain == 0 || !locked {
                if locked {
                    tc.lock.unlock();
                }
                // A claimed list: return the deferred objects straight to their slabs (checked like any chain;
                // the deferred list's links are plain, written by `Llist`).
                let n = if chain == 0 { 0 } else { self.check_chain(g, chain, None, None, LinkCodec::PLAIN).0 };
                let mut obj = chain;
                for _ in 0..n {
                    let next = self.link(obj).load(Ordering::Relaxed);
                    self.free_shared(g, obj);
                    obj = next;
                }
                if tc.deferred.is_empty() {
                    return;
                }
                continue;
            }
            hooks::point(Point::DeferredDrain);
            let count = self.splice(g, tc, chain);
            if count > self.cfg().high {
                self.flush(g, t, tc, self.cfg().high / 2);
            }
            tc.lock.unlock();
            if tc.deferred.is_empty() {
                return;
            }
        }
    }

    /// Put a chain taken from the deferred list (non-empty, linked through plain link words by `Llist`) in
    /// front of the thread's list; returns the list's new length. The chain is checked on the way (a loop —
    /// an object freed twice while the list was busy — or a damaged link is cut out), and a hardened cache's
    /// links are encoded. The caller has exclusive use of `tc`.
    pub(super) fn splice(&self, g: &SlabState, tc: &ThreadCache, chain: usize) -> u32 {
        let (n, tail) = self.check_chain(g, chain, None, None, LinkCodec::PLAIN);
        if n == 0 {
            return tc.count.load(Ordering::Relaxed);
        }
        if self.codec().is_hardened() {
            let mut obj = chain;
            for _ in 1..n {
                let next = self.link(obj).load(Ordering::Relaxed);
                self.set_next(obj, next);
                obj = next;
            }
        }
        self.set_next(tail, tc.freelist.load(Ordering::Relaxed));
        tc.freelist.store(chain, Ordering::Relaxed);
        let count = tc.count.load(Ordering::Relaxed) + n;
        tc.count.store(count, Ordering::Relaxed);
        count
    }

    /// Return everything in a thread list (and its deferred list) to the slabs. The caller has exclusive use
    /// of `tc` (its owner is this thread at a safe point, or gone, or the list is claimed and quiescent); the
    /// lock flags are left as they were.
    pub fn drain_list(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache) {
        let deferred = tc.deferred.take_all();
        if deferred != 0 {
            self.splice(g, tc, deferred);
        }
        if tc.count.load(Ordering::Relaxed) != 0 || tc.freelist.load(Ordering::Relaxed) != 0 {
            self.flush(g, t, tc, 0);
        }
    }
}

/// Slabs that become empty between two shrinks before the worker is woken early.
pub(super) const KICK_AFTER_EMPTY: u64 = 64;

/// A run of a flush: objects of the thread's list that share a slab, consecutive ones (`scan_flush`) or a chain
/// `flush_grouped` links.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Run {
    /// First object of the run (the one nearest the list's head).
    first: usize,
    /// Last object of the run.
    last: usize,
    /// Head page of their slab.
    head: u32,
    /// Objects in the run (at most the slab's capacity in a list found sound: it holds no object twice).
    k: u32,
}

/// Runs a flush records while it checks the list; a list that has more is fragmented, and the flush groups its
/// objects by slab instead (`flush_grouped`: a second walk over the part given back).
pub(super) const FLUSH_RUNS: usize = 16;

/// Entries of a grouped flush's table (`flush_grouped`): slabs whose objects it gathers at once.
pub(super) const GROUP_SLABS: usize = 32;

/// What `scan_flush` found in a sound list.
#[derive(Clone, Copy, Debug)]
pub(super) struct Scan {
    /// Runs recorded, in list order: `runs[..nruns]`.
    nruns: usize,
    /// The object after the last one in a recorded run (0: the list ends there).
    rest: usize,
    /// Objects from `rest` on that are still to be given back (runs that did not fit in the buffer).
    left: u32,
}
