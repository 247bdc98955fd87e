//! `nolock rcu`: readers in threads and in signal handlers verify an RCU / SRCU-fast protected table while
//! updaters replace its objects and retire them.
//!
//! # The table
//!
//! - `RCU_PTRS`: [`RcuPtr`]s (RCU flavour; old values retired with `call_rcu_nolock` by `publish`);
//! - `SRCU_PTRS`: [`RcuPtr`]s of the SRCU-fast domain `SRCU`;
//! - `RAW_RCU` / `RAW_SRCU`: plain `AtomicPtr`s to 128-byte `kmalloc_nolock` objects with an embedded
//!   [`RcuHead`] at their end, replaced with `swap` and retired with `kfree_rcu_nolock` /
//!   `kfree_srcu_fast_nolock`.
//!
//! # Roles
//!
//! - **updaters** (a third of `--threads`) replace random slots as fast as they can, and now and then call
//!   `synchronize_rcu` / `SrcuFast::synchronize` themselves;
//! - **RCU readers** read an `RcuPtr` and a raw slot inside `rcu_read_lock`, sometimes nested, dwell a little,
//!   and check both objects again before leaving the section;
//! - **SRCU-fast readers** do the same inside `SRCU.read_lock_fast()` and sleep inside one section in 32;
//! - **signal handlers**: every thread gets two per-thread POSIX timers (as in `nolock demo`); each handler runs
//!   one RCU and one SRCU-fast section over the table, and one signal in four replaces a raw slot itself
//!   (allocate with `kmalloc_nolock`, retire with `kfree_*_nolock`) — from inside whatever the thread was doing,
//!   nolock calls and grace-period computations included.
//!
//! # What is checked (any failure makes the command exit non-zero)
//!
//! Every object carries a magic word, a tag and words derived from it, written before it is published.
//! - A reader that sees a wrong magic or a word that does not match the tag has seen an object that was
//!   freed (and reused, or overwritten by the allocator) inside its section: **torn object**.
//! - `RcuPtr` values are poisoned by their destructor, which runs only after the grace period: a reader that
//!   sees the poison has seen a **freed object**.
//! - Raw objects record, when retired, the grace-period state (RCU: completed grace periods `G`; SRCU-fast: a
//!   `get_state` cookie). A reader that read the object before it was unlinked and then, still inside its
//!   section, sees `G + 2` RCU grace periods completed (or the SRCU cookie polled done) has watched a grace
//!   period end while it was still reading: **grace period ended inside a section** (rcutorture's pipe check).
//! - At the end every slot is cleared, and after `rcu_barrier` and the SRCU barrier every `RcuPtr` value must
//!   have been dropped, every callback queued must have run, and nolock must count no object still allocated.
//! - nolock must print no report during the run (a refused free, a debug-mode finding), and the run must have
//!   exercised what it checks: the arena mapped (the command does not start otherwise and says why), every kind
//!   of object replaced at least once, every kind of reader thread and (with `--rate`) the handlers active.
//!
//! Handlers touch only atomics and nolock APIs (reads, `kmalloc_nolock`, `kfree_*_nolock`, `rcu_stats`,
//! `SrcuFast::{get_state, poll}`): no locks, no `std` allocation, no printing.
//!
//! The run itself (threads, storm, progress, table, verdict) is the shared runner of [`crate::scenario`]; this
//! file holds what is the scenario's own: the table of objects, the roles, the handlers' work and the checks.

use core::ptr::{self, NonNull};
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock::rcu::srcu::SrcuFast;
use nolock::rcu_ptr::{RcuPtr, Srcu};
use nolock::{Gfp, RcuHead, kfree_rcu_nolock, kfree_srcu_fast_nolock, kmalloc_nolock, rcu_read_lock};
use testkit::{Rng, pattern_word, sleep_wall};

use crate::fmt::{count, rate};
use crate::scenario::{Report, Run, RunArgs, Scenario, Slot, Thread};

/// Run the scenario and print its table; failure exit code on any error, on a nolock report, and on a run
/// that could not exercise what it checks (no arena, a kind of object never replaced, a kind of reader that
/// never read). `inject_bug` tests the checker: replaced raw objects are freed at once instead of after a
/// grace period (the run must fail).
pub fn run(args: &RunArgs, inject_bug: bool) -> ExitCode {
    crate::scenario::run(RcuScenario { inject_bug, ..RcuScenario::default() }, args)
}

/// `--inject-bug`: `retire_raw` frees with `kfree_nolock` at once.
static INJECT_BUG: AtomicBool = AtomicBool::new(false);

// ---------------------------------------------------------------------------------------------------------
// The table

/// The scenario's SRCU-fast domain.
static SRCU: SrcuFast = SrcuFast::new();

const PTR_SLOTS: usize = 8;
const RAW_SLOTS: usize = 16;

