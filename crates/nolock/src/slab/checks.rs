//! The free-list checks every slow path shares: walking a chain of free objects without trusting it, and
//! cutting and reporting what is damaged.
//!
//! # What is checked, where, and how fast
//!
//! Free lists are walked, and so checked, on the slow paths only (each link an object of the cache, no loop, the
//! counted length; damage is cut out and reported, never followed): a flush checks the whole thread list, a
//! refill the chain it takes, a deferred drain its chain, and a shrink verifies that a slab counting no object
//! in use really has all of them on its list before it releases it (`verify_empty`). That is what catches a
//! double free not at the head of a list (it makes the list loop).
//!
//! Where the length is known (flush, refill, release), the walk is one pass that remembers nothing: it checks
//! each link as it follows it and takes exactly the counted number of steps; the list must end there. A list
//! that loops never ends, so the count bound is the loop check, and a list that ends there holds no object
//! twice. The flush's walk also cuts the runs it gives back (`scan_flush`), the refill's notes which slots the
//! chain holds (`chain_sound`). Only a list that fails is walked again, by `check_chain` (Brent's cycle finding
//! and the exact place of the damage), which cuts and reports. These walks wait for memory, one link after the
//! other, so they are helped along: the refill first asks for the link words of the whole slab at once
//! (`prefetch_links`); a chain that wanders through its slab is then linked again in address order, which
//! makes the lists built from it go through memory at a regular step; and a walk over such a stretch guesses
//! each next link before loading it (`run_ahead`), so that its loads overlap. Hardened caches
//! (`FLAG_HARDENED`) store links encoded ([`LinkCodec`]) with a per-cache key, never take the inline fast
//! paths (the Info word marks their slabs non-plain, `alloc` tests the flag), check every link they pop, and
//! refuse a free of an object whose link word decodes to a link (`free_hardened`). The full account of what
//! each mode catches is in the `debug` module.
//!
//!
//! This file holds the shared pieces: [`Shape`] (the configuration a walk keeps in registers, and
//! `run_ahead`), `walk_chain` / `check_chain` / `cut_loop` (the diagnosing walk), `prefetch_links`, `follow`,
//! and the reports. The one-pass checks are next to their paths: `chain_sound` in `alloc` (refill, and the
//! shrink's `verify_empty`), `scan_flush` in `free` (flush).

use core::sync::atomic::Ordering;

use super::cache::CacheInner;
use super::debug;
use super::tables::SlabState;
use crate::page::ArenaView;
use crate::sync::slab_freelist::LinkCodec;
use crate::sys::PAGE_SHIFT;

/// The configuration a walk over free lists uses (`CacheInner::shape`); `CODED`: the links are encoded (a
/// hardened cache), so that a plain cache's walk has no decoding in its loop.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape<const CODED: bool> {
    pub(super) link_off: usize,
    pub(super) slab_bytes: usize,
    pub(super) limit: usize,
    pub(super) stride: usize,
    pub(super) recip: u64,
    /// `stride_shift` of the configuration (0: the stride is not a power of two filling the slab).
    pub(super) shift: u32,
    pub(super) codec: LinkCodec,
}

impl<const CODED: bool> Shape<CODED> {
    /// The decoded link of the free slot `slot`.
    ///
    /// # Safety
    /// `slot` is a slot of this cache (arena memory, never unmapped) on a list the caller owns.
    #[inline(always)]
    pub(super) unsafe fn load(&self, slot: usize) -> usize {
        let at = slot + self.link_off;
        // SAFETY: the link word is inside the slot, pointer-aligned (caller); free slots' link words are only
        // accessed atomically.
        let word = unsafe { &*(at as *const core::sync::atomic::AtomicUsize) }.load(Ordering::Relaxed);
        if CODED { self.codec.decode(at, word) } else { word }
    }

    /// Make `next` the link of the free slot `slot`, encoded as this cache stores links.
    ///
    /// # Safety
    /// `slot` is a slot of this cache that the caller owns (free, on a list it holds).
    #[inline(always)]
    pub(super) unsafe fn store(&self, slot: usize, next: usize) {
        let at = slot + self.link_off;
        let word = if CODED { self.codec.encode(at, next) } else { next };
        // SAFETY: as for `load`.
        unsafe { &*(at as *const core::sync::atomic::AtomicUsize) }.store(word, Ordering::Relaxed);
    }

