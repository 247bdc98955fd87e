//! The walks that check free lists on the slow paths, in the shapes their one-pass form has to get right: the
//! flush checks the whole list and groups it into runs of one slab in the same walk (with a bounded buffer of
//! runs, the rest grouped afterwards), the refill checks the chain it takes from a slab, and both find loops by
//! the count bound (a list that loops never reaches its end) rather than by remembering what they saw; a list
//! with more runs than the walk records is given back grouped by slab (relinked into one chain per slab); damage
//! they find sends them to the diagnosing walk, which cuts and reports it. Each test here also passes on the
//! two-walk code these replaced: what is caught did not change.

use std::alloc::Layout;
use std::collections::BTreeSet;
use std::ptr::NonNull;
use std::sync::Mutex;

use nolock::{Gfp, KmemCache};

/// Objects per slab of the caches below (64-byte objects, one page).
const PER_SLAB: usize = 64;

/// The tests share the process-wide report counter: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|e| e.into_inner());
    nolock::debug::set_quiet(true);
    g
}

/// A plain or hardened cache without a double-free key (`without_free_key`, a test hook), so a double free
/// not at the head of the list gets past the free and the walks below are what catch it (every other plain
/// cache refuses such a free at once: `bad_input.rs`).
fn cache(name: &str, hardened: bool) -> KmemCache {
    let c = KmemCache::builder(name, Layout::new::<[u64; 8]>())
        .debug(false)
        .hardened(hardened)
        .without_free_key()
        .build()
        .unwrap();
    assert_eq!(c.stats().objects_per_slab, PER_SLAB);
    c
}

fn addr(p: NonNull<u8>) -> usize {
    p.as_ptr() as usize
}

fn ptr(a: usize) -> NonNull<u8> {
    NonNull::new(a as *mut u8).unwrap()
}

/// Free `a`, which the caller owns (or frees a second time on purpose).
fn free(c: &KmemCache, a: usize) {
    // SAFETY: `a` is an object of `c`; a deliberate double free is the point of some calls.
    assert_eq!(unsafe { c.try_free_nolock(ptr(a)) }, Ok(()), "the plain path accepts the free");
}

/// Allocate `n` objects, stamp each, and check that they are distinct and distinct from `live`.
fn alloc_distinct(c: &KmemCache, n: usize, live: &[usize]) -> Vec<usize> {
    let got: Vec<usize> = (0..n).map(|_| addr(c.alloc_nolock(Gfp::NONE).expect("memory is available"))).collect();
    let mut all: BTreeSet<usize> = live.iter().copied().collect();
    for &a in &got {
        assert!(all.insert(a), "{a:#x} handed out twice");
        // SAFETY: a fresh object of 64 bytes.
        unsafe { (a as *mut u64).write(a as u64) };
    }
    for &a in live {
        // SAFETY: a live object stamped by us (the stamp shows nobody else was handed it).
        assert_eq!(unsafe { (a as *const u64).read() }, a as u64, "live object {a:#x} was handed out again");
    }
    got
}

/// Run `f` on a thread of its own, so that its list of the cache is private and goes away with it.
fn on_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// `slabs` whole slabs' worth of objects, grouped by slab (fresh slabs hand out their objects in order).
fn by_slab(c: &KmemCache, slabs: usize) -> Vec<Vec<usize>> {
    let all = alloc_distinct(c, slabs * PER_SLAB, &[]);
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for a in all {
        groups.entry(a & !4095).or_default().push(a);
    }
    let groups: Vec<Vec<usize>> = groups.into_values().collect();
    assert_eq!(groups.len(), slabs, "fresh slabs of one page each");
    groups
}

/// Free the objects one from each slab in turn, so that no two neighbours on the thread's list share a slab:
/// every run a flush gives back is one object long, far more runs than a flush records in one walk.
fn free_interleaved(c: &KmemCache, groups: &[Vec<usize>], skip: Option<usize>) {
    for i in 0..PER_SLAB {
        for g in groups {
            if Some(g[i]) != skip {
                free(c, g[i]);
            }
        }
    }
}

fn interleaved_lists_go_back_whole(hardened: bool, slabs: usize) {
    let name = match (hardened, slabs > 32) {
        (false, false) => "walk-runs",
        (true, false) => "walk-runs-h",
        (false, true) => "walk-runs-many",
        (true, true) => "walk-runs-many-h",
    };
    let c = cache(name, hardened);
    on_thread(|| {
        let r = nolock::debug::reports();
        for _ in 0..3 {
            let groups = by_slab(&c, slabs);
            free_interleaved(&c, &groups, None);
            nolock::trim();
            let st = c.stats();
            assert_eq!(st.slabs, 0, "every object came back to its slab once, and every slab was released");
            assert_eq!((st.bad_frees, st.debug_errors), (0, 0));
        }
        assert_eq!(nolock::debug::reports(), r, "a sound list is not reported");
    });
}

/// A list whose every neighbour is in another slab: its flushes group it into runs of one object, past the
/// runs a walk records; each object still goes back to its slab exactly once (every slab is released empty).
#[test]
fn interleaved_list_goes_back_whole() {
    let _s = serial();
    interleaved_lists_go_back_whole(false, 24);
}

/// The same for a hardened cache (encoded links).
#[test]
fn interleaved_list_goes_back_whole_hardened() {
    let _s = serial();
    interleaved_lists_go_back_whole(true, 24);
}

/// Such a list over more slabs than a grouped flush's table holds (entries are taken over and pushed early):
/// each object still goes back to its slab exactly once.
#[test]
fn interleaved_list_over_many_slabs_goes_back_whole() {
    let _s = serial();
    interleaved_lists_go_back_whole(false, 80);
}

