//! SRCU-fast: grace-period domains whose readers may block or sleep (the kernel's `srcu_read_lock_fast`).
//!
//! # Readers
//!
//! A domain keeps, for every thread (slot), two pairs of counters `lock[0..2]` and `unlock[0..2]`. A reader
//! reads the domain's current index `idx & 1`, increments `lock[idx]` of its own thread, and its guard
//! increments `unlock[idx]` when dropped. The increments are single instructions ([`LocalCounter`]), so a
//! signal handler running its own read-side sections in the middle cannot make one get lost (DESIGN.md §4):
//! a lost `lock` increment would hide a reader from the grace period. No fence and no atomic RMW in the reader.
//! Threads without a slot use shared atomic counters instead.
//!
//! A reader may sleep or block inside its section; only grace periods of *its* domain wait for it.
//!
//! # Grace periods (scan, flip, scan)
//!
//! "Are there readers on index `i`?" is answered by summing `unlock[i]` over all threads, a `membarrier`, then
//! summing `lock[i]`: equal sums mean none. (The `membarrier` plays the role SRCU-fast gives to
//! `synchronize_rcu()`: it orders each reader's increments against its critical section as a fence in the
//! reader would.) A grace period:
//!
//! 1. start: `membarrier` (for the Tasks Trace domain: a full RCU grace period instead, which implies it);
//! 2. wait until there are no readers on the *inactive* index (stragglers that read `idx` long ago);
//! 3. flip `idx`, `membarrier`;
//! 4. wait until there are no readers on the previously active index;
//! 5. end: `membarrier`, publish.
//!
//! A reader that read `idx` before the flip but increments only after our scans began its section after the
//! grace period's barriers and so already sees the updater's earlier stores; the next grace period counts it.
//!
//! # Domains
//!
//! `SrcuFast::new()` is `const`, so domains can be statics; the per-thread counter table is attached on first
//! use, from any context: one of four tables in the executable's zero-initialised data for the first domains
//! of the process (no system call), then `mmap`ed ones. Tables of dropped domains are recycled, never
//! unmapped, so a stale pointer in the grace-period worker can never dangle.

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use super::{Domain, GpCore, RcuCallback, RcuHead, Step};
use crate::sync::llist::Llist;
use crate::sync::local_counter::LocalCounter;
use crate::sync::signal_fence;
use crate::sync::srcu_core::{self, SrcuIndex, SrcuReader};
use crate::sys::membarrier::heavy_barrier;
use crate::thread::MAX_THREADS;

const IDLE: u32 = 0;
const WAIT_RCU: u32 = 1;
const SCAN1: u32 = 2;
const SCAN2: u32 = 3;

const STATE_FREE: u32 = 0;
const STATE_LIVE: u32 = 1;

/// One thread's counters and callback list in one domain.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub(crate) struct SrcuPerThread {
    reader: SrcuReader,
    cbs: Llist,
    queued: LocalCounter,
}

/// A domain's mapped state. Zeroed memory is a valid, free state.
#[repr(C)]
pub(crate) struct SrcuState {
    core: GpCore,
    idx: SrcuIndex,
    implies_rcu: AtomicU32,
    live: AtomicU32,
    next: AtomicPtr<SrcuState>,
    /// Counters shared by readers that have no slot.
    overflow: SrcuReader,
    per_thread: [SrcuPerThread; MAX_THREADS],
}

/// All states ever handed out (live or free for reuse), linked through `next`; never shrinks.
static STATES: AtomicPtr<SrcuState> = AtomicPtr::new(core::ptr::null_mut());

impl SrcuState {
    const fn new() -> Self {
        Self {
            core: GpCore::new(),
            idx: SrcuIndex::new(),
            implies_rcu: AtomicU32::new(0),
            live: AtomicU32::new(STATE_FREE),
            next: AtomicPtr::new(core::ptr::null_mut()),
            overflow: SrcuReader::new(),
            per_thread: [const {
                SrcuPerThread { reader: SrcuReader::new(), cbs: Llist::new(), queued: LocalCounter::new() }
            }; MAX_THREADS],
        }
    }
}

