//! Reclamation from any context: RCU, SRCU-fast, RCU Tasks Trace, `call_rcu_nolock`, grace-period cookies.
//!
//! # What is here
//!
//! - [`classic`]: **RCU** ("classic", the kernel's name before tree RCU: nolock has no tree of nodes), one process-wide domain for non-sleepable readers. A reader writes only its own
//!   thread's counter word (no fence, no atomic RMW); grace periods use the two-phase counter flip of
//!   liburcu's membarrier flavour, ordered against readers with `membarrier(PRIVATE_EXPEDITED)`.
//! - [`srcu`]: **SRCU-fast** domains for readers that may block or sleep. Readers increment per-thread
//!   `lock[idx]` / `unlock[idx]` counters with single-instruction increments (signal-atomic, no fence); grace
//!   periods do the kernel's scan–flip–scan with `membarrier` where SRCU-fast relies on RCU.
//! - [`tasks_trace`]: **RCU Tasks Trace** as one global SRCU-fast domain whose grace period begins with a full
//!   RCU grace period, so it is guaranteed to imply one.
//!
//! The typed wrapper `RcuPtr` (an atomic pointer whose replaced values are freed after a grace period) is a
//! client of this layer and of the slab layer, so it lives above both, in `crate::rcu_ptr`.
//!
//! "Which grace period" is one type, [`GracePeriod`]: RCU's, or one SRCU-fast domain's (Tasks Trace is one).
//! The layers above name grace periods with it: `kfree_rcu` pointer blocks and type-safe caches in the slab
//! layer, `RcuPtr`'s flavours here.
//!
//! `kfree_rcu_nolock` and `kfree_srcu_fast_nolock` belong to the slab layer (`slab::kfree_rcu`), as in the
//! kernel since its 2025 slab series: they batch pointers in pointer blocks the slab layer allocates and frees.
//! This layer offers them what any user gets — callbacks ([`RcuCallback`]), cookies and the "is this cookie
//! done" check ([`GracePeriod`]) — and one hook: the layer that batches work for grace periods registers a
//! `GpClient` (through `process`), which the grace-period worker asks to free what is ready and to age
//! partial batches, and barriers ask to flush. This layer never calls the slab layer by name.
//!
//! # Shared machinery (this file)
//!
//! Every domain has a `GpCore`: its grace-period sequence (`seq::GpSeq`), a *driver* flag, and the
//! state of its grace-period state machine. A grace period is a sequence of non-blocking *steps* (start,
//! wait for readers, flip, wait again, end). Whoever holds the driver flag may run a step: a thread blocked in
//! `synchronize_*` drives its own grace period (no hand-off latency), and the grace-period worker drives them
//! for callbacks. A step that finds readers still inside reports `Step::Waiting` and the driver backs off.
//!
//! Callbacks ([`RcuHead`] embedded in the object, the kernel's `rcu_head`) are pushed onto a lock-free list of
//! the calling thread (one per thread per domain), so `call_*_nolock` is one CAS on a thread-local cache line
//! and is safe from any context. The worker (`worker`) takes the lists, stamps each batch with the cookie of
//! the grace period it needs, drives grace periods while batches wait (and every few hundred callbacks while it
//! invokes a long batch), and invokes batches in order. Barriers (`rcu_barrier`, `srcu_barrier`) push a marker
//! callback onto every thread's list and wait for all of them; the worker runs a batch's markers after the
//! rest of the batch, so each runs after every callback queued before it on its list.

pub mod classic;
pub(crate) mod gp_worker;
pub(crate) mod seq;
pub mod srcu;
pub mod tasks_trace;

pub use gp_worker::IDLE_POLL_MAX;

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use core::time::Duration;

use crate::sync::llist::Llist;
use seq::GpSeq;
use srcu::{SrcuFast, SrcuState};

