//! Reclamation with the arena exhausted: `kfree_rcu_nolock` and `kfree_srcu_fast_nolock` cannot allocate a
//! pointer block, `call_rcu_nolock` and SRCU-fast callbacks have nowhere to put anything but their heads, and
//! a new SRCU-fast domain is first used now. None of it may lose an object, fail, or hang: every retired
//! object is freed after its grace period, the callbacks run once, and the memory is allocatable again.
//!
//! Before the grace-period worker gave back what its callbacks freed (`GpClient::give_back`), those objects
//! stayed on the worker thread's lists and the allocations after the barrier failed with them free.
//!
//! The 32 MiB arena must be configured before nolock's first use, so this file holds a single test.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nolock::{
    Config, Gfp, RcuHead, SrcuFast, alloc_pages_nolock, call_rcu_nolock, kfree_nolock, kfree_rcu_nolock,
    kfree_srcu_fast_nolock, kmalloc_nolock, try_free_pages_nolock,
};

const ARENA: usize = 32 << 20;

static CALLBACKS: AtomicU64 = AtomicU64::new(0);
static DOMAIN: SrcuFast = SrcuFast::new();

fn callback(head: NonNull<RcuHead>) {
    CALLBACKS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the head is the start of a kmalloc object handed to call_rcu_nolock; the callback owns it.
    unsafe { kfree_nolock(head.as_ptr().cast()) };
}

fn kmalloc64_live() -> u64 {
    let s = nolock::stats::snapshot();
    let c = s.cache("kmalloc-64").expect("kmalloc-64");
    c.allocs - c.frees
}

#[test]
fn retire_with_the_arena_exhausted() {
    let _reports = testkit::NoReports::new();
    Config::new().arena_size(ARENA).background(false).apply().expect("configured before first use");
    nolock::init();
    // The objects to retire, taken while memory is plentiful: 64 bytes, the head in the first 16.
    let n = 3000;
    let objs: Vec<usize> =
        (0..n).map(|_| kmalloc_nolock(64, Gfp::NONE).expect("memory before exhaustion").as_ptr() as usize).collect();
    let live0 = kmalloc64_live();

    // Exhaust the arena: every page taken (kmalloc then finds nothing either).
    let mut pages = Vec::new();
    while let Some(p) = alloc_pages_nolock(0, Gfp::NONE) {
        pages.push(p);
    }
    assert!(kmalloc_nolock(4096, Gfp::NONE).is_none(), "the arena is exhausted");

    // Retire through every interface while nothing can be allocated.
    let reader = nolock::rcu_read_lock();
    for (i, &a) in objs.iter().enumerate() {
        let head = NonNull::new(a as *mut RcuHead).unwrap();
        // SAFETY: live kmalloc objects of 64 bytes, each retired once; the first 16 bytes become the head.
        unsafe {
            match i % 3 {
                0 => kfree_rcu_nolock(a as *mut u8, head),
                1 => kfree_srcu_fast_nolock(&DOMAIN, a as *mut u8, head),
                _ => call_rcu_nolock(head, callback),
            }
        }
    }
    // Nothing was freed under the reader (the RCU retirements at least wait for it).
    let srcu = (0..n).filter(|i| i % 3 == 1).count() as u64;
    assert!(kmalloc64_live() >= live0 - srcu, "SRCU-fast frees may run under an RCU reader; RCU ones must wait");
    drop(reader);

    // Grace periods complete and everything is freed, with the arena still exhausted.
    nolock::synchronize_rcu();
    DOMAIN.synchronize();
    nolock::rcu_barrier();
    DOMAIN.barrier();
    let calls = (0..n).filter(|i| i % 3 == 2).count() as u64;
    assert_eq!(CALLBACKS.load(Ordering::Relaxed), calls, "each callback ran once");
    assert_eq!(kmalloc64_live(), live0 - n as u64, "every retired object was freed");

    // The memory is usable again: the retired objects come back through kmalloc, then the pages.
    let again: Vec<NonNull<u8>> = (0..n).map(|_| kmalloc_nolock(64, Gfp::NONE).expect("freed memory reused")).collect();
    for p in again {
        // SAFETY: ours, freed once.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
    for p in pages {
        // SAFETY: pages of order 0 allocated above, freed once.
        unsafe { try_free_pages_nolock(p, 0) }.expect("page free");
    }
    nolock::trim();
    assert!(kmalloc_nolock(100_000, Gfp::NONE).is_some(), "large allocations work again");
}
