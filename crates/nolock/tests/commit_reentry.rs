//! Committing more of the arena is reentrant and races harmlessly: a "signal" that lands between the commit's
//! system calls and the move of the committed mark (the `PageCommit` test hook) makes an allocation that
//! needs a commit of its own, beyond the one in progress; threads grow the arena at the same time. Every
//! allocation must be usable over its whole length (a page left uncommitted would fault) and distinct, and the
//! committed part must always cover the active part.
//!
//! One test per process (the hook is global), with the background worker off (it commits ahead, which would
//! leave the allocations nothing to commit).

use std::sync::atomic::{AtomicUsize, Ordering};

use nolock::hooks::{Point, set_hook};
use nolock::{Config, Gfp, kmalloc_nolock, try_kfree_nolock};

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

static NESTED: AtomicUsize = AtomicUsize::new(0);

/// Write a stamp into every page of `[p, p + len)`.
fn stamp(p: *mut u8, len: usize, v: u8) {
    for off in (0..len).step_by(PAGE).chain([len - 1]) {
        // SAFETY: inside an allocation of `len` bytes that the caller owns.
        unsafe { p.add(off).write(v) };
    }
}

/// Check the stamps of `stamp`.
fn check(p: *mut u8, len: usize, v: u8) {
    for off in (0..len).step_by(PAGE).chain([len - 1]) {
        // SAFETY: as in `stamp`.
        assert_eq!(unsafe { p.add(off).read() }, v, "byte {off} of {p:p}");
    }
}

fn hook(at: Point) {
    if at != Point::PageCommit {
        return;
    }
    // Bigger than any commit chunk (at most 64 MiB ahead): this allocation needs a commit of its own.
    let len = 80 * MIB;
    let p = kmalloc_nolock(len, Gfp::NONE).expect("memory available in the nested allocation");
    stamp(p.as_ptr(), len, 0x6b);
    check(p.as_ptr(), len, 0x6b);
    // SAFETY: our allocation, freed once.
    assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    NESTED.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn nested_and_racing_commits() {
    Config::new().background(false).lazy_commit(true).apply().expect("nolock not initialised yet");
    set_hook(Some(hook));
    // Each outer allocation is beyond what is committed, so it commits; the hook nests another commit there.
    let mut held = Vec::new();
    for i in 0..6u8 {
        let len = 48 * MIB + i as usize * PAGE;
        let p = kmalloc_nolock(len, Gfp::NONE).expect("memory available");
        stamp(p.as_ptr(), len, i);
        held.push((p, len, i));
    }
    set_hook(None);
    // Commits run ahead of need (up to 64 MiB), so not every outer allocation commits; most do.
    let nested = NESTED.load(Ordering::Relaxed);
    assert!(nested >= 3, "the hook ran in the commits ({nested})");

    // Threads growing the arena together: their commits race.
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for k in 0..8u8 {
                    let len = (4 + (k as usize % 3) * 5) * MIB + t as usize * PAGE;
                    let p = kmalloc_nolock(len, Gfp::NONE).expect("memory available");
                    let v = t.wrapping_mul(16).wrapping_add(k);
                    stamp(p.as_ptr(), len, v);
                    mine.push((p.as_ptr() as usize, len, v));
                }
                for &(p, len, v) in &mine {
                    check(p as *mut u8, len, v);
                }
                mine
            })
        })
        .collect();
    let theirs: Vec<(usize, usize, u8)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let mut all: Vec<(usize, usize)> = held.iter().map(|&(p, len, _)| (p.as_ptr() as usize, len)).collect();
    all.extend(theirs.iter().map(|&(p, len, _)| (p, len)));
    all.sort_unstable();
    for w in all.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "allocations overlap: {w:x?}");
    }
    let st = nolock::stats::snapshot().pages;
    assert!(st.committed_pages >= st.active_pages, "{st:?}");
    for (p, len, i) in held {
        check(p.as_ptr(), len, i);
        // SAFETY: our allocation, freed once.
        assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    }
    for (p, len, v) in theirs {
        check(p as *mut u8, len, v);
        // SAFETY: allocated by a thread above, freed once here.
        assert_eq!(unsafe { try_kfree_nolock(p as *mut u8) }, Ok(()));
    }
}
