//! Debug mode, error reports and fault injection (the userspace `slub_debug` and `failslab`).
//!
//! # Debug caches
//!
//! A cache created with the debug flag lays each slot out as
//!
//! ```text
//! [left red zone][object ............][right red zone 16][state 8][free link 8]
//! ```
//!
//! - *red zones* hold `0xbb` while the object is free and `0xcc` while it is allocated; a free checks both
//!   (an overflow or underflow is reported and the object is kept out of circulation);
//! - *poison*: a free object is filled with `0x6b` and its last byte with `0xa5`; an allocation checks the
//!   pattern and reports a write after free (not for type-safe caches, whose freed objects readers may probe);
//! - the *state* word is `FREE` or `ALLOC`, changed by CAS, so a double free (even two racing frees) is caught
//!   and ignored;
//! - the free-list link lives after the object, so poison covers the whole object.
//!
//! The kmalloc classes exist twice, plain and debug. [`set_enabled`] (or `NOLOCK_DEBUG=1` at start) switches
//! which set *new* kmalloc allocations come from, at run time; every free goes to the cache its object came
//! from, so switching never mixes them up. `KmemCache` instances choose at creation.
//!
//! # Checks that are always on
//!
//! Every free checks, in O(1), that the pointer is inside the arena, on a page that is allocated, exactly at the
//! start of an object (not an interior pointer), and for `kmem_cache_free` that the object belongs to the cache
//! given. A free of the object at the head of the thread's list is refused (a double free). A slab whose in-use
//! count would go below zero rejects the push (a double free that reached it), and so does a released slab.
//!
//! The free lists themselves are checked on the slow paths, which walk them anyway or cost one walk of a list
//! already in the cache: every link must be 0 or an object of the cache (of the same slab, on a slab's list),
//! a list must not loop, and it must be as long as counted. A loop is what a double free of an object *not* at
//! the head of a list makes (the object is linked in front of a list that already holds it); a link that is no
//! object is a write after free into a free object's first word (or its free-pointer word).
//!
//! | where | what is checked |
//! |---|---|
//! | flush of a thread's list (it grew past its mark), `trim`, thread exit, cache destroy | the whole list |
//! | refill of a thread's list from a slab | the chain of the slab's free objects it takes |
//! | drain of deferred frees (frees made while a signal handler interrupted the list's owner) | that chain |
//! | release of a slab that counts no object in use (a shrink) | its list holds all its objects |
//! | the shared path's pop of one object from a slab | the link it follows |
//!
//! Damage found is reported and cut out, never followed: a loop is cut so that each object stays free once; a
//! list is cut before an object whose link is damaged, and that object and what followed it are leaked (their
//! slab counts them in use for good); a slab that looked empty because of a double free is repaired and kept,
//! not released under a live object. What the default mode does **not** catch: the allocation fast path pops
//! without looking, so an object freed twice (not at the head) that is allocated again before the next of
//! those slow paths is handed out twice; a double free made by two racing frees; and a write after free that
//! does not touch the link word, or writes a value that is an object of the cache.
//!
//! # Hardened mode
//!
//! A cache created with [`SlabFlags::HARDENED`](crate::SlabFlags::HARDENED) (or every cache, the kmalloc
//! classes included, with `NOLOCK_HARDENED=1` or [`set_hardened_default`] before the first allocation) works
//! like the kernel's `SLAB_FREELIST_HARDENED` and mimalloc's secure mode:
//!
//! - every free-list link is stored as `next ^ key ^ bswap(address of the link word)`, `key` a random secret of
//!   the cache (`getrandom`): a leaked free object reveals no heap address, and a forged link needs the key;
//! - every pop — the thread's list, a slab's list, and the chains the slow paths walk — decodes the link it is
//!   about to follow and checks that it is 0 or an object of the cache; anything else is reported and not
//!   followed (the list is cut and leaked, the allocation refills);
//! - an allocated object's link word is cleared, so a free can tell a free object from a live one: a free of
//!   an object whose link word decodes to 0 or to an object of the cache is refused as a double free — on any
//!   list, this thread's, another thread's or a slab's, and not only at the head;
//! - plus everything the default mode checks.
//!
//! Its cost: hardened caches never take the inline fast paths (each allocation and free goes through the full
//! path, with a few more loads and a descriptor lookup). What it does not catch: a double free of an object
//! that sits on a deferred-free list (those links are plain); two frees of one object racing on two threads;
//! a write after free that leaves the link word alone, or (with probability about 2^-40 per damaged word)
//! writes one that decodes to an object of the cache. Debug caches (above) catch those with its per-object
//! state word and poison, at a higher cost.
//!
//! # Reports
//!
//! A refused free is reported on standard error with raw `write(2)` (no lock, no allocation; safe in a signal
//! handler), naming the pointer, what is wrong and the cache, and is counted. Nothing is freed or changed by a
//! refused free. The `try_*` variants of the free functions return the error instead of printing it.

