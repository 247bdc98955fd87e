//! Process-wide state of the page layer: the page allocator over the arena, and run-time configuration.
//!
//! It lives in memory nolock maps itself, reached through one `AtomicPtr`. This module knows nothing of slabs,
//! caches or per-thread lists: the slab layer builds its own state over this one (`slab::tables`).
//! Initialisation is lock-free
//! so that the first nolock call may happen anywhere, even in a signal handler that interrupted another first
//! call on the same thread: every initialiser maps and fills a complete instance, then tries to publish it with
//! one CAS; a loser unmaps its own copy and uses the winner's. Nothing waits.
//!
//! Configuration ([`Config`], given to [`crate::NolockAlloc::with_config`] or [`Config::apply`], or environment
//! variables) is resolved once, by the initialiser, into [`Settings`] kept in the global state.
//!
//! If the arena cannot be reserved, the initialiser says why on standard error (raw `write`, no allocation)
//! and names `NOLOCK_ARENA_SIZE`, once per process; allocations then fail (a global allocator's caller aborts
//! with Rust's "memory allocation of N bytes failed").

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use crate::page::{MAX_ARENA_SIZE, MIN_ARENA_SIZE, MapError, PageAllocator};

/// Default arena size: 16 GiB of address space (reserved, not committed).
pub const DEFAULT_ARENA_SIZE: usize = 16 << 30;
/// Default interval of the background worker's purge.
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_millis(100);
/// Default purge decay time: how long freed pages stay before the background worker has given them all back.
pub const DEFAULT_PURGE_DECAY: Duration = Duration::from_secs(1);

/// The global state. See the module documentation.
pub(crate) struct Global {
    /// The page allocator over the arena.
    pub pages: PageAllocator,
    /// The settings this state was built with.
    pub settings: Settings,
    meta_len: usize,
}

/// Settings resolved at initialisation: each from the [`Config`] given to the initialiser, else from
/// [`Config::apply`], else from the environment, else the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    pub arena_size: usize,
    pub debug: bool,
    pub background: bool,
    /// `None`: the background worker never purges.
    pub purge_interval: Option<Duration>,
    /// Over how long pages freed at one moment are purged (zero: all that stayed free for a whole interval).
    pub purge_decay: Duration,
    /// Bytes to prefault at initialisation.
    pub prefault: usize,
    /// Commit the arena as it is used (system calls on the allocation slow path) instead of all at once.
    pub lazy_commit: bool,
}

static GLOBAL: AtomicPtr<Global> = AtomicPtr::new(core::ptr::null_mut());

// What `Config::apply` stored (each "unset" until then).
static CFG_ARENA: AtomicUsize = AtomicUsize::new(0);
const TRI_UNSET: u8 = 0;
const TRI_OFF: u8 = 1;
const TRI_ON: u8 = 2;
static CFG_DEBUG: AtomicU8 = AtomicU8::new(TRI_UNSET);
static CFG_BACKGROUND: AtomicU8 = AtomicU8::new(TRI_UNSET);
const PURGE_UNSET: u64 = u64::MAX;
const PURGE_NEVER: u64 = u64::MAX - 1;
static CFG_PURGE_MS: AtomicU64 = AtomicU64::new(PURGE_UNSET);
static CFG_DECAY_MS: AtomicU64 = AtomicU64::new(PURGE_UNSET);
static CFG_PREFAULT: AtomicUsize = AtomicUsize::new(usize::MAX);
static CFG_LAZY_COMMIT: AtomicU8 = AtomicU8::new(TRI_UNSET);

/// The global state, initialising it on first use. `None` only if the arena could not be mapped at all.
///
/// # Context
/// Any context; the first call makes a few `mmap` calls.
#[inline]
pub fn get() -> Option<&'static Global> {
    let p = GLOBAL.load(Ordering::Acquire);
    if p.is_null() {
        return init(None);
    }
    // SAFETY: a published Global is never freed.
    Some(unsafe { &*p })
}

