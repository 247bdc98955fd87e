//! Allocation: the fast path at the top, then what it falls back to.
//!
//! # The fast path
//!
//! [`alloc_fast`] is the one allocation fast path, for the kmalloc classes (`kmalloc_nolock`) and every
//! `KmemCache` alike: the calling thread's list of the cache, reached with one thread-local load, popped under
//! its busy flag by [`ThreadCache::try_pop`] — straight-line code with no call, ~25 instructions, no saved
//! register and no touch of the cache itself. Each other outcome is one tail call into cold code: frees
//! deferred by a nested context waiting (`drain_then_finish`), an empty list, whose lock the caller still
//! holds (`refill_then_finish`); a busy or claimed list, or a thread that has not used its lists yet, goes to
//! the caller's full path.
//!
//! # The slow paths (all cold)
//!
//! - **full path** (`alloc_full`, `alloc_local`): fault injection, a thread's first call (it claims its thread
//!   slot), hardened caches (`alloc_local_hardened`: every popped link is checked), and the outcomes above.
//! - **refill**: the list is empty: pop a slab off the partial list and take *all* its free objects with one
//!   CAS ([`SlabFreelist::take_all`](crate::sync::slab_freelist::SlabFreelist::take_all)), or carve a new slab.
//!   The chain is checked in one walk (`chain_sound`, here: each link an object of the slab, no loop, the
//!   counted length), linked in address order if it wandered through its slab (`relink_in_order`), and becomes
//!   the thread's list. A chain that fails goes to `check_chain` (in `checks`), which cuts and reports.
//! - **busy**: the thread's list is busy (a signal handler interrupted its owner): the paired fallback cache
//!   (type-safe caches), else the shared path. kmalloc tries the next size class first (`kmalloc`).
//! - **shared** (`alloc_shared`): no usable thread list: pop a slab off the partial list, take *one* object, put
//!   the slab back.
//! - **out of pages**: `new_slab` releases every cache's empty slabs once and retries; a refill or shared
//!   allocation that still finds nothing asks `rescue` (in `shrink`) before it fails.
//!
//! Who can meet whom here: a signal handler on the same thread meets the owner only through the busy flag (it
//! takes another route); other threads meet this thread only on slabs and partial lists (tagged CAS), and a
//! cache destroy through the claim of the list (see `thread_cache`); shrinks, see `shrink`.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::cache::{CacheInner, FLAG_DEBUG, FLAG_FREE_KEY, FLAG_HARDENED, FLAG_MAP_KEY, NO_FALLBACK};
use super::checks::{Shape, prefetch_links};
use super::debug;
use super::tables::SlabState;
use super::thread_cache::{self, ThreadCache, ThreadCaches, bump};
use crate::hooks::{self, Point};
use crate::page::Gfp;
use crate::page::desc::Info;
use crate::sync::local_lock::TryLock;
use crate::sync::slab_freelist::{LISTED, State};

/// Outcome of [`ThreadCache::try_pop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Pop {
    /// An object; the lock is released.
    Obj(usize),
    /// An object, and frees deferred by a nested context are waiting: the caller drains them (off the fast
    /// path). The lock is released.
    ObjDrain(usize),
    /// The lock could not be taken: a context this one interrupted holds it, or another thread claimed the list.
    Busy,
    /// The list is empty. **The caller holds the lock**: it refills the list (or fails) and unlocks.
    Empty,
}

impl ThreadCache {
    /// Allocation fast path: take the lock and pop the first object of the list, whose link words sit at
    /// `link_off`.
    ///
    /// Straight-line code with no calls, so that the callers' other cases can be tail calls and the fast path
    /// saves no registers.
    ///
    /// # Context
    /// The owning thread and its signal handlers: async-signal-safe, never blocks.
    #[inline(always)]
    pub fn try_pop(&self, link_off: usize) -> Pop {
        if self.lock.try_lock() != TryLock::Locked {
            return Pop::Busy;
        }
        let head = self.freelist.load(Ordering::Relaxed);
        if head == 0 {
            return Pop::Empty;
        }
        hooks::point(Point::AllocFast);
        // SAFETY: `head` is a free object on our list (busy held); its link word is at `link_off`.
        let link = unsafe { &*((head + link_off) as *const AtomicUsize) };
        self.freelist.store(link.load(Ordering::Relaxed), Ordering::Relaxed);
        self.count.store(self.count.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Relaxed);
        bump(&self.alloc_fast);
        self.lock.unlock();
        if self.deferred.is_empty() { Pop::Obj(head) } else { Pop::ObjDrain(head) }
    }
}