/// The mechanism grace periods use to order readers: `"membarrier-private-expedited"`, `"membarrier-global"`
/// or `"mprotect"` (the fallbacks; `NOLOCK_MEMBARRIER=global|mprotect` forces one, for tests).
///
/// # Context
/// Normal context: registers the mechanism on first use (system calls).
pub fn barrier_mechanism() -> &'static str {
    match crate::sys::membarrier::register() {
        crate::sys::membarrier::Mechanism::PrivateExpedited => "membarrier-private-expedited",
        crate::sys::membarrier::Mechanism::Global => "membarrier-global",
        crate::sys::membarrier::Mechanism::Mprotect => "mprotect",
    }
}

/// What RCU does when a slot's thread goes away (registered with `crate::thread` by `process`).
pub(crate) static SLOT_HOOKS: crate::thread::SlotHooks =
    crate::thread::SlotHooks { exit: slot_may_be_reused, reset: reset_slot };

/// Thread exit: a slot whose thread dies inside a read-side section (a leaked guard) must not be handed to a new
/// thread; the orphan sweep or a fork clears it later.
fn slot_may_be_reused(id: u32) -> bool {
    let mut ok = classic::slot_may_be_reused(id);
    srcu::for_each_state(|s| ok &= !s.slot_in_section(id));
    ok
}

/// The thread of slot `id` no longer exists (orphan sweep, fork child): close every section it left open, in
/// every domain, as if it had left them now.
fn reset_slot(id: u32) {
    classic::reset_slot(id);
    srcu::for_each_state(|s| s.reset_slot(id));
}

pub use crate::sync::rcu_head::RcuHead;

/// A grace-period callback: runs on the grace-period worker thread (a normal context) once the grace period
/// has ended, with the head it was queued with.
pub type RcuCallback = unsafe fn(NonNull<RcuHead>);

/// Run one callback.
///
/// # Safety
/// `head` was queued with a valid `func` and has not run yet.
pub(crate) unsafe fn invoke(head: usize) {
    // SAFETY: the head is live until its callback has run (caller).
    let func = unsafe { &*(head as *const RcuHead) }.func.load(Ordering::Relaxed);
    // SAFETY: `func` was stored from an `RcuCallback` by `queue_on`.
    let f: RcuCallback = unsafe { core::mem::transmute::<usize, RcuCallback>(func) };
    // SAFETY: arena or caller memory, non-null by construction.
    unsafe { f(NonNull::new_unchecked(head as *mut RcuHead)) };
}

/// Push `head` with callback `func` onto `list`. Returns whether the list was empty before.
#[inline]
pub(crate) fn queue_on(list: &Llist, head: NonNull<RcuHead>, func: RcuCallback) -> bool {
    // SAFETY: the caller hands the head over until its callback runs.
    let h = unsafe { head.as_ref() };
    h.func.store(func as usize, Ordering::Relaxed);
    list.push(head.as_ptr() as usize, &h.next)
}

// -------------------------------------------------------------------------------------------------------------
// Which grace period
// -------------------------------------------------------------------------------------------------------------

/// Which grace period something waits for: RCU's, or the grace period of one SRCU-fast domain (RCU Tasks Trace
/// is one: [`tasks_trace::RCU_TASKS_TRACE`]). Every layer names grace periods with this one type: the
/// `kfree_rcu` pointer blocks, type-safe caches (`SlabFlags::TYPESAFE_BY_*`), and `RcuPtr`'s flavours
/// (`rcu_ptr::Flavor::grace_period`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct GracePeriod(Gp);

#[derive(Clone, Copy)]
enum Gp {
    Rcu,
    /// The domain's table: its identity (tables are never unmapped; a dropped domain's table is reused by the
    /// next domain, after its barrier).
    Srcu(&'static SrcuState),
}

impl PartialEq for Gp {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Gp::Rcu, Gp::Rcu) => true,
            (Gp::Srcu(a), Gp::Srcu(b)) => core::ptr::eq(*a, *b),
            _ => false,
        }
    }
}

impl Eq for Gp {}

