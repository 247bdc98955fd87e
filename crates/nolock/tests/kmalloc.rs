//! Basic behaviour of kmalloc_nolock / kfree_nolock / ksize / KmemCache across threads.

use std::alloc::Layout;
use std::collections::HashSet;

use nolock::{
    Gfp, KMALLOC_SIZES, KmemCache, ZERO_SIZE_PTR, kfree_nolock, kmalloc_layout_nolock, kmalloc_nolock, ksize,
};

#[test]
fn every_class_and_large() {
    let _reports = testkit::NoReports::new();
    let mut seen = HashSet::new();
    let mut held = Vec::new();
    for size in [
        1usize, 7, 8, 9, 63, 64, 65, 96, 97, 150, 192, 193, 256, 500, 1000, 2048, 4000, 8192, 8193, 32_768, 32_769,
        70_000,
    ] {
        for _ in 0..50 {
            let p = kmalloc_nolock(size, Gfp::ZERO).unwrap();
            let a = p.as_ptr() as usize;
            assert!(seen.insert(a), "address handed out twice");
            assert!(ksize(p.as_ptr()) >= size);
            // SAFETY: p is a fresh object of at least `size` bytes.
            let s = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), size) };
            assert!(s.iter().all(|&b| b == 0), "ZERO honoured");
            s.fill(0x5a);
            held.push((p, size));
        }
    }
    for &(p, size) in &held {
        // SAFETY: our objects.
        let s = unsafe { std::slice::from_raw_parts(p.as_ptr(), size) };
        assert!(s.iter().all(|&b| b == 0x5a), "contents kept until free");
    }
    for (p, _) in held {
        // SAFETY: freeing our objects once.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
}

#[test]
fn classes_are_exact_and_aligned() {
    let _reports = testkit::NoReports::new();
    for &c in &KMALLOC_SIZES {
        let p = kmalloc_nolock(c, Gfp::NONE).unwrap();
        assert_eq!(ksize(p.as_ptr()), c);
        let align = c & c.wrapping_neg();
        assert_eq!(p.as_ptr() as usize % align, 0, "class {c} alignment");
        // SAFETY: ours.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
    let p = kmalloc_layout_nolock(Layout::from_size_align(65, 64).unwrap(), Gfp::NONE).unwrap();
    assert_eq!(p.as_ptr() as usize % 64, 0);
    assert_eq!(ksize(p.as_ptr()), 128);
    // SAFETY: ours.
    unsafe { kfree_nolock(p.as_ptr()) };
}

#[test]
fn zero_size() {
    let _reports = testkit::NoReports::new();
    let p = kmalloc_nolock(0, Gfp::NONE).unwrap();
    assert_eq!(p.as_ptr(), ZERO_SIZE_PTR);
    assert_eq!(ksize(p.as_ptr()), 0);
    // SAFETY: ZERO_SIZE_PTR and null are accepted and ignored.
    unsafe {
        kfree_nolock(p.as_ptr());
        kfree_nolock(std::ptr::null_mut());
    }
}

#[test]
fn cross_thread_free_and_outliving_threads() {
    let _reports = testkit::NoReports::new();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<usize>>();
    let producer = std::thread::spawn(move || {
        for round in 0..50 {
            let batch: Vec<usize> = (0..500)
                .map(|i| {
                    let p = kmalloc_nolock(64, Gfp::NONE).unwrap();
                    // SAFETY: fresh 64-byte object.
                    unsafe { (p.as_ptr() as *mut usize).write(round * 1000 + i) };
                    p.as_ptr() as usize
                })
                .collect();
            tx.send(batch).unwrap();
        }
    });
    producer.join().unwrap(); // objects outlive the thread that allocated them
    let consumer = std::thread::spawn(move || {
        for (round, batch) in rx.iter().enumerate() {
            for (i, a) in batch.into_iter().enumerate() {
                // SAFETY: object allocated by the producer and handed to us.
                unsafe {
                    assert_eq!((a as *const usize).read(), round * 1000 + i);
                    kfree_nolock(a as *mut u8);
                }
            }
        }
    });
    consumer.join().unwrap();
    let st = nolock::stats::snapshot();
    assert!(st.cache("kmalloc-64").unwrap().remote_frees > 0 || st.cache("kmalloc-64").unwrap().flushes > 0);
}

#[test]
fn kmem_cache_roundtrip() {
    let _reports = testkit::NoReports::new();
    let cache = KmemCache::builder("test-obj", Layout::new::<[u64; 5]>()).freeptr_offset(16).build().unwrap();
    assert_eq!(cache.object_size(), 40);
    let mut v = Vec::new();
    for i in 0..10_000u64 {
        let p = cache.alloc_nolock(Gfp::NONE).unwrap();
        // SAFETY: fresh 40-byte object.
        unsafe { (p.as_ptr() as *mut u64).write(i) };
        v.push(p);
    }
    for (i, p) in v.iter().enumerate() {
        // SAFETY: ours.
        assert_eq!(unsafe { (p.as_ptr() as *const u64).read() }, i as u64);
    }
    for p in v {
        // SAFETY: ours, freed once.
        unsafe { cache.free_nolock(p) };
    }
    let s = cache.stats();
    assert_eq!(s.allocs, 10_000);
    assert_eq!(s.frees, 10_000);
    let report = cache.destroy();
    assert_eq!(report.live_objects, 0);
    assert!(report.slabs_released > 0);
}