/// The same for a hardened cache (the grouped flush relinks objects through the encoding).
#[test]
fn interleaved_list_over_many_slabs_goes_back_whole_hardened() {
    let _s = serial();
    interleaved_lists_go_back_whole(true, 80);
}

/// A double free deep in such a list, far past the runs a flush records: the flush still finds the loop.
#[test]
fn double_free_past_the_recorded_runs_caught_at_flush() {
    let _s = serial();
    let c = cache("walk-runs-df", false);
    on_thread(|| {
        let groups = by_slab(&c, 24);
        let x = groups[3][10];
        let r = nolock::debug::reports();
        let bad = c.stats().bad_frees;
        // 24 * 11 + 4 objects freed, x among them but not last; then x again, then 200 more in front of it.
        let mut freed = Vec::new();
        'outer: for i in 0..PER_SLAB {
            for g in &groups {
                free(&c, g[i]);
                freed.push(g[i]);
                if freed.len() == 24 * 11 + 4 {
                    break 'outer;
                }
            }
        }
        free(&c, x);
        let rest: Vec<usize> = groups.iter().flatten().copied().filter(|a| !freed.contains(a)).take(200).collect();
        for &a in &rest {
            free(&c, a);
        }
        assert_eq!(nolock::debug::reports(), r, "no slow path ran yet");
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "the flush found the loop and reported it once");
        assert_eq!(c.stats().bad_frees, bad + 1);
        let got = alloc_distinct(&c, 2000, &[]);
        assert!(got.iter().filter(|&&a| a == x).count() <= 1);
        for a in got {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "nothing else was found");
    });
    // Objects behind the loop on the list are leaked (counted in use), and so are the ones never freed.
    std::mem::forget(c);
}

/// A write after free that makes a link skip one object of a regular run (it points to a real object of the
/// same slab, one further than before): the list is one short of its count, which the flush reports; the
/// skipped object is never handed out.
#[test]
fn link_skipping_an_object_caught_at_flush() {
    let _s = serial();
    let c = cache("walk-skip", false);
    on_thread(|| {
        let v = alloc_distinct(&c, 12, &[]);
        for &a in &v {
            free(&c, a);
        }
        let r = nolock::debug::reports();
        // The list is v[11] -> v[10] -> ... -> v[0]; make v[6] link to v[4], past v[5].
        // SAFETY: a deliberate write after free into the link word (offset 0) of v[6], which is on the list.
        unsafe { (v[6] as *mut usize).write(v[4]) };
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "the flush found the list one short");
        assert_eq!(c.stats().debug_errors, 1);
        let got = alloc_distinct(&c, 300, &[]);
        assert!(!got.contains(&v[5]), "the object cut out of the list is not handed out");
        for a in got {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1);
    });
    std::mem::forget(c);
}

/// A write after free into the last object's link (the end of the list) that points it back to the head: the
/// list loops with every link a real object; the count bound catches it at the flush.
#[test]
fn end_linked_back_to_head_caught_at_flush() {
    let _s = serial();
    let c = cache("walk-ring", false);
    on_thread(|| {
        let v = alloc_distinct(&c, 12, &[]);
        for &a in &v {
            free(&c, a);
        }
        let r = nolock::debug::reports();
        // SAFETY: a deliberate write after free into the link word of v[0], the last object on the list.
        unsafe { (v[0] as *mut usize).write(v[11]) };
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "the flush found the loop");
        let got = alloc_distinct(&c, 300, &[]);
        for a in got {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1);
    });
    std::mem::forget(c);
}

/// An object freed twice with a flush in between (no `trim`, so no shrink looks at its slab) reaches its slab
/// twice, which makes the slab's list loop; the refill that takes the slab's objects finds the loop, cuts it
/// and reports it, and nothing is handed out twice. Two objects of the slab stay live, so its count never
/// says "empty" and the shrink does not get to it first.
#[test]
fn double_free_reaching_the_slab_caught_at_refill() {
    let _s = serial();
    let c = cache("walk-refill", false);
    on_thread(|| {
        let s0 = alloc_distinct(&c, PER_SLAB, &[]);
        let (keep, x) = (vec![s0[0], s0[1]], s0[5]);
        // Whole slabs, so that the thread's list is empty before the frees below.
        let filler = alloc_distinct(&c, 32 * PER_SLAB, &s0);
        assert_eq!(c.stats().cached_objects, 0);
        let r = nolock::debug::reports();
        // The rest of slab 0 and 512 fillers, then x: the 513th free flushes the newest 257 (x among them).
        for &a in &s0[2..] {
            if a != x {
                free(&c, a);
            }
        }
        for &a in &filler[..512 - (PER_SLAB - 3)] {
            free(&c, a);
        }
        free(&c, x);
        assert_eq!(c.stats().flushes, 1);
        // x is free on its slab's list now; free it again, then enough fillers to flush it a second time.
        free(&c, x);
        for &a in &filler[512 - (PER_SLAB - 3)..1000] {
            free(&c, a);
        }
        assert_eq!(nolock::debug::reports(), r, "no check has looked at slab 0's list yet");
        // Take every partial slab: one of the refills takes slab 0's looping list.
        let got = alloc_distinct(&c, 3000, &keep);
        assert_eq!(nolock::debug::reports(), r + 1, "the refill found the loop and reported it once");
        assert_eq!(c.stats().bad_frees, 1);
        assert!(got.iter().filter(|&&a| a == x).count() <= 1);
        for a in got.into_iter().chain(filler[1000..].iter().copied()) {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "nothing else was found");
    });
    std::mem::forget(c);
}
