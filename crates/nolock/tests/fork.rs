//! fork() while other threads allocate: the child has only the forking thread, inherits every other thread's
//! per-thread lists and possibly half-finished operations, and must still allocate and free freely, never hand
//! out an object that was live in the parent, and never deadlock.
//!
//! The child runs nolock and raw libc only (no std allocation, no locks, no panics), and leaves with `_exit`.
//! The parent waits for it with a deadline and kills it if it hangs.

use std::alloc::Layout;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use nolock::{Gfp, KmemCache, kfree_nolock, kmalloc_nolock, ksize};

static SERIAL: Mutex<()> = Mutex::new(());

/// Requested sizes: every kmalloc class and page runs.
const SIZES: [usize; 19] =
    [8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192, 8193, 12_288, 32_768, 32_769, 40_000, 100];
const PATTERN_CAP: usize = 16 << 10;

/// Objects live in the parent at fork time, published by the parent's threads: an address is stored (Release)
/// only after the object is stamped, and removed before it is freed, so in the child every published object is
/// allocated and stamped.
const PUBLISHED: usize = 1024;
static PUB_ADDR: [AtomicUsize; PUBLISHED] = [const { AtomicUsize::new(0) }; PUBLISHED];
static PUB_SEQ: [AtomicU64; PUBLISHED] = [const { AtomicU64::new(0) }; PUBLISHED];
/// Slots per thread in `PUBLISHED`.
const PER_THREAD: usize = 128;

static SEQ: AtomicU64 = AtomicU64::new(1);
static STOP: AtomicBool = AtomicBool::new(false);

/// Sets `STOP` when dropped, so a failing assertion also lets every helper thread finish.
struct StopOnDrop;

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        STOP.store(true, Ordering::Relaxed);
    }
}

fn pattern_len(p: *const u8) -> usize {
    ksize(p).min(PATTERN_CAP)
}

fn stamp(p: *mut u8, seq: u64) {
    // SAFETY: a fresh object of at least `pattern_len(p)` bytes, 8-aligned.
    unsafe { testkit::fill(p, pattern_len(p), seq) };
}

fn intact(addr: usize, seq: u64) -> bool {
    let p = addr as *const u8;
    // SAFETY: a live object stamped over `pattern_len(p)` bytes.
    unsafe { testkit::check(p, pattern_len(p), Some(seq), u64::MAX) }.is_ok()
}

/// A parent thread's loop: allocate, publish, unpublish, check and free objects in its slots until `STOP`.
fn runner(t: usize, cache: &KmemCache) {
    let mut r = testkit::splitmix64(t as u64 + 7);
    while !STOP.load(Ordering::Relaxed) {
        r = testkit::splitmix64(r);
        let slot = t * PER_THREAD + (r as usize % PER_THREAD);
        let old = PUB_ADDR[slot].swap(0, Ordering::AcqRel);
        if old != 0 {
            assert!(intact(old, PUB_SEQ[slot].load(Ordering::Relaxed)), "parent object corrupted");
            // SAFETY: our object, unpublished, freed once.
            unsafe { kfree_nolock(old as *mut u8) };
            continue;
        }
        let p = if r & 0x300 == 0 {
            cache.alloc_nolock(Gfp::NONE)
        } else {
            kmalloc_nolock(SIZES[(r >> 16) as usize % SIZES.len()], Gfp::NONE)
        }
        .expect("allocation in the parent");
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        stamp(p.as_ptr(), seq);
        PUB_SEQ[slot].store(seq, Ordering::Relaxed);
        PUB_ADDR[slot].store(p.as_ptr() as usize, Ordering::Release);
    }
}

/// Leave the parent's published objects where they are; free them at the end of the test.
fn free_published() {
    for (a, s) in PUB_ADDR.iter().zip(&PUB_SEQ) {
        let addr = a.swap(0, Ordering::AcqRel);
        if addr != 0 {
            assert!(intact(addr, s.load(Ordering::Relaxed)));
            // SAFETY: a live object, unpublished, freed once.
            unsafe { kfree_nolock(addr as *mut u8) };
        }
    }
}

