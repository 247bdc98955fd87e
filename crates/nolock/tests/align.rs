//! Every alignment the API accepts is honoured or refused, never ignored: `NBox` of an over-aligned type,
//! `kmalloc_layout_nolock` and `NolockAlloc` (called directly, not as the global allocator) with alignments
//! from 1 byte to 1 GiB and beyond. Every `Some` (non-null) is aligned and usable, every refusal is `None`
//! (null), every allocation frees. A child process with a 64 MiB arena checks the refusals: there, every
//! alignment above 64 MiB must be refused.

use std::alloc::{GlobalAlloc, Layout};
use std::mem::MaybeUninit;
use std::process::Command;

use nolock::{Gfp, NBox, NolockAlloc, kmalloc_layout_nolock, try_kfree_nolock};

const MIB: usize = 1 << 20;

#[repr(C, align(4194304))]
struct Align4M([u8; 100]);

#[repr(C, align(536870912))]
struct Align512M(u8);

/// The largest alignment nolock says it honours.
fn max_align() -> usize {
    nolock::stats::snapshot().pages.max_align
}

/// Sizes worth trying at alignment `align`.
fn sizes(align: usize) -> Vec<usize> {
    let mut v = vec![0, 1, 8, 100, 4096, 10_000, align / 2, align, align + 1];
    v.retain(|&s| s <= (1 << 30) + 1);
    v.sort_unstable();
    v.dedup();
    v
}

/// Check one allocation result: aligned, writable at both ends (if not zero-size), or a refusal that is
/// allowed. Returns whether it succeeded.
fn check(what: &str, p: Option<*mut u8>, layout: Layout, zeroed: bool) -> bool {
    let Some(p) = p else {
        assert!(
            layout.align() > max_align(),
            "{what}: {layout:?} refused although alignments up to {} are honoured",
            max_align()
        );
        return false;
    };
    assert_eq!(p as usize % layout.align(), 0, "{what}: {layout:?} returned misaligned {p:p}");
    if layout.size() > 0 {
        // SAFETY: a fresh allocation of `layout.size()` bytes.
        unsafe {
            if zeroed {
                assert_eq!(*p, 0);
                assert_eq!(*p.add(layout.size() - 1), 0);
            }
            p.write(0xa1);
            p.add(layout.size() - 1).write(0xa2);
        }
    }
    true
}

/// Run every alignment `1 << 0 ..= 1 << max_shift` through `kmalloc_layout_nolock` and `NolockAlloc`.
/// Returns the number of refusals.
fn all_alignments(max_shift: u32) -> usize {
    let a = NolockAlloc::new();
    let mut refused = 0;
    for shift in 0..=max_shift {
        let align = 1usize << shift;
        for size in sizes(align) {
            let layout = Layout::from_size_align(size, align).unwrap();
            // Zeroing is checked up to 16 MiB: a freed run is dirty as a whole, and zeroing a reused 1 GiB run
            // would write (and make resident) all of it.
            for zero in [false, true] {
                if zero && size > 16 * MIB {
                    continue;
                }
                let flags = if zero { Gfp::ZERO } else { Gfp::NONE };
                let p = kmalloc_layout_nolock(layout, flags).map(|p| p.as_ptr());
                if check("kmalloc_layout_nolock", p, layout, zero) {
                    // SAFETY: our allocation, freed once.
                    assert_eq!(unsafe { try_kfree_nolock(p.unwrap()) }, Ok(()), "{layout:?}");
                } else {
                    refused += 1;
                }
                if size == 0 {
                    continue; // never reaches a GlobalAlloc
                }
                // SAFETY: a non-zero-size layout.
                let p = unsafe { if zero { a.alloc_zeroed(layout) } else { a.alloc(layout) } };
                if check("NolockAlloc", (!p.is_null()).then_some(p), layout, zero) {
                    // SAFETY: allocated above with this layout, freed once.
                    unsafe { a.dealloc(p, layout) };
                } else {
                    refused += 1;
                }
            }
        }
    }
    refused
}

#[test]
fn nbox_of_an_over_aligned_type() {
    // The value is 4 MiB: build it on a thread with room for it on the stack.
    std::thread::Builder::new()
        .stack_size(64 * MIB)
        .spawn(|| {
            let mut held = Vec::new();
            for i in 0..8u8 {
                let b = NBox::try_new(Align4M([i; 100])).ok().expect("room for 4 MiB");
                assert_eq!(NBox::as_ptr(&b) as usize % (4 * MIB), 0, "NBox #{i} misaligned");
                assert_eq!(b.0[99], i);
                held.push(b);
            }
            for (i, b) in held.iter().enumerate() {
                assert_eq!(b.0[0], i as u8);
            }
            drop(held);
            let z = NBox::<Align512M>::try_new_zeroed().expect("room for 512 MiB at 512 MiB alignment");
            assert_eq!(NBox::as_ptr(&z) as usize % (512 * MIB), 0);
            // SAFETY: zeroed memory is a valid Align512M.
            let z: NBox<Align512M> = unsafe { z.assume_init() };
            assert_eq!(z.0, 0);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn every_alignment_up_to_1_gib() {
    assert!(max_align() >= 1 << 30, "the default 16 GiB arena honours 1 GiB alignment ({})", max_align());
    assert_eq!(all_alignments(30), 0, "nothing refused up to 1 GiB");
}

#[test]
fn alignments_beyond_the_arena_are_refused() {
    let max = max_align();
    for shift in max.trailing_zeros() + 1..=40 {
        let layout = Layout::from_size_align(1, 1 << shift).unwrap();
        assert!(kmalloc_layout_nolock(layout, Gfp::NONE).is_none(), "align 2^{shift}");
        // SAFETY: a non-zero-size layout.
        assert!(unsafe { NolockAlloc::new().alloc(layout) }.is_null(), "align 2^{shift}");
    }
}

#[test]
fn small_arena_refuses_what_it_cannot_align() {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "small_arena_child", "--include-ignored", "--test-threads", "1", "--nocapture"])
        .env("NOLOCK_ARENA_SIZE", "64M")
        .env("NOLOCK_ALIGN_CHILD", "1")
        .output()
        .expect("run the child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(text.contains("1 passed"), "the child ran its test:\n{text}");
}

#[test]
#[ignore = "run in a child process by small_arena_refuses_what_it_cannot_align"]
fn small_arena_child() {
    if std::env::var_os("NOLOCK_ALIGN_CHILD").is_none() {
        return;
    }
    assert_eq!(max_align(), 64 * MIB);
    // Up to 16 MiB everything fits (sizes up to align + 1 in a 64 MiB arena); above 64 MiB all is refused.
    assert_eq!(all_alignments(24), 0);
    for shift in 27..=30 {
        for size in sizes(1 << shift) {
            let layout = Layout::from_size_align(size, 1 << shift).unwrap();
            assert!(kmalloc_layout_nolock(layout, Gfp::NONE).is_none(), "{layout:?}");
            if size > 0 {
                // SAFETY: a non-zero-size layout.
                assert!(unsafe { NolockAlloc::new().alloc(layout) }.is_null(), "{layout:?}");
            }
        }
    }
    let big: Option<NBox<MaybeUninit<Align512M>>> = NBox::<Align512M>::try_new_zeroed();
    assert!(big.is_none(), "512 MiB alignment in a 64 MiB arena is refused");
    let b = NBox::try_new(7u64).unwrap();
    assert_eq!(*b, 7);
}
