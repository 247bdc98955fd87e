//! `fork()` during RCU storms (hardening issue, item 3): the child must come up with one thread and a
//! consistent RCU state, whatever the parent's other threads were doing at the instant of the fork.
//!
//! The parent runs, for as long as its forks take (a few seconds), threads that
//! - hold RCU read-side sections (one thread with long ones, one with short ones);
//! - hold SRCU-fast sections of a static domain and Tasks Trace sections, sleeping inside one in 16;
//! - flood retirements: `kfree_rcu_nolock`, `kfree_srcu_fast_nolock` (both domains), `call_rcu_nolock`,
//!   `call_srcu_fast_nolock`, `call_rcu`, `call_srcu_fast`, `call_rcu_tasks_trace`;
//! - run `synchronize_rcu`, `rcu_barrier`, the static domain's `synchronize` and `barrier`, the Tasks Trace
//!   ones, `cond_synchronize_rcu` and a type-safe cache's `shrink` in loops (two threads, so grace periods and
//!   barriers are in flight at every fork);
//! - and, in every one of those threads, a POSIX-timer `SIGUSR1` storm whose handler enters RCU and SRCU-fast
//!   sections, allocates, and retires objects every way there is.
//!
//! Meanwhile the test thread forks [`FORKS`] times; every other time it first leaves a partial pointer block
//! and queued callbacks of its own. Each child runs every `synchronize_*`, every barrier, `kfree_rcu_nolock`
//! and `kfree_srcu_fast_nolock` of a fresh object followed by the barrier (the object must then be freed),
//! `call_rcu` / `call_srcu_fast` / `call_rcu_tasks_trace` followed by the barrier (the callback must have
//! run), `start_poll` + `poll` in both flavours, allocations and frees in a type-safe cache the parent was
//! churning (then `shrink` and `rcu_barrier`), and a fresh `SLAB_TYPESAFE_BY_RCU` cache filled, emptied and
//! destroyed (every slab released after its grace period, no live object), then `_exit(0)`. The child writes
//! the step it is in to a shared page; the parent waits at most [`CHILD_DEADLINE`] for it, and if it hangs
//! kills it and fails naming the step. A second test forks from a parent with no readers and no storm (only
//! retire floods and grace periods in flight).
//!
//! The child runs nolock, raw memory accesses and raw system calls only (no std lock another thread might have
//! held at the fork, no printing), and leaves with `_exit`. The parent fails on any hung or failed child and
//! on any debug report, and at the end checks that it lost nothing: every object of the flood cache was freed.
//!
//! On the code before commit 63639a6 (the per-thread slot rewrite) every child of the storm test hangs in its
//! first `synchronize_rcu`, and the test without readers ends in double-free reports and a crash of the test
//! process. `NOLOCK_FORK_RCU_SURVEY=1` makes the storm tests run all their forks with a 5 s deadline and print
//! how many children hung at which step, instead of stopping at the first.
//!
//! After 63639a6 one thing was left, pinned down deterministically by the last test
//! (`fork_with_kfree_slot_locked_by_a_vanished_thread`): a `kfree_rcu` pointer-block slot whose lock a
//! vanished thread held at the fork (it was inside `kfree_*_nolock`) stayed locked in the child, and every
//! barrier and every aging tick of the child's grace-period worker waited 100,000 `sched_yield`s for it (seconds
//! per barrier under the storm's load, past the 20 s deadline). The fork child handler now clears those locks
//! and queues what the slots hold (a slot never holds a block that is already queued).

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nolock::{
    Gfp, KmemCache, RCU_TASKS_TRACE, RcuHead, SlabFlags, SrcuFast, call_rcu, call_rcu_nolock, call_rcu_tasks_trace,
    cond_synchronize_rcu, kfree_rcu_nolock, kfree_srcu_fast_nolock, poll_state_synchronize_rcu, rcu_barrier,
    rcu_barrier_tasks_trace, rcu_read_lock, rcu_read_lock_tasks_trace, start_poll_synchronize_rcu, synchronize_rcu,
    synchronize_rcu_tasks_trace,
};
use testkit::{AltStack, ErrnoGuard, ThreadTimer};

/// Forks per test.
const FORKS: usize = 40;
/// How long the parent waits for a child before it kills it and fails.
const CHILD_DEADLINE: Duration = Duration::from_secs(20);
/// Per-thread timer period: 7 storm threads at 200 µs ask for 35,000 signals/s.
const TIMER_PERIOD: Duration = Duration::from_micros(200);
/// Objects of the flood cache allowed to wait for their grace period before the flood thread slows down.
const FLOOD_BACKLOG: u64 = 200_000;

/// The static SRCU-fast domain of the test.
static DOMAIN: SrcuFast = SrcuFast::new();

static SERIAL: Mutex<()> = Mutex::new(());
static STOP: AtomicBool = AtomicBool::new(false);
static SIGNALS: AtomicU64 = AtomicU64::new(0);

/// Sets `STOP` when dropped, so a failing assertion also lets every helper thread finish.
struct StopOnDrop;

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        STOP.store(true, Ordering::Relaxed);
    }
}

