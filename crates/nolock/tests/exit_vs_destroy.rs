//! A cache destroy racing the exit destructors of the threads that used the cache.
//!
//! `std::thread::scope` returns as soon as its threads' closures have finished; their thread-exit work (the
//! pthread key destructor that hands each thread's cached objects back) may still be running. A destroy issued
//! right then takes over the same per-thread lists. Both sides must not drain one list: that would push the
//! same run of objects onto its slab twice (reported as a double free, leaking the run, and corrupting the
//! slab's counts). Found by the fork test on a 16-core machine; this test reproduces it on two cores.

use std::alloc::Layout;
use std::ptr::NonNull;

use nolock::{Gfp, KmemCache};

#[test]
fn destroy_right_after_scope_while_threads_exit() {
    let reports = testkit::NoReports::new();
    nolock::init();
    for round in 0..300 {
        let cache = KmemCache::new("exit-vs-destroy", Layout::new::<[u64; 7]>()).expect("cache");
        std::thread::scope(|s| {
            for t in 0..3 {
                let cache = &cache;
                s.spawn(move || {
                    // Leave a long list behind: allocate a few slabs' worth, free everything.
                    let objs: Vec<NonNull<u8>> =
                        (0..150 + 10 * t).map(|_| cache.alloc_nolock(Gfp::NONE).expect("alloc")).collect();
                    for p in objs {
                        // SAFETY: ours, freed once.
                        unsafe { cache.free_nolock(p) };
                    }
                });
            }
        });
        // The threads' exit destructors may still be draining their lists now.
        let st = cache.stats();
        assert_eq!(st.allocs, st.frees, "round {round}: {st:?}");
        let report = cache.destroy();
        assert_eq!(report.live_objects, 0, "round {round}: {report:?}");
        reports.check(&format!("round {round}"));
    }
}

// ------------------------------------------------------------------------------------------------------------
// The guard itself: a report during a test fails it
// ------------------------------------------------------------------------------------------------------------

const GUARD_CHILD_ENV: &str = "NOLOCK_NO_REPORTS_GUARD_CHILD";

/// Not a test on its own: the child process of `a_report_during_a_test_fails_it`. Without the variable it does
/// nothing. With it, it makes one report (a refused free of a stack address) under the guard and returns
/// normally: the guard must fail it.
#[test]
fn no_reports_guard_child() {
    if std::env::var_os(GUARD_CHILD_ENV).is_none() {
        return;
    }
    let _reports = testkit::NoReports::new();
    let mut not_nolock = 0u64;
    // SAFETY: a stack address is not nolock's: the free is refused and reported, nothing is freed.
    unsafe { nolock::kfree_nolock((&raw mut not_nolock).cast()) };
}

/// Every stress, storm and torture test holds a `testkit::NoReports` guard: one report printed during the test
/// (here: one refused free) must fail it even though every assertion of the test itself passed.
#[test]
fn a_report_during_a_test_fails_it() {
    let _reports = testkit::NoReports::new();
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "no_reports_guard_child", "--nocapture", "--test-threads=1"])
        .env(GUARD_CHILD_ENV, "1")
        .output()
        .expect("run the child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "a test that made a report passed:\n{text}");
    assert!(text.contains("is not from nolock's arena"), "the report is on stderr:\n{text}");
    assert!(text.contains("nolock printed 1 report(s) on standard error during the test"), "{text}");
}
