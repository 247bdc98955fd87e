//! BpfMemAlloc `free_rcu`: an object is reused only after an RCU grace period (an RCU reader that holds it
//! sees it unchanged however much the allocator refills meanwhile), and goes back to kmalloc only after a
//! Tasks Trace grace period as well.

use std::ptr::NonNull;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nolock_bpf::cpu::{IrqRegion, this_cpu};
use nolock_bpf::memalloc::{BpfMaConfig, BpfMemAlloc};

const WORDS: usize = 6;

#[test]
fn free_rcu_object_is_not_reused_while_a_reader_holds_it() {
    let _reports = testkit::NoReports::new();
    let ma = BpfMemAlloc::new(Some(WORDS * 8), BpfMaConfig::default()).unwrap();
    let x = {
        let _r = IrqRegion::enter();
        ma.cache_alloc().unwrap()
    };
    // SAFETY: a fresh object of WORDS words.
    unsafe { testkit::fill(x.as_ptr(), WORDS * 8, 0xbeef) };
    let xa = x.as_ptr() as usize;
    let holding = Barrier::new(2);
    let stop = AtomicBool::new(false);
    let reads = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            // The reader: an RCU section that found X (as a map lookup would), then keeps reading it.
            let g = nolock::rcu_read_lock();
            holding.wait();
            while !stop.load(Ordering::Acquire) {
                // SAFETY: X stays valid memory while this RCU reader holds it (what the test checks).
                let d = unsafe { testkit::check(xa as *const u8, WORDS * 8, Some(0xbeef), u64::MAX) };
                if d.is_err() {
                    drop(g);
                    panic!("reader saw X changed: {d:?}");
                }
                reads.fetch_add(1, Ordering::Relaxed);
            }
            drop(g);
        });
        holding.wait();
        // Stops the reader however this side ends (a failed assertion must not leave the scope waiting).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _stop = Stop(&stop);
        {
            let _r = IrqRegion::enter();
            // SAFETY: from this allocator; the reader may still see it, which is what free_rcu is for.
            unsafe { ma.cache_free_rcu(x) };
        }
        // Churn: many regions, each taking more than the cache holds, so the cache refills again and again.
        for round in 0..2000 {
            let mut got = Vec::new();
            {
                let _r = IrqRegion::enter();
                while let Some(p) = ma.cache_alloc() {
                    assert_ne!(p.as_ptr() as usize, xa, "X reused during the reader's section (round {round})");
                    got.push(p);
                    if got.len() > 40 {
                        break;
                    }
                }
            }
            let _r = IrqRegion::enter();
            for p in got {
                // SAFETY: from this allocator.
                unsafe { ma.cache_free(p) };
            }
        }
        assert!(ma.stats().refills > 10);
        // The reader must check X after the whole churn, however late the scheduler ran it (on a loaded
        // 2-core machine it may not have run at all yet): wait for two more reads than now, so one of them
        // began after the churn ended.
        let seen = reads.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while reads.load(Ordering::Relaxed) < seen + 2 && !reader.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the reader never ran");
            std::thread::yield_now();
        }
    });
    assert!(reads.load(Ordering::Relaxed) > 0);
    // After the grace periods X left the RCU lists: on its way back to kmalloc or reusable.
    nolock::rcu_barrier();
    nolock::rcu_barrier_tasks_trace();
    let l = ma.lists(this_cpu().unwrap(), 0);
    assert_eq!(l.free_by_rcu + l.waiting_for_gp + l.free_llist_extra_rcu, 0, "{l:?}");
    assert!(ma.stats().rcu_callbacks >= 1);
}

#[test]
fn free_rcu_objects_are_reused_after_the_grace_period() {
    let _reports = testkit::NoReports::new();
    let ma = BpfMemAlloc::new(Some(16), BpfMaConfig::default()).unwrap();
    let mut set = std::collections::HashSet::new();
    {
        let _r = IrqRegion::enter();
        for _ in 0..4 {
            let p = ma.cache_alloc().unwrap();
            set.insert(p.as_ptr() as usize);
            // SAFETY: from this allocator.
            unsafe { ma.cache_free_rcu(p) };
        }
    }
    nolock::rcu_barrier();
    // Past the RCU grace period the objects sit on free_by_rcu_ttrace (or its Tasks Trace batch), and the
    // next refill takes them before asking kmalloc: no new kmalloc as long as they last.
    let k0 = ma.stats().kmallocs;
    let l = ma.lists(this_cpu().unwrap(), 0);
    let back = l.free_by_rcu_ttrace + l.waiting_for_gp_ttrace;
    let freed = ma.stats().kfrees as usize;
    assert_eq!(back + freed, 4, "{l:?}");
    let _ = (k0, NonNull::<u8>::dangling());
}
