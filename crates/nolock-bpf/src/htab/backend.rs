//! Element backends: where elements come from and how they go back.
//!
//! - [`Backend::Prealloc`] — **the kernel's default since BPF hash maps exist (v3.19; per-CPU freelist since
//!   v4.6, `extra_elems` since v4.10)**: every element allocated at map creation; new keys pop a per-CPU
//!   free list (`-E2BIG` when it is empty), updates of an existing key swap with this CPU's spare element, freed
//!   elements are reused at once. Memory: `elem_size * (max_entries + CPUs)` whatever the occupancy.
//! - [`Backend::BpfMemAlloc`] — **`BPF_F_NO_PREALLOC` since v6.1** (bpf_mem_alloc,
//!   [`crate::memalloc`]): elements from per-CPU caches with watermarks and a refill deferred to an `irq_work`
//!   (at region end, or late); immediate reuse (its known false-positive lookups). Before v6.1
//!   `BPF_F_NO_PREALLOC` was `kmalloc(GFP_ATOMIC)` plus `call_rcu` (the htab-mem "kmalloc+call_rcu" column).
//! - [`Backend::Nolock`] — **the seed's migration, no kernel yet**: an exact-size nolock [`KmemCache`] and one
//!   of nolock's lifetime classes ([`NolockReuse`]): `TYPESAFE_BY_SRCU_FAST` immediate type-safe reuse (case
//!   D), or a free after a grace period through `kfree_rcu_nolock` (case B, non-sleepable readers) or
//!   `kfree_srcu_fast_nolock` (case C, sleepable readers).

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use nolock::rcu::srcu::SrcuFast;
use nolock::sync::tagged::TaggedStack;
use nolock::{Gfp, KmemCache, SlabFlags};

use super::elem::{Elem, OFF_RCU};

/// How a [`Backend::Nolock`] map's removed elements become reusable.
#[derive(Clone, Copy, Debug)]
pub enum NolockReuse {
    /// Case D: a `TYPESAFE_BY_SRCU_FAST` cache (Tasks Trace domain, which implies RCU): a removed element is
    /// reused at once, but only as an element of this map's cache; lookups revalidate with the element's
    /// version (no false key match). In [`LockMode::LockFree`](super::LockMode::LockFree) the reuse waits for
    /// an RCU grace period (the writers' walks need it).
    TypesafeImmediate,
    /// Case B: `kfree_rcu_nolock` after an RCU grace period; readers use `rcu_read_lock`.
    AfterRcu,
    /// Case C: `kfree_srcu_fast_nolock` after a grace period of this SRCU-fast domain (sleepable readers);
    /// readers use the domain's `read_lock_fast`.
    AfterSrcu(&'static SrcuFast),
}

/// Which element backend a map uses (see the module documentation for the kernel version of each).
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// All elements allocated at creation (the kernel's default).
    Prealloc,
    /// `BPF_F_NO_PREALLOC` since v6.1: a fixed-size [`BpfMemAlloc`](crate::memalloc::BpfMemAlloc) with this
    /// refill mode.
    BpfMemAlloc(crate::memalloc::RefillMode),
    /// An exact-size nolock cache with one of nolock's lifetime classes.
    Nolock(NolockReuse),
}

impl Backend {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Prealloc => "prealloc",
            Backend::BpfMemAlloc(_) => "bpf_ma",
            Backend::Nolock(NolockReuse::TypesafeImmediate) => "nolock-D",
            Backend::Nolock(NolockReuse::AfterRcu) => "nolock-B",
            Backend::Nolock(NolockReuse::AfterSrcu(_)) => "nolock-C",
        }
    }
}

/// Number of CPUs the kernel's formulas count (`num_possible_cpus`): the machine's parallelism.
pub fn possible_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The preallocated pool: one array, per-CPU free lists (index stacks) and per-CPU spare elements.
pub struct PreallocPool {
    base: *mut u8,
    layout: Layout,
    elem_size: usize,
    lists: Box<[TaggedStack]>,
    extra: Box<[AtomicUsize]>,
    /// Lock-free mode only: elements borrowed while the array's free elements wait for their grace period.
    pub overflow: Option<NolockPool>,
}

// SAFETY: the array is owned by the pool; all shared access goes through atomics.
unsafe impl Send for PreallocPool {}
// SAFETY: as above.
unsafe impl Sync for PreallocPool {}

