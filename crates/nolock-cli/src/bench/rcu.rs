//! `nolock bench rcu`: the reclamation layer against crossbeam-epoch, seize, `membarrier` and (feature
//! `liburcu`, when the library is installed) liburcu's membarrier flavour, all measured in the same run.
//!
//! Every cell is the median [min–max] of `--reps` timed repetitions (at least 5; 9 by default), after one
//! untimed warm-up repetition; the contenders take turns inside each repetition in a rotating order. Every
//! workload runs on the bench's main thread unless said otherwise.
//!
//! What each line measures:
//! - **read side** (ns per lock+unlock; a loop of `n` iterations, each taking an *outermost* guard, passing it
//!   through `black_box` and dropping it; the first iteration of a thread is long past, thanks to the warm-up):
//!   - `nolock rcu_read_lock`, `SrcuFast::read_lock_fast` (a static domain), `rcu_read_lock_tasks_trace`: the
//!     thread-local lookup of the reader word and a plain increment / decrement; no fence, no atomic RMW;
//!   - `crossbeam-epoch pin()`: the default collector through its thread-local handle — what `epoch::pin()`
//!     callers pay: the lookup, one `lock cmpxchg` (crossbeam's SeqCst fence on x86), and a collection attempt
//!     every 128 pins (the global queue is empty here: the other workloads drain what they defer);
//!   - `crossbeam-epoch LocalHandle::pin()`: the same through a handle registered once (no thread-local
//!     lookup);
//!   - `seize Collector::enter()`;
//!   - reference, not a reader: one uncontended `lock cmpxchg` on a private word. crossbeam's pin costs about
//!     one of these; nolock's readers none, so the ratio to crossbeam follows the CPU's cost of a locked
//!     instruction (cheap on some CPUs, 15–40 cycles on others) and the load of the machine.
//!
//!   A guard kept across the loop would measure nested pins (a counter only, about 1.5 ns for crossbeam here),
//!   not what a reader pays.
//! - **grace period** (µs): `synchronize_rcu`, `SrcuFast::synchronize` and `synchronize_rcu_tasks_trace`
//!   latency with no reader, and with one busy reader thread spinning on short read sections of the same
//!   flavour; p50 and p99 per repetition, next to one `membarrier(PRIVATE_EXPEDITED)` with the same busy thread.
//!   A busy-reader sample set during which the reader hardly ran (no CPU for it on a loaded machine: it then
//!   measures an idle system) is dropped, and a note says how many were.
//! - **callbacks**: `call_rcu_nolock` / `call_srcu_fast_nolock` of N pre-allocated 64-byte `kmalloc_nolock`
//!   objects whose callback frees them — ns per enqueue (the worker runs the callbacks meanwhile, on another
//!   thread), and drain throughput (N / time from the first enqueue until the barrier returns) — against
//!   crossbeam `pin()` + `defer` of a no-op closure (one pin per call: each enqueue is its own operation).
//! - **retire** (ns per object): allocate a 64-byte object, write it, retire it, N times, then wait until every
//!   object is freed (nolock: `rcu_barrier` / the SRCU barrier, the frees run on the grace-period worker;
//!   crossbeam: `pin().flush()` until every object was dropped, the frees run inline on the bench thread;
//!   seize: `reclaim_all`). One `pin()` / `enter()` per object for the baselines (each retire its own
//!   operation; holding one guard over many retires is slower for crossbeam, which collects only when it
//!   pins). Each baseline runs twice, with two allocators:
//!   - on nolock's allocator (`kmalloc_nolock` objects, freed with `kfree_nolock` by the deferred function):
//!     the same allocation and free as `kfree_rcu_nolock`, so only the reclamation differs — the fair ratio;
//!   - as their users write it, `Owned::new` / `Box::new` on the global allocator (glibc: the CLI installs
//!     none): allocator and reclamation together. glibc's malloc+free of 64 bytes is slower than nolock's, so
//!     this ratio flatters nolock; with mimalloc or jemalloc as the global allocator it would not.
//!
//!   nolock's side depends on the machine more than the baselines': its frees run on the grace-period worker,
//!   which on an idle second CPU frees while the bench thread still allocates (the objects' cache lines and
//!   slabs move between the two CPUs), and on a loaded machine (or under `taskset -c 0`) waits and frees them
//!   in bursts. On the 2-CPU development VM `kfree_rcu_nolock` measured 31–34 ns per object with the second
//!   CPU idle and 18–25 ns with it busy or pinned to one CPU, while the baselines, which free inline, stayed
//!   within a few ns. Compare runs only under the same load; the header prints the load average.

use core::ptr::NonNull;
use std::fmt::Write as _;
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_epoch as epoch;
use nolock::rcu::srcu::SrcuFast;
use nolock::{
    Gfp, RcuHead, call_rcu_nolock, kfree_nolock, kfree_rcu_nolock, kfree_srcu_fast_nolock, kmalloc_nolock, rcu_barrier,
    rcu_read_lock, rcu_read_lock_tasks_trace, synchronize_rcu, synchronize_rcu_tasks_trace,
};

#[cfg(feature = "liburcu")]
use super::urcu;
use super::{BenchArgs, Summary, json_num, json_str, print_rows, progress_bar, quantile, summarize};

