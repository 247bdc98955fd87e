//! Bad input: every kind of invalid free and impossible allocation gets a clear error (or `None`) and corrupts
//! nothing.
//!
//! Each test provokes one bad input through the `try_*` free functions, checks the error kind, that its
//! `Display` names the pointer (and the cache, where one is involved), that the cache's `bad_frees` counter
//! moved, and then that the allocator still works: new allocations succeed, are distinct from every live object,
//! and live objects keep their contents. The non-`try` variants are checked to report (counted by
//! `nolock::debug::reports()`) instead of freeing.
//!
//! The tests share process-wide state (the report counter, the quiet switch), so they run one at a time.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

use nolock::{
    CacheError, FreeError, FreeErrorKind, Gfp, KmemCache, MAX_ORDER, NBox, PagesError, ZERO_SIZE_LIMIT, ZERO_SIZE_PTR,
    alloc_pages_nolock, free_pages_nolock, kfree_nolock, kmalloc_layout_nolock, kmalloc_nolock, ksize,
    try_free_pages_nolock, try_kfree_nolock,
};

/// Serializes the tests of this file and keeps provoked reports off standard error while one runs.
struct Serial(#[allow(dead_code)] MutexGuard<'static, ()>);

fn serial() -> Serial {
    static M: Mutex<()> = Mutex::new(());
    let g = M.lock().unwrap_or_else(|e| e.into_inner());
    nolock::debug::set_quiet(true);
    Serial(g)
}

impl Drop for Serial {
    fn drop(&mut self) {
        nolock::debug::set_quiet(false);
    }
}

fn reports() -> u64 {
    nolock::debug::reports()
}

fn bad_frees(cache: &str) -> u64 {
    nolock::stats::snapshot().cache(cache).unwrap_or_else(|| panic!("no cache {cache}")).bad_frees
}

/// The error's `Display` names the pointer, and the cache if given.
fn assert_display(e: &FreeError, cache: Option<&str>) {
    let s = e.to_string();
    assert!(s.contains(&format!("{:#x}", e.ptr)), "{s:?} does not name the pointer {:#x}", e.ptr);
    assert_eq!(e.cache.map(|c| c.as_str().to_string()).as_deref(), cache, "{e:?}");
    if let Some(c) = cache {
        assert!(s.contains(&format!("'{c}'")), "{s:?} does not name cache {c}");
    }
}

/// A live object the tests keep across a bad free: address, size and a pattern byte.
struct Held {
    ptr: usize,
    size: usize,
    byte: u8,
}

impl Held {
    fn kmalloc(size: usize, byte: u8) -> Self {
        let p = kmalloc_nolock(size, Gfp::NONE).expect("kmalloc");
        // SAFETY: a fresh object of `size` bytes.
        unsafe { p.as_ptr().write_bytes(byte, size) };
        Self { ptr: p.as_ptr() as usize, size, byte }
    }

    fn intact(&self) -> bool {
        // SAFETY: a live object of `size` bytes owned by the test.
        let s = unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.size) };
        s.iter().all(|&b| b == self.byte)
    }

    fn free(self) {
        assert!(self.intact(), "live object {:#x} was damaged", self.ptr);
        // SAFETY: a live kmalloc object, freed once.
        assert_eq!(unsafe { try_kfree_nolock(self.ptr as *mut u8) }, Ok(()));
    }
}

/// After a bad free: allocations of every kind still succeed, are distinct from each other and from the live
/// objects `live` (address, usable size), and the live objects' contents are intact.
fn assert_healthy(live: &[(usize, usize)]) {
    let mut fresh: Vec<(usize, usize)> = Vec::new();
    for size in [8usize, 64, 100, 1000, 8192, 9000, 70_000] {
        for _ in 0..40 {
            let p = kmalloc_nolock(size, Gfp::ZERO).expect("allocation after a bad free");
            let a = p.as_ptr() as usize;
            let k = ksize(p.as_ptr());
            assert!(k >= size);
            for &(b, bk) in live.iter().chain(&fresh) {
                assert!(a + k <= b || b + bk <= a, "new object {a:#x}+{k} overlaps live {b:#x}+{bk}");
            }
            // SAFETY: a fresh zeroed object of `k` bytes.
            let s = unsafe { std::slice::from_raw_parts_mut(p.as_ptr(), k) };
            assert!(s.iter().all(|&x| x == 0));
            s.fill(0x77);
            fresh.push((a, k));
        }
    }
    for (a, _) in fresh {
        // SAFETY: objects allocated above, freed once.
        assert_eq!(unsafe { try_kfree_nolock(a as *mut u8) }, Ok(()));
    }
}

