//! The signal storm (DESIGN.md section 6): several threads, each with its own POSIX timers, together take tens
//! of thousands of signals per second while they allocate, check and free objects of every kmalloc class,
//! large page runs and a `KmemCache`. The handlers do the same work, and are themselves interrupted by the
//! other storm signals (each thread has one timer per signal in `SIGS`, so handlers nest up to that depth).
//! Objects move between threads and handlers through a lock-free exchange array, and between threads through a
//! mutex that only normal code touches.
//!
//! The test passes only with zero spurious failures (every `None` is counted), zero corrupted objects (every
//! object's pattern is checked before it is freed), no deadlock (a watchdog aborts the process if some thread
//! stops making progress for 10 s), every page accounted for once everything is freed and trimmed, no report
//! from nolock, and at least 70,000 signals delivered (3.5 s at 20,000/s; a loaded machine runs the storm longer
//! to get them, at most 60 s).
//!
//! One test in this binary: the page accounting at the end is process-wide.

use std::alloc::Layout;
use std::cell::Cell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nolock::{Gfp, KmemCache, kfree_nolock, kmalloc_nolock, ksize};
use testkit::{AltStack, Damage, ErrnoGuard, ThreadTimer};

/// Threads under the storm (more than the machine's cores).
const THREADS: usize = 6;
/// How long the storm lasts at least.
const STORM: Duration = Duration::from_millis(3500);
/// How long it may last at most: on a loaded machine (fewer signals delivered per second) it goes on past
/// `STORM` until `MIN_SIGNALS` were delivered.
const STORM_MAX: Duration = Duration::from_secs(60);
/// Period of each timer. Every thread has one timer per signal in `SIGS`: 6 threads x 3 timers at 60 µs ask for
/// 300,000 signals per second. The kernel merges the expirations of a timer whose previous signal is still
/// pending (a thread waiting for a core), so far fewer are delivered; several timers per thread keep several
/// signals pending, and the handlers nest right at delivery.
///
/// Unoptimized builds run the same storm 8 times slower: their handlers take about ten times longer, and at the
/// full rate the threads would do nothing but run handlers.
const TIMER_PERIOD: Duration = Duration::from_micros(if cfg!(debug_assertions) { 480 } else { 60 });
/// Signals the storm must deliver (handler runs): 20,000 per second over `STORM` on an idle machine (optimized
/// builds; unoptimized builds scale like `TIMER_PERIOD`). A count, not a rate: the rate a loaded machine
/// delivers is not the allocator's doing, so the storm runs longer instead (up to `STORM_MAX`); the rate is
/// printed.
const MIN_SIGNALS: u64 = if cfg!(debug_assertions) { 8_750 } else { 70_000 };
/// Handlers nested deeper than this return at once. Without `SA_NODEFER` a signal is blocked in its own handler,
/// so nesting cannot exceed the number of storm signals anyway; this is a second line of defence.
///
/// (With `SA_NODEFER` nesting is unbounded: a thread that keeps being preempted on its way back to user mode
/// gets a new frame for each expiration before any handler instruction runs, and overflows any stack.)
const MAX_NEST: u32 = SIGS.len() as u32;
/// Bytes of each object that carry the pattern (large objects are stamped at their start only).
const PATTERN_CAP: usize = 16 << 10;
/// A thread with no progress for this long is deadlocked.
const STALL: Duration = Duration::from_secs(10);

/// The storm's signals; all run the same handler, and each may interrupt the handlers of the others.
const SIGS: [libc::c_int; 3] = [libc::SIGUSR1, libc::SIGUSR2, libc::SIGPROF];

