//! "CPU" and "IRQs-off region" in userspace.
//!
//! The kernel's BPF code is written for per-CPU data touched with interrupts off. Here a CPU is the calling
//! thread's nolock slot ([`nolock::thread::current`]): an index below [`NR_CPUS`] that one thread owns at a
//! time, so per-CPU tables are arrays indexed by it. A thread with no slot (more than [`NR_CPUS`] threads, or
//! one that is exiting) has no CPU and takes each structure's shared path.
//!
//! Interrupts cannot be turned off in userspace: a signal handler can run in the middle of any region. What
//! the kernel got from `local_irq_save` (a per-CPU structure is never entered twice at once) the baseline
//! re-creates with its own counters (the `active` counter of `bpf_mem_alloc`, `map_locked`), which is exactly
//! where its spurious failures come from.
//!
//! An [`IrqRegion`] marks one region on the current thread. Like an IRQs-off section in the kernel it is also
//! an RCU read-side critical section (it holds a [`nolock::rcu_read_lock`] guard): memory that a grace period
//! protects stays valid for the whole region.
//!
//! # Deferred work (`irq_work`)
//!
//! Work deferred with [`IrqRegion::defer`] (the kernel's `irq_work_queue`) runs when the outermost region of
//! this thread ends, the way a queued `irq_work` runs once interrupts are enabled again. The queue is a small
//! per-thread array of cells; it is written by the thread and by signal handlers that interrupt it, so every
//! edit follows DESIGN.md section 4:
//!
//! - a cell is claimed with one compare-and-swap of its function word (0 → `RESERVED`), then its argument is
//!   written, then its function: a handler that interrupts the writer sees the cell taken and uses another;
//! - the queue runs only at the end of the *outermost* region, and while it runs the thread counts as inside a
//!   region (the depth stays at 1). A handler that interrupts the runner therefore opens a *nested* region,
//!   whose end does not run the queue: only one context ever takes items out, so taking an item (a load, then
//!   a store) cannot be split by another taker and no item runs twice. Items a handler queues meanwhile are
//!   picked up by the runner, which loops until a full scan finds nothing (the `DIRTY` word, set after an item
//!   is written and cleared before each scan, tells it to look again);
//! - the depth is a nesting word a handler restores before it returns, so its load-then-store update is safe.
//!
//! # Late work (the late `irq_work` IPI)
//!
//! [`defer_late`] models an `irq_work` whose interrupt arrives late (a lazy `irq_work`, or an IPI that the
//! hardware delivers after the burst is over). The item waits in a per-CPU table until the late worker thread
//! ([`start_late_worker`]) has seen it for the given delay and marks it due; the owning thread then runs it at
//! its next region boundary (entering or leaving an outermost region), as the interrupt would have run between
//! two regions. Until then nothing runs it: that is the failure the late mode reproduces.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering, compiler_fence};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Number of per-CPU entries a table needs: one per nolock thread slot.
pub const NR_CPUS: usize = nolock::thread::MAX_THREADS;

/// The calling thread's CPU (its nolock slot), claiming a slot on the thread's first call.
///
/// Returns `None` when the thread has no slot (all [`NR_CPUS`] in use, or the thread is exiting).
pub fn this_cpu() -> Option<usize> {
    nolock::thread::current().map(|id| id as usize)
}

/// How many deferred items a thread can hold; a full queue runs the new item at once instead.
const DEFERRED_MAX: usize = 8;

/// Function word of a cell being written.
const RESERVED: usize = 1;

/// One queued item: its function (0 = empty, [`RESERVED`] = being written) and argument.
struct Slot {
    f: AtomicUsize,
    arg: AtomicUsize,
}

impl Slot {
    const fn new() -> Self {
        Slot { f: AtomicUsize::new(0), arg: AtomicUsize::new(0) }
    }
}

thread_local! {
    /// Region nesting depth of this thread (a nesting word: every context restores it before returning).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// Set after an item is queued; cleared by the runner before each scan.
    static DIRTY: AtomicBool = const { AtomicBool::new(false) };
    static QUEUE: [Slot; DEFERRED_MAX] = const { [const { Slot::new() }; DEFERRED_MAX] };
}