impl core::fmt::Debug for GracePeriod {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Gp::Rcu => f.write_str("GracePeriod::RCU"),
            Gp::Srcu(s) => write!(f, "GracePeriod::srcu_fast({:p})", s),
        }
    }
}

impl GracePeriod {
    /// RCU's grace period: every RCU read-side critical section that began before it has ended.
    pub const RCU: GracePeriod = GracePeriod(Gp::Rcu);

    /// The grace period of the SRCU-fast domain `domain`: every read-side section of that domain that began
    /// before it has ended (for [`tasks_trace::RCU_TASKS_TRACE`], every RCU section too).
    ///
    /// # Context
    /// Any context (one atomic load; the first use of a domain attaches its table, see
    /// [`SrcuFast::read_lock_fast`]).
    pub fn srcu_fast(domain: &SrcuFast) -> Self {
        Self::of_state(domain.state())
    }

    pub(crate) fn of_state(s: &'static SrcuState) -> Self {
        GracePeriod(Gp::Srcu(s))
    }

    /// Whether this is RCU's grace period.
    #[inline]
    pub(crate) fn is_rcu(self) -> bool {
        matches!(self.0, Gp::Rcu)
    }

    /// A number that names this grace period's domain: 0 for RCU, the domain's table address for an SRCU-fast
    /// domain. [`from_id`](Self::from_id) turns it back.
    #[inline]
    pub(crate) fn id(self) -> usize {
        match self.0 {
            Gp::Rcu => 0,
            Gp::Srcu(s) => s as *const SrcuState as usize,
        }
    }

    /// The grace period [`id`](Self::id) named.
    ///
    /// # Safety
    /// `id` was returned by `id()`.
    #[inline]
    pub(crate) unsafe fn from_id(id: usize) -> Self {
        if id == 0 {
            Self::RCU
        } else {
            // SAFETY: an SRCU id is the address of a table, and tables are never unmapped (caller).
            Self::of_state(unsafe { &*(id as *const SrcuState) })
        }
    }

    fn domain(self) -> &'static dyn Domain {
        match self.0 {
            Gp::Rcu => classic::domain(),
            Gp::Srcu(s) => s,
        }
    }

    /// Queue `func(head)` to run after a grace period of this kind (`call_rcu_nolock`,
    /// `call_srcu_fast_nolock`).
    ///
    /// # Safety
    /// As [`classic::call_rcu_nolock`].
    ///
    /// # Context
    /// Any context: async-signal-safe, lock-free, no system call (the worker polls).
    #[inline]
    pub(crate) unsafe fn call(self, head: NonNull<RcuHead>, func: RcuCallback) {
        let _ = match self.0 {
            Gp::Rcu => classic::enqueue(head, func),
            Gp::Srcu(s) => s.enqueue(head, func),
        };
    }

    /// A cookie that [`done`](Self::done) says is over once a full grace period has elapsed after this call
    /// (`get_state_synchronize_rcu`). Any context (one full fence, one load).
    #[inline]
    pub(crate) fn snap(self) -> u64 {
        self.domain().core().seq.snap()
    }

    /// Ask for the grace period `cookie` names, so that the worker drives it. Any context (one atomic max).
    #[inline]
    pub(crate) fn request(self, cookie: u64) {
        self.domain().core().request(cookie);
    }

    /// Whether the grace period `cookie` names is over (`poll_state_synchronize_rcu`). Any context (one load).
    #[inline]
    pub(crate) fn done(self, cookie: u64) -> bool {
        self.domain().core().seq.done(cookie)
    }

    /// Block until the grace period `cookie` names is over, driving grace periods as needed
    /// (`cond_synchronize_rcu`). Normal context only.
    pub(crate) fn wait(self, cookie: u64) {
        wait_for_cookie(self.domain(), cookie);
    }

    /// Wait until every callback queued for this grace period before the call has run (not the batches of the
    /// [`GpClient`]). `what` names the caller in the panic of a thread that would wait for itself. Normal context
    /// only: blocks.
    pub(crate) fn callback_barrier(self, what: &str) {
        barrier(self.domain(), what);
    }

    /// Wait until everything queued for this grace period before the call has run: callbacks, and the batches of
    /// the registered [`GpClient`] (`rcu_barrier`, `srcu_barrier`). `what` names the caller in the panic of a
    /// thread that would wait for itself. Normal context only: blocks.
    pub(crate) fn barrier(self, what: &str) {
        let d = self.domain();
        assert_not_held(d, what);
        adopt_abandoned_steps(); // before the flush, which waits for grace periods too
        if let Some(c) = client() {
            (c.flush)(self);
        }
        barrier(d, what);
    }
}

