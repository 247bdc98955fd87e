//! Hardened caches (`SlabFlags::HARDENED`, the kernel's `SLAB_FREELIST_HARDENED` / mimalloc's secure mode):
//! free-list links are stored encoded with a per-cache secret and the address of the link word, every pop
//! checks that the link it follows decodes to an object of the cache, and a free of an object whose link word
//! decodes to a free-list link (it is free already) is refused.
//!
//! Checked here: a write after free into a free object's link word is reported and not followed (on the
//! thread's list and on a slab's list); a double free not at the head of a list is refused at the free, on
//! this thread's list, on a slab's and on another thread's; link words do not hold plain pointers; and a
//! multi-threaded churn with cross-thread frees reports nothing and never hands an object out twice.

use std::alloc::Layout;
use std::collections::BTreeSet;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use nolock::{FreeErrorKind, Gfp, KmemCache, SlabFlags};

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|e| e.into_inner());
    nolock::debug::set_quiet(true);
    g
}

fn hardened(name: &str) -> KmemCache {
    KmemCache::builder(name, Layout::new::<[u64; 8]>()).debug(false).flags(SlabFlags::HARDENED).build().unwrap()
}

fn addr(p: NonNull<u8>) -> usize {
    p.as_ptr() as usize
}

fn ptr(a: usize) -> NonNull<u8> {
    NonNull::new(a as *mut u8).unwrap()
}

fn free(c: &KmemCache, a: usize) {
    // SAFETY: `a` is a live object of `c`, freed once.
    assert_eq!(unsafe { c.try_free_nolock(ptr(a)) }, Ok(()));
}

fn alloc_distinct(c: &KmemCache, n: usize, not: &[usize]) -> Vec<usize> {
    let got: Vec<usize> = (0..n).map(|_| addr(c.alloc_nolock(Gfp::NONE).expect("memory is available"))).collect();
    let mut all: BTreeSet<usize> = not.iter().copied().collect();
    for &a in &got {
        assert!(all.insert(a), "{a:#x} handed out twice (or a refused object handed out)");
        // SAFETY: a fresh 64-byte object.
        unsafe { (a as *mut u64).write(a as u64) };
    }
    got
}

fn on_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

#[test]
fn links_are_encoded() {
    let _s = serial();
    let c = hardened("hd-encoded");
    on_thread(|| {
        let v = alloc_distinct(&c, 3, &[]);
        free(&c, v[0]);
        free(&c, v[1]);
        // SAFETY: reading the link word of a free object (test only).
        let word = unsafe { (v[1] as *const usize).read() };
        assert_ne!(word, v[0], "the link to v[0] is not stored as a plain pointer");
        assert_ne!(word, 0);
        let again = alloc_distinct(&c, 2, &[v[2]]);
        assert_eq!(again, vec![v[1], v[0]], "the thread's list is still LIFO");
        for a in again.into_iter().chain([v[2]]) {
            free(&c, a);
        }
    });
    assert_eq!(c.destroy().live_objects, 0);
}

/// A write after free into the link word of an object on the thread's list: the pop that would follow it
/// reports it and refills instead; neither the damaged object nor the garbage is ever handed out.
#[test]
fn damaged_link_on_thread_list_not_followed() {
    let _s = serial();
    let c = hardened("hd-thread");
    on_thread(|| {
        let v = alloc_distinct(&c, 6, &[]);
        for &a in &v {
            free(&c, a);
        }
        let r = nolock::debug::reports();
        // SAFETY: a deliberate write after free into v[2]'s link word (offset 0).
        unsafe { (v[2] as *mut usize).write(0x4141_4141_4141_4141) };
        let got = alloc_distinct(&c, 300, &[v[2]]);
        assert_eq!(&got[..3], &[v[5], v[4], v[3]], "the sound part is used");
        assert!(!got.contains(&0x4141_4141_4141_4141));
        assert_eq!(nolock::debug::reports(), r + 1, "reported once");
        assert_eq!(c.stats().debug_errors, 1);
        for a in got {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1);
    });
    std::mem::forget(c);
}

/// The same on a slab's free list: the objects went back to their slab (trim); the refill that takes them
/// checks the chain and cuts it before the damaged object.
#[test]
fn damaged_link_on_slab_list_not_followed() {
    let _s = serial();
    let c = hardened("hd-slab");
    on_thread(|| {
        let keep = alloc_distinct(&c, 1, &[]);
        let v = alloc_distinct(&c, 8, &keep);
        for &a in &v {
            free(&c, a);
        }
        nolock::trim();
        let r = nolock::debug::reports();
        // SAFETY: a deliberate write after free into v[4]'s link word; it is free on its slab's list.
        unsafe { (v[4] as *mut usize).write(12345) };
        let got = alloc_distinct(&c, 300, &[keep[0], v[4]]);
        assert_eq!(nolock::debug::reports(), r + 1, "reported once");
        for a in got.into_iter().chain(keep) {
            free(&c, a);
        }
        nolock::trim();
        assert_eq!(nolock::debug::reports(), r + 1);
    });
    std::mem::forget(c);
}

