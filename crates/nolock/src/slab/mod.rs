//! The slab layer: `KmemCache`, the kmalloc size classes, per-thread caches, and `kfree_rcu`.
//!
//! - `alloc`: the allocation fast path at the top (one for kmalloc and `KmemCache`), then refill, the shared
//!   path, new slabs.
//! - `free`: the free fast path at the top (one for `kfree_nolock` and `KmemCache`), then validation, flush,
//!   deferred frees, the shared path.
//! - `shrink`: releasing empty slabs, the rescue of an allocation that finds no memory, type-safe release.
//! - `checks`: the free-list checks the slow paths share.
//! - `cache`: a cache's configuration and table slot, creation, destruction, statistics.
//! - `thread_cache`: the per-thread table (one `ThreadCache` per cache id for every thread slot) and what the
//!   layer does when a slot's thread exits, dies or is lost in a fork.
//! - [`kfree_rcu`]: `kfree_rcu_nolock` / `kfree_srcu_fast_nolock`: per-thread pointer blocks, their rings, the
//!   per-object fallback callback.
//! - [`kmalloc`]: size classes, "try the next bucket", large allocations, `kfree_nolock` by address.
//! - `tables`: the cache and per-thread tables, in one mapping this layer owns (the global state holds it
//!   opaquely).
//!
//! Below it: `page` (slabs are page runs, page descriptors map any address to its slab), `thread` (slots),
//! `rcu` (grace periods, for `kfree_rcu` and type-safe caches), `sync`, `sys`. Nothing below imports it but the
//! global state (which holds its tables) and `debug` (which checks its objects).
//!
//! This file holds the public `KmemCache` handle.
//!
//! # Type-safe caches: lock-free lookups with revalidation
//!
//! A cache created with [`SlabFlags::TYPESAFE_BY_RCU`] or [`SlabFlags::TYPESAFE_BY_SRCU_FAST`] reuses a freed
//! object at once, but its memory stays an object *of this cache* until every reader that could still see it
//! is gone: an empty slab goes back to the page allocator only after a grace period, and its destructors run
//! then. That is what lets readers look objects up without locks and without waiting, provided they
//! revalidate (the kernel's `SLAB_TYPESAFE_BY_RCU` rules):
//!
//! ```text
//! rcu_read_lock (or a Tasks Trace / SRCU-fast section)
//! restart:
//!   for e in bucket(key):                 // lists end in a "nulls" marker naming the bucket
//!       if e.key == key && try_get(e):    // take a reference: fails on a free element (count 0)
//!           if e.key == key: return e     // re-check: e may have been freed and reused meanwhile
//!           put(e); goto restart
//!   if end marker != this bucket: goto restart   // we followed a recycled element into another list
//!   return None
//! ```
//!
//! Fields readers probe (key, reference count, a type tag, a lock) are set up by the constructor once per
//! slab life and must not be clobbered by the allocator: put the free-list link elsewhere with
//! [`KmemCacheBuilder::freeptr_offset`]. The runnable reference is `examples/typesafe_hash.rs`
//! (`cargo run --release -p nolock-mm --example typesafe_hash`): a hash table with nulls-terminated buckets whose
//! RCU and Tasks Trace readers run against writers that insert and delete the same keys.

pub(crate) mod alloc;
pub(crate) mod cache;
pub(crate) mod checks;
pub mod debug;
pub(crate) mod free;
pub mod kfree_rcu;
pub mod kmalloc;
pub mod memcg;
pub(crate) mod shrink;
pub(crate) mod tables;
pub(crate) mod thread_cache;

pub(crate) use thread_cache::SLOT_HOOKS;

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, Ordering};

use crate::page::Gfp;
use crate::page::desc::Kind;
use crate::rcu::GracePeriod;
use crate::rcu::srcu::SrcuFast;
use cache::{
    CacheConfig, CacheError, CacheName, CacheStats, DestroyReport, FLAG_DEBUG, FLAG_HARDENED, FLAG_UNKEYED, MAX_ALIGN,
    MAX_OBJECT_SIZE, NO_FALLBACK,
};
use debug::{FaultInjection, FreeError, FreeErrorKind};
use tables::SlabState;