// -------------------------------------------------------------------------------------------------------------
// The one hook for a layer above: batches of its own that wait for grace periods
// -------------------------------------------------------------------------------------------------------------

/// What a layer that batches work for grace periods of its own (the slab layer's `kfree_rcu` pointer blocks)
/// asks of the grace-period worker and of barriers. Registered once, by the composition root (`process`); this
/// layer calls it without knowing what the batches are.
#[derive(Debug)]
pub(crate) struct GpClient {
    /// The worker, after each pass: free what waits for grace periods that are over. Returns whether anything
    /// still waits (the worker then keeps driving grace periods).
    pub reclaim: fn() -> bool,
    /// Whether partial batches wait to be aged out (the worker then wakes at least every aging tick).
    pub holds_partial: fn() -> bool,
    /// The worker, every aging tick: push out partial batches that waited two ticks.
    pub age: fn(),
    /// A barrier of this grace period, before it entrains its callbacks: push out every partial batch for it and
    /// wait until everything queued for it before the call is done. Normal context; blocks.
    pub flush: fn(GracePeriod),
    /// The worker, after each pass: give back what its own thread holds — the objects its callbacks and block
    /// frees put on its thread's lists — so that other threads can allocate them (a worker that only frees
    /// would otherwise keep them, and an exhausted arena would fail allocations with that memory free).
    pub give_back: fn(),
}

static CLIENT: AtomicPtr<GpClient> = AtomicPtr::new(core::ptr::null_mut());

/// Register the layer above's [`GpClient`] (one; a second registration of the same is a no-op).
///
/// # Context
/// Any context; meant for process initialisation (`process`).
pub(crate) fn register_client(c: &'static GpClient) {
    // Release: publishes the hooks to the Acquire load in `client`.
    let _ = CLIENT.compare_exchange(
        core::ptr::null_mut(),
        c as *const GpClient as *mut GpClient,
        Ordering::Release,
        Ordering::Relaxed,
    );
}

/// The registered client, if any.
pub(crate) fn client() -> Option<&'static GpClient> {
    // Acquire: pairs with the Release CAS in `register_client`.
    let p = CLIENT.load(Ordering::Acquire);
    // SAFETY: only `&'static GpClient` values are stored, by `register_client`.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The next head in a (worker-owned) chain.
pub(crate) fn next_of(head: usize) -> usize {
    // SAFETY: chain heads are live RcuHeads owned by the worker.
    unsafe { &*(head as *const RcuHead) }.next.load(Ordering::Relaxed)
}

/// Whether a (worker-owned) head is a barrier marker.
pub(crate) fn is_barrier_marker(head: usize) -> bool {
    // SAFETY: as in `next_of`.
    unsafe { &*(head as *const RcuHead) }.func.load(Ordering::Relaxed) == barrier_done as RcuCallback as usize
}

/// Result of one grace-period step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// The state machine advanced; call again at once.
    Progress,
    /// Readers are still inside; call again later.
    Waiting,
    /// No grace period is needed.
    Idle,
}

