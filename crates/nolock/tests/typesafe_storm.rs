//! Type-safe caches under a signal storm, and their fallback path forced through the reentry hook.
//!
//! One `#[test]` in this binary (the page accounting at the end is process-wide, and the background worker is
//! configured off before the first nolock call), in three phases:
//!
//! 1. **Fallback, deterministically.** The reentry hook runs a nested `alloc_nolock` of the same cache at
//!    `Point::AllocFast`, where the outer allocation holds this thread's list busy (what a signal handler landing
//!    there would do). The nested object must come from the paired fallback cache: `stats().fallback_allocs`
//!    grows by one each time, the object carries the constructor's tag, and its page is a slab of `<name>-fb`.
//!    Fallback objects are freed through both `free_nolock` (the cache accepts its fallback's objects) and
//!    `kfree_nolock`, also from inside a hook at `FreeFast` (where the outer free holds the list busy). A cache
//!    built with `.fallback(false)` takes the shared path instead.
//! 2. **Storm.** Three threads, each with two POSIX timers (`SIGUSR1`, `SIGUSR2`, 100 µs: 20,000 signals/s asked
//!    per thread), allocate and free objects of two type-safe caches (`TYPESAFE_BY_RCU`, and
//!    `TYPESAFE_BY_SRCU_FAST` on a static domain) in the threads and in the handlers: bursts, held sets, an
//!    exchange array through which objects cross threads and handlers (frees of objects allocated elsewhere),
//!    and `trim`/`shrink` in the threads so that slabs are released (after a grace period) during the storm. The
//!    handlers are also type-safe readers: inside a read-side section of the cache's flavour they load an
//!    exchange slot and check that the object there (owned by someone else, possibly being freed) still carries
//!    its cache's tag and lies in a slab of that cache. Every owned object is stamped and checked before it is
//!    freed; every `None` from an allocation counts as a failure.
//! 3. **Teardown.** Everything freed; zero corruption, zero failures, zero bad frees; destroy reports no live
//!    object; after the barriers and `trim`, constructors equal destructors, the caches have left the
//!    statistics, and the page allocator holds exactly the pages it held before the test.

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nolock::hooks::{Point, set_hook};
use nolock::stats::{PageOwner, allocated_pages, page_owner, snapshot};
use nolock::{Gfp, KmemCache, SlabFlags, SrcuFast, kfree_nolock};
use testkit::{AltStack, ErrnoGuard, ThreadTimer};

// ------------------------------------------------------------------------------------------------------------
// Parameters
// ------------------------------------------------------------------------------------------------------------

const THREADS: usize = 3;
const SIGS: [libc::c_int; 3] = [libc::SIGUSR1, libc::SIGUSR2, libc::SIGPROF];
/// Period of each timer (each thread has one per signal). Unoptimized builds storm 8 times slower.
const TIMER_PERIOD: Duration = Duration::from_micros(if cfg!(debug_assertions) { 480 } else { 60 });
const STORM: Duration = Duration::from_millis(if cfg!(debug_assertions) { 1500 } else { 2500 });
/// Handlers nested deeper than this return at once (without `SA_NODEFER` nesting is bounded by `SIGS` anyway).
const MAX_NEST: u32 = SIGS.len() as u32;
const EXCHANGE_SLOTS: usize = 128;
/// A thread with no progress for this long is deadlocked.
const STALL: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------------------------
// Objects
// ------------------------------------------------------------------------------------------------------------

/// Word 0: type tag (constructor; destructor writes `DESTROYED`). Word 1: stamp of the current owner. Word 2:
/// the allocator's free link. Words 3..8: a pattern of the stamp.
#[repr(C)]
struct Obj {
    tag: AtomicU64,
    seq: AtomicU64,
    link: AtomicU64,
    payload: [AtomicU64; 5],
}

const FREEPTR: usize = core::mem::offset_of!(Obj, link);
const DESTROYED: u64 = 0xdead_dead_dead_dead;

