//! `kmalloc_nolock` / `kfree_nolock` / `ksize`: general-purpose allocation over the kmalloc size classes.
//!
//! Sizes up to [`KMALLOC_MAX_CACHE_SIZE`] (32 KiB) are served by the 41 caches `kmalloc-8` … `kmalloc-32k`:
//! 8, 16, then every 16 bytes from 32 to 128, then four classes per power of two (128 + 32, + 64, + 96, 256,
//! 320, …, 28k, 32k), the spacing of mimalloc and jemalloc, so that rounding wastes at most 25% above 128 B
//! (a `BTreeMap` node of 632 B lands in 640, not 1024). Every class is aligned to the largest power of two
//! dividing its size: power-of-two sizes are naturally aligned, 96 is aligned to 32, 640 to 128. Larger sizes
//! go straight to the page allocator as a run of whole pages, and `kfree_nolock` frees both kinds: the page
//! descriptor says which.
//!
//! "Try the next bucket": when this thread's list for the size class is busy — only possible when a signal
//! handler interrupted an allocator operation on that very class on this thread — the allocation is served by
//! the next larger class that keeps the requested alignment (32 KiB goes to pages). If that one is busy too
//! (nested handlers), the allocation takes an object straight from the class's shared slab lists. Unlike the
//! kernel, which gives up after one retry, nolock therefore fails only when memory is exhausted.
//!
//! The classes exist twice, plain and debug (`NOLOCK_DEBUG`, [`super::debug::set_enabled`]).

use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use super::alloc::{Got, alloc_fast};
use super::cache::{self, CacheConfig, CacheInner, FLAG_DEBUG, FLAG_KMALLOC};
use super::debug::{self, FreeError, FreeErrorKind};
use super::tables::{self, SlabState};
use crate::page::Gfp;
use crate::page::desc::{Info, Kind};
use crate::sys::{PAGE_SHIFT, PAGE_SIZE};

/// Sizes of the kmalloc classes: 8, 16, every 16 bytes to 128, then four per power of two up to 32 KiB.
pub const KMALLOC_SIZES: [usize; 41] = [
    8, 16, 32, 48, 64, 80, 96, 112, 128, // small: the first 9 (`SMALL_CLASSES`), by `SIZE_INDEX`
    160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120,
    6144, 7168, 8192, 10240, 12288, 14336, 16384, 20480, 24576, 28672, 32768,
];
/// Number of kmalloc classes.
pub const NR_KMALLOC: usize = KMALLOC_SIZES.len();
/// Largest size served by a slab cache; larger requests are page runs.
pub const KMALLOC_MAX_CACHE_SIZE: usize = 32768;
/// What `kmalloc_nolock(0, ..)` returns (the kernel's `ZERO_SIZE_PTR`): a non-null pointer to nothing.
/// `kfree_nolock` accepts it (and null) and does nothing; `ksize` of it is 0. Never dereference it.
pub const ZERO_SIZE_PTR: *mut u8 = 16 as *mut u8;

/// Addresses below this are never allocations: zero-size requests return small dangling pointers there
/// ([`ZERO_SIZE_PTR`], or the alignment itself for alignments above 16), and the free functions ignore them.
pub const ZERO_SIZE_LIMIT: usize = 1 << 16;

/// Classes served through `SIZE_INDEX` (sizes 1..=128).
const SMALL_CLASSES: usize = 9;

/// Class index for sizes 1..=128, by `(size - 1) / 8`.
const SIZE_INDEX: [u8; 16] = [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8];

/// The class for `size` (1 ..= 32768).
#[inline(always)]
pub(crate) fn size_class(size: usize) -> usize {
    debug_assert!((1..=KMALLOC_MAX_CACHE_SIZE).contains(&size));
    if size <= 128 {
        SIZE_INDEX[(size - 1) / 8] as usize
    } else {
        // Four classes per power of two: for `s = size - 1` in [2^e, 2^(e+1)) (e >= 7), the class is the
        // quarter of that range `s` falls in, so 129..=160 → 160, 161..=192 → 192, ..., 225..=256 → 256.
        let s = size - 1;
        let e = (usize::BITS - 1 - s.leading_zeros()) as usize;
        SMALL_CLASSES + (e - 7) * 4 + ((s >> (e - 2)) & 3)
    }
}

