//! `KmemCache`'s insides: a cache's configuration, its slot in the cache table, creation and destruction, and
//! its statistics.
//!
//! # Structure (after SLUB)
//!
//! A cache owns *slabs*: runs of pages from the page allocator, cut into `capacity` objects of `stride` bytes.
//! Each slab's state word (free-list head index, in-use count, flags) lives in the descriptor of its first page
//! ([`SlabFreelist`](crate::sync::slab_freelist::SlabFreelist)). Slabs with free objects are on the cache's
//! *partial list*: two [`TaggedStack`]s of head page numbers, one that pushes go to and one a shrink drains
//! (see `shrink`). Each thread has, per cache, a private list of free objects (a
//! [`ThreadCache`](super::thread_cache::ThreadCache), in the per-thread table of `thread_cache`).
//!
//! # Where each path lives
//!
//! - `alloc`: the allocation fast path at the top (one pop of the thread's list, shared by `kmalloc_nolock` and
//!   `KmemCache::alloc_nolock`), then refill, the shared path, new slabs, fault injection.
//! - `free`: the free fast path at the top (one push onto the thread's list, shared by `kfree_nolock` and
//!   `KmemCache::free_nolock`), then validation, the full-path free, flush, deferred frees, the shared path.
//! - `shrink`: shrinking (releasing empty slabs), the rescue of an allocation that found no memory, type-safe
//!   slab release, reclaim across caches.
//! - `checks`: the free-list checks every slow path shares (the diagnosing walk, cutting and reporting damage);
//!   the one-pass checks of a refill and a flush sit next to their paths in `alloc` and `free`.
//! - this file: configuration ([`CacheConfig`]), the cache slot ([`CacheInner`]) and its accessors, creation,
//!   destruction, statistics.
//!
//! Nothing in the slab layer waits on a `*_nolock` path: every shared structure is changed by CAS, and a
//! context that cannot use a structure (busy) takes another route. Allocation fails only when neither a slab
//! nor the page allocator has memory, after one pass that releases every cache's empty slabs and a rescue.
//!
//! # Invariants
//!
//! - A cache slot's configuration is written while the slot is reserved (`STATE_CREATING`) and read-only once
//!   it is published (`STATE_ACTIVE`, Release); the thread lists of its id are reset before that.
//! - Destroy claims every thread's list of the cache, waits for a running shrink, releases every slab, waits
//!   for the grace periods of a type-safe cache's released slabs, and frees the slot only if no object is still
//!   allocated (otherwise it is retired for good, its slabs left valid).
//!
//! # Ordering
//!
//! Objects move between threads only through slab state words and partial lists: pushes are `Release`, takes
//! are `Acquire` (see `sync`). Per-thread lists are private to their owner and need no ordering beyond the
//! compiler fences that order them against signal handlers.

use core::cell::UnsafeCell;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::debug;
use super::tables::{self, SlabState};
use super::thread_cache;
use crate::page::desc::Kind;
use crate::rcu::GracePeriod;
use crate::sync::slab_freelist::{Geometry, LinkCodec};
use crate::sync::tagged::TaggedStack;
use crate::sys::PAGE_SIZE;

/// Objects of this cache carry red zones, poison and an allocation state (slub_debug).
pub const FLAG_DEBUG: u32 = 1;

/// One of the kmalloc size-class caches.
pub const FLAG_KMALLOC: u32 = 2;

/// Hardened mode: encoded free-list links, checked on every pop and free (see `debug`).
pub const FLAG_HARDENED: u32 = 4;

/// Plain caches of 16 bytes and more whose free objects mean nothing — the kmalloc classes, and `KmemCache`s
/// with no constructor, not type-safe, with the link word at offset 0: a free writes
/// [`FREE_KEY`](super::free::FREE_KEY) into the object's second word and refuses an object that already holds
/// it (a double free); every allocation clears it (see `free`). Their slabs carry `Info::is_keyed`, which is
/// what the free fast path tests.
pub const FLAG_FREE_KEY: u32 = 8;

/// Plain `KmemCache`s whose free objects keep meaning — a constructor's state, type-safe readers that probe
/// freed objects, a link word moved with `freeptr_offset` — so that nothing may be written into a freed object
/// but its link word: each slab ends in a *free map*, one byte per object (the old SLAB allocator kept its
/// free-object index array in the slab the same way). A free sets the object's byte to
/// [`FREE_MARK`](super::free::FREE_MARK) and refuses an object whose byte holds it already (a double free,
/// wherever the first free put it); every allocation clears it. Their slabs carry `Info::is_mapped`, which
/// the free fast path tests.
pub const FLAG_MAP_KEY: u32 = 16;