/// The allocation fast path, shared by `kmalloc_nolock` (a plain size class) and `KmemCache::alloc_nolock`:
/// pop the calling thread's list of cache `id`, whose link words sit at `link_off`, and `finish` the object.
/// `None`: this thread has no list to use (it has not used its lists yet, has no slot, or the list is busy or
/// claimed): the caller takes its full path. Every outcome but a plain pop is one tail call into cold code.
///
/// # Context
/// Any context: async-signal-safe, reentrant, never blocks.
#[inline(always)]
pub(crate) fn alloc_fast(
    g: &SlabState,
    id: u16,
    link_off: usize,
    flags: Gfp,
    finish: impl FnOnce(usize) -> NonNull<u8>,
) -> Option<Option<NonNull<u8>>> {
    let me = thread_cache::current_if_any()?;
    match me.list(id).try_pop(link_off) {
        Pop::Obj(slot) => Some(Some(finish(slot))),
        Pop::ObjDrain(slot) => Some(g.cache(id).drain_then_finish(g, me, id, slot, flags)),
        Pop::Empty => Some(g.cache(id).refill_then_finish(g, me, id, flags)),
        Pop::Busy => None,
    }
}

/// Outcome of the thread-list allocation attempt.
pub enum Got {
    /// A slot address.
    Obj(usize),
    /// The thread's list for this cache is busy (a nested context) or claimed.
    Busy,
    /// No memory.
    Oom,
}

impl CacheInner {
    /// Allocate one object. Never returns `Busy`: a busy thread list sends the allocation down the shared path.
    #[inline(always)]
    pub fn alloc(&self, g: &'static SlabState, id: u16, flags: Gfp) -> Option<NonNull<u8>> {
        if !g.fault_active()
            && self.cfg().flags & FLAG_HARDENED == 0
            && let Some(r) =
                alloc_fast(g, id, self.cfg().link_off as usize, flags, |slot| self.finish_alloc(slot, flags))
        {
            return r;
        }
        self.alloc_full(g, id, flags)
    }

    /// Turn a slot into the user pointer: debug checks and zeroing.
    #[inline(always)]
    pub fn finish_alloc(&self, slot: usize, flags: Gfp) -> NonNull<u8> {
        let c = self.cfg();
        if c.flags & (FLAG_DEBUG | FLAG_HARDENED | FLAG_FREE_KEY | FLAG_MAP_KEY) != 0 {
            if c.flags & FLAG_FREE_KEY != 0 {
                super::free::clear_free_key(slot);
            } else if c.flags & FLAG_MAP_KEY != 0 {
                c.map_byte(slot).store(0, Ordering::Relaxed);
            } else {
                self.finish_checked(slot);
            }
        }
        let obj = slot + c.obj_off as usize;
        if flags.contains(Gfp::ZERO) {
            // SAFETY: the object is ours and `size` bytes long.
            unsafe { core::ptr::write_bytes(obj as *mut u8, 0, c.size as usize) };
        }
        // SAFETY: arena addresses are never null.
        unsafe { NonNull::new_unchecked(obj as *mut u8) }
    }

    /// A fast-path pop found frees deferred by a nested context waiting: drain them, then finish the object.
    #[cold]
    #[inline(never)]
    pub fn drain_then_finish(
        &self,
        g: &SlabState,
        t: &ThreadCaches,
        id: u16,
        slot: usize,
        flags: Gfp,
    ) -> Option<NonNull<u8>> {
        self.drain_deferred(g, t, t.list(id));
        Some(self.finish_alloc(slot, flags))
    }

    /// A fast-path pop found the list empty and holds its lock: refill, unlock, finish the object.
    #[cold]
    #[inline(never)]
    pub fn refill_then_finish(&self, g: &SlabState, t: &ThreadCaches, id: u16, flags: Gfp) -> Option<NonNull<u8>> {
        let slot = self.refill_and_unlock(g, t, t.list(id))?;
        Some(self.finish_alloc(slot, flags))
    }

    /// The full allocation path: fault injection, a thread's first call, busy, claimed and empty lists.
    #[inline(never)]
    pub(super) fn alloc_full(&self, g: &'static SlabState, id: u16, flags: Gfp) -> Option<NonNull<u8>> {
        if g.fault_active() && self.inject_fault() {
            return None;
        }
        let slot = match self.alloc_local(g, id, self.cfg().link_off as usize) {
            Got::Obj(s) => s,
            Got::Busy => return self.alloc_busy(g, flags),
            Got::Oom => return None,
        };
        Some(self.finish_alloc(slot, flags))
    }

