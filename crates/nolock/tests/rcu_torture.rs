//! An rcutorture-style checker (DESIGN.md section 6, "Torture") for the three grace-period flavours: RCU, a static
//! SRCU-fast domain and RCU Tasks Trace, one `#[test]` each on one generic harness (`torture_rcu`,
//! `torture_srcu_fast`, `torture_tasks_trace`), one that runs all three at once with each flavour's threads
//! taking another flavour's signal handler (`torture_all_flavours_at_once`), and one that checks, with logical
//! timestamps, that a Tasks Trace grace period implies an RCU grace period under load
//! (`tasks_trace_implies_rcu_under_load`, documented at its section below). A last test pins down a bug the
//! torture found (`srcu_synchronize_with_same_thread_handler_readers`).
//!
//! # The objects and their pipeline
//!
//! Readers reach objects through two kinds of slots:
//! - **raw slots** (`AtomicPtr<TObj>`), whose objects carry the kernel rcutorture's *pipeline count*: 0 while
//!   the object is current, 1 once a writer has swapped it out ("removed"), then +1 for every grace period that
//!   passes while it waits (`PIPE_LEN` stages), then `PIPE_FREED` and the `POISON` magic just before it is freed.
//!   Each object also has a unique *generation* and a pattern derived from it, so a reuse of its memory is seen.
//!   A removed object is retired in one of four ways, picked at random:
//!   - `call_*` with a callback that advances the pipeline and re-queues itself for the next grace period, and at
//!     the last stage poisons and frees the object (the kernel's `rcu_torture_cb`);
//!   - `kfree_rcu_nolock` / `kfree_srcu_fast_nolock` (the library frees it: the allocator's free link then
//!     overwrites the `magic` word, and reuse changes the generation);
//!   - `synchronize_*`, then pipeline 2, poison and free;
//!   - a polled cookie (`start_poll` ... `poll`), then pipeline 2, poison and free.
//! - **`RcuPtr` slots**, whose values are replaced with `RcuPtr::publish`; the value's `Drop` (which runs in the
//!   grace-period callback) checks and poisons it and counts it.
//!
//! A reader, inside a read-side section, loads a slot and checks the object: magic matches its generation,
//! pattern intact, not poisoned, and pipeline count below 2 (a count of 2 or more means a grace period that
//! started after the object was removed — so after this reader had loaded it — has already ended). It then
//! spins (or, for SRCU-fast and Tasks Trace readers in threads, now and then sleeps ~1 ms inside the section)
//! and checks again, including that the generation has not changed. Every failed check is an error; the tests
//! require zero.
//!
//! # The storm
//!
//! Every reader and updater thread has two per-thread POSIX timers (`testkit::ThreadTimer`, `SIGUSR1` and
//! `SIGUSR2`, so handlers also interrupt each other). The handler enters a read-side section, checks a raw and an
//! `RcuPtr` object, and also replaces objects itself: it allocates with `kmalloc_nolock`, retires the old object
//! with `call_*` or `kfree_*_nolock` (sometimes still inside its section) and publishes into `RcuPtr` slots.
//! Updater threads retire with `synchronize_*` some of the time, polled cookies, `call_*` and `kfree_*_nolock`
//! the rest.
//!
//! # At the end
//!
//! The slots are emptied, the domain's barrier runs (once per pipeline stage), and the test prints what it
//! covered: grace periods and callbacks (from the domain's `GpStats`), reads checked, signals delivered. It
//! asserts zero errors, that grace periods and callbacks grew, that every retired object was freed exactly
//! once (our own frees plus the `kfree_*_nolock` count equal the objects created; every `RcuPtr` value dropped
//! once; every nolock cache back to its live count from before the test), and that no allocation failed.
//!
//! The tests take turns (a mutex): signal dispositions and the memory accounting are process-wide.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nolock::rcu_ptr::{Flavor, Rcu, RcuPtr, Srcu};
use nolock::{Gfp, GpStats, RCU_TASKS_TRACE, RcuCallback, RcuCookie, RcuHead, SrcuFast};
use testkit::{AltStack, ErrnoGuard, ThreadTimer};

// ------------------------------------------------------------------------------------------------------------
// Parameters
// ------------------------------------------------------------------------------------------------------------

/// Reader threads (besides the updaters, which read too).
const READERS: usize = 3;
/// Updater threads.
const UPDATERS: usize = 2;
/// How long each torture runs.
const TORTURE: Duration = Duration::from_millis(2500);
/// Raw slots and `RcuPtr` slots.
const RAW_SLOTS: usize = 8;
const PTR_SLOTS: usize = 8;
/// Period of each of a thread's two timers: 5 threads x 2 timers at 100 µs ask for 100,000 signals/s; the
/// kernel merges expirations while a signal is pending, so fewer are delivered. The tests print the rate (no
/// timing assertion): 25,000-90,000/s per test on the 2-core test VM, 7,000-17,000/s with other test binaries
/// loading the machine; they assert only that at least 1,000 signals arrived.
const TIMER_PERIOD: Duration = Duration::from_micros(100);
const SIGS: [libc::c_int; 2] = [libc::SIGUSR1, libc::SIGUSR2];
/// Handlers deeper than this return at once (without `SA_NODEFER` nesting cannot exceed `SIGS.len()`).
const MAX_NEST: u32 = SIGS.len() as u32;
/// A sleepy flavour's reader thread sleeps inside one section in this many.
const SLEEP_ONE_IN: u64 = 64;
/// The whole process is aborted if a torture test takes longer than this (a deadlock).
const DEADLINE: Duration = Duration::from_secs(90);

/// Pipeline: 0 current, 1 removed, +1 per grace period; freed after stage `PIPE_LEN`.
const PIPE_LEN: u64 = 3;
/// Pipeline value of a freed object.
const PIPE_FREED: u64 = 0xdead;
const MAGIC: u64 = 0x7041_7475_7265_0000;
const POISON: u64 = 0xdead_beef_dead_beef;
/// Pattern words in a raw object (it is 128 bytes: kmalloc-128).
const PAT_WORDS: usize = 10;
const PAYLOAD_WORDS: usize = 4;

// ------------------------------------------------------------------------------------------------------------
// Objects
// ------------------------------------------------------------------------------------------------------------

/// An object of a raw slot. `magic` is word 0, where the allocator keeps its free link, so a free overwrites
/// it; the `RcuHead` is not at offset 0 (the callbacks find the object from it).
#[repr(C)]
struct TObj {
    /// `MAGIC ^ generation` while the object may be read; `POISON` from just before it is freed.
    magic: AtomicU64,
    /// Unique per allocation.
    generation: AtomicU64,
    /// Pipeline count (see the module documentation).
    pipe: AtomicU64,
    /// How it was retired (`Retire as u64`), for error reports.
    how: AtomicU64,
    head: RcuHead,
    pat: [AtomicU64; PAT_WORDS],
}
const _: () = assert!(core::mem::size_of::<TObj>() == 128);

/// The value type of the `RcuPtr` slots. Its `Drop` runs in the grace-period callback (`drop_node`).
struct Payload {
    magic: AtomicU64,
    generation: AtomicU64,
    st: &'static State,
    pat: [AtomicU64; PAYLOAD_WORDS],
}

