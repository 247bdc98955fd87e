//! Reentry at named points: the "signal that lands in the worst place, on purpose" (DESIGN.md sections 4, 6).
//!
//! A test hook ([`nolock::hooks::set_hook`]) runs at every named point of the allocator's fast and slow paths,
//! where the interrupted operation holds a per-thread list's busy flag, a slab's take right, or half-claimed
//! pages. The hook does what a signal handler arriving there would do: it allocates one object of every kmalloc
//! class (so one of them is the class the outer operation holds busy: next bucket), a large run and an object
//! of a `KmemCache` (busy: shared path), stamps and checks them, and frees them again (busy: deferred free). It
//! also frees objects that the test allocated beforehand ("victims"), of the class the outer operation works on.
//!
//! The driver then reaches every point: refills from fresh slabs, flushes of overfull lists, deferred drains,
//! large runs, a fresh thread's slot claim, and the shared path at depth zero (an allocation from a pthread
//! key destructor that runs after nolock's own exit destructor). Every object must stay distinct and intact.
//!
//! Hooks are global: the tests here are serialized, and the background worker is off (it would run the hook
//! on its own thread, racing the end of a test).

use std::alloc::Layout;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, Once};

use nolock::hooks::{Point, set_hook};
use nolock::stats::snapshot;
use nolock::{CacheStats, Gfp, KMALLOC_SIZES, KmemCache, kfree_nolock, kmalloc_nolock, ksize};

static SERIAL: Mutex<()> = Mutex::new(());

/// Installs the hook; uninstalls it when dropped, also when a test fails.
struct HookGuard;

impl HookGuard {
    fn install() -> Self {
        set_hook(Some(hook));
        HookGuard
    }
}

impl Drop for HookGuard {
    fn drop(&mut self) {
        set_hook(None);
        HOOK_CACHE.store(std::ptr::null_mut(), Ordering::Release);
    }
}

/// The points the hook counts, in the order of `HITS`.
const POINTS: [Point; 10] = [
    Point::AllocFast,
    Point::AllocRefill,
    Point::AllocShared,
    Point::SlabNew,
    Point::FreeFast,
    Point::FreeFlush,
    Point::DeferredDrain,
    Point::ThreadClaim,
    Point::PageAlloc,
    Point::PageFree,
];
static HITS: [AtomicU64; 10] = [const { AtomicU64::new(0) }; 10];

/// The `KmemCache` the hook allocates from (null: none).
static HOOK_CACHE: AtomicPtr<KmemCache> = AtomicPtr::new(std::ptr::null_mut());
/// Size of the large run the hook allocates (above the largest class, 32 KiB).
const HOOK_LARGE: usize = 8 * 4096 + 100;
/// Bytes of each object that carry the pattern.
const PATTERN_CAP: usize = 16 << 10;

static SEQ: AtomicU64 = AtomicU64::new(1);
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
static CORRUPT: AtomicU64 = AtomicU64::new(0);

/// Objects the hook could not free where it ran (at `DeferredDrain` a free of the busy class would be deferred
/// again and keep the drain loop going forever): (address, stamp), freed by the driver after each operation,
/// with the hook quiet. Hooks run only on the thread that drives the test (the tests are serialized and the
/// worker is off), so a counter is enough to index the stash.
const STASH: usize = 16384;
static STASH_ADDR: [AtomicUsize; STASH] = [const { AtomicUsize::new(0) }; STASH];
static STASH_SEQ: [AtomicU64; STASH] = [const { AtomicU64::new(0) }; STASH];
static STASH_LEN: AtomicUsize = AtomicUsize::new(0);
static STASH_FULL: AtomicBool = AtomicBool::new(false);
/// While set, the hook does nothing (the driver is freeing the stash).
static QUIET: AtomicBool = AtomicBool::new(false);

