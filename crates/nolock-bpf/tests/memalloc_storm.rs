//! BpfMemAlloc under a signal storm: threads and their signal handlers (which nest, and land anywhere in the
//! allocator, `active` held or not) allocate, stamp, check and free (immediately or by `free_rcu`) from one
//! variable-size allocator. Every object handed out carries a unique stamp checked before its free (a double
//! hand-out or a write after free shows), nested allocations may fail (that is the baseline's behaviour) but
//! no object is lost: at destroy the group is back to 0 and every kmalloc'd object was kfree'd. Bounded in
//! time; fails on any nolock report.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nolock::memcg::MemGroup;
use nolock_bpf::cpu::IrqRegion;
use nolock_bpf::memalloc::{BpfMaConfig, BpfMemAlloc, RefillMode};
use testkit::storm::{self, StormSlot};

const STASH: usize = 16;

static MA: AtomicPtr<BpfMemAlloc> = AtomicPtr::new(std::ptr::null_mut());
static SEQ: AtomicU64 = AtomicU64::new(1);
static STAMP_ERRORS: AtomicU64 = AtomicU64::new(0);
static OPS: AtomicU64 = AtomicU64::new(0);
static NONE: AtomicU64 = AtomicU64::new(0);

struct PerThread {
    slot: StormSlot,
    rng: AtomicU64,
    /// Objects held across calls; taken and replaced with atomic swaps only (handlers nest).
    stash: [AtomicUsize; STASH],
}

/// Size of the object at `p`, from its stamp word 1 (we store the size there).
fn size_of_obj(p: usize) -> usize {
    // SAFETY: objects hold at least 16 bytes; word 1 holds the size (written by `one_op`).
    unsafe { ((p + 8) as *const u64).read_volatile() as usize }
}

fn check_and_free(ma: &BpfMemAlloc, p: usize, rcu: bool) {
    let size = size_of_obj(p);
    let seq = {
        // SAFETY: word 0 is the stamp.
        unsafe { (p as *const u64).read_volatile() }
    };
    // Stamp: word 0 = seq, word 1 = size, the rest pattern-derived from seq.
    for i in 2..size / 8 {
        // SAFETY: inside the object.
        let w = unsafe { ((p + 8 * i) as *const u64).read_volatile() };
        if w != testkit::pattern_word(seq, i) {
            STAMP_ERRORS.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    // SAFETY: from this allocator, not used again.
    unsafe {
        if rcu {
            ma.free_rcu(NonNull::new_unchecked(p as *mut u8));
        } else {
            ma.free(NonNull::new_unchecked(p as *mut u8));
        }
    }
}

fn one_op(ma: &BpfMemAlloc, st: &PerThread) {
    let r = testkit::splitmix64(st.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed));
    let _region = IrqRegion::enter();
    let size = 16 + (r as usize % 1000) / 8 * 8;
    match ma.alloc(size) {
        Some(p) => {
            let p = p.as_ptr() as usize;
            let seq = SEQ.fetch_add(1, Ordering::Relaxed);
            // SAFETY: a fresh object of `size` bytes.
            unsafe {
                (p as *mut u64).write_volatile(seq);
                ((p + 8) as *mut u64).write_volatile(size as u64);
                for i in 2..size / 8 {
                    ((p + 8 * i) as *mut u64).write_volatile(testkit::pattern_word(seq, i));
                }
            }
            let old = st.stash[(r >> 20) as usize % STASH].swap(p, Ordering::AcqRel);
            if old != 0 {
                check_and_free(ma, old, r & (1 << 40) != 0);
            }
        }
        None => {
            NONE.fetch_add(1, Ordering::Relaxed);
            let old = st.stash[(r >> 20) as usize % STASH].swap(0, Ordering::AcqRel);
            if old != 0 {
                check_and_free(ma, old, false);
            }
        }
    }
    OPS.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the storm's sigev_value is the thread's PerThread, alive while its timers run.
    unsafe {
        storm::dispatch_timer_signal::<PerThread>(info, |st, overrun| {
            st.slot.count(overrun);
            let ma = MA.load(Ordering::Acquire);
            if !ma.is_null() {
                one_op(&*ma, st);
            }
        })
    };
}

static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn storm_alloc_free_in_handlers_loses_nothing() {
    run_storm(RefillMode::AtRegionEnd);
}

/// The same with the refill arriving late (1 ms): many more `None`s, still nothing lost.
#[test]
fn storm_with_late_refill_loses_nothing() {
    run_storm(RefillMode::Late(Duration::from_millis(1)));
}

fn run_storm(refill: RefillMode) {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for c in [&STAMP_ERRORS, &OPS, &NONE] {
        c.store(0, Ordering::Relaxed);
    }
    let group = Arc::new(MemGroup::new());
    let ma = Box::new(
        BpfMemAlloc::new(None, BpfMaConfig { group: Some(group.clone()), refill, ..Default::default() }).unwrap(),
    );
    MA.store(&*ma as *const BpfMemAlloc as *mut BpfMemAlloc, Ordering::Release);
    let _saved = storm::install_handler(handler).expect("install the storm handler");
    let threads = 2;
    let interval = storm::nominal_interval_ns(40_000, threads).unwrap();
    let deadline = Instant::now() + Duration::from_millis(1500);
    let signals: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let ma = &*ma;
                s.spawn(move || {
                    let st = Box::new(PerThread {
                        slot: StormSlot::new(),
                        rng: AtomicU64::new(t as u64 + 1),
                        stash: [const { AtomicUsize::new(0) }; STASH],
                    });
                    {
                        let _timers = st.slot.start(&*st as *const PerThread as *mut libc::c_void, interval).unwrap();
                        while Instant::now() < deadline {
                            one_op(ma, &st);
                        }
                    }
                    // Timers gone, no handler runs any more: give back what the stash holds.
                    let _r = IrqRegion::enter();
                    for c in &st.stash {
                        let p = c.swap(0, Ordering::Relaxed);
                        if p != 0 {
                            check_and_free(ma, p, false);
                        }
                    }
                    st.slot.signals()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    MA.store(std::ptr::null_mut(), Ordering::Release);
    let s = ma.stats();
    eprintln!(
        "storm ({refill:?}): {signals} signals, {} ops, {} None (nested {}, empty {}), {} extra-list frees, {} refills, {} trims",
        OPS.load(Ordering::Relaxed),
        NONE.load(Ordering::Relaxed),
        s.nested_none,
        s.empty_none,
        s.extra_frees,
        s.refills,
        s.trims
    );
    assert!(signals > 100, "the storm ran");
    assert_eq!(STAMP_ERRORS.load(Ordering::Relaxed), 0, "an object changed while handed out");
    assert_eq!(s.allocs, s.frees, "every object handed out came back");
    assert_eq!(s.bad_frees, 0);
    drop(ma);
    assert_eq!(group.current(), 0, "every object went back to kmalloc: none lost");
}