/// One IRQs-off region on the current thread (the kernel's `local_irq_save` … `local_irq_restore`).
///
/// Regions nest (a signal handler that runs a map operation inside another opens a nested region). Deferred
/// work runs when the outermost region is dropped. A region is an RCU read-side critical section.
#[must_use = "the region ends when it is dropped"]
pub struct IrqRegion {
    _rcu: nolock::RcuReadGuard,
    _not_send: core::marker::PhantomData<*mut ()>,
}

impl IrqRegion {
    /// Enters a region on the current thread.
    pub fn enter() -> Self {
        let d = DEPTH.with(|d| d.get());
        if d == 0 {
            run_due_late();
        }
        // Load then store: a handler that runs in between leaves the depth as it found it (nesting word).
        DEPTH.with(|c| c.set(d + 1));
        compiler_fence(Ordering::SeqCst);
        IrqRegion { _rcu: nolock::rcu_read_lock(), _not_send: core::marker::PhantomData }
    }

    /// Whether the current thread is inside a region (or running deferred work).
    pub fn inside() -> bool {
        DEPTH.with(|d| d.get() > 0)
    }

    /// Queues `f(arg)` to run when the outermost region on this thread ends (the kernel's `irq_work_queue`).
    ///
    /// Outside any region, or when the thread's queue is full, it runs at once. The same `(f, arg)` queued
    /// twice runs once, as a queued `irq_work` is not queued again.
    pub fn defer(f: fn(usize), arg: usize) {
        if !Self::inside() {
            let _rcu = nolock::rcu_read_lock();
            f(arg);
            return;
        }
        let fw = f as usize;
        let queued = QUEUE.with(|q| {
            if q.iter().any(|c| c.f.load(Ordering::Relaxed) == fw && c.arg.load(Ordering::Relaxed) == arg) {
                return true;
            }
            for cell in q.iter() {
                // Relaxed CAS: only this thread and its handlers touch the queue; the CAS is one instruction a
                // handler cannot split, which is all the claim needs.
                if cell.f.compare_exchange(0, RESERVED, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                    cell.arg.store(arg, Ordering::Relaxed);
                    compiler_fence(Ordering::SeqCst);
                    cell.f.store(fw, Ordering::Relaxed);
                    compiler_fence(Ordering::SeqCst);
                    DIRTY.with(|d| d.store(true, Ordering::Relaxed));
                    return true;
                }
            }
            false
        });
        if !queued {
            f(arg);
        }
    }
}

impl Drop for IrqRegion {
    fn drop(&mut self) {
        let d = DEPTH.with(|d| d.get());
        if d > 1 {
            DEPTH.with(|c| c.set(d - 1));
            return;
        }
        // Outermost: run the queue with the depth still at 1, so that a handler interrupting us opens a nested
        // region and leaves the queue to us (see the module header).
        loop {
            run_queue();
            compiler_fence(Ordering::SeqCst);
            DEPTH.with(|c| c.set(0));
            compiler_fence(Ordering::SeqCst);
            // A handler that ran between the last scan and the store above saw depth 1, so it left what it
            // queued to us and set DIRTY. (One that runs after the store is outermost and runs its own queue.)
            if !DIRTY.with(|d| d.load(Ordering::Relaxed)) {
                break;
            }
            DEPTH.with(|c| c.set(1));
            compiler_fence(Ordering::SeqCst);
        }
        run_due_late();
    }
}