    /// This thread's list is busy (a signal handler interrupted its owner): take the object from the paired
    /// fallback cache, whose list is almost certainly free, else from the shared slab lists.
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_busy(&self, g: &'static SlabState, flags: Gfp) -> Option<NonNull<u8>> {
        let fb = self.cfg().fallback;
        if fb != NO_FALLBACK {
            let f = g.cache(fb);
            if let Got::Obj(slot) = f.alloc_local(g, fb, f.cfg().link_off as usize) {
                self.counters.fallback_allocs.fetch_add(1, Ordering::Relaxed);
                return Some(f.finish_alloc(slot, flags));
            }
        }
        self.alloc_shared(g).map(|slot| self.finish_alloc(slot, flags))
    }

    /// `finish_alloc` of a debug or hardened cache: debug checks; a hardened object's link word is cleared, so
    /// that only a free object's link word decodes to a free-list link (which is how a free spots a double free).
    #[cold]
    #[inline(never)]
    pub(super) fn finish_checked(&self, slot: usize) {
        let c = self.cfg();
        if c.flags & FLAG_DEBUG != 0 {
            debug::on_alloc(self, slot);
        }
        if c.flags & FLAG_HARDENED != 0 {
            self.link(slot).store(0, Ordering::Relaxed);
        }
    }

    /// Pop a slot from the calling thread's list (claiming the thread's slot on its first call, refilling an
    /// empty list). `id` is this cache's id and `link_off` its link offset (passed in so that callers that know
    /// it as a constant save a load).
    #[inline(always)]
    pub fn alloc_local(&self, g: &'static SlabState, id: u16, link_off: usize) -> Got {
        debug_assert_eq!(link_off, self.cfg().link_off as usize);
        let Some(t) = thread_cache::current(g) else {
            return match self.alloc_shared(g) {
                Some(s) => Got::Obj(s),
                None => Got::Oom,
            };
        };
        let tc = t.list(id);
        if self.cfg().flags & FLAG_HARDENED != 0 {
            return self.alloc_local_hardened(g, t, tc);
        }
        match tc.try_pop(link_off) {
            Pop::Obj(slot) => Got::Obj(slot),
            Pop::ObjDrain(slot) => {
                self.drain_deferred(g, t, tc);
                Got::Obj(slot)
            }
            Pop::Busy => Got::Busy,
            Pop::Empty => self.refill_and_unlock(g, t, tc).map_or(Got::Oom, Got::Obj),
        }
    }

    /// `alloc_local` for a hardened cache: the pop checks that the link it follows decodes to a slot of this
    /// cache; a damaged link is reported and not followed (the list, its head included, is dropped and leaked,
    /// and the list is refilled).
    #[cold]
    #[inline(never)]
    pub(super) fn alloc_local_hardened(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache) -> Got {
        if tc.lock.try_lock() != TryLock::Locked {
            return Got::Busy;
        }
        let head = tc.freelist.load(Ordering::Relaxed);
        if head != 0 {
            hooks::point(Point::AllocFast);
            let next = self.next_of(head);
            if next == 0 || self.is_slot(g, next, None) {
                tc.freelist.store(next, Ordering::Relaxed);
                tc.count.store(tc.count.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Relaxed);
                bump(&tc.alloc_fast);
                tc.lock.unlock();
                if !tc.deferred.is_empty() {
                    self.drain_deferred(g, t, tc);
                }
                return Got::Obj(head);
            }
            tc.freelist.store(0, Ordering::Relaxed);
            tc.count.store(0, Ordering::Relaxed);
            self.report_corrupt(head, next);
        }
        self.refill_and_unlock(g, t, tc).map_or(Got::Oom, Got::Obj)
    }

    /// The thread's list is empty and the caller holds its lock: refill it, unlock, drain what nested contexts
    /// deferred meanwhile. Returns the first object, or `None` when out of memory.
    #[cold]
    #[inline(never)]
    pub(super) fn refill_and_unlock(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache) -> Option<usize> {
        hooks::point(Point::AllocFast);
        let slot = self.refill(g, t, tc);
        tc.lock.unlock();
        if !tc.deferred.is_empty() {
            self.drain_deferred(g, t, tc);
        }
        (slot != 0).then_some(slot)
    }

