//! Accounting groups (`nolock::memcg`): charges and uncharges of single allocations and of a cache's
//! objects, `current` and `peak`, a limit hit as a real `None` counted apart from out-of-memory, and charges
//! from signal handlers that interrupt charges on the same thread.

use core::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock::memcg::{MemGroup, kfree_charged_nolock, kmalloc_charged_nolock};
use nolock::{FaultInjection, Gfp, KmemCache, kmalloc_nolock};

#[test]
fn single_allocations_charge_their_usable_size() {
    let _reports = testkit::NoReports::new();
    let g = MemGroup::new();
    let a = kmalloc_charged_nolock(100, Gfp::NONE, &g).unwrap();
    assert_eq!(g.current(), 112, "kmalloc-112");
    let b = kmalloc_charged_nolock(20_000, Gfp::NONE, &g).unwrap();
    assert_eq!(g.current(), 112 + 20_480, "kmalloc-20k");
    let c = kmalloc_charged_nolock(40_000, Gfp::NONE, &g).unwrap();
    assert_eq!(g.current(), 112 + 20_480 + 40_960, "a page run of 10 pages");
    // SAFETY: from kmalloc_charged_nolock with this group.
    unsafe { kfree_charged_nolock(c.as_ptr(), &g) };
    // SAFETY: as above.
    unsafe { kfree_charged_nolock(b.as_ptr(), &g) };
    assert_eq!(g.current(), 112);
    // SAFETY: as above.
    unsafe { kfree_charged_nolock(a.as_ptr(), &g) };
    let s = g.stats();
    assert_eq!((s.current, s.peak, s.charges, s.uncharges), (0, 112 + 20_480 + 40_960, 3, 3));
    g.reset_peak();
    assert_eq!(g.peak(), 0);
}

#[test]
fn a_limit_hit_is_none_and_counted_apart_from_oom() {
    let _reports = testkit::NoReports::new();
    static G: MemGroup = MemGroup::with_limit(1000);
    let mut got = Vec::new();
    while let Some(p) = kmalloc_charged_nolock(64, Gfp::NONE, &G) {
        got.push(p);
    }
    assert_eq!(got.len(), 1000 / 64, "up to the limit");
    assert!(G.current() <= 1000 && G.peak() <= 1000);
    let s = G.stats();
    assert_eq!((s.limit_hits, s.oom), (1, 0), "a limit hit, not an out-of-memory");
    // Memory is there: the same allocation uncharged succeeds.
    let free = kmalloc_nolock(64, Gfp::NONE).expect("memory is available");
    // SAFETY: just allocated.
    unsafe { nolock::kfree_nolock(free.as_ptr()) };
    for p in got {
        // SAFETY: from kmalloc_charged_nolock with G.
        unsafe { kfree_charged_nolock(p.as_ptr(), &G) };
    }
    assert_eq!(G.current(), 0);
    G.set_limit(None);
    assert_eq!(G.limit(), None);
}

#[test]
fn a_charged_cache_charges_every_object() {
    let _reports = testkit::NoReports::new();
    static G: MemGroup = MemGroup::with_limit(48 * 10);
    let c = KmemCache::builder("memcg-test", Layout::from_size_align(48, 8).unwrap()).memcg(&G).build().unwrap();
    let got: Vec<_> = (0..10).map(|_| c.alloc_nolock(Gfp::NONE).expect("within the limit")).collect();
    assert_eq!(G.current(), 480);
    assert!(c.alloc_nolock(Gfp::NONE).is_none(), "the 11th passes the limit");
    assert_eq!(G.stats().limit_hits, 1);
    for p in got {
        // SAFETY: from this cache.
        unsafe { c.free_nolock(p) };
    }
    assert_eq!(G.current(), 0);
    assert_eq!(G.peak(), 480);
    // Out of memory (injected) is counted as oom, not as a limit hit.
    c.set_fault_injection(FaultInjection::EveryNth(1));
    assert!(c.alloc_nolock(Gfp::NONE).is_none());
    c.set_fault_injection(FaultInjection::Off);
    let s = G.stats();
    assert_eq!((s.limit_hits, s.oom, s.current), (1, 1, 0));
}

static STORM_G: MemGroup = MemGroup::with_limit(64 * 1024);
static HANDLER_OPS: AtomicU64 = AtomicU64::new(0);
static HANDLER_LIMIT_HITS: AtomicU64 = AtomicU64::new(0);
static ON: AtomicBool = AtomicBool::new(false);

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if !ON.load(Ordering::Relaxed) {
        return;
    }
    let _e = testkit::ErrnoGuard::new();
    match kmalloc_charged_nolock(256, Gfp::NONE, &STORM_G) {
        // SAFETY: from kmalloc_charged_nolock with STORM_G.
        Some(p) => unsafe { kfree_charged_nolock(p.as_ptr(), &STORM_G) },
        None => {
            HANDLER_LIMIT_HITS.fetch_add(1, Ordering::Relaxed);
        }
    }
    HANDLER_OPS.fetch_add(1, Ordering::Relaxed);
}

/// Charges from signal handlers that land inside charges and uncharges of the same group on the same thread,
/// with the group at its limit much of the time: the limit is never passed, nothing is lost (back to 0).
#[test]
fn charges_from_nested_signal_handlers_stay_exact() {
    let _reports = testkit::NoReports::new();
    let _saved = testkit::storm::install_handler(handler).unwrap();
    ON.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_millis(800);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let st = testkit::storm::StormSlot::new();
                let _t = st.start(core::ptr::null_mut(), 50_000).unwrap();
                let mut held = Vec::new();
                while Instant::now() < deadline {
                    match kmalloc_charged_nolock(256, Gfp::NONE, &STORM_G) {
                        Some(p) => held.push(p),
                        None => {
                            for p in held.drain(..) {
                                // SAFETY: from kmalloc_charged_nolock with STORM_G.
                                unsafe { kfree_charged_nolock(p.as_ptr(), &STORM_G) };
                            }
                        }
                    }
                }
                for p in held {
                    // SAFETY: as above.
                    unsafe { kfree_charged_nolock(p.as_ptr(), &STORM_G) };
                }
            });
        }
    });
    ON.store(false, Ordering::Relaxed);
    let s = STORM_G.stats();
    assert!(HANDLER_OPS.load(Ordering::Relaxed) > 100, "the storm ran");
    assert!(s.limit_hits > 0, "the limit was hit");
    assert!(s.peak <= 64 * 1024, "the limit was never passed: peak {}", s.peak);
    assert_eq!(s.current, 0, "every charge uncharged");
    assert_eq!(s.charges, s.uncharges);
}