/// States for the first domains of a process, in the executable's zero-initialised data: a program with at
/// most this many SRCU-fast domains alive at once (Tasks Trace included) never maps one, so a first read-side
/// section never makes a system call. Further domains are mapped with `mmap`.
const STATIC_STATES: usize = 4;
static STATIC_POOL: [SrcuState; STATIC_STATES] = [const { SrcuState::new() }; STATIC_STATES];
/// Static states handed out so far.
static STATIC_USED: AtomicU32 = AtomicU32::new(0);

/// Every SRCU state ever mapped, live or free (per-slot fix-ups must reach free states too: a dropped domain's
/// table is reused by the next one).
pub(crate) fn for_each_state(mut f: impl FnMut(&'static SrcuState)) {
    let mut p = STATES.load(Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: states are never unmapped.
        let s = unsafe { &*p };
        f(s);
        p = s.next.load(Ordering::Acquire);
    }
}

/// Every live SRCU state, for the worker.
pub(crate) fn for_each_live(mut f: impl FnMut(&'static SrcuState)) {
    let mut p = STATES.load(Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: states are never unmapped.
        let s = unsafe { &*p };
        if s.live.load(Ordering::Acquire) == STATE_LIVE {
            f(s);
        }
        // Acquire: pairs with the Release CAS that published the next state in `get_state`.
        p = s.next.load(Ordering::Acquire);
    }
}

fn get_state(implies_rcu: bool) -> Option<&'static SrcuState> {
    // Reuse a free state first.
    let mut p = STATES.load(Ordering::Acquire);
    while !p.is_null() {
        // SAFETY: states are never unmapped.
        let s = unsafe { &*p };
        if s.live.compare_exchange(STATE_FREE, STATE_LIVE, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            s.implies_rcu.store(u32::from(implies_rcu), Ordering::Release);
            return Some(s);
        }
        // Acquire: as in `for_each_state`.
        p = s.next.load(Ordering::Acquire);
    }
    let fresh = STATIC_USED.fetch_add(1, Ordering::Relaxed) as usize;
    let s: &'static SrcuState = if fresh < STATIC_STATES {
        &STATIC_POOL[fresh]
    } else {
        let len = core::mem::size_of::<SrcuState>();
        let raw = crate::sys::mmap_reserve(len)?.cast::<SrcuState>();
        // SAFETY: fresh zeroed mapping of the right size: a valid free state. Nobody else sees it yet.
        unsafe { &*raw }
    };
    let raw = s as *const SrcuState as *mut SrcuState;
    s.live.store(STATE_LIVE, Ordering::Relaxed);
    s.implies_rcu.store(u32::from(implies_rcu), Ordering::Relaxed);
    let mut head = STATES.load(Ordering::Relaxed);
    loop {
        s.next.store(head, Ordering::Relaxed);
        // Release: publishes the initialised state to `for_each_live` and `get_state`.
        match STATES.compare_exchange_weak(head, raw, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Some(s),
            Err(now) => head = now,
        }
    }
}

impl SrcuState {
    #[inline(always)]
    fn per_thread(&self, slot: u32) -> &SrcuPerThread {
        &self.per_thread[slot as usize]
    }

    /// The thread of slot `id` is gone: close the sections it left open in this domain.
    pub(crate) fn reset_slot(&self, id: u32) {
        self.per_thread(id).reader.close_open_sections();
    }

    /// Whether the thread of slot `id` is inside a section of this domain (exit check).
    pub(crate) fn slot_in_section(&self, id: u32) -> bool {
        self.per_thread(id).reader.nesting() != 0
    }

    /// Every reader's counters: one per thread slot handed out so far, plus the shared ones.
    fn readers(&self) -> impl Iterator<Item = &SrcuReader> {
        (0..crate::thread::count()).map(|i| &self.per_thread(i).reader).chain(core::iter::once(&self.overflow))
    }

