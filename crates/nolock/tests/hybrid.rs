//! `HybridAlloc<System>` as the global allocator: in normal context every allocation is `System`'s, inside a
//! marked handler nolock's; frees route by address, a handler's free of `System` memory is deferred and drained
//! in normal context, `realloc` crosses the boundary both ways. Then the SIGPROF storm of `hybrid_common` (Vec
//! growth, `format!`, backtraces, memory taken over and handed back) with content checks. The jemalloc version,
//! with the baseline that deadlocks, is `crates/nolock-cli/tests/hybrid_jemalloc.rs`.

mod hybrid_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nolock::hybrid::{self, HandlerGuard, HybridAlloc};

#[global_allocator]
static A: HybridAlloc<System> = HybridAlloc::new(System);

/// The tests read process-wide counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn in_arena<T>(p: *const T) -> bool {
    nolock::stats::page_owner(p.cast()) != nolock::stats::PageOwner::Foreign
}

#[test]
fn routes_by_context_and_address() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    A.warm_up();
    let normal = vec![1u64; 100];
    assert!(!in_arena(normal.as_ptr()), "normal context allocates from System");
    assert!(!hybrid::handler_context());
    let (in_handler, nested_ok) = hybrid::in_handler(|| {
        assert!(hybrid::handler_context());
        let v = vec![2u64; 100];
        let nested = {
            let _g = HandlerGuard::enter();
            let w = Box::new([3u8; 10]);
            in_arena(w.as_ptr())
        };
        // Still marked after the nested guard ends.
        assert!(hybrid::handler_context());
        (v, nested)
    });
    assert!(!hybrid::handler_context());
    assert!(in_arena(in_handler.as_ptr()), "a marked handler allocates from nolock");
    assert!(nested_ok);
    let before = A.stats();
    drop(in_handler); // nolock memory freed in normal context
    assert_eq!(A.stats().nolock_frees, before.nolock_frees + 1);
    drop(normal);
}

#[test]
fn handler_frees_of_system_memory_are_deferred_then_drained() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = A.drain();
    let boxes: Vec<Box<[u8; 40]>> = (0..10).map(|i| Box::new([i as u8; 40])).collect();
    let before = A.stats();
    hybrid::in_handler(|| drop(boxes));
    let mid = A.stats();
    // The Vec's buffer and its ten boxes: eleven deferred frees, none handed to System yet.
    assert_eq!(mid.deferred - before.deferred, 11);
    assert!(A.has_deferred());
    assert_eq!(mid.drained, before.drained);
    // The next normal-context allocation drains them.
    let x = Box::new(5u32);
    let after = A.stats();
    assert_eq!(after.drained - before.drained, 11);
    assert!(!A.has_deferred());
    assert_eq!(after.leaked, 0);
    drop(x);
    // An explicit drain inside a handler does nothing.
    let v = vec![0u8; 10];
    let n = hybrid::in_handler(|| {
        drop(v);
        A.drain()
    });
    assert_eq!(n, 0);
    assert_eq!(A.drain(), 1);
}

#[test]
fn realloc_across_the_boundary() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // System memory grown in a handler moves to nolock, contents kept; its old block's free is deferred.
    let mut v: Vec<u64> = (0..50).collect();
    assert!(!in_arena(v.as_ptr()));
    hybrid::in_handler(|| v.extend(50..5000));
    assert!(in_arena(v.as_ptr()));
    assert!(v.iter().copied().eq(0..5000));
    // nolock memory that still fits stays; grown in normal context it moves to System.
    v.truncate(10);
    v.shrink_to_fit();
    assert!(in_arena(v.as_ptr()), "a shrink keeps nolock memory in place");
    v.extend(10..100_000);
    assert!(!in_arena(v.as_ptr()), "growth in normal context moves to System");
    assert!(v.iter().copied().eq(0..100_000));
    // Raw calls: zeroed allocation in a handler, realloc of nolock memory in a handler.
    let l = Layout::from_size_align(300, 64).unwrap();
    let p = hybrid::in_handler(|| {
        // SAFETY: a valid non-zero layout.
        let p = unsafe { A.alloc_zeroed(l) };
        assert!(!p.is_null() && in_arena(p) && (p as usize).is_multiple_of(64));
        // SAFETY: 300 zeroed bytes.
        assert!(unsafe { std::slice::from_raw_parts(p, 300) }.iter().all(|&b| b == 0));
        // SAFETY: p is ours with layout l; 9000 with align 64 is valid.
        let q = unsafe { A.realloc(p, l, 9000) };
        assert!(!q.is_null() && in_arena(q) && (q as usize).is_multiple_of(64));
        q
    });
    // SAFETY: q is a 9000-byte block of ours.
    unsafe { A.dealloc(p, Layout::from_size_align(9000, 64).unwrap()) };
    let _ = A.drain();
}

#[test]
fn sigprof_storm_allocating_handlers() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    A.warm_up();
    hybrid_common::install(true);
    let before = A.stats();
    hybrid_common::storm(2, Duration::from_millis(1500), Duration::from_micros(50));
    let _ = A.drain();
    let after = A.stats();
    let handled = hybrid_common::HANDLED.load(Ordering::Relaxed);
    let nested = hybrid_common::NESTED.load(Ordering::Relaxed);
    eprintln!(
        "storm: {handled} SIGPROF handlers ({} frames captured), {nested} nested; HybridAlloc: {} handler \
         allocations, {} deferred frees, {} drained, {} leaked",
        hybrid_common::FRAMES.load(Ordering::Relaxed),
        after.handler_allocs - before.handler_allocs,
        after.deferred - before.deferred,
        after.drained - before.drained,
        after.leaked - before.leaked,
    );
    assert_eq!(hybrid_common::ERRORS.load(Ordering::Relaxed), 0, "content checks failed");
    assert!(handled > 100, "the storm ran ({handled} handlers)");
    assert!(after.handler_allocs > before.handler_allocs);
    assert_eq!(after.deferred - before.deferred, after.drained - before.drained, "every deferred free drained");
    assert_eq!(after.leaked, before.leaked);
}
