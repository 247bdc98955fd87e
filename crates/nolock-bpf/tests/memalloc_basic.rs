//! BpfMemAlloc: the kernel's constants and the failures it keeps on purpose, deterministically.

use std::sync::Arc;
use std::time::Duration;

use nolock::memcg::MemGroup;
use nolock_bpf::cpu::{IrqRegion, this_cpu};
use nolock_bpf::memalloc::{BpfMaConfig, BpfMemAlloc, MAX_ALLOC_SIZE, MaGfp, RefillMode, SIZES, cache_idx};

fn fixed(size: usize, refill: RefillMode) -> BpfMemAlloc {
    BpfMemAlloc::new(Some(size), BpfMaConfig { refill, ..Default::default() }).unwrap()
}

#[test]
fn size_index_matches_the_kernel() {
    // Sizes are units, header included.
    assert_eq!(cache_idx(8).map(|i| SIZES[i]), Some(16));
    assert_eq!(cache_idx(16).map(|i| SIZES[i]), Some(16));
    assert_eq!(cache_idx(17).map(|i| SIZES[i]), Some(32));
    assert_eq!(cache_idx(65).map(|i| SIZES[i]), Some(96));
    assert_eq!(cache_idx(72).map(|i| SIZES[i]), Some(96));
    assert_eq!(cache_idx(97).map(|i| SIZES[i]), Some(128));
    assert_eq!(cache_idx(129).map(|i| SIZES[i]), Some(192));
    assert_eq!(cache_idx(193).map(|i| SIZES[i]), Some(256));
    assert_eq!(cache_idx(257).map(|i| SIZES[i]), Some(512));
    assert_eq!(cache_idx(4096).map(|i| SIZES[i]), Some(4096));
    assert_eq!(cache_idx(4097), None);
    assert_eq!(cache_idx(0), None);
    for s in 1..=4096 {
        let u = SIZES[cache_idx(s).unwrap()];
        assert!(u >= s, "{s} -> {u}");
    }
}

#[test]
fn e2big_above_4088() {
    let ma = BpfMemAlloc::new(None, BpfMaConfig::default()).unwrap();
    let _r = IrqRegion::enter();
    assert!(ma.alloc(MAX_ALLOC_SIZE + 1).is_none());
    assert_eq!(ma.stats().too_big, 1);
    let p = ma.alloc(MAX_ALLOC_SIZE).expect("4088 bytes fit the 4096 cache");
    // SAFETY: from this allocator, not used again.
    unsafe { ma.free(p) };
}

/// The production failure: a burst into a fresh allocator within one region fails at the 5th allocation
/// (prefill 4) although kmalloc has memory, and with late refill later regions keep failing until the late
/// worker got to it.
#[test]
fn burst_fails_at_fifth_with_late_refill() {
    let ma = fixed(64, RefillMode::Late(Duration::from_millis(50)));
    let mut got = Vec::new();
    {
        let _r = IrqRegion::enter();
        for _ in 0..4 {
            got.push(ma.cache_alloc().expect("the 4 prefilled objects"));
        }
        assert!(ma.cache_alloc().is_none(), "5th allocation of the burst");
    }
    // Memory is free: a direct kmalloc works.
    let k = nolock::kmalloc_nolock(72, nolock::Gfp::NONE).expect("kmalloc has memory");
    // SAFETY: just allocated.
    unsafe { nolock::kfree_nolock(k.as_ptr()) };
    // The next region, before the late worker got to it: still empty.
    {
        let _r = IrqRegion::enter();
        assert!(ma.cache_alloc().is_none(), "refill is late");
    }
    let s = ma.stats();
    assert_eq!(s.empty_none, 2);
    assert_eq!(s.refills, 0);
    // After the delay the refill runs at the next region boundary.
    let mut ok = None;
    for _ in 0..200 {
        std::thread::sleep(Duration::from_millis(5));
        let _r = IrqRegion::enter();
        if let Some(p) = ma.cache_alloc() {
            ok = Some(p);
            break;
        }
    }
    got.push(ok.expect("late refill eventually ran"));
    assert!(ma.stats().refills >= 1);
    let _r = IrqRegion::enter();
    for p in got {
        // SAFETY: from this allocator.
        unsafe { ma.cache_free(p) };
    }
}

#[test]
fn burst_at_region_end_refill_never_fails_across_regions() {
    let ma = fixed(64, RefillMode::AtRegionEnd);
    let mut got = Vec::new();
    {
        let _r = IrqRegion::enter();
        for _ in 0..4 {
            got.push(ma.cache_alloc().unwrap());
        }
        assert!(ma.cache_alloc().is_none(), "5th in the same region fails: refill comes after the region");
    }
    for _ in 0..1000 {
        let _r = IrqRegion::enter();
        got.push(ma.cache_alloc().expect("one allocation per region never fails"));
    }
    assert!(ma.stats().refills >= 1);
    {
        let _r = IrqRegion::enter();
        for p in got.drain(..) {
            // SAFETY: from this allocator.
            unsafe { ma.cache_free(p) };
        }
    }
    // Trimmed down to at most high after the frees.
    let cpu = this_cpu().unwrap();
    assert!(ma.free_count(cpu, 0) <= 96, "{}", ma.free_count(cpu, 0));
    assert!(ma.stats().trims >= 1);
}

