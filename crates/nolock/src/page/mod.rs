//! The page allocator: `alloc_pages_nolock` / `free_pages_nolock` over one reserved arena.
//!
//! # Design
//!
//! nolock reserves one contiguous range of virtual memory (the *arena*) at first use and never maps more; every
//! object nolock hands out lies inside it. The base of the arena is aligned to the arena's size rounded up to a
//! power of two (2 MiB if the address space cannot hold the slack that takes), so aligning a page *number* to
//! `2^k` pages aligns the address too: every alignment up to that is honoured, larger ones are refused.
//!
//! Allocation state is a bitmap, one bit per page (1 = allocated), in 64-bit words. A run of up to 64 pages is
//! claimed inside one word with a single CAS, so allocation and free are lock-free, reentrant from signal
//! handlers, and coalescing is automatic: a freed page is immediately part of any larger free run around it.
//! Runs longer than 64 pages claim whole words one by one and roll back if they lose a race.
//!
//! Searching is guided by a *summary* bitmap with one bit per word, set while the word may have a free page.
//! The invariant "a word with a free page has its summary bit set" is kept without locks: a free clears its
//! page bits and then sets the summary bit; an allocation that filled a word clears the summary bit and then
//! re-reads the word, setting the bit again if a free slipped in between (both RMWs are `AcqRel` on the summary
//! word, so whichever comes second sees the other's page-bit change). Only words below the *frontier* are in
//! use; when nothing fits below it, the frontier grows into never-touched address space.
//!
//! A second bitmap, *dirty*, has a bit set for a page whose contents may be non-zero (it was allocated and freed
//! since it was last purged). `ZERO` allocations clear only dirty pages; fresh and purged pages are known zero.
//!
//! # Reserved, committed, resident
//!
//! The arena and its metadata (bitmaps, descriptors) are reserved `PROT_NONE`: address space only, which
//! `mlockall(MCL_CURRENT | MCL_FUTURE)` — the usual first line of a real-time program — cannot fault in. A
//! prefix of it, always covering the frontier, is *committed* (made readable and writable with `mprotect`,
//! together with the metadata of those pages); the kernel still backs committed memory only on first touch.
//! If `MCL_FUTURE` is in effect when the arena is reserved (detected with a fresh one-page mapping that is
//! resident at once), the reservation is unlocked and every commit is `mlock`ed instead, so the memory
//! locked is what is committed, not the 16 GiB reserved.
//!
//! **By default the whole arena is committed at initialisation** (one `mprotect` per reservation, costing no
//! memory), so no allocation after the first makes a system call. Commits as the arena is used are for
//! `mlockall(MCL_FUTURE)` (always: committing all of it would lock all of it) and for whoever asks
//! ([`crate::Config::lazy_commit`], `NOLOCK_COMMIT=lazy`). Then:
//!
//! Commits grow the committed prefix by a chunk ahead of need (an eighth of what is committed, 4 to 64 MiB).
//! They are made ahead of need from normal contexts: the background worker keeps a chunk committed beyond
//! the frontier, [`crate::prefault`] and [`crate::Config::prefault`] commit (and fault in) what they are asked
//! for. Only when that reserve is used up does an allocation commit itself, in the frontier growth of its slow
//! path: that `mprotect` (plus `mlock` under `MCL_FUTURE`) is the one system call a `*_nolock` allocation may
//! make after initialisation. It never waits for user space, but it takes the kernel's `mmap` lock and may
//! sleep briefly on it. If the kernel refuses the commit, the growth fails like an exhausted arena.
//!
//! The descriptor table is an exception: all of it is readable from the start (`PROT_READ`, which commits
//! nothing: reads map the kernel's shared zero page), so that checking an arbitrary pointer into the arena
//! (`kfree_nolock` of a bad pointer, `ksize`) reads a zero, "free", descriptor instead of faulting; and the
//! free fast path's "is it in the arena?" stays one comparison with a plain field.
//!
//! # Returning memory to the OS (off the nolock path)
//!
//! `PageAllocator::purge` runs in the background worker or in [`crate::trim`], never on a `*_nolock` path. It
//! *claims* free dirty pages in the bitmap exactly as an allocation would (so no allocation can hand them out
//! while their contents are being dropped), calls `madvise(MADV_DONTNEED)`, clears their dirty bits and frees
//! them again. With aging on, a page is purged only if it was free and dirty at the previous pass as well, so
//! memory that is reused quickly is not thrown away and faulted back in; `PageAllocator::purge_some` stops
//! after a number of pages (the background worker's decay decides how many: pages freed at one moment go
//! back gradually over the decay time, see `crate::background`), starting from the top of the active region.
//! Locked memory (commits under
//! `MCL_FUTURE`, or after `mlockall(MCL_CURRENT)`) cannot be purged; the purger stops at the first refusal.
//! The periodic purge can be turned off ([`crate::Config::purge_interval`], `NOLOCK_PURGE=never`) and its decay
//! set ([`crate::Config::purge_decay`], `NOLOCK_PURGE_DECAY_MS`).
//!
//! # Contract of `alloc_pages_nolock`
//!
//! Never blocks on user space, never allocates: bounded work over atomics, plus the commit described above
//! when the committed reserve runs out. It fails only when no free run of the requested shape exists in the
//! arena (or the kernel refuses to commit more). The purger, and the fallback of [`prefault`](crate::prefault)
//! on kernels without `MADV_POPULATE_WRITE`, hold at most one word's worth of pages (up to 64) for the length
//! of one system call or one word's page touches, which is the only way a racing allocation can miss pages
//! that are free.

pub(crate) mod desc;

use core::ptr::NonNull;

use crate::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use crate::sync::page_bitmap;
use crate::sys::{PAGE_SHIFT, PAGE_SIZE};
use core::sync::atomic::{AtomicBool, AtomicI32};
use desc::{Info, Kind, PageDesc};

/// Pages per bitmap word.
const WORD_PAGES: usize = 64;
/// Bytes of arena per bitmap word (256 KiB).
const WORD_BYTES: usize = WORD_PAGES * PAGE_SIZE;
/// Words added to the active region when the frontier grows (4 MiB of address space); also the smallest commit.
const GROW_WORDS: usize = 16;
/// Largest commit chunk beyond need, in words (64 MiB).
const MAX_COMMIT_AHEAD_WORDS: usize = 256;
/// Smallest alignment of the arena's base (a transparent huge page; slabs are at most 128 KiB).
const MIN_ARENA_ALIGN: usize = 2 << 20;
/// Largest arena: page numbers must stay below 2^31 (descriptors and slab lists keep them in 32 bits).
pub const MAX_ARENA_SIZE: usize = 8 << 40;
/// Smallest arena: one bitmap word.
pub const MIN_ARENA_SIZE: usize = WORD_BYTES;

/// Allocation flags (the userspace `gfp_t`). Combine with `|`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Gfp(u32);

impl Gfp {
    /// No flags.
    pub const NONE: Gfp = Gfp(0);
    /// Return zeroed memory (`__GFP_ZERO`).
    pub const ZERO: Gfp = Gfp(1);

