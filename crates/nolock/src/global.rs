//! Process-wide state: the arena, the cache table, the shard pool, and run-time configuration.
//!
//! All of it lives in memory nolock maps itself, reached through one `AtomicPtr`. Initialisation is lock-free
//! so that the first nolock call may happen anywhere, even in a signal handler that interrupted another first
//! call on the same thread: every initialiser maps and fills a complete instance, then tries to publish it with
//! one CAS; a loser unmaps its own copy and uses the winner's. Nothing waits.
//!
//! Configuration ([`Config`] or environment variables) is read once, by the initialiser.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicU32, AtomicUsize, Ordering};

use crate::page::PageAllocator;
use crate::slab::cache::CacheInner;
use crate::slab::shard::Shard;
use crate::sync::tagged::TaggedStack;

/// Maximum number of caches (the kmalloc classes included) alive at once.
pub const MAX_CACHES: usize = 256;
/// Maximum number of threads with their own per-thread caches at once; further threads use the shared path.
pub const MAX_SHARDS: usize = 1024;
/// Default arena size: 16 GiB of address space (reserved, not committed).
pub const DEFAULT_ARENA_SIZE: usize = 16 << 30;

/// `Global::slow_flags`: kmalloc debug mode is on.
pub const SLOW_DEBUG: u8 = 1;
/// `Global::slow_flags`: fault injection is configured somewhere.
pub const SLOW_FAULT: u8 = 2;

/// The global state. See the module documentation.
pub(crate) struct Global {
    /// The page allocator over the arena.
    pub pages: PageAllocator,
    caches: NonNull<CacheInner>,
    shards: NonNull<Shard>,
    /// Shards never handed out yet start here.
    pub next_shard: AtomicU32,
    /// Shards given back by exited threads.
    pub free_shards: TaggedStack,
    /// Cache ids never used yet start here.
    pub next_cache: AtomicU32,
    /// `SLOW_DEBUG`: new kmalloc allocations come from the debug caches; `SLOW_FAULT`: some fault injection is
    /// configured. Zero keeps the allocation fast paths on their shortest route (one load and branch).
    pub slow_flags: AtomicU8,
    meta_len: usize,
}

// SAFETY: all shared fields are atomics or point at memory accessed only through atomics or under the per-cache
// protocols documented in `slab`.
unsafe impl Send for Global {}
// SAFETY: see above.
unsafe impl Sync for Global {}

static GLOBAL: AtomicPtr<Global> = AtomicPtr::new(core::ptr::null_mut());

static CFG_ARENA: AtomicUsize = AtomicUsize::new(0);
const TRI_UNSET: u8 = 0;
const TRI_OFF: u8 = 1;
const TRI_ON: u8 = 2;
static CFG_DEBUG: AtomicU8 = AtomicU8::new(TRI_UNSET);
static CFG_BACKGROUND: AtomicU8 = AtomicU8::new(TRI_UNSET);

/// The global state, initialising it on first use. `None` only if the arena could not be mapped at all.
///
/// # Context
/// Any context; the first call makes a few `mmap` calls.
#[inline]
pub fn get() -> Option<&'static Global> {
    let p = GLOBAL.load(Ordering::Acquire);
    if p.is_null() {
        return init();
    }
    // SAFETY: a published Global is never freed.
    Some(unsafe { &*p })
}

/// The global state if it exists already (no initialisation).
#[inline]
pub fn get_if_init() -> Option<&'static Global> {
    // Acquire: pairs with the AcqRel publication in `init`.
    let p = GLOBAL.load(Ordering::Acquire);
    // SAFETY: a published Global is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

struct MetaLayout {
    caches: usize,
    shards: usize,
    total: usize,
}

impl MetaLayout {
    fn new() -> Self {
        let caches = round_up(core::mem::size_of::<Global>(), 4096);
        let shards = round_up(caches + MAX_CACHES * core::mem::size_of::<CacheInner>(), 4096);
        let total = round_up(shards + MAX_SHARDS * core::mem::size_of::<Shard>(), 4096);
        Self { caches, shards, total }
    }
}

#[cold]
fn init() -> Option<&'static Global> {
    let arena = match CFG_ARENA.load(Ordering::Relaxed) {
        0 => crate::sys::getenv(c"NOLOCK_ARENA_SIZE")
            .and_then(crate::sys::parse_size)
            .map_or(DEFAULT_ARENA_SIZE, |v| v as usize),
        n => n,
    };
    let pages = PageAllocator::map(arena)?;
    let layout = MetaLayout::new();
    let Some(meta) = crate::sys::mmap_reserve(layout.total) else {
        // SAFETY: `pages` was never shared.
        unsafe { pages.unmap() };
        return None;
    };
    let debug = match CFG_DEBUG.load(Ordering::Relaxed) {
        TRI_ON => true,
        TRI_OFF => false,
        _ => crate::sys::getenv(c"NOLOCK_DEBUG").is_some_and(|v| !matches!(v, b"" | b"0" | b"off")),
    };
    let g = meta.cast::<Global>();
    // SAFETY: `meta` is a fresh, page-aligned, zeroed mapping big enough for the layout; the cache and shard
    // tables are valid when zeroed.
    unsafe {
        g.write(Global {
            pages,
            caches: NonNull::new_unchecked(meta.add(layout.caches).cast()),
            shards: NonNull::new_unchecked(meta.add(layout.shards).cast()),
            next_shard: AtomicU32::new(0),
            free_shards: TaggedStack::new(),
            next_cache: AtomicU32::new(0),
            slow_flags: AtomicU8::new(if debug { SLOW_DEBUG } else { 0 }),
            meta_len: layout.total,
        });
    }
    // SAFETY: just written; not yet shared.
    let gr = unsafe { &*g };
    crate::slab::kmalloc::create_kmalloc_caches(gr);
    // AcqRel: Release publishes the fully built state; Acquire on failure reads the winner's.
    match GLOBAL.compare_exchange(core::ptr::null_mut(), g, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => Some(gr),
        Err(winner) => {
            // SAFETY: our instance was never published; reading its fields out and unmapping is fine.
            unsafe {
                let ours = g.read();
                let len = ours.meta_len;
                ours.pages.unmap();
                crate::sys::munmap(meta, len);
                Some(&*winner)
            }
        }
    }
}

