//! The slab layer's process-wide state ([`SlabState`]): the page allocator it takes slabs from, its two
//! tables — the cache table (one [`CacheInner`] per cache id) and the per-thread table (one [`ThreadCaches`]
//! per thread slot), in one mapping this layer makes and owns — and the `slow_flags` byte that keeps the
//! allocation fast paths short.
//!
//! The layer below (`global`: the arena and the settings) knows nothing of slabs. This layer builds its own
//! state on first use ([`state`]) over the published arena, the way `global` builds the arena: map and fill a
//! complete instance (tables, kmalloc caches), publish it with one CAS, and on losing the race unmap the copy
//! and use the winner's. Nothing waits, so the first allocation may be anywhere, even in a signal handler that
//! interrupted another first allocation on the same thread.
//!
//! # Memory
//!
//! Zeroed memory is a valid table: every cache slot free, every thread's lists empty and unlocked. The
//! per-thread table is large (`MAX_THREADS` × 16 KiB = 16 MiB of address space) and is touched only as threads
//! arrive. Under `mlockall(MCL_FUTURE)` mapping it plainly would fault in and lock all of it at once; instead
//! it is mapped without access, unlocked, made readable and writable (which faults nothing in), and only the
//! cache table and the first [`LOCKED_THREADS_AHEAD`] thread entries are locked. The background worker locks
//! more as threads arrive ([`SlabTables::lock_ahead`]); until then a new thread's entry is faulted in by its
//! first use, unlocked.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU32, Ordering};

use super::cache::{CacheInner, MAX_CACHES};
use super::thread_cache::ThreadCaches;
use crate::page::{ArenaView, MapError, PageAllocator};
use crate::thread::MAX_THREADS;

/// Thread entries locked at initialisation under `MCL_FUTURE`, and kept locked ahead of the slots in use.
const LOCKED_THREADS_AHEAD: u32 = 16;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Byte offsets of the two tables in the mapping.
struct Layout {
    threads: usize,
    total: usize,
}

impl Layout {
    const fn new() -> Self {
        let threads = (MAX_CACHES * core::mem::size_of::<CacheInner>()).div_ceil(4096) * 4096;
        let total = (threads + MAX_THREADS * core::mem::size_of::<ThreadCaches>()).div_ceil(4096) * 4096;
        Self { threads, total }
    }

    /// Bytes from the start of the mapping to the end of thread entry `n - 1`, rounded up to a page.
    fn thread_end(&self, n: usize) -> usize {
        round_up(self.threads + n.min(MAX_THREADS) * core::mem::size_of::<ThreadCaches>(), 4096).min(self.total)
    }
}

const LAYOUT: Layout = Layout::new();

/// The slab layer's two tables (see the module documentation).
pub(crate) struct SlabTables {
    caches: NonNull<CacheInner>,
    threads: NonNull<ThreadCaches>,
    /// Cache ids never used yet start here.
    pub(super) next_cache: AtomicU32,
    /// Under `MCL_FUTURE`: thread entries below this are locked in memory (0: no locking).
    threads_locked: AtomicU32,
}

// SAFETY: the tables are accessed only through atomics or under the per-cache and per-thread protocols of the
// slab layer; the pointers themselves never change.
unsafe impl Send for SlabTables {}
// SAFETY: see above.
unsafe impl Sync for SlabTables {}

impl SlabTables {
    /// Map the tables (zeroed: valid and empty). With `lock` (`mlockall(MCL_FUTURE)` is in effect), only the
    /// cache table and the first thread entries are locked (see the module documentation).
    ///
    /// # Context
    /// Any context (the process's first nolock call may be in a signal handler): `mmap`, and under `lock`
    /// `munlock`, `mprotect`, `mlock`; all async-signal-safe.
    pub(crate) fn map(lock: bool) -> Result<Self, MapError> {
        let err = |errno| MapError { what: "cache and thread tables", bytes: LAYOUT.total, errno };
        let base = if lock {
            map_unlocked().map_err(err)?
        } else {
            crate::sys::mmap_reserve_err(LAYOUT.total).map_err(err)?
        };
        // SAFETY: a fresh mapping of `LAYOUT.total` bytes, page aligned; both offsets are inside it.
        let (caches, threads) =
            unsafe { (NonNull::new_unchecked(base.cast()), NonNull::new_unchecked(base.add(LAYOUT.threads).cast())) };
        Ok(Self {
            caches,
            threads,
            next_cache: AtomicU32::new(0),
            threads_locked: AtomicU32::new(if lock { LOCKED_THREADS_AHEAD } else { 0 }),
        })
    }

