//! `fork()` at any instruction of nolock's paths, deterministically: the test thread single-steps nolock
//! operations (x86-64 trap flag, as in `single_step.rs`), and at chosen instruction numbers its SIGTRAP handler
//! forks. The child stays inside the handler for good: the interrupted operation never resumes there, so the
//! child runs on top of whatever that operation left (a busy list, a locked pointer-block slot, a reader word,
//! a grace-period step holding the driver flag, a shrink holding its cache's shrinking right), plus whatever
//! the parent's other threads (the workers, a helper) left at that instant.
//!
//! The child arms `alarm(10)` (a hang is killed by SIGALRM), then exercises nolock: `kmalloc_nolock` and
//! `kfree_nolock` of the stepped code's size classes and others (more than a thread list holds, so refills and
//! flushes run), patterns checked; the objects the stepped code had published (allocated and stamped, not yet
//! freed) must be intact after that (no live object handed out again); a `KmemCache` allocation and free;
//! `kfree_rcu_nolock` and `call_rcu_nolock`, then `rcu_barrier()` (the object must be freed, the callback must
//! have run, and the barrier must not spin on a lock nobody will release: its `sched_yield` calls are counted)
//! and `synchronize_rcu()`; an SRCU-fast read section, `synchronize` and `call_srcu_fast_nolock` + `barrier` of
//! a domain; `nolock::trim()` (every cache shrunk); allocations again; and no debug report. It leaves with
//! `_exit(0)`, or with the number of the step whose check failed. The RCU blocking calls, which would wait for
//! the child's own open RCU read-side section when the interrupted code was inside one (`rcu_read_lock_held()`),
//! are skipped then, as their documentation requires.
//!
//! The parent's handler waits for the child (polling, at most [`CHILD_DEADLINE`]; a child still there then is
//! killed and counted as hung), records how it ended, and returns: stepping goes on. After stepping, the test
//! fails naming the instruction numbers (with the interrupted code's location) and the child's step of every
//! child that failed or hung.
//!
//! Stepped: allocation refills, random-order frees (flushes), `kfree_rcu_nolock` and `call_rcu_nolock`, RCU
//! and SRCU-fast read sections; `synchronize_rcu` (while another thread runs grace periods of the domain the
//! child synchronizes); `KmemCache::shrink`. Not stepped, deterministic: a fork while another thread is parked
//! inside a shrink. Before the fixes that came with this test, children hung (or spun for a second per
//! barrier) in four ways: the interrupted step's RCU driver flag was never taken back (`rcu_barrier` hung); a
//! vanished thread's driver flag of another domain was left too, because the fork child left every domain's
//! flag alone while this thread drove any; the interrupted `kfree_rcu_nolock`'s slot lock made every barrier
//! wait a second for it; and a shrink in progress at the fork (this thread's or a vanished one's) made `trim`
//! wait forever.
//!
//! Instruction numbers are swept with a stride (every `STRIDE`-th trap from an offset, two offsets per
//! operation): a fork costs a few milliseconds here, a trap about 15 µs. `NOLOCK_FORK_STEP_STRIDE=1` (with
//! `--nocapture`) sweeps every instruction, for a survey.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nolock::{Gfp, KmemCache, RcuHead, SrcuFast, kfree_nolock, kfree_rcu_nolock, kmalloc_nolock};

/// How long the parent waits for a child before killing it (the child's own `alarm` fires at 10 s).
const CHILD_DEADLINE: Duration = Duration::from_secs(15);
/// After this many failed or hung children a test forks no more (each hang costs the deadline).
const MAX_BAD: u64 = 4;

static TRAPS: AtomicU64 = AtomicU64::new(0);
/// The handler forks at trap numbers `OFFSET (mod STRIDE)` of the current pass.
static STRIDE: AtomicU64 = AtomicU64::new(u64::MAX);
static OFFSET: AtomicU64 = AtomicU64::new(0);
/// The stepped operation the current pass runs (an index into `OPS`).
static OP: AtomicU32 = AtomicU32::new(0);

static FORKS: AtomicU64 = AtomicU64::new(0);
static CHILD_OK: AtomicU64 = AtomicU64::new(0);
static BAD: AtomicU64 = AtomicU64::new(0);
/// Children that found themselves inside an RCU read-side section (and skipped the RCU blocking calls).
static IN_READER: AtomicU64 = AtomicU64::new(0);
/// The parent's handler could not fork.
static FORK_ERRORS: AtomicU64 = AtomicU64::new(0);
/// The slowest child, in microseconds.
static SLOWEST_US: AtomicU64 = AtomicU64::new(0);

