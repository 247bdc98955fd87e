//! `KmemCache`: a cache of fixed-size objects, and the alloc/free paths every object goes through.
//!
//! # Structure (after SLUB)
//!
//! A cache owns *slabs*: runs of pages from the page allocator, cut into `capacity` objects of `stride` bytes.
//! Each slab's state word (free-list head index, in-use count, flags) lives in the descriptor of its first page
//! ([`SlabFreelist`]). Slabs with free objects are on the cache's *partial list*: two [`TaggedStack`]s of head
//! page numbers, one that pushes go to and one a shrink drains (see "Shrinking"). Each thread has, per cache, a
//! private list of free objects ([`ThreadCache`], see `t`).
//!
//! # Paths
//!
//! - **alloc fast** ([`ThreadCache::try_pop`], from `alloc` and `kmalloc`): pop the thread's list under its busy
//!   flag, ~25 instructions with no call, no saved register and no touch of the cache itself. Each other
//!   outcome is one tail call: an empty list goes to refill with the lock still held; a busy or claimed list,
//!   or a thread without a t yet, goes to the full path (`alloc_local`), which claims a t or takes
//!   another route.
//! - **alloc refill** (cold): the list is empty: pop a slab off the partial list and take *all* its free objects
//!   with one CAS ([`SlabFreelist::take_all`]), or carve a new slab. The chain of objects is checked (one walk,
//!   see "Free-list checks"), linked in address order if it was not, and becomes the thread's list.
//! - **alloc shared** (cold): no usable thread list (no t, or the list is busy because a signal handler
//!   interrupted its owner): pop a slab off the partial list, take *one* object, put the slab back.
//! - **free fast** ([`ThreadCache::try_push`] via `free_to_list`, from `kfree_nolock` and
//!   `KmemCache::free_nolock`): push on the thread's list under its busy flag. It reads the link offset and
//!   `high` mark from the list itself (copied there by the first full-path free), so a power-of-two class is
//!   freed without touching the cache. A full list, a list not set up yet, or an object already at the head
//!   (double free) goes, lock held, to `free_locked`, which sets the list up, flushes or refuses.
//! - **flush** (cold): the list grew past `high`: check the whole list and, in the same walk, cut the excess
//!   into runs of objects that share a slab; then give each run back to its slab with one CAS. A push that
//!   makes a full slab non-full lists it; one that empties a slab counts an *empty event* so the worker knows
//!   to shrink the cache.
//! - **free deferred** (cold): the list is busy (a handler interrupted its owner): push on the list's deferred
//!   `Llist`; the owner drains it into its list the moment it clears busy.
//! - **free shared** (cold): no thread list: push straight onto the object's slab.
//! - **shrink** (the worker, `trim`, cache destroy, and any allocation that finds no page): move the partial
//!   slabs one at a time from one list to the other, releasing entirely free slabs beyond a small reserve.
//! - **rescue** (cold): an allocation found no partial slab and no page even after releasing every cache's empty
//!   slabs: before it fails, it looks at the lists again and takes the objects of the slab a shrink holds.
//!
//! Nothing here waits: every shared structure is changed by CAS, and a context that cannot use a structure
//! (busy) takes another route. Allocation fails only when neither a slab nor the page allocator has memory,
//! after one pass that releases every cache's empty slabs and a rescue.
//!
//! # Shrinking, and `None` only when memory is exhausted
//!
//! A slab's free objects can be taken only by whoever can find the slab; a slab off the partial lists is found
//! by nobody. A shrink used to take the whole partial list for its pass, and an allocation meanwhile — on
//! another thread, or in a signal handler on the shrinking thread — found no partial slab, no page, and failed
//! while thousands of freed objects sat in the slabs it held. Now:
//!
//! - the shrink flips `active` (pushes and pops start with the other list) and drains the old list one slab at
//!   a time: it *names* the top slab in the cache's `hand`, then pops it only if it is still the top
//!   ([`TaggedStack::pop_if`]), releases it if it is entirely free and beyond the reserve, and otherwise pushes
//!   it on the other list. At every instant each listed slab is on one of the two lists or in the hand;
//! - the rescue looks at the lists, the hand, the lists again — the direction slabs move — and repeats a look
//!   during which `moves` changed. A slab in the hand is taken from in place, without its take right:
//!   [`SlabFreelist::steal_all`] for a refill, [`SlabFreelist::pop_any`] for the shared path. The ABA tag in the
//!   slab's state word makes that safe against whoever holds the take right, and a stale name harmless.
//!
//! Who can meet whom (each shrink is alone on its cache: the `shrinking` flag):
//!
//! - *alloc (refill or shared) on another thread × shrink*: at most one slab is off the lists, named; the
//!   allocation pops the lists or, finding nothing, rescues from the hand. A shrink that keeps moving while the
//!   rescue looks makes it look again (at most `RESCUE_LOOKS` times: only a shrink that moves slabs faster than
//!   a rescue can look, sixty-four times in a row, could still make it fail).
//! - *alloc in a signal handler × a shrink it interrupted on the same thread* (trim, or an out-of-pages reclaim
//!   in the interrupted allocation): the shrink is frozen, so the rescue's first look is complete. If it froze
//!   between its kill of an empty slab and the page allocator's taking back the pages, those pages are in
//!   nobody's hands for that moment (the page allocator has the same window inside `free_run`): a handler that
//!   needs exactly them fails. That is the one window left.
//! - *free × shrink*: a free onto a slab in the hand sees it `LISTED` and does not list it; the shrink puts it
//!   back. A free that read `active` before the flip lists its slab on the list being drained; the shrink
//!   takes it with the rest (its pass is bounded by the number of slabs, plus slack for these).
//! - *rescue × shrink's decision*: a steal makes `used` non-zero, so the shrink's `try_kill` fails and the slab
//!   is kept; a killed slab is `DEAD` and gives nothing to a rescue.
//! - *rescue × a holder of the take right* (a refill or shared allocation that popped the named slab first):
//!   both change the state word by tagged CAS; the holder finds the list emptied and unlists the slab.
//! - *shrink × shrink* (trim, the worker, reclaims on several threads): one runs, the others skip (`shrink`) or
//!   wait (`shrink_wait`: trim and destroy, normal context only).
//! - *destroy*: claims every thread's list, then waits for any shrink and shrinks with no reserve; allocating
//!   from a cache being destroyed is the caller's bug (destroy takes the handle).
//!
//! Other short windows where a slab with free objects is off the lists remain and are not covered by the
//! rescue: a refill between popping a slab and taking its objects, the shared path while it holds a slab to
//! take one object, and a free between listing a slab (its CAS) and pushing it on a list. Each is a few
//! instructions on one slab.
//!
//! # Free-list checks and hardened caches
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
//! # Ordering
//!
//! Objects move between threads only through slab state words and partial lists: pushes are `Release`, takes
//! are `Acquire` (see `sync`). Per-thread lists are private to their owner and need no ordering beyond the
//! compiler fences that order them against signal handlers.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use super::thread_cache::{self, Pop, Push, ThreadCache, ThreadCaches, bump};
use crate::debug::{self, FreeError, FreeErrorKind};
use crate::global::{self, Global};
use crate::hooks::{self, Point};
use crate::page::Gfp;
use crate::page::desc::{Info, Kind};
use crate::rcu::GracePeriod;
use crate::sync::local_lock::TryLock;
use crate::sync::slab_freelist::{Geometry, LISTED, LinkCodec, PushError, State};
use crate::sync::tagged::TaggedStack;
use crate::sys::{PAGE_SHIFT, PAGE_SIZE};

/// Objects of this cache carry red zones, poison and an allocation state (slub_debug).
pub const FLAG_DEBUG: u32 = 1;
/// One of the kmalloc size-class caches.
pub const FLAG_KMALLOC: u32 = 2;
/// Hardened mode: encoded free-list links, checked on every pop and free (see `debug`).
pub const FLAG_HARDENED: u32 = 4;

/// Slabs that become empty between two shrinks before the worker is woken early.
const KICK_AFTER_EMPTY: u64 = 64;

/// Looks a rescue repeats while a shrink keeps moving slabs under it.
const RESCUE_LOOKS: usize = 64;

/// Maximum number of caches (the kmalloc classes included) alive at once.
pub const MAX_CACHES: usize = 256;
/// Largest object a `KmemCache` can hold.
pub const MAX_OBJECT_SIZE: usize = 1 << 20;
/// Largest alignment a `KmemCache` object can ask for.
pub const MAX_ALIGN: usize = 64 * PAGE_SIZE;

/// A cache's name, stored inline (no allocation). At most 31 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheName {
    bytes: [u8; 31],
    len: u8,
}