/// Requested sizes: kmalloc classes, sizes between classes, and page runs above 32 KiB.
const SIZES: &[usize] = &[
    1, 8, 16, 24, 32, 40, 64, 96, 100, 128, 160, 192, 256, 300, 512, 640, 1000, 1024, 2048, 3000, 4096, 6000, 8192,
    8193, 12_288, 20_000, 32_768, 32_769, 40_000, 65_536,
];
/// Index of the first size above the largest class (32 KiB) in `SIZES`.
const FIRST_LARGE: usize = 27;
const _: () = assert!(
    SIZES[FIRST_LARGE] > nolock::KMALLOC_MAX_CACHE_SIZE && SIZES[FIRST_LARGE - 1] <= nolock::KMALLOC_MAX_CACHE_SIZE
);

/// Slots of the lock-free exchange; each holds 0 or the address of a stamped object.
const SLOTS: usize = 128;
static EXCHANGE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
/// Objects handed between threads through a mutex (normal context only): (address, stamp).
static HANDOFF: Mutex<Vec<(usize, u64)>> = Mutex::new(Vec::new());
const HANDOFF_MAX: usize = 4096;

/// The shared `KmemCache` (null outside the storm).
static CACHE: AtomicPtr<KmemCache> = AtomicPtr::new(std::ptr::null_mut());
/// Stamps: every allocation gets a fresh one.
static SEQ: AtomicU64 = AtomicU64::new(1);

static SIGNALS: AtomicU64 = AtomicU64::new(0);
static NEST_SKIPPED: AtomicU64 = AtomicU64::new(0);
static MAX_DEPTH: AtomicU32 = AtomicU32::new(0);
static HANDLER_ALLOCS: AtomicU64 = AtomicU64::new(0);
static THREAD_ALLOCS: AtomicU64 = AtomicU64::new(0);
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
static CORRUPT: AtomicU64 = AtomicU64::new(0);
/// The first corruption seen: address, word index, expected, found (for the failure message).
static FIRST_BAD: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

static STOP: AtomicBool = AtomicBool::new(false);
static READY: AtomicUsize = AtomicUsize::new(0);
/// Per-thread progress: iterations of the thread's own loop (so a thread that only runs handlers counts as
/// stuck too). `u64::MAX` once the thread is done.
static PROGRESS: [AtomicU64; THREADS] = [const { AtomicU64::new(0) }; THREADS];
/// Progress of the test's main thread through its phases.
static MAIN_PROGRESS: AtomicU64 = AtomicU64::new(0);
static WATCHDOG_DONE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Signal-handler nesting depth on this thread (an RMW counter that goes up and comes back down).
    static DEPTH: AtomicU32 = const { AtomicU32::new(0) };
    /// Random state, advanced with one atomic RMW so handlers and the code they interrupt never repeat a draw.
    static RNG: AtomicU64 = const { AtomicU64::new(0) };
    /// Index of this thread in `PROGRESS` (`usize::MAX` for threads outside the storm).
    static ME: AtomicUsize = const { AtomicUsize::new(usize::MAX) };
}

fn rand() -> u64 {
    testkit::splitmix64(RNG.with(|r| r.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)))
}

fn note_corruption(addr: usize, d: Damage) {
    if CORRUPT.fetch_add(1, Ordering::Relaxed) == 0 {
        FIRST_BAD[0].store(addr as u64, Ordering::Relaxed);
        FIRST_BAD[1].store(d.word as u64, Ordering::Relaxed);
        FIRST_BAD[2].store(d.expected, Ordering::Relaxed);
        FIRST_BAD[3].store(d.found, Ordering::Relaxed);
    }
}

fn pattern_len(p: *const u8) -> usize {
    ksize(p).min(PATTERN_CAP)
}

