//! `LocalTryLock`'s claim protocol hands the owner's writes over to the claimer.
//!
//! membarrier gives the protocol its Dekker half (at least one side sees the other); the end of the owner's
//! section still needs release/acquire, so that a claimer that saw the owner inside, waited, and then sees
//! `busy == 0` also sees everything written inside. This test (found by a ThreadSanitizer pass, which reported
//! the kfree_rcu pointer-block hand-over from a thread to the grace-period worker) showed `unlock` used a
//! `Relaxed` store, a data race under the Rust memory model (benign on x86-64, stale state on aarch64). `unlock`
//! is now a `Release` store, and installing a pointer block publishes it with `Release` too.
//!
//! Two forms of the same scenario:
//! - a loom model (the project's tool for `nolock::sync`; a `SeqCst` fence on each side stands in for
//!   membarrier, as in `tests/loom.rs`): `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p
//!   nolock --release --test local_lock_handoff` (run by CI);
//! - the same with std threads, meaningful under Miri's data-race detector or ThreadSanitizer (on x86-64
//!   without them the hardware hides the race): `cargo +nightly miri test -p nolock-mm --test local_lock_handoff`.

#[cfg(loom)]
mod model {
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;
    use loom::thread;
    use nolock::sync::atomic::{AtomicUsize, Ordering, fence};
    use nolock::sync::local_lock::{LocalTryLock, TryLock};

    struct Shared {
        lock: LocalTryLock,
        /// A word the owner loads (see the notes in the model).
        slot: AtomicUsize,
        /// The state the lock protects (a per-thread list head, a pointer block's count).
        state: UnsafeCell<u64>,
    }

    #[test]
    fn claimer_sees_the_owners_writes() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(3);
        b.check(|| {
            let sh =
                Arc::new(Shared { lock: LocalTryLock::new(), slot: AtomicUsize::new(0), state: UnsafeCell::new(0) });
            let owner = {
                let sh = sh.clone();
                thread::spawn(move || {
                    // loom 0.7 explores no interleaving of a spawned thread whose first operation is a load of an
                    // atomic that another thread also loads (tokio-rs/loom#392; `try_lock` begins with a load
                    // of `busy`): a first operation on another atomic works around it.
                    let _ = sh.slot.load(Ordering::Relaxed);
                    if sh.lock.try_lock() == TryLock::Locked {
                        // The claimer's membarrier interrupts the section here.
                        fence(Ordering::SeqCst);
                        // The section's own work (`retire_in_block` loads `slot.block` here). loom's clocks tick
                        // at atomic operations only: without one here the write below would count as done at the
                        // fence, which the claimer's fence does synchronise with.
                        let _ = sh.slot.load(Ordering::Relaxed);
                        // SAFETY: the owner holds the lock; loom checks the claim.
                        sh.state.with_mut(|p| unsafe { *p = 42 });
                        sh.lock.unlock();
                    }
                })
            };
            sh.lock.claim();
            // heavy_barrier() (loom cannot model membarrier; a SeqCst fence on both sides stands in for it).
            fence(Ordering::SeqCst);
            if sh.lock.is_locked() {
                // The owner is inside its section: wait for it to end, then take the state over.
                assert!(sh.lock.wait_unlocked(1_000));
                // SAFETY: claimed and the owner's section has ended: the state is the claimer's (the protocol's
                // promise that loom checks).
                let v = sh.state.with(|p| unsafe { *p });
                // 0 when the owner saw the claim and backed off (`busy` was 1 only inside `try_lock`).
                assert!(v == 0 || v == 42, "the owner's write inside its section, or none");
            }
            sh.lock.unclaim();
            owner.join().unwrap();
        });
    }
}

#[cfg(not(loom))]
mod threads {
    use std::cell::UnsafeCell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering, fence};

    use nolock::sync::local_lock::{LocalTryLock, TryLock};

    struct Shared {
        lock: LocalTryLock,
        /// The owner is inside its section (so the claim below cannot make its `try_lock` back off).
        entered: AtomicBool,
        /// The claimer's barrier is done: the owner may go on with its section.
        go: AtomicBool,
        state: UnsafeCell<u64>,
    }

    // SAFETY: `state` is only accessed under the lock protocol that this test checks.
    unsafe impl Sync for Shared {}

    #[test]
    fn claimer_sees_the_owners_writes() {
        // The straddling interleaving, forced: the owner takes the lock, the claimer claims and runs its
        // barrier, and only then does the owner write the state and unlock. The two handshake flags order
        // nothing the owner writes after `entered` before the claimer's read, so only `unlock` can.
        for _ in 0..if cfg!(miri) { 10 } else { 1_000 } {
            let sh = Arc::new(Shared {
                lock: LocalTryLock::new(),
                entered: AtomicBool::new(false),
                go: AtomicBool::new(false),
                state: UnsafeCell::new(0),
            });
            let owner = {
                let sh = sh.clone();
                std::thread::spawn(move || {
                    assert_eq!(sh.lock.try_lock(), TryLock::Locked);
                    sh.entered.store(true, Ordering::Release);
                    while !sh.go.load(Ordering::Relaxed) {
                        std::thread::yield_now();
                    }
                    // SAFETY: the owner holds the lock.
                    unsafe { *sh.state.get() = 42 };
                    sh.lock.unlock();
                })
            };
            while !sh.entered.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            sh.lock.claim();
            // heavy_barrier() (a SeqCst fence stands in for membarrier, which neither Miri nor TSan model).
            fence(Ordering::SeqCst);
            assert!(sh.lock.is_locked(), "the owner is inside its section");
            sh.go.store(true, Ordering::Relaxed);
            assert!(sh.lock.wait_unlocked(u32::MAX));
            // SAFETY: claimed, and the owner's section has ended (what the protocol promises).
            let v = unsafe { *sh.state.get() };
            assert_eq!(v, 42, "the owner's write inside its section");
            sh.lock.unclaim();
            owner.join().unwrap();
        }
    }
}