/// Failed or hung children: (trap number, op, how it ended), for the report.
const LOG: usize = 64;
static LOG_TRAP: [AtomicU64; LOG] = [const { AtomicU64::new(0) }; LOG];
static LOG_WHAT: [AtomicU64; LOG] = [const { AtomicU64::new(0) }; LOG];
/// Where the interrupted code was (its next instruction).
static LOG_RIP: [AtomicU64; LOG] = [const { AtomicU64::new(0) }; LOG];
static LOG_N: AtomicUsize = AtomicUsize::new(0);

/// How a child ended, as logged: `END_* << 32 | detail`.
const END_EXIT: u64 = 1; // detail: the exit code (the failed step)
const END_SIGNAL: u64 = 2; // detail: the signal
const END_HUNG: u64 = 3; // detail: the step it was in when killed

/// The stepped operations, for the report.
const OPS: [&str; 4] = [
    "kmalloc refill, random-order frees (flushes), kfree_rcu_nolock, call_rcu_nolock, RCU and SRCU-fast readers",
    "synchronize_rcu",
    "KmemCache::shrink",
    "(not stepped) another thread parked inside KmemCache::shrink",
];

/// Tests here take turns: the trap handler and its counters are process-wide.
static TURN: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------------------------------------------------
// Shared with the children
// ------------------------------------------------------------------------------------------------------------

/// Objects the stepped code holds: an address is stored (Release) only after the object is stamped with its
/// index, and taken away before the object is freed. In a child the interrupted code is frozen, so every
/// published object is live and stamped there.
const PUBLISHED: usize = 1024;
static PUB_ADDR: [AtomicUsize; PUBLISHED] = [const { AtomicUsize::new(0) }; PUBLISHED];
static PUB_LEN: [AtomicUsize; PUBLISHED] = [const { AtomicUsize::new(0) }; PUBLISHED];

/// The SRCU-fast domain the stepped code reads under, and the one the child synchronizes (the interrupted code
/// may be inside a section of the first: synchronizing it would wait for the child itself).
static STEP_SRCU: SrcuFast = SrcuFast::new();
static CHILD_SRCU: SrcuFast = SrcuFast::new();

/// A cache created before stepping, for the child's cache allocations and its `kfree_rcu_nolock` check.
static CACHE: OnceLock<KmemCache> = OnceLock::new();

fn cache() -> &'static KmemCache {
    CACHE.get_or_init(|| KmemCache::new("fork-step", Layout::new::<[u64; 6]>()).expect("cache"))
}

/// A page shared with the children: the step the current child is in.
fn child_step() -> &'static AtomicU32 {
    static PAGE: OnceLock<usize> = OnceLock::new();
    let p = *PAGE.get_or_init(|| {
        // SAFETY: a fresh anonymous shared mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the shared page");
        p as usize
    });
    // SAFETY: a page-aligned, zeroed mapping that is never unmapped; a zeroed AtomicU32 is valid.
    unsafe { &*(p as *const AtomicU32) }
}

// ------------------------------------------------------------------------------------------------------------
// The parent's trap handler
// ------------------------------------------------------------------------------------------------------------

extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted context.
    if !unsafe { testkit::step::still_stepping(ctx) } {
        return;
    }
    // SAFETY: as above.
    let uc = unsafe { &*(ctx as *const libc::ucontext_t) };
    let n = TRAPS.fetch_add(1, Ordering::Relaxed);
    if n % STRIDE.load(Ordering::Relaxed) != OFFSET.load(Ordering::Relaxed) || BAD.load(Ordering::Relaxed) >= MAX_BAD {
        return;
    }
    let _errno = testkit::ErrnoGuard::new();
    fork_here(n, uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64);
}