static RCU_PTRS: [RcuPtr<Obj>; PTR_SLOTS] = [const { RcuPtr::null() }; PTR_SLOTS];
static SRCU_PTRS: [RcuPtr<Obj, Srcu>; PTR_SLOTS] = [const { RcuPtr::null_srcu(&SRCU) }; PTR_SLOTS];
static RAW_RCU: [AtomicPtr<RawObj>; RAW_SLOTS] = [const { AtomicPtr::new(ptr::null_mut()) }; RAW_SLOTS];
static RAW_SRCU: [AtomicPtr<RawObj>; RAW_SLOTS] = [const { AtomicPtr::new(ptr::null_mut()) }; RAW_SLOTS];

const OBJ_MAGIC: u64 = 0x0B1E_C7ED_5EED_0001;
const RAW_MAGIC: u64 = 0x0B1E_C7ED_5EED_0002;
const POISON: u64 = 0xDEAD_F4EE_DEAD_F4EE;
const NOT_RETIRED: u64 = u64::MAX;

/// Word `i` of an object's pattern (the tag itself, word 0 of the stamp, is kept in its own field).
#[inline]
fn pattern(tag: u64, i: usize) -> u64 {
    pattern_word(tag, i + 1)
}

/// An `RcuPtr` value (64 bytes). All fields are atomics, so a reader racing with a (buggy) free reads defined
/// values.
struct Obj {
    magic: AtomicU64,
    tag: AtomicU64,
    words: [AtomicU64; 6],
}

/// `Obj`s created and dropped (every one is dropped once its grace period has ended, or at once when a publish
/// fails).
static OBJ_CREATED: AtomicU64 = AtomicU64::new(0);
static OBJ_DROPPED: AtomicU64 = AtomicU64::new(0);

impl Obj {
    fn new(tag: u64) -> Self {
        OBJ_CREATED.fetch_add(1, Ordering::Relaxed);
        Self {
            magic: AtomicU64::new(OBJ_MAGIC),
            tag: AtomicU64::new(tag),
            words: core::array::from_fn(|i| AtomicU64::new(pattern(tag, i))),
        }
    }
}

impl Drop for Obj {
    /// Runs on the grace-period worker after the grace period: check, then poison.
    fn drop(&mut self) {
        if check_words(&self.magic, OBJ_MAGIC, &self.tag, &self.words).is_err() {
            record(Err::CorruptAtFree, Ctx::Worker, Flav::Rcu);
        }
        self.magic.store(POISON, Ordering::Relaxed);
        for w in &self.words {
            w.store(POISON, Ordering::Relaxed);
        }
        OBJ_DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// A raw slot's object: 128 bytes from `kmalloc_nolock`, its head last (the offset path of `kfree_*_nolock`).
#[repr(C)]
struct RawObj {
    magic: AtomicU64,
    tag: AtomicU64,
    /// Grace-period state when it was retired (`NOT_RETIRED` while published).
    retired: AtomicU64,
    words: [AtomicU64; 11],
    head: RcuHead,
}

const _: () = assert!(core::mem::size_of::<RawObj>() == 128);

/// Allocate and initialise a raw object (any context). `None`: out of memory (counted).
fn alloc_raw(tag: u64, ctx: Ctx, flav: Flav) -> Option<NonNull<RawObj>> {
    let Some(p) = kmalloc_nolock(core::mem::size_of::<RawObj>(), Gfp::NONE) else {
        record(Err::Alloc, ctx, flav);
        return None;
    };
    let o = p.cast::<RawObj>();
    // SAFETY: a fresh 128-byte kmalloc object, 8-aligned.
    unsafe {
        o.as_ptr().write(RawObj {
            magic: AtomicU64::new(RAW_MAGIC),
            tag: AtomicU64::new(tag),
            retired: AtomicU64::new(NOT_RETIRED),
            words: core::array::from_fn(|i| AtomicU64::new(pattern(tag, i))),
            head: RcuHead::new(),
        })
    };
    Some(o)
}

/// Check an object's magic and words against its tag.
fn check_words(magic: &AtomicU64, want: u64, tag: &AtomicU64, words: &[AtomicU64]) -> Result<(), Err> {
    let m = magic.load(Ordering::Relaxed);
    let g = tag.load(Ordering::Relaxed);
    if m == POISON {
        return Err(Err::Freed);
    }
    if m != want {
        return Err(Err::Torn);
    }
    for (i, w) in words.iter().enumerate() {
        let v = w.load(Ordering::Relaxed);
        if v == POISON {
            return Err(Err::Freed);
        }
        if v != pattern(g, i) {
            return Err(Err::Torn);
        }
    }
    if tag.load(Ordering::Relaxed) != g {
        return Err(Err::Torn);
    }
    Ok(())
}

fn check_obj(o: Option<&Obj>, ctx: Ctx, flav: Flav) {
    if let Some(o) = o
        && let Err(e) = check_words(&o.magic, OBJ_MAGIC, &o.tag, &o.words)
    {
        record(e, ctx, flav);
    }
}

/// Check a raw object; with `end`, also the grace-period state it was retired at (see the module docs).
fn check_raw(o: Option<&RawObj>, ctx: Ctx, flav: Flav, end: bool) {
    let Some(o) = o else { return };
    if let Err(e) = check_words(&o.magic, RAW_MAGIC, &o.tag, &o.words) {
        record(e, ctx, flav);
        return;
    }
    if !end {
        return;
    }
    // Acquire: pairs with the Release store in `replace_raw`.
    let r = o.retired.load(Ordering::Acquire);
    if r == NOT_RETIRED {
        return;
    }
    let ended = match flav {
        Flav::Rcu => nolock::rcu_stats().grace_periods >= r.wrapping_add(2),
        Flav::Srcu => SRCU.poll(r),
    };
    if ended {
        record(Err::GpEnded, ctx, flav);
    }
}

/// Load raw slot `i` inside the read-side section `_guard`; the reference lives as long as the guard.
///
/// # Safety
/// `_guard` is a guard of the flavour that retires `slots`' objects (RCU for `RAW_RCU`, `SRCU` for
/// `RAW_SRCU`).
unsafe fn load_raw<'g, G>(_guard: &'g G, slots: &[AtomicPtr<RawObj>; RAW_SLOTS], i: usize) -> Option<&'g RawObj> {
    // Acquire: pairs with the AcqRel swap that published the object.
    let p = slots[i % RAW_SLOTS].load(Ordering::Acquire);
    // SAFETY: published objects are freed only after a grace period that follows their unlinking; the caller's
    // section began before that grace period could end.
    unsafe { p.as_ref() }
}