/// [`get`], initialising with `cfg` (over `Config::apply` and the environment) if nolock is not initialised.
///
/// # Context
/// As [`get`].
#[cold]
pub fn get_with(cfg: &Config) -> Option<&'static Global> {
    match get_if_init() {
        Some(g) => Some(g),
        None => init(Some(cfg)),
    }
}

/// The global state if it exists already (no initialisation).
#[inline]
pub fn get_if_init() -> Option<&'static Global> {
    // Acquire: pairs with the AcqRel publication in `init`.
    let p = GLOBAL.load(Ordering::Acquire);
    // SAFETY: a published Global is never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

#[cold]
fn init(over: Option<&Config>) -> Option<&'static Global> {
    // The first call may be in a signal handler: leave the interrupted code's errno as it was.
    let _errno = crate::sys::ErrnoGuard::save();
    let settings = resolve(over);
    let pages = match PageAllocator::map(settings.arena_size) {
        Ok(p) => p,
        Err(e) => {
            report_reserve_failure(&settings, e);
            return None;
        }
    };
    if !settings.lazy_commit && !pages.locks_commits() && !pages.commit_all() {
        // The kernel refused: fall back to committing as the arena is used.
        crate::sys::write_stderr(b"nolock: could not commit the arena at once; committing it as it is used\n");
    }
    let meta_len = core::mem::size_of::<Global>().next_multiple_of(4096);
    let meta = match crate::sys::mmap_reserve_err(meta_len) {
        Ok(m) => m,
        Err(errno) => {
            report_reserve_failure(&settings, MapError { what: "global state", bytes: meta_len, errno });
            // SAFETY: never shared.
            unsafe { pages.unmap() };
            return None;
        }
    };
    let g = meta.cast::<Global>();
    // SAFETY: `meta` is a fresh, page-aligned mapping big enough for a Global.
    unsafe {
        g.write(Global { pages, settings, meta_len });
    }
    // SAFETY: just written; not yet shared.
    let gr = unsafe { &*g };
    // AcqRel: Release publishes the fully built state; Acquire on failure reads the winner's.
    match GLOBAL.compare_exchange(core::ptr::null_mut(), g, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {
            if settings.prefault > 0
                && let Err(e) = gr.pages.prefault(settings.prefault)
            {
                let mut m = crate::sys::StackBuf::<256>::new();
                let _ = core::fmt::Write::write_fmt(
                    &mut m,
                    format_args!("nolock: prefault of {} at initialisation: {e}\n", Size(settings.prefault)),
                );
                crate::sys::write_stderr(m.as_bytes());
            }
            Some(gr)
        }
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

/// A byte count for messages: `16 GiB`, `512 MiB`, `256 KiB`, or bytes.
pub(crate) struct Size(pub usize);

impl core::fmt::Display for Size {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let n = self.0;
        if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
            write!(f, "{} GiB", n >> 30)
        } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
            write!(f, "{} MiB", n >> 20)
        } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
            write!(f, "{} KiB", n >> 10)
        } else {
            write!(f, "{n} bytes")
        }
    }
}

fn errno_name(e: i32) -> &'static str {
    match e {
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        libc::EPERM => "EPERM",
        libc::EINVAL => "EINVAL",
        _ => "error",
    }
}

static RESERVE_REPORTED: AtomicBool = AtomicBool::new(false);