/// Fork; the child runs [`child`] and never returns; the parent waits for it and records how it ended.
fn fork_here(n: u64, rip: u64) {
    child_step().store(0, Ordering::Relaxed);
    let t0 = Instant::now();
    // SAFETY: the child runs `child` only, which leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child();
    }
    if pid < 0 {
        FORK_ERRORS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    FORKS.fetch_add(1, Ordering::Relaxed);
    let mut status = 0;
    let mut nap = 50u64;
    let end = loop {
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status) as u64 | END_EXIT << 32
            } else if libc::WTERMSIG(status) == libc::SIGALRM {
                u64::from(child_step().load(Ordering::Relaxed)) | END_HUNG << 32
            } else {
                libc::WTERMSIG(status) as u64 | END_SIGNAL << 32
            };
        }
        if r < 0 || t0.elapsed() > CHILD_DEADLINE {
            let at = child_step().load(Ordering::Relaxed);
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            break u64::from(at) | END_HUNG << 32;
        }
        std::thread::sleep(Duration::from_micros(nap));
        nap = (nap * 2).min(1000);
    };
    SLOWEST_US.fetch_max(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
    if end == END_EXIT << 32 {
        CHILD_OK.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if end == (END_EXIT << 32 | IN_READER_EXIT as u64) {
        CHILD_OK.fetch_add(1, Ordering::Relaxed);
        IN_READER.fetch_add(1, Ordering::Relaxed);
        return;
    }
    BAD.fetch_add(1, Ordering::Relaxed);
    let i = LOG_N.fetch_add(1, Ordering::Relaxed);
    if i < LOG {
        LOG_TRAP[i].store(n | u64::from(OP.load(Ordering::Relaxed)) << 56, Ordering::Relaxed);
        LOG_WHAT[i].store(end, Ordering::Relaxed);
        LOG_RIP[i].store(rip, Ordering::Relaxed);
    }
}

// ------------------------------------------------------------------------------------------------------------
// The child
// ------------------------------------------------------------------------------------------------------------

/// Steps of the child; a failed check exits with its step number, a hang is reported with the step it was in.
const STEPS: [&str; 14] = [
    "done",
    "kmalloc/kfree rounds (refills, flushes; classes 16 B to 4 KiB)",
    "the stepped code's published objects intact",
    "KmemCache alloc/free",
    "kfree_rcu_nolock + call_rcu_nolock",
    "rcu_barrier (no long spin, object freed, callback run)",
    "synchronize_rcu",
    "SRCU-fast read section + synchronize",
    "call_srcu_fast_nolock + barrier (no long spin, callback run)",
    "trim",
    "kmalloc/kfree rounds after trim",
    "the stepped code's published objects intact at the end",
    "debug reports",
    "panicked",
];
/// Exit code of a child that passed with the RCU blocking calls skipped (it was inside an RCU reader).
const IN_READER_EXIT: i32 = 100;

/// Counts the `sched_yield` calls of the thread that asks for it. The test binary's own `sched_yield` interposes
/// libc's (the static link binds nolock's and std's calls to it), as in `fork_rcu.rs`.
mod yields {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};

    thread_local! {
        /// Whether this thread's `sched_yield` calls are counted.
        pub static COUNT: Cell<bool> = const { Cell::new(false) };
    }
    /// Counted `sched_yield` calls.
    pub static YIELDS: AtomicU64 = AtomicU64::new(0);

    /// `sched_yield(2)`, counted, then made with a raw system call.
    #[unsafe(no_mangle)]
    pub extern "C" fn sched_yield() -> libc::c_int {
        if COUNT.with(Cell::get) {
            YIELDS.fetch_add(1, Ordering::Relaxed);
        }
        let r: i64;
        // SAFETY: sched_yield takes no argument and touches no memory; the `syscall` instruction clobbers rcx
        // and r11 only.
        unsafe {
            core::arch::asm!(
                "syscall",
                inlateout("rax") libc::SYS_sched_yield => r,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            )
        };
        r as libc::c_int // it cannot fail (always 0)
    }
}

/// More `sched_yield` calls than this in one barrier of the child means it waited for a lock that nobody will
/// release: the claim protocol gives up on a busy owner only after 100,000 yields and a second. (A barrier with
/// nothing to wait for backs off with at most ten yields between sleeps; it may yield longer while the child's
/// worker frees a block, which a loaded machine can stretch, hence the margin.)
const YIELD_LIMIT: u64 = 90_000;

/// Run `f` counting this thread's `sched_yield` calls; false if it made more than [`YIELD_LIMIT`].
fn few_yields(f: impl FnOnce()) -> bool {
    yields::COUNT.with(|c| c.set(true));
    let before = yields::YIELDS.load(Ordering::Relaxed);
    f();
    yields::COUNT.with(|c| c.set(false));
    yields::YIELDS.load(Ordering::Relaxed) - before <= YIELD_LIMIT
}

