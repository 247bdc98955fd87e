//! Type safety of type-safe caches under churn (DESIGN.md §1, lifetime class D; kernel.md §7).
//!
//! One generic harness, one `#[test]` per grace-period flavour:
//! - `TYPESAFE_BY_RCU`, readers in `rcu_read_lock` sections (they spin, never sleep);
//! - `TYPESAFE_BY_SRCU_FAST` on a static `SrcuFast` domain, readers in its sections, sleeping now and then;
//! - `TYPESAFE_BY_SRCU_FAST` on the default domain (RCU Tasks Trace), readers alternating
//!   `rcu_read_lock_tasks_trace` (sleeping now and then) and plain `rcu_read_lock` (a Tasks Trace grace period
//!   implies an RCU one, so both are covered).
//!
//! Plus a deterministic check that a freed object is reused at once (same address, same type, no constructor
//! call, no grace period) even while readers of every flavour are inside their sections.
//!
//! # Objects
//!
//! Each cache has its own type tag. The constructor writes the tag; nothing clears it but the destructor, which
//! writes `DESTROYED`. The allocator's free link lives at `freeptr_offset` (word 2), away from the tag. Writers
//! never use `Gfp::ZERO` (it would clear the tag).
//!
//! # Threads
//!
//! - **Writers** allocate objects and publish them in a shared slot table (swapping out and freeing what was
//!   there: frees cross threads, half with `free_nolock`, half with `kfree_nolock`), allocate and free private
//!   bursts, and at the end of each round give their cached objects back and release empty slabs (`trim`, or
//!   `cache.shrink()`); the background worker shrinks too.
//! - **Readers** enter a read-side section, load a few pointers from the slot table, register them in a reader
//!   registry, and keep checking them inside the section: the memory still holds this cache's tag (never
//!   `DESTROYED`, never another cache's tag or a kmalloc scribble) and `page_owner(ptr)` is a slab of this cache
//!   (never `Free`, never another owner).
//! - A **scribbler** churns `kmalloc_nolock` objects and objects of a plain "decoy" cache of the same layout, and
//!   fills them with other tags, so that slab pages released too early would be reused and retyped at once.
//!
//! The tests take turns: an RCU grace period waits for every RCU reader in the process, so another test's
//! readers would stretch grace periods and could hide a release that waited for the wrong flavour.
//!
//! # Constructor and destructor accounting
//!
//! A lock-free table keyed by object address counts constructor and destructor calls per address and kind. The
//! constructor must find `ctors == dtors` (a new slab life), the destructor `ctors == dtors + 1` (exactly once per
//! slab life, after the constructor). The destructor also checks that it runs on the grace-period worker, that
//! the object still holds the tag, and that no registered reader holds a pointer into the same slab (a reader
//! that could still see the slab is inside). At the end, after `destroy`, every address has `ctors == dtors`, and
//! the totals match.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use nolock::stats::{PageOwner, page_owner};
use nolock::{Gfp, KmemCache, SlabFlags, SrcuFast, kfree_nolock, kmalloc_nolock};

// ------------------------------------------------------------------------------------------------------------
// Parameters
// ------------------------------------------------------------------------------------------------------------

/// Writer threads per test.
const WRITERS: usize = 2;
/// Reader threads per test.
const READERS: usize = 3;
/// Rounds per writer; every round ends with a slab release (trim or shrink).
const ROUNDS: usize = if cfg!(debug_assertions) { 20 } else { 150 };
/// Random slot operations per writer round.
const OPS: usize = if cfg!(debug_assertions) { 1000 } else { 5000 };
/// Objects allocated and freed as a private burst per round (several slabs).
const BURST: usize = 700;
/// Slots of the shared publication table.
const SLOTS: usize = 1024;
/// Pointers a reader loads and holds per section.
const HOLD: usize = 4;
/// Checks a reader makes of each held pointer per section.
const CHECKS: usize = 24;

