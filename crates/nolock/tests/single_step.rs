//! The allocator's fast and slow paths under a signal at *every instruction*: x86-64 single-stepping (the trap
//! flag raises SIGTRAP after each instruction of the stepped code) with a handler that allocates, fills, checks
//! and frees objects of the same size classes, and enters an RCU reader, as a profiler's handler would.
//!
//! The stepped code allocates more objects than a thread's list holds (refills from partial slabs and new
//! slabs), frees them in random order (flushes of a fragmented list, grouped by slab), frees through
//! `kfree_rcu_nolock` and `call_rcu_nolock`, and runs SRCU-fast readers. So every instruction boundary of those
//! paths meets a handler that takes the busy route (the next size class, the shared slab lists, a deferred
//! free), and the owner then drains what the handler deferred.
//!
//! What must hold: no allocation fails (memory is plentiful), no object changes while it is live (patterns
//! checked in both contexts), no address is handed out twice, every RCU callback runs once, and nothing is
//! reported (a double free, a damaged list). The trap handler runs with the trap flag clear, so its own calls
//! are not stepped.

#![cfg(target_arch = "x86_64")]

use std::collections::HashSet;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use std::alloc::Layout;

use nolock::{Gfp, KmemCache, RcuHead, SlabFlags, SrcuFast, kfree_nolock, kfree_rcu_nolock, kmalloc_nolock};

static TRAPS: AtomicU64 = AtomicU64::new(0);
/// The handler acts at trap numbers `PHASE (mod EVERY)`.
static EVERY: AtomicU64 = AtomicU64::new(1);
static PHASE: AtomicU64 = AtomicU64::new(0);
static ACTED: AtomicU64 = AtomicU64::new(0);
/// Handler allocations that returned `None`, and objects the handler found changed.
static HANDLER_FAILED: AtomicU64 = AtomicU64::new(0);
static HANDLER_DAMAGED: AtomicU64 = AtomicU64::new(0);

/// The handler's live objects (address, size), freed when their slot comes round again.
const RING: usize = 48;
static RING_ADDR: [AtomicUsize; RING] = [const { AtomicUsize::new(0) }; RING];
static RING_SIZE: [AtomicUsize; RING] = [const { AtomicUsize::new(0) }; RING];
static RING_POS: AtomicUsize = AtomicUsize::new(0);

/// Sizes the handler allocates: the stepped code's main class, a smaller one, the next one up (where a busy
/// 64-byte list sends allocations) and a larger one.
const HANDLER_SIZES: [usize; 4] = [64, 16, 96, 1000];

static CALLBACKS: AtomicU64 = AtomicU64::new(0);
/// Tests here take turns: the trap handler and its counters are process-wide.
static TURN: Mutex<()> = Mutex::new(());

