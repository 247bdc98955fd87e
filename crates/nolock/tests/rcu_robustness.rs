//! Robustness of the grace-period machinery (hardening issue, items 5 and 10):
//!
//! - a panic inside a grace-period step (here: injected by the test hook) must not leave the driver flag set,
//!   or every later grace period hangs;
//! - a `membarrier` that starts failing (a seccomp filter, in a child process) must fall back, not panic;
//! - a barrier waits only for the `kfree_rcu` blocks queued before it, so it ends under a retire flood;
//! - `start_poll_synchronize_rcu` must deliver its grace period without `nolock::init()` (child process);
//! - waiting for a grace period inside a read-side section it waits for must panic with a message, never hang
//!   (`synchronize_rcu_tasks_trace` and barriers included);
//! - `RcuPtr::load` must refuse a guard of another SRCU-fast domain.
//!
//! Tests that could hang run under a watchdog that aborts the process with a message.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nolock::hooks::{Point, set_hook};
use nolock::rcu::srcu::SrcuFast;
use nolock::rcu_ptr::{RcuPtr, Srcu};
use nolock::{Gfp, RcuHead};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run `f` on a thread and return its result; abort the process if it takes longer than `limit`.
fn with_watchdog<R: Send + 'static>(name: &'static str, limit: Duration, f: impl FnOnce() -> R + Send + 'static) -> R {
    let t = std::thread::spawn(f);
    let start = Instant::now();
    while !t.is_finished() {
        if start.elapsed() > limit {
            eprintln!("{name}: still blocked after {limit:?}");
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    t.join().unwrap()
}

/// Re-run this test binary with only `test` and `NOLOCK_TEST_CHILD=1`; returns whether it exited 0 in time.
fn run_child(test: &str, limit: Duration) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads", "1"])
        .env("NOLOCK_TEST_CHILD", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            return (st.success() && text.contains("1 passed"), text);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
            return (false, format!("timed out after {limit:?}\n{text}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn in_child() -> bool {
    std::env::var_os("NOLOCK_TEST_CHILD").is_some()
}

// ---------------------------------------------------------------------------------------------------------------
// A panic inside a grace-period step
// ---------------------------------------------------------------------------------------------------------------

thread_local! {
    static PANIC_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
static PANICKED: AtomicU32 = AtomicU32::new(0);

fn panicking_hook(at: Point) {
    if at == Point::Rcu && PANIC_HERE.with(|p| p.replace(false)) {
        PANICKED.fetch_add(1, Ordering::Relaxed);
        panic!("injected panic inside a grace-period step");
    }
}

#[test]
fn panic_inside_a_step_releases_the_driver() {
    if in_child() {
        return;
    }
    let _s = serial();
    nolock::init();
    set_hook(Some(panicking_hook));
    let got = with_watchdog("synchronize_rcu after a panicking step", Duration::from_secs(30), || {
        // Drive a grace period from this thread until the hook fires inside its step and panics.
        let mut tries = 0;
        while PANICKED.load(Ordering::Relaxed) == 0 && tries < 1000 {
            PANIC_HERE.with(|p| p.set(true));
            let _ = catch_unwind(AssertUnwindSafe(nolock::synchronize_rcu));
            tries += 1;
        }
        PANIC_HERE.with(|p| p.set(false));
        // Grace periods still end, from this thread and from the worker.
        for _ in 0..3 {
            nolock::synchronize_rcu();
        }
        nolock::rcu_barrier();
        PANICKED.load(Ordering::Relaxed)
    });
    set_hook(None);
    assert!(got >= 1, "the injected panic never happened inside a step driven by this thread");
}

// ---------------------------------------------------------------------------------------------------------------
// membarrier starts failing
// ---------------------------------------------------------------------------------------------------------------

/// Make every later `membarrier` of this process fail with EPERM (a seccomp filter).
fn forbid_membarrier() {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, sock_filter, sock_fprog};
    let stmt = |code: u32, k: u32| sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| sock_filter { code: code as u16, jt, jf, k };
    let filter = [
        stmt(BPF_LD | BPF_W | BPF_ABS, 0), // seccomp_data.nr
        jump(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_membarrier as u32, 0, 1),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut sock_filter };
    // SAFETY: plain prctl calls with a valid, live filter program.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog as *const sock_fprog, 0, 0),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn child_membarrier_fails_later() {
    if !in_child() {
        return;
    }
    nolock::init();
    nolock::synchronize_rcu(); // the barrier mechanism is registered and works
    forbid_membarrier();
    // SAFETY: membarrier(QUERY) has no memory arguments.
    assert_eq!(unsafe { libc::syscall(libc::SYS_membarrier, 0, 0) }, -1, "the filter is in place");
    for _ in 0..3 {
        nolock::synchronize_rcu();
        nolock::synchronize_rcu_tasks_trace();
    }
    nolock::rcu_barrier();
}

#[test]
fn membarrier_failure_falls_back() {
    if in_child() {
        return;
    }
    let (ok, out) = run_child("child_membarrier_fails_later", Duration::from_secs(60));
    assert!(ok, "grace periods after membarrier started failing:\n{out}");
}

// ---------------------------------------------------------------------------------------------------------------
// Barriers under a retire flood
// ---------------------------------------------------------------------------------------------------------------

#[repr(C)]
struct Obj {
    head: RcuHead,
    v: [u64; 2],
}

#[test]
fn barrier_ends_under_a_retire_flood() {
    if in_child() {
        return;
    }
    let _s = serial();
    nolock::init();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flooding = std::sync::Arc::new(AtomicBool::new(false));
    let (s2, f2) = (stop.clone(), flooding.clone());
    let retirer = std::thread::spawn(move || {
        let mut n = 0u64;
        while !s2.load(Ordering::Relaxed) {
            let p = nolock::kmalloc_nolock(core::mem::size_of::<Obj>(), Gfp::ZERO).expect("memory").cast::<Obj>();
            // SAFETY: a fresh object, retired once.
            unsafe { nolock::kfree_rcu_nolock(p.as_ptr().cast(), std::ptr::NonNull::from(&(*p.as_ptr()).head)) };
            n += 1;
            if n == 1000 {
                f2.store(true, Ordering::Release);
            }
        }
        n
    });
    // The barriers start once the flood is under way (on a loaded machine the retirer may otherwise not run
    // before all 20 barriers are done, and the test would test nothing).
    let start = std::time::Instant::now();
    while !flooding.load(Ordering::Acquire) {
        assert!(start.elapsed() < Duration::from_secs(60), "the retirer never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Every barrier must end while the flood goes on (the flood stops only after the last one).
    let barriers = with_watchdog("rcu_barrier under a kfree_rcu flood", Duration::from_secs(60), || {
        for _ in 0..20 {
            nolock::rcu_barrier();
        }
        20
    });
    stop.store(true, Ordering::Relaxed);
    let retired = retirer.join().unwrap();
    nolock::rcu_barrier();
    assert_eq!(barriers, 20);
    assert!(retired >= 1000);
}

thread_local! {
    static BARRIER_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
/// Set while the barrier runs: meanwhile every 400 objects freed (by whoever frees the blocks: the barrier or
/// the worker) retire a new full block, so blocks keep arriving on the ring behind the barrier's back, each
/// needing a grace period that started after the barrier began.
static FEEDING: AtomicBool = AtomicBool::new(false);
static FED_ONCE: AtomicBool = AtomicBool::new(false);
static FED_BLOCKS: AtomicU32 = AtomicU32::new(0);
static FREES_SEEN: AtomicU32 = AtomicU32::new(0);

fn late_block_hook(at: Point) {
    match at {
        Point::KfreeBarrier if BARRIER_THREAD.with(|b| b.get()) => FED_ONCE.store(true, Ordering::Release),
        Point::FreeFast | Point::FreeFlush
            if FEEDING.load(Ordering::Acquire) && FREES_SEEN.fetch_add(1, Ordering::Relaxed) % 400 == 399 =>
        {
            FED_BLOCKS.fetch_add(1, Ordering::Relaxed);
            retire_objs(509);
        }
        _ => {}
    }
}

fn retire_objs(n: usize) {
    for _ in 0..n {
        let p = nolock::kmalloc_nolock(core::mem::size_of::<Obj>(), Gfp::ZERO).expect("memory").cast::<Obj>();
        // SAFETY: a fresh object, retired once.
        unsafe { nolock::kfree_rcu_nolock(p.as_ptr().cast(), std::ptr::NonNull::from(&(*p.as_ptr()).head)) };
    }
}

#[test]
fn barrier_does_not_wait_for_later_blocks() {
    if in_child() {
        return;
    }
    let _s = serial();
    nolock::init();
    set_hook(Some(late_block_hook));
    let early_reader_in = std::sync::Arc::new(AtomicBool::new(false));
    let early_go = std::sync::Arc::new(AtomicBool::new(false));
    let (ein, ego) = (early_reader_in.clone(), early_go.clone());
    // An early reader keeps the first blocks' grace period open until the barrier is waiting for it, so that
    // the barrier surely finds blocks on the ring.
    let early = std::thread::spawn(move || {
        let g = nolock::rcu_read_lock();
        ein.store(true, Ordering::Release);
        while !ego.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(g);
    });
    while !early_reader_in.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(1));
    }
    retire_objs(3 * 509);
    let barrier = std::thread::spawn(|| {
        BARRIER_THREAD.with(|b| b.set(true));
        FEEDING.store(true, Ordering::Release);
        nolock::rcu_barrier();
        FEEDING.store(false, Ordering::Release);
    });
    std::thread::sleep(Duration::from_millis(50));
    early_go.store(true, Ordering::Release);
    with_watchdog("rcu_barrier while blocks keep arriving behind it", Duration::from_secs(30), move || {
        barrier.join().unwrap();
    });
    early.join().unwrap();
    set_hook(None);
    assert!(FED_ONCE.load(Ordering::Acquire), "the barrier found blocks to wait for");
    assert!(FED_BLOCKS.load(Ordering::Relaxed) >= 1, "blocks arrived while the barrier freed the earlier ones");
    nolock::rcu_barrier();
}

// ---------------------------------------------------------------------------------------------------------------
// start_poll without init
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn child_start_poll_without_init() {
    if !in_child() {
        return;
    }
    let c = nolock::start_poll_synchronize_rcu();
    let start = Instant::now();
    while !nolock::poll_state_synchronize_rcu(c) {
        assert!(start.elapsed() < Duration::from_secs(20), "the polled grace period never came");
        std::thread::sleep(Duration::from_millis(1));
    }
    static D: SrcuFast = SrcuFast::new();
    let c = D.start_poll();
    let start = Instant::now();
    while !D.poll(c) {
        assert!(start.elapsed() < Duration::from_secs(20), "the polled SRCU grace period never came");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn start_poll_works_without_init() {
    if in_child() {
        return;
    }
    let (ok, out) = run_child("child_start_poll_without_init", Duration::from_secs(60));
    assert!(ok, "start_poll_synchronize_rcu without nolock::init():\n{out}");
}

// ---------------------------------------------------------------------------------------------------------------
// Waiting for oneself panics
// ---------------------------------------------------------------------------------------------------------------

/// Run `f` inside `enter()`'s section on a watched thread; it must panic with a self-deadlock message.
fn must_panic(name: &'static str, f: fn()) {
    let msg = with_watchdog(name, Duration::from_secs(20), move || {
        let r = catch_unwind(f);
        match r {
            Ok(()) => String::new(),
            Err(e) => e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        }
    });
    assert!(msg.contains("wait for itself forever"), "{name}: expected a self-deadlock panic, got {msg:?}");
}

static DOMAIN: SrcuFast = SrcuFast::new();

#[test]
fn waiting_for_oneself_panics() {
    if in_child() {
        return;
    }
    let _s = serial();
    nolock::init();
    must_panic("synchronize_rcu_tasks_trace inside rcu_read_lock", || {
        let _g = nolock::rcu_read_lock();
        nolock::synchronize_rcu_tasks_trace();
    });
    must_panic("rcu_barrier_tasks_trace inside rcu_read_lock", || {
        let _g = nolock::rcu_read_lock();
        nolock::rcu_barrier_tasks_trace();
    });
    must_panic("rcu_barrier inside rcu_read_lock", || {
        let _g = nolock::rcu_read_lock();
        nolock::rcu_barrier();
    });
    must_panic("cond_synchronize_rcu inside rcu_read_lock", || {
        let c = nolock::get_state_synchronize_rcu();
        let _g = nolock::rcu_read_lock();
        nolock::cond_synchronize_rcu(c);
    });
    must_panic("srcu barrier inside its own section", || {
        let _g = DOMAIN.read_lock_fast();
        DOMAIN.barrier();
    });
    must_panic("rcu_barrier_tasks_trace inside a Tasks Trace section", || {
        let _g = nolock::rcu_read_lock_tasks_trace();
        nolock::rcu_barrier_tasks_trace();
    });
    // Allowed: other domains' grace periods do not wait for these sections.
    with_watchdog("synchronize_rcu inside an SRCU section", Duration::from_secs(20), || {
        let _g = DOMAIN.read_lock_fast();
        nolock::synchronize_rcu();
    });
}

// ---------------------------------------------------------------------------------------------------------------
// RcuPtr and SRCU domains
// ---------------------------------------------------------------------------------------------------------------

static DOMAIN_A: SrcuFast = SrcuFast::new();
static DOMAIN_B: SrcuFast = SrcuFast::new();

#[test]
#[should_panic(expected = "another SRCU-fast domain")]
fn rcu_ptr_refuses_a_guard_of_another_domain() {
    static P: RcuPtr<u64, Srcu> = RcuPtr::null_srcu(&DOMAIN_A);
    P.publish(7).unwrap();
    let g = DOMAIN_B.read_lock_fast();
    // Before the check, this returned a reference that DOMAIN_A's grace periods did not protect.
    let _ = P.load(&g);
}

#[test]
fn rcu_ptr_accepts_its_own_domain() {
    static P: RcuPtr<u64, Srcu> = RcuPtr::null_srcu(&DOMAIN_A);
    P.publish(9).unwrap();
    let g = DOMAIN_A.read_lock_fast();
    assert_eq!(P.load(&g).copied(), Some(9));
}

// ---------------------------------------------------------------------------------------------------------------
// RCU needs neither the arena nor a slab shard
// ---------------------------------------------------------------------------------------------------------------

fn vm_size_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn child_first_reader_maps_nothing() {
    if !in_child() {
        return;
    }
    let before = vm_size_kib();
    drop(nolock::rcu_read_lock());
    drop(nolock::rcu_read_lock_tasks_trace());
    let after = vm_size_kib();
    // Before, the first reader mapped the 16 GiB arena (and claimed a slab shard).
    assert!(after < before + 64 * 1024, "the first read-side sections mapped {} KiB", after - before);
}

#[test]
fn first_reader_maps_nothing() {
    if in_child() {
        return;
    }
    let (ok, out) = run_child("child_first_reader_maps_nothing", Duration::from_secs(60));
    assert!(ok, "first RCU readers of a process:\n{out}");
}

static CB_RAN: AtomicBool = AtomicBool::new(false);

unsafe fn note_cb(_: std::ptr::NonNull<RcuHead>) {
    CB_RAN.store(true, Ordering::Release);
}

#[test]
fn child_rcu_without_an_arena() {
    if !in_child() {
        return;
    }
    // An address-space limit far below the arena: nolock cannot reserve it.
    let lim = libc::rlimit { rlim_cur: 1 << 30, rlim_max: 1 << 30 };
    // SAFETY: a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
    assert!(nolock::kmalloc_nolock(64, Gfp::NONE).is_none(), "the arena cannot be reserved here");
    let g = nolock::rcu_read_lock();
    assert!(nolock::rcu_read_lock_held());
    drop(g);
    nolock::synchronize_rcu();
    static HEAD: RcuHead = RcuHead::new();
    // SAFETY: a static head, queued once.
    unsafe { nolock::call_rcu(std::ptr::NonNull::from(&HEAD), note_cb) };
    nolock::rcu_barrier();
    assert!(CB_RAN.load(Ordering::Acquire), "the callback ran");
    drop(DOMAIN_A.read_lock_fast());
    DOMAIN_A.synchronize();
    nolock::synchronize_rcu_tasks_trace();
}

#[test]
fn rcu_works_without_an_arena() {
    if in_child() {
        return;
    }
    let (ok, out) = run_child("child_rcu_without_an_arena", Duration::from_secs(60));
    assert!(ok, "RCU with no arena:\n{out}");
}
