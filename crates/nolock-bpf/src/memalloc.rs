//! `BpfMemAlloc`: a faithful re-creation of the kernel's BPF memory allocator (`kernel/bpf/memalloc.c`), the
//! baseline that nolock's own primitives must beat.
//!
//! # What it is
//!
//! The kernel wrote `bpf_mem_alloc` because BPF programs run in any context (tracepoints, kprobes, NMIs) where
//! `kmalloc` could not be called. Its answer is a per-CPU cache of free objects in front of `kmalloc`, filled
//! and trimmed *later*, in an `irq_work`, where calling `kmalloc`/`kfree` is allowed. This module rebuilds it
//! over nolock's `kmalloc_nolock` with the kernel's constants, so that its costs and its failures can be
//! measured beside maps built on nolock directly. Here "CPU" is a thread slot and "IRQs off" an
//! [`IrqRegion`] (see [`crate::cpu`]).
//!
//! # Objects
//!
//! Every object carries an 8-byte header in front of the memory handed out (`LLIST_NODE_SZ`). While the
//! object is free the header is its link on whatever list holds it; while it is allocated the header holds the
//! address of the per-CPU cache that handed it out (or [`SHARED`] for an object a thread without a CPU took
//! straight from `kmalloc_nolock`). A variable-size allocator has 11 caches per CPU, of unit sizes
//! 96, 192, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096 (header included; the kernel's order, so that its
//! `size_index` table maps sizes up to 192 straight to 96 and 192); larger sizes use `fls`. A request whose
//! size plus header passes 4096 (so above 4088) fails: the kernel's -E2BIG. A fixed-size allocator has one
//! cache per CPU whose unit is the size plus the header, of any size `kmalloc` serves (a hash map with 4 KiB
//! values has 4152-byte elements: watermarks 1/5, batch 3, prefill 1).
//!
//! # The lists of one per-CPU cache, and who touches them when
//!
//! - `free_llist` (+ `free_cnt`): the objects ready to hand out. Only the owning CPU (its thread and the
//!   signal handlers that interrupt it) touches it, with plain loads and stores, and only while holding the
//!   cache's `active` counter at 1.
//! - `free_llist_extra`: frees that found `active` already held (a handler that interrupted an allocation or a
//!   free on the same cache), and frees from threads without a CPU. An atomic list: any context pushes, the
//!   owner's trim takes all.
//! - `free_by_rcu` (+ tail): objects given to `free_rcu`, waiting for the cache's RCU callback. Owner only,
//!   under `active`; a nested `free_rcu` goes to `free_llist_extra_rcu` (atomic) instead, which the owner's
//!   `irq_work` moves over.
//! - `waiting_for_gp` (+ tail): the batch of `free_by_rcu` that the one in-flight RCU callback
//!   (`call_rcu_in_progress`) covers. When the RCU grace period ends the callback moves it to the target
//!   cache's `free_by_rcu_ttrace`: the objects may be reused from then on.
//! - `free_by_rcu_ttrace`: objects on their way back to `kmalloc`: trimmed objects (any CPU pushes to its
//!   target's list) and `free_rcu` objects past their RCU grace period. The owner's refill takes single objects
//!   from it; `do_call_rcu_ttrace` takes it all.
//! - `waiting_for_gp_ttrace`: the batch the one in-flight Tasks Trace callback (`call_rcu_ttrace_in_progress`)
//!   covers. The owner's refill may still take objects from it; when the Tasks Trace grace period ends (which
//!   implies an RCU grace period, `rcu_trace_implies_rcu_gp`), the callback gives the rest to `kfree_nolock`.
//!
//! # The `active` counter
//!
//! The kernel edits `free_llist` with interrupts off, so the only thing that can run in the middle of an edit
//! on the same CPU is an NMI (a BPF program attached to a perf event). It cannot make the NMI wait, so every
//! edit holds `active` (incremented, checked for 1, decremented), and a context that finds it above 1 does not
//! touch the list: a nested allocation returns NULL, a nested free goes to the atomic extra list. In userspace
//! every signal handler is such an NMI: a handler that interrupts an allocation on the same cache gets `None`
//! even though the cache may be full. That is the kernel's behaviour and it is kept on purpose. The counter is
//! a nesting word (DESIGN.md section 4): a context that interrupts the load-then-store of an increment finishes
//! its own increment and decrement before returning, so the interrupted store is still right; and the
//! interrupted context had not started its edit yet.
//!
//! # Refill and trim: the `irq_work`
//!
//! An allocation that leaves fewer than `low` objects, a free that leaves more than `high`, and a `free_rcu`
//! while no RCU callback is in flight raise the cache's `irq_work`: with [`RefillMode::AtRegionEnd`] it runs
//! when the thread's outermost [`IrqRegion`] ends (as an `irq_work` runs once interrupts are back on); with
//! [`RefillMode::Late`] only once the late worker has seen it waiting for the delay, at the thread's next
//! region boundary (see [`crate::cpu`]). It refills `batch` objects (from `free_by_rcu_ttrace`, then
//! `waiting_for_gp_ttrace`, then `kmalloc_nolock`), or trims the list to `(low + high) / 2` into the target
//! cache's `free_by_rcu_ttrace` and starts its Tasks Trace callback, and then hands `free_by_rcu` to RCU.
//! Watermarks: `low`/`high` 32/96 up to 256-byte units; above, `max(8192 / unit, 1)` and
//! `max(24576 / unit, 3)`; 1/3 for per-CPU allocators; `batch = max((high - low) / 4 * 3, 1)`. A fresh cache
//! holds 4 objects (1 above 256 bytes or per-CPU).
//!
//! `tgt`: every free records in the freeing CPU's cache the cache named by the object's header, and a trim
//! sends the whole batch to the last one recorded (a hint, as in the kernel: a batch of objects from several
//! CPUs all go to one of them).
//!
//! # Accounting
//!
//! Every object taken from `kmalloc_nolock` is charged, at its usable size, to the allocator's accounting
//! group ([`BpfMaConfig::group`], the map's memory cgroup: the kernel's `__GFP_ACCOUNT`) and uncharged when it
//! goes back to `kfree_nolock`; a refused charge fails the refill like an out-of-memory `kmalloc`. Cached
//! objects count as well as handed-out ones, as in the kernel. [`BpfMemAlloc::mem_usage`] is the same figure.
//!
//! # Failures kept on purpose
//!
//! - A nested allocation on a cache whose `active` is held returns `None` (a signal handler that interrupts an
//!   allocation, a free or a refill of the same cache on the same thread).
//! - A burst that takes more objects within one region than the cache holds returns `None` while `kmalloc`
//!   would succeed: refill only happens after the region. With [`RefillMode::Late`] even later regions fail
//!   until the late worker got to the refill (the production failure of amazon-linux-2023 #1129).
//! - A nested free is never lost but waits on the extra list until the next trim.
//!
//! # Deviations
//!
//! - The kernel prefills every possible CPU when the allocator is created; here a CPU's cache is set up and
//!   prefilled (same count) when its thread first uses it, because there are [`NR_CPUS`] slots.
//! - A thread that exits leaves its CPU's caches as they are (objects included); the next thread given the
//!   slot uses them, as a CPU that goes offline and comes back would. Destroy frees them either way.
//! - A thread with no CPU has no kernel counterpart: it allocates straight from `kmalloc_nolock` (header
//!   [`SHARED`]) and frees onto the owning cache's atomic extra lists.
//! - Per-CPU allocators (`percpu`) keep the kernel's watermarks and prefill, but each object is one block of
//!   the unit size, not one copy per CPU.
//! - The kernel asks RCU to hurry when `free_rcu` outruns its one callback in flight; nolock's RCU has no such
//!   knob, so the objects simply wait for the next callback.
//! - The refill takes single objects off the ttrace lists while other threads may take them all; the kernel
//!   does it with interrupts off, so it cannot stall there. A thread can, so the refill counts itself in
//!   `ttrace_readers` and the Tasks Trace callback that finds it counted holds its batch back for one more RCU
//!   grace period before giving it to `kfree_nolock` (otherwise an object could be freed, come back through
//!   `kmalloc_nolock` to the head of the list, and break the stalled refill's compare-and-swap: ABA).
//!
//! # Context
//!
//! The crate default (any context) for every allocation and free call, provided the caller is inside an
//! [`IrqRegion`] as the kernel's callers have interrupts or preemption off (outside a region the `irq_work`
//! runs at once, inside the call). Creation and drop are normal-context operations and say so.

