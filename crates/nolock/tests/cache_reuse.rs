//! A cache id reused by a cache of another shape: the free fast path must use the new cache's link offset and
//! `high` mark, not the ones a thread's list copied from the destroyed cache.
//!
//! The free fast path reads the link offset and `high` from the thread's list itself (copied there by the first
//! full-path free) so that it never touches the cache. If those copies outlived the cache, a free into the new
//! cache would write its link word at the old offset (over a field the constructor set up) and flush at the old
//! mark. This test destroys a cache whose link word sits at offset 0, creates one with the same id whose link
//! word sits at offset 32 and whose constructor writes a tag at offset 0, and checks on the same thread that the
//! tag survives free and reuse (a free pushes the object on the thread's list and the next allocation pops it
//! back, so a link word written at offset 0 would show at once).

use core::alloc::Layout;
use core::ptr::NonNull;

use nolock::{Gfp, KmemCache};

const TAG: u64 = 0x7a67_5f72_6575_7365;

fn ctor(p: NonNull<u8>) {
    // SAFETY: the constructor gets a whole object of the cache (64 bytes, 8-aligned).
    unsafe { p.cast::<u64>().write(TAG) };
}

fn id_of(c: &KmemCache) -> String {
    let d = format!("{c:?}");
    d.split(',').next().unwrap_or_default().to_string()
}

#[test]
fn reused_id_frees_with_the_new_link_offset() {
    let _reports = testkit::NoReports::new();
    nolock::init();
    let layout = Layout::from_size_align(64, 8).expect("layout");

    // Cache A: 256-byte objects (another `high` mark), link word at offset 0. Frees on this thread set up its
    // list's copies (full path, then fast).
    let a = KmemCache::builder("reuse-a", Layout::from_size_align(256, 8).expect("layout")).build().expect("cache a");
    let a_id = id_of(&a);
    let objs: Vec<NonNull<u8>> = (0..200).map(|_| a.alloc_nolock(Gfp::NONE).expect("alloc a")).collect();
    for p in objs {
        // SAFETY: ours, freed once.
        unsafe { nolock::kfree_nolock(p.as_ptr()) };
    }
    let report = a.destroy();
    assert_eq!(report.live_objects, 0, "{report:?}");

    // Cache B, same id: link word at offset 32, a tag at offset 0 that the allocator must never overwrite.
    let b = KmemCache::builder("reuse-b", layout).freeptr_offset(32).ctor(ctor).build().expect("cache b");
    assert_eq!(id_of(&b), a_id, "the destroyed slot is reused first (this test needs the same id)");
    for round in 0..3 {
        let objs: Vec<NonNull<u8>> = (0..300).map(|_| b.alloc_nolock(Gfp::NONE).expect("alloc b")).collect();
        for &p in &objs {
            // SAFETY: a live object of B.
            let tag = unsafe { p.cast::<u64>().read() };
            assert_eq!(tag, TAG, "round {round}: the tag at offset 0 survived free and reuse");
        }
        // Free half through kfree_nolock (the address-only route), half through the cache.
        for (i, p) in objs.into_iter().enumerate() {
            if i % 2 == 0 {
                // SAFETY: ours, freed once.
                unsafe { nolock::kfree_nolock(p.as_ptr()) };
            } else {
                // SAFETY: ours, freed once.
                unsafe { b.free_nolock(p) };
            }
        }
    }
    let st = b.stats();
    assert_eq!(st.allocs, st.frees, "{st:?}");
    assert_eq!(st.bad_frees, 0, "{st:?}");
    let report = b.destroy();
    assert_eq!(report.live_objects, 0, "{report:?}");
}