/// The objects retired by the floods and the handlers.
#[repr(C)]
struct Obj {
    tag: AtomicU64,
    seq: AtomicU64,
    head: RcuHead,
    data: [AtomicU64; 4],
}
const _: () = assert!(core::mem::size_of::<Obj>() == 64);
const HEAD_OFFSET: usize = core::mem::offset_of!(Obj, head);
const TAG: u64 = 0x464f_524b_5243_5530;

/// Where every retired object comes from: at the end, allocations must equal frees (nothing was lost).
fn flood_cache() -> &'static KmemCache {
    static C: OnceLock<KmemCache> = OnceLock::new();
    C.get_or_init(|| KmemCache::new("fork-rcu-flood", Layout::new::<Obj>()).expect("flood cache"))
}

/// The flood cache once created (for signal handlers and callbacks: one atomic load).
static FLOOD: AtomicPtr<KmemCache> = AtomicPtr::new(core::ptr::null_mut());

fn flood() -> Option<&'static KmemCache> {
    let p = FLOOD.load(Ordering::Acquire);
    // SAFETY: `FLOOD` only ever holds the address of the `OnceLock`'s cache, which lives for the whole program.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// A type-safe cache the parent's threads churn, so that its empty slabs wait for grace periods at the forks.
fn typesafe_cache() -> &'static KmemCache {
    static C: OnceLock<KmemCache> = OnceLock::new();
    C.get_or_init(|| {
        KmemCache::builder("fork-rcu-ts", Layout::new::<[u64; 12]>())
            .flags(SlabFlags::TYPESAFE_BY_RCU)
            .freeptr_offset(8)
            .build()
            .expect("type-safe cache")
    })
}

/// Allocate a flood object, or `None` when memory is exhausted.
fn new_obj(c: &KmemCache, seq: u64) -> Option<NonNull<Obj>> {
    let p = c.alloc_nolock(Gfp::NONE)?.cast::<Obj>();
    // SAFETY: a fresh object of the flood cache, sized and aligned for `Obj` (all atomics).
    let o = unsafe { p.as_ref() };
    o.tag.store(TAG, Ordering::Relaxed);
    o.seq.store(seq, Ordering::Relaxed);
    Some(p)
}

fn head_of(o: NonNull<Obj>) -> NonNull<RcuHead> {
    // SAFETY: the head field of a live object.
    unsafe { NonNull::new_unchecked(core::ptr::addr_of_mut!((*o.as_ptr()).head)) }
}

/// Grace-period callback of flood objects: free the object into the flood cache.
unsafe fn free_obj(h: NonNull<RcuHead>) {
    let o = (h.as_ptr() as usize - HEAD_OFFSET) as *mut u8;
    let c = flood().expect("flood objects exist only once the cache does");
    // SAFETY: `h` is the head of a flood object retired once, whose grace period has ended.
    unsafe { c.free_nolock(NonNull::new_unchecked(o)) };
}