static CHILD_CB: AtomicU32 = AtomicU32::new(0);
static CHILD_HEADS: [RcuHead; 2] = [const { RcuHead::new() }; 2];

unsafe fn child_cb(_: NonNull<RcuHead>) {
    CHILD_CB.fetch_add(1, Ordering::Release);
}

fn child() -> ! {
    // SAFETY: `alarm` is async-signal-safe; SIGALRM's default action ends a hung child. Unblock it in case the
    // trap handler's mask holds it.
    unsafe {
        let set = testkit::signal::sigset_of(&[libc::SIGALRM]);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, core::ptr::null_mut());
        libc::alarm(10);
    }
    let code = std::panic::catch_unwind(child_checks).unwrap_or(13);
    // SAFETY: leaves the child at once: no destructors, no atexit handlers, nothing of the parent's flushed.
    unsafe { libc::_exit(code) }
}

fn step(s: u32) {
    child_step().store(s, Ordering::Relaxed);
}

/// Sizes of the child's rounds: mostly the stepped code's 64 B class (more than its list holds), the others
/// it used, and some it did not.
fn child_size(i: usize) -> usize {
    match i % 12 {
        0 => 16,
        1 => 96,
        2 => 4096,
        3 => 1000,
        4 => 8,
        5 => 256,
        _ => 64,
    }
}

/// Allocate `N` objects, stamp them, check them all (a duplicate would have been stamped twice), free them in
/// a scrambled order. False on a failed allocation or a damaged object.
fn child_round(seed: u64) -> bool {
    const N: usize = 1200;
    let mut held = [0usize; N];
    for (i, h) in held.iter_mut().enumerate() {
        let size = child_size(i);
        let Some(p) = kmalloc_nolock(size, Gfp::NONE) else { return false };
        // SAFETY: a fresh object of `size` bytes (the head of a large one).
        unsafe { testkit::fill(p.as_ptr(), size.min(64), seed + i as u64) };
        *h = p.as_ptr() as usize;
    }
    for (i, &h) in held.iter().enumerate() {
        // SAFETY: our live object, stamped above.
        if unsafe { testkit::check(h as *const u8, child_size(i).min(64), Some(seed + i as u64), u64::MAX) }.is_err() {
            return false;
        }
    }
    // A scrambled order: a stride coprime with N.
    for k in 0..N {
        let i = (k * 7 + seed as usize) % N;
        // SAFETY: our object, freed once.
        unsafe { kfree_nolock(held[i] as *mut u8) };
    }
    true
}

fn published_intact() -> bool {
    PUB_ADDR.iter().zip(&PUB_LEN).enumerate().all(|(i, (a, l))| {
        let a = a.load(Ordering::Acquire);
        // SAFETY: a published object is live and stamped with its index over `l` bytes (see `PUB_ADDR`).
        a == 0 || unsafe { testkit::check(a as *const u8, l.load(Ordering::Relaxed), Some(i as u64), u64::MAX) }.is_ok()
    })
}