    /// The index of the slot at offset `rel` from its slab's start.
    #[inline(always)]
    pub(super) fn index(&self, rel: usize) -> u32 {
        if self.shift != 0 { (rel >> self.shift) as u32 } else { ((rel as u64).wrapping_mul(self.recip) >> 32) as u32 }
    }

    /// Whether the offset `rel` (below the slab size) from a slab's start is exactly a slot start.
    #[inline(always)]
    pub(super) fn slot_ok(&self, rel: usize) -> bool {
        if self.shift != 0 {
            return rel & ((1usize << self.shift) - 1) == 0;
        }
        let idx = ((rel as u64).wrapping_mul(self.recip) >> 32) as usize;
        idx * self.stride == rel && rel < self.limit
    }

    /// Follow a list from `node` (a checked slot of the slab at `base`) for at most `max` steps while each link
    /// is the slot `delta` bytes further and inside the slab: such a link needs no other check (`delta`, a
    /// difference of two slots of the slab, keeps it a slot). Returns the last slot reached and the steps
    /// taken; the caller checks the link that stopped it.
    ///
    /// Lists built by a run of frees usually hold the slots of a slab at a regular step, so the walk tells the
    /// CPU where the next link is before the current one is loaded (`follow`), and the loads overlap.
    #[inline(always)]
    pub(super) fn run_ahead(&self, base: usize, mut node: usize, delta: usize, max: u32) -> (usize, u32) {
        // Steps that stay inside the slab's slots: no per-step range check.
        let rel = (node - base) as u32;
        let room = match delta as isize {
            d if d > 0 => (self.limit as u32 - 1 - rel) / d as u32,
            d if d < 0 => rel / d.unsigned_abs() as u32,
            _ => max,
        };
        let max = max.min(room);
        let mut steps = 0;
        while steps < max {
            let guess = node.wrapping_add(delta);
            // SAFETY: `node` is a checked slot on the caller's list.
            if unsafe { self.load(node) } != guess {
                break;
            }
            node = follow(guess);
            steps += 1;
        }
        (node, steps)
    }
}

/// What [`CacheInner::slab_finder`] gives: the slab lookup of a walk, with everything it reads held by value.
#[derive(Clone, Copy)]
pub(super) struct SlabFinder<const CODED: bool> {
    arena: ArenaView,
    id: u16,
    pub(super) shape: Shape<CODED>,
}

impl<const CODED: bool> SlabFinder<CODED> {
    /// If `addr` is a slot of a live slab of this cache: that slab's start and head page (the descriptor lookup
    /// of `is_slot`).
    #[inline(always)]
    pub(super) fn slot_slab(&self, addr: usize) -> Option<(usize, u32)> {
        if !self.arena.contains(addr) {
            return None;
        }
        let info = self.arena.info_of(addr);
        if !info.is_slab_of(self.id) {
            return None;
        }
        let base = self.arena.page_addr(info.head() as usize);
        // `addr` lies in the slab's pages, so its offset is below the slab's size, as `slot_ok` requires.
        self.shape.slot_ok(addr - base).then_some((base, info.head()))
    }

    /// The head page of the slab of `addr`, a checked slot of this cache.
    #[inline(always)]
    pub(super) fn head_of(&self, addr: usize) -> u32 {
        self.arena.info_of(addr).head()
    }

    /// Address of page `page`.
    #[inline(always)]
    pub(super) fn page_addr(&self, page: u32) -> usize {
        self.arena.page_addr(page as usize)
    }
}

/// What `walk_chain` found.
#[derive(Clone, Copy, Debug)]
pub(super) struct Walk {
    /// Slots walked (in a sound chain: its length).
    pub(super) len: u32,
    /// The last slot walked.
    pub(super) last: usize,
    /// What is wrong, if anything.
    pub(super) damage: Damage,
}

/// Damage `walk_chain` found in a chain of free slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Damage {
    /// None: the chain ends in 0.
    None,
    /// The slot `at` links to `link`, not a slot (`at` 0: the chain's head `link` is no slot); `before` is the
    /// slot linking to `at` (0: `at` is the head).
    Link { before: usize, at: usize, link: usize },
    /// The chain loops; the loop is `lam` slots long.
    Loop { lam: u32 },
}