/// Grace-period state common to all domains.
#[derive(Debug)]
pub(crate) struct GpCore {
    /// Completed grace periods.
    pub seq: GpSeq,
    /// Who runs steps: 0 when nobody, else the driving thread's [`thread_id`] (so a fork child knows whose
    /// step was interrupted).
    driver: AtomicUsize,
    /// In a fork child: the forking thread's own step held the driver at the fork, interrupted by the signal
    /// handler that forked (see [`driver_after_fork`] and [`adopt_abandoned_steps`]).
    held_at_fork: AtomicBool,
    /// State-machine phase (driver only).
    pub phase: AtomicU32,
    /// Phase-specific value (driver only), e.g. an RCU cookie being waited for.
    pub aux: AtomicU64,
    /// Highest cookie somebody waits for.
    requested: AtomicU64,
    /// Callbacks queued by contexts without a per-thread list.
    pub overflow_cbs: Llist,
    /// Callbacks queued on `overflow_cbs`.
    pub overflow_queued: AtomicU64,
    /// Callbacks invoked.
    pub invoked: AtomicU64,
    /// Highest number of callbacks waiting at once (seen by the worker).
    pub peak_pending: AtomicU64,
}

impl GpCore {
    /// A core with no grace period yet.
    pub const fn new() -> Self {
        Self {
            seq: GpSeq::new(),
            driver: AtomicUsize::new(0),
            held_at_fork: AtomicBool::new(false),
            phase: AtomicU32::new(0),
            aux: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            overflow_cbs: Llist::new(),
            overflow_queued: AtomicU64::new(0),
            invoked: AtomicU64::new(0),
            peak_pending: AtomicU64::new(0),
        }
    }