fn child_checks() -> i32 {
    let reports = nolock::debug::reports();
    let in_reader = nolock::rcu_read_lock_held();
    step(1);
    for r in 0..2 {
        if !child_round(1 << 40 | r << 20) {
            return 1;
        }
    }
    step(2);
    if !published_intact() {
        return 2;
    }
    step(3);
    let c = cache();
    let mut objs = [0usize; 100];
    for (i, o) in objs.iter_mut().enumerate() {
        let Some(p) = c.alloc_nolock(Gfp::NONE) else { return 3 };
        // SAFETY: a fresh 48-byte object.
        unsafe { testkit::fill(p.as_ptr(), 48, 2 << 40 | i as u64) };
        *o = p.as_ptr() as usize;
    }
    for (i, &o) in objs.iter().enumerate() {
        // SAFETY: our live object, stamped above.
        if unsafe { testkit::check(o as *const u8, 48, Some(2 << 40 | i as u64), u64::MAX) }.is_err() {
            return 3;
        }
        // SAFETY: our object of this cache, freed once.
        unsafe { c.free_nolock(NonNull::new_unchecked(o as *mut u8)) };
    }
    step(4);
    let frees = c.stats().frees;
    let Some(o) = c.alloc_nolock(Gfp::NONE) else { return 4 };
    let Some(k) = kmalloc_nolock(64, Gfp::NONE) else { return 4 };
    // SAFETY: fresh objects, retired once, never touched again; their first 16 bytes become the heads. The
    // callback's head is a static used once in this child.
    unsafe {
        kfree_rcu_nolock(o.as_ptr(), o.cast());
        kfree_rcu_nolock(k.as_ptr(), k.cast());
        nolock::call_rcu_nolock(NonNull::from(&CHILD_HEADS[0]), child_cb);
    }
    if !in_reader {
        step(5);
        // Not waiting for a lock of the interrupted code, which will never release it.
        if !few_yields(nolock::rcu_barrier) {
            return 5;
        }
        if CHILD_CB.load(Ordering::Acquire) != 1 || c.stats().frees != frees + 1 {
            return 5;
        }
        step(6);
        nolock::synchronize_rcu();
    }
    step(7);
    drop(CHILD_SRCU.read_lock_fast());
    CHILD_SRCU.synchronize();
    step(8);
    // SAFETY: a static head used once in this child.
    unsafe { CHILD_SRCU.call_srcu_fast_nolock(NonNull::from(&CHILD_HEADS[1]), child_cb) };
    if !few_yields(|| CHILD_SRCU.barrier()) {
        return 8;
    }
    if CHILD_CB.load(Ordering::Acquire) != 1 + u32::from(!in_reader) {
        return 8;
    }
    step(9);
    nolock::trim();
    // Every object of the shrink tests' other cache is free, so trim releases every one of its slabs — in the
    // child of `fork_while_another_thread_shrinks` too, where the shrink that vanished at the fork held one
    // empty slab off the lists and had not reached the others (before the fork child adopted what it left, 1
    // and 24 slabs stayed).
    if OTHER_CACHE.get().is_some_and(|c| c.stats().slabs != 0) {
        return 9;
    }
    step(10);
    if !child_round(3 << 40) {
        return 10;
    }
    step(11);
    if !published_intact() {
        return 11;
    }
    step(12);
    if nolock::debug::reports() != reports {
        return 12;
    }
    step(0);
    if in_reader { IN_READER_EXIT } else { 0 }
}

// ------------------------------------------------------------------------------------------------------------
// The stepped code
// ------------------------------------------------------------------------------------------------------------

static CALLBACKS: AtomicU64 = AtomicU64::new(0);
/// Stepped-code failures (recorded while stepping, asserted after: no panic while stepping).
static STEP_FAILED: AtomicI32 = AtomicI32::new(0);

fn count_callback(head: NonNull<RcuHead>) {
    CALLBACKS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the head sits at the start of a kmalloc object given to call_rcu_nolock; the callback owns it.
    unsafe { kfree_nolock(head.as_ptr().cast()) };
}

/// The stepped code's objects: mostly 64 B (more than a thread list holds: refills, then flushes when freed),
/// some 16 B and 4 KiB.
fn size_of_obj(i: usize) -> usize {
    match i % 16 {
        0 => 16,
        5 => 4096,
        _ => 64,
    }
}

/// Bytes of each object stamped (all of a small one, the head of a large one).
const FILLED: usize = 32;
/// Objects the stepped code retires through RCU (alternately `kfree_rcu_nolock` and `call_rcu_nolock`).
const RCU_OBJS: usize = 40;