fn cache(name: &str, debug: bool) -> KmemCache {
    KmemCache::builder(name, Layout::new::<[u64; 8]>()).debug(debug).build().unwrap()
}

// -------------------------------------------------------------------------------------------------------------
// Foreign pointers
// -------------------------------------------------------------------------------------------------------------

#[test]
fn foreign_stack_pointer() {
    let _s = serial();
    let held = Held::kmalloc(64, 0x11);
    let mut local = [0u8; 64];
    let p = local.as_mut_ptr();
    // SAFETY: a foreign pointer must be refused without touching it.
    let e = unsafe { try_kfree_nolock(p) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::Foreign);
    assert_eq!(e.ptr, p as usize);
    assert_display(&e, None);

    let c = cache("bad-foreign", false);
    let before = c.stats().bad_frees;
    // SAFETY: as above.
    let e = unsafe { c.try_free_nolock(NonNull::new(p).unwrap()) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::Foreign);
    assert_display(&e, Some("bad-foreign"));
    assert_eq!(c.stats().bad_frees, before + 1);

    // The non-try variants report it and free nothing.
    let r = reports();
    // SAFETY: as above.
    unsafe { kfree_nolock(p) };
    assert_eq!(reports(), r + 1);
    // SAFETY: as above.
    unsafe { c.free_nolock(NonNull::new(p).unwrap()) };
    assert_eq!(reports(), r + 2);
    assert_eq!(c.stats().bad_frees, before + 2);
    assert!(local.iter().all(|&b| b == 0), "the foreign memory was not written");
    assert_healthy(&[(held.ptr, 64)]);
    held.free();
}

#[test]
fn foreign_system_box() {
    let _s = serial();
    let held = Held::kmalloc(200, 0x22);
    let b = Box::new([5u8; 100]);
    let p = Box::into_raw(b) as *mut u8;
    // SAFETY: a pointer from the system allocator must be refused without touching it.
    let e = unsafe { try_kfree_nolock(p) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::Foreign);
    assert_display(&e, None);
    let r = reports();
    // SAFETY: as above.
    unsafe { kfree_nolock(p) };
    assert_eq!(reports(), r + 1);
    // SAFETY: the Box was refused by nolock, so it is still ours to give back to the system allocator.
    let b = unsafe { Box::from_raw(p as *mut [u8; 100]) };
    assert!(b.iter().all(|&x| x == 5));
    drop(b);
    // ksize of a foreign pointer is 0.
    let local = 0u64;
    assert_eq!(ksize(&local as *const u64 as *const u8), 0);
    assert_healthy(&[(held.ptr, 256)]);
    held.free();
}

// -------------------------------------------------------------------------------------------------------------
// Interior pointers
// -------------------------------------------------------------------------------------------------------------

#[test]
fn interior_pointer_kmalloc() {
    let _s = serial();
    let held = Held::kmalloc(64, 0x33);
    let before = bad_frees("kmalloc-64");
    let inner = (held.ptr + 8) as *mut u8;
    assert_eq!(ksize(inner), 0, "ksize of an interior pointer");
    // SAFETY: an interior pointer must be refused.
    let e = unsafe { try_kfree_nolock(inner) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::InteriorPointer { object: held.ptr, offset: 8 });
    assert_eq!(e.ptr, inner as usize);
    assert_display(&e, Some("kmalloc-64"));
    assert!(e.to_string().contains(&format!("{:#x}", held.ptr)), "names the object: {e}");
    assert_eq!(bad_frees("kmalloc-64"), before + 1);
    let r = reports();
    // SAFETY: as above.
    unsafe { kfree_nolock(inner) };
    assert_eq!(reports(), r + 1);
    assert_eq!(bad_frees("kmalloc-64"), before + 2);
    assert!(held.intact());
    assert_eq!(ksize(held.ptr as *const u8), 64, "the object is still allocated");
    assert_healthy(&[(held.ptr, 64)]);
    held.free();
}

