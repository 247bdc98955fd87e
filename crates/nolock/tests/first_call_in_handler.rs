//! A thread whose very first nolock call happens inside a signal handler (lib.rs contract point 5, DESIGN.md
//! section 3 rule 5): the handler claims the thread's shard, and in the first phase even creates nolock's
//! global state (maps the arena). The allocations must succeed, and the thread then goes on normally with the
//! per-thread caches its handler claimed.
//!
//! One test in this binary: the first phase needs a process in which nolock has never been called, and the
//! page accounting at the end is process-wide.

use std::alloc::Layout;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nolock::stats::thread_has_shard;
use nolock::{Gfp, KmemCache, kfree_nolock, kmalloc_nolock, ksize};
use testkit::{AltStack, ErrnoGuard};

const SIG: libc::c_int = libc::SIGUSR1;
/// Every kmalloc class and two page runs.
const SIZES: [usize; 18] =
    [8, 16, 32, 64, 96, 128, 192, 256, 512, 640, 1024, 2048, 4096, 8192, 8193, 32_768, 32_769, 40_000];

/// Failure bits the handler sets (it cannot panic or print).
const F_HAD_SHARD: u64 = 1;
const F_ALLOC_NONE: u64 = 2;
const F_NOT_ZERO: u64 = 4;
const F_BAD_SIZE: u64 = 8;
const F_CORRUPT: u64 = 16;
const F_NO_SHARD_AFTER: u64 = 32;
const F_CACHE_NONE: u64 = 64;

static FAIL: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);
/// Objects the handler leaves for its thread to free in normal context: (address, stamp).
static KEPT: [AtomicUsize; SIZES.len() + 1] = [const { AtomicUsize::new(0) }; SIZES.len() + 1];
static KEPT_SEQ: [AtomicU64; SIZES.len() + 1] = [const { AtomicU64::new(0) }; SIZES.len() + 1];
/// The cache the handler also allocates from (null in the first phase).
static CACHE: AtomicPtr<KmemCache> = AtomicPtr::new(std::ptr::null_mut());
static SEQ: AtomicU64 = AtomicU64::new(1);

static TARGET_READY: AtomicBool = AtomicBool::new(false);

fn fail(bit: u64) {
    FAIL.fetch_or(bit, Ordering::Relaxed);
}

extern "C" fn on_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    if thread_has_shard() {
        fail(F_HAD_SHARD);
    }
    let mut objs = [(0usize, 0u64); SIZES.len()];
    for (o, &size) in objs.iter_mut().zip(&SIZES) {
        let Some(p) = kmalloc_nolock(size, Gfp::ZERO) else {
            fail(F_ALLOC_NONE);
            continue;
        };
        let len = ksize(p.as_ptr());
        if len < size {
            fail(F_BAD_SIZE);
        }
        // SAFETY: a fresh object of `len` bytes.
        if !unsafe { testkit::is_zeroed(p.as_ptr(), len) } {
            fail(F_NOT_ZERO);
        }
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above; 8-aligned.
        unsafe { testkit::fill(p.as_ptr(), len, seq) };
        *o = (p.as_ptr() as usize, seq);
    }
    for (i, &(a, seq)) in objs.iter().enumerate() {
        if a == 0 {
            continue;
        }
        // SAFETY: our live object, stamped over ksize bytes.
        if unsafe { testkit::check(a as *const u8, ksize(a as *const u8), Some(seq), u64::MAX) }.is_err() {
            fail(F_CORRUPT);
        }
        if i % 2 == 0 {
            // SAFETY: our object, freed once.
            unsafe { kfree_nolock(a as *mut u8) };
        } else {
            KEPT_SEQ[i].store(seq, Ordering::Relaxed);
            KEPT[i].store(a, Ordering::Release);
        }
    }
    let c = CACHE.load(Ordering::Acquire);
    if !c.is_null() {
        // SAFETY: the test keeps the cache alive until the thread is joined.
        let c = unsafe { &*c };
        match c.alloc_nolock(Gfp::NONE) {
            Some(p) => {
                let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                // SAFETY: a fresh object of the cache's size.
                unsafe { testkit::fill(p.as_ptr(), c.object_size(), seq) };
                KEPT_SEQ[SIZES.len()].store(seq, Ordering::Relaxed);
                KEPT[SIZES.len()].store(p.as_ptr() as usize, Ordering::Release);
            }
            None => fail(F_CACHE_NONE),
        }
    }
    if !thread_has_shard() {
        fail(F_NO_SHARD_AFTER);
    }
    HANDLED.fetch_add(1, Ordering::Release);
}

