//! The grace-period machinery with the `membarrier` fallbacks forced (`NOLOCK_MEMBARRIER`): readers are still
//! waited for, callbacks still run after grace periods. The mechanism is chosen once per process, so the test
//! runs this binary again as a child per fallback (`MEMBARRIER_CMD_GLOBAL`, and on x86-64 the `mprotect`
//! trick), each running the `fallback_child` test.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nolock::{RcuHead, SrcuFast};

static RAN: AtomicUsize = AtomicUsize::new(0);

unsafe fn cb(head: NonNull<RcuHead>) {
    // SAFETY: heads are leaked boxes made below.
    drop(unsafe { Box::from_raw(head.as_ptr()) });
    RAN.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn grace_periods_with_each_fallback_barrier() {
    let _reports = testkit::NoReports::new();
    let mut forced = vec!["global"];
    if cfg!(target_arch = "x86_64") {
        forced.push("mprotect");
    }
    for f in forced {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fallback_child", "--include-ignored", "--test-threads", "1"])
            .env("NOLOCK_MEMBARRIER", f)
            .env("NOLOCK_FALLBACK_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fallback {f} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "the child ran its test");
    }
}

/// Run by `grace_periods_with_each_fallback_barrier` in a child process with `NOLOCK_MEMBARRIER` set.
#[test]
#[ignore = "run in a child process by grace_periods_with_each_fallback_barrier"]
fn fallback_child() {
    let _reports = testkit::NoReports::new();
    if std::env::var_os("NOLOCK_FALLBACK_CHILD").is_none() {
        return;
    }
    let forced = std::env::var("NOLOCK_MEMBARRIER").unwrap();
    nolock::init();
    let expected = if forced == "mprotect" { "mprotect" } else { "membarrier-global" };
    assert_eq!(nolock::rcu::barrier_mechanism(), expected);

    // synchronize_rcu waits for a reader that began before it.
    let inside = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let (i2, r2) = (inside.clone(), release.clone());
    let reader = std::thread::spawn(move || {
        let g = nolock::rcu_read_lock();
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
        nolock::synchronize_rcu();
        d2.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "grace period ended while a pre-existing reader was inside");
    release.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    syncer.join().unwrap();

    // SRCU-fast and callbacks.
    static D: SrcuFast = SrcuFast::new();
    {
        let _g = D.read_lock_fast();
    }
    D.synchronize();
    for _ in 0..100 {
        let h = NonNull::from(Box::leak(Box::new(RcuHead::new())));
        // SAFETY: the head is a leaked box that the callback frees.
        unsafe { nolock::call_rcu_nolock(h, cb) };
    }
    nolock::rcu_barrier();
    assert_eq!(RAN.load(Ordering::SeqCst), 100);
}