    /// The thread's list is empty: refill it from a partial slab or a new one. Busy flag held.
    #[cold]
    #[inline(never)]
    pub(super) fn refill(&self, g: &SlabState, t: &ThreadCaches, tc: &ThreadCache) -> usize {
        let (head, first, n) = match self.take_partial(g) {
            Some(t) => t,
            None => match self.new_slab(g) {
                Some((head, first)) => (head, first, self.cfg().capacity),
                None => match self.rescue(g, true) {
                    Some(t) => t,
                    None => {
                        self.counters.failures.fetch_add(1, Ordering::Relaxed);
                        return 0;
                    }
                },
            },
        };
        g.pages.desc(head as usize).owner.store(thread_cache::tag(g, t), Ordering::Relaxed);
        hooks::point(Point::AllocRefill);
        tc.freelist.store(self.next_of(first), Ordering::Relaxed);
        tc.count.store(u32::from(n) - 1, Ordering::Relaxed);
        bump(&tc.alloc_refill);
        first
    }

    /// Pop a partial slab and take all its free objects: (head page, first object, count), checked.
    pub(super) fn take_partial(&self, g: &SlabState) -> Option<(u32, usize, u16)> {
        while let Some(head) = self.list_pop(g) {
            let geo = self.geometry(g, head);
            let (first, n) = g.pages.desc(head as usize).slab.take_all(&geo);
            if let Some(t) = self.checked_chain(g, head, first, n) {
                return Some(t);
            }
        }
        None
    }

    /// A chain of `n` objects just taken from the slab at `head`, about to become a thread's list: check it
    /// (every link an object of that slab, no loop, `n` long: `chain_sound`, and `check_chain` to cut and report
    /// damage) and return what is sound. A sound chain that wanders through the slab is linked again in address
    /// order (slabs of at most `SORT_MAX` objects), so that the walks that follow go through it in order.
    #[inline]
    pub(super) fn checked_chain(&self, g: &SlabState, head: u32, first: usize, n: u16) -> Option<(u32, usize, u16)> {
        if n == 0 {
            return None;
        }
        let mut set = SlotSet::default();
        let sort = usize::from(self.cfg().capacity) <= SORT_MAX;
        match self.chain_sound(g, head, first, u32::from(n), sort.then_some(&mut set)) {
            Some(Order::Steady) => return Some((head, first, n)),
            Some(Order::Mixed) if sort => return Some((head, self.relink_in_order(g, head, &set), n)),
            Some(Order::Mixed) => return Some((head, first, n)),
            None => {}
        }
        let (kept, _) = self.check_chain(g, first, Some(u32::from(n)), Some(head), self.codec());
        (kept > 0).then_some((head, first, kept as u16))
    }

    /// The check of a chain whose length is known, for the common case: whether the chain from `first` is
    /// exactly `n` slots of the slab at `head` followed by the end (0). Reads only; one pass, no bookkeeping.
    /// With `set`, also records which slots the chain holds. Returns `None` if not, otherwise whether the chain
    /// goes through the slab at one regular step.
    ///
    /// The count bound is the loop check: a chain that loops never reaches 0, so it fails it; one that reaches
    /// 0 after `n` steps visited no slot twice. `None` (damage, or another length) sends the caller to
    /// `check_chain`, which walks again to find and cut the damage and report it.
    ///
    /// # Context
    /// The owner of the chain; any context.
    pub(super) fn chain_sound(
        &self,
        g: &SlabState,
        head: u32,
        first: usize,
        n: u32,
        set: Option<&mut SlotSet>,
    ) -> Option<Order> {
        if self.codec().is_hardened() {
            self.chain_sound_in::<true>(g, head, first, n, set)
        } else {
            self.chain_sound_in::<false>(g, head, first, n, set)
        }
    }

