//! What moves the read-side and retire numbers of `nolock bench rcu`: each variant of how a harness can measure
//! crossbeam-epoch's `pin()` and `defer_destroy` (and nolock's counterparts), measured back to back in one
//! process, as the median [min–max] of `REPS` repetitions.
//!
//! ```text
//! cargo run --release -p nolock-cli --example rcu_probe [reps]
//! taskset -c 0 target/release/examples/rcu_probe [reps]   # the grace-period worker cannot free concurrently
//! ```
//!
//! Read side (ns per lock+unlock):
//! - `pin()` the way `nolock bench rcu` measures it (the default collector through its thread-local handle),
//!   before and after the crossbeam workloads have run in the process;
//! - `LocalHandle::pin()` on a handle registered once (no thread-local lookup);
//! - `pin()` while the thread is already pinned (nested: only a counter, no fence);
//! - the first 1,000 pins of a fresh thread (registration, first collections);
//! - nolock `rcu_read_lock` plain and nested.
//!
//! Retire (ns per object, allocation and final free included unless said):
//! - nolock `kmalloc_nolock` + `kfree_rcu_nolock` until `rcu_barrier` returns;
//! - crossbeam one `pin()` per object + `Owned::new` (glibc) + `defer_destroy`, until every object is dropped;
//! - crossbeam one `pin()` per 64 objects;
//! - crossbeam over nolock's allocator: `kmalloc_nolock` + `defer_unchecked(kfree_nolock)`, one pin per object;
//! - nolock over glibc: `malloc` + `call_rcu_nolock(free)`;
//! - both without waiting for the frees (retire only).

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_epoch as epoch;
use nolock::{
    Gfp, RcuHead, call_rcu_nolock, kfree_nolock, kfree_rcu_nolock, kmalloc_nolock, rcu_barrier, rcu_read_lock,
};

const READS: u64 = 10_000_000;
const RETIRES: usize = 200_000;

fn ns_per<F: FnMut()>(n: u64, mut f: F) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_nanos() as f64 / n as f64
}

#[inline(never)]
fn loop_pin(n: u64) {
    for _ in 0..n {
        let g = epoch::pin();
        black_box(&g);
        drop(g);
    }
}

#[inline(never)]
fn loop_handle(h: &epoch::LocalHandle, n: u64) {
    for _ in 0..n {
        let g = h.pin();
        black_box(&g);
        drop(g);
    }
}

/// `rcu_read_lock` and its unlock each behind a call (as a harness that wraps the API in functions measures).
#[inline(never)]
fn rcu_lock_call() -> nolock::RcuReadGuard {
    rcu_read_lock()
}

#[inline(never)]
fn rcu_unlock_call(g: nolock::RcuReadGuard) {
    drop(g)
}

#[inline(never)]
fn pin_call() -> epoch::Guard {
    epoch::pin()
}

#[inline(never)]
fn unpin_call(g: epoch::Guard) {
    drop(g)
}

#[inline(never)]
fn loop_calls(n: u64) -> (f64, f64) {
    let a = ns_per(n, || {
        for _ in 0..n {
            rcu_unlock_call(black_box(rcu_lock_call()));
        }
    });
    let b = ns_per(n, || {
        for _ in 0..n {
            unpin_call(black_box(pin_call()));
        }
    });
    (a, b)
}

/// One uncontended `lock cmpxchg` (a SeqCst compare_exchange on a private word): what crossbeam uses as the
/// full fence of `pin()` on x86.
#[inline(never)]
fn loop_locked_rmw(n: u64) {
    let w = AtomicU64::new(0);
    for i in 0..n {
        let _ = black_box(w.compare_exchange(i, i + 1, Ordering::SeqCst, Ordering::SeqCst));
    }
}

#[inline(never)]
fn loop_rcu(n: u64) {
    for _ in 0..n {
        let g = rcu_read_lock();
        black_box(&g);
        drop(g);
    }
}

static DROPS: AtomicU64 = AtomicU64::new(0);

struct Counted {
    _payload: [u64; 8],
}