#[test]
fn interior_pointer_cache_and_large() {
    let _s = serial();
    let c = cache("bad-interior", false);
    let p = c.alloc_nolock(Gfp::ZERO).unwrap();
    let inner = NonNull::new(p.as_ptr().wrapping_add(24)).unwrap();
    // SAFETY: an interior pointer must be refused.
    let e = unsafe { c.try_free_nolock(inner) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::InteriorPointer { object: p.as_ptr() as usize, offset: 24 });
    assert_display(&e, Some("bad-interior"));
    assert_eq!(c.stats().bad_frees, 1);

    // A large (page-run) kmalloc object: inside its first page it is an interior pointer; on a later page the
    // descriptor is free, so it is "not allocated".
    let big = Held::kmalloc(40_000, 0x44);
    // SAFETY: interior pointers must be refused.
    let e = unsafe { try_kfree_nolock((big.ptr + 8) as *mut u8) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::InteriorPointer { object: big.ptr, offset: 8 });
    assert_display(&e, None);
    // SAFETY: as above.
    let e = unsafe { try_kfree_nolock((big.ptr + 4096) as *mut u8) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::NotAllocated);
    assert_display(&e, None);
    assert!(big.intact());
    assert_healthy(&[(big.ptr, 40_960), (p.as_ptr() as usize, 64)]);
    big.free();
    // SAFETY: our object, freed once.
    assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
    assert_eq!(c.destroy().live_objects, 0);
}

// -------------------------------------------------------------------------------------------------------------
// Double frees
// -------------------------------------------------------------------------------------------------------------

#[test]
fn double_free_debug_cache() {
    let _s = serial();
    let c = cache("bad-double-dbg", true);
    let keep = c.alloc_nolock(Gfp::NONE).unwrap();
    let p = c.alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: first free of a live object.
    assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
    // SAFETY: a deliberate double free; the debug cache must refuse it.
    let e = unsafe { c.try_free_nolock(p) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::DoubleFree);
    assert_eq!(e.ptr, p.as_ptr() as usize);
    assert_display(&e, Some("bad-double-dbg"));
    assert!(e.to_string().contains("double free"));
    assert_eq!(c.stats().bad_frees, 1);
    // Through kfree too (the cache is found from the address), and the reporting variant.
    // SAFETY: as above.
    let e = unsafe { try_kfree_nolock(p.as_ptr()) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::DoubleFree);
    let r = reports();
    // SAFETY: as above.
    unsafe { c.free_nolock(p) };
    assert_eq!(reports(), r + 1);
    assert_eq!(c.stats().bad_frees, 3);
    assert_eq!(c.stats().frees, 1, "only the first free counted");
    // The object comes back exactly once.
    let a = c.alloc_nolock(Gfp::NONE).unwrap();
    let b = c.alloc_nolock(Gfp::NONE).unwrap();
    assert_ne!(a, b);
    assert_ne!(a, keep);
    assert_ne!(b, keep);
    for x in [keep, a, b] {
        // SAFETY: our live objects, freed once.
        assert_eq!(unsafe { c.try_free_nolock(x) }, Ok(()));
    }
    assert_eq!(c.destroy().live_objects, 0);
}

#[test]
fn double_free_large_kmalloc() {
    let _s = serial();
    let p = kmalloc_nolock(50_000, Gfp::NONE).unwrap();
    // SAFETY: first free of a live object.
    assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    // SAFETY: a deliberate double free of a page run (nothing reused it meanwhile: the tests are serialized).
    let e = unsafe { try_kfree_nolock(p.as_ptr()) }.unwrap_err();
    assert!(matches!(e.kind, FreeErrorKind::NotAllocated | FreeErrorKind::DoubleFree), "{e:?}");
    assert_display(&e, None);
    assert_healthy(&[]);
}

/// A double free of a plain kmalloc object that is no longer at the head of the thread's list — `free(a);
/// free(b); free(a)` — is refused, in every size class (by the free key in the object, and for the 8-byte
/// class by its slabs' free map), on the fast path (`kfree_nolock` reports it) and through
/// `try_kfree_nolock`; nothing is handed out twice afterwards. Before the key, the third free was accepted and
/// the next allocations returned `a`, `b`, `a`; before the map, the 8-byte class found the loop only on a slow
/// path, reported it, and leaked the objects behind it.
#[test]
fn double_free_not_at_the_head_kmalloc() {
    let _s = serial();
    for size in [1usize, 8, 16, 24, 64, 100, 640, 4096, 20_000] {
        let a = kmalloc_nolock(size, Gfp::NONE).unwrap().as_ptr();
        let b = kmalloc_nolock(size, Gfp::NONE).unwrap().as_ptr();
        let r0 = reports();
        // SAFETY: first frees of live objects, then a deliberate double free of `a` through the fast path.
        unsafe {
            kfree_nolock(a);
            kfree_nolock(b);
            kfree_nolock(a);
        }
        assert_eq!(reports(), r0 + 1, "size {size}: the double free of a is reported");
        // SAFETY: and once more through the reporting-free variant.
        let e = unsafe { try_kfree_nolock(a) }.unwrap_err();
        assert_eq!(e.kind, FreeErrorKind::DoubleFree, "size {size}: {e:?}");
        let class = nolock::stats::snapshot().caches.iter().find(|c| c.object_size >= size).map(|c| c.name);
        assert_display(&e, class.as_ref().map(|n| n.as_str()));
        let got: Vec<usize> = (0..4).map(|_| kmalloc_nolock(size, Gfp::NONE).unwrap().as_ptr() as usize).collect();
        let mut uniq = got.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), got.len(), "size {size}: an object handed out twice: {got:x?}");
        for p in got {
            // SAFETY: live objects, freed once.
            assert_eq!(unsafe { try_kfree_nolock(p as *mut u8) }, Ok(()));
        }
    }
    assert_healthy(&[]);
}