/// Built with `KmemCacheBuilder::without_free_key` (tests only): neither key.
pub const FLAG_UNKEYED: u32 = 32;

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
    /// Whether a free object of this cache holds nothing anyone reads: no constructor state to keep, no
    /// type-safe readers that probe freed objects, the link word at the slot's start and the object there too —
    /// so its second word may carry the free key.
    pub(super) fn keeps_nothing_when_free(&self) -> bool {
        self.ctor == 0 && self.dtor == 0 && self.typesafe.is_none() && self.link_off == 0 && self.obj_off == 0
    }

    /// End each slab with a free map (see [`FLAG_MAP_KEY`]): one byte per object after the last one, so the slab
    /// holds `slab bytes / (stride + 1)` objects. Not for slabs of more than 64 pages (the map is found from an
    /// object's address by the slab's alignment, which stops there) or that would hold no object then.
    pub fn add_free_map(&mut self) {
        let bytes = (self.slab_pages as usize) * PAGE_SIZE;
        let stride = self.stride as usize;
        let capacity = (bytes / (stride + 1)).min(u16::MAX as usize);
        if self.slab_pages > 64 || capacity == 0 {
            return;
        }
        self.capacity = capacity as u16;
        self.limit = (capacity * stride) as u32;
        self.high = self.high.max(capacity as u32);
        // The map is a tail: a multiple of the stride is no longer always an object.
        self.stride_shift = 0;
        self.flags |= FLAG_MAP_KEY;
    }

    /// The address of the free-map byte of the slot at `slot` (see [`map_byte`](Self::map_byte)).
    #[inline]
    fn map_byte_addr(&self, slot: usize) -> usize {
        let bytes = (self.slab_pages as usize) * PAGE_SIZE;
        // Slabs of at most 64 pages are aligned to their size (`slab_align`).
        let base = slot & !(bytes - 1);
        let idx = (((slot - base) as u64).wrapping_mul(self.recip) >> 32) as usize;
        debug_assert!(idx < usize::from(self.capacity) && idx * self.stride as usize == slot - base);
        base + self.limit as usize + idx
    }

    /// The free-map byte of `slot`, a slot of this cache (which has [`FLAG_MAP_KEY`]).
    #[inline]
    pub(super) fn map_byte(&self, slot: usize) -> &'static core::sync::atomic::AtomicU8 {
        // SAFETY: `slot` is a slot of a slab of this cache; `base + limit` is the end of the slab's objects and
        // the map of `capacity` bytes follows inside the slab (`add_free_map`); arena memory is never unmapped.
        // Every context reads and writes the byte atomically.
        unsafe { &*(self.map_byte_addr(slot) as *const core::sync::atomic::AtomicU8) }
    }

    /// Compute the layout of a cache. `size` is the usable object size, `freeptr` the link offset inside the
    /// object (non-debug caches only).
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
        // The per-thread list holds up to about 32 KiB of small objects (16 to 512 of them), and 16 to 4 of the
        // large classes (at most 128 KiB), never less than a slab: a refill takes a whole slab.
        let high = if stride <= 4096 { (32768 / stride).clamp(16, 512) } else { (131072 / stride).clamp(4, 16) };
        let high = high.max(capacity);
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
    pub(super) fn construct(&self, obj: usize) {
        if self.ctor != 0 {
            // SAFETY: `ctor` was stored from a `fn(NonNull<u8>)`; `obj` is a fresh object of this cache.
            let f: fn(NonNull<u8>) = unsafe { core::mem::transmute::<usize, fn(NonNull<u8>)>(self.ctor) };
            // SAFETY: arena addresses are never null.
            f(unsafe { NonNull::new_unchecked(obj as *mut u8) });
        }
    }

    /// Run the destructor (if any) on the object at `obj`.
    pub(super) fn destruct(&self, obj: usize) {
        if self.dtor != 0 {
            // SAFETY: as in `construct`.
            let f: fn(NonNull<u8>) = unsafe { core::mem::transmute::<usize, fn(NonNull<u8>)>(self.dtor) };
            // SAFETY: arena addresses are never null.
            f(unsafe { NonNull::new_unchecked(obj as *mut u8) });
        }
    }

    /// Alignment of a slab's first page, in pages.
    #[inline]
    pub(super) fn slab_align(&self) -> usize {
        (self.slab_pages as usize).min(64)
    }
}