/// Replace raw slot `i` of `flav` with a new object and retire the old one (any context). Returns whether
/// an object was retired.
fn replace_raw(flav: Flav, i: usize, tag: u64, ctx: Ctx) -> bool {
    let slots = match flav {
        Flav::Rcu => &RAW_RCU,
        Flav::Srcu => &RAW_SRCU,
    };
    let Some(new) = alloc_raw(tag, ctx, flav) else { return false };
    let old = slots[i % RAW_SLOTS].swap(new.as_ptr(), Ordering::AcqRel);
    retire_raw(flav, old)
}

/// Mark an unlinked raw object with the grace-period state and retire it (any context).
fn retire_raw(flav: Flav, old: *mut RawObj) -> bool {
    let Some(old) = NonNull::new(old) else { return false };
    // SAFETY: we unlinked `old` (our swap returned it), so nobody else retires it; it stays allocated until the
    // retire below has waited a grace period.
    let o = unsafe { old.as_ref() };
    let mark = match flav {
        Flav::Rcu => nolock::rcu_stats().grace_periods,
        Flav::Srcu => SRCU.get_state(),
    };
    o.retired.store(mark, Ordering::Release);
    if INJECT_BUG.load(Ordering::Relaxed) {
        // SAFETY: deliberately early (readers may still hold `old`), to show that the checks catch it. The
        // memory stays mapped (it is part of nolock's arena, never unmapped) and readers only use atomics on it.
        unsafe { nolock::kfree_nolock(old.as_ptr().cast()) };
        return true;
    }
    let head = NonNull::from(&o.head);
    // SAFETY: `old` came from kmalloc_nolock, its head lies inside it, it is unlinked and we never touch it
    // again; readers that still hold it are inside sections that the grace period waits for.
    unsafe {
        match flav {
            Flav::Rcu => kfree_rcu_nolock(old.as_ptr().cast(), head),
            Flav::Srcu => kfree_srcu_fast_nolock(&SRCU, old.as_ptr().cast(), head),
        }
    }
    true
}

// ---------------------------------------------------------------------------------------------------------
// Errors

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Err {
    /// A poisoned (`RcuPtr`-dropped) object inside a section.
    Freed = 0,
    /// Wrong magic or pattern inside a section.
    Torn = 1,
    /// A grace period that had to wait for the reader ended while it was inside.
    GpEnded = 2,
    /// `kmalloc_nolock` failed.
    Alloc = 3,
    /// An `RcuPtr` value was already damaged when its destructor ran.
    CorruptAtFree = 4,
}

const N_ERR: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Thread = 0,
    Handler = 1,
    Worker = 2,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flav {
    Rcu = 0,
    Srcu = 1,
}

static ERRORS: [AtomicU64; N_ERR] = [const { AtomicU64::new(0) }; N_ERR];
/// The first error: `err | ctx << 4 | flav << 8`, plus one (0: none yet).
static FIRST_ERROR: AtomicU64 = AtomicU64::new(0);

/// Count an error (any context).
fn record(e: Err, ctx: Ctx, flav: Flav) {
    ERRORS[e as usize].fetch_add(1, Ordering::Relaxed);
    let code = (e as u64 | (ctx as u64) << 4 | (flav as u64) << 8) + 1;
    let _ = FIRST_ERROR.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
}