/// Stepped: allocate `objects` objects, stamping and publishing each, with RCU and SRCU-fast read sections in
/// between; then unpublish, check and free them in random order, the first `RCU_OBJS` through RCU.
fn stepped_objects(objects: usize, seed: u64) {
    assert!(objects <= PUBLISHED);
    let mut rng = testkit::Rng::new(seed);
    let mut order: Vec<usize> = (0..objects).collect();
    for i in (1..objects).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut objs: Vec<usize> = Vec::with_capacity(objects);
    let cb0 = CALLBACKS.load(Ordering::Relaxed);
    testkit::step::start();
    for i in 0..objects {
        let size = size_of_obj(i);
        let Some(p) = kmalloc_nolock(size, Gfp::NONE) else {
            STEP_FAILED.store(1, Ordering::Relaxed);
            break;
        };
        // SAFETY: a fresh object of at least `FILLED.min(size)` bytes.
        unsafe { testkit::fill(p.as_ptr(), FILLED.min(size), i as u64) };
        PUB_LEN[i].store(FILLED.min(size), Ordering::Relaxed);
        // Release: the stamp before the address (a child may interrupt between them).
        PUB_ADDR[i].store(p.as_ptr() as usize, Ordering::Release);
        objs.push(p.as_ptr() as usize);
        if i % 64 == 17 {
            let g = nolock::rcu_read_lock();
            std::hint::black_box(&g);
            drop(g);
        }
        if i % 64 == 41 {
            let g = STEP_SRCU.read_lock_fast();
            std::hint::black_box(&g);
            drop(g);
        }
    }
    for (k, &i) in order.iter().enumerate() {
        if i >= objs.len() {
            continue;
        }
        let size = size_of_obj(i);
        // AcqRel: unpublished before it is freed.
        let a = PUB_ADDR[i].swap(0, Ordering::AcqRel);
        // SAFETY: a live object whose first `FILLED.min(size)` bytes hold pattern `i`.
        if unsafe { testkit::check(a as *const u8, FILLED.min(size), Some(i as u64), u64::MAX) }.is_err() {
            STEP_FAILED.store(2, Ordering::Relaxed);
        }
        if k % 64 == 3 {
            let g = nolock::rcu_read_lock();
            std::hint::black_box(&g);
            drop(g);
        }
        if k % 64 == 35 {
            let g = STEP_SRCU.read_lock_fast();
            std::hint::black_box(&g);
            drop(g);
        }
        if k < RCU_OBJS && size >= 64 {
            // SAFETY: a kmalloc object of at least 64 bytes; its first 16 bytes become the head, which nothing
            // else uses from here on.
            unsafe {
                let head = NonNull::new_unchecked(a as *mut RcuHead);
                if k % 2 == 0 {
                    kfree_rcu_nolock(a as *mut u8, head);
                } else {
                    nolock::call_rcu_nolock(head, count_callback);
                }
            }
        } else {
            // SAFETY: from kmalloc_nolock, freed once.
            unsafe { kfree_nolock(a as *mut u8) };
        }
    }
    testkit::step::stop();
    assert_eq!(STEP_FAILED.load(Ordering::Relaxed), 0, "the stepped code failed (1: allocation, 2: damaged object)");
    nolock::rcu_barrier();
    let want = order[..RCU_OBJS].iter().enumerate().filter(|&(k, &i)| k % 2 == 1 && size_of_obj(i) >= 64).count();
    assert_eq!(CALLBACKS.load(Ordering::Relaxed) - cb0, want as u64, "each call_rcu callback runs once");
}

/// Stepped: `synchronize_rcu` (a grace period driven by this thread or the worker, `membarrier` included).
fn stepped_synchronize(times: usize) {
    testkit::step::start();
    for _ in 0..times {
        nolock::synchronize_rcu();
    }
    testkit::step::stop();
}

/// A cache another thread shrinks while the test thread steps (the child's `trim` shrinks it too).
static OTHER_CACHE: OnceLock<KmemCache> = OnceLock::new();

fn other_cache() -> &'static KmemCache {
    OTHER_CACHE.get_or_init(|| KmemCache::new("fork-step-other", Layout::new::<[u64; 8]>()).expect("cache"))
}

/// Allocate and free `n` objects of `c`: its slabs are then empty, for a shrink to release.
fn empty_slabs(c: &KmemCache, n: usize) {
    let objs: Vec<NonNull<u8>> = (0..n).map(|_| c.alloc_nolock(Gfp::NONE).expect("memory")).collect();
    for o in objs {
        // SAFETY: allocated above from `c`, freed once.
        unsafe { c.free_nolock(o) };
    }
}

/// Stepped: `KmemCache::shrink` of a cache with empty slabs; `rounds` times.
fn stepped_shrink(rounds: usize) {
    for _ in 0..rounds {
        empty_slabs(cache(), 600);
        testkit::step::start();
        cache().shrink();
        testkit::step::stop();
    }
}

// ------------------------------------------------------------------------------------------------------------
// Driver
// ------------------------------------------------------------------------------------------------------------

fn stride_override() -> Option<u64> {
    std::env::var("NOLOCK_FORK_STEP_STRIDE").ok().and_then(|s| s.parse().ok())
}

