//! Hardened mode for the kmalloc classes (`debug::set_hardened_default(true)` before nolock's first use, or
//! `NOLOCK_HARDENED=1`): the classes are created hardened, their fast paths are off, a double free not at the
//! head of a list is refused at the free, and a write after free into a link word is reported and not followed.
//!
//! The setting is read when nolock starts, so this file holds a single test.

use std::collections::BTreeSet;

use nolock::{FreeErrorKind, Gfp, kfree_nolock, kmalloc_nolock, try_kfree_nolock};

fn alloc(n: usize, size: usize) -> Vec<usize> {
    (0..n).map(|_| kmalloc_nolock(size, Gfp::NONE).expect("memory is available").as_ptr() as usize).collect()
}

fn free(a: usize) {
    // SAFETY: a live kmalloc object, freed once.
    assert_eq!(unsafe { try_kfree_nolock(a as *mut u8) }, Ok(()));
}

#[test]
fn hardened_kmalloc() {
    nolock::debug::set_hardened_default(true);
    nolock::debug::set_quiet(true);
    let first = alloc(1, 64);
    assert!(nolock::debug::kmalloc_hardened(), "the classes were created hardened");
    free(first[0]);
    let r = nolock::debug::reports();

    std::thread::scope(|s| {
        s.spawn(|| {
            // Churn over several classes: nothing reported, nothing handed out twice.
            for size in [8, 64, 96, 200, 1000, 4096] {
                let v = alloc(3000, size);
                assert_eq!(v.iter().collect::<BTreeSet<_>>().len(), v.len());
                for a in v {
                    free(a);
                }
            }
            assert_eq!(nolock::debug::reports(), r);

            // A double free not at the head of the thread's list is refused at the free.
            let keep = alloc(1, 64);
            let v = alloc(8, 64);
            for &a in &v {
                free(a);
            }
            // SAFETY: deliberate double frees.
            assert_eq!(unsafe { try_kfree_nolock(v[2] as *mut u8) }.unwrap_err().kind, FreeErrorKind::DoubleFree);
            // SAFETY: as above, through the reporting variant.
            unsafe { kfree_nolock(v[6] as *mut u8) };
            assert_eq!(nolock::debug::reports(), r + 1);

            // A write after free into a link word: reported, not followed.
            // SAFETY: a deliberate write after free into v[5]'s link word (offset 0).
            unsafe { (v[5] as *mut usize).write(0x4242) };
            let got = alloc(200, 64);
            assert_eq!(nolock::debug::reports(), r + 2);
            let set: BTreeSet<usize> = got.iter().copied().collect();
            assert_eq!(set.len(), got.len(), "nothing handed out twice");
            assert!(!set.contains(&v[5]) && !set.contains(&0x4242) && !set.contains(&keep[0]));
            for a in got.into_iter().chain(keep) {
                free(a);
            }
        });
    });
    assert_eq!(nolock::debug::reports(), r + 2);
}