use core::mem::offset_of;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicIsize, AtomicPtr, AtomicU64, AtomicUsize, Ordering, compiler_fence, fence};
use std::sync::Arc;
use std::time::Duration;

use nolock::memcg::MemGroup;
use nolock::sync::local_counter::LocalCounter;
use nolock::{Gfp, RcuHead};

use crate::cpu::{self, IrqRegion, NR_CPUS};

/// Size of the header in front of every object (`LLIST_NODE_SZ`).
pub const LLIST_NODE_SZ: usize = 8;
/// Largest unit, header included (`BPF_MEM_ALLOC_SIZE_MAX`).
pub const BPF_MEM_ALLOC_SIZE_MAX: usize = 4096;
/// Largest size a variable-size allocation may ask for (4096 minus the header).
pub const MAX_ALLOC_SIZE: usize = BPF_MEM_ALLOC_SIZE_MAX - LLIST_NODE_SZ;
/// Number of caches of a variable-size allocator.
pub const NUM_CACHES: usize = 11;
/// Unit sizes of the variable-size caches, header included, in the kernel's order.
pub const SIZES: [usize; NUM_CACHES] = [96, 192, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Largest unit of a fixed-size allocator, header included: what the kernel's `kmalloc` serves
/// (`KMALLOC_MAX_SIZE`, 4 MiB on x86-64). Fixed-size units are not limited to 4096: a hash map with 4 KiB
/// values has 4152-byte elements.
pub const MAX_FIXED_UNIT: usize = 4 << 20;
/// Header value of an object a thread without a CPU took straight from `kmalloc_nolock`.
pub const SHARED: usize = 1;

/// Cache index plus one for units 1..=192 by `(unit - 1) / 8`: 8 → 16, 24 → 32, 72 → 96, 136 → 192.
const SIZE_INDEX: [u8; 24] = [3, 3, 4, 4, 5, 5, 5, 5, 1, 1, 1, 1, 6, 6, 6, 6, 2, 2, 2, 2, 2, 2, 2, 2];

/// The cache for a unit of `size` bytes (header included), or `None` above 4096 or for 0.
pub fn cache_idx(size: usize) -> Option<usize> {
    if size == 0 || size > BPF_MEM_ALLOC_SIZE_MAX {
        return None;
    }
    if size <= 192 {
        return Some(SIZE_INDEX[(size - 1) / 8] as usize - 1);
    }
    // fls(size - 1) - 2
    Some((usize::BITS - (size - 1).leading_zeros()) as usize - 2)
}

/// When a cache's `irq_work` (refill and trim) runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RefillMode {
    /// When the thread's outermost [`IrqRegion`] ends (an `irq_work` raised with interrupts off runs as they
    /// come back on).
    #[default]
    AtRegionEnd,
    /// Only after the late worker has seen the request waiting for this long, at the thread's next region
    /// boundary: the late `irq_work` IPI of the production failures.
    Late(Duration),
}

/// How an allocator is created.
#[derive(Clone, Debug, Default)]
pub struct BpfMaConfig {
    /// When refill and trim run.
    pub refill: RefillMode,
    /// A per-CPU allocator (`bpf_mem_alloc_init(.., percpu = true)`): watermarks 1/3, prefill 1.
    pub percpu: bool,
    /// The accounting group charged for every object the allocator takes from `kmalloc_nolock` (the map's
    /// memory cgroup).
    pub group: Option<Arc<MemGroup>>,
}

/// Why an allocator could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BpfMaError {
    /// A fixed size of 0, or a unit (size plus header) above [`MAX_FIXED_UNIT`] (-EINVAL / -E2BIG).
    BadSize,
    /// Memory for the per-CPU tables could not be allocated (-ENOMEM).
    NoMem,
}

impl core::fmt::Display for BpfMaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BpfMaError::BadSize => write!(f, "bpf_mem_alloc: unit size 0 or above {MAX_FIXED_UNIT} bytes"),
            BpfMaError::NoMem => write!(f, "bpf_mem_alloc: no memory for the per-CPU caches"),
        }
    }
}

impl std::error::Error for BpfMaError {}

/// Allocation flags of [`BpfMemAlloc::cache_alloc_flags`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MaGfp {
    /// `GFP_NOWAIT`: the per-CPU cache only, like [`BpfMemAlloc::cache_alloc`].
    #[default]
    NoWait,
    /// `GFP_KERNEL`: a sleepable caller; an empty cache falls back to a direct `kmalloc`.
    Kernel,
}

/// Counters of one allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BpfMaStats {
    /// Allocations handed out.
    pub allocs: u64,
    /// Frees (`free` and `free_rcu`).
    pub frees: u64,
    /// `irq_work` runs that refilled a cache (`alloc_bulk`).
    pub refills: u64,
    /// `irq_work` runs that trimmed a cache (`free_bulk`).
    pub trims: u64,
    /// Allocations that returned `None` because `active` was held (a nested allocation).
    pub nested_none: u64,
    /// Allocations that returned `None` because the cache was empty (whether or not memory was free).
    pub empty_none: u64,
    /// All allocations that returned `None` (nested, empty, too big, `kmalloc` or the group refused).
    pub allocs_failed: u64,
    /// Frees that went to `free_llist_extra` or `free_llist_extra_rcu`.
    pub extra_frees: u64,
    /// Objects taken from `kmalloc_nolock`.
    pub kmallocs: u64,
    /// Objects given back to `kfree_nolock`.
    pub kfrees: u64,
    /// `kmalloc_nolock` failures (out of memory).
    pub kmalloc_failed: u64,
    /// Charges the accounting group refused (its limit).
    pub limit_hits: u64,
    /// RCU callbacks queued (`__free_by_rcu`).
    pub rcu_callbacks: u64,
    /// Tasks Trace callbacks queued (`__free_rcu_tasks_trace`).
    pub ttrace_callbacks: u64,
    /// Allocations and frees by threads without a CPU (direct `kmalloc_nolock` or the extra lists).
    pub shared_path: u64,
    /// `cache_alloc_flags(Kernel)` allocations served by the direct `kmalloc` fallback.
    pub direct_fallbacks: u64,
    /// Frees of pointers this allocator did not hand out (refused, nothing freed).
    pub bad_frees: u64,
    /// Allocations above 4088 bytes (-E2BIG).
    pub too_big: u64,
    /// Bytes currently taken from `kmalloc_nolock` (usable sizes).
    pub bytes_held: usize,
}

#[derive(Default)]
struct Counters {
    allocs: AtomicU64,
    frees: AtomicU64,
    refills: AtomicU64,
    trims: AtomicU64,
    nested_none: AtomicU64,
    empty_none: AtomicU64,
    allocs_failed: AtomicU64,
    extra_frees: AtomicU64,
    kmallocs: AtomicU64,
    kfrees: AtomicU64,
    kmalloc_failed: AtomicU64,
    limit_hits: AtomicU64,
    rcu_callbacks: AtomicU64,
    ttrace_callbacks: AtomicU64,
    shared_path: AtomicU64,
    direct_fallbacks: AtomicU64,
    bad_frees: AtomicU64,
    too_big: AtomicU64,
}

#[inline(always)]
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Test-only hook points inside the allocator (feature `test-hooks`): where a signal handler landing on
/// purpose finds the cache's `active` counter held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HookPoint {
    /// `unit_alloc`, `active` held, before popping `free_llist`.
    UnitAlloc,
    /// `unit_free`, `active` held, before pushing onto `free_llist`.
    UnitFree,
    /// The refill, `active` held, before adding one object to `free_llist`.
    RefillAdd,
    /// The refill, counted in `ttrace_readers`, before it takes objects off `waiting_for_gp_ttrace`.
    RefillTtrace,
}

hook_points!(HookPoint, point);

// ---------------------------------------------------------------------------------------------------------
// Lists: the link of a free object is its header word.
// ---------------------------------------------------------------------------------------------------------

