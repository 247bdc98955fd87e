//! `kfree_rcu_nolock` pointer blocks taken from another thread's slot ("stealing": barriers, the worker's aging
//! tick, type-safe cache destroy) must be queued exactly once, whatever else touches the slot meanwhile:
//!
//! - **stealer against stealer**: two `rcu_barrier` calls at once both used to claim the slot (a plain store),
//!   both took the block (a load, then a store of 0) and both queued it: every pointer in it freed twice.
//! - **stealer against the owner's exit**: the exit path checked only the busy flag, not the claim, and took
//!   the block with a swap while the stealer held it: queued twice again.
//!
//! The hook at `Point::KfreeSteal` (a stealer that holds the slot, right before it takes the block) makes each
//! interleaving happen on purpose: the first test checks directly that two stealers are never inside the same
//! slot at once; the second holds the slot while its owner exits. Debug mode is on, so a second free of any
//! object is reported; the tests fail on any report.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nolock::hooks::{Point, set_hook};
use nolock::{Gfp, RcuHead, kfree_rcu_nolock, kmalloc_nolock};

static SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    /// Set on the test's stealer threads (the worker's aging tick also steals; the hook ignores it).
    static TEST_STEALER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Which scenario the hook plays.
static MODE: AtomicU32 = AtomicU32::new(0);
const MODE_TWO_STEALERS: u32 = 1;
const MODE_STEALER_VS_EXIT: u32 = 2;

/// Test stealers that reached the hook.
static ARRIVED: AtomicU32 = AtomicU32::new(0);
/// Test stealers inside the hook right now, and whether two ever were at once.
static INSIDE: AtomicU32 = AtomicU32::new(0);
static OVERLAP: AtomicBool = AtomicBool::new(false);
/// Stealer-vs-exit: the hook asks the owner to exit and waits until it has.
static OWNER_GO: AtomicBool = AtomicBool::new(false);
static OWNER_GONE: AtomicBool = AtomicBool::new(false);

fn wait_until(flag: impl Fn() -> bool, limit: Duration) -> bool {
    let start = Instant::now();
    while !flag() {
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn hook(at: Point) {
    if at != Point::KfreeSteal || !TEST_STEALER.with(|t| t.get()) {
        return;
    }
    ARRIVED.fetch_add(1, Ordering::AcqRel);
    match MODE.load(Ordering::Acquire) {
        // Hold the slot for a while, waiting for the other stealer to get inside too: it must not, while one
        // stealer holds the slot (claims exclude each other), or both take the block.
        MODE_TWO_STEALERS => {
            if INSIDE.fetch_add(1, Ordering::AcqRel) != 0 {
                OVERLAP.store(true, Ordering::Release);
            }
            let start = Instant::now();
            while ARRIVED.load(Ordering::Acquire) < 2 && start.elapsed() < Duration::from_millis(300) {
                std::thread::yield_now();
            }
            INSIDE.fetch_sub(1, Ordering::AcqRel);
        }
        // Hold the slot while its owner exits.
        MODE_STEALER_VS_EXIT => {
            OWNER_GO.store(true, Ordering::Release);
            wait_until(|| OWNER_GONE.load(Ordering::Acquire), Duration::from_secs(10));
        }
        _ => {}
    }
}

/// A retired object: the head is only used if no pointer block is available.
#[repr(C)]
struct Obj {
    head: RcuHead,
    payload: [u64; 6],
}

/// Retire `n` fresh objects from the calling thread (they land in its RCU pointer block).
fn retire_some(n: usize) {
    for i in 0..n {
        let p = kmalloc_nolock(core::mem::size_of::<Obj>(), Gfp::ZERO).expect("memory").cast::<Obj>();
        // SAFETY: fresh object of the right size; retired once, never touched again.
        unsafe {
            (*p.as_ptr()).payload[0] = i as u64;
            kfree_rcu_nolock(p.as_ptr().cast(), core::ptr::NonNull::from(&(*p.as_ptr()).head));
        }
    }
}

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::debug::set_enabled(true);
    nolock::init();
    set_hook(Some(hook));
    ARRIVED.store(0, Ordering::Release);
    OWNER_GO.store(false, Ordering::Release);
    OWNER_GONE.store(false, Ordering::Release);
    g
}

#[test]
fn two_stealers_queue_a_block_once() {
    let _g = setup();
    let reports = nolock::debug::reports();
    // A round is conclusive when a test stealer reached the owner's block. The grace-period worker's aging tick
    // may queue the block first (on a loaded machine the stealers can start later than two ticks after the
    // retire); such a round checks the same things but tests no stealer pair, so it does not count.
    let (mut conclusive, mut attempts) = (0, 0);
    while conclusive < 5 && attempts < 50 {
        attempts += 1;
        MODE.store(MODE_TWO_STEALERS, Ordering::Release);
        ARRIVED.store(0, Ordering::Release);
        let retired = AtomicBool::new(false);
        let release_owner = AtomicBool::new(false);
        std::thread::scope(|s| {
            // The owner keeps its partial block in its slot and stays alive while the stealers run.
            s.spawn(|| {
                retire_some(3);
                retired.store(true, Ordering::Release);
                wait_until(|| release_owner.load(Ordering::Acquire), Duration::from_secs(30));
            });
            assert!(wait_until(|| retired.load(Ordering::Acquire), Duration::from_secs(10)));
            let stealers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        TEST_STEALER.with(|t| t.set(true));
                        nolock::rcu_barrier();
                    })
                })
                .collect();
            for t in stealers {
                t.join().unwrap();
            }
            release_owner.store(true, Ordering::Release);
        });
        nolock::rcu_barrier();
        if ARRIVED.load(Ordering::Acquire) >= 1 {
            conclusive += 1;
        }
        assert!(!OVERLAP.load(Ordering::Acquire), "attempt {attempts}: two stealers held the same slot at once");
        assert_eq!(nolock::debug::reports(), reports, "attempt {attempts}: a block was freed twice (see stderr)");
    }
    assert!(conclusive >= 1, "in {attempts} attempts no test stealer reached the owner's block");
    set_hook(None);
}

#[test]
fn stealer_and_owner_exit_queue_a_block_once() {
    let _g = setup();
    let reports = nolock::debug::reports();
    for round in 0..5 {
        MODE.store(MODE_STEALER_VS_EXIT, Ordering::Release);
        ARRIVED.store(0, Ordering::Release);
        OWNER_GO.store(false, Ordering::Release);
        OWNER_GONE.store(false, Ordering::Release);
        let retired = AtomicBool::new(false);
        std::thread::scope(|s| {
            let owner = s.spawn(|| {
                retire_some(3);
                retired.store(true, Ordering::Release);
                // Exit only once a stealer holds the slot; the exit destructor then meets the claim.
                wait_until(|| OWNER_GO.load(Ordering::Acquire), Duration::from_secs(10));
            });
            assert!(wait_until(|| retired.load(Ordering::Acquire), Duration::from_secs(10)));
            let stealer = s.spawn(|| {
                TEST_STEALER.with(|t| t.set(true));
                nolock::rcu_barrier();
            });
            assert!(wait_until(|| OWNER_GO.load(Ordering::Acquire), Duration::from_secs(10)));
            owner.join().unwrap();
            OWNER_GONE.store(true, Ordering::Release);
            stealer.join().unwrap();
        });
        nolock::rcu_barrier();
        assert!(ARRIVED.load(Ordering::Acquire) >= 1, "round {round}: the stealer did not hold the owner's slot");
        assert_eq!(nolock::debug::reports(), reports, "round {round}: a block was freed twice (see stderr)");
    }
    set_hook(None);
}