    /// Queue a callback on the calling thread's list in this domain. Any context, no system call.
    pub(crate) fn enqueue(&self, head: NonNull<RcuHead>, func: RcuCallback) -> super::Enqueued {
        if let Some(id) = crate::thread::current() {
            let pt = self.per_thread(id);
            let was_empty = super::queue_on(&pt.cbs, head, func);
            pt.queued.inc();
            return super::Enqueued { mine: pt.queued.get(), was_empty };
        }
        let was_empty = super::queue_on(&self.core.overflow_cbs, head, func);
        let mine = self.core.overflow_queued.fetch_add(1, Ordering::Relaxed) + 1;
        super::Enqueued { mine, was_empty }
    }

    /// In a fork child: sections of threads that are gone never end. Per-slot counters were closed by
    /// `reset_slot`; the shared counters of slot-less readers are balanced too, unless this thread itself has
    /// slot-less sections open (then they stay as they are: over-waiting, never under-waiting). A driver that
    /// is gone is replaced; a grace period in progress restarts from its first scan (or, for Tasks Trace, from
    /// its RCU grace period), which with one thread left is always a correct grace period.
    pub(crate) fn after_fork_child(&self) {
        if SHARED_OPEN.with(|o| o.iter().all(|c| c.load(Ordering::Relaxed) == 0)) {
            self.overflow.close_open_sections();
        }
        super::driver_after_fork(self);
    }

    /// Wait for a full grace period of this domain (normal context).
    pub(crate) fn synchronize(&'static self) {
        super::assert_not_held(self, "synchronize_srcu");
        super::gp_worker::ensure_started();
        let cookie = self.core.seq.snap();
        super::wait_for_cookie(self, cookie);
    }
}

impl Domain for SrcuState {
    fn core(&self) -> &GpCore {
        &self.core
    }

    fn step(&self) -> Step {
        let core = &self.core;
        match core.phase.load(Ordering::Relaxed) {
            IDLE => {
                if !core.work_requested() {
                    return Step::Idle;
                }
                core.seq.start();
                if self.implies_rcu.load(Ordering::Relaxed) != 0 {
                    // Begin with a full RCU grace period: every RCU reader that began before this grace
                    // period started has ended before it can end.
                    let c = super::classic::RCU.core().seq.snap();
                    super::classic::RCU.core().request(c);
                    core.aux.store(c, Ordering::Relaxed);
                    core.phase.store(WAIT_RCU, Ordering::Relaxed);
                } else {
                    heavy_barrier(); // A
                    core.phase.store(SCAN1, Ordering::Relaxed);
                }
                Step::Progress
            }
            WAIT_RCU => {
                let rcu = &super::classic::RCU;
                let cookie = core.aux.load(Ordering::Relaxed);
                if !rcu.core().seq.done(cookie) {
                    return match rcu.core().try_drive(|| rcu.step()) {
                        Some(Step::Progress) => Step::Progress,
                        _ => Step::Waiting,
                    };
                }
                heavy_barrier();
                core.phase.store(SCAN1, Ordering::Relaxed);
                Step::Progress
            }
            SCAN1 => {
                // Scan the inactive index (unlocks, barrier B, locks); flip; barrier D.
                if !srcu_core::scan_inactive_and_flip(&self.idx, || self.readers(), heavy_barrier) {
                    return Step::Waiting;
                }
                core.phase.store(SCAN2, Ordering::Relaxed);
                Step::Progress
            }
            _ => {
                if !srcu_core::scan_previous(&self.idx, || self.readers(), heavy_barrier) {
                    return Step::Waiting;
                }
                heavy_barrier();
                core.phase.store(IDLE, Ordering::Relaxed);
                core.seq.end();
                Step::Progress
            }
        }
    }

