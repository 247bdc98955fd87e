//! Real-time set-up with nolock: configure, lock memory, prefault, then allocate on the time-critical path
//! without page faults and without system calls.
//!
//! ```text
//! cargo run --release -p nolock-mm --example realtime_setup
//! ```
//!
//! `mlockall` needs `CAP_IPC_LOCK` or a locked-memory limit (`ulimit -l`) above what the program uses; without
//! either, the example carries on unlocked and says so.

use std::time::Instant;

use nolock::{Config, Gfp, kfree_nolock, kmalloc_nolock};

/// Locked memory: `VmLck` (what the kernel counts as locked, including address space reserved without
/// access, such as glibc's 64 MiB per-thread malloc arenas for the worker threads) and `Locked` (what is
/// resident and locked).
fn locked() -> String {
    let field = |file: &str, name: &str| {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with(name)).map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_owned())
            })
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "VmLck {} kB, resident and locked {} kB",
        field("/proc/self/status", "VmLck:"),
        field("/proc/self/smaps_rollup", "Locked:")
    )
}

fn minor_faults() -> i64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage; RUSAGE_THREAD reports the calling thread.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_minflt
}

fn main() {
    // 1. Settings, before the first nolock call: freed pages stay resident (no purge, so no fault when they
    //    are used again). A global allocator would pass the same Config to NolockAlloc::with_config.
    Config::new().purge_interval(None).apply().expect("configure nolock before its first use");

    // 2. Lock all memory, present and future. nolock reserves its arena without access, so this locks only
    //    what nolock commits, not the 16 GiB of address space it reserves.
    // SAFETY: mlockall only changes how this process's memory is paged.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        eprintln!("mlockall: {} (carrying on without locked memory)", std::io::Error::last_os_error());
    }

    // 3. Start nolock from a normal context (background worker: commits memory ahead of need), then fault in
    //    the working set: the next 64 MiB of allocations make no page fault and no system call.
    nolock::init();
    nolock::prefault(64 << 20).expect("prefault");
    println!("after set-up: {}", locked());

    // 4. The time-critical part (its bookkeeping vector is set up, and faulted in, before).
    let mut held = vec![std::ptr::NonNull::<u8>::dangling(); 100_000];
    held.clear();
    let faults = minor_faults();
    let start = Instant::now();
    for i in 0..100_000usize {
        let p = kmalloc_nolock(64 + i % 400, Gfp::ZERO).expect("memory available");
        held.push(p);
    }
    for p in held.drain(..) {
        // SAFETY: our objects, freed once.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
    println!(
        "100000 allocations and frees in {:?} with {} page faults; {}",
        start.elapsed(),
        minor_faults() - faults,
        locked()
    );
}
