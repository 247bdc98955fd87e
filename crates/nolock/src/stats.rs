//! Process-wide statistics: every cache, large allocations, pages, resident memory.

use crate::page::PageStats;
use crate::slab::cache::{self, CacheStats};
use crate::slab::kmalloc::{self, LargeStats};

/// A snapshot of nolock's counters.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Snapshot {
    /// Every live cache, kmalloc classes first.
    pub caches: Vec<CacheStats>,
    /// Allocations above the largest size class.
    pub large: LargeStats,
    /// The page allocator.
    pub pages: PageStats,
    /// Resident set size of the process (from `/proc/self/statm`), if available.
    pub resident_bytes: Option<usize>,
    /// Problems reported so far (refused frees, debug findings).
    pub reports: u64,
}

impl Snapshot {
    /// Sum over all caches.
    ///
    /// # Context
    /// Any context (sums a vector that is already there).
    pub fn total(&self) -> CacheStats {
        let mut t = CacheStats::default();
        for c in &self.caches {
            t.add(c);
        }
        t
    }

    /// The counters of the cache named `name`.
    pub fn cache(&self, name: &str) -> Option<&CacheStats> {
        self.caches.iter().find(|c| c.name.as_str() == name)
    }
}

/// Take a snapshot of all counters.
///
/// # Context
/// Normal context: allocates the result with the global allocator and reads `/proc`.
pub fn snapshot() -> Snapshot {
    let Some(g) = crate::slab::tables::state() else {
        return Snapshot::default();
    };
    let mut caches = Vec::new();
    cache::for_each_cache(g, |c| caches.push(c.stats(g)));
    Snapshot {
        caches,
        large: kmalloc::large_stats(),
        pages: g.pages.stats(),
        resident_bytes: crate::sys::resident_bytes(),
        reports: crate::slab::debug::reports(),
    }
}

/// Resident set size of this process in bytes (`/proc/self/statm`).
///
/// # Context
/// Normal context: opens and reads a file.
pub fn resident_bytes() -> Option<usize> {
    crate::sys::resident_bytes()
}

/// Pages allocated in the page allocator's bitmap right now, counted bit by bit (for accounting checks).
///
/// # Context
/// Any context; O(arena in use).
pub fn allocated_pages() -> usize {
    crate::global::get_if_init().map_or(0, |g| g.pages.count_allocated())
}

/// Whether `ptr` lies inside nolock's arena (always false before nolock is initialised): how an allocator that
/// shares a process with another one (the C library's `free` under `LD_PRELOAD`) tells its own pointers from
/// foreign ones, in O(1) (one load and a compare).
#[inline]
pub fn in_arena(ptr: *const u8) -> bool {
    crate::global::get_if_init().is_some_and(|g| g.pages.contains(ptr as usize))
}

/// What the page under an address currently belongs to (for tests and diagnostics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageOwner {
    /// Not inside nolock's arena.
    Foreign,
    /// A free page (given back to the page allocator).
    Free,
    /// A slab of the named cache (including a dead slab of a type-safe cache waiting for its grace period).
    Slab(crate::CacheName),
    /// The first page of a large `kmalloc_nolock` allocation.
    Large,
    /// The first page of an `alloc_pages_nolock` run.
    Pages,
}

/// What the page under `ptr` belongs to right now.
///
/// # Context
/// Any context (two loads).
pub fn page_owner(ptr: *const u8) -> PageOwner {
    use crate::page::desc::Kind;
    let Some(g) = crate::global::get_if_init() else { return PageOwner::Foreign };
    let addr = ptr as usize;
    if !g.pages.contains(addr) {
        return PageOwner::Foreign;
    }
    let info = g.pages.info_of(addr);
    match info.kind() {
        Kind::Free => PageOwner::Free,
        // A slab page exists only once the slab layer's state does.
        Kind::Slab => PageOwner::Slab(
            crate::slab::tables::state_if_init()
                .map_or(crate::CacheName::new("?"), |s| s.cache(info.cache_id()).name()),
        ),
        Kind::Large => PageOwner::Large,
        Kind::Pages => PageOwner::Pages,
    }
}

/// Whether the calling thread has its own per-thread caches right now: whether it holds a thread slot
/// (`crate::thread`), which its first nolock call claims.
pub fn thread_has_shard() -> bool {
    crate::thread::has_slot()
}
