//! RCU: one process-wide domain for readers that do not sleep (the kernel's `rcu_read_lock` flavour).
//!
//! # Readers
//!
//! Each thread has one counter word (in its shard): the low 32 bits count nesting, bit 32 is the *phase*. The
//! outermost `rcu_read_lock` copies the global `gp_ctr` (phase + a count of one) into it; nested ones add one;
//! `rcu_read_unlock` subtracts one. Only the owning thread writes the word, with plain loads and stores and a
//! compiler fence — no memory fence, no atomic RMW. A signal handler that interrupts any of these steps runs
//! whole read-side sections of its own, which bring the word back to the value they found: the interrupted
//! load-then-store is still correct (DESIGN.md §4, the "restore before return" pattern). A thread that has no
//! shard (more than `MAX_SHARDS` threads, or one that is exiting) counts its outermost sections in two global
//! per-phase counters with atomic RMWs instead.
//!
//! # Grace periods (liburcu's membarrier flavour, two phases)
//!
//! 1. start: `membarrier` (A) — every reader either saw the updater's earlier stores, or its counter store is
//!    visible to the scans below.
//! 2. wait until no reader is inside a section begun in the *other* phase;
//! 3. flip the phase of `gp_ctr` (full fences around);
//! 4. wait again (a reader may have read `gp_ctr` just before the flip and stored it just after);
//! 5. end: `membarrier` — every reader's accesses inside sections we saw end are complete — and publish the
//!    end of the grace period.
//!
//! Steps 2 and 4 never block: the driver backs off and retries (see `rcu::wait_for_cookie`).

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use super::{Domain, GpCore, RcuCallback, RcuHead, Step};
use crate::slab::shard;
use crate::sync::llist::Llist;
use crate::sync::rcu_core::{self, RcuGpCtr, RcuReaderWord};
use crate::sync::signal_fence;
use crate::sys::membarrier::heavy_barrier;

const IDLE: u32 = 0;
const WAIT1: u32 = 1;
const WAIT2: u32 = 2;

/// The RCU domain's global state.
pub(crate) struct RcuDomain {
    core: GpCore,
    /// Phase bit + a nesting count of one: what an outermost reader stores.
    gp_ctr: RcuGpCtr,
    /// Outermost sections of shard-less readers, per phase.
    overflow: [AtomicU64; 2],
}

pub(crate) static RCU: RcuDomain =
    RcuDomain { core: GpCore::new(), gp_ctr: RcuGpCtr::new(), overflow: [AtomicU64::new(0), AtomicU64::new(0)] };

thread_local! {
    /// Reader word of a thread without a shard.
    static OVERFLOW_WORD: RcuReaderWord = const { RcuReaderWord::new() };
}

/// A reader's word: its shard's, or the thread-local overflow word.
#[inline(always)]
fn reader_word() -> (*const RcuReaderWord, bool) {
    if let Some(g) = crate::global::get()
        && let Some(s) = shard::current(g)
    {
        return (&s.rcu.ctr, false);
    }
    (OVERFLOW_WORD.with(|c| c as *const RcuReaderWord), true)
}

/// Proof of being inside an RCU read-side critical section; the section ends when it is dropped.
/// Not `Send`: a section begins and ends on the same thread.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct RcuReadGuard {
    ctr: *const RcuReaderWord,
    overflow: bool,
    _not_send: PhantomData<*mut ()>,
}

/// Enter an RCU read-side critical section (`rcu_read_lock`). Sections nest.
///
/// Objects reachable through RCU-protected pointers loaded inside the section stay valid until the guard is
/// dropped. The section must not sleep or block for long (use [`crate::rcu::srcu`] for that).
///
/// # Context
/// Any context: async-signal-safe and reentrant (a handler may enter and leave sections while it interrupts one,
/// or while it interrupts a grace-period computation). No fence, no atomic RMW, no system call (except the
/// thread's very first nolock call, which may map the arena).
#[inline]
pub fn rcu_read_lock() -> RcuReadGuard {
    let (ctr, overflow) = reader_word();
    // SAFETY: `ctr` points at this thread's shard word or thread-local word, both live while the thread runs.
    let w = unsafe { &*ctr }.enter(&RCU.gp_ctr);
    if overflow && RcuReaderWord::is_outermost(w) {
        overflow_enter(w);
    }
    signal_fence();
    RcuReadGuard { ctr, overflow, _not_send: PhantomData }
}

#[cold]
fn overflow_enter(w: u64) {
    // SeqCst: a full fence; shard-less readers pay for ordering themselves.
    RCU.overflow[RcuReaderWord::phase_of(w)].fetch_add(1, Ordering::SeqCst);
}