    /// Ask for the grace period named by `cookie` (any context: one atomic max).
    pub fn request(&self, cookie: u64) {
        let mut cur = self.requested.load(Ordering::Relaxed);
        while cur.wrapping_sub(cookie) as i64 <= 0 && cur != cookie {
            match self.requested.compare_exchange_weak(cur, cookie, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Whether some requested grace period has not ended yet.
    pub fn work_requested(&self) -> bool {
        !self.seq.done(self.requested.load(Ordering::Acquire))
    }

    /// Run `f` as the driver if nobody else is driving. The flag is released even if `f` panics.
    pub fn try_drive(&self, f: impl FnOnce() -> Step) -> Option<Step> {
        // Acquire: pairs with the Release store in `DriverGuard::drop`: the next driver sees the phase (and
        // everything else) the previous one left.
        if self.driver.compare_exchange(0, thread_id(), Ordering::Acquire, Ordering::Relaxed).is_err() {
            return None;
        }
        struct DriverGuard<'a>(&'a GpCore);
        impl Drop for DriverGuard<'_> {
            fn drop(&mut self) {
                // The step a fork child inherited has ended: nothing left to adopt.
                self.0.held_at_fork.store(false, Ordering::Relaxed);
                // Release: pairs with the Acquire CAS above.
                self.0.driver.store(0, Ordering::Release);
            }
        }
        let _g = DriverGuard(self);
        Some(f())
    }

    /// Take the driver flag back from a step that will never end, and restart the grace period in progress
    /// (if any) from `d`'s [`Domain::restart_phase`], the phase that re-scans every reader; with one thread left
    /// that is always a correct grace period.
    fn take_back(d: &dyn Domain) {
        let core = d.core();
        core.held_at_fork.store(false, Ordering::Relaxed);
        if core.seq.in_progress() {
            d.restart_phase();
        } else {
            core.phase.store(0, Ordering::Relaxed);
        }
        // Release: pairs with the Acquire CAS in `try_drive`: the next driver sees the phase set above.
        core.driver.store(0, Ordering::Release);
    }
}

thread_local! {
    /// Its address names the thread in `GpCore::driver` (unique among live threads, and the same in a fork
    /// child for the thread that forked).
    static THREAD_ID: u8 = const { 0 };
}

/// The calling thread's identity for `GpCore::driver` (never 0).
fn thread_id() -> usize {
    THREAD_ID.with(|t| t as *const u8 as usize)
}

/// In a fork child: if a thread that no longer exists held `d`'s driver flag, it may have stopped anywhere
/// inside a step: take the flag back and restart the grace period in progress.
///
/// If the flag is this thread's own, fork() was called by a signal handler that interrupted one of its steps.
/// Should the handler return, the step continues here, so the flag is left to it; it is only marked
/// `held_at_fork`. Should the handler never return (it ends the child with `_exit` or `exec`) and make a
/// blocking call meanwhile, [`adopt_abandoned_steps`] takes it back then.
fn driver_after_fork(d: &dyn Domain) {
    let core = d.core();
    if core.driver.load(Ordering::Relaxed) == thread_id() {
        core.held_at_fork.store(true, Ordering::Relaxed);
        return;
    }
    GpCore::take_back(d);
}

/// Called by every blocking call (`synchronize_*`, barriers, the `call_rcu` backlog wait) before it waits.
///
/// In a fork child made by a signal handler that interrupted one of the forking thread's own grace-period
/// steps, the child's first blocking call can only come from that handler (blocking calls are for normal
/// contexts, and the step is still on this thread's stack until the handler returns). A handler may make one
/// only because it never returns to the code it interrupted: that step will never end. Before this, its
/// driver flag stayed held for good and every grace period of the child (and so every barrier, and the
/// worker's callbacks) waited for it forever (`tests/fork_step.rs`, a fork at an instruction of
/// `synchronize_rcu` inside `step`). So take the flag back as for a thread that is gone.
pub(crate) fn adopt_abandoned_steps() {
    let adopt = |d: &dyn Domain| {
        let core = d.core();
        if core.held_at_fork.load(Ordering::Relaxed) && core.driver.load(Ordering::Relaxed) == thread_id() {
            GpCore::take_back(d);
        }
    };
    adopt(classic::domain());
    srcu::for_each_state(|s| adopt(s));
}

impl Default for GpCore {
    fn default() -> Self {
        Self::new()
    }
}

/// A domain the generic machinery can drive: RCU or an SRCU-fast domain.
pub(crate) trait Domain: Sync {
    /// The domain's grace-period core.
    fn core(&self) -> &GpCore;
    /// One step of the grace-period state machine. The caller holds the driver flag. Normal context.
    fn step(&self) -> Step;
    /// Callback list of thread slot `i` (or `None` when the domain keeps none there yet).
    fn slot_cbs(&self, i: u32) -> Option<&Llist>;
    /// Callbacks ever queued on slot `i`'s list.
    fn slot_queued(&self, i: u32) -> u64;
    /// A grace period is in progress but its driver was lost (a fork): set the phase it restarts from, the one
    /// that re-scans every reader.
    fn restart_phase(&self);
    /// If the calling thread is inside a read-side section that this domain's grace periods wait for (then
    /// waiting for one of them would wait forever): what kind of section, for the panic message.
    fn held_by_current(&self) -> Option<&'static str>;
}

/// Panic with a clear message if the calling thread would wait for itself: `what` waits for a grace period of
/// `d` while the thread is inside a read-side section that grace period waits for.
#[track_caller]
pub(crate) fn assert_not_held(d: &dyn Domain, what: &str) {
    if let Some(section) = d.held_by_current() {
        panic!("nolock: {what}() called inside {section} on this thread; it would wait for itself forever");
    }
}

/// Callbacks waiting (queued, not yet invoked) above which the normal-context `call_rcu` / `call_srcu_fast`
/// make their caller wait for the worker.
#[doc(hidden)]
pub const BACKLOG_HIGH: u64 = 1 << 16;
/// The backlog a throttled caller waits for.
#[doc(hidden)]
pub const BACKLOG_LOW: u64 = 1 << 14;
/// How many callbacks a thread queues between two looks at the backlog (summing it costs O(threads)).
const THROTTLE_EVERY: u64 = 256;

/// Backpressure for normal-context callers: every `THROTTLE_EVERY` callbacks queued by this thread (`mine`),
/// if `d`'s backlog is above [`BACKLOG_HIGH`], wait until the worker brings it below [`BACKLOG_LOW`].
pub(crate) fn throttle(d: &dyn Domain, mine: u64) {
    // The worker itself (a callback that queues callbacks) never waits: it is the one that would have to run.
    if !mine.is_multiple_of(THROTTLE_EVERY) || gp_worker::on_worker_thread() {
        return;
    }
    let pending = || queued_total(d).saturating_sub(d.core().invoked.load(Ordering::Acquire));
    if pending() <= BACKLOG_HIGH {
        return;
    }
    adopt_abandoned_steps();
    gp_worker::ensure_started();
    gp_worker::kick();
    let mut backoff = Backoff::new();
    while pending() > BACKLOG_LOW {
        backoff.wait();
    }
}

/// What an enqueue did: this thread's count of queued callbacks (for the throttle), and whether its list was
/// empty before (then a normal-context caller wakes the worker).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Enqueued {
    pub mine: u64,
    pub was_empty: bool,
}

