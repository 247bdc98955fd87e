//! The slab layer's per-thread lists sit on the thread slots of `nolock::thread`: when a thread dies without
//! its exit destructor (here: a raw `exit` system call, which ends the thread and nothing else), the orphan
//! sweep finds its slot and every layer's `reset` hook clears what the thread left: RCU its reader word, the
//! slab layer its object lists, which go back to their slabs. The grace-period worker sweeps once a second, so
//! this does not depend on the background worker (turned off here).
//!
//! - `orphan_lists_go_back_without_the_background_worker`: before the slab layer sat on thread slots, its
//!   lists ("shards") had a sweep of their own, run only by the background worker: with the worker off, a dead
//!   thread's cached objects stayed in its list forever (this test failed on `cached_objects`: 170 objects
//!   left).
//! - `a_slot_whose_thread_died_inside_the_allocator_is_reused`: a thread dies in the middle of a refill, its
//!   list's busy flag set. The sweep clears the flag (the dead thread will never) and drops the list it may have
//!   left mid-edit; the slot is handed out again, and its next thread allocates and frees on that cache through
//!   its own list, not the detours taken while a list is busy (deferred frees, the shared path). (Before, the
//!   dead thread's lists were kept out of circulation for good; this guards the new reset.)

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nolock::hooks::Point;
use nolock::{Gfp, KmemCache};

static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> std::sync::MutexGuard<'static, ()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        nolock::Config::new().background(false).apply().expect("configured before first use");
        nolock::init();
    });
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// End the calling thread at once: no thread-local destructor, no pthread key destructor, no unwinding.
fn die() -> ! {
    // SAFETY: SYS_exit ends the calling thread only; nothing of it runs again.
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("SYS_exit returned")
}

/// Wait (bounded) until `done`, polling.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(30), "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run `f` on a new thread that then dies without its exit destructor; returns the slot it had.
fn on_a_thread_that_dies(f: impl FnOnce() + Send + 'static) -> u32 {
    let (tx, rx) = std::sync::mpsc::channel();
    // Never joined: the thread ends with a raw `exit`, its pthread is not told.
    let _detached = std::thread::spawn(move || {
        f();
        tx.send(nolock::thread::current().expect("a slot")).expect("the test waits");
        die();
    });
    rx.recv_timeout(Duration::from_secs(30)).expect("the thread reached its end")
}

#[test]
fn orphan_lists_go_back_without_the_background_worker() {
    let _serial = setup();
    let reports = testkit::NoReports::new();
    let cache: &'static KmemCache =
        Box::leak(Box::new(KmemCache::new("orphan-lists", Layout::new::<[u64; 6]>()).expect("cache")));
    let slot = on_a_thread_that_dies(move || {
        let objs: Vec<NonNull<u8>> = (0..100).map(|_| cache.alloc_nolock(Gfp::NONE).expect("memory")).collect();
        for p in objs {
            // SAFETY: ours, freed once.
            unsafe { cache.free_nolock(p) };
        }
    });
    assert!(cache.stats().cached_objects > 0, "the dead thread's list holds objects");
    wait_for("the orphan sweep gives the dead thread's slot back", || !nolock::thread::is_in_use(slot));
    let st = cache.stats();
    assert_eq!(st.cached_objects, 0, "the dead thread's cached objects went back to their slabs: {st:?}");
    assert_eq!(st.allocs, st.frees);
    assert!(!nolock::worker_running(), "the background worker is off in this test");
    reports.check("orphan sweep");
}

thread_local! {
    /// Die at the next refill of this thread.
    static DIE_AT_REFILL: Cell<bool> = const { Cell::new(false) };
}

fn die_hook(at: Point) {
    if at == Point::AllocRefill && DIE_AT_REFILL.with(|d| d.replace(false)) {
        die();
    }
}

/// Removes the hook when dropped (also when the test fails).
struct Unhook;

impl Drop for Unhook {
    fn drop(&mut self) {
        nolock::hooks::set_hook(None);
    }
}

#[test]
fn a_slot_whose_thread_died_inside_the_allocator_is_reused() {
    let _serial = setup();
    let reports = testkit::NoReports::new();
    // Leaked: the dead thread took a slab's objects with it, so the cache can never be destroyed cleanly.
    let cache: &'static KmemCache =
        Box::leak(Box::new(KmemCache::new("died-in-refill", Layout::new::<[u64; 5]>()).expect("cache")));
    nolock::hooks::set_hook(Some(die_hook));
    let _unhook = Unhook;
    let (tx, rx) = std::sync::mpsc::channel();
    let _detached = std::thread::spawn(move || {
        // Claim the slot and say which it is, then die inside the first refill of the cache's list.
        tx.send(nolock::thread::current().expect("a slot")).expect("the test waits");
        DIE_AT_REFILL.with(|d| d.set(true));
        let _ = cache.alloc_nolock(Gfp::NONE);
        unreachable!("the thread died in the refill");
    });
    let slot = rx.recv_timeout(Duration::from_secs(30)).expect("the thread started");
    wait_for("the orphan sweep gives the dead thread's slot back", || !nolock::thread::is_in_use(slot));
    drop(_unhook);

    // The slot is free again, and the free stack hands the slot released last out first: a new thread gets it.
    let before = cache.stats();
    let (got, after) = std::thread::spawn(move || {
        let me = nolock::thread::current().expect("a slot");
        for _ in 0..50 {
            let p = cache.alloc_nolock(Gfp::NONE).expect("memory");
            // SAFETY: ours, freed once.
            unsafe { cache.free_nolock(p) };
        }
        (me, cache.stats())
    })
    .join()
    .expect("thread");
    assert_eq!(got, slot, "a new thread gets the dead thread's slot back");
    assert_eq!(after.deferred_frees, before.deferred_frees, "frees were deferred: the slot's list stayed busy");
    assert_eq!(after.shared_allocs, before.shared_allocs, "allocations took the shared path: the list stayed busy");
    assert_eq!(after.shared_frees, before.shared_frees, "frees took the shared path");
    assert_eq!(after.alloc_fast + after.alloc_refill - before.alloc_fast - before.alloc_refill, 50);
    reports.check("slot reuse");
}