#[cold]
fn overflow_exit(w: u64) {
    RCU.overflow[RcuReaderWord::phase_of(w)].fetch_sub(1, Ordering::SeqCst);
}

impl Drop for RcuReadGuard {
    /// Leave the section (`rcu_read_unlock`).
    #[inline]
    fn drop(&mut self) {
        signal_fence();
        // SAFETY: see `rcu_read_lock`; the guard is not Send, so this is the same thread.
        let v = unsafe { &*self.ctr }.exit();
        if self.overflow && RcuReaderWord::is_outermost(v) {
            overflow_exit(v);
        }
    }
}

impl core::fmt::Debug for RcuReadGuard {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RcuReadGuard")
    }
}

/// Whether this thread is inside an RCU read-side critical section.
///
/// # Context
/// Any context.
pub fn rcu_read_lock_held() -> bool {
    let (ctr, _) = reader_word();
    // SAFETY: as in `rcu_read_lock`.
    unsafe { &*ctr }.nested()
}

impl RcuDomain {
    /// Is some reader still inside a section begun in the phase opposite to `gp_ctr`'s?
    fn old_readers(&self) -> bool {
        if self.overflow[self.gp_ctr.phase() ^ 1].load(Ordering::SeqCst) != 0 {
            return true;
        }
        let Some(g) = crate::global::get_if_init() else { return false };
        rcu_core::old_readers(&self.gp_ctr, (0..g.shard_count()).map(|i| &g.shard(i).rcu.ctr))
    }
}

impl Domain for RcuDomain {
    fn core(&self) -> &GpCore {
        &self.core
    }

    fn step(&self) -> Step {
        match self.core.phase.load(Ordering::Relaxed) {
            IDLE => {
                if !self.core.work_requested() {
                    return Step::Idle;
                }
                self.core.seq.start();
                heavy_barrier(); // A
                self.core.phase.store(WAIT1, Ordering::Relaxed);
                Step::Progress
            }
            WAIT1 => {
                if self.old_readers() {
                    return Step::Waiting;
                }
                fence(Ordering::SeqCst);
                self.gp_ctr.flip();
                fence(Ordering::SeqCst);
                self.core.phase.store(WAIT2, Ordering::Relaxed);
                Step::Progress
            }
            _ => {
                if self.old_readers() {
                    return Step::Waiting;
                }
                heavy_barrier();
                self.core.phase.store(IDLE, Ordering::Relaxed);
                self.core.seq.end();
                Step::Progress
            }
        }
    }

    fn shard_cbs(&self, i: u32) -> Option<&Llist> {
        crate::global::get_if_init().map(|g| &g.shard(i).rcu.cbs)
    }

    fn shard_queued(&self, i: u32) -> u64 {
        crate::global::get_if_init().map_or(0, |g| g.shard(i).rcu.queued.get())
    }
}

/// Wait for a full grace period: every RCU read-side critical section that began before this call has ended
/// when it returns. Concurrent callers share grace periods.
///
/// # Panics
/// If called inside an RCU read-side critical section on this thread (it would wait for itself forever).
///
/// # Context
/// Normal context only: blocks (about 2–20 µs with no long readers; as long as the longest pre-existing reader
/// otherwise). Not async-signal-safe.
pub fn synchronize_rcu() {
    assert!(
        !rcu_read_lock_held(),
        "nolock: synchronize_rcu() called inside an RCU read-side critical section on this thread; \
         it would wait for itself forever"
    );
    super::worker::ensure_started();
    let cookie = RCU.core.seq.snap();
    super::wait_for_cookie(&RCU, cookie);
}

/// A grace-period cookie from [`get_state_synchronize_rcu`] or [`start_poll_synchronize_rcu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RcuCookie(pub(crate) u64);

/// Snapshot the grace-period state: [`poll_state_synchronize_rcu`] on the result becomes true once a full
/// grace period has elapsed after this call. Does not start one.
///
/// # Context
/// Any context (one atomic load).
pub fn get_state_synchronize_rcu() -> RcuCookie {
    RcuCookie(RCU.core.seq.snap())
}

/// Like [`get_state_synchronize_rcu`], and make sure the grace period will happen (the worker drives it).
///
/// # Context
/// Any context: an atomic update and, if the worker sleeps, a `futex` wake.
pub fn start_poll_synchronize_rcu() -> RcuCookie {
    let c = RCU.core.seq.snap();
    RCU.core.request(c);
    super::worker::kick();
    RcuCookie(c)
}

/// Whether the grace period named by `cookie` has elapsed.
///
/// # Context
/// Any context (one atomic load).
pub fn poll_state_synchronize_rcu(cookie: RcuCookie) -> bool {
    RCU.core.seq.done(cookie.0)
}