    /// Unmap tables that were never shared (the state that held them lost the race to be published).
    ///
    /// # Safety
    /// Nothing refers to the tables.
    pub(crate) unsafe fn unmap(self) {
        // SAFETY: our own mapping of `LAYOUT.total` bytes, unused (caller).
        unsafe { crate::sys::munmap(self.caches.as_ptr().cast(), LAYOUT.total) };
    }

    /// The cache with id `id`.
    #[inline(always)]
    pub(crate) fn cache(&self, id: u16) -> &CacheInner {
        debug_assert!((id as usize) < MAX_CACHES);
        // SAFETY: the table has MAX_CACHES entries living as long as `self`; zeroed entries are valid.
        unsafe { &*self.caches.as_ptr().add(id as usize) }
    }

    /// The entry of thread slot `slot` in the per-thread table.
    #[inline(always)]
    pub(crate) fn thread(&self, slot: u32) -> &ThreadCaches {
        debug_assert!((slot as usize) < MAX_THREADS);
        // SAFETY: the table has MAX_THREADS entries living as long as `self`; zeroed entries are valid.
        unsafe { &*self.threads.as_ptr().add(slot as usize) }
    }

    /// The slot whose entry `t` is (`t` is an entry of this table).
    #[inline]
    pub(crate) fn slot_of(&self, t: &ThreadCaches) -> u32 {
        ((t as *const ThreadCaches as usize - self.threads.as_ptr() as usize) / core::mem::size_of::<ThreadCaches>())
            as u32
    }

    /// Under `MCL_FUTURE` (see the module documentation): lock the thread entries of the slots handed out since
    /// the last call, and [`LOCKED_THREADS_AHEAD`] more.
    ///
    /// # Context
    /// Normal context (the background worker): `mlock`.
    pub(crate) fn lock_ahead(&self) {
        let locked = self.threads_locked.load(Ordering::Relaxed);
        if locked == 0 {
            return;
        }
        let want = (crate::thread::count() + LOCKED_THREADS_AHEAD).min(MAX_THREADS as u32);
        if want <= locked {
            return;
        }
        let base = self.caches.as_ptr() as usize;
        let (from, to) = (LAYOUT.thread_end(locked as usize), LAYOUT.thread_end(want as usize));
        // SAFETY: `[base + from, base + to)` is page aligned and inside our mapping; locking changes no contents.
        if to <= from || unsafe { crate::sys::mlock((base + from) as *mut u8, to - from) }.is_ok() {
            self.threads_locked.store(want, Ordering::Relaxed);
        }
    }

    /// In a child of `fork` (the atfork child handler): memory locks are not inherited; stop locking.
    ///
    /// # Context
    /// The atfork child handler.
    pub(crate) fn after_fork_child(&self) {
        self.threads_locked.store(0, Ordering::Relaxed);
    }
}

/// Map the tables when `mlockall(MCL_FUTURE)` is in effect (see the module documentation).
///
/// Async-signal-safe (`mmap`, `munlock`, `mprotect`, `mlock`).
fn map_unlocked() -> Result<*mut u8, i32> {
    let meta = crate::sys::mmap_none(LAYOUT.total)?;
    // SAFETY: our fresh reservation of `LAYOUT.total` bytes, which nothing uses yet.
    unsafe {
        crate::sys::munlock(meta, LAYOUT.total);
        if let Err(e) = crate::sys::mprotect_rw(meta, LAYOUT.total) {
            crate::sys::munmap(meta, LAYOUT.total);
            return Err(e);
        }
        // Best effort: over RLIMIT_MEMLOCK the tables still work, faulted in on first use.
        let _ = crate::sys::mlock(meta, LAYOUT.thread_end(LOCKED_THREADS_AHEAD as usize));
    }
    Ok(meta)
}

/// `SlabState::slow_flags`: kmalloc debug mode is on.
pub const SLOW_DEBUG: u8 = 1;
/// `SlabState::slow_flags`: fault injection is configured somewhere.
pub const SLOW_FAULT: u8 = 2;

