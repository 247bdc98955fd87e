//! `alloc_pages_nolock` / `free_pages_nolock`: every order from 0 to 10, alignment, `Gfp::ZERO` on reused
//! pages, page accounting, and concurrent use. (Exhausting the arena is in `pages_exhaust.rs`, which needs a
//! small arena configured before first use.)
//!
//! The tests check exact page counts, so they run one at a time.

use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use nolock::{Gfp, alloc_pages_nolock, free_pages_nolock, try_free_pages_nolock};

const PAGE: usize = 4096;

fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn used_pages() -> usize {
    nolock::stats::snapshot().pages.used_pages
}

/// Alignment promised for a run of `2^order` pages: its size, capped at 256 KiB.
fn promised_align(order: u32) -> usize {
    (PAGE << order).min(256 << 10)
}

fn run<'a>(p: NonNull<u8>, order: u32) -> &'a mut [u8] {
    // SAFETY: callers pass a live run of 2^order pages that they own.
    unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), PAGE << order) }
}

#[test]
fn every_order_aligned_distinct_and_freed() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let base = used_pages();
    let mut held: Vec<(NonNull<u8>, u32)> = Vec::new();
    for round in 0..3u8 {
        for order in 0..=10u32 {
            let p = alloc_pages_nolock(order, Gfp::NONE).unwrap_or_else(|| panic!("order {order}"));
            let a = p.as_ptr() as usize;
            assert_eq!(a % promised_align(order), 0, "order {order} alignment");
            let len = PAGE << order;
            for &(q, o) in &held {
                let b = q.as_ptr() as usize;
                assert!(a + len <= b || b + (PAGE << o) <= a, "order {order} run overlaps a live run");
            }
            // Touch every page; stamp the run.
            let s = run(p, order);
            s.fill(round.wrapping_add(order as u8));
            held.push((p, order));
        }
    }
    let total: usize = held.iter().map(|&(_, o)| 1usize << o).sum();
    assert_eq!(used_pages() - base, total, "page accounting");
    for (i, &(p, order)) in held.iter().enumerate() {
        let round = (i / 11) as u8;
        assert!(run(p, order).iter().all(|&b| b == round.wrapping_add(order as u8)), "run contents kept");
    }
    for (i, (p, order)) in held.into_iter().enumerate() {
        if i % 2 == 0 {
            // SAFETY: our run, right order, freed once.
            assert_eq!(unsafe { try_free_pages_nolock(p, order) }, Ok(()));
        } else {
            // SAFETY: as above.
            unsafe { free_pages_nolock(p, order) };
        }
    }
    assert_eq!(used_pages(), base);
}

#[test]
fn zero_flag_clears_reused_pages() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    for order in [0u32, 1, 3, 6, 7, 9] {
        // Dirty a batch of runs, free them, then allocate the same number again with ZERO: the allocator hands
        // back (at least some of) the dirty pages, and every byte must read as zero.
        let n = 16;
        let dirty: Vec<_> = (0..n).map(|_| alloc_pages_nolock(order, Gfp::NONE).unwrap()).collect();
        let dirty_addrs: Vec<usize> = dirty.iter().map(|p| p.as_ptr() as usize).collect();
        for &p in &dirty {
            run(p, order).fill(0xff);
        }
        for &p in &dirty {
            // SAFETY: our runs, freed once.
            assert_eq!(unsafe { try_free_pages_nolock(p, order) }, Ok(()));
        }
        let zeroed: Vec<_> = (0..n).map(|_| alloc_pages_nolock(order, Gfp::ZERO).unwrap()).collect();
        let reused = zeroed.iter().filter(|p| dirty_addrs.contains(&(p.as_ptr() as usize))).count();
        assert!(reused > 0, "order {order}: freed runs are reused");
        for &p in &zeroed {
            assert!(run(p, order).iter().all(|&b| b == 0), "order {order}: ZERO run not zeroed");
            run(p, order).fill(0xee);
        }
        // Without ZERO the old contents may stay; with ZERO again they are gone.
        for &p in &zeroed {
            // SAFETY: our runs, freed once.
            assert_eq!(unsafe { try_free_pages_nolock(p, order) }, Ok(()));
        }
        let again: Vec<_> = (0..n).map(|_| alloc_pages_nolock(order, Gfp::ZERO).unwrap()).collect();
        for &p in &again {
            assert!(run(p, order).iter().all(|&b| b == 0), "order {order}: ZERO after ZERO");
            // SAFETY: our run, freed once.
            assert_eq!(unsafe { try_free_pages_nolock(p, order) }, Ok(()));
        }
    }
}

