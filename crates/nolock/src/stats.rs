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

// ---------------------------------------------------------------------------------------------------------------
// JSON export: `Snapshot::to_json` (no dependency), and `serde::Serialize` behind the `serde` feature
// ---------------------------------------------------------------------------------------------------------------

/// A value that writes itself as JSON.
trait JsonValue {
    fn write_json(&self, w: &mut dyn core::fmt::Write) -> core::fmt::Result;
}

macro_rules! json_number {
    ($($t:ty),*) => {$(
        impl JsonValue for $t {
            fn write_json(&self, w: &mut dyn core::fmt::Write) -> core::fmt::Result {
                write!(w, "{self}")
            }
        }
    )*};
}
json_number!(u64, usize, bool);

impl<T: JsonValue> JsonValue for Option<T> {
    fn write_json(&self, w: &mut dyn core::fmt::Write) -> core::fmt::Result {
        match self {
            Some(v) => v.write_json(w),
            None => w.write_str("null"),
        }
    }
}

impl<T: JsonValue> JsonValue for Vec<T> {
    fn write_json(&self, w: &mut dyn core::fmt::Write) -> core::fmt::Result {
        w.write_char('[')?;
        for (i, v) in self.iter().enumerate() {
            if i > 0 {
                w.write_char(',')?;
            }
            v.write_json(w)?;
        }
        w.write_char(']')
    }
}

/// A JSON string literal: quotes, backslashes and control characters escaped.
fn write_json_str(w: &mut dyn core::fmt::Write, s: &str) -> core::fmt::Result {
    w.write_char('"')?;
    for c in s.chars() {
        match c {
            '"' => w.write_str("\\\"")?,
            '\\' => w.write_str("\\\\")?,
            '\n' => w.write_str("\\n")?,
            '\r' => w.write_str("\\r")?,
            '\t' => w.write_str("\\t")?,
            c if (c as u32) < 0x20 => write!(w, "\\u{:04x}", c as u32)?,
            c => w.write_char(c)?,
        }
    }
    w.write_char('"')
}

impl JsonValue for crate::CacheName {
    fn write_json(&self, w: &mut dyn core::fmt::Write) -> core::fmt::Result {
        write_json_str(w, self.as_str())
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for crate::CacheName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// JSON (and, with the `serde` feature, `Serialize`) for a statistics struct, field by field. The pattern names
/// every field without `..`, so a field added to the struct is a compile error here until it is exported too.
macro_rules! json_struct {
    ($ty:ident { $($f:ident),* $(,)? }) => {
        impl JsonValue for $ty {
            fn write_json(&self, w: &mut dyn core::fmt::Write) -> core::fmt::Result {
                let $ty { $($f),* } = self;
                w.write_char('{')?;
                let mut _first = true;
                $(
                    if !_first {
                        w.write_char(',')?;
                    }
                    _first = false;
                    write_json_str(w, stringify!($f))?;
                    w.write_char(':')?;
                    $f.write_json(w)?;
                )*
                w.write_char('}')
            }
        }

        #[cfg(feature = "serde")]
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeStruct as _;
                let $ty { $($f),* } = self;
                let mut st = s.serialize_struct(stringify!($ty), [$(stringify!($f)),*].len())?;
                $( st.serialize_field(stringify!($f), $f)?; )*
                st.end()
            }
        }
    };
}

json_struct!(CacheStats {
    name,
    object_size,
    slab_pages,
    objects_per_slab,
    debug,
    allocs,
    frees,
    alloc_fast,
    alloc_refill,
    shared_allocs,
    free_fast,
    flushes,
    deferred_frees,
    shared_frees,
    next_bucket,
    remote_frees,
    failures,
    injected_failures,
    bad_frees,
    debug_errors,
    slabs,
    slabs_allocated,
    slabs_freed,
    cached_objects,
    fallback_allocs,
    pending_slabs,
});
json_struct!(LargeStats { allocs, frees, failures, pages });
json_struct!(PageStats {
    arena_pages,
    used_pages,
    active_pages,
    dirty_free_pages,
    purged_pages,
    allocs,
    frees,
    failures,
    committed_pages,
    max_align,
});
json_struct!(Snapshot { caches, large, pages, resident_bytes, reports });

impl Snapshot {
    /// The snapshot as one JSON object: `{"caches":[{"name":"kmalloc-8",...},...],"large":{...},"pages":{...},
    /// "resident_bytes":N|null,"reports":N}`, field names as in the structs. With the `serde` feature the same
    /// structure is also available through `serde::Serialize` (e.g. `serde_json::to_string(&snapshot)`).
    ///
    /// # Context
    /// Any context where the result may be allocated with the global allocator (it builds a `String`).
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(256 + 700 * self.caches.len());
        let _ = self.write_json(&mut s);
        s
    }

    /// Write the snapshot as JSON into `w` (the text of [`to_json`](Self::to_json)).
    ///
    /// # Context
    /// Any context, if `w` is (a `StackBuf`-like writer needs no allocation).
    pub fn write_json(&self, w: &mut dyn core::fmt::Write) -> core::fmt::Result {
        JsonValue::write_json(self, w)
    }
}