/// The header word of the object at `node`.
#[inline(always)]
fn link<'a>(node: usize) -> &'a AtomicUsize {
    // SAFETY: every node handed to the list functions is an object of at least 16 bytes from kmalloc_nolock,
    // 8-aligned, whose first word is its header; objects are never returned to kmalloc while a list that
    // can reach them may still be read (see the module header: grace periods and RCU sections).
    unsafe { &*(node as *const AtomicUsize) }
}

/// Atomic push (`llist_add`): any context, any thread. Returns whether the list was empty.
#[inline]
fn llist_add(head: &AtomicUsize, node: usize) -> bool {
    llist_add_batch(head, node, node)
}

/// Atomic push of the chain `first ..= last` (`llist_add_batch`). Returns whether the list was empty.
#[inline]
fn llist_add_batch(head: &AtomicUsize, first: usize, last: usize) -> bool {
    let mut old = head.load(Ordering::Relaxed);
    loop {
        link(last).store(old, Ordering::Relaxed);
        // Release: publishes the chain's links; pairs with the Acquire in `llist_del_all`/`llist_del_first`.
        match head.compare_exchange_weak(old, first, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return old == 0,
            Err(o) => old = o,
        }
    }
}

/// Atomic take-all (`llist_del_all`).
#[inline]
fn llist_del_all(head: &AtomicUsize) -> usize {
    if head.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    // Acquire: pairs with the Release CAS in `llist_add_batch`.
    head.swap(0, Ordering::Acquire)
}

/// Atomic take-first (`llist_del_first`). Only one context may take first from a list at a time (its owner
/// CPU's `irq_work`, never nested); others may add and take all concurrently. The node read may be taken by a
/// concurrent `llist_del_all` meanwhile, but not returned to `kmalloc_nolock`: the caller is in an RCU section
/// and objects go back to `kmalloc` only after a grace period (then the CAS fails and we retry).
#[inline]
fn llist_del_first(head: &AtomicUsize) -> usize {
    // Acquire: pairs with the Release CAS in `llist_add_batch`.
    let mut old = head.load(Ordering::Acquire);
    loop {
        if old == 0 {
            return 0;
        }
        let next = link(old).load(Ordering::Relaxed);
        // Acquire: as above.
        match head.compare_exchange_weak(old, next, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => return old,
            Err(o) => old = o,
        }
    }
}

/// Calls `f` on every node of a detached chain (the chain's links are read before `f` sees a node).
#[inline]
fn for_each_node(mut node: usize, mut f: impl FnMut(usize)) {
    while node != 0 {
        let next = link(node).load(Ordering::Relaxed);
        f(node);
        node = next;
    }
}

// ---------------------------------------------------------------------------------------------------------
// One per-CPU cache (`struct bpf_mem_cache`)
// ---------------------------------------------------------------------------------------------------------

/// One per-CPU cache. Zeroed memory is a valid, not yet set up cache.
#[repr(C, align(64))]
struct Cache {
    // Owner CPU only (its thread and its handlers), edited while `active` is 1.
    free_llist: AtomicUsize,
    free_cnt: AtomicIsize,
    /// Nesting word: how many contexts of the owner CPU are inside an edit of this cache.
    active: AtomicUsize,
    free_by_rcu: AtomicUsize,
    free_by_rcu_tail: AtomicUsize,
    /// The cache trims go to (the header of the last object freed here); written by the owner, read by the
    /// owner's trim and by RCU callbacks.
    tgt: AtomicUsize,
    /// Set up and prefilled (Release when set; pairs with the Acquire in `cache_of`).
    ready: AtomicBool,
    /// Being set up (a handler that finds it set keeps off).
    init_busy: AtomicBool,
    /// The `irq_work` is queued (swap to raise: one instruction a handler cannot split).
    pending: AtomicBool,
    /// The `irq_work` is running on the owner (nesting word).
    work_busy: AtomicBool,
    /// Set by destroy: callbacks free instead of queueing.
    draining: AtomicBool,
    /// Class index within the CPU's caches.
    idx: AtomicUsize,
    ma: AtomicPtr<Inner>,
    /// Allocations and frees served by this CPU (single-instruction increments: exact under nesting, and no
    /// shared cache line on the fast path).
    allocs: LocalCounter,
    frees: LocalCounter,
    // Shared.
    free_llist_extra: AtomicUsize,
    free_llist_extra_rcu: AtomicUsize,
    waiting_for_gp: AtomicUsize,
    waiting_for_gp_tail: AtomicUsize,
    call_rcu_in_progress: AtomicBool,
    call_rcu_ttrace_in_progress: AtomicBool,
    rcu: RcuHead,
    free_by_rcu_ttrace: AtomicUsize,
    waiting_for_gp_ttrace: AtomicUsize,
    rcu_ttrace: RcuHead,
    /// Refills of the owner reading the ttrace lists now (see `free_rcu_ttrace`).
    ttrace_readers: AtomicUsize,
    /// A freed batch waiting one more RCU grace period for such a refill.
    ttrace_deferred: AtomicUsize,
}

/// Watermarks and sizes of one size class.
#[derive(Clone, Copy, Debug, Default)]
struct Params {
    /// Unit size, header included (the kernel's `unit_size`).
    unit: usize,
    low: isize,
    high: isize,
    batch: usize,
    prefill: usize,
}

impl Params {
    fn new(unit: usize, percpu: bool) -> Self {
        let (low, high) = if percpu {
            (1, 3)
        } else if unit <= 256 {
            (32, 96)
        } else {
            ((8192 / unit).max(1), (24576 / unit).max(3))
        };
        let batch = ((high - low) / 4 * 3).max(1);
        let prefill = if !percpu && unit <= 256 { 4 } else { 1 };
        Params { unit, low: low as isize, high: high as isize, batch, prefill }
    }
}

struct Inner {
    /// `NR_CPUS * ncaches` caches, CPU-major.
    caches: NonNull<Cache>,
    ncaches: usize,
    params: [Params; NUM_CACHES],
    fixed: bool,
    fixed_size: Option<usize>,
    refill: RefillMode,
    group: Option<Arc<MemGroup>>,
    held: AtomicUsize,
    /// `irq_work` runs queued or running (destroy waits for 0).
    outstanding: AtomicUsize,
    n: Counters,
}

// SAFETY: the caches are shared by design; every field is an atomic or immutable after creation.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

fn table_layout(ncaches: usize) -> std::alloc::Layout {
    std::alloc::Layout::array::<Cache>(NR_CPUS * ncaches).expect("per-CPU table layout")
}

impl Inner {
    #[inline(always)]
    fn cache(&self, cpu: usize, idx: usize) -> &Cache {
        debug_assert!(cpu < NR_CPUS && idx < self.ncaches);
        // SAFETY: the table holds NR_CPUS * ncaches zero-initialised caches and lives as long as `self`.
        unsafe { &*self.caches.as_ptr().add(cpu * self.ncaches + idx) }
    }

    /// Whether `addr` is one of this allocator's caches.
    fn owns_cache(&self, addr: usize) -> bool {
        let base = self.caches.as_ptr() as usize;
        let len = NR_CPUS * self.ncaches * size_of::<Cache>();
        addr >= base && addr < base + len && (addr - base).is_multiple_of(size_of::<Cache>())
    }

    /// The calling CPU's cache `idx`, set up and prefilled on first use; `None` while a context this one
    /// interrupted is setting it up.
    #[inline(always)]
    fn cache_of(&self, cpu: usize, idx: usize) -> Option<&Cache> {
        let c = self.cache(cpu, idx);
        // Acquire: pairs with the Release store in `init_cache`.
        if c.ready.load(Ordering::Acquire) {
            return Some(c);
        }
        self.init_cache(c, idx)
    }

    #[cold]
    #[inline(never)]
    fn init_cache<'a>(&'a self, c: &'a Cache, idx: usize) -> Option<&'a Cache> {
        // One instruction: a handler that interrupts the set-up sees it busy and keeps off (its allocation
        // fails as a nested one, its free goes to the extra list).
        if c.init_busy.swap(true, Ordering::Relaxed) {
            return None;
        }
        if !c.ready.load(Ordering::Relaxed) {
            c.ma.store(self as *const Inner as *mut Inner, Ordering::Relaxed);
            c.idx.store(idx, Ordering::Relaxed);
            c.tgt.store(c as *const Cache as usize, Ordering::Relaxed);
            // prefill_mem_cache
            self.alloc_bulk(c, self.params[idx].prefill);
            // Release: publishes the set-up; pairs with the Acquire in `cache_of` (and the owner's reads).
            c.ready.store(true, Ordering::Release);
        }
        c.init_busy.store(false, Ordering::Relaxed);
        Some(c)
    }