fn describe_first_error() -> Option<String> {
    let c = FIRST_ERROR.load(Ordering::Relaxed).checked_sub(1)?;
    let e = match c & 0xf {
        0 => "freed (poisoned) object seen",
        1 => "torn object seen",
        2 => "grace period ended inside a section",
        3 => "allocation failed",
        _ => "RcuPtr value damaged before its destructor",
    };
    let ctx = match (c >> 4) & 0xf {
        0 => "a thread",
        1 => "a signal handler",
        _ => "the grace-period worker",
    };
    let flav = if (c >> 8) & 1 == 0 { "RCU" } else { "SRCU-fast" };
    Some(format!("{e} ({flav}, in {ctx})"))
}

fn total_errors() -> u64 {
    ERRORS.iter().map(|e| e.load(Ordering::Relaxed)).sum()
}

// ---------------------------------------------------------------------------------------------------------
// Threads

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Updater,
    RcuReader,
    SrcuReader,
}

/// Kinds of replacement, for the tallies.
const K_PTR_RCU: usize = 0;
const K_PTR_SRCU: usize = 1;
const K_RAW_RCU: usize = 2;
const K_RAW_SRCU: usize = 3;

/// Per-thread state shared with its signal handlers and the main thread.
#[repr(C, align(128))]
struct Worker {
    id: usize,
    role: Role,
    // Written only by the thread (plain stores of its local tallies).
    t_reads: AtomicU64,
    t_sleeps: AtomicU64,
    t_replaced: [AtomicU64; 4],
    t_syncs: AtomicU64,
    // Written by the thread's handlers (RMW: the second signal's handler can interrupt the first).
    h_reads: AtomicU64,
    h_replaced: [AtomicU64; 2],
    h_seq: AtomicU64,
}

impl Worker {
    fn new(id: usize, role: Role) -> Self {
        Self {
            id,
            role,
            t_reads: AtomicU64::new(0),
            t_sleeps: AtomicU64::new(0),
            t_replaced: [const { AtomicU64::new(0) }; 4],
            t_syncs: AtomicU64::new(0),
            h_reads: AtomicU64::new(0),
            h_replaced: [const { AtomicU64::new(0) }; 2],
            h_seq: AtomicU64::new(0),
        }
    }
}

/// A unique tag: thread (or handler) id in the top bits, a sequence below.
fn make_tag(origin: usize, handler: bool, seq: u64) -> u64 {
    ((origin as u64) << 52) | ((handler as u64) << 51) | (seq & ((1 << 51) - 1))
}

/// Spin `n` short steps inside a section.
#[inline]
fn dwell(n: u64) {
    for i in 0..n {
        black_box(i);
    }
}

fn rcu_reader(w: &Worker, t: &Thread<'_>) {
    let mut rng = Rng::new(w.id as u64 + 1);
    let mut reads = 0u64;
    while t.running() {
        for _ in 0..64 {
            let r = rng.next_u64();
            let g = rcu_read_lock();
            let a = RCU_PTRS[(r % PTR_SLOTS as u64) as usize].load(&g);
            // SAFETY: `g` is an RCU guard and RAW_RCU's objects are retired with kfree_rcu_nolock.
            let b = unsafe { load_raw(&g, &RAW_RCU, (r >> 8) as usize) };
            check_obj(a, Ctx::Thread, Flav::Rcu);
            check_raw(b, Ctx::Thread, Flav::Rcu, false);
            if (r >> 16) & 7 == 0 {
                // A nested section over another slot.
                let g2 = rcu_read_lock();
                let c = RCU_PTRS[((r >> 20) % PTR_SLOTS as u64) as usize].load(&g2);
                check_obj(c, Ctx::Thread, Flav::Rcu);
                drop(g2);
            }
            dwell((r >> 24) & 255);
            check_obj(a, Ctx::Thread, Flav::Rcu);
            check_raw(b, Ctx::Thread, Flav::Rcu, true);
            drop(g);
            reads += 1;
        }
        w.t_reads.store(reads, Ordering::Relaxed);
    }
}

fn srcu_reader(w: &Worker, t: &Thread<'_>) {
    let mut rng = Rng::new(w.id as u64 + 1);
    let (mut reads, mut sleeps) = (0u64, 0u64);
    while t.running() {
        for _ in 0..64 {
            let r = rng.next_u64();
            let g = SRCU.read_lock_fast();
            let a = SRCU_PTRS[(r % PTR_SLOTS as u64) as usize].load(&g);
            // SAFETY: `g` is a guard of SRCU and RAW_SRCU's objects are retired with kfree_srcu_fast_nolock(&SRCU).
            let b = unsafe { load_raw(&g, &RAW_SRCU, (r >> 8) as usize) };
            check_obj(a, Ctx::Thread, Flav::Srcu);
            check_raw(b, Ctx::Thread, Flav::Srcu, false);
            if (r >> 16) & 31 == 0 {
                // Sleep inside the section: SRCU-fast grace periods must wait for us.
                sleep_wall(Duration::from_micros(20 + (r >> 24) % 200));
                sleeps += 1;
            } else {
                dwell((r >> 24) & 255);
            }
            check_obj(a, Ctx::Thread, Flav::Srcu);
            check_raw(b, Ctx::Thread, Flav::Srcu, true);
            drop(g);
            reads += 1;
        }
        w.t_reads.store(reads, Ordering::Relaxed);
        w.t_sleeps.store(sleeps, Ordering::Relaxed);
    }
}