impl Payload {
    fn new(st: &'static State) -> Self {
        let generation = GEN.fetch_add(1, Ordering::Relaxed);
        Self {
            magic: AtomicU64::new(MAGIC ^ generation),
            generation: AtomicU64::new(generation),
            st,
            pat: core::array::from_fn(|i| AtomicU64::new(testkit::pattern_word(generation, i + 1))),
        }
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        let generation = self.generation.load(Ordering::Relaxed);
        let m = self.magic.load(Ordering::Relaxed);
        if m != MAGIC ^ generation {
            self.st.error(Fault::Corrupt, self as *const Self as usize, MAGIC ^ generation, m);
        }
        self.magic.store(POISON, Ordering::Relaxed);
        self.generation.store(POISON, Ordering::Relaxed);
        self.st.ptr_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Generations, shared by every flavour.
static GEN: AtomicU64 = AtomicU64::new(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum Retire {
    Call = 1,
    Kfree = 2,
    Sync = 3,
    Poll = 4,
    /// Emptied at the end (through `Call`).
    Final = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
enum Fault {
    /// The object was poisoned (freed by the test's callback) while a reader held it.
    Freed = 0,
    /// Its pipeline count reached 2 while a reader held it: a grace period ended under the reader.
    Pipe = 1,
    /// Its generation changed while a reader held it: the memory was reused.
    Reused = 2,
    /// Magic or pattern wrong (freed by the library, or corrupted).
    Corrupt = 3,
    /// `kmalloc_nolock` / `publish` failed with memory available.
    Alloc = 4,
    /// A polled cookie never completed.
    Poll = 5,
}
const N_ERR: usize = 6;

// ------------------------------------------------------------------------------------------------------------
// Per-flavour state and counters
// ------------------------------------------------------------------------------------------------------------

/// Everything one flavour's torture touches; all atomics, so handlers may use it.
struct State {
    raw: [AtomicPtr<TObj>; RAW_SLOTS],
    stop: AtomicBool,
    /// Raw objects created (allocated and published).
    created: AtomicU64,
    /// Raw objects removed and handed to each way of retiring.
    retired: [AtomicU64; 6],
    /// Raw objects freed by the test itself: by the pipeline callback, after `synchronize`, after a poll.
    freed_cb: AtomicU64,
    freed_sync: AtomicU64,
    freed_poll: AtomicU64,
    ptr_published: AtomicU64,
    ptr_dropped: AtomicU64,
    reads_thread: AtomicU64,
    reads_handler: AtomicU64,
    sleeps: AtomicU64,
    /// Reads that saw pipeline count 0, 1 (removed while held), 2+.
    pipe_seen: [AtomicU64; 3],
    signals: AtomicU64,
    handler_retires: AtomicU64,
    handler_publishes: AtomicU64,
    polls: AtomicU64,
    syncs: AtomicU64,
    errors: [AtomicU64; N_ERR],
    /// The first error: kind, address, expected, found.
    first_error: [AtomicU64; 4],
}

impl State {
    const fn new() -> Self {
        Self {
            raw: [const { AtomicPtr::new(core::ptr::null_mut()) }; RAW_SLOTS],
            stop: AtomicBool::new(false),
            created: AtomicU64::new(0),
            retired: [const { AtomicU64::new(0) }; 6],
            freed_cb: AtomicU64::new(0),
            freed_sync: AtomicU64::new(0),
            freed_poll: AtomicU64::new(0),
            ptr_published: AtomicU64::new(0),
            ptr_dropped: AtomicU64::new(0),
            reads_thread: AtomicU64::new(0),
            reads_handler: AtomicU64::new(0),
            sleeps: AtomicU64::new(0),
            pipe_seen: [const { AtomicU64::new(0) }; 3],
            signals: AtomicU64::new(0),
            handler_retires: AtomicU64::new(0),
            handler_publishes: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            errors: [const { AtomicU64::new(0) }; N_ERR],
            first_error: [const { AtomicU64::new(0) }; 4],
        }
    }

    /// Count an error (any context).
    fn error(&self, kind: Fault, addr: usize, expected: u64, found: u64) {
        let total: u64 = self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum();
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        if total == 0 {
            self.first_error[0].store(kind as u64, Ordering::Relaxed);
            self.first_error[1].store(addr as u64, Ordering::Relaxed);
            self.first_error[2].store(expected, Ordering::Relaxed);
            self.first_error[3].store(found, Ordering::Relaxed);
        }
    }

    /// Zero every counter and clear `stop` (between runs; the slots are empty then).
    fn reset(&self) {
        self.stop.store(false, Ordering::Relaxed);
        let counters = [
            &self.created,
            &self.freed_cb,
            &self.freed_sync,
            &self.freed_poll,
            &self.ptr_published,
            &self.ptr_dropped,
            &self.reads_thread,
            &self.reads_handler,
            &self.sleeps,
            &self.signals,
            &self.handler_retires,
            &self.handler_publishes,
            &self.polls,
            &self.syncs,
        ];
        let arrays = [&self.retired[..], &self.pipe_seen[..], &self.errors[..], &self.first_error[..]];
        for c in counters.into_iter().chain(arrays.into_iter().flatten()) {
            c.store(0, Ordering::Relaxed);
        }
    }

    fn total_errors(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }
}

// ------------------------------------------------------------------------------------------------------------
// Flavours
// ------------------------------------------------------------------------------------------------------------

/// One grace-period flavour, as the harness uses it.
trait Torture: 'static {
    /// The `RcuPtr` flavour of this domain.
    type PF: Flavor + Send + Sync + 'static;
    /// A polled grace-period cookie.
    type Cookie: Copy + Send + 'static;
    const NAME: &'static str;
    /// Whether readers may sleep inside sections.
    const SLEEPY: bool;
    fn st() -> &'static State;
    /// The `RcuPtr` slots (set up before any thread or handler runs).
    fn ptrs() -> Option<&'static [RcuPtr<Payload, Self::PF>]>;
    fn init_ptrs();
    /// Enter a read-side section. Any context.
    fn lock() -> <Self::PF as Flavor>::Guard<'static>;
    fn sync();
    /// `call_*`. Any context.
    ///
    /// # Safety
    /// As `call_rcu_nolock`.
    unsafe fn call(head: NonNull<RcuHead>, f: RcuCallback);
    /// `kfree_*_nolock`. Any context.
    ///
    /// # Safety
    /// As `kfree_rcu_nolock`.
    unsafe fn kfree(ptr: *mut u8, head: NonNull<RcuHead>);
    fn barrier();
    fn stats() -> GpStats;
    fn start_poll() -> Self::Cookie;
    fn poll(c: Self::Cookie) -> bool;
}

struct RcuT;
struct SrcuT;
struct TasksTraceT;

static SRCU_D: SrcuFast = SrcuFast::new();

static RCU_STATE: State = State::new();
static SRCU_STATE: State = State::new();
static TT_STATE: State = State::new();
static RCU_PTRS: OnceLock<Vec<RcuPtr<Payload, Rcu>>> = OnceLock::new();
static SRCU_PTRS: OnceLock<Vec<RcuPtr<Payload, Srcu>>> = OnceLock::new();
static TT_PTRS: OnceLock<Vec<RcuPtr<Payload, Srcu>>> = OnceLock::new();

impl Torture for RcuT {
    type PF = Rcu;
    type Cookie = RcuCookie;
    const NAME: &'static str = "RCU";
    const SLEEPY: bool = false;
    fn st() -> &'static State {
        &RCU_STATE
    }
    fn ptrs() -> Option<&'static [RcuPtr<Payload, Rcu>]> {
        RCU_PTRS.get().map(|v| v.as_slice())
    }
    fn init_ptrs() {
        RCU_PTRS.get_or_init(|| (0..PTR_SLOTS).map(|_| RcuPtr::null()).collect());
    }
    fn lock() -> nolock::RcuReadGuard {
        nolock::rcu_read_lock()
    }
    fn sync() {
        nolock::synchronize_rcu();
    }
    unsafe fn call(head: NonNull<RcuHead>, f: RcuCallback) {
        // SAFETY: forwarded from the caller.
        unsafe { nolock::call_rcu_nolock(head, f) }
    }
    unsafe fn kfree(ptr: *mut u8, head: NonNull<RcuHead>) {
        // SAFETY: forwarded from the caller.
        unsafe { nolock::kfree_rcu_nolock(ptr, head) }
    }
    fn barrier() {
        nolock::rcu_barrier();
    }
    fn stats() -> GpStats {
        nolock::rcu_stats()
    }
    fn start_poll() -> RcuCookie {
        nolock::start_poll_synchronize_rcu()
    }
    fn poll(c: RcuCookie) -> bool {
        nolock::poll_state_synchronize_rcu(c)
    }
}

impl Torture for SrcuT {
    type PF = Srcu;
    type Cookie = u64;
    const NAME: &'static str = "SRCU-fast";
    const SLEEPY: bool = true;
    fn st() -> &'static State {
        &SRCU_STATE
    }
    fn ptrs() -> Option<&'static [RcuPtr<Payload, Srcu>]> {
        SRCU_PTRS.get().map(|v| v.as_slice())
    }
    fn init_ptrs() {
        SRCU_PTRS.get_or_init(|| (0..PTR_SLOTS).map(|_| RcuPtr::null_srcu(&SRCU_D)).collect());
    }
    fn lock() -> nolock::SrcuFastGuard<'static> {
        SRCU_D.read_lock_fast()
    }
    fn sync() {
        SRCU_D.synchronize();
    }
    unsafe fn call(head: NonNull<RcuHead>, f: RcuCallback) {
        // SAFETY: forwarded from the caller.
        unsafe { SRCU_D.call_srcu_fast_nolock(head, f) }
    }
    unsafe fn kfree(ptr: *mut u8, head: NonNull<RcuHead>) {
        // SAFETY: forwarded from the caller.
        unsafe { nolock::kfree_srcu_fast_nolock(&SRCU_D, ptr, head) }
    }
    fn barrier() {
        SRCU_D.barrier();
    }
    fn stats() -> GpStats {
        SRCU_D.stats()
    }
    fn start_poll() -> u64 {
        SRCU_D.start_poll()
    }
    fn poll(c: u64) -> bool {
        SRCU_D.poll(c)
    }
}