    /// Whether every flag in `other` is set.
    #[inline]
    pub const fn contains(self, other: Gfp) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl core::ops::BitOr for Gfp {
    type Output = Gfp;
    fn bitor(self, rhs: Gfp) -> Gfp {
        Gfp(self.0 | rhs.0)
    }
}

impl core::ops::BitOrAssign for Gfp {
    fn bitor_assign(&mut self, rhs: Gfp) {
        self.0 |= rhs.0;
    }
}

/// Counters of the page allocator (a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PageStats {
    /// Size of the arena in pages.
    pub arena_pages: usize,
    /// Pages allocated right now (slabs, large objects, page runs).
    pub used_pages: usize,
    /// Pages below the frontier (the part of the arena ever used).
    pub active_pages: usize,
    /// Free pages whose contents may still be resident (candidates for purging).
    pub dirty_free_pages: usize,
    /// Pages given back to the OS so far.
    pub purged_pages: u64,
    /// Successful run allocations.
    pub allocs: u64,
    /// Run frees.
    pub frees: u64,
    /// Allocations that failed because no free run of the requested shape existed.
    pub failures: u64,
    /// Pages of the arena committed (readable and writable, not necessarily resident). Under
    /// `mlockall(MCL_FUTURE)` they are also locked, hence resident.
    pub committed_pages: usize,
    /// Largest alignment (bytes) the arena can honour: its base's alignment, capped at its size.
    pub max_align: usize,
}

/// Why the arena could not be reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MapError {
    /// What was being reserved.
    pub what: &'static str,
    /// How many bytes of address space.
    pub bytes: usize,
    /// The `errno` of the failed `mmap`.
    pub errno: i32,
}

/// Why [`crate::prefault`] did not fault in everything asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefaultError {
    /// nolock could not be initialised (its arena could not be reserved; a message was printed).
    Unavailable,
    /// The arena has less room than asked for; all of it was prefaulted. `bytes` is how much that is beyond
    /// the pages in use.
    ArenaTooSmall {
        /// Bytes prefaulted beyond the frontier of pages in use.
        bytes: usize,
    },
    /// The kernel refused to commit or fault in the memory (`errno`; for example `ENOMEM`/`EAGAIN` over
    /// `RLIMIT_MEMLOCK` under `mlockall`).
    Kernel {
        /// The `errno` of the failed system call.
        errno: i32,
    },
}

impl core::fmt::Display for PrefaultError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PrefaultError::Unavailable => f.write_str("nolock could not reserve its arena"),
            PrefaultError::ArenaTooSmall { bytes } => {
                write!(f, "the arena has room for only {bytes} more bytes (all prefaulted); see NOLOCK_ARENA_SIZE")
            }
            PrefaultError::Kernel { errno } => write!(f, "the kernel refused to commit memory (errno {errno})"),
        }
    }
}

impl std::error::Error for PrefaultError {}

/// The arena's read-only geometry that maps an address to its page descriptor: a copy that the layer above keeps
/// beside its own hot state, so that a free finds a pointer's descriptor without first loading where the page
/// allocator is (one dependent load fewer on every free).
#[derive(Clone, Copy)]
pub(crate) struct ArenaView {
    base: usize,
    size: usize,
    descs: *const PageDesc,
}

// SAFETY: immutable copies of the page allocator's fields; `descs` points into a mapping that lives for the rest
// of the process and is only accessed atomically.
unsafe impl Send for ArenaView {}
// SAFETY: see above.
unsafe impl Sync for ArenaView {}

impl ArenaView {
    /// Whether `addr` is inside the arena (as [`PageAllocator::contains`]).
    #[inline(always)]
    pub fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.base) < self.size
    }

    /// The descriptor information of the page under `addr`, which must be inside the arena (as
    /// [`PageAllocator::info_of`]).
    #[inline(always)]
    pub fn info_of(&self, addr: usize) -> Info {
        // SAFETY: `addr` is inside the arena (caller), so its page has a descriptor; they live for the process.
        unsafe { &*self.descs.add((addr - self.base) >> PAGE_SHIFT) }.info()
    }

    /// Address of page `page`.
    #[inline(always)]
    pub fn page_addr(&self, page: usize) -> usize {
        self.base + (page << PAGE_SHIFT)
    }
}

/// The arena and its bitmaps. One instance lives in the global state; see the module documentation.
pub(crate) struct PageAllocator {
    base: usize,
    /// Arena size in bytes (`npages << PAGE_SHIFT`).
    size: usize,
    npages: usize,
    nwords: usize,
    /// Alignment of `base` (a power of two, at least 2 MiB).
    base_align: usize,
    /// The metadata reservation and where its parts are.
    meta: usize,
    layout: MetaLayout,
    /// Words of the arena (with their metadata) committed: `[0, committed)` is readable and writable.
    committed: AtomicUsize,
    /// `MCL_FUTURE` was in effect at reservation: every commit is `mlock`ed, and purging is pointless.
    lock_commits: AtomicBool,
    /// `errno` of the last failed commit (0: none failed).
    commit_errno: AtomicI32,
    alloc: *const AtomicU64,
    dirty: *const AtomicU64,
    aged: *const AtomicU64,
    summary: *const AtomicU64,
    descs: *const PageDesc,
    /// Words in the active region.
    frontier: AtomicUsize,
    /// Next-fit hint: the word where the last allocation succeeded.
    cursor: AtomicUsize,
    used_pages: AtomicUsize,
    purged_pages: AtomicU64,
    allocs: AtomicU64,
    frees: AtomicU64,
    failures: AtomicU64,
}

// SAFETY: every field is either immutable after construction or atomic; the raw pointers point into mappings
// that live for the rest of the process and are only accessed atomically.
unsafe impl Send for PageAllocator {}
// SAFETY: see above.
unsafe impl Sync for PageAllocator {}