impl CacheName {
    /// Store `s`, cut to 31 bytes at a character boundary.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(31);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; 31];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self { bytes, len: end as u8 }
    }

    /// The name.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or("?")
    }
}

impl core::fmt::Debug for CacheName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl core::fmt::Display for CacheName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Immutable parameters of a cache, written once before the cache is published.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CacheConfig {
    /// Usable object size (what `ksize` reports).
    pub size: u32,
    /// Distance between slots in a slab.
    pub stride: u32,
    /// Offset of the user object inside its slot (debug caches: after the left red zone).
    pub obj_off: u32,
    /// Offset of the free-list link word inside a slot.
    pub link_off: u32,
    /// Pages per slab.
    pub slab_pages: u32,
    /// Objects per slab.
    pub capacity: u16,
    /// `ceil(2^32 / stride)`, to turn an offset into an index without dividing.
    pub recip: u64,
    /// Per-thread list length above which it is flushed (down to half).
    pub high: u32,
    /// `capacity * stride`: offsets of valid slots are below it.
    pub limit: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// Name, for reports and statistics.
    pub name: CacheName,
    /// Type-safe reuse (`SLAB_TYPESAFE_BY_*`): the grace period an empty slab waits for before its pages go
    /// back (`None`: it goes back at once, and freed objects may be reused as anything).
    pub typesafe: Option<GracePeriod>,
    /// Constructor run on each object when its slab is set up (`fn(NonNull<u8>)` as an address; 0: none).
    pub ctor: usize,
    /// Destructor run on each object when its slab is really released (0: none).
    pub dtor: usize,
    /// Id of the paired fallback cache (`NO_FALLBACK`: none).
    pub fallback: u16,
    /// log2 of `stride` when the stride is a power of two that divides the slab's alignment and the slab has no
    /// tail: then an address is an object exactly when it is a multiple of the stride (0: otherwise).
    pub stride_shift: u32,
    /// Hardened caches: the secret that link words are encoded with (0: plain links). Set by `create`.
    pub key: usize,
}

/// No fallback cache.
pub const NO_FALLBACK: u16 = u16::MAX;

impl CacheConfig {
    /// Compute the layout of a cache. `size` is the usable object size, `freeptr` the link offset inside the
    /// object (non-debug caches only).
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn new(name: &str, size: usize, align: usize, freeptr: usize, flags: u32) -> Self {
        let align = align.max(8);
        let osz = size.max(8).next_multiple_of(8);
        let (obj_off, link_off, stride) = if flags & FLAG_DEBUG != 0 {
            // [left red zone][object][right red zone 16][state 8][link 8]
            let left = 16usize.next_multiple_of(align);
            (left, left + osz + 24, (left + osz + 32).next_multiple_of(align))
        } else {
            (0, freeptr, osz.next_multiple_of(align))
        };
        let mut slab_pages = 1usize;
        while (slab_pages * PAGE_SIZE) / stride < 64 && slab_pages < 32 {
            slab_pages *= 2;
        }
        while slab_pages * PAGE_SIZE < stride || slab_pages * PAGE_SIZE < align {
            slab_pages *= 2;
        }
        let capacity = ((slab_pages * PAGE_SIZE) / stride).min(u16::MAX as usize);
        let high = (32768 / stride).clamp(16, 512).max(capacity);
        Self {
            size: osz as u32,
            stride: stride as u32,
            obj_off: obj_off as u32,
            link_off: link_off as u32,
            slab_pages: slab_pages as u32,
            capacity: capacity as u16,
            recip: (1u64 << 32).div_ceil(stride as u64),
            high: high as u32,
            limit: (capacity * stride) as u32,
            flags,
            name: CacheName::new(name),
            typesafe: None,
            ctor: 0,
            dtor: 0,
            fallback: NO_FALLBACK,
            key: 0,
            stride_shift: if stride.is_power_of_two()
                && stride <= slab_pages.min(64) * PAGE_SIZE
                && capacity * stride == slab_pages * PAGE_SIZE
            {
                stride.trailing_zeros()
            } else {
                0
            },
        }
    }

    /// Run the constructor (if any) on the object at `obj`.
    #[inline]
    fn construct(&self, obj: usize) {
        if self.ctor != 0 {
            // SAFETY: `ctor` was stored from a `fn(NonNull<u8>)`; `obj` is a fresh object of this cache.
            let f: fn(NonNull<u8>) = unsafe { core::mem::transmute::<usize, fn(NonNull<u8>)>(self.ctor) };
            // SAFETY: arena addresses are never null.
            f(unsafe { NonNull::new_unchecked(obj as *mut u8) });
        }
    }

    /// Run the destructor (if any) on the object at `obj`.
    fn destruct(&self, obj: usize) {
        if self.dtor != 0 {
            // SAFETY: as in `construct`.
            let f: fn(NonNull<u8>) = unsafe { core::mem::transmute::<usize, fn(NonNull<u8>)>(self.dtor) };
            // SAFETY: arena addresses are never null.
            f(unsafe { NonNull::new_unchecked(obj as *mut u8) });
        }
    }

    /// Alignment of a slab's first page, in pages.
    #[inline]
    fn slab_align(&self) -> usize {
        (self.slab_pages as usize).min(64)
    }
}

const STATE_FREE: u32 = 0;
const STATE_CREATING: u32 = 1;
const STATE_ACTIVE: u32 = 2;
const STATE_LEAKED: u32 = 3;

/// Cache-wide counters for events that may happen in nested contexts (atomic RMWs).
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Allocations that found their size class busy and moved to the next one.
    pub next_bucket: AtomicU64,
    /// Frees deferred because the thread's list was busy.
    pub deferred: AtomicU64,
    /// Objects flushed to a slab last taken by another thread.
    pub remote: AtomicU64,
    /// Allocations on the shared path.
    pub shared_allocs: AtomicU64,
    /// Frees on the shared path.
    pub shared_frees: AtomicU64,
    /// Allocations that failed: out of memory.
    pub failures: AtomicU64,
    /// Allocations failed on purpose by fault injection.
    pub injected: AtomicU64,
    /// Frees refused as invalid (foreign, interior, double, wrong cache, corrupted red zone), and double frees
    /// found later as a loop in a free list.
    pub bad_frees: AtomicU64,
    /// Damage found in free objects: debug-mode findings at allocation time (poison or red zone overwritten
    /// while free), and free lists with a damaged link or the wrong length.
    pub debug_errors: AtomicU64,
    /// Slabs created.
    pub slabs_allocated: AtomicU64,
    /// Slabs released to the page allocator.
    pub slabs_freed: AtomicU64,
    /// Times a slab became entirely free.
    pub empty_events: AtomicU64,
    /// Allocations served by the paired fallback cache because this one was busy.
    pub fallback_allocs: AtomicU64,
    /// Empty slabs waiting for a grace period before their pages go back (type-safe caches).
    pub pending_slabs: AtomicU64,
}

/// Fault injection settings of one cache.
#[derive(Debug, Default)]
pub struct Fault {
    /// Fail every n-th allocation (0: off).
    pub every_nth: AtomicU32,
    /// Fail with probability `prob / 2^32` (0: off).
    pub prob: AtomicU32,
    /// Allocation attempts seen while injection was on.
    pub calls: AtomicU64,
}

/// A cache slot in the global table. Zeroed memory is a free slot.
#[repr(C, align(64))]
pub(crate) struct CacheInner {
    cfg: UnsafeCell<CacheConfig>,
    state: AtomicU32,
    id: AtomicU32,
    /// Slabs with free objects: two lists, so that a shrink can move the slabs it keeps from one to the other
    /// one at a time (see "Shrinking"). Pushes go to `partial[active]`; pops try it first, then the other.
    partial: [TaggedStack; 2],
    /// Index of the list pushes go to (0 or 1); a shrink flips it and drains the other one.
    active: AtomicU32,
    /// Head page + 1 of the slab a shrink holds off the lists (0: none), named *before* it is taken off, so
    /// that an allocation that finds no memory can take its objects (`rescue`).
    hand: AtomicU32,
    /// Changes of `hand` and `active`: a rescue that saw it unchanged across its look saw every slab.
    moves: AtomicU64,
    /// Slabs currently owned by the cache.
    pub nr_slabs: AtomicU64,
    /// Event counters.
    pub counters: CacheCounters,
    /// Fault injection.
    pub fault: Fault,
    /// Empty events already handled by the last shrink.
    pub shrunk_at: AtomicU64,
    /// Whether a shrink is running (only one at a time; others skip).
    shrinking: AtomicBool,
}

// SAFETY: `cfg` is written only while the slot is reserved (STATE_CREATING, not yet published) and read-only
// afterwards; everything else is atomic.
unsafe impl Sync for CacheInner {}