#[test]
fn cache_alloc_flags_kernel_falls_back() {
    let ma = fixed(64, RefillMode::Late(Duration::from_secs(3600)));
    let _r = IrqRegion::enter();
    let mut got: Vec<_> = (0..4).map(|_| ma.cache_alloc().unwrap()).collect();
    assert!(ma.cache_alloc_flags(MaGfp::NoWait).is_none());
    got.push(ma.cache_alloc_flags(MaGfp::Kernel).expect("GFP_KERNEL falls back to kmalloc"));
    assert_eq!(ma.stats().direct_fallbacks, 1);
    for p in got {
        // SAFETY: from this allocator.
        unsafe { ma.cache_free(p) };
    }
}

#[test]
fn group_is_charged_and_uncharged() {
    let g = Arc::new(MemGroup::new());
    {
        let ma = BpfMemAlloc::new(None, BpfMaConfig { group: Some(g.clone()), ..Default::default() }).unwrap();
        let _r = IrqRegion::enter();
        let p = ma.alloc(100).unwrap();
        assert_eq!(g.current(), ma.mem_usage());
        assert!(g.current() >= 4 * 128);
        // SAFETY: from this allocator.
        unsafe { ma.free(p) };
        drop(_r);
        drop(ma);
    }
    assert_eq!(g.current(), 0);
    assert!(g.peak() >= 4 * 128);
}

/// A double free and a free of a pointer from another allocator are refused and counted (their headers do
/// not name one of this allocator's caches); nothing is corrupted or lost.
#[test]
fn bad_frees_are_refused() {
    let a = fixed(64, RefillMode::AtRegionEnd);
    let b = fixed(64, RefillMode::AtRegionEnd);
    let _r = IrqRegion::enter();
    let p = a.cache_alloc().unwrap();
    let q = b.cache_alloc().unwrap();
    // SAFETY: the first free is valid; the second is the bad input under test (the header now holds a list
    // link, which names no cache).
    unsafe {
        a.cache_free(p);
        a.cache_free(p);
    }
    assert_eq!(a.stats().bad_frees, 1);
    // SAFETY: bad input under test: q belongs to b.
    unsafe { a.cache_free(q) };
    assert_eq!(a.stats().bad_frees, 2);
    // SAFETY: q is b's.
    unsafe { b.cache_free(q) };
    assert_eq!(b.stats().bad_frees, 0);
    let s = a.stats();
    assert_eq!(s.allocs, s.frees, "the refused frees were not counted as frees");
    // Each allocator still hands out distinct objects.
    let x = a.cache_alloc().unwrap();
    let y = a.cache_alloc().unwrap();
    assert_ne!(x, y);
    // SAFETY: from a.
    unsafe {
        a.cache_free(x);
        a.cache_free(y);
    }
}

/// The kernel's watermarks: 32/96 (batch 48) up to 256-byte units, then max(8192/unit, 1) / max(24576/unit, 3)
/// with batch max((high - low) / 4 * 3, 1); per-CPU 1/3; prefill 4 up to 256 bytes, else 1. Fixed-size units
/// above 4096 are allowed (a map with 4 KiB values).
#[test]
fn watermarks_match_the_kernel() {
    let var = BpfMemAlloc::new(None, BpfMaConfig::default()).unwrap();
    let want = [
        (96, (32, 96, 48, 4)),
        (192, (32, 96, 48, 4)),
        (16, (32, 96, 48, 4)),
        (256, (32, 96, 48, 4)),
        (512, (16, 48, 24, 1)),
        (1024, (8, 24, 12, 1)),
        (2048, (4, 12, 6, 1)),
        (4096, (2, 6, 3, 1)),
    ];
    for (unit, w) in want {
        let idx = SIZES.iter().position(|&s| s == unit).unwrap();
        assert_eq!(var.watermarks(idx), w, "unit {unit}");
    }
    let pc = BpfMemAlloc::new(Some(64), BpfMaConfig { percpu: true, ..Default::default() }).unwrap();
    assert_eq!(pc.watermarks(0), (1, 3, 1, 1));
    // A hash map element with a 4 KiB value: 48 + 8 + 4096 bytes, plus the header.
    let big = fixed(48 + 8 + 4096, RefillMode::AtRegionEnd);
    assert_eq!(big.watermarks(0), (1, 5, 3, 1));
    let _r = IrqRegion::enter();
    let p = big.cache_alloc().expect("the one prefilled object");
    assert!(big.cache_alloc().is_none(), "prefill 1: the second in the same region fails");
    // SAFETY: from this allocator.
    unsafe { big.cache_free(p) };
    assert!(BpfMemAlloc::new(Some(0), BpfMaConfig::default()).is_err());
    assert!(BpfMemAlloc::new(Some(4 << 20), BpfMaConfig::default()).is_err());
}