    fn slot_cbs(&self, i: u32) -> Option<&Llist> {
        Some(&self.per_thread(i).cbs)
    }

    fn slot_queued(&self, i: u32) -> u64 {
        self.per_thread(i).queued.get()
    }

    fn restart_phase(&self) {
        let c = &self.core;
        if self.implies_rcu.load(Ordering::Relaxed) != 0 {
            let rcu = super::classic::domain().core();
            let cookie = rcu.seq.snap();
            rcu.request(cookie);
            c.aux.store(cookie, Ordering::Relaxed);
            c.phase.store(WAIT_RCU, Ordering::Relaxed);
        } else {
            c.phase.store(SCAN1, Ordering::Relaxed);
        }
    }

    fn held_by_current(&self) -> Option<&'static str> {
        if crate::thread::current_if_any().is_some_and(|id| self.per_thread(id).reader.nesting() != 0) {
            return Some("a read-side section of the same SRCU domain");
        }
        (self.implies_rcu.load(Ordering::Relaxed) != 0 && crate::rcu::classic::rcu_read_lock_held())
            .then_some("an RCU read-side critical section (Tasks Trace grace periods imply RCU grace periods)")
    }
}

/// An SRCU-fast domain. `const`-constructible, so it can be a `static`; a local or boxed domain works too
/// (dropping it waits for its callbacks).
///
/// ```
/// use nolock::rcu::srcu::SrcuFast;
///
/// static DOMAIN: SrcuFast = SrcuFast::new();
///
/// let guard = DOMAIN.read_lock_fast();
/// // ... read SRCU-protected data; sleeping is allowed here ...
/// drop(guard);
/// DOMAIN.synchronize(); // every section that began before this call has ended
/// ```
#[derive(Debug)]
pub struct SrcuFast {
    state: AtomicPtr<SrcuState>,
    implies_rcu: bool,
}

impl Default for SrcuFast {
    fn default() -> Self {
        Self::new()
    }
}

impl SrcuFast {
    /// A new domain (`DEFINE_SRCU_FAST` / `init_srcu_struct_fast`). Its per-thread table is attached on first use
    /// (see the module documentation).
    pub const fn new() -> Self {
        Self { state: AtomicPtr::new(core::ptr::null_mut()), implies_rcu: false }
    }

    /// The Tasks Trace domain: each grace period begins with a full RCU grace period.
    pub(crate) const fn new_implying_rcu() -> Self {
        Self { state: AtomicPtr::new(core::ptr::null_mut()), implies_rcu: true }
    }