/// Takes and runs every queued item until a scan finds the queue clean. Called with the depth at 1 by the
/// only context that may take items.
fn run_queue() {
    loop {
        DIRTY.with(|d| d.store(false, Ordering::Relaxed));
        compiler_fence(Ordering::SeqCst);
        let mut ran = false;
        for i in 0..DEFERRED_MAX {
            let item = QUEUE.with(|q| {
                let fw = q[i].f.load(Ordering::Relaxed);
                if fw == 0 || fw == RESERVED {
                    return None;
                }
                let arg = q[i].arg.load(Ordering::Relaxed);
                compiler_fence(Ordering::SeqCst);
                // We are the only taker (module header), so load-then-store cannot lose an item.
                q[i].f.store(0, Ordering::Relaxed);
                Some((fw, arg))
            });
            if let Some((fw, arg)) = item {
                // SAFETY: `fw` was stored by `defer` from a `fn(usize)`.
                let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(fw) };
                f(arg);
                ran = true;
            }
        }
        compiler_fence(Ordering::SeqCst);
        if !ran && !DIRTY.with(|d| d.load(Ordering::Relaxed)) {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Late work
// ---------------------------------------------------------------------------------------------------------

/// Late items one CPU can hold at once; a full table runs the item at the next region boundary as if due.
const LATE_MAX: usize = 16;

const LATE_FREE: u32 = 0;
const LATE_WRITING: u32 = 1;
const LATE_WAITING: u32 = 2;
const LATE_DUE: u32 = 3;

struct LateCell {
    state: AtomicU32,
    f: AtomicUsize,
    arg: AtomicUsize,
    /// Delay in microseconds.
    delay_us: AtomicUsize,
}

impl LateCell {
    const fn new() -> Self {
        LateCell {
            state: AtomicU32::new(LATE_FREE),
            f: AtomicUsize::new(0),
            arg: AtomicUsize::new(0),
            delay_us: AtomicUsize::new(0),
        }
    }
}

struct LateCpu {
    /// Set by the worker when it makes an item of this CPU due; cleared by the owner before it looks.
    due: AtomicBool,
    cells: [LateCell; LATE_MAX],
}

static LATE: [LateCpu; NR_CPUS] =
    [const { LateCpu { due: AtomicBool::new(false), cells: [const { LateCell::new() }; LATE_MAX] } }; NR_CPUS];
/// Whether any late item was ever queued (keeps region boundaries free of the late check otherwise).
static LATE_USED: AtomicBool = AtomicBool::new(false);
static LATE_WORKER: std::sync::Once = std::sync::Once::new();

/// Queue `f(arg)` as late work: it runs on this CPU at the first region boundary after the late worker has
/// seen it waiting for `delay`. The same `(f, arg)` already waiting is not queued again. A thread without a
/// CPU, or a full table, runs it with [`IrqRegion::defer`].
///
/// Items whose `arg` names memory must stay valid until they ran or were cancelled ([`cancel_late`]).
pub fn defer_late(f: fn(usize), arg: usize, delay: Duration) {
    let Some(cpu) = this_cpu() else {
        IrqRegion::defer(f, arg);
        return;
    };
    let fw = f as usize;
    let cells = &LATE[cpu].cells;
    for c in cells.iter() {
        let s = c.state.load(Ordering::Relaxed);
        if (s == LATE_WAITING || s == LATE_DUE)
            && c.f.load(Ordering::Relaxed) == fw
            && c.arg.load(Ordering::Relaxed) == arg
        {
            return;
        }
    }
    for c in cells.iter() {
        // Relaxed: the claim only excludes this thread's handlers (the worker never claims a free cell).
        if c.state.compare_exchange(LATE_FREE, LATE_WRITING, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            c.f.store(fw, Ordering::Relaxed);
            c.arg.store(arg, Ordering::Relaxed);
            c.delay_us.store(delay.as_micros().min(usize::MAX as u128) as usize, Ordering::Relaxed);
            // Release: publishes f/arg/delay to the worker; pairs with the Acquire load in `late_worker`.
            c.state.store(LATE_WAITING, Ordering::Release);
            LATE_USED.store(true, Ordering::Relaxed);
            return;
        }
    }
    IrqRegion::defer(f, arg);
}

/// Removes every late item of `f` whose argument `matches`, of every CPU, that has not been handed to its
/// thread's queue yet. Returns how many it removed.
///
/// # Context
/// Normal context only (an allocator's destroy): scans every CPU's table.
pub fn cancel_late(f: fn(usize), matches: impl Fn(usize) -> bool) -> usize {
    let fw = f as usize;
    let mut removed = 0;
    for cpu in LATE.iter() {
        for c in cpu.cells.iter() {
            loop {
                // Acquire: pairs with the Release store of WAITING in `defer_late` (f and arg are visible).
                let s = c.state.load(Ordering::Acquire);
                if (s != LATE_WAITING && s != LATE_DUE)
                    || c.f.load(Ordering::Relaxed) != fw
                    || !matches(c.arg.load(Ordering::Relaxed))
                {
                    break;
                }
                // AcqRel: wins the cell against its owner's run (which CASes DUE -> WRITING too).
                if c.state.compare_exchange(s, LATE_WRITING, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    c.f.store(0, Ordering::Relaxed);
                    // Release: pairs with the claim CAS in `defer_late`.
                    c.state.store(LATE_FREE, Ordering::Release);
                    removed += 1;
                    break;
                }
            }
        }
    }
    removed
}

/// Runs the due late items of this CPU (a region boundary: the late interrupt is taken now).
#[inline]
fn run_due_late() {
    if !LATE_USED.load(Ordering::Relaxed) {
        return;
    }
    run_due_late_slow();
}

#[cold]
#[inline(never)]
fn run_due_late_slow() {
    let Some(cpu) = nolock::thread::current_if_any() else { return };
    let l = &LATE[cpu as usize];
    if !l.due.load(Ordering::Relaxed) {
        return;
    }
    l.due.store(false, Ordering::Relaxed);
    for c in l.cells.iter() {
        // Acquire: pairs with the worker's Release store of DUE (and the owner's of WAITING).
        if c.state.load(Ordering::Acquire) != LATE_DUE {
            continue;
        }
        // Acquire CAS: a handler of ours, or `cancel_late`, may race for the same cell; one wins.
        if c.state.compare_exchange(LATE_DUE, LATE_WRITING, Ordering::Acquire, Ordering::Relaxed).is_err() {
            continue;
        }
        let fw = c.f.load(Ordering::Relaxed);
        let arg = c.arg.load(Ordering::Relaxed);
        // Release: pairs with the claim CAS in `defer_late` and the Acquire loads in `cancel_late`; the item
        // may be queued again from inside its own run.
        c.state.store(LATE_FREE, Ordering::Release);
        // SAFETY: `fw` was stored by `defer_late` from a `fn(usize)`.
        let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(fw) };
        IrqRegion::defer(f, arg);
    }
}

/// Starts the late worker thread (once per process): it scans the late tables every 100 µs and marks items
/// due once it has seen them waiting for their delay.
///
/// # Context
/// Normal context only: spawns a thread on the first call.
pub fn start_late_worker() {
    LATE_WORKER.call_once(|| {
        std::thread::Builder::new()
            .name("nolock-bpf-late".into())
            .spawn(late_worker)
            .expect("spawn the late irq_work worker");
    });
}

fn late_worker() {
    let mut seen: Vec<Option<(Instant, usize, usize)>> = vec![None; NR_CPUS * LATE_MAX];
    loop {
        let mut waiting = false;
        let n = (nolock::thread::count() as usize).min(NR_CPUS);
        for (cpu, l) in LATE.iter().enumerate().take(n) {
            for (i, c) in l.cells.iter().enumerate() {
                let k = cpu * LATE_MAX + i;
                // Acquire: pairs with the Release store of WAITING in `defer_late`.
                if c.state.load(Ordering::Acquire) != LATE_WAITING {
                    seen[k] = None;
                    continue;
                }
                waiting = true;
                let (f, arg) = (c.f.load(Ordering::Relaxed), c.arg.load(Ordering::Relaxed));
                match seen[k] {
                    Some((t, sf, sa)) if sf == f && sa == arg => {
                        if t.elapsed() >= Duration::from_micros(c.delay_us.load(Ordering::Relaxed) as u64)
                            // Release: publishes nothing new but keeps f/arg visible to the runner; pairs with
                            // its Acquire CAS in `run_due_late_slow`.
                            && c.state
                                .compare_exchange(LATE_WAITING, LATE_DUE, Ordering::Release, Ordering::Relaxed)
                                .is_ok()
                        {
                            l.due.store(true, Ordering::Relaxed);
                            seen[k] = None;
                        }
                    }
                    _ => seen[k] = Some((Instant::now(), f, arg)),
                }
            }
        }
        // Scan often while something waits (the delays are what the tests and benchmarks measure), seldom
        // otherwise.
        std::thread::sleep(Duration::from_micros(if waiting { 100 } else { 2000 }));
    }
}
