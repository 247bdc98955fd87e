//! The grace-period worker: one thread that collects callbacks, drives grace periods for them, invokes them in
//! batches, and ages `kfree_rcu` pointer blocks.
//!
//! Started from a normal context (`nolock::init`, `synchronize_*`, barriers). Waking it is async-signal-safe:
//! enqueuers that find their list empty check whether the worker sleeps (after a `SeqCst` fence that pairs
//! with the worker's own fence between announcing sleep and its final look at the lists) and only then make
//! the `futex` wake system call, so a retire storm costs no system calls.

use std::collections::{HashMap, VecDeque};

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering, fence};
use core::time::Duration;

use super::{Domain, Step};

static RUNNING_PID: AtomicI32 = AtomicI32::new(0);
static WORK: AtomicU32 = AtomicU32::new(0);
static SLEEPING: AtomicBool = AtomicBool::new(false);

/// Milliseconds between two aging ticks of `kfree_rcu` pointer blocks.
const AGE_TICK: Duration = Duration::from_millis(5);

/// Start the worker if it is not running in this process.
///
/// # Context
/// Normal context only: spawns a thread.
pub(crate) fn ensure_started() {
    crate::worker::start_once(&RUNNING_PID, "nolock-rcu", run);
}

/// Wake the worker. Async-signal-safe.
pub(crate) fn kick() {
    SLEEPING.store(false, Ordering::Relaxed);
    WORK.fetch_add(1, Ordering::Release);
    crate::sys::futex_wake(&WORK, 1);
}

/// Wake the worker only if it is asleep. Async-signal-safe; no system call when it is awake.
#[inline]
pub(crate) fn kick_if_sleeping() {
    // SeqCst fence: pairs with the worker's fence between `SLEEPING = true` and its last look at the lists.
    fence(Ordering::SeqCst);
    if SLEEPING.load(Ordering::Relaxed) {
        kick();
    }
}

/// In a fork child: the worker thread is gone.
pub(crate) fn after_fork_child() {
    RUNNING_PID.store(0, Ordering::Release);
    SLEEPING.store(false, Ordering::Relaxed);
}

/// A collected batch waiting for its grace period: the chains taken from each list, newest first within a
/// chain (they are not reversed: walking them twice would double the cost per callback).
struct Batch {
    cookie: u64,
    chains: Vec<usize>,
}

#[derive(Default)]
struct Pending {
    batches: VecDeque<Batch>,
}

/// Callbacks invoked between two single-step attempts to advance the grace period, so that a long batch does
/// not stall the grace periods the next batches wait for (a step may cost a `membarrier`, a few µs).
const STEP_EVERY: u32 = 4096;

fn domains() -> Vec<&'static dyn Domain> {
    let mut v: Vec<&'static dyn Domain> = vec![super::tree::domain()];
    super::srcu::for_each_live(|s| v.push(s));
    v
}