/// After a normal-context enqueue (`call_rcu`, `call_srcu_fast`): wake the worker if the list was empty (the
/// `*_nolock` variants never do: the worker polls), and apply the backlog throttle.
pub(crate) fn after_normal_enqueue(d: &dyn Domain, e: Enqueued) {
    if e.was_empty && !gp_worker::on_worker_thread() {
        gp_worker::ensure_started();
        gp_worker::kick();
    }
    throttle(d, e.mine);
}

/// Callbacks queued so far on every list of `d` (sum of per-thread counters).
pub(crate) fn queued_total(d: &dyn Domain) -> u64 {
    (0..crate::thread::count()).map(|i| d.slot_queued(i)).sum::<u64>()
        + d.core().overflow_queued.load(Ordering::Relaxed)
}

/// Block until the grace period named by `cookie` has ended, driving grace periods as needed.
/// Normal context only.
pub(crate) fn wait_for_cookie(d: &dyn Domain, cookie: u64) {
    adopt_abandoned_steps();
    let core = d.core();
    core.request(cookie);
    let mut backoff = Backoff::new();
    while !core.seq.done(cookie) {
        // Acquire: pairs with the Release increment in `GpSeq::end`.
        let seen = core.seq.ends_word().load(Ordering::Acquire);
        match core.try_drive(|| d.step()) {
            Some(Step::Progress) => backoff.reset(),
            Some(Step::Waiting) | Some(Step::Idle) => backoff.wait(),
            None => {
                if !core.seq.done(cookie) {
                    crate::sys::futex_wait(core.seq.ends_word(), seen, Some(Duration::from_millis(1)));
                }
            }
        }
    }
}

/// Spin, then yield, then sleep for growing intervals (up to 1 ms) while readers hold a grace period.
pub(crate) struct Backoff {
    n: u32,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { n: 0 }
    }

    pub(crate) fn reset(&mut self) {
        self.n = 0;
    }

    pub(crate) fn wait(&mut self) {
        self.n = self.n.saturating_add(1);
        match self.n {
            0..=10 => core::hint::spin_loop(),
            11..=20 => std::thread::yield_now(),
            n => std::thread::sleep(Duration::from_micros((1u64 << (n - 20).min(10)).min(1000))),
        }
    }
}

/// A marker queued by a barrier on one callback list.
#[repr(C)]
struct BarrierHead {
    head: RcuHead,
    remaining: *const AtomicU32,
}

unsafe fn barrier_done(head: NonNull<RcuHead>) {
    // SAFETY: barrier heads are `BarrierHead`s (repr(C), head first) that live until `remaining` hits zero.
    let b = unsafe { &*(head.as_ptr() as *const BarrierHead) };
    // SAFETY: the barrier caller keeps the counter alive until it reads zero.
    let remaining = unsafe { &*b.remaining };
    if remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        crate::sys::futex_wake(remaining, i32::MAX);
    }
}