/// Exit codes of the child.
const CHILD_OK: i32 = 0;
const CHILD_NONE: i32 = 10;
const CHILD_CORRUPT: i32 = 11;
const CHILD_PARENT_OBJECT_DAMAGED: i32 = 12;
const CHILD_CACHE_NONE: i32 = 13;
const CHILD_REPORTED: i32 = 14;

/// The child's work: many rounds of allocating objects of every class (and the cache) at once, checking them,
/// and freeing them; then the parent's published objects must still be intact. Never allocates with std, never
/// locks, never panics (a panic in a fork child of a threaded process could deadlock).
fn child_work(cache: &KmemCache) -> i32 {
    // The child inherits the parent's count; anything nolock reports in the child (a refused free, a damaged
    // list taken over from a thread that does not exist here) fails the test.
    let reports = nolock::debug::reports();
    let code = child_rounds(cache);
    if code == CHILD_OK && nolock::debug::reports() != reports { CHILD_REPORTED } else { code }
}

fn child_rounds(cache: &KmemCache) -> i32 {
    const N: usize = 512;
    let mut held = [(0usize, 0u64, false); N];
    let mut seq = 1u64 << 48;
    for round in 0..24 {
        for (i, h) in held.iter_mut().enumerate() {
            let from_cache = i % 9 == 4;
            let p = if from_cache {
                match cache.alloc_nolock(Gfp::NONE) {
                    Some(p) => p,
                    None => return CHILD_CACHE_NONE,
                }
            } else {
                match kmalloc_nolock(SIZES[(i + round) % SIZES.len()], Gfp::NONE) {
                    Some(p) => p,
                    None => return CHILD_NONE,
                }
            };
            seq += 1;
            stamp(p.as_ptr(), seq);
            *h = (p.as_ptr() as usize, seq, from_cache);
        }
        // A duplicate address would have been stamped twice: the first holder's check fails.
        for &(a, s, _) in held.iter() {
            if !intact(a, s) {
                return CHILD_CORRUPT;
            }
        }
        for &(a, _, from_cache) in held.iter() {
            if from_cache && round % 2 == 0 {
                // SAFETY: our object of this cache, freed once.
                unsafe { cache.free_nolock(std::ptr::NonNull::new_unchecked(a as *mut u8)) };
            } else {
                // SAFETY: our object, freed once.
                unsafe { kfree_nolock(a as *mut u8) };
            }
        }
    }
    for (a, s) in PUB_ADDR.iter().zip(&PUB_SEQ) {
        let addr = a.load(Ordering::Acquire);
        if addr != 0 && !intact(addr, s.load(Ordering::Relaxed)) {
            return CHILD_PARENT_OBJECT_DAMAGED;
        }
    }
    CHILD_OK
}

/// Fork; the child runs `child_work` and exits with its code; the parent waits (at most 20 s) and checks it.
fn fork_and_check(cache: &KmemCache, what: &str) {
    // SAFETY: the child only runs `child_work` (nolock and raw memory accesses) and `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = child_work(cache);
        // SAFETY: leaves the child at once, running no atexit handlers or destructors.
        unsafe { libc::_exit(code) };
    }
    assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "waitpid: {}", std::io::Error::last_os_error());
        if Instant::now() > deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            panic!("{what}: the fork child hung (deadlock after fork?)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        libc::WIFEXITED(status),
        "{what}: the child died abnormally (status {status:#x}, signal {})",
        libc::WTERMSIG(status)
    );
    assert_eq!(
        libc::WEXITSTATUS(status),
        CHILD_OK,
        "{what}: child failed (10: kmalloc None, 11: corrupted or duplicate object, 12: an object live in the \
         parent was handed out again, 13: cache None, 14: nolock printed a report in the child)"
    );
}