/// What `walk_chain` found.
#[derive(Clone, Copy, Debug)]
struct Walk {
    /// Slots walked (in a sound chain: its length).
    len: u32,
    /// The last slot walked.
    last: usize,
    /// What is wrong, if anything.
    damage: Damage,
}

/// A run of a flush: consecutive objects of the thread's list that share a slab (see `scan_flush`).
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    /// First object of the run (the one nearest the list's head).
    first: usize,
    /// Last object of the run.
    last: usize,
    /// Head page of their slab.
    head: u32,
    /// Objects in the run (at most the slab's capacity in a list found sound: it holds no object twice).
    k: u32,
}

/// Runs a flush records while it checks the list; a flush that needs more groups the rest afterwards, as it
/// goes (a second walk over that part only).
const FLUSH_RUNS: usize = 16;

/// What `scan_flush` found in a sound list.
#[derive(Clone, Copy, Debug)]
struct Scan {
    /// Runs recorded, in list order: `runs[..nruns]`.
    nruns: usize,
    /// The object after the last one in a recorded run (0: the list ends there).
    rest: usize,
    /// Objects from `rest` on that are still to be given back (runs that did not fit in the buffer).
    left: u32,
}

/// Largest slab, in objects, whose chain a refill links in address order (`relink_in_order`).
const SORT_MAX: usize = 512;

/// Slots of one slab of at most `SORT_MAX` objects, by index.
#[derive(Clone, Debug)]
struct SlotSet([u64; SORT_MAX / 64]);

impl Default for SlotSet {
    fn default() -> Self {
        Self([0; SORT_MAX / 64])
    }
}

impl SlotSet {
    /// Add slot `i`.
    #[inline(always)]
    fn add(&mut self, i: u32) {
        let i = i as usize % SORT_MAX;
        self.0[i / 64] |= 1 << (i % 64);
    }