/// The first free happened on another thread (the object sits on that thread's list, or went back to its slab
/// when that thread exited): the second free, here, is still refused.
#[test]
fn double_free_across_threads_kmalloc() {
    let _s = serial();
    let a = kmalloc_nolock(64, Gfp::NONE).unwrap().as_ptr() as usize;
    let b = kmalloc_nolock(64, Gfp::NONE).unwrap().as_ptr() as usize;
    // SAFETY: first frees of live objects, on another thread.
    std::thread::spawn(move || unsafe {
        kfree_nolock(a as *mut u8);
        kfree_nolock(b as *mut u8);
    })
    .join()
    .unwrap();
    // SAFETY: a deliberate double free.
    let e = unsafe { try_kfree_nolock(a as *mut u8) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::DoubleFree, "{e:?}");
    assert_healthy(&[]);
}

/// A plain (non-debug) cache keeps no per-object state, so a double free is not refused at free time: the
/// object goes onto the thread's list twice. What must not happen is that the same object is then handed to
/// two live owners at once. Observed: the second free is accepted (`Ok`), the thread's free list gets a
/// self-loop, and the next two allocations both return the doubly freed object.
#[test]
fn double_free_plain_cache_never_two_owners() {
    let _s = serial();
    let cache = cache("bad-double-plain", false);
    let c = &cache;
    // In a thread of its own, so that whatever the double free did to the thread's list goes away with it.
    let r = std::thread::scope(|s| {
        s.spawn(move || {
            let keep = c.alloc_nolock(Gfp::NONE).unwrap();
            let p = c.alloc_nolock(Gfp::NONE).unwrap();
            // SAFETY: first free of a live object.
            assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
            // SAFETY: a deliberate double free.
            let second = unsafe { c.try_free_nolock(p) };
            let a = c.alloc_nolock(Gfp::NONE).unwrap();
            let b = c.alloc_nolock(Gfp::NONE).unwrap();
            let addr = |x: NonNull<u8>| x.as_ptr() as usize;
            (second, addr(keep), addr(a), addr(b))
        })
        .join()
    });
    let (second, keep, a, b) = r.unwrap();
    assert!(
        second.is_err() || (a != b && a != keep && b != keep),
        "double free accepted ({second:?}) and then {a:#x} handed out twice (a = {a:#x}, b = {b:#x})"
    );
    // The cache's accounting is off after an accepted double free; leave it alone rather than destroy it.
    std::mem::forget(cache);
}

/// `free(a); free(b); free(a)` on `cache`: the third free is refused — on the fast path (`free_nolock` reports
/// it) and through `try_free_nolock` — wherever the first free put the object, nothing is handed out twice
/// afterwards, and the cache's destroy finds every object back.
fn double_free_not_at_the_head_is_refused(cache: KmemCache, what: &str) {
    let a = cache.alloc_nolock(Gfp::NONE).unwrap();
    let b = cache.alloc_nolock(Gfp::NONE).unwrap();
    let r0 = reports();
    // SAFETY: first frees of live objects, then a deliberate double free of `a` through the fast path.
    unsafe {
        cache.free_nolock(a);
        cache.free_nolock(b);
        cache.free_nolock(a);
    }
    assert_eq!(reports(), r0 + 1, "{what}: the double free of a is reported");
    // SAFETY: and once more through the reporting-free variant.
    let e = unsafe { cache.try_free_nolock(a) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::DoubleFree, "{what}: {e:?}");
    assert_display(&e, Some(cache.name().as_str()));
    let got: Vec<NonNull<u8>> = (0..4).map(|_| cache.alloc_nolock(Gfp::NONE).unwrap()).collect();
    let mut uniq: Vec<usize> = got.iter().map(|p| p.as_ptr() as usize).collect();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), got.len(), "{what}: an object handed out twice: {got:x?}");
    for p in got {
        // SAFETY: live objects, freed once.
        assert_eq!(unsafe { cache.try_free_nolock(p) }, Ok(()), "{what}");
    }
    assert_eq!(cache.stats().bad_frees, 2, "{what}: both refusals counted");
    let report = cache.destroy();
    assert_eq!(report.live_objects, 0, "{what}: every object came back: {report:?}");
}