/// A cache of fixed-size objects (the kernel's `struct kmem_cache`), allocated and freed from any context.
///
/// Objects are carved from slabs of the arena; each thread keeps a short private list per cache, so the common
/// allocation and free touch only thread-local memory. Dropping the cache destroys it (see [`destroy`]).
///
/// ```
/// use core::alloc::Layout;
/// use nolock::{Gfp, KmemCache};
///
/// let cache = KmemCache::new("packets", Layout::new::<[u64; 6]>()).unwrap();
/// let p = cache.alloc_nolock(Gfp::ZERO).expect("out of memory");
/// // SAFETY: p came from this cache and is not used again.
/// unsafe { cache.free_nolock(p) };
/// assert_eq!(cache.stats().allocs, 1);
/// ```
///
/// [`destroy`]: KmemCache::destroy
pub struct KmemCache {
    g: &'static SlabState,
    id: u16,
    /// The accounting group every object is charged to ([`KmemCacheBuilder::memcg`]), if any.
    memcg: Option<&'static memcg::MemGroup>,
}

/// Options for a [`KmemCache`].
#[derive(Clone, Debug)]
pub struct KmemCacheBuilder<'a> {
    name: &'a str,
    layout: Layout,
    freeptr_offset: usize,
    debug: Option<bool>,
    hardened: Option<bool>,
    flags: SlabFlags,
    srcu: Option<&'static SrcuFast>,
    ctor: Option<fn(NonNull<u8>)>,
    dtor: Option<fn(NonNull<u8>)>,
    fallback: Option<bool>,
    memcg: Option<&'static memcg::MemGroup>,
    unkeyed: bool,
}

/// Cache creation flags (the kernel's `SLAB_*`). Combine with `|`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlabFlags(u32);

impl SlabFlags {
    /// No flags.
    pub const NONE: SlabFlags = SlabFlags(0);
    /// `SLAB_TYPESAFE_BY_RCU`: a freed object may be reused at once, but only as an object of this cache; the
    /// slab's memory goes back to the page allocator only after an RCU grace period.
    pub const TYPESAFE_BY_RCU: SlabFlags = SlabFlags(1);
    /// `SLAB_TYPESAFE_BY_SRCU_FAST`: the same, after a grace period of an SRCU-fast domain (the one given with
    /// [`KmemCacheBuilder::srcu_domain`], Tasks Trace by default — which also implies an RCU grace period, so
    /// both sleepable and non-sleepable readers are covered).
    pub const TYPESAFE_BY_SRCU_FAST: SlabFlags = SlabFlags(2);
    /// slub_debug checks for this cache (see [`debug`]).
    pub const DEBUG: SlabFlags = SlabFlags(4);
    /// Hardened free lists (the kernel's `SLAB_FREELIST_HARDENED`, mimalloc's secure mode): links stored
    /// encoded with a per-cache secret, checked on every pop, and a free of an object that is already free
    /// refused. See "Hardened mode" in [`debug`]. Default: [`debug::hardened_default`].
    pub const HARDENED: SlabFlags = SlabFlags(8);