pub(super) const STATE_FREE: u32 = 0;

pub(super) const STATE_CREATING: u32 = 1;

pub(super) const STATE_ACTIVE: u32 = 2;

pub(super) const STATE_LEAKED: u32 = 3;

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
    pub(super) cfg: UnsafeCell<CacheConfig>,
    pub(super) state: AtomicU32,
    pub(super) id: AtomicU32,
    /// Slabs with free objects: two lists, so that a shrink can move the slabs it keeps from one to the other
    /// one at a time (see "Shrinking"). Pushes go to `partial[active]`; pops try it first, then the other.
    pub(super) partial: [TaggedStack; 2],
    /// Index of the list pushes go to (0 or 1); a shrink flips it and drains the other one.
    pub(super) active: AtomicU32,
    /// Head page + 1 of the slab a shrink holds off the lists (0: none), named *before* it is taken off, so
    /// that an allocation that finds no memory can take its objects (`rescue`).
    pub(super) hand: AtomicU32,
    /// Changes of `hand` and `active`: a rescue that saw it unchanged across its look saw every slab.
    pub(super) moves: AtomicU64,
    /// Slabs currently owned by the cache.
    pub nr_slabs: AtomicU64,
    /// Event counters.
    pub counters: CacheCounters,
    /// Fault injection.
    pub fault: Fault,
    /// Empty events already handled by the last shrink.
    pub shrunk_at: AtomicU64,
    /// Who is shrinking: 0 when nobody, else the shrinking thread's identity (`shrink::shrinker_id`; only one
    /// shrink at a time, others skip or wait).
    pub(super) shrinking: AtomicUsize,
    /// In a fork child: the forking thread's own shrink held `shrinking` at the fork, interrupted by the signal
    /// handler that forked (see `shrink::after_fork_child`).
    pub(super) held_at_fork: AtomicBool,
}

