//! `trim()` interrupted by a signal handler that allocates and frees on the same thread.
//!
//! `trim` returns the calling thread's cached objects to their slabs. This test found that it used to walk and
//! detach the thread's per-cache lists *without holding their lock*: a handler that landed in the middle used
//! the list itself, so an object could be handed out twice or lost. `trim` now drains each list under its lock
//! (the handler then defers, and the deferred frees are drained next). The nolock contract (DESIGN.md section 3,
//! rule 2) says a handler may interrupt any instruction of the library on the same thread.
//!
//! The test runs `trim` in a loop on a thread that receives a fast stream of signals whose handler allocates,
//! stamps, checks and frees objects of the class `trim` is draining. One test in this binary: the page
//! accounting at the end is process-wide.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nolock::{Gfp, kfree_nolock, kmalloc_nolock};
use testkit::{ErrnoGuard, ThreadTimer};

const SIG: libc::c_int = libc::SIGUSR1;
const SIZE: usize = 64;
const RING: usize = 64;
static RING_ADDR: [AtomicUsize; RING] = [const { AtomicUsize::new(0) }; RING];
static RING_SEQ: [AtomicU64; RING] = [const { AtomicU64::new(0) }; RING];
static NEXT: AtomicUsize = AtomicUsize::new(0);
static SEQ: AtomicU64 = AtomicU64::new(1);
static CORRUPT: AtomicU64 = AtomicU64::new(0);
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
static SIGNALS: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

fn check_free(addr: usize, seq: u64) {
    // SAFETY: a live object of SIZE bytes stamped with `seq`.
    if unsafe { testkit::check(addr as *const u8, SIZE, Some(seq), u64::MAX) }.is_err() {
        CORRUPT.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: our object, freed once.
    unsafe { kfree_nolock(addr as *mut u8) };
}

fn alloc_stamped() -> Option<(usize, u64)> {
    let Some(p) = kmalloc_nolock(SIZE, Gfp::NONE) else {
        SPURIOUS.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // SAFETY: a fresh object of SIZE bytes.
    unsafe { testkit::fill(p.as_ptr(), SIZE, seq) };
    Some((p.as_ptr() as usize, seq))
}

/// Allocate one object into the ring and free the one it replaces. The ring slot is swapped atomically and
/// only this thread's handler touches it, so handlers never see a half-written slot of their own.
extern "C" fn on_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    SIGNALS.fetch_add(1, Ordering::Relaxed);
    if STOP.load(Ordering::Relaxed) {
        return;
    }
    let i = NEXT.fetch_add(1, Ordering::Relaxed) % RING;
    let Some((a, s)) = alloc_stamped() else { return };
    let old_seq = RING_SEQ[i].swap(s, Ordering::Relaxed);
    let old = RING_ADDR[i].swap(a, Ordering::AcqRel);
    if old != 0 {
        check_free(old, old_seq);
    }
}

#[test]
fn trim_interrupted_by_handlers_on_the_same_thread() {
    let _reports = testkit::NoReports::new();
    nolock::Config::new().background(false).apply().expect("first nolock use in this binary");
    testkit::install_handler(SIG, on_signal, 0);
    let timer = ThreadTimer::for_current_thread(SIG, Duration::from_micros(20));
    let start = Instant::now();
    let mut trims = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        // Fill this thread's kmalloc-64 list (frees stay cached below the flush threshold), then trim it.
        let held: Vec<_> = (0..400).filter_map(|_| alloc_stamped()).collect();
        for (a, s) in held {
            check_free(a, s);
        }
        nolock::trim();
        trims += 1;
    }
    STOP.store(true, Ordering::Relaxed);
    drop(timer);
    for (a, s) in RING_ADDR.iter().zip(&RING_SEQ) {
        let addr = a.swap(0, Ordering::AcqRel);
        if addr != 0 {
            check_free(addr, s.load(Ordering::Relaxed));
        }
    }
    nolock::trim();
    let snap = nolock::stats::snapshot();
    let k = snap.cache("kmalloc-64").unwrap();
    let pages = nolock::stats::allocated_pages();
    eprintln!(
        "{trims} trims under {} signals; kmalloc-64 allocs {} frees {} cached {} slabs {}; pages left {pages}; \
         corrupted {}",
        SIGNALS.load(Ordering::Relaxed),
        k.allocs,
        k.frees,
        k.cached_objects,
        k.slabs,
        CORRUPT.load(Ordering::Relaxed)
    );
    assert_eq!(SPURIOUS.load(Ordering::Relaxed), 0, "spurious failures");
    assert_eq!(CORRUPT.load(Ordering::Relaxed), 0, "objects handed out twice or overwritten");
    assert_eq!(k.bad_frees, 0, "refused frees");
    assert_eq!(k.allocs, k.frees);
    assert_eq!(pages, 0, "objects lost: pages still allocated after everything was freed and trimmed");
}
