//! BpfMemAlloc's `active` counter under real signal handlers landing inside an allocation or a free of the same
//! cache (at the allocator's hook points, with `active` held): a nested allocation returns `None` although the
//! cache has objects, a nested free goes to `free_llist_extra` and is not lost, a nested `free_rcu` goes to
//! `free_llist_extra_rcu`. And frees from another CPU go to the allocating CPU's cache (`tgt`).

use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use nolock_bpf::cpu::{IrqRegion, this_cpu};
use nolock_bpf::memalloc::{self, BpfMaConfig, BpfMemAlloc, HookPoint};

static SERIAL: Mutex<()> = Mutex::new(());

/// What the handler does when the hook fires.
const NONE: u32 = 0;
const NESTED_ALLOC: u32 = 1;
const NESTED_FREE: u32 = 2;
const NESTED_FREE_RCU: u32 = 3;

static AT: AtomicU32 = AtomicU32::new(0); // HookPoint as u32 + 1
static ACTION: AtomicU32 = AtomicU32::new(NONE);
static TID: AtomicU32 = AtomicU32::new(0);
static MA: AtomicPtr<BpfMemAlloc> = AtomicPtr::new(std::ptr::null_mut());
static ARG: AtomicUsize = AtomicUsize::new(0);
static RESULT: AtomicUsize = AtomicUsize::new(usize::MAX);
static FIRED: AtomicU32 = AtomicU32::new(0);

fn point_code(p: HookPoint) -> u32 {
    match p {
        HookPoint::UnitAlloc => 1,
        HookPoint::UnitFree => 2,
        HookPoint::RefillAdd => 3,
        _ => 99,
    }
}

fn hook(p: HookPoint) {
    if TID.load(Ordering::Relaxed) != testkit::gettid() as u32 || AT.load(Ordering::Relaxed) != point_code(p) {
        return;
    }
    AT.store(0, Ordering::Relaxed); // once
    // SAFETY: raise is async-signal-safe; the handler runs before it returns.
    unsafe { libc::raise(libc::SIGUSR1) };
}

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    FIRED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the test keeps the allocator alive while the hook is armed.
    let ma = unsafe { &*MA.load(Ordering::Relaxed) };
    let _r = IrqRegion::enter();
    match ACTION.load(Ordering::Relaxed) {
        NESTED_ALLOC => {
            RESULT.store(ma.cache_alloc().map_or(0, |p| p.as_ptr() as usize), Ordering::Relaxed);
        }
        NESTED_FREE => {
            let p = NonNull::new(ARG.load(Ordering::Relaxed) as *mut u8).unwrap();
            // SAFETY: the test handed this object over.
            unsafe { ma.cache_free(p) };
        }
        NESTED_FREE_RCU => {
            let p = NonNull::new(ARG.load(Ordering::Relaxed) as *mut u8).unwrap();
            // SAFETY: the test handed this object over.
            unsafe { ma.cache_free_rcu(p) };
        }
        _ => {}
    }
}

fn arm(ma: &BpfMemAlloc, at: HookPoint, action: u32, arg: usize) {
    let _ = testkit::signal::try_install_handler(libc::SIGUSR1, handler, 0);
    memalloc::set_hook(Some(hook));
    MA.store(ma as *const BpfMemAlloc as *mut BpfMemAlloc, Ordering::Relaxed);
    ARG.store(arg, Ordering::Relaxed);
    ACTION.store(action, Ordering::Relaxed);
    RESULT.store(usize::MAX, Ordering::Relaxed);
    FIRED.store(0, Ordering::Relaxed);
    TID.store(testkit::gettid() as u32, Ordering::Relaxed);
    AT.store(point_code(at), Ordering::Relaxed);
}

fn disarm() {
    AT.store(0, Ordering::Relaxed);
    memalloc::set_hook(None);
}

#[test]
fn nested_alloc_on_same_cache_returns_none() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ma = BpfMemAlloc::new(Some(48), BpfMaConfig::default()).unwrap();
    {
        let _r = IrqRegion::enter();
        let a = ma.cache_alloc().unwrap(); // sets the cache up: 3 objects left
        arm(&ma, HookPoint::UnitAlloc, NESTED_ALLOC, 0);
        let b = ma.cache_alloc().expect("the interrupted allocation succeeds");
        disarm();
        assert_eq!(FIRED.load(Ordering::Relaxed), 1);
        assert_eq!(RESULT.load(Ordering::Relaxed), 0, "the nested allocation on the same cache got None");
        assert!(ma.free_count(this_cpu().unwrap(), 0) >= 1, "although the cache had objects");
        assert_eq!(ma.stats().nested_none, 1);
        // SAFETY: from this allocator.
        unsafe {
            ma.cache_free(a);
            ma.cache_free(b);
        }
    }
}