/// Alignment guaranteed by a class (the largest power of two dividing its size).
#[inline(always)]
pub(crate) const fn class_align(class: usize) -> usize {
    let s = KMALLOC_SIZES[class];
    s & s.wrapping_neg()
}

/// Cache ids of all kmalloc caches (created first, so ids `0..2 * NR_KMALLOC`).
pub(crate) fn all_kmalloc_ids() -> impl Iterator<Item = u16> {
    0..(2 * NR_KMALLOC) as u16
}

/// Create the plain and debug kmalloc caches in a fresh global state (ids `0..NR_KMALLOC` and
/// `NR_KMALLOC..2 * NR_KMALLOC`).
pub(crate) fn create_kmalloc_caches(g: &SlabState) {
    for debug in [false, true] {
        for &size in &KMALLOC_SIZES {
            let mut name = crate::sys::StackBuf::<32>::new();
            let prefix = if debug { "kmalloc-dbg-" } else { "kmalloc-" };
            let _ = if size >= 1024 && size.is_multiple_of(1024) {
                core::fmt::Write::write_fmt(&mut name, format_args!("{prefix}{}k", size / 1024))
            } else {
                core::fmt::Write::write_fmt(&mut name, format_args!("{prefix}{size}"))
            };
            let flags = FLAG_KMALLOC | if debug { FLAG_DEBUG } else { 0 };
            let align = size & size.wrapping_neg();
            let mut cfg = CacheConfig::new(name.as_str(), size, align, 0, flags);
            if size < 16 && !debug {
                // No room for the free key in the object: a free map after the slab's objects.
                cfg.add_free_map();
            }
            cache::create(g, cfg).expect("fresh cache table has room for the kmalloc caches");
        }
    }
}

static LARGE_ALLOCS: AtomicU64 = AtomicU64::new(0);
static LARGE_FREES: AtomicU64 = AtomicU64::new(0);
static LARGE_FAILURES: AtomicU64 = AtomicU64::new(0);
static LARGE_PAGES: AtomicU64 = AtomicU64::new(0);

/// Counters of allocations above `KMALLOC_MAX_CACHE_SIZE` (page runs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LargeStats {
    /// Successful large allocations.
    pub allocs: u64,
    /// Large frees.
    pub frees: u64,
    /// Large allocations that found no free run.
    pub failures: u64,
    /// Pages held by live large allocations.
    pub pages: u64,
}

/// A snapshot of the large-allocation counters.
///
/// # Context
/// Any context (four atomic loads).
pub fn large_stats() -> LargeStats {
    LargeStats {
        allocs: LARGE_ALLOCS.load(Ordering::Relaxed),
        frees: LARGE_FREES.load(Ordering::Relaxed),
        failures: LARGE_FAILURES.load(Ordering::Relaxed),
        pages: LARGE_PAGES.load(Ordering::Relaxed),
    }
}

/// Allocate `size` bytes, aligned to at least 8 and to the largest power of two dividing `size` (so naturally
/// for power-of-two sizes) up to 32 KiB; page aligned above 32 KiB. With [`Gfp::ZERO`] the memory is zeroed.
///
/// - `size == 0` returns [`ZERO_SIZE_PTR`].
/// - `None` means out of memory: no free object and no free pages in the arena. It never means "busy".
///
/// # Context
/// Any context: async-signal-safe, reentrant (a signal handler may call it while this thread is inside any
/// nolock function), never blocks, never takes a lock, never calls `malloc`. Makes no system call except the
/// very first time nolock is used (`mmap` of the arena) and, when the memory committed ahead of need is used
/// up, one `mprotect` (plus `mlock` under `mlockall(MCL_FUTURE)`) to commit more (see [`crate::page`]).
#[inline]
pub fn kmalloc_nolock(size: usize, flags: Gfp) -> Option<NonNull<u8>> {
    if size.wrapping_sub(1) >= KMALLOC_MAX_CACHE_SIZE {
        return kmalloc_odd(size, 8, flags);
    }
    // Power-of-two sizes are naturally aligned (and every size keeps the alignment of its lowest set bit), so
    // "try the next bucket" must skip classes that would break it (64 → 128, not 96).
    kmalloc_class(size_class(size), || (size & size.wrapping_neg()).max(8), flags)
}