fn updater(w: &Worker, t: &Thread<'_>) {
    let mut rng = Rng::new(w.id as u64 + 1);
    let mut seq = 0u64;
    let mut replaced = [0u64; 4];
    let mut syncs = 0u64;
    while t.running() {
        for _ in 0..16 {
            let r = rng.next_u64();
            seq += 1;
            let tag = make_tag(w.id, false, seq);
            let slot = (r >> 8) as usize;
            let kind = (r % 4) as usize;
            let done = match kind {
                K_PTR_RCU => publish(&RCU_PTRS[slot % PTR_SLOTS], tag, Flav::Rcu),
                K_PTR_SRCU => publish(&SRCU_PTRS[slot % PTR_SLOTS], tag, Flav::Srcu),
                K_RAW_RCU => replace_raw(Flav::Rcu, slot, tag, Ctx::Thread),
                _ => replace_raw(Flav::Srcu, slot, tag, Ctx::Thread),
            };
            replaced[kind] += done as u64;
        }
        if seq.is_multiple_of(4096) {
            // The blocking path too, now and then.
            if (seq / 4096).is_multiple_of(2) {
                nolock::synchronize_rcu();
            } else {
                SRCU.synchronize();
            }
            syncs += 1;
        }
        for (c, &v) in w.t_replaced.iter().zip(&replaced) {
            c.store(v, Ordering::Relaxed);
        }
        w.t_syncs.store(syncs, Ordering::Relaxed);
    }
}