/// Say, once per process, why nolock cannot start and what to change. Raw `write(2)` from a stack buffer: this
/// runs inside the allocation that failed, possibly a global allocator's, possibly in a signal handler.
#[cold]
fn report_reserve_failure(settings: &Settings, e: MapError) {
    if RESERVE_REPORTED.swap(true, Ordering::Relaxed) {
        return;
    }
    let mut m = crate::sys::StackBuf::<1024>::new();
    let w = &mut m;
    let _ = core::fmt::Write::write_fmt(
        w,
        format_args!(
            "nolock: cannot reserve its {}: mmap of {} of address space failed with {} (errno {}).\n",
            e.what,
            Size(e.bytes),
            errno_name(e.errno),
            e.errno
        ),
    );
    if let Some(limit) = crate::sys::address_space_limit() {
        let _ = core::fmt::Write::write_fmt(
            w,
            format_args!("nolock: the address space is limited to {} (ulimit -v, RLIMIT_AS).\n", Size(limit as usize)),
        );
    }
    if e.errno == libc::EAGAIN && crate::sys::mcl_future_in_effect() {
        let _ = core::fmt::Write::write_str(
            w,
            "nolock: mlockall(MCL_FUTURE) is in effect, so the reservation counts against RLIMIT_MEMLOCK: \
             raise it, or call nolock::init() before mlockall.\n",
        );
    }
    let _ = core::fmt::Write::write_fmt(
        w,
        format_args!(
            "nolock: the arena is {}; set NOLOCK_ARENA_SIZE to a smaller size (for example NOLOCK_ARENA_SIZE=1G), \
             or use Config::arena_size / NolockAlloc::with_config. nolock allocations fail until then.\n",
            Size(settings.arena_size)
        ),
    );
    crate::sys::write_stderr(m.as_bytes());
}

/// Set once a configuration warning was printed (one per process, so that retried initialisations stay quiet).
static ENV_WARNED: AtomicBool = AtomicBool::new(false);

/// Say (once) that an environment variable was not understood, and what is used instead.
fn warn_env(name: &str, value: &[u8], instead: &str) {
    if ENV_WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    let mut m = crate::sys::StackBuf::<256>::new();
    let v = core::str::from_utf8(value).unwrap_or("(not UTF-8)");
    let _ = core::fmt::Write::write_fmt(&mut m, format_args!("nolock: ignoring {name}={v:?}: {instead}\n"));
    crate::sys::write_stderr(m.as_bytes());
}

/// An arena size within the limits; out-of-range values are clamped with a message.
fn checked_arena(n: usize, from: &str) -> usize {
    if (MIN_ARENA_SIZE..=MAX_ARENA_SIZE).contains(&n) {
        return n;
    }
    let c = n.clamp(MIN_ARENA_SIZE, MAX_ARENA_SIZE);
    if ENV_WARNED.swap(true, Ordering::Relaxed) {
        return c;
    }
    let mut m = crate::sys::StackBuf::<160>::new();
    let _ = core::fmt::Write::write_fmt(
        &mut m,
        format_args!(
            "nolock: arena size {} from {from} is out of range (256 KiB to 8 TiB); using {}\n",
            Size(n),
            Size(c)
        ),
    );
    crate::sys::write_stderr(m.as_bytes());
    c
}

