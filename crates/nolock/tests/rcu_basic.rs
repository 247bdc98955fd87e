//! Basic behaviour of RCU, SRCU-fast and Tasks Trace: grace periods wait for pre-existing readers, callbacks
//! run after grace periods, barriers wait for callbacks, polled cookies.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nolock::rcu::srcu::SrcuFast;
use nolock::{
    RcuHead, call_rcu_nolock, get_state_synchronize_rcu, poll_state_synchronize_rcu, rcu_barrier, rcu_read_lock,
    rcu_stats, start_poll_synchronize_rcu, synchronize_rcu,
};

#[test]
fn synchronize_waits_for_preexisting_reader() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    let inside = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (i2, r2) = (inside.clone(), release.clone());
    let reader = std::thread::spawn(move || {
        let g = rcu_read_lock();
        let g2 = rcu_read_lock(); // nesting
        i2.store(true, Ordering::SeqCst);
        while !r2.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        drop(g2);
        drop(g);
    });
    while !inside.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let syncer = std::thread::spawn(move || {
        synchronize_rcu();
        d2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "grace period ended while a pre-existing reader was inside");
    release.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    syncer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

#[repr(C)]
struct Obj {
    head: RcuHead,
    counter: &'static AtomicUsize,
}

unsafe fn obj_cb(head: NonNull<RcuHead>) {
    // SAFETY: heads are the first field of Box<Obj> allocations made below.
    let b = unsafe { Box::from_raw(head.as_ptr() as *mut Obj) };
    b.counter.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn call_rcu_and_barrier() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    static RAN: AtomicUsize = AtomicUsize::new(0);
    let before = rcu_stats();
    for _ in 0..10_000 {
        let o = Box::into_raw(Box::new(Obj { head: RcuHead::new(), counter: &RAN }));
        // SAFETY: the head lives in a leaked Box reclaimed by the callback.
        unsafe { call_rcu_nolock(NonNull::new(o as *mut RcuHead).unwrap(), obj_cb) };
    }
    rcu_barrier();
    assert_eq!(RAN.load(Ordering::SeqCst), 10_000);
    let after = rcu_stats();
    assert!(after.grace_periods > before.grace_periods);
    assert!(after.callbacks_invoked >= before.callbacks_invoked + 10_000);
}

#[test]
fn polled_cookies() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    let c = get_state_synchronize_rcu();
    synchronize_rcu();
    assert!(poll_state_synchronize_rcu(c));
    let c2 = start_poll_synchronize_rcu();
    let t = std::time::Instant::now();
    while !poll_state_synchronize_rcu(c2) {
        assert!(t.elapsed() < Duration::from_secs(10), "worker never completed the polled grace period");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn srcu_sleeping_reader_and_callbacks() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    static D: SrcuFast = SrcuFast::new();
    static RAN: AtomicUsize = AtomicUsize::new(0);
    let inside = Arc::new(AtomicBool::new(false));
    let i2 = inside.clone();
    let reader = std::thread::spawn(move || {
        let g = D.read_lock_fast();
        i2.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100)); // sleeping inside is allowed
        drop(g);
    });
    while !inside.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let t = std::time::Instant::now();
    D.synchronize();
    assert!(t.elapsed() >= Duration::from_millis(50), "synchronize did not wait for the sleeping reader");
    reader.join().unwrap();
    for _ in 0..1000 {
        let o = Box::into_raw(Box::new(Obj { head: RcuHead::new(), counter: &RAN }));
        // SAFETY: as above.
        unsafe { D.call_srcu_fast_nolock(NonNull::new(o as *mut RcuHead).unwrap(), obj_cb) };
    }
    D.barrier();
    assert_eq!(RAN.load(Ordering::SeqCst), 1000);
}

#[test]
fn dynamic_domain_drop_runs_callbacks() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    static RAN: AtomicUsize = AtomicUsize::new(0);
    for _ in 0..3 {
        let d = SrcuFast::new();
        {
            let _g = d.read_lock_fast();
        }
        for _ in 0..100 {
            let o = Box::into_raw(Box::new(Obj { head: RcuHead::new(), counter: &RAN }));
            // SAFETY: as above.
            unsafe { d.call_srcu_fast_nolock(NonNull::new(o as *mut RcuHead).unwrap(), obj_cb) };
        }
        d.synchronize();
        drop(d);
    }
    assert_eq!(RAN.load(Ordering::SeqCst), 300);
}

#[test]
fn tasks_trace_implies_rcu() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    let inside = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (i2, r2) = (inside.clone(), release.clone());
    let reader = std::thread::spawn(move || {
        let g = rcu_read_lock();
        i2.store(true, Ordering::SeqCst);
        while !r2.load(Ordering::SeqCst) {
            std::hint::spin_loop();
        }
        drop(g);
    });
    while !inside.load(Ordering::SeqCst) {
        std::hint::spin_loop();
    }
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let syncer = std::thread::spawn(move || {
        nolock::synchronize_rcu_tasks_trace();
        d2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "tasks-trace GP ended while an RCU reader from before it was inside");
    release.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    syncer.join().unwrap();
}

#[test]
fn kfree_rcu_frees_after_barrier() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    #[repr(C)]
    struct Node {
        val: u64,
        head: RcuHead,
    }
    let before = nolock::stats::snapshot().cache("kmalloc-32").map_or(0, |c| c.frees);
    for i in 0..5000u64 {
        let p = nolock::kmalloc_nolock(core::mem::size_of::<Node>(), nolock::Gfp::ZERO).unwrap();
        let n = p.as_ptr() as *mut Node;
        // SAFETY: fresh object of Node's size.
        unsafe {
            (*n).val = i;
            nolock::kfree_rcu_nolock(p.as_ptr(), NonNull::from(&(*n).head));
        }
    }
    rcu_barrier();
    let after = nolock::stats::snapshot().cache("kmalloc-32").map_or(0, |c| c.frees);
    assert!(after >= before + 5000, "before {before} after {after}");
}

#[test]
#[should_panic(expected = "inside an RCU read-side critical section")]
fn synchronize_inside_reader_panics() {
    let _reports = testkit::NoReports::new();
    let _g = rcu_read_lock();
    synchronize_rcu();
}

#[test]
#[should_panic(expected = "same SRCU domain")]
fn synchronize_srcu_inside_reader_panics() {
    let _reports = testkit::NoReports::new();
    static D: SrcuFast = SrcuFast::new();
    let _g = D.read_lock_fast();
    D.synchronize();
}