    /// `chain_sound` for a cache whose links are encoded (`CODED`) or not.
    #[inline(never)]
    pub(super) fn chain_sound_in<const CODED: bool>(
        &self,
        g: &SlabState,
        head: u32,
        first: usize,
        n: u32,
        mut set: Option<&mut SlotSet>,
    ) -> Option<Order> {
        let sh = self.shape::<CODED>();
        let base = g.pages.page_addr(head as usize);
        let rel = first.wrapping_sub(base);
        if n == 0 || rel >= sh.slab_bytes || !sh.slot_ok(rel) {
            return None;
        }
        // The chain is in one slab: ask for the link words of all its slots at once rather than wait for one miss
        // per link (unless most slots are in use, and not on the chain).
        let capacity = u32::from(self.cfg().capacity);
        if n.saturating_mul(4) >= capacity {
            prefetch_links(base + sh.link_off, sh.stride, capacity);
        }
        if let Some(set) = set.as_deref_mut() {
            set.add(sh.index(rel));
        }
        // `delta`: the step between the last two slots; `ahead`: the one before was the same; `step`: the first
        // step (0: none yet), and `steady` whether every step so far was the same.
        let (mut node, mut seen, mut delta, mut ahead) = (first, 1u32, 0usize, false);
        let (mut step, mut steady) = (0usize, true);
        while seen < n {
            if ahead {
                let (at, steps) = sh.run_ahead(base, node, delta, n - seen);
                if let Some(set) = set.as_deref_mut() {
                    set.add_steps(&sh, base, node, at, delta, steps);
                }
                node = at;
                seen += steps;
                if seen == n {
                    break;
                }
            }
            // SAFETY: `node` is a checked slot of this cache on the caller's chain.
            let next = unsafe { sh.load(node) };
            let rel = next.wrapping_sub(base);
            if rel >= sh.slab_bytes || !sh.slot_ok(rel) {
                return None;
            }
            if let Some(set) = set.as_deref_mut() {
                set.add(sh.index(rel));
            }
            let d = next.wrapping_sub(node);
            if step == 0 {
                step = d;
            }
            steady &= d == step;
            ahead = d == delta;
            delta = d;
            node = next;
            seen += 1;
        }
        // SAFETY: as above.
        (unsafe { sh.load(node) } == 0).then_some(if steady { Order::Steady } else { Order::Mixed })
    }