impl Drop for Counted {
    fn drop(&mut self) {
        DROPS.store(DROPS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

#[repr(C)]
struct Obj64 {
    head: RcuHead,
    payload: [u64; 6],
}

fn new_obj64(i: u64) -> NonNull<Obj64> {
    let o = kmalloc_nolock(64, Gfp::NONE).expect("kmalloc_nolock").cast::<Obj64>();
    // SAFETY: a fresh 64-byte object.
    unsafe { o.as_ptr().write(Obj64 { head: RcuHead::new(), payload: [i; 6] }) };
    o
}

fn crossbeam_drain(n: u64) {
    while DROPS.load(Ordering::Relaxed) < n {
        epoch::pin().flush();
    }
}

fn retire_kfree_rcu(n: usize, wait: bool) -> f64 {
    ns_per(n as u64, || {
        for i in 0..n as u64 {
            let o = new_obj64(i);
            // SAFETY: fresh object, head inside it, not used again.
            unsafe { kfree_rcu_nolock(o.as_ptr().cast(), NonNull::new_unchecked(&raw mut (*o.as_ptr()).head)) };
        }
        if wait {
            rcu_barrier();
        }
    })
}

fn retire_crossbeam(n: usize, per_pin: usize, wait: bool) -> f64 {
    DROPS.store(0, Ordering::Relaxed);
    let r = ns_per(n as u64, || {
        let mut i = 0;
        while i < n {
            let g = epoch::pin();
            for _ in 0..per_pin.min(n - i) {
                let s = epoch::Owned::new(Counted { _payload: [i as u64; 8] }).into_shared(&g);
                // SAFETY: never shared.
                unsafe { g.defer_destroy(s) };
                i += 1;
            }
        }
        if wait {
            crossbeam_drain(n as u64);
        }
    });
    crossbeam_drain(n as u64);
    r
}

fn retire_crossbeam_on_nolock(n: usize) -> f64 {
    DROPS.store(0, Ordering::Relaxed);
    ns_per(n as u64, || {
        for i in 0..n as u64 {
            let g = epoch::pin();
            let o = new_obj64(i);
            let p = o.as_ptr() as usize;
            // SAFETY: never shared; the closure frees the nolock object once.
            unsafe {
                g.defer_unchecked(move || {
                    kfree_nolock(p as *mut u8);
                    DROPS.store(DROPS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                })
            };
        }
        crossbeam_drain(n as u64);
    })
}

fn retire_crossbeam_on<A: GlobalAlloc + Sync>(a: &'static A, n: usize) -> f64 {
    const L: Layout = Layout::new::<[u64; 8]>();
    DROPS.store(0, Ordering::Relaxed);
    ns_per(n as u64, || {
        for i in 0..n as u64 {
            let g = epoch::pin();
            // SAFETY: a non-zero-sized layout.
            let p = unsafe { a.alloc(L) }.cast::<[u64; 8]>();
            assert!(!p.is_null());
            // SAFETY: fresh block of the layout.
            unsafe { p.write([i; 8]) };
            let p = p as usize;
            // SAFETY: never shared; the closure frees the block once with its allocator.
            unsafe {
                g.defer_unchecked(move || {
                    a.dealloc(p as *mut u8, L);
                    DROPS.store(DROPS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                })
            };
        }
        crossbeam_drain(n as u64);
    })
}

/// # Safety
/// `h` is the head at the start of a `malloc`ed block.
unsafe fn free_malloced(h: NonNull<RcuHead>) {
    // SAFETY: caller.
    unsafe { libc::free(h.as_ptr().cast()) };
}

fn retire_call_rcu_on_glibc(n: usize) -> f64 {
    ns_per(n as u64, || {
        for i in 0..n as u64 {
            // SAFETY: plain malloc of 64 bytes.
            let p = unsafe { libc::malloc(64) }.cast::<Obj64>();
            assert!(!p.is_null());
            // SAFETY: fresh block of 64 bytes.
            unsafe {
                p.write(Obj64 { head: RcuHead::new(), payload: [i; 6] });
                call_rcu_nolock(NonNull::new_unchecked(&raw mut (*p).head), free_malloced);
            }
        }
        rcu_barrier();
    })
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    let med = if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 };
    println!("{name:<60} {med:>8.2} [{:.2}–{:.2}]", v[0], v[v.len() - 1]);
}

fn main() {
    let reps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(9);
    nolock::init();
    // Fresh process: pin() before crossbeam has deferred anything.
    loop_pin(1_000_000);
    let mut fresh = Vec::new();
    for _ in 0..reps {
        fresh.push(ns_per(READS, || loop_pin(READS)));
    }
    // The first 1,000 pins of fresh threads.
    let mut cold = Vec::new();
    for _ in 0..reps {
        cold.push(std::thread::spawn(|| ns_per(1000, || loop_pin(1000))).join().unwrap());
    }
    // Run crossbeam's deferred workloads as the bench does, then measure again.
    retire_crossbeam(500_000, 1, true);
    for _ in 0..500_000 / 64 + 64 {
        epoch::pin().flush();
    }
    let handle = epoch::default_collector().register();
    let (mut after, mut local, mut nested, mut rcu, mut rcu_nested) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut rcu_calls, mut pin_calls, mut rmw) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let (a, b) = loop_calls(READS);
        rcu_calls.push(a);
        pin_calls.push(b);
        rmw.push(ns_per(READS, || loop_locked_rmw(READS)));
        after.push(ns_per(READS, || loop_pin(READS)));
        local.push(ns_per(READS, || loop_handle(&handle, READS)));
        {
            let _outer = epoch::pin();
            nested.push(ns_per(READS, || loop_pin(READS)));
        }
        rcu.push(ns_per(READS, || loop_rcu(READS)));
        {
            let _outer = rcu_read_lock();
            rcu_nested.push(ns_per(READS, || loop_rcu(READS)));
        }
    }
    drop(handle);
    println!("read side, ns per lock+unlock: median [min–max] of {reps}");
    summary("crossbeam pin(), fresh process", fresh);
    summary("crossbeam pin(), after the bench's crossbeam workloads", after);
    summary("crossbeam LocalHandle::pin()", local);
    summary("crossbeam pin() nested in a pinned guard", nested);
    summary("crossbeam pin(), first 1000 pins of a fresh thread", cold);
    summary("nolock rcu_read_lock", rcu);
    summary("nolock rcu_read_lock nested", rcu_nested);
    summary("crossbeam pin(), lock and unlock behind calls", pin_calls);
    summary("nolock rcu_read_lock, lock and unlock behind calls", rcu_calls);
    summary("one uncontended lock cmpxchg (SeqCst compare_exchange)", rmw);

    let n = RETIRES;
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("nolock kmalloc_nolock + kfree_rcu_nolock, rcu_barrier", vec![]),
        ("crossbeam pin/object + Owned::new + defer_destroy, drained", vec![]),
        ("crossbeam pin/64 objects + Owned::new + defer_destroy, drained", vec![]),
        ("crossbeam pin/object, kmalloc_nolock + defer(kfree_nolock), drained", vec![]),
        ("crossbeam pin/object, mimalloc + defer(dealloc), drained", vec![]),
        ("crossbeam pin/object, jemalloc + defer(dealloc), drained", vec![]),
        ("nolock malloc + call_rcu_nolock(free), rcu_barrier", vec![]),
        ("nolock kfree_rcu_nolock, retire only (no barrier)", vec![]),
        ("crossbeam pin/object defer_destroy, retire only (no drain)", vec![]),
    ];
    retire_kfree_rcu(n, true);
    retire_crossbeam(n, 1, true);
    for _ in 0..reps {
        rows[0].1.push(retire_kfree_rcu(n, true));
        rows[1].1.push(retire_crossbeam(n, 1, true));
        rows[2].1.push(retire_crossbeam(n, 64, true));
        rows[3].1.push(retire_crossbeam_on_nolock(n));
        rows[4].1.push(retire_crossbeam_on(&mimalloc::MiMalloc, n));
        rows[5].1.push(retire_crossbeam_on(&tikv_jemallocator::Jemalloc, n));
        rows[6].1.push(retire_call_rcu_on_glibc(n));
        rows[7].1.push(retire_kfree_rcu(n, false));
        rcu_barrier();
        rows[8].1.push(retire_crossbeam(n, 1, false));
    }
    println!("retire, ns per 64 B object ({n} per repetition): median [min–max] of {reps}");
    for (name, v) in rows {
        summary(name, v);
    }
}
