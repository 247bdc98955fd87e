//! Resident memory falls after a large free: allocate about 256 MiB in many objects of a few size classes plus
//! some large (page-run) objects, touch every byte, free everything, call `nolock::trim()`, and check with the
//! kernel's accounting (`/proc/self/statm`, also through `nolock::stats::resident_bytes`) that the resident set
//! grew by most of what was allocated and then fell back by at least 75 % of that rise.
//!
//! RSS is process-wide, so this file holds a single test. (`rss_worker.rs` checks the same without `trim`,
//! through the background worker.)

use nolock::{Gfp, kmalloc_nolock, try_kfree_nolock};

const MIB: usize = 1 << 20;

/// (size, count): about 256 MiB in total.
const WORKLOAD: [(usize, usize); 6] = [
    (64, 512 * 1024),  // 32 MiB
    (200, 160 * 1024), // 32 MiB of the 256-byte class (25 MiB requested)
    (1000, 32 * 1024), // 32 MiB of the 1k class
    (4096, 16 * 1024), // 64 MiB
    (100_000, 320),    // ~31 MiB of page runs
    (MIB, 64),         // 64 MiB of page runs
];

/// Resident set size from `/proc/self/statm`, read directly.
fn statm_rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * page_size()
}

/// The kernel page size, `sysconf(_SC_PAGESIZE)`.
fn page_size() -> usize {
    unsafe extern "C" {
        fn sysconf(name: i32) -> isize;
    }
    const SC_PAGESIZE: i32 = 30; // Linux, every architecture
    // SAFETY: sysconf only reads a configuration value; it is thread-safe and takes a plain integer.
    let v = unsafe { sysconf(SC_PAGESIZE) };
    assert!(v > 0);
    v as usize
}

fn rss() -> usize {
    let ours = nolock::stats::resident_bytes().expect("resident_bytes");
    let direct = statm_rss();
    // Two reads a moment apart agree closely (within 8 MiB).
    assert!(ours.abs_diff(direct) < 8 * MIB, "resident_bytes {ours} vs statm {direct}");
    direct
}

#[test]
fn rss_falls_after_free_and_trim() {
    let _reports = testkit::NoReports::new();
    let total: usize = WORKLOAD.iter().map(|&(s, n)| s * n).sum();
    // The bookkeeping vector, allocated and touched before the baseline so it does not count in the rise.
    let count: usize = WORKLOAD.iter().map(|&(_, n)| n).sum();
    let mut objs: Vec<(usize, usize, u8)> = Vec::with_capacity(count);
    objs.resize(count, (1, 1, 1));
    objs.clear();

    let base = rss();
    for &(size, n) in &WORKLOAD {
        for i in 0..n {
            let p = kmalloc_nolock(size, Gfp::NONE).expect("memory available");
            // SAFETY: a fresh object of `size` bytes: touch all of it.
            unsafe { p.as_ptr().write_bytes((i % 251) as u8, size) };
            objs.push((p.as_ptr() as usize, size, (i % 251) as u8));
        }
    }
    let peak = rss();
    let rise = peak.saturating_sub(base);
    eprintln!("allocated {} MiB; RSS {} -> {} MiB (rise {} MiB)", total / MIB, base / MIB, peak / MIB, rise / MIB);
    assert!(rise >= total * 85 / 100, "RSS rose by {} MiB for {} MiB allocated", rise / MIB, total / MIB);

    for &(p, size, byte) in &objs {
        // SAFETY: our objects: check the last byte, then free once.
        unsafe {
            assert_eq!(*(p as *const u8).add(size - 1), byte);
            assert_eq!(try_kfree_nolock(p as *mut u8), Ok(()));
        }
    }
    objs.clear();
    let freed_only = rss();
    let report = nolock::trim();
    let after = rss();
    eprintln!(
        "after free: {} MiB; after trim: {} MiB ({} slabs released, {} pages purged)",
        freed_only / MIB,
        after / MIB,
        report.slabs_released,
        report.pages_purged
    );
    let fell = peak.saturating_sub(after);
    assert!(
        fell >= rise * 75 / 100,
        "RSS fell by only {} MiB of a {} MiB rise after free + trim",
        fell / MIB,
        rise / MIB
    );
    assert!(report.pages_purged * 4096 >= total / 2, "trim purged {} pages", report.pages_purged);

    // Memory is usable again after the purge (and reads as zero where ZERO is asked).
    let p = kmalloc_nolock(MIB, Gfp::ZERO).unwrap();
    // SAFETY: a fresh zeroed object of 1 MiB.
    assert!(unsafe { std::slice::from_raw_parts(p.as_ptr(), MIB) }.iter().all(|&b| b == 0));
    // SAFETY: ours, freed once.
    assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
}