fn setup() {
    for c in [&FORKS, &CHILD_OK, &BAD, &IN_READER, &FORK_ERRORS, &SLOWEST_US] {
        c.store(0, Ordering::SeqCst);
    }
    LOG_N.store(0, Ordering::SeqCst);
    // The yield counter works (else the children's spin checks could not fail).
    assert!(!few_yields(|| (0..=YIELD_LIMIT).for_each(|_| std::thread::yield_now())), "sched_yield not interposed");
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    // Warm up: the thread's slot and lists, the arena, the RCU machinery, both domains, the cache, the shared
    // page (system calls allowed here).
    nolock::init();
    for s in [8usize, 16, 64, 96, 256, 1000, 4096] {
        let p = kmalloc_nolock(s, Gfp::NONE).unwrap();
        // SAFETY: just allocated.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
    let o = cache().alloc_nolock(Gfp::NONE).unwrap();
    // SAFETY: just allocated from this cache.
    unsafe { cache().free_nolock(o) };
    drop(STEP_SRCU.read_lock_fast());
    drop(CHILD_SRCU.read_lock_fast());
    CHILD_SRCU.synchronize();
    nolock::synchronize_rcu();
    child_step();
}

/// Run `body` stepped, forking at every `stride`-th trap from `offset`; returns the traps it took.
fn pass(op: u32, stride: u64, offset: u64, body: impl FnOnce()) -> u64 {
    OP.store(op, Ordering::SeqCst);
    STRIDE.store(stride, Ordering::SeqCst);
    OFFSET.store(offset % stride, Ordering::SeqCst);
    let (t0, f0, w) = (TRAPS.load(Ordering::Relaxed), FORKS.load(Ordering::Relaxed), Instant::now());
    // Trap numbers count from the start of this pass.
    TRAPS.store(0, Ordering::SeqCst);
    body();
    let traps = TRAPS.load(Ordering::Relaxed);
    TRAPS.store(t0 + traps, Ordering::SeqCst);
    STRIDE.store(u64::MAX, Ordering::SeqCst);
    eprintln!(
        "fork_step: {}: {traps} traps, a fork every {stride} from {offset}: {} forks in {:.1?}",
        OPS[op as usize],
        FORKS.load(Ordering::Relaxed) - f0,
        w.elapsed()
    );
    traps
}

fn describe_failures() -> Vec<String> {
    let n = LOG_N.load(Ordering::Relaxed).min(LOG);
    (0..n)
        .map(|i| {
            let t = LOG_TRAP[i].load(Ordering::Relaxed);
            let w = LOG_WHAT[i].load(Ordering::Relaxed);
            let (trap, op) = (t & ((1 << 56) - 1), (t >> 56) as usize);
            let d = w & 0xffff_ffff;
            let how = match w >> 32 {
                END_EXIT => format!("failed step {d} ({})", STEPS.get(d as usize).copied().unwrap_or("?")),
                END_HUNG => format!("hung in step {d} ({})", STEPS.get(d as usize).copied().unwrap_or("?")),
                _ => format!("killed by signal {d}"),
            };
            let rip = LOG_RIP[i].load(Ordering::Relaxed);
            let mut at = String::new();
            backtrace::resolve(rip as *mut std::ffi::c_void, |sym| {
                if at.is_empty() {
                    let line = sym.lineno().map(|l| format!(":{l}")).unwrap_or_default();
                    let file = sym.filename().and_then(|f| f.file_name()).map(|f| f.to_string_lossy().into_owned());
                    at = format!(
                        "{} ({}{line})",
                        sym.name().map(|n| n.to_string()).unwrap_or_default(),
                        file.unwrap_or_default()
                    );
                }
            });
            format!("instruction {trap} of '{}' (at {rip:#x} {at}): child {how}", OPS[op])
        })
        .collect()
}

fn check_children(min_forks: u64) {
    let forks = FORKS.load(Ordering::Relaxed);
    let bad = describe_failures();
    eprintln!(
        "fork_step: {forks} children, {} ok ({} inside an RCU reader), {} failed or hung; slowest child {} ms",
        CHILD_OK.load(Ordering::Relaxed),
        IN_READER.load(Ordering::Relaxed),
        BAD.load(Ordering::Relaxed),
        SLOWEST_US.load(Ordering::Relaxed) / 1000
    );
    for b in &bad {
        eprintln!("  {b}");
    }
    assert!(bad.is_empty() && BAD.load(Ordering::Relaxed) == 0, "fork children failed or hung: {bad:#?}");
    assert_eq!(FORK_ERRORS.load(Ordering::Relaxed), 0, "fork failed in the trap handler");
    assert!(forks >= min_forks, "only {forks} forks (expected at least {min_forks})");
}

/// Fork at instructions of allocation refills, random-order frees (flushes), `kfree_rcu_nolock` and
/// `call_rcu_nolock` enqueues, and RCU and SRCU-fast read sections; two passes at different offsets.
#[test]
fn fork_at_instructions_of_alloc_free_and_retire() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    setup();
    let stride = stride_override().unwrap_or(251);
    let traps = pass(0, stride, 0, || stepped_objects(600, 0x5eed));
    assert!(traps > 50_000, "single-stepping ran ({traps} traps)");
    pass(0, stride, stride / 2, || stepped_objects(600, 0x5eed));
    check_children(traps / stride);
}