fn obj<'a>(p: usize) -> &'a Obj {
    // SAFETY: addresses passed here are objects of the type-safe caches of this test (`Obj` layout) that the
    // caller owns, or reads inside a read-side section begun while the object was published: memory that is an
    // `Obj` (all atomics) for that long.
    unsafe { &*(p as *const Obj) }
}

fn pattern(seq: u64, i: usize) -> u64 {
    seq ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Per-cache state: tag, constructor and destructor counts, exchange slots.
struct Kind {
    tag: u64,
    ctors: AtomicU64,
    dtors: AtomicU64,
    cache: AtomicPtr<KmemCache>,
    exchange: [AtomicUsize; EXCHANGE_SLOTS],
}

const NKINDS: usize = 2;
const K_RCU: usize = 0;
const K_SRCU: usize = 1;
static KINDS: [Kind; NKINDS] = [
    Kind {
        tag: 0x5354_4f52_4d00_0001,
        ctors: AtomicU64::new(0),
        dtors: AtomicU64::new(0),
        cache: AtomicPtr::new(std::ptr::null_mut()),
        exchange: [const { AtomicUsize::new(0) }; EXCHANGE_SLOTS],
    },
    Kind {
        tag: 0x5354_4f52_4d00_0002,
        ctors: AtomicU64::new(0),
        dtors: AtomicU64::new(0),
        cache: AtomicPtr::new(std::ptr::null_mut()),
        exchange: [const { AtomicUsize::new(0) }; EXCHANGE_SLOTS],
    },
];
const NAMES: [&str; NKINDS] = ["storm-ts-rcu", "storm-ts-srcu"];

static DOMAIN: SrcuFast = SrcuFast::new();

/// Constructor: async-signal-safe (atomic stores and counters only); it runs in handlers too.
fn ctor<const K: usize>(p: NonNull<u8>) {
    let o = obj(p.as_ptr() as usize);
    if o.tag.load(Ordering::Relaxed) == KINDS[K].tag {
        // A constructor on memory that already holds this type: a second one in the same slab life.
        CTOR_TWICE.fetch_add(1, Ordering::Relaxed);
    }
    o.tag.store(KINDS[K].tag, Ordering::Release);
    o.seq.store(0, Ordering::Relaxed);
    KINDS[K].ctors.fetch_add(1, Ordering::Relaxed);
}

/// Destructor: on the grace-period worker; the tag must be intact.
fn dtor<const K: usize>(p: NonNull<u8>) {
    let o = obj(p.as_ptr() as usize);
    if o.tag.load(Ordering::Acquire) != KINDS[K].tag {
        BAD_DTOR.fetch_add(1, Ordering::Relaxed);
    }
    o.tag.store(DESTROYED, Ordering::Release);
    KINDS[K].dtors.fetch_add(1, Ordering::Relaxed);
}

// ------------------------------------------------------------------------------------------------------------
// Counters (any context)
// ------------------------------------------------------------------------------------------------------------

static SEQ: AtomicU64 = AtomicU64::new(1);
static SIGNALS: AtomicU64 = AtomicU64::new(0);
static HANDLER_ALLOCS: AtomicU64 = AtomicU64::new(0);
static TYPESAFE_READS: AtomicU64 = AtomicU64::new(0);
/// Objects looked at again after their free and a `trim`, inside the same section.
static RELEASE_READS: AtomicU64 = AtomicU64::new(0);
static THREAD_ALLOCS: AtomicU64 = AtomicU64::new(0);
static NEST_SKIPPED: AtomicU64 = AtomicU64::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);
static CORRUPT: AtomicU64 = AtomicU64::new(0);
static TYPE_VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static CTOR_TWICE: AtomicU64 = AtomicU64::new(0);
static BAD_DTOR: AtomicU64 = AtomicU64::new(0);
/// The first problem: kind (1 corruption, 2 type), address, expected, found.
static FIRST_BAD: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