/// Resolve every setting (see [`Settings`]). Reads the environment without allocating.
fn resolve(over: Option<&Config>) -> Settings {
    let over = over.copied().unwrap_or(Config::new());
    let arena_size = match (over.arena_size, CFG_ARENA.load(Ordering::Relaxed)) {
        (Some(n), _) => checked_arena(n, "the configuration"),
        (None, n) if n != 0 => n,
        _ => match crate::sys::getenv(c"NOLOCK_ARENA_SIZE") {
            None => DEFAULT_ARENA_SIZE,
            Some(v) => match crate::sys::parse_size(v) {
                Some(n) => checked_arena(usize::try_from(n).unwrap_or(usize::MAX), "NOLOCK_ARENA_SIZE"),
                None => {
                    warn_env("NOLOCK_ARENA_SIZE", v, "not a size (use 16G, 512M or a byte count); using 16G");
                    DEFAULT_ARENA_SIZE
                }
            },
        },
    };
    let debug = over.debug.unwrap_or_else(|| match CFG_DEBUG.load(Ordering::Relaxed) {
        TRI_ON => true,
        TRI_OFF => false,
        _ => crate::sys::getenv(c"NOLOCK_DEBUG").is_some_and(|v| !matches!(v, b"" | b"0" | b"off")),
    });
    let background = over.background.unwrap_or_else(|| match CFG_BACKGROUND.load(Ordering::Relaxed) {
        TRI_ON => true,
        TRI_OFF => false,
        _ => !matches!(crate::sys::getenv(c"NOLOCK_BACKGROUND"), Some(b"0" | b"off")),
    });
    let purge_interval = match over.purge_interval {
        Some(p) => p.filter(|d| !d.is_zero()).map(|d| d.max(Duration::from_millis(1))),
        None => match CFG_PURGE_MS.load(Ordering::Relaxed) {
            PURGE_NEVER => None,
            PURGE_UNSET => env_purge_interval(),
            ms => Some(Duration::from_millis(ms)),
        },
    };
    let purge_decay = match over.purge_decay {
        Some(d) => d.min(MAX_PURGE_DECAY),
        None => match CFG_DECAY_MS.load(Ordering::Relaxed) {
            PURGE_UNSET => env_purge_decay(),
            ms => Duration::from_millis(ms),
        },
    };
    let prefault = match (over.prefault, CFG_PREFAULT.load(Ordering::Relaxed)) {
        (Some(n), _) => n,
        (None, n) if n != usize::MAX => n,
        _ => match crate::sys::getenv(c"NOLOCK_PREFAULT") {
            None => 0,
            Some(v) => crate::sys::parse_size(v).map_or_else(
                || {
                    warn_env("NOLOCK_PREFAULT", v, "not a size (use 64M or a byte count); not prefaulting");
                    0
                },
                |n| usize::try_from(n).unwrap_or(usize::MAX),
            ),
        },
    };
    let lazy_commit = over.lazy_commit.unwrap_or_else(|| match CFG_LAZY_COMMIT.load(Ordering::Relaxed) {
        TRI_ON => true,
        TRI_OFF => false,
        _ => matches!(crate::sys::getenv(c"NOLOCK_COMMIT"), Some(b"lazy")),
    });
    Settings { arena_size, debug, background, purge_interval, purge_decay, prefault, lazy_commit }
}

/// Longest purge decay time accepted (longer settings are clamped to it).
const MAX_PURGE_DECAY: Duration = Duration::from_secs(3600);

/// `NOLOCK_PURGE_DECAY_MS`: milliseconds (0: purge every page that stayed free for a whole interval, the
/// behaviour before decay), 1000 by default.
fn env_purge_decay() -> Duration {
    match crate::sys::getenv(c"NOLOCK_PURGE_DECAY_MS") {
        None => DEFAULT_PURGE_DECAY,
        Some(v) => match crate::sys::parse_size(v) {
            Some(ms) => Duration::from_millis(ms).min(MAX_PURGE_DECAY),
            None => {
                warn_env("NOLOCK_PURGE_DECAY_MS", v, "not a number of milliseconds; using 1000");
                DEFAULT_PURGE_DECAY
            }
        },
    }
}

/// `NOLOCK_PURGE=never` (or `off`, `0`) or `NOLOCK_PURGE_INTERVAL_MS=0`: `None`; otherwise the interval in
/// milliseconds (1 to 60000), 100 by default.
fn env_purge_interval() -> Option<Duration> {
    if let Some(v) = crate::sys::getenv(c"NOLOCK_PURGE") {
        match v {
            b"never" | b"off" | b"0" => return None,
            b"" | b"on" | b"1" => {}
            _ => warn_env("NOLOCK_PURGE", v, "use never (or off) to turn the periodic purge off"),
        }
    }
    match crate::sys::getenv(c"NOLOCK_PURGE_INTERVAL_MS") {
        None => Some(DEFAULT_PURGE_INTERVAL),
        Some(v) => match crate::sys::parse_size(v) {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms.clamp(1, 60_000))),
            None => {
                warn_env("NOLOCK_PURGE_INTERVAL_MS", v, "not a number of milliseconds; using 100");
                Some(DEFAULT_PURGE_INTERVAL)
            }
        },
    }
}