/// `free(a); free(b); free(a)` on a plain `KmemCache` (no constructor, not type-safe, link word at offset 0):
/// such a cache carries the free key like the kmalloc classes. Several object sizes, the smallest one that has
/// room for the key. Before the key covered these caches, the next allocations returned `a`, `b`, `a`.
#[test]
fn double_free_not_at_the_head_plain_cache() {
    let _s = serial();
    for size in [16usize, 24, 64, 200, 1000] {
        let cache = KmemCache::new("bad-double-nothead", Layout::from_size_align(size, 8).unwrap()).unwrap();
        double_free_not_at_the_head_is_refused(cache, &format!("size {size}"));
    }
}

/// The same for the caches whose free objects keep meaning — a constructor's, a type-safe one, one with the
/// link word moved by `freeptr_offset`, and the 8-byte objects that have no room for a key — which carry the
/// key in the slab's free map instead. Before the map, the next allocations of the first three returned `a`,
/// `b`, `a`, `b`, silently.
#[test]
fn double_free_not_at_the_head_caches_that_keep_freed_contents() {
    let _s = serial();
    fn ctor(p: NonNull<u8>) {
        // SAFETY: the constructor gets a whole object of the cache (at least 8 bytes).
        unsafe { p.as_ptr().cast::<u64>().write(0xc7) };
    }
    for size in [8usize, 24, 64, 200, 1000, 4096] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        let name = "bad-double-kept";
        let with_ctor = KmemCache::builder(name, layout).ctor(ctor).build().unwrap();
        double_free_not_at_the_head_is_refused(with_ctor, &format!("constructor, size {size}"));
        let typesafe = KmemCache::builder(name, layout).flags(nolock::SlabFlags::TYPESAFE_BY_RCU).build().unwrap();
        double_free_not_at_the_head_is_refused(typesafe, &format!("type-safe, size {size}"));
        if size >= 16 {
            let moved = KmemCache::builder(name, layout).freeptr_offset(8).build().unwrap();
            double_free_not_at_the_head_is_refused(moved, &format!("moved link, size {size}"));
        }
        let small = KmemCache::new(name, Layout::new::<u64>()).unwrap();
        double_free_not_at_the_head_is_refused(small, "8-byte objects");
    }
}

/// The free key lives in a free object's second word, so caches that keep meaning in freed objects do not
/// carry it there: a constructor's state must survive free and reuse, a type-safe cache's readers probe freed
/// objects, and a link word moved with `freeptr_offset` says the same. Their key is in the slab's free map, and
/// their objects' second word is left alone by a free.
#[test]
fn free_key_spares_caches_that_keep_freed_contents() {
    let _s = serial();
    let word1 = |p: NonNull<u8>| {
        // SAFETY: an object of at least 16 bytes, freed (still arena memory, never unmapped); a plain read.
        unsafe { (p.as_ptr() as *const u64).add(1).read_volatile() }
    };
    fn ctor(p: NonNull<u8>) {
        // SAFETY: the constructor gets a whole object of the cache (32 bytes).
        unsafe { (p.as_ptr() as *mut u64).add(1).write(0xc7) };
    }
    let layout = Layout::new::<[u64; 4]>();
    let with_ctor = KmemCache::builder("bad-key-ctor", layout).ctor(ctor).build().unwrap();
    let moved = KmemCache::builder("bad-key-moved", layout).freeptr_offset(16).build().unwrap();
    let typesafe =
        KmemCache::builder("bad-key-typesafe", layout).flags(nolock::SlabFlags::TYPESAFE_BY_RCU).build().unwrap();
    for (c, expect) in [(&with_ctor, 0xc7u64), (&moved, 0x1234), (&typesafe, 0x1234)] {
        let p = c.alloc_nolock(Gfp::NONE).unwrap();
        if expect == 0x1234 {
            // SAFETY: a live object of 32 bytes.
            unsafe { (p.as_ptr() as *mut u64).add(1).write(0x1234) };
        }
        // SAFETY: a live object, freed once.
        unsafe { c.free_nolock(p) };
        assert_eq!(word1(p), expect, "cache {}: the second word kept across the free", c.name());
    }
}

