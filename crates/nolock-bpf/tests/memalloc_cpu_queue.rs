//! The deferred-work queue of `cpu::IrqRegion` (the `irq_work` analogue BpfMemAlloc refills with) under a
//! signal at *each instruction in turn* of the code that runs the queue: x86-64 single-stepping (the trap
//! flag raises SIGTRAP after every instruction) and, in round `n`, the handler at the `n`-th instruction opens
//! and closes a region, as a signal handler running a map operation would (and queues one item of its own).
//! Each queued item must run exactly once: the skeleton took an item out of its cell with a load and a
//! store, so a handler landing between them ran the same item again (this test failed on it).

#![cfg(target_arch = "x86_64")]

use std::sync::atomic::{AtomicU64, Ordering};

use nolock_bpf::cpu::IrqRegion;

static RUNS: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
/// Items the test queues; the handler queues item `QUEUED` (the last one).
const QUEUED: usize = 6;
static TRAPS: AtomicU64 = AtomicU64::new(0);
/// The trap (instruction) number at which the handler acts in this round.
static ACT_AT: AtomicU64 = AtomicU64::new(0);
static ACTED: AtomicU64 = AtomicU64::new(0);

fn item(arg: usize) {
    RUNS[arg].fetch_add(1, Ordering::Relaxed);
}

extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted context.
    if !unsafe { testkit::step::still_stepping(ctx) } {
        return;
    }
    if TRAPS.fetch_add(1, Ordering::Relaxed) != ACT_AT.load(Ordering::Relaxed) {
        return;
    }
    ACTED.fetch_add(1, Ordering::Relaxed);
    // A handler that runs a map operation: one region, opened and closed, queueing work of its own.
    let r = IrqRegion::enter();
    IrqRegion::defer(item, QUEUED);
    drop(r);
}

#[test]
fn every_deferred_item_runs_once_with_a_signal_at_each_instruction() {
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    let mut n = 0;
    loop {
        for r in &RUNS {
            r.store(0, Ordering::Relaxed);
        }
        TRAPS.store(0, Ordering::Relaxed);
        ACTED.store(0, Ordering::Relaxed);
        ACT_AT.store(n, Ordering::Relaxed);
        let region = IrqRegion::enter();
        for arg in 0..QUEUED {
            IrqRegion::defer(item, arg);
        }
        testkit::step::start();
        drop(region); // runs the queue, single-stepped
        testkit::step::stop();
        let runs: Vec<u64> = RUNS.iter().map(|r| r.load(Ordering::Relaxed)).collect();
        let acted = ACTED.load(Ordering::Relaxed);
        let mut want = vec![1; QUEUED];
        want.push(acted);
        assert_eq!(runs, want, "handler at instruction {n}: each item ran exactly once");
        if acted == 0 {
            // The handler's instruction lies past the end of the runner: every position was tried.
            assert!(n > 50, "single-stepping ran ({n} instructions)");
            break;
        }
        n += 1;
    }
}