impl CacheInner {
    /// What a walk over free lists needs from the configuration, read once, so that its loop keeps it in
    /// registers.
    #[inline(always)]
    pub(super) fn shape<const CODED: bool>(&self) -> Shape<CODED> {
        let c = self.cfg();
        debug_assert_eq!(CODED, self.codec().is_hardened());
        Shape {
            link_off: c.link_off as usize,
            slab_bytes: (c.slab_pages as usize) << PAGE_SHIFT,
            limit: c.limit as usize,
            stride: c.stride as usize,
            recip: c.recip,
            shift: c.stride_shift,
            codec: self.codec(),
        }
    }

    /// The lookup walks over many slabs make (`scan_flush`, `flush_grouped`): the arena's geometry and this
    /// cache's identity and slot shape copied into a value the walk keeps in registers, so that finding an
    /// address's slab is one descriptor load and one compare.
    #[inline(always)]
    pub(super) fn slab_finder<const CODED: bool>(&self, g: &SlabState) -> SlabFinder<CODED> {
        SlabFinder { arena: g.arena, id: self.id(), shape: self.shape::<CODED>() }
    }

    /// Walk the chain of free slots from `first`, whose links are stored through `codec`, checking that `first`
    /// and every link are slots of this cache (of the slab at `slab` if given) and that the chain does not
    /// loop (Brent's algorithm: no extra reads on a sound chain). Reads only.
    ///
    /// # Context
    /// Any context; the chain should be the caller's (a probe of a chain others may change gives no
    /// guarantee, and its caller re-checks that nothing changed before it believes damage).
    pub(super) fn walk_chain(&self, g: &SlabState, first: usize, slab: Option<u32>, codec: LinkCodec) -> Walk {
        let link_off = self.cfg().link_off as usize;
        let slab_bytes = (self.cfg().slab_pages as usize) << PAGE_SHIFT;
        let next_of = |slot: usize| codec.decode(slot + link_off, self.link(slot).load(Ordering::Relaxed));
        // The slab of the last slot checked: a successor in the same slab needs no descriptor lookup.
        let mut base = slab.map_or(usize::MAX, |h| g.pages.page_addr(h as usize));
        let mut is_slot = |addr: usize| {
            let rel = addr.wrapping_sub(base);
            if rel < slab_bytes {
                return self.index_of(rel).is_some();
            }
            if slab.is_some() || !self.is_slot(g, addr, None) {
                return false;
            }
            base = g.pages.page_addr(g.pages.info_of(addr).head() as usize);
            true
        };
        if !is_slot(first) {
            return Walk { len: 0, last: 0, damage: Damage::Link { before: 0, at: 0, link: first } };
        }
        let (mut before, mut hare, mut len) = (0usize, first, 1u32);
        let (mut tortoise, mut power, mut lam) = (first, 1u32, 0u32);
        loop {
            let next = next_of(hare);
            if next == 0 {
                return Walk { len, last: hare, damage: Damage::None };
            }
            if !is_slot(next) {
                return Walk { len, last: hare, damage: Damage::Link { before, at: hare, link: next } };
            }
            before = hare;
            hare = next;
            len += 1;
            lam += 1;
            if hare == tortoise {
                return Walk { len, last: hare, damage: Damage::Loop { lam } };
            }
            if lam == power {
                tortoise = hare;
                power = power.saturating_mul(2);
                lam = 0;
            }
        }
    }

    /// Walk the chain of free slots from `first` (see `walk_chain`) and make it sound. With `expect`, a sound
    /// chain must also be that long. Returns how many slots are kept from `first` and the last of them.
    ///
    /// On damage the chain is cut where it is still sound, reported, and the rest leaked (counted in use by
    /// its slab for good), never followed: a link that is not a slot (a write after free) cuts the chain before
    /// the slot holding it; a loop (a double free, which links the object in front of a list it is already
    /// on) keeps every slot once and cuts the link that closes the loop.
    ///
    /// # Context
    /// The owner of the chain (it is off every shared list, or its slab's take right is held); any context.
    #[inline(never)]
    pub(super) fn check_chain(
        &self,
        g: &SlabState,
        first: usize,
        expect: Option<u32>,
        slab: Option<u32>,
        codec: LinkCodec,
    ) -> (u32, usize) {
        let link_off = self.cfg().link_off as usize;
        let next_of = |slot: usize| codec.decode(slot + link_off, self.link(slot).load(Ordering::Relaxed));
        let cut = |slot: usize| self.link(slot).store(codec.encode(slot + link_off, 0), Ordering::Relaxed);
        let w = self.walk_chain(g, first, slab, codec);
        match w.damage {
            Damage::None => {
                if let Some(n) = expect
                    && n != w.len
                {
                    self.report_length(n, w.len);
                }
                (w.len, w.last)
            }
            Damage::Link { before, at, link } => {
                // `at` was written after it was freed (0: the chain's head is no slot): drop it and what follows.
                self.report_corrupt(at, link);
                if before == 0 {
                    return (0, 0);
                }
                cut(before);
                (w.len - 1, before)
            }
            Damage::Loop { lam } => self.cut_loop(first, lam, &next_of, &cut),
        }
    }