extern "C" fn on_trap(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: an SA_SIGINFO handler's third argument is the interrupted context.
    if !unsafe { testkit::step::still_stepping(ctx) } {
        return;
    }
    let n = TRAPS.fetch_add(1, Ordering::Relaxed);
    if n % EVERY.load(Ordering::Relaxed) != PHASE.load(Ordering::Relaxed) {
        return;
    }
    ACTED.fetch_add(1, Ordering::Relaxed);
    let size = HANDLER_SIZES[(n / EVERY.load(Ordering::Relaxed)) as usize % HANDLER_SIZES.len()];
    let Some(p) = kmalloc_nolock(size, Gfp::NONE) else {
        HANDLER_FAILED.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // SAFETY: a fresh object of `size` bytes.
    unsafe { testkit::fill(p.as_ptr(), size, p.as_ptr() as u64) };
    let i = RING_POS.fetch_add(1, Ordering::Relaxed) % RING;
    let old = RING_ADDR[i].swap(p.as_ptr() as usize, Ordering::Relaxed);
    let old_size = RING_SIZE[i].swap(size, Ordering::Relaxed);
    if old != 0 {
        release(old, old_size);
    }
    // A reader nested in whatever the stepped code was doing (an RCU section, a grace-period step).
    drop(nolock::rcu_read_lock());
    // The caches and the page allocator, when the stepped code is using them: an allocation and a free each.
    let caches = CACHES.load(Ordering::Acquire);
    if !caches.is_null() {
        // SAFETY: published by `caches_and_pages_at_every_instruction`, leaked, never freed.
        for c in unsafe { &*caches } {
            let Some(o) = c.alloc_nolock(Gfp::NONE) else {
                HANDLER_FAILED.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            // SAFETY: an object of this cache, given back once.
            unsafe { c.free_nolock(o) };
        }
        match nolock::alloc_pages_nolock(0, Gfp::NONE) {
            // SAFETY: the page just allocated, order 0.
            Some(pg) => unsafe { nolock::free_pages_nolock(pg, 0) },
            None => {
                HANDLER_FAILED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The caches of `caches_and_pages_at_every_instruction`, for the handler (null: not in use).
static CACHES: AtomicPtr<[KmemCache; 2]> = AtomicPtr::new(std::ptr::null_mut());
/// The type-safe cache's constructor: the tag lock-free readers would probe.
const TAG: u64 = 0x7a6_5afe;

fn tag_ctor(p: NonNull<u8>) {
    // SAFETY: the constructor gets a whole, aligned object of the cache (48 bytes).
    unsafe { p.cast::<u64>().write(TAG) };
}

/// Check and free one of the handler's objects.
fn release(addr: usize, size: usize) {
    // SAFETY: a live object of `size` bytes the handler filled with the pattern of its address.
    if unsafe { testkit::check(addr as *const u8, size, Some(addr as u64), u64::MAX) }.is_err() {
        HANDLER_DAMAGED.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: from kmalloc_nolock, freed once (its ring slot no longer names it).
    unsafe { kfree_nolock(addr as *mut u8) };
}

fn count_callback(head: NonNull<RcuHead>) {
    CALLBACKS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the head sits at the start of a kmalloc object given to call_rcu_nolock; the callback owns it.
    unsafe { kfree_nolock(head.as_ptr().cast()) };
}

/// Objects of the stepped code's size classes: mostly 64 B (more than one thread list holds, so refills and
/// flushes happen while stepped), some 16 B and 4 KiB.
fn size_of_obj(i: usize) -> usize {
    match i % 16 {
        0 => 16,
        5 => 4096,
        _ => 64,
    }
}

/// Bytes of each object the stepped code fills and checks (all of a small one; the head of a 4 KiB one, so that
/// the steps go to the allocator rather than to the pattern loop).
const FILLED: usize = 32;

/// One stepped run with the handler acting at every `every`-th instruction, from instruction `phase`.
fn stepped_run(objects: usize, every: u64, phase: u64, seed: u64) {
    EVERY.store(every, Ordering::SeqCst);
    PHASE.store(phase, Ordering::SeqCst);
    let mut rng = testkit::Rng::new(seed);
    let mut order: Vec<usize> = (0..objects).collect();
    for i in (1..objects).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut objs: Vec<(usize, usize)> = Vec::with_capacity(objects);
    let srcu = SrcuFast::new();
    let rcu_objs = 40;

    // Stepped: allocate and fill.
    testkit::step::start();
    for i in 0..objects {
        let size = size_of_obj(i);
        let p = kmalloc_nolock(size, Gfp::NONE).expect("allocation failed with memory available");
        // SAFETY: a fresh object of at least `FILLED.min(size)` bytes.
        unsafe { testkit::fill(p.as_ptr(), FILLED.min(size), i as u64) };
        objs.push((p.as_ptr() as usize, size));
    }
    testkit::step::stop();

    // No address is live twice: the stepped code's objects and the handler's.
    let mut seen = HashSet::new();
    for &(a, _) in &objs {
        assert!(seen.insert(a), "address {a:#x} handed out twice");
    }
    for r in &RING_ADDR {
        let a = r.load(Ordering::Relaxed);
        assert!(a == 0 || seen.insert(a), "address {a:#x} is both the handler's and the stepped code's");
    }

    // Stepped: check and free in random order, retire through RCU, read under SRCU-fast.
    let cb0 = CALLBACKS.load(Ordering::Relaxed);
    testkit::step::start();
    for (k, &i) in order.iter().enumerate() {
        let (a, size) = objs[i];
        // SAFETY: a live object whose first `FILLED.min(size)` bytes hold pattern `i`.
        if let Err(d) = unsafe { testkit::check(a as *const u8, FILLED.min(size), Some(i as u64), u64::MAX) } {
            testkit::step::stop();
            panic!("object {i} at {a:#x} changed while live: {d:?}");
        }
        if k % 64 == 0 {
            let _r = srcu.read_lock_fast();
        }
        if k < rcu_objs && size >= 64 {
            // SAFETY: a kmalloc object of at least 64 bytes; its first 16 bytes become the head, which nothing
            // else uses from here on.
            unsafe {
                let head = NonNull::new_unchecked(a as *mut RcuHead);
                if k % 2 == 0 {
                    kfree_rcu_nolock(a as *mut u8, head);
                } else {
                    nolock::call_rcu_nolock(head, count_callback);
                }
            }
        } else {
            // SAFETY: from kmalloc_nolock, freed once.
            unsafe { kfree_nolock(a as *mut u8) };
        }
    }
    testkit::step::stop();
    nolock::rcu_barrier();
    let want = order[..rcu_objs].iter().enumerate().filter(|&(k, &i)| k % 2 == 1 && size_of_obj(i) >= 64).count();
    assert_eq!(CALLBACKS.load(Ordering::Relaxed) - cb0, want as u64, "each call_rcu callback runs once");
}

fn run_passes(passes: &[(u64, u64)], objects: usize) {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _reports = testkit::NoReports::new();
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    // Warm up: the thread's slot and lists, the arena, the RCU machinery (system calls allowed here).
    nolock::init();
    for s in [16usize, 64, 96, 1000, 4096] {
        let p = kmalloc_nolock(s, Gfp::NONE).unwrap();
        // SAFETY: just allocated.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
    nolock::synchronize_rcu();
    for (n, &(every, phase)) in passes.iter().enumerate() {
        let t0 = TRAPS.load(Ordering::Relaxed);
        let a0 = ACTED.load(Ordering::Relaxed);
        stepped_run(objects, every, phase, 0x5eed + n as u64);
        let (traps, acted) = (TRAPS.load(Ordering::Relaxed) - t0, ACTED.load(Ordering::Relaxed) - a0);
        eprintln!("pass {n}: every {every} from {phase}: {traps} traps, handler acted {acted} times");
        assert!(traps > 100_000, "single-stepping ran ({traps} traps)");
        assert!(acted * every >= traps - every, "the handler acted at every {every}th trap ({acted} of {traps})");
    }
    // Give the handler's objects back.
    for i in 0..RING {
        let a = RING_ADDR[i].swap(0, Ordering::Relaxed);
        if a != 0 {
            release(a, RING_SIZE[i].load(Ordering::Relaxed));
        }
    }
    assert_eq!(HANDLER_FAILED.load(Ordering::Relaxed), 0, "a handler allocation failed with memory available");
    assert_eq!(HANDLER_DAMAGED.load(Ordering::Relaxed), 0, "a handler object changed while live");
}

/// The handler at every instruction: each boundary of the paths meets a nested allocation and free, with the
/// state the previous handler left (deferred frees waiting, lists moved by the busy route).
#[test]
fn handler_at_every_instruction() {
    run_passes(&[(1, 0)], 1500);
}

/// The handler at every third instruction, each of the three phases in turn: boundaries also meet a handler
/// when the owner has drained what earlier handlers left.
#[test]
fn handler_at_every_third_instruction() {
    run_passes(&[(3, 0), (3, 1), (3, 2)], 700);
}

/// A hardened cache (every popped link checked, encoded links), a type-safe one with a constructor (its frees
/// wait for a Tasks Trace grace period), and pages of orders 0 to 2, stepped while the handler uses the same
/// caches and the page allocator at every instruction.
#[test]
fn caches_and_pages_at_every_instruction() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _reports = testkit::NoReports::new();
    testkit::install_handler(libc::SIGTRAP, on_trap, 0);
    nolock::init();
    let layout = Layout::from_size_align(48, 8).unwrap();
    let hardened = KmemCache::builder("step-hardened", layout).hardened(true).build().unwrap();
    let typesafe = KmemCache::builder("step-typesafe", layout)
        .flags(SlabFlags::TYPESAFE_BY_SRCU_FAST)
        .freeptr_offset(40)
        .ctor(tag_ctor)
        .build()
        .unwrap();
    let caches: &'static [KmemCache; 2] = Box::leak(Box::new([hardened, typesafe]));
    // Warm up every path the handler takes (first calls may map memory).
    for c in caches {
        let o = c.alloc_nolock(Gfp::NONE).unwrap();
        // SAFETY: just allocated from `c`.
        unsafe { c.free_nolock(o) };
    }
    let pg = nolock::alloc_pages_nolock(2, Gfp::NONE).unwrap();
    // SAFETY: the run just allocated.
    unsafe { nolock::free_pages_nolock(pg, 2) };
    CACHES.store(std::ptr::from_ref(caches).cast_mut(), Ordering::Release);
    EVERY.store(1, Ordering::SeqCst);
    PHASE.store(0, Ordering::SeqCst);

    let n = 600;
    let mut rng = testkit::Rng::new(0xcac4e);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut objs: Vec<(usize, usize)> = Vec::with_capacity(n);
    let mut pages: Vec<(NonNull<u8>, u32)> = Vec::with_capacity(30);
    let t0 = TRAPS.load(Ordering::Relaxed);
    testkit::step::start();
    for i in 0..n {
        let which = i % 2;
        let o = caches[which].alloc_nolock(Gfp::NONE).expect("cache allocation failed with memory available");
        if which == 1 {
            // SAFETY: an object of the type-safe cache: its constructor wrote the tag once, at slab set-up.
            let tag = unsafe { o.cast::<u64>().read() };
            if tag != TAG {
                testkit::step::stop();
                panic!("type-safe object {i} lost its constructed tag: {tag:#x}");
            }
        }
        // SAFETY: bytes 8..40 of our 48-byte object (the type-safe cache's link word is at 40, its tag at 0).
        unsafe { testkit::fill(o.as_ptr().add(8), 32, i as u64) };
        objs.push((o.as_ptr() as usize, which));
        if i % 10 == 0 {
            let order = (i / 10 % 3) as u32;
            pages.push((nolock::alloc_pages_nolock(order, Gfp::NONE).expect("pages failed"), order));
        }
    }
    for &i in &order {
        let (a, which) = objs[i];
        // SAFETY: the 32 bytes filled above.
        if let Err(d) = unsafe { testkit::check((a + 8) as *const u8, 32, Some(i as u64), u64::MAX) } {
            testkit::step::stop();
            panic!("cache object {i} changed while live: {d:?}");
        }
        // SAFETY: allocated from this cache above, freed once.
        unsafe { caches[which].free_nolock(NonNull::new_unchecked(a as *mut u8)) };
    }
    for &(p, order) in &pages {
        // SAFETY: allocated above with this order, freed once.
        unsafe { nolock::free_pages_nolock(p, order) };
    }
    testkit::step::stop();
    CACHES.store(std::ptr::null_mut(), Ordering::Release);
    let traps = TRAPS.load(Ordering::Relaxed) - t0;
    eprintln!("caches and pages: {traps} traps");
    assert!(traps > 50_000, "single-stepping ran ({traps} traps)");
    let mut seen = HashSet::new();
    assert!(objs.iter().all(|&(a, _)| seen.insert(a)), "a cache handed out an object twice");
    assert_eq!(HANDLER_FAILED.load(Ordering::Relaxed), 0, "a handler allocation failed with memory available");
    nolock::rcu_barrier_tasks_trace();
}
