//! The "any context" client types of the library under a signal at *every instruction*: x86-64 single-stepping
//! (the trap flag raises SIGTRAP after each instruction of the stepped code, as in `single_step.rs`) with a
//! handler that uses the same objects the stepped code is using:
//!
//! 1. the MPSC queues: the stepped code pushes into and pops from a `BoundedQueue`, then an `UnboundedQueue` (it
//!    is the consumer), while the handler pushes into the same queue;
//! 2. `RcuPtr`: the stepped code updates a counter, swaps and compare-exchanges a slot and holds the values it
//!    read across many instructions, while the handler reads both, checks what the stepped code holds, and
//!    compare-exchanges both;
//! 3. `TypedCache`/`CacheBox` and `NBox`: allocated and dropped in both contexts from the same cache and class
//!    (and, by the handler, from another class);
//! 4. `HybridAlloc<System>` (this binary's global allocator): normal-context allocations, reallocations and
//!    frees (glibc's) stepped while the handler, marked with `HandlerGuard`, allocates, reallocates and frees
//!    through the same allocator — nolock's memory, never glibc's — and frees glibc blocks (deferred).
//!
//! Every trap handler marks itself with `HandlerGuard` (as a real handler under a `HybridAlloc` must), so
//! whatever it allocates comes from nolock. The handler runs at every instruction (or every third, each phase in
//! turn). Where acting at every instruction would fill a queue for good, keep a compare-exchange from ever
//! succeeding (the stepped code's push would never find room, its `update` would retry for ever) or defer frees
//! into the stepped code's busy list faster than it can drain them, the handler takes that action at a
//! pseudo-random subset of its runs and only reads, checks, or uses another size class at the others; a coverage
//! table of the interrupted instruction addresses checks that such actions are spread over the stepped code
//! (not in step with one of its loops). A pass that makes no progress (a livelock under the stepping schedule)
//! stops stepping after a bound and fails, naming the instructions it was looping on.
//!
//! What must hold: nothing is lost, duplicated or damaged (patterns checked in both contexts), queue items come
//! out in each producer's order, a bounded queue refuses a push only when full, no value is freed while a reader
//! holds it and each retired value is dropped exactly once, no update is lost, no address is live twice, handler
//! memory comes from nolock's arena, every free goes to the allocator that owns the block, and nolock reports
//! nothing.

#![cfg(target_arch = "x86_64")]

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, compiler_fence};

use nolock::hybrid::{HandlerGuard, HybridAlloc};
use nolock::queue::{BoundedQueue, UnboundedQueue};
use nolock::{CacheBox, NBox, RcuPtr, TypedCache, rcu_barrier, rcu_read_lock};
use testkit::{pattern_word, splitmix64};

#[global_allocator]
static A: HybridAlloc<System> = HybridAlloc::new(System);

static TRAPS: AtomicU64 = AtomicU64::new(0);
/// The handler acts at trap numbers `PHASE (mod EVERY)`.
static EVERY: AtomicU64 = AtomicU64::new(1);
static PHASE: AtomicU64 = AtomicU64::new(0);
static ACTED: AtomicU64 = AtomicU64::new(0);
/// What the handler does: one of the `MODE_*` constants.
static MODE: AtomicU8 = AtomicU8::new(MODE_NONE);
const MODE_NONE: u8 = 0;
const MODE_QUEUE: u8 = 1;
const MODE_RCU: u8 = 2;
const MODE_CACHE: u8 = 3;
const MODE_HYBRID: u8 = 4;

/// The trap count when the current pass began, and the most traps a pass may take: beyond, the handler stops
/// the stepping and sets `RUNAWAY` (a pass takes well under a third of this).
static PASS_START: AtomicU64 = AtomicU64::new(0);
const RUNAWAY_TRAPS: u64 = 1_000_000;
static RUNAWAY: AtomicBool = AtomicBool::new(false);

/// Tests here take turns: the trap handler and its counters are process-wide.
static TURN: Mutex<()> = Mutex::new(());

/// Tags of items and values made by the handler (the stepped code's have this bit clear).
const H_BIT: u64 = 1 << 40;

extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // What a handler under a `HybridAlloc` global allocator must do first: anything it allocates now comes
    // from nolock, never from glibc's malloc (which the stepped code may be in the middle of).
    let _mark = HandlerGuard::enter();
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted context.
    if !unsafe { testkit::step::still_stepping(ctx) } {
        return;
    }
    // SAFETY: as above.
    let uc = unsafe { &*(ctx as *const libc::ucontext_t) };
    let n = TRAPS.fetch_add(1, Ordering::Relaxed);
    if n.wrapping_sub(PASS_START.load(Ordering::Relaxed)) > RUNAWAY_TRAPS {
        // The stepped code is not getting anywhere: stop stepping (the test then fails) rather than hang.
        RUNAWAY.store(true, Ordering::Relaxed);
        // SAFETY: the handler's own context.
        unsafe { testkit::step::stop_in_handler(ctx) };
        return;
    }
    let every = EVERY.load(Ordering::Relaxed);
    if n % every != PHASE.load(Ordering::Relaxed) {
        return;
    }
    ACTED.fetch_add(1, Ordering::Relaxed);
    let (chance, acted) = match MODE.load(Ordering::Relaxed) {
        MODE_QUEUE => queue_trap(n, every),
        MODE_RCU => rcu_trap(n, every),
        MODE_CACHE => cache_trap(n, every),
        MODE_HYBRID => (Chance::ALWAYS, hybrid_trap(n, every)),
        _ => (Chance(0), false),
    };
    coverage_note(uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize, chance, acted);
}

/// The probability that a handler run takes its rationed action, in units of 2^-16.
#[derive(Clone, Copy)]
struct Chance(u64);

impl Chance {
    const ALWAYS: Chance = Chance(1 << 16);

    /// The chance of [`gate`]`(_, _, one_in, every)`.
    fn of(one_in: u64, every: u64) -> Self {
        Self((every << 16) / one_in)
    }
}

/// Whether the handler takes a rationed action at trap `n`: in about one run in `one_in / every` (so the rate
/// per stepped instruction is the same in every pass), pseudo-random in the trap number. Rationed: acting at
/// every instruction would fill a queue for good, keep the stepped code's compare-exchange from succeeding, or
/// bury it in deferred frees.
fn gate(n: u64, salt: u64, one_in: u64, every: u64) -> bool {
    splitmix64(n ^ salt) % one_in < every
}

/// Turns the trap flag off when dropped (also when a stepped section unwinds).
struct Stepping;

impl Stepping {
    #[inline(never)]
    fn start() -> Self {
        testkit::step::start();
        Stepping
    }
}