/// Retire `o` in way `how` (0..=5: the any-context ones; 6..=7 also the normal-context ones).
///
/// # Safety
/// `o` is a live flood object owned by the caller; it is not used afterwards.
unsafe fn retire(o: NonNull<Obj>, how: u64) {
    let (p, h) = (o.as_ptr().cast::<u8>(), head_of(o));
    // SAFETY: the caller hands the object over; the callbacks free it into its cache.
    unsafe {
        match how {
            0 => kfree_rcu_nolock(p, h),
            1 => kfree_srcu_fast_nolock(&DOMAIN, p, h),
            2 => kfree_srcu_fast_nolock(&RCU_TASKS_TRACE, p, h),
            3 => call_rcu_nolock(h, free_obj),
            4 => DOMAIN.call_srcu_fast_nolock(h, free_obj),
            5 => call_rcu_tasks_trace(h, free_obj),
            6 => call_rcu(h, free_obj),
            _ => DOMAIN.call_srcu_fast(h, free_obj),
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// The parent's storm
// ------------------------------------------------------------------------------------------------------------

/// The storm handler: RCU and SRCU-fast sections, an allocation and a retirement of each kind in turn.
extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    let n = SIGNALS.fetch_add(1, Ordering::Relaxed);
    let Some(c) = flood() else { return };
    let _r = rcu_read_lock();
    let _s = DOMAIN.read_lock_fast();
    let _t = n.is_multiple_of(4).then(rcu_read_lock_tasks_trace);
    if let Some(o) = new_obj(c, n) {
        // SAFETY: our fresh object, retired once.
        unsafe { retire(o, n % 6) };
    }
    // A type-safe object too: allocated and freed at once (its slab may be released later).
    if n.is_multiple_of(3)
        && let Some(t) = typesafe_cache().alloc_nolock(Gfp::NONE)
    {
        // SAFETY: our object of this cache, freed once.
        unsafe { typesafe_cache().free_nolock(t) };
    }
}

/// Run `body` until `STOP` with a `SIGUSR1` timer on this thread (when `storm`) and an alternate stack for it.
fn storm_thread(storm: bool, mut body: impl FnMut(u64)) {
    let _alt = storm.then(|| AltStack::new(256 << 10));
    let _timer = storm.then(|| ThreadTimer::for_current_thread(libc::SIGUSR1, TIMER_PERIOD));
    let mut i = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        body(i);
        i += 1;
    }
}

fn spin_for(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// RCU reader: sections of ~`short` µs, and one in 32 of ~`long` µs.
fn rcu_reader(i: u64, short: u64, long: u64) {
    let g = rcu_read_lock();
    spin_for(Duration::from_micros(if i % 32 == 31 { long } else { short }));
    drop(g);
    let ts = typesafe_cache();
    if let Some(t) = ts.alloc_nolock(Gfp::NONE) {
        // SAFETY: our object of this cache, freed once.
        unsafe { ts.free_nolock(t) };
    }
}

/// SRCU-fast or Tasks Trace reader: one section in 16 sleeps 1 ms.
fn srcu_reader(i: u64, tasks_trace: bool) {
    let g = if tasks_trace { rcu_read_lock_tasks_trace() } else { DOMAIN.read_lock_fast() };
    if i.is_multiple_of(16) {
        testkit::sleep_wall(Duration::from_millis(1));
    } else {
        spin_for(Duration::from_micros(20));
    }
    drop(g);
}

/// Retire flood: eight objects per round, one of each kind.
fn flood_round(i: u64) {
    let c = flood().expect("set before the threads start");
    for how in 0..8 {
        let Some(o) = new_obj(c, i) else {
            std::thread::sleep(Duration::from_millis(1));
            return;
        };
        // SAFETY: our fresh object, retired once.
        unsafe { retire(o, how) };
    }
    if i.is_multiple_of(64) {
        let s = c.stats();
        if s.allocs.saturating_sub(s.frees) > FLOOD_BACKLOG {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Grace periods and barriers in a loop (`phase` shifts the cycle so two such threads differ).
fn grace_periods(i: u64, phase: u64) {
    match (i + phase) % 8 {
        0 => synchronize_rcu(),
        1 => rcu_barrier(),
        2 => DOMAIN.synchronize(),
        3 => DOMAIN.barrier(),
        4 => synchronize_rcu_tasks_trace(),
        5 => rcu_barrier_tasks_trace(),
        6 => cond_synchronize_rcu(start_poll_synchronize_rcu()),
        _ => {
            typesafe_cache().shrink();
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// The child
// ------------------------------------------------------------------------------------------------------------

const STEPS: [&str; 18] = [
    "started",
    "synchronize_rcu",
    "rcu_barrier",
    "synchronize_rcu_tasks_trace",
    "rcu_barrier_tasks_trace",
    "SrcuFast::synchronize (static domain)",
    "SrcuFast::barrier (static domain)",
    "kfree_rcu_nolock + rcu_barrier (object freed?)",
    "kfree_srcu_fast_nolock + SrcuFast::barrier (object freed?)",
    "call_rcu + rcu_barrier (callback ran?)",
    "call_srcu_fast + SrcuFast::barrier (callback ran?)",
    "call_rcu_tasks_trace + rcu_barrier_tasks_trace (callback ran?)",
    "start_poll_synchronize_rcu + poll",
    "SrcuFast::start_poll + poll",
    "inherited type-safe cache: alloc/free, shrink, rcu_barrier",
    "fresh SLAB_TYPESAFE_BY_RCU cache: fill, empty, destroy (slabs released, none live?)",
    "synchronize_rcu once more",
    "debug reports unchanged in the child?",
];
/// Exit code of a child whose step `s` panicked.
const PANICKED: i32 = 100;

/// A page shared by the parent and its children: the step the current child is in (word 0), and how long
/// each step took, in microseconds (words `1 + step`), for the parent's summary.
struct Progress {
    step: AtomicU32,
    micros: [AtomicU64; STEPS.len()],
    /// `sched_yield` calls the child's main thread made in each barrier (see `fork_with_kfree_slot_locked`).
    yields: [AtomicU64; 2],
}

fn progress() -> &'static Progress {
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
        assert_ne!(p, libc::MAP_FAILED, "mmap of the progress page");
        p as usize
    });
    const _: () = assert!(core::mem::size_of::<Progress>() <= 4096);
    // SAFETY: a page-aligned, zero-initialised mapping that is never unmapped, large enough for `Progress`
    // (all atomics, for which zeroed memory is valid).
    unsafe { &*(p as *const Progress) }
}

static CB_RAN: [AtomicBool; 3] = [const { AtomicBool::new(false) }; 3];
/// Heads for the child's callbacks (never used in the parent, so fresh in every child).
static CHILD_HEADS: [RcuHead; 3] = [const { RcuHead::new() }; 3];

unsafe fn child_cb(h: NonNull<RcuHead>) {
    let i = CHILD_HEADS.iter().position(|c| core::ptr::eq(c, h.as_ptr())).expect("a child head");
    CB_RAN[i].store(true, Ordering::Release);
}

fn head_ptr(h: &'static RcuHead) -> NonNull<RcuHead> {
    NonNull::from(h)
}

/// Poll `done` until true, sleeping 100 µs between polls (the parent's deadline bounds it).
fn poll_until(done: impl Fn() -> bool) {
    while !done() {
        // SAFETY: plain sleep, no lock.
        unsafe { libc::usleep(100) };
    }
}

/// The child's work; returns the number of the first step whose check failed, or 0.
fn child_steps() -> i32 {
    let reports = nolock::debug::reports();
    let mut t = Instant::now();
    let mut step = |s: usize| {
        let p = progress();
        let prev = p.step.swap(s as u32, Ordering::AcqRel) as usize;
        p.micros[prev].store(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        t = Instant::now();
    };
    step(1);
    synchronize_rcu();
    step(2);
    rcu_barrier();
    step(3);
    synchronize_rcu_tasks_trace();
    step(4);
    rcu_barrier_tasks_trace();
    step(5);
    DOMAIN.synchronize();
    step(6);
    DOMAIN.barrier();

    // kfree_*_nolock of fresh objects of a fresh cache: after the barrier the cache must count the free.
    let Ok(kc) = KmemCache::new("fork-rcu-child", Layout::new::<Obj>()) else { return 7 };
    for (s, srcu) in [(7, false), (8, true)] {
        step(s);
        let before = kc.stats().frees;
        let Some(p) = kc.alloc_nolock(Gfp::NONE) else { return s as i32 };
        let o = p.cast::<Obj>();
        // SAFETY: our fresh object, retired once; nobody reads it.
        unsafe {
            if srcu {
                kfree_srcu_fast_nolock(&DOMAIN, p.as_ptr(), head_of(o));
                DOMAIN.barrier();
            } else {
                kfree_rcu_nolock(p.as_ptr(), head_of(o));
                rcu_barrier();
            }
        }
        if kc.stats().frees != before + 1 {
            return s as i32;
        }
    }
    if kc.destroy().live_objects != 0 {
        return 8;
    }

    // Callbacks: each must have run when its barrier returns.
    step(9);
    // SAFETY: a static head used once in this child; the callback only sets a flag.
    unsafe { call_rcu(head_ptr(&CHILD_HEADS[0]), child_cb) };
    rcu_barrier();
    if !CB_RAN[0].load(Ordering::Acquire) {
        return 9;
    }
    step(10);
    // SAFETY: as above.
    unsafe { DOMAIN.call_srcu_fast(head_ptr(&CHILD_HEADS[1]), child_cb) };
    DOMAIN.barrier();
    if !CB_RAN[1].load(Ordering::Acquire) {
        return 10;
    }
    step(11);
    // SAFETY: as above.
    unsafe { call_rcu_tasks_trace(head_ptr(&CHILD_HEADS[2]), child_cb) };
    rcu_barrier_tasks_trace();
    if !CB_RAN[2].load(Ordering::Acquire) {
        return 11;
    }

    step(12);
    let c = start_poll_synchronize_rcu();
    poll_until(|| poll_state_synchronize_rcu(c));
    step(13);
    let c = DOMAIN.start_poll();
    poll_until(|| DOMAIN.poll(c));

    // The type-safe cache the parent churned: its slabs were waiting for grace periods at the fork.
    step(14);
    let ts = typesafe_cache();
    let mut held = [0usize; 256];
    for h in held.iter_mut() {
        let Some(p) = ts.alloc_nolock(Gfp::NONE) else { return 14 };
        *h = p.as_ptr() as usize;
    }
    for &h in &held {
        // SAFETY: our objects of this cache, freed once.
        unsafe { ts.free_nolock(NonNull::new_unchecked(h as *mut u8)) };
    }
    ts.shrink();
    rcu_barrier();

    // A fresh type-safe cache: several slabs, all emptied; destroy waits for their grace period.
    step(15);
    let Ok(fresh) = KmemCache::builder("fork-rcu-ts-child", Layout::new::<[u64; 12]>())
        .flags(SlabFlags::TYPESAFE_BY_RCU)
        .freeptr_offset(8)
        .build()
    else {
        return 15;
    };
    for h in held.iter_mut() {
        let Some(p) = fresh.alloc_nolock(Gfp::NONE) else { return 15 };
        *h = p.as_ptr() as usize;
    }
    for &h in &held {
        // SAFETY: our objects of this cache, freed once.
        unsafe { fresh.free_nolock(NonNull::new_unchecked(h as *mut u8)) };
    }
    let st = fresh.stats();
    if st.slabs_allocated < 2 {
        return 15; // the test's premise: several slabs to release
    }
    let r = fresh.destroy();
    if r.live_objects != 0 || r.slabs_released == 0 {
        return 15;
    }

    step(16);
    synchronize_rcu();
    step(17);
    if nolock::debug::reports() != reports {
        return 17;
    }
    step(0);
    0
}

/// The child: run the steps, turn a panic into an exit code, and leave with `_exit` (no destructors, no atexit
/// handlers, nothing of the parent's state flushed twice).
fn child_main(body: fn() -> i32) -> ! {
    let code = match std::panic::catch_unwind(body) {
        Ok(c) => c,
        Err(_) => PANICKED + progress().step.load(Ordering::Acquire) as i32,
    };
    // SAFETY: leaves the child at once.
    unsafe { libc::_exit(code) }
}

/// How a child ended.
enum ChildEnd {
    Ok,
    /// Killed after the deadline while in this step.
    Hung(u32),
    /// Exited with this code (a failed step, or `PANICKED + step`).
    Failed(i32),
    /// Killed by this signal.
    Signalled(i32),
}

/// Fork; the child runs `body` (through `child_main`); the parent waits for it (at most `deadline`).
fn fork_one(deadline: Duration, body: fn() -> i32) -> ChildEnd {
    progress().step.store(0, Ordering::Release);
    for m in progress().micros.iter().chain(&progress().yields) {
        m.store(0, Ordering::Relaxed);
    }
    // SAFETY: the child runs `child_main` only and leaves with `_exit`.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child_main(body);
    }
    assert!(pid > 0, "fork failed: {}", std::io::Error::last_os_error());
    wait_child(pid, deadline)
}

/// Wait for the child `pid` (at most `deadline`, then kill it).
fn wait_child(pid: libc::pid_t, deadline: Duration) -> ChildEnd {
    let until = Instant::now() + deadline;
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "waitpid: {}", std::io::Error::last_os_error());
        if Instant::now() > until {
            let at = progress().step.load(Ordering::Acquire);
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return ChildEnd::Hung(at);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    if libc::WIFSIGNALED(status) {
        return ChildEnd::Signalled(libc::WTERMSIG(status));
    }
    match libc::WEXITSTATUS(status) {
        0 => ChildEnd::Ok,
        c => ChildEnd::Failed(c),
    }
}

fn step_name(s: u32) -> &'static str {
    STEPS.get(s as usize).copied().unwrap_or("?")
}

fn describe(end: &ChildEnd) -> String {
    match *end {
        ChildEnd::Ok => "ok".into(),
        ChildEnd::Hung(s) => format!("hung in step {s} ({})", step_name(s)),
        ChildEnd::Failed(c) if c >= PANICKED => {
            format!("panicked in step {} ({})", c - PANICKED, step_name((c - PANICKED) as u32))
        }
        ChildEnd::Failed(c) => format!("failed the check of step {c} ({})", step_name(c as u32)),
        ChildEnd::Signalled(s) => format!("killed by signal {s}"),
    }
}

// ------------------------------------------------------------------------------------------------------------
// The tests
// ------------------------------------------------------------------------------------------------------------

/// Before each fork of an even round the forking thread leaves state of its own: objects in its pointer blocks
/// and callbacks on its lists.
fn leave_own_state(round: usize) {
    let c = flood().expect("set");
    for how in 0..6 {
        if let Some(o) = new_obj(c, round as u64) {
            // SAFETY: our fresh object, retired once.
            unsafe { retire(o, how) };
        }
    }
}

fn fork_storm(readers_and_signals: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let survey = std::env::var_os("NOLOCK_FORK_RCU_SURVEY").is_some_and(|v| v == "1");
    let deadline = if survey { Duration::from_secs(5) } else { CHILD_DEADLINE };
    let reports = nolock::debug::reports();
    FLOOD.store(flood_cache() as *const KmemCache as *mut KmemCache, Ordering::Release);
    typesafe_cache();
    progress();
    if readers_and_signals {
        testkit::install_handler(libc::SIGUSR1, on_signal, libc::SA_ONSTACK);
    }
    STOP.store(false, Ordering::Relaxed);
    let signals_before = SIGNALS.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut ends: Vec<ChildEnd> = Vec::new();
    let mut slowest = [0u64; STEPS.len()];
    std::thread::scope(|s| {
        let _stop = StopOnDrop;
        let storm = readers_and_signals;
        if readers_and_signals {
            s.spawn(move || storm_thread(storm, |i| rcu_reader(i, 5, 2000)));
            s.spawn(move || storm_thread(storm, |i| rcu_reader(i, 1, 200)));
            s.spawn(move || storm_thread(storm, |i| srcu_reader(i, false)));
            s.spawn(move || storm_thread(storm, |i| srcu_reader(i, true)));
        }
        s.spawn(move || storm_thread(storm, flood_round));
        s.spawn(move || storm_thread(storm, |i| grace_periods(i, 0)));
        s.spawn(move || storm_thread(storm, |i| grace_periods(i, 4)));
        std::thread::sleep(Duration::from_millis(100));
        let mut r = 0x1234_5678u64;
        for round in 0..FORKS {
            r = testkit::splitmix64(r);
            std::thread::sleep(Duration::from_micros(r % 20_000));
            if round % 2 == 0 {
                leave_own_state(round);
            }
            let end = fork_one(deadline, child_steps);
            for (m, t) in slowest.iter_mut().zip(&progress().micros) {
                *m = (*m).max(t.load(Ordering::Relaxed));
            }
            let bad = !matches!(end, ChildEnd::Ok);
            if bad {
                eprintln!("fork_rcu: fork {round}: child {}", describe(&end));
            }
            ends.push(end);
            if bad && !survey {
                break;
            }
        }
    });
    let elapsed = started.elapsed();
    let signals = SIGNALS.load(Ordering::Relaxed) - signals_before;
    // Everything the parent retired is freed by the barriers: nothing was lost at the forks.
    rcu_barrier();
    DOMAIN.barrier();
    rcu_barrier_tasks_trace();
    let st = flood_cache().stats();
    let ok = ends.iter().filter(|e| matches!(e, ChildEnd::Ok)).count();
    eprintln!(
        "fork_rcu ({}): {} forks, {ok} children ok, in {elapsed:.1?}; {signals} signals in the parent; flood \
         cache: {} allocated, {} freed",
        if readers_and_signals { "readers + signal storm" } else { "no readers" },
        ends.len(),
        st.allocs,
        st.frees,
    );
    let mut by_time: Vec<usize> = (1..STEPS.len()).collect();
    by_time.sort_by_key(|&s| std::cmp::Reverse(slowest[s]));
    for &s in &by_time[..4] {
        eprintln!("  slowest child step {s} ({}): {} µs", step_name(s as u32), slowest[s]);
    }
    if survey {
        let mut hung = [0usize; STEPS.len() + 1];
        for e in &ends {
            if let ChildEnd::Hung(s) = e {
                hung[(*s as usize).min(STEPS.len())] += 1;
            }
        }
        for (s, n) in hung.iter().enumerate().filter(|(_, n)| **n > 0) {
            eprintln!("  {n} children hung in step {s} ({})", step_name(s as u32));
        }
    }
    let bad: Vec<String> = ends.iter().filter(|e| !matches!(e, ChildEnd::Ok)).map(describe).collect();
    assert!(bad.is_empty(), "fork children failed: {bad:?}");
    assert_eq!(ends.len(), FORKS);
    assert_eq!(st.allocs, st.frees, "parent: flood objects lost (allocated but never freed after the barriers)");
    assert_eq!(nolock::debug::reports(), reports, "parent: nolock reported a problem (see stderr)");
}

/// Fork while readers (some long, some sleeping) are inside, retire floods and grace periods are in flight,
/// and a signal storm runs readers and retirements in handlers.
#[test]
fn fork_during_readers_retire_floods_and_signal_storm() {
    fork_storm(true);
}

/// Fork from a parent with no readers at all: retire floods and grace periods in flight only.
#[test]
fn fork_during_retire_floods_without_readers() {
    fork_storm(false);
}

// ------------------------------------------------------------------------------------------------------------
// Deterministic: a thread that no longer exists left its `kfree_rcu` pointer-block slot locked
// ------------------------------------------------------------------------------------------------------------

/// Counts the `sched_yield` calls of threads that ask for it. The test binary's own `sched_yield` interposes
/// libc's: the static link binds nolock's and std's calls (`std::thread::yield_now`) to it.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod yields {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};

    use std::sync::atomic::AtomicBool;

    thread_local! {
        /// Whether this thread's `sched_yield` calls are counted.
        pub static COUNT: Cell<bool> = const { Cell::new(false) };
    }
    /// Count every thread's calls (a fork child's library threads included).
    pub static COUNT_ALL: AtomicBool = AtomicBool::new(false);
    /// Counted `sched_yield` calls.
    pub static YIELDS: AtomicU64 = AtomicU64::new(0);

    /// `sched_yield(2)`, counted, then made with a raw system call.
    #[unsafe(no_mangle)]
    pub extern "C" fn sched_yield() -> libc::c_int {
        if COUNT_ALL.load(Ordering::Relaxed) || COUNT.with(Cell::get) {
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

/// More `sched_yield` calls than this in one barrier of a one-thread child means it waited for a thread that
/// does not exist. (A barrier with nothing to wait for backs off with at most ten yields between sleeps; the
/// library's claim protocol gives up on a busy owner only after 100,000.)
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
const YIELD_LIMIT: u64 = 10_000;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod parking {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use nolock::hooks::Point;

    thread_local! {
        /// Park at the next allocation hook point on this thread.
        pub static PARK_HERE: Cell<bool> = const { Cell::new(false) };
    }
    pub static PARKED: AtomicBool = AtomicBool::new(false);
    pub static UNPARK: AtomicBool = AtomicBool::new(false);

    /// The hook: a thread that asked for it parks at the first allocation point it reaches (inside
    /// `kfree_*_nolock`, that is while its pointer-block slot is locked), until `UNPARK`.
    pub fn park_hook(at: Point) {
        if !matches!(at, Point::AllocFast | Point::AllocRefill | Point::AllocShared | Point::SlabNew | Point::PageAlloc)
            || !PARK_HERE.with(|p| p.replace(false))
        {
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

/// The child of `fork_with_kfree_slot_locked`: the static domain's barrier (the block the dead thread left in
/// its slot is of that domain), then every other barrier and grace period, counting the main thread's
/// `sched_yield` calls. Returns 1 or 2 if a barrier spun on the dead thread, 3 on a debug report.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn child_barrier_yields() -> i32 {
    use yields::{COUNT, YIELDS};
    let p = progress();
    let reports = nolock::debug::reports();
    COUNT.with(|c| c.set(true));
    YIELDS.store(0, Ordering::Relaxed);
    p.step.store(6, Ordering::Release);
    DOMAIN.barrier();
    let first = YIELDS.swap(0, Ordering::Relaxed);
    p.yields[0].store(first, Ordering::Relaxed);
    p.step.store(2, Ordering::Release);
    rcu_barrier();
    rcu_barrier_tasks_trace();
    DOMAIN.synchronize();
    synchronize_rcu();
    let rest = YIELDS.load(Ordering::Relaxed);
    p.yields[1].store(rest, Ordering::Relaxed);
    p.step.store(0, Ordering::Release);
    if first > YIELD_LIMIT {
        1
    } else if rest > YIELD_LIMIT {
        2
    } else if nolock::debug::reports() != reports {
        3
    } else {
        0
    }
}

/// A thread is stopped inside `kfree_srcu_fast_nolock` with its pointer-block slot locked and a block of the
/// static domain still in the slot (it switched domains: the old block is queued, the new one is being
/// allocated; the test hook parks it at that allocation). The test thread forks. In the child that thread does
/// not exist, so its slot can never be unlocked: the child's barriers must not wait for it (and must not free
/// the old block twice). The child counts its `sched_yield` calls: more than [`YIELD_LIMIT`] in a barrier means
/// it spun on the dead owner.
///
/// This is what wedges the children of `fork_during_*` under load: every barrier and every aging tick of the
/// child's grace-period worker waits 100,000 yields for such a slot, and under a parent's load each yield can
/// take milliseconds.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn fork_with_kfree_slot_locked_by_a_vanished_thread() {
    use parking::{PARK_HERE, PARKED, UNPARK, Unpark, park_hook};
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let reports = nolock::debug::reports();
    FLOOD.store(flood_cache() as *const KmemCache as *mut KmemCache, Ordering::Release);
    progress();
    // The yield counter works (else this test could not fail).
    yields::COUNT.with(|c| c.set(true));
    let before = yields::YIELDS.load(Ordering::Relaxed);
    std::thread::yield_now();
    assert!(yields::YIELDS.load(Ordering::Relaxed) > before, "the sched_yield interposer is not in use");
    yields::COUNT.with(|c| c.set(false));

    PARKED.store(false, Ordering::Relaxed);
    UNPARK.store(false, Ordering::Relaxed);
    let unpark = Unpark;
    nolock::hooks::set_hook(Some(park_hook));
    let a = std::thread::spawn(|| {
        let c = flood().expect("set");
        let one = |how| {
            let o = new_obj(c, 1).expect("memory");
            // SAFETY: our fresh object, retired once.
            unsafe { retire(o, how) };
        };
        one(2); // a Tasks Trace block in this thread's SRCU slot
        for _ in 0..8 {
            one(1); // domain switch: a fresh block of the static domain, eight pointers in it
        }
        let o = new_obj(c, 1).expect("memory");
        PARK_HERE.with(|p| p.set(true));
        // Domain switch again: the static domain's block is queued, a new block allocated: parked there.
        // SAFETY: our fresh object, retired once.
        unsafe { retire(o, 2) };
        !PARK_HERE.with(|p| p.get())
    });
    let t = Instant::now();
    while !PARKED.load(Ordering::Acquire) {
        assert!(!a.is_finished() && t.elapsed() < Duration::from_secs(20), "the thread never reached the hook");
        std::thread::sleep(Duration::from_millis(1));
    }
    let end = fork_one(CHILD_DEADLINE, child_barrier_yields);
    let y = [progress().yields[0].load(Ordering::Relaxed), progress().yields[1].load(Ordering::Relaxed)];
    drop(unpark);
    assert!(a.join().expect("thread"), "the thread did not park inside kfree_srcu_fast_nolock");
    rcu_barrier();
    DOMAIN.barrier();
    rcu_barrier_tasks_trace();
    let what = match end {
        ChildEnd::Ok => "ok".to_string(),
        ChildEnd::Failed(1) => format!("the static domain's barrier spun {} sched_yields", y[0]),
        ChildEnd::Failed(2) => format!("the other barriers and grace periods spun {} sched_yields", y[1]),
        ChildEnd::Failed(3) => "nolock made a debug report".to_string(),
        ref e => describe(e),
    };
    eprintln!("fork_rcu (slot locked by a vanished thread): child: {what}; sched_yield calls: {y:?}");
    assert!(
        matches!(end, ChildEnd::Ok),
        "fork child: {what} (limit {YIELD_LIMIT}: it waited for a thread that does not exist)"
    );
    let st = flood_cache().stats();
    assert_eq!(st.allocs, st.frees, "parent: flood objects lost");
    assert_eq!(nolock::debug::reports(), reports, "parent: nolock reported a problem (see stderr)");
}

/// The forking thread is itself inside `kfree_srcu_fast_nolock` with its pointer-block slot locked and a block
/// in it, and the fork happens there (as from a signal handler that interrupted it; here from the test hook
/// before the pointer is written). The child goes on from inside that call and never returns to it, so the
/// slot stays locked; unlike a vanished thread's, it cannot be cleared (the forking thread could still return
/// and finish its edit). The child's grace-period worker ages the slot's block every few milliseconds: the
/// aging tick must skip the locked slot rather than wait for it. On the code before this test the worker spent
/// 100,000 `sched_yield`s (at least a second) in every tick, and every grace period of the child waited
/// behind it. The child counts the yields of all its threads over 40 aging ticks.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[test]
fn fork_inside_kfree_rcu_the_childs_worker_does_not_wait_for_the_forking_thread() {
    use std::cell::Cell;
    use std::sync::atomic::AtomicI32;

    use nolock::hooks::Point;

    thread_local! {
        static FORK_HERE: Cell<bool> = const { Cell::new(false) };
    }
    static CHILD: AtomicI32 = AtomicI32::new(0);

    /// In the child (inside `kfree_srcu_fast_nolock` on the forking thread, slot locked): let a new thread
    /// start the worker with a grace period, then give the worker 40 aging ticks, counting every yield.
    fn child_ages() -> i32 {
        use yields::{COUNT_ALL, YIELDS};
        let p = progress();
        let reports = nolock::debug::reports();
        YIELDS.store(0, Ordering::Relaxed);
        COUNT_ALL.store(true, Ordering::Relaxed);
        p.step.store(2, Ordering::Release);
        let t = std::thread::spawn(|| {
            synchronize_rcu();
            std::thread::sleep(Duration::from_millis(200));
            synchronize_rcu();
        });
        if t.join().is_err() {
            return PANICKED + 2;
        }
        let y = YIELDS.load(Ordering::Relaxed);
        p.yields[1].store(y, Ordering::Relaxed);
        p.step.store(0, Ordering::Release);
        if y > YIELD_LIMIT {
            2
        } else if nolock::debug::reports() != reports {
            3
        } else {
            0
        }
    }

    /// The hook: fork at the append point reached with `FORK_HERE` set (the slot is locked there).
    fn fork_hook(at: Point) {
        if at != Point::KfreeAppend || !FORK_HERE.with(|f| f.replace(false)) {
            return;
        }
        progress().step.store(0, Ordering::Release);
        progress().yields[1].store(0, Ordering::Relaxed);
        // SAFETY: the child runs `child_main` only (from here, never returning into the library call) and leaves
        // with `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            child_main(child_ages);
        }
        CHILD.store(pid, Ordering::Relaxed);
    }

    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let reports = nolock::debug::reports();
    FLOOD.store(flood_cache() as *const KmemCache as *mut KmemCache, Ordering::Release);
    progress();
    let c = flood().expect("set");
    let one = |how| {
        let o = new_obj(c, 1).expect("memory");
        // SAFETY: our fresh object, retired once.
        unsafe { retire(o, how) };
    };
    std::thread::spawn(move || {
        for _ in 0..8 {
            one(1); // a block of the static domain in this thread's SRCU slot, eight pointers in it
        }
        nolock::hooks::set_hook(Some(fork_hook));
        FORK_HERE.with(|f| f.set(true));
        one(1); // the fork happens before the ninth pointer is written
        nolock::hooks::set_hook(None);
        assert!(!FORK_HERE.with(|f| f.get()), "the hook never ran inside kfree_srcu_fast_nolock");
    })
    .join()
    .expect("forking thread");
    let pid = CHILD.load(Ordering::Relaxed);
    assert!(pid > 0, "fork failed");
    let end = wait_child(pid, CHILD_DEADLINE);
    let y = progress().yields[1].load(Ordering::Relaxed);
    rcu_barrier();
    DOMAIN.barrier();
    rcu_barrier_tasks_trace();
    let what = match end {
        ChildEnd::Ok => "ok".to_string(),
        ChildEnd::Failed(2) => format!("the child's threads spun {y} sched_yields in 40 aging ticks"),
        ChildEnd::Failed(3) => "nolock made a debug report".to_string(),
        ref e => describe(e),
    };
    eprintln!("fork_rcu (fork inside kfree_srcu_fast_nolock): child: {what}; sched_yield calls: {y}");
    assert!(
        matches!(end, ChildEnd::Ok),
        "fork child: {what} (limit {YIELD_LIMIT}: its worker waited for the forking thread)"
    );
    let st = flood_cache().stats();
    assert_eq!(st.allocs, st.frees, "parent: flood objects lost");
    assert_eq!(nolock::debug::reports(), reports, "parent: nolock reported a problem (see stderr)");
}
