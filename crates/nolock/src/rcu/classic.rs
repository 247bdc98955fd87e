//! RCU: one process-wide domain for readers that do not sleep (the kernel's `rcu_read_lock` flavour).
//!
//! # Readers
//!
//! Each thread with a slot (`crate::thread`) has one counter word in this module's own table, `READERS`:
//! the low 32 bits count nesting, bit 32 is the *phase*. The outermost `rcu_read_lock` copies the global
//! `gp_ctr` (phase + a count of one) into it; nested ones add one; `rcu_read_unlock` subtracts one. Only the
//! owning thread writes the word, with plain loads and stores and a compiler fence — no memory fence, no
//! atomic RMW. A signal handler that interrupts any of these steps runs whole read-side sections of its own,
//! which bring the word back to the value they found: the interrupted load-then-store is still correct
//! (DESIGN.md §4, the "restore before return" pattern). The table is a `static`: a reader needs neither the
//! arena nor the slab layer, and works when nothing could be mapped.
//!
//! A thread without a slot (past its exit destructor, beyond `MAX_THREADS`) counts **every** section, nested
//! or not, in one of two global per-phase counters with a `SeqCst` atomic RMW, and its guard remembers which
//! one. No thread-local word decides anything on that path, so a handler that lands anywhere in it runs a
//! section that is counted on its own: there is no window where a nested section could be counted nowhere.
//! The RMW is a full fence, which pairs with the `SeqCst` loads of the scans (the classic SRCU argument: a
//! section the scan missed began after it, and sees everything the updater did before the grace period).
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
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::{Domain, GpCore, RcuCallback, RcuHead, Step};
use crate::sync::llist::Llist;
use crate::sync::local_counter::LocalCounter;
use crate::sync::rcu_core::{self, RcuGpCtr, RcuReaderWord};
use crate::sync::signal_fence;
use crate::sys::membarrier::heavy_barrier;
use crate::thread::MAX_THREADS;

const IDLE: u32 = 0;
const WAIT1: u32 = 1;
const WAIT2: u32 = 2;

/// The RCU domain's global state.
pub(crate) struct RcuDomain {
    core: GpCore,
    /// Phase bit + a nesting count of one: what an outermost reader stores.
    gp_ctr: RcuGpCtr,
    /// Sections of slot-less readers, per phase.
    overflow: [AtomicU64; 2],
}

pub(crate) static RCU: RcuDomain =
    RcuDomain { core: GpCore::new(), gp_ctr: RcuGpCtr::new(), overflow: [AtomicU64::new(0), AtomicU64::new(0)] };

/// One thread's RCU state: its reader word and its callback list.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct RcuPerThread {
    /// The reader word (owner-written, see the module documentation).
    pub(crate) ctr: RcuReaderWord,
    /// Callbacks queued by this thread.
    pub(crate) cbs: Llist,
    /// Number of callbacks queued by this thread (single-instruction increments).
    pub(crate) queued: LocalCounter,
}

/// RCU's per-thread table, indexed by thread slot. Zeroed memory: no reader inside, no callbacks.
pub(crate) static READERS: [RcuPerThread; MAX_THREADS] =
    [const { RcuPerThread { ctr: RcuReaderWord::new(), cbs: Llist::new(), queued: LocalCounter::new() } }; MAX_THREADS];

thread_local! {
    /// Open sections of this thread on the slot-less path, per phase: for `rcu_read_lock_held`, and for the
    /// fork child, which keeps only its own thread's sections in `RCU.overflow`. Atomic RMWs on thread-local
    /// words, so a handler cannot lose an update.
    static OVERFLOW_NEST: [AtomicU32; 2] = const { [AtomicU32::new(0), AtomicU32::new(0)] };
}

/// Proof of being inside an RCU read-side critical section; the section ends when it is dropped.
/// Not `Send`: a section begins and ends on the same thread.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct RcuReadGuard {
    /// The thread's reader word, or null for a section counted in `RCU.overflow[phase]`.
    ctr: *const RcuReaderWord,
    phase: u8,
    _not_send: PhantomData<*mut ()>,
}

/// Enter an RCU read-side critical section (`rcu_read_lock`). Sections nest.
///
/// Objects reachable through RCU-protected pointers loaded inside the section stay valid until the guard is
/// dropped. The section must not sleep or block for long (use [`crate::rcu::srcu`] for that).
///
/// # Context
/// Any context: async-signal-safe and reentrant (a handler may enter and leave sections while it interrupts one,
/// or while it interrupts a grace-period computation). No fence, no atomic RMW, no `mmap`; needs no arena. A
/// thread's first section may claim its slot (`pthread_setspecific`, no allocation in glibc); a thread without
/// a slot pays one `SeqCst` atomic RMW per section instead.
#[inline]
pub fn rcu_read_lock() -> RcuReadGuard {
    let Some(id) = crate::thread::current() else {
        return overflow_lock();
    };
    let ctr = &READERS[id as usize].ctr;
    ctr.enter(&RCU.gp_ctr);
    signal_fence();
    RcuReadGuard { ctr, phase: 0, _not_send: PhantomData }
}

