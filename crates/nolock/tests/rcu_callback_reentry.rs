//! Grace-period callbacks run on the grace-period worker, and may do what any normal context may. Each of these
//! used to make the worker wait for itself, and with it every later barrier of the process:
//!
//! - `call_rcu` (the throttled, normal-context variant) from a callback once the backlog passes its limit;
//! - `rcu_barrier` from a callback;
//! - dropping, inside a callback, an `SrcuFast` (its `Drop` runs a barrier) or a type-safe `KmemCache` (its
//!   destroy waits for the slabs' grace periods with a barrier) — reachable from safe code through an `RcuPtr`
//!   that owns one.
//!
//! A watchdog aborts the whole process with a message if a test does not finish in time: a stuck worker would
//! otherwise hang every later test of the binary.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock::rcu::srcu::SrcuFast;
use nolock::rcu_ptr::RcuPtr;
use nolock::{Gfp, KmemCache, RcuHead, SlabFlags};

static SERIAL: Mutex<()> = Mutex::new(());

/// Run `f` on a thread; abort the process if it does not finish within `limit`.
fn with_watchdog(name: &'static str, limit: Duration, f: impl FnOnce() + Send + 'static) {
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let t = std::thread::spawn(move || {
        f();
        d2.store(true, Ordering::Release);
    });
    let start = Instant::now();
    while !done.load(Ordering::Acquire) {
        if t.is_finished() {
            break; // it panicked: join reports it
        }
        if start.elapsed() > limit {
            eprintln!("{name}: no progress for {limit:?}: the grace-period worker is waiting for itself");
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().unwrap();
}

fn wait_flag(flag: &AtomicBool) {
    while !flag.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[repr(C)]
struct Node {
    head: RcuHead,
    n: u64,
}

fn new_node(n: u64) -> NonNull<RcuHead> {
    let p = nolock::kmalloc_nolock(core::mem::size_of::<Node>(), Gfp::ZERO).expect("memory").cast::<Node>();
    // SAFETY: fresh memory of Node's size.
    unsafe { p.as_ptr().write(Node { head: RcuHead::new(), n }) };
    p.cast()
}

unsafe fn free_node(h: NonNull<RcuHead>) {
    // SAFETY: heads are the first field of nodes from `new_node`; their grace period is over.
    unsafe { nolock::kfree_nolock(h.as_ptr().cast()) };
    FREED.fetch_add(1, Ordering::Relaxed);
}

static FREED: AtomicU64 = AtomicU64::new(0);

/// More callbacks than the backlog limit, so the throttle inside the callback engages.
const FLOOD: u64 = nolock::rcu::BACKLOG_HIGH + 4 * 256;
static FLOOD_DONE: AtomicBool = AtomicBool::new(false);

unsafe fn flood_from_callback(h: NonNull<RcuHead>) {
    for i in 0..FLOOD {
        // SAFETY: fresh nodes, freed by their own callback.
        unsafe { nolock::call_rcu(new_node(i), free_node) };
    }
    // SAFETY: as in `free_node`.
    unsafe { free_node(h) };
    FLOOD_DONE.store(true, Ordering::Release);
}

#[test]
fn call_rcu_from_a_callback_past_the_backlog_limit() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    with_watchdog("call_rcu from a callback", Duration::from_secs(60), || {
        let before = FREED.load(Ordering::Relaxed);
        // SAFETY: a fresh node, handed over.
        unsafe { nolock::call_rcu(new_node(0), flood_from_callback) };
        wait_flag(&FLOOD_DONE);
        nolock::rcu_barrier();
        assert_eq!(FREED.load(Ordering::Relaxed) - before, FLOOD + 1, "every callback ran once");
    });
}

static BARRIER_IN_CB: AtomicBool = AtomicBool::new(false);
static INNER_RAN: AtomicBool = AtomicBool::new(false);

unsafe fn inner(h: NonNull<RcuHead>) {
    INNER_RAN.store(true, Ordering::Release);
    // SAFETY: as in `free_node`.
    unsafe { free_node(h) };
}

unsafe fn barrier_from_callback(h: NonNull<RcuHead>) {
    // A callback queued from here must have run when the barrier returns.
    // SAFETY: fresh node.
    unsafe { nolock::call_rcu_nolock(new_node(1), inner) };
    nolock::rcu_barrier();
    assert!(INNER_RAN.load(Ordering::Acquire), "rcu_barrier inside a callback waited for the callbacks before it");
    // SAFETY: as in `free_node`.
    unsafe { free_node(h) };
    BARRIER_IN_CB.store(true, Ordering::Release);
}

#[test]
fn rcu_barrier_from_a_callback() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    with_watchdog("rcu_barrier from a callback", Duration::from_secs(30), || {
        // SAFETY: fresh node.
        unsafe { nolock::call_rcu(new_node(0), barrier_from_callback) };
        wait_flag(&BARRIER_IN_CB);
        // Later barriers still work.
        nolock::rcu_barrier();
        nolock::rcu_barrier();
    });
}

#[test]
fn srcu_domain_dropped_in_a_callback() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    with_watchdog("SrcuFast dropped in a callback", Duration::from_secs(30), || {
        static P: RcuPtr<SrcuFast> = RcuPtr::null();
        for round in 0..3 {
            P.publish(SrcuFast::new()).unwrap_or_else(|_| panic!("memory"));
            {
                let g = nolock::rcu_read_lock();
                let d = P.load(&g).unwrap();
                // Map the domain's table and give its drop something to wait for.
                drop(d.read_lock_fast());
                // SAFETY: fresh node.
                unsafe { d.call_srcu_fast_nolock(new_node(round), free_node) };
            }
            // The old domain is dropped (barrier included) inside an RCU callback.
            P.clear();
            nolock::rcu_barrier();
        }
        nolock::rcu_barrier();
    });
}

#[test]
fn typesafe_cache_dropped_in_a_callback() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    with_watchdog("type-safe KmemCache dropped in a callback", Duration::from_secs(30), || {
        static P: RcuPtr<KmemCache> = RcuPtr::null();
        for round in 0..3 {
            let cache = KmemCache::builder("reentry-ts", Layout::new::<[u64; 4]>())
                .flags(SlabFlags::TYPESAFE_BY_RCU)
                .build()
                .expect("cache");
            let objs: Vec<_> = (0..100).map(|_| cache.alloc_nolock(Gfp::NONE).expect("memory")).collect();
            for p in objs {
                // SAFETY: our objects, freed once.
                unsafe { cache.free_nolock(p) };
            }
            P.publish(cache).unwrap_or_else(|_| panic!("memory"));
            // The cache is destroyed (waiting for its slabs' grace periods) inside an RCU callback.
            P.clear();
            nolock::rcu_barrier();
            let _ = round;
        }
        nolock::rcu_barrier();
    });
}
