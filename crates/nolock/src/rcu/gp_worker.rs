//! The grace-period worker: one thread that collects callbacks, drives grace periods for them, invokes them in
//! batches, and does the same for the registered [`GpClient`](super::GpClient)'s batches (the slab layer's
//! `kfree_rcu` pointer blocks): frees those that are ready, and ages partial ones out.
//!
//! Started from a normal context (`nolock::init`, `synchronize_*`, barriers, `call_rcu`).
//!
//! # No system call on the enqueue side
//!
//! `call_rcu_nolock`, `kfree_rcu_nolock` and friends only push onto a list: they never wake the worker (a
//! `futex` wake is a system call, and the contract of `*_nolock` paths allows none). The worker *polls*
//! instead: every 20 µs–1 ms while grace periods and callbacks move, and, when it finds nothing to do, at
//! intervals that double from 1 ms up to [`IDLE_POLL_MAX`]. So a callback queued from a `*_nolock` path into an
//! idle process waits at most that long to be noticed. Normal-context callers (`call_rcu`, `synchronize_*`,
//! barriers, `start_poll_synchronize_rcu`) wake it at once with [`kick`].
//!
//! # Re-entrance: callbacks that wait for callbacks
//!
//! Callbacks run on the worker thread, and a callback may do what any normal context may: queue callbacks with
//! `call_rcu` (the backlog throttle never makes the worker wait for itself), wait for a grace period, or wait
//! for callbacks with a barrier — directly, or by dropping an `SrcuFast` or destroying a type-safe cache. A
//! barrier needs the worker to run callbacks; on the worker thread it therefore *becomes* the worker: it runs
//! passes of the same loop ([`run_nested_pass`]) until its markers have run. For that, all of the worker's
//! state — the batches waiting for their grace period and the batch being invoked, with its cursor — lives in
//! one thread-local [`WorkerState`] that each step borrows only briefly, never across a callback; a nested pass
//! simply continues where the outer one left off, and the outer one, when the callback returns, continues from
//! wherever the nested passes left the state.
//!
//! # Fork
//!
//! The worker does not exist in a fork child. Its state (batches it had taken) is lost with it: those callbacks
//! never run in the child (their memory leaks there). `rcu::after_fork_child` accounts for them so that the
//! backlog throttle does not wait for them, and the child's first normal-context call starts a new worker.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};

use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use core::time::Duration;

use super::{Domain, Step};

static RUNNING_PID: AtomicI32 = AtomicI32::new(0);
static WORK: AtomicU32 = AtomicU32::new(0);

/// Time between two aging ticks of the client's partial batches (`kfree_rcu` pointer blocks).
const AGE_TICK: Duration = Duration::from_millis(5);

/// The longest the worker sleeps between two looks at the callback lists when it has nothing to do.
pub const IDLE_POLL_MAX: Duration = Duration::from_millis(64);

/// Time between two orphan sweeps of the per-thread slots (each costs a `tgkill` probe per owned slot).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    /// Set on the worker thread (the outer loop and any callback it runs).
    static IS_WORKER: Cell<bool> = const { Cell::new(false) };
    /// The worker's state (see the module documentation); only the worker thread touches it.
    static STATE: RefCell<WorkerState> = RefCell::new(WorkerState::default());
}

/// Start the worker if it is not running in this process.
///
/// # Context
/// Normal context only: spawns a thread.
pub(crate) fn ensure_started() {
    crate::sys::start_once(&RUNNING_PID, "nolock-rcu", run);
}

/// Wake the worker now (one `futex` wake). Normal context only: `*_nolock` paths never call it.
pub(crate) fn kick() {
    // Release: pairs with the Acquire load of `WORK` at the top of the worker's pass, so a worker that sees the
    // new value also sees what the kicker queued.
    WORK.fetch_add(1, Ordering::Release);
    crate::sys::futex_wake(&WORK, 1);
}

/// Whether the calling thread is the grace-period worker (possibly inside a callback).
pub(crate) fn on_worker_thread() -> bool {
    IS_WORKER.with(Cell::get)
}

/// In a fork child: the worker thread is gone.
pub(crate) fn after_fork_child() {
    RUNNING_PID.store(0, Ordering::Release);
}