#[test]
fn zero_flag_after_trim() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    // Pages purged by trim (MADV_DONTNEED) read as zero, and ZERO allocations of them are zero too.
    let runs: Vec<_> = (0..8).map(|_| alloc_pages_nolock(4, Gfp::NONE).unwrap()).collect();
    for &p in &runs {
        run(p, 4).fill(0x5a);
        // SAFETY: our run, freed once.
        unsafe { free_pages_nolock(p, 4) };
    }
    nolock::trim();
    let back: Vec<_> = (0..8).map(|_| alloc_pages_nolock(4, Gfp::ZERO).unwrap()).collect();
    for &p in &back {
        assert!(run(p, 4).iter().all(|&b| b == 0));
        // SAFETY: our run, freed once.
        unsafe { free_pages_nolock(p, 4) };
    }
}

#[test]
fn concurrent_alloc_free_pages() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let base = used_pages();
    std::thread::scope(|s| {
        for t in 0..3usize {
            s.spawn(move || {
                let mut held: Vec<(NonNull<u8>, u32, usize)> = Vec::new();
                for i in 0..6000usize {
                    let order = ((i * 7 + t) % 6) as u32;
                    let p = alloc_pages_nolock(order, Gfp::NONE).expect("pages available");
                    assert_eq!(p.as_ptr() as usize % promised_align(order), 0);
                    let stamp = (t << 32) | i;
                    // SAFETY: the run is ours: stamp its first and last word.
                    unsafe {
                        (p.as_ptr() as *mut usize).write(stamp);
                        (p.as_ptr().add((PAGE << order) - 8) as *mut usize).write(stamp);
                    }
                    held.push((p, order, stamp));
                    if held.len() > 48 || i % 3 == 0 {
                        let (q, o, st) = held.swap_remove((i * 31) % held.len());
                        // SAFETY: our run; a run handed out twice would carry another thread's stamp.
                        unsafe {
                            assert_eq!((q.as_ptr() as *const usize).read(), st);
                            assert_eq!((q.as_ptr().add((PAGE << o) - 8) as *const usize).read(), st);
                            assert_eq!(try_free_pages_nolock(q, o), Ok(()));
                        }
                    }
                }
                for (q, o, st) in held {
                    // SAFETY: as above.
                    unsafe {
                        assert_eq!((q.as_ptr() as *const usize).read(), st);
                        assert_eq!(try_free_pages_nolock(q, o), Ok(()));
                    }
                }
            });
        }
    });
    assert_eq!(used_pages(), base, "every page given back");
}

#[test]
fn pages_and_kmalloc_do_not_overlap() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let mut runs = Vec::new();
    let mut objs = Vec::new();
    for i in 0..200usize {
        runs.push(alloc_pages_nolock((i % 3) as u32, Gfp::NONE).unwrap());
        objs.push((nolock::kmalloc_nolock(100 + i * 50, Gfp::NONE).unwrap(), 100 + i * 50));
    }
    let mut ranges: Vec<(usize, usize)> = runs
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_ptr() as usize, PAGE << (i % 3)))
        .chain(objs.iter().map(|&(p, n)| (p.as_ptr() as usize, n)))
        .collect();
    ranges.sort_unstable();
    for w in ranges.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "{:#x}+{} overlaps {:#x}", w[0].0, w[0].1, w[1].0);
    }
    for (i, p) in runs.into_iter().enumerate() {
        // SAFETY: our run, freed once.
        assert_eq!(unsafe { try_free_pages_nolock(p, (i % 3) as u32) }, Ok(()));
    }
    for (p, _) in objs {
        // SAFETY: our object, freed once.
        assert_eq!(unsafe { nolock::try_kfree_nolock(p.as_ptr()) }, Ok(()));
    }
}