    /// Whether every flag in `other` is set.
    pub const fn contains(self, other: SlabFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl core::ops::BitOr for SlabFlags {
    type Output = SlabFlags;
    fn bitor(self, rhs: SlabFlags) -> SlabFlags {
        SlabFlags(self.0 | rhs.0)
    }
}

impl<'a> KmemCacheBuilder<'a> {
    /// Where, inside a free object, the allocator keeps its free-list link (8 bytes, 8-aligned). The default 0
    /// overwrites the object's first word; pick another offset to keep fields that lock-free readers probe
    /// intact across free and reuse.
    pub fn freeptr_offset(mut self, offset: usize) -> Self {
        self.freeptr_offset = offset;
        self
    }

    /// Force debug checks on or off for this cache (default: whether kmalloc debug mode is on now).
    pub fn debug(mut self, on: bool) -> Self {
        self.debug = Some(on);
        self
    }

    /// Creation flags, e.g. [`SlabFlags::TYPESAFE_BY_SRCU_FAST`].
    pub fn flags(mut self, flags: SlabFlags) -> Self {
        self.flags = self.flags | flags;
        if flags.contains(SlabFlags::DEBUG) {
            self.debug = Some(true);
        }
        if flags.contains(SlabFlags::HARDENED) {
            self.hardened = Some(true);
        }
        self
    }

    /// Force hardened mode on or off for this cache (default: [`debug::hardened_default`], i.e.
    /// `NOLOCK_HARDENED`).
    pub fn hardened(mut self, on: bool) -> Self {
        self.hardened = Some(on);
        self
    }

    /// The SRCU-fast domain whose grace period a `TYPESAFE_BY_SRCU_FAST` cache waits for (default: Tasks Trace).
    pub fn srcu_domain(mut self, domain: &'static SrcuFast) -> Self {
        self.srcu = Some(domain);
        self
    }

    /// A constructor, run once per object when its slab is set up (not at each allocation), so that fields
    /// lock-free readers probe — a type tag, a reference count, a key, a lock — stay meaningful across free and
    /// reuse. It runs inside the allocation that needs a new slab, so it must be async-signal-safe and must not
    /// allocate from this cache.
    pub fn ctor(mut self, ctor: fn(NonNull<u8>)) -> Self {
        self.ctor = Some(ctor);
        self
    }

    /// A destructor, run once per object when its slab is really released (for a type-safe cache: after the
    /// grace period, on the grace-period worker thread), to release what the constructor set up.
    pub fn dtor(mut self, dtor: fn(NonNull<u8>)) -> Self {
        self.dtor = Some(dtor);
        self
    }

    /// Tests only (the `test-hooks` feature): no double-free key of either kind (the free key in the object, the
    /// free map after the slab's objects), so that a double free not at the head of a list gets past the free
    /// and the slow paths' own checks of lists and chains — what stands between a use-after-free write and a
    /// corrupt slab — can be tested on any layout.
    #[cfg(feature = "test-hooks")]
    pub fn without_free_key(mut self) -> Self {
        self.unkeyed = true;
        self
    }

    /// Pair the cache with a fallback cache of the same type that serves allocations while this thread's list
    /// is busy (a signal handler interrupted it). Default: on for type-safe caches, off otherwise (they use the
    /// shared slab lists instead). Either way allocation never fails for being busy.
    pub fn fallback(mut self, on: bool) -> Self {
        self.fallback = Some(on);
        self
    }

    /// Charge every object of the cache to `group` (the kernel's `SLAB_ACCOUNT`): each allocation charges
    /// [`KmemCache::object_size`] bytes and fails with `None` when that would pass the group's limit; each
    /// free uncharges it. Free such objects with [`KmemCache::free_nolock`], never `kfree_nolock`. See
    /// [`crate::memcg`].
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn memcg(mut self, group: &'static memcg::MemGroup) -> Self {
        self.memcg = Some(group);
        self
    }

    /// Create the cache.
    ///
    /// # Context
    /// Normal context: may start the background worker. Lock-free otherwise.
    pub fn build(self) -> Result<KmemCache, CacheError> {
        let size = self.layout.size();
        let align = self.layout.align();
        if size == 0 || size > MAX_OBJECT_SIZE {
            return Err(CacheError::BadSize);
        }
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(CacheError::BadAlign);
        }
        let osz = size.max(8).next_multiple_of(8);
        if !self.freeptr_offset.is_multiple_of(8) || self.freeptr_offset > osz - 8 {
            return Err(CacheError::BadFreeptrOffset);
        }
        let g = cache::global_or_err()?;
        normal_context_init();
        let debug = self.debug.unwrap_or_else(|| g.kmalloc_debug());
        let hardened = self.hardened.unwrap_or_else(debug::hardened_default);
        let flags = if debug { FLAG_DEBUG } else { 0 }
            | if hardened { FLAG_HARDENED } else { 0 }
            | if self.unkeyed { FLAG_UNKEYED } else { 0 };
        let mut cfg = CacheConfig::new(self.name, size, align, self.freeptr_offset, flags);
        cfg.typesafe = if self.flags.contains(SlabFlags::TYPESAFE_BY_SRCU_FAST) {
            Some(GracePeriod::srcu_fast(self.srcu.unwrap_or(&crate::rcu::tasks_trace::RCU_TASKS_TRACE)))
        } else if self.flags.contains(SlabFlags::TYPESAFE_BY_RCU) {
            Some(GracePeriod::RCU)
        } else {
            None
        };
        cfg.ctor = self.ctor.map_or(0, |f| f as usize);
        cfg.dtor = self.dtor.map_or(0, |f| f as usize);
        if flags & (FLAG_DEBUG | FLAG_HARDENED | FLAG_UNKEYED) == 0
            && (!cfg.keeps_nothing_when_free() || cfg.stride < 16)
        {
            // No free key inside the object (it keeps meaning while free, or has no room): a free map at the
            // slab's end instead (before the fallback cache copies the layout).
            cfg.add_free_map();
        }
        if cfg.typesafe.is_some() {
            // Type-safe objects stay readable after free: the link word must not sit on fields readers probe,
            // which is what `freeptr_offset` is for; poison would destroy them, so debug mode skips it.
            crate::rcu::gp_worker::ensure_started();
        }
        if self.fallback.unwrap_or(cfg.typesafe.is_some()) {
            let mut fb = cfg;
            let mut name = crate::sys::StackBuf::<32>::new();
            let _ = core::fmt::Write::write_fmt(&mut name, format_args!("{}-fb", self.name));
            fb.name = cache::CacheName::new(name.as_str());
            cfg.fallback = cache::create(g, fb)?;
        }
        let id = match cache::create(g, cfg) {
            Ok(id) => id,
            Err(e) => {
                if cfg.fallback != NO_FALLBACK {
                    cache::destroy(g, cfg.fallback);
                }
                return Err(e);
            }
        };
        Ok(KmemCache { g, id, memcg: self.memcg })
    }
}

impl core::fmt::Debug for KmemCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KmemCache").field("id", &self.id).field("name", &self.name()).finish()
    }
}