fn run() {
    let mut pending: HashMap<usize, Pending> = HashMap::new();
    let mut last_age = std::time::Instant::now();
    let mut idle_rounds = 0u32;
    let mut poll_us = 20u64;
    let mut last_progress = 0u64;
    loop {
        if RUNNING_PID.load(Ordering::Acquire) != crate::sys::getpid() {
            return;
        }
        let seen = WORK.load(Ordering::Acquire);
        let mut busy = false;
        let mut progress = 0u64;
        for d in domains() {
            let key = d as *const dyn Domain as *const () as usize;
            busy |= service(d, pending.entry(key).or_default());
            progress = progress.wrapping_add(d.core().seq.get()).wrapping_add(d.core().invoked.load(Ordering::Relaxed));
        }
        // Free the pointer blocks whose grace period is over (the rings' consumers of last resort).
        busy |= super::kfree::free_done_blocks_everywhere();
        let blocks = super::kfree::any_blocks();
        if blocks && last_age.elapsed() >= AGE_TICK {
            super::kfree::age_blocks();
            last_age = std::time::Instant::now();
            busy = true;
        }
        if busy {
            idle_rounds = 0;
            // Poll quickly while grace periods and callbacks move; back off (up to 1 ms) while readers hold a
            // grace period, so that waiting costs neither the worker's CPU nor its neighbours' (a 2-CPU machine
            // feels every wake-up as a preemption).
            poll_us = if progress != last_progress { 20 } else { (poll_us * 2).min(1000) };
            last_progress = progress;
            crate::sys::futex_wait(&WORK, seen, Some(Duration::from_micros(poll_us)));
            continue;
        }
        idle_rounds += 1;
        if idle_rounds < 4 {
            crate::sys::futex_wait(&WORK, seen, Some(Duration::from_micros(200)));
            continue;
        }
        // Announce sleep, then look once more (pairs with `kick_if_sleeping`).
        SLEEPING.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if domains().iter().any(|d| has_callbacks(*d)) {
            SLEEPING.store(false, Ordering::Relaxed);
            continue;
        }
        let timeout = if blocks { AGE_TICK } else { Duration::from_secs(1) };
        crate::sys::futex_wait(&WORK, seen, Some(timeout));
        SLEEPING.store(false, Ordering::Relaxed);
    }
}

fn has_callbacks(d: &dyn Domain) -> bool {
    let n = crate::global::get_if_init().map_or(0, |g| g.shard_count());
    !d.core().overflow_cbs.is_empty()
        || (0..n).any(|i| d.shard_cbs(i).is_some_and(|l| !l.is_empty()))
        || d.core().work_requested()
}

/// Collect, drive, invoke for one domain. Returns whether it still has work.
fn service(d: &dyn Domain, p: &mut Pending) -> bool {
    let core = d.core();
    let n = crate::global::get_if_init().map_or(0, |g| g.shard_count());
    let mut chains = Vec::new();
    for i in 0..n {
        if let Some(l) = d.shard_cbs(i) {
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
        p.batches.push_back(Batch { cookie, chains });
    }
    let pending = super::queued_total(d).saturating_sub(core.invoked.load(Ordering::Relaxed));
    core.peak_pending.fetch_max(pending, Ordering::Relaxed);
    drive(d);
    // Invoke the batches whose grace period has ended, in order.
    while let Some(b) = p.batches.front() {
        if !core.seq.done(b.cookie) {
            break;
        }
        let b = p.batches.pop_front().expect("front exists");
        invoke_batch(d, &b);
    }
    !p.batches.is_empty() || core.work_requested()
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

/// Run every callback of a batch. Barrier markers run last: each was queued after every callback of its own
/// list that it must follow, and those are all in this batch or an earlier one.
fn invoke_batch(d: &dyn Domain, b: &Batch) {
    let core = d.core();
    let mut markers = Vec::new();
    let mut since_step = 0u32;
    for &chain in &b.chains {
        let mut h = chain;
        while h != 0 {
            let next = super::next_of(h);
            if super::is_barrier_marker(h) {
                markers.push(h);
            } else {
                // Count before invoking, so that counts are exact when a barrier returns.
                core.invoked.fetch_add(1, Ordering::Release);
                invoke_guarded(h);
            }
            h = next;
            since_step += 1;
            if since_step == STEP_EVERY {
                since_step = 0;
                if core.work_requested() {
                    core.try_drive(|| d.step());
                }
            }
        }
    }
    for h in markers {
        core.invoked.fetch_add(1, Ordering::Release);
        invoke_guarded(h);
    }
}

/// Run one callback; a callback (or a slab destructor it runs) that panics is reported and the worker goes on,
/// instead of dying and leaving every later barrier waiting forever.
fn invoke_guarded(h: usize) {
    // SAFETY: `h` was queued with a valid callback and its grace period has ended.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unsafe { super::invoke(h) }));
    if r.is_err() {
        crate::debug::report_callback_panic(h);
    }
}
