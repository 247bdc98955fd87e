//! Fault injection (the userspace `failslab`): `KmemCache::set_fault_injection` and
//! `nolock::debug::set_kmalloc_fault_injection`.
//!
//! Injected failures must be exact for `EveryNth`, roughly right for `Probability`, counted in
//! `injected_failures` (never in `failures`, which means out of memory), and `Off` must restore normal service.
//! kmalloc injection is process-wide, so the tests of this file run one at a time and turn it off at the end.

use std::alloc::Layout;
use std::sync::{Mutex, MutexGuard};

use nolock::debug::set_kmalloc_fault_injection;
use nolock::{FaultInjection, Gfp, KmemCache, kmalloc_nolock, try_kfree_nolock};

struct Serial(#[allow(dead_code)] MutexGuard<'static, ()>);

fn serial() -> Serial {
    static M: Mutex<()> = Mutex::new(());
    Serial(M.lock().unwrap_or_else(|e| e.into_inner()))
}

impl Drop for Serial {
    fn drop(&mut self) {
        set_kmalloc_fault_injection(FaultInjection::Off);
    }
}

fn cache(name: &str) -> KmemCache {
    KmemCache::new(name, Layout::new::<[u64; 4]>()).unwrap()
}

/// Allocate `n` times; returns which attempts failed, and frees the successes.
fn attempts(c: &KmemCache, n: usize) -> Vec<bool> {
    let mut ok = Vec::new();
    let failed = (0..n)
        .map(|_| match c.alloc_nolock(Gfp::NONE) {
            Some(p) => {
                ok.push(p);
                false
            }
            None => true,
        })
        .collect();
    for p in ok {
        // SAFETY: our objects, freed once.
        assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
    }
    failed
}

fn failed_positions(f: &[bool]) -> Vec<usize> {
    f.iter().enumerate().filter(|(_, x)| **x).map(|(i, _)| i).collect()
}

#[test]
fn every_nth_is_exact() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    for n in [1u32, 2, 3, 7, 64] {
        let c = cache("fault-nth");
        c.set_fault_injection(FaultInjection::EveryNth(n));
        let total = 30 * n as usize;
        let f = attempts(&c, total);
        let pos = failed_positions(&f);
        assert_eq!(pos.len(), 30, "EveryNth({n}): exactly one failure in every {n} allocations");
        assert!(pos[0] < n as usize, "the first failure comes within the first {n} attempts: {pos:?}");
        for w in pos.windows(2) {
            assert_eq!(w[1] - w[0], n as usize, "EveryNth({n}): failures evenly spaced: {pos:?}");
        }
        let st = c.stats();
        assert_eq!(st.injected_failures, 30);
        assert_eq!(st.failures, 0, "injected failures are not out-of-memory failures");
        assert_eq!(st.allocs, (total - 30) as u64);
        assert_eq!(st.frees, st.allocs);

        // Off restores normal service.
        c.set_fault_injection(FaultInjection::Off);
        assert!(attempts(&c, 500).iter().all(|f| !f), "no failure after Off");
        assert_eq!(c.stats().injected_failures, 30);
        assert_eq!(c.destroy().live_objects, 0, "failed allocations leaked nothing");
    }
}

#[test]
fn every_nth_counts_across_threads() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let c = cache("fault-nth-mt");
    c.set_fault_injection(FaultInjection::EveryNth(10));
    let per_thread = 2000;
    let fails: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3).map(|_| s.spawn(|| attempts(&c, per_thread).iter().filter(|f| **f).count())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(fails, 3 * per_thread / 10, "the n-th attempt is counted across threads");
    let st = c.stats();
    assert_eq!(st.injected_failures, fails as u64);
    assert_eq!(st.failures, 0);
    c.set_fault_injection(FaultInjection::Off);
    assert_eq!(c.destroy().live_objects, 0);
}