/// Allocate memory for `layout` (any size and power-of-two alignment), aligned to `layout.align()` and, like
/// [`kmalloc_nolock`], to the largest power of two dividing the size (up to 32 KiB). A zero-size layout returns
/// a dangling, suitably aligned pointer below [`ZERO_SIZE_LIMIT`] that must not be dereferenced; freeing it is
/// harmless.
///
/// Every alignment up to the arena's size is honoured (the arena's base is aligned to its size rounded up to a
/// power of two, or to 2 MiB where the address space has no room for that: see
/// [`PageStats::max_align`](crate::page::PageStats::max_align)). A larger alignment returns `None`: the memory
/// is never misaligned.
///
/// # Context
/// As [`kmalloc_nolock`].
#[inline]
pub fn kmalloc_layout_nolock(layout: Layout, flags: Gfp) -> Option<NonNull<u8>> {
    let (size, align) = (layout.size(), layout.align());
    if size.wrapping_sub(1) >= KMALLOC_MAX_CACHE_SIZE || align > KMALLOC_MAX_CACHE_SIZE {
        return kmalloc_odd(size, align, flags);
    }
    // Like kmalloc_nolock, keep the natural alignment of the size too (the next bucket must not lose it).
    kmalloc_class(layout_class(size, align), || align.max(size & size.wrapping_neg()), flags)
}

/// The class [`kmalloc_layout_nolock`] serves `size` (1 ..= 32768) at alignment `align` (at most 32768) from.
#[inline(always)]
fn layout_class(size: usize, align: usize) -> usize {
    let mut class = size_class(size.max(align));
    while class_align(class) < align {
        class += 1;
    }
    class
}

/// Shrink an allocation of [`kmalloc_layout_nolock`] whose usable size is `usable` to `new_size` bytes
/// (`1 ..= usable`) at alignment `align`, giving memory back (the `realloc` of [`crate::NolockAlloc`]):
/// - a page run frees its tail pages in place, or, for at most half a page, moves to a size class;
/// - a slab object moves to the class that serves `(new_size, align)` if that class is smaller.
///
/// Returns the pointer to use from now on: `ptr` when nothing smaller serves the size, or when a move finds no
/// memory (a shrink never fails); otherwise the new object, holding the first `new_size` bytes, and `ptr` is
/// freed.
///
/// # Safety
/// `ptr` is a live allocation from [`kmalloc_layout_nolock`] (or [`kmalloc_nolock`]) with usable size `usable`
/// and alignment at least `align`; `new_size` with `align` is a valid layout. After a move, `ptr` is freed.
///
/// # Context
/// As [`kmalloc_nolock`] and [`kfree_nolock`].
pub(crate) unsafe fn krealloc_shrink(ptr: *mut u8, usable: usize, new_size: usize, align: usize) -> *mut u8 {
    let addr = ptr as usize;
    let Some(g) = tables::state_if_init() else {
        return ptr;
    };
    if addr < ZERO_SIZE_LIMIT || !g.pages.contains(addr) || new_size == 0 || new_size > usable {
        return ptr;
    }
    let info = g.pages.info_of(addr);
    let movable = new_size <= KMALLOC_MAX_CACHE_SIZE && align <= KMALLOC_MAX_CACHE_SIZE;
    match info.kind() {
        Kind::Large if !(movable && new_size <= PAGE_SIZE / 2) => {
            shrink_large_in_place(g, info.head() as usize, usable >> PAGE_SHIFT, new_size.div_ceil(PAGE_SIZE));
            return ptr;
        }
        Kind::Large => {}
        Kind::Slab if movable && KMALLOC_SIZES[layout_class(new_size, align)] < usable => {}
        _ => return ptr,
    }
    // SAFETY: `new_size` and `align` make a valid layout (caller).
    let layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
    match kmalloc_layout_nolock(layout, Gfp::NONE) {
        Some(new) => {
            // SAFETY: the old block holds at least `new_size` live bytes (`new_size <= usable`, and the caller
            // only reads the first `new_size`); the new one has room for them; distinct allocations.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new.as_ptr(), new_size);
                kfree_nolock(ptr);
            }
            new.as_ptr()
        }
        None => {
            if info.kind() == Kind::Large {
                shrink_large_in_place(g, info.head() as usize, usable >> PAGE_SHIFT, new_size.div_ceil(PAGE_SIZE));
            }
            ptr
        }
    }
}