impl KmemCache {
    /// Create a cache named `name` for objects of `layout`.
    ///
    /// # Context
    /// Normal context (see [`KmemCacheBuilder::build`]).
    pub fn new(name: &str, layout: Layout) -> Result<Self, CacheError> {
        Self::builder(name, layout).build()
    }

    /// A builder for a cache with more options.
    pub fn builder(name: &str, layout: Layout) -> KmemCacheBuilder<'_> {
        KmemCacheBuilder {
            name,
            layout,
            freeptr_offset: 0,
            debug: None,
            hardened: None,
            flags: SlabFlags::NONE,
            srcu: None,
            ctor: None,
            dtor: None,
            fallback: None,
            memcg: None,
            unkeyed: false,
        }
    }

    fn fallback_id(&self) -> u16 {
        self.inner().cfg().fallback
    }

    fn inner(&self) -> &cache::CacheInner {
        self.g.cache(self.id)
    }

    /// Allocate one object (`kmem_cache_alloc_nolock`). `None` means out of memory (or an injected failure).
    #[inline]
    pub fn alloc_nolock(&self, flags: Gfp) -> Option<NonNull<u8>> {
        if let Some(m) = self.memcg {
            return self.alloc_charged(m, flags);
        }
        self.inner().alloc(self.g, self.id, flags)
    }

    /// [`alloc_nolock`](Self::alloc_nolock) of a cache charged to a group.
    #[cold]
    #[inline(never)]
    fn alloc_charged(&self, m: &memcg::MemGroup, flags: Gfp) -> Option<NonNull<u8>> {
        m.alloc_charged(
            || self.inner().alloc(self.g, self.id, flags),
            |_| self.object_size(),
            // SAFETY: `p` was just allocated from this cache and never handed out.
            |p| unsafe { self.free_uncharged(p) },
        )
    }

    /// Free an object of this cache (`kmem_cache_free_nolock`). A pointer that is not a live object of this
    /// cache is reported on standard error and not freed.
    ///
    /// # Safety
    /// A valid object must not be used afterwards.
    ///
    /// # Context
    /// Any context: async-signal-safe, reentrant, never blocks; never fails for a valid object.
    #[inline]
    pub unsafe fn free_nolock(&self, ptr: NonNull<u8>) {
        if let Some(m) = self.memcg {
            // SAFETY: forwarded.
            return unsafe { self.free_charged(m, ptr) };
        }
        // SAFETY: forwarded.
        unsafe { self.free_uncharged(ptr) }
    }

    /// [`free_nolock`](Self::free_nolock) of a cache charged to a group: free, and uncharge what was freed.
    ///
    /// # Safety
    /// As [`free_nolock`](Self::free_nolock).
    #[cold]
    #[inline(never)]
    unsafe fn free_charged(&self, m: &memcg::MemGroup, ptr: NonNull<u8>) {
        // SAFETY: forwarded.
        if let Err(e) = unsafe { self.try_free_nolock(ptr) } {
            debug::report(&e);
            return;
        }
        m.uncharge(self.object_size());
    }

    /// [`free_nolock`](Self::free_nolock) without the group.
    ///
    /// # Safety
    /// As [`free_nolock`](Self::free_nolock).
    #[inline(always)]
    unsafe fn free_uncharged(&self, ptr: NonNull<u8>) {
        // The fast path (see `free`): an object of this very cache, not in debug mode, pushed on the thread's
        // list. Everything else, the fallback cache's objects included, takes the full path.
        if cache::CacheInner::free_fast(self.g, ptr.as_ptr() as usize, Some(self.id)) {
            return;
        }
        // SAFETY: forwarded.
        unsafe { self.free_full(ptr) }
    }

    /// [`free_nolock`](Self::free_nolock) off its fast path.
    ///
    /// # Safety
    /// As [`free_nolock`](Self::free_nolock).
    #[inline(never)]
    unsafe fn free_full(&self, ptr: NonNull<u8>) {
        // SAFETY: forwarded.
        if let Err(e) = unsafe { self.try_free_nolock(ptr) } {
            debug::report(&e);
        }
    }

    /// [`free_nolock`](Self::free_nolock) that returns the error instead of reporting it.
    ///
    /// # Safety
    /// As [`free_nolock`](Self::free_nolock).
    ///
    /// # Context
    /// As [`free_nolock`](Self::free_nolock).
    #[inline]
    pub unsafe fn try_free_nolock(&self, ptr: NonNull<u8>) -> Result<(), FreeError> {
        let g = self.g;
        let c = self.inner();
        let addr = ptr.as_ptr() as usize;
        let err = |kind| {
            c.counters.bad_frees.fetch_add(1, Ordering::Relaxed);
            Err(FreeError::new(kind, addr).in_cache(c.name()))
        };
        if !g.pages.contains(addr) {
            return err(FreeErrorKind::Foreign);
        }
        let info = g.pages.info_of(addr);
        if info.kind() != Kind::Slab {
            return err(FreeErrorKind::NotAllocated);
        }
        let owner_id = info.cache_id();
        if owner_id != self.id && owner_id != self.fallback_id() {
            return err(FreeErrorKind::WrongCache { owner: g.cache(owner_id).name() });
        }
        g.cache(owner_id).free_checked(g, owner_id, addr, info)
    }

    /// The cache's name.
    pub fn name(&self) -> CacheName {
        self.inner().name()
    }

    /// Usable size of each object.
    pub fn object_size(&self) -> usize {
        self.inner().cfg().size as usize
    }

    /// A snapshot of the cache's counters.
    pub fn stats(&self) -> CacheStats {
        let mut s = self.inner().stats(self.g);
        if self.fallback_id() != NO_FALLBACK {
            let f = self.g.cache(self.fallback_id()).stats(self.g);
            let fallback_allocs = s.fallback_allocs;
            s.add(&f);
            s.fallback_allocs = fallback_allocs;
        }
        s
    }

    /// Make allocations from this cache fail on purpose (see [`FaultInjection`]).
    pub fn set_fault_injection(&self, f: FaultInjection) {
        debug::set_fault(self.inner(), f);
    }

    /// Ids of the cache and its fallback.
    fn ids(&self) -> impl Iterator<Item = u16> {
        core::iter::once(self.id).chain((self.fallback_id() != NO_FALLBACK).then_some(self.fallback_id()))
    }

    /// Release the cache's entirely free slabs to the page allocator; returns how many.
    ///
    /// # Context
    /// Any context; lock-free. Work is proportional to the number of partially free slabs.
    pub fn shrink(&self) -> usize {
        self.ids().map(|id| self.g.cache(id).shrink(self.g, 0)).sum()
    }

    /// Destroy the cache: take back every thread's cached objects, release every slab and free the cache slot.
    /// Objects still allocated are reported on standard error; their slabs are left untouched (so the objects
    /// stay valid memory) and the slot is not reused.
    ///
    /// # Context
    /// Normal context only: blocks briefly (a `membarrier` and a wait for in-flight operations of other threads
    /// on this cache, bounded by 200 ms per thread).
    pub fn destroy(self) -> DestroyReport {
        let me = core::mem::ManuallyDrop::new(self);
        me.destroy_both()
    }

    fn destroy_both(&self) -> DestroyReport {
        let fb = self.fallback_id();
        let mut r = cache::destroy(self.g, self.id);
        if fb != NO_FALLBACK {
            let f = cache::destroy(self.g, fb);
            r.slabs_released += f.slabs_released;
            r.live_objects += f.live_objects;
        }
        r
    }
}