use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use super::cache::{CacheInner, CacheName};

/// What is wrong with a pointer given to a free function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeErrorKind {
    /// The pointer is not inside nolock's arena (it came from another allocator, the stack, ...).
    Foreign,
    /// The memory is not allocated: a free page, or a slot that is already free.
    NotAllocated,
    /// The pointer belongs to an `alloc_pages_nolock` run, which must be freed with `free_pages_nolock`.
    PagesRun,
    /// The pointer is inside an object but not at its start.
    InteriorPointer {
        /// Where the object starts.
        object: usize,
        /// How far from the start the pointer is (negative: in front of the object).
        offset: isize,
    },
    /// The object is already free.
    DoubleFree,
    /// `kmem_cache_free` was given an object of another cache.
    WrongCache {
        /// The cache the object really belongs to.
        owner: CacheName,
    },
    /// A red zone next to the object was overwritten (debug caches).
    RedZone {
        /// Offset from the object start of the first damaged byte (negative: before the object).
        offset: isize,
    },
}

/// A refused free: what, where, and which cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeError {
    /// What is wrong.
    pub kind: FreeErrorKind,
    /// The pointer given.
    pub ptr: usize,
    /// The cache involved, where known.
    pub cache: Option<CacheName>,
}

impl FreeError {
    /// An error about `ptr`.
    pub fn new(kind: FreeErrorKind, ptr: usize) -> Self {
        Self { kind, ptr, cache: None }
    }

    /// Name the cache.
    pub fn in_cache(mut self, name: CacheName) -> Self {
        self.cache = Some(name);
        self
    }
}

impl core::fmt::Display for FreeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let p = self.ptr;
        match self.kind {
            FreeErrorKind::Foreign => write!(f, "{p:#x} is not from nolock's arena")?,
            FreeErrorKind::NotAllocated => write!(f, "{p:#x} is not allocated")?,
            FreeErrorKind::PagesRun => {
                write!(f, "{p:#x} is an alloc_pages_nolock run; free it with free_pages_nolock")?
            }
            FreeErrorKind::InteriorPointer { object, offset } => {
                write!(f, "{p:#x} points {offset} bytes into the object at {object:#x}, not at its start")?
            }
            FreeErrorKind::DoubleFree => write!(f, "double free of {p:#x}")?,
            FreeErrorKind::WrongCache { owner } => write!(f, "{p:#x} belongs to cache '{owner}'")?,
            FreeErrorKind::RedZone { offset } => {
                write!(f, "red zone of the object at {p:#x} overwritten at offset {offset}")?
            }
        }
        if let Some(c) = self.cache {
            write!(f, " (cache '{c}')")?;
        }
        Ok(())
    }
}

impl std::error::Error for FreeError {}

use crate::report::emit;
pub use crate::report::{reports, set_quiet};

/// Report a refused free on standard error (async-signal-safe).
#[cold]
pub(crate) fn report(e: &FreeError) {
    emit(format_args!("invalid free: {e}; nothing was freed"));
}

/// Report a thread list that stayed busy while a cache was being destroyed.
#[cold]
pub(crate) fn report_stuck_shard(shard: u32, cache: CacheName) {
    emit(format_args!(
        "shard {shard} kept cache '{cache}' busy during destroy (a signal handler left the allocator by longjmp?); \
         its cached objects are leaked"
    ));
}

/// Report a `kfree_rcu_nolock` whose head is too far into its object to be encoded.
#[cold]
pub(crate) fn report_kfree_rcu_offset(ptr: usize, off: usize) {
    emit(format_args!(
        "kfree_rcu_nolock({ptr:#x}): no pointer block was available and the rcu_head, {} bytes from the pointer, is \
         not inside the object it starts (or the pointer is no nolock object); the object is leaked instead of \
         freed too early",
        off as isize
    ));
}

