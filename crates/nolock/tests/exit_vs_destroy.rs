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
    nolock::init();
    let reports = nolock::debug::reports();
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
        assert_eq!(nolock::debug::reports(), reports, "round {round}: nolock reported a bad free (see stderr)");
    }
}