impl Torture for TasksTraceT {
    type PF = Srcu;
    type Cookie = u64;
    const NAME: &'static str = "Tasks Trace";
    const SLEEPY: bool = true;
    fn st() -> &'static State {
        &TT_STATE
    }
    fn ptrs() -> Option<&'static [RcuPtr<Payload, Srcu>]> {
        TT_PTRS.get().map(|v| v.as_slice())
    }
    fn init_ptrs() {
        TT_PTRS.get_or_init(|| (0..PTR_SLOTS).map(|_| RcuPtr::null_srcu(&RCU_TASKS_TRACE)).collect());
    }
    fn lock() -> nolock::SrcuFastGuard<'static> {
        nolock::rcu_read_lock_tasks_trace()
    }
    fn sync() {
        nolock::synchronize_rcu_tasks_trace();
    }
    unsafe fn call(head: NonNull<RcuHead>, f: RcuCallback) {
        // SAFETY: forwarded from the caller.
        unsafe { nolock::call_rcu_tasks_trace(head, f) }
    }
    unsafe fn kfree(ptr: *mut u8, head: NonNull<RcuHead>) {
        // SAFETY: forwarded from the caller.
        unsafe { nolock::kfree_srcu_fast_nolock(&RCU_TASKS_TRACE, ptr, head) }
    }
    fn barrier() {
        nolock::rcu_barrier_tasks_trace();
    }
    fn stats() -> GpStats {
        RCU_TASKS_TRACE.stats()
    }
    fn start_poll() -> u64 {
        RCU_TASKS_TRACE.start_poll()
    }
    fn poll(c: u64) -> bool {
        RCU_TASKS_TRACE.poll(c)
    }
}

// ------------------------------------------------------------------------------------------------------------
// Thread-local state (const-initialised atomics: usable from handlers)
// ------------------------------------------------------------------------------------------------------------

thread_local! {
    /// Random state, advanced with one atomic RMW so handlers and the code they interrupt never repeat a draw.
    static RNG: AtomicU64 = const { AtomicU64::new(0) };
    /// Signal-handler nesting depth on this thread.
    static DEPTH: AtomicU32 = const { AtomicU32::new(0) };
    /// The handler's work on this thread (`handler_work::<T>` as a `fn()`), 0 outside a torture thread.
    static WORK: AtomicUsize = const { AtomicUsize::new(0) };
}

fn rand() -> u64 {
    testkit::splitmix64(RNG.with(|r| r.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)))
}

extern "C" fn on_signal(_sig: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let _errno = ErrnoGuard::new();
    let work = WORK.with(|w| w.load(Ordering::Relaxed));
    if work == 0 {
        return;
    }
    // SAFETY: WORK only ever holds 0 or a `fn()` (stored by `torture_thread` or `rcu_reader_thread`).
    let work = unsafe { core::mem::transmute::<usize, fn()>(work) };
    let depth = DEPTH.with(|d| d.fetch_add(1, Ordering::Relaxed)) + 1;
    if depth <= MAX_NEST {
        work();
    }
    DEPTH.with(|d| d.fetch_sub(1, Ordering::Relaxed));
}

// ------------------------------------------------------------------------------------------------------------
// Object life cycle (any context unless noted)
// ------------------------------------------------------------------------------------------------------------

/// Allocate and initialise a raw object.
fn new_obj(st: &State) -> Option<NonNull<TObj>> {
    let Some(p) = nolock::kmalloc_nolock(core::mem::size_of::<TObj>(), Gfp::NONE) else {
        st.error(Fault::Alloc, 0, 0, 0);
        return None;
    };
    let o = p.cast::<TObj>();
    let generation = GEN.fetch_add(1, Ordering::Relaxed);
    // SAFETY: a fresh 128-byte, 8-aligned object that nobody else sees until we publish it.
    unsafe {
        o.as_ptr().write(TObj {
            magic: AtomicU64::new(MAGIC ^ generation),
            generation: AtomicU64::new(generation),
            pipe: AtomicU64::new(0),
            how: AtomicU64::new(0),
            head: RcuHead::new(),
            pat: core::array::from_fn(|i| AtomicU64::new(testkit::pattern_word(generation, i + 1))),
        })
    };
    st.created.fetch_add(1, Ordering::Relaxed);
    Some(o)
}

/// The object whose `head` field `head` is (only such heads are queued with the callbacks that call this).
fn obj_of(head: NonNull<RcuHead>) -> *mut TObj {
    head.as_ptr().cast::<u8>().wrapping_sub(core::mem::offset_of!(TObj, head)).cast::<TObj>()
}

/// Mark an object freed (poison) and free it. The caller owns it: its grace period has ended.
fn poison_and_free(o: *mut TObj) {
    // SAFETY: the caller owns `o`, a live object from `new_obj` no reader can reach any more.
    unsafe {
        (*o).pipe.store(PIPE_FREED, Ordering::Relaxed);
        (*o).magic.store(POISON, Ordering::Relaxed);
        nolock::kfree_nolock(o.cast());
    }
}

/// The pipeline callback (the kernel's `rcu_torture_cb`): one more grace period has passed; re-queue for the
/// next, or poison and free at the last stage. Runs on the grace-period worker.
unsafe fn pipe_cb<T: Torture>(head: NonNull<RcuHead>) {
    let o = obj_of(head);
    // SAFETY: the object is ours until freed below; readers only read it.
    let stage = unsafe { (*o).pipe.fetch_add(1, Ordering::Relaxed) } + 1;
    if stage < PIPE_LEN {
        // SAFETY: the head is ours again (its callback is running) and stays valid until the next one runs.
        unsafe { T::call(head, pipe_cb::<T>) };
    } else {
        poison_and_free(o);
        T::st().freed_cb.fetch_add(1, Ordering::Relaxed);
    }
}