impl Drop for KmemCache {
    fn drop(&mut self) {
        self.destroy_both();
    }
}

/// What cache creation runs first in its normal context, registered by the composition root (`process`:
/// the process hooks, membarrier registration, the workers). This layer names nothing above it, so the
/// root hands it the function; null until then (cache creation then starts nothing).
static NORMAL_CONTEXT_INIT: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Register the function cache creation runs first (see `NORMAL_CONTEXT_INIT`).
pub(crate) fn set_normal_context_init(f: fn()) {
    // Release: pairs with the Acquire in `normal_context_init`; the function is plain code, nothing else is
    // published with it.
    NORMAL_CONTEXT_INIT.store(f as *mut (), Ordering::Release);
}

fn normal_context_init() {
    // Acquire: pairs with the Release in `set_normal_context_init`.
    let p = NORMAL_CONTEXT_INIT.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: only `set_normal_context_init` stores here, and it stores a `fn()`.
        let f: fn() = unsafe { core::mem::transmute::<*mut (), fn()>(p) };
        f();
    }
}

/// The kernel's spelling of [`KmemCache::alloc_nolock`], of which this is an alias (one operation: the method is
/// the primary form, documented there).
#[inline]
pub fn kmem_cache_alloc_nolock(cache: &KmemCache, flags: Gfp) -> Option<NonNull<u8>> {
    cache.alloc_nolock(flags)
}

/// The kernel's spelling of [`KmemCache::free_nolock`], of which this is an alias (one operation: the method is
/// the primary form, documented there).
///
/// # Safety
/// As [`KmemCache::free_nolock`].
#[inline]
pub unsafe fn kmem_cache_free_nolock(cache: &KmemCache, ptr: NonNull<u8>) {
    // SAFETY: forwarded.
    unsafe { cache.free_nolock(ptr) }
}
