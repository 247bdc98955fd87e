//! `RcuPtr::swap`, `compare_exchange` and `update`: sequential semantics (what each returns, what a failed
//! exchange hands back, null handling), and under contention: threads `update` one counter concurrently — no
//! increment is lost — while readers check every value they load; every replaced value is retired exactly once
//! through the grace-period path (drop counts after `rcu_barrier`), values that lost a race are dropped at once
//! and never published. Also the SRCU-fast flavour and the wrong-domain check.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use nolock::rcu_ptr::RcuPtr;
use nolock::{SrcuFast, rcu_barrier, rcu_read_lock};

static SERIAL: Mutex<()> = Mutex::new(());

/// A value whose drops are counted, with a self-check.
#[derive(Debug)]
struct V {
    n: u64,
    check: u64,
}

static DROPS: AtomicUsize = AtomicUsize::new(0);

impl V {
    fn new(n: u64) -> Self {
        Self { n, check: !n }
    }
    fn ok(&self) -> bool {
        self.check == !self.n
    }
}

impl Drop for V {
    fn drop(&mut self) {
        assert!(self.ok(), "dropped twice or damaged");
        self.check = 0xdead;
        DROPS.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn swap_and_compare_exchange_semantics() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    rcu_barrier();
    let base = DROPS.load(Ordering::Relaxed);
    let p: RcuPtr<V> = RcuPtr::null();
    {
        let g = rcu_read_lock();
        assert!(p.swap(V::new(1), &g).unwrap().is_none(), "swap on null returns None");
        let old = p.swap(V::new(2), &g).unwrap().expect("the replaced value");
        assert_eq!(old.n, 1);
        // The replaced value is retired but stays readable while the guard lives.
        assert!(old.ok());
        let cur = p.load(&g);
        assert_eq!(cur.map(|v| v.n), Some(2));

        // A stale `current` fails and hands the new value back, with what is there now.
        let (back, actual) = p.compare_exchange(Some(old), V::new(3), &g).unwrap_err();
        assert_eq!(back.n, 3);
        assert_eq!(actual.map(|v| v.n), Some(2));
        drop(back); // never published: dropped at once
        // `None` for a non-null pointer fails too.
        let (back, _) = p.compare_exchange(None, V::new(4), &g).unwrap_err();
        drop(back);
        // The right `current` succeeds.
        let replaced = p.compare_exchange(cur, V::new(5), &g).unwrap();
        assert_eq!(replaced.map(|v| v.n), Some(2));
        assert_eq!(p.load(&g).map(|v| v.n), Some(5));
        // The values that were never published were dropped at once; the retired ones not yet.
        assert!(old.ok() && replaced.unwrap().ok());
    }
    assert_eq!(DROPS.load(Ordering::Relaxed) - base, 2, "values 3 and 4 dropped at once");
    rcu_barrier();
    assert_eq!(DROPS.load(Ordering::Relaxed) - base, 4, "values 1 and 2 retired after a grace period");
    {
        let g = rcu_read_lock();
        // compare_exchange from null.
        let q: RcuPtr<V> = RcuPtr::null();
        assert!(q.compare_exchange(None, V::new(6), &g).unwrap().is_none());
        assert_eq!(q.load(&g).map(|v| v.n), Some(6));
        drop(q); // retires 6
        // update from a value.
        let old = p.update(&g, |cur| V::new(cur.map_or(0, |v| v.n) + 10)).unwrap();
        assert_eq!(old.map(|v| v.n), Some(5));
        assert_eq!(p.load(&g).map(|v| v.n), Some(15));
    }
    drop(p);
    rcu_barrier();
    assert_eq!(DROPS.load(Ordering::Relaxed) - base, 7, "every value dropped exactly once");
}

#[test]
fn concurrent_updates_lose_nothing_and_retire_everything() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    rcu_barrier();
    let base = DROPS.load(Ordering::Relaxed);
    static P: RcuPtr<V> = RcuPtr::null();
    P.publish(V::new(0)).unwrap();
    const THREADS: u64 = 4;
    const EACH: u64 = 3_000;
    let calls = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    let start = std::sync::Barrier::new(THREADS as usize + 2);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..EACH {
                        let g = rcu_read_lock();
                        P.update(&g, |cur| {
                            // Widen the window between the load and the exchange now and then, so that
                            // writers overtake each other and updates retry.
                            if calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(16) {
                                std::thread::yield_now();
                            }
                            let cur = cur.expect("never null");
                            assert!(cur.ok());
                            V::new(cur.n + 1)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for _ in 0..2 {
            s.spawn(|| {
                start.wait();
                let mut last = 0;
                while !stop.load(Ordering::Relaxed) {
                    let g = rcu_read_lock();
                    let v = P.load(&g).expect("never null");
                    assert!(v.ok(), "a reader saw a damaged or freed value");
                    assert!(v.n >= last, "values only grow");
                    last = v.n;
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for w in writers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let total = THREADS * EACH;
    {
        let g = rcu_read_lock();
        assert_eq!(P.load(&g).unwrap().n, total, "no update lost");
    }
    let calls = calls.load(Ordering::Relaxed);
    let retries = calls - total;
    P.clear();
    rcu_barrier();
    // Dropped: every value that lost a race (retries), every replaced value (total: the initial one and all
    // but the last update's), and the last one (cleared).
    let drops = (DROPS.load(Ordering::Relaxed) - base) as u64;
    eprintln!("{total} updates, {retries} retries, {} reads, {drops} drops", reads.load(Ordering::Relaxed));
    assert!(retries > 0, "writers raced (the yields make them)");
    assert_eq!(drops, retries + total + 1);
}

static DOMAIN: SrcuFast = SrcuFast::new();
static OTHER: SrcuFast = SrcuFast::new();

#[test]
fn srcu_flavour_and_wrong_domain() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let p: RcuPtr<u64, nolock::rcu_ptr::Srcu> = RcuPtr::null_srcu(&DOMAIN);
    {
        let g = DOMAIN.read_lock_fast();
        assert!(p.swap(1, &g).unwrap().is_none());
        assert_eq!(p.update(&g, |c| c.unwrap() + 1).unwrap(), Some(&1));
        assert_eq!(p.load(&g), Some(&2));
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let g = OTHER.read_lock_fast();
        let _ = p.update(&g, |_| 9);
    }));
    assert!(r.is_err(), "a guard of another domain is refused");
    let g = DOMAIN.read_lock_fast();
    assert_eq!(p.load(&g), Some(&2), "the refused update changed nothing");
}