impl Global {
    /// The cache with id `id`.
    #[inline]
    pub(crate) fn cache(&self, id: u16) -> &CacheInner {
        debug_assert!((id as usize) < MAX_CACHES);
        // SAFETY: the table has MAX_CACHES entries living as long as `self`; zeroed entries are valid.
        unsafe { &*self.caches.as_ptr().add(id as usize) }
    }

    /// The shard with id `id`.
    #[inline]
    pub fn shard(&self, id: u32) -> &Shard {
        debug_assert!((id as usize) < MAX_SHARDS);
        // SAFETY: the table has MAX_SHARDS entries living as long as `self`; zeroed entries are valid.
        unsafe { &*self.shards.as_ptr().add(id as usize) }
    }

    /// Shards handed out so far (an upper bound for scans).
    #[inline]
    pub fn shard_count(&self) -> u32 {
        self.next_shard.load(Ordering::Acquire).min(MAX_SHARDS as u32)
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

    /// Cache ids used so far (an upper bound for scans).
    #[inline]
    pub fn cache_count(&self) -> u16 {
        self.next_cache.load(Ordering::Acquire).min(MAX_CACHES as u32) as u16
    }
}

/// Why a [`Config`] could not be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// nolock is already initialised (some allocation already happened); the settings are fixed now.
    AlreadyInitialized,
    /// The arena size is below 256 KiB or not representable.
    BadArenaSize,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::AlreadyInitialized => {
                f.write_str("nolock is already initialised; configure it before the first allocation")
            }
            ConfigError::BadArenaSize => f.write_str("arena size must be at least 256 KiB"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Settings fixed at initialisation. Each has an environment-variable equivalent, read when the setting is not
/// given here.
///
/// | setting | environment | default |
/// |---|---|---|
/// | [`arena_size`](Config::arena_size) | `NOLOCK_ARENA_SIZE` (`16G`, `512M`, bytes) | 16 GiB |
/// | [`debug`](Config::debug) | `NOLOCK_DEBUG=1` | off |
/// | [`background`](Config::background) | `NOLOCK_BACKGROUND=0` | on |
///
/// ```
/// nolock::Config::new().arena_size(1 << 30).apply().ok(); // fails harmlessly if already initialised
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    arena_size: Option<usize>,
    debug: Option<bool>,
    background: Option<bool>,
}

impl Config {
    /// Nothing set: every setting comes from the environment or its default.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn new() -> Self {
        Self::default()
    }

    /// Size of the virtual-memory arena that every allocation comes from. It is reserved, not committed.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn arena_size(mut self, bytes: usize) -> Self {
        self.arena_size = Some(bytes);
        self
    }

    /// Start with the kmalloc debug caches on (see [`crate::debug`]); can still be switched at run time.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn debug(mut self, on: bool) -> Self {
        self.debug = Some(on);
        self
    }

    /// Whether [`crate::init`] starts the background worker that returns free memory to the OS.
    ///
    /// # Context
    /// Any context (a plain computation or one load).
    pub fn background(mut self, on: bool) -> Self {
        self.background = Some(on);
        self
    }

    /// Apply the settings. Fails if nolock is already initialised.
    ///
    /// # Context
    /// Normal context (not async-signal-safe only in that it is meant to run once, early).
    pub fn apply(self) -> Result<(), ConfigError> {
        if get_if_init().is_some() {
            return Err(ConfigError::AlreadyInitialized);
        }
        if let Some(n) = self.arena_size {
            if n < 256 << 10 {
                return Err(ConfigError::BadArenaSize);
            }
            CFG_ARENA.store(n, Ordering::Relaxed);
        }
        if let Some(d) = self.debug {
            CFG_DEBUG.store(if d { TRI_ON } else { TRI_OFF }, Ordering::Relaxed);
        }
        if let Some(b) = self.background {
            CFG_BACKGROUND.store(if b { TRI_ON } else { TRI_OFF }, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Whether the background worker should run (configuration or `NOLOCK_BACKGROUND`).
pub fn background_enabled() -> bool {
    match CFG_BACKGROUND.load(Ordering::Relaxed) {
        TRI_ON => true,
        TRI_OFF => false,
        _ => !matches!(crate::sys::getenv(c"NOLOCK_BACKGROUND"), Some(b"0" | b"off")),
    }
}