    // --- active ----------------------------------------------------------------------------------------

    /// `local_inc_return(&c->active)`: load then store, safe as a nesting word (module header).
    #[inline(always)]
    fn inc_active(c: &Cache) -> usize {
        let v = c.active.load(Ordering::Relaxed) + 1;
        c.active.store(v, Ordering::Relaxed);
        // Signal fence: the list edit stays after the store, where a handler on this thread sees the counter
        // held (pairs with the same fence in the handler's own increment, which reads the counter).
        compiler_fence(Ordering::SeqCst);
        v
    }

    #[inline(always)]
    fn dec_active(c: &Cache) {
        // Signal fence: the list edit is complete before a handler can see the counter released.
        compiler_fence(Ordering::SeqCst);
        c.active.store(c.active.load(Ordering::Relaxed) - 1, Ordering::Relaxed);
    }

    // --- the fast paths ----------------------------------------------------------------------------------

    /// `unit_alloc`: pop `free_llist` unless nested; raise the `irq_work` below `low`.
    #[inline]
    fn unit_alloc(&self, c: &Cache) -> Option<usize> {
        let mut cnt = 0;
        let mut obj = 0;
        let nested;
        if Self::inc_active(c) == 1 {
            nested = false;
            point(HookPoint::UnitAlloc);
            obj = c.free_llist.load(Ordering::Relaxed);
            if obj != 0 {
                c.free_llist.store(link(obj).load(Ordering::Relaxed), Ordering::Relaxed);
                cnt = c.free_cnt.load(Ordering::Relaxed) - 1;
                c.free_cnt.store(cnt, Ordering::Relaxed);
                link(obj).store(c as *const Cache as usize, Ordering::Relaxed);
            }
        } else {
            nested = true;
        }
        Self::dec_active(c);
        let p = &self.params[c.idx.load(Ordering::Relaxed)];
        if cnt < p.low {
            self.irq_work_raise(c);
        }
        if obj == 0 {
            bump(if nested { &self.n.nested_none } else { &self.n.empty_none });
            return None;
        }
        Some(obj)
    }

    /// `unit_free`: push onto `free_llist`, or `free_llist_extra` when nested; raise above `high`.
    #[inline]
    fn unit_free(&self, c: &Cache, node: usize) {
        c.tgt.store(link(node).load(Ordering::Relaxed), Ordering::Relaxed);
        let mut cnt = 0;
        if Self::inc_active(c) == 1 {
            point(HookPoint::UnitFree);
            link(node).store(c.free_llist.load(Ordering::Relaxed), Ordering::Relaxed);
            c.free_llist.store(node, Ordering::Relaxed);
            cnt = c.free_cnt.load(Ordering::Relaxed) + 1;
            c.free_cnt.store(cnt, Ordering::Relaxed);
        } else {
            llist_add(&c.free_llist_extra, node);
            bump(&self.n.extra_frees);
        }
        Self::dec_active(c);
        if cnt > self.params[c.idx.load(Ordering::Relaxed)].high {
            self.irq_work_raise(c);
        }
    }

    /// `unit_free_rcu`: onto `free_by_rcu` (or `free_llist_extra_rcu` when nested); raise unless an RCU
    /// callback is in flight.
    #[inline]
    fn unit_free_rcu(&self, c: &Cache, node: usize) {
        c.tgt.store(link(node).load(Ordering::Relaxed), Ordering::Relaxed);
        if Self::inc_active(c) == 1 {
            let head = c.free_by_rcu.load(Ordering::Relaxed);
            link(node).store(head, Ordering::Relaxed);
            c.free_by_rcu.store(node, Ordering::Relaxed);
            if head == 0 {
                c.free_by_rcu_tail.store(node, Ordering::Relaxed);
            }
        } else {
            llist_add(&c.free_llist_extra_rcu, node);
            bump(&self.n.extra_frees);
        }
        Self::dec_active(c);
        if !c.call_rcu_in_progress.load(Ordering::Relaxed) {
            self.irq_work_raise(c);
        }
    }

    // --- the irq_work -------------------------------------------------------------------------------------

    fn irq_work_raise(&self, c: &Cache) {
        // One instruction: a handler that raises meanwhile sees it queued (irq_work_queue's PENDING bit).
        if c.pending.swap(true, Ordering::Relaxed) {
            return;
        }
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        let arg = c as *const Cache as usize;
        match self.refill {
            RefillMode::AtRegionEnd => IrqRegion::defer(bpf_mem_refill, arg),
            RefillMode::Late(d) => cpu::defer_late(bpf_mem_refill, arg, d),
        }
    }

    /// `alloc_bulk`: up to `cnt` objects onto `free_llist`, from `free_by_rcu_ttrace`, then
    /// `waiting_for_gp_ttrace`, then `kmalloc_nolock`.
    fn alloc_bulk(&self, c: &Cache, cnt: usize) {
        // Like the kernel's irq_work (interrupts off), the refill is an RCU reader, and it says so to the Tasks
        // Trace callback that frees `waiting_for_gp_ttrace` (see `free_rcu_ttrace`): an object it reads on the
        // ttrace lists cannot go back to kmalloc (and come back to the head of a list: ABA) meanwhile.
        let _rcu = nolock::rcu_read_lock();
        c.ttrace_readers.fetch_add(1, Ordering::Relaxed);
        // SeqCst fence: store-buffering against `free_rcu_ttrace` (its swap of the list, fence, load of
        // `ttrace_readers`): either it sees us counted, or we see the list it emptied.
        fence(Ordering::SeqCst);
        let mut i = 0;
        while i < cnt {
            let obj = llist_del_first(&c.free_by_rcu_ttrace);
            if obj == 0 {
                break;
            }
            Self::add_obj_to_free_list(c, obj);
            i += 1;
        }
        if i < cnt {
            point(HookPoint::RefillTtrace);
        }
        while i < cnt {
            let obj = llist_del_first(&c.waiting_for_gp_ttrace);
            if obj == 0 {
                break;
            }
            Self::add_obj_to_free_list(c, obj);
            i += 1;
        }
        while i < cnt {
            let Some(obj) = self.kmalloc_obj(c.idx.load(Ordering::Relaxed), Gfp::ZERO) else {
                break;
            };
            Self::add_obj_to_free_list(c, obj);
            i += 1;
        }
        // Release: our reads of the lists are done before the count drops; pairs with the SeqCst load in
        // `free_rcu_ttrace`.
        c.ttrace_readers.fetch_sub(1, Ordering::Release);
    }