static STOP: AtomicBool = AtomicBool::new(false);
static READY: AtomicUsize = AtomicUsize::new(0);
static PROGRESS: [AtomicU64; THREADS + 1] = [const { AtomicU64::new(0) }; THREADS + 1];
static WATCHDOG_DONE: AtomicBool = AtomicBool::new(false);

thread_local! {
    static DEPTH: AtomicU32 = const { AtomicU32::new(0) };
    /// Random state, advanced with one RMW so handlers and the code they interrupt never repeat a draw.
    static RNG: AtomicU64 = const { AtomicU64::new(0) };
}

fn rand() -> u64 {
    testkit::splitmix64(RNG.with(|r| r.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)))
}

fn note(kind: u64, addr: usize, expected: u64, found: u64) {
    let counter = if kind == 1 { &CORRUPT } else { &TYPE_VIOLATIONS };
    if counter.fetch_add(1, Ordering::Relaxed) == 0 && FIRST_BAD[0].load(Ordering::Relaxed) == 0 {
        FIRST_BAD[1].store(addr as u64, Ordering::Relaxed);
        FIRST_BAD[2].store(expected, Ordering::Relaxed);
        FIRST_BAD[3].store(found, Ordering::Relaxed);
        FIRST_BAD[0].store(kind, Ordering::Release);
    }
}

fn cache(k: usize) -> &'static KmemCache {
    let c = KINDS[k].cache.load(Ordering::Acquire);
    assert!(!c.is_null());
    // SAFETY: the caches are published before the storm starts and destroyed only after every storm thread has
    // been joined (and its timers deleted).
    unsafe { &*c }
}

// ------------------------------------------------------------------------------------------------------------
// Object life (any context)
// ------------------------------------------------------------------------------------------------------------