/// Objects of the class the driver is working on, which the hook frees (two per hook run): (address, stamp).
const VICTIMS: usize = 256;
static VICTIM_ADDR: [AtomicUsize; VICTIMS] = [const { AtomicUsize::new(0) }; VICTIMS];
static VICTIM_SEQ: [AtomicU64; VICTIMS] = [const { AtomicU64::new(0) }; VICTIMS];
static VICTIMS_FREED: AtomicU64 = AtomicU64::new(0);

fn setup() -> MutexGuard<'static, ()> {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Before the first nolock call of this binary: no background worker (see the module documentation).
        nolock::Config::new().background(false).apply().expect("configured before first use");
    });
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn pattern_len(p: *const u8) -> usize {
    ksize(p).min(PATTERN_CAP)
}

/// Stamp a fresh object (any context).
fn stamp(p: *mut u8, size: usize) -> (usize, u64) {
    if ksize(p) < size {
        CORRUPT.fetch_add(1, Ordering::Relaxed);
    }
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    // SAFETY: a fresh object of at least `pattern_len(p)` bytes, 8-aligned.
    unsafe { testkit::fill(p, pattern_len(p), seq) };
    (p as usize, seq)
}

/// Check a stamp (any context).
fn check(addr: usize, seq: u64) -> bool {
    let p = addr as *const u8;
    // SAFETY: a live object we own, stamped over `pattern_len(p)` bytes.
    let ok = unsafe { testkit::check(p, pattern_len(p), Some(seq), u64::MAX) }.is_ok();
    if !ok {
        CORRUPT.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

fn alloc(size: usize) -> Option<(usize, u64)> {
    match kmalloc_nolock(size, Gfp::NONE) {
        Some(p) => Some(stamp(p.as_ptr(), size)),
        None => {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

fn check_free(addr: usize, seq: u64) {
    check(addr, seq);
    // SAFETY: our object, freed once.
    unsafe { kfree_nolock(addr as *mut u8) };
}

fn stash(addr: usize, seq: u64) {
    let i = STASH_LEN.fetch_add(1, Ordering::Relaxed);
    if i >= STASH {
        // Leaked on purpose (freeing it here could loop); the test fails on STASH_FULL.
        STASH_LEN.fetch_sub(1, Ordering::Relaxed);
        STASH_FULL.store(true, Ordering::Relaxed);
        return;
    }
    STASH_SEQ[i].store(seq, Ordering::Relaxed);
    STASH_ADDR[i].store(addr, Ordering::Release);
}

/// Free everything the hook stashed, with the hook quiet (each free would run it again and stash more).
fn free_stash() -> usize {
    QUIET.store(true, Ordering::Release);
    let n = STASH_LEN.load(Ordering::Acquire);
    for i in 0..n {
        let a = STASH_ADDR[i].swap(0, Ordering::AcqRel);
        if a != 0 {
            check_free(a, STASH_SEQ[i].load(Ordering::Relaxed));
        }
    }
    STASH_LEN.store(0, Ordering::Release);
    QUIET.store(false, Ordering::Release);
    n
}

/// Keep the stash from filling up during a long run of operations.
fn maybe_free_stash() {
    if STASH_LEN.load(Ordering::Relaxed) > STASH / 2 {
        free_stash();
    }
}

/// The nested operation. Runs with the outer operation stopped at `at`, on the same thread.
fn hook(at: Point) {
    let Some(i) = POINTS.iter().position(|&p| p == at) else {
        return;
    };
    if QUIET.load(Ordering::Acquire) {
        return;
    }
    HITS[i].fetch_add(1, Ordering::Relaxed);
    let mut objs = [(0usize, 0u64); KMALLOC_SIZES.len() + 2];
    for (o, &size) in objs.iter_mut().zip(KMALLOC_SIZES.iter()) {
        if let Some(x) = alloc(size) {
            *o = x;
        }
    }
    if let Some(x) = alloc(HOOK_LARGE) {
        objs[KMALLOC_SIZES.len()] = x;
    }
    let c = HOOK_CACHE.load(Ordering::Acquire);
    if !c.is_null() {
        // SAFETY: the test clears HOOK_CACHE and uninstalls the hook before it destroys the cache.
        let c = unsafe { &*c };
        match c.alloc_nolock(Gfp::NONE) {
            Some(p) => objs[KMALLOC_SIZES.len() + 1] = stamp(p.as_ptr(), c.object_size()),
            None => {
                SPURIOUS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Free two of the driver's objects (the class the outer operation works on) and check ours.
    let mut freed = 0;
    for v in 0..VICTIMS {
        if freed == 2 {
            break;
        }
        let a = VICTIM_ADDR[v].swap(0, Ordering::AcqRel);
        if a != 0 {
            check_free(a, VICTIM_SEQ[v].load(Ordering::Relaxed));
            VICTIMS_FREED.fetch_add(1, Ordering::Relaxed);
            freed += 1;
        }
    }
    for &(a, s) in &objs {
        if a == 0 {
            continue;
        }
        if at == Point::DeferredDrain {
            check(a, s);
            stash(a, s);
        } else {
            check_free(a, s);
        }
    }
}

/// Allocate, stamp and hand `n` objects of `size` to the hook as victims (any left over are returned).
fn set_victims(size: usize, cache: Option<&KmemCache>, n: usize) {
    for v in 0..n.min(VICTIMS) {
        let o = match cache {
            Some(c) => c.alloc_nolock(Gfp::NONE).map(|p| stamp(p.as_ptr(), c.object_size())),
            None => alloc(size),
        };
        if let Some((a, s)) = o {
            VICTIM_SEQ[v].store(s, Ordering::Relaxed);
            let old = VICTIM_ADDR[v].swap(a, Ordering::AcqRel);
            assert_eq!(old, 0, "victim slots are emptied between rounds");
        }
    }
}

fn take_victims() -> Vec<(usize, u64)> {
    (0..VICTIMS)
        .filter_map(|v| {
            let a = VICTIM_ADDR[v].swap(0, Ordering::AcqRel);
            (a != 0).then(|| (a, VICTIM_SEQ[v].load(Ordering::Relaxed)))
        })
        .collect()
}

/// One round for one class: allocate `n` objects (the list empties: refill, new slabs, pages), check they are
/// distinct and intact, then free them all (the list overfills: flush; the hook's frees: deferred, drained).
fn churn(size: usize, cache: Option<&KmemCache>, n: usize) {
    set_victims(size, cache, 32);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let o = match cache {
            Some(c) => match c.alloc_nolock(Gfp::NONE) {
                Some(p) => Some(stamp(p.as_ptr(), c.object_size())),
                None => {
                    SPURIOUS.fetch_add(1, Ordering::Relaxed);
                    None
                }
            },
            None => alloc(size),
        };
        held.extend(o);
        maybe_free_stash();
    }
    let victims = take_victims();
    let mut seen = HashSet::new();
    for &(a, s) in held.iter().chain(&victims) {
        assert!(seen.insert(a), "object {a:#x} handed out twice (size {size})");
        check(a, s);
    }
    // Give the hook victims again for the frees, then free everything.
    for (v, &(a, s)) in victims.iter().enumerate() {
        VICTIM_SEQ[v].store(s, Ordering::Relaxed);
        VICTIM_ADDR[v].store(a, Ordering::Release);
    }
    for (a, s) in held {
        match cache {
            Some(c) => {
                check(a, s);
                // SAFETY: our object of this cache, freed once.
                unsafe { c.free_nolock(std::ptr::NonNull::new(a as *mut u8).unwrap()) };
            }
            None => check_free(a, s),
        }
        maybe_free_stash();
    }
    for (a, s) in take_victims() {
        check_free(a, s);
    }
    free_stash();
}

/// A pthread key whose destructor runs after nolock's exit destructor (keys are destroyed in creation order
/// and nolock creates its key before `main`): there the thread has no shard any more, and allocations take
/// the shared path at nesting depth zero, so the hook runs at `AllocShared`.
static LATE_KEY_RAN: AtomicBool = AtomicBool::new(false);
static LATE_KEY_HAD_SHARD: AtomicBool = AtomicBool::new(false);

extern "C" fn late_exit(_value: *mut libc::c_void) {
    LATE_KEY_RAN.store(true, Ordering::Relaxed);
    LATE_KEY_HAD_SHARD.store(nolock::stats::thread_has_shard(), Ordering::Relaxed);
    for &size in &[64usize, 1000, 8192] {
        if let Some((a, s)) = alloc(size) {
            check_free(a, s);
        }
    }
    let c = HOOK_CACHE.load(Ordering::Acquire);
    if !c.is_null() {
        // SAFETY: the cache outlives this thread (the test joins it before destroying the cache).
        let c = unsafe { &*c };
        if let Some(p) = c.alloc_nolock(Gfp::NONE) {
            let (a, s) = stamp(p.as_ptr(), c.object_size());
            check(a, s);
            // SAFETY: our object, freed once.
            unsafe { c.free_nolock(p) };
        } else {
            SPURIOUS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn shared_path_after_exit() {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; `late_exit` has the destructor signature.
    assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(late_exit)) }, 0);
    std::thread::spawn(move || {
        // A normal life first: this thread has a shard.
        if let Some((a, s)) = alloc(64) {
            check_free(a, s);
        }
        let value: *const AtomicBool = &LATE_KEY_RAN;
        // SAFETY: `key` is live; any non-null value makes the destructor run at exit (it is never dereferenced).
        unsafe { libc::pthread_setspecific(key, value.cast()) };
    })
    .join()
    .unwrap();
    // SAFETY: the only thread that set a value has exited; the key is not used any more.
    unsafe { libc::pthread_key_delete(key) };
    assert!(LATE_KEY_RAN.load(Ordering::Relaxed), "late key destructor ran");
    assert!(
        !LATE_KEY_HAD_SHARD.load(Ordering::Relaxed),
        "nolock's exit destructor should have run before a key created later"
    );
}

fn delta(after: &CacheStats, before: Option<&CacheStats>) -> (u64, u64, u64) {
    let b = before.copied().unwrap_or_default();
    (after.next_bucket - b.next_bucket, after.deferred_frees - b.deferred_frees, after.shared_allocs - b.shared_allocs)
}

#[test]
fn every_point_with_nested_alloc_and_free() {
    let _reports = testkit::NoReports::new();
    let _serial = setup();
    for h in &HITS {
        h.store(0, Ordering::Relaxed);
    }
    SPURIOUS.store(0, Ordering::Relaxed);
    CORRUPT.store(0, Ordering::Relaxed);
    let cache = KmemCache::new("reentry-obj", Layout::new::<[u64; 5]>()).unwrap();
    let before = snapshot();
    HOOK_CACHE.store(&cache as *const KmemCache as *mut KmemCache, Ordering::Release);
    let hook_guard = HookGuard::install();

    // A fresh thread: its first call claims a slot (the hook's nested calls claim one first), then every class
    // and the cache go through refill, new slabs, flush and deferred drains.
    std::thread::scope(|s| {
        s.spawn(|| {
            assert!(!nolock::stats::thread_has_shard());
            if let Some((a, s)) = alloc(100) {
                check_free(a, s);
            }
            assert!(nolock::stats::thread_has_shard(), "the thread has a slot after its first call");
            for &size in &KMALLOC_SIZES {
                churn(size, None, 600);
            }
            churn(0, Some(&cache), 600);
            // Large runs at depth zero: the page allocator's points.
            for size in [32_769usize, 40_000, 100_000] {
                if let Some((a, s)) = alloc(size) {
                    check_free(a, s);
                }
            }
        });
    });
    // The shared path at depth zero.
    shared_path_after_exit();
    // Trim with the hook installed: drains this thread's lists and releases slabs (PageFree at depth zero).
    let trimmed = nolock::trim();

    drop(hook_guard);
    let stashed = free_stash();
    let after = snapshot();

    let hits: Vec<(Point, u64)> = POINTS.iter().zip(&HITS).map(|(&p, h)| (p, h.load(Ordering::Relaxed))).collect();
    eprintln!(
        "reentry hits: {hits:?}; victims freed by the hook {}, stash left at the end {stashed}, trim {trimmed:?}",
        VICTIMS_FREED.load(Ordering::Relaxed)
    );
    for &(p, n) in &hits {
        assert!(n > 0, "point {p:?} was never reached");
    }
    assert_eq!(SPURIOUS.load(Ordering::Relaxed), 0, "spurious failures");
    assert_eq!(CORRUPT.load(Ordering::Relaxed), 0, "corrupted objects");
    assert!(!STASH_FULL.load(Ordering::Relaxed), "stash overflowed");
    assert!(VICTIMS_FREED.load(Ordering::Relaxed) > 0);

    // Every class was found busy by the hook (next bucket) and took deferred frees; the cache (no next
    // bucket) sent the hook's allocations down the shared path.
    for &size in &KMALLOC_SIZES {
        let name =
            if size.is_multiple_of(1024) { format!("kmalloc-{}k", size / 1024) } else { format!("kmalloc-{size}") };
        let (nb, df, _) = delta(after.cache(&name).unwrap(), before.cache(&name));
        assert!(nb > 0, "{name}: next_bucket did not move");
        assert!(df > 0, "{name}: deferred_frees did not move");
    }
    let (_, df, sa) = delta(&cache.stats(), before.cache("reentry-obj"));
    assert!(df > 0, "cache: deferred_frees did not move");
    assert!(sa > 0, "cache: shared_allocs did not move");
    let (nb, df, sa) = delta(&after.total(), Some(&before.total()));
    eprintln!("reentry totals: next_bucket {nb}, deferred_frees {df}, shared_allocs {sa}");
    assert!(nb > 0 && df > 0 && sa > 0);

    // Nothing lost: every allocation of this test was freed exactly once.
    for c in &after.caches {
        assert_eq!(c.bad_frees, 0, "{}: refused frees", c.name);
        assert_eq!(c.failures, 0, "{}: failures", c.name);
        assert_eq!(c.allocs, c.frees, "{}: allocs and frees differ", c.name);
    }
    assert_eq!(after.large.allocs, after.large.frees);
    let report = cache.destroy();
    assert_eq!(report.live_objects, 0);
}

/// The hook frees objects of the class that the outer allocation holds busy (deferred frees), and the outer
/// code then gets them back through the drained deferred list. Nothing may be handed out twice.
#[test]
fn nested_frees_are_reused_not_duplicated() {
    let _reports = testkit::NoReports::new();
    let _serial = setup();
    SPURIOUS.store(0, Ordering::Relaxed);
    CORRUPT.store(0, Ordering::Relaxed);
    let hook_guard = HookGuard::install();
    std::thread::spawn(|| {
        for round in 0..4 {
            for &size in &[64usize, 96, 4096] {
                // The hook frees our victims inside our allocations; those objects come back to us through the
                // deferred list and must never be returned twice.
                set_victims(size, None, VICTIMS);
                let mut seen = HashSet::new();
                let mut held = Vec::new();
                for _ in 0..300 {
                    maybe_free_stash();
                    if let Some((a, s)) = alloc(size) {
                        assert!(seen.insert(a), "round {round}, size {size}: {a:#x} handed out twice");
                        held.push((a, s));
                    }
                }
                for (a, s) in held.into_iter().chain(take_victims()) {
                    check_free(a, s);
                }
                free_stash();
            }
        }
    })
    .join()
    .unwrap();
    drop(hook_guard);
    free_stash();
    assert_eq!(SPURIOUS.load(Ordering::Relaxed), 0, "spurious failures");
    assert_eq!(CORRUPT.load(Ordering::Relaxed), 0, "corrupted objects");
}
