//! Debug mode (the userspace `slub_debug`): red zones, poison, write-after-free and double-free detection in
//! debug caches, and the run-time switch that routes new kmalloc allocations to the `kmalloc-dbg-*` caches.
//!
//! The switch and the report counter are process-wide, so the tests of this file run one at a time.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use nolock::{FreeErrorKind, Gfp, KmemCache, kfree_nolock, kmalloc_nolock, ksize, try_kfree_nolock};

const POISON: u8 = 0x6b;
const POISON_END: u8 = 0xa5;

struct Serial(#[allow(dead_code)] MutexGuard<'static, ()>);

fn serial() -> Serial {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|e| e.into_inner());
    nolock::debug::set_quiet(true);
    nolock::debug::set_enabled(false);
    Serial(g)
}

impl Drop for Serial {
    fn drop(&mut self) {
        nolock::debug::set_enabled(false);
        nolock::debug::set_quiet(false);
    }
}

fn debug_cache(name: &str, size: usize) -> KmemCache {
    let c = KmemCache::builder(name, Layout::from_size_align(size, 8).unwrap()).debug(true).build().unwrap();
    assert!(c.stats().debug);
    c
}

fn bytes<'a>(p: NonNull<u8>, len: usize) -> &'a [u8] {
    // SAFETY: callers pass an object of the arena (mapped for the life of the process) of at least `len` bytes;
    // freed debug objects are only read, to look at their poison.
    unsafe { std::slice::from_raw_parts(p.as_ptr(), len) }
}

fn is_poisoned(p: NonNull<u8>, len: usize) -> bool {
    let s = bytes(p, len);
    s[..len - 1].iter().all(|&b| b == POISON) && s[len - 1] == POISON_END
}

/// Allocate `n` objects from `c` and check that `p` is not among them; free them again.
fn assert_never_handed_out(c: &KmemCache, p: NonNull<u8>, n: usize) {
    let v: Vec<_> = (0..n).map(|_| c.alloc_nolock(Gfp::NONE).unwrap()).collect();
    assert!(!v.contains(&p), "{p:?} was handed out again");
    for q in v {
        // SAFETY: our objects, freed once.
        assert_eq!(unsafe { c.try_free_nolock(q) }, Ok(()));
    }
}

#[test]
fn red_zone_overflow_and_underflow() {
    let _s = serial();
    let c = debug_cache("dbg-redzone", 64);
    let per_slab = c.stats().objects_per_slab;
    for (off, expect) in [(64isize, 64isize), (70, 70), (-1, -1), (-16, -16)] {
        let p = c.alloc_nolock(Gfp::ZERO).unwrap();
        assert_eq!(ksize(p.as_ptr()), 64);
        let st = c.stats();
        // SAFETY: a deliberate overflow/underflow into the object's red zone, which is part of its slot.
        unsafe { p.as_ptr().offset(off).write(0) };
        // SAFETY: the free must be refused.
        let e = unsafe { c.try_free_nolock(p) }.unwrap_err();
        assert_eq!(e.kind, FreeErrorKind::RedZone { offset: expect }, "write at {off}");
        assert_eq!(e.ptr, p.as_ptr() as usize);
        let s = e.to_string();
        assert!(s.contains(&format!("{:#x}", e.ptr)) && s.contains("'dbg-redzone'") && s.contains("red zone"), "{s}");
        let after = c.stats();
        assert_eq!(after.bad_frees, st.bad_frees + 1);
        assert_eq!(after.frees, st.frees, "nothing was freed");
        // The reporting variant and kfree refuse it too.
        let r = nolock::debug::reports();
        // SAFETY: as above.
        unsafe { c.free_nolock(p) };
        // SAFETY: as above.
        unsafe { kfree_nolock(p.as_ptr()) };
        assert_eq!(nolock::debug::reports(), r + 2);
        // The object stays out of circulation.
        assert_never_handed_out(&c, p, 2 * per_slab);
    }
}

