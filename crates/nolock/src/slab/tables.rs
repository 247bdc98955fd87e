//! The slab layer's tables: the cache table (one [`CacheInner`] per cache id) and the per-thread table (one
//! [`ThreadCaches`] per thread slot), in one mapping this layer makes and owns.
//!
//! The global state holds a [`SlabTables`] without looking inside: it asks for one when it is built
//! ([`SlabTables::map`], then [`SlabTables::create_kmalloc_caches`] before it publishes itself) and gives it
//! back if it loses the race to publish ([`SlabTables::unmap`]). Everything else is reached through the
//! accessors this file adds to [`Global`] (`g.cache(id)`, `g.cache_count()`) and through
//! [`SlabTables::thread`], which indexes the per-thread table by the thread slot of `crate::thread`.
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
use core::sync::atomic::{AtomicU32, Ordering};

use super::cache::{CacheInner, MAX_CACHES};
use super::thread_cache::ThreadCaches;
use crate::global::Global;
use crate::page::MapError;
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

/// The slab layer's tables (see the module documentation). The global state holds one; only this layer looks
/// inside.
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

    /// Unmap tables that were never shared (the global state that held them lost the race to be published).
    ///
    /// # Safety
    /// Nothing refers to the tables.
    pub(crate) unsafe fn unmap(self) {
        // SAFETY: our own mapping of `LAYOUT.total` bytes, unused (caller).
        unsafe { crate::sys::munmap(self.caches.as_ptr().cast(), LAYOUT.total) };
    }

    /// Create the kmalloc caches in fresh tables, before the global state that holds them is published.
    ///
    /// # Context
    /// Any context (plain stores into fresh memory).
    pub(crate) fn create_kmalloc_caches(g: &Global) {
        super::kmalloc::create_kmalloc_caches(g);
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

/// The slab layer's accessors on the global state (an inherent `impl` may sit in any module of the crate;
/// `global` itself knows nothing of caches).
impl Global {
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
}