/// Keep the first `keep` of the `npages` pages of the live large run at `head` and free the rest.
fn shrink_large_in_place(g: &SlabState, head: usize, npages: usize, keep: usize) {
    let keep = keep.max(1);
    if keep >= npages {
        return;
    }
    // Only the owner reads a live run's length (ksize, its free); store it before the tail can be reused.
    g.pages.desc(head).npages.store(keep as u64, Ordering::Relaxed);
    // SAFETY: pages `head + keep .. head + npages` are the tail of a live run its owner gives up; their
    // descriptors are `Free` already (only the head's is written).
    unsafe { g.pages.free_run(head + keep, npages - keep) };
    LARGE_PAGES.fetch_sub((npages - keep) as u64, Ordering::Relaxed);
}

/// The fast path: the slab layer's one allocation fast path ([`alloc_fast`]) on the class's list, nothing else.
/// Every other case (debug mode, fault injection, a thread's first call, a busy or claimed list) ends in one
/// tail call to [`kmalloc_class_full`], so the fast path saves no registers. `align` is only evaluated off the
/// fast path.
#[inline(always)]
fn kmalloc_class(class: usize, align: impl FnOnce() -> usize, flags: Gfp) -> Option<NonNull<u8>> {
    // Plain caches have ids 0..NR_KMALLOC, no debug layout (the slot is the object) and their link word at offset 0, so
    // a plain class's `finish_alloc` is `kmalloc_finish`.
    if let Some(g) = tables::state_if_init()
        && g.slow_flags.load(Ordering::Relaxed) == 0
        && let Some(r) = alloc_fast(g, class as u16, 0, flags, |slot| kmalloc_finish(g, slot, class, flags))
    {
        return r;
    }
    kmalloc_class_full(class, align(), flags)
}

/// Clear the object's double-free key; zero the object if asked.
#[inline(always)]
fn kmalloc_finish(g: &SlabState, slot: usize, class: usize, flags: Gfp) -> NonNull<u8> {
    // Every plain class but the 8-byte one carries the free key in the object (`FLAG_FREE_KEY`); the 8-byte
    // one, which has no room for it, in its slabs' free map (`FLAG_MAP_KEY`).
    if class != 0 {
        super::free::clear_free_key(slot);
    } else {
        g.cache(0).cfg().map_byte(slot).store(0, Ordering::Relaxed);
    }
    if flags.contains(Gfp::ZERO) {
        // SAFETY: a fresh object of the class's size.
        unsafe { core::ptr::write_bytes(slot as *mut u8, 0, KMALLOC_SIZES[class]) };
    }
    // SAFETY: arena addresses are never null.
    unsafe { NonNull::new_unchecked(slot as *mut u8) }
}

/// The full path of a plain kmalloc class (it sets nolock up on first use).
#[inline(never)]
fn kmalloc_class_full(class: usize, align: usize, flags: Gfp) -> Option<NonNull<u8>> {
    let g = tables::state()?;
    if g.slow_flags.load(Ordering::Relaxed) != 0 {
        return kmalloc_class_slow(g, class, align, flags);
    }
    let id = class as u16;
    match g.cache(id).alloc_local(g, id, 0) {
        Got::Obj(slot) => Some(kmalloc_finish(g, slot, class, flags)),
        Got::Busy => next_bucket(g, 0, class, align, flags),
        Got::Oom => None,
    }
}