#[test]
fn write_after_free_is_detected_at_reallocation() {
    let _s = serial();
    let c = debug_cache("dbg-uaf", 100);
    let p = c.alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: our object.
    unsafe { p.as_ptr().write_bytes(0x11, 100) };
    // SAFETY: freed once.
    assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
    let before = c.stats().debug_errors;
    let r = nolock::debug::reports();
    // SAFETY: a deliberate write after free into a freed debug object (arena memory stays mapped).
    unsafe { p.as_ptr().add(10).write(0x42) };
    let mut got = Vec::new();
    let per_slab = c.stats().objects_per_slab;
    for _ in 0..4 * per_slab {
        let q = c.alloc_nolock(Gfp::NONE).unwrap();
        got.push(q);
        if q == p {
            break;
        }
    }
    assert_eq!(got.last(), Some(&p), "the slot came back within {} allocations", 4 * per_slab);
    let st = c.stats();
    assert_eq!(st.debug_errors, before + 1, "write after free reported once");
    assert_eq!(nolock::debug::reports(), r + 1);
    for q in got {
        // SAFETY: our objects, freed once.
        assert_eq!(unsafe { c.try_free_nolock(q) }, Ok(()));
    }
    // A clean free/alloc cycle reports nothing.
    let q = c.alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: ours.
    assert_eq!(unsafe { c.try_free_nolock(q) }, Ok(()));
    let q2 = c.alloc_nolock(Gfp::NONE).unwrap();
    assert_eq!(c.stats().debug_errors, before + 1);
    // SAFETY: ours.
    assert_eq!(unsafe { c.try_free_nolock(q2) }, Ok(()));
}

#[test]
fn poison_after_free_and_zero_on_alloc() {
    let _s = serial();
    for size in [1usize, 8, 24, 64, 100, 1000, 4096, 5000] {
        let c = debug_cache("dbg-poison", size);
        // The usable size (rounded up to 8) is what is poisoned.
        let size = c.object_size();
        let p = c.alloc_nolock(Gfp::ZERO).unwrap();
        assert_eq!(ksize(p.as_ptr()), size);
        assert!(bytes(p, size).iter().all(|&b| b == 0), "ZERO honoured in a debug cache");
        // SAFETY: our object.
        unsafe { p.as_ptr().write_bytes(0x3c, size) };
        // SAFETY: freed once.
        assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
        assert!(is_poisoned(p, size), "size {size}: freed object poisoned: {:x?}", &bytes(p, size)[..8]);
        // Reallocated objects are not poisoned any more once written, and fresh ones come poisoned.
        let q = c.alloc_nolock(Gfp::NONE).unwrap();
        assert!(is_poisoned(q, size), "an untouched free object is handed out with its poison");
        // SAFETY: ours.
        assert_eq!(unsafe { c.try_free_nolock(q) }, Ok(()));
        assert_eq!(c.stats().debug_errors, 0);
        assert_eq!(c.destroy().live_objects, 0);
    }
}

#[test]
fn double_free_sequential_and_racing() {
    let _s = serial();
    let c = debug_cache("dbg-double", 48);
    let p = c.alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: first free.
    assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
    // SAFETY: deliberate double free.
    let e = unsafe { c.try_free_nolock(p) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::DoubleFree);
    assert!(is_poisoned(p, 48), "the refused free did not touch the free object");

    // Two threads race to free the same object: exactly one wins, the other is refused.
    let rounds = 300;
    let results = race_frees(&c, rounds);
    for (i, (a, b)) in results.iter().enumerate() {
        assert!(a.is_ok() != b.is_ok(), "round {i}: exactly one free wins: {a:?} {b:?}");
    }
    let st = c.stats();
    assert_eq!(st.bad_frees, 1 + rounds as u64);
    assert_eq!(st.allocs, st.frees, "every object freed exactly once");
    assert_eq!(st.debug_errors, 0);
    // Every object comes back at most once.
    let v: Vec<_> = (0..rounds + 10).map(|_| c.alloc_nolock(Gfp::NONE).unwrap()).collect();
    let mut sorted = v.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), v.len(), "no object handed out twice");
    for q in v {
        // SAFETY: ours, freed once.
        assert_eq!(unsafe { c.try_free_nolock(q) }, Ok(()));
    }
}