impl Drop for Stepping {
    #[inline(never)]
    fn drop(&mut self) {
        // The next trap sees this and clears the flag.
        testkit::step::stop();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Coverage: for each interrupted instruction address, how many rationed actions the handler could be expected
// to take there (the sum of their chances) and how many it took. With an unbiased gate, an address where two
// were expected misses out with probability e^-2 (14%); far more misses mean the actions avoid part of the
// stepped code (a gate in step with a loop).
// ---------------------------------------------------------------------------------------------------------------

const COV: usize = 1 << 14;
static COV_RIP: [AtomicUsize; COV] = [const { AtomicUsize::new(0) }; COV];
static COV_EXPECTED: [AtomicU64; COV] = [const { AtomicU64::new(0) }; COV];
static COV_ACTS: [AtomicU32; COV] = [const { AtomicU32::new(0) }; COV];
static COV_VISITS: [AtomicU32; COV] = [const { AtomicU32::new(0) }; COV];
static COV_FULL: AtomicU64 = AtomicU64::new(0);
/// Expected actions (in units of 2^-16) that make an address "hot".
const COV_HOT: u64 = 2 << 16;

fn coverage_note(rip: usize, chance: Chance, acted: bool) {
    let mut i = (rip as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) as usize >> (64 - 14);
    for _ in 0..256 {
        let k = COV_RIP[i].load(Ordering::Relaxed);
        if k == 0 {
            COV_RIP[i].store(rip, Ordering::Relaxed);
        }
        if k == 0 || k == rip {
            COV_VISITS[i].fetch_add(1, Ordering::Relaxed);
            COV_EXPECTED[i].fetch_add(chance.0, Ordering::Relaxed);
            if acted {
                COV_ACTS[i].fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        i = (i + 1) % COV;
    }
    COV_FULL.fetch_add(1, Ordering::Relaxed);
}

fn coverage_reset() {
    for i in 0..COV {
        COV_RIP[i].store(0, Ordering::Relaxed);
        COV_EXPECTED[i].store(0, Ordering::Relaxed);
        COV_ACTS[i].store(0, Ordering::Relaxed);
        COV_VISITS[i].store(0, Ordering::Relaxed);
    }
    COV_FULL.store(0, Ordering::Relaxed);
}

/// (addresses seen, hot addresses, hot addresses that saw the action at least once).
fn coverage_summary() -> (usize, usize, usize) {
    let (mut seen, mut hot, mut hit) = (0, 0, 0);
    for i in 0..COV {
        if COV_RIP[i].load(Ordering::Relaxed) == 0 {
            continue;
        }
        seen += 1;
        if COV_EXPECTED[i].load(Ordering::Relaxed) >= COV_HOT {
            hot += 1;
            if COV_ACTS[i].load(Ordering::Relaxed) > 0 {
                hit += 1;
            }
        }
    }
    (seen, hot, hit)
}

/// After a runaway: the instruction addresses the handler met most often, with their functions and lines.
fn print_hottest() {
    let mut v: Vec<(u32, usize)> = (0..COV)
        .filter(|&i| COV_RIP[i].load(Ordering::Relaxed) != 0)
        .map(|i| (COV_VISITS[i].load(Ordering::Relaxed), COV_RIP[i].load(Ordering::Relaxed)))
        .collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    for &(visits, rip) in v.iter().take(12) {
        let mut line = format!("  {visits} x {rip:#x}");
        backtrace::resolve(rip as *mut std::ffi::c_void, |sym| {
            if let Some(n) = sym.name() {
                line += &format!(" {n}");
            }
            if let (Some(f), Some(l)) = (sym.filename(), sym.lineno()) {
                line += &format!(" ({}:{l})", f.display());
            }
        });
        eprintln!("{line}");
    }
}

/// Run `pass(n, every, phase)` for each `(every, phase)` with the handler in `mode`, and check that stepping ran,
/// that the handler ran at every `every`-th trap and that its rationed actions were spread over the stepped code.
fn run_passes(mode: u8, passes: &[(u64, u64)], min_traps: u64, mut pass: impl FnMut(usize, u64, u64)) {
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    nolock::init();
    A.warm_up();
    MODE.store(mode, Ordering::SeqCst);
    for (k, &(every, phase)) in passes.iter().enumerate() {
        EVERY.store(every, Ordering::SeqCst);
        PHASE.store(phase, Ordering::SeqCst);
        coverage_reset();
        let (t0, a0) = (TRAPS.load(Ordering::Relaxed), ACTED.load(Ordering::Relaxed));
        PASS_START.store(t0, Ordering::SeqCst);
        RUNAWAY.store(false, Ordering::SeqCst);
        let start = std::time::Instant::now();
        pass(k, every, phase);
        let (traps, acted) = (TRAPS.load(Ordering::Relaxed) - t0, ACTED.load(Ordering::Relaxed) - a0);
        let (seen, hot, hit) = coverage_summary();
        if RUNAWAY.load(Ordering::Relaxed) {
            print_hottest();
        }
        eprintln!(
            "pass {k}: every {every} from {phase}: {traps} traps, handler ran {acted} times, {:.1} s; {seen} \
             instruction addresses; the handler acted at {hit} of the {hot} where 2+ actions were due",
            start.elapsed().as_secs_f64()
        );
        assert!(!RUNAWAY.load(Ordering::Relaxed), "the stepped code made no progress in {RUNAWAY_TRAPS} traps");
        assert!(traps > min_traps, "single-stepping ran ({traps} traps)");
        assert!(acted * every >= traps - every, "the handler ran at every {every}th trap ({acted} of {traps})");
        // (With e^-2 odds of a miss each, 60% is far below what 40 or more addresses give by chance.)
        assert!(hot < 40 || hit * 10 >= hot * 6, "the handler's actions reached the stepped code ({hit} of {hot})");
        assert_eq!(COV_FULL.load(Ordering::Relaxed), 0, "coverage table full");
    }
    MODE.store(MODE_NONE, Ordering::SeqCst);
}

/// The passes of a test: one with the handler at every instruction, or three at every third, one per phase.
const EVERY_ONE: [(u64, u64); 1] = [(1, 0)];
const EVERY_THIRD: [(u64, u64); 3] = [(3, 0), (3, 1), (3, 2)];

// ---------------------------------------------------------------------------------------------------------------
// 1. The MPSC queues
// ---------------------------------------------------------------------------------------------------------------

/// An item: its tag (producer bit and sequence number) and a check word.
type Item = [u64; 2];
const QN: usize = 8;
static BQ: BoundedQueue<Item, QN> = BoundedQueue::new();
static UQ: UnboundedQueue<Item> = UnboundedQueue::new();

/// Capacity accounting of `BQ`: pushes accepted (both producers), pops (the stepped code), and whether the
/// stepped code is inside a push or a pop. Each count changes by a single instruction.
static B_ACCEPTED: AtomicU64 = AtomicU64::new(0);
static B_POPPED: AtomicU64 = AtomicU64::new(0);
static B_PUSHING: AtomicU64 = AtomicU64::new(0);
static B_POPPING: AtomicU64 = AtomicU64::new(0);
/// The handler's next sequence number, and which of its items each queue accepted.
static H_SEQ: AtomicU64 = AtomicU64::new(0);
const H_ITEMS: usize = 1 << 18;
static H_ACC_B: [AtomicU64; H_ITEMS / 64] = [const { AtomicU64::new(0) }; H_ITEMS / 64];
static H_ACC_U: [AtomicU64; H_ITEMS / 64] = [const { AtomicU64::new(0) }; H_ITEMS / 64];
static H_REFUSED_B: AtomicU64 = AtomicU64::new(0);
/// A bounded push refused while the queue had room / accepted while it was full; anything else wrong.
static Q_SPURIOUS_FULL: AtomicU64 = AtomicU64::new(0);
static Q_OVERFILL: AtomicU64 = AtomicU64::new(0);
static Q_OTHER: AtomicU64 = AtomicU64::new(0);

fn item(tag: u64) -> Item {
    [tag, pattern_word(tag, 1)]
}

fn item_ok(it: &Item) -> bool {
    it[1] == pattern_word(it[0], 1)
}

/// Which queue the stepped code is using (0: bounded, 1: unbounded): the handler pushes into that one.
static QUEUE_LOOP: AtomicU8 = AtomicU8::new(0);
/// The handler's push rates (one acting run in so many, at every instruction): about the rate at which the
/// stepped code pops, so that the bounded queue is neither always full nor always empty.
const B_ONE_IN: u64 = 60;
/// Into the unbounded queue, rarer still, and only while fewer than `U_CAP` of the handler's items wait in it:
/// each pop costs the stepped code ~110 instructions (its `kfree_nolock`, the take-all and reversal), during
/// which faster pushes would grow the queue without end.
const U_ONE_IN: u64 = 384;
const U_CAP: u64 = 8;
static U_H_PUSHED: AtomicU64 = AtomicU64::new(0);
static U_H_POPPED: AtomicU64 = AtomicU64::new(0);

fn queue_trap(n: u64, every: u64) -> (Chance, bool) {
    if QUEUE_LOOP.load(Ordering::Relaxed) == 0 {
        if !gate(n, 0xb0b, B_ONE_IN, every) {
            if BQ.len() > QN {
                Q_OTHER.fetch_add(1, Ordering::Relaxed);
            }
            return (Chance::of(B_ONE_IN, every), false);
        }
        let seq = H_SEQ.fetch_add(1, Ordering::Relaxed);
        if seq as usize >= H_ITEMS {
            Q_OTHER.fetch_add(1, Ordering::Relaxed);
            return (Chance::of(B_ONE_IN, every), true);
        }
        // The occupancy bounds: at most `accepted + pushing - popped` slots are taken (the stepped code's push
        // may have claimed one it has not counted yet); at least `accepted - popped - popping` (its pop may
        // have freed one it has not counted yet).
        let a = B_ACCEPTED.load(Ordering::Relaxed) as i64;
        let p = B_POPPED.load(Ordering::Relaxed) as i64;
        let (pushing, popping) = (B_PUSHING.load(Ordering::Relaxed) as i64, B_POPPING.load(Ordering::Relaxed) as i64);
        match BQ.push(item(H_BIT | seq)) {
            Ok(()) => {
                if a - p - popping >= QN as i64 {
                    Q_OVERFILL.fetch_add(1, Ordering::Relaxed);
                }
                B_ACCEPTED.fetch_add(1, Ordering::Relaxed);
                H_ACC_B[seq as usize / 64].fetch_or(1 << (seq % 64), Ordering::Relaxed);
            }
            Err(back) => {
                if back != item(H_BIT | seq) {
                    Q_OTHER.fetch_add(1, Ordering::Relaxed);
                }
                if a + pushing - p < QN as i64 {
                    Q_SPURIOUS_FULL.fetch_add(1, Ordering::Relaxed);
                }
                H_REFUSED_B.fetch_add(1, Ordering::Relaxed);
            }
        }
        (Chance::of(B_ONE_IN, every), true)
    } else {
        if U_H_PUSHED.load(Ordering::Relaxed) - U_H_POPPED.load(Ordering::Relaxed) >= U_CAP {
            return (Chance(0), false);
        }
        if !gate(n, 0x0b0e, U_ONE_IN, every) {
            return (Chance::of(U_ONE_IN, every), false);
        }
        let seq = H_SEQ.fetch_add(1, Ordering::Relaxed);
        if seq as usize >= H_ITEMS || UQ.push(item(H_BIT | seq)).is_err() {
            Q_OTHER.fetch_add(1, Ordering::Relaxed);
        } else {
            U_H_PUSHED.fetch_add(1, Ordering::Relaxed);
            H_ACC_U[seq as usize / 64].fetch_or(1 << (seq % 64), Ordering::Relaxed);
        }
        (Chance::of(U_ONE_IN, every), true)
    }
}

/// Check a queue's pop log: each producer's items in the order it pushed them (strictly increasing sequence
/// numbers, so none twice), only accepted items, and all of them.
fn check_log(name: &str, log: &[u64], main_accepted: &[bool], handler_accepted: &[AtomicU64]) {
    let (mut last_main, mut last_h) = (None::<u64>, None::<u64>);
    let (mut n_main, mut n_h) = (0usize, 0u64);
    for &tag in log {
        if tag & H_BIT != 0 {
            let seq = tag & !H_BIT;
            assert!(last_h.is_none_or(|l| l < seq), "{name}: handler item {seq} popped after {last_h:?}");
            let bit = handler_accepted.get(seq as usize / 64).map(|w| w.load(Ordering::Relaxed) >> (seq % 64) & 1);
            assert_eq!(bit, Some(1), "{name}: handler item {seq} popped but never accepted");
            last_h = Some(seq);
            n_h += 1;
        } else {
            assert!(last_main.is_none_or(|l| l < tag), "{name}: stepped item {tag} popped after {last_main:?}");
            assert!(main_accepted.get(tag as usize) == Some(&true), "{name}: stepped item {tag} never accepted");
            last_main = Some(tag);
            n_main += 1;
        }
    }
    let acc_h: u64 = handler_accepted.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum();
    assert_eq!(n_main, main_accepted.iter().filter(|&&a| a).count(), "{name}: a stepped item was lost");
    assert_eq!(n_h, acc_h, "{name}: a handler item was lost");
}

/// One pass: `iters_b` rounds with the bounded queue (push one, pop up to four; no pops in 8 rounds of 64, so
/// that it fills up), then `iters_u` rounds with the unbounded one (push one, pop up to four).
fn queue_pass(iters_b: usize, iters_u: usize, seed: u64) {
    for w in H_ACC_B.iter().chain(&H_ACC_U) {
        w.store(0, Ordering::Relaxed);
    }
    for c in [
        &B_ACCEPTED,
        &B_POPPED,
        &H_SEQ,
        &H_REFUSED_B,
        &Q_SPURIOUS_FULL,
        &Q_OVERFILL,
        &Q_OTHER,
        &U_H_PUSHED,
        &U_H_POPPED,
    ] {
        c.store(0, Ordering::Relaxed);
    }
    assert!(BQ.pop().is_none() && UQ.pop().is_none(), "queues empty at the start");
    let mut acc_b = vec![false; iters_b];
    let acc_u = vec![true; iters_u];
    let mut log_b: Vec<u64> = Vec::with_capacity(iters_b * 4 + 4096);
    let mut log_u: Vec<u64> = Vec::with_capacity(iters_u * 8 + 4096);
    let (mut bad, mut refused, mut full_wrong, mut empty_b, mut empty_u) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let quiet = (seed % 64) as usize;
    QUEUE_LOOP.store(0, Ordering::SeqCst);
    {
        let _s = Stepping::start();
        for (i, accepted) in acc_b.iter_mut().enumerate() {
            let tag = i as u64;
            B_PUSHING.store(1, Ordering::Relaxed);
            compiler_fence(Ordering::SeqCst);
            let r = BQ.push(item(tag));
            compiler_fence(Ordering::SeqCst);
            match r {
                Ok(()) => {
                    B_ACCEPTED.fetch_add(1, Ordering::Relaxed);
                    *accepted = true;
                }
                Err(back) => {
                    refused += 1;
                    bad += u64::from(back != item(tag));
                    // Refused by a full queue: exactly QN items in it (no push or pop of ours in flight, and
                    // the handler's are complete and counted).
                    let occupied = B_ACCEPTED.load(Ordering::Relaxed) - B_POPPED.load(Ordering::Relaxed);
                    full_wrong += u64::from(occupied != QN as u64);
                }
            }
            compiler_fence(Ordering::SeqCst);
            B_PUSHING.store(0, Ordering::Relaxed);
            let pops = if (i + quiet) % 64 < 8 { 0 } else { 4 };
            for _ in 0..pops {
                B_POPPING.store(1, Ordering::Relaxed);
                compiler_fence(Ordering::SeqCst);
                let x = BQ.pop();
                if x.is_some() {
                    B_POPPED.fetch_add(1, Ordering::Relaxed);
                }
                compiler_fence(Ordering::SeqCst);
                B_POPPING.store(0, Ordering::Relaxed);
                match x {
                    Some(it) => {
                        bad += u64::from(!item_ok(&it));
                        log_b.push(it[0]);
                    }
                    None => {
                        empty_b += 1;
                        break;
                    }
                }
            }
        }
    }
    QUEUE_LOOP.store(1, Ordering::SeqCst);
    {
        let _s = Stepping::start();
        for i in 0..iters_u {
            bad += u64::from(UQ.push(item(i as u64)).is_err());
            for _ in 0..4 {
                match UQ.pop() {
                    Some(it) => {
                        bad += u64::from(!item_ok(&it));
                        if it[0] & H_BIT != 0 {
                            U_H_POPPED.fetch_add(1, Ordering::Relaxed);
                        }
                        log_u.push(it[0]);
                    }
                    None => {
                        empty_u += 1;
                        break;
                    }
                }
            }
        }
    }
    let (stepped_b, stepped_u) = (log_b.len(), log_u.len());
    while let Some(it) = BQ.pop() {
        B_POPPED.fetch_add(1, Ordering::Relaxed);
        bad += u64::from(!item_ok(&it));
        log_b.push(it[0]);
    }
    while let Some(it) = UQ.pop() {
        bad += u64::from(!item_ok(&it));
        log_u.push(it[0]);
    }
    let h_acc_b: u64 = H_ACC_B.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum();
    let h_acc_u: u64 = H_ACC_U.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum();
    eprintln!(
        "  bounded: stepped code {} accepted, {refused} refused; handler {h_acc_b} accepted, {} refused; {stepped_b} \
         popped while stepped ({empty_b} empty pops), {} after; unbounded: handler {h_acc_u} pushed, {stepped_u} \
         popped while stepped ({empty_u} empty pops), {} after",
        iters_b as u64 - refused,
        H_REFUSED_B.load(Ordering::Relaxed),
        log_b.len() - stepped_b,
        log_u.len() - stepped_u
    );
    assert_eq!(bad, 0, "a popped or handed-back item was damaged, or an unbounded push failed");
    assert_eq!(full_wrong, 0, "a push of the stepped code was refused with room in the queue");
    assert_eq!(Q_SPURIOUS_FULL.load(Ordering::Relaxed), 0, "a handler push was refused with room in the queue");
    assert_eq!(Q_OVERFILL.load(Ordering::Relaxed), 0, "a handler push was accepted into a full queue");
    assert_eq!(Q_OTHER.load(Ordering::Relaxed), 0, "a handler item was damaged or an unbounded push failed");
    check_log("bounded", &log_b, &acc_b, &H_ACC_B);
    check_log("unbounded", &log_u, &acc_u, &H_ACC_U);
    assert!(refused > 0 && H_REFUSED_B.load(Ordering::Relaxed) > 0, "the bounded queue was full at times");
    assert!(iters_b as u64 - refused > 0 && empty_b > 0 && empty_u > 0, "and had room at others");
    assert!(h_acc_b > 20 && h_acc_u > 10, "the handler's pushes went through");
}

/// The stepped code pushes into a queue and pops from it while the handler pushes into the same queue: the
/// boundaries of a push (before its claim, between its claim and its publication, inside the `llist` CAS
/// loop) and of a pop (the bounded queue's hand-over of a slot, the unbounded queue's take-all and reversal)
/// meet nested pushes, and refusals when the bounded queue is full.
#[test]
fn queues_handler_at_every_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_QUEUE, &EVERY_ONE, 50_000, |k, _, _| queue_pass(600, 200, 0x9e0 + k as u64));
}

#[test]
fn queues_handler_at_every_third_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_QUEUE, &EVERY_THIRD, 15_000, |k, _, _| queue_pass(200, 40, 0x3e0 + k as u64 * 21));
}