    /// Add the `steps` slots `delta` bytes apart after `from`, the last of which is `to` (what a `run_ahead`
    /// from `from` passed).
    #[inline]
    fn add_steps<const CODED: bool>(
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
enum Order {
    /// At one regular step (in address order, either way, or every other slot...).
    Steady,
    /// Otherwise.
    Mixed,
}

/// The configuration a walk over free lists uses (`CacheInner::shape`); `CODED`: the links are encoded (a
/// hardened cache), so that a plain cache's walk has no decoding in its loop.
#[derive(Clone, Copy, Debug)]
struct Shape<const CODED: bool> {
    link_off: usize,
    slab_bytes: usize,
    limit: usize,
    stride: usize,
    recip: u64,
    /// `stride_shift` of the configuration (0: the stride is not a power of two filling the slab).
    shift: u32,
    codec: LinkCodec,
}

impl<const CODED: bool> Shape<CODED> {
    /// The decoded link of the free slot `slot`.
    ///
    /// # Safety
    /// `slot` is a slot of this cache (arena memory, never unmapped) on a list the caller owns.
    #[inline(always)]
    unsafe fn load(&self, slot: usize) -> usize {
        let at = slot + self.link_off;
        // SAFETY: the link word is inside the slot, pointer-aligned (caller); free slots' link words are only
        // accessed atomically.
        let word = unsafe { &*(at as *const core::sync::atomic::AtomicUsize) }.load(Ordering::Relaxed);
        if CODED { self.codec.decode(at, word) } else { word }
    }

    /// The index of the slot at offset `rel` from its slab's start.
    #[inline(always)]
    fn index(&self, rel: usize) -> u32 {
        if self.shift != 0 { (rel >> self.shift) as u32 } else { ((rel as u64).wrapping_mul(self.recip) >> 32) as u32 }
    }

    /// Whether the offset `rel` (below the slab size) from a slab's start is exactly a slot start.
    #[inline(always)]
    fn slot_ok(&self, rel: usize) -> bool {
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
    fn run_ahead(&self, base: usize, mut node: usize, delta: usize, max: u32) -> (usize, u32) {
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

/// What the shrink may do with a slab that counted no object in use (`verify_empty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verified {
    /// Its free list holds every object: it may be released.
    Empty,
    /// Keep it: put it back on a list.
    Keep,
    /// It is no longer listed (nothing sound left, or listed by someone else): leave it alone.
    Unlisted,
}

/// Damage `walk_chain` found in a chain of free slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Damage {
    /// None: the chain ends in 0.
    None,
    /// The slot `at` links to `link`, not a slot (`at` 0: the chain's head `link` is no slot); `before` is the
    /// slot linking to `at` (0: `at` is the head).
    Link { before: usize, at: usize, link: usize },
    /// The chain loops; the loop is `lam` slots long.
    Loop { lam: u32 },
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
    /// The cache's parameters.
    #[inline(always)]
    pub fn cfg(&self) -> &CacheConfig {
        // SAFETY: written before publication, immutable afterwards (see the Sync impl).
        unsafe { &*self.cfg.get() }
    }

    /// The cache's id.
    #[inline(always)]
    pub fn id(&self) -> u16 {
        self.id.load(Ordering::Relaxed) as u16
    }

    /// The cache's name.
    pub fn name(&self) -> CacheName {
        self.cfg().name
    }

    /// Whether the cache is live.
    pub fn is_active(&self) -> bool {
        self.state.load(Ordering::Acquire) == STATE_ACTIVE
    }

    #[inline(always)]
    fn geometry(&self, g: &Global, head: u32) -> Geometry {
        let c = self.cfg();
        Geometry {
            base: g.pages.page_addr(head as usize),
            stride: c.stride as usize,
            link_off: c.link_off as usize,
            capacity: c.capacity,
        }
    }

    /// Link word of a free slot.
    #[inline(always)]
    fn link(&self, slot: usize) -> &core::sync::atomic::AtomicUsize {
        // SAFETY: `slot` is a slot of this cache, free and owned by the caller; link_off is in bounds and
        // pointer-aligned; arena memory is never unmapped.
        unsafe { &*((slot + self.cfg().link_off as usize) as *const core::sync::atomic::AtomicUsize) }
    }

    /// How this cache's link words are stored.
    #[inline(always)]
    fn codec(&self) -> LinkCodec {
        LinkCodec::new(self.cfg().key)
    }

    /// The decoded successor of the free slot `slot` on whatever list holds it (0: the end).
    #[inline(always)]
    fn next_of(&self, slot: usize) -> usize {
        let at = slot + self.cfg().link_off as usize;
        self.codec().decode(at, self.link(slot).load(Ordering::Relaxed))
    }

    /// Make `next` the successor of the free slot `slot`.
    #[inline(always)]
    fn set_next(&self, slot: usize, next: usize) {
        let at = slot + self.cfg().link_off as usize;
        self.link(slot).store(self.codec().encode(at, next), Ordering::Relaxed);
    }

    /// Whether `addr` is exactly a slot of a live slab of this cache (of the slab at `slab` if given): what every
    /// link of a free list must be.
    fn is_slot(&self, g: &Global, addr: usize, slab: Option<u32>) -> bool {
        if let Some(head) = slab {
            return self.index_of(addr.wrapping_sub(g.pages.page_addr(head as usize))).is_some();
        }
        if !g.pages.contains(addr) {
            return false;
        }
        let info = g.pages.info_of(addr);
        info.kind() == Kind::Slab
            && info.cache_id() == self.id()
            && self.index_of(addr - g.pages.page_addr(info.head() as usize)).is_some()
    }

    /// Index of the slot at byte offset `rel` from the slab start, if `rel` is exactly a slot start.
    #[inline(always)]
    fn index_of(&self, rel: usize) -> Option<u32> {
        let c = self.cfg();
        let idx = ((rel as u64).wrapping_mul(c.recip) >> 32) as usize;
        (idx * c.stride as usize == rel && rel < c.limit as usize).then_some(idx as u32)
    }

    /// The free fast path's check for a non-debug cache: `addr` is exactly a slot of the slab at `info.head()`.
    #[inline(always)]
    pub fn plain_slot(&self, g: &Global, addr: usize, info: Info) -> Option<usize> {
        let shift = info.stride_shift();
        if shift != 0 {
            // Power-of-two stride, slab aligned to it, no tail: one mask test, no load from the cache.
            return (addr & ((1usize << shift) - 1) == 0).then_some(addr);
        }
        let rel = addr - g.pages.page_addr(info.head() as usize);
        self.index_of(rel).map(|_| addr)
    }

    // ---------------------------------------------------------------------------------------------------------
    // Allocation
    // ---------------------------------------------------------------------------------------------------------

    /// Allocate one object. Never returns `Busy`: a busy thread list sends the allocation down the shared path.
    #[inline(always)]
    pub fn alloc(&self, g: &'static Global, id: u16, flags: Gfp) -> Option<NonNull<u8>> {
        if !g.fault_active()
            && self.cfg().flags & FLAG_HARDENED == 0
            && let Some(t) = thread_cache::current_if_any()
        {
            match t.list(id).try_pop(self.cfg().link_off as usize) {
                Pop::Obj(slot) => return Some(self.finish_alloc(slot, flags)),
                Pop::ObjDrain(slot) => return self.drain_then_finish(g, t, id, slot, flags),
                Pop::Empty => return self.refill_then_finish(g, t, id, flags),
                Pop::Busy => {}
            }
        }
        self.alloc_full(g, id, flags)
    }

    /// A fast-path pop found frees deferred by a nested context waiting: drain them, then finish the object.
    #[cold]
    #[inline(never)]
    pub fn drain_then_finish(
        &self,
        g: &Global,
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
    pub fn refill_then_finish(&self, g: &Global, t: &ThreadCaches, id: u16, flags: Gfp) -> Option<NonNull<u8>> {
        let slot = self.refill_and_unlock(g, t, t.list(id))?;
        Some(self.finish_alloc(slot, flags))
    }

    /// The full allocation path: fault injection, a thread's first call, busy, claimed and empty lists.
    #[inline(never)]
    fn alloc_full(&self, g: &'static Global, id: u16, flags: Gfp) -> Option<NonNull<u8>> {
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
    fn alloc_busy(&self, g: &'static Global, flags: Gfp) -> Option<NonNull<u8>> {
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

    /// Turn a slot into the user pointer: debug checks and zeroing.
    #[inline(always)]
    pub fn finish_alloc(&self, slot: usize, flags: Gfp) -> NonNull<u8> {
        let c = self.cfg();
        if c.flags & (FLAG_DEBUG | FLAG_HARDENED) != 0 {
            self.finish_checked(slot);
        }
        let obj = slot + c.obj_off as usize;
        if flags.contains(Gfp::ZERO) {
            // SAFETY: the object is ours and `size` bytes long.
            unsafe { core::ptr::write_bytes(obj as *mut u8, 0, c.size as usize) };
        }
        // SAFETY: arena addresses are never null.
        unsafe { NonNull::new_unchecked(obj as *mut u8) }
    }

    /// `finish_alloc` of a debug or hardened cache: debug checks; a hardened object's link word is cleared, so
    /// that only a free object's link word decodes to a free-list link (which is how a free spots a double free).
    #[cold]
    #[inline(never)]
    fn finish_checked(&self, slot: usize) {
        let c = self.cfg();
        if c.flags & FLAG_DEBUG != 0 {
            debug::on_alloc(self, slot);
        }
        if c.flags & FLAG_HARDENED != 0 {
            self.link(slot).store(0, Ordering::Relaxed);
        }
    }

    /// Pop a slot from the calling thread's list (claiming a t on the thread's first call, refilling an
    /// empty list). `id` is this cache's id and `link_off` its link offset (passed in so that callers that know
    /// it as a constant save a load).
    #[inline(always)]
    pub fn alloc_local(&self, g: &'static Global, id: u16, link_off: usize) -> Got {
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
    fn alloc_local_hardened(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache) -> Got {
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
    fn refill_and_unlock(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache) -> Option<usize> {
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
    fn refill(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache) -> usize {
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

    /// Put a slab whose `LISTED` flag the caller set (or holds) on the partial list pushes go to.
    #[inline]
    fn list_push(&self, g: &Global, head: u32) {
        let i = self.active.load(Ordering::Relaxed) as usize & 1;
        self.partial[i].push(head, &g.pages.desc(head as usize).next);
    }

    /// Pop a slab off the partial lists (the one pushes go to first), taking its take right.
    #[inline]
    fn list_pop(&self, g: &Global) -> Option<u32> {
        let i = self.active.load(Ordering::Relaxed) as usize & 1;
        let next_of = |i: u32| &g.pages.desc(i as usize).next;
        self.partial[i].pop(next_of).or_else(|| self.partial[i ^ 1].pop(next_of))
    }

    /// Pop a partial slab and take all its free objects: (head page, first object, count), checked.
    fn take_partial(&self, g: &Global) -> Option<(u32, usize, u16)> {
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
    fn checked_chain(&self, g: &Global, head: u32, first: usize, n: u16) -> Option<(u32, usize, u16)> {
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

    /// Link the free slots `set` of the slab at `head` (the caller's, just checked) in address order, the last
    /// one ending the chain; returns the first. Later walks over them, the allocations' pops included, then go
    /// through memory in order, which the CPU (and `run_ahead`) can run ahead on.
    fn relink_in_order(&self, g: &Global, head: u32, set: &SlotSet) -> usize {
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

    /// What a walk over free lists needs from the configuration, read once, so that its loop keeps it in
    /// registers.
    #[inline(always)]
    fn shape<const CODED: bool>(&self) -> Shape<CODED> {
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

    /// If `addr` is a slot of a live slab of this cache: that slab's start and head page (the descriptor lookup
    /// of `is_slot`).
    #[inline]
    fn slot_slab(&self, g: &Global, addr: usize) -> Option<(usize, u32)> {
        if !g.pages.contains(addr) {
            return None;
        }
        let info = g.pages.info_of(addr);
        if info.kind() != Kind::Slab || info.cache_id() != self.id() {
            return None;
        }
        let base = g.pages.page_addr(info.head() as usize);
        self.index_of(addr.wrapping_sub(base)).map(|_| (base, info.head()))
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
    fn chain_sound(&self, g: &Global, head: u32, first: usize, n: u32, set: Option<&mut SlotSet>) -> Option<Order> {
        if self.codec().is_hardened() {
            self.chain_sound_in::<true>(g, head, first, n, set)
        } else {
            self.chain_sound_in::<false>(g, head, first, n, set)
        }
    }

    /// `chain_sound` for a cache whose links are encoded (`CODED`) or not.
    #[inline(never)]
    fn chain_sound_in<const CODED: bool>(
        &self,
        g: &Global,
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

    /// A flush's check and grouping in one walk. Follows exactly `n` objects from `first` (the thread's list and
    /// its count), checking each as it is reached (a slot of this cache) and that the last one ends the list,
    /// and records the runs of the first `group` objects (at most `FLUSH_RUNS`; the rest of them are grouped
    /// later). Reads only. `None`: the list is not sound — a damaged link, another length, or a loop (the count
    /// bound catches it, as in `chain_sound`) — and the caller takes the diagnosing path (`check_chain`).
    ///
    /// # Context
    /// The owner of the list (busy held); any context.
    fn scan_flush(&self, g: &Global, first: usize, n: u32, group: u32, runs: &mut [Run; FLUSH_RUNS]) -> Option<Scan> {
        if self.codec().is_hardened() {
            self.scan_flush_in::<true>(g, first, n, group, runs)
        } else {
            self.scan_flush_in::<false>(g, first, n, group, runs)
        }
    }

    /// `scan_flush` for a cache whose links are encoded (`CODED`) or not.
    #[inline(never)]
    fn scan_flush_in<const CODED: bool>(
        &self,
        g: &Global,
        first: usize,
        n: u32,
        group: u32,
        runs: &mut [Run; FLUSH_RUNS],
    ) -> Option<Scan> {
        let sh = self.shape::<CODED>();
        if n == 0 {
            return None;
        }
        let (mut base, head) = self.slot_slab(g, first)?;
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
                let (b, h) = self.slot_slab(g, next)?;
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

    /// Walk the chain of free slots from `first`, whose links are stored through `codec`, checking that `first`
    /// and every link are slots of this cache (of the slab at `slab` if given) and that the chain does not
    /// loop (Brent's algorithm: no extra reads on a sound chain). Reads only.
    ///
    /// # Context
    /// Any context; the chain should be the caller's (a probe of a chain others may change gives no
    /// guarantee, and its caller re-checks that nothing changed before it believes damage).
    fn walk_chain(&self, g: &Global, first: usize, slab: Option<u32>, codec: LinkCodec) -> Walk {
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
    fn check_chain(
        &self,
        g: &Global,
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
    fn cut_loop(&self, first: usize, lam: u32, next_of: &dyn Fn(usize) -> usize, cut: &dyn Fn(usize)) -> (u32, usize) {
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

    /// The partial lists and the page allocator had nothing: before declaring the cache out of memory, look
    /// again, and take the objects of the slab a shrink holds (see "Shrinking"). Returns a slab's head page and
    /// a chain of free objects it gave (`steal`: all of them, as `take_all`; otherwise one).
    ///
    /// A shrink moves each slab from one list, to its hand, to the other list (or releases it). Looking at the
    /// lists, the hand, then the lists again follows that direction, so a slab the shrink moves meanwhile is
    /// seen at one of the three looks; a look during which `moves` changed (the shrink started a pass or
    /// took the next slab) is repeated, a bounded number of times. A signal handler that interrupted the
    /// shrink on its own thread sees it frozen, so its first look is complete.
    #[cold]
    #[inline(never)]
    fn rescue(&self, g: &Global, steal: bool) -> Option<(u32, usize, u16)> {
        for _ in 0..RESCUE_LOOKS {
            // Acquire: pairs with the Release increments in `shrink_locked`, which follow each hand change.
            let seen = self.moves.load(Ordering::Acquire);
            if let Some(t) = self.take_from_lists(g, steal) {
                return Some(t);
            }
            // Acquire: pairs with the Release store that named the slab (made before it left its list).
            let hand = self.hand.load(Ordering::Acquire);
            if let Some(head) = hand.checked_sub(1)
                && let Some(t) = self.take_from_named(g, head, steal)
            {
                return Some(t);
            }
            if let Some(t) = self.take_from_lists(g, steal) {
                return Some(t);
            }
            // Acquire: as above. Unchanged: the shrink named no other slab while we looked, so a slab it moved
            // was seen at one of the three looks (a list pop that saw it gone synchronises with the `pop_if`
            // that took it, which follows its naming).
            if self.moves.load(Ordering::Acquire) == seen {
                return None;
            }
        }
        None
    }

    /// One slab's objects from the partial lists: all of them (`steal`) or one, with the slab put back.
    fn take_from_lists(&self, g: &Global, steal: bool) -> Option<(u32, usize, u16)> {
        if steal {
            return self.take_partial(g);
        }
        self.pop_partial_one(g).map(|(head, slot)| (head, slot, 1))
    }

    /// Objects of slab `head`, named by a shrink that may hold its take right: only if it is still a live slab
    /// of this cache (the tag in its state word makes a stale name harmless).
    fn take_from_named(&self, g: &Global, head: u32, steal: bool) -> Option<(u32, usize, u16)> {
        let d = g.pages.desc(head as usize);
        // The state first (Acquire: pairs with `init`'s Release, which follows the slab's `set_info`), then the
        // owner: a slab reused since by another cache shows that cache's info, an older state fails the CAS.
        let _ = d.slab.load();
        let info = d.info();
        if info.kind() != Kind::Slab || info.cache_id() != self.id() || info.head() != head {
            return None;
        }
        let geo = self.geometry(g, head);
        if steal {
            let (first, n) = d.slab.steal_all(&geo);
            return self.checked_chain(g, head, first, n);
        }
        match d.slab.pop_any(&geo, self.codec()) {
            Ok(Some(slot)) => Some((head, slot, 1)),
            Ok(None) => None,
            Err(e) => {
                self.report_corrupt(e.obj, e.link);
                None
            }
        }
    }

    /// Allocate without a thread list: one object from a partial slab, or a new slab. Any context.
    #[cold]
    #[inline(never)]
    pub fn alloc_shared(&self, g: &Global) -> Option<usize> {
        let slot = self.alloc_shared_inner(g)?;
        self.counters.shared_allocs.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    fn alloc_shared_inner(&self, g: &Global) -> Option<usize> {
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
    fn pop_partial_one(&self, g: &Global) -> Option<(u32, usize)> {
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
    fn new_slab(&self, g: &Global) -> Option<(u32, usize)> {
        let c = *self.cfg();
        let pages = c.slab_pages as usize;
        let head = match g.pages.alloc_run(pages, c.slab_align()) {
            Some(h) => h,
            None => {
                // Out of pages: give back other caches' empty slabs once and retry.
                reclaim_empty_slabs(g);
                g.pages.alloc_run(pages, c.slab_align())?
            }
        };
        hooks::point(Point::SlabNew);
        // Debug and hardened slabs are not "plain": the free fast path sends their objects to the full path.
        let checked = c.flags & (FLAG_DEBUG | FLAG_HARDENED) != 0;
        let info = Info::slab(self.id(), head as u32, checked, c.stride_shift);
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

    // ---------------------------------------------------------------------------------------------------------
    // Free
    // ---------------------------------------------------------------------------------------------------------

    /// Check that `addr` is an allocated object of this cache, whose slab head page is `info.head()`.
    /// Returns its slot.
    #[inline(always)]
    pub fn validate(&self, g: &Global, addr: usize, info: Info) -> Result<usize, FreeError> {
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
    fn interior_error(&self, g: &Global, addr: usize, info: Info) -> FreeError {
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
    pub fn free_slot(&self, g: &'static Global, id: u16, slot: usize) -> bool {
        if self.cfg().flags & FLAG_HARDENED != 0 {
            return self.free_hardened(g, id, slot);
        }
        match thread_cache::current(g) {
            Some(t) => self.free_to_list(g, t, id, slot, false),
            None => {
                self.free_shared(g, slot);
                true
            }
        }
    }

    /// The free fast path shared by `kfree_nolock` (`only: None`) and `KmemCache::free_nolock` (`only: Some(id)`):
    /// if `addr` is exactly an object of a plain (non-debug) cache, of cache `only` if given, and the calling
    /// thread has a t, free it through the thread's list and return true. Otherwise do nothing and return
    /// false: the caller takes its full path, which validates and reports.
    ///
    /// # Context
    /// Any context: async-signal-safe, reentrant, never blocks.
    #[inline(always)]
    pub fn free_fast(g: &Global, addr: usize, only: Option<u16>) -> bool {
        if g.pages.contains(addr)
            && let info = g.pages.info_of(addr)
            && info.is_plain_slab()
            && only.is_none_or(|id| id == info.cache_id())
            && let Some(t) = thread_cache::current_if_any()
        {
            let id = info.cache_id();
            let c = g.cache(id);
            if let Some(slot) = c.plain_slot(g, addr, info) {
                c.free_to_list(g, t, id, slot, true);
                return true;
            }
        }
        false
    }

    /// Free a validated slot through the list `id` of `t` (the calling thread's): the fast push, or one
    /// call for each other case. With `report`, a double free is reported here rather than left to the caller
    /// (so that the free fast paths end in tail calls). Returns false for a double free.
    ///
    /// # Context
    /// Any context, on the thread that owns `t`.
    #[inline(always)]
    pub fn free_to_list(&self, g: &Global, t: &ThreadCaches, id: u16, slot: usize, report: bool) -> bool {
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
    fn free_locked(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache, slot: usize, report: bool) -> bool {
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
        if count > c.high {
            self.flush(g, t, tc, c.high / 2);
        }
        tc.lock.unlock();
        if !tc.deferred.is_empty() {
            self.drain_deferred(g, t, tc);
        }
        true
    }

    /// `free_slot` for a hardened cache. The slot's link word tells whether it is free already: an allocated
    /// object's was cleared at allocation (or holds the user's data), a free one's decodes to 0 or to a slot of
    /// this cache — whichever list holds it, this thread's, another's, or a slab's. Such a free is refused (a
    /// double free; false). Otherwise the slot goes on this thread's list with an encoded link, or takes the
    /// same detours as the plain path (deferred, shared).
    #[cold]
    #[inline(never)]
    fn free_hardened(&self, g: &'static Global, id: u16, slot: usize) -> bool {
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
        let c = self.cfg();
        let count = tc.count.load(Ordering::Relaxed) + 1;
        self.set_next(slot, tc.freelist.load(Ordering::Relaxed));
        tc.freelist.store(slot, Ordering::Relaxed);
        tc.count.store(count, Ordering::Relaxed);
        bump(&tc.free_fast);
        if count > c.high {
            self.flush(g, t, tc, c.high / 2);
        }
        tc.lock.unlock();
        if !tc.deferred.is_empty() {
            self.drain_deferred(g, t, tc);
        }
        true
    }

    /// Validate `addr` (an object of this cache, id `id`, on the slab `info` describes) and free it; a refused
    /// free is counted in `bad_frees` and returned. Any context.
    pub fn free_checked(&self, g: &'static Global, id: u16, addr: usize, info: Info) -> Result<(), FreeError> {
        match self.validate(g, addr, info) {
            Ok(slot) if self.free_slot(g, id, slot) => Ok(()),
            Ok(_) => Err(self.double_free(addr)),
            Err(e) => {
                self.counters.bad_frees.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// A free list of this cache was found damaged at the slot `obj`, whose link word held `link` (decoded),
    /// not a slot of the cache (`obj` 0: the list's head itself is `link`): count and report it. The caller cut
    /// the list there.
    #[cold]
    #[inline(never)]
    fn report_corrupt(&self, obj: usize, link: usize) {
        self.counters.debug_errors.fetch_add(1, Ordering::Relaxed);
        let obj = if obj == 0 { 0 } else { obj + self.cfg().obj_off as usize };
        debug::report_corrupt_link(self.name(), obj, link);
    }

    /// A free list of this cache holds `found` objects where its owner counted `counted`: count and report it.
    #[cold]
    #[inline(never)]
    fn report_length(&self, counted: u32, found: u32) {
        self.counters.debug_errors.fetch_add(1, Ordering::Relaxed);
        debug::report_freelist_length(self.name(), u64::from(counted), u64::from(found));
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
    fn free_deferred(&self, tc: &ThreadCache, slot: usize) {
        self.counters.deferred.fetch_add(1, Ordering::Relaxed);
        tc.deferred.push(slot, self.link(slot));
    }

    /// Push one object straight onto its slab.
    #[cold]
    #[inline(never)]
    pub fn free_shared(&self, g: &Global, slot: usize) {
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
    fn flush(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache, keep: u32) {
        hooks::point(Point::FreeFlush);
        let first = tc.freelist.load(Ordering::Relaxed);
        let counted = tc.count.load(Ordering::Relaxed);
        let mut runs = [Run::default(); FLUSH_RUNS];
        match self.scan_flush(g, first, counted, counted.saturating_sub(keep), &mut runs) {
            Some(scan) => {
                let tag = thread_cache::tag(g, t);
                for (i, r) in runs[..scan.nruns].iter().enumerate() {
                    let next = if i + 1 < scan.nruns { runs[i + 1].first } else { scan.rest };
                    // Detach the run first: `push_run` rewrites the link of `last`.
                    tc.freelist.store(next, Ordering::Relaxed);
                    tc.count.store(tc.count.load(Ordering::Relaxed) - r.k, Ordering::Relaxed);
                    self.push_run(g, r.head, r.first, r.last, r.k as u16, tag);
                }
                if scan.left > 0 {
                    self.flush_runs(g, t, tc, scan.rest, scan.left);
                }
            }
            None if first == 0 && counted == 0 => {}
            None => self.flush_checked(g, t, tc, keep),
        }
        bump(&tc.flushes);
    }

    /// `flush` of a list `scan_flush` found unsound: check it with `check_chain` (which cuts the damage out and
    /// reports it), then give back all but `keep`.
    #[cold]
    #[inline(never)]
    fn flush_checked(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache, keep: u32) {
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

    /// Give back `left` objects of the thread's list, from `obj` (its head), checked already: one push per run of
    /// objects that share a slab.
    fn flush_runs(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache, mut obj: usize, mut left: u32) {
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
    fn push_run(&self, g: &Global, head: u32, first: usize, last: usize, k: u16, shard_tag: u32) {
        let d = g.pages.desc(head as usize);
        let geo = self.geometry(g, head);
        let idx = ((first - geo.base) / geo.stride) as u32;
        // SAFETY: the chain's objects belong to this slab (checked at free time) and are given up by the caller.
        match unsafe { d.slab.push_chain_coded(&geo, self.codec(), idx, last, k) } {
            Ok(p) => {
                if p.listed_now {
                    self.list_push(g, head);
                }
                if p.empty_now {
                    let events = self.counters.empty_events.fetch_add(1, Ordering::Relaxed) + 1;
                    if events.wrapping_sub(self.shrunk_at.load(Ordering::Relaxed)) == KICK_AFTER_EMPTY {
                        crate::background::request_pass();
                    }
                }
                let owner = d.owner.load(Ordering::Relaxed);
                if shard_tag != 0 && owner != 0 && owner != shard_tag {
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
    fn drain_deferred(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache) {
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
    fn splice(&self, g: &Global, tc: &ThreadCache, chain: usize) -> u32 {
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
    pub fn drain_list(&self, g: &Global, t: &ThreadCaches, tc: &ThreadCache) {
        let deferred = tc.deferred.take_all();
        if deferred != 0 {
            self.splice(g, tc, deferred);
        }
        if tc.count.load(Ordering::Relaxed) != 0 || tc.freelist.load(Ordering::Relaxed) != 0 {
            self.flush(g, t, tc, 0);
        }
    }

    // ---------------------------------------------------------------------------------------------------------
    // Shrinking and statistics
    // ---------------------------------------------------------------------------------------------------------

    /// Release entirely free slabs beyond `keep` to the page allocator. Returns the number released.
    ///
    /// Lock-free (it only pops and pushes the partial lists and CASes slab states), so it may also run on an
    /// allocation path that is out of pages. It holds at most one slab at a time, named in the cache's hand,
    /// whose objects an allocation that finds no memory can still take (see "Shrinking" and `rescue`).
    pub fn shrink(&self, g: &Global, keep: usize) -> usize {
        if self.shrinking.swap(true, Ordering::Acquire) {
            return 0;
        }
        self.shrink_locked(g, keep)
    }

    /// [`shrink`](Self::shrink) that waits (yielding) for a shrink already running on this cache instead of
    /// skipping it, so that "every entirely free slab beyond `keep` is released" holds when it returns.
    ///
    /// # Context
    /// Normal context only: may yield while another thread shrinks the cache.
    pub fn shrink_wait(&self, g: &Global, keep: usize) -> usize {
        while self.shrinking.swap(true, Ordering::Acquire) {
            std::thread::yield_now();
        }
        self.shrink_locked(g, keep)
    }

    /// The pass itself; the caller set `shrinking`. See "Shrinking" in the module documentation.
    fn shrink_locked(&self, g: &Global, keep: usize) -> usize {
        let events = self.counters.empty_events.load(Ordering::Relaxed);
        let mut released = 0;
        let mut kept_empty = 0;
        // Pushes and pops now start with the other list; this one only drains (into the other).
        let src = self.active.load(Ordering::Relaxed) as usize & 1;
        let dst = src ^ 1;
        self.active.store(dst as u32, Ordering::Relaxed);
        // Release: a rescue that sees this count sees the flip.
        self.moves.fetch_add(1, Ordering::Release);
        let next_of = |i: u32| &g.pages.desc(i as usize).next;
        // Frees that read `active` before the flip may still list a slab on `src`: bound the pass.
        let mut budget = self.nr_slabs.load(Ordering::Relaxed) + 64;
        while budget > 0
            && let Some(head) = self.partial[src].peek()
        {
            budget -= 1;
            // Name the slab before taking it off the list (Release: pairs with the Acquire load in `rescue`),
            // so that at every instant it is on a list or in the hand.
            self.hand.store(head + 1, Ordering::Release);
            // Release: pairs with the rescue's Acquire loads of `moves` (a look that overlaps this is repeated).
            self.moves.fetch_add(1, Ordering::Release);
            if !self.partial[src].pop_if(head, next_of) {
                continue;
            }
            hooks::point(Point::Shrink);
            let d = g.pages.desc(head as usize);
            let state = d.slab.load();
            if state.used() == 0 && kept_empty >= keep {
                match self.verify_empty(g, head, state) {
                    Verified::Empty => {
                        if d.slab.try_kill() {
                            self.release_slab(g, head);
                            released += 1;
                            continue;
                        }
                    }
                    Verified::Keep => {}
                    Verified::Unlisted => continue,
                }
            } else if state.used() == 0 {
                kept_empty += 1;
            }
            // Still `LISTED` (a rescue that took its objects leaves the flag): back on a list, then unnamed.
            self.partial[dst].push(head, &d.next);
        }
        // Release: as in the loop (the last slab is on a list before the hand is cleared).
        self.hand.store(0, Ordering::Release);
        self.moves.fetch_add(1, Ordering::Release);
        self.shrunk_at.store(events, Ordering::Relaxed);
        self.shrinking.store(false, Ordering::Release);
        released
    }

    /// The slab at `head`, held by the shrink, counted no object in use (`state`): before it is released, check
    /// that its free list really holds all its objects — a double free that reached the slab makes the count
    /// lie while an object is still live. Reads only, unless it finds damage; then, if the slab did not change
    /// meanwhile (a rescue may steal from it, which makes it non-empty anyway), its objects are taken, the list
    /// is cut to its sound part (reported) and pushed back, which makes the count true again.
    #[inline(never)]
    fn verify_empty(&self, g: &Global, head: u32, state: State) -> Verified {
        let geo = self.geometry(g, head);
        let d = g.pages.desc(head as usize);
        let first = state.head_enc().checked_sub(1).map_or(0, |i| geo.obj(i));
        if first != 0 && self.chain_sound(g, head, first, u32::from(geo.capacity), None).is_some() {
            return Verified::Empty;
        }
        if d.slab.load() != state {
            return Verified::Keep;
        }
        let (first, n) = d.slab.take_all(&geo);
        let (kept, last) =
            if n == 0 { (0, 0) } else { self.check_chain(g, first, Some(u32::from(n)), Some(head), self.codec()) };
        if kept == 0 {
            // Nothing sound is left to list: the slab stays off the lists, its objects leaked.
            return Verified::Unlisted;
        }
        let idx = geo.index_of(first).expect("a checked chain starts at a slot of the slab");
        // SAFETY: the chain's `kept` slots belong to the slab and were just taken from it (counted in use).
        match unsafe { d.slab.push_chain_coded(&geo, self.codec(), idx, last, kept as u16) } {
            // Unlisted by the take, listed again by this push: the shrink puts it on a list.
            Ok(p) if p.listed_now => Verified::Keep,
            // A push that raced ours (another double free) listed it, or the push was refused.
            _ => Verified::Unlisted,
        }
    }

    /// Give a dead slab's pages back: at once, or for a type-safe cache after a grace period (the slab's page
    /// descriptor doubles as its `rcu_head`, as `struct slab` does in the kernel).
    fn release_slab(&self, g: &Global, head: u32) {
        let Some(gp) = self.cfg().typesafe else {
            return self.free_slab_now(g, head);
        };
        self.counters.pending_slabs.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the dead slab's descriptor fields that make up the head are unused until the callback runs.
        unsafe { gp.call(g.pages.desc(head as usize).rcu_head(), typesafe_slab_gp_done) };
    }

    /// Run the destructors of a dead slab and give its pages back.
    fn free_slab_now(&self, g: &Global, head: u32) {
        let c = self.cfg();
        if c.dtor != 0 {
            let geo = self.geometry(g, head);
            for i in 0..u32::from(c.capacity) {
                c.destruct(geo.obj(i) + c.obj_off as usize);
            }
        }
        let pages = c.slab_pages as usize;
        let free = Info::new(Kind::Free, 0, 0);
        for p in head as usize..head as usize + pages {
            g.pages.desc(p).set_info(free);
        }
        // SAFETY: the slab is dead (no object in use, no list holds it), so its run is ours to free.
        unsafe { g.pages.free_run(head as usize, pages) };
        self.nr_slabs.fetch_sub(1, Ordering::Relaxed);
        self.counters.slabs_freed.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot of this cache's statistics (sums the per-thread counters).
    pub fn stats(&self, g: &Global) -> CacheStats {
        let c = self.cfg();
        let id = self.id();
        let mut s = CacheStats {
            name: c.name,
            object_size: c.size as usize,
            slab_pages: c.slab_pages as usize,
            objects_per_slab: c.capacity as usize,
            debug: c.flags & FLAG_DEBUG != 0,
            ..CacheStats::default()
        };
        for i in 0..crate::thread::count() {
            let tc = g.slab.thread(i).list(id);
            s.alloc_fast += tc.alloc_fast.load(Ordering::Relaxed);
            s.alloc_refill += tc.alloc_refill.load(Ordering::Relaxed);
            s.free_fast += tc.free_fast.load(Ordering::Relaxed);
            s.flushes += tc.flushes.load(Ordering::Relaxed);
            s.cached_objects += u64::from(tc.count.load(Ordering::Relaxed));
        }
        let k = &self.counters;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.shared_allocs = ld(&k.shared_allocs);
        s.shared_frees = ld(&k.shared_frees);
        s.deferred_frees = ld(&k.deferred);
        s.next_bucket = ld(&k.next_bucket);
        s.remote_frees = ld(&k.remote);
        s.failures = ld(&k.failures);
        s.injected_failures = ld(&k.injected);
        s.bad_frees = ld(&k.bad_frees);
        s.debug_errors = ld(&k.debug_errors);
        s.slabs = ld(&self.nr_slabs);
        s.slabs_allocated = ld(&k.slabs_allocated);
        s.slabs_freed = ld(&k.slabs_freed);
        s.fallback_allocs = ld(&k.fallback_allocs);
        s.pending_slabs = ld(&k.pending_slabs);
        s.allocs = s.alloc_fast + s.alloc_refill + s.shared_allocs;
        s.frees = s.free_fast + s.deferred_frees + s.shared_frees;
        s
    }
}

/// Grace-period callback of a type-safe cache's dead slab: destructors, then the pages go back.
unsafe fn typesafe_slab_gp_done(head: core::ptr::NonNull<crate::rcu::RcuHead>) {
    let g = crate::global::get_if_init().expect("a slab exists, so the global state does");
    let page = g.pages.page_of_desc(head.as_ptr() as usize);
    let c = g.cache(g.pages.desc(page).info().cache_id());
    c.free_slab_now(g, page as u32);
    c.counters.pending_slabs.fetch_sub(1, Ordering::Relaxed);
}

/// A snapshot of one cache's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// Cache name (`kmalloc-64`, or the name given to `KmemCache::new`).
    pub name: CacheName,
    /// Usable object size in bytes.
    pub object_size: usize,
    /// Pages per slab.
    pub slab_pages: usize,
    /// Objects per slab.
    pub objects_per_slab: usize,
    /// Whether this is a debug cache.
    pub debug: bool,
    /// Successful allocations (all paths).
    pub allocs: u64,
    /// Frees accepted (all paths).
    pub frees: u64,
    /// Allocations served from the thread's list.
    pub alloc_fast: u64,
    /// Allocations that refilled the thread's list from a slab.
    pub alloc_refill: u64,
    /// Allocations on the shared path (no thread list, or it was busy).
    pub shared_allocs: u64,
    /// Frees onto the thread's list.
    pub free_fast: u64,
    /// Flushes of a thread's list back to slabs.
    pub flushes: u64,
    /// Frees deferred because the thread's list was busy.
    pub deferred_frees: u64,
    /// Frees on the shared path.
    pub shared_frees: u64,
    /// Allocations that moved to the next size class because this one was busy (kmalloc only).
    pub next_bucket: u64,
    /// Objects returned to a slab last taken by another thread.
    pub remote_frees: u64,
    /// Allocations that failed for lack of memory.
    pub failures: u64,
    /// Allocations failed on purpose by fault injection.
    pub injected_failures: u64,
    /// Frees refused as invalid, and double frees found later as a loop in a free list.
    pub bad_frees: u64,
    /// Damage found in free objects: debug-mode findings at allocation time, damaged free lists.
    pub debug_errors: u64,
    /// Slabs owned now.
    pub slabs: u64,
    /// Slabs created so far.
    pub slabs_allocated: u64,
    /// Slabs released so far.
    pub slabs_freed: u64,
    /// Free objects sitting in threads' lists right now.
    pub cached_objects: u64,
    /// Allocations served by the paired fallback cache (type-safe caches).
    pub fallback_allocs: u64,
    /// Empty slabs waiting for a grace period before their pages go back (type-safe caches).
    pub pending_slabs: u64,
}

impl Default for CacheStats {
    fn default() -> Self {
        Self {
            name: CacheName::new(""),
            object_size: 0,
            slab_pages: 0,
            objects_per_slab: 0,
            debug: false,
            allocs: 0,
            frees: 0,
            alloc_fast: 0,
            alloc_refill: 0,
            shared_allocs: 0,
            free_fast: 0,
            flushes: 0,
            deferred_frees: 0,
            shared_frees: 0,
            next_bucket: 0,
            remote_frees: 0,
            failures: 0,
            injected_failures: 0,
            bad_frees: 0,
            debug_errors: 0,
            slabs: 0,
            slabs_allocated: 0,
            slabs_freed: 0,
            cached_objects: 0,
            fallback_allocs: 0,
            pending_slabs: 0,
        }
    }
}

impl CacheStats {
    /// Allocations that did not come from the thread's list.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn alloc_slow(&self) -> u64 {
        self.alloc_refill + self.shared_allocs
    }

    /// Frees that did not go onto the thread's list directly.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn free_slow(&self) -> u64 {
        self.deferred_frees + self.shared_frees
    }

    /// Add another cache's counters (for totals).
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn add(&mut self, o: &CacheStats) {
        self.allocs += o.allocs;
        self.frees += o.frees;
        self.alloc_fast += o.alloc_fast;
        self.alloc_refill += o.alloc_refill;
        self.shared_allocs += o.shared_allocs;
        self.free_fast += o.free_fast;
        self.flushes += o.flushes;
        self.deferred_frees += o.deferred_frees;
        self.shared_frees += o.shared_frees;
        self.next_bucket += o.next_bucket;
        self.remote_frees += o.remote_frees;
        self.failures += o.failures;
        self.injected_failures += o.injected_failures;
        self.bad_frees += o.bad_frees;
        self.debug_errors += o.debug_errors;
        self.slabs += o.slabs;
        self.slabs_allocated += o.slabs_allocated;
        self.slabs_freed += o.slabs_freed;
        self.cached_objects += o.cached_objects;
        self.fallback_allocs += o.fallback_allocs;
        self.pending_slabs += o.pending_slabs;
    }
}

/// Cache lines `prefetch_links` asks for at most.
const PREFETCH_MAX: usize = 128;

/// Start loading the cache lines of `count` link words, `stride` bytes apart from `first` (one request per line,
/// at most `PREFETCH_MAX`), so that the loads of a walk over them hit the cache instead of each waiting for its
/// own miss. A hint only: it changes no memory and never faults (x86-64; elsewhere it does nothing).
#[inline]
fn prefetch_links(first: usize, stride: usize, count: u32) {
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
fn follow(guess: usize) -> usize {
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

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Release every cache's entirely free slabs (keeping none). Lock-free; used when the page allocator is out.
pub fn reclaim_empty_slabs(g: &Global) -> usize {
    (0..g.cache_count()).map(|id| g.cache(id)).filter(|c| c.is_active()).map(|c| c.shrink(g, 0)).sum()
}

/// Release every cache's entirely free slabs, waiting for shrinks in progress. Normal context only.
pub fn reclaim_empty_slabs_wait(g: &Global) -> usize {
    (0..g.cache_count()).map(|id| g.cache(id)).filter(|c| c.is_active()).map(|c| c.shrink_wait(g, 0)).sum()
}

// -------------------------------------------------------------------------------------------------------------
// Creating and destroying caches
// -------------------------------------------------------------------------------------------------------------

/// Why a cache could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheError {
    /// All `MAX_CACHES` cache slots are in use.
    TooManyCaches,
    /// Size is zero or above `MAX_OBJECT_SIZE`.
    BadSize,
    /// Alignment is not a power of two or above `MAX_ALIGN`.
    BadAlign,
    /// The free-pointer offset is not 8-aligned or leaves no room for a pointer inside the object.
    BadFreeptrOffset,
    /// The arena could not be mapped.
    NoArena,
}

impl core::fmt::Display for CacheError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CacheError::TooManyCaches => "too many caches (the limit is 256, kmalloc classes included)",
            CacheError::BadSize => "object size must be between 1 byte and 1 MiB",
            CacheError::BadAlign => "alignment must be a power of two of at most 256 KiB",
            CacheError::BadFreeptrOffset => "free-pointer offset must be 8-aligned and leave 8 bytes in the object",
            CacheError::NoArena => "the arena could not be mapped",
        })
    }
}

impl std::error::Error for CacheError {}

/// Reserve a free cache slot and publish a cache with `cfg` in it. Returns its id.
pub fn create(g: &Global, cfg: CacheConfig) -> Result<u16, CacheError> {
    // Reuse a destroyed slot first, then a fresh one.
    let mut id = None;
    for i in 0..g.cache_count() {
        let c = g.cache(i);
        if c.state.compare_exchange(STATE_FREE, STATE_CREATING, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            id = Some(i);
            break;
        }
    }
    let id = match id {
        Some(i) => i,
        None => loop {
            let i = g.slab.next_cache.load(Ordering::Acquire);
            if i as usize >= MAX_CACHES {
                return Err(CacheError::TooManyCaches);
            }
            // Claim the slot's state first (a concurrent creator scanning for free slots may already see it),
            // then move the counter past it; a loser helps move the counter and retries.
            let c = g.cache(i as u16);
            let won = c.state.compare_exchange(STATE_FREE, STATE_CREATING, Ordering::AcqRel, Ordering::Relaxed).is_ok();
            let _ = g.slab.next_cache.compare_exchange(i, i + 1, Ordering::AcqRel, Ordering::Acquire);
            if won {
                break i as u16;
            }
        },
    };
    let c = g.cache(id);
    thread_cache::reset_all(g, id);
    let mut cfg = cfg;
    if cfg.flags & (FLAG_KMALLOC | FLAG_DEBUG) == FLAG_KMALLOC && debug::hardened_default() {
        // Hardened kmalloc classes: their fast paths, which follow plain links, are turned off.
        cfg.flags |= FLAG_HARDENED;
        g.slow_flags.fetch_or(debug::SLOW_HARDENED, Ordering::Relaxed);
    }
    if cfg.flags & FLAG_HARDENED != 0 {
        cfg.key = debug::random_key();
    }
    // SAFETY: the slot is reserved (STATE_CREATING): nobody reads its configuration until it is published.
    unsafe { c.cfg.get().write(cfg) };
    c.id.store(u32::from(id), Ordering::Relaxed);
    c.nr_slabs.store(0, Ordering::Relaxed);
    c.shrunk_at.store(0, Ordering::Relaxed);
    c.hand.store(0, Ordering::Relaxed);
    reset_counters(&c.counters);
    c.fault.every_nth.store(0, Ordering::Relaxed);
    c.fault.prob.store(0, Ordering::Relaxed);
    c.fault.calls.store(0, Ordering::Relaxed);
    // Release: publishes the configuration; pairs with the Acquire in `is_active` and with the handle users
    // receive after this returns.
    c.state.store(STATE_ACTIVE, Ordering::Release);
    Ok(id)
}

fn reset_counters(k: &CacheCounters) {
    for a in [
        &k.next_bucket,
        &k.deferred,
        &k.remote,
        &k.shared_allocs,
        &k.shared_frees,
        &k.failures,
        &k.injected,
        &k.bad_frees,
        &k.debug_errors,
        &k.slabs_allocated,
        &k.slabs_freed,
        &k.empty_events,
        &k.fallback_allocs,
        &k.pending_slabs,
    ] {
        a.store(0, Ordering::Relaxed);
    }
}

/// What destroying a cache found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestroyReport {
    /// Slabs released.
    pub slabs_released: usize,
    /// Objects still allocated (their slabs were kept, and the cache slot is retired).
    pub live_objects: u64,
}

/// Destroy cache `id`: take back every thread's cached objects, release every slab, free the slot. If objects
/// are still allocated, their slabs are left alone (nothing is corrupted), the problem is reported, and the
/// slot is never reused. Blocks (normal context).
pub fn destroy(g: &Global, id: u16) -> DestroyReport {
    let c = g.cache(id);
    thread_cache::claim_and_drain_all(g, id);
    // Wait for a shrink in progress (trim on another thread, the worker, an out-of-pages reclaim) rather than
    // skip: otherwise slabs it holds would be counted as still in use.
    let released = c.shrink_wait(g, 0);
    // Type-safe caches: wait for the grace periods of the slabs just queued (and of any queued earlier), so
    // that destructors have run and every page is back before the slot is freed.
    if let Some(gp) = c.cfg().typesafe {
        gp.callback_barrier("KmemCache::destroy");
    }
    let st = c.stats(g);
    let live = st.allocs.saturating_sub(st.frees);
    let slabs_left = c.nr_slabs.load(Ordering::Relaxed);
    if slabs_left != 0 || live != 0 {
        debug::report_destroy_live(c.name(), live, slabs_left);
        c.state.store(STATE_LEAKED, Ordering::Release);
    } else {
        c.state.store(STATE_FREE, Ordering::Release);
    }
    DestroyReport { slabs_released: released, live_objects: live.max(u64::from(slabs_left != 0)) }
}

/// Run `f` on every live cache.
pub fn for_each_cache(g: &Global, mut f: impl FnMut(&CacheInner)) {
    for id in 0..g.cache_count() {
        let c = g.cache(id);
        if c.is_active() {
            f(c);
        }
    }
}

/// Ensure the global state exists (helper for public constructors).
pub fn global_or_err() -> Result<&'static Global, CacheError> {
    global::get().ok_or(CacheError::NoArena)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask test of `plain_slot` accepts exactly the addresses the division test accepts.
    #[test]
    fn stride_shift_agrees_with_division() {
        let mut sizes: Vec<usize> = crate::slab::kmalloc::KMALLOC_SIZES.to_vec();
        sizes.extend([24, 40, 48, 4000, 16384, 65536, 1 << 19, 1 << 20]);
        for size in sizes {
            let align = (size & size.wrapping_neg()).min(MAX_ALIGN);
            let c = CacheConfig::new("t", size, align, 0, 0);
            if c.stride_shift == 0 {
                continue;
            }
            let slab_bytes = (c.slab_pages as usize) << PAGE_SHIFT;
            let (stride, limit) = (c.stride as usize, c.limit as usize);
            assert_eq!(1usize << c.stride_shift, stride);
            // Slab bases are multiples of the slab alignment; check offsets from one such base.
            let base = c.slab_align() << PAGE_SHIFT;
            for rel in (0..slab_bytes).step_by(8) {
                let by_division = rel % stride == 0 && rel < limit;
                let by_mask = (base + rel) & (stride - 1) == 0;
                assert_eq!(by_division, by_mask, "size {size} offset {rel}");
            }
        }
    }
}
