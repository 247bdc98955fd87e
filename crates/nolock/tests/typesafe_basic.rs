//! Type-safe caches: constructors once per slab life, immediate reuse, slab pages held for a grace period,
//! destructors once per object at release, fallback cache, destroy.

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use nolock::stats::{PageOwner, page_owner};
use nolock::{Gfp, KmemCache, SlabFlags};

#[repr(C)]
struct Obj {
    tag: AtomicU64,
    key: AtomicU64,
    link: u64,
}

const TAG: u64 = 0x7a6e_7e5a_f00d_0001;
static CTORS: AtomicUsize = AtomicUsize::new(0);
static DTORS: AtomicUsize = AtomicUsize::new(0);
/// The tests take turns: the lifecycle test checks that a released slab's pages are free, which a new slab of
/// the other test could otherwise have taken in between.
static SERIAL: Mutex<()> = Mutex::new(());

fn ctor(p: NonNull<u8>) {
    // SAFETY: p is a fresh object of Obj's layout.
    unsafe { p.cast::<Obj>().as_ptr().write(Obj { tag: AtomicU64::new(TAG), key: AtomicU64::new(0), link: 0 }) };
    CTORS.fetch_add(1, Ordering::Relaxed);
}

fn dtor(p: NonNull<u8>) {
    // SAFETY: p is an object of this cache whose slab is being released.
    let o = unsafe { p.cast::<Obj>().as_ref() };
    assert_eq!(o.tag.load(Ordering::Relaxed), TAG, "type tag intact until release");
    o.tag.store(0, Ordering::Relaxed);
    DTORS.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn typesafe_by_rcu_lifecycle() {
    let _reports = testkit::NoReports::new();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let cache = KmemCache::builder("ts-rcu", Layout::new::<Obj>())
        .flags(SlabFlags::TYPESAFE_BY_RCU)
        .freeptr_offset(16)
        .ctor(ctor)
        .dtor(dtor)
        .build()
        .unwrap();
    let objs: Vec<_> = (0..1000).map(|_| cache.alloc_nolock(Gfp::NONE).unwrap()).collect();
    let ctors = CTORS.load(Ordering::Relaxed);
    assert!(ctors >= 1000);
    for &p in &objs {
        // SAFETY: our object.
        assert_eq!(unsafe { p.cast::<Obj>().as_ref() }.tag.load(Ordering::Relaxed), TAG);
    }
    // A reader holds one object across its free and the slab's release.
    let held = objs[0];
    let guard = nolock::rcu_read_lock();
    for &p in &objs {
        // SAFETY: freeing our objects once.
        unsafe { cache.free_nolock(p) };
    }
    // Freed objects are reused at once, constructors do not run again.
    let again = cache.alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: our object.
    assert_eq!(unsafe { again.cast::<Obj>().as_ref() }.tag.load(Ordering::Relaxed), TAG);
    assert_eq!(CTORS.load(Ordering::Relaxed), ctors);
    // SAFETY: ours.
    unsafe { cache.free_nolock(again) };
    nolock::trim(); // empties this thread's list and releases empty slabs: type-safe ones wait for a GP
    assert!(cache.stats().pending_slabs > 0, "{:?}", cache.stats());
    assert!(matches!(page_owner(held.as_ptr()), PageOwner::Slab(_)), "pages kept while a reader may look");
    // SAFETY: type-safe memory stays an Obj until the grace period ends.
    assert_eq!(unsafe { held.cast::<Obj>().as_ref() }.tag.load(Ordering::Relaxed), TAG);
    drop(guard);
    nolock::rcu_barrier();
    assert_eq!(cache.stats().pending_slabs, 0);
    assert!(DTORS.load(Ordering::Relaxed) > 0);
    assert_eq!(page_owner(held.as_ptr()), PageOwner::Free, "pages returned after the grace period");
    let r = cache.destroy();
    assert_eq!(r.live_objects, 0);
    assert_eq!(CTORS.load(Ordering::Relaxed), DTORS.load(Ordering::Relaxed), "one dtor per ctor");
}

#[test]
fn typesafe_by_srcu_fast_default_domain_and_fallback() {
    let _reports = testkit::NoReports::new();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let cache = KmemCache::builder("ts-srcu", Layout::new::<[u64; 4]>())
        .flags(SlabFlags::TYPESAFE_BY_SRCU_FAST)
        .build()
        .unwrap();
    let p = cache.alloc_nolock(Gfp::ZERO).unwrap();
    // SAFETY: ours.
    unsafe { cache.free_nolock(p) };
    // kfree_nolock routes an object of any cache back to it.
    let q = cache.alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: ours.
    unsafe { nolock::kfree_nolock(q.as_ptr()) };
    let s = cache.stats();
    assert_eq!(s.allocs, s.frees);
    drop(cache); // destroy waits for the Tasks Trace grace period of its slabs
}