/// Bytes of metadata needed for an arena of `npages` pages, and the offsets of its parts (each page aligned).
#[derive(Clone, Copy, Debug)]
struct MetaLayout {
    alloc: usize,
    dirty: usize,
    aged: usize,
    summary: usize,
    descs: usize,
    total: usize,
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl MetaLayout {
    fn new(npages: usize) -> Self {
        let nwords = npages / WORD_PAGES;
        let bitmap = round_up(nwords * 8, PAGE_SIZE);
        let summary = round_up(nwords.div_ceil(64) * 8, PAGE_SIZE);
        let alloc = 0;
        let dirty = alloc + bitmap;
        let aged = dirty + bitmap;
        let summary_off = aged + bitmap;
        let descs = summary_off + summary;
        let total = descs + round_up(npages * core::mem::size_of::<PageDesc>(), PAGE_SIZE);
        Self { alloc, dirty, aged, summary: summary_off, descs, total }
    }
}

/// A run found by the search: first page and the word(s) claimed.
#[derive(Clone, Copy, Debug)]
struct Claim {
    first_page: usize,
}

/// Reserve `len` bytes of `PROT_NONE` address space aligned to `align` (a power of two above the page size):
/// over-reserve by the alignment and unmap the slack at both ends. Returns the base or the `errno`.
fn reserve_aligned(len: usize, align: usize) -> Result<usize, i32> {
    let total = len.checked_add(align - PAGE_SIZE).ok_or(libc::ENOMEM)?;
    let raw = crate::sys::mmap_none(total)? as usize;
    let base = round_up(raw, align);
    let (head, tail) = (base - raw, raw + total - (base + len));
    // SAFETY: both slack ranges are page aligned parts of the reservation just made, which nothing uses.
    unsafe {
        if head > 0 {
            crate::sys::munmap(raw as *mut u8, head);
        }
        if tail > 0 {
            crate::sys::munmap((base + len) as *mut u8, tail);
        }
    }
    Ok(base)
}

impl PageAllocator {
    /// Reserve an arena of `arena_bytes` (rounded down to a multiple of 256 KiB, at least 256 KiB, at most
    /// [`MAX_ARENA_SIZE`]) and its metadata, both `PROT_NONE`; nothing is committed yet (see the module
    /// documentation). Returns what failed when the kernel refuses a reservation.
    ///
    /// Async-signal-safe (a few `mmap`/`munmap`/`mincore` calls), so the very first allocation may come from
    /// a handler.
    pub fn map(arena_bytes: usize) -> Result<Self, MapError> {
        let arena_bytes = (arena_bytes.min(MAX_ARENA_SIZE) / WORD_BYTES).max(1) * WORD_BYTES;
        let npages = arena_bytes / PAGE_SIZE;
        let nwords = npages / WORD_PAGES;
        let layout = MetaLayout::new(npages);
        // Aligning the base to the arena's size makes every alignment up to the arena's size a page-number
        // alignment. That costs as much address space again, for a moment; where there is not that much (a
        // `ulimit -v`), fall back to 2 MiB.
        let want = arena_bytes.next_power_of_two().max(MIN_ARENA_ALIGN);
        let (base, base_align) = match reserve_aligned(arena_bytes, want) {
            Ok(b) => (b, want),
            Err(_) if want > MIN_ARENA_ALIGN => match reserve_aligned(arena_bytes, MIN_ARENA_ALIGN) {
                Ok(b) => (b, MIN_ARENA_ALIGN),
                Err(errno) => return Err(MapError { what: "arena", bytes: arena_bytes, errno }),
            },
            Err(errno) => return Err(MapError { what: "arena", bytes: arena_bytes, errno }),
        };
        let meta = match crate::sys::mmap_none(layout.total) {
            Ok(m) => m as usize,
            Err(errno) => {
                // SAFETY: the arena was just reserved by us and nothing refers to it.
                unsafe { crate::sys::munmap(base as *mut u8, arena_bytes) };
                return Err(MapError { what: "page descriptors", bytes: layout.total, errno });
            }
        };
        let lock_commits = crate::sys::mcl_future_in_effect();
        if lock_commits {
            // MCL_FUTURE marked both reservations locked: nothing is resident (PROT_NONE), but the kernel would
            // count all of it as locked memory. Unlock them; commits are locked one by one instead.
            // SAFETY: our own fresh reservations.
            unsafe {
                crate::sys::munlock(base as *mut u8, arena_bytes);
                crate::sys::munlock(meta as *mut u8, layout.total);
            }
        }
        // The descriptor table is readable everywhere (module documentation). Unlocked first (above), so this
        // faults nothing in.
        let descs = (meta + layout.descs) as *mut u8;
        // SAFETY: the descriptor part of our fresh metadata reservation, page aligned, used by nothing yet.
        let readable = unsafe { crate::sys::mprotect_read(descs, layout.total - layout.descs) };
        if let Err(errno) = readable {
            // SAFETY: both reservations are ours and unused.
            unsafe {
                crate::sys::munmap(meta as *mut u8, layout.total);
                crate::sys::munmap(base as *mut u8, arena_bytes);
            }
            return Err(MapError { what: "page descriptors", bytes: layout.total, errno });
        }
        let at = |off: usize| (meta + off) as *const AtomicU64;
        Ok(Self {
            base,
            size: npages << PAGE_SHIFT,
            npages,
            nwords,
            base_align,
            meta,
            layout,
            committed: AtomicUsize::new(0),
            lock_commits: AtomicBool::new(lock_commits),
            commit_errno: AtomicI32::new(0),
            alloc: at(layout.alloc),
            dirty: at(layout.dirty),
            aged: at(layout.aged),
            summary: at(layout.summary),
            descs: (meta + layout.descs) as *const PageDesc,
            frontier: AtomicUsize::new(0),
            cursor: AtomicUsize::new(0),
            used_pages: AtomicUsize::new(0),
            purged_pages: AtomicU64::new(0),
            allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        })
    }

    /// Unmap a `PageAllocator` that lost the race to become the global one (nothing was ever allocated from it).
    ///
    /// # Safety
    /// `self` must never have been shared.
    pub unsafe fn unmap(self) {
        // SAFETY: both reservations were made by `map` for this instance (the arena exactly `[base, base +
        // size)` after trimming) and nothing else refers to them (caller).
        unsafe {
            crate::sys::munmap(self.meta as *mut u8, self.layout.total);
            crate::sys::munmap(self.base as *mut u8, self.size);
        }
    }

    /// Whether commits are `mlock`ed (`MCL_FUTURE` was in effect when the arena was reserved).
    pub fn locks_commits(&self) -> bool {
        self.lock_commits.load(Ordering::Relaxed)
    }

    /// In a child of `fork`: memory locks and `MCL_FUTURE` are not inherited, so stop locking commits (and
    /// let the purger work again).
    pub fn after_fork_child(&self) {
        self.lock_commits.store(false, Ordering::Relaxed);
    }

    /// Largest alignment (bytes) an allocation from this arena can have.
    #[inline]
    pub fn max_align(&self) -> usize {
        self.base_align.min(self.size.next_power_of_two())
    }