// -------------------------------------------------------------------------------------------------------------
// Wrong cache
// -------------------------------------------------------------------------------------------------------------

#[test]
fn wrong_cache() {
    let _s = serial();
    let a = cache("bad-owner-a", false);
    let b = KmemCache::new("bad-other-b", Layout::new::<[u64; 8]>()).unwrap();
    let p = a.alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: p is live; writing our pattern.
    unsafe { p.as_ptr().write_bytes(0x5c, 64) };
    // SAFETY: an object of another cache must be refused.
    let e = unsafe { b.try_free_nolock(p) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::WrongCache { owner: a.name() });
    assert_display(&e, Some("bad-other-b"));
    assert!(e.to_string().contains("'bad-owner-a'"), "names the owner: {e}");
    assert_eq!(b.stats().bad_frees, 1);
    assert_eq!(a.stats().bad_frees, 0);
    let r = reports();
    // SAFETY: as above.
    unsafe { b.free_nolock(p) };
    assert_eq!(reports(), r + 1);

    // A kmalloc object given to a KmemCache.
    let k = Held::kmalloc(64, 0x66);
    // SAFETY: as above.
    let e = unsafe { b.try_free_nolock(NonNull::new(k.ptr as *mut u8).unwrap()) }.unwrap_err();
    match e.kind {
        FreeErrorKind::WrongCache { owner } => assert_eq!(owner.as_str(), "kmalloc-64"),
        other => panic!("expected WrongCache, got {other:?}"),
    }
    // An alloc_pages_nolock run given to a KmemCache.
    let pg = alloc_pages_nolock(0, Gfp::NONE).unwrap();
    // SAFETY: as above.
    let e = unsafe { b.try_free_nolock(pg) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::NotAllocated);
    assert_display(&e, Some("bad-other-b"));

    // SAFETY: p is still live and intact in its own cache.
    assert!(unsafe { std::slice::from_raw_parts(p.as_ptr(), 64) }.iter().all(|&x| x == 0x5c));
    assert_healthy(&[(p.as_ptr() as usize, 64), (k.ptr, 64), (pg.as_ptr() as usize, 4096)]);
    // SAFETY: each freed once to its owner.
    unsafe {
        assert_eq!(a.try_free_nolock(p), Ok(()));
        assert_eq!(try_free_pages_nolock(pg, 0), Ok(()));
    }
    k.free();
    assert_eq!(a.destroy().live_objects, 0);
    assert_eq!(b.destroy().live_objects, 0);
}

// -------------------------------------------------------------------------------------------------------------
// Page runs
// -------------------------------------------------------------------------------------------------------------

#[test]
fn pages_run_given_to_kfree() {
    let _s = serial();
    let pg = alloc_pages_nolock(1, Gfp::ZERO).unwrap();
    // SAFETY: a page run must be refused by kfree.
    let e = unsafe { try_kfree_nolock(pg.as_ptr()) }.unwrap_err();
    assert_eq!(e.kind, FreeErrorKind::PagesRun);
    assert_display(&e, None);
    assert!(e.to_string().contains("free_pages_nolock"), "{e}");
    let r = reports();
    // SAFETY: as above.
    unsafe { kfree_nolock(pg.as_ptr()) };
    assert_eq!(reports(), r + 1);
    assert_eq!(ksize(pg.as_ptr()), 0, "ksize is for kmalloc objects");
    // Still allocated: freeing it properly works.
    // SAFETY: our run, right order, freed once.
    assert_eq!(unsafe { try_free_pages_nolock(pg, 1) }, Ok(()));
    assert_healthy(&[]);
}