/// The target thread: no nolock call (and no allocation) until its handler has run, then normal work.
fn target(alt_stack: bool) {
    let alt = alt_stack.then(|| AltStack::new(128 << 10));
    let start = Instant::now();
    TARGET_READY.store(true, Ordering::Release);
    while HANDLED.load(Ordering::Acquire) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10), "the signal never arrived");
        std::hint::spin_loop();
    }
    drop(alt);
    assert!(thread_has_shard(), "the thread goes on with the per-thread caches its handler claimed");
    // Free what the handler kept, after checking it.
    for (k, s) in KEPT.iter().zip(&KEPT_SEQ) {
        let a = k.swap(0, Ordering::AcqRel);
        if a == 0 {
            continue;
        }
        let seq = s.load(Ordering::Relaxed);
        let len = ksize(a as *const u8);
        // SAFETY: a live object the handler stamped over `len` bytes (the cache object: its object size,
        // which is what ksize reports for it).
        let r = unsafe { testkit::check(a as *const u8, len, Some(seq), u64::MAX) };
        assert_eq!(r, Ok(seq), "object kept by the handler at {a:#x}");
        // SAFETY: our object, freed once (kfree_nolock also frees KmemCache objects).
        unsafe { kfree_nolock(a as *mut u8) };
    }
    // Normal work: every class, a few rounds.
    for _ in 0..20 {
        let held: Vec<_> =
            SIZES.iter().map(|&size| kmalloc_nolock(size, Gfp::NONE).expect("normal allocation")).collect();
        for p in held {
            // SAFETY: our object, freed once.
            unsafe { kfree_nolock(p.as_ptr()) };
        }
    }
}

/// Start a target thread, wait until it spins, signal it, and join it.
fn run_phase(name: &str, alt_stack: bool) {
    HANDLED.store(0, Ordering::Relaxed);
    TARGET_READY.store(false, Ordering::Relaxed);
    let t = std::thread::Builder::new().name(name.into()).spawn(move || target(alt_stack)).unwrap();
    while !TARGET_READY.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    // SAFETY: the thread is alive (it spins until its handler has run) and SIG has a handler installed.
    let rc = unsafe { libc::pthread_kill(t.as_pthread_t(), SIG) };
    assert_eq!(rc, 0, "pthread_kill");
    t.join().unwrap();
    assert_eq!(HANDLED.load(Ordering::Relaxed), 1, "{name}: handler runs");
    let f = FAIL.load(Ordering::Relaxed);
    assert_eq!(
        f, 0,
        "{name}: handler failures (bits: 1 had a shard already, 2 kmalloc None, 4 not zeroed, 8 ksize too \
         small, 16 corrupted, 32 no shard after, 64 cache None)"
    );
}

#[test]
fn first_nolock_call_in_a_signal_handler() {
    let _reports = testkit::NoReports::new();
    // No background worker: the page accounting at the end must not race with its passes.
    nolock::Config::new().background(false).apply().expect("nothing has called nolock yet in this process");
    testkit::install_handler(SIG, on_signal, libc::SA_ONSTACK);

    // Phase 1: the first nolock call of the whole process, in a handler (the global state is built there).
    run_phase("first-in-process", false);

    // Phase 2: nolock is set up; a fresh thread's first call, on an alternate signal stack, includes a
    // KmemCache allocation.
    let cache = KmemCache::new("first-call-obj", Layout::new::<[u64; 3]>()).unwrap();
    CACHE.store(&cache as *const KmemCache as *mut KmemCache, Ordering::Release);
    run_phase("first-in-thread", true);
    CACHE.store(std::ptr::null_mut(), Ordering::Release);
    let st = cache.stats();
    assert_eq!(st.allocs, 1);
    assert_eq!(st.frees, 1);
    assert_eq!(cache.destroy().live_objects, 0);

    // Everything was freed and both threads have exited: every page comes back.
    nolock::trim();
    let snap = nolock::stats::snapshot();
    for c in &snap.caches {
        assert_eq!(c.failures, 0, "{}: failures", c.name);
        assert_eq!(c.allocs, c.frees, "{}: allocs and frees differ", c.name);
        assert_eq!(c.cached_objects, 0, "{}: objects left in thread lists", c.name);
    }
    assert_eq!(snap.large.allocs, snap.large.frees);
    assert_eq!(nolock::stats::allocated_pages(), 0, "pages left allocated");
    assert_eq!(snap.pages.used_pages, 0, "used_pages after trim");
}