/// A collected batch: the chains taken from each list, newest first within a chain (they are not reversed:
/// walking them twice would double the cost per callback), and, once invocation began, the barrier markers
/// met so far (they run after the rest of the batch).
struct Batch {
    cookie: u64,
    chains: Vec<usize>,
    markers: Vec<usize>,
}

/// Per domain: batches in the order they were collected; the front one is being invoked once its grace
/// period is over.
#[derive(Default)]
struct Pending {
    batches: VecDeque<Batch>,
}

#[derive(Default)]
struct WorkerState {
    /// Keyed by the domain's address.
    pending: HashMap<usize, Pending>,
}

/// Callbacks invoked between two single-step attempts to advance the grace period, so that a long batch does
/// not stall the grace periods the next batches wait for (a step may cost a `membarrier`, a few µs).
const STEP_EVERY: u32 = 4096;

fn domains() -> Vec<&'static dyn Domain> {
    let mut v: Vec<&'static dyn Domain> = vec![super::classic::domain()];
    super::srcu::for_each_live(|s| v.push(s));
    v
}

fn key(d: &dyn Domain) -> usize {
    d as *const dyn Domain as *const () as usize
}

fn run() {
    IS_WORKER.with(|w| w.set(true));
    let mut idle_poll = Duration::from_millis(1);
    let mut poll_us = 20u64;
    let mut last_progress = 0u64;
    let mut last_sweep = std::time::Instant::now();
    loop {
        // Acquire: pairs with the AcqRel CAS in `start_once`; a worker from before a fork sees another pid and stops.
        if RUNNING_PID.load(Ordering::Acquire) != crate::sys::getpid() {
            return;
        }
        // Acquire: pairs with the Release increment in `kick`.
        let seen = WORK.load(Ordering::Acquire);
        let (busy, progress) = pass();
        if let Some(c) = super::client() {
            (c.give_back)();
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            crate::thread::sweep_orphans();
            last_sweep = std::time::Instant::now();
        }
        let timeout = if busy {
            idle_poll = Duration::from_millis(1);
            // Poll quickly while grace periods and callbacks move; back off (up to 1 ms) while readers hold a
            // grace period, so that waiting costs neither the worker's CPU nor its neighbours' (a 2-CPU machine
            // feels every wake-up as a preemption).
            poll_us = if progress != last_progress { 20 } else { (poll_us * 2).min(1000) };
            last_progress = progress;
            Duration::from_micros(poll_us)
        } else {
            let t = idle_poll;
            idle_poll = (idle_poll * 2).min(IDLE_POLL_MAX);
            if holds_partial() { t.min(AGE_TICK) } else { t }
        };
        crate::sys::futex_wait(&WORK, seen, Some(timeout));
    }
}

/// One pass over every domain: collect, drive, invoke; free ready pointer blocks; age partial blocks. Returns
/// whether work remains, and a number that changes when something moved.
fn pass() -> (bool, u64) {
    thread_local! {
        static LAST_AGE: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
    }
    let mut busy = false;
    let mut progress = 0u64;
    for d in domains() {
        busy |= service(d);
        progress = progress.wrapping_add(d.core().seq.get()).wrapping_add(d.core().invoked.load(Ordering::Relaxed));
    }
    // The registered client's batches (the slab layer's `kfree_rcu` pointer blocks): free those whose grace
    // period is over (the worker is their consumer of last resort), and age partial ones out.
    if let Some(c) = super::client() {
        busy |= (c.reclaim)();
        if (c.holds_partial)() {
            let now = std::time::Instant::now();
            let due = LAST_AGE.with(|l| l.get().is_none_or(|t| now.duration_since(t) >= AGE_TICK));
            if due {
                (c.age)();
                LAST_AGE.with(|l| l.set(Some(now)));
            }
            busy = true;
        }
    }
    (busy, progress)
}

/// Whether the registered client holds partial batches (they are aged out every [`AGE_TICK`]).
fn holds_partial() -> bool {
    super::client().is_some_and(|c| (c.holds_partial)())
}

/// On the worker thread, from inside a callback: run one pass of the worker loop (see the module
/// documentation). Returns whether work remains.
pub(crate) fn run_nested_pass() -> bool {
    debug_assert!(on_worker_thread());
    pass().0
}

