//! A refill that stalls while it takes objects off `waiting_for_gp_ttrace` (a preempted thread; the kernel's
//! refill runs with interrupts off and cannot) must not see the Tasks Trace callback give those objects back
//! to kmalloc meanwhile: they could come back through kmalloc to the head of the list and break its
//! compare-and-swap (ABA). The refill is held at its hook point while the callback runs; the callback must
//! hold the batch back until the refill is over (one more RCU grace period).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock_bpf::cpu::{IrqRegion, this_cpu};
use nolock_bpf::memalloc::{self, BpfMaConfig, BpfMemAlloc, HookPoint};

static RELEASE_READER: AtomicBool = AtomicBool::new(false);
static ARMED: AtomicBool = AtomicBool::new(false);
static CB_BEFORE: AtomicU64 = AtomicU64::new(0);
static CB_RAN_DURING_HOOK: AtomicBool = AtomicBool::new(false);
static KFREES_PTR: AtomicU64 = AtomicU64::new(0);
static KFREES_BEFORE_HOOK: AtomicU64 = AtomicU64::new(0);
static KFREES_AFTER_CB: AtomicU64 = AtomicU64::new(0);

fn kfrees() -> u64 {
    // SAFETY: the test stores the allocator's address before arming and keeps it alive.
    let ma = unsafe { &*(KFREES_PTR.load(Ordering::Relaxed) as *const BpfMemAlloc) };
    ma.stats().kfrees
}

fn hook(p: HookPoint) {
    if p != HookPoint::RefillTtrace || !ARMED.swap(false, Ordering::Relaxed) {
        return;
    }
    KFREES_BEFORE_HOOK.store(kfrees(), Ordering::Relaxed);
    // Let the Tasks Trace grace period end, and wait (bounded) for its callback while this refill is stalled.
    RELEASE_READER.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if nolock::RCU_TASKS_TRACE.stats().callbacks_invoked > CB_BEFORE.load(Ordering::Relaxed) {
            CB_RAN_DURING_HOOK.store(true, Ordering::Relaxed);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    KFREES_AFTER_CB.store(kfrees(), Ordering::Relaxed);
}

#[test]
fn ttrace_batch_is_not_freed_under_a_stalled_refill() {
    let _reports = testkit::NoReports::new();
    let ma = BpfMemAlloc::new(Some(64), BpfMaConfig::default()).unwrap();
    KFREES_PTR.store(&ma as *const BpfMemAlloc as u64, Ordering::Relaxed);
    let cpu = this_cpu().unwrap();
    let ready = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        // A Tasks Trace reader holds the grace period of the trimmed batch until the refill is stalled.
        s.spawn(|| {
            let g = nolock::rcu_read_lock_tasks_trace();
            ready.wait();
            while !RELEASE_READER.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
            drop(g);
        });
        ready.wait();
        // 200 objects, then all freed in one region: the trim sends the excess to waiting_for_gp_ttrace.
        let objs: Vec<_> = (0..200)
            .map(|_| {
                let _r = IrqRegion::enter();
                ma.cache_alloc().unwrap()
            })
            .collect();
        CB_BEFORE.store(nolock::RCU_TASKS_TRACE.stats().callbacks_invoked, Ordering::Relaxed);
        {
            let _r = IrqRegion::enter();
            for p in objs {
                // SAFETY: from this allocator.
                unsafe { ma.cache_free(p) };
            }
        }
        let l = ma.lists(cpu, 0);
        assert!(l.waiting_for_gp_ttrace > 0, "{l:?}");
        // Set-up only (nothing is asserted on time): give the grace period time to get past its RCU part, so
        // that it then waits for the Tasks Trace reader alone.
        std::thread::sleep(Duration::from_millis(100));
        memalloc::set_hook(Some(hook));
        ARMED.store(true, Ordering::Relaxed);
        // Empty free_llist in one region: its end refills, through the ttrace lists.
        let mut got = Vec::new();
        {
            let _r = IrqRegion::enter();
            while let Some(p) = ma.cache_alloc() {
                got.push(p);
            }
        }
        memalloc::set_hook(None);
        RELEASE_READER.store(true, Ordering::Release);
        let _r = IrqRegion::enter();
        for p in got {
            // SAFETY: from this allocator.
            unsafe { ma.cache_free(p) };
        }
    });
    assert!(CB_RAN_DURING_HOOK.load(Ordering::Relaxed), "set-up: the Tasks Trace callback ran during the stall");
    assert_eq!(
        KFREES_AFTER_CB.load(Ordering::Relaxed),
        KFREES_BEFORE_HOOK.load(Ordering::Relaxed),
        "objects went back to kmalloc while the refill was reading their list"
    );
    // Held back one RCU grace period, then freed.
    nolock::rcu_barrier();
    assert!(ma.stats().kfrees > KFREES_AFTER_CB.load(Ordering::Relaxed));
}