/// Allocate from cache `k`, check the tag, stamp. `None` counts a failure.
fn alloc(k: usize) -> Option<usize> {
    let Some(p) = cache(k).alloc_nolock(Gfp::NONE) else {
        FAILURES.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let p = p.as_ptr() as usize;
    let o = obj(p);
    let tag = o.tag.load(Ordering::Acquire);
    if tag != KINDS[k].tag {
        note(2, p, KINDS[k].tag, tag);
    }
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    o.seq.store(seq, Ordering::Relaxed);
    for (i, w) in o.payload.iter().enumerate() {
        w.store(pattern(seq, i), Ordering::Relaxed);
    }
    Some(p)
}

/// Check an owned object of cache `k` and free it (through the cache or `kfree_nolock`).
fn check_free(k: usize, p: usize, via_kfree: bool) {
    let o = obj(p);
    let tag = o.tag.load(Ordering::Relaxed);
    if tag != KINDS[k].tag {
        note(2, p, KINDS[k].tag, tag);
    }
    let seq = o.seq.load(Ordering::Relaxed);
    for (i, w) in o.payload.iter().enumerate() {
        let v = w.load(Ordering::Relaxed);
        if v != pattern(seq, i) {
            note(1, p, pattern(seq, i), v);
            break;
        }
    }
    let r = if via_kfree {
        // SAFETY: our object, freed once.
        unsafe { nolock::try_kfree_nolock(p as *mut u8) }
    } else {
        // SAFETY: as above.
        unsafe { cache(k).try_free_nolock(NonNull::new_unchecked(p as *mut u8)) }
    };
    if r.is_err() {
        note(1, p, 0, u64::MAX);
    }
}

/// Put a fresh object of cache `k` into an exchange slot; check and free what was there.
fn exchange(k: usize, r: u64) -> bool {
    let Some(p) = alloc(k) else { return false };
    let old = KINDS[k].exchange[(r >> 8) as usize % EXCHANGE_SLOTS].swap(p, Ordering::AcqRel);
    if old != 0 {
        check_free(k, old, r & 1 != 0);
    }
    true
}

/// A type-safe read: inside a section of cache `k`'s flavour, look at an object someone else owns (and may be
/// freeing right now). It must still be an object of this cache.
fn typesafe_read(k: usize, r: u64) {
    let check = || {
        let p = KINDS[k].exchange[(r >> 16) as usize % EXCHANGE_SLOTS].load(Ordering::Acquire);
        if p == 0 {
            return;
        }
        for _ in 0..4 {
            let tag = obj(p).tag.load(Ordering::Acquire);
            if tag != KINDS[k].tag {
                note(2, p, KINDS[k].tag, tag);
            }
            match page_owner(p as *const u8) {
                PageOwner::Slab(n) if n.as_str().strip_suffix("-fb").unwrap_or(n.as_str()) == NAMES[k] => {}
                _ => note(2, p, 0, 1),
            }
        }
        TYPESAFE_READS.fetch_add(1, Ordering::Relaxed);
    };
    if k == K_RCU {
        let _g = nolock::rcu_read_lock();
        check();
    } else {
        let _g = DOMAIN.read_lock_fast();
        check();
    }
}

/// Inside a read-side section: take an object out of the exchange, free it, give this thread's lists back and
/// release every empty slab (`trim`), then look at the freed object again. Its slab may have just been
/// released, but not before this section ends: the memory must still be an object of this cache. Normal
/// context (handlers interrupt it).
fn read_across_release(k: usize, r: u64) {
    let run = || {
        let p = KINDS[k].exchange[r as usize % EXCHANGE_SLOTS].swap(0, Ordering::AcqRel);
        if p == 0 {
            return;
        }
        check_free(k, p, r & 1 != 0);
        nolock::trim();
        let tag = obj(p).tag.load(Ordering::Acquire);
        if tag != KINDS[k].tag {
            note(2, p, KINDS[k].tag, tag);
        }
        match page_owner(p as *const u8) {
            PageOwner::Slab(n) if n.as_str().strip_suffix("-fb").unwrap_or(n.as_str()) == NAMES[k] => {}
            _ => note(2, p, 0, 2),
        }
        RELEASE_READS.fetch_add(1, Ordering::Relaxed);
    };
    if k == K_RCU {
        let _g = nolock::rcu_read_lock();
        run();
    } else {
        let _g = DOMAIN.read_lock_fast();
        run();
    }
}

fn handler_work() {
    let r = rand();
    let k = (r & 1) as usize;
    typesafe_read(k, r);
    let mut held = [0usize; 3];
    let n = 1 + (r >> 1) as usize % 3;
    let mut allocs = 0;
    for h in held.iter_mut().take(n) {
        if let Some(p) = alloc(k) {
            *h = p;
            allocs += 1;
        }
    }
    if r & 8 != 0 && exchange(k, rand()) {
        allocs += 1;
    }
    for (i, &p) in held.iter().enumerate() {
        if p != 0 {
            check_free(k, p, (r >> (4 + i)) & 1 != 0);
        }
    }
    HANDLER_ALLOCS.fetch_add(allocs, Ordering::Relaxed);
}

extern "C" fn on_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    SIGNALS.fetch_add(1, Ordering::Relaxed);
    if STOP.load(Ordering::Relaxed) {
        return;
    }
    let depth = DEPTH.with(|d| d.fetch_add(1, Ordering::Relaxed)) + 1;
    if depth <= MAX_NEST {
        handler_work();
    } else {
        NEST_SKIPPED.fetch_add(1, Ordering::Relaxed);
    }
    DEPTH.with(|d| d.fetch_sub(1, Ordering::Relaxed));
}

// ------------------------------------------------------------------------------------------------------------
// Storm threads (normal context, interrupted by the handlers)
// ------------------------------------------------------------------------------------------------------------