#[test]
fn probability_is_roughly_right() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let c = cache("fault-prob");
    let n = 20_000;
    for p in [0.01f64, 0.1, 0.25, 0.5, 0.9] {
        let before = c.stats().injected_failures;
        c.set_fault_injection(FaultInjection::Probability(p));
        let fails = attempts(&c, n).iter().filter(|f| **f).count();
        let rate = fails as f64 / n as f64;
        // Loose bounds: the generator need not be good, only not absurd.
        assert!(rate > p * 0.6 && rate < p * 1.4 + 0.005, "Probability({p}): observed rate {rate}");
        assert_eq!(c.stats().injected_failures - before, fails as u64);
    }
    c.set_fault_injection(FaultInjection::Probability(1.0));
    let fails = attempts(&c, 1000).iter().filter(|f| **f).count();
    assert!(fails >= 990, "Probability(1.0): {fails} of 1000 failed");
    c.set_fault_injection(FaultInjection::Probability(0.0));
    assert!(attempts(&c, 1000).iter().all(|f| !f), "Probability(0.0) injects nothing");
    c.set_fault_injection(FaultInjection::Off);
    assert!(attempts(&c, 1000).iter().all(|f| !f), "Off injects nothing");
    assert_eq!(c.stats().failures, 0);
    assert_eq!(c.destroy().live_objects, 0);
}

#[test]
fn injection_is_per_cache() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let a = cache("fault-a");
    let b = cache("fault-b");
    a.set_fault_injection(FaultInjection::EveryNth(1));
    assert!(attempts(&a, 100).iter().all(|f| *f));
    assert!(attempts(&b, 100).iter().all(|f| !f), "another cache is not affected");
    let p = kmalloc_nolock(64, Gfp::NONE).expect("kmalloc is not affected");
    // SAFETY: ours.
    assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    a.set_fault_injection(FaultInjection::Off);
    assert!(attempts(&a, 100).iter().all(|f| !f));
}

fn kmalloc_injected(name: &str) -> (u64, u64) {
    let s = nolock::stats::snapshot();
    let c = s.cache(name).unwrap();
    (c.injected_failures, c.failures)
}

#[test]
fn kmalloc_fault_injection() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let (inj0, fail0) = kmalloc_injected("kmalloc-64");
    set_kmalloc_fault_injection(FaultInjection::EveryNth(5));
    let mut ok = Vec::new();
    let mut fails = 0;
    for _ in 0..500 {
        match kmalloc_nolock(50, Gfp::NONE) {
            Some(p) => ok.push(p),
            None => fails += 1,
        }
    }
    assert_eq!(fails, 100, "every 5th kmalloc-64 allocation fails");
    let (inj, fail) = kmalloc_injected("kmalloc-64");
    assert_eq!(inj - inj0, 100);
    assert_eq!(fail, fail0, "not counted as out of memory");

    // Every class is configured (each counts its own calls).
    for size in [8usize, 200, 3000, 8192] {
        let fails = (0..100)
            .filter(|_| match kmalloc_nolock(size, Gfp::NONE) {
                Some(p) => {
                    ok.push(p);
                    false
                }
                None => true,
            })
            .count();
        assert_eq!(fails, 20, "size {size}");
    }
    // Debug-mode classes too.
    nolock::debug::set_enabled(true);
    let fails = (0..100)
        .filter(|_| match kmalloc_nolock(64, Gfp::NONE) {
            Some(p) => {
                ok.push(p);
                false
            }
            None => true,
        })
        .count();
    nolock::debug::set_enabled(false);
    assert_eq!(fails, 20, "kmalloc-dbg-64");

    // Off: kmalloc works again.
    set_kmalloc_fault_injection(FaultInjection::Off);
    for _ in 0..1000 {
        ok.push(kmalloc_nolock(50, Gfp::NONE).expect("no injection after Off"));
    }
    for p in ok {
        // SAFETY: our objects, freed once.
        assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    }
    // NBox goes through kmalloc: it sees injection, and hands the value back.
    set_kmalloc_fault_injection(FaultInjection::EveryNth(1));
    assert_eq!(nolock::NBox::try_new([7u64; 4]).err(), Some([7u64; 4]));
    set_kmalloc_fault_injection(FaultInjection::Off);
    assert!(nolock::NBox::try_new([7u64; 4]).is_ok());
}
