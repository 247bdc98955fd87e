//! Exhausting a small arena: `alloc_pages_nolock` fails only when every page is taken (the total allocated
//! equals the arena), freed runs are found again, and kmalloc / `KmemCache` / `NBox` return `None` (or the
//! value back) at exhaustion and recover after frees.
//!
//! The 64 MiB arena must be configured before nolock's first use, so this file holds a single test. The
//! background worker is turned off so that no purge pass holds free pages while the test counts them.

use std::alloc::Layout;
use std::collections::BTreeSet;
use std::ptr::NonNull;

use nolock::{
    Config, Gfp, KmemCache, NBox, alloc_pages_nolock, kmalloc_nolock, try_free_pages_nolock, try_kfree_nolock,
};

const PAGE: usize = 4096;
const ARENA: usize = 64 << 20;
const ARENA_PAGES: usize = ARENA / PAGE;

/// Allocate order-`order` runs until `None`; returns them.
fn exhaust_pages(order: u32) -> Vec<NonNull<u8>> {
    let mut v = Vec::new();
    while let Some(p) = alloc_pages_nolock(order, Gfp::NONE) {
        v.push(p);
        assert!(v.len() << order <= ARENA_PAGES, "more pages than the arena has");
    }
    v
}

fn free_all(runs: Vec<NonNull<u8>>, order: u32) {
    for p in runs {
        // SAFETY: our runs, freed once.
        assert_eq!(unsafe { try_free_pages_nolock(p, order) }, Ok(()));
    }
}

/// Allocate kmalloc objects of `size` until `None`; returns them.
fn exhaust_kmalloc(size: usize) -> Vec<NonNull<u8>> {
    let mut v = Vec::new();
    while let Some(p) = kmalloc_nolock(size, Gfp::NONE) {
        // SAFETY: a fresh object of `size` bytes: stamp it.
        unsafe { (p.as_ptr() as *mut usize).write(p.as_ptr() as usize) };
        v.push(p);
        assert!(v.len() * size <= ARENA, "more memory than the arena has");
    }
    v
}

fn kfree_all(objs: Vec<NonNull<u8>>) {
    for p in objs {
        // SAFETY: our objects, stamped at allocation, freed once.
        unsafe {
            assert_eq!((p.as_ptr() as *const usize).read(), p.as_ptr() as usize, "object contents kept");
            assert_eq!(try_kfree_nolock(p.as_ptr()), Ok(()));
        }
    }
}

