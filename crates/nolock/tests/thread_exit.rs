//! Thread exit: a thread's per-thread lists (its shard) are handed back when it exits, and shards are reused,
//! so more than `MAX_SHARDS` threads over a process's life all get per-thread caches.
//!
//! The tests are serialized: they read process-wide counters.

use std::alloc::Layout;
use std::sync::Mutex;
use std::sync::mpsc;

use nolock::stats::{snapshot, thread_has_shard};
use nolock::{Gfp, KmemCache, MAX_SHARDS, kfree_nolock, kmalloc_nolock};

static SERIAL: Mutex<()> = Mutex::new(());

fn kmalloc_cached(name: &str) -> u64 {
    snapshot().cache(name).unwrap().cached_objects
}

#[test]
fn exiting_thread_returns_its_cached_objects() {
    let _reports = testkit::NoReports::new();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cache = KmemCache::new("exit-obj", Layout::new::<[u64; 4]>()).unwrap();
    // kmalloc-256 is used by nothing else in this binary.
    // The cache above made nolock set up its kmalloc caches, so the snapshot has them.
    let k_before = kmalloc_cached("kmalloc-256");
    let c_before = cache.stats().cached_objects;
    assert_eq!(c_before, 0);

    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let cache = &cache;
        let t = s.spawn(move || {
            let objs: Vec<_> = (0..100).map(|_| cache.alloc_nolock(Gfp::NONE).unwrap()).collect();
            let big: Vec<_> = (0..100).map(|_| kmalloc_nolock(250, Gfp::NONE).unwrap()).collect();
            for p in objs {
                // SAFETY: our object of this cache, freed once.
                unsafe { cache.free_nolock(p) };
            }
            for p in big {
                // SAFETY: our object, freed once.
                unsafe { kfree_nolock(p.as_ptr()) };
            }
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
        });
        ready_rx.recv().unwrap();
        // While the thread lives, the freed objects sit in its lists.
        let c_live = cache.stats().cached_objects;
        let k_live = kmalloc_cached("kmalloc-256");
        assert!(c_live >= c_before + 100, "cache objects cached by the live thread: {c_live}");
        assert!(
            k_live >= k_before + 100,
            "kmalloc-256 objects cached by the live thread: {k_live} (before {k_before})"
        );
        go_tx.send(()).unwrap();
        t.join().unwrap();
    });
    // After the exit, they are back in their slabs.
    assert_eq!(cache.stats().cached_objects, c_before, "cache: objects handed back at exit");
    assert_eq!(kmalloc_cached("kmalloc-256"), k_before, "kmalloc-256: objects handed back at exit");
    // And the slabs are entirely free: shrinking releases every one of them.
    cache.shrink();
    let st = cache.stats();
    assert_eq!(st.slabs, 0, "all slabs free after the exit");
    assert_eq!(st.allocs, 100);
    assert_eq!(st.frees, 100);
    assert_eq!(cache.destroy().live_objects, 0);
}

#[test]
fn more_threads_than_shards_one_after_another() {
    let _reports = testkit::NoReports::new();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cache = KmemCache::new("exit-churn", Layout::new::<[u64; 2]>()).unwrap();
    let threads = MAX_SHARDS + 100;
    const PER_THREAD: u64 = 4;
    for i in 0..threads {
        let cache = &cache;
        let had_shard = std::thread::scope(|s| {
            s.spawn(move || {
                let objs: Vec<_> =
                    (0..PER_THREAD).map(|_| cache.alloc_nolock(Gfp::NONE).expect("cache allocation")).collect();
                let k = kmalloc_nolock(64, Gfp::NONE).expect("kmalloc");
                let had = thread_has_shard();
                for p in objs {
                    // SAFETY: our object of this cache, freed once.
                    unsafe { cache.free_nolock(p) };
                }
                // SAFETY: our object, freed once.
                unsafe { kfree_nolock(k.as_ptr()) };
                had
            })
            .join()
            .unwrap()
        });
        assert!(had_shard, "thread {i} got no per-thread caches");
    }
    let st = cache.stats();
    // Every thread used its own lists (no shared path), which needs shards handed back and reused.
    assert_eq!(st.shared_allocs, 0, "allocations on the shared path");
    assert_eq!(st.shared_frees, 0, "frees on the shared path");
    assert_eq!(st.allocs, threads as u64 * PER_THREAD);
    assert_eq!(st.frees, threads as u64 * PER_THREAD);
    assert_eq!(st.cached_objects, 0, "every exited thread handed its objects back");
    assert_eq!(cache.destroy().live_objects, 0);
}
