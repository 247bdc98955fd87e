//! The free-list checks that are always on (plain caches, no debug or hardened mode): a double free of an
//! object that is not at the head of the thread's list, and other damage, are caught on the slow paths —
//! flush (also at `trim` and thread exit), refill, the drain of deferred frees, and the release of a slab —
//! reported, and cut out: nothing is handed out twice afterwards, no slab is released under a live object, and
//! no walk loops forever.
//!
//! These tests found that such a double free made the thread's list a loop: a flush pushed the same object
//! onto its slab twice, the slab's count could reach "empty" under a live object (and the slab be released),
//! and a loop on the deferred list made its drain spin forever. The fast paths are unchanged, so a double
//! free that an allocation pops again *before* the next slow path still hands the object out twice: each test
//! here runs a slow path first (see the README's "Debug mode" for what each mode catches).

use std::alloc::Layout;
use std::collections::BTreeSet;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use nolock::hooks::{Point, set_hook};
use nolock::{Gfp, KmemCache};

/// The tests share the process-wide report counter and hook: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|e| e.into_inner());
    nolock::debug::set_quiet(true);
    g
}

/// A plain cache without a double-free key (`without_free_key`, a test hook): a double free not at the head of
/// the list gets past the free, as a write after free into a free object's link word does in any cache, and
/// the slow paths' checks are what stand in its way. (Every other plain cache refuses such a free at once:
/// `bad_input.rs`.)
fn plain(name: &str) -> KmemCache {
    KmemCache::builder(name, Layout::new::<[u64; 8]>()).debug(false).hardened(false).without_free_key().build().unwrap()
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

/// Objects freed, then one freed again while it is deep in the thread's list; `trim` (which flushes the
/// list) finds the loop, reports once, keeps the object once.
#[test]
fn double_free_not_at_head_caught_at_trim() {
    let _s = serial();
    let c = plain("fl-trim");
    on_thread(|| {
        let keep = alloc_distinct(&c, 4, &[]);
        let v = alloc_distinct(&c, 8, &keep);
        for &a in &v {
            free(&c, a);
        }
        let r = nolock::debug::reports();
        let bad = c.stats().bad_frees;
        free(&c, v[3]); // the head is v[7]: not caught on the fast path
        assert_eq!(nolock::debug::reports(), r, "nothing is checked on the fast path");
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "the flush found the loop and reported it once");
        assert_eq!(c.stats().bad_frees, bad + 1);
        let got = alloc_distinct(&c, 300, &keep);
        assert!(got.iter().filter(|&&a| a == v[3]).count() <= 1);
        for a in got.into_iter().chain(keep) {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "nothing else was found");
    });
    // Objects that followed the double-freed one on the list are leaked (counted in use).
    std::mem::forget(c);
}

/// The same, found by the flush that a full list triggers.
#[test]
fn double_free_not_at_head_caught_at_flush() {
    let _s = serial();
    let c = plain("fl-flush");
    on_thread(|| {
        let v = alloc_distinct(&c, 2000, &[]);
        let r = nolock::debug::reports();
        for &a in &v[..100] {
            free(&c, a);
        }
        free(&c, v[50]);
        assert_eq!(nolock::debug::reports(), r);
        for &a in &v[100..] {
            free(&c, a);
        }
        assert_eq!(nolock::debug::reports(), r + 1, "a flush found the loop");
        let got = alloc_distinct(&c, 3000, &[]);
        for a in got {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1);
    });
    std::mem::forget(c);
}