/// Fork at instructions of `synchronize_rcu`: grace-period steps this thread drives (the child inherits its
/// driver flag), its waits for the worker. Meanwhile another thread runs grace periods of the domain the child
/// synchronizes, so the fork also lands while a thread that will not exist in the child drives that domain.
#[test]
fn fork_at_instructions_of_synchronize_rcu() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    setup();
    let stride = stride_override().unwrap_or(7);
    let stop = AtomicBool::new(false);
    let traps = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                CHILD_SRCU.synchronize();
            }
        });
        let traps = pass(1, stride, 0, || stepped_synchronize(24));
        pass(1, stride, stride / 2, || stepped_synchronize(24));
        stop.store(true, Ordering::Relaxed);
        traps
    });
    assert!(traps > 2_000, "single-stepping ran ({traps} traps)");
    check_children(traps / stride);
}

/// Fork at instructions of `KmemCache::shrink`: the child inherits the cache's `shrinking` flag from the
/// interrupted shrink, and its `trim` shrinks every cache.
#[test]
fn fork_at_instructions_of_shrink() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    setup();
    let stride = stride_override().unwrap_or(7);
    let traps = pass(2, stride, 0, || stepped_shrink(2));
    pass(2, stride, stride / 2, || stepped_shrink(2));
    assert!(traps > 1_000, "single-stepping ran ({traps} traps)");
    check_children(traps / stride);
}

mod parking {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use nolock::hooks::Point;

    thread_local! {
        /// Park at this thread's next shrink step.
        pub static PARK_HERE: Cell<bool> = const { Cell::new(false) };
    }
    pub static PARKED: AtomicBool = AtomicBool::new(false);
    pub static UNPARK: AtomicBool = AtomicBool::new(false);

    /// The hook: a thread that asked for it parks inside its shrink (holding the cache's shrinking right and a
    /// slab off the lists) until `UNPARK`.
    pub fn park_hook(at: Point) {
        if !matches!(at, Point::Shrink) || !PARK_HERE.with(|p| p.replace(false)) {
            return;
        }
        PARKED.store(true, Ordering::Release);
        while !UNPARK.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Unparks and removes the hook when dropped (also when the test fails).
    pub struct Unpark;

    impl Drop for Unpark {
        fn drop(&mut self) {
            UNPARK.store(true, Ordering::Release);
            nolock::hooks::set_hook(None);
        }
    }
}

/// Deterministic: another thread is inside `KmemCache::shrink` (parked there by the test hook, holding the
/// cache's shrinking right) when the test thread forks. That thread does not exist in the child, whose `trim`
/// shrinks every cache: it must not wait for the shrink that will never end.
#[test]
fn fork_while_another_thread_shrinks() {
    use parking::{PARK_HERE, PARKED, UNPARK, Unpark, park_hook};
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    setup();
    PARKED.store(false, Ordering::Relaxed);
    UNPARK.store(false, Ordering::Relaxed);
    let unpark = Unpark;
    nolock::hooks::set_hook(Some(park_hook));
    let t = std::thread::spawn(|| {
        empty_slabs(other_cache(), 2000);
        PARK_HERE.with(|p| p.set(true));
        other_cache().shrink();
        !PARK_HERE.with(|p| p.get())
    });
    let start = Instant::now();
    while !PARKED.load(Ordering::Acquire) {
        assert!(!t.is_finished() && start.elapsed() < Duration::from_secs(20), "the thread never reached the hook");
        std::thread::sleep(Duration::from_millis(1));
    }
    OP.store(3, Ordering::SeqCst);
    fork_here(0, 0);
    drop(unpark);
    assert!(t.join().expect("thread"), "the thread did not park inside its shrink");
    check_children(1);
}