/// A double free not at the head of the thread's list, of an object on its slab's list, and of an object on
/// another thread's list: each is refused at the free, and nothing is handed out twice.
#[test]
fn double_free_refused_at_free() {
    let _s = serial();
    let c = hardened("hd-double");
    let r = nolock::debug::reports();
    on_thread(|| {
        // `keep` keeps the slab from being released by the trim below.
        let keep = alloc_distinct(&c, 1, &[]);
        let v = alloc_distinct(&c, 8, &keep);
        for &a in &v {
            free(&c, a);
        }
        // SAFETY: deliberate double frees; the hardened cache refuses them.
        let e = unsafe { c.try_free_nolock(ptr(v[3])) }.unwrap_err();
        assert_eq!(e.kind, FreeErrorKind::DoubleFree);
        assert_eq!(e.ptr, v[3]);
        // SAFETY: as above; the reporting variant reports it.
        unsafe { c.free_nolock(ptr(v[0])) };
        assert_eq!(nolock::debug::reports(), r + 1);
        nolock::trim();
        // SAFETY: v[5] is now free on its slab's list: refused too.
        assert_eq!(unsafe { c.try_free_nolock(ptr(v[5])) }.unwrap_err().kind, FreeErrorKind::DoubleFree);
        let got = alloc_distinct(&c, 200, &keep);
        for a in got.into_iter().chain(keep) {
            free(&c, a);
        }
    });
    // Another thread's list: thread A frees its objects and stays alive while thread B frees them again.
    let freed = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (c, freed, done) = (&c, &freed, &done);
        let a = s.spawn(move || {
            let v = alloc_distinct(c, 4, &[]);
            for &x in &v {
                free(c, x);
            }
            *freed.lock().unwrap() = v;
            while !done.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
        });
        let v = loop {
            let v = freed.lock().unwrap().clone();
            if !v.is_empty() {
                break v;
            }
            std::thread::yield_now();
        };
        let b = s.spawn(move || {
            v.iter()
                // SAFETY: deliberate double frees of objects on thread A's list.
                .map(|&x| unsafe { c.try_free_nolock(ptr(x)) }.map_err(|e| e.kind))
                .collect::<Vec<_>>()
        });
        let results = b.join().unwrap();
        done.store(true, Ordering::Release);
        a.join().unwrap();
        assert!(results.iter().all(|r| *r == Err(FreeErrorKind::DoubleFree)), "{results:?}");
    });
    assert_eq!(nolock::debug::reports(), r + 1, "only the reporting variant printed");
    assert_eq!(c.destroy().live_objects, 0, "no refused free was counted as a free");
}

/// Several threads allocate, stamp, hand objects to each other and free them: nothing is reported, no object
/// is handed out twice (the stamps stay intact while an object is live).
#[test]
fn churn_across_threads() {
    let _s = serial();
    let c = hardened("hd-churn");
    let r = nolock::debug::reports();
    let slots: Vec<std::sync::atomic::AtomicUsize> = (0..256).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect();
    std::thread::scope(|s| {
        for t in 0..4usize {
            let (c, slots) = (&c, &slots);
            s.spawn(move || {
                let mut x = t as u64 * 0x9e37_79b9 + 1;
                for _ in 0..200_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let i = (x as usize) % slots.len();
                    let p = addr(c.alloc_nolock(Gfp::NONE).unwrap());
                    // SAFETY: a fresh 64-byte object.
                    unsafe { (p as *mut u64).write(p as u64) };
                    let old = slots[i].swap(p, Ordering::AcqRel);
                    if old != 0 {
                        // SAFETY: `old` was live and stamped by whoever put it in the slot.
                        assert_eq!(unsafe { (old as *const u64).read() }, old as u64, "{old:#x} reused while live");
                        free(c, old);
                    }
                }
            });
        }
    });
    for s in &slots {
        let p = s.swap(0, Ordering::AcqRel);
        if p != 0 {
            free(&c, p);
        }
    }
    assert_eq!(nolock::debug::reports(), r);
    assert_eq!(c.stats().bad_frees, 0);
    assert_eq!(c.destroy().live_objects, 0);
}
