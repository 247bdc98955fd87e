//! loom models of the grace-period cores in `nolock::sync::{rcu_core, srcu_core}`: reader/updater ordering,
//! RCU's phase flip, and SRCU-fast's index flip with its unlock-barrier-lock drain check.
//!
//! What loom cannot model is `membarrier`, which in nolock makes every reader execute a full fence somewhere
//! inside the updater's barrier call. The models therefore use the pairing `membarrier` replaces: `SeqCst`
//! fences in the readers (right after entering and before leaving) and in the updater's barrier. Everything
//! else — the counters, the index and phase flips, the scans and their order — is the code nolock runs.
//!
//! The property checked is the grace-period guarantee: a reader that saw the old object cannot see it freed
//! before its section ends. The updater publishes a new object, runs a grace period, then marks the old one
//! freed; a reader that loaded the old pointer asserts it is not freed yet, at the end of its section.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p nolock-mm --release --test loom_rcu`.
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use loom::thread;
use nolock::sync::rcu_core::{self, RcuGpCtr, RcuReaderWord};
use nolock::sync::srcu_core::{self, SrcuIndex, SrcuReader};

fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(bound);
    b.check(f);
}

/// The protected "object": 1 = old, 2 = new; `freed` marks the old one freed.
struct Shared {
    ptr: AtomicUsize,
    freed: AtomicBool,
}

impl Shared {
    fn new() -> Self {
        Self { ptr: AtomicUsize::new(1), freed: AtomicBool::new(false) }
    }

    /// The body of a read-side section: load the pointer; if it is the old object, it must not be freed yet.
    fn read(&self) {
        let p = self.ptr.load(Ordering::Acquire);
        loom::thread::yield_now();
        if p == 1 {
            assert!(!self.freed.load(Ordering::Acquire), "reader saw the old object freed inside its section");
        }
    }

    /// The updater: unlink the old object, wait a grace period, free it.
    fn update(&self, grace_period: impl FnOnce()) {
        self.ptr.store(2, Ordering::Release);
        grace_period();
        self.freed.store(true, Ordering::Release);
    }
}

fn barrier() {
    fence(Ordering::SeqCst);
}

#[test]
fn srcu_reader_vs_grace_period() {
    model(3, || {
        let s = Arc::new(Shared::new());
        let idx = Arc::new(SrcuIndex::new());
        let readers = Arc::new([SrcuReader::new(), SrcuReader::new()]);
        let r = {
            let (s, idx, readers) = (s.clone(), idx.clone(), readers.clone());
            thread::spawn(move || {
                let i = idx.current();
                readers[0].lock(i);
                barrier();
                s.read();
                barrier();
                readers[0].unlock(i);
            })
        };
        s.update(|| srcu_core::grace_period(&idx, || readers.iter(), barrier, thread::yield_now));
        r.join().unwrap();
    });
}

#[test]
fn srcu_two_sections_across_flips() {
    // A reader that enters twice while two grace periods run: its second section may use a stale index.
    model(2, || {
        let s = Arc::new(Shared::new());
        let idx = Arc::new(SrcuIndex::new());
        let readers = Arc::new([SrcuReader::new()]);
        let r = {
            let (s, idx, readers) = (s.clone(), idx.clone(), readers.clone());
            thread::spawn(move || {
                for _ in 0..2 {
                    let i = idx.current();
                    readers[0].lock(i);
                    barrier();
                    s.read();
                    barrier();
                    readers[0].unlock(i);
                }
            })
        };
        s.update(|| {
            srcu_core::grace_period(&idx, || readers.iter(), barrier, thread::yield_now);
            srcu_core::grace_period(&idx, || readers.iter(), barrier, thread::yield_now);
        });
        r.join().unwrap();
        assert_eq!(readers[0].nesting(), 0);
    });
}

#[test]
fn srcu_shared_counters() {
    // Readers without their own counters share one set through atomic RMWs. `membarrier` orders them like any
    // other thread, so they get the same stand-in fences (a SeqCst RMW alone is not a fence in the C++ model).
    model(2, || {
        let s = Arc::new(Shared::new());
        let idx = Arc::new(SrcuIndex::new());
        let readers = Arc::new([SrcuReader::new()]);
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let (s, idx, readers) = (s.clone(), idx.clone(), readers.clone());
                thread::spawn(move || {
                    let i = idx.current();
                    readers[0].shared_lock(i);
                    barrier();
                    s.read();
                    barrier();
                    readers[0].shared_unlock(i);
                })
            })
            .collect();
        s.update(|| srcu_core::grace_period(&idx, || readers.iter(), barrier, thread::yield_now));
        for h in hs {
            h.join().unwrap();
        }
    });
}

#[test]
fn rcu_reader_vs_grace_period() {
    model(3, || {
        let s = Arc::new(Shared::new());
        let gp = Arc::new(RcuGpCtr::new());
        let words = Arc::new([RcuReaderWord::new()]);
        let r = {
            let (s, gp, words) = (s.clone(), gp.clone(), words.clone());
            thread::spawn(move || {
                words[0].enter(&gp);
                barrier();
                // a nested section inside, as a signal handler would run
                words[0].enter(&gp);
                s.read();
                words[0].exit();
                barrier();
                words[0].exit();
            })
        };
        s.update(|| rcu_core::grace_period(&gp, || words.iter(), barrier, thread::yield_now));
        r.join().unwrap();
        assert!(!words[0].nested());
    });
}

#[test]
fn rcu_two_sections_across_flips() {
    model(2, || {
        let s = Arc::new(Shared::new());
        let gp = Arc::new(RcuGpCtr::new());
        let words = Arc::new([RcuReaderWord::new()]);
        let r = {
            let (s, gp, words) = (s.clone(), gp.clone(), words.clone());
            thread::spawn(move || {
                for _ in 0..2 {
                    words[0].enter(&gp);
                    barrier();
                    s.read();
                    barrier();
                    words[0].exit();
                }
            })
        };
        s.update(|| {
            rcu_core::grace_period(&gp, || words.iter(), barrier, thread::yield_now);
            rcu_core::grace_period(&gp, || words.iter(), barrier, thread::yield_now);
        });
        r.join().unwrap();
    });
}