// ---------------------------------------------------------------------------------------------------------------
// 2. RcuPtr
// ---------------------------------------------------------------------------------------------------------------

/// A value whose three words check each other; dropping it poisons it and counts.
#[repr(C)]
struct V {
    n: u64,
    id: u64,
    check: u64,
}

static V_CREATED: AtomicU64 = AtomicU64::new(0);
static V_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Drops of a value that was not intact (dropped twice, or damaged while live).
static V_BAD_DROPS: AtomicU64 = AtomicU64::new(0);
const POISON: u64 = 0xdead_dead_dead_dead;

fn v_check(n: u64, id: u64) -> u64 {
    pattern_word(n ^ id.rotate_left(29), 3)
}

impl V {
    fn new(n: u64, id: u64) -> Self {
        V_CREATED.fetch_add(1, Ordering::Relaxed);
        Self { n, id, check: v_check(n, id) }
    }

    /// Whether the value is intact (volatile reads: the memory may have been freed under us by a bug).
    fn ok(&self) -> bool {
        // SAFETY: the fields of a live `&self`.
        let (n, id, c) = unsafe {
            (std::ptr::read_volatile(&self.n), std::ptr::read_volatile(&self.id), std::ptr::read_volatile(&self.check))
        };
        c == v_check(n, id)
    }
}