    fn add_obj_to_free_list(c: &Cache, obj: usize) {
        Self::inc_active(c);
        point(HookPoint::RefillAdd);
        link(obj).store(c.free_llist.load(Ordering::Relaxed), Ordering::Relaxed);
        c.free_llist.store(obj, Ordering::Relaxed);
        c.free_cnt.store(c.free_cnt.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        Self::dec_active(c);
    }

    /// `free_bulk`: trim `free_llist` to `(low + high) / 2` and drain `free_llist_extra`, all into the target
    /// cache's `free_by_rcu_ttrace`, and start its Tasks Trace callback.
    fn free_bulk(&self, c: &Cache) {
        let tgt = Self::tgt_of(c);
        let p = &self.params[c.idx.load(Ordering::Relaxed)];
        loop {
            Self::inc_active(c);
            let obj = c.free_llist.load(Ordering::Relaxed);
            let mut cnt = 0;
            if obj != 0 {
                c.free_llist.store(link(obj).load(Ordering::Relaxed), Ordering::Relaxed);
                cnt = c.free_cnt.load(Ordering::Relaxed) - 1;
                c.free_cnt.store(cnt, Ordering::Relaxed);
            }
            Self::dec_active(c);
            if obj != 0 {
                enque_to_free(tgt, obj);
            }
            if cnt <= (p.high + p.low) / 2 {
                break;
            }
        }
        for_each_node(llist_del_all(&c.free_llist_extra), |obj| enque_to_free(tgt, obj));
        self.do_call_rcu_ttrace(tgt);
    }

    fn tgt_of(c: &Cache) -> &Cache {
        let t = c.tgt.load(Ordering::Relaxed);
        // SAFETY: `tgt` is 0 before set-up, or a cache of the same allocator (checked by the free paths), which
        // lives as long as the allocator.
        if t == 0 || t == SHARED { c } else { unsafe { &*(t as *const Cache) } }
    }

    /// `do_call_rcu_ttrace`: one Tasks Trace callback per cache in flight, covering `waiting_for_gp_ttrace`.
    fn do_call_rcu_ttrace(&self, c: &Cache) {
        // AcqRel: takes the in-flight right; pairs with the Release store in `free_rcu_ttrace_cb`.
        if c.call_rcu_ttrace_in_progress.swap(true, Ordering::AcqRel) {
            if c.draining.load(Ordering::Relaxed) {
                self.free_all(llist_del_all(&c.free_by_rcu_ttrace));
            }
            return;
        }
        for_each_node(llist_del_all(&c.free_by_rcu_ttrace), |obj| {
            llist_add(&c.waiting_for_gp_ttrace, obj);
        });
        if c.draining.load(Ordering::Relaxed) {
            self.free_rcu_ttrace(c);
            return;
        }
        bump(&self.n.ttrace_callbacks);
        // SAFETY: `rcu_ttrace` is not queued (we hold the in-flight right) and the cache outlives the callback
        // (destroy waits with rcu_barrier_tasks_trace).
        unsafe {
            nolock::call_rcu_tasks_trace(NonNull::from(&c.rcu_ttrace), free_rcu_ttrace_cb);
        }
    }

    /// `__free_rcu`: the Tasks Trace grace period (which implies RCU's) is over: free the batch.
    ///
    /// One guard the kernel does not need: its refill takes objects off `waiting_for_gp_ttrace` with
    /// interrupts off, for a few instructions, so the objects it reads cannot be freed and come back to the
    /// list's head meanwhile. A preempted thread can stall there for long, so when an owner's refill is
    /// reading the lists right now (`ttrace_readers`), the batch waits one more RCU grace period (the refill
    /// is an RCU reader) before it goes back to kmalloc.
    fn free_rcu_ttrace(&self, c: &Cache) {
        let chain = llist_del_all(&c.waiting_for_gp_ttrace);
        // SeqCst fence: pairs with the one in `alloc_bulk` (store-buffering, see there).
        fence(Ordering::SeqCst);
        if chain != 0 && !c.draining.load(Ordering::Relaxed) && c.ttrace_readers.load(Ordering::SeqCst) != 0 {
            c.ttrace_deferred.store(chain, Ordering::Relaxed);
            bump(&self.n.rcu_callbacks);
            // SAFETY: `rcu_ttrace` is ours (its callback is running or the right is held: the in-flight right
            // stays taken); the cache outlives the callback (destroy waits with rcu_barrier). The queueing
            // publishes `ttrace_deferred` to the callback.
            unsafe { nolock::call_rcu_nolock(NonNull::from(&c.rcu_ttrace), free_deferred_ttrace_cb) };
            return;
        }
        self.free_all(chain);
        // Release: the batch is gone before the next may start; pairs with the AcqRel swap in
        // `do_call_rcu_ttrace`.
        c.call_rcu_ttrace_in_progress.store(false, Ordering::Release);
    }

    /// `check_free_by_rcu`: move nested `free_rcu`s over and hand `free_by_rcu` to one RCU callback.
    fn check_free_by_rcu(&self, c: &Cache) {
        if c.free_llist_extra_rcu.load(Ordering::Relaxed) != 0 {
            Self::inc_active(c);
            for_each_node(llist_del_all(&c.free_llist_extra_rcu), |obj| {
                let head = c.free_by_rcu.load(Ordering::Relaxed);
                link(obj).store(head, Ordering::Relaxed);
                c.free_by_rcu.store(obj, Ordering::Relaxed);
                if head == 0 {
                    c.free_by_rcu_tail.store(obj, Ordering::Relaxed);
                }
            });
            Self::dec_active(c);
        }
        if c.free_by_rcu.load(Ordering::Relaxed) == 0 {
            return;
        }
        // AcqRel: takes the in-flight right; pairs with the Release store in `free_by_rcu_cb`.
        if c.call_rcu_in_progress.swap(true, Ordering::AcqRel) {
            return;
        }
        Self::inc_active(c);
        let first = c.free_by_rcu.load(Ordering::Relaxed);
        c.free_by_rcu.store(0, Ordering::Relaxed);
        c.waiting_for_gp_tail.store(c.free_by_rcu_tail.load(Ordering::Relaxed), Ordering::Relaxed);
        c.waiting_for_gp.store(first, Ordering::Relaxed);
        Self::dec_active(c);
        if c.draining.load(Ordering::Relaxed) {
            self.free_all(c.waiting_for_gp.swap(0, Ordering::Relaxed));
            c.call_rcu_in_progress.store(false, Ordering::Release);
            return;
        }
        bump(&self.n.rcu_callbacks);
        // SAFETY: `rcu` is not queued (we hold the in-flight right); the cache outlives the callback (destroy
        // waits with rcu_barrier). The queueing publishes `waiting_for_gp` to the callback.
        unsafe { nolock::call_rcu_nolock(NonNull::from(&c.rcu), free_by_rcu_cb) };
    }

    // --- kmalloc ------------------------------------------------------------------------------------------

    /// One object of class `idx` from `kmalloc_nolock`, charged to the group; its header is left as is.
    fn kmalloc_obj(&self, idx: usize, flags: Gfp) -> Option<usize> {
        let Some(p) = nolock::kmalloc_nolock(self.params[idx].unit, flags) else {
            bump(&self.n.kmalloc_failed);
            if let Some(g) = &self.group {
                g.note_oom();
            }
            return None;
        };
        let n = nolock::ksize(p.as_ptr());
        if let Some(g) = &self.group
            && g.try_charge(n).is_err()
        {
            bump(&self.n.limit_hits);
            // SAFETY: just allocated, never handed out.
            unsafe { nolock::kfree_nolock(p.as_ptr()) };
            return None;
        }
        self.held.fetch_add(n, Ordering::Relaxed);
        bump(&self.n.kmallocs);
        Some(p.as_ptr() as usize)
    }

    /// Give one object back to `kfree_nolock` and uncharge it.
    fn kfree_obj(&self, obj: usize) {
        let n = nolock::ksize(obj as *const u8);
        // SAFETY: `obj` is an object this allocator took from kmalloc_nolock and no list reaches any more.
        unsafe { nolock::kfree_nolock(obj as *mut u8) };
        self.held.fetch_sub(n, Ordering::Relaxed);
        if let Some(g) = &self.group {
            g.uncharge(n);
        }
        bump(&self.n.kfrees);
    }

    fn free_all(&self, chain: usize) {
        for_each_node(chain, |obj| self.kfree_obj(obj));
    }

    // --- front ends ---------------------------------------------------------------------------------------

    #[inline]
    fn alloc_idx(&self, idx: usize) -> Option<NonNull<u8>> {
        let Some(cpu) = cpu::this_cpu() else {
            return self.alloc_shared(idx);
        };
        let Some(c) = self.cache_of(cpu, idx) else {
            bump(&self.n.nested_none);
            bump(&self.n.allocs_failed);
            return None;
        };
        match self.unit_alloc(c) {
            Some(obj) => {
                c.allocs.inc();
                // SAFETY: arena addresses are never null; the header is the first word.
                Some(unsafe { NonNull::new_unchecked((obj + LLIST_NODE_SZ) as *mut u8) })
            }
            None => {
                bump(&self.n.allocs_failed);
                None
            }
        }
    }

    #[cold]
    fn alloc_shared(&self, idx: usize) -> Option<NonNull<u8>> {
        bump(&self.n.shared_path);
        let Some(obj) = self.kmalloc_obj(idx, Gfp::ZERO) else {
            bump(&self.n.allocs_failed);
            return None;
        };
        link(obj).store(SHARED, Ordering::Relaxed);
        bump(&self.n.allocs);
        NonNull::new((obj + LLIST_NODE_SZ) as *mut u8)
    }

    /// The object of a user pointer and the cache its header names (`None` for [`SHARED`]), or `Err` for a
    /// pointer this allocator did not hand out.
    #[inline]
    fn owner_of(&self, p: NonNull<u8>) -> Result<(usize, Option<&Cache>), ()> {
        let node = (p.as_ptr() as usize).wrapping_sub(LLIST_NODE_SZ);
        if node < nolock::ZERO_SIZE_LIMIT || !node.is_multiple_of(8) {
            return Err(());
        }
        // In debug mode, first make sure the header is the start of a live nolock object.
        if nolock::debug::enabled() && nolock::ksize(node as *const u8) == 0 {
            return Err(());
        }
        let h = link(node).load(Ordering::Relaxed);
        if h == SHARED {
            return Ok((node, None));
        }
        if !self.owns_cache(h) {
            return Err(());
        }
        // SAFETY: `h` is one of this allocator's caches (checked just above).
        Ok((node, Some(unsafe { &*(h as *const Cache) })))
    }

    #[inline]
    fn free_ptr(&self, p: NonNull<u8>, rcu: bool) {
        let Ok((node, owner)) = self.owner_of(p) else {
            bump(&self.n.bad_frees);
            report_bad_free(p);
            return;
        };
        let Some(owner) = owner else {
            bump(&self.n.frees);
            return self.free_shared_obj(node, rcu);
        };
        let idx = owner.idx.load(Ordering::Relaxed);
        let c = match cpu::this_cpu() {
            Some(cpu) => self.cache_of(cpu, idx),
            None => None,
        };
        if let Some(c) = c {
            c.frees.inc();
        } else {
            bump(&self.n.frees);
        }
        match (c, rcu) {
            (Some(c), false) => self.unit_free(c, node),
            (Some(c), true) => self.unit_free_rcu(c, node),
            // No CPU, or our cache is being set up by the context we interrupted: the owner's extra lists.
            (None, false) => {
                bump(&self.n.shared_path);
                llist_add(&owner.free_llist_extra, node);
            }
            (None, true) => {
                bump(&self.n.shared_path);
                llist_add(&owner.free_llist_extra_rcu, node);
            }
        }
    }

    /// Free an object with a [`SHARED`] header: straight back to `kfree_nolock`, after a Tasks Trace grace
    /// period for `free_rcu` (its first 16 bytes become the callback head; it is uncharged at once).
    #[cold]
    fn free_shared_obj(&self, node: usize, rcu: bool) {
        if !rcu {
            return self.kfree_obj(node);
        }
        let n = nolock::ksize(node as *const u8);
        self.held.fetch_sub(n, Ordering::Relaxed);
        if let Some(g) = &self.group {
            g.uncharge(n);
        }
        bump(&self.n.kfrees);
        // SAFETY: the object (at least 16 bytes, 8-aligned) is ours alone now; its memory is the head until
        // the callback frees it.
        unsafe { nolock::call_rcu_tasks_trace(NonNull::new_unchecked(node as *mut RcuHead), kfree_head_cb) };
    }
}

/// `enque_to_free`: clear the header and push onto `c`'s `free_by_rcu_ttrace`.
fn enque_to_free(c: &Cache, obj: usize) {
    link(obj).store(0, Ordering::Relaxed);
    llist_add(&c.free_by_rcu_ttrace, obj);
}

/// The `irq_work` function (`bpf_mem_refill`), on the owner CPU.
fn bpf_mem_refill(arg: usize) {
    // SAFETY: `arg` is a cache of a live allocator: destroy waits until `outstanding` is 0 before freeing.
    let c = unsafe { &*(arg as *const Cache) };
    // SAFETY: set when the cache was set up; the allocator outlives its queued work.
    let ma = unsafe { &*c.ma.load(Ordering::Relaxed) };
    // The PENDING bit goes before the work runs, so a raise during the work queues it again.
    c.pending.store(false, Ordering::Relaxed);
    compiler_fence(Ordering::SeqCst);
    // Never nested inside an edit of the same cache or another run of the work (possible only when the caller
    // did not use a region): skip; the next allocation or free raises it again.
    if !c.work_busy.load(Ordering::Relaxed) && c.active.load(Ordering::Relaxed) == 0 {
        c.work_busy.store(true, Ordering::Relaxed);
        compiler_fence(Ordering::SeqCst);
        let p = ma.params[c.idx.load(Ordering::Relaxed)];
        // Racy read of the count, as in the kernel: it need not be exact.
        let cnt = c.free_cnt.load(Ordering::Relaxed);
        if cnt < p.low {
            bump(&ma.n.refills);
            ma.alloc_bulk(c, p.batch);
        } else if cnt > p.high {
            bump(&ma.n.trims);
            ma.free_bulk(c);
        }
        ma.check_free_by_rcu(c);
        compiler_fence(Ordering::SeqCst);
        c.work_busy.store(false, Ordering::Relaxed);
    }
    // Release: the last touch of the cache; pairs with the Acquire load in destroy.
    ma.outstanding.fetch_sub(1, Ordering::Release);
}

/// `__free_by_rcu`: the RCU grace period of `waiting_for_gp` is over: the objects go to the target cache's
/// `free_by_rcu_ttrace` (reusable from now on) and its Tasks Trace callback.
///
/// # Safety
/// `head` is the `rcu` head of a cache of a live allocator.
unsafe fn free_by_rcu_cb(head: NonNull<RcuHead>) {
    // SAFETY: `head` is the `rcu` field of a Cache (caller).
    let c = unsafe { &*((head.as_ptr() as usize - offset_of!(Cache, rcu)) as *const Cache) };
    // SAFETY: set when the cache was set up.
    let ma = unsafe { &*c.ma.load(Ordering::Relaxed) };
    let tgt = Inner::tgt_of(c);
    let first = c.waiting_for_gp.swap(0, Ordering::Relaxed);
    if first != 0 {
        llist_add_batch(&tgt.free_by_rcu_ttrace, first, c.waiting_for_gp_tail.load(Ordering::Relaxed));
        ma.do_call_rcu_ttrace(tgt);
    }
    // Release: pairs with the AcqRel swap in `check_free_by_rcu`.
    c.call_rcu_in_progress.store(false, Ordering::Release);
}

/// `__free_rcu_tasks_trace`: a Tasks Trace grace period implies an RCU one, so free directly.
///
/// # Safety
/// `head` is the `rcu_ttrace` head of a cache of a live allocator.
unsafe fn free_rcu_ttrace_cb(head: NonNull<RcuHead>) {
    debug_assert!(nolock::rcu_trace_implies_rcu_gp());
    // SAFETY: `head` is the `rcu_ttrace` field of a Cache (caller).
    let c = unsafe { &*((head.as_ptr() as usize - offset_of!(Cache, rcu_ttrace)) as *const Cache) };
    // SAFETY: set when the cache was set up.
    let ma = unsafe { &*c.ma.load(Ordering::Relaxed) };
    ma.free_rcu_ttrace(c);
}

/// The batch `free_rcu_ttrace` held back for a refill that was reading the lists: after this RCU grace
/// period that refill is over.
///
/// # Safety
/// `head` is the `rcu_ttrace` head of a cache of a live allocator.
unsafe fn free_deferred_ttrace_cb(head: NonNull<RcuHead>) {
    // SAFETY: `head` is the `rcu_ttrace` field of a Cache (caller).
    let c = unsafe { &*((head.as_ptr() as usize - offset_of!(Cache, rcu_ttrace)) as *const Cache) };
    // SAFETY: set when the cache was set up.
    let ma = unsafe { &*c.ma.load(Ordering::Relaxed) };
    ma.free_all(c.ttrace_deferred.swap(0, Ordering::Relaxed));
    // Release: pairs with the AcqRel swap in `do_call_rcu_ttrace`.
    c.call_rcu_ttrace_in_progress.store(false, Ordering::Release);
}

/// Frees a [`SHARED`] object after its grace period.
///
/// # Safety
/// `head` is the start of a kmalloc object no one else references.
unsafe fn kfree_head_cb(head: NonNull<RcuHead>) {
    // SAFETY: caller.
    unsafe { nolock::kfree_nolock(head.as_ptr() as *mut u8) };
}

/// Reports a free of a pointer this allocator never handed out (one raw `write(2)`, async-signal-safe).
fn report_bad_free(p: NonNull<u8>) {
    let mut buf = [0u8; 96];
    let msg = b"nolock-bpf: BpfMemAlloc free of a pointer it did not hand out: 0x";
    let mut n = msg.len();
    buf[..n].copy_from_slice(msg);
    let v = p.as_ptr() as usize;
    for i in (0..16).rev() {
        buf[n] = b"0123456789abcdef"[(v >> (i * 4)) & 15];
        n += 1;
    }
    buf[n] = b'\n';
    n += 1;
    // SAFETY: writes `n` initialised bytes of `buf` to stderr; async-signal-safe.
    unsafe { libc::write(2, buf.as_ptr().cast(), n) };
}

// ---------------------------------------------------------------------------------------------------------
// The public allocator
// ---------------------------------------------------------------------------------------------------------

/// The kernel's `bpf_mem_alloc`: per-CPU caches of free objects in front of `kmalloc_nolock`, fixed-size or
/// variable-size (see the [module](self) documentation).
pub struct BpfMemAlloc {
    inner: Box<Inner>,
}

// SAFETY: all shared state is atomic; per-CPU state is only edited by its CPU's thread.
unsafe impl Send for BpfMemAlloc {}
// SAFETY: as above.
unsafe impl Sync for BpfMemAlloc {}

impl core::fmt::Debug for BpfMemAlloc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BpfMemAlloc")
            .field("unit_size", &self.unit_size())
            .field("refill", &self.inner.refill)
            .field("bytes_held", &self.inner.held.load(Ordering::Relaxed))
            .finish()
    }
}