    /// Size of the arena in bytes.
    #[inline]
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether `addr` is inside the arena (committed or not: every descriptor can be read).
    #[inline]
    pub fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.base) < self.size()
    }

    /// Page number of an address inside the arena.
    #[inline]
    pub fn page_of(&self, addr: usize) -> usize {
        (addr - self.base) >> PAGE_SHIFT
    }

    /// Address of page `page`.
    #[inline]
    pub fn page_addr(&self, page: usize) -> usize {
        self.base + (page << PAGE_SHIFT)
    }

    /// Descriptor of page `page` (which must be below the arena size).
    #[inline]
    pub fn desc(&self, page: usize) -> &PageDesc {
        debug_assert!(page < self.npages);
        // SAFETY: `descs` points at `npages` descriptors that live as long as `self`; zeroed memory is valid.
        unsafe { &*self.descs.add(page) }
    }

    #[inline]
    fn word(&self, bitmap: *const AtomicU64, w: usize) -> &AtomicU64 {
        debug_assert!(w < self.nwords);
        // SAFETY: every bitmap has `nwords` words living as long as `self`.
        unsafe { &*bitmap.add(w) }
    }

    #[inline]
    fn summary_word(&self, s: usize) -> &AtomicU64 {
        // SAFETY: the summary has nwords.div_ceil(64) words living as long as `self`.
        unsafe { &*self.summary.add(s) }
    }

    // ---------------------------------------------------------------------------------------------------------
    // Allocation
    // ---------------------------------------------------------------------------------------------------------

    /// Allocate a run of `npages` pages whose first page number is a multiple of `align` (a power of two).
    /// Returns the first page number. Lock-free; any context.
    pub fn alloc_run(&self, npages: usize, align: usize) -> Option<usize> {
        debug_assert!(align.is_power_of_two() && npages > 0);
        if npages > self.npages {
            self.failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        crate::hooks::point(crate::hooks::Point::PageAlloc);
        let claim = if npages <= WORD_PAGES && align <= WORD_PAGES {
            self.alloc_small(npages, align)
        } else {
            self.alloc_large(npages, align)
        };
        match claim {
            Some(c) => {
                self.used_pages.fetch_add(npages, Ordering::Relaxed);
                self.allocs.fetch_add(1, Ordering::Relaxed);
                Some(c.first_page)
            }
            None => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Mask of the bit positions (multiples of `align`) where a free run of `n` bits starts in `word`.
    #[inline]
    fn fit_mask(word: u64, n: usize, align: usize) -> u64 {
        let mut free = !word;
        let mut len = 1;
        while len * 2 <= n {
            free &= free >> len;
            len *= 2;
        }
        if len < n {
            free &= free >> (n - len);
        }
        // Runs that would cross the end of the word: the shifts moved zeros in from the top, so a start bit is
        // only set if all of its `n` bits are inside the word and free.
        free & align_mask(align)
    }

    fn alloc_small(&self, n: usize, align: usize) -> Option<Claim> {
        loop {
            // Acquire: pairs with the AcqRel CAS in `grow`: the words below the frontier are committed and listed.
            let frontier = self.frontier.load(Ordering::Acquire);
            let start = self.cursor.load(Ordering::Relaxed).min(frontier);
            if let Some(c) = self.search_summary(start, frontier, n, align) {
                return Some(c);
            }
            if start > 0
                && let Some(c) = self.search_summary(0, start, n, align)
            {
                return Some(c);
            }
            if !self.grow(frontier, GROW_WORDS) {
                // Nothing fits below the frontier and the arena is fully active. One last full pass covers runs
                // freed while we were searching.
                return self.search_summary(0, self.frontier.load(Ordering::Acquire), n, align);
            }
        }
    }

    /// Scan the words in `[from, to)` whose summary bit is set, claiming the first fit.
    fn search_summary(&self, from: usize, to: usize, n: usize, align: usize) -> Option<Claim> {
        let mut w = from;
        while w < to {
            let s = w / 64;
            // Acquire: pairs with the Release/AcqRel updates of the summary in `note_free`: a set bit means a word with room.
            let bits = self.summary_word(s).load(Ordering::Acquire) & (!0u64 << (w % 64));
            if bits == 0 {
                w = (s + 1) * 64;
                continue;
            }
            let cand = s * 64 + bits.trailing_zeros() as usize;
            if cand >= to {
                return None;
            }
            if let Some(c) = self.try_word(cand, n, align) {
                return Some(c);
            }
            w = cand + 1;
        }
        None
    }

    /// Try to claim a run of `n` pages inside word `w`.
    fn try_word(&self, w: usize, n: usize, align: usize) -> Option<Claim> {
        let word = self.word(self.alloc, w);
        let mut cur = word.load(Ordering::Relaxed);
        loop {
            let fits = Self::fit_mask(cur, n, align);
            if fits == 0 {
                return None;
            }
            let pos = fits.trailing_zeros() as usize;
            let run = run_mask(n) << pos;
            // Acquire: pairs with the Release clear in `free_run`; whatever the previous owner wrote (and the
            // dirty bit it set) happens before our use of the pages.
            match word.compare_exchange_weak(cur, cur | run, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => {
                    if cur | run == !0 {
                        self.note_full(w);
                    }
                    self.cursor.store(w, Ordering::Relaxed);
                    return Some(Claim { first_page: w * WORD_PAGES + pos });
                }
                Err(now) => cur = now,
            }
        }
    }

    /// Word `w` became full: clear its summary bit, then re-check (`sync::page_bitmap`, loom-checked).
    fn note_full(&self, w: usize) {
        page_bitmap::note_full(self.summary_word(w / 64), 1u64 << (w % 64), self.word(self.alloc, w));
    }

    /// Pages of word `w` were freed: set its summary bit (`sync::page_bitmap`).
    fn note_free(&self, w: usize) {
        page_bitmap::note_free(self.summary_word(w / 64), 1u64 << (w % 64));
    }

    /// Extend the active region from `seen` words by at least `words`; false when the arena is fully active
    /// (or the kernel refused to commit more of it).
    fn grow(&self, seen: usize, words: usize) -> bool {
        if seen >= self.nwords {
            return false;
        }
        let new = (seen + words).min(self.nwords);
        // The frontier never passes the committed prefix. Usually the commit was made ahead of need and this
        // is one load; otherwise this is the one system call an allocation may make (module documentation).
        if !self.commit_to(new) {
            return false;
        }
        // AcqRel: the winner publishes the new region; losers just retry their search with the new frontier.
        if self.frontier.compare_exchange(seen, new, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            for w in seen..new {
                self.note_free(w);
            }
        }
        true
    }

    // ---------------------------------------------------------------------------------------------------------
    // Commit (see "Reserved, committed, resident" in the module documentation)
    // ---------------------------------------------------------------------------------------------------------

    /// Words committed so far.
    #[inline]
    fn committed_words(&self) -> usize {
        // Acquire: pairs with the Release `fetch_max` in `commit_range`.
        self.committed.load(Ordering::Acquire)
    }

    /// Make words `[0, words)` of the arena and their metadata usable, committing a chunk beyond need (an
    /// eighth of what is committed, 4 to 64 MiB) so that commits stay rare. False if the kernel refused.
    ///
    /// # Context
    /// Any context. One load when `words` is committed already; otherwise `mprotect` calls (and `mlock` calls
    /// under `MCL_FUTURE`), which take the kernel's `mmap` lock.
    pub fn commit_to(&self, words: usize) -> bool {
        let cur = self.committed_words();
        if words <= cur {
            return true;
        }
        let ahead = (cur / 8).clamp(GROW_WORDS, MAX_COMMIT_AHEAD_WORDS);
        let target = round_up(words.max(cur + ahead), GROW_WORDS).min(self.nwords);
        self.commit_range(cur, target)
    }

    /// Commit the whole arena and its metadata (at initialisation, unless commits are locked or lazy commits
    /// were asked for): no later allocation then makes a system call. Costs no memory: pages are faulted in
    /// as they are touched. False if the kernel refused.
    ///
    /// # Context
    /// Any context in which the first nolock call may run (a few `mprotect` calls).
    pub fn commit_all(&self) -> bool {
        self.commit_range(self.committed_words(), self.nwords)
    }

    /// Keep a chunk committed beyond the frontier, so that the next growths of the frontier make no system
    /// call. Returns false if the kernel refused.
    ///
    /// # Context
    /// Normal context (the background worker): may call `mprotect`/`mlock`.
    pub fn commit_ahead(&self) -> bool {
        let frontier = self.frontier.load(Ordering::Acquire);
        let want = frontier + 2 * GROW_WORDS;
        if want <= self.committed_words() {
            return true;
        }
        self.commit_to(want.min(self.nwords))
    }

    /// The parts of the reservation that hold words `[from, to)`: `(start, from_byte, to_byte)` for the arena
    /// and each metadata array.
    fn parts(&self, from: usize, to: usize) -> [(usize, usize, usize); 6] {
        let l = &self.layout;
        let desc = WORD_PAGES * core::mem::size_of::<PageDesc>();
        [
            (self.base, from * WORD_BYTES, to * WORD_BYTES),
            (self.meta + l.alloc, from * 8, to * 8),
            (self.meta + l.dirty, from * 8, to * 8),
            (self.meta + l.aged, from * 8, to * 8),
            (self.meta + l.summary, from.div_ceil(64) * 8, to.div_ceil(64) * 8),
            (self.meta + l.descs, from * desc, to * desc),
        ]
    }

    /// Commit words `[from, to)` (`from` is a committed-words value some thread read, so everything below it
    /// is committed). Concurrent commits of overlapping ranges are harmless: making memory readable and
    /// writable (or locking it) twice changes nothing.
    fn commit_range(&self, from: usize, to: usize) -> bool {
        let _errno = crate::sys::ErrnoGuard::save();
        let lock = self.lock_commits.load(Ordering::Relaxed);
        for (start, a, b) in self.parts(from, to) {
            // Pages below round_up(a) are committed already (they hold the bytes below `a`).
            let (lo, hi) = (round_up(a, PAGE_SIZE), round_up(b, PAGE_SIZE));
            if hi <= lo {
                continue;
            }
            let p = (start + lo) as *mut u8;
            // SAFETY: `[start + lo, start + hi)` is page aligned and inside one of our reservations (the arena
            // or its metadata, both sized for `nwords` words).
            let r = unsafe { crate::sys::mprotect_rw(p, hi - lo) }
                // SAFETY: as above; the range is now readable and writable.
                .and_then(|()| if lock { unsafe { crate::sys::mlock(p, hi - lo) } } else { Ok(()) });
            if let Err(e) = r {
                self.commit_errno.store(e, Ordering::Relaxed);
                return false;
            }
        }
        crate::hooks::point(crate::hooks::Point::PageCommit);
        // Release: pairs with the Acquire in `committed_words`; whoever sees the new value may use the memory.
        self.committed.fetch_max(to, Ordering::Release);
        true
    }

    /// Commit and fault in the pages in use and `bytes` beyond them (up to the end of the arena), with their
    /// metadata, so that allocations of up to about `bytes` make no page fault and no system call (until the
    /// purger gives pages back). See [`crate::prefault`].
    ///
    /// # Context
    /// Normal context: system calls that can take long (zero-filling every page they fault in).
    pub fn prefault(&self, bytes: usize) -> Result<(), PrefaultError> {
        let frontier = self.frontier.load(Ordering::Acquire);
        let want = frontier.saturating_add(bytes.div_ceil(WORD_BYTES));
        let target = want.min(self.nwords);
        if !self.commit_to(target) {
            return Err(PrefaultError::Kernel { errno: self.commit_errno.load(Ordering::Relaxed) });
        }
        let mut populated = true;
        for (start, _, b) in self.parts(0, target) {
            let len = round_up(b, PAGE_SIZE);
            // SAFETY: `[start, start + len)` is committed (readable and writable), page aligned, and part of
            // our private anonymous reservations; populating changes no contents.
            match unsafe { crate::sys::madvise_populate_write(start as *mut u8, len) } {
                Ok(()) => {}
                Err(libc::EINVAL) => {
                    populated = false;
                    break;
                }
                Err(errno) => return Err(PrefaultError::Kernel { errno }),
            }
        }
        if !populated {
            self.prefault_by_touch(target);
        }
        if want > target {
            return Err(PrefaultError::ArenaTooSmall { bytes: (target - frontier) * WORD_BYTES });
        }
        Ok(())
    }

    /// `prefault` on kernels without `MADV_POPULATE_WRITE` (before 5.14): fault the metadata in with atomic
    /// no-op writes, and the free arena pages by claiming them word by word (as the purger does), writing a
    /// zero byte into each (a free page's contents are either known zero or dirty, so a zero changes nothing
    /// that matters), and freeing them again. Pages in use are their owners' and are left alone.
    fn prefault_by_touch(&self, target: usize) {
        for (start, _, b) in self.parts(0, target).into_iter().skip(1) {
            let mut off = 0;
            while off < b {
                // SAFETY: every metadata array starts page aligned and is made of 8-byte atomics (bitmap words,
                // or descriptors that start with one), so the first 8 bytes of each committed page are an
                // atomic word; adding zero writes the page without changing it.
                unsafe { &*((start + off) as *const AtomicU64) }.fetch_or(0, Ordering::Relaxed);
                off += PAGE_SIZE;
            }
        }
        loop {
            // Acquire: as in `alloc_small`.
            let frontier = self.frontier.load(Ordering::Acquire);
            if frontier >= target || !self.grow(frontier, target - frontier) {
                break;
            }
        }
        // Acquire: as in `alloc_small`.
        let end = target.min(self.frontier.load(Ordering::Acquire));
        for w in 0..end {
            let alloc = self.word(self.alloc, w);
            let mut cur = alloc.load(Ordering::Relaxed);
            let claimed = loop {
                if cur == !0 {
                    break 0;
                }
                // Acquire: pairs with the Release in `free_run` (the pages' last writer is done).
                match alloc.compare_exchange_weak(cur, !0, Ordering::Acquire, Ordering::Relaxed) {
                    Ok(_) => break !cur,
                    Err(now) => cur = now,
                }
            };
            if claimed == 0 {
                continue;
            }
            let mut bits = claimed;
            while bits != 0 {
                let page = bits.trailing_zeros() as usize;
                // SAFETY: the page is claimed by us (allocated in the bitmap, owned by no one else) and
                // committed; see above for why writing a zero byte is harmless.
                unsafe { core::ptr::write_volatile(self.page_addr(w * WORD_PAGES + page) as *mut u8, 0) };
                bits &= bits - 1;
            }
            // Release: we wrote the pages; the next owner's Acquire claim orders its use after our writes.
            alloc.fetch_and(!claimed, Ordering::Release);
            self.note_free(w);
        }
    }

    /// Runs longer than one word (or aligned to more than one word): whole words, first fit.
    fn alloc_large(&self, n: usize, align: usize) -> Option<Claim> {
        let full_words = n / WORD_PAGES;
        let tail = n % WORD_PAGES;
        let span = full_words + usize::from(tail != 0);
        let step = (align / WORD_PAGES).max(1);
        loop {
            // Acquire: as in `alloc_small`.
            let frontier = self.frontier.load(Ordering::Acquire);
            let mut w = 0;
            while w + span <= frontier {
                match self.try_claim_words(w, full_words, tail) {
                    Ok(c) => return Some(c),
                    Err(skip_to) => w = round_up(skip_to.max(w + 1), step),
                }
            }
            // Grow by exactly what is missing past the last aligned start (or by the whole span).
            let need = round_up(frontier, step) + span - frontier;
            if !self.grow(frontier, need.max(GROW_WORDS)) {
                return None;
            }
        }
    }

    /// Claim words `w .. w + full` entirely and the low `tail` pages of the next. On a conflict, roll back and
    /// return the word to continue searching from.
    fn try_claim_words(&self, w: usize, full: usize, tail: usize) -> Result<Claim, usize> {
        let mut claimed = 0;
        let mut fail_at = None;
        for i in 0..full {
            // Acquire: as in `try_word`.
            if self.word(self.alloc, w + i).compare_exchange(0, !0, Ordering::Acquire, Ordering::Relaxed).is_err() {
                fail_at = Some(w + i + 1);
                break;
            }
            claimed += 1;
        }
        if fail_at.is_none() && tail > 0 {
            let word = self.word(self.alloc, w + full);
            let mask = run_mask(tail);
            let mut cur = word.load(Ordering::Relaxed);
            loop {
                if cur & mask != 0 {
                    fail_at = Some(w + full);
                    break;
                }
                // Acquire: pairs with the Release `fetch_and` of the run's last free: its contents are ours now.
                match word.compare_exchange_weak(cur, cur | mask, Ordering::Acquire, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
        }
        if let Some(skip) = fail_at {
            for i in 0..claimed {
                // Release: we never used these pages; nothing to publish, but keep frees uniformly Release.
                self.word(self.alloc, w + i).store(0, Ordering::Release);
            }
            return Err(skip);
        }
        for i in 0..full {
            self.note_full(w + i);
        }
        if tail > 0 && self.word(self.alloc, w + full).load(Ordering::Relaxed) == !0 {
            self.note_full(w + full);
        }
        Ok(Claim { first_page: w * WORD_PAGES })
    }

    // ---------------------------------------------------------------------------------------------------------
    // Free
    // ---------------------------------------------------------------------------------------------------------

    /// `alloc_pages_nolock` on this arena: a run of `2^order` pages (order ≤ `MAX_ORDER`, checked by the
    /// caller), marked as a pages run in its descriptor, zeroed with [`Gfp::ZERO`].
    pub fn alloc_pages(&self, order: u32, flags: Gfp) -> Option<NonNull<u8>> {
        let n = 1usize << order;
        let first = self.alloc_run(n, n.min(WORD_PAGES))?;
        let d = self.desc(first);
        d.npages.store(n as u64, Ordering::Relaxed);
        d.set_info(Info::new(Kind::Pages, 0, first as u32));
        if flags.contains(Gfp::ZERO) {
            // SAFETY: we own the run just claimed.
            unsafe { self.zero_dirty(first, n) };
        }
        NonNull::new(self.page_addr(first) as *mut u8)
    }

    /// `try_free_pages_nolock` on this arena: validate the pointer and the order, claim the run by flipping
    /// its descriptor (a racing double free loses there), free it.
    ///
    /// # Safety
    /// If the pointer passes the checks, the pages must not be used afterwards.
    pub unsafe fn try_free_pages(&self, ptr: NonNull<u8>, order: u32) -> Result<(), PagesError> {
        let addr = ptr.as_ptr() as usize;
        if !self.contains(addr) {
            return Err(PagesError::Foreign);
        }
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(PagesError::NotAllocated);
        }
        let page = self.page_of(addr);
        let d = self.desc(page);
        let info = d.info();
        if info.kind() != Kind::Pages || info.head() as usize != page {
            return Err(PagesError::NotAllocated);
        }
        let n = d.npages.load(Ordering::Relaxed) as usize;
        if n != 1usize << order.min(63) {
            return Err(PagesError::WrongOrder { allocated: n.trailing_zeros() });
        }
        // AcqRel: claim the right to free; Acquire pairs with the Release `set_info` of the allocation.
        let free = Info::new(Kind::Free, 0, 0).0;
        if d.info.compare_exchange(info.0, free, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(PagesError::NotAllocated);
        }
        // SAFETY: the run is ours (validated and claimed above) and the caller gives it up.
        unsafe { self.free_run(page, n) };
        Ok(())
    }

    /// Free the run of `npages` pages starting at page `first`. Lock-free; any context.
    ///
    /// # Safety
    /// The run must have been returned by [`alloc_run`](Self::alloc_run) (or be a part of one: a realloc frees
    /// the tail of a large run) and not be used afterwards.
    pub unsafe fn free_run(&self, first: usize, npages: usize) {
        crate::hooks::point(crate::hooks::Point::PageFree);
        self.for_each_word(first, npages, |w, mask| {
            // Relaxed: the Release clear below orders this store before the page bits become free.
            self.word(self.dirty, w).fetch_or(mask, Ordering::Relaxed);
            // Release: pairs with the Acquire claim in `try_word`/`try_claim_words`.
            self.word(self.alloc, w).fetch_and(!mask, Ordering::Release);
            self.note_free(w);
        });
        // Move the search cursor back to a run freed below it, so that the next allocations reuse these pages
        // (resident, dirty) before never-touched ones further up: otherwise a program whose slabs the worker
        // releases faults in fresh pages while the freed ones wait for the purge, and its peak RSS grows. (The
        // purge works from the top down.) A hint: a race with another thread's update only moves the cursor.
        let w = first / WORD_PAGES;
        if w < self.cursor.load(Ordering::Relaxed) {
            self.cursor.store(w, Ordering::Relaxed);
        }
        self.used_pages.fetch_sub(npages, Ordering::Relaxed);
        self.frees.fetch_add(1, Ordering::Relaxed);
    }

    /// Call `f(word, mask)` for every bitmap word the run `[first, first + npages)` touches.
    fn for_each_word(&self, first: usize, npages: usize, mut f: impl FnMut(usize, u64)) {
        let mut page = first;
        let end = first + npages;
        while page < end {
            let w = page / WORD_PAGES;
            let bit = page % WORD_PAGES;
            let n = (end - page).min(WORD_PAGES - bit);
            f(w, run_mask(n) << bit);
            page += n;
        }
    }

    /// Whether every page of the run is allocated in the bitmap (a sanity check for tests).
    #[cfg(test)]
    pub fn run_allocated(&self, first: usize, npages: usize) -> bool {
        if first + npages > self.npages {
            return false;
        }
        let mut ok = true;
        self.for_each_word(first, npages, |w, mask| {
            ok &= self.word(self.alloc, w).load(Ordering::Relaxed) & mask == mask;
        });
        ok
    }

    /// Zero the pages of a freshly claimed run that may hold old data.
    ///
    /// # Safety
    /// The caller owns the run.
    pub unsafe fn zero_dirty(&self, first: usize, npages: usize) {
        self.for_each_word(first, npages, |w, mask| {
            let dirty = self.word(self.dirty, w).load(Ordering::Relaxed) & mask;
            let mut bits = dirty;
            while bits != 0 {
                let start = bits.trailing_zeros() as usize;
                let len = (bits >> start).trailing_ones() as usize;
                let addr = self.page_addr(w * WORD_PAGES + start);
                // SAFETY: these pages are part of the caller's run, inside the arena mapping.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len << PAGE_SHIFT) };
                bits &= !(run_mask(len) << start);
            }
        });
    }

    // ---------------------------------------------------------------------------------------------------------
    // Purging (normal context only)
    // ---------------------------------------------------------------------------------------------------------

    /// Give free, dirty pages back to the OS. With `aged`, only pages that were already free and dirty at the
    /// previous aged pass. Returns the number of pages purged.
    ///
    /// # Context
    /// Normal context only: calls `madvise`. Runs concurrently with any allocator operation.
    pub fn purge(&self, aged: bool) -> usize {
        self.purge_some(aged, usize::MAX)
    }

    /// [`purge`](Self::purge), stopping once about `max` pages are purged (a run in progress is finished; the
    /// count can pass `max` by less than one bitmap word). An aged pass still notes which pages are free and
    /// dirty in every word, purged or not, so that the next pass knows their age. The words are visited from the
    /// top of the active region down.
    ///
    /// # Context
    /// As [`purge`](Self::purge).
    pub fn purge_some(&self, aged: bool, max: usize) -> usize {
        if self.lock_commits.load(Ordering::Relaxed) {
            // Every commit is locked: MADV_DONTNEED would be refused, and dropping the pages is not wanted.
            return 0;
        }
        let frontier = self.frontier.load(Ordering::Acquire);
        let mut purged = 0;
        // Set when the kernel refuses (locked memory, after `mlockall(MCL_CURRENT)`): stop asking this pass.
        let mut refused = false;
        for w in (0..frontier).rev() {
            if refused || (purged >= max && !aged) {
                break;
            }
            let alloc = self.word(self.alloc, w);
            let cur = alloc.load(Ordering::Relaxed);
            let cand = !cur & self.word(self.dirty, w).load(Ordering::Relaxed);
            let mut mask = cand;
            if aged {
                let seen = self.word(self.aged, w);
                mask &= seen.load(Ordering::Relaxed);
                seen.store(cand, Ordering::Relaxed);
            }
            if mask == 0 || purged >= max {
                continue;
            }
            // Claim the pages like an allocation so nobody can use them while they are dropped.
            let mut cur = cur;
            let claimed = loop {
                let m = mask & !cur;
                if m == 0 {
                    break 0;
                }
                // Acquire: pairs with the Release in `free_run` (the pages' last writer is done).
                match alloc.compare_exchange_weak(cur, cur | m, Ordering::Acquire, Ordering::Relaxed) {
                    Ok(_) => break m,
                    Err(now) => cur = now,
                }
            };
            if claimed == 0 {
                continue;
            }
            let mut bits = claimed;
            while bits != 0 {
                let start = bits.trailing_zeros() as usize;
                let len = (bits >> start).trailing_ones() as usize;
                let addr = self.page_addr(w * WORD_PAGES + start);
                // SAFETY: the pages are claimed by us (allocated in the bitmap, owned by no one else), page
                // aligned and inside the arena's private anonymous mapping.
                if !refused && unsafe { crate::sys::madvise_dontneed(addr as *mut u8, len << PAGE_SHIFT) }.is_ok() {
                    self.word(self.dirty, w).fetch_and(!(run_mask(len) << start), Ordering::Relaxed);
                    purged += len;
                } else {
                    refused = true;
                }
                bits &= !(run_mask(len) << start);
            }
            // Release: the dirty-bit clears above are visible to whoever claims these pages next.
            alloc.fetch_and(!claimed, Ordering::Release);
            self.note_free(w);
        }
        self.purged_pages.fetch_add(purged as u64, Ordering::Relaxed);
        purged
    }

    /// Pages free and dirty now (resident or possibly resident: what a purge could give back). Scans the
    /// bitmaps of the active region.
    pub fn dirty_free_pages(&self) -> usize {
        let frontier = self.frontier.load(Ordering::Acquire);
        let mut dirty_free = 0;
        for w in 0..frontier {
            let free = !self.word(self.alloc, w).load(Ordering::Relaxed);
            dirty_free += (free & self.word(self.dirty, w).load(Ordering::Relaxed)).count_ones() as usize;
        }
        dirty_free
    }

    /// A snapshot of the counters. Scans the bitmaps of the active region.
    pub fn stats(&self) -> PageStats {
        let dirty_free = self.dirty_free_pages();
        let frontier = self.frontier.load(Ordering::Acquire);
        PageStats {
            arena_pages: self.npages,
            used_pages: self.used_pages.load(Ordering::Relaxed),
            active_pages: frontier * WORD_PAGES,
            dirty_free_pages: dirty_free,
            purged_pages: self.purged_pages.load(Ordering::Relaxed),
            allocs: self.allocs.load(Ordering::Relaxed),
            frees: self.frees.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            committed_pages: self.committed_words() * WORD_PAGES,
            max_align: self.max_align(),
        }
    }

    /// Count the pages allocated in the bitmap (slow; for accounting checks in tests and reports).
    pub fn count_allocated(&self) -> usize {
        let frontier = self.frontier.load(Ordering::Acquire);
        (0..frontier).map(|w| self.word(self.alloc, w).load(Ordering::Relaxed).count_ones() as usize).sum()
    }

    /// The page whose descriptor is at address `desc` (inverse of [`desc`](Self::desc)).
    pub fn page_of_desc(&self, desc: usize) -> usize {
        (desc - self.descs as usize) / core::mem::size_of::<PageDesc>()
    }

    /// A copy of the read-only geometry that maps addresses to descriptors (see [`ArenaView`]).
    pub fn view(&self) -> ArenaView {
        ArenaView { base: self.base, size: self.size, descs: self.descs }
    }

    /// Describe the address `addr` (inside the arena): the descriptor of its page.
    #[inline]
    pub fn info_of(&self, addr: usize) -> Info {
        self.desc(self.page_of(addr)).info()
    }
}

#[inline]
fn run_mask(n: usize) -> u64 {
    if n >= 64 { !0 } else { (1u64 << n) - 1 }
}

/// Bits at positions that are multiples of `align` (a power of two up to 64).
#[inline]
fn align_mask(align: usize) -> u64 {
    match align {
        0 | 1 => !0,
        2 => 0x5555_5555_5555_5555,
        4 => 0x1111_1111_1111_1111,
        8 => 0x0101_0101_0101_0101,
        16 => 0x0001_0001_0001_0001,
        32 => 0x0000_0001_0000_0001,
        _ => 1,
    }
}

// -------------------------------------------------------------------------------------------------------------
// Public API
// -------------------------------------------------------------------------------------------------------------

/// Why [`try_free_pages_nolock`](crate::try_free_pages_nolock) refused a pointer. Nothing was freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagesError {
    /// The address is not inside nolock's arena.
    Foreign,
    /// The address is not the first page of a run from [`alloc_pages_nolock`](crate::alloc_pages_nolock) (or that run was already freed).
    NotAllocated,
    /// The run was allocated with another order.
    WrongOrder {
        /// The order it was allocated with.
        allocated: u32,
    },
}

impl core::fmt::Display for PagesError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PagesError::Foreign => f.write_str("pointer is not from nolock's arena"),
            PagesError::NotAllocated => {
                f.write_str("pointer is not the start of a live alloc_pages_nolock run (double free?)")
            }
            PagesError::WrongOrder { allocated } => {
                write!(f, "run was allocated with order {allocated}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> PageAllocator {
        PageAllocator::map(64 * WORD_PAGES * PAGE_SIZE).unwrap()
    }

    #[test]
    fn base_is_aligned_to_the_arena_size() {
        let p = small();
        assert_eq!(p.base % (64 * WORD_BYTES), 0);
        assert_eq!(p.max_align(), 64 * WORD_BYTES);
        // A run aligned to the whole arena can only start at page 0.
        let r = p.alloc_run(1, 64 * WORD_PAGES).unwrap();
        assert_eq!(r, 0);
        assert_eq!(p.page_addr(r) % (64 * WORD_BYTES), 0);
    }

    #[test]
    fn commit_follows_the_frontier() {
        let p = small();
        assert_eq!(p.stats().committed_pages, 0);
        // Descriptors of never-committed pages read as free.
        assert_eq!(p.info_of(p.base + p.size - 1).kind(), Kind::Free);
        let a = p.alloc_run(1, 1).unwrap();
        let st = p.stats();
        assert!(st.committed_pages >= st.active_pages && st.active_pages > 0);
        assert!(st.committed_pages < 64 * WORD_PAGES, "commits follow the frontier, not the arena");
        assert!(p.contains(p.page_addr(a)));
        assert_eq!(p.info_of(p.base + st.committed_pages * PAGE_SIZE).kind(), Kind::Free);
        // SAFETY: we own the run.
        unsafe { p.free_run(a, 1) };
    }

    #[test]
    fn prefault_by_touch_keeps_runs_and_frees_everything() {
        let p = small();
        let a = p.alloc_run(3, 1).unwrap();
        // SAFETY: we own the run.
        unsafe { core::ptr::write_bytes(p.page_addr(a) as *mut u8, 0x5a, 3 * PAGE_SIZE) };
        assert!(p.commit_to(32));
        p.prefault_by_touch(32);
        // SAFETY: as above.
        let s = unsafe { core::slice::from_raw_parts(p.page_addr(a) as *const u8, 3 * PAGE_SIZE) };
        assert!(s.iter().all(|&x| x == 0x5a), "pages in use are not touched");
        assert_eq!(p.count_allocated(), 3, "every claimed page was freed again");
        assert!(p.stats().active_pages >= 32 * WORD_PAGES);
        // SAFETY: as above.
        unsafe { p.free_run(a, 3) };
        let b = p.alloc_run(32 * WORD_PAGES, 1).unwrap();
        // SAFETY: we own the run.
        unsafe { p.free_run(b, 32 * WORD_PAGES) };
    }

    #[test]
    fn fit_mask_basics() {
        assert_eq!(PageAllocator::fit_mask(0, 1, 1), !0);
        assert_eq!(PageAllocator::fit_mask(!0, 1, 1), 0);
        assert_eq!(PageAllocator::fit_mask(0, 64, 64), 1);
        assert_eq!(PageAllocator::fit_mask(1, 64, 1), 0);
        // only pages 4..8 free
        let w = !(0xf0u64);
        assert_eq!(PageAllocator::fit_mask(w, 4, 4), 1 << 4);
        assert_eq!(PageAllocator::fit_mask(w, 4, 8), 0);
        assert_eq!(PageAllocator::fit_mask(w, 3, 1), (1 << 4) | (1 << 5));
        // a run may not cross the top of the word
        assert_eq!(PageAllocator::fit_mask(0, 3, 1) >> 62, 0);
    }

    #[test]
    fn alloc_free_coalesce() {
        let p = small();
        let a = p.alloc_run(1, 1).unwrap();
        let b = p.alloc_run(1, 1).unwrap();
        assert_ne!(a, b);
        let c = p.alloc_run(8, 8).unwrap();
        assert_eq!(c % 8, 0);
        // SAFETY: runs from this allocator, freed once.
        unsafe {
            p.free_run(a, 1);
            p.free_run(b, 1);
            p.free_run(c, 8);
        }
        assert_eq!(p.stats().used_pages, 0);
        // everything coalesced: a whole word is available again
        let w = p.alloc_run(64, 64).unwrap();
        assert_eq!(w % 64, 0);
        // SAFETY: as above.
        unsafe { p.free_run(w, 64) };
    }

    #[test]
    fn exhaust_and_recover() {
        let p = small();
        let total = p.stats().arena_pages;
        let mut runs = Vec::new();
        while let Some(r) = p.alloc_run(4, 4) {
            runs.push(r);
        }
        assert_eq!(runs.len() * 4, total, "every page usable");
        assert!(p.alloc_run(1, 1).is_none());
        // SAFETY: frees runs we allocated.
        unsafe { p.free_run(runs.pop().unwrap(), 4) };
        assert!(p.alloc_run(4, 4).is_some(), "freed run is found again");
    }

    #[test]
    fn large_runs() {
        let p = small();
        let a = p.alloc_run(200, 1).unwrap();
        assert_eq!(a % 64, 0);
        let b = p.alloc_run(130, 1).unwrap();
        assert!(b >= a + 200 || b + 130 <= a);
        assert!(p.run_allocated(a, 200) && p.run_allocated(b, 130));
        // SAFETY: frees runs we allocated.
        unsafe {
            p.free_run(a, 200);
            p.free_run(b, 130);
        }
        assert_eq!(p.count_allocated(), 0);
        assert!(p.alloc_run(64 * 64, 1).is_some(), "whole arena as one run");
        assert!(p.alloc_run(64 * 64 + 1, 1).is_none());
    }

    #[test]
    fn freed_pages_are_reused_before_untouched_ones() {
        let p = small();
        for (n, align) in [(64, 64), (1, 1), (4, 4)] {
            let a = p.alloc_run(n, align).unwrap();
            let b = p.alloc_run(64, 64).unwrap();
            assert!(b > a);
            // SAFETY: frees a run we allocated.
            unsafe { p.free_run(a, n) };
            let c = p.alloc_run(n, align).unwrap();
            assert_eq!(c, a, "the freed run ({n} pages) comes back before the untouched pages above");
            // SAFETY: frees runs we allocated.
            unsafe {
                p.free_run(b, 64);
                p.free_run(c, n);
            }
        }
    }

    #[test]
    fn purge_some_stops_at_its_budget_and_keeps_ages() {
        let p = small();
        // Two runs in different bitmap words.
        let a = p.alloc_run(64, 64).unwrap();
        let b = p.alloc_run(64, 64).unwrap();
        // SAFETY: we own the runs.
        unsafe {
            core::ptr::write_bytes(p.page_addr(a) as *mut u8, 0xab, 64 * PAGE_SIZE);
            core::ptr::write_bytes(p.page_addr(b) as *mut u8, 0xab, 64 * PAGE_SIZE);
            p.free_run(a, 64);
            p.free_run(b, 64);
        }
        assert_eq!(p.dirty_free_pages(), 128);
        assert_eq!(p.purge_some(true, 10), 0, "first aged pass only marks, every word");
        let first = p.purge_some(true, 10);
        assert!((10..=64).contains(&first), "stops after the run that reaches the budget: {first}");
        assert_eq!(p.dirty_free_pages(), 128 - first);
        // The word it did not reach was still aged: the next pass purges the rest.
        assert_eq!(p.purge_some(true, usize::MAX), 128 - first);
        assert_eq!(p.dirty_free_pages(), 0);
    }

    #[test]
    fn purge_claims_and_clears_dirty() {
        let p = small();
        let a = p.alloc_run(16, 16).unwrap();
        // SAFETY: we own the run.
        unsafe {
            core::ptr::write_bytes(p.page_addr(a) as *mut u8, 0xab, 16 * PAGE_SIZE);
            p.free_run(a, 16);
        }
        assert_eq!(p.stats().dirty_free_pages, 16);
        assert_eq!(p.purge(true), 0, "first aged pass only marks");
        assert_eq!(p.purge(true), 16);
        assert_eq!(p.stats().dirty_free_pages, 0);
        let b = p.alloc_run(16, 16).unwrap();
        // SAFETY: we own the run; purged memory reads as zero.
        let s = unsafe { core::slice::from_raw_parts(p.page_addr(b) as *const u8, 16 * PAGE_SIZE) };
        assert!(s.iter().all(|&x| x == 0));
    }

    #[test]
    fn zero_dirty_only_touches_dirty() {
        let p = small();
        let a = p.alloc_run(2, 1).unwrap();
        // SAFETY: we own the run.
        unsafe {
            core::ptr::write_bytes(p.page_addr(a) as *mut u8, 0xcd, 2 * PAGE_SIZE);
            p.free_run(a, 2);
        }
        let b = p.alloc_run(2, 1).unwrap();
        assert_eq!(a, b);
        // SAFETY: we own the run.
        unsafe { p.zero_dirty(b, 2) };
        // SAFETY: as above.
        let s = unsafe { core::slice::from_raw_parts(p.page_addr(b) as *const u8, 2 * PAGE_SIZE) };
        assert!(s.iter().all(|&x| x == 0));
    }

    #[test]
    fn concurrent_alloc_free() {
        let p = std::sync::Arc::new(small());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000usize {
                        let n = 1 << ((i + t) % 4);
                        if let Some(r) = p.alloc_run(n, n) {
                            // SAFETY: the run is ours; stamp it to detect double hand-out.
                            unsafe { *(p.page_addr(r) as *mut usize) = r };
                            held.push((r, n));
                        }
                        if (held.len() > 32 || i % 3 == 0)
                            && let Some((r, n)) = held.pop()
                        {
                            // SAFETY: our run, stamped above.
                            assert_eq!(unsafe { *(p.page_addr(r) as *const usize) }, r);
                            // SAFETY: freeing our own run once.
                            unsafe { p.free_run(r, n) };
                        }
                    }
                    for (r, n) in held {
                        // SAFETY: freeing our own run once.
                        unsafe { p.free_run(r, n) };
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(p.count_allocated(), 0);
        assert_eq!(p.stats().used_pages, 0);
    }
}