/// Report a cache destroyed while objects were still allocated.
#[cold]
pub(crate) fn report_destroy_live(cache: CacheName, live: u64, slabs: u64) {
    emit(format_args!(
        "cache '{cache}' destroyed with {live} objects still allocated in {slabs} slabs; \
         those slabs are left in place and the cache slot is retired"
    ));
}

/// Report a free list found damaged: the free object `obj` links to `link`, which is not a free object of the
/// cache (a write after free into its link word); `obj` 0: the list starts at `link`. The list was cut there:
/// its remaining objects are leaked.
#[cold]
pub(crate) fn report_corrupt_link(cache: CacheName, obj: usize, link: usize) {
    if obj == 0 {
        return emit(format_args!(
            "free list of cache '{cache}' damaged: it starts at {link:#x}, which is not a free object of the \
             cache (a damaged link was followed earlier); the list was dropped and its objects are leaked"
        ));
    }
    emit(format_args!(
        "free list of cache '{cache}' damaged: free object {obj:#x} links to {link:#x}, which is not a free \
         object of the cache (written after free?); the list was cut before it and the rest is leaked"
    ));
}

/// Report a free list that loops back to `obj`: an object freed twice while it was already on a free list.
#[cold]
pub(crate) fn report_freelist_loop(cache: CacheName, obj: usize) {
    emit(format_args!(
        "double free of {obj:#x} (cache '{cache}'): found when a free list looped back to it; the loop was \
         cut, the object stays free once, and the objects that followed its first place are leaked"
    ));
}

/// Report a free list whose length is not what its owner counted (a link overwritten with a valid-looking
/// value, or an object freed twice in a way the other checks missed).
#[cold]
pub(crate) fn report_freelist_length(cache: CacheName, counted: u64, found: u64) {
    emit(format_args!(
        "free list of cache '{cache}' holds {found} objects where {counted} were counted (damaged by a write \
         after free or a double free); it is used as found and the difference is leaked"
    ));
}

// -------------------------------------------------------------------------------------------------------------
// Debug slots
// -------------------------------------------------------------------------------------------------------------

const RZ_FREE: u8 = 0xbb;
const RZ_ALLOC: u8 = 0xcc;
const POISON: u8 = 0x6b;
const POISON_END: u8 = 0xa5;
const RZ_RIGHT: usize = 16;
const ST_FREE: u64 = 0x4652_4545_f4ee_f4ee;
const ST_ALLOC: u64 = 0x414c_4c4f_a110_ca7e;

struct Slot {
    slot: usize,
    obj: usize,
    size: usize,
}

impl Slot {
    fn of(c: &CacheInner, slot: usize) -> Self {
        let cfg = c.cfg();
        Self { slot, obj: slot + cfg.obj_off as usize, size: cfg.size as usize }
    }

    fn left(&mut self) -> &mut [u8] {
        // SAFETY: the left red zone is [slot, obj) inside a slot of a debug cache, owned by the caller.
        unsafe { core::slice::from_raw_parts_mut(self.slot as *mut u8, self.obj - self.slot) }
    }

    fn right(&mut self) -> &mut [u8] {
        // SAFETY: the right red zone follows the object inside the slot.
        unsafe { core::slice::from_raw_parts_mut((self.obj + self.size) as *mut u8, RZ_RIGHT) }
    }

    fn object(&mut self) -> &mut [u8] {
        // SAFETY: the object is inside the slot, owned by the caller.
        unsafe { core::slice::from_raw_parts_mut(self.obj as *mut u8, self.size) }
    }

    fn state(&self) -> &AtomicU64 {
        // SAFETY: the state word follows the right red zone, 8-aligned, inside the slot.
        unsafe { &*((self.obj + self.size + RZ_RIGHT) as *const AtomicU64) }
    }

    fn poison(&mut self) {
        let o = self.object();
        o.fill(POISON);
        if let Some(last) = o.last_mut() {
            *last = POISON_END;
        }
    }

    /// First byte of the object that does not hold the poison pattern.
    fn poison_damage(&mut self) -> Option<usize> {
        let o = self.object();
        let n = o.len();
        o.iter().enumerate().position(|(i, &b)| b != if i + 1 == n { POISON_END } else { POISON })
    }