/// The settings in effect: those of the global state, or what initialisation would resolve now.
pub(crate) fn settings() -> Settings {
    match get_if_init() {
        Some(g) => g.settings,
        None => resolve(None),
    }
}

/// A mapping for state above this layer failed (the slab layer's tables): say why, as for the arena.
#[cold]
pub(crate) fn report_map_failure(e: MapError) {
    report_reserve_failure(&settings(), e);
}

/// Why a [`Config`] could not be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// nolock is already initialised (some allocation already happened); the settings are fixed now.
    AlreadyInitialized,
    /// The arena size is below 256 KiB or above 8 TiB.
    BadArenaSize,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::AlreadyInitialized => f.write_str(
                "nolock is already initialised; configure it before the first allocation (a global allocator: \
                 NolockAlloc::with_config or the NOLOCK_* environment variables)",
            ),
            ConfigError::BadArenaSize => f.write_str("arena size must be between 256 KiB and 8 TiB"),
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
/// | [`purge_interval`](Config::purge_interval) | `NOLOCK_PURGE_INTERVAL_MS` (`0`: never), `NOLOCK_PURGE=never` | 100 ms |
/// | [`purge_decay`](Config::purge_decay) | `NOLOCK_PURGE_DECAY_MS` (`0`: no decay) | 1 s |
/// | [`prefault`](Config::prefault) | `NOLOCK_PREFAULT` (`64M`, bytes) | 0 |
/// | [`lazy_commit`](Config::lazy_commit) | `NOLOCK_COMMIT=lazy` | all at once (as used under `MCL_FUTURE`) |
///
/// Two ways to give it:
/// - a global allocator passes it to [`NolockAlloc::with_config`](crate::NolockAlloc::with_config) (a `const
///   fn`), read by the first allocation;
/// - any other program calls [`Config::apply`] before its first nolock call.
///
/// ```
/// use std::time::Duration;
/// // Fails harmlessly if nolock is already initialised.
/// nolock::Config::new().arena_size(1 << 30).purge_interval(Some(Duration::from_millis(500))).apply().ok();
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    arena_size: Option<usize>,
    debug: Option<bool>,
    background: Option<bool>,
    purge_interval: Option<Option<Duration>>,
    purge_decay: Option<Duration>,
    prefault: Option<usize>,
    lazy_commit: Option<bool>,
}

impl Config {
    /// Nothing set: every setting comes from the environment or its default.
    pub const fn new() -> Self {
        Self {
            arena_size: None,
            debug: None,
            background: None,
            purge_interval: None,
            purge_decay: None,
            prefault: None,
            lazy_commit: None,
        }
    }

    /// Size of the virtual-memory arena that every allocation comes from: reserved address space, committed as
    /// it is used. 256 KiB to 8 TiB; it caps the heap. [`Config::apply`] refuses other sizes;
    /// [`NolockAlloc::with_config`](crate::NolockAlloc::with_config) clamps them into range with a message.
    pub const fn arena_size(mut self, bytes: usize) -> Self {
        self.arena_size = Some(bytes);
        self
    }

    /// Start with the kmalloc debug caches on (see [`crate::debug`]); can still be switched at run time.
    pub const fn debug(mut self, on: bool) -> Self {
        self.debug = Some(on);
        self
    }

    /// Whether [`crate::init`] starts the background worker that returns free memory to the OS.
    pub const fn background(mut self, on: bool) -> Self {
        self.background = Some(on);
        self
    }

    /// How often the background worker gives pages that stayed free for a whole interval back to the OS
    /// (`madvise(MADV_DONTNEED)`). `None` (or a zero interval): never — memory then returns to the OS only
    /// through [`crate::trim`], and freed pages are never faulted in again, which is what a real-time program
    /// wants. The worker still releases empty slabs to the page allocator.
    pub const fn purge_interval(mut self, every: Option<Duration>) -> Self {
        self.purge_interval = Some(every);
        self
    }