/// Kinds (one per test): separate tags, counters and address tables.
const KINDS: usize = 4;
const K_RCU: usize = 0;
const K_SRCU: usize = 1;
const K_TRACE: usize = 2;
const K_REUSE: usize = 3;

/// The tag written by kind `k`'s constructor.
const fn tag_of(k: usize) -> u64 {
    0x5459_5045_0000_0000 | ((k as u64 + 1) * 0x0101_0101)
}
/// What the destructor leaves in the tag word.
const DESTROYED: u64 = 0xdead_dead_dead_dead;
/// What the scribbler writes into kmalloc memory.
const SCRIBBLE: u64 = 0x5c41_b81e_5c41_b81e;
/// What the scribbler writes into objects of the decoy cache.
const DECOY: u64 = 0xdec0_1dec_01de_c01d;

// ------------------------------------------------------------------------------------------------------------
// The object
// ------------------------------------------------------------------------------------------------------------

/// Word 0: tag (constructor / destructor only). Word 1: serial of the current allocation (writers). Word 2: the
/// allocator's free link (`freeptr_offset`). Words 3..8: a pattern of the serial (writers).
#[repr(C)]
struct Obj {
    tag: AtomicU64,
    serial: AtomicU64,
    link: AtomicU64,
    payload: [AtomicU64; 5],
}

const FREEPTR: usize = core::mem::offset_of!(Obj, link);

fn obj<'a>(p: usize) -> &'a Obj {
    // Every address passed here is an object of a type-safe cache of `Obj` layout, looked at while the caller
    // owns it or is inside a read-side section that began while it was published: the memory is an `Obj` (all
    // atomics) for that long. (Should the library break that promise, the reads still hit mapped arena memory.)
    // SAFETY: as just explained.
    unsafe { &*(p as *const Obj) }
}

// ------------------------------------------------------------------------------------------------------------
// Per-kind state: counters, violations, reader registry, address table
// ------------------------------------------------------------------------------------------------------------

const TABLE_BITS: u32 = 19;
const TABLE_SIZE: usize = 1 << TABLE_BITS;

struct Entry {
    key: AtomicUsize,
    /// Constructor calls << 32 | destructor calls.
    counts: AtomicU64,
}

/// What a check found wrong.
#[derive(Clone, Copy, Debug)]
enum V {
    /// The constructor ran twice without the destructor in between.
    CtorTwice,
    /// The destructor found another tag than its cache's (ran twice, or the memory was retyped).
    DtorTag,
    /// The destructor ran off the grace-period worker.
    DtorThread,
    /// The destructor ran while a registered reader holds a pointer into the same slab.
    DtorUnderReader,
    /// The destructor ran without a constructor before it, or twice.
    DtorCount,
    /// An allocation returned memory without the tag.
    AllocTag,
    /// An object we own was changed by someone else.
    OwnedDamaged,
    /// A reader inside its section saw the tag change.
    ReaderTag,
    /// A reader inside its section saw the page not owned by the cache.
    ReaderPage,
}
const NV: usize = 9;

struct Kind {
    ctors: AtomicU64,
    dtors: AtomicU64,
    violations: [AtomicU64; NV],
    messages: Mutex<Vec<String>>,
    /// Bytes per slab (slabs are aligned to their size): set once the cache exists.
    slab_bytes: AtomicUsize,
    /// Addresses readers hold right now (0: none), `HOLD` per reader.
    held: [AtomicUsize; READERS * HOLD],
    /// Sections in which a reader held a pointer while the cache had slabs waiting for their grace period.
    held_over_pending: AtomicU64,
    reads: AtomicU64,
    table: [Entry; TABLE_SIZE],
}

impl Kind {
    const fn new() -> Self {
        Self {
            ctors: AtomicU64::new(0),
            dtors: AtomicU64::new(0),
            violations: [const { AtomicU64::new(0) }; NV],
            messages: Mutex::new(Vec::new()),
            slab_bytes: AtomicUsize::new(0),
            held: [const { AtomicUsize::new(0) }; READERS * HOLD],
            held_over_pending: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            table: [const { Entry { key: AtomicUsize::new(0), counts: AtomicU64::new(0) } }; TABLE_SIZE],
        }
    }