/// Allocate `size` bytes, check `ksize` (and zeroing), stamp it. `None` counts a spurious failure. Any context.
fn alloc_obj(size: usize, r: u64) -> Option<(usize, u64)> {
    let zero = r & 1 != 0;
    let Some(p) = kmalloc_nolock(size, if zero { Gfp::ZERO } else { Gfp::NONE }) else {
        SPURIOUS.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    stamp(p.as_ptr(), size, zero)
}

/// Check a fresh object's size and zeroing, then stamp it.
fn stamp(p: *mut u8, size: usize, zero: bool) -> Option<(usize, u64)> {
    let addr = p as usize;
    let got = ksize(p);
    if got < size || !addr.is_multiple_of(8) {
        note_corruption(addr, Damage { word: usize::MAX, expected: size as u64, found: got as u64 });
    }
    let len = pattern_len(p);
    // SAFETY: `p` is a fresh object of `ksize(p) >= len` bytes.
    if zero && !unsafe { testkit::is_zeroed(p, len) } {
        note_corruption(addr, Damage { word: usize::MAX - 1, expected: 0, found: 1 });
    }
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // SAFETY: as above; objects are at least 8-aligned.
    unsafe { testkit::fill(p, len, seq) };
    Some((addr, seq))
}

/// Check an object's stamp (exactly `seq`, or any stamp handed out so far) and free it. Any context.
fn check_free(addr: usize, seq: Option<u64>) {
    let p = addr as *mut u8;
    // SAFETY: `p` is a live object we own, stamped over `pattern_len(p)` bytes.
    if let Err(d) = unsafe { testkit::check(p, pattern_len(p), seq, SEQ.load(Ordering::Relaxed)) } {
        note_corruption(addr, d);
    }
    // SAFETY: our object, freed once, not used afterwards.
    unsafe { kfree_nolock(p) };
}

/// One object from the shared `KmemCache`, checked and freed straight away (through the cache or through
/// `kfree_nolock`, which finds the cache from the address).
fn cache_roundtrip(r: u64) -> bool {
    let c = CACHE.load(Ordering::Acquire);
    if c.is_null() {
        return false;
    }
    // SAFETY: the cache is leaked while the storm runs and destroyed only after every thread is joined.
    let c = unsafe { &*c };
    let Some(p) = c.alloc_nolock(Gfp::NONE) else {
        SPURIOUS.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    let Some((addr, seq)) = stamp(p.as_ptr(), c.object_size(), false) else {
        return false;
    };
    if r & 2 != 0 {
        // SAFETY: our object, checked and then freed once.
        if let Err(d) = unsafe { testkit::check(p.as_ptr(), pattern_len(p.as_ptr()), Some(seq), u64::MAX) } {
            note_corruption(addr, d);
        }
        // SAFETY: as above.
        unsafe { c.free_nolock(p) };
    } else {
        check_free(addr, Some(seq));
    }
    true
}

/// Put a fresh object into a random exchange slot; check and free whatever was there (allocated by any
/// thread or handler). Any context: the slot is swapped atomically.
fn exchange(r: u64) -> bool {
    let size = SIZES[(r >> 8) as usize % FIRST_LARGE];
    let Some((addr, _)) = alloc_obj(size, r >> 16) else {
        return false;
    };
    let old = EXCHANGE[(r >> 24) as usize % SLOTS].swap(addr, Ordering::AcqRel);
    if old != 0 {
        check_free(old, None);
    }
    true
}

/// The handler's work: a few objects of random classes held at once (with a large one now and then), one
/// `KmemCache` object, one exchange.
fn handler_work() {
    let r = rand();
    let mut held = [(0usize, 0u64); 4];
    let n = 1 + (r & 3) as usize;
    let mut allocs = 0;
    for slot in held.iter_mut().take(n) {
        let r2 = rand();
        let idx = if r2 & 15 == 0 {
            FIRST_LARGE + (r2 >> 4) as usize % (SIZES.len() - FIRST_LARGE)
        } else {
            (r2 >> 4) as usize % FIRST_LARGE
        };
        if let Some(o) = alloc_obj(SIZES[idx], r2 >> 32) {
            *slot = o;
            allocs += 1;
        }
    }
    if r & 4 != 0 && cache_roundtrip(r >> 8) {
        allocs += 1;
    }
    if r & 8 != 0 && exchange(rand()) {
        allocs += 1;
    }
    // Free in an order that depends on the draw: LIFO or FIFO.
    if r & 16 != 0 {
        held.reverse();
    }
    for &(addr, seq) in &held {
        if addr != 0 {
            check_free(addr, Some(seq));
        }
    }
    HANDLER_ALLOCS.fetch_add(allocs, Ordering::Relaxed);
}

extern "C" fn on_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    SIGNALS.fetch_add(1, Ordering::Relaxed);
    if STOP.load(Ordering::Relaxed) {
        return; // let the thread reach its loop's exit and disarm its timers
    }
    let depth = DEPTH.with(|d| d.fetch_add(1, Ordering::Relaxed)) + 1;
    MAX_DEPTH.fetch_max(depth, Ordering::Relaxed);
    if depth <= MAX_NEST {
        handler_work();
    } else {
        NEST_SKIPPED.fetch_add(1, Ordering::Relaxed);
    }
    DEPTH.with(|d| d.fetch_sub(1, Ordering::Relaxed));
}

/// A storm thread: its own timer and signal stack, then random work until `STOP`.
fn storm_thread(me: usize) {
    ME.with(|m| m.store(me, Ordering::Relaxed));
    RNG.with(|r| r.store(testkit::splitmix64(me as u64 + 1), Ordering::Relaxed));
    // Handlers run on an alternate stack (SA_ONSTACK), big enough for MAX_NEST nested handlers; half the
    // threads get a small one, so nesting is also exercised close to the stack's end.
    let alt = AltStack::new(if me.is_multiple_of(2) { 256 << 10 } else { 64 << 10 });
    let mut held: Vec<(usize, u64)> = Vec::with_capacity(1024);
    let mut burst: Vec<(usize, u64)> = Vec::with_capacity(1024);
    let timers = SIGS.map(|sig| ThreadTimer::for_current_thread(sig, TIMER_PERIOD));
    READY.fetch_add(1, Ordering::Release);
    let allocs = Cell::new(0u64);
    let alloc_into = |v: &mut Vec<(usize, u64)>, size: usize, r: u64| {
        if let Some(o) = alloc_obj(size, r) {
            v.push(o);
            allocs.set(allocs.get() + 1);
        }
    };
    while !STOP.load(Ordering::Relaxed) {
        PROGRESS[me].fetch_add(1, Ordering::Relaxed);
        let r = rand();
        match r % 100 {
            0..40 => {
                if held.len() < 512 {
                    let idx = (r >> 8) as usize % SIZES.len();
                    alloc_into(&mut held, SIZES[idx], r >> 32);
                } else {
                    let (a, s) = held.swap_remove((r >> 8) as usize % held.len());
                    check_free(a, Some(s));
                }
            }
            40..70 => {
                if !held.is_empty() {
                    let (a, s) = held.swap_remove((r >> 8) as usize % held.len());
                    check_free(a, Some(s));
                }
            }
            70..80 => {
                if exchange(r >> 8) {
                    allocs.set(allocs.get() + 1);
                }
            }
            80..86 => {
                for i in 0..8 {
                    if cache_roundtrip(r >> i) {
                        allocs.set(allocs.get() + 1);
                    }
                }
            }
            86..94 => {
                // Hand objects to other threads, or free theirs (remote frees of objects that may have been
                // allocated in handlers). The mutex is taken here, in normal code only.
                if held.len() >= 64 && r & 256 != 0 {
                    let mut h = HANDOFF.lock().unwrap();
                    if h.len() < HANDOFF_MAX {
                        h.extend(held.drain(held.len() - 32..));
                    }
                } else {
                    let theirs: Vec<(usize, u64)> = {
                        let mut h = HANDOFF.lock().unwrap();
                        let keep = h.len().saturating_sub(32);
                        h.drain(keep..).collect()
                    };
                    for (a, s) in theirs {
                        check_free(a, Some(s));
                    }
                }
            }
            94..97 => {
                // A burst in one class: empties the thread's list (refill, new slabs) and then overfills it
                // (flush back to the slabs).
                let size = SIZES[(r >> 8) as usize % FIRST_LARGE];
                let n = 100 + (r >> 32) as usize % 600;
                for i in 0..n {
                    alloc_into(&mut burst, size, r >> (i % 32));
                }
                for (a, s) in burst.drain(..) {
                    check_free(a, Some(s));
                }
            }
            _ => {
                // Allocate and free at once, a large run now and then.
                let idx = if r & 0x700 == 0 {
                    FIRST_LARGE + (r >> 16) as usize % (SIZES.len() - FIRST_LARGE)
                } else {
                    (r >> 16) as usize % FIRST_LARGE
                };
                let mut one = Vec::new();
                alloc_into(&mut one, SIZES[idx], r >> 40);
                for (a, s) in one {
                    check_free(a, Some(s));
                }
            }
        }
    }
    drop(timers);
    for (a, s) in held {
        check_free(a, Some(s));
    }
    THREAD_ALLOCS.fetch_add(allocs.get(), Ordering::Relaxed);
    drop(alt);
    PROGRESS[me].store(u64::MAX, Ordering::Relaxed);
}

/// Abort the whole process if a storm thread (or the test's main thread) stops making progress.
fn watchdog() {
    let mut last: Vec<(u64, Instant)> = (0..=THREADS).map(|_| (0, Instant::now())).collect();
    let started = Instant::now();
    while !WATCHDOG_DONE.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        let now = Instant::now();
        for (i, l) in last.iter_mut().enumerate() {
            let p =
                if i < THREADS { PROGRESS[i].load(Ordering::Relaxed) } else { MAIN_PROGRESS.load(Ordering::Relaxed) };
            if p == u64::MAX || p != l.0 {
                *l = (p, now);
            } else if now - l.1 > STALL {
                let who = if i < THREADS { format!("storm thread {i}") } else { "the test's main thread".to_string() };
                testkit::raw_stderr(
                    format!(
                        "storm watchdog: {who} made no progress for {STALL:?} (deadlock?); signals so far {}; \
                         aborting\n",
                        SIGNALS.load(Ordering::Relaxed)
                    )
                    .as_bytes(),
                );
                std::process::abort();
            }
        }
        if now - started > Duration::from_secs(120) {
            testkit::raw_stderr(b"storm watchdog: the test ran for 120 s; aborting\n");
            std::process::abort();
        }
    }
}