    /// The purge's decay time: pages freed at one moment go back to the OS gradually over this long (the
    /// share kept falls linearly from all of them to none), oldest free pages first, so that memory a program
    /// frees and soon allocates again is not given back and faulted in again. Zero: every page that stayed free
    /// for a whole purge interval goes back at once. A large free still returns within this time without
    /// [`crate::trim`], which returns everything at once. No effect when the purge is off
    /// ([`Config::purge_interval`]`(None)`). Environment: `NOLOCK_PURGE_DECAY_MS`; at most an hour.
    pub const fn purge_decay(mut self, over: Duration) -> Self {
        self.purge_decay = Some(over);
        self
    }

    /// Prefault this many bytes at initialisation, as [`crate::prefault`] does (the first nolock call, whatever
    /// its context, then takes as long as faulting them in).
    pub const fn prefault(mut self, bytes: usize) -> Self {
        self.prefault = Some(bytes);
        self
    }

    /// Commit the arena as it is used (`true`) instead of all at once at initialisation (`false`, the default).
    ///
    /// Committing means making reserved address space usable (`mprotect`); it costs no memory until pages are
    /// touched. All at once, no allocation ever makes a system call after the first one. As it is used, an
    /// allocation that grows the arena past what is committed makes one (`mprotect`, which takes the kernel's
    /// `mmap` lock), unless the background worker or [`crate::prefault`] committed ahead. Under
    /// `mlockall(MCL_FUTURE)` commits are always made as the arena is used (committing all of it would lock
    /// all of it): real-time programs call [`crate::prefault`] for their working set. Environment:
    /// `NOLOCK_COMMIT=lazy`.
    pub const fn lazy_commit(mut self, on: bool) -> Self {
        self.lazy_commit = Some(on);
        self
    }

    /// Apply the settings, for the initialisation to come.
    ///
    /// This works only before nolock is initialised, that is before the first nolock call of the process (any
    /// allocation, `KmemCache`, RCU call or [`crate::init`]). With [`NolockAlloc`](crate::NolockAlloc) as the
    /// global allocator that moment has always passed (the Rust runtime allocates before `main`), so this
    /// fails: give the settings to [`NolockAlloc::with_config`](crate::NolockAlloc::with_config) or in the
    /// environment instead.
    ///
    /// # Errors
    /// [`ConfigError::AlreadyInitialized`] if nolock is initialised (nothing is changed);
    /// [`ConfigError::BadArenaSize`] for an arena size out of range (nothing is changed).
    ///
    /// # Context
    /// Normal context (not async-signal-safe only in that it is meant to run once, early).
    pub fn apply(self) -> Result<(), ConfigError> {
        if get_if_init().is_some() {
            return Err(ConfigError::AlreadyInitialized);
        }
        if let Some(n) = self.arena_size {
            if !(MIN_ARENA_SIZE..=MAX_ARENA_SIZE).contains(&n) {
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
        if let Some(p) = self.purge_interval {
            let ms = match p {
                Some(d) if !d.is_zero() => (d.as_millis().max(1) as u64).min(PURGE_NEVER - 1),
                _ => PURGE_NEVER,
            };
            CFG_PURGE_MS.store(ms, Ordering::Relaxed);
        }
        if let Some(d) = self.purge_decay {
            CFG_DECAY_MS.store(d.min(MAX_PURGE_DECAY).as_millis() as u64, Ordering::Relaxed);
        }
        if let Some(n) = self.prefault {
            CFG_PREFAULT.store(n.min(usize::MAX - 1), Ordering::Relaxed);
        }
        if let Some(l) = self.lazy_commit {
            CFG_LAZY_COMMIT.store(if l { TRI_ON } else { TRI_OFF }, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Whether the background worker should run (configuration or `NOLOCK_BACKGROUND`).
pub fn background_enabled() -> bool {
    settings().background
}