#[test]
fn free_pages_wrong_order_and_twice() {
    let _s = serial();
    let pg = alloc_pages_nolock(2, Gfp::NONE).unwrap();
    // SAFETY: the run is ours; stamp it.
    unsafe { pg.as_ptr().write_bytes(0xab, 4 * 4096) };
    for wrong in [0u32, 1, 3, MAX_ORDER, 63, u32::MAX] {
        // SAFETY: wrong orders must be refused without freeing.
        let e = unsafe { try_free_pages_nolock(pg, wrong) }.unwrap_err();
        assert_eq!(e, PagesError::WrongOrder { allocated: 2 }, "order {wrong}");
        assert!(e.to_string().contains('2'));
    }
    let r = reports();
    // SAFETY: as above, through the reporting variant.
    unsafe { free_pages_nolock(pg, 0) };
    assert_eq!(reports(), r + 1);
    // Interior and misaligned pointers.
    for off in [1usize, 4096, 3 * 4096] {
        let q = NonNull::new(pg.as_ptr().wrapping_add(off)).unwrap();
        // SAFETY: must be refused.
        assert_eq!(unsafe { try_free_pages_nolock(q, 2) }, Err(PagesError::NotAllocated), "offset {off}");
    }
    // SAFETY: the run is still ours and intact.
    assert!(unsafe { std::slice::from_raw_parts(pg.as_ptr(), 4 * 4096) }.iter().all(|&b| b == 0xab));
    assert_healthy(&[(pg.as_ptr() as usize, 4 * 4096)]);
    // SAFETY: the right free.
    assert_eq!(unsafe { try_free_pages_nolock(pg, 2) }, Ok(()));
    // SAFETY: a deliberate double free (nothing reused the run: the tests are serialized and this thread
    // allocates nothing in between).
    let e = unsafe { try_free_pages_nolock(pg, 2) }.unwrap_err();
    assert_eq!(e, PagesError::NotAllocated);
    assert!(!e.to_string().is_empty());
    let r = reports();
    // SAFETY: as above.
    unsafe { free_pages_nolock(pg, 2) };
    assert_eq!(reports(), r + 1);
    assert_healthy(&[]);
}

#[test]
fn free_pages_of_other_pointers() {
    let _s = serial();
    let mut local = 0u64;
    let p = NonNull::from(&mut local).cast::<u8>();
    // SAFETY: a foreign pointer must be refused.
    assert_eq!(unsafe { try_free_pages_nolock(p, 0) }, Err(PagesError::Foreign));
    let small = Held::kmalloc(64, 1);
    let large = Held::kmalloc(3 * 4096, 2);
    for h in [&small, &large] {
        // SAFETY: kmalloc objects must be refused by free_pages.
        let r = unsafe { try_free_pages_nolock(NonNull::new(h.ptr as *mut u8).unwrap(), 0) };
        assert_eq!(r, Err(PagesError::NotAllocated));
    }
    assert_healthy(&[(small.ptr, 64), (large.ptr, 3 * 4096)]);
    small.free();
    large.free();
}

// -------------------------------------------------------------------------------------------------------------
// Zero sizes, null, impossible sizes
// -------------------------------------------------------------------------------------------------------------

#[test]
fn zero_size_and_null() {
    let _s = serial();
    let r = reports();
    let p = kmalloc_nolock(0, Gfp::ZERO).unwrap();
    assert_eq!(p.as_ptr(), ZERO_SIZE_PTR);
    assert_eq!(ksize(p.as_ptr()), 0);
    assert_eq!(ksize(std::ptr::null()), 0);
    // SAFETY: ZERO_SIZE_PTR and null are accepted and ignored.
    unsafe {
        assert_eq!(try_kfree_nolock(p.as_ptr()), Ok(()));
        assert_eq!(try_kfree_nolock(std::ptr::null_mut()), Ok(()));
        kfree_nolock(p.as_ptr());
        kfree_nolock(std::ptr::null_mut());
    }
    // Zero-size layouts: an aligned dangling pointer below ZERO_SIZE_LIMIT, and freeing it is harmless.
    for align_log2 in 0..=15 {
        let align = 1usize << align_log2;
        let p = kmalloc_layout_nolock(Layout::from_size_align(0, align).unwrap(), Gfp::NONE).unwrap();
        assert_eq!(p.as_ptr() as usize % align, 0);
        assert!((p.as_ptr() as usize) < ZERO_SIZE_LIMIT);
        assert_eq!(ksize(p.as_ptr()), 0);
        // SAFETY: a zero-size pointer is ignored by kfree.
        assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()), "align {align}");
        // SAFETY: as above.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
    // Too aligned for the zero-size range: a real allocation, freed like any other.
    let p = kmalloc_layout_nolock(Layout::from_size_align(0, ZERO_SIZE_LIMIT).unwrap(), Gfp::NONE).unwrap();
    assert_eq!(p.as_ptr() as usize % ZERO_SIZE_LIMIT, 0);
    // SAFETY: a live allocation, freed once.
    assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    // Zero-sized NBoxes allocate nothing and drop cleanly.
    drop(NBox::try_new(()).unwrap());
    drop(NBox::<[u64]>::try_from_slice(&[]).unwrap());
    assert_eq!(reports(), r, "nothing here is a bad free");
}