// SAFETY: `cfg` is written only while the slot is reserved (STATE_CREATING, not yet published) and read-only
// afterwards; everything else is atomic.
unsafe impl Sync for CacheInner {}

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
    pub(super) fn geometry(&self, g: &SlabState, head: u32) -> Geometry {
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
    pub(super) fn link(&self, slot: usize) -> &core::sync::atomic::AtomicUsize {
        // SAFETY: `slot` is a slot of this cache, free and owned by the caller; link_off is in bounds and
        // pointer-aligned; arena memory is never unmapped.
        unsafe { &*((slot + self.cfg().link_off as usize) as *const core::sync::atomic::AtomicUsize) }
    }

    /// How this cache's link words are stored.
    #[inline(always)]
    pub(super) fn codec(&self) -> LinkCodec {
        LinkCodec::new(self.cfg().key)
    }

    /// The decoded successor of the free slot `slot` on whatever list holds it (0: the end).
    #[inline(always)]
    pub(super) fn next_of(&self, slot: usize) -> usize {
        let at = slot + self.cfg().link_off as usize;
        self.codec().decode(at, self.link(slot).load(Ordering::Relaxed))
    }

    /// Make `next` the successor of the free slot `slot`.
    #[inline(always)]
    pub(super) fn set_next(&self, slot: usize, next: usize) {
        let at = slot + self.cfg().link_off as usize;
        self.link(slot).store(self.codec().encode(at, next), Ordering::Relaxed);
    }

    /// Whether `addr` is exactly a slot of a live slab of this cache (of the slab at `slab` if given): what every
    /// link of a free list must be.
    pub(super) fn is_slot(&self, g: &SlabState, addr: usize, slab: Option<u32>) -> bool {
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
    pub(super) fn index_of(&self, rel: usize) -> Option<u32> {
        let c = self.cfg();
        let idx = ((rel as u64).wrapping_mul(c.recip) >> 32) as usize;
        (idx * c.stride as usize == rel && rel < c.limit as usize).then_some(idx as u32)
    }

    /// Put a slab whose `LISTED` flag the caller set (or holds) on the partial list pushes go to.
    #[inline]
    pub(super) fn list_push(&self, g: &SlabState, head: u32) {
        let i = self.active.load(Ordering::Relaxed) as usize & 1;
        self.partial[i].push(head, &g.pages.desc(head as usize).next);
    }

    /// Pop a slab off the partial lists (the one pushes go to first), taking its take right.
    #[inline]
    pub(super) fn list_pop(&self, g: &SlabState) -> Option<u32> {
        let i = self.active.load(Ordering::Relaxed) as usize & 1;
        let next_of = |i: u32| &g.pages.desc(i as usize).next;
        self.partial[i].pop(next_of).or_else(|| self.partial[i ^ 1].pop(next_of))
    }

    /// A snapshot of this cache's statistics (sums the per-thread counters).
    pub fn stats(&self, g: &SlabState) -> CacheStats {
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
    pub fn alloc_slow(&self) -> u64 {
        self.alloc_refill + self.shared_allocs
    }

    /// Frees that did not go onto the thread's list directly.
    pub fn free_slow(&self) -> u64 {
        self.deferred_frees + self.shared_frees
    }

    /// Add another cache's counters (for totals).
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
pub fn create(g: &SlabState, cfg: CacheConfig) -> Result<u16, CacheError> {
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
            // Acquire: pairs with the AcqRel advance below by another creator (and the Acquire of scanners in
            // `cache_count`): a slot below the counter has had its state claimed.
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
        // Hardened links refuse a double free by themselves (`free_hardened`); the map stays unused.
        cfg.flags &= !FLAG_MAP_KEY;
    }
    if cfg.flags & (FLAG_DEBUG | FLAG_HARDENED | FLAG_UNKEYED) == 0
        && cfg.stride >= 16
        && (cfg.flags & FLAG_KMALLOC != 0 || cfg.keeps_nothing_when_free())
    {
        cfg.flags |= FLAG_FREE_KEY;
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

pub(super) fn reset_counters(k: &CacheCounters) {
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
pub fn destroy(g: &SlabState, id: u16) -> DestroyReport {
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
        // Release: pairs with the Acquire in `is_active` (stats, scans) (a stale handle sees the
        // cache gone after everything destroy did).
        c.state.store(STATE_LEAKED, Ordering::Release);
    } else {
        // Release: pairs with the AcqRel CAS of a creator that reuses the slot (it sees the slot emptied).
        c.state.store(STATE_FREE, Ordering::Release);
    }
    DestroyReport { slabs_released: released, live_objects: live.max(u64::from(slabs_left != 0)) }
}

/// Run `f` on every live cache.
pub fn for_each_cache(g: &SlabState, mut f: impl FnMut(&CacheInner)) {
    for id in 0..g.cache_count() {
        let c = g.cache(id);
        if c.is_active() {
            f(c);
        }
    }
}

/// Ensure the global state exists (helper for public constructors).
pub fn global_or_err() -> Result<&'static SlabState, CacheError> {
    tables::state().ok_or(CacheError::NoArena)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::PAGE_SHIFT;

    /// The mask test of `free_fast` accepts exactly the addresses the division test accepts.
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

    /// A free map fits in its slab after the last object, gives each object its own byte, and is found from
    /// any object's address; no multiple of the stride past the objects passes for one.
    #[test]
    fn free_map_layout() {
        for size in [8usize, 16, 24, 40, 64, 100, 640, 1000, 4096, 5000, 20_000, 1 << 17, 1 << 20] {
            for align in [8usize, 64, 4096] {
                let mut c = CacheConfig::new("t", size, align, 0, 0);
                c.add_free_map();
                if c.flags & FLAG_MAP_KEY == 0 {
                    // Only slabs of more than 64 pages, or of one object that leaves no byte, go without.
                    assert!(c.slab_pages > 64 || c.capacity == 1, "size {size} align {align}: {c:?}");
                    continue;
                }
                let slab_bytes = (c.slab_pages as usize) << PAGE_SHIFT;
                let (stride, capacity) = (c.stride as usize, usize::from(c.capacity));
                assert!(capacity > 0 && c.limit as usize == capacity * stride, "{c:?}");
                assert!(c.limit as usize + capacity <= slab_bytes, "size {size} align {align}: the map overflows");
                assert_eq!(c.stride_shift, 0);
                let base = c.slab_align() << PAGE_SHIFT;
                for i in 0..capacity {
                    let byte = c.map_byte_addr(base + i * stride);
                    assert_eq!(byte, base + c.limit as usize + i, "size {size} align {align} object {i}");
                }
                for rel in (c.limit as usize..slab_bytes).step_by(8) {
                    let idx = ((rel as u64).wrapping_mul(c.recip) >> 32) as usize;
                    assert!(!(idx * stride == rel && rel < c.limit as usize));
                }
            }
        }
    }
}