    fn violation(&self, v: V, msg: String) {
        if self.violations[v as usize].fetch_add(1, Ordering::Relaxed) < 3 {
            self.messages.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{v:?}: {msg}"));
        }
    }

    /// `(violation, count)` for every kind of violation seen.
    fn violations(&self) -> Vec<(V, u64)> {
        use V::*;
        [CtorTwice, DtorTag, DtorThread, DtorUnderReader, DtorCount, AllocTag, OwnedDamaged, ReaderTag, ReaderPage]
            .into_iter()
            .map(|v| (v, self.violations[v as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n != 0)
            .collect()
    }

    /// The table entry of `addr` (inserted on first use). Lock-free linear probing.
    fn entry(&self, addr: usize) -> &Entry {
        let mut i = (addr as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) as usize >> (64 - TABLE_BITS);
        for _ in 0..TABLE_SIZE {
            let e = &self.table[i];
            let k = e.key.load(Ordering::Acquire);
            if k == addr {
                return e;
            }
            if k == 0 {
                match e.key.compare_exchange(0, addr, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => return e,
                    Err(now) if now == addr => return e,
                    Err(_) => {}
                }
            }
            i = (i + 1) & (TABLE_SIZE - 1);
        }
        eprintln!("typesafe_torture: address table full (a test harness limit)");
        std::process::abort();
    }

    /// Start of the slab that holds `addr` (`addr` itself before the slab size is known). Never panics: it runs
    /// in the destructor, on the grace-period worker.
    fn slab_of(&self, addr: usize) -> usize {
        match self.slab_bytes.load(Ordering::Relaxed) {
            0 => addr,
            b => addr & !(b - 1),
        }
    }
}

static STATE: [Kind; KINDS] = [const { Kind::new() }; KINDS];

/// Constructor of kind `K`: once per object per slab life.
fn ctor<const K: usize>(p: NonNull<u8>) {
    let st = &STATE[K];
    let addr = p.as_ptr() as usize;
    let prev = st.entry(addr).counts.fetch_add(1 << 32, Ordering::AcqRel);
    let (c, d) = (prev >> 32, prev & 0xffff_ffff);
    if c != d {
        st.violation(
            V::CtorTwice,
            format!("constructor ran again at {addr:#x} within one slab life (ctors {c}, dtors {d})"),
        );
    }
    let o = obj(addr);
    o.tag.store(tag_of(K), Ordering::Release);
    o.serial.store(0, Ordering::Relaxed);
    st.ctors.fetch_add(1, Ordering::Relaxed);
}

/// Destructor of kind `K`: once per object when its slab is really released.
fn dtor<const K: usize>(p: NonNull<u8>) {
    let st = &STATE[K];
    let addr = p.as_ptr() as usize;
    let o = obj(addr);
    let tag = o.tag.load(Ordering::Acquire);
    if tag != tag_of(K) {
        st.violation(V::DtorTag, format!("destructor found tag {tag:#x} at {addr:#x} (expected {:#x})", tag_of(K)));
    }
    if std::thread::current().name() != Some("nolock-rcu") {
        st.violation(
            V::DtorThread,
            format!("destructor ran on thread {:?}, not the grace-period worker", std::thread::current().name()),
        );
    }
    // No reader that could still see this slab may be inside its section.
    let slab = st.slab_of(addr);
    for h in &st.held {
        let v = h.load(Ordering::SeqCst);
        if v != 0 && st.slab_of(v) == slab {
            st.violation(
                V::DtorUnderReader,
                format!("destructor of {addr:#x} ran while a reader inside its section holds {v:#x} in the same slab"),
            );
        }
    }
    let prev = st.entry(addr).counts.fetch_add(1, Ordering::AcqRel);
    let (c, d) = (prev >> 32, prev & 0xffff_ffff);
    if c != d + 1 {
        st.violation(
            V::DtorCount,
            format!("destructor at {addr:#x}: ctors {c}, dtors {d} before it (not once per slab life)"),
        );
    }
    o.tag.store(DESTROYED, Ordering::Release);
    o.serial.store(DESTROYED, Ordering::Relaxed);
    st.dtors.fetch_add(1, Ordering::Relaxed);
}

// ------------------------------------------------------------------------------------------------------------
// Flavours
// ------------------------------------------------------------------------------------------------------------

static DOMAIN: SrcuFast = SrcuFast::new();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    Rcu,
    StaticSrcu,
    TasksTrace,
}

/// A read-side section of whichever kind.
enum Section {
    Rcu(#[allow(dead_code)] nolock::RcuReadGuard),
    Srcu(#[allow(dead_code)] nolock::SrcuFastGuard<'static>),
}

impl Flavour {
    fn flags(self) -> SlabFlags {
        match self {
            Flavour::Rcu => SlabFlags::TYPESAFE_BY_RCU,
            Flavour::StaticSrcu | Flavour::TasksTrace => SlabFlags::TYPESAFE_BY_SRCU_FAST,
        }
    }

    /// Enter a section for reader `r`'s `n`-th section; returns whether it may sleep.
    fn enter(self, r: usize, n: u64) -> (Section, bool) {
        match self {
            Flavour::Rcu => (Section::Rcu(nolock::rcu_read_lock()), false),
            Flavour::StaticSrcu => (Section::Srcu(DOMAIN.read_lock_fast()), true),
            Flavour::TasksTrace => {
                if (r as u64 + n).is_multiple_of(2) {
                    (Section::Srcu(nolock::rcu_read_lock_tasks_trace()), true)
                } else {
                    (Section::Rcu(nolock::rcu_read_lock()), false)
                }
            }
        }
    }

    /// Wait for every pending slab release of this flavour.
    fn barrier(self) {
        match self {
            Flavour::Rcu => nolock::rcu_barrier(),
            Flavour::StaticSrcu => DOMAIN.barrier(),
            Flavour::TasksTrace => nolock::rcu_barrier_tasks_trace(),
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// The harness
// ------------------------------------------------------------------------------------------------------------

/// Aborts the process if a test hangs (a grace period that never ends would otherwise stall the run).
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    fn new(what: &'static str, limit: Duration) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("typesafe_torture: {what} still running after {limit:?}: deadlock? aborting");
                std::process::abort();
            }
        });
        Self(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.0.take());
    }
}

fn rng_step(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

struct Ctx<'a> {
    k: usize,
    flavour: Flavour,
    cache: &'a KmemCache,
    name: String,
    slots: Vec<AtomicUsize>,
    serial: AtomicU64,
    stop_readers: AtomicBool,
    releases: AtomicU64,
    frees_kfree: AtomicU64,
}

impl Ctx<'_> {
    fn st(&self) -> &'static Kind {
        &STATE[self.k]
    }