/// Publish a new `Obj` in `p`; the old value is retired by `publish`.
fn publish<F: nolock::rcu_ptr::Flavor>(p: &RcuPtr<Obj, F>, tag: u64, flav: Flav) -> bool {
    match p.publish(Obj::new(tag)) {
        Ok(()) => true,
        Err(obj) => {
            drop(obj);
            record(Err::Alloc, Ctx::Thread, flav);
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Driver

/// Totals over all threads and handlers.
#[derive(Default, Clone, Copy)]
struct Totals {
    rcu_reads: u64,
    srcu_reads: u64,
    sleeps: u64,
    handler_reads: u64,
    replaced: [u64; 4],
    handler_replaced: [u64; 2],
    syncs: u64,
}

impl Totals {
    fn reads(&self) -> u64 {
        self.rcu_reads + self.srcu_reads + self.handler_reads
    }

    fn replaced(&self) -> u64 {
        self.replaced.iter().sum::<u64>() + self.handler_replaced.iter().sum::<u64>()
    }
}

fn totals(workers: &[Slot<Worker>]) -> Totals {
    let mut t = Totals::default();
    for w in workers {
        let reads = w.t_reads.load(Ordering::Relaxed);
        match w.role {
            Role::RcuReader => t.rcu_reads += reads,
            Role::SrcuReader => t.srcu_reads += reads,
            Role::Updater => {}
        }
        t.sleeps += w.t_sleeps.load(Ordering::Relaxed);
        t.handler_reads += w.h_reads.load(Ordering::Relaxed);
        for (a, b) in t.replaced.iter_mut().zip(&w.t_replaced) {
            *a += b.load(Ordering::Relaxed);
        }
        for (a, b) in t.handler_replaced.iter_mut().zip(&w.h_replaced) {
            *a += b.load(Ordering::Relaxed);
        }
        t.syncs += w.t_syncs.load(Ordering::Relaxed);
    }
    t
}

/// Objects nolock counts as allocated (all caches and page runs).
fn nolock_live_objects() -> i64 {
    let s = nolock::stats::snapshot();
    let t = s.total();
    (t.allocs + s.large.allocs).wrapping_sub(t.frees + s.large.frees) as i64
}

fn pending(s: &nolock::GpStats) -> u64 {
    s.callbacks_queued.saturating_sub(s.callbacks_invoked)
}

/// Split `n` threads into roles: a third updaters (at least one), half the rest SRCU-fast readers, the others
/// RCU readers.
fn roles(n: usize) -> Vec<Role> {
    let updaters = (n / 3).max(1);
    let srcu = ((n - updaters) / 2).max(1);
    let rcu = n - updaters - srcu;
    let mut v = Vec::with_capacity(n);
    // Interleaved, so that any prefix of the threads has every role.
    let (mut u, mut s, mut r) = (updaters, srcu, rcu);
    while v.len() < n {
        if u > 0 {
            v.push(Role::Updater);
            u -= 1;
        }
        if r > 0 {
            v.push(Role::RcuReader);
            r -= 1;
        }
        if s > 0 {
            v.push(Role::SrcuReader);
            s -= 1;
        }
    }
    v
}

/// Fill every slot, so that readers find objects from the start.
fn populate() {
    for (i, p) in RCU_PTRS.iter().enumerate() {
        publish(p, make_tag(127, false, i as u64), Flav::Rcu);
    }
    for (i, p) in SRCU_PTRS.iter().enumerate() {
        publish(p, make_tag(127, false, 100 + i as u64), Flav::Srcu);
    }
    for i in 0..RAW_SLOTS {
        replace_raw(Flav::Rcu, i, make_tag(127, false, 200 + i as u64), Ctx::Thread);
        replace_raw(Flav::Srcu, i, make_tag(127, false, 300 + i as u64), Ctx::Thread);
    }
}

/// Retire every object still in the table. Returns the raw objects retired.
fn clear_table() -> u64 {
    for p in &RCU_PTRS {
        p.clear();
    }
    for p in &SRCU_PTRS {
        p.clear();
    }
    let mut n = 0;
    for s in &RAW_RCU {
        n += retire_raw(Flav::Rcu, s.swap(ptr::null_mut(), Ordering::AcqRel)) as u64;
    }
    for s in &RAW_SRCU {
        n += retire_raw(Flav::Srcu, s.swap(ptr::null_mut(), Ordering::AcqRel)) as u64;
    }
    n
}

/// The scenario's state (main thread).
#[derive(Default)]
struct RcuScenario {
    inject_bug: bool,
    roles: Vec<Role>,
    live_before: i64,
    rcu0: nolock::GpStats,
    srcu0: nolock::GpStats,
    rcu1: nolock::GpStats,
    srcu1: nolock::GpStats,
    max_pending: u64,
    raw_cleared: u64,
    drain: Duration,
}

impl RcuScenario {
    fn count_role(&self, r: Role) -> usize {
        self.roles.iter().filter(|&&x| x == r).count()
    }
}

impl Scenario for RcuScenario {
    type Worker = Worker;
    type Totals = Totals;
    const NAME: &'static str = "rcu";
    const THREAD_NAME: &'static str = "rcu";
    const IN_HANDLER: &'static str = "reader";

    fn workers(&self, n: usize) -> Vec<Worker> {
        roles(n).into_iter().enumerate().map(|(i, r)| Worker::new(i, r)).collect()
    }

    fn describe(&self, n: usize) -> String {
        let roles = roles(n);
        let count_role = |r: Role| roles.iter().filter(|&&x| x == r).count();
        format!(
            "{n} threads ({} updaters, {} RCU readers, {} SRCU-fast readers that sleep in 1 section of 32)",
            count_role(Role::Updater),
            count_role(Role::RcuReader),
            count_role(Role::SrcuReader),
        )
    }

    fn prepare(&mut self, _arena: u64, workers: &[Slot<Worker>]) {
        self.roles = workers.iter().map(|w| w.role).collect();
        INJECT_BUG.store(self.inject_bug, Ordering::Relaxed);
        self.live_before = nolock_live_objects();
        (self.rcu0, self.srcu0) = (nolock::rcu_stats(), SRCU.stats());
        populate();
    }

    fn thread(w: &Worker, _all: &[Slot<Worker>], t: &mut Thread<'_>) {
        match w.role {
            Role::Updater => updater(w, t),
            Role::RcuReader => rcu_reader(w, t),
            Role::SrcuReader => srcu_reader(w, t),
        }
    }

    /// One RCU and one SRCU-fast section over the table, and one signal in four replaces a raw slot. Atomics
    /// and nolock only.
    fn on_signal(w: &Worker) {
        let seq = w.h_seq.fetch_add(1, Ordering::Relaxed);
        let mut rng = Rng::new(seq ^ ((w.id as u64) << 56) ^ 0x5EED);
        let r = rng.next_u64();
        {
            let g = rcu_read_lock();
            let a = RCU_PTRS[(r % PTR_SLOTS as u64) as usize].load(&g);
            // SAFETY: `g` is an RCU guard and RAW_RCU's objects are retired with kfree_rcu_nolock.
            let b = unsafe { load_raw(&g, &RAW_RCU, (r >> 8) as usize) };
            check_obj(a, Ctx::Handler, Flav::Rcu);
            check_raw(b, Ctx::Handler, Flav::Rcu, false);
            dwell((r >> 16) & 63);
            check_obj(a, Ctx::Handler, Flav::Rcu);
            check_raw(b, Ctx::Handler, Flav::Rcu, true);
        }
        let r = rng.next_u64();
        {
            let g = SRCU.read_lock_fast();
            let a = SRCU_PTRS[(r % PTR_SLOTS as u64) as usize].load(&g);
            // SAFETY: `g` is a guard of SRCU and RAW_SRCU's objects are retired with kfree_srcu_fast_nolock(&SRCU).
            let b = unsafe { load_raw(&g, &RAW_SRCU, (r >> 8) as usize) };
            check_obj(a, Ctx::Handler, Flav::Srcu);
            check_raw(b, Ctx::Handler, Flav::Srcu, false);
            dwell((r >> 16) & 63);
            check_obj(a, Ctx::Handler, Flav::Srcu);
            check_raw(b, Ctx::Handler, Flav::Srcu, true);
        }
        w.h_reads.fetch_add(2, Ordering::Relaxed);
        let r = rng.next_u64();
        if r & 3 == 0 {
            let flav = if (r >> 2) & 1 == 0 { Flav::Rcu } else { Flav::Srcu };
            if replace_raw(flav, (r >> 8) as usize, make_tag(w.id, true, seq), Ctx::Handler) {
                w.h_replaced[flav as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn totals(workers: &[Slot<Worker>]) -> Totals {
        totals(workers)
    }

    fn tick(&mut self, cur: &Totals, last: &Totals, dt_s: f64) -> String {
        let (rs, ss) = (nolock::rcu_stats(), SRCU.stats());
        let pend = pending(&rs) + pending(&ss);
        self.max_pending = self.max_pending.max(pend);
        format!(
            "reads {} | replaced {} | GPs {} + {} | pending {} | errors {}",
            rate(cur.reads().saturating_sub(last.reads()) as f64 / dt_s),
            rate(cur.replaced().saturating_sub(last.replaced()) as f64 / dt_s),
            count(rs.grace_periods - self.rcu0.grace_periods),
            count(ss.grace_periods - self.srcu0.grace_periods),
            count(pend),
            total_errors(),
        )
    }

    fn finish(&mut self, _workers: &[Slot<Worker>]) {
        // Retire what is left, wait for every callback.
        self.raw_cleared = clear_table();
        let t_drain = Instant::now();
        nolock::rcu_barrier();
        SRCU.barrier();
        self.drain = t_drain.elapsed();
        (self.rcu1, self.srcu1) = (nolock::rcu_stats(), SRCU.stats());
    }

    fn report(&mut self, t: &Totals, run: &Run, out: &mut Report) {
        let (rcu0, srcu0, rcu1, srcu1) = (&self.rcu0, &self.srcu0, &self.rcu1, &self.srcu1);
        let leaked = nolock_live_objects() - self.live_before;
        let (created, dropped) = (OBJ_CREATED.load(Ordering::Relaxed), OBJ_DROPPED.load(Ordering::Relaxed));
        let never_dropped = created.saturating_sub(dropped);
        let not_run = pending(rcu1) + pending(srcu1);
        let secs = run.secs;
        let errs: Vec<u64> = ERRORS.iter().map(|e| e.load(Ordering::Relaxed)).collect();
        let replaced = t.replaced();

        let table = &mut out.table;
        table.head("reads (read-side sections, each checks 2 objects twice)");
        table.row("RCU reader threads", count(t.rcu_reads), "rcu_read_lock, 1 in 8 with a nested section");
        table.row(
            "SRCU-fast reader threads",
            count(t.srcu_reads),
            format!("read_lock_fast; {} of them slept 20–220 µs inside the section", count(t.sleeps)),
        );
        table.row("signal handlers", count(t.handler_reads), "one RCU and one SRCU-fast section per signal");
        table.row("  per second", rate(t.reads() as f64 / secs), "all readers");
        table.head("objects replaced and retired");
        table.row("RcuPtr, RCU", count(t.replaced[K_PTR_RCU]), "publish: old value retired with call_rcu_nolock");
        table.row("RcuPtr, SRCU-fast", count(t.replaced[K_PTR_SRCU]), "publish: old value retired with call_srcu");
        let (hr, hs) = (t.handler_replaced[Flav::Rcu as usize], t.handler_replaced[Flav::Srcu as usize]);
        table.row(
            "raw, kfree_rcu_nolock",
            count(t.replaced[K_RAW_RCU] + hr),
            format!("128 B kmalloc_nolock objects (head at offset 112); {} by signal handlers", count(hr)),
        );
        table.row(
            "raw, kfree_srcu_fast_nolock",
            count(t.replaced[K_RAW_SRCU] + hs),
            format!("same, SRCU-fast domain; {} by signal handlers", count(hs)),
        );
        table.row("  per second", rate(replaced as f64 / secs), "all updaters and handlers");
        table.row("synchronize calls", count(t.syncs), "synchronize_rcu / SrcuFast::synchronize by updaters");
        table.row("retired at the end", count(self.raw_cleared + 2 * PTR_SLOTS as u64), "every slot cleared");
        table.head("grace periods and callbacks");
        let (gr, gs) = (rcu1.grace_periods - rcu0.grace_periods, srcu1.grace_periods - srcu0.grace_periods);
        table.row("grace periods RCU", count(gr), format!("{}, barriers at the end included", rate(gr as f64 / secs)));
        table.row("grace periods SRCU-fast", count(gs), rate(gs as f64 / secs));
        table.row(
            "callbacks run RCU",
            count(rcu1.callbacks_invoked - rcu0.callbacks_invoked),
            "one per RcuPtr value; one per kfree pointer block (up to 508 objects)",
        );
        table.row("callbacks run SRCU-fast", count(srcu1.callbacks_invoked - srcu0.callbacks_invoked), "same");
        table.row(
            "peak pending RCU",
            count(rcu1.peak_pending),
            "largest backlog of callbacks the grace-period worker saw",
        );
        table.row("peak pending SRCU-fast", count(srcu1.peak_pending), "same");
        table.row("peak pending sampled", count(self.max_pending), "queued − invoked, both domains, every 100 ms");
        table.row("barrier drain", format!("{:.2} ms", self.drain.as_secs_f64() * 1e3), "rcu_barrier + SRCU barrier");
        table.head("errors (each must be 0)");
        table.row("freed object seen", count(errs[Err::Freed as usize]), "poisoned RcuPtr value inside a section");
        table.row("torn object seen", count(errs[Err::Torn as usize]), "magic or pattern changed inside a section");
        table.row(
            "grace period ended inside",
            count(errs[Err::GpEnded as usize]),
            "retired object's grace period completed while a reader still held it",
        );
        table.row("allocation failures", count(errs[Err::Alloc as usize]), "kmalloc_nolock / publish returned None");
        table.row(
            "damaged before destructor",
            count(errs[Err::CorruptAtFree as usize]),
            "RcuPtr value changed while published",
        );
        table.row("RcuPtr values not dropped", count(never_dropped), "after rcu_barrier + SRCU barrier");
        table.row("callbacks not run", count(not_run), "queued − invoked after the barriers");
        table.row("nolock objects leaked", leaked.to_string(), "nolock's count of live objects, end − start");

        let failed = &mut out.failed;
        let read_errors = total_errors();
        if read_errors > 0 {
            failed.push(format!(
                "{read_errors} error(s); first: {}",
                describe_first_error().unwrap_or_else(|| "?".into())
            ));
        }
        if never_dropped > 0 {
            failed.push(format!("{never_dropped} RcuPtr value(s) never dropped after the barriers"));
        }
        if not_run > 0 {
            failed.push(format!("{not_run} callback(s) queued but not run after the barriers"));
        }
        if leaked != 0 {
            failed.push(format!("nolock counts {leaked} object(s) more allocated than at the start"));
        }
        // A run that could not exercise the grace periods proves nothing: it must not pass.
        let kinds = [
            ("RcuPtr, RCU", t.replaced[K_PTR_RCU]),
            ("RcuPtr, SRCU-fast", t.replaced[K_PTR_SRCU]),
            ("raw, kfree_rcu_nolock", t.replaced[K_RAW_RCU] + t.handler_replaced[Flav::Rcu as usize]),
            ("raw, kfree_srcu_fast_nolock", t.replaced[K_RAW_SRCU] + t.handler_replaced[Flav::Srcu as usize]),
        ];
        for (what, k) in kinds {
            if k == 0 {
                failed.push(format!("no '{what}' object was replaced: that retire path was not exercised"));
            }
        }
        let readers = [
            ("RCU reader threads", self.count_role(Role::RcuReader), t.rcu_reads),
            ("SRCU-fast reader threads", self.count_role(Role::SrcuReader), t.srcu_reads),
        ];
        for (who, threads, reads) in readers {
            if threads > 0 && reads == 0 {
                failed.push(format!("the {who} made no read-side section"));
            }
        }
        out.pass = format!(
            "{} read-side sections, {} objects retired; no reader saw a freed object, every retired object was \
             freed, no nolock report",
            count(t.reads()),
            count(replaced)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_split() {
        let r = roles(3);
        assert_eq!(r.iter().filter(|&&x| x == Role::Updater).count(), 1);
        assert_eq!(r.iter().filter(|&&x| x == Role::RcuReader).count(), 1);
        assert_eq!(r.iter().filter(|&&x| x == Role::SrcuReader).count(), 1);
        let r = roles(6);
        assert_eq!(r.len(), 6);
        assert_eq!(r.iter().filter(|&&x| x == Role::Updater).count(), 2);
        assert_eq!(r.iter().filter(|&&x| x == Role::SrcuReader).count(), 2);
        assert_eq!(roles(64).len(), 64);
    }

    #[test]
    fn patterns_check() {
        let o = Obj::new(42);
        assert!(check_words(&o.magic, OBJ_MAGIC, &o.tag, &o.words).is_ok());
        o.words[3].store(7, Ordering::Relaxed);
        assert_eq!(check_words(&o.magic, OBJ_MAGIC, &o.tag, &o.words), Err(Err::Torn));
        o.magic.store(POISON, Ordering::Relaxed);
        assert_eq!(check_words(&o.magic, OBJ_MAGIC, &o.tag, &o.words), Err(Err::Freed));
        // The destructor would count a damaged value: repair it first.
        o.magic.store(OBJ_MAGIC, Ordering::Relaxed);
        o.words[3].store(pattern(42, 3), Ordering::Relaxed);
    }
}