#[test]
fn impossible_sizes_return_none() {
    let _s = serial();
    let held = Held::kmalloc(1000, 0x99);
    let arena = nolock::stats::snapshot().pages.arena_pages * 4096;
    assert!(arena > 0);
    let failures = nolock::stats::snapshot().large.failures;
    assert!(kmalloc_nolock(usize::MAX, Gfp::NONE).is_none());
    assert!(kmalloc_nolock(usize::MAX - 4095, Gfp::NONE).is_none());
    assert!(kmalloc_nolock(isize::MAX as usize, Gfp::ZERO).is_none());
    assert!(kmalloc_nolock(arena + 1, Gfp::NONE).is_none(), "larger than the arena");
    assert!(kmalloc_layout_nolock(Layout::from_size_align(arena + 4096, 4096).unwrap(), Gfp::NONE).is_none());
    assert!(
        kmalloc_layout_nolock(Layout::from_size_align(64, (arena * 2).next_power_of_two()).unwrap(), Gfp::NONE)
            .is_none(),
        "aligned beyond the arena"
    );
    assert!(nolock::stats::snapshot().large.failures >= failures + 5);
    assert!(alloc_pages_nolock(MAX_ORDER + 1, Gfp::NONE).is_none());
    assert!(alloc_pages_nolock(u32::MAX, Gfp::NONE).is_none());
    assert!(alloc_pages_nolock(63, Gfp::NONE).is_none());
    assert!(NBox::<[u64]>::try_from_fn(usize::MAX / 4, |i| i as u64).is_none());
    assert!(NBox::<[u8]>::try_zeroed_bytes(usize::MAX).is_none());
    assert!(NBox::<[u8]>::try_zeroed_bytes(arena + 1).is_none());
    // Nothing was reserved by the failures.
    assert!(held.intact());
    assert_healthy(&[(held.ptr, 1024)]);
    held.free();
}

#[test]
fn bad_cache_parameters() {
    let _s = serial();
    let l = |size, align| Layout::from_size_align(size, align).unwrap();
    assert_eq!(KmemCache::new("bad-zero", l(0, 8)).unwrap_err(), CacheError::BadSize);
    assert_eq!(KmemCache::new("bad-huge", l((1 << 20) + 1, 8)).unwrap_err(), CacheError::BadSize);
    assert_eq!(KmemCache::new("bad-align", l(64, 1 << 19)).unwrap_err(), CacheError::BadAlign);
    let b = |off| KmemCache::builder("bad-freeptr", l(40, 8)).freeptr_offset(off).build().map(|c| c.object_size());
    assert_eq!(b(4).unwrap_err(), CacheError::BadFreeptrOffset, "not 8-aligned");
    assert_eq!(b(36).unwrap_err(), CacheError::BadFreeptrOffset, "not 8-aligned");
    assert_eq!(b(40).unwrap_err(), CacheError::BadFreeptrOffset, "no room for the pointer");
    assert_eq!(b(32).unwrap(), 40, "the last word is fine");
    // A tiny object: the link needs 8 bytes, so size 1 rounds up and offset 0 is the only choice.
    let tiny = |off| KmemCache::builder("bad-tiny", l(1, 1)).freeptr_offset(off).build().map(|c| c.object_size());
    assert_eq!(tiny(0).unwrap(), 8);
    assert_eq!(tiny(8).unwrap_err(), CacheError::BadFreeptrOffset);
    for e in [CacheError::BadSize, CacheError::BadAlign, CacheError::BadFreeptrOffset, CacheError::TooManyCaches] {
        assert!(!e.to_string().is_empty());
    }
    // Largest legal parameters work.
    let c = KmemCache::new("ok-huge", l(1 << 20, 1 << 18)).unwrap();
    let p = c.alloc_nolock(Gfp::NONE).unwrap();
    assert_eq!(p.as_ptr() as usize % (1 << 18), 0);
    // SAFETY: ours, freed once.
    assert_eq!(unsafe { c.try_free_nolock(p) }, Ok(()));
    assert_eq!(c.destroy().live_objects, 0);
    assert_healthy(&[]);
}

/// `freeptr_offset + 8 > size` overflows for an offset near `usize::MAX`: in release builds it wraps to a small
/// number and the offset is accepted (the link word would then be written 8 bytes *before* every free object);
/// in debug builds the check panics with "attempt to add with overflow" instead of returning the error.
#[test]
fn bad_freeptr_offset_overflow() {
    let _s = serial();
    let r = KmemCache::builder("bad-freeptr-ovf", Layout::new::<[u64; 5]>()).freeptr_offset(usize::MAX - 7).build();
    // Never allocate from it if it was (wrongly) created: drop destroys the empty cache.
    assert_eq!(r.map(|c| c.object_size()).unwrap_err(), CacheError::BadFreeptrOffset);
}
