//! Process-wide statistics: every cache, large allocations, pages, resident memory.

use crate::page::PageStats;
use crate::slab::cache::{self, CacheStats};
use crate::slab::kmalloc::{self, LargeStats};

/// A snapshot of nolock's counters.
#[derive(Clone, Debug, Default)]
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
    let Some(g) = crate::global::get() else {
        return Snapshot::default();
    };
    let mut caches = Vec::new();
    cache::for_each_cache(g, |c| caches.push(c.stats(g)));
    Snapshot {
        caches,
        large: kmalloc::large_stats(),
        pages: g.pages.stats(),
        resident_bytes: crate::sys::resident_bytes(),
        reports: crate::debug::reports(),
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