fn storm_thread(me: usize) {
    RNG.with(|r| r.store(testkit::splitmix64(me as u64 + 77), Ordering::Relaxed));
    let alt = AltStack::new(256 << 10);
    let timers = SIGS.map(|sig| ThreadTimer::for_current_thread(sig, TIMER_PERIOD));
    READY.fetch_add(1, Ordering::Release);
    let mut held: Vec<(usize, usize)> = Vec::with_capacity(1024);
    let mut burst: Vec<usize> = Vec::with_capacity(1024);
    let mut allocs = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        PROGRESS[me].fetch_add(1, Ordering::Relaxed);
        let r = rand();
        let k = ((r >> 60) & 1) as usize;
        match r % 100 {
            0..45 => {
                if held.len() < 600 {
                    if let Some(p) = alloc(k) {
                        held.push((k, p));
                        allocs += 1;
                    }
                } else {
                    let (k, p) = held.swap_remove((r >> 8) as usize % held.len());
                    check_free(k, p, r & 0x100 != 0);
                }
            }
            45..75 => {
                if !held.is_empty() {
                    let (k, p) = held.swap_remove((r >> 8) as usize % held.len());
                    check_free(k, p, r & 0x100 != 0);
                }
            }
            75..90 => {
                if exchange(k, r >> 4) {
                    allocs += 1;
                }
                typesafe_read(k, r >> 12);
            }
            90..97 => {
                // A burst: new slabs, then enough frees to flush the list and empty slabs.
                let n = 100 + (r >> 20) as usize % 600;
                for _ in 0..n {
                    if let Some(p) = alloc(k) {
                        burst.push(p);
                        allocs += 1;
                    }
                }
                for (i, p) in burst.drain(..).enumerate() {
                    check_free(k, p, i % 2 == 0);
                }
            }
            97 => {
                // Release empty slabs during the storm: they wait for a grace period while readers (this one,
                // and the handlers) still look at their objects.
                read_across_release(k, r >> 8);
            }
            _ => {
                cache(k).shrink();
            }
        }
    }
    drop(timers);
    for (k, p) in held {
        check_free(k, p, false);
    }
    THREAD_ALLOCS.fetch_add(allocs, Ordering::Relaxed);
    drop(alt);
    PROGRESS[me].store(u64::MAX, Ordering::Relaxed);
}

fn watchdog() {
    let mut last: Vec<(u64, Instant)> = (0..=THREADS).map(|_| (0, Instant::now())).collect();
    while !WATCHDOG_DONE.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        for (i, l) in last.iter_mut().enumerate() {
            let p = PROGRESS[i].load(Ordering::Relaxed);
            if p == u64::MAX || p != l.0 {
                *l = (p, now);
            } else if now - l.1 > STALL {
                testkit::raw_stderr(
                    format!("typesafe_storm watchdog: progress counter {i} stuck for {STALL:?}; aborting\n").as_bytes(),
                );
                std::process::abort();
            }
        }
    }
}

fn main_step() {
    PROGRESS[THREADS].fetch_add(1, Ordering::Relaxed);
}

// ------------------------------------------------------------------------------------------------------------
// Phase 1: the fallback path through the reentry hook
// ------------------------------------------------------------------------------------------------------------

thread_local! {
    /// Cache to allocate from at the next `AllocFast` (address of a `KmemCache`; 0: none).
    static ARM_ALLOC: Cell<usize> = const { Cell::new(0) };
    /// What that nested allocation returned.
    static NESTED: Cell<usize> = const { Cell::new(0) };
    /// Object to `kfree_nolock` at the next `FreeFast` (0: none).
    static ARM_FREE: Cell<usize> = const { Cell::new(0) };
}

fn hook(at: Point) {
    match at {
        Point::AllocFast => {
            let c = ARM_ALLOC.with(|a| a.replace(0));
            if c != 0 {
                // SAFETY: `nested_alloc` armed the hook with a cache it borrows across the outer allocation.
                let c = unsafe { &*(c as *const KmemCache) };
                NESTED.with(|n| n.set(c.alloc_nolock(Gfp::NONE).map_or(0, |p| p.as_ptr() as usize)));
            }
        }
        Point::FreeFast => {
            let p = ARM_FREE.with(|a| a.replace(0));
            if p != 0 {
                // SAFETY: the test handed this object over to the hook, which frees it once.
                unsafe { kfree_nolock(p as *mut u8) };
            }
        }
        _ => {}
    }
}