    #[inline(always)]
    pub(crate) fn state(&self) -> &'static SrcuState {
        // Acquire: pairs with the AcqRel CAS in `init_state` that published the state.
        let p = self.state.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: states are never unmapped; `p` was published by `init_state`.
            return unsafe { &*p };
        }
        self.init_state()
    }

    #[cold]
    #[inline(never)]
    fn init_state(&self) -> &'static SrcuState {
        let Some(s) = get_state(self.implies_rcu) else {
            // Out of address space for a 64 KiB table: nothing sensible is left to do.
            crate::sys::write_stderr(b"nolock: cannot map an SRCU domain's per-thread table\n");
            std::process::abort();
        };
        let p = s as *const SrcuState as *mut SrcuState;
        // AcqRel: publish; a loser gives its state back for reuse.
        match self.state.compare_exchange(core::ptr::null_mut(), p, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => s,
            Err(winner) => {
                s.live.store(STATE_FREE, Ordering::Release);
                // SAFETY: the winner's state is published and never unmapped.
                unsafe { &*winner }
            }
        }
    }

    /// Enter a read-side section (`srcu_read_lock_fast`). The section may block or sleep. The guard remembers
    /// the index it incremented and must be dropped on the same thread (it is not `Send`).
    ///
    /// # Context
    /// Any context: async-signal-safe and reentrant; no fence, no atomic RMW (two loads and a single-instruction
    /// increment on x86-64). The first use of a domain attaches its table: no system call for the first four
    /// domains of a process, one `mmap` after that.
    #[inline]
    pub fn read_lock_fast(&self) -> SrcuFastGuard<'_> {
        let st = self.state();
        let idx = st.idx.current();
        let unlock = if let Some(id) = crate::thread::current() {
            let r = &st.per_thread(id).reader;
            r.lock(idx);
            (r.unlock_counter(idx) as *const LocalCounter, NOT_SHARED)
        } else {
            SHARED_OPEN.with(|o| o[idx].fetch_add(1, Ordering::Relaxed));
            st.overflow.shared_lock(idx);
            (st.overflow.unlock_counter(idx) as *const LocalCounter, idx as u8)
        };
        signal_fence();
        SrcuFastGuard { unlock: unlock.0, shared: unlock.1, domain: self, _not_send: PhantomData }
    }

    /// Wait until every read-side section of this domain that began before the call has ended
    /// (`synchronize_srcu`). Concurrent callers share grace periods.
    ///
    /// # Panics
    /// If called inside a read-side section of this domain on this thread.
    ///
    /// # Context
    /// Normal context only: blocks for as long as the longest such reader (sleeping readers included).
    pub fn synchronize(&self) {
        self.state().synchronize();
    }

    /// Queue `func(head)` to run after a grace period of this domain (`call_srcu_fast_nolock`).
    ///
    /// # Safety
    /// As [`crate::rcu::classic::call_rcu_nolock`].
    ///
    /// # Context
    /// Any context: async-signal-safe, reentrant, lock-free. Never fails.
    #[inline]
    pub unsafe fn call_srcu_fast_nolock(&self, head: NonNull<RcuHead>, func: RcuCallback) {
        self.state().enqueue(head, func);
    }

    /// `call_srcu_fast` for normal contexts: [`call_srcu_fast_nolock`](Self::call_srcu_fast_nolock) with
    /// backpressure (see [`crate::rcu::classic::call_rcu`]).
    ///
    /// # Safety
    /// As [`crate::rcu::classic::call_rcu_nolock`].
    ///
    /// # Context
    /// Normal context only: may sleep while the backlog is high.
    pub unsafe fn call_srcu_fast(&self, head: NonNull<RcuHead>, func: RcuCallback) {
        let st = self.state();
        let e = st.enqueue(head, func);
        super::after_normal_enqueue(st, e);
    }

    /// Wait until every callback queued on this domain before the call has run (`srcu_barrier`).
    ///
    /// # Context
    /// Normal context only: blocks.
    pub fn barrier(&self) {
        super::GracePeriod::of_state(self.state()).barrier("srcu_barrier");
    }

    /// Grace-period cookie (`get_state_synchronize_srcu`); see [`poll`](Self::poll). Any context.
    ///
    /// # Context
    /// Any context (one atomic load; the first use of a domain attaches its table, see
    /// [`read_lock_fast`](Self::read_lock_fast)).
    pub fn get_state(&self) -> u64 {
        self.state().core.seq.snap()
    }

    /// Like [`get_state`](Self::get_state), and make sure the grace period happens: starts the grace-period
    /// worker if needed and wakes it.
    ///
    /// # Context
    /// Normal context only: may spawn the worker thread; one `futex` wake. From any other context use
    /// [`start_poll_nolock`](Self::start_poll_nolock).
    pub fn start_poll(&self) -> u64 {
        let c = self.start_poll_nolock();
        super::gp_worker::ensure_started();
        super::gp_worker::kick();
        c
    }

    /// [`start_poll`](Self::start_poll) for any context: records the request, makes no system call; the
    /// grace-period worker picks it up (see [`crate::rcu::classic::start_poll_synchronize_rcu_nolock`] for when
    /// the worker runs).
    ///
    /// # Context
    /// Any context: async-signal-safe, lock-free, no system call (but see
    /// [`read_lock_fast`](Self::read_lock_fast) for a domain's first use).
    pub fn start_poll_nolock(&self) -> u64 {
        let st = self.state();
        let c = st.core.seq.snap();
        st.core.request(c);
        c
    }

    /// Whether the grace period named by `cookie` has elapsed (`poll_state_synchronize_srcu`). Any context.
    pub fn poll(&self, cookie: u64) -> bool {
        self.state().core.seq.done(cookie)
    }

    /// Statistics of this domain. Any context.
    ///
    /// # Context
    /// Any context (reads counters; O(threads)).
    pub fn stats(&self) -> super::classic::GpStats {
        super::classic::stats_of(self.state())
    }
}

