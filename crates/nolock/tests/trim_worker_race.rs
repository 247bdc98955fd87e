//! `trim()` racing the background worker's shrink of the same cache.
//!
//! `trim` promises to "release every entirely free slab of every cache". Only one shrinker runs per cache at a
//! time (the `shrinking` flag). This test found that a `trim` that met the worker in the middle of shrinking a
//! cache (keeping `KEEP_EMPTY_SLABS` = 2 empty slabs) skipped that cache, leaving the kept slabs allocated;
//! `trim` now waits for the shrink in progress and then shrinks with nothing kept.
//!
//! The test pauses the worker inside its shrink (a reentry hook at `PageFree` on the worker thread), runs
//! `trim` meanwhile, lets the worker finish, and checks that no empty slab is left.

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nolock::hooks::{Point, set_hook};
use nolock::{Gfp, KmemCache};

static ARMED: AtomicBool = AtomicBool::new(false);
static PAUSED: AtomicBool = AtomicBool::new(false);
static RESUME: AtomicBool = AtomicBool::new(false);

/// Pause the worker once, in the middle of releasing a slab.
fn hook(at: Point) {
    if at != Point::PageFree || std::thread::current().name() != Some("nolock-worker") {
        return;
    }
    if !ARMED.swap(false, Ordering::AcqRel) {
        return;
    }
    PAUSED.store(true, Ordering::Release);
    let start = Instant::now();
    while !RESUME.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn trim_while_the_worker_shrinks_the_same_cache() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    assert!(nolock::worker_running(), "this test needs the background worker");
    let cache = KmemCache::new("trim-race-obj", Layout::new::<[u64; 8]>()).unwrap();
    ARMED.store(true, Ordering::Release);
    set_hook(Some(hook));

    // Fill ten slabs from a thread that then exits: its lists go back, the slabs become entirely free, and the
    // worker's next pass shrinks the cache (keeping two empty slabs, releasing the rest).
    let per_slab = cache.stats().objects_per_slab.max(64);
    std::thread::scope(|s| {
        s.spawn(|| {
            let objs: Vec<_> = (0..10 * per_slab).map(|_| cache.alloc_nolock(Gfp::NONE).unwrap()).collect();
            for p in objs {
                // SAFETY: our object of this cache, freed once.
                unsafe { cache.free_nolock(p) };
            }
        });
    });
    let start = Instant::now();
    while !PAUSED.load(Ordering::Acquire) {
        assert!(start.elapsed() < Duration::from_secs(5), "the worker never shrank the cache");
        std::thread::sleep(Duration::from_millis(1));
    }

    // The worker is inside `shrink` of our cache. trim() should still leave no entirely free slab behind: it
    // waits for the worker's shrink (resumed shortly by another thread) and then releases the rest.
    let resumer = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(100));
        RESUME.store(true, Ordering::Release);
    });
    let report = nolock::trim();
    resumer.join().unwrap();
    // Let the worker finish its shrink.
    let start = Instant::now();
    let mut last = cache.stats().slabs_freed;
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = cache.stats().slabs_freed;
        if now == last || start.elapsed() > Duration::from_secs(2) {
            break;
        }
        last = now;
    }
    set_hook(None);

    let st = cache.stats();
    assert_eq!(st.allocs, st.frees);
    assert_eq!(
        st.slabs, 0,
        "after trim() ({report:?}) and the worker's pass, {} entirely free slabs are still allocated",
        st.slabs
    );
    assert_eq!(cache.destroy().live_objects, 0);
}
