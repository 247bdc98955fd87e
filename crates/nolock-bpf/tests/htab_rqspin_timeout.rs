//! `Rqspin` (v6.15+): a bucket lock held by another thread for longer than 250 ms makes a waiter give up with
//! `TimedOut` (-ETIMEDOUT) instead of spinning forever. The holder stops at the `Locked` hook point and keeps
//! the lock for 1 s after the waiter started; the waiter's update on the same bucket must time out. (In
//! `LockFree` mode the same schedule gives no error: there is no lock to wait for.)

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use nolock_bpf::htab::hooks::{Point, set_hook};
use nolock_bpf::htab::{Backend, Error, HashMap, HtabAttr, LockMode, UpdateFlags};

thread_local! {
    static HOLDER: Cell<bool> = const { Cell::new(false) };
}

static ONCE: AtomicBool = AtomicBool::new(false);
static SYNC: Mutex<Option<Arc<Barrier>>> = Mutex::new(None);

fn hook(p: Point) {
    if p == Point::Locked && HOLDER.with(|h| h.get()) && !ONCE.swap(true, Ordering::AcqRel) {
        let b = SYNC.lock().unwrap().clone().unwrap();
        b.wait(); // the waiter may start
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn k(i: u64) -> [u8; 8] {
    i.to_ne_bytes()
}

#[test]
fn rqspin_times_out_lockfree_does_not_wait() {
    set_hook(Some(hook));
    for (lock, want) in [(LockMode::Rqspin, Err(Error::TimedOut)), (LockMode::LockFree, Ok(()))] {
        ONCE.store(false, Ordering::Release);
        let barrier = Arc::new(Barrier::new(2));
        *SYNC.lock().unwrap() = Some(barrier.clone());
        let m = Arc::new(HashMap::new(HtabAttr::new(8, 8, 16).backend(Backend::Prealloc).lock(lock)).unwrap());
        let mask = m.n_buckets() as u32 - 1;
        let h0 = m.debug_hash(&k(0)) & mask;
        let same = (1..10_000).find(|&i| m.debug_hash(&k(i)) & mask == h0).unwrap();
        let holder = {
            let m = m.clone();
            std::thread::spawn(move || {
                HOLDER.with(|h| h.set(true));
                m.update(&k(0), &k(1), UpdateFlags::Any)
            })
        };
        barrier.wait();
        let r = m.update(&k(same), &k(2), UpdateFlags::Any);
        assert_eq!(holder.join().unwrap(), Ok(()));
        assert_eq!(r, want, "{lock:?}");
        if lock == LockMode::Rqspin {
            assert_eq!(m.stats().error(Error::TimedOut), 1);
        }
    }
    set_hook(None);
}