/// An allocation of cache `k` with a nested allocation of the same cache inside it: (outer, nested).
fn nested_alloc(c: &KmemCache) -> (usize, usize) {
    ARM_ALLOC.with(|a| a.set(c as *const KmemCache as usize));
    let outer = c.alloc_nolock(Gfp::NONE).expect("outer allocation").as_ptr() as usize;
    assert_eq!(ARM_ALLOC.with(|a| a.get()), 0, "the hook ran");
    let nested = NESTED.with(|n| n.replace(0));
    assert_ne!(nested, 0, "the nested allocation failed");
    (outer, nested)
}

fn fallback_phase() {
    set_hook(Some(hook));
    for k in [K_RCU, K_SRCU] {
        let c = cache(k);
        let fb_name = format!("{}-fb", NAMES[k]);
        let st0 = c.stats();
        let mut outers = Vec::new();
        let mut nesteds = Vec::new();
        for i in 0..200u64 {
            let before = c.stats().fallback_allocs;
            let (outer, nested) = nested_alloc(c);
            assert_eq!(c.stats().fallback_allocs, before + 1, "the nested allocation used the fallback cache");
            assert_eq!(obj(nested).tag.load(Ordering::Acquire), KINDS[k].tag, "fallback objects are constructed");
            assert_eq!(obj(outer).tag.load(Ordering::Acquire), KINDS[k].tag);
            match page_owner(nested as *const u8) {
                PageOwner::Slab(n) => assert_eq!(n.as_str(), fb_name),
                o => panic!("nested object {nested:#x} lies in {o:?}"),
            }
            assert!(matches!(page_owner(outer as *const u8), PageOwner::Slab(n) if n.as_str() == NAMES[k]));
            obj(nested).seq.store(i, Ordering::Relaxed);
            outers.push(outer);
            nesteds.push(nested);
        }
        let mut all: Vec<usize> = outers.iter().chain(&nesteds).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 400, "every object distinct");
        // Free the fallback objects every way: through the cache handle, through kfree_nolock, and (nested) from
        // inside a free of the cache that holds the list busy.
        for (i, &p) in nesteds.iter().enumerate() {
            match i % 3 {
                0 => {
                    // SAFETY: ours, freed once; the cache accepts objects of its fallback.
                    unsafe { c.try_free_nolock(NonNull::new_unchecked(p as *mut u8)) }.expect("free_nolock");
                }
                1 => {
                    // SAFETY: ours, freed once.
                    unsafe { nolock::try_kfree_nolock(p as *mut u8) }.expect("kfree_nolock");
                }
                _ => {
                    // Freed by the hook inside the outer object's free.
                    ARM_FREE.with(|a| a.set(p));
                    let outer = outers.pop().expect("an outer object");
                    // SAFETY: ours, freed once.
                    unsafe { c.try_free_nolock(NonNull::new_unchecked(outer as *mut u8)) }.expect("outer free");
                    assert_eq!(ARM_FREE.with(|a| a.get()), 0, "the hook freed the nested object");
                }
            }
        }
        // Objects of the cache itself freed inside a busy free of the same cache: deferred, then drained.
        let deferred0 = c.stats().deferred_frees;
        let pairs: Vec<(usize, usize)> = (0..50)
            .map(|_| {
                let a = c.alloc_nolock(Gfp::NONE).expect("alloc").as_ptr() as usize;
                let b = c.alloc_nolock(Gfp::NONE).expect("alloc").as_ptr() as usize;
                (a, b)
            })
            .collect();
        for (a, b) in pairs {
            ARM_FREE.with(|x| x.set(b));
            // SAFETY: ours, freed once.
            unsafe { nolock::try_kfree_nolock(a as *mut u8) }.expect("kfree_nolock");
        }
        assert!(c.stats().deferred_frees >= deferred0 + 50, "nested frees of a busy list are deferred");
        for p in outers {
            // SAFETY: ours, freed once.
            unsafe { nolock::try_kfree_nolock(p as *mut u8) }.expect("kfree_nolock");
        }
        let st = c.stats();
        assert_eq!(st.allocs, st.frees, "{st:?}");
        assert_eq!(st.bad_frees, 0, "{st:?}");
        assert_eq!(st.fallback_allocs, st0.fallback_allocs + 200, "{st:?}");
    }

    // Without a fallback cache, a nested allocation takes the shared slab lists.
    let plain = KmemCache::builder("storm-ts-nofb", Layout::new::<Obj>())
        .flags(SlabFlags::TYPESAFE_BY_RCU)
        .freeptr_offset(FREEPTR)
        .fallback(false)
        .build()
        .expect("cache");
    let (outer, nested) = nested_alloc(&plain);
    let st = plain.stats();
    assert_eq!(st.fallback_allocs, 0, "{st:?}");
    assert!(st.shared_allocs >= 1, "{st:?}");
    assert!(matches!(page_owner(nested as *const u8), PageOwner::Slab(n) if n.as_str() == "storm-ts-nofb"));
    for p in [outer, nested] {
        // SAFETY: ours, freed once.
        unsafe { kfree_nolock(p as *mut u8) };
    }
    assert_eq!(plain.destroy().live_objects, 0);
    set_hook(None);
}