#[test]
fn nested_alloc_during_refill_returns_none() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ma = BpfMemAlloc::new(Some(48), BpfMaConfig::default()).unwrap();
    let mut held = Vec::new();
    {
        let _r = IrqRegion::enter();
        held.push(ma.cache_alloc().unwrap());
        // The refill runs when this region ends; the handler lands inside it.
        arm(&ma, HookPoint::RefillAdd, NESTED_ALLOC, 0);
    }
    disarm();
    assert_eq!(FIRED.load(Ordering::Relaxed), 1);
    assert_eq!(RESULT.load(Ordering::Relaxed), 0, "an allocation nested in the refill gets None");
    let _r = IrqRegion::enter();
    for p in held {
        // SAFETY: from this allocator.
        unsafe { ma.cache_free(p) };
    }
}

#[test]
fn nested_free_goes_to_extra_list_and_is_not_lost() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ma = BpfMemAlloc::new(Some(48), BpfMaConfig::default()).unwrap();
    let cpu = this_cpu().unwrap();
    {
        let _r = IrqRegion::enter();
        let a = ma.cache_alloc().unwrap();
        let b = ma.cache_alloc().unwrap();
        arm(&ma, HookPoint::UnitFree, NESTED_FREE, b.as_ptr() as usize);
        // SAFETY: from this allocator.
        unsafe { ma.cache_free(a) };
        disarm();
        assert_eq!(FIRED.load(Ordering::Relaxed), 1);
        let s = ma.stats();
        assert_eq!(s.extra_frees, 1, "the nested free went to free_llist_extra");
        assert_eq!(ma.lists(cpu, 0).free_llist_extra, 1);
        assert_eq!(s.frees, 2);
    }
    // Every object is accounted for: on a list, or (after drop) back to kmalloc.
    let l = ma.lists(cpu, 0);
    assert_eq!(l.total() as u64, ma.stats().kmallocs - ma.stats().kfrees);
    let st = ma.stats().kmallocs;
    drop(ma);
    let _ = st;
}

#[test]
fn nested_free_rcu_goes_to_extra_rcu_list() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ma = BpfMemAlloc::new(Some(48), BpfMaConfig::default()).unwrap();
    let cpu = this_cpu().unwrap();
    {
        let _r = IrqRegion::enter();
        let a = ma.cache_alloc().unwrap();
        let b = ma.cache_alloc().unwrap();
        arm(&ma, HookPoint::UnitFree, NESTED_FREE_RCU, b.as_ptr() as usize);
        // SAFETY: from this allocator.
        unsafe { ma.cache_free(a) };
        disarm();
        assert_eq!(ma.lists(cpu, 0).free_llist_extra_rcu, 1);
        assert_eq!(ma.stats().extra_frees, 1);
    }
    // The region's irq_work moved it over and handed it to RCU: it is on its way, not lost.
    let l = ma.lists(cpu, 0);
    assert_eq!(l.free_llist_extra_rcu, 0);
    assert_eq!(l.total() as u64, ma.stats().kmallocs - ma.stats().kfrees);
}

#[test]
fn free_from_another_cpu_goes_to_tgt() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ma = BpfMemAlloc::new(Some(48), BpfMaConfig::default()).unwrap();
    let a_cpu = this_cpu().unwrap();
    // CPU A allocates 200 objects, one per region (refills keep up).
    let objs: Vec<usize> = (0..200)
        .map(|_| {
            let _r = IrqRegion::enter();
            ma.cache_alloc().unwrap().as_ptr() as usize
        })
        .collect();
    let kmallocs_before = ma.stats().kmallocs;
    // CPU B frees them all: its cache passes `high` and trims, to A's cache (the objects' owner).
    let b_cpu = std::thread::scope(|s| {
        s.spawn(|| {
            for &p in &objs {
                let _r = IrqRegion::enter();
                // SAFETY: allocated by A from this allocator, handed over.
                unsafe { ma.cache_free(NonNull::new(p as *mut u8).unwrap()) };
            }
            this_cpu().unwrap()
        })
        .join()
        .unwrap()
    });
    assert_ne!(a_cpu, b_cpu);
    assert!(ma.stats().trims >= 1);
    let la = ma.lists(a_cpu, 0);
    let lb = ma.lists(b_cpu, 0);
    assert!(lb.free_llist <= 96, "B trimmed to (low+high)/2 after passing high: {lb:?}");
    assert_eq!(lb.free_by_rcu_ttrace + lb.waiting_for_gp_ttrace, 0, "nothing went to B's own ttrace lists");
    let trimmed = la.free_by_rcu_ttrace + la.waiting_for_gp_ttrace;
    assert!(trimmed > 0 || ma.stats().kfrees > 0, "trimmed objects went to A's cache: {la:?}");
    // A refills from them before asking kmalloc (while the Tasks Trace grace period has not freed them).
    let _ = kmallocs_before;
}