    /// First red-zone byte (as an offset from the object start) that does not hold `pat`.
    fn red_zone_damage(&mut self, pat: u8) -> Option<isize> {
        let left = self.left();
        let len = left.len() as isize;
        if let Some(i) = left.iter().position(|&b| b != pat) {
            return Some(i as isize - len);
        }
        self.right().iter().position(|&b| b != pat).map(|i| (self.size + i) as isize)
    }
}

/// Lay out a fresh slot of a debug cache: free red zones, poison, state FREE.
pub(crate) fn init_slot(c: &CacheInner, slot: usize) {
    let mut s = Slot::of(c, slot);
    s.left().fill(RZ_FREE);
    s.right().fill(RZ_FREE);
    if poisons(c) {
        s.poison();
    }
    s.state().store(ST_FREE, Ordering::Relaxed);
}

/// A slot of a debug cache is being handed out: check it was left alone while free, mark it allocated.
pub(crate) fn on_alloc(c: &CacheInner, slot: usize) {
    let mut s = Slot::of(c, slot);
    let name = c.name();
    if s.state().swap(ST_ALLOC, Ordering::AcqRel) != ST_FREE {
        c.counters.debug_errors.fetch_add(1, Ordering::Relaxed);
        emit(format_args!("slot {slot:#x} of cache '{name}' was not marked free when allocated (corrupted)"));
    }
    if poisons(c)
        && let Some(at) = s.poison_damage()
    {
        c.counters.debug_errors.fetch_add(1, Ordering::Relaxed);
        emit(format_args!(
            "object {:#x} of cache '{name}' was written after it was freed (first changed byte at offset {at})",
            s.obj
        ));
    }
    if let Some(at) = s.red_zone_damage(RZ_FREE) {
        c.counters.debug_errors.fetch_add(1, Ordering::Relaxed);
        emit(format_args!("red zone of free object {:#x} of cache '{name}' overwritten at offset {at}", s.obj));
    }
    s.left().fill(RZ_ALLOC);
    s.right().fill(RZ_ALLOC);
}

/// A debug object is being freed: refuse double frees and damaged red zones, then poison it.
pub(crate) fn on_free(c: &CacheInner, addr: usize, slot: usize) -> Result<(), FreeError> {
    let mut s = Slot::of(c, slot);
    let err = |kind| Err(FreeError::new(kind, addr).in_cache(c.name()));
    // The CAS decides between two racing frees of the same object; only the winner looks at the red zones.
    match s.state().compare_exchange(ST_ALLOC, ST_FREE, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => {}
        Err(ST_FREE) => return err(FreeErrorKind::DoubleFree),
        Err(_) => return err(FreeErrorKind::NotAllocated),
    }
    if let Some(offset) = s.red_zone_damage(RZ_ALLOC) {
        // Keep the damaged object out of circulation: it stays "allocated" and is never handed out again.
        s.state().store(ST_ALLOC, Ordering::Release);
        return err(FreeErrorKind::RedZone { offset });
    }
    if poisons(c) {
        s.poison();
    }
    s.left().fill(RZ_FREE);
    s.right().fill(RZ_FREE);
    Ok(())
}

/// Type-safe caches are not poisoned: readers may still probe a freed object's fields (kernel slub_debug makes
/// the same exception for `SLAB_TYPESAFE_BY_RCU`).
fn poisons(c: &CacheInner) -> bool {
    c.cfg().typesafe.is_none()
}

// -------------------------------------------------------------------------------------------------------------
// Hardened mode
// -------------------------------------------------------------------------------------------------------------

/// `SlabState::slow_flags`: the plain kmalloc classes are hardened (their fast paths are off). The bits 1 and 2 are
/// `global`'s; this one is kept at the top of the byte.
pub(crate) const SLOW_HARDENED: u8 = 0x80;

const TRI_UNSET: u8 = 0;
const TRI_OFF: u8 = 1;
const TRI_ON: u8 = 2;
static HARDENED_DEFAULT: AtomicU8 = AtomicU8::new(TRI_UNSET);

/// Make hardened mode the default (or not) for caches created from now on: `KmemCache`s built without an
/// explicit choice and — if called before nolock's first use, when they are created — the kmalloc classes.
/// Without a call, `NOLOCK_HARDENED=1` in the environment turns it on.
pub fn set_hardened_default(on: bool) {
    HARDENED_DEFAULT.store(if on { TRI_ON } else { TRI_OFF }, Ordering::Relaxed);
}

