//! The background worker: the userspace stand-in for the kernel's kthreads and deferred work.
//!
//! One thread, started from a normal context ([`crate::init`], `KmemCache` creation), that periodically
//! - shrinks caches in which slabs became entirely free since the last pass (keeping a small reserve),
//! - purges free, dirty pages (`madvise(MADV_DONTNEED)`) with a decay, unless the purge is turned off
//!   (`Config::purge_interval(None)`, `NOLOCK_PURGE=never`, `NOLOCK_PURGE_INTERVAL_MS=0`): pages freed at one
//!   moment go back gradually over the decay time (`Config::purge_decay`, 1 s by default), those free the
//!   longest first, so that memory a program frees and soon takes again is not given back and faulted in
//!   again, while a large free still returns within the decay time (see [`Decay`]),
//! - commits arena memory ahead of need, so that allocations do not have to (see [`crate::page`]),
//! - sweeps the thread slots of threads that died without running their exit destructor (every layer hands
//!   back what they left: the slab layer their cached objects).
//!
//! A pass runs every purge interval (100 ms by default; every 100 ms when the purge is off).
//!
//! `*_nolock` paths never depend on it for correctness: it only gives memory back to the OS. Asking it for an
//! early pass (`slab::shrink::request_shrink`, from free paths) is one atomic increment and no system call: the worker
//! notices before it sleeps again, or at the end of its interval.
//!
//! Fork: the worker does not exist in a child; the atfork child handler marks it stopped and the next normal
//! context call starts a new one. The prepare handler waits (bounded) for the worker to leave the part of a
//! pass that holds slabs or pages in hand, so a fork does not leak them into the child.

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use core::time::Duration;

use crate::global;
use crate::slab::shrink::SHRINK_WANTED;

static RUNNING_PID: AtomicI32 = AtomicI32::new(0);
static IN_CRITICAL: AtomicU32 = AtomicU32::new(0);
static FORK_PENDING: AtomicBool = AtomicBool::new(false);
static PASSES: AtomicU64 = AtomicU64::new(0);

/// Empty slabs each cache keeps when the worker shrinks it.
const KEEP_EMPTY_SLABS: usize = 2;

/// Passes completed in this process (see [`crate::worker_passes`]).
pub fn passes() -> u64 {
    PASSES.load(Ordering::Relaxed)
}

/// Start the worker if it is enabled and not running in this process.
///
/// # Context
/// Normal context only: spawns a thread.
pub fn ensure_started() {
    if global::background_enabled() {
        crate::sys::start_once(&RUNNING_PID, "nolock-worker", run);
    }
}

/// Whether the worker runs in this process.
pub fn is_running() -> bool {
    RUNNING_PID.load(Ordering::Acquire) == crate::sys::getpid()
}

/// Slots of a decay's backlog: a decay over more passes than this counts several passes in one slot.
const DECAY_SLOTS: usize = 64;

/// The purge's decay, in the spirit of jemalloc's dirty-page decay. Each pass notes how many pages became free
/// and dirty since the previous one; of the pages freed `k` passes ago, `(n - k) / n` may stay resident (`n`
/// passes: the decay time over the interval), so what a program freed at one moment goes back linearly over
/// the decay time, and a program that keeps freeing and taking back about the same amount keeps it. The pages
/// purged are those free for at least a whole interval, from the top of the active region
/// (`PageAllocator::purge_some`).
/// State of the worker thread only.
pub(crate) struct Decay {
    /// Pages newly free and dirty in each of the last `n` slots of `stride` passes, `backlog[0]` the latest.
    backlog: [usize; DECAY_SLOTS],
    /// Slots the decay spans (0: no decay, purge everything that stayed free for an interval).
    n: usize,
    /// Passes per slot, and passes counted in the latest slot.
    stride: usize,
    tick: usize,
    /// Free dirty pages left after the previous pass.
    left: usize,
}

impl Decay {
    /// A decay over `decay` with a pass every `every`.
    pub(crate) fn new(decay: Duration, every: Duration) -> Decay {
        let passes = (decay.as_nanos() / every.as_nanos().max(1)).min(u32::MAX as u128) as usize;
        let stride = passes.div_ceil(DECAY_SLOTS).max(1);
        Decay { backlog: [0; DECAY_SLOTS], n: passes.div_ceil(stride), stride, tick: 0, left: 0 }
    }

    /// This pass: `dirty` pages are free and dirty now. Returns how many of them may stay resident.
    pub(crate) fn keep(&mut self, dirty: usize) -> usize {
        if self.n == 0 {
            return 0;
        }
        let new = dirty.saturating_sub(self.left);
        self.tick += 1;
        if self.tick >= self.stride {
            self.tick = 0;
            self.backlog.copy_within(0..self.n - 1, 1);
            self.backlog[0] = new;
        } else {
            self.backlog[0] += new;
        }
        let n = self.n;
        let keep = self.backlog[..n].iter().enumerate().map(|(k, &pages)| pages * (n - k) / n).sum::<usize>();
        keep.min(dirty)
    }

    /// After the purge: `left` free dirty pages stay.
    pub(crate) fn purged(&mut self, left: usize) {
        self.left = left;
    }
}