/// Wait until every callback queued on `d` before this call has run. Normal context only; on the worker thread
/// (inside a callback) it runs the worker's passes itself until its markers have run.
pub(crate) fn barrier(d: &dyn Domain, what: &str) {
    assert_not_held(d, what);
    adopt_abandoned_steps();
    let slots = crate::thread::count();
    let remaining = AtomicU32::new(0);
    let mut heads: Vec<BarrierHead> = Vec::with_capacity(slots as usize + 1);
    for _ in 0..=slots {
        heads.push(BarrierHead { head: RcuHead::new(), remaining: &remaining });
    }
    // Count them all before any can run; markers count as queued callbacks like any other. Release: pairs with
    // the AcqRel decrement in `barrier_done`.
    remaining.store(slots + 1, Ordering::Release);
    d.core().overflow_queued.fetch_add(u64::from(slots) + 1, Ordering::Relaxed);
    let func: RcuCallback = barrier_done;
    for (i, h) in heads.iter().enumerate() {
        let list = if (i as u32) < slots { d.slot_cbs(i as u32) } else { None };
        let head = NonNull::from(&h.head);
        queue_on(list.unwrap_or(&d.core().overflow_cbs), head, func);
    }
    if gp_worker::on_worker_thread() {
        let mut backoff = Backoff::new();
        // Acquire: pairs with the AcqRel decrement of the last marker: its callbacks' effects are visible.
        while remaining.load(Ordering::Acquire) != 0 {
            gp_worker::run_nested_pass();
            backoff.wait();
        }
        return;
    }
    gp_worker::ensure_started();
    gp_worker::kick();
    loop {
        // Acquire: as above.
        let r = remaining.load(Ordering::Acquire);
        if r == 0 {
            break;
        }
        crate::sys::futex_wait(&remaining, r, Some(Duration::from_millis(10)));
    }
}

/// In a fork child (one thread left): bring every domain's grace-period machinery and callback lists back to
/// a consistent state. See `process` for the order of the whole child handler.
///
/// - A driver flag held by a thread that is gone is taken back and a grace period in progress restarts from the
///   phase that re-scans every reader.
/// - Barrier markers on the lists belong to barriers of threads that are gone (their counters sit on stacks
///   that glibc may hand to the child's next thread): they are unlinked, never run.
/// - Callbacks the worker had taken are lost with it; `invoked` is set so that the backlog counts only what is
///   still queued, and the backlog throttle does not wait for callbacks that will never run.
///
/// (The `kfree_rcu` rings and slots are repaired earlier, by the slab layer's `kfree_rcu::after_fork_child`,
/// before the slots of the threads that are gone are reset.)
pub(crate) fn after_fork_child() {
    gp_worker::after_fork_child();
    classic::after_fork_child();
    srcu::for_each_state(|s| s.after_fork_child());
    let fix = |d: &dyn Domain| {
        let mut left = 0u64;
        for i in 0..crate::thread::count() {
            if let Some(l) = d.slot_cbs(i) {
                left += drop_markers(l);
            }
        }
        left += drop_markers(&d.core().overflow_cbs);
        // Release: pairs with the Acquire loads of `invoked` in the throttle.
        d.core().invoked.store(queued_total(d).wrapping_sub(left), Ordering::Release);
    };
    fix(classic::domain());
    srcu::for_each_live(|s| fix(s));
}

/// Unlink the barrier markers of `list` (fork child); returns how many callbacks remain on it.
fn drop_markers(list: &Llist) -> u64 {
    let mut h = list.take_all();
    // Rebuild the chain without markers, in its order: `first ..= last`, linked through `next`.
    let (mut first, mut last) = (0usize, 0usize);
    let mut n = 0;
    while h != 0 {
        let next = next_of(h);
        if !is_barrier_marker(h) {
            if last == 0 {
                first = h;
            } else {
                // SAFETY: `last` is a live head of this chain, owned by us (taken off the list).
                unsafe { &*(last as *const RcuHead) }.next.store(h, Ordering::Relaxed);
            }
            last = h;
            n += 1;
        }
        h = next;
    }
    if last != 0 {
        // SAFETY: as above.
        let link = unsafe { &(*(last as *const RcuHead)).next };
        list.push_chain(first, link);
    }
    n
}