/// Put a new object into raw slot `i`; returns the removed one (already marked removed).
fn replace_raw<T: Torture>(i: usize) -> Option<NonNull<TObj>> {
    let st = T::st();
    let o = new_obj(st)?;
    // AcqRel: Release publishes the initialised object to readers' Acquire loads; Acquire gets the old one.
    let old = NonNull::new(st.raw[i % RAW_SLOTS].swap(o.as_ptr(), Ordering::AcqRel))?;
    // SAFETY: we removed `old` from its slot, so we own its retirement; readers only read it.
    unsafe { old.as_ref() }.pipe.store(1, Ordering::Relaxed);
    Some(old)
}

/// Retire a removed object through `call_*` (pipeline) or `kfree_*_nolock`. Any context.
fn retire_async<T: Torture>(o: NonNull<TObj>, how: Retire) {
    let st = T::st();
    // SAFETY: we own the removed object's retirement; it stays allocated until its grace period has passed.
    unsafe {
        let r = o.as_ref();
        r.how.store(how as u64, Ordering::Relaxed);
        let head = NonNull::from(&r.head);
        if how == Retire::Kfree {
            T::kfree(o.as_ptr().cast(), head);
        } else {
            T::call(head, pipe_cb::<T>);
        }
    }
    st.retired[how as usize].fetch_add(1, Ordering::Relaxed);
}

/// Check a raw object a reader holds (inside a section), then `delay`, then check again.
fn check_raw(st: &State, p: *const TObj, reads: &AtomicU64, delay: impl FnOnce()) {
    // SAFETY: `p` was loaded from a slot inside a read-side section of the flavour: it may not be freed before
    // the section ends. Were the library wrong, nolock memory stays mapped, so the reads below still only see
    // wrong values, which is what we count.
    let o = unsafe { &*p };
    let generation = o.generation.load(Ordering::Relaxed);
    verify_raw(st, o, generation);
    delay();
    // The pipeline count at the end of the hold: 1 means the object was removed while we held it.
    let pipe = o.pipe.load(Ordering::Relaxed);
    st.pipe_seen[pipe.min(2) as usize].fetch_add(1, Ordering::Relaxed);
    verify_raw(st, o, generation);
    reads.fetch_add(1, Ordering::Relaxed);
}

fn verify_raw(st: &State, o: &TObj, generation: u64) {
    let addr = o as *const TObj as usize;
    let magic = o.magic.load(Ordering::Relaxed);
    let pipe = o.pipe.load(Ordering::Relaxed);
    let now = o.generation.load(Ordering::Relaxed);
    if magic == POISON || pipe == PIPE_FREED {
        st.error(Fault::Freed, addr, MAGIC ^ generation, magic);
    } else if now != generation {
        st.error(Fault::Reused, addr, generation, now);
    } else if magic != MAGIC ^ generation {
        st.error(Fault::Corrupt, addr, MAGIC ^ generation, magic);
    } else if pipe >= 2 {
        st.error(Fault::Pipe, addr, 1, pipe | (o.how.load(Ordering::Relaxed) << 32));
    }
    for (i, w) in o.pat.iter().enumerate() {
        let v = w.load(Ordering::Relaxed);
        if v != testkit::pattern_word(generation, i + 1) {
            st.error(Fault::Corrupt, addr, testkit::pattern_word(generation, i + 1), v);
            break;
        }
    }
}

/// Check an `RcuPtr` value a reader holds, then `delay`, then check again.
fn check_payload(st: &State, v: &Payload, reads: &AtomicU64, delay: impl FnOnce()) {
    let generation = v.generation.load(Ordering::Relaxed);
    verify_payload(st, v, generation);
    delay();
    verify_payload(st, v, generation);
    reads.fetch_add(1, Ordering::Relaxed);
}

fn verify_payload(st: &State, v: &Payload, generation: u64) {
    let addr = v as *const Payload as usize;
    let magic = v.magic.load(Ordering::Relaxed);
    let now = v.generation.load(Ordering::Relaxed);
    if magic == POISON || now == POISON {
        st.error(Fault::Freed, addr, MAGIC ^ generation, magic);
    } else if now != generation {
        st.error(Fault::Reused, addr, generation, now);
    } else if magic != MAGIC ^ generation {
        st.error(Fault::Corrupt, addr, MAGIC ^ generation, magic);
    }
    for (i, w) in v.pat.iter().enumerate() {
        let x = w.load(Ordering::Relaxed);
        if x != testkit::pattern_word(generation, i + 1) {
            st.error(Fault::Corrupt, addr, testkit::pattern_word(generation, i + 1), x);
            break;
        }
    }
}

fn spin(n: u64) {
    for _ in 0..n {
        core::hint::spin_loop();
    }
}