/// Block until the grace period named by `cookie` has elapsed (`cond_synchronize_rcu`).
///
/// # Context
/// Normal context only.
pub fn cond_synchronize_rcu(cookie: RcuCookie) {
    if !poll_state_synchronize_rcu(cookie) {
        super::worker::ensure_started();
        super::wait_for_cookie(&RCU, cookie.0);
    }
}

/// Queue `func(head)` to run after a grace period (`call_rcu`), from any context.
///
/// The callback runs on the grace-period worker thread, which [`crate::init`] (or any `synchronize_*` /
/// barrier call) starts; callbacks queued before it exists wait for it.
///
/// # Safety
/// `head` must stay valid and untouched until `func` runs; `func` must be safe to call with it then.
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free (one CAS on this thread's list; a `futex` wake when
/// the worker sleeps). Never fails.
#[inline]
pub unsafe fn call_rcu_nolock(head: NonNull<RcuHead>, func: RcuCallback) {
    enqueue(head, func as usize);
}

/// Queue a head with a raw callback value (a function, or a kfree offset). Returns how many callbacks this
/// thread has queued so far (for throttling).
#[inline]
pub(crate) fn enqueue(head: NonNull<RcuHead>, func: usize) -> u64 {
    if let Some(g) = crate::global::get()
        && let Some(s) = shard::current(g)
    {
        let was_empty = super::queue_on(&s.rcu.cbs, head, func);
        s.rcu.queued.inc();
        if was_empty {
            super::worker::kick_if_sleeping();
        }
        return s.rcu.queued.get();
    }
    super::queue_on(&RCU.core.overflow_cbs, head, func);
    let n = RCU.core.overflow_queued.fetch_add(1, Ordering::Relaxed) + 1;
    super::worker::kick_if_sleeping();
    n
}

/// `call_rcu` for normal contexts: [`call_rcu_nolock`] with backpressure. If more than
/// [`BACKLOG_HIGH`](super::BACKLOG_HIGH) callbacks are waiting, the caller waits until the grace-period worker
/// has brought the backlog down, so a thread that retires faster than callbacks can run cannot make memory grow
/// without bound. (`call_rcu_nolock` cannot wait; under a flood its backlog is bounded only by the CPU time the
/// worker gets. `kfree_rcu_nolock` needs no such help: the retiring threads free ready blocks themselves.)
///
/// # Safety
/// As [`call_rcu_nolock`].
///
/// # Context
/// Normal context only: may sleep while the backlog is high. Not async-signal-safe.
pub unsafe fn call_rcu(head: NonNull<RcuHead>, func: RcuCallback) {
    let mine = enqueue(head, func as usize);
    super::throttle(&RCU, mine);
}

/// Wait until every callback queued with `call_rcu_nolock` (and every `kfree_rcu_nolock`) before this call has
/// run.
///
/// # Context
/// Normal context only: blocks.
pub fn rcu_barrier() {
    super::kfree::flush_blocks(super::kfree::Flavor::Rcu);
    super::barrier(&RCU);
}

/// Statistics of a grace-period domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpStats {
    /// Grace periods completed.
    pub grace_periods: u64,
    /// Callbacks queued.
    pub callbacks_queued: u64,
    /// Callbacks invoked.
    pub callbacks_invoked: u64,
    /// Largest number of callbacks the worker saw waiting at once.
    pub peak_pending: u64,
}

/// Statistics of a domain.
pub(crate) fn stats_of(d: &dyn Domain) -> GpStats {
    let c = d.core();
    GpStats {
        grace_periods: c.seq.completed(),
        callbacks_queued: super::queued_total(d),
        callbacks_invoked: c.invoked.load(Ordering::Relaxed),
        peak_pending: c.peak_pending.load(Ordering::Relaxed),
    }
}

/// Statistics of the RCU domain.
///
/// # Context
/// Any context.
pub fn rcu_stats() -> GpStats {
    stats_of(&RCU)
}

/// The domain as a trait object (for the worker).
pub(crate) fn domain() -> &'static dyn Domain {
    &RCU
}

/// Per-thread RCU state, kept in the thread's shard.
#[derive(Debug, Default)]
pub struct ShardRcu {
    /// The reader word.
    pub ctr: RcuReaderWord,
    /// Callbacks queued by this thread.
    pub cbs: Llist,
    /// Number of callbacks queued by this thread.
    pub queued: crate::sync::local_counter::LocalCounter,
}

// `RcuHead` must be usable as a plain intrusive link.
const _: () = assert!(core::mem::size_of::<RcuHead>() == 16);