fn run() {
    let settings = global::settings();
    let purge = settings.purge_interval;
    let every = purge.unwrap_or(global::DEFAULT_PURGE_INTERVAL);
    let mut decay = Decay::new(settings.purge_decay, every);
    let mut pass: u64 = 0;
    loop {
        // Acquire: pairs with the Release increment in `slab::shrink::request_shrink`.
        let seen = SHRINK_WANTED.load(Ordering::Acquire);
        if RUNNING_PID.load(Ordering::Acquire) != crate::sys::getpid() {
            return;
        }
        one_pass(pass, purge.is_some().then_some(&mut decay));
        pass += 1;
        PASSES.fetch_add(1, Ordering::Relaxed);
        crate::sys::futex_wait(&SHRINK_WANTED, seen, Some(every));
    }
}

fn one_pass(pass: u64, purge: Option<&mut Decay>) {
    let Some(g) = global::get_if_init() else {
        return;
    };
    let slab = crate::slab::tables::state_if_init();
    // Outside the critical section: commits hold no pages in hand.
    g.pages.commit_ahead();
    if let Some(s) = slab {
        s.slab.lock_ahead();
    }
    if !enter_critical() {
        return;
    }
    if let Some(s) = slab {
        crate::slab::cache::for_each_cache(s, |c| {
            let events = c.counters.empty_events.load(Ordering::Relaxed);
            if events != c.shrunk_at.load(Ordering::Relaxed) {
                c.shrink(s, KEEP_EMPTY_SLABS);
            }
        });
    }
    if let Some(decay) = purge {
        let dirty = g.pages.dirty_free_pages();
        let keep = decay.keep(dirty);
        let purged = g.pages.purge_some(true, dirty - keep);
        decay.purged(dirty.saturating_sub(purged));
    }
    if pass.is_multiple_of(10) {
        crate::thread::sweep_orphans();
    }
    leave_critical();
}

/// Enter a section that holds slabs or pages in hand; false if a fork is about to happen (skip the work).
pub fn enter_critical() -> bool {
    // SeqCst pair with `before_fork`: either we see FORK_PENDING or it sees our count.
    IN_CRITICAL.fetch_add(1, Ordering::SeqCst);
    if FORK_PENDING.load(Ordering::SeqCst) {
        IN_CRITICAL.fetch_sub(1, Ordering::SeqCst);
        return false;
    }
    true
}

/// Leave the section entered by [`enter_critical`].
pub fn leave_critical() {
    IN_CRITICAL.fetch_sub(1, Ordering::SeqCst);
}

/// atfork prepare handler: keep new critical sections from starting and wait (at most 100 ms) for running ones.
pub extern "C" fn before_fork() {
    FORK_PENDING.store(true, Ordering::SeqCst);
    let start = std::time::Instant::now();
    while IN_CRITICAL.load(Ordering::SeqCst) != 0 && start.elapsed() < Duration::from_millis(100) {
        std::thread::yield_now();
    }
}

/// atfork parent handler.
pub extern "C" fn after_fork_parent() {
    FORK_PENDING.store(false, Ordering::SeqCst);
}

/// atfork child handler: the worker thread does not exist here, and neither do the parent's memory locks
/// (nor its `mlockall(MCL_FUTURE)`), so commits stop being locked.
pub fn after_fork_child() {
    FORK_PENDING.store(false, Ordering::SeqCst);
    IN_CRITICAL.store(0, Ordering::SeqCst);
    RUNNING_PID.store(0, Ordering::Release);
    if let Some(g) = global::get_if_init() {
        g.pages.after_fork_child();
    }
    if let Some(s) = crate::slab::tables::state_if_init() {
        s.slab.after_fork_child();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_keeps_a_freed_amount_for_its_time_and_then_none() {
        // 10 passes of decay.
        let mut d = Decay::new(Duration::from_secs(1), Duration::from_millis(100));
        // 1000 pages freed at once: all kept at first, then a tenth fewer each pass, none after ten passes.
        let mut dirty = 1000;
        let mut kept = Vec::new();
        for _ in 0..12 {
            let keep = d.keep(dirty);
            kept.push(keep);
            dirty = keep;
            d.purged(dirty);
        }
        assert_eq!(&kept[..3], &[1000, 900, 800]);
        assert!(kept.windows(2).all(|w| w[1] <= w[0]), "{kept:?}");
        assert_eq!(kept[10], 0, "all gone after the decay time: {kept:?}");
    }

    #[test]
    fn decay_keeps_what_a_program_keeps_reusing() {
        let mut d = Decay::new(Duration::from_secs(1), Duration::from_millis(100));
        // The program frees 500 pages and takes them back every other pass: what stays dirty is kept.
        for i in 0..40 {
            let dirty = if i % 2 == 0 { 500 } else { 0 };
            let keep = d.keep(dirty);
            assert!(keep >= dirty * 5 / 10, "pass {i}: kept {keep} of {dirty}");
            d.purged(dirty);
        }
    }

    #[test]
    fn a_long_decay_spans_its_whole_time() {
        // 10 s at 10 ms: 1000 passes in 64 slots of 16 passes.
        let mut d = Decay::new(Duration::from_secs(10), Duration::from_millis(10));
        let (mut dirty, mut passes) = (64_000, 0);
        while dirty > 0 && passes < 2000 {
            dirty = d.keep(dirty);
            d.purged(dirty);
            passes += 1;
        }
        assert!((900..=1100).contains(&passes), "gone after {passes} passes");
    }

    #[test]
    fn no_decay_purges_everything_aged() {
        let mut d = Decay::new(Duration::ZERO, Duration::from_millis(100));
        assert_eq!(d.keep(1000), 0);
    }
}
