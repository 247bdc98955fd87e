//! Residue: after a program allocated a mix of sizes, freed everything and called `nolock::trim()`, the
//! resident set is back within 2 MiB of where it was before the first nolock call (what stays is metadata:
//! page descriptors of the pages used, the cache and per-thread tables).
//!
//! RSS is process-wide, so this file holds a single test.

use nolock::{Gfp, kmalloc_nolock, try_kfree_nolock};

const MIB: usize = 1 << 20;

/// Resident set size from `/proc/self/statm`.
fn statm_rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn residue_after_free_and_trim_is_small() {
    // The bookkeeping vector and the strings the test prints are allocated before the baseline.
    let mut objs: Vec<usize> = Vec::with_capacity(1 << 20);
    objs.resize(1 << 20, 1);
    objs.clear();
    let _ = format!("{}", 1);
    let base = statm_rss();
    // About 64 MiB in sizes from 16 B to 1 MiB, touched.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut total = 0;
    while total < 64 * MIB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = match x % 100 {
            0 => 64 * 1024 + (x >> 8) as usize % MIB,
            1..=9 => 1024 + (x >> 8) as usize % 31_000,
            _ => 16 + (x >> 8) as usize % 1000,
        };
        let p = kmalloc_nolock(size, Gfp::NONE).expect("memory");
        // SAFETY: a fresh object of `size` bytes.
        unsafe { p.as_ptr().write_bytes(0x5a, size) };
        objs.push(p.as_ptr() as usize);
        total += size;
    }
    let peak = statm_rss();
    for &a in &objs {
        // SAFETY: each object freed once.
        assert_eq!(unsafe { try_kfree_nolock(a as *mut u8) }, Ok(()));
    }
    nolock::trim();
    let after = statm_rss();
    eprintln!(
        "RSS: {:.2} MiB before, {:.2} MiB at peak ({} objects, {} MiB), {:.2} MiB after free and trim: residue {:.2} MiB",
        base as f64 / MIB as f64,
        peak as f64 / MIB as f64,
        objs.len(),
        total / MIB,
        after as f64 / MIB as f64,
        (after as f64 - base as f64) / MIB as f64
    );
    assert!(peak > base + 48 * MIB, "the workload was resident");
    assert!(after < base + 2 * MIB, "residue {} KiB above the starting RSS", (after - base) / 1024);
}