#[cold]
#[inline(never)]
fn overflow_lock() -> RcuReadGuard {
    let phase = RCU.gp_ctr.phase();
    OVERFLOW_NEST.with(|n| n[phase].fetch_add(1, Ordering::Relaxed));
    crate::hooks::point(crate::hooks::Point::RcuOverflowEnter);
    // SeqCst: a full fence between counting ourselves and the section's loads; pairs with the SeqCst loads in
    // `old_readers` (either the scan sees this count, or this section sees the updater's pre-GP stores).
    RCU.overflow[phase].fetch_add(1, Ordering::SeqCst);
    RcuReadGuard { ctr: core::ptr::null(), phase: phase as u8, _not_send: PhantomData }
}

#[cold]
#[inline(never)]
fn overflow_unlock(phase: u8) {
    // SeqCst: the section's loads complete before the scans can see the count drop (pairs as above).
    RCU.overflow[phase as usize].fetch_sub(1, Ordering::SeqCst);
    OVERFLOW_NEST.with(|n| n[phase as usize].fetch_sub(1, Ordering::Relaxed));
}

impl Drop for RcuReadGuard {
    /// Leave the section (`rcu_read_unlock`).
    #[inline]
    fn drop(&mut self) {
        signal_fence();
        if self.ctr.is_null() {
            overflow_unlock(self.phase);
            return;
        }
        // SAFETY: `ctr` points into the static table; the guard is not Send, so this is the owning thread.
        unsafe { &*self.ctr }.exit();
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
/// Any context (thread-local loads; never claims a slot).
pub fn rcu_read_lock_held() -> bool {
    crate::thread::current_if_any().is_some_and(|id| READERS[id as usize].ctr.nested())
        || OVERFLOW_NEST.with(|n| n.iter().any(|c| c.load(Ordering::Relaxed) != 0))
}

/// Thread exit check: a slot whose thread dies inside a section (a guard that was leaked) stays out of
/// circulation until an orphan sweep or a fork clears it.
pub(crate) fn slot_may_be_reused(id: u32) -> bool {
    !READERS[id as usize].ctr.nested()
}

/// The thread of slot `id` is gone (orphan sweep, fork child): clear what it left in the reader word.
pub(crate) fn reset_slot(id: u32) {
    READERS[id as usize].ctr.reset();
}

/// In a fork child: the slot-less sections of threads that are gone never end; keep only this thread's. Take
/// back a driver flag held by a thread that is gone, restarting a grace period in progress at `WAIT1` (it
/// re-scans every reader, then flips and scans again: with one thread left, a correct grace period whatever
/// step the lost driver had reached).
pub(crate) fn after_fork_child() {
    OVERFLOW_NEST.with(|n| {
        for (p, c) in n.iter().enumerate() {
            RCU.overflow[p].store(u64::from(c.load(Ordering::Relaxed)), Ordering::SeqCst);
        }
    });
    super::driver_after_fork(&RCU);
}

impl RcuDomain {
    /// Is some reader still inside a section begun in the phase opposite to `gp_ctr`'s?
    fn old_readers(&self) -> bool {
        if self.overflow[self.gp_ctr.phase() ^ 1].load(Ordering::SeqCst) != 0 {
            return true;
        }
        rcu_core::old_readers(&self.gp_ctr, (0..crate::thread::count()).map(|i| &READERS[i as usize].ctr))
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
                crate::hooks::point(crate::hooks::Point::Rcu);
                if self.old_readers() {
                    return Step::Waiting;
                }
                // Flip fences (as in liburcu): the scan above completes before the flip, and the flip before the scan of
                // WAIT2, so a reader that read the old phase and stores it after the flip is seen by the next scan.
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

    fn slot_cbs(&self, i: u32) -> Option<&Llist> {
        Some(&READERS[i as usize].cbs)
    }

    fn slot_queued(&self, i: u32) -> u64 {
        READERS[i as usize].queued.get()
    }

    fn restart_phase(&self) {
        self.core.phase.store(WAIT1, Ordering::Relaxed);
    }

    fn held_by_current(&self) -> Option<&'static str> {
        rcu_read_lock_held().then_some("an RCU read-side critical section")
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
    super::assert_not_held(&RCU, "synchronize_rcu");
    super::gp_worker::ensure_started();
    let cookie = RCU.core.seq.snap();
    super::wait_for_cookie(&RCU, cookie);
}

/// A grace-period cookie from [`get_state_synchronize_rcu`] or [`start_poll_synchronize_rcu`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RcuCookie(pub(crate) u64);

/// Snapshot the grace-period state: [`poll_state_synchronize_rcu`] on the result becomes true once a full
/// grace period has elapsed after this call. Does not start one.
pub fn get_state_synchronize_rcu() -> RcuCookie {
    RcuCookie(RCU.core.seq.snap())
}

/// Like [`get_state_synchronize_rcu`], and make sure the grace period will happen: it starts the
/// grace-period worker if needed and wakes it, so the cookie completes without any further call.
///
/// # Context
/// Normal context only: may spawn the worker thread; one `futex` wake. From a signal handler or a real-time
/// path use [`start_poll_synchronize_rcu_nolock`].
pub fn start_poll_synchronize_rcu() -> RcuCookie {
    let c = start_poll_synchronize_rcu_nolock();
    super::gp_worker::ensure_started();
    super::gp_worker::kick();
    c
}

/// [`start_poll_synchronize_rcu`] for any context: records the request, makes no system call. The grace
/// period is driven by the grace-period worker, which notices the request within
/// [`IDLE_POLL_MAX`](super::IDLE_POLL_MAX) if it runs. The worker runs once [`crate::init`] or any
/// normal-context RCU call (`synchronize_*`, a barrier, `call_rcu`, `start_poll_synchronize_rcu`) has started it
/// in this process; until then the cookie stays pending.
///
/// # Context
/// Any context: async-signal-safe, lock-free, no system call.
pub fn start_poll_synchronize_rcu_nolock() -> RcuCookie {
    let c = RCU.core.seq.snap();
    RCU.core.request(c);
    RcuCookie(c)
}

/// Whether the grace period named by `cookie` has elapsed.
pub fn poll_state_synchronize_rcu(cookie: RcuCookie) -> bool {
    RCU.core.seq.done(cookie.0)
}

/// Block until the grace period named by `cookie` has elapsed (`cond_synchronize_rcu`).
///
/// # Context
/// Normal context only.
pub fn cond_synchronize_rcu(cookie: RcuCookie) {
    if !poll_state_synchronize_rcu(cookie) {
        super::assert_not_held(&RCU, "cond_synchronize_rcu");
        super::gp_worker::ensure_started();
        super::wait_for_cookie(&RCU, cookie.0);
    }
}

/// Queue `func(head)` to run after a grace period (`call_rcu`), from any context.
///
/// The callback runs on the grace-period worker thread, which [`crate::init`] (or any normal-context RCU call:
/// `synchronize_*`, a barrier, [`call_rcu`]) starts; callbacks queued before it exists wait for it. The worker
/// polls the callback lists (this call never wakes it), so a callback queued while it idles waits at most
/// [`IDLE_POLL_MAX`](super::IDLE_POLL_MAX) before its grace period starts.
///
/// # Safety
/// `head` must stay valid and untouched until `func` runs; `func` must be safe to call with it then.
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free: one CAS on this thread's list, no system call. Never
/// fails.
#[inline]
pub unsafe fn call_rcu_nolock(head: NonNull<RcuHead>, func: RcuCallback) {
    enqueue(head, func);
}

/// Queue a head with its callback. Any context, no system call.
#[inline]
pub(crate) fn enqueue(head: NonNull<RcuHead>, func: RcuCallback) -> super::Enqueued {
    if let Some(id) = crate::thread::current() {
        let me = &READERS[id as usize];
        let was_empty = super::queue_on(&me.cbs, head, func);
        me.queued.inc();
        return super::Enqueued { mine: me.queued.get(), was_empty };
    }
    let was_empty = super::queue_on(&RCU.core.overflow_cbs, head, func);
    let mine = RCU.core.overflow_queued.fetch_add(1, Ordering::Relaxed) + 1;
    super::Enqueued { mine, was_empty }
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
    let e = enqueue(head, func);
    super::after_normal_enqueue(&RCU, e);
}

/// Wait until every callback queued with `call_rcu_nolock` (and every `kfree_rcu_nolock`) before this call has
/// run.
///
/// # Context
/// Normal context only: blocks.
pub fn rcu_barrier() {
    super::GracePeriod::RCU.barrier("rcu_barrier");
}

/// Statistics of a grace-period domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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
pub fn rcu_stats() -> GpStats {
    stats_of(&RCU)
}

/// The domain as a trait object (for the worker).
pub(crate) fn domain() -> &'static dyn Domain {
    &RCU
}

// `RcuHead` must be usable as a plain intrusive link.
const _: () = assert!(core::mem::size_of::<RcuHead>() == 16);