/// `rounds` times: allocate one object of `c`, then two threads free it at the same moment. Returns both
/// threads' results per round.
fn race_frees(c: &KmemCache, rounds: usize) -> Vec<(Result<(), FreeErrorKind>, Result<(), FreeErrorKind>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A spinning handshake (not a Barrier) so that both frees really start together.
    let (slot, step) = (&AtomicUsize::new(0), &AtomicUsize::new(0));
    let r: Vec<Vec<Result<(), FreeErrorKind>>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(rounds);
                    // Spin briefly, then yield: on an oversubscribed machine the other thread may share this
                    // core, and pure spinning would hand over only once per time slice (400k handovers).
                    let wait = |v| {
                        let t0 = std::time::Instant::now();
                        let mut spins = 0u32;
                        while step.load(Ordering::Acquire) != v {
                            if spins < 2000 {
                                spins += 1;
                                std::hint::spin_loop();
                            } else {
                                std::thread::yield_now();
                            }
                            assert!(t0.elapsed().as_secs() < 60, "handshake stuck");
                        }
                    };
                    for i in 0..rounds {
                        if t == 0 {
                            let q = c.alloc_nolock(Gfp::NONE).unwrap();
                            slot.store(q.as_ptr() as usize, Ordering::Relaxed);
                            step.store(2 * i + 1, Ordering::Release);
                        } else {
                            wait(2 * i + 1);
                        }
                        let q = NonNull::new(slot.load(Ordering::Relaxed) as *mut u8).unwrap();
                        // SAFETY: both threads free the same live object; the debug cache must accept one.
                        let r = unsafe { c.try_free_nolock(q) };
                        out.push(r.map_err(|e| e.kind));
                        if t == 0 {
                            wait(2 * i + 2);
                        } else {
                            step.store(2 * i + 2, Ordering::Release);
                        }
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    r[0].iter().copied().zip(r[1].iter().copied()).collect()
}

/// The loser of two racing frees of one debug object should be told "double free". Observed (about 1 round in
/// 5000): it is refused as `RedZone { offset }` instead, because `debug::on_free` checks the red zones with
/// plain reads *before* its state CAS, while the winner, already past its CAS, is refilling them with the free
/// pattern (0xbb instead of 0xcc). Besides the false "red zone overwritten" report, those reads race with the
/// winner's writes.
#[test]
fn racing_double_free_is_reported_as_double_free() {
    let _s = serial();
    let c = debug_cache("dbg-double-race", 16);
    let results = race_frees(&c, 200_000);
    let mut wrong = std::collections::BTreeMap::new();
    for (i, (a, b)) in results.iter().enumerate() {
        assert!(a.is_ok() != b.is_ok(), "round {i}: exactly one free wins: {a:?} {b:?}");
        let loser = a.err().or(b.err()).unwrap();
        if loser != FreeErrorKind::DoubleFree {
            *wrong.entry(format!("{loser:?}")).or_insert(0) += 1;
        }
    }
    assert!(wrong.is_empty(), "losing frees not reported as double free: {wrong:?}");
}

fn cache_counts(name: &str) -> (u64, u64) {
    let s = nolock::stats::snapshot();
    let c = s.cache(name).unwrap_or_else(|| panic!("no cache {name}"));
    (c.allocs, c.frees)
}

#[test]
fn runtime_switch_routes_kmalloc() {
    let _s = serial();
    assert!(!nolock::debug::enabled());
    let plain0 = cache_counts("kmalloc-128");
    let dbg0 = cache_counts("kmalloc-dbg-128");

    // Off: plain caches.
    let a = kmalloc_nolock(120, Gfp::NONE).unwrap();
    assert_eq!(cache_counts("kmalloc-128").0, plain0.0 + 1);
    assert_eq!(cache_counts("kmalloc-dbg-128").0, dbg0.0);

    // On: debug caches, with red zones and poison.
    nolock::debug::set_enabled(true);
    assert!(nolock::debug::enabled());
    let b = kmalloc_nolock(120, Gfp::ZERO).unwrap();
    assert_eq!(ksize(b.as_ptr()), 128);
    assert!(bytes(b, 128).iter().all(|&x| x == 0));
    assert_eq!(cache_counts("kmalloc-dbg-128").0, dbg0.0 + 1);
    assert_eq!(cache_counts("kmalloc-128").0, plain0.0 + 1);
    let over = kmalloc_nolock(64, Gfp::NONE).unwrap();
    // SAFETY: a deliberate one-byte overflow into the red zone of a debug kmalloc object.
    unsafe { over.as_ptr().add(64).write(1) };
    // SAFETY: must be refused.
    let e = unsafe { try_kfree_nolock(over.as_ptr()) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::RedZone { offset: 64 });
    assert_eq!(e.cache.unwrap().as_str(), "kmalloc-dbg-64");
    let dbl = kmalloc_nolock(8, Gfp::NONE).unwrap();
    // SAFETY: first free.
    assert_eq!(unsafe { try_kfree_nolock(dbl.as_ptr()) }, Ok(()));
    // SAFETY: deliberate double free, caught in debug mode.
    assert_eq!(unsafe { try_kfree_nolock(dbl.as_ptr()) }.unwrap_err().kind, FreeErrorKind::DoubleFree);
    // Large allocations are page runs in either mode.
    let big = kmalloc_nolock(40_000, Gfp::NONE).unwrap();

    // Off again: new objects come from the plain caches; the debug object frees to its own cache.
    nolock::debug::set_enabled(false);
    assert!(!nolock::debug::enabled());
    let c = kmalloc_nolock(120, Gfp::NONE).unwrap();
    assert_eq!(cache_counts("kmalloc-128").0, plain0.0 + 2);
    assert_eq!(cache_counts("kmalloc-dbg-128").0, dbg0.0 + 1);
    // SAFETY: b is a live debug object, freed once after the switch.
    assert_eq!(unsafe { try_kfree_nolock(b.as_ptr()) }, Ok(()));
    assert_eq!(cache_counts("kmalloc-dbg-128").1, dbg0.1 + 1);
    assert!(is_poisoned(b, 128), "freed in debug mode: poisoned");

    // On again: the plain objects free to the plain cache.
    nolock::debug::set_enabled(true);
    // SAFETY: a and c are live plain objects, freed once.
    unsafe {
        assert_eq!(try_kfree_nolock(a.as_ptr()), Ok(()));
        assert_eq!(try_kfree_nolock(c.as_ptr()), Ok(()));
        assert_eq!(try_kfree_nolock(big.as_ptr()), Ok(()));
    }
    assert_eq!(cache_counts("kmalloc-128").1, plain0.1 + 2);
    assert_eq!(cache_counts("kmalloc-dbg-128").1, dbg0.1 + 1);
    nolock::debug::set_enabled(false);

    // The debug caches show up in the snapshot with their flag.
    let s = nolock::stats::snapshot();
    assert!(s.cache("kmalloc-dbg-128").unwrap().debug);
    assert!(!s.cache("kmalloc-128").unwrap().debug);
}

/// Many objects, allocated in both modes across threads and freed after the mode flipped, all free correctly.
#[test]
fn switch_while_threads_allocate() {
    let _s = serial();
    let before = nolock::stats::snapshot().total();
    let r0 = nolock::debug::reports();
    let objs: Vec<Vec<usize>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || {
                    let mut v = Vec::new();
                    for i in 0..4000usize {
                        if t == 0 && i % 500 == 0 {
                            nolock::debug::set_enabled(i % 1000 == 0);
                        }
                        let size = 1 + (i * 37 + t) % 3000;
                        let p = kmalloc_nolock(size, Gfp::NONE).unwrap();
                        // SAFETY: a fresh object of `size` bytes.
                        unsafe { p.as_ptr().write_bytes(t as u8 + 1, size) };
                        v.push(p.as_ptr() as usize | (size << 48));
                    }
                    v
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    nolock::debug::set_enabled(false);
    for (t, v) in objs.iter().enumerate() {
        for &x in v {
            let (p, size) = ((x & ((1 << 48) - 1)) as *mut u8, x >> 48);
            // SAFETY: a live object of `size` bytes.
            assert!(unsafe { std::slice::from_raw_parts(p, size) }.iter().all(|&b| b == t as u8 + 1));
            // SAFETY: freed once.
            assert_eq!(unsafe { try_kfree_nolock(p) }, Ok(()));
        }
    }
    let after = nolock::stats::snapshot().total();
    assert_eq!(after.debug_errors, before.debug_errors);
    assert_eq!(after.bad_frees, before.bad_frees);
    assert_eq!(nolock::debug::reports(), r0);
    assert!(after.allocs - before.allocs >= 8000);
}