#[test]
fn exhaust_arena() {
    let _reports = testkit::NoReports::new();
    Config::new().arena_size(ARENA).background(false).apply().expect("configured before first use");
    let snap = nolock::stats::snapshot();
    assert_eq!(
        Config::new().arena_size(ARENA).apply(),
        Err(nolock::ConfigError::AlreadyInitialized),
        "settings are fixed after the first use"
    );
    assert_eq!(snap.pages.arena_pages, ARENA_PAGES);
    assert_eq!(snap.pages.used_pages, 0);

    // 1. Order 0 until None: exactly the whole arena, every page distinct.
    let pages = exhaust_pages(0);
    assert_eq!(pages.len(), ARENA_PAGES, "no failure before the arena is exhausted");
    let set: BTreeSet<usize> = pages.iter().map(|p| p.as_ptr() as usize).collect();
    assert_eq!(set.len(), pages.len(), "distinct pages");
    let (lo, hi) = (*set.first().unwrap(), *set.last().unwrap());
    assert_eq!(hi - lo, ARENA - PAGE, "the pages are the arena, contiguous");
    assert_eq!(nolock::stats::allocated_pages(), ARENA_PAGES);
    assert!(alloc_pages_nolock(0, Gfp::NONE).is_none());
    assert!(alloc_pages_nolock(5, Gfp::ZERO).is_none());

    // At exhaustion kmalloc, KmemCache and NBox fail too (None means out of memory).
    let large_failures = nolock::stats::snapshot().large.failures;
    assert!(kmalloc_nolock(64, Gfp::NONE).is_none(), "kmalloc-64 at exhaustion");
    assert!(kmalloc_nolock(5000, Gfp::NONE).is_none(), "kmalloc-8k at exhaustion");
    assert!(kmalloc_nolock(100_000, Gfp::NONE).is_none(), "large kmalloc at exhaustion");
    assert!(nolock::stats::snapshot().large.failures > large_failures);
    let cache = KmemCache::new("exhaust-obj", Layout::new::<[u64; 3]>()).unwrap();
    assert!(cache.alloc_nolock(Gfp::NONE).is_none());
    assert_eq!(cache.stats().failures, 1, "counted as a real failure");
    assert_eq!(NBox::try_new([1u8; 100]).err(), Some([1u8; 100]));

    // 2. A freed page is found again; freed pages are reused exactly.
    let mut pages = pages;
    let freed: Vec<NonNull<u8>> = (0..5).map(|i| pages.swap_remove(i * 1000)).collect();
    let freed_set: BTreeSet<usize> = freed.iter().map(|p| p.as_ptr() as usize).collect();
    free_all(freed, 0);
    for _ in 0..5 {
        let p = alloc_pages_nolock(0, Gfp::ZERO).expect("a freed page is allocated again");
        assert!(freed_set.contains(&(p.as_ptr() as usize)), "only the freed pages are free");
        pages.push(p);
    }
    assert!(alloc_pages_nolock(0, Gfp::NONE).is_none());

    // A freed, aligned block of 16 pages serves an order-4 allocation; scattered pages do not.
    pages.sort_by_key(|p| p.as_ptr() as usize);
    let start = pages.iter().position(|p| (p.as_ptr() as usize).is_multiple_of(16 * PAGE)).unwrap() + 16 * 7;
    let block: Vec<NonNull<u8>> = pages.drain(start..start + 16).collect();
    assert_eq!(block[15].as_ptr() as usize - block[0].as_ptr() as usize, 15 * PAGE);
    let block_start = block[0].as_ptr() as usize;
    free_all(block, 0);
    let p4 = alloc_pages_nolock(4, Gfp::ZERO).expect("a free aligned block of 16 pages");
    assert_eq!(p4.as_ptr() as usize, block_start);
    // SAFETY: zeroed run of 16 pages, ours.
    assert!(unsafe { std::slice::from_raw_parts(p4.as_ptr(), 16 * PAGE) }.iter().all(|&b| b == 0));
    // SAFETY: ours, freed once.
    assert_eq!(unsafe { try_free_pages_nolock(p4, 4) }, Ok(()));

    // Now 16 free pages: kmalloc recovers (a slab fits).
    let k = kmalloc_nolock(64, Gfp::NONE).expect("kmalloc recovers after pages are freed");
    // SAFETY: ours.
    assert_eq!(unsafe { try_kfree_nolock(k.as_ptr()) }, Ok(()));
    let c = cache.alloc_nolock(Gfp::NONE).expect("KmemCache recovers");
    // SAFETY: ours.
    assert_eq!(unsafe { cache.try_free_nolock(c) }, Ok(()));
    free_all(pages, 0);
    nolock::trim();
    assert_eq!(nolock::stats::snapshot().pages.used_pages, 0, "every page back after trim");

    // 3. Whole-arena exhaustion at other orders (including runs longer than one bitmap word).
    for order in [3u32, 6, 7, 10] {
        let runs = exhaust_pages(order);
        assert_eq!(runs.len() << order, ARENA_PAGES, "order {order}: whole arena");
        free_all(runs, order);
    }

    // 4. kmalloc until None: nearly the whole arena is usable through slabs; at exhaustion every class fails;
    //    after frees it recovers, and memory moves between classes (empty slabs are reclaimed on demand).
    let objs = exhaust_kmalloc(4096);
    // After the trim above nothing else holds pages, and 4 KiB objects pack slabs without waste.
    assert_eq!(objs.len() * 4096, ARENA, "kmalloc-4k fills the whole arena before failing");
    assert!(kmalloc_nolock(8, Gfp::NONE).is_none(), "another class cannot get a slab either");
    assert!(alloc_pages_nolock(0, Gfp::NONE).is_none());
    assert!(kmalloc_nolock(4096, Gfp::NONE).is_none());
    kfree_all(objs);
    let objs = exhaust_kmalloc(64);
    assert!(objs.len() * 64 >= ARENA * 90 / 100, "kmalloc-64 after kmalloc-4k: {} bytes", objs.len() * 64);
    eprintln!("kmalloc-64 objects after kmalloc-4k: {} ({} % of the arena)", objs.len(), objs.len() * 6400 / ARENA);
    kfree_all(objs);
    let big = exhaust_kmalloc(1 << 20);
    eprintln!("1 MiB objects after kmalloc-64: {}", big.len());
    assert!(big.len() >= 60, "1 MiB objects after kmalloc-64: {}", big.len());
    kfree_all(big);
    nolock::trim();
    let in_use = nolock::stats::snapshot().pages.used_pages;
    let runs = exhaust_pages(0);
    assert_eq!(runs.len(), ARENA_PAGES - in_use, "every free page can be allocated");
    assert!(runs.len() >= ARENA_PAGES * 99 / 100, "pages after trim: {}", runs.len());
    free_all(runs, 0);
    assert_eq!(cache.destroy().live_objects, 0);
}