impl Drop for SrcuFast {
    /// Run every pending callback, then give the per-thread table back for reuse.
    fn drop(&mut self) {
        let p = *self.state.get_mut();
        if p.is_null() {
            return;
        }
        // SAFETY: states are never unmapped.
        let st = unsafe { &*p };
        // Run every callback and free every `kfree_srcu_fast_nolock` block of this domain.
        self.barrier();
        // Wait until no driver is inside a step of this state, then free it for reuse.
        let mut backoff = super::Backoff::new();
        while st.core.try_drive(|| Step::Idle).is_none() {
            backoff.wait();
        }
        // Release: pairs with the AcqRel CAS in `get_state` of whoever reuses the state: our last use happens before.
        st.live.store(STATE_FREE, Ordering::Release);
    }
}

/// `SrcuFastGuard::shared` for a section counted in the thread's own counters.
const NOT_SHARED: u8 = u8::MAX;

thread_local! {
    /// Open sections of this thread in the shared counters of slot-less readers (any domain), per index: the
    /// fork child balances those counters only when this thread has none open. Atomic RMWs on thread-local
    /// words, so a handler cannot lose an update.
    static SHARED_OPEN: [AtomicU32; 2] = const { [AtomicU32::new(0), AtomicU32::new(0)] };
}

/// Proof of being inside a read-side section of an SRCU-fast domain; dropping it leaves the section.
///
/// It remembers its domain: `RcuPtr` checks it, so a guard of one domain can never
/// protect a load from a pointer of another.
#[must_use = "the read-side section ends when the guard is dropped"]
pub struct SrcuFastGuard<'d> {
    unlock: *const LocalCounter,
    /// `NOT_SHARED`, or the index of a section counted in the shared counters.
    shared: u8,
    domain: &'d SrcuFast,
    _not_send: PhantomData<*mut ()>,
}

impl SrcuFastGuard<'_> {
    /// Whether this guard is a section of `domain`.
    #[inline]
    pub fn is_of(&self, domain: &SrcuFast) -> bool {
        core::ptr::eq(self.domain, domain)
    }
}

impl Drop for SrcuFastGuard<'_> {
    /// `srcu_read_unlock_fast`.
    #[inline]
    fn drop(&mut self) {
        signal_fence();
        // SAFETY: the counter lives in a never-unmapped state; the guard is not Send, so this is the thread
        // whose counter it is (or a shared counter).
        let c = unsafe { &*self.unlock };
        if self.shared == NOT_SHARED {
            c.inc();
        } else {
            c.shared_inc();
            SHARED_OPEN.with(|o| o[usize::from(self.shared)].fetch_sub(1, Ordering::Relaxed));
        }
    }
}

impl core::fmt::Debug for SrcuFastGuard<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SrcuFastGuard")
    }
}

/// Alias of [`SrcuFast::call_srcu_fast_nolock`], with the kernel's argument order (domain first). Same rules.
///
/// # Safety
/// As [`SrcuFast::call_srcu_fast_nolock`].
#[inline]
pub unsafe fn call_srcu_fast_nolock(domain: &SrcuFast, head: NonNull<RcuHead>, func: RcuCallback) {
    // SAFETY: forwarded.
    unsafe { domain.call_srcu_fast_nolock(head, func) }
}