impl BpfMemAlloc {
    /// `bpf_mem_alloc_init`: a fixed-size allocator for objects of `unit_size` bytes (the header comes on
    /// top; up to [`MAX_FIXED_UNIT`] in all), or with `None` a variable-size one (up to [`MAX_ALLOC_SIZE`]
    /// bytes per allocation).
    ///
    /// # Context
    /// Normal context only: allocates the per-CPU table with the global allocator (zeroed, so only the pages
    /// of CPUs that use it are touched), starts nolock's grace-period worker if it is not running and, for
    /// [`RefillMode::Late`], the late worker thread.
    pub fn new(unit_size: Option<usize>, cfg: BpfMaConfig) -> Result<Self, BpfMaError> {
        let mut params = [Params::default(); NUM_CACHES];
        let (ncaches, fixed) = match unit_size {
            Some(s) => {
                let unit = s.checked_add(LLIST_NODE_SZ).ok_or(BpfMaError::BadSize)?;
                if s == 0 || unit > MAX_FIXED_UNIT {
                    return Err(BpfMaError::BadSize);
                }
                // Room for the callback head a shared-path `free_rcu` puts in the object.
                params[0] = Params::new(unit.max(16), cfg.percpu);
                (1, Some(s))
            }
            None => {
                for (i, &s) in SIZES.iter().enumerate() {
                    params[i] = Params::new(s, cfg.percpu);
                }
                (NUM_CACHES, None)
            }
        };
        let layout = table_layout(ncaches);
        // SAFETY: a non-zero-size layout; zeroed bytes are a valid `Cache` (all atomics and heads).
        let table = unsafe { std::alloc::alloc_zeroed(layout) } as *mut Cache;
        let caches = NonNull::new(table).ok_or(BpfMaError::NoMem)?;
        if let RefillMode::Late(_) = cfg.refill {
            cpu::start_late_worker();
        }
        // The grace-period worker runs the callbacks of free_rcu and of trims: make sure it exists.
        let _ = nolock::start_poll_synchronize_rcu();
        Ok(BpfMemAlloc {
            inner: Box::new(Inner {
                caches,
                ncaches,
                params,
                fixed: fixed.is_some(),
                fixed_size: fixed,
                refill: cfg.refill,
                group: cfg.group,
                held: AtomicUsize::new(0),
                outstanding: AtomicUsize::new(0),
                n: Counters::default(),
            }),
        })
    }