fn publish<T: Torture>(i: usize) -> bool {
    let st = T::st();
    let Some(ptrs) = T::ptrs() else { return false };
    match ptrs[i % PTR_SLOTS].publish(Payload::new(st)) {
        Ok(()) => {
            st.ptr_published.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(value) => {
            // The value was never published: forget it without counting a drop.
            core::mem::forget(value);
            st.error(Fault::Alloc, 0, 0, 0);
            false
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Handler and threads
// ------------------------------------------------------------------------------------------------------------

/// The signal handler's work: read under a section, and retire and publish. Only atomics and nolock calls.
fn handler_work<T: Torture>() {
    let st = T::st();
    st.signals.fetch_add(1, Ordering::Relaxed);
    if st.stop.load(Ordering::Relaxed) {
        return;
    }
    let r = rand();
    {
        let g = T::lock();
        let p = st.raw[r as usize % RAW_SLOTS].load(Ordering::Acquire);
        if !p.is_null() {
            check_raw(st, p, &st.reads_handler, || spin((r >> 8) & 63));
        }
        if let Some(ptrs) = T::ptrs()
            && let Some(v) = ptrs[(r >> 16) as usize % PTR_SLOTS].load(&g)
        {
            check_payload(st, v, &st.reads_handler, || spin((r >> 24) & 63));
        }
        // Retire from inside the section now and then (allowed: the callback waits for a later grace period).
        if r & 0x300 == 0
            && let Some(old) = replace_raw::<T>((r >> 32) as usize)
        {
            retire_async::<T>(old, if r & 0x400 != 0 { Retire::Kfree } else { Retire::Call });
            st.handler_retires.fetch_add(1, Ordering::Relaxed);
        }
        drop(g);
    }
    let slot = (r >> 44) as usize;
    match (r >> 40) & 7 {
        action @ 0..=2 => {
            if let Some(old) = replace_raw::<T>(slot) {
                retire_async::<T>(old, if action == 2 { Retire::Kfree } else { Retire::Call });
                st.handler_retires.fetch_add(1, Ordering::Relaxed);
            }
        }
        3 if publish::<T>(slot) => {
            st.handler_publishes.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// One read-side section in a thread: check a raw and an `RcuPtr` object, sleeping inside now and then.
fn thread_read<T: Torture>(r: u64) {
    let st = T::st();
    let sleep = T::SLEEPY && r.is_multiple_of(SLEEP_ONE_IN);
    let g = T::lock();
    let p = st.raw[(r >> 8) as usize % RAW_SLOTS].load(Ordering::Acquire);
    if !p.is_null() {
        check_raw(st, p, &st.reads_thread, || {
            if sleep {
                testkit::sleep_wall(Duration::from_millis(1));
                st.sleeps.fetch_add(1, Ordering::Relaxed);
            } else {
                spin((r >> 16) & 1023);
            }
        });
    }
    if let Some(ptrs) = T::ptrs()
        && let Some(v) = ptrs[(r >> 24) as usize % PTR_SLOTS].load(&g)
    {
        check_payload(st, v, &st.reads_thread, || spin((r >> 32) & 255));
    }
    drop(g);
}

/// Objects waiting for a polled grace period (updater threads only).
type Polled<C> = Vec<(NonNull<TObj>, C)>;

fn finish_polled<T: Torture>(list: &mut Polled<T::Cookie>) {
    let st = T::st();
    list.retain(|&(o, c)| {
        if !T::poll(c) {
            return true;
        }
        // SAFETY: the object was removed before the cookie was taken, and its grace period has ended.
        unsafe { o.as_ref() }.pipe.store(2, Ordering::Relaxed);
        poison_and_free(o.as_ptr());
        st.freed_poll.fetch_add(1, Ordering::Relaxed);
        false
    });
}

fn updater_step<T: Torture>(r: u64, polled: &mut Polled<T::Cookie>) {
    let st = T::st();
    let slot = (r >> 8) as usize;
    match r % 16 {
        0..4 => {
            if let Some(old) = replace_raw::<T>(slot) {
                // SAFETY: the removed object is ours to retire.
                unsafe { old.as_ref() }.how.store(Retire::Sync as u64, Ordering::Relaxed);
                st.retired[Retire::Sync as usize].fetch_add(1, Ordering::Relaxed);
                T::sync();
                st.syncs.fetch_add(1, Ordering::Relaxed);
                // SAFETY: as above; a full grace period has passed since it was removed.
                unsafe { old.as_ref() }.pipe.store(2, Ordering::Relaxed);
                poison_and_free(old.as_ptr());
                st.freed_sync.fetch_add(1, Ordering::Relaxed);
            }
        }
        4..6 => {
            if let Some(old) = replace_raw::<T>(slot) {
                // SAFETY: the removed object is ours to retire.
                unsafe { old.as_ref() }.how.store(Retire::Poll as u64, Ordering::Relaxed);
                st.retired[Retire::Poll as usize].fetch_add(1, Ordering::Relaxed);
                polled.push((old, T::start_poll()));
                st.polls.fetch_add(1, Ordering::Relaxed);
            }
        }
        6..10 => {
            if let Some(old) = replace_raw::<T>(slot) {
                retire_async::<T>(old, Retire::Call);
            }
        }
        10..13 => {
            if let Some(old) = replace_raw::<T>(slot) {
                retire_async::<T>(old, Retire::Kfree);
            }
        }
        _ => {
            publish::<T>(slot);
        }
    }
    finish_polled::<T>(polled);
}

/// A torture thread: timers and an alternate signal stack, then reads (and updates) until `stop`.
fn torture_thread<T: Torture>(me: usize, updater: bool, handler: fn(), progress: &AtomicU64) {
    let st = T::st();
    RNG.with(|r| r.store(testkit::splitmix64(me as u64 * 7919 + 1), Ordering::Relaxed));
    let alt = AltStack::new(256 << 10);
    WORK.with(|w| w.store(handler as usize, Ordering::Relaxed));
    let timers = SIGS.map(|sig| ThreadTimer::for_current_thread(sig, TIMER_PERIOD));
    let mut polled: Polled<T::Cookie> = Vec::new();
    while !st.stop.load(Ordering::Relaxed) {
        progress.fetch_add(1, Ordering::Relaxed);
        let r = rand();
        if updater {
            updater_step::<T>(r, &mut polled);
            // Updaters read too, but less.
            thread_read::<T>(rand());
            // Let readers and the worker in: `call_*` and `kfree_*` alone never wait.
            std::thread::yield_now();
        } else {
            thread_read::<T>(r);
        }
    }
    drop(timers);
    WORK.with(|w| w.store(0, Ordering::Relaxed));
    // Objects waiting for a polled grace period: the worker completes it; give up (an error) after 20 s.
    let t = Instant::now();
    while !polled.is_empty() && t.elapsed() < Duration::from_secs(20) {
        finish_polled::<T>(&mut polled);
        std::thread::sleep(Duration::from_millis(1));
        progress.fetch_add(1, Ordering::Relaxed);
    }
    if !polled.is_empty() {
        st.error(Fault::Poll, polled.len(), 0, 0);
    }
    drop(alt);
    progress.store(u64::MAX, Ordering::Relaxed);
}

// ------------------------------------------------------------------------------------------------------------
// Watchdog, memory accounting
// ------------------------------------------------------------------------------------------------------------

static TURN: Mutex<()> = Mutex::new(());

/// Aborts the process (with a message) if the test runs past `DEADLINE` or a thread stops making progress
/// for 20 s: a deadlock must fail the run, not hang it.
struct Watchdog {
    done: &'static AtomicBool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(name: &'static str, progress: &'static [AtomicU64]) -> Self {
        let done: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut last: Vec<(u64, Instant)> = progress.iter().map(|_| (0, Instant::now())).collect();
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(100));
                for (i, (p, l)) in progress.iter().zip(last.iter_mut()).enumerate() {
                    let v = p.load(Ordering::Relaxed);
                    if v == u64::MAX || v != l.0 {
                        *l = (v, Instant::now());
                    } else if l.1.elapsed() > Duration::from_secs(20) {
                        testkit::raw_stderr(
                            format!("rcu_torture {name}: thread {i} made no progress for 20 s (deadlock?)\n")
                                .as_bytes(),
                        );
                        std::process::abort();
                    }
                }
                if start.elapsed() > DEADLINE {
                    testkit::raw_stderr(format!("rcu_torture {name}: ran past {DEADLINE:?}; aborting\n").as_bytes());
                    std::process::abort();
                }
            }
        });
        Self { done, thread: Some(thread) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Objects alive in every nolock cache, plus large allocations (in pages).
fn live_objects() -> (u64, u64) {
    let s = nolock::stats::snapshot();
    let live = s.caches.iter().map(|c| c.allocs - c.frees).sum();
    (live, s.large.allocs - s.large.frees)
}

/// Wait (bounded) until the domain's queued and invoked callback counts agree: the worker adds a batch to
/// `callbacks_invoked` after running all of it, so a barrier can return a moment before the count catches up.
fn wait_invoked(stats: impl Fn() -> GpStats) -> GpStats {
    let t = Instant::now();
    loop {
        let s = stats();
        if s.callbacks_queued == s.callbacks_invoked || t.elapsed() > Duration::from_secs(10) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ------------------------------------------------------------------------------------------------------------
// The torture harness
// ------------------------------------------------------------------------------------------------------------

/// Per-flavour baseline of one torture run.
struct Run {
    stats0: GpStats,
    readers: usize,
    updaters: usize,
}

/// Settle what earlier tests left (callbacks, counters) and take the baseline. Normal context; the caller
/// holds `TURN`.
fn begin<T: Torture>(readers: usize, updaters: usize) -> Run {
    let st = T::st();
    T::init_ptrs();
    for _ in 0..PIPE_LEN {
        T::barrier();
    }
    st.reset();
    let stats0 = wait_invoked(T::stats);
    Run { stats0, readers, updaters }
}

/// Fill every slot (after `begin` and the live-object baseline).
fn fill<T: Torture>() {
    for i in 0..RAW_SLOTS {
        assert!(replace_raw::<T>(i).is_none(), "{}: raw slot {i} not empty at the start", T::NAME);
    }
    for i in 0..PTR_SLOTS {
        assert!(publish::<T>(i), "{}: publish failed", T::NAME);
    }
}

/// Start the run's threads: `readers` readers, then updaters; each thread's signal handler does `handler`
/// (`handler_work` of this or of another flavour).
fn spawn<T: Torture>(run: &Run, handler: fn(), progress: &'static [AtomicU64]) -> Vec<std::thread::JoinHandle<()>> {
    let readers = run.readers;
    (0..run.readers + run.updaters)
        .map(|i| {
            let p = &progress[i];
            std::thread::Builder::new()
                .name(format!("{}-{i}", T::NAME))
                .spawn(move || torture_thread::<T>(i, i >= readers, handler, p))
                .unwrap()
        })
        .collect()
}

/// After the threads are joined: empty the slots (through the pipeline), run the barrier once per pipeline
/// stage (a callback that re-queues itself lands after the barrier that ran it), print, and check the
/// flavour's counters. `elapsed`: how long the storm ran.
fn end<T: Torture>(run: &Run, elapsed: Duration) {
    let st = T::st();
    let stats0 = run.stats0;
    for s in &st.raw {
        if let Some(o) = NonNull::new(s.swap(core::ptr::null_mut(), Ordering::AcqRel)) {
            // SAFETY: removed from its slot by us; the readers are gone.
            unsafe { o.as_ref() }.pipe.store(1, Ordering::Relaxed);
            retire_async::<T>(o, Retire::Final);
        }
    }
    if let Some(ptrs) = T::ptrs() {
        for p in ptrs {
            p.clear();
        }
    }
    for _ in 0..PIPE_LEN + 1 {
        T::barrier();
    }
    let end = wait_invoked(T::stats);

    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let signals = load(&st.signals);
    let retired: Vec<u64> = st.retired.iter().map(load).collect();
    let retired_total: u64 = retired.iter().sum();
    let freed_by_us = load(&st.freed_cb) + load(&st.freed_sync) + load(&st.freed_poll);
    let kfreed = retired[Retire::Kfree as usize];
    let errors: Vec<u64> = st.errors.iter().map(load).collect();
    eprintln!(
        "rcu_torture {}: {elapsed:.2?}, {} readers + {} updaters; grace periods {}, callbacks invoked {} (queued \
         {}, peak pending {}); reads checked {} in threads + {} in handlers ({} slept inside a section; pipeline \
         at the end of a hold 0/1/2+: {}/{}/{}); signals {signals} ({:.0}/s), handler retires {}, handler \
         publishes {}; objects created {}, retired call/kfree/sync/poll/final {}/{}/{}/{}/{}, freed by pipeline \
         callback {}, after synchronize {} ({} synchronize calls), after poll {} ({} polls); RcuPtr published \
         {} dropped {}; errors freed/pipe/reused/corrupt/alloc/poll {:?}",
        T::NAME,
        run.readers,
        run.updaters,
        end.grace_periods - stats0.grace_periods,
        end.callbacks_invoked - stats0.callbacks_invoked,
        end.callbacks_queued - stats0.callbacks_queued,
        end.peak_pending,
        load(&st.reads_thread),
        load(&st.reads_handler),
        load(&st.sleeps),
        load(&st.pipe_seen[0]),
        load(&st.pipe_seen[1]),
        load(&st.pipe_seen[2]),
        signals as f64 / elapsed.as_secs_f64(),
        load(&st.handler_retires),
        load(&st.handler_publishes),
        load(&st.created),
        retired[Retire::Call as usize],
        retired[Retire::Kfree as usize],
        retired[Retire::Sync as usize],
        retired[Retire::Poll as usize],
        retired[Retire::Final as usize],
        load(&st.freed_cb),
        load(&st.freed_sync),
        load(&st.syncs),
        load(&st.freed_poll),
        load(&st.polls),
        load(&st.ptr_published),
        load(&st.ptr_dropped),
        errors,
    );

    let fe: Vec<u64> = st.first_error.iter().map(load).collect();
    assert_eq!(
        st.total_errors(),
        0,
        "{}: torture errors {errors:?} (freed, pipe, reused, corrupt, alloc, poll); first: kind {} at {:#x}, \
         expected {:#x}, found {:#x}",
        T::NAME,
        fe[0],
        fe[1],
        fe[2],
        fe[3]
    );
    assert!(end.grace_periods > stats0.grace_periods, "{}: no grace period completed", T::NAME);
    assert!(end.callbacks_invoked > stats0.callbacks_invoked, "{}: no callback ran", T::NAME);
    assert!(load(&st.reads_thread) > 0 && load(&st.reads_handler) > 0, "{}: nothing was read", T::NAME);
    assert!(signals >= 1000, "{}: only {signals} signals were delivered", T::NAME);
    assert!(load(&st.handler_retires) > 0 && load(&st.handler_publishes) > 0, "{}: handlers retired nothing", T::NAME);
    assert!(load(&st.syncs) > 0 && load(&st.polls) > 0, "{}: no synchronize or poll", T::NAME);
    if T::SLEEPY {
        assert!(load(&st.sleeps) > 0, "{}: no reader slept inside a section", T::NAME);
    }
    // Every object created was retired exactly once, and every retired object was freed.
    assert_eq!(retired_total, load(&st.created), "{}: objects created vs retired", T::NAME);
    assert_eq!(
        load(&st.freed_cb),
        retired[Retire::Call as usize] + retired[Retire::Final as usize],
        "{}: objects retired through the pipeline vs freed by it",
        T::NAME
    );
    assert_eq!(load(&st.freed_sync), retired[Retire::Sync as usize], "{}: synchronize path", T::NAME);
    assert_eq!(load(&st.freed_poll), retired[Retire::Poll as usize], "{}: poll path", T::NAME);
    assert_eq!(freed_by_us + kfreed, load(&st.created), "{}: objects created vs freed", T::NAME);
    assert_eq!(load(&st.ptr_published), load(&st.ptr_dropped), "{}: RcuPtr values published vs dropped", T::NAME);
    assert_eq!(end.callbacks_queued, end.callbacks_invoked, "{}: callbacks left after the barriers", T::NAME);
}

/// The `kfree_*_nolock` objects are freed by the library: after the barriers, every nolock cache must be back
/// to its live count from before the run.
fn assert_live_unchanged(live0: (u64, u64), what: &str) {
    let live1 = live_objects();
    eprintln!(
        "rcu_torture {what}: live nolock objects before/after {}/{}, large allocations {}/{}",
        live0.0, live1.0, live0.1, live1.1
    );
    assert_eq!(live1, live0, "{what}: nolock objects still alive after the barriers (kfree_*_nolock lost some?)");
}

fn install_handlers() {
    for sig in SIGS {
        testkit::install_handler(sig, on_signal, libc::SA_ONSTACK);
    }
}

fn torture<T: Torture>() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    install_handlers();
    let run = begin::<T>(READERS, UPDATERS);
    let live0 = live_objects();
    fill::<T>();
    let progress: &'static [AtomicU64] = Box::leak((0..READERS + UPDATERS).map(|_| AtomicU64::new(0)).collect());
    let dog = Watchdog::start(T::NAME, progress);
    let threads = spawn::<T>(&run, handler_work::<T>, progress);
    let start = Instant::now();
    std::thread::sleep(TORTURE);
    T::st().stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed();
    for t in threads {
        t.join().unwrap();
    }
    end::<T>(&run, elapsed);
    drop(dog);
    assert_live_unchanged(live0, T::NAME);
}

#[test]
fn torture_rcu() {
    let _reports = testkit::NoReports::new();
    torture::<RcuT>();
}

#[test]
fn torture_srcu_fast() {
    let _reports = testkit::NoReports::new();
    torture::<SrcuT>();
}

#[test]
fn torture_tasks_trace() {
    let _reports = testkit::NoReports::new();
    torture::<TasksTraceT>();
}

/// All three flavours at once, and each flavour's threads take the *next* flavour's signal handler: RCU threads
/// run SRCU-fast handlers, SRCU-fast threads Tasks Trace handlers, Tasks Trace threads RCU handlers. So one
/// thread's `kfree_srcu_fast_nolock` pointer block (tagged with its domain) is interrupted by retires into the
/// other SRCU-fast domain, handler sections of one domain run inside thread sections of another, and the worker
/// drives all three domains' grace periods and callbacks together.
#[test]
fn torture_all_flavours_at_once() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    install_handlers();
    const R: usize = 2;
    const U: usize = 1;
    let runs = (begin::<RcuT>(R, U), begin::<SrcuT>(R, U), begin::<TasksTraceT>(R, U));
    let live0 = live_objects();
    fill::<RcuT>();
    fill::<SrcuT>();
    fill::<TasksTraceT>();
    let progress: &'static [AtomicU64] = Box::leak((0..3 * (R + U)).map(|_| AtomicU64::new(0)).collect());
    let dog = Watchdog::start("all flavours", progress);
    let mut threads = spawn::<RcuT>(&runs.0, handler_work::<SrcuT>, &progress[..R + U]);
    threads.extend(spawn::<SrcuT>(&runs.1, handler_work::<TasksTraceT>, &progress[R + U..2 * (R + U)]));
    threads.extend(spawn::<TasksTraceT>(&runs.2, handler_work::<RcuT>, &progress[2 * (R + U)..]));
    let start = Instant::now();
    std::thread::sleep(TORTURE);
    for st in [RcuT::st(), SrcuT::st(), TasksTraceT::st()] {
        st.stop.store(true, Ordering::Relaxed);
    }
    let elapsed = start.elapsed();
    for t in threads {
        t.join().unwrap();
    }
    end::<RcuT>(&runs.0, elapsed);
    end::<SrcuT>(&runs.1, elapsed);
    end::<TasksTraceT>(&runs.2, elapsed);
    drop(dog);
    assert_live_unchanged(live0, "all flavours");
}

// ------------------------------------------------------------------------------------------------------------
// Tasks Trace implies RCU, under load
//
// RCU readers (threads, and the handlers of their signal storm) stamp the begin and end of each read-side
// section from inside it with a global SeqCst counter (`CLOCK`). Threads run back-to-back
// `synchronize_rcu_tasks_trace()`, stamping just before the call and just after it returns; another thread
// queues `call_rcu_tasks_trace` callbacks, stamping just before the call, and each callback stamps when it
// runs. A sleepy Tasks Trace reader loads the domain itself. The guarantee: a Tasks Trace grace period
// (or callback) that started after an RCU reader began ends after that reader ends. So for every section (b, e)
// and grace period (s, f): b < s implies e < f. Any pair with b < s and f < e is a violation.
// ------------------------------------------------------------------------------------------------------------

/// How long the implication test runs.
const IMPLIES_TIME: Duration = Duration::from_secs(2);
/// RCU reader threads (each with the signal storm, whose handlers are RCU readers too).
const RCU_READERS: usize = 3;
/// Threads running back-to-back `synchronize_rcu_tasks_trace()`.
const TT_SYNCERS: usize = 2;
/// Sections of handlers logged (more are run but not logged).
const HLOG: usize = 1 << 16;

/// The logical clock: every event takes a unique, totally ordered (SeqCst) stamp.
static CLOCK: AtomicU64 = AtomicU64::new(1);
static IMPLIES_STOP: AtomicBool = AtomicBool::new(false);
/// Handler readers' sections: begin and end stamps, `HLOG_N` used.
static HLOG_B: [AtomicU64; HLOG] = [const { AtomicU64::new(0) }; HLOG];
static HLOG_E: [AtomicU64; HLOG] = [const { AtomicU64::new(0) }; HLOG];
static HLOG_N: AtomicUsize = AtomicUsize::new(0);
static IMPLIES_SIGNALS: AtomicU64 = AtomicU64::new(0);
/// Tasks Trace callbacks: (stamp before `call_rcu_tasks_trace`, stamp when the callback ran).
static CB_LOG: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

fn stamp() -> u64 {
    CLOCK.fetch_add(1, Ordering::SeqCst)
}

/// An RCU read-side section whose begin and end are stamped from inside it; returns (begin, end).
fn stamped_rcu_section(hold: u64) -> (u64, u64) {
    let g = nolock::rcu_read_lock();
    let b = stamp();
    spin(hold);
    let e = stamp();
    drop(g);
    (b, e)
}

/// The handler of the implication test: one stamped RCU section, logged in the static arrays.
fn implies_handler_work() {
    IMPLIES_SIGNALS.fetch_add(1, Ordering::Relaxed);
    let (b, e) = stamped_rcu_section(rand() & 255);
    let i = HLOG_N.fetch_add(1, Ordering::Relaxed);
    if i < HLOG {
        HLOG_B[i].store(b, Ordering::Relaxed);
        HLOG_E[i].store(e, Ordering::Relaxed);
    }
}

#[repr(C)]
struct Marker {
    head: RcuHead,
    queued: u64,
}

unsafe fn marker_cb(head: NonNull<RcuHead>) {
    let done = stamp();
    // SAFETY: markers are `Box<Marker>`s (head first, repr(C)) leaked by `implies_caller`, handed back here once.
    let m = unsafe { Box::from_raw(head.as_ptr().cast::<Marker>()) };
    CB_LOG.lock().unwrap_or_else(|e| e.into_inner()).push((m.queued, done));
}

/// What the interval check found.
#[derive(Debug, Default)]
struct Verdict {
    /// (reader begin, reader end, grace period start, grace period end) of the first violation.
    first: Option<(u64, u64, u64, u64)>,
    violations: usize,
    /// Readers during which some grace period started (the cases the property is about).
    overlapped: usize,
}

/// A violation: a grace period (s, f) with reader.b < s (the reader began before the grace period started)
/// and f < reader.e (it ended before the reader did).
fn check_intervals(readers: &[(u64, u64)], gps: &[(u64, u64)]) -> Verdict {
    let mut gps = gps.to_vec();
    gps.sort_unstable();
    // suffix_min[i]: the grace period with the earliest end among those starting at or after gps[i].
    let mut suffix_min = vec![(u64::MAX, 0usize); gps.len() + 1];
    for i in (0..gps.len()).rev() {
        suffix_min[i] = suffix_min[i + 1].min((gps[i].1, i));
    }
    let mut v = Verdict::default();
    for &(b, e) in readers {
        let i = gps.partition_point(|g| g.0 <= b);
        if i == gps.len() {
            continue;
        }
        if gps[i].0 < e {
            v.overlapped += 1;
        }
        let (f, j) = suffix_min[i];
        if f < e {
            v.violations += 1;
            v.first.get_or_insert((b, e, gps[j].0, f));
        }
    }
    v
}

fn rcu_reader_thread(me: usize, progress: &AtomicU64) -> Vec<(u64, u64)> {
    RNG.with(|r| r.store(testkit::splitmix64(me as u64 + 4242), Ordering::Relaxed));
    let alt = AltStack::new(256 << 10);
    WORK.with(|w| w.store(implies_handler_work as fn() as usize, Ordering::Relaxed));
    let timers = SIGS.map(|sig| ThreadTimer::for_current_thread(sig, TIMER_PERIOD));
    let mut log = Vec::with_capacity(1 << 20);
    while !IMPLIES_STOP.load(Ordering::Relaxed) {
        progress.fetch_add(1, Ordering::Relaxed);
        let r = rand();
        // Mostly short sections, some long ones (tens of microseconds) that grace periods must wait for.
        let hold = if r & 15 == 0 { 2000 + (r >> 8) % 4000 } else { (r >> 8) & 127 };
        log.push(stamped_rcu_section(hold));
    }
    drop(timers);
    WORK.with(|w| w.store(0, Ordering::Relaxed));
    drop(alt);
    progress.store(u64::MAX, Ordering::Relaxed);
    log
}

fn tt_syncer_thread(progress: &AtomicU64) -> Vec<(u64, u64)> {
    let mut log = Vec::new();
    while !IMPLIES_STOP.load(Ordering::Relaxed) {
        progress.fetch_add(1, Ordering::Relaxed);
        let s = stamp();
        nolock::synchronize_rcu_tasks_trace();
        let f = stamp();
        log.push((s, f));
    }
    progress.store(u64::MAX, Ordering::Relaxed);
    log
}

/// Queues Tasks Trace callbacks (paced: they are cheap to queue and the worker must keep up).
fn implies_caller(progress: &AtomicU64) -> u64 {
    let mut n = 0;
    while !IMPLIES_STOP.load(Ordering::Relaxed) {
        progress.fetch_add(1, Ordering::Relaxed);
        for _ in 0..8 {
            let m = Box::into_raw(Box::new(Marker { head: RcuHead::new(), queued: stamp() }));
            // SAFETY: the marker is leaked until `marker_cb` takes it back; its head is its first field.
            unsafe { nolock::call_rcu_tasks_trace(NonNull::new(m.cast::<RcuHead>()).unwrap(), marker_cb) };
            n += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    progress.store(u64::MAX, Ordering::Relaxed);
    n
}

/// A sleepy Tasks Trace reader (load on the domain: its grace periods also wait for these).
fn tt_sleeper(progress: &AtomicU64) {
    while !IMPLIES_STOP.load(Ordering::Relaxed) {
        progress.fetch_add(1, Ordering::Relaxed);
        let g = nolock::rcu_read_lock_tasks_trace();
        std::thread::sleep(Duration::from_micros(500));
        drop(g);
    }
    progress.store(u64::MAX, Ordering::Relaxed);
}

#[test]
fn tasks_trace_implies_rcu_under_load() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    install_handlers();
    nolock::rcu_barrier_tasks_trace();
    let rcu0 = nolock::rcu_stats();
    let tt0 = RCU_TASKS_TRACE.stats();

    const THREADS: usize = RCU_READERS + TT_SYNCERS + 2;
    let progress: &'static [AtomicU64] = Box::leak((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let dog = Watchdog::start("tasks-trace-implies-rcu", progress);
    let readers: Vec<_> =
        (0..RCU_READERS).map(|i| std::thread::spawn(move || rcu_reader_thread(i, &progress[i]))).collect();
    let syncers: Vec<_> =
        (0..TT_SYNCERS).map(|i| std::thread::spawn(move || tt_syncer_thread(&progress[RCU_READERS + i]))).collect();
    let caller = std::thread::spawn(move || implies_caller(&progress[RCU_READERS + TT_SYNCERS]));
    let sleeper = std::thread::spawn(move || tt_sleeper(&progress[RCU_READERS + TT_SYNCERS + 1]));
    std::thread::sleep(IMPLIES_TIME);
    IMPLIES_STOP.store(true, Ordering::Relaxed);
    let mut reader_log: Vec<(u64, u64)> = Vec::new();
    for t in readers {
        reader_log.extend(t.join().unwrap());
    }
    let thread_sections = reader_log.len();
    let logged = HLOG_N.load(Ordering::Relaxed).min(HLOG);
    reader_log.extend((0..logged).map(|i| (HLOG_B[i].load(Ordering::Relaxed), HLOG_E[i].load(Ordering::Relaxed))));
    let mut gp_log = Vec::new();
    for t in syncers {
        gp_log.extend(t.join().unwrap());
    }
    let calls = caller.join().unwrap();
    sleeper.join().unwrap();
    nolock::rcu_barrier_tasks_trace();
    drop(dog);
    let rcu1 = nolock::rcu_stats();
    let tt1 = RCU_TASKS_TRACE.stats();
    let cb_log = std::mem::take(&mut *CB_LOG.lock().unwrap_or_else(|e| e.into_inner()));

    let by_sync = check_intervals(&reader_log, &gp_log);
    let by_cb = check_intervals(&reader_log, &cb_log);
    let rcu_gps = rcu1.grace_periods - rcu0.grace_periods;
    let tt_gps = tt1.grace_periods - tt0.grace_periods;
    eprintln!(
        "tasks-trace implies RCU: {} RCU sections checked ({thread_sections} in threads, {logged} in handlers, {} \
         signals); {} synchronize_rcu_tasks_trace calls: {} violations, {} sections overlapped a grace period \
         start; {calls} call_rcu_tasks_trace callbacks ({} ran): {} violations, {} overlapped; grace periods: \
         tasks trace {tt_gps}, RCU {rcu_gps}; first violations: {:?} / {:?}",
        reader_log.len(),
        IMPLIES_SIGNALS.load(Ordering::Relaxed),
        gp_log.len(),
        by_sync.violations,
        by_sync.overlapped,
        cb_log.len(),
        by_cb.violations,
        by_cb.overlapped,
        by_sync.first,
        by_cb.first,
    );
    assert_eq!(
        by_sync.violations, 0,
        "a Tasks Trace grace period ended before an RCU reader that began before it started (reader b/e, gp \
         start/end: {:?})",
        by_sync.first
    );
    assert_eq!(
        by_cb.violations, 0,
        "a Tasks Trace callback ran before an RCU reader that began before call_rcu_tasks_trace ended (reader \
         b/e, queued/ran: {:?})",
        by_cb.first
    );
    assert_eq!(cb_log.len() as u64, calls, "every Tasks Trace callback ran after the barrier");
    assert!(!gp_log.is_empty() && tt_gps > 0, "no Tasks Trace grace period completed");
    assert!(by_sync.overlapped > 0 && by_cb.overlapped > 0, "no RCU reader overlapped a grace period start");
    assert!(logged > 0, "no handler read-side section was logged");
    // Each Tasks Trace grace period waits for an RCU grace period that starts after it does; consecutive ones
    // cannot share one (the one boundary case: the first may use an RCU grace period from before `rcu0`).
    assert!(rcu_gps + 1 >= tt_gps, "{tt_gps} Tasks Trace grace periods but only {rcu_gps} RCU grace periods");
}

// ------------------------------------------------------------------------------------------------------------
// Regression: synchronize on a thread whose signal handlers read the same domain
// ------------------------------------------------------------------------------------------------------------

static REPRO_D: SrcuFast = SrcuFast::new();
static REPRO_SIGNALS: AtomicU64 = AtomicU64::new(0);

/// The handler's work: one whole, balanced SRCU-fast read-side section.
fn repro_handler_work() {
    REPRO_SIGNALS.fetch_add(1, Ordering::Relaxed);
    let g = REPRO_D.read_lock_fast();
    drop(g);
}

/// A bug this torture found (its updaters panicked, mostly in debug builds): `SrcuFast::synchronize` panicked
/// with "called inside a read-side section of the same SRCU domain on this thread" although the thread held no
/// section, when a signal handler on that thread ran a whole read-side section of the domain while the misuse
/// check summed the thread's four lock/unlock counters one load at a time. Minimal form: one thread calls
/// `REPRO_D.synchronize()` in a loop, outside any section, while two fast timers interrupt it with handlers
/// that each run one complete `REPRO_D` section. Before the fix (`SrcuReader::nesting` re-reads the lock sum)
/// it panicked within a fraction of a second, release and debug alike; RCU's check (one word, restored by
/// handlers) never did. (`tests/srcu_nesting_signal.rs` reproduces the same bug independently.)
#[test]
fn srcu_synchronize_with_same_thread_handler_readers() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    install_handlers();
    let t = std::thread::spawn(|| {
        WORK.with(|w| w.store(repro_handler_work as fn() as usize, Ordering::Relaxed));
        let timers = [
            ThreadTimer::for_current_thread(SIGS[0], Duration::from_micros(20)),
            ThreadTimer::for_current_thread(SIGS[1], Duration::from_micros(23)),
        ];
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(1) {
            REPRO_D.synchronize();
            n += 1;
        }
        drop(timers);
        WORK.with(|w| w.store(0, Ordering::Relaxed));
        n
    });
    let r = t.join();
    eprintln!(
        "srcu synchronize repro: {} signals, {}",
        REPRO_SIGNALS.load(Ordering::Relaxed),
        match &r {
            Ok(n) => format!("{n} synchronize calls, no false panic"),
            Err(_) => "synchronize panicked (a false positive of its misuse check)".to_string(),
        }
    );
    assert!(r.is_ok(), "SrcuFast::synchronize panicked although no section was held across it");
}
