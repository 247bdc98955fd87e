//! Resident memory falls after a large free *without* `trim()`: the background worker (started by
//! `nolock::init()`, running every 20 ms here through `NOLOCK_PURGE_INTERVAL_MS`) shrinks caches whose slabs
//! became empty and purges pages that stayed free, so the resident set falls on its own.
//!
//! Objects sitting in a live thread's per-thread list are not the worker's to give back, so the objects are
//! allocated and freed by a thread that then exits (its exit hook returns its cached objects to their slabs).
//! RSS is process-wide and the environment is set at the start, so this file holds a single test.

use std::time::{Duration, Instant};

use nolock::{Gfp, kmalloc_nolock, try_kfree_nolock};

const MIB: usize = 1 << 20;

/// (size, count): about 256 MiB in total, in several slab classes and page runs.
const WORKLOAD: [(usize, usize); 6] =
    [(64, 512 * 1024), (200, 160 * 1024), (1000, 32 * 1024), (4096, 16 * 1024), (100_000, 320), (MIB, 64)];

fn rss() -> usize {
    nolock::stats::resident_bytes().expect("/proc/self/statm")
}

#[test]
fn worker_gives_memory_back() {
    let _reports = testkit::NoReports::new();
    // SAFETY: this is the first thing the test binary's only test does: no thread of this process reads or
    // writes the environment concurrently (the test harness's main thread is only waiting for this one).
    unsafe { std::env::set_var("NOLOCK_PURGE_INTERVAL_MS", "20") };
    nolock::init();
    assert!(
        nolock::worker_running(),
        "the background worker did not start (is NOLOCK_BACKGROUND=0 set in the environment?)"
    );
    let total: usize = WORKLOAD.iter().map(|&(s, n)| s * n).sum();
    let base = rss();

    // Allocate, touch, and free everything on a thread that then exits.
    let peak = std::thread::spawn(move || {
        let count: usize = WORKLOAD.iter().map(|&(_, n)| n).sum();
        let mut objs: Vec<(usize, usize)> = Vec::with_capacity(count);
        for &(size, n) in &WORKLOAD {
            for i in 0..n {
                let p = kmalloc_nolock(size, Gfp::NONE).expect("memory available");
                // SAFETY: a fresh object of `size` bytes: touch all of it.
                unsafe { p.as_ptr().write_bytes((i % 251) as u8 | 1, size) };
                objs.push((p.as_ptr() as usize, size));
            }
        }
        let peak = rss();
        for (p, size) in objs {
            // SAFETY: our objects, freed once.
            unsafe {
                assert_ne!(*(p as *const u8).add(size - 1), 0);
                assert_eq!(try_kfree_nolock(p as *mut u8), Ok(()));
            }
        }
        peak
    })
    .join()
    .unwrap();
    let rise = peak.saturating_sub(base);
    eprintln!("allocated {} MiB; RSS {} -> {} MiB", total / MIB, base / MIB, peak / MIB);
    assert!(rise >= total * 85 / 100, "RSS rose by {} MiB for {} MiB allocated", rise / MIB, total / MIB);

    // No trim: wait (bounded) for the worker to shrink the caches and purge the pages.
    let start = Instant::now();
    let target = peak - rise * 75 / 100;
    let mut now = rss();
    while now > target && start.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(20));
        now = rss();
    }
    let purged = nolock::stats::snapshot().pages.purged_pages;
    eprintln!("RSS {} MiB after {:?} without trim ({} pages purged by the worker)", now / MIB, start.elapsed(), purged);
    assert!(
        now <= target,
        "RSS fell by only {} MiB of a {} MiB rise within {:?}",
        peak.saturating_sub(now) / MIB,
        rise / MIB,
        start.elapsed()
    );
}