    /// The unit size of a fixed-size allocator (the size asked for, without the header); `None` for a
    /// variable-size one.
    pub fn unit_size(&self) -> Option<usize> {
        self.inner.fixed_size
    }

    /// `bpf_mem_cache_alloc`: one object of a fixed-size allocator from this CPU's cache. `None`: the cache
    /// is empty (refill comes after the region), or this call interrupted another on the same cache.
    ///
    /// # Context
    /// Any context, inside an [`IrqRegion`] (see the module header). Panics on a variable-size allocator.
    #[inline]
    pub fn cache_alloc(&self) -> Option<NonNull<u8>> {
        assert!(self.inner.fixed, "BpfMemAlloc::cache_alloc on a variable-size allocator");
        self.inner.alloc_idx(0)
    }

    /// `bpf_mem_cache_alloc_flags`: as [`cache_alloc`](Self::cache_alloc); with [`MaGfp::Kernel`] an empty
    /// cache falls back to a direct `kmalloc_nolock` (charged, its header naming this CPU's cache).
    ///
    /// # Context
    /// As [`cache_alloc`](Self::cache_alloc); `Kernel` is meant for callers that may sleep, as in the kernel.
    pub fn cache_alloc_flags(&self, flags: MaGfp) -> Option<NonNull<u8>> {
        if let Some(p) = self.cache_alloc() {
            return Some(p);
        }
        if flags != MaGfp::Kernel {
            return None;
        }
        let obj = self.inner.kmalloc_obj(0, Gfp::ZERO)?;
        // The header names this CPU's cache, so the object is freed like any other; a thread without a CPU (or
        // a cache not set up yet) gets the shared header.
        let hdr = match cpu::this_cpu().map(|cpu| self.inner.cache(cpu, 0)) {
            // Acquire: pairs with the Release store in `init_cache`.
            Some(c) if c.ready.load(Ordering::Acquire) => c as *const Cache as usize,
            _ => SHARED,
        };
        link(obj).store(hdr, Ordering::Relaxed);
        bump(&self.inner.n.direct_fallbacks);
        bump(&self.inner.n.allocs);
        NonNull::new((obj + LLIST_NODE_SZ) as *mut u8)
    }

    /// `bpf_mem_cache_free`: give an object back to this CPU's cache for immediate reuse.
    ///
    /// # Safety
    /// `p` came from this allocator's [`cache_alloc`](Self::cache_alloc) and is not used afterwards.
    ///
    /// # Context
    /// Any context, inside an [`IrqRegion`]. Never fails; a pointer this allocator did not hand out (its
    /// header does not name one of its caches) is reported and counted, and nothing is freed.
    #[inline]
    pub unsafe fn cache_free(&self, p: NonNull<u8>) {
        self.inner.free_ptr(p, false);
    }

    /// `bpf_mem_cache_free_rcu`: give an object back for reuse after an RCU grace period (back to
    /// `kfree_nolock` after a Tasks Trace one).
    ///
    /// # Safety
    /// As [`cache_free`](Self::cache_free).
    ///
    /// # Context
    /// As [`cache_free`](Self::cache_free).
    #[inline]
    pub unsafe fn cache_free_rcu(&self, p: NonNull<u8>) {
        self.inner.free_ptr(p, true);
    }

    /// `bpf_mem_alloc`: `size` bytes from the variable-size caches. `None` for 0, above [`MAX_ALLOC_SIZE`]
    /// (-E2BIG, counted in `too_big`), an empty cache, or a nested call on the same cache.
    ///
    /// # Context
    /// Any context, inside an [`IrqRegion`]. Panics on a fixed-size allocator.
    #[inline]
    pub fn alloc(&self, size: usize) -> Option<NonNull<u8>> {
        assert!(!self.inner.fixed, "BpfMemAlloc::alloc on a fixed-size allocator");
        if size == 0 {
            return None;
        }
        let Some(idx) = cache_idx(size.saturating_add(LLIST_NODE_SZ)) else {
            bump(&self.inner.n.too_big);
            bump(&self.inner.n.allocs_failed);
            return None;
        };
        self.inner.alloc_idx(idx)
    }