#[test]
fn fork_while_threads_allocate() {
    let _reports = testkit::NoReports::new();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init(); // with the background worker: fork must also cope with it
    let cache = KmemCache::new("fork-obj", Layout::new::<[u64; 7]>()).unwrap();
    STOP.store(false, Ordering::Relaxed);
    let parked = Barrier::new(3);
    std::thread::scope(|s| {
        let _stop = StopOnDrop;
        // Two threads fill their lists and then sit still with objects cached and published; two keep running
        // allocation loops through every fork.
        for t in 0..2 {
            let (cache, parked) = (&cache, &parked);
            s.spawn(move || {
                let mut r = testkit::splitmix64(100 + t as u64);
                let mut mine = Vec::new();
                for i in 0..2000 {
                    r = testkit::splitmix64(r);
                    let p = kmalloc_nolock(SIZES[r as usize % SIZES.len()], Gfp::NONE).unwrap();
                    mine.push(p);
                    if i % 3 == 0 {
                        let q = cache.alloc_nolock(Gfp::NONE).unwrap();
                        mine.push(q);
                    }
                }
                // Free most (they stay in this thread's lists), publish some.
                for (i, p) in mine.into_iter().enumerate() {
                    let slot = (2 + t) * PER_THREAD + i % PER_THREAD;
                    if i % 16 == 0 && PUB_ADDR[slot].load(Ordering::Relaxed) == 0 {
                        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
                        stamp(p.as_ptr(), seq);
                        PUB_SEQ[slot].store(seq, Ordering::Relaxed);
                        PUB_ADDR[slot].store(p.as_ptr() as usize, Ordering::Release);
                    } else {
                        // SAFETY: our object, freed once.
                        unsafe { kfree_nolock(p.as_ptr()) };
                    }
                }
                parked.wait();
                while !STOP.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
        }
        for t in 0..2 {
            let cache = &cache;
            s.spawn(move || runner(t, cache));
        }
        parked.wait();
        std::thread::sleep(Duration::from_millis(20));
        for i in 0..4 {
            fork_and_check(&cache, &format!("fork {i} from the test thread"));
            std::thread::sleep(Duration::from_millis(10));
        }
        // Fork from other threads: one that never used nolock, one with objects in its lists.
        s.spawn(|| fork_and_check(&cache, "fork from a fresh thread")).join().unwrap();
        s.spawn(|| {
            let held: Vec<_> = (0..300).map(|i| kmalloc_nolock(SIZES[i % SIZES.len()], Gfp::NONE).unwrap()).collect();
            for p in held {
                // SAFETY: our object, freed once.
                unsafe { kfree_nolock(p.as_ptr()) };
            }
            fork_and_check(&cache, "fork from a thread with cached objects");
        })
        .join()
        .unwrap();
    });
    free_published();
    let st = cache.stats();
    assert_eq!(st.allocs, st.frees, "parent: cache objects all freed");
    assert_eq!(cache.destroy().live_objects, 0);
    // The parent's own reports: none (the guard checks at the end; the child checks its own).
}

#[test]
fn fork_inside_nolock_heavy_process_repeatedly() {
    let _reports = testkit::NoReports::new();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cache = KmemCache::new("fork-obj-2", Layout::new::<[u8; 200]>()).unwrap();
    STOP.store(false, Ordering::Relaxed);
    std::thread::scope(|s| {
        let _stop = StopOnDrop;
        for t in 0..3 {
            let cache = &cache;
            s.spawn(move || runner(4 + t, cache));
        }
        // Fork at arbitrary moments of the runners' operations; a runner may be inside the allocator with a
        // busy flag set: the child must still work (that list is left alone).
        for i in 0..12 {
            std::thread::sleep(Duration::from_millis(3));
            fork_and_check(&cache, &format!("repeated fork {i}"));
        }
    });
    free_published();
    let st = cache.stats();
    assert_eq!(st.allocs, st.frees, "parent: cache objects all freed");
    assert_eq!(cache.destroy().live_objects, 0);
}