    /// `check_chain` found a loop of length `lam`: find where it starts (the object linked twice), keep every
    /// slot once, report. Returns (slots kept, last kept).
    #[cold]
    #[inline(never)]
    pub(super) fn cut_loop(
        &self,
        first: usize,
        lam: u32,
        next_of: &dyn Fn(usize) -> usize,
        cut: &dyn Fn(usize),
    ) -> (u32, usize) {
        let mut ahead = first;
        for _ in 0..lam {
            ahead = next_of(ahead);
        }
        let (mut start, mut mu) = (first, 0u32);
        while start != ahead {
            start = next_of(start);
            ahead = next_of(ahead);
            mu += 1;
        }
        // `start` is the first slot of the loop; the slot `lam - 1` links after it closes the loop.
        let mut last = start;
        for _ in 1..lam {
            last = next_of(last);
        }
        cut(last);
        self.counters.bad_frees.fetch_add(1, Ordering::Relaxed);
        debug::report_freelist_loop(self.name(), start + self.cfg().obj_off as usize);
        (mu + lam, last)
    }

    /// A free list of this cache was found damaged at the slot `obj`, whose link word held `link` (decoded),
    /// not a slot of the cache (`obj` 0: the list's head itself is `link`): count and report it. The caller cut
    /// the list there.
    #[cold]
    #[inline(never)]
    pub(super) fn report_corrupt(&self, obj: usize, link: usize) {
        self.counters.debug_errors.fetch_add(1, Ordering::Relaxed);
        let obj = if obj == 0 { 0 } else { obj + self.cfg().obj_off as usize };
        debug::report_corrupt_link(self.name(), obj, link);
    }

    /// A free list of this cache holds `found` objects where its owner counted `counted`: count and report it.
    #[cold]
    #[inline(never)]
    pub(super) fn report_length(&self, counted: u32, found: u32) {
        self.counters.debug_errors.fetch_add(1, Ordering::Relaxed);
        debug::report_freelist_length(self.name(), u64::from(counted), u64::from(found));
    }
}

/// Cache lines `prefetch_links` asks for at most.
pub(super) const PREFETCH_MAX: usize = 128;

/// Start loading the cache lines of `count` link words, `stride` bytes apart from `first` (one request per line,
/// at most `PREFETCH_MAX`), so that the loads of a walk over them hit the cache instead of each waiting for its
/// own miss. A hint only: it changes no memory and never faults (x86-64; elsewhere it does nothing).
#[inline]
pub(super) fn prefetch_links(first: usize, stride: usize, count: u32) {
    #[cfg(target_arch = "x86_64")]
    {
        let step = stride.max(64);
        let end = first + (stride * count as usize).min(step * PREFETCH_MAX);
        let mut at = first;
        while at < end {
            // SAFETY: a prefetch is a hint: it reads nothing the program sees and never faults.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(at as *const i8) };
            at += step;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (first, stride, count);
}

/// `guess`, which the caller has just compared equal to a link it loaded, as a value the compiler cannot replace
/// with the loaded one: the CPU predicts the comparison and runs ahead with `guess` (computed from the previous
/// address, not loaded), so that the loads of a walk overlap instead of each waiting for the one before. A wrong
/// prediction costs one mispredicted branch.
#[inline(always)]
pub(super) fn follow(guess: usize) -> usize {
    #[cfg(all(not(miri), any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let mut v = guess;
        // SAFETY: no instruction at all (a comment): it only hides from the compiler that `v` equals the loaded
        // link, and touches no memory, stack or flags.
        unsafe { core::arch::asm!("/* {0} */", inout(reg) v, options(pure, nomem, nostack, preserves_flags)) };
        v
    }
    #[cfg(not(all(not(miri), any(target_arch = "x86_64", target_arch = "aarch64"))))]
    guess
}
