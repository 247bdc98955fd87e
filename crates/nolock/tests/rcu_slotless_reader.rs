//! RCU readers on a thread without a per-thread slot (here: a thread past nolock's exit destructor, inside a
//! later pthread-key destructor) must be seen by grace periods, also when a signal handler runs a nested
//! section at the worst moment: after the outer `rcu_read_lock` chose how to count itself and before it did.
//!
//! The "signal" is the test hook at `Point::RcuOverflowEnter`: it enters a nested section and asks another
//! thread to run `synchronize_rcu`. The grace period must not end while the nested section is open. (Before the
//! fix, the outer reader had already set the thread's nesting word, the nested section took the "nested" path
//! and was counted nowhere, and `synchronize_rcu` returned at once.)

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nolock::hooks::{Point, set_hook};

/// Set by the hook: it entered its nested section.
static NESTED_INSIDE: AtomicBool = AtomicBool::new(false);
/// Set by the synchronizer once `synchronize_rcu` returned.
static GP_DONE: AtomicBool = AtomicBool::new(false);
/// 1: the grace period ended while the nested reader was inside (the bug); 2: it did not.
static VERDICT: AtomicU32 = AtomicU32::new(0);
static HOOK_RAN: AtomicBool = AtomicBool::new(false);
static ARMED: AtomicBool = AtomicBool::new(false);

fn hook(at: Point) {
    if at != Point::RcuOverflowEnter || !ARMED.swap(false, Ordering::AcqRel) {
        return;
    }
    HOOK_RAN.store(true, Ordering::Release);
    let g = nolock::rcu_read_lock();
    NESTED_INSIDE.store(true, Ordering::Release);
    // Give the synchronizer ample time: a correct grace period waits for us the whole time.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) {
        if GP_DONE.load(Ordering::Acquire) {
            VERDICT.store(1, Ordering::Release);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if VERDICT.load(Ordering::Acquire) == 0 {
        VERDICT.store(2, Ordering::Release);
    }
    drop(g);
}

static LATE_KEY: AtomicU32 = AtomicU32::new(u32::MAX);

extern "C" fn late_destructor(_: *mut libc::c_void) {
    // nolock's own exit destructors (created before main) have run: this thread has no slot any more.
    ARMED.store(true, Ordering::Release);
    let g = nolock::rcu_read_lock();
    assert!(nolock::rcu_read_lock_held());
    drop(g);
    assert!(!nolock::rcu_read_lock_held());
}

#[test]
fn nested_reader_in_the_counting_window_is_seen() {
    nolock::init();
    set_hook(Some(hook));
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: valid out-pointer and destructor.
    assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(late_destructor)) }, 0);
    LATE_KEY.store(key, Ordering::Relaxed);

    let synchronizer = std::thread::spawn(|| {
        while !NESTED_INSIDE.load(Ordering::Acquire) {
            if VERDICT.load(Ordering::Acquire) != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        nolock::synchronize_rcu();
        GP_DONE.store(true, Ordering::Release);
    });
    let t = std::thread::spawn(move || {
        // Some nolock use first, so the thread has its per-thread state to lose at exit.
        drop(nolock::rcu_read_lock());
        // SAFETY: `key` is live; a non-null value makes the destructor run at thread exit.
        unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<libc::c_void>()) };
    });
    t.join().unwrap();
    synchronizer.join().unwrap();
    set_hook(None);
    assert!(HOOK_RAN.load(Ordering::Acquire), "the reader in the late destructor took the slot-less path");
    assert_eq!(
        VERDICT.load(Ordering::Acquire),
        2,
        "synchronize_rcu returned while a nested reader on a slot-less thread was inside its section"
    );
}
