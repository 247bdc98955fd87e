//! The slab layer: `KmemCache`, the kmalloc size classes, and per-thread caches (shards).
//!
//! - [`cache`]: one cache's slabs, partial list and the alloc/free paths (fast, refill, flush, deferred,
//!   shared); cache creation and destruction.
//! - [`shard`]: per-thread lists guarded by busy flags; claiming, thread exit, orphans, fork.
//! - [`kmalloc`]: size classes, "try the next bucket", large allocations, `kfree_nolock` by address.
//!
//! This file holds the public `KmemCache` handle.

pub mod cache;
pub mod kmalloc;
pub mod shard;

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use crate::debug::{self, FaultInjection, FreeError, FreeErrorKind};
use crate::global::Global;
use crate::page::Gfp;
use crate::page::desc::Kind;
use cache::{CacheConfig, CacheError, CacheName, CacheStats, DestroyReport, FLAG_DEBUG, MAX_ALIGN, MAX_OBJECT_SIZE};

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
    g: &'static Global,
    id: u16,
}

/// Options for a [`KmemCache`].
#[derive(Clone, Debug)]
pub struct KmemCacheBuilder<'a> {
    name: &'a str,
    layout: Layout,
    freeptr_offset: usize,
    debug: Option<bool>,
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
        if self.freeptr_offset % 8 != 0 || self.freeptr_offset + 8 > osz {
            return Err(CacheError::BadFreeptrOffset);
        }
        let g = cache::global_or_err()?;
        crate::init_normal_context();
        let debug = self.debug.unwrap_or_else(|| g.kmalloc_debug());
        let flags = if debug { FLAG_DEBUG } else { 0 };
        let cfg = CacheConfig::new(self.name, size, align, self.freeptr_offset, flags);
        let id = cache::create(g, cfg)?;
        Ok(KmemCache { g, id })
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
        KmemCacheBuilder { name, layout, freeptr_offset: 0, debug: None }
    }

    fn inner(&self) -> &cache::CacheInner {
        self.g.cache(self.id)
    }

    /// Allocate one object (`kmem_cache_alloc_nolock`). `None` means out of memory (or an injected failure).
    ///
    /// # Context
    /// Any context: async-signal-safe, reentrant, never blocks, never takes a lock.
    #[inline]
    pub fn alloc_nolock(&self, flags: Gfp) -> Option<NonNull<u8>> {
        self.inner().alloc(self.g, self.id, flags)
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
        if info.cache_id() != self.id {
            return err(FreeErrorKind::WrongCache { owner: g.cache(info.cache_id()).name() });
        }
        match c.validate(g, addr, info) {
            Ok(slot) => {
                c.free_slot(g, self.id, slot);
                Ok(())
            }
            Err(e) => {
                c.counters.bad_frees.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
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
    ///
    /// # Context
    /// Any context (reads counters; O(threads)).
    pub fn stats(&self) -> CacheStats {
        self.inner().stats(self.g)
    }

    /// Make allocations from this cache fail on purpose (see [`FaultInjection`]).
    ///
    /// # Context
    /// Any context.
    pub fn set_fault_injection(&self, f: FaultInjection) {
        debug::set_fault(self.inner(), f);
    }

    /// Release the cache's entirely free slabs to the page allocator; returns how many.
    ///
    /// # Context
    /// Any context; lock-free. Work is proportional to the number of partially free slabs.
    pub fn shrink(&self) -> usize {
        self.inner().shrink(self.g, 0)
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
        cache::destroy(me.g, me.id)
    }
}

impl Drop for KmemCache {
    fn drop(&mut self) {
        cache::destroy(self.g, self.id);
    }
}

/// `kmem_cache_alloc_nolock`: [`KmemCache::alloc_nolock`].
///
/// # Context
/// Any context.
#[inline]
pub fn kmem_cache_alloc_nolock(cache: &KmemCache, flags: Gfp) -> Option<NonNull<u8>> {
    cache.alloc_nolock(flags)
}

/// `kmem_cache_free_nolock`: [`KmemCache::free_nolock`].
///
/// # Safety
/// As [`KmemCache::free_nolock`].
///
/// # Context
/// Any context.
#[inline]
pub unsafe fn kmem_cache_free_nolock(cache: &KmemCache, ptr: NonNull<u8>) {
    // SAFETY: forwarded.
    unsafe { cache.free_nolock(ptr) }
}