    /// `bpf_mem_free`: give memory from [`alloc`](Self::alloc) back for immediate reuse.
    ///
    /// # Safety
    /// `p` came from this allocator's [`alloc`](Self::alloc) and is not used afterwards.
    ///
    /// # Context
    /// As [`cache_free`](Self::cache_free).
    #[inline]
    pub unsafe fn free(&self, p: NonNull<u8>) {
        self.inner.free_ptr(p, false);
    }

    /// `bpf_mem_free_rcu`: as [`free`](Self::free), reused only after an RCU grace period.
    ///
    /// # Safety
    /// As [`free`](Self::free).
    ///
    /// # Context
    /// As [`cache_free`](Self::cache_free).
    #[inline]
    pub unsafe fn free_rcu(&self, p: NonNull<u8>) {
        self.inner.free_ptr(p, true);
    }

    /// A snapshot of the counters (sums over the CPUs in use; each read on its own).
    pub fn stats(&self) -> BpfMaStats {
        let n = &self.inner.n;
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (mut allocs, mut frees) = (l(&n.allocs), l(&n.frees));
        let ncpu = NR_CPUS.min(nolock::thread::count() as usize);
        for cpu in 0..ncpu {
            for idx in 0..self.inner.ncaches {
                let c = self.inner.cache(cpu, idx);
                allocs += c.allocs.get();
                frees += c.frees.get();
            }
        }
        BpfMaStats {
            allocs,
            frees,
            refills: l(&n.refills),
            trims: l(&n.trims),
            nested_none: l(&n.nested_none),
            empty_none: l(&n.empty_none),
            allocs_failed: l(&n.allocs_failed),
            extra_frees: l(&n.extra_frees),
            kmallocs: l(&n.kmallocs),
            kfrees: l(&n.kfrees),
            kmalloc_failed: l(&n.kmalloc_failed),
            limit_hits: l(&n.limit_hits),
            rcu_callbacks: l(&n.rcu_callbacks),
            ttrace_callbacks: l(&n.ttrace_callbacks),
            shared_path: l(&n.shared_path),
            direct_fallbacks: l(&n.direct_fallbacks),
            bad_frees: l(&n.bad_frees),
            too_big: l(&n.too_big),
            bytes_held: self.inner.held.load(Ordering::Relaxed),
        }
    }

    /// Bytes of memory the allocator holds from `kmalloc_nolock` (usable sizes of every object, handed out or
    /// cached): what it charges to its group.
    pub fn mem_usage(&self) -> usize {
        self.inner.held.load(Ordering::Relaxed)
    }

    /// The accounting group charged, if any.
    pub fn group(&self) -> Option<&Arc<MemGroup>> {
        self.inner.group.as_ref()
    }

    /// The watermarks of cache `idx` (0 for a fixed-size allocator): `(low, high, batch, prefill)`.
    pub fn watermarks(&self, idx: usize) -> (usize, usize, usize, usize) {
        let p = &self.inner.params[idx];
        (p.low as usize, p.high as usize, p.batch, p.prefill)
    }

    /// Objects in `free_llist` of `cpu`'s cache `idx` (0 for a fixed-size allocator): for tests and
    /// benchmarks.
    pub fn free_count(&self, cpu: usize, idx: usize) -> isize {
        self.inner.cache(cpu, idx).free_cnt.load(Ordering::Relaxed)
    }

    /// Lengths of every list of `cpu`'s cache `idx` (0 for a fixed-size allocator), for tests.
    ///
    /// # Context
    /// Normal context, with the allocator quiescent: it walks lists other threads and callbacks may edit.
    #[doc(hidden)]
    pub fn lists(&self, cpu: usize, idx: usize) -> ListLens {
        let c = self.inner.cache(cpu, idx);
        let len = |head: &AtomicUsize| {
            let mut n = 0;
            // Acquire: pairs with the Release CAS in `llist_add_batch` (the links of the chain are visible).
            for_each_node(head.load(Ordering::Acquire), |_| n += 1);
            n
        };
        ListLens {
            free_llist: len(&c.free_llist),
            free_llist_extra: len(&c.free_llist_extra),
            free_by_rcu: len(&c.free_by_rcu),
            free_llist_extra_rcu: len(&c.free_llist_extra_rcu),
            waiting_for_gp: len(&c.waiting_for_gp),
            free_by_rcu_ttrace: len(&c.free_by_rcu_ttrace),
            waiting_for_gp_ttrace: len(&c.waiting_for_gp_ttrace),
        }
    }
}

/// Lengths of the lists of one per-CPU cache ([`BpfMemAlloc::lists`]).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListLens {
    /// `free_llist`.
    pub free_llist: usize,
    /// `free_llist_extra`.
    pub free_llist_extra: usize,
    /// `free_by_rcu`.
    pub free_by_rcu: usize,
    /// `free_llist_extra_rcu`.
    pub free_llist_extra_rcu: usize,
    /// `waiting_for_gp`.
    pub waiting_for_gp: usize,
    /// `free_by_rcu_ttrace`.
    pub free_by_rcu_ttrace: usize,
    /// `waiting_for_gp_ttrace`.
    pub waiting_for_gp_ttrace: usize,
}

impl ListLens {
    /// Objects on all lists.
    pub fn total(&self) -> usize {
        self.free_llist
            + self.free_llist_extra
            + self.free_by_rcu
            + self.free_llist_extra_rcu
            + self.waiting_for_gp
            + self.free_by_rcu_ttrace
            + self.waiting_for_gp_ttrace
    }
}

impl Drop for BpfMemAlloc {
    /// `bpf_mem_alloc_destroy`: stop the `irq_work`s, wait for the RCU and Tasks Trace callbacks in flight,
    /// then give every object on every list back to `kfree_nolock`. Objects still handed out are the caller's
    /// (the kernel's maps free theirs first); they are not touched.
    ///
    /// # Context
    /// Normal context only: blocks (barriers, and until queued `irq_work`s on other threads have run). Must
    /// not run inside an [`IrqRegion`] (an RCU reader, whose grace period the barriers would wait for): it
    /// panics then.
    fn drop(&mut self) {
        assert!(
            !IrqRegion::inside(),
            "BpfMemAlloc dropped inside an IrqRegion: destroy waits for grace periods the region holds up"
        );
        let ma = &*self.inner;
        let ncpu = NR_CPUS.min(nolock::thread::count() as usize);
        for cpu in 0..ncpu {
            for idx in 0..ma.ncaches {
                ma.cache(cpu, idx).draining.store(true, Ordering::Relaxed);
            }
        }
        let removed = cpu::cancel_late(bpf_mem_refill, |arg| ma.owns_cache(arg));
        ma.outstanding.fetch_sub(removed, Ordering::Relaxed);
        let mut spins = 0u64;
        // Acquire: pairs with the Release decrement at the end of `bpf_mem_refill`.
        while ma.outstanding.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::thread::yield_now();
            }
        }
        // __free_by_rcu first (it may queue a Tasks Trace callback), then __free_rcu_tasks_trace, then the RCU
        // callback a Tasks Trace callback may have queued for a batch held back for a refill.
        nolock::rcu_barrier();
        nolock::rcu_barrier_tasks_trace();
        nolock::rcu_barrier();
        for cpu in 0..ncpu {
            for idx in 0..ma.ncaches {
                let c = ma.cache(cpu, idx);
                ma.free_all(c.free_llist.swap(0, Ordering::Relaxed));
                c.free_cnt.store(0, Ordering::Relaxed);
                ma.free_all(llist_del_all(&c.free_llist_extra));
                ma.free_all(c.free_by_rcu.swap(0, Ordering::Relaxed));
                ma.free_all(llist_del_all(&c.free_llist_extra_rcu));
                ma.free_all(c.waiting_for_gp.swap(0, Ordering::Relaxed));
                ma.free_all(llist_del_all(&c.free_by_rcu_ttrace));
                ma.free_all(llist_del_all(&c.waiting_for_gp_ttrace));
                ma.free_all(c.ttrace_deferred.swap(0, Ordering::Relaxed));
            }
        }
        // SAFETY: allocated in `new` with this layout; no callback or queued work references it any more.
        unsafe { std::alloc::dealloc(ma.caches.as_ptr() as *mut u8, table_layout(ma.ncaches)) };
    }
}