/// Whether new caches are hardened by default ([`set_hardened_default`], else `NOLOCK_HARDENED`).
///
/// # Context
/// Any context (one load, or a read of the environment).
pub fn hardened_default() -> bool {
    match HARDENED_DEFAULT.load(Ordering::Relaxed) {
        TRI_ON => true,
        TRI_OFF => false,
        _ => crate::sys::getenv(c"NOLOCK_HARDENED").is_some_and(|v| !matches!(v, b"" | b"0" | b"off")),
    }
}

/// Whether the kmalloc classes are hardened (decided when nolock started).
pub fn kmalloc_hardened() -> bool {
    super::tables::state_if_init().is_some_and(|g| g.slow_flags.load(Ordering::Relaxed) & SLOW_HARDENED != 0)
}

/// A fresh random key for a hardened cache's link encoding: `getrandom(2)` (non-blocking), or, where that is not
/// available, a mix of the clock, the stack address and the arena's (randomised) address. Never 0.
pub(crate) fn random_key() -> usize {
    let mut k: u64 = 0;
    // SAFETY: `k` is a valid 8-byte buffer; GRND_NONBLOCK never sleeps.
    let n = unsafe { libc::getrandom((&raw mut k).cast(), 8, libc::GRND_NONBLOCK) };
    if n != 8 {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `ts` is a valid out-pointer.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let stack = &ts as *const _ as u64;
        let arena = super::tables::state_if_init().map_or(0, |g| g as *const _ as u64);
        k = mix64((ts.tv_nsec as u64) ^ ((ts.tv_sec as u64) << 32) ^ stack.rotate_left(17) ^ arena);
    }
    if k == 0 { 0x9e37_79b9_7f4a_7c15 } else { k as usize }
}

fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

// -------------------------------------------------------------------------------------------------------------
// Run-time switches
// -------------------------------------------------------------------------------------------------------------

/// Switch kmalloc debug mode at run time: new `kmalloc_nolock` allocations come from the debug caches while it
/// is on. Objects already allocated keep the mode they were allocated with.
///
/// # Context
/// Any context (one atomic store). Initialises nolock if needed.
pub fn set_enabled(on: bool) {
    if let Some(g) = super::tables::state() {
        if on {
            g.slow_flags.fetch_or(super::tables::SLOW_DEBUG, Ordering::Relaxed);
        } else {
            g.slow_flags.fetch_and(!super::tables::SLOW_DEBUG, Ordering::Relaxed);
        }
    }
}

/// Whether kmalloc debug mode is on.
pub fn enabled() -> bool {
    super::tables::state().is_some_and(|g| g.kmalloc_debug())
}

/// Fault injection for a cache: make allocations fail on purpose so callers can test their failure paths.
/// Injected failures are counted apart from real out-of-memory failures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FaultInjection {
    /// No injected failures.
    Off,
    /// Fail every n-th allocation (n ≥ 1).
    EveryNth(u32),
    /// Fail each allocation with this probability (0.0 ..= 1.0).
    Probability(f64),
}

/// Configure fault injection on one cache (internal form).
pub(crate) fn set_fault(c: &CacheInner, f: FaultInjection) {
    let (nth, prob) = match f {
        FaultInjection::Off => (0, 0),
        FaultInjection::EveryNth(n) => (n.max(1), 0),
        FaultInjection::Probability(p) => (0, (p.clamp(0.0, 1.0) * u32::MAX as f64) as u32),
    };
    c.fault.every_nth.store(nth, Ordering::Relaxed);
    c.fault.prob.store(prob, Ordering::Relaxed);
    // Start counting afresh, so `EveryNth(n)` fails exactly the n-th, 2n-th, ... attempt from now on.
    c.fault.calls.store(0, Ordering::Relaxed);
    if (nth != 0 || prob != 0)
        && let Some(g) = super::tables::state()
    {
        g.slow_flags.fetch_or(super::tables::SLOW_FAULT, Ordering::Relaxed);
    }
}

/// Configure fault injection on every kmalloc cache (plain and debug).
pub fn set_kmalloc_fault_injection(f: FaultInjection) {
    if let Some(g) = super::tables::state() {
        for id in crate::slab::kmalloc::all_kmalloc_ids() {
            set_fault(g.cache(id), f);
        }
    }
}