/// The SRCU-fast domain of the benchmark.
static BENCH_SRCU: SrcuFast = SrcuFast::new();

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` (the process registered for it in `nolock::init`).
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 8;

/// A busy-reader sample set counts only if the busy reader was on a CPU for at least this share of it.
const BUSY_MIN_SHARE: f64 = 0.5;

/// How long a baseline may take to free everything it retired before the sample is dropped.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// Operation counts per timed repetition.
#[derive(Clone, Copy)]
struct Sizes {
    /// Lock+unlock pairs.
    read: u64,
    /// Grace periods (or membarriers) per latency sample set.
    lat: usize,
    /// Callbacks per repetition.
    cbs: usize,
    /// Retired objects per repetition.
    retire: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self { read: 4_000_000, lat: 300, cbs: 100_000, retire: 100_000 }
        } else {
            Self { read: 20_000_000, lat: 1_000, cbs: 500_000, retire: 500_000 }
        }
    }

    fn warmup(self) -> Self {
        Self { read: self.read / 10, lat: self.lat / 10, cbs: self.cbs / 10, retire: self.retire / 10 }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Results

/// All samples of one metric of one contender.
struct Series {
    group: &'static str,
    who: &'static str,
    metric: &'static str,
    unit: &'static str,
    samples: Vec<f64>,
}

#[derive(Default)]
struct Results {
    series: Vec<Series>,
    /// Problems met while measuring (a baseline that did not drain in time, a failed system call).
    notes: Vec<String>,
    /// Busy-reader sample sets dropped because the busy reader did not run during them.
    dropped_busy: usize,
}

impl Results {
    fn add(&mut self, group: &'static str, who: &'static str, metric: &'static str, unit: &'static str, v: f64) {
        if let Some(s) = self.series.iter_mut().find(|s| s.group == group && s.who == who && s.metric == metric) {
            s.samples.push(v);
        } else {
            self.series.push(Series { group, who, metric, unit, samples: vec![v] });
        }
    }

    fn get(&self, group: &str, who: &str, metric: &str) -> Option<Summary> {
        self.series
            .iter()
            .find(|s| s.group == group && s.who == who && s.metric == metric && !s.samples.is_empty())
            .map(|s| summarize(&s.samples))
    }

    fn note(&mut self, n: String) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Objects

/// A 64-byte object with its callback head first (nolock side).
#[repr(C)]
struct Obj64 {
    head: RcuHead,
    payload: [u64; 6],
}

const _: () = assert!(core::mem::size_of::<Obj64>() == 64);

/// Allocate and initialise an `Obj64` with `kmalloc_nolock`.
#[inline]
fn new_obj64(i: u64) -> NonNull<Obj64> {
    let Some(p) = kmalloc_nolock(64, Gfp::NONE) else {
        panic!("kmalloc_nolock(64) failed during the benchmark");
    };
    let o = p.cast::<Obj64>();
    // SAFETY: a fresh 64-byte kmalloc object, 8-aligned, large enough for Obj64.
    unsafe { o.as_ptr().write(Obj64 { head: RcuHead::new(), payload: [i; 6] }) };
    o
}

/// The callback of the callback workload: free the object whose head it is.
///
/// # Safety
/// `head` is the head of an `Obj64` from `new_obj64` that nobody else frees.
unsafe fn free_obj64(head: NonNull<RcuHead>) {
    // SAFETY: the head is the object's first field (repr(C)), so its address is the object's (caller).
    unsafe { kfree_nolock(head.as_ptr().cast()) };
}

/// Objects the baselines' destructors have run for. Only the bench thread drops them (crossbeam runs deferred
/// functions on the thread that collects, seize reclaims on the thread that leaves last or calls
/// `reclaim_all`, and only the bench thread uses either), so a plain load + store is enough and keeps an
/// atomic RMW out of the baselines' numbers.
static BASELINE_DROPS: AtomicU64 = AtomicU64::new(0);

/// The baselines' 64-byte object: counts its drop.
struct Counted {
    _payload: [u64; 8],
}

impl Drop for Counted {
    #[inline]
    fn drop(&mut self) {
        BASELINE_DROPS.store(BASELINE_DROPS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Read side

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    Rcu,
    Srcu,
    TasksTrace,
    CrossbeamPin,
    CrossbeamHandle,
    SeizeEnter,
    Urcu,
    /// Not a reader: one `lock cmpxchg`, for reference.
    LockedRmw,
}

const READERS: [Reader; 8] = [
    Reader::Rcu,
    Reader::Srcu,
    Reader::TasksTrace,
    Reader::CrossbeamPin,
    Reader::CrossbeamHandle,
    Reader::SeizeEnter,
    Reader::Urcu,
    Reader::LockedRmw,
];

impl Reader {
    fn name(self) -> &'static str {
        match self {
            Reader::Rcu => "nolock rcu_read_lock",
            Reader::Srcu => "nolock SrcuFast::read_lock_fast",
            Reader::TasksTrace => "nolock rcu_read_lock_tasks_trace",
            Reader::CrossbeamPin => "crossbeam-epoch pin()",
            Reader::CrossbeamHandle => "crossbeam-epoch LocalHandle::pin()",
            Reader::SeizeEnter => "seize Collector::enter()",
            Reader::Urcu => "liburcu-memb rcu_read_lock (FFI)",
            Reader::LockedRmw => "reference: one lock cmpxchg (no reader)",
        }
    }
}

/// `n` lock+unlock pairs; ns per pair.
#[inline(never)]
fn read_loop<G>(n: u64, lock: impl Fn() -> G) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        let g = lock();
        black_box(&g);
        drop(g);
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// `n` uncontended `lock cmpxchg` on a private word (each succeeds); ns per instruction.
#[inline(never)]
fn locked_rmw_loop(n: u64) -> f64 {
    let w = AtomicU64::new(0);
    let t = Instant::now();
    for i in 0..n {
        // SeqCst: the strongest form, what crossbeam's pin uses as its fence; nothing else pairs with it here.
        let _ = black_box(w.compare_exchange(i, i + 1, Ordering::SeqCst, Ordering::SeqCst));
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// The baselines' state, kept for the whole run (registered once, on the bench thread).
struct Baselines {
    seize: seize::Collector,
    /// A handle of crossbeam's default collector, registered once: `LocalHandle::pin()` without the
    /// thread-local lookup of `epoch::pin()`.
    handle: epoch::LocalHandle,
}

impl Baselines {
    fn new() -> Self {
        Self { seize: seize::Collector::new(), handle: epoch::default_collector().register() }
    }
}

fn measure_read(r: Reader, n: u64, base: &Baselines) -> Option<f64> {
    Some(match r {
        Reader::Rcu => read_loop(n, rcu_read_lock),
        Reader::Srcu => read_loop(n, || BENCH_SRCU.read_lock_fast()),
        Reader::TasksTrace => read_loop(n, rcu_read_lock_tasks_trace),
        Reader::CrossbeamPin => read_loop(n, epoch::pin),
        Reader::CrossbeamHandle => read_loop(n, || base.handle.pin()),
        Reader::SeizeEnter => read_loop(n, || base.seize.enter()),
        Reader::Urcu => return urcu_read(n),
        Reader::LockedRmw => locked_rmw_loop(n),
    })
}

// ---------------------------------------------------------------------------------------------------------
// Grace periods

/// Which readers a busy thread runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Busy {
    Rcu,
    Srcu,
    TasksTrace,
    Urcu,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GpOp {
    Membarrier,
    Rcu,
    Srcu,
    TasksTrace,
    Urcu,
}

const GP_OPS: [GpOp; 5] = [GpOp::Membarrier, GpOp::Rcu, GpOp::Srcu, GpOp::TasksTrace, GpOp::Urcu];

impl GpOp {
    fn name(self) -> &'static str {
        match self {
            GpOp::Membarrier => "membarrier(PRIVATE_EXPEDITED)",
            GpOp::Rcu => "nolock synchronize_rcu",
            GpOp::Srcu => "nolock SrcuFast::synchronize",
            GpOp::TasksTrace => "nolock synchronize_rcu_tasks_trace",
            GpOp::Urcu => "liburcu-memb synchronize_rcu (FFI)",
        }
    }

    /// The busy reader that runs next to it (membarrier: the same thread as for `synchronize_rcu`).
    fn busy(self) -> Busy {
        match self {
            GpOp::Membarrier | GpOp::Rcu => Busy::Rcu,
            GpOp::Srcu => Busy::Srcu,
            GpOp::TasksTrace => Busy::TasksTrace,
            GpOp::Urcu => Busy::Urcu,
        }
    }
}

/// The CPU-time clock of the running busy reader thread (`pthread_getcpuclockid`), published before it sets
/// `running`.
static BUSY_CLOCK: AtomicI32 = AtomicI32::new(0);

/// Nanoseconds of clock `clock` (`CLOCK_MONOTONIC` or a thread's CPU-time clock).
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; an invalid clock id makes the call fail and leaves `ts` at 0.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Publish the calling thread's CPU-time clock in `BUSY_CLOCK`.
fn publish_busy_clock() {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self is the calling thread; `clock` is a valid out-pointer.
    if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0 {
        BUSY_CLOCK.store(clock, Ordering::Relaxed);
    }
}

/// Spin on short read sections until `stop`.
fn spin_sections<G>(stop: &AtomicBool, running: &AtomicBool, lock: impl Fn() -> G) {
    publish_busy_clock();
    // Release: the clock id published above is read after the Acquire load of `running` in `with_busy`.
    running.store(true, Ordering::Release);
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..1024 {
            let g = lock();
            black_box(&g);
            for i in 0..4u32 {
                black_box(i);
            }
            drop(g);
        }
    }
}

fn busy_reader(b: Busy, stop: &AtomicBool, running: &AtomicBool) {
    match b {
        Busy::Rcu => spin_sections(stop, running, rcu_read_lock),
        Busy::Srcu => spin_sections(stop, running, || BENCH_SRCU.read_lock_fast()),
        Busy::TasksTrace => spin_sections(stop, running, rcu_read_lock_tasks_trace),
        Busy::Urcu => urcu_busy(stop, running),
    }
}

/// Run `body` with a busy reader thread of flavour `busy` (or alone). Also returns the share of `body`'s wall
/// time the busy reader spent on a CPU (`None` without one): on a loaded machine it often waits for a CPU,
/// and the latencies are then mostly those of an idle system.
fn with_busy<R>(busy: Option<Busy>, body: impl FnOnce() -> R) -> (R, Option<f64>) {
    let Some(b) = busy else {
        return (body(), None);
    };
    let stop = AtomicBool::new(false);
    let running = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("busy-reader".into())
            .spawn_scoped(s, || busy_reader(b, &stop, &running))
            .expect("spawn the busy reader");
        while !running.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        // Let it settle into its loop (and onto a CPU).
        std::thread::sleep(Duration::from_millis(2));
        let clock = BUSY_CLOCK.load(Ordering::Relaxed);
        let (cpu0, wall0) = (clock_ns(clock), clock_ns(libc::CLOCK_MONOTONIC));
        let r = body();
        let (cpu1, wall1) = (clock_ns(clock), clock_ns(libc::CLOCK_MONOTONIC));
        stop.store(true, Ordering::Relaxed);
        h.join().expect("busy reader panicked");
        (r, Some(cpu1.saturating_sub(cpu0) as f64 / wall1.saturating_sub(wall0).max(1) as f64))
    })
}

/// Latency of `op`, `n` times after one untimed call: (p50, p99) in µs.
fn latency_us(n: usize, mut op: impl FnMut()) -> (f64, f64) {
    op();
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        op();
        v.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    (quantile(&mut v, 0.5), quantile(&mut v, 0.99))
}

fn membarrier() -> libc::c_long {
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0) }
}

/// (p50, p99) latency, and the busy reader's batches during the measurement (see [`with_busy`]).
fn measure_gp(op: GpOp, n: usize, busy: bool) -> Option<((f64, f64), Option<f64>)> {
    let b = busy.then(|| op.busy());
    match op {
        GpOp::Membarrier => {
            if membarrier() < 0 {
                return None;
            }
            Some(with_busy(b, || {
                latency_us(n, || {
                    black_box(membarrier());
                })
            }))
        }
        GpOp::Rcu => Some(with_busy(b, || latency_us(n, synchronize_rcu))),
        GpOp::Srcu => Some(with_busy(b, || latency_us(n, || BENCH_SRCU.synchronize()))),
        GpOp::TasksTrace => Some(with_busy(b, || latency_us(n, synchronize_rcu_tasks_trace))),
        GpOp::Urcu => urcu_sync(n, b),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Callbacks

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cb {
    CallRcu,
    CallSrcu,
    CrossbeamDefer,
    Urcu,
}

const CBS: [Cb; 4] = [Cb::CallRcu, Cb::CallSrcu, Cb::CrossbeamDefer, Cb::Urcu];

impl Cb {
    fn name(self) -> &'static str {
        match self {
            Cb::CallRcu => "nolock call_rcu_nolock",
            Cb::CallSrcu => "nolock call_srcu_fast_nolock",
            Cb::CrossbeamDefer => "crossbeam-epoch pin() + defer(no-op)",
            Cb::Urcu => "liburcu-memb call_rcu (FFI, malloc objects)",
        }
    }
}

/// Calls per timed chunk of an enqueue loop.
const CHUNK: usize = 64;

/// Enqueue timings: the mean over all calls, and the median of the per-chunk means (the fast path without
/// the occasional slow chunk: a wake-up of the worker, a collection, a preemption).
#[derive(Clone, Copy)]
struct Enqueue {
    mean_ns: f64,
    chunk_p50_ns: f64,
}

/// Call `enqueue(i)` for every `i` in `0..n`, timing chunks of [`CHUNK`] calls.
#[inline(never)]
fn enqueue_chunks(n: usize, mut enqueue: impl FnMut(usize)) -> Enqueue {
    let mut chunks = Vec::with_capacity(n.div_ceil(CHUNK));
    let mut total = Duration::ZERO;
    let mut i = 0;
    while i < n {
        let end = (i + CHUNK).min(n);
        let t = Instant::now();
        for j in i..end {
            enqueue(j);
        }
        let d = t.elapsed();
        total += d;
        chunks.push(d.as_nanos() as f64 / (end - i) as f64);
        i = end;
    }
    Enqueue { mean_ns: total.as_nanos() as f64 / n as f64, chunk_p50_ns: quantile(&mut chunks, 0.5) }
}

/// Enqueue `n` pre-allocated objects with `enqueue`, then `barrier`: the enqueue timings, and callbacks per
/// second from the first enqueue until the barrier returned.
fn callbacks_nolock(n: usize, enqueue: impl Fn(NonNull<RcuHead>), barrier: impl FnOnce()) -> (Enqueue, f64) {
    let objs: Vec<NonNull<RcuHead>> = (0..n as u64).map(|i| new_obj64(i).cast()).collect();
    let t0 = Instant::now();
    let e = enqueue_chunks(n, |i| enqueue(objs[i]));
    barrier();
    (e, n as f64 / t0.elapsed().as_secs_f64())
}

fn measure_cb(c: Cb, n: usize) -> Option<(Enqueue, Option<f64>)> {
    match c {
        Cb::CallRcu => {
            let (e, d) = callbacks_nolock(
                n,
                // SAFETY: each head belongs to a fresh Obj64 handed over to the callback, which frees it.
                |h| unsafe { call_rcu_nolock(h, free_obj64) },
                rcu_barrier,
            );
            Some((e, Some(d)))
        }
        Cb::CallSrcu => {
            let (e, d) = callbacks_nolock(
                n,
                // SAFETY: as above.
                |h| unsafe { BENCH_SRCU.call_srcu_fast_nolock(h, free_obj64) },
                || BENCH_SRCU.barrier(),
            );
            Some((e, Some(d)))
        }
        Cb::CrossbeamDefer => {
            let e = enqueue_chunks(n, |_| {
                let g = epoch::pin();
                g.defer(|| ());
            });
            // Untimed: do not leave a backlog to the next workload.
            for _ in 0..n / 64 + 64 {
                epoch::pin().flush();
            }
            Some((e, None))
        }
        Cb::Urcu => urcu_callbacks(n).map(|(e, d)| (e, Some(d))),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Retire and free

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retire {
    KfreeRcu,
    KfreeSrcu,
    /// crossbeam on nolock's allocator.
    CrossbeamNolock,
    /// crossbeam on the global allocator (glibc).
    CrossbeamDestroy,
    /// seize on nolock's allocator.
    SeizeNolock,
    /// seize on the global allocator (glibc).
    Seize,
    Urcu,
}

const RETIRES: [Retire; 7] = [
    Retire::KfreeRcu,
    Retire::KfreeSrcu,
    Retire::CrossbeamNolock,
    Retire::CrossbeamDestroy,
    Retire::SeizeNolock,
    Retire::Seize,
    Retire::Urcu,
];

impl Retire {
    fn name(self) -> &'static str {
        match self {
            Retire::KfreeRcu => "nolock kmalloc_nolock + kfree_rcu_nolock",
            Retire::KfreeSrcu => "nolock kmalloc_nolock + kfree_srcu_fast_nolock",
            Retire::CrossbeamNolock => "crossbeam-epoch kmalloc_nolock + defer(kfree_nolock)",
            Retire::CrossbeamDestroy => "crossbeam-epoch Owned::new + defer_destroy (glibc)",
            Retire::SeizeNolock => "seize kmalloc_nolock + retire(kfree_nolock)",
            Retire::Seize => "seize Box::new + retire (glibc)",
            Retire::Urcu => "liburcu-memb malloc + call_rcu(free) (FFI)",
        }
    }
}

/// A baseline's object on nolock's allocator: 64 bytes from `kmalloc_nolock`, written like `Counted`.
#[inline]
fn new_raw64(i: u64) -> *mut [u64; 8] {
    let Some(p) = kmalloc_nolock(64, Gfp::NONE) else {
        panic!("kmalloc_nolock(64) failed during the benchmark");
    };
    let p = p.cast::<[u64; 8]>().as_ptr();
    // SAFETY: a fresh 64-byte kmalloc object, 8-aligned.
    unsafe { p.write([i; 8]) };
    p
}

/// Free a baseline's nolock object and count it, as `Counted`'s drop does.
///
/// # Safety
/// `p` came from `new_raw64` and is freed once.
#[inline]
unsafe fn free_raw64(p: *mut [u64; 8]) {
    // SAFETY: forwarded from the caller.
    unsafe { kfree_nolock(p.cast()) };
    BASELINE_DROPS.store(BASELINE_DROPS.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// seize's reclaim function for `new_raw64` objects.
///
/// # Safety
/// As [`free_raw64`].
unsafe fn seize_free_raw64(p: *mut [u64; 8], _c: &seize::Collector) {
    // SAFETY: forwarded.
    unsafe { free_raw64(p) };
}

/// Wait for crossbeam to drop `n` objects, or say it did not.
fn crossbeam_drained(n: usize) -> Result<(), String> {
    if drain_baseline(n as u64, || epoch::pin().flush()) {
        Ok(())
    } else {
        Err(format!(
            "crossbeam-epoch freed only {} of {n} objects within {} s",
            BASELINE_DROPS.load(Ordering::Relaxed),
            DRAIN_DEADLINE.as_secs()
        ))
    }
}

/// Allocate, write and retire `n` objects, then wait for all of them: ns per object.
fn retire_nolock(n: usize, retire: impl Fn(*mut u8, NonNull<RcuHead>), barrier: impl FnOnce()) -> f64 {
    let t = Instant::now();
    for i in 0..n as u64 {
        let o = new_obj64(i);
        // SAFETY: `o` is live; taking the address of its head field.
        let head = unsafe { NonNull::new_unchecked(&raw mut (*o.as_ptr()).head) };
        retire(o.as_ptr().cast(), head);
    }
    barrier();
    t.elapsed().as_nanos() as f64 / n as f64
}

/// Wait until the baselines dropped `n` objects, calling `flush` meanwhile; false after [`DRAIN_DEADLINE`].
fn drain_baseline(n: u64, mut flush: impl FnMut()) -> bool {
    let deadline = Instant::now() + DRAIN_DEADLINE;
    while BASELINE_DROPS.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return false;
        }
        flush();
    }
    true
}

fn measure_retire(r: Retire, n: usize) -> Result<Option<f64>, String> {
    Ok(Some(match r {
        Retire::KfreeRcu => retire_nolock(
            n,
            // SAFETY: a fresh kmalloc object with its head inside, never used again by us.
            |p, h| unsafe { kfree_rcu_nolock(p, h) },
            rcu_barrier,
        ),
        Retire::KfreeSrcu => retire_nolock(
            n,
            // SAFETY: as above.
            |p, h| unsafe { kfree_srcu_fast_nolock(&BENCH_SRCU, p, h) },
            || BENCH_SRCU.barrier(),
        ),
        Retire::CrossbeamNolock => {
            BASELINE_DROPS.store(0, Ordering::Relaxed);
            let t = Instant::now();
            for i in 0..n as u64 {
                let g = epoch::pin();
                let p = new_raw64(i) as usize;
                // SAFETY: the object was never shared; the deferred function frees it once, after every guard
                // that could see it is gone; it captures only the address (Send).
                unsafe { g.defer_unchecked(move || free_raw64(p as *mut [u64; 8])) };
            }
            crossbeam_drained(n)?;
            t.elapsed().as_nanos() as f64 / n as f64
        }
        Retire::CrossbeamDestroy => {
            BASELINE_DROPS.store(0, Ordering::Relaxed);
            let t = Instant::now();
            for i in 0..n as u64 {
                let g = epoch::pin();
                let s = epoch::Owned::new(Counted { _payload: [i; 8] }).into_shared(&g);
                // SAFETY: the object was never shared: nobody else can reach it.
                unsafe { g.defer_destroy(s) };
            }
            crossbeam_drained(n)?;
            t.elapsed().as_nanos() as f64 / n as f64
        }
        Retire::SeizeNolock => {
            let c = seize::Collector::new();
            BASELINE_DROPS.store(0, Ordering::Relaxed);
            let t = Instant::now();
            for i in 0..n as u64 {
                let g = c.enter();
                let p = new_raw64(i);
                // SAFETY: the object was never shared, and `seize_free_raw64` frees a `new_raw64` object once.
                unsafe { c.retire(p, seize_free_raw64) };
                drop(g);
            }
            // SAFETY: no thread is inside a guard of `c` (only this one uses it, and its guards are dropped).
            unsafe { c.reclaim_all() };
            let e = t.elapsed().as_nanos() as f64 / n as f64;
            let got = BASELINE_DROPS.load(Ordering::Relaxed);
            if got < n as u64 {
                return Err(format!("seize freed only {got} of {n} objects after reclaim_all"));
            }
            e
        }
        Retire::Seize => {
            let c = seize::Collector::new();
            BASELINE_DROPS.store(0, Ordering::Relaxed);
            let t = Instant::now();
            for i in 0..n as u64 {
                let g = c.enter();
                let p = Box::into_raw(Box::new(Counted { _payload: [i; 8] }));
                // SAFETY: the object was never shared, and came from Box::new as `reclaim::boxed` expects.
                unsafe { c.retire(p, seize::reclaim::boxed::<Counted>) };
                drop(g);
            }
            // SAFETY: no thread is inside a guard of `c` (only this one uses it, and its guards are dropped).
            unsafe { c.reclaim_all() };
            let e = t.elapsed().as_nanos() as f64 / n as f64;
            let got = BASELINE_DROPS.load(Ordering::Relaxed);
            if got < n as u64 {
                return Err(format!("seize freed only {got} of {n} objects after reclaim_all"));
            }
            e
        }
        Retire::Urcu => return Ok(urcu_retire(n)),
    }))
}

// ---------------------------------------------------------------------------------------------------------
// liburcu (feature `liburcu`; skipped when the library is not installed)

#[cfg(feature = "liburcu")]
fn urcu_available() -> bool {
    urcu::get().is_some()
}

#[cfg(not(feature = "liburcu"))]
fn urcu_available() -> bool {
    false
}

#[cfg(feature = "liburcu")]
fn urcu_read(n: u64) -> Option<f64> {
    let lib = urcu::get()?;
    let reg = lib.register();
    Some(read_loop(n, || lib.read_lock(&reg)))
}

#[cfg(not(feature = "liburcu"))]
fn urcu_read(_n: u64) -> Option<f64> {
    None
}

#[cfg(feature = "liburcu")]
fn urcu_busy(stop: &AtomicBool, running: &AtomicBool) {
    if let Some(lib) = urcu::get() {
        let reg = lib.register();
        spin_sections(stop, running, || lib.read_lock(&reg));
    } else {
        running.store(true, Ordering::Release);
    }
}

#[cfg(not(feature = "liburcu"))]
fn urcu_busy(_stop: &AtomicBool, running: &AtomicBool) {
    running.store(true, Ordering::Release);
}

#[cfg(feature = "liburcu")]
fn urcu_sync(n: usize, busy: Option<Busy>) -> Option<((f64, f64), Option<f64>)> {
    let lib = urcu::get()?;
    let reg = lib.register();
    Some(with_busy(busy, || latency_us(n, || lib.synchronize(&reg))))
}

#[cfg(not(feature = "liburcu"))]
fn urcu_sync(_n: usize, _busy: Option<Busy>) -> Option<((f64, f64), Option<f64>)> {
    None
}

#[cfg(feature = "liburcu")]
fn urcu_malloc_obj() -> *mut urcu::UrcuHead {
    // SAFETY: plain malloc of 64 bytes.
    let p = unsafe { libc::malloc(64) }.cast::<urcu::UrcuHead>();
    assert!(!p.is_null(), "malloc(64) failed during the benchmark");
    // SAFETY: fresh 64-byte allocation, aligned for a head of two pointers.
    unsafe { p.write(urcu::UrcuHead::new()) };
    p
}

#[cfg(feature = "liburcu")]
fn urcu_callbacks(n: usize) -> Option<(Enqueue, f64)> {
    let lib = urcu::get()?;
    let reg = lib.register();
    let objs: Vec<*mut urcu::UrcuHead> = (0..n).map(|_| urcu_malloc_obj()).collect();
    let t0 = Instant::now();
    // SAFETY: each object is a fresh malloc object handed over to `free_head`, which frees it.
    let e = enqueue_chunks(n, |i| unsafe { lib.call_rcu(&reg, objs[i], urcu::free_head) });
    lib.barrier(&reg);
    Some((e, n as f64 / t0.elapsed().as_secs_f64()))
}

#[cfg(not(feature = "liburcu"))]
fn urcu_callbacks(_n: usize) -> Option<(Enqueue, f64)> {
    None
}

#[cfg(feature = "liburcu")]
fn urcu_retire(n: usize) -> Option<f64> {
    let lib = urcu::get()?;
    let reg = lib.register();
    let t = Instant::now();
    for _ in 0..n {
        let h = urcu_malloc_obj();
        // SAFETY: as in `urcu_callbacks`.
        unsafe { lib.call_rcu(&reg, h, urcu::free_head) };
    }
    lib.barrier(&reg);
    Some(t.elapsed().as_nanos() as f64 / n as f64)
}

#[cfg(not(feature = "liburcu"))]
fn urcu_retire(_n: usize) -> Option<f64> {
    None
}

// ---------------------------------------------------------------------------------------------------------
// Driver

const G_READ: &str = "read";
const G_GP: &str = "grace_period";
const G_CB: &str = "callbacks";
const G_RETIRE: &str = "retire";

/// The contenders in `all`, rotated by `rep` so that none always runs first.
fn rotated<T: Copy>(all: &[T], rep: usize) -> Vec<T> {
    (0..all.len()).map(|i| all[(i + rep) % all.len()]).collect()
}

/// One repetition of every workload; `record: false` for the warm-up.
fn one_rep(rep: usize, sz: Sizes, base: &Baselines, res: &mut Results, record: bool, bar: &indicatif::ProgressBar) {
    bar.set_message("read side");
    for r in rotated(&READERS, rep) {
        if let Some(ns) = measure_read(r, sz.read, base)
            && record
        {
            res.add(G_READ, r.name(), "lock_unlock", "ns", ns);
        }
    }
    bar.inc(1);

    bar.set_message("grace periods");
    for op in rotated(&GP_OPS, rep) {
        for busy in [false, true] {
            match measure_gp(op, sz.lat, busy) {
                // The busy reader was on a CPU for less than half of the measurement: mostly an idle system
                // was measured. Dropped, and said.
                Some((_, Some(share))) if record && share < BUSY_MIN_SHARE => {
                    res.dropped_busy += 1;
                    res.add(G_GP, op.name(), "busy_reader_cpu_share", "", share);
                }
                Some(((p50, p99), share)) if record => {
                    if let Some(sh) = share {
                        res.add(G_GP, op.name(), "busy_reader_cpu_share", "", sh);
                    }
                    let (m50, m99) = if busy { ("busy_p50", "busy_p99") } else { ("idle_p50", "idle_p99") };
                    res.add(G_GP, op.name(), m50, "us", p50);
                    res.add(G_GP, op.name(), m99, "us", p99);
                }
                None if op == GpOp::Membarrier => {
                    res.note(format!("membarrier(PRIVATE_EXPEDITED) failed: {}", std::io::Error::last_os_error()))
                }
                _ => {}
            }
        }
    }
    bar.inc(1);

    bar.set_message("callbacks");
    for c in rotated(&CBS, rep) {
        if let Some((enq, drain)) = measure_cb(c, sz.cbs)
            && record
        {
            res.add(G_CB, c.name(), "enqueue", "ns", enq.mean_ns);
            res.add(G_CB, c.name(), "enqueue_chunk_p50", "ns", enq.chunk_p50_ns);
            if let Some(d) = drain {
                res.add(G_CB, c.name(), "drain", "Mcb/s", d / 1e6);
            }
        }
    }
    bar.inc(1);

    bar.set_message("retire and free");
    for r in rotated(&RETIRES, rep) {
        match measure_retire(r, sz.retire) {
            Ok(Some(ns)) if record => res.add(G_RETIRE, r.name(), "per_object", "ns", ns),
            Err(e) => res.note(e),
            _ => {}
        }
    }
    bar.inc(1);
}

/// Run the benchmarks and print the tables.
pub fn run(args: &BenchArgs) -> ExitCode {
    let reps = args.reps();
    let sz = Sizes::new(args.quick);
    let urcu = urcu_available();
    let base = Baselines::new();

    println!(
        "nolock bench rcu ({}): {reps} timed repetitions per cell, contenders take turns inside each repetition; \
         baselines: crossbeam-epoch 0.9.21, seize 0.5.1, membarrier{}; {}",
        if args.quick { "quick" } else { "full" },
        if urcu {
            ", liburcu-memb"
        } else if cfg!(feature = "liburcu") {
            " (liburcu-memb.so.8 not found: skipped)"
        } else {
            ""
        },
        super::conditions()
    );
    let bar = progress_bar((reps * 4 + 4) as u64);
    let mut res = Results::default();
    // Warm-up: threads' caches, page faults, the grace-period worker, code paths.
    one_rep(0, sz.warmup(), &base, &mut res, false, &bar);
    let t_start = Instant::now();
    for rep in 0..reps {
        one_rep(rep, sz, &base, &mut res, true, &bar);
    }
    bar.finish_and_clear();
    let took = t_start.elapsed();

    print_tables(&res, sz);
    if res.dropped_busy > 0 {
        res.notes.push(format!(
            "{} of {} busy-reader sample sets were dropped: the busy reader was on a CPU for less than {:.0}% of the \
             measurement (the machine is loaded), so they measured mostly an idle system",
            res.dropped_busy,
            reps * (GP_OPS.len() - usize::from(!urcu)),
            BUSY_MIN_SHARE * 100.0
        ));
    }
    for n in &res.notes {
        println!("note: {n}");
    }
    println!(
        "timed part took {:.1} s (load average at the end {}); cells are median [min–max] over the repetitions; \
         compare numbers only within one run",
        took.as_secs_f64(),
        super::load_average()
    );

    if let Some(path) = &args.json {
        if let Err(e) = std::fs::write(path, to_json(args.quick, reps, urcu, &res)) {
            eprintln!("nolock bench rcu: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("results written to {}", path.display());
    }
    ExitCode::SUCCESS
}

fn cell(s: Option<Summary>, digits: usize) -> String {
    s.map_or_else(|| "–".into(), |s| super::cell(&s, digits))
}

fn ratio(a: Option<Summary>, b: Option<Summary>) -> Option<f64> {
    Some(a?.median / b?.median)
}

fn ratio_cell(r: Option<f64>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{r:.2}"))
}

fn verdict(r: Option<f64>, target: f64) -> &'static str {
    match r {
        Some(r) if r <= target => "met",
        Some(_) => "MISSED",
        None => "n/a",
    }
}

/// The headline ratios (also in the JSON).
struct Ratios {
    rcu_vs_pin: Option<f64>,
    srcu_vs_pin: Option<f64>,
    tt_vs_pin: Option<f64>,
    call_rcu_vs_defer: Option<f64>,
    call_rcu_vs_defer_p50: Option<f64>,
    sync_busy_vs_membarrier: Option<f64>,
    srcu_sync_busy_vs_membarrier: Option<f64>,
    kfree_rcu_vs_crossbeam: Option<f64>,
    kfree_rcu_vs_seize: Option<f64>,
    kfree_rcu_vs_crossbeam_same_alloc: Option<f64>,
    kfree_rcu_vs_seize_same_alloc: Option<f64>,
    pin_vs_locked_rmw: Option<f64>,
}

fn ratios(res: &Results) -> Ratios {
    let pin = res.get(G_READ, Reader::CrossbeamPin.name(), "lock_unlock");
    let mb = res.get(G_GP, GpOp::Membarrier.name(), "busy_p50");
    let kr = res.get(G_RETIRE, Retire::KfreeRcu.name(), "per_object");
    Ratios {
        rcu_vs_pin: ratio(res.get(G_READ, Reader::Rcu.name(), "lock_unlock"), pin),
        srcu_vs_pin: ratio(res.get(G_READ, Reader::Srcu.name(), "lock_unlock"), pin),
        tt_vs_pin: ratio(res.get(G_READ, Reader::TasksTrace.name(), "lock_unlock"), pin),
        call_rcu_vs_defer: ratio(
            res.get(G_CB, Cb::CallRcu.name(), "enqueue"),
            res.get(G_CB, Cb::CrossbeamDefer.name(), "enqueue"),
        ),
        call_rcu_vs_defer_p50: ratio(
            res.get(G_CB, Cb::CallRcu.name(), "enqueue_chunk_p50"),
            res.get(G_CB, Cb::CrossbeamDefer.name(), "enqueue_chunk_p50"),
        ),
        sync_busy_vs_membarrier: ratio(res.get(G_GP, GpOp::Rcu.name(), "busy_p50"), mb),
        srcu_sync_busy_vs_membarrier: ratio(res.get(G_GP, GpOp::Srcu.name(), "busy_p50"), mb),
        kfree_rcu_vs_crossbeam: ratio(kr, res.get(G_RETIRE, Retire::CrossbeamDestroy.name(), "per_object")),
        kfree_rcu_vs_seize: ratio(kr, res.get(G_RETIRE, Retire::Seize.name(), "per_object")),
        kfree_rcu_vs_crossbeam_same_alloc: ratio(kr, res.get(G_RETIRE, Retire::CrossbeamNolock.name(), "per_object")),
        kfree_rcu_vs_seize_same_alloc: ratio(kr, res.get(G_RETIRE, Retire::SeizeNolock.name(), "per_object")),
        pin_vs_locked_rmw: ratio(pin, res.get(G_READ, Reader::LockedRmw.name(), "lock_unlock")),
    }
}

fn print_tables(res: &Results, sz: Sizes) {
    let r = ratios(res);

    // Read side.
    let pin = res.get(G_READ, Reader::CrossbeamPin.name(), "lock_unlock");
    let seize = res.get(G_READ, Reader::SeizeEnter.name(), "lock_unlock");
    let mut rows = vec![
        ["read side, 1 thread", "ns per lock+unlock", "/ crossbeam pin", "/ seize enter"].map(String::from).to_vec(),
    ];
    for rd in READERS {
        let s = res.get(G_READ, rd.name(), "lock_unlock");
        if s.is_none() {
            continue;
        }
        rows.push(vec![rd.name().into(), cell(s, 2), ratio_cell(ratio(s, pin)), ratio_cell(ratio(s, seize))]);
    }
    println!();
    print_rows(&rows);
    println!(
        "target ≤ 0.5× crossbeam pin: RCU {} ({}), SRCU-fast {} ({}); Tasks Trace {}",
        ratio_cell(r.rcu_vs_pin),
        verdict(r.rcu_vs_pin, 0.5),
        ratio_cell(r.srcu_vs_pin),
        verdict(r.srcu_vs_pin, 0.5),
        ratio_cell(r.tt_vs_pin),
    );
    println!(
        "{} outermost lock+unlock per repetition; crossbeam's pin() = {} lock cmpxchg here (its SeqCst fence on \
         x86), nolock's readers use no fence and no RMW: the ratio follows the CPU's cost of a locked instruction",
        sz.read,
        ratio_cell(r.pin_vs_locked_rmw),
    );

    // Grace periods.
    let mb = res.get(G_GP, GpOp::Membarrier.name(), "busy_p50");
    let mut rows = vec![
        [
            "grace period (µs)",
            "idle p50",
            "idle p99",
            "1 busy reader p50",
            "1 busy reader p99",
            "busy p50 / membarrier",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for op in GP_OPS {
        let g = |m| res.get(G_GP, op.name(), m);
        if g("idle_p50").is_none() {
            continue;
        }
        let rel = if op == GpOp::Membarrier { "1.00".into() } else { ratio_cell(ratio(g("busy_p50"), mb)) };
        rows.push(vec![
            op.name().into(),
            cell(g("idle_p50"), 2),
            cell(g("idle_p99"), 2),
            cell(g("busy_p50"), 2),
            cell(g("busy_p99"), 2),
            rel,
        ]);
    }
    println!();
    print_rows(&rows);
    println!(
        "{} calls per sample set; p50 and p99 are per repetition, then median [min–max] over repetitions; the \
         busy reader spins on short sections of the same flavour (membarrier: next to the RCU reader)",
        sz.lat
    );
    let shares: Vec<f64> = res
        .series
        .iter()
        .filter(|x| x.group == G_GP && x.metric == "busy_reader_cpu_share")
        .flat_map(|x| x.samples.iter().copied())
        .collect();
    if !shares.is_empty() {
        let sh = summarize(&shares);
        println!(
            "the busy reader was on a CPU for {:.0}% [{:.0}–{:.0}%] of each busy measurement (median [min–max]); sets \
             below {:.0}% are dropped (a note says how many)",
            sh.median * 100.0,
            sh.min * 100.0,
            sh.max * 100.0,
            BUSY_MIN_SHARE * 100.0
        );
    }

    // Callbacks.
    let defer = res.get(G_CB, Cb::CrossbeamDefer.name(), "enqueue");
    let defer_p50 = res.get(G_CB, Cb::CrossbeamDefer.name(), "enqueue_chunk_p50");
    let mut rows = vec![
        [
            "callbacks from 1 thread",
            "enqueue ns/call (mean)",
            "/ crossbeam",
            "64-call chunks p50",
            "/ crossbeam",
            "drain M cb/s (1st enqueue → barrier)",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for c in CBS {
        let e = res.get(G_CB, c.name(), "enqueue");
        if e.is_none() {
            continue;
        }
        let p = res.get(G_CB, c.name(), "enqueue_chunk_p50");
        let d = res.get(G_CB, c.name(), "drain");
        rows.push(vec![
            c.name().into(),
            cell(e, 1),
            ratio_cell(ratio(e, defer)),
            cell(p, 1),
            ratio_cell(ratio(p, defer_p50)),
            if d.is_some() { cell(d, 2) } else { "n/a (no barrier)".into() },
        ]);
    }
    println!();
    print_rows(&rows);
    let (rs, ss) = (nolock::rcu_stats(), BENCH_SRCU.stats());
    println!(
        "{} callbacks per repetition, pre-allocated 64 B kmalloc_nolock objects freed by their callback (liburcu: \
         malloc / free), enqueued in timed chunks of {CHUNK}; target ≤ 1.0× crossbeam defer: mean {} ({}), chunk \
         p50 {} ({}); peak pending callbacks seen by the worker: RCU {}, SRCU-fast {}",
        sz.cbs,
        ratio_cell(r.call_rcu_vs_defer),
        verdict(r.call_rcu_vs_defer, 1.0),
        ratio_cell(r.call_rcu_vs_defer_p50),
        verdict(r.call_rcu_vs_defer_p50, 1.0),
        ss_count(rs.peak_pending),
        ss_count(ss.peak_pending),
    );

    // Retire and free.
    let kr = res.get(G_RETIRE, Retire::KfreeRcu.name(), "per_object");
    let mut rows = vec![
        ["retire and free 64 B objects", "ns/object incl. alloc and free", "kfree_rcu_nolock / this"]
            .map(String::from)
            .to_vec(),
    ];
    for rt in RETIRES {
        let s = res.get(G_RETIRE, rt.name(), "per_object");
        if s.is_none() {
            continue;
        }
        rows.push(vec![rt.name().into(), cell(s, 1), ratio_cell(ratio(kr, s))]);
    }
    println!();
    print_rows(&rows);
    println!(
        "{} objects per repetition: allocate, write, retire each (baselines: one pin / enter per object), then \
         wait until all are freed (rcu_barrier / srcu barrier / crossbeam flush loop / seize reclaim_all / urcu \
         barrier)",
        sz.retire
    );
    println!(
        "same allocator (kmalloc_nolock / kfree_nolock on both sides: the reclamation alone): kfree_rcu_nolock / \
         crossbeam {}, / seize {}; baselines on glibc as their users write it (allocator and reclamation): / \
         crossbeam {}, / seize {}",
        ratio_cell(r.kfree_rcu_vs_crossbeam_same_alloc),
        ratio_cell(r.kfree_rcu_vs_seize_same_alloc),
        ratio_cell(r.kfree_rcu_vs_crossbeam),
        ratio_cell(r.kfree_rcu_vs_seize),
    );
    println!(
        "grace periods in this run: RCU {}, SRCU-fast (bench domain) {}",
        ss_count(rs.grace_periods),
        ss_count(ss.grace_periods)
    );
    println!();
}

fn ss_count(n: u64) -> String {
    crate::fmt::count(n)
}

fn to_json(quick: bool, reps: usize, urcu: bool, res: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{{\n  \"bench\": \"rcu\",\n  \"quick\": {quick},\n  \"reps\": {reps},\n  \"liburcu\": {urcu},\n  \"results\": ["
    );
    for (i, s) in res.series.iter().enumerate() {
        let sum = summarize(&s.samples);
        let samples = s.samples.iter().map(|&x| json_num(x)).collect::<Vec<_>>().join(", ");
        let _ = write!(
            out,
            "    {{\"group\": {}, \"contender\": {}, \"metric\": {}, \"unit\": {}, \"median\": {}, \"min\": {}, \
             \"max\": {}, \"samples\": [{samples}]}}{}",
            json_str(s.group),
            json_str(s.who),
            json_str(s.metric),
            json_str(s.unit),
            json_num(sum.median),
            json_num(sum.min),
            json_num(sum.max),
            if i + 1 < res.series.len() { ",\n" } else { "\n" }
        );
    }
    let r = ratios(res);
    let o = |x: Option<f64>| x.map_or_else(|| "null".into(), json_num);
    let _ = write!(
        out,
        "  ],\n  \"ratios\": {{\n    \"rcu_read/crossbeam_pin\": {},\n    \"srcu_fast_read/crossbeam_pin\": {},\n    \
         \"tasks_trace_read/crossbeam_pin\": {},\n    \"call_rcu_nolock/crossbeam_defer\": {},\n    \"call_rcu_nolock/crossbeam_defer_chunk_p50\": {},\n    \
         \"synchronize_rcu_busy_p50/membarrier_busy_p50\": {},\n    \
         \"srcu_synchronize_busy_p50/membarrier_busy_p50\": {},\n    \"kfree_rcu_nolock/crossbeam_defer_destroy\": {},\n    \
         \"kfree_rcu_nolock/seize_retire\": {},\n    \
         \"kfree_rcu_nolock/crossbeam_defer_same_allocator\": {},\n    \
         \"kfree_rcu_nolock/seize_retire_same_allocator\": {},\n    \"crossbeam_pin/lock_cmpxchg\": {}\n  }},\n  \"notes\": [{}]\n}}\n",
        o(r.rcu_vs_pin),
        o(r.srcu_vs_pin),
        o(r.tt_vs_pin),
        o(r.call_rcu_vs_defer),
        o(r.call_rcu_vs_defer_p50),
        o(r.sync_busy_vs_membarrier),
        o(r.srcu_sync_busy_vs_membarrier),
        o(r.kfree_rcu_vs_crossbeam),
        o(r.kfree_rcu_vs_seize),
        o(r.kfree_rcu_vs_crossbeam_same_alloc),
        o(r.kfree_rcu_vs_seize_same_alloc),
        o(r.pin_vs_locked_rmw),
        res.notes.iter().map(|n| json_str(n)).collect::<Vec<_>>().join(", ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_visits_everyone() {
        assert_eq!(rotated(&[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(rotated(&[1, 2, 3], 3), vec![1, 2, 3]);
    }

    #[test]
    fn every_workload_runs() {
        nolock::init();
        let sz = Sizes { read: 10_000, lat: 5, cbs: 2_000, retire: 2_000 };
        let base = Baselines::new();
        let mut res = Results::default();
        one_rep(0, sz, &base, &mut res, true, &indicatif::ProgressBar::hidden());
        assert!(res.notes.is_empty(), "{:?}", res.notes);
        for r in READERS.into_iter().filter(|&r| r != Reader::Urcu) {
            assert!(res.get(G_READ, r.name(), "lock_unlock").is_some(), "{}", r.name());
        }
        for op in GP_OPS.into_iter().filter(|&o| o != GpOp::Urcu) {
            assert!(res.get(G_GP, op.name(), "idle_p99").is_some(), "{}", op.name());
            // A loaded machine may give the busy reader no CPU: that sample set is dropped and counted.
            assert!(res.get(G_GP, op.name(), "busy_p99").is_some() || res.dropped_busy > 0, "{}", op.name());
        }
        assert!(res.get(G_CB, Cb::CallRcu.name(), "drain").is_some());
        assert!(res.get(G_CB, Cb::CrossbeamDefer.name(), "enqueue").is_some());
        for rt in RETIRES.into_iter().filter(|&r| r != Retire::Urcu) {
            assert!(res.get(G_RETIRE, rt.name(), "per_object").is_some(), "{}", rt.name());
        }
        let json = to_json(true, 1, false, &res);
        assert!(json.contains("\"rcu_read/crossbeam_pin\""));
    }
}