    /// Whether `owner` is a slab of this cache (or of its paired fallback cache).
    fn owned_by_cache(&self, owner: PageOwner) -> bool {
        match owner {
            PageOwner::Slab(n) => n.as_str() == self.name || n.as_str() == format!("{}-fb", self.name),
            _ => false,
        }
    }

    /// A fresh object: it must carry the tag (constructor ran once, free and reuse kept it); stamp it.
    fn alloc(&self) -> usize {
        let p = self.cache.alloc_nolock(Gfp::NONE).expect("type-safe cache allocation failed").as_ptr() as usize;
        let o = obj(p);
        let tag = o.tag.load(Ordering::Acquire);
        if tag != tag_of(self.k) {
            self.st().violation(V::AllocTag, format!("allocation returned {p:#x} with tag {tag:#x}"));
        }
        let s = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        o.serial.store(s, Ordering::Relaxed);
        for (i, w) in o.payload.iter().enumerate() {
            w.store(s ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15), Ordering::Relaxed);
        }
        p
    }

    /// Free an object we own, after checking its stamp; alternately through the cache and `kfree_nolock`.
    fn free(&self, p: usize, via_kfree: bool) {
        let o = obj(p);
        let s = o.serial.load(Ordering::Relaxed);
        let tag = o.tag.load(Ordering::Relaxed);
        let intact = o
            .payload
            .iter()
            .enumerate()
            .all(|(i, w)| w.load(Ordering::Relaxed) == s ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if tag != tag_of(self.k) || !intact {
            self.st().violation(
                V::OwnedDamaged,
                format!("owned object {p:#x} damaged: tag {tag:#x}, serial {s}, pattern ok {intact}"),
            );
        }
        if via_kfree {
            self.frees_kfree.fetch_add(1, Ordering::Relaxed);
            // SAFETY: we own `p` (allocated here, or swapped out of the slot table exactly once).
            unsafe { nolock::try_kfree_nolock(p as *mut u8) }.expect("kfree_nolock of a type-safe object");
        } else {
            // SAFETY: as above.
            unsafe { self.cache.try_free_nolock(NonNull::new(p as *mut u8).expect("non-null")) }
                .expect("free_nolock of a type-safe object");
        }
    }

    fn writer(&self, w: usize) {
        let mut rng = 0x1234_5678 ^ ((self.k * 16 + w) as u64) << 20;
        let mut burst = Vec::with_capacity(BURST);
        for round in 0..ROUNDS {
            for _ in 0..OPS {
                let r = rng_step(&mut rng);
                let slot = &self.slots[(r as usize >> 8) % SLOTS];
                let old = if r.is_multiple_of(5) {
                    slot.swap(0, Ordering::AcqRel)
                } else {
                    slot.swap(self.alloc(), Ordering::AcqRel)
                };
                if old != 0 {
                    self.free(old, r & 0x10 != 0);
                }
            }
            // A private burst: several slabs' worth, freed at once (most of it beyond the thread's list).
            for _ in 0..BURST {
                burst.push(self.alloc());
            }
            for (i, p) in burst.drain(..).enumerate() {
                self.free(p, i % 3 == 0);
            }
            // Release empty slabs while readers hold pointers.
            if round % 4 == w % 4 {
                // Empty the whole table first: every slab may become empty.
                for s in &self.slots {
                    let old = s.swap(0, Ordering::AcqRel);
                    if old != 0 {
                        self.free(old, false);
                    }
                }
            }
            let pending_before = self.cache.stats().pending_slabs;
            if round % 2 == 0 {
                nolock::trim();
            } else {
                // Give this thread's cached objects back first (trim does that), then shrink only this cache.
                nolock::trim();
                self.cache.shrink();
            }
            if self.cache.stats().pending_slabs > pending_before {
                self.releases.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn check_held(&self, p: usize) {
        let st = self.st();
        let tag = obj(p).tag.load(Ordering::Acquire);
        if tag != tag_of(self.k) {
            let what = match tag {
                DESTROYED => "DESTROYED (destructor ran)",
                SCRIBBLE => "a kmalloc scribble (pages reused)",
                DECOY => "an object of another cache (pages retyped)",
                t if (0..KINDS).any(|k| tag_of(k) == t) => "another type-safe cache's tag (pages retyped)",
                _ => "garbage",
            };
            st.violation(V::ReaderTag, format!("reader saw {what} {tag:#x} at {p:#x}, expected {:#x}", tag_of(self.k)));
        }
        let owner = page_owner(p as *const u8);
        if !self.owned_by_cache(owner) {
            st.violation(
                V::ReaderPage,
                format!("reader holding {p:#x}: page_owner is {owner:?}, not a slab of '{}'", self.name),
            );
        }
    }

    fn reader(&self, r: usize) {
        let st = self.st();
        let mut rng = 0xabcd_0000 ^ ((self.k * 16 + r) as u64) << 24;
        let mut held = [0usize; HOLD];
        let mut n_sections = 0u64;
        let mut reads = 0u64;
        while !self.stop_readers.load(Ordering::Acquire) {
            n_sections += 1;
            let (section, may_sleep) = self.flavour.enter(r, n_sections);
            let mut n = 0;
            for _ in 0..HOLD {
                let i = rng_step(&mut rng) as usize % SLOTS;
                let p = self.slots[i].load(Ordering::Acquire);
                if p != 0 {
                    st.held[r * HOLD + n].store(p, Ordering::SeqCst);
                    held[n] = p;
                    n += 1;
                }
            }
            let sleep_at = if may_sleep && rng_step(&mut rng).is_multiple_of(4) { CHECKS / 2 } else { usize::MAX };
            let mut saw_pending = false;
            for c in 0..CHECKS {
                for &p in &held[..n] {
                    self.check_held(p);
                    reads += 1;
                }
                if c == sleep_at {
                    std::thread::sleep(Duration::from_micros(100 + rng_step(&mut rng) % 900));
                } else if c == CHECKS / 3 && n > 0 {
                    saw_pending = self.cache.stats().pending_slabs > 0;
                } else {
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                }
            }
            if saw_pending {
                st.held_over_pending.fetch_add(1, Ordering::Relaxed);
            }
            for h in &st.held[r * HOLD..r * HOLD + n] {
                h.store(0, Ordering::SeqCst);
            }
            drop(section);
            if n == 0 {
                std::thread::yield_now();
            }
        }
        st.reads.fetch_add(reads, Ordering::Relaxed);
    }
}

/// Churn kmalloc memory and a plain cache of the same layout with foreign tags, so pages released too early are
/// retyped at once.
fn scribbler(stop: &AtomicBool, decoy: &KmemCache) {
    let sizes = [64usize, 128, 512, 4096];
    let mut live: Vec<(usize, bool)> = Vec::new();
    let mut i = 0usize;
    while !stop.load(Ordering::Acquire) {
        i += 1;
        let (p, len, tag, from_decoy) = if i.is_multiple_of(2) {
            let size = sizes[(i / 2) % sizes.len()];
            (kmalloc_nolock(size, Gfp::NONE), size, SCRIBBLE, false)
        } else {
            (decoy.alloc_nolock(Gfp::NONE), core::mem::size_of::<Obj>(), DECOY, true)
        };
        if let Some(p) = p {
            let words = p.as_ptr().cast::<u64>();
            for w in 0..len / 8 {
                // SAFETY: a fresh object of at least `len` bytes, ours.
                unsafe { words.add(w).write_volatile(tag) };
            }
            live.push((p.as_ptr() as usize, from_decoy));
        }
        if live.len() > 512 {
            for (p, _) in live.drain(..) {
                // SAFETY: our objects (kmalloc or decoy cache), freed once; kfree_nolock routes both.
                unsafe { kfree_nolock(p as *mut u8) };
            }
            nolock::trim();
        }
    }
    for (p, _) in live {
        // SAFETY: as above.
        unsafe { kfree_nolock(p as *mut u8) };
    }
    nolock::trim();
}

/// The tests take turns: a grace period of one flavour can be held up by another test's readers (an RCU grace
/// period waits for every RCU reader in the process), which would hide a release that waited for the wrong
/// grace period.
static SERIAL: Mutex<()> = Mutex::new(());

fn torture<const K: usize>(flavour: Flavour, name: &str) {
    // The watchdog also covers the wait for this test's turn, so a test that hangs is caught either way.
    let _wd = Watchdog::new("typesafe torture", Duration::from_secs(240));
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let st = &STATE[K];
    let mut builder = KmemCache::builder(name, Layout::new::<Obj>())
        .flags(flavour.flags())
        .freeptr_offset(FREEPTR)
        .ctor(ctor::<K>)
        .dtor(dtor::<K>);
    if flavour == Flavour::StaticSrcu {
        builder = builder.srcu_domain(&DOMAIN);
    }
    let cache = builder.build().expect("cache");
    let s0 = cache.stats();
    assert!(s0.slab_pages.is_power_of_two() && s0.slab_pages <= 64, "slabs are aligned to their size: {s0:?}");
    st.slab_bytes.store(s0.slab_pages * 4096, Ordering::Relaxed);

    let ctx = Ctx {
        k: K,
        flavour,
        cache: &cache,
        name: name.to_string(),
        slots: (0..SLOTS).map(|_| AtomicUsize::new(0)).collect(),
        serial: AtomicU64::new(0),
        stop_readers: AtomicBool::new(false),
        releases: AtomicU64::new(0),
        frees_kfree: AtomicU64::new(0),
    };
    let decoy = KmemCache::new(&format!("{name}-decoy"), Layout::new::<Obj>()).expect("decoy cache");
    let stop_scribbler = AtomicBool::new(false);
    std::thread::scope(|s| {
        let ctx = &ctx;
        let readers: Vec<_> = (0..READERS).map(|r| s.spawn(move || ctx.reader(r))).collect();
        let writers: Vec<_> = (0..WRITERS).map(|w| s.spawn(move || ctx.writer(w))).collect();
        let (stop, decoy) = (&stop_scribbler, &decoy);
        let scrib = s.spawn(move || scribbler(stop, decoy));
        for w in writers {
            w.join().expect("writer");
        }
        // Writers have exited (their lists went back to the slabs). With the readers still inside sections
        // holding pointers, empty the table and release every empty slab.
        for slot in &ctx.slots {
            let old = slot.swap(0, Ordering::AcqRel);
            if old != 0 {
                ctx.free(old, false);
            }
        }
        nolock::trim();
        cache.shrink();
        std::thread::sleep(Duration::from_millis(20));
        ctx.stop_readers.store(true, Ordering::Release);
        for r in readers {
            r.join().expect("reader");
        }
        stop_scribbler.store(true, Ordering::Release);
        scrib.join().expect("scribbler");
    });
    flavour.barrier();
    let s = cache.stats();
    assert_eq!(s.allocs, s.frees, "every object freed: {s:?}");
    assert_eq!(s.bad_frees, 0, "{s:?}");
    assert_eq!(s.failures, 0, "{s:?}");
    assert_eq!(s.pending_slabs, 0, "no slab waits after the barrier: {s:?}");
    assert!(s.slabs_freed > 0, "slabs were released during the run: {s:?}");
    let frees_kfree = ctx.frees_kfree.load(Ordering::Relaxed);
    let releases = ctx.releases.load(Ordering::Relaxed);
    drop(ctx);
    let report = cache.destroy();
    assert_eq!(report.live_objects, 0, "{report:?}");

    let ctors = st.ctors.load(Ordering::Relaxed);
    let dtors = st.dtors.load(Ordering::Relaxed);
    let mut addrs = 0usize;
    let mut unbalanced = Vec::new();
    for e in &st.table {
        let k = e.key.load(Ordering::Relaxed);
        if k != 0 {
            addrs += 1;
            let c = e.counts.load(Ordering::Relaxed);
            if c >> 32 != c & 0xffff_ffff {
                unbalanced.push((k, c >> 32, c & 0xffff_ffff));
            }
        }
    }
    println!(
        "{name} ({flavour:?}): {} allocs ({} fallback), {} kfree_nolock frees, {} slabs allocated, {} released \
         ({} writer rounds saw slabs queued), {ctors} ctors / {dtors} dtors over {addrs} addresses, {} reads in \
         sections, {} sections held pointers while slabs were pending",
        s.allocs,
        s.fallback_allocs,
        frees_kfree,
        s.slabs_allocated,
        s.slabs_freed,
        releases,
        st.reads.load(Ordering::Relaxed),
        st.held_over_pending.load(Ordering::Relaxed),
    );
    let msgs = st.messages.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let v = st.violations();
    assert!(v.is_empty(), "type-safety violations {v:?}, first of each: {msgs:#?}");
    assert!(
        unbalanced.is_empty(),
        "addresses with ctors != dtors after destroy: {:?}",
        &unbalanced[..unbalanced.len().min(10)]
    );
    assert_eq!(ctors, dtors, "one destructor per constructor after destroy");
    assert_eq!(ctors, s.slabs_allocated * s.objects_per_slab as u64, "a constructor per object of every slab");
}

#[test]
fn typesafe_by_rcu_torture() {
    let _reports = testkit::NoReports::new();
    torture::<K_RCU>(Flavour::Rcu, "tt-rcu");
}

#[test]
fn typesafe_by_srcu_fast_static_domain_torture() {
    let _reports = testkit::NoReports::new();
    torture::<K_SRCU>(Flavour::StaticSrcu, "tt-srcu");
}

#[test]
fn typesafe_by_srcu_fast_tasks_trace_torture() {
    let _reports = testkit::NoReports::new();
    torture::<K_TRACE>(Flavour::TasksTrace, "tt-trace");
}

/// A freed object is reused at once (the next allocation on the same thread returns it), as an object of the
/// same cache, without its constructor running again and without waiting for a grace period, even while
/// readers of every flavour are inside their sections.
#[test]
fn freed_objects_are_reused_at_once_even_inside_readers() {
    let _reports = testkit::NoReports::new();
    let _wd = Watchdog::new("typesafe reuse", Duration::from_secs(240));
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let st = &STATE[K_REUSE];
    for (i, flavour) in [Flavour::Rcu, Flavour::StaticSrcu, Flavour::TasksTrace].into_iter().enumerate() {
        let mut builder = KmemCache::builder("tt-reuse", Layout::new::<Obj>())
            .flags(flavour.flags())
            .freeptr_offset(FREEPTR)
            .ctor(ctor::<K_REUSE>)
            .dtor(dtor::<K_REUSE>);
        if flavour == Flavour::StaticSrcu {
            builder = builder.srcu_domain(&DOMAIN);
        }
        let cache = builder.build().expect("cache");
        st.slab_bytes.store(cache.stats().slab_pages * 4096, Ordering::Relaxed);
        let (_rcu, _srcu, _trace) =
            (nolock::rcu_read_lock(), DOMAIN.read_lock_fast(), nolock::rcu_read_lock_tasks_trace());
        let p = cache.alloc_nolock(Gfp::NONE).expect("alloc");
        let ctors = st.ctors.load(Ordering::Relaxed);
        obj(p.as_ptr() as usize).serial.store(42 + i as u64, Ordering::Relaxed);
        for round in 0..100 {
            // SAFETY: ours, freed once.
            unsafe { cache.free_nolock(p) };
            let q = cache.alloc_nolock(Gfp::NONE).expect("alloc");
            assert_eq!(q, p, "{flavour:?} round {round}: the freed object is handed out again at once");
            let o = obj(q.as_ptr() as usize);
            assert_eq!(o.tag.load(Ordering::Acquire), tag_of(K_REUSE), "reused as an object of the same type");
            assert_eq!(o.serial.load(Ordering::Relaxed), 42 + i as u64, "fields outside the free link survive reuse");
        }
        assert_eq!(st.ctors.load(Ordering::Relaxed), ctors, "no constructor call on reuse");
        // SAFETY: ours, freed once.
        unsafe { cache.free_nolock(p) };
        drop((_rcu, _srcu, _trace));
        assert_eq!(cache.destroy().live_objects, 0);
    }
    assert_eq!(st.ctors.load(Ordering::Relaxed), st.dtors.load(Ordering::Relaxed));
    assert!(st.violations().is_empty(), "{:?}", st.messages.lock().unwrap_or_else(|e| e.into_inner()));
}