/// The slab layer's process-wide state. See the module documentation.
///
/// `repr(C)` with a cold word first: the state sits at the start of a page, and so does the first object of
/// every slab, whose link word a free stores at offset 0 of its page. A hot field at page offset 0 would be
/// loaded right after such a store on every alloc+free pair that reuses that object, and the CPU takes a load
/// whose low 12 address bits match a recent store's as dependent on it (4K aliasing): measured, the pair
/// benchmark ran 1.5x slower with `pages` at offset 0.
#[repr(C)]
pub(crate) struct SlabState {
    /// Bytes of this mapping (cold: read only when a losing copy is unmapped).
    len: usize,
    /// The arena's address-to-descriptor geometry, copied here for the free fast path (see [`ArenaView`]).
    pub arena: ArenaView,
    /// The page allocator over the arena (the layer below's, never unmapped).
    pub pages: &'static PageAllocator,
    /// The cache and per-thread tables.
    pub slab: SlabTables,
    /// `SLOW_DEBUG`: new kmalloc allocations come from the debug caches; `SLOW_FAULT`: some fault injection is
    /// configured; `debug::SLOW_HARDENED`: the plain kmalloc classes are hardened. Zero keeps the allocation
    /// fast paths on their shortest route (one load and branch).
    pub slow_flags: AtomicU8,
}

static STATE: AtomicPtr<SlabState> = AtomicPtr::new(core::ptr::null_mut());

/// Bytes of the mapping that holds a [`SlabState`].
const STATE_LEN: usize = core::mem::size_of::<SlabState>().next_multiple_of(4096);

/// The slab layer's state, building it (and the arena below it) on first use. `None` only if a mapping failed
/// (the layer below says why, once).
///
/// # Context
/// Any context; the first call makes a few `mmap` calls.
#[inline]
pub(crate) fn state() -> Option<&'static SlabState> {
    // Acquire: pairs with the AcqRel publication in `build`: the tables and kmalloc caches are seen filled.
    let p = STATE.load(Ordering::Acquire);
    if p.is_null() {
        return build();
    }
    // SAFETY: a published state is never freed.
    Some(unsafe { &*p })
}

/// The slab layer's state if it exists already (builds nothing).
#[inline]
pub(crate) fn state_if_init() -> Option<&'static SlabState> {
    // Acquire: pairs with the AcqRel publication in `build`.
    let p = STATE.load(Ordering::Acquire);
    // SAFETY: a published state is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

#[cold]
fn build() -> Option<&'static SlabState> {
    let g = crate::global::get()?;
    // The first call may be in a signal handler: leave the interrupted code's errno as it was.
    let _errno = crate::sys::ErrnoGuard::save();
    let slab = match SlabTables::map(g.pages.locks_commits()) {
        Ok(t) => t,
        Err(e) => {
            crate::global::report_map_failure(e);
            return None;
        }
    };
    let meta = match crate::sys::mmap_reserve_err(STATE_LEN) {
        Ok(m) => m,
        Err(errno) => {
            crate::global::report_map_failure(MapError { what: "slab state", bytes: STATE_LEN, errno });
            // SAFETY: never shared.
            unsafe { slab.unmap() };
            return None;
        }
    };
    let p = meta.cast::<SlabState>();
    let debug = g.settings.debug;
    // SAFETY: `meta` is a fresh, page-aligned mapping big enough for a SlabState.
    unsafe {
        p.write(SlabState {
            len: STATE_LEN,
            arena: g.pages.view(),
            pages: &g.pages,
            slab,
            slow_flags: AtomicU8::new(if debug { SLOW_DEBUG } else { 0 }),
        })
    };
    // SAFETY: just written; not yet shared.
    let s = unsafe { &*p };
    super::kmalloc::create_kmalloc_caches(s);
    crate::hooks::point(crate::hooks::Point::SlabStateBuild);
    // AcqRel: the Release publishes the filled tables (pairs with the Acquire loads in `state` and
    // `state_if_init`); the Acquire on failure reads the winner's.
    match STATE.compare_exchange(core::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(s),
        Err(winner) => {
            // SAFETY: ours was never published: read its tables out and unmap both mappings.
            unsafe {
                let ours = p.read();
                ours.slab.unmap();
                crate::sys::munmap(meta, ours.len);
                Some(&*winner)
            }
        }
    }
}

impl SlabState {
    /// The cache with id `id`.
    #[inline(always)]
    pub(crate) fn cache(&self, id: u16) -> &CacheInner {
        self.slab.cache(id)
    }

    /// Cache ids used so far (an upper bound for scans).
    #[inline]
    pub(crate) fn cache_count(&self) -> u16 {
        self.slab.next_cache.load(Ordering::Acquire).min(MAX_CACHES as u32) as u16
    }

    /// Whether kmalloc debug mode is on.
    #[inline]
    pub fn kmalloc_debug(&self) -> bool {
        self.slow_flags.load(Ordering::Relaxed) & SLOW_DEBUG != 0
    }

    /// Whether fault injection may be on for some cache.
    #[inline(always)]
    pub fn fault_active(&self) -> bool {
        self.slow_flags.load(Ordering::Relaxed) & SLOW_FAULT != 0
    }
}