/// Collect, drive, invoke for one domain. Returns whether it still has work.
fn service(d: &dyn Domain) -> bool {
    let core = d.core();
    let n = crate::thread::count();
    let mut chains = Vec::new();
    for i in 0..n {
        if let Some(l) = d.slot_cbs(i) {
            let c = l.take_all();
            if c != 0 {
                chains.push(c);
            }
        }
    }
    let c = core.overflow_cbs.take_all();
    if c != 0 {
        chains.push(c);
    }
    if !chains.is_empty() {
        let cookie = core.seq.snap();
        core.request(cookie);
        STATE.with(|s| {
            s.borrow_mut().pending.entry(key(d)).or_default().batches.push_back(Batch {
                cookie,
                chains,
                markers: Vec::new(),
            })
        });
    }
    let pending = super::queued_total(d).saturating_sub(core.invoked.load(Ordering::Relaxed));
    core.peak_pending.fetch_max(pending, Ordering::Relaxed);
    drive(d);
    invoke_ready(d);
    let waiting = STATE.with(|s| s.borrow().pending.get(&key(d)).is_some_and(|p| !p.batches.is_empty()));
    waiting || core.work_requested()
}

/// Advance the domain's grace period as far as it goes without waiting.
fn drive(d: &dyn Domain) {
    let core = d.core();
    if core.work_requested() {
        for _ in 0..8 {
            match core.try_drive(|| d.step()) {
                Some(Step::Progress) => continue,
                _ => break,
            }
        }
    }
}

/// What to run next for a domain.
enum Next {
    Callback(usize),
    Marker(usize),
    Nothing,
}

/// Take the next callback of the oldest batch whose grace period has ended. Barrier markers are set aside
/// and run after the rest of their batch: each was queued after every callback of its own list that it must
/// follow, and those are all in this batch or an earlier one.
fn next_ready(d: &dyn Domain) -> Next {
    let core = d.core();
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        let Some(p) = s.pending.get_mut(&key(d)) else { return Next::Nothing };
        loop {
            let Some(b) = p.batches.front_mut() else { return Next::Nothing };
            if !core.seq.done(b.cookie) {
                return Next::Nothing;
            }
            if let Some(h) = b.chains.last_mut() {
                let cur = *h;
                let next = super::next_of(cur);
                if next == 0 {
                    b.chains.pop();
                } else {
                    *h = next;
                }
                if super::is_barrier_marker(cur) {
                    b.markers.push(cur);
                    continue;
                }
                return Next::Callback(cur);
            }
            if let Some(m) = b.markers.pop() {
                return Next::Marker(m);
            }
            p.batches.pop_front();
        }
    })
}

/// Run every callback whose grace period has ended, in order. The state is borrowed only to take the next
/// callback, never while one runs, so a callback may run nested passes (a barrier on the worker thread).
fn invoke_ready(d: &dyn Domain) {
    let core = d.core();
    let mut since_step = 0u32;
    loop {
        let h = match next_ready(d) {
            Next::Callback(h) => h,
            Next::Marker(h) => {
                // A barrier returns once its marker ran: what the callbacks before it freed onto this thread's
                // lists goes back to the slabs first, so the barrier's caller can allocate it.
                if let Some(c) = super::client() {
                    (c.give_back)();
                }
                h
            }
            Next::Nothing => return,
        };
        // Count before invoking, so that counts are exact when a barrier returns. Release: pairs with the
        // Acquire loads of `invoked` in the backlog throttle.
        core.invoked.fetch_add(1, Ordering::Release);
        invoke_guarded(h);
        since_step += 1;
        if since_step == STEP_EVERY {
            since_step = 0;
            if core.work_requested() {
                core.try_drive(|| d.step());
            }
        }
    }
}

/// Run one callback; a callback (or a slab destructor it runs) that panics is reported and the worker goes on,
/// instead of dying and leaving every later barrier waiting forever.
fn invoke_guarded(h: usize) {
    // SAFETY: `h` was queued with a valid callback and its grace period has ended.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { super::invoke(h) }));
    if r.is_err() {
        crate::report::emit(format_args!(
            "a grace-period callback (rcu_head {h:#x}) panicked; the grace-period worker carries on"
        ));
    }
}
