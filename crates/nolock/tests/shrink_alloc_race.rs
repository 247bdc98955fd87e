//! An allocation racing a shrink (`trim`, the out-of-pages reclaim) with the arena full: the nolock contract
//! says `None` only when memory is exhausted, and freed objects sitting in the cache's slabs are not exhausted.
//!
//! This test found that the shrink took the cache's whole partial list for its pass: an allocation on another
//! thread, or in a signal handler on the shrinking thread, found no partial slab and no free page, and failed
//! although thousands of freed objects sat in the slabs the shrink held. The shrink now holds at most one slab
//! at a time and names it in the cache, and an allocation that finds no page takes objects from it.
//!
//! The arena is small (1 MiB) and filled with one cache's objects; some are freed back to their slabs; then a
//! reentry hook at `Point::Shrink` (the shrink holds a slab) allocates, on the shrinking thread (as a signal
//! handler would) or on another thread while the shrinker waits (as a preempted shrinker would). Every one of
//! those allocations must succeed, no object may be handed out twice, none may be lost, nothing is reported.
//!
//! The arena size must be set before nolock's first use, so this file holds a single test; the background
//! worker is off so that the only shrinks are the ones the test starts.

use std::alloc::Layout;
use std::collections::BTreeSet;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use nolock::hooks::{Point, set_hook};
use nolock::{Config, Gfp, KmemCache, kfree_nolock, kmalloc_nolock};

const ARENA: usize = 1 << 20;
const OBJ: usize = 256;

static CACHE: OnceLock<KmemCache> = OnceLock::new();

/// What the hook does the next time a shrink holds a slab: nothing, allocate on this thread, or have the
/// helper thread allocate while this thread waits.
const OFF: u8 = 0;
const NESTED: u8 = 1;
const REMOTE: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(OFF);
/// How many objects the hooked allocation takes.
static WANT: AtomicUsize = AtomicUsize::new(0);
/// Objects the hooked allocation got (`None` as 0).
static GOT: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// Times the hook fired.
static FIRED: AtomicUsize = AtomicUsize::new(0);

fn cache() -> &'static KmemCache {
    CACHE.get().expect("cache created")
}

fn alloc_n(n: usize) -> Vec<usize> {
    (0..n).map(|_| cache().alloc_nolock(Gfp::NONE).map_or(0, |p| p.as_ptr() as usize)).collect()
}

fn hook(at: Point) {
    if at != Point::Shrink {
        return;
    }
    let got = match MODE.swap(OFF, Ordering::AcqRel) {
        NESTED => alloc_n(WANT.load(Ordering::Relaxed)),
        REMOTE => {
            // The shrinker waits here like a thread preempted in the middle of its pass. The other thread exits
            // when done, which returns the objects left in its list to the slabs.
            let n = WANT.load(Ordering::Relaxed);
            std::thread::Builder::new().name("helper".into()).spawn(move || alloc_n(n)).unwrap().join().unwrap()
        }
        _ => return,
    };
    FIRED.fetch_add(1, Ordering::Relaxed);
    *GOT.lock().unwrap() = got;
}

/// Allocate from the cache until `None`.
fn fill() -> Vec<usize> {
    let mut v = Vec::new();
    while let Some(p) = cache().alloc_nolock(Gfp::NONE) {
        v.push(p.as_ptr() as usize);
        assert!(v.len() * OBJ <= ARENA, "more objects than the arena holds");
    }
    v
}

fn free(p: usize) {
    // SAFETY: `p` is a live object of the cache, freed once.
    unsafe { cache().free_nolock(NonNull::new(p as *mut u8).unwrap()) };
}