// ------------------------------------------------------------------------------------------------------------
// The test
// ------------------------------------------------------------------------------------------------------------

#[test]
fn typesafe_caches_under_signal_storm() {
    let _reports = testkit::NoReports::new();
    // No background worker (its passes would race the page accounting at the end); the grace-period worker
    // that type-safe caches need starts anyway.
    nolock::Config::new().background(false).apply().expect("this test is the first nolock user in its binary");
    nolock::init();
    let base_pages = allocated_pages();
    let rcu = KmemCache::builder(NAMES[K_RCU], Layout::new::<Obj>())
        .flags(SlabFlags::TYPESAFE_BY_RCU)
        .freeptr_offset(FREEPTR)
        .ctor(ctor::<K_RCU>)
        .dtor(dtor::<K_RCU>)
        .build()
        .expect("cache");
    let srcu = KmemCache::builder(NAMES[K_SRCU], Layout::new::<Obj>())
        .flags(SlabFlags::TYPESAFE_BY_SRCU_FAST)
        .srcu_domain(&DOMAIN)
        .freeptr_offset(FREEPTR)
        .ctor(ctor::<K_SRCU>)
        .dtor(dtor::<K_SRCU>)
        .build()
        .expect("cache");
    KINDS[K_RCU].cache.store(Box::into_raw(Box::new(rcu)), Ordering::Release);
    KINDS[K_SRCU].cache.store(Box::into_raw(Box::new(srcu)), Ordering::Release);

    // Phase 1.
    fallback_phase();
    let fb_hook: Vec<u64> = (0..NKINDS).map(|k| cache(k).stats().fallback_allocs).collect();

    // Phase 2.
    for sig in SIGS {
        testkit::install_handler(sig, on_signal, libc::SA_ONSTACK);
    }
    let dog = std::thread::spawn(watchdog);
    let threads: Vec<_> = (0..THREADS)
        .map(|i| std::thread::Builder::new().name(format!("ts-storm-{i}")).spawn(move || storm_thread(i)).unwrap())
        .collect();
    while READY.load(Ordering::Acquire) < THREADS {
        std::thread::yield_now();
    }
    let signals0 = SIGNALS.load(Ordering::Relaxed);
    let start = Instant::now();
    while start.elapsed() < STORM {
        std::thread::sleep(Duration::from_millis(50));
        main_step();
        // The main thread frees objects that storm threads and handlers put in the exchange: remote frees.
        for (k, kind) in KINDS.iter().enumerate() {
            for s in kind.exchange.iter().step_by(7) {
                let p = s.swap(0, Ordering::AcqRel);
                if p != 0 {
                    check_free(k, p, true);
                }
            }
        }
    }
    let signals = SIGNALS.load(Ordering::Relaxed) - signals0;
    let elapsed = start.elapsed();
    STOP.store(true, Ordering::Release);
    for t in threads {
        t.join().expect("storm thread");
    }
    WATCHDOG_DONE.store(true, Ordering::Release);
    dog.join().expect("watchdog");

    // Phase 3.
    for (k, kind) in KINDS.iter().enumerate() {
        for s in &kind.exchange {
            let p = s.swap(0, Ordering::AcqRel);
            if p != 0 {
                check_free(k, p, false);
            }
        }
    }
    nolock::trim();
    let stats: Vec<_> = (0..NKINDS).map(|k| cache(k).stats()).collect();
    println!(
        "typesafe storm: {signals} signals in {elapsed:.2?} ({:.0}/s), {} handler allocations, {} type-safe reads (handlers and threads), {} \
         reads across a release, {} thread allocations, {} nested signals skipped",
        signals as f64 / elapsed.as_secs_f64(),
        HANDLER_ALLOCS.load(Ordering::Relaxed),
        TYPESAFE_READS.load(Ordering::Relaxed),
        RELEASE_READS.load(Ordering::Relaxed),
        THREAD_ALLOCS.load(Ordering::Relaxed),
        NEST_SKIPPED.load(Ordering::Relaxed),
    );
    for (k, s) in stats.iter().enumerate() {
        println!(
            "  {}: {} allocs, {} fallback ({} from the storm), {} shared, {} deferred frees, {} slabs allocated, {} \
             released, {} pending",
            NAMES[k],
            s.allocs,
            s.fallback_allocs,
            s.fallback_allocs - fb_hook[k],
            s.shared_allocs,
            s.deferred_frees,
            s.slabs_allocated,
            s.slabs_freed,
            s.pending_slabs,
        );
    }
    let first: Vec<u64> = FIRST_BAD.iter().map(|a| a.load(Ordering::Acquire)).collect();
    assert_eq!(
        CORRUPT.load(Ordering::Relaxed),
        0,
        "corrupted or refused objects; first (kind, addr, expected, found): {first:x?}"
    );
    assert_eq!(TYPE_VIOLATIONS.load(Ordering::Relaxed), 0, "type-safety violations; first: {first:x?}");
    assert_eq!(FAILURES.load(Ordering::Relaxed), 0, "allocations failed");
    assert!(signals > 0 && HANDLER_ALLOCS.load(Ordering::Relaxed) > 0, "the storm ran handlers");
    for (k, s) in stats.iter().enumerate() {
        assert_eq!(s.allocs, s.frees, "{}: everything freed: {s:?}", NAMES[k]);
        assert_eq!((s.bad_frees, s.failures), (0, 0), "{}: {s:?}", NAMES[k]);
    }

    for k in 0..NKINDS {
        let c = KINDS[k].cache.swap(std::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: published with Box::into_raw above; every storm thread is joined, the hook is off.
        let c = unsafe { Box::from_raw(c) };
        let r = c.destroy();
        assert_eq!(r.live_objects, 0, "{}: {r:?}", NAMES[k]);
    }
    nolock::rcu_barrier();
    DOMAIN.barrier();
    nolock::trim();
    assert_eq!(CTOR_TWICE.load(Ordering::Relaxed), 0, "a constructor ran twice in one slab life");
    assert_eq!(BAD_DTOR.load(Ordering::Relaxed), 0, "a destructor found its object's tag damaged");
    for (k, kind) in KINDS.iter().enumerate() {
        let (c, d) = (kind.ctors.load(Ordering::Relaxed), kind.dtors.load(Ordering::Relaxed));
        assert_eq!(c, d, "{}: constructors == destructors after destroy", NAMES[k]);
        assert!(c > 0);
    }
    let snap = snapshot();
    assert!(
        !snap.caches.iter().any(|c| c.name.as_str().starts_with("storm-ts")),
        "destroyed caches left the statistics"
    );
    assert_eq!(allocated_pages(), base_pages, "every page of the type-safe caches is back");
}