/// kmalloc with debug mode or fault injection on.
#[cold]
#[inline(never)]
fn kmalloc_class_slow(g: &'static SlabState, class: usize, align: usize, flags: Gfp) -> Option<NonNull<u8>> {
    let base = if g.kmalloc_debug() { NR_KMALLOC } else { 0 };
    let id = (base + class) as u16;
    let c = g.cache(id);
    if g.fault_active() && c.inject_fault() {
        return None;
    }
    match c.alloc_local(g, id, c.cfg().link_off as usize) {
        Got::Obj(slot) => Some(c.finish_alloc(slot, flags)),
        Got::Busy => next_bucket(g, base, class, align, flags),
        Got::Oom => None,
    }
}

/// This class is busy on this thread: try the next one, then the shared lists.
#[cold]
#[inline(never)]
fn next_bucket(g: &'static SlabState, base: usize, class: usize, align: usize, flags: Gfp) -> Option<NonNull<u8>> {
    let c = g.cache((base + class) as u16);
    c.counters.next_bucket.fetch_add(1, Ordering::Relaxed);
    match (class + 1..NR_KMALLOC).find(|&n| class_align(n) >= align) {
        Some(n) => {
            let id2 = (base + n) as u16;
            let c2 = g.cache(id2);
            if let Got::Obj(slot) = c2.alloc_local(g, id2, c2.cfg().link_off as usize) {
                return Some(c2.finish_alloc(slot, flags));
            }
        }
        None => {
            if let Some(p) = kmalloc_large(g, KMALLOC_MAX_CACHE_SIZE, align, flags) {
                return Some(p);
            }
        }
    }
    // Both busy (nested signal handlers), or the next class is out of memory: the shared path never fails
    // while this class has a free object or the arena has pages.
    c.alloc_shared(g).map(|slot| c.finish_alloc(slot, flags))
}

/// Size 0, or larger than the biggest class.
#[cold]
#[inline(never)]
fn kmalloc_odd(size: usize, align: usize, flags: Gfp) -> Option<NonNull<u8>> {
    if size == 0 {
        if align >= ZERO_SIZE_LIMIT {
            // Too aligned to fit below the limit: a real (minimal) allocation, freed like any other.
            return kmalloc_large(tables::state()?, 1, align, flags);
        }
        return NonNull::new(if align <= 16 { ZERO_SIZE_PTR } else { align as *mut u8 });
    }
    kmalloc_large(tables::state()?, size, align, flags)
}