    /// Link the free slots `set` of the slab at `head` (the caller's, just checked) in address order, the last
    /// one ending the chain; returns the first. Later walks over them, the allocations' pops included, then go
    /// through memory in order, which the CPU (and `run_ahead`) can run ahead on.
    pub(super) fn relink_in_order(&self, g: &SlabState, head: u32, set: &SlotSet) -> usize {
        let geo = self.geometry(g, head);
        let mut first = 0;
        let mut prev = 0;
        for (w, &word) in set.0.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let slot = geo.obj(w as u32 * 64 + bits.trailing_zeros());
                if prev == 0 {
                    first = slot;
                } else {
                    self.set_next(prev, slot);
                }
                prev = slot;
                bits &= bits - 1;
            }
        }
        self.set_next(prev, 0);
        first
    }

    /// Allocate without a thread list: one object from a partial slab, or a new slab. Any context.
    #[cold]
    #[inline(never)]
    pub fn alloc_shared(&self, g: &SlabState) -> Option<usize> {
        let slot = self.alloc_shared_inner(g)?;
        self.counters.shared_allocs.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    pub(super) fn alloc_shared_inner(&self, g: &SlabState) -> Option<usize> {
        if let Some((_, slot)) = self.pop_partial_one(g) {
            return Some(slot);
        }
        let Some((head, first)) = self.new_slab(g) else {
            return match self.rescue(g, false) {
                Some((_, slot, _)) => Some(slot),
                None => {
                    self.counters.failures.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
        };
        let d = g.pages.desc(head as usize);
        if self.cfg().capacity > 1 {
            let second = self.next_of(first);
            let idx = ((second - g.pages.page_addr(head as usize)) / self.cfg().stride as usize) as u32;
            d.slab.init(State::new(idx + 1, 1, LISTED));
            self.list_push(g, head);
        } else {
            d.slab.init(State::new(0, 1, 0));
        }
        Some(first)
    }

    /// Pop a partial slab, take one object, put the slab back unless it is now empty: (head page, object).
    pub(super) fn pop_partial_one(&self, g: &SlabState) -> Option<(u32, usize)> {
        while let Some(head) = self.list_pop(g) {
            hooks::point(Point::AllocShared);
            let d = g.pages.desc(head as usize);
            match d.slab.pop_one_coded(&self.geometry(g, head), self.codec()) {
                Ok(Some((slot, emptied))) => {
                    if !emptied {
                        self.list_push(g, head);
                    }
                    return Some((head, slot));
                }
                // Found empty (someone without the take right emptied it) and unlisted: drop it.
                Ok(None) => continue,
                Err(e) => self.report_corrupt(e.obj, e.link),
            }
        }
        None
    }

    /// Carve a new slab; all its objects are in use by the caller as one chain from the returned first slot.
    pub(super) fn new_slab(&self, g: &SlabState) -> Option<(u32, usize)> {
        let c = *self.cfg();
        let pages = c.slab_pages as usize;
        let head = match g.pages.alloc_run(pages, c.slab_align()) {
            Some(h) => h,
            None => {
                // Out of pages: give back other caches' empty slabs once and retry.
                super::shrink::reclaim_empty_slabs(g);
                g.pages.alloc_run(pages, c.slab_align())?
            }
        };
        hooks::point(Point::SlabNew);
        // Debug and hardened slabs are not "plain": the free fast path sends their objects to the full path.
        let checked = c.flags & (FLAG_DEBUG | FLAG_HARDENED) != 0;
        let (keyed, mapped) = (c.flags & FLAG_FREE_KEY != 0, c.flags & FLAG_MAP_KEY != 0);
        let info = Info::slab(self.id(), head as u32, checked, c.stride_shift, keyed, mapped);
        for p in head..head + pages {
            g.pages.desc(p).set_info(info);
        }
        let d = g.pages.desc(head);
        d.owner.store(0, Ordering::Relaxed);
        let geo = self.geometry(g, head as u32);
        let debug = c.flags & FLAG_DEBUG != 0;
        for i in 0..u32::from(c.capacity) {
            let slot = geo.obj(i);
            let next = if i + 1 < u32::from(c.capacity) { geo.obj(i + 1) } else { 0 };
            if debug {
                debug::init_slot(self, slot);
            }
            // The constructor runs once per object per slab life; the link it may overwrite is written after.
            c.construct(slot + c.obj_off as usize);
            self.set_next(slot, next);
        }
        d.slab.init(State::new(0, c.capacity, 0));
        self.nr_slabs.fetch_add(1, Ordering::Relaxed);
        self.counters.slabs_allocated.fetch_add(1, Ordering::Relaxed);
        Some((head as u32, geo.obj(0)))
    }

    /// Fault injection: whether to fail this allocation.
    #[cold]
    #[inline(never)]
    pub fn inject_fault(&self) -> bool {
        let nth = self.fault.every_nth.load(Ordering::Relaxed);
        let prob = self.fault.prob.load(Ordering::Relaxed);
        if nth == 0 && prob == 0 {
            return false;
        }
        let call = self.fault.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let fail = (nth != 0 && call.is_multiple_of(u64::from(nth)))
            || (prob != 0 && (splitmix64(call ^ (self as *const Self as u64)) as u32) < prob);
        if fail {
            self.counters.injected.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }
}

/// Largest slab, in objects, whose chain a refill links in address order (`relink_in_order`).
pub(super) const SORT_MAX: usize = 512;

/// Slots of one slab of at most `SORT_MAX` objects, by index.
#[derive(Clone, Debug)]
pub(super) struct SlotSet([u64; SORT_MAX / 64]);

impl Default for SlotSet {
    fn default() -> Self {
        Self([0; SORT_MAX / 64])
    }
}

impl SlotSet {
    /// Add slot `i`.
    #[inline(always)]
    pub(super) fn add(&mut self, i: u32) {
        let i = i as usize % SORT_MAX;
        self.0[i / 64] |= 1 << (i % 64);
    }

    /// Add the `steps` slots `delta` bytes apart after `from`, the last of which is `to` (what a `run_ahead`
    /// from `from` passed).
    #[inline]
    pub(super) fn add_steps<const CODED: bool>(
        &mut self,
        sh: &Shape<CODED>,
        base: usize,
        from: usize,
        to: usize,
        delta: usize,
        steps: u32,
    ) {
        let (a, b) = (sh.index(from.wrapping_sub(base)), sh.index(to.wrapping_sub(base)));
        let (lo, hi) = if a < b { (a + 1, b) } else { (b, a.wrapping_sub(1)) };
        if steps > 0 && hi.wrapping_sub(lo).wrapping_add(1) == steps && (hi as usize) < SORT_MAX {
            // Neighbouring slots: whole words at a time.
            let (lo, hi) = (lo as usize, hi as usize);
            for w in lo / 64..=hi / 64 {
                let from_bit = if w == lo / 64 { lo % 64 } else { 0 };
                let to_bit = if w == hi / 64 { hi % 64 } else { 63 };
                self.0[w] |= (u64::MAX >> (63 - to_bit)) & (u64::MAX << from_bit);
            }
            return;
        }
        let mut at = from;
        for _ in 0..steps {
            at = at.wrapping_add(delta);
            self.add(sh.index(at.wrapping_sub(base)));
        }
    }
}

/// How a sound chain goes through its slab (`chain_sound`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// At one regular step (in address order, either way, or every other slot...).
    Steady,
    /// Otherwise.
    Mixed,
}

pub(super) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
