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
