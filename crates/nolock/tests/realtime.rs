//! Real-time set-up: `mlockall(MCL_CURRENT | MCL_FUTURE)` before the first nolock call locks only what nolock
//! uses, not its reserved arena; the periodic purge can be turned off (`NOLOCK_PURGE=never`,
//! `NOLOCK_PURGE_INTERVAL_MS=0`, `Config::purge_interval(None)`) and then keeps freed pages; `nolock::prefault`
//! makes the following allocations free of page faults.
//!
//! Each check needs a fresh process (nolock's settings and its arena are per process), so every test runs this
//! binary again as a child with `NOLOCK_RT_CHILD` naming what to do, and the child runs the ignored `child`
//! test.

use std::process::Command;
use std::time::{Duration, Instant};

use nolock::{Config, Gfp, NBox, alloc_pages_nolock, kmalloc_nolock, try_free_pages_nolock, try_kfree_nolock};

const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

/// Run the `child` test in a new process with `NOLOCK_RT_CHILD=mode` and `envs`; returns its stdout + stderr.
fn run_child(mode: &str, envs: &[(&str, &str)]) -> String {
    run_child_limited(mode, envs, None)
}

/// `run_child` with the child's address space limited to `as_limit` bytes (`RLIMIT_AS`).
fn run_child_limited(mode: &str, envs: &[(&str, &str)], as_limit: Option<u64>) -> String {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    if let Some(limit) = as_limit {
        // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which is
        // async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.args(["--exact", "child", "--include-ignored", "--test-threads", "1", "--nocapture"]);
    cmd.env("NOLOCK_RT_CHILD", mode);
    for v in [
        "NOLOCK_PURGE",
        "NOLOCK_PURGE_INTERVAL_MS",
        "NOLOCK_PURGE_DECAY_MS",
        "NOLOCK_ARENA_SIZE",
        "NOLOCK_PREFAULT",
        "NOLOCK_BACKGROUND",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "child {mode} {envs:?} failed ({}):\n{text}", out.status);
    assert!(text.contains("1 passed"), "the child ran its test:\n{text}");
    text
}

/// A field of `/proc/self/status` in bytes (`VmLck`, `VmRSS`).
fn status_bytes(field: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// Minor page faults of the calling thread so far.
fn thread_minor_faults() -> i64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage; RUSAGE_THREAD reports the calling thread.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
    ru.ru_minflt
}

/// Wait until the background worker has completed `n` more passes (bounded: a stuck worker fails the test).
fn wait_worker_passes(n: u64) {
    let start = nolock::worker_passes();
    let deadline = Instant::now() + Duration::from_secs(60);
    while nolock::worker_passes() < start + n {
        assert!(Instant::now() < deadline, "the worker made no progress in 60 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn mlockall_locks_only_what_is_used() {
    // A 2 GiB arena: before the fix, the whole of it was faulted in and locked by the first nolock call.
    let out = run_child("mlock", &[("NOLOCK_ARENA_SIZE", "2G")]);
    eprintln!("{out}");
}

#[test]
fn purge_never_keeps_free_pages() {
    for envs in [&[("NOLOCK_PURGE", "never")][..], &[("NOLOCK_PURGE_INTERVAL_MS", "0")][..]] {
        run_child("purge-never", envs);
    }
    run_child("purge-never-config", &[]);
    // Control: with the purge on (and no decay), the same sequence does purge (so the check above can see a
    // purge).
    run_child("purge-on", &[("NOLOCK_PURGE_INTERVAL_MS", "10"), ("NOLOCK_PURGE_DECAY_MS", "0")]);
}

/// With a decay, freed pages go back gradually: two passes after a large free most of it is still there; once
/// the decay time has passed (counted in worker passes), all of it is gone. Also through `Config`.
#[test]
fn purge_decays_freed_pages() {
    run_child("purge-decay", &[("NOLOCK_PURGE_INTERVAL_MS", "10"), ("NOLOCK_PURGE_DECAY_MS", "200")]);
    run_child("purge-decay-config", &[("NOLOCK_PURGE_INTERVAL_MS", "10")]);
}

#[test]
fn prefault_makes_allocations_fault_free() {
    let out = run_child("prefault", &[]);
    eprintln!("{out}");
    // The same through the configuration: NOLOCK_PREFAULT prefaults at initialisation.
    let out = run_child("prefault-env", &[("NOLOCK_PREFAULT", "64M"), ("NOLOCK_PURGE", "never")]);
    eprintln!("{out}");
}

#[test]
fn failed_first_call_keeps_errno() {
    // A first call that cannot reserve the arena may run in a signal handler: the errno of the code it
    // interrupted must survive (and the reason is printed once).
    let out = run_child_limited("errno", &[], Some(1 << 30));
    assert_eq!(out.matches("nolock: cannot reserve its arena").count(), 1, "{out}");
}

#[test]
fn pointer_into_the_uncommitted_arena_is_refused() {
    // The arena is 16 GiB: 8 GiB past a fresh object is never allocated (committed or not, it is refused).
    let p = kmalloc_nolock(64, Gfp::NONE).unwrap();
    let far = (p.as_ptr() as usize + (8usize << 30)) as *mut u8;
    assert_eq!(nolock::ksize(far), 0);
    // SAFETY: a bad pointer on purpose: the free must refuse it.
    let e = unsafe { try_kfree_nolock(far) }.unwrap_err();
    assert_eq!(e.kind, nolock::FreeErrorKind::NotAllocated, "{e:?}");
    // SAFETY: our object, freed once.
    assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
}

/// Room for the objects of `allocate_and_touch`, faulted in (so that pushing makes no page fault).
fn object_list() -> Vec<(usize, usize)> {
    let mut v = vec![(1, 1); 30_000];
    v.clear();
    v
}

/// Objects of several size classes and page runs, about 12 MiB, each written in full; returns them.
fn allocate_and_touch() -> Vec<(usize, usize)> {
    let objs = object_list();
    allocate_and_touch_into(objs)
}

/// `allocate_and_touch` into `objs` (which has room for them).
fn allocate_and_touch_into(mut objs: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    for &(size, n) in &[(64usize, 20_000usize), (1000, 2_000), (4096, 1_000), (100_000, 50)] {
        for _ in 0..n {
            let p = kmalloc_nolock(size, Gfp::NONE).expect("memory available");
            // SAFETY: a fresh object of `size` bytes.
            unsafe { p.as_ptr().write_bytes(0x5a, size) };
            objs.push((p.as_ptr() as usize, size));
        }
    }
    objs
}

fn free_all(objs: Vec<(usize, usize)>) {
    for (p, _) in objs {
        // SAFETY: our objects, freed once.
        assert_eq!(unsafe { try_kfree_nolock(p as *mut u8) }, Ok(()));
    }
}

/// The body of every child; see the module documentation.
#[test]
#[ignore = "run in a child process by the other tests"]
fn child() {
    let Ok(mode) = std::env::var("NOLOCK_RT_CHILD") else {
        return;
    };
    match mode.as_str() {
        "mlock" => child_mlock(),
        "purge-never" => child_purge(false),
        "purge-never-config" => {
            Config::new().purge_interval(None).apply().expect("nolock not initialised yet");
            child_purge(false)
        }
        "purge-on" => child_purge(true),
        "purge-decay" => child_purge_decay(),
        "purge-decay-config" => {
            Config::new().purge_decay(Duration::from_millis(200)).apply().expect("nolock not initialised yet");
            child_purge_decay()
        }
        "prefault" => child_prefault(),
        "prefault-env" => child_prefault_env(),
        "errno" => child_errno(),
        m => panic!("unknown child mode {m}"),
    }
}

fn child_mlock() {
    // SAFETY: mlockall only changes how this process's memory is paged.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        let e = std::io::Error::last_os_error();
        println!(
            "SKIP: mlockall(MCL_CURRENT | MCL_FUTURE) failed ({e}): not permitted here (RLIMIT_MEMLOCK, no CAP_IPC_LOCK)"
        );
        return;
    }
    let before = status_bytes("VmLck");
    let arena = 2usize << 30;
    // A little of everything: small objects, a large object, a page run, an NBox.
    let objs: Vec<_> = (0..1000).map(|_| kmalloc_nolock(64, Gfp::ZERO).unwrap()).collect();
    let big = kmalloc_nolock(100_000, Gfp::ZERO).unwrap();
    let pages = alloc_pages_nolock(4, Gfp::ZERO).unwrap();
    let b = NBox::try_new([7u64; 32]).unwrap();
    let after = status_bytes("VmLck");
    let grew = after.saturating_sub(before);
    println!(
        "VmLck {} KiB -> {} KiB (+{} MiB) for an arena of {} MiB",
        before >> 10,
        after >> 10,
        grew / MIB,
        arena / MIB
    );
    assert!(grew < 32 * MIB, "the first nolock calls locked {} MiB (arena {} MiB)", grew / MIB, arena / MIB);
    let st = nolock::stats::snapshot().pages;
    assert!(st.committed_pages * PAGE < 64 * MIB, "committed {} MiB", st.committed_pages * PAGE / MIB);

    // Memory committed later is locked too (resident, so it will not fault): allocate 256 MiB.
    let more: Vec<_> = (0..64).map(|_| kmalloc_nolock(4 * MIB, Gfp::NONE).expect("memory available")).collect();
    let later = status_bytes("VmLck");
    println!("VmLck after 256 MiB more: {} MiB", later / MIB);
    assert!(later >= after + 250 * MIB, "new commits are locked ({} MiB -> {} MiB)", after / MIB, later / MIB);
    assert!(later < after + 256 * MIB + 128 * MIB, "and little more than that");

    // Everything frees; trim cannot purge locked memory and does not try to (nor fails).
    for p in more.into_iter().chain(objs).chain([big]) {
        // SAFETY: our objects, freed once.
        assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    }
    // SAFETY: our run, freed once.
    assert_eq!(unsafe { try_free_pages_nolock(pages, 4) }, Ok(()));
    assert_eq!(b[31], 7);
    drop(b);
    let r = nolock::trim();
    assert_eq!(r.pages_purged, 0, "locked pages are not purged");
    // SAFETY: undoes the mlockall above.
    unsafe { libc::munlockall() };
}

fn child_purge(purge_on: bool) {
    nolock::init();
    assert!(nolock::worker_running());
    let before = nolock::stats::snapshot().pages;
    // 8 MiB of page runs, written and freed: 2048 free dirty pages.
    let runs: Vec<_> = (0..8).map(|_| alloc_pages_nolock(8, Gfp::NONE).expect("memory available")).collect();
    for p in &runs {
        // SAFETY: a fresh run of 256 pages.
        unsafe { p.as_ptr().write_bytes(0xa5, 256 * PAGE) };
    }
    for p in runs {
        // SAFETY: our run, freed once.
        assert_eq!(unsafe { try_free_pages_nolock(p, 8) }, Ok(()));
    }
    let freed = nolock::stats::snapshot().pages;
    assert!(freed.dirty_free_pages >= 2048, "{freed:?}");
    // Pages are purged once they stayed free for a whole pass: three passes are plenty.
    wait_worker_passes(4);
    let after = nolock::stats::snapshot().pages;
    println!("purge_on={purge_on}: before {before:?}\nafter {after:?}");
    if purge_on {
        assert!(after.purged_pages >= before.purged_pages + 2048, "the worker purged the freed pages");
    } else {
        assert_eq!(after.purged_pages, before.purged_pages, "no purge");
        assert!(after.dirty_free_pages >= 2048, "the freed pages are kept");
    }
}

/// Free 2048 dirty pages with a 20-pass decay (10 ms interval, 200 ms decay): at most a few tenths go in the
/// first two passes, and all of them once 20 passes and the aging pass are over.
fn child_purge_decay() {
    nolock::init();
    assert!(nolock::worker_running());
    let runs: Vec<_> = (0..8).map(|_| nolock::alloc_pages_nolock(8, Gfp::NONE).expect("pages")).collect();
    for p in &runs {
        // SAFETY: a fresh run of 256 pages.
        unsafe { p.as_ptr().write_bytes(0xa5, 256 * PAGE) };
    }
    let before = nolock::stats::snapshot().pages;
    for p in runs {
        // SAFETY: our run, freed once.
        assert_eq!(unsafe { try_free_pages_nolock(p, 8) }, Ok(()));
    }
    wait_worker_passes(2);
    let early = nolock::stats::snapshot().pages;
    // At most three passes saw the pages free (one may have been under way during the frees): the first keeps
    // all of them, each later one 1/20 fewer, plus up to a bitmap word of rounding per pass.
    assert!(early.purged_pages - before.purged_pages <= 2 * 2048 / 20 + 3 * 64, "purged too early: {early:?}");
    assert!(early.dirty_free_pages >= 2048 - (2 * 2048 / 20 + 3 * 64), "{early:?}");
    wait_worker_passes(30);
    let late = nolock::stats::snapshot().pages;
    println!("purge decay: before {before:?}\nearly {early:?}\nlate {late:?}");
    assert!(late.purged_pages >= before.purged_pages + 2048, "all purged after the decay time: {late:?}");
    assert!(late.dirty_free_pages <= 64, "{late:?}");
}

fn child_prefault() {
    Config::new().purge_interval(None).apply().expect("nolock not initialised yet");
    // Warm up this thread and the caches used below (per-thread state, first slabs).
    for size in [64, 1000, 4096, 100_000] {
        let p = kmalloc_nolock(size, Gfp::NONE).unwrap();
        // SAFETY: our object, freed once.
        assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
    }

    // Control: without prefaulting, the same allocations fault (unless transparent huge pages back them).
    let list = object_list();
    let f0 = thread_minor_faults();
    let objs = allocate_and_touch_into(list);
    let control = thread_minor_faults() - f0;
    free_all(objs);
    // Those objects are resident now; take them again so that the measured run needs fresh pages.
    let hold = allocate_and_touch();

    nolock::prefault(64 * MIB).expect("prefault");
    let list = object_list();
    let f1 = thread_minor_faults();
    let objs = allocate_and_touch_into(list);
    let prefaulted = thread_minor_faults() - f1;
    println!("minor faults for about 12 MiB of allocations: {control} without prefault, {prefaulted} after");
    assert!(prefaulted <= 16, "{prefaulted} minor faults after prefault (control: {control})");
    let thp_always =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok_and(|s| s.contains("[always]"));
    if !thp_always {
        assert!(control >= 1000, "the control run faulted ({control}), so the measurement means something");
    }
    free_all(objs);
    free_all(hold);
}

fn child_prefault_env() {
    // The first nolock call initialises nolock, which prefaults 64 MiB.
    let p = kmalloc_nolock(64, Gfp::NONE).unwrap();
    let st = nolock::stats::snapshot().pages;
    assert!(st.committed_pages * PAGE >= 64 * MIB, "{st:?}");
    for size in [1000, 4096, 100_000] {
        let q = kmalloc_nolock(size, Gfp::NONE).unwrap();
        // SAFETY: our object, freed once.
        assert_eq!(unsafe { try_kfree_nolock(q.as_ptr()) }, Ok(()));
    }
    let list = object_list();
    let f = thread_minor_faults();
    let objs = allocate_and_touch_into(list);
    let faults = thread_minor_faults() - f;
    println!("minor faults for about 12 MiB of allocations after NOLOCK_PREFAULT=64M: {faults}");
    assert!(faults <= 16, "{faults} minor faults");
    free_all(objs);
    // SAFETY: our object, freed once.
    assert_eq!(unsafe { try_kfree_nolock(p.as_ptr()) }, Ok(()));
}

fn child_errno() {
    for _ in 0..3 {
        // SAFETY: __errno_location returns the calling thread's errno slot.
        unsafe { *libc::__errno_location() = 4242 };
        assert!(kmalloc_nolock(64, Gfp::NONE).is_none(), "a 16 GiB arena does not fit in 1 GiB of address space");
        // SAFETY: as above.
        assert_eq!(unsafe { *libc::__errno_location() }, 4242, "errno kept");
    }
}