impl Drop for V {
    fn drop(&mut self) {
        if !self.ok() {
            V_BAD_DROPS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: our own field.
        unsafe { std::ptr::write_volatile(&mut self.check, POISON) };
        V_DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// A counter: the stepped code increments it with `update`, the handler with `compare_exchange`.
static CNT: RcuPtr<V> = RcuPtr::null();
/// A slot the stepped code swaps and compare-exchanges, and the handler compare-exchanges.
static SLOT: RcuPtr<V> = RcuPtr::null();
/// Values the stepped code holds (addresses; 0: none), inside its read-side section: the handler checks them.
const HELD_N: usize = 24;
static HELD: [AtomicUsize; HELD_N] = [const { AtomicUsize::new(0) }; HELD_N];
static HELD_BAD: AtomicU64 = AtomicU64::new(0);
static H_INCS: AtomicU64 = AtomicU64::new(0);
static H_SLOT_CAS: AtomicU64 = AtomicU64::new(0);
static H_LAST_N: AtomicU64 = AtomicU64::new(0);
static R_ERR: AtomicU64 = AtomicU64::new(0);

fn addr_of(v: Option<&V>) -> usize {
    v.map_or(0, |r| std::ptr::from_ref(r) as usize)
}

/// The handler's exchange rates (one acting run in so many, at every instruction): rare enough that the
/// stepped code's own `update` and `compare_exchange` (a node allocation wide) usually get through.
const CNT_ONE_IN: u64 = 64;
const SLOT_ONE_IN: u64 = 256;

fn rcu_trap(n: u64, every: u64) -> (Chance, bool) {
    let chance = Chance(Chance::of(CNT_ONE_IN, every).0 + Chance::of(SLOT_ONE_IN, every).0);
    let g = rcu_read_lock();
    for h in &HELD {
        let a = h.load(Ordering::Relaxed);
        // SAFETY: the stepped code publishes here only values it holds inside its read-side section, which
        // this handler interrupted; it clears the entries before it leaves the section.
        if a != 0 && !unsafe { &*(a as *const V) }.ok() {
            HELD_BAD.fetch_add(1, Ordering::Relaxed);
        }
    }
    let c = CNT.load(&g);
    match c {
        Some(v) if v.ok() => {
            if v.n < H_LAST_N.load(Ordering::Relaxed) {
                R_ERR.fetch_add(1, Ordering::Relaxed);
            }
            H_LAST_N.store(v.n, Ordering::Relaxed);
        }
        _ => {
            R_ERR.fetch_add(1, Ordering::Relaxed);
            return (chance, false);
        }
    }
    let s = SLOT.load(&g);
    if !s.is_some_and(V::ok) {
        R_ERR.fetch_add(1, Ordering::Relaxed);
    }
    let mut acted = false;
    if gate(n, 0xc0, CNT_ONE_IN, every) {
        acted = true;
        let cur = c.map_or(0, |v| v.n);
        // Nothing can change the counter while the handler runs: the exchange succeeds.
        match CNT.compare_exchange(c, V::new(cur + 1, H_BIT), &g) {
            Ok(old) if addr_of(old) == addr_of(c) => {
                H_INCS.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                R_ERR.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if gate(n, 0x51, SLOT_ONE_IN, every) {
        acted = true;
        match SLOT.compare_exchange(s, V::new(n, H_BIT | 1), &g) {
            Ok(old) if addr_of(old) == addr_of(s) && old.is_some_and(V::ok) => {
                H_SLOT_CAS.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                R_ERR.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    (chance, acted)
}

fn rcu_pass(iters: u64) {
    // (Left set only by a pass that failed.)
    CNT.clear();
    SLOT.clear();
    rcu_barrier();
    for c in [&HELD_BAD, &H_INCS, &H_SLOT_CAS, &H_LAST_N, &R_ERR, &V_BAD_DROPS] {
        c.store(0, Ordering::Relaxed);
    }
    let (c0, d0) = (V_CREATED.load(Ordering::Relaxed), V_DROPPED.load(Ordering::Relaxed));
    assert!(CNT.publish(V::new(0, 0)).is_ok() && SLOT.publish(V::new(0, 1)).is_ok());
    let (mut main_incs, mut calls, mut cas_ok, mut cas_failed, mut bad) = (0u64, 0u64, 0u64, 0u64, 0u64);
    {
        let _s = Stepping::start();
        let mut i = 0;
        while i < iters {
            let g = rcu_read_lock();
            let mut h = 0;
            let mut hold = |v: Option<&V>| {
                HELD[h % HELD_N].store(addr_of(v), Ordering::Relaxed);
                h += 1;
            };
            // Four rounds per read-side section: the values read and replaced in them stay readable to its end.
            for _ in 0..4 {
                let c = CNT.load(&g);
                bad += u64::from(!c.is_some_and(V::ok));
                hold(c);
                match CNT.update(&g, |cur| {
                    calls += 1;
                    V::new(cur.map_or(0, |v| v.n) + 1, i)
                }) {
                    Ok(old) if old.is_some_and(V::ok) => {
                        main_incs += 1;
                        hold(old);
                    }
                    _ => bad += 1,
                }
                match SLOT.swap(V::new(i, 2), &g) {
                    Ok(old) if old.is_some_and(V::ok) => hold(old),
                    _ => bad += 1,
                }
                let cur = SLOT.load(&g);
                hold(cur);
                match SLOT.compare_exchange(cur, V::new(i, 3), &g) {
                    Ok(old) => {
                        // The replaced value is the one we read.
                        bad += u64::from(addr_of(old) != addr_of(cur) || !old.is_some_and(V::ok));
                        cas_ok += 1;
                    }
                    Err((back, actual)) => {
                        // Only the handler changes the slot: it did, and `actual` is its value.
                        bad += u64::from(addr_of(actual) == addr_of(cur) || !actual.is_some_and(V::ok));
                        bad += u64::from(back.n != i || back.id != 3);
                        hold(actual);
                        drop(back);
                        cas_failed += 1;
                    }
                }
                i += 1;
            }
            // Everything held in this section is still intact; then give it up before the section ends.
            for e in &HELD {
                let a = e.swap(0, Ordering::Relaxed);
                // SAFETY: a value held inside this read-side section (see `hold`).
                bad += u64::from(a != 0 && !unsafe { &*(a as *const V) }.ok());
            }
            compiler_fence(Ordering::SeqCst);
            drop(g);
        }
    }
    let h_incs = H_INCS.load(Ordering::Relaxed);
    let total = {
        let g = rcu_read_lock();
        CNT.load(&g).map(|v| v.n)
    };
    eprintln!(
        "  counter: {main_incs} updates ({} retries), {h_incs} handler increments, ends at {total:?}; slot: \
         {cas_ok} exchanges, {cas_failed} lost to the handler, {} handler exchanges",
        calls - main_incs,
        H_SLOT_CAS.load(Ordering::Relaxed)
    );
    assert_eq!(bad, 0, "the stepped code read a damaged value or an operation returned the wrong one");
    assert_eq!(HELD_BAD.load(Ordering::Relaxed), 0, "a value was freed while the stepped code held it");
    assert_eq!(R_ERR.load(Ordering::Relaxed), 0, "the handler read a damaged value or its exchange failed");
    assert_eq!(total, Some(main_incs + h_incs), "an increment was lost");
    assert!(calls > main_incs && cas_failed > 0, "the handler's exchanges raced the stepped code's");
    CNT.clear();
    SLOT.clear();
    rcu_barrier();
    let (created, dropped) = (V_CREATED.load(Ordering::Relaxed) - c0, V_DROPPED.load(Ordering::Relaxed) - d0);
    assert_eq!(V_BAD_DROPS.load(Ordering::Relaxed), 0, "a value was dropped twice or damaged");
    assert_eq!(created, dropped, "every value dropped once after rcu_barrier ({created} made, {dropped} dropped)");
}

/// `update`, `swap` and `compare_exchange` in the stepped code, with the handler's reads and exchanges at its
/// instruction boundaries: updates retry, exchanges lose, and replaced values stay readable until the section
/// that read them ends.
#[test]
fn rcu_ptr_handler_at_every_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_RCU, &EVERY_ONE, 50_000, |_, _, _| rcu_pass(112));
}

#[test]
fn rcu_ptr_handler_at_every_third_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_RCU, &EVERY_THIRD, 15_000, |_, _, _| rcu_pass(40));
}

// ---------------------------------------------------------------------------------------------------------------
// 3. TypedCache / CacheBox and NBox
// ---------------------------------------------------------------------------------------------------------------

/// An object of 32 bytes: a sequence number and three words derived from it; dropping it checks and poisons it.
#[repr(C)]
struct Obj {
    seq: u64,
    w: [u64; 3],
}

static OBJ_BAD_DROPS: AtomicU64 = AtomicU64::new(0);

impl Obj {
    fn new(seq: u64) -> Self {
        Self { seq, w: [pattern_word(seq, 1), pattern_word(seq, 2), pattern_word(seq, 3)] }
    }

    /// The object's sequence number if it is intact.
    fn seq(&self) -> Option<u64> {
        // SAFETY: fields of a live `&self` (volatile: a bug may change them under us).
        let seq = unsafe { std::ptr::read_volatile(&self.seq) };
        // SAFETY: as above.
        let ok = (0..3).all(|i| unsafe { std::ptr::read_volatile(&self.w[i]) } == pattern_word(seq, i + 1));
        ok.then_some(seq)
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        if self.seq().is_none() {
            OBJ_BAD_DROPS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: our own field.
        unsafe { std::ptr::write_volatile(&mut self.w[0], POISON) };
    }
}

static TCACHE: AtomicPtr<TypedCache<Obj>> = AtomicPtr::new(std::ptr::null_mut());

fn typed_cache() -> &'static TypedCache<Obj> {
    let p = TCACHE.load(Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: published below, leaked, never freed.
        return unsafe { &*p };
    }
    let c: &'static TypedCache<Obj> = Box::leak(Box::new(TypedCache::new("step-typed").unwrap()));
    // Release: pairs with the Acquire load above (the tests take turns; only one ever stores).
    TCACHE.store(std::ptr::from_ref(c).cast_mut(), Ordering::Release);
    c
}

/// The handler's live objects: address, kind (0: `CacheBox`, 1: `NBox<Obj>`, 2: `NBox<Wide>`) and sequence
/// number.
const RING: usize = 48;
static RING_ADDR: [AtomicUsize; RING] = [const { AtomicUsize::new(0) }; RING];
static RING_KIND: [AtomicU8; RING] = [const { AtomicU8::new(0) }; RING];
static RING_SEQ: [AtomicU64; RING] = [const { AtomicU64::new(0) }; RING];
static RING_POS: AtomicUsize = AtomicUsize::new(0);
static C_FAILED: AtomicU64 = AtomicU64::new(0);
static C_DAMAGED: AtomicU64 = AtomicU64::new(0);

/// Check and drop one of the handler's objects (`into_inner` for every other one).
fn ring_release(addr: usize, kind: u8, seq: u64) {
    let cache = typed_cache();
    let p = NonNull::new(addr as *mut Obj).expect("a live object");
    // SAFETY: a live object of ours (its ring slot no longer names it); a `Wide` starts with an `Obj`.
    if unsafe { p.as_ref() }.seq() != Some(seq) {
        C_DAMAGED.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: from `CacheBox::into_raw` of a box of `cache` (kind 0), `NBox::<Obj>::into_raw` (kind 1) or
    // `NBox::<Wide>::into_raw` (kind 2), owned by the ring alone until now.
    unsafe {
        match (kind, seq % 2) {
            (0, 0) => drop(CacheBox::from_raw(cache, p)),
            (0, _) => drop(CacheBox::into_inner(CacheBox::from_raw(cache, p))),
            (1, 0) => drop(NBox::from_raw(p)),
            (1, _) => drop(NBox::into_inner(NBox::from_raw(p))),
            _ => drop(NBox::from_raw(p.cast::<Wide>())),
        }
    }
}

/// Two objects: 64 bytes, a kmalloc class the stepped code does not use.
type Wide = [Obj; 2];

/// The handler's use of the stepped code's cache and class: in one acting run in `SAME_ONE_IN / every`; at
/// the other runs it allocates and frees in another class. Rationed because each of its frees into the cache
/// while the stepped code holds the cache's list is deferred, and the stepped code, before it returns, splices
/// the deferred objects into its list (a walk that checks each one) and flushes the list once it passes its
/// high mark (a walk of the whole list): some 50 instructions per deferred object. Deferred faster than that,
/// they arrive as fast as it drains them: with the handler using the cache in one run in 16 at every third
/// instruction, a pass ran away (a million traps in `drain_deferred`'s `check_chain` and the flush's scan); at
/// one in 64 passes took up to ten times their usual traps. A rate beyond any real signal storm either way.
const SAME_ONE_IN: u64 = 128;

fn cache_trap(n: u64, every: u64) -> (Chance, bool) {
    let cache = typed_cache();
    let seq = H_BIT | n;
    let same = gate(n, 0x7c7c, SAME_ONE_IN, every);
    let (addr, kind) = match (same, splitmix64(n ^ 0x3c3c) % 3) {
        (true, 0) => (cache.alloc(Obj::new(seq)).ok().map(CacheBox::into_raw), 0),
        (true, 1) => (cache.alloc_with(|| Obj::new(seq)).map(CacheBox::into_raw), 0),
        (true, _) => (NBox::try_new(Obj::new(seq)).ok().map(NBox::into_raw), 1),
        (false, _) => (NBox::try_new([Obj::new(seq), Obj::new(seq)]).ok().map(|b| NBox::into_raw(b).cast::<Obj>()), 2),
    };
    let chance = Chance::of(SAME_ONE_IN, every);
    let Some(addr) = addr else {
        C_FAILED.fetch_add(1, Ordering::Relaxed);
        return (chance, same);
    };
    let i = RING_POS.fetch_add(1, Ordering::Relaxed) % RING;
    let old = RING_ADDR[i].swap(addr.as_ptr() as usize, Ordering::Relaxed);
    let old_kind = RING_KIND[i].swap(kind, Ordering::Relaxed);
    let old_seq = RING_SEQ[i].swap(seq, Ordering::Relaxed);
    if old != 0 {
        ring_release(old, old_kind, old_seq);
    }
    (chance, same)
}

enum Held {
    Cache(CacheBox<'static, Obj>),
    Boxed(NBox<Obj>),
}

impl Held {
    fn obj(&self) -> &Obj {
        match self {
            Held::Cache(b) => b,
            Held::Boxed(b) => b,
        }
    }
}

fn cache_pass(objects: usize, seed: u64) {
    let cache = typed_cache();
    C_FAILED.store(0, Ordering::Relaxed);
    C_DAMAGED.store(0, Ordering::Relaxed);
    OBJ_BAD_DROPS.store(0, Ordering::Relaxed);
    let mut rng = testkit::Rng::new(seed);
    let mut order: Vec<usize> = (0..objects).collect();
    for i in (1..objects).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let st0 = cache.stats();
    let mut held: Vec<Option<Held>> = Vec::with_capacity(objects);
    let (mut failed, mut damaged) = (0u64, 0u64);
    {
        let _s = Stepping::start();
        for i in 0..objects {
            let seq = i as u64;
            let h = match i % 3 {
                0 => cache.alloc(Obj::new(seq)).ok().map(Held::Cache),
                1 => cache.alloc_with(|| Obj::new(seq)).map(Held::Cache),
                _ => NBox::try_new(Obj::new(seq)).ok().map(Held::Boxed),
            };
            failed += u64::from(h.is_none());
            held.push(h);
        }
    }
    // No address is live twice: the stepped code's objects and the handler's.
    let mut seen = HashSet::new();
    for h in held.iter().flatten() {
        let a = std::ptr::from_ref(h.obj()) as usize;
        assert!(seen.insert(a), "address {a:#x} handed out twice");
    }
    for r in &RING_ADDR {
        let a = r.load(Ordering::Relaxed);
        assert!(a == 0 || seen.insert(a), "address {a:#x} is both the handler's and the stepped code's");
    }
    {
        let _s = Stepping::start();
        for &i in &order {
            let Some(h) = held[i].take() else { continue };
            damaged += u64::from(h.obj().seq() != Some(i as u64));
            match (h, i % 4) {
                (Held::Cache(b), 0) => drop(CacheBox::into_inner(b)),
                (Held::Boxed(b), 0) => drop(NBox::into_inner(b)),
                (h, _) => drop(h),
            }
        }
    }
    let st = cache.stats();
    eprintln!(
        "  typed cache: {} allocations ({} shared), {} frees ({} deferred), {} flushes",
        st.allocs - st0.allocs,
        st.shared_allocs - st0.shared_allocs,
        st.frees - st0.frees,
        st.deferred_frees - st0.deferred_frees,
        st.flushes - st0.flushes
    );
    assert_eq!(failed, 0, "an allocation of the stepped code failed with memory available");
    assert_eq!(damaged, 0, "an object of the stepped code changed while live");
    assert_eq!(C_FAILED.load(Ordering::Relaxed), 0, "a handler allocation failed with memory available");
    assert_eq!(C_DAMAGED.load(Ordering::Relaxed), 0, "a handler object changed while live");
    assert_eq!(OBJ_BAD_DROPS.load(Ordering::Relaxed), 0, "an object was dropped damaged or twice");
}

fn release_cache_ring() {
    for i in 0..RING {
        let a = RING_ADDR[i].swap(0, Ordering::Relaxed);
        if a != 0 {
            ring_release(a, RING_KIND[i].load(Ordering::Relaxed), RING_SEQ[i].load(Ordering::Relaxed));
        }
    }
    assert_eq!(C_DAMAGED.load(Ordering::Relaxed), 0, "a handler object changed while live");
    assert_eq!(OBJ_BAD_DROPS.load(Ordering::Relaxed), 0, "an object was dropped damaged or twice");
}

/// `TypedCache::alloc`/`alloc_with`, `NBox::try_new` and their drops (`into_inner` too) stepped, while the
/// handler allocates and drops objects at every boundary: of the same cache and kmalloc class at a random one in
/// `SAME_ONE_IN`, of another class at the others (rationed, see `SAME_ONE_IN`).
///
/// A handler that used the typed cache at *every* acting run starved the stepped code in two ways. With the
/// handler at every third instruction, the free path's partial-list push (`TaggedStack::push_chain` under
/// `list_push`, a 6-instruction CAS loop) never completed: each handler allocation, finding the stepped code's
/// list busy, takes the shared path, which pops a partial slab and pushes it back, so the head the CAS expects
/// has always changed (lock-free, not wait-free: every handler completes). And its deferred frees outran the
/// drain (see `SAME_ONE_IN`). A kmalloc class does not meet the first: a busy class sends the handler's
/// allocation to the next class. Neither is a defect at any real signal rate; both are limits of the schedule.
#[test]
fn typed_cache_and_nbox_handler_at_every_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_CACHE, &EVERY_ONE, 50_000, |k, _, _| cache_pass(600, 0x7c + k as u64));
    release_cache_ring();
}

#[test]
fn typed_cache_and_nbox_handler_at_every_third_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_CACHE, &EVERY_THIRD, 15_000, |k, _, _| cache_pass(120, 0x37c + k as u64));
    release_cache_ring();
}

// ---------------------------------------------------------------------------------------------------------------
// 4. HybridAlloc<System>
// ---------------------------------------------------------------------------------------------------------------

const H_SIZES: [usize; 4] = [16, 48, 200, 1000];
/// Bytes of a block that carry its pattern.
const FILLED: usize = 32;
static HR_ADDR: [AtomicUsize; RING] = [const { AtomicUsize::new(0) }; RING];
static HR_SIZE: [AtomicUsize; RING] = [const { AtomicUsize::new(0) }; RING];
static HR_SEQ: [AtomicU64; RING] = [const { AtomicU64::new(0) }; RING];
static HR_POS: AtomicUsize = AtomicUsize::new(0);
/// glibc blocks the stepped code set aside for the handler to free (or reallocate): addresses, then how many
/// and how many taken.
const POOL_N: usize = 4096;
const POOL_SIZE: usize = 24;
static POOL: [AtomicUsize; POOL_N] = [const { AtomicUsize::new(0) }; POOL_N];
static POOL_POS: AtomicUsize = AtomicUsize::new(0);
/// A block of nolock memory the handler hands to the stepped code (0: none).
const HANDOFF_SIZE: usize = 48;
static HANDOFF: AtomicUsize = AtomicUsize::new(0);
/// What the handler did through `A`: allocations (reallocations included), frees of nolock memory, and frees
/// of glibc memory (deferred).
static HY_ALLOCS: AtomicU64 = AtomicU64::new(0);
static HY_NOLOCK_FREES: AtomicU64 = AtomicU64::new(0);
static HY_SYS_FREES: AtomicU64 = AtomicU64::new(0);
/// Handler allocations that failed, that were not nolock memory, and blocks found changed.
static HY_NULL: AtomicU64 = AtomicU64::new(0);
static HY_FOREIGN: AtomicU64 = AtomicU64::new(0);
static HY_DAMAGED: AtomicU64 = AtomicU64::new(0);

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Whether the first `FILLED.min(size)` bytes of `p` still hold pattern `seq`.
fn intact(p: *const u8, size: usize, seq: u64) -> bool {
    // SAFETY: callers pass a live block of at least `size` bytes, 8-aligned.
    unsafe { testkit::check(p, FILLED.min(size), Some(seq), u64::MAX) }.is_ok()
}

/// An allocation through `A` in the (marked) handler: counted, checked to be nolock's, filled.
fn handler_alloc(size: usize, seq: u64) -> Option<*mut u8> {
    // SAFETY: a non-zero-size layout.
    let p = unsafe { A.alloc(layout(size)) };
    HY_ALLOCS.fetch_add(1, Ordering::Relaxed);
    if p.is_null() {
        HY_NULL.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    if !nolock::stats::in_arena(p) {
        HY_FOREIGN.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: a fresh block of `size >= 16` bytes.
    unsafe { testkit::fill(p, FILLED.min(size), seq) };
    Some(p)
}

/// The rate of the handler's frees of glibc blocks (one acting run in so many, at every instruction): each
/// costs the stepped code a drain (a glibc free and a `kfree_nolock`, ~250 instructions), so they stay rare.
const POOL_ONE_IN: u64 = 2048;

fn hybrid_trap(n: u64, every: u64) -> bool {
    if !nolock::hybrid::handler_context() {
        HY_FOREIGN.fetch_add(1, Ordering::Relaxed);
    }
    let k = n / every;
    let size = H_SIZES[k as usize % H_SIZES.len()];
    let seq = H_BIT | n;
    let Some(p) = handler_alloc(size, seq) else { return true };
    let i = HR_POS.fetch_add(1, Ordering::Relaxed) % RING;
    let old = HR_ADDR[i].swap(p as usize, Ordering::Relaxed) as *mut u8;
    let old_size = HR_SIZE[i].swap(size, Ordering::Relaxed);
    let old_seq = HR_SEQ[i].swap(seq, Ordering::Relaxed);
    if !old.is_null() {
        if !intact(old, old_size, old_seq) {
            HY_DAMAGED.fetch_add(1, Ordering::Relaxed);
        }
        if k % 4 == 3 {
            // Grow it in the handler: nolock memory stays nolock memory, contents kept.
            // SAFETY: our block with this layout; the new size is valid with align 8.
            let q = unsafe { A.realloc(old, layout(old_size), old_size * 3) };
            HY_ALLOCS.fetch_add(1, Ordering::Relaxed);
            if q.is_null() {
                HY_NULL.fetch_add(1, Ordering::Relaxed);
                // SAFETY: a failed realloc leaves the block ours.
                unsafe { A.dealloc(old, layout(old_size)) };
            } else {
                if !nolock::stats::in_arena(q) {
                    HY_FOREIGN.fetch_add(1, Ordering::Relaxed);
                }
                if !intact(q, old_size, old_seq) {
                    HY_DAMAGED.fetch_add(1, Ordering::Relaxed);
                }
                // SAFETY: the reallocated block with its new layout.
                unsafe { A.dealloc(q, layout(old_size * 3)) };
            }
        } else {
            // SAFETY: our block with this layout, freed once.
            unsafe { A.dealloc(old, layout(old_size)) };
        }
        HY_NOLOCK_FREES.fetch_add(1, Ordering::Relaxed);
    }
    // Now and then, a glibc block the stepped code set aside: free it (deferred) or move it to nolock.
    if gate(n, 0x5f5, POOL_ONE_IN, every) {
        let j = POOL_POS.fetch_add(1, Ordering::Relaxed);
        let b = if j < POOL_N { POOL[j].swap(0, Ordering::Relaxed) as *mut u8 } else { std::ptr::null_mut() };
        if !b.is_null() {
            if !intact(b, POOL_SIZE, j as u64 + 1) {
                HY_DAMAGED.fetch_add(1, Ordering::Relaxed);
            }
            if j.is_multiple_of(2) {
                // SAFETY: a glibc block of this layout, handed to the handler alone through POOL.
                unsafe { A.dealloc(b, layout(POOL_SIZE)) };
            } else {
                // SAFETY: as above; 64 is a valid size with align 8.
                let q = unsafe { A.realloc(b, layout(POOL_SIZE), 64) };
                HY_ALLOCS.fetch_add(1, Ordering::Relaxed);
                if q.is_null() {
                    HY_NULL.fetch_add(1, Ordering::Relaxed);
                } else {
                    if !nolock::stats::in_arena(q) {
                        HY_FOREIGN.fetch_add(1, Ordering::Relaxed);
                    }
                    if !intact(q, POOL_SIZE, j as u64 + 1) {
                        HY_DAMAGED.fetch_add(1, Ordering::Relaxed);
                    }
                    // SAFETY: the moved block with its new layout.
                    unsafe { A.dealloc(q, layout(64)) };
                    HY_NOLOCK_FREES.fetch_add(1, Ordering::Relaxed);
                }
            }
            HY_SYS_FREES.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Now and then, a nolock block for the stepped code to free or reallocate in normal context.
    if gate(n, 0x4a4d, 64, every)
        && HANDOFF.load(Ordering::Relaxed) == 0
        && let Some(q) = handler_alloc(HANDOFF_SIZE, seq)
    {
        HANDOFF.store(q as usize, Ordering::Relaxed);
    }
    true
}

fn hybrid_pass(iters: usize) {
    for c in [&HY_ALLOCS, &HY_NOLOCK_FREES, &HY_SYS_FREES, &HY_NULL, &HY_FOREIGN, &HY_DAMAGED] {
        c.store(0, Ordering::Relaxed);
    }
    // The glibc blocks for the handler (allocated in normal context: System's).
    for (j, e) in POOL.iter().enumerate() {
        // SAFETY: a non-zero-size layout.
        let b = unsafe { A.alloc(layout(POOL_SIZE)) };
        assert!(!b.is_null() && !nolock::stats::in_arena(b), "normal context allocates from System");
        // SAFETY: a fresh block of POOL_SIZE bytes.
        unsafe { testkit::fill(b, POOL_SIZE, j as u64 + 1) };
        e.store(b as usize, Ordering::Relaxed);
    }
    POOL_POS.store(0, Ordering::Relaxed);
    let _ = A.drain();
    let before = A.stats();
    let (mut bad, mut foreign, mut main_nolock_frees, mut handoffs) = (0u64, 0u64, 0u64, 0u64);
    let mut window = [(std::ptr::null_mut::<u8>(), 0usize, 0u64); 8];
    {
        let _s = Stepping::start();
        for i in 0..iters {
            let seq = i as u64 + 1;
            // A Box and a growing Vec: the global allocator, in normal context (glibc).
            let b = Box::new([seq, pattern_word(seq, 1)]);
            foreign += u64::from(nolock::stats::in_arena(b.as_ptr().cast()));
            let mut v: Vec<u64> = Vec::with_capacity(2);
            for x in 0..3 {
                v.push(seq ^ x);
            }
            foreign += u64::from(nolock::stats::in_arena(v.as_ptr().cast()));
            bad += u64::from(!v.iter().copied().eq((0..3).map(|x| seq ^ x)));
            drop(v);
            bad += u64::from(*b != [seq, pattern_word(seq, 1)]);
            drop(b);
            // Raw calls: allocate, fill, grow, keep for a while.
            let size = 32 + (i % 5) * 40;
            // SAFETY: a non-zero-size layout.
            let p = unsafe { A.alloc(layout(size)) };
            if p.is_null() {
                bad += 1;
                continue;
            }
            // SAFETY: a fresh block of `size` bytes.
            unsafe { testkit::fill(p, FILLED.min(size), seq) };
            let grown = size * 2 + 100;
            // SAFETY: our block with this layout; a valid new size.
            let q = unsafe { A.realloc(p, layout(size), grown) };
            if q.is_null() {
                bad += 1;
                continue;
            }
            bad += u64::from(!intact(q, size, seq));
            foreign += u64::from(nolock::stats::in_arena(q));
            let (old, old_size, old_seq) = std::mem::replace(&mut window[i % 8], (q, grown, seq));
            if !old.is_null() {
                bad += u64::from(!intact(old, old_size.min(FILLED), old_seq));
                // SAFETY: our block with this layout, freed once.
                unsafe { A.dealloc(old, layout(old_size)) };
            }
            // A block the handler made: free it here, shrink it in place, or grow it (it moves to System).
            let h = HANDOFF.swap(0, Ordering::Relaxed) as *mut u8;
            if !h.is_null() {
                handoffs += 1;
                // SAFETY: a live nolock block of HANDOFF_SIZE bytes, filled by the handler, ours now.
                let hseq = unsafe { testkit::check(h, FILLED, None, u64::MAX) }.unwrap_or(0);
                bad += u64::from(hseq & H_BIT == 0);
                match i % 3 {
                    0 => {
                        // SAFETY: as above, freed once.
                        unsafe { A.dealloc(h, layout(HANDOFF_SIZE)) };
                        main_nolock_frees += 1;
                    }
                    1 => {
                        // SAFETY: as above; 40 is a valid size.
                        let s = unsafe { A.realloc(h, layout(HANDOFF_SIZE), 40) };
                        bad += u64::from(s != h || !intact(s, 40, hseq));
                        // SAFETY: the same block, now of 40 bytes.
                        unsafe { A.dealloc(s, layout(40)) };
                        main_nolock_frees += 1;
                    }
                    _ => {
                        // SAFETY: as above; 5000 is a valid size.
                        let g = unsafe { A.realloc(h, layout(HANDOFF_SIZE), 5000) };
                        bad += u64::from(g.is_null() || nolock::stats::in_arena(g) || !intact(g, FILLED, hseq));
                        main_nolock_frees += 1; // the move freed the nolock block
                        if !g.is_null() {
                            // SAFETY: the moved block (System's) with its new layout.
                            unsafe { A.dealloc(g, layout(5000)) };
                        }
                    }
                }
            }
            if i % 32 == 31 {
                let _ = A.drain();
            }
        }
    }
    for (p, size, seq) in window {
        if !p.is_null() {
            bad += u64::from(!intact(p, size.min(FILLED), seq));
            // SAFETY: our block with this layout.
            unsafe { A.dealloc(p, layout(size)) };
        }
    }
    let mid = A.stats();
    let _ = A.drain();
    let after = A.stats();
    // The glibc blocks the handler did not take.
    for e in &POOL {
        let b = e.swap(0, Ordering::Relaxed) as *mut u8;
        if !b.is_null() {
            // SAFETY: a System block of this layout, not handed out.
            unsafe { A.dealloc(b, layout(POOL_SIZE)) };
        }
    }
    let h = HANDOFF.swap(0, Ordering::Relaxed) as *mut u8;
    if !h.is_null() {
        // SAFETY: a nolock block of the handler's, ours now.
        unsafe { A.dealloc(h, layout(HANDOFF_SIZE)) };
        main_nolock_frees += 1;
    }
    let end = A.stats();
    let sys_frees = HY_SYS_FREES.load(Ordering::Relaxed);
    eprintln!(
        "  handler: {} allocations, {} nolock frees, {sys_frees} glibc frees deferred ({} drained while stepped); \
         stepped code: {handoffs} handler blocks freed or reallocated",
        HY_ALLOCS.load(Ordering::Relaxed),
        HY_NOLOCK_FREES.load(Ordering::Relaxed),
        mid.drained - before.drained
    );
    assert_eq!(bad, 0, "a block changed while live, or an allocation failed");
    assert_eq!(foreign, 0, "normal context got nolock memory");
    assert_eq!(HY_NULL.load(Ordering::Relaxed), 0, "a handler allocation failed with memory available");
    assert_eq!(HY_FOREIGN.load(Ordering::Relaxed), 0, "the handler got memory that is not nolock's (or was unmarked)");
    assert_eq!(HY_DAMAGED.load(Ordering::Relaxed), 0, "a block changed while live");
    assert_eq!(after.handler_allocs - before.handler_allocs, HY_ALLOCS.load(Ordering::Relaxed));
    assert_eq!(after.deferred - before.deferred, sys_frees, "every glibc free in the handler was deferred");
    assert_eq!(after.drained - before.drained, sys_frees, "every deferred free was drained");
    assert_eq!(after.leaked, before.leaked, "nothing leaked");
    assert_eq!(
        end.nolock_frees - before.nolock_frees,
        HY_NOLOCK_FREES.load(Ordering::Relaxed) + main_nolock_frees,
        "every free of nolock memory went to nolock"
    );
    assert!(sys_frees > 10 && handoffs > 10, "the handler freed glibc blocks and handed blocks over");
}

fn release_hybrid_ring() {
    for i in 0..RING {
        let a = HR_ADDR[i].swap(0, Ordering::Relaxed) as *mut u8;
        if !a.is_null() {
            let size = HR_SIZE[i].load(Ordering::Relaxed);
            assert!(intact(a, size, HR_SEQ[i].load(Ordering::Relaxed)), "a handler block changed while live");
            // SAFETY: a block of the handler's with this layout, freed once.
            unsafe { A.dealloc(a, layout(size)) };
        }
    }
}

/// Normal-context `Box`, `Vec` growth and raw `alloc`/`realloc`/`dealloc` through `HybridAlloc<System>` (glibc
/// underneath, and the deferred-free drain) stepped, with a marked handler allocating, growing and freeing
/// through the same allocator at every boundary, freeing glibc blocks (deferred) and handing nolock blocks to
/// the stepped code.
#[test]
fn hybrid_alloc_handler_at_every_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_HYBRID, &EVERY_ONE, 50_000, |_, _, _| hybrid_pass(60));
    release_hybrid_ring();
}

#[test]
fn hybrid_alloc_handler_at_every_third_instruction() {
    let _reports = testkit::NoReports::new();
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    run_passes(MODE_HYBRID, &EVERY_THIRD, 15_000, |_, _, _| hybrid_pass(20));
    release_hybrid_ring();
}