fn main_step() {
    MAIN_PROGRESS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn signal_storm() {
    let _reports = testkit::NoReports::new();
    // No background worker: it shrinks caches and purges pages on its own schedule, and its passes would
    // race with the exact page accounting at the end. The storm itself needs no worker.
    nolock::Config::new().background(false).apply().expect("this test is the first nolock user in its binary");
    for sig in SIGS {
        testkit::install_handler(sig, on_signal, libc::SA_ONSTACK);
    }
    let cache = Box::new(KmemCache::new("storm-obj", Layout::new::<[u64; 6]>()).unwrap());
    CACHE.store(Box::into_raw(cache), Ordering::Release);

    let dog = std::thread::spawn(watchdog);
    let threads: Vec<_> = (0..THREADS)
        .map(|i| std::thread::Builder::new().name(format!("storm-{i}")).spawn(move || storm_thread(i)).unwrap())
        .collect();
    while READY.load(Ordering::Acquire) < THREADS {
        std::thread::yield_now();
    }
    let signals_before = SIGNALS.load(Ordering::Relaxed);
    let start = Instant::now();
    while start.elapsed() < STORM
        || (SIGNALS.load(Ordering::Relaxed) - signals_before < MIN_SIGNALS && start.elapsed() < STORM_MAX)
    {
        std::thread::sleep(Duration::from_millis(100));
        main_step();
    }
    let signals = SIGNALS.load(Ordering::Relaxed) - signals_before;
    let elapsed = start.elapsed();
    STOP.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
        main_step();
    }

    // Everything still out: the exchange slots and the hand-off list.
    for s in &EXCHANGE {
        let a = s.swap(0, Ordering::AcqRel);
        if a != 0 {
            check_free(a, None);
        }
    }
    for (a, s) in std::mem::take(&mut *HANDOFF.lock().unwrap()) {
        check_free(a, Some(s));
    }
    main_step();

    let snap = nolock::stats::snapshot();
    let total = snap.total();
    let cache = CACHE.swap(std::ptr::null_mut(), Ordering::AcqRel);
    // SAFETY: created by Box::into_raw above; no thread uses it any more (all joined, slot cleared).
    let cache = unsafe { Box::from_raw(cache) };
    let cache_stats = cache.stats();
    let destroyed = cache.destroy();
    main_step();
    let trimmed = nolock::trim();
    let pages_left = nolock::stats::allocated_pages();
    let used_left = nolock::stats::snapshot().pages.used_pages;
    main_step();
    WATCHDOG_DONE.store(true, Ordering::Release);
    dog.join().unwrap();

    let rate = signals as f64 / elapsed.as_secs_f64();
    eprintln!(
        "storm summary: {THREADS} threads for {elapsed:.2?}: {signals} signals delivered ({rate:.0}/s), \
         max handler nesting {}, {} nested handlers skipped; handler allocations {}, thread allocations {}; \
         next_bucket {}, deferred_frees {}, shared_allocs {}, shared_frees {}, remote_frees {}, flushes {}, \
         refills {}; large allocs {}; cache {}: allocs {} frees {}; trim released {} slabs, purged {} pages",
        MAX_DEPTH.load(Ordering::Relaxed),
        NEST_SKIPPED.load(Ordering::Relaxed),
        HANDLER_ALLOCS.load(Ordering::Relaxed),
        THREAD_ALLOCS.load(Ordering::Relaxed),
        total.next_bucket,
        total.deferred_frees,
        total.shared_allocs,
        total.shared_frees,
        total.remote_frees,
        total.flushes,
        total.alloc_refill,
        snap.large.allocs,
        cache_stats.name,
        cache_stats.allocs,
        cache_stats.frees,
        trimmed.slabs_released,
        trimmed.pages_purged,
    );

    assert_eq!(SPURIOUS.load(Ordering::Relaxed), 0, "spurious allocation failures (None with memory available)");
    assert_eq!(
        CORRUPT.load(Ordering::Relaxed),
        0,
        "corrupted objects; first: address {:#x}, word {}, expected {:#x}, found {:#x}",
        FIRST_BAD[0].load(Ordering::Relaxed),
        FIRST_BAD[1].load(Ordering::Relaxed),
        FIRST_BAD[2].load(Ordering::Relaxed),
        FIRST_BAD[3].load(Ordering::Relaxed),
    );
    assert!(
        signals >= MIN_SIGNALS,
        "the storm delivered only {signals} signals in {elapsed:.2?} (want at least {MIN_SIGNALS})"
    );
    assert!(HANDLER_ALLOCS.load(Ordering::Relaxed) > 0);
    // Tens of thousands of signals land inside allocator calls: some of them always find a busy list.
    assert!(
        total.next_bucket + total.deferred_frees + total.shared_allocs > 0,
        "no handler ever found a busy per-thread list"
    );
    for c in snap.caches.iter().chain([&cache_stats]) {
        assert_eq!(c.failures, 0, "{}: allocation failures", c.name);
        assert_eq!(c.bad_frees, 0, "{}: refused frees", c.name);
        assert_eq!(c.allocs, c.frees, "{}: every allocation freed exactly once", c.name);
    }
    assert_eq!(snap.large.failures, 0, "large allocation failures");
    assert_eq!(snap.large.allocs, snap.large.frees, "large runs all freed");
    assert_eq!(snap.large.pages, 0, "large pages all returned");
    assert_eq!(snap.reports, 0, "nolock reported problems on stderr");
    assert_eq!(destroyed.live_objects, 0, "KmemCache objects left at destroy");
    assert_eq!(pages_left, 0, "pages still allocated after trim (bitmap count)");
    assert_eq!(used_left, 0, "pages still allocated after trim (used_pages)");
}