/// An object freed twice with a flush in between reaches its slab twice: the slab's list loops and its count
/// says "empty" while another object is live. The shrink checks an empty-looking slab before releasing it,
/// repairs it and keeps it; the refill that takes the slab's objects finds the loop too.
#[test]
fn double_free_reaching_the_slab_caught_before_release() {
    let _s = serial();
    let c = plain("fl-slab");
    on_thread(|| {
        let keep = alloc_distinct(&c, 1, &[])[0];
        let x = alloc_distinct(&c, 1, &[keep])[0];
        let r = nolock::debug::reports();
        free(&c, x);
        nolock::trim(); // x goes back to the slab, which keeps `keep` in use
        free(&c, x); // x is free in its slab already
        assert_eq!(nolock::debug::reports(), r);
        nolock::trim(); // the flush pushes x onto its slab again, whose count then says "empty"
        assert_eq!(nolock::debug::reports(), r + 1, "the shrink found the loop and kept the slab");
        assert_eq!(c.stats().slabs, 1, "the slab with a live object was not released");
        // SAFETY: `keep` is live: its stamp must still be there.
        assert_eq!(unsafe { (keep as *const u64).read() }, keep as u64);
        let got = alloc_distinct(&c, 200, &[keep]);
        assert!(got.iter().filter(|&&a| a == x).count() <= 1);
        for a in got {
            free(&c, a);
        }
        free(&c, keep);
        nolock::trim();
    });
    std::mem::forget(c);
}

static HOOK_CACHE: AtomicUsize = AtomicUsize::new(0);
static HOOK_OBJ: AtomicUsize = AtomicUsize::new(0);

/// Inside a free (the list is busy), free one object twice more: both frees are deferred.
fn defer_twice(at: Point) {
    if at != Point::FreeFast {
        return;
    }
    let c = HOOK_CACHE.swap(0, Ordering::AcqRel);
    if c == 0 {
        return;
    }
    // SAFETY: set by the test to a cache that outlives this call.
    let c = unsafe { &*(c as *const KmemCache) };
    let x = HOOK_OBJ.load(Ordering::Relaxed);
    free(c, x);
    free(c, x);
}

/// An object freed twice while the thread's list is busy (as by a signal handler) is on the deferred list
/// twice, which makes it loop back on itself; the drain used to spin on it forever. Now it is cut and
/// reported, and the object comes back once.
#[test]
fn double_deferred_free_does_not_hang_the_drain() {
    let _s = serial();
    let c = plain("fl-deferred");
    on_thread(|| {
        let v = alloc_distinct(&c, 3, &[]);
        let r = nolock::debug::reports();
        let deferred = c.stats().deferred_frees;
        HOOK_OBJ.store(v[1], Ordering::Relaxed);
        HOOK_CACHE.store(&c as *const KmemCache as usize, Ordering::Release);
        set_hook(Some(defer_twice));
        free(&c, v[0]); // the hook runs inside this free, with the list busy
        set_hook(None);
        assert_eq!(c.stats().deferred_frees, deferred + 2, "both nested frees were deferred");
        assert_eq!(nolock::debug::reports(), r + 1, "the drain found the loop");
        let got = alloc_distinct(&c, 200, &[v[2]]);
        assert!(got.iter().filter(|&&a| a == v[1]).count() <= 1);
        for a in got {
            free(&c, a);
        }
        free(&c, v[2]);
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1);
    });
    std::mem::forget(c);
}

/// Something wrote into the link word of a free object on the thread's list (a write after free): the pop
/// fast path follows it (the default mode does not check there), but a flush first finds the damage, reports
/// it, and cuts the list before the damaged object instead of following it.
#[test]
fn damaged_link_cut_at_flush() {
    let _s = serial();
    let c = plain("fl-damage");
    on_thread(|| {
        let v = alloc_distinct(&c, 6, &[]);
        for &a in &v {
            free(&c, a);
        }
        let r = nolock::debug::reports();
        // SAFETY: a deliberate write after free into the link word (offset 0) of v[2], which is on the list.
        unsafe { (v[2] as *mut usize).write(0xdead_beef_0000) };
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1, "the flush found the damaged link");
        let got = alloc_distinct(&c, 200, &[]);
        assert!(!got.contains(&v[2]), "the damaged object is not handed out again");
        for a in got {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1);
    });
    std::mem::forget(c);
}