/// Run one race: the hook fires in `mode` during `shrink`, allocating `want` objects; all must succeed.
fn race(name: &str, mode: u8, want: usize, live: &mut Vec<usize>, shrink: impl FnOnce()) {
    FIRED.store(0, Ordering::Relaxed);
    WANT.store(want, Ordering::Relaxed);
    MODE.store(mode, Ordering::Release);
    shrink();
    MODE.store(OFF, Ordering::Release);
    assert_eq!(FIRED.load(Ordering::Relaxed), 1, "{name}: the shrink held a slab once at least");
    let got = std::mem::take(&mut *GOT.lock().unwrap());
    let failures = got.iter().filter(|&&p| p == 0).count();
    assert_eq!(failures, 0, "{name}: {failures} of {want} allocations failed while freed objects sat in the slabs");
    let set: BTreeSet<usize> = live.iter().chain(&got).copied().collect();
    assert_eq!(set.len(), live.len() + got.len(), "{name}: an object was handed out twice");
    live.extend(got);
}

/// Free everything, trim, and check that the whole arena can be filled again with exactly `total` objects.
fn reset(live: &mut Vec<usize>, total: usize) {
    for p in live.drain(..) {
        free(p);
    }
    nolock::trim();
    let again = fill();
    assert_eq!(again.len(), total, "every object came back (none lost, none duplicated)");
    assert_eq!(again.iter().collect::<BTreeSet<_>>().len(), total);
    *live = again;
}

#[test]
fn allocations_succeed_while_a_shrink_holds_slabs() {
    Config::new().arena_size(ARENA).background(false).apply().expect("configured before first use");
    CACHE.set(KmemCache::new("race", Layout::from_size_align(OBJ, 8).unwrap()).unwrap()).ok().unwrap();
    set_hook(Some(hook));
    let reports = nolock::debug::reports();

    let per_slab = cache().stats().objects_per_slab;
    let slab_bytes = cache().stats().slab_pages * 4096;
    let mut live = fill();
    let total = live.len();
    assert!(total >= 8 * per_slab, "the arena holds several slabs ({total} objects)");

    // 1 and 2. Every other object freed: every slab is partial, none empty, no free page. `trim` returns the
    // thread's cached objects to the slabs, then shrinks (releasing nothing) while the hook allocates.
    for mode in [NESTED, REMOTE] {
        let (keep, gone): (Vec<usize>, Vec<usize>) = live.iter().partition(|&&p| (p / OBJ).is_multiple_of(2));
        gone.iter().for_each(|&p| free(p));
        live = keep;
        let name = if mode == NESTED { "trim, nested" } else { "trim, other thread" };
        race(name, mode, gone.len() / 2, &mut live, || {
            nolock::trim();
        });
        reset(&mut live, total);
    }

    // 3 and 4. Only one slab has free objects: the shrink holds that very slab when the hook allocates.
    for mode in [NESTED, REMOTE] {
        let slab = live[live.len() / 2] & !(slab_bytes - 1);
        let gone: Vec<usize> =
            live.iter().copied().filter(|&p| p & !(slab_bytes - 1) == slab).take(per_slab / 2).collect();
        gone.iter().for_each(|&p| free(p));
        live.retain(|p| !gone.contains(p));
        let name = if mode == NESTED { "one partial slab, nested" } else { "one partial slab, other thread" };
        race(name, mode, gone.len(), &mut live, || {
            nolock::trim();
        });
        assert!(cache().alloc_nolock(Gfp::NONE).is_none(), "{name}: the arena is exhausted now");
        reset(&mut live, total);
    }

    // 5. The out-of-pages reclaim: a kmalloc class needs a new slab, finds no page and shrinks every cache;
    // another thread allocates from this cache meanwhile.
    let (keep, gone): (Vec<usize>, Vec<usize>) = live.iter().partition(|&&p| (p / OBJ).is_multiple_of(2));
    gone.iter().for_each(|&p| free(p));
    live = keep;
    nolock::trim();
    race("out-of-pages reclaim, other thread", REMOTE, gone.len() / 2, &mut live, || {
        let p = kmalloc_nolock(4096, Gfp::NONE);
        assert!(p.is_none(), "no page is free for a kmalloc-4k slab");
    });
    reset(&mut live, total);

    set_hook(None);
    for p in live.drain(..) {
        free(p);
    }
    nolock::trim();
    // SAFETY: null is ignored.
    unsafe { kfree_nolock(core::ptr::null_mut()) };
    assert_eq!(nolock::debug::reports(), reports, "nothing was reported");
}