fn kmalloc_large(g: &SlabState, size: usize, align: usize, flags: Gfp) -> Option<NonNull<u8>> {
    // An alignment the arena's base cannot give is refused, never silently weakened.
    if size > g.pages.size() || align > g.pages.max_align() {
        LARGE_FAILURES.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    let npages = size.div_ceil(PAGE_SIZE);
    let align_pages = (align >> PAGE_SHIFT).max(1);
    let first = match g.pages.alloc_run(npages, align_pages) {
        Some(f) => f,
        None => {
            super::shrink::reclaim_empty_slabs(g);
            match g.pages.alloc_run(npages, align_pages) {
                Some(f) => f,
                None => {
                    LARGE_FAILURES.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
    };
    let d = g.pages.desc(first);
    d.npages.store(npages as u64, Ordering::Relaxed);
    d.set_info(Info::new(Kind::Large, 0, first as u32));
    if flags.contains(Gfp::ZERO) {
        // SAFETY: the run was just claimed by us.
        unsafe { g.pages.zero_dirty(first, npages) };
    }
    LARGE_ALLOCS.fetch_add(1, Ordering::Relaxed);
    LARGE_PAGES.fetch_add(npages as u64, Ordering::Relaxed);
    NonNull::new(g.pages.page_addr(first) as *mut u8)
}

/// Free memory from [`kmalloc_nolock`] / [`kmalloc_layout_nolock`] (or a `KmemCache`: the cache is found from
/// the address). Null, [`ZERO_SIZE_PTR`] and every address below [`ZERO_SIZE_LIMIT`] are ignored. A bad
/// pointer — foreign, not allocated, interior, a
/// double free caught by the checks — is reported on standard error and counted, and nothing is freed.
///
/// # Safety
/// If `ptr` is a live nolock object, it must not be used afterwards.
///
/// # Context
/// Any context: async-signal-safe, reentrant, never blocks. Never fails: a free that cannot be done at once
/// (this thread's list is busy under a signal handler) is deferred and completed by the interrupted call.
#[inline]
pub unsafe fn kfree_nolock(ptr: *mut u8) {
    let addr = ptr as usize;
    // The fast path: a push onto the thread's list of the object's cache, nothing else; every other case ends
    // in one tail call to `kfree_slow`.
    if let Some(g) = tables::state_if_init()
        && CacheInner::free_fast(g, addr, None)
    {
        return;
    }
    // SAFETY: forwarded from the caller.
    unsafe { kfree_slow(ptr) }
}

/// Everything but the fast path: null, `ZERO_SIZE_PTR`, large runs, debug caches, full or busy lists, errors.
///
/// # Safety
/// As [`kfree_nolock`].
#[cold]
#[inline(never)]
unsafe fn kfree_slow(ptr: *mut u8) {
    // SAFETY: forwarded from the caller.
    if let Err(e) = unsafe { try_kfree_nolock(ptr) } {
        debug::report(&e);
    }
}

/// [`kfree_nolock`] that returns the error instead of reporting it.
///
/// # Safety
/// As [`kfree_nolock`].
///
/// # Context
/// As [`kfree_nolock`].
#[inline]
pub unsafe fn try_kfree_nolock(ptr: *mut u8) -> Result<(), FreeError> {
    let addr = ptr as usize;
    if addr < ZERO_SIZE_LIMIT {
        return Ok(());
    }
    let Some(g) = tables::state_if_init() else {
        return Err(FreeError::new(FreeErrorKind::Foreign, addr));
    };
    if !g.pages.contains(addr) {
        return Err(FreeError::new(FreeErrorKind::Foreign, addr));
    }
    let info = g.pages.info_of(addr);
    match info.kind() {
        Kind::Slab => g.cache(info.cache_id()).free_checked(g, info.cache_id(), addr, info),
        Kind::Large => free_large(g, addr, info),
        Kind::Pages => Err(FreeError::new(FreeErrorKind::PagesRun, addr)),
        Kind::Free => Err(FreeError::new(FreeErrorKind::NotAllocated, addr)),
    }
}

#[cold]
fn free_large(g: &SlabState, addr: usize, info: Info) -> Result<(), FreeError> {
    let page = g.pages.page_of(addr);
    let head = info.head() as usize;
    if head != page || !addr.is_multiple_of(PAGE_SIZE) {
        let start = g.pages.page_addr(head);
        return Err(FreeError::new(
            FreeErrorKind::InteriorPointer { object: start, offset: addr as isize - start as isize },
            addr,
        ));
    }
    let d = g.pages.desc(page);
    let npages = d.npages.load(Ordering::Relaxed) as usize;
    // Whoever flips the descriptor owns the free; a racing double free loses here.
    if d.info.compare_exchange(info.0, Info::new(Kind::Free, 0, 0).0, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return Err(FreeError::new(FreeErrorKind::DoubleFree, addr));
    }
    // SAFETY: the run is ours: its descriptor said Large with this head and we just retired it.
    unsafe { g.pages.free_run(page, npages) };
    LARGE_FREES.fetch_add(1, Ordering::Relaxed);
    LARGE_PAGES.fetch_sub(npages as u64, Ordering::Relaxed);
    Ok(())
}

/// The usable size of a nolock allocation: the size of its class, or of its page run. 0 for null,
/// [`ZERO_SIZE_PTR`] and anything that is not the start of a live nolock object.
///
/// # Context
/// Any context: async-signal-safe, reentrant, O(1).
pub fn ksize(ptr: *const u8) -> usize {
    let addr = ptr as usize;
    let Some(g) = tables::state_if_init() else {
        return 0;
    };
    if addr < ZERO_SIZE_LIMIT || !g.pages.contains(addr) {
        return 0;
    }
    let info = g.pages.info_of(addr);
    match info.kind() {
        Kind::Slab => {
            let c = g.cache(info.cache_id());
            let base = g.pages.page_addr(info.head() as usize);
            let cfg = c.cfg();
            let rel = (addr - base).wrapping_sub(cfg.obj_off as usize);
            if rel.is_multiple_of(cfg.stride as usize) && rel / (cfg.stride as usize) < cfg.capacity as usize {
                cfg.size as usize
            } else {
                0
            }
        }
        Kind::Large if g.pages.page_of(addr) == info.head() as usize && addr.is_multiple_of(PAGE_SIZE) => {
            (g.pages.desc(info.head() as usize).npages.load(Ordering::Relaxed) as usize) << PAGE_SHIFT
        }
        _ => 0,
    }
}

/// The start of the nolock object whose memory holds `addr`: the object of a slab slot (between its start and
/// its usable size), or the first page of a large run. `None` when `addr` lies in no object: outside the arena,
/// in a free page or a slab's red zone or tail, in an `alloc_pages_nolock` run.
///
/// A large run's descriptors name it only on its first page (the others read as free), so an address further
/// in is found by walking back page by page to that first page: as many steps as pages lie between them.
///
/// # Context
/// Any context; O(1) for slab objects, O(pages) into a large run.
pub(crate) fn object_containing(g: &SlabState, addr: usize) -> Option<usize> {
    if !g.pages.contains(addr) {
        return None;
    }
    let info = g.pages.info_of(addr);
    match info.kind() {
        Kind::Slab => {
            let cfg = g.cache(info.cache_id()).cfg();
            let base = g.pages.page_addr(info.head() as usize);
            let idx = (addr - base) / cfg.stride as usize;
            let obj = base + idx * cfg.stride as usize + cfg.obj_off as usize;
            (idx < usize::from(cfg.capacity) && addr.wrapping_sub(obj) < cfg.size as usize).then_some(obj)
        }
        Kind::Large | Kind::Free => {
            let page = g.pages.page_of(addr);
            let mut p = page;
            loop {
                let i = g.pages.desc(p).info();
                match i.kind() {
                    Kind::Large if i.head() as usize == p => {
                        let n = g.pages.desc(p).npages.load(Ordering::Relaxed) as usize;
                        return (page < p + n).then(|| g.pages.page_addr(p));
                    }
                    Kind::Free if p > 0 => p -= 1,
                    _ => return None,
                }
            }
        }
        Kind::Pages => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for size in 1..=KMALLOC_MAX_CACHE_SIZE {
            let c = size_class(size);
            assert!(KMALLOC_SIZES[c] >= size, "size {size} class {c}");
            if c > 0 {
                assert!(KMALLOC_SIZES[c - 1] < size, "size {size} not the smallest class");
            }
        }
        for (c, &s) in KMALLOC_SIZES.iter().enumerate() {
            assert_eq!(size_class(s), c, "size {s}");
            assert!(class_align(c) >= 8 && s.is_multiple_of(class_align(c)));
            if s.is_power_of_two() {
                assert_eq!(class_align(c), s, "natural alignment of {s}");
            }
            // At most four classes per power of two above 128 B: rounding wastes at most 25%.
            if c > 0 && s > 128 {
                assert!(s - KMALLOC_SIZES[c - 1] <= s / 4, "spacing at {s}");
            }
        }
        assert_eq!(size_class(632), size_class(640));
        assert_eq!(KMALLOC_SIZES[size_class(728)], 768);
        assert_eq!(class_align(size_class(96)), 32);
        assert_eq!(class_align(size_class(640)), 128);
        assert_eq!(KMALLOC_SIZES[NR_KMALLOC - 1], KMALLOC_MAX_CACHE_SIZE);
    }
}