impl PreallocPool {
    /// `max_entries` elements in the free lists plus one spare per CPU.
    ///
    /// # Context
    /// Normal context: allocates through the global allocator.
    pub fn new(elem_size: usize, max_entries: usize) -> Option<Self> {
        let ncpu = possible_cpus();
        let n = max_entries + ncpu;
        let layout = Layout::from_size_align(elem_size.checked_mul(n)?, 64).ok()?;
        // SAFETY: the layout has a non-zero size (max_entries >= 1).
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            return None;
        }
        let lists: Box<[TaggedStack]> = (0..ncpu).map(|_| TaggedStack::new()).collect();
        let extra: Box<[AtomicUsize]> = (0..ncpu).map(|_| AtomicUsize::new(0)).collect();
        let pool = PreallocPool { base, layout, elem_size, lists, extra, overflow: None };
        for i in 0..max_entries {
            let e = pool.addr(i as u32);
            pool.lists[i % ncpu].push(i as u32, Elem(e).free_link());
        }
        for c in 0..ncpu {
            pool.extra[c].store(pool.addr((max_entries + c) as u32), Ordering::Relaxed);
        }
        Some(pool)
    }

    #[inline]
    fn addr(&self, i: u32) -> usize {
        self.base as usize + i as usize * self.elem_size
    }

    #[inline]
    fn index(&self, e: usize) -> u32 {
        ((e - self.base as usize) / self.elem_size) as u32
    }

    #[inline]
    fn my_list(&self) -> usize {
        crate::cpu::this_cpu().unwrap_or(0) % self.lists.len()
    }

    /// Pop a free element: this CPU's list, then the others' (the kernel's `pcpu_freelist_pop`); in lock-free
    /// mode, when every free element still waits for its grace period, borrow one from the overflow cache.
    #[inline]
    pub fn pop(&self) -> Option<usize> {
        let me = self.my_list();
        let n = self.lists.len();
        for k in 0..n {
            let l = &self.lists[(me + k) % n];
            if let Some(i) = l.pop(|j| Elem(self.addr(j)).free_link()) {
                return Some(self.addr(i));
            }
        }
        self.overflow.as_ref()?.alloc()
    }

    /// Whether `e` is an element of the array (not a borrowed one).
    #[inline]
    fn owns(&self, e: usize) -> bool {
        e >= self.base as usize && e < self.base as usize + self.layout.size()
    }

    /// An element for the update of an existing key: this CPU's spare, else a free one.
    #[inline]
    pub fn take_extra(&self) -> Option<usize> {
        let s = &self.extra[self.my_list()];
        // Acquire: pairs with the Release CAS in `free` that parked the element (its old contents are ours).
        match s.swap(0, Ordering::Acquire) {
            0 => self.pop(),
            e => Some(e),
        }
    }

    /// Give an element back: a replaced element becomes this CPU's spare if it has none, else it goes to the
    /// free list.
    #[inline]
    pub fn free(&self, e: usize, replaced: bool) {
        if !self.owns(e) {
            if let Some(o) = &self.overflow {
                // SAFETY: not an array element, so it was borrowed from the overflow cache; the caller gives
                // it back once nothing can reach it.
                unsafe { o.free_now(e) };
            }
            return;
        }
        if replaced {
            let s = &self.extra[self.my_list()];
            // Release: pairs with the Acquire swap in `take_extra`.
            if s.compare_exchange(0, e, Ordering::Release, Ordering::Relaxed).is_ok() {
                return;
            }
        }
        self.lists[self.my_list()].push(self.index(e), Elem(e).free_link());
    }

    /// Bytes of the array (and of the overflow cache's slabs).
    pub fn bytes(&self) -> usize {
        self.layout.size() + self.overflow.as_ref().map_or(0, |o| o.bytes())
    }
}

impl Drop for PreallocPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; no element is used after the map is dropped.
        unsafe { std::alloc::dealloc(self.base, self.layout) };
    }
}

/// Constructor of type-safe element slots: a fresh slot has version 0 and no links.
fn elem_ctor(p: NonNull<u8>) {
    let e = Elem(p.as_ptr() as usize);
    e.seq().store(0, Ordering::Relaxed);
    e.next().store(0, Ordering::Relaxed);
    e.repl().store(0, Ordering::Relaxed);
}

/// The nolock cache of a [`Backend::Nolock`] map.
pub struct NolockPool {
    /// The exact-size cache (taken out at drop to destroy it).
    pub cache: Option<KmemCache>,
    /// The lifetime class.
    pub reuse: NolockReuse,
}

impl NolockPool {
    /// An exact-size cache for `elem_size`-byte elements.
    ///
    /// # Context
    /// Normal context (cache creation).
    pub fn new(name: &str, elem_size: usize, reuse: NolockReuse) -> Result<Self, nolock::CacheError> {
        let layout = Layout::from_size_align(elem_size, 8).map_err(|_| nolock::CacheError::BadSize)?;
        let mut b = KmemCache::builder(name, layout).freeptr_offset(OFF_RCU).ctor(elem_ctor);
        if matches!(reuse, NolockReuse::TypesafeImmediate) {
            b = b.flags(SlabFlags::TYPESAFE_BY_SRCU_FAST);
        }
        Ok(NolockPool { cache: Some(b.build()?), reuse })
    }

    /// Allocate an element.
    #[inline]
    pub fn alloc(&self) -> Option<usize> {
        self.cache.as_ref()?.alloc_nolock(Gfp::NONE).map(|p| p.as_ptr() as usize)
    }

    /// Free an element now.
    ///
    /// # Safety
    /// `e` is an element of this cache that no walk can reach any more (see `list`, invariant 4).
    #[inline]
    pub unsafe fn free_now(&self, e: usize) {
        if let Some(c) = &self.cache {
            // SAFETY: per the caller; element addresses are never 0.
            unsafe { c.free_nolock(NonNull::new_unchecked(e as *mut u8)) };
        }
    }

    /// Memory held by the cache's slabs, in bytes.
    pub fn bytes(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| {
            let s = c.stats();
            s.slabs as usize * s.slab_pages * 4096
        })
    }
}
