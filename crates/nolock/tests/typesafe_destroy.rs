//! Destroying type-safe caches (DESIGN.md §1 class D; kernel.md §7: `kmem_cache_destroy` must `rcu_barrier()`).
//!
//! - **Pending work**: slabs queued for their grace period when destroy starts (released by `trim` before, and by
//!   destroy's own drain), with a reader that began before them still inside: destroy must wait for it, and when
//!   it returns every destructor has run and every page is back. One test per flavour (RCU, a static SRCU-fast
//!   domain, Tasks Trace).
//! - **Live objects**: reported (`DestroyReport::live_objects`, a report on standard error, checked in a child
//!   process), their memory stays valid and keeps its type and contents, nothing else is touched, and the slot
//!   is retired (new caches never take it over, so the live objects' pages still name the old cache).
//! - **Other threads' lists**: objects cached in other (live, parked) threads' per-thread lists, of the cache and
//!   of its fallback cache, are taken back by destroy.
//! - **Many caches**: more type-safe caches created and destroyed in a loop than there are cache slots (each
//!   uses two: the cache and its fallback), so slots must be reused, with the right constructor and name.
//! - **Destroy racing a shrink** of the same cache (`trim` on another thread): the two tests at the end found
//!   that destroy skipped a cache another thread was shrinking and reported phantom live objects; destroy now
//!   waits for the shrink in progress.
//!
//! The tests take turns (a mutex): they check process-wide page accounting and page ownership, and install the
//! global reentry hook.

use std::alloc::Layout;
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::Duration;

use nolock::hooks::{Point, set_hook};
use nolock::stats::{PageOwner, allocated_pages, page_owner, snapshot};
use nolock::{Gfp, KmemCache, MAX_CACHES, SlabFlags, SrcuFast, kfree_nolock};

static SERIAL: Mutex<()> = Mutex::new(());

/// A test's turn: the serialization lock, and a watchdog that aborts the process if the test hangs (a grace
/// period that never ends, a destroy waiting forever) instead of stalling the whole run.
struct Turn {
    _lock: MutexGuard<'static, ()>,
    _done: std::sync::mpsc::Sender<()>,
}

fn serial() -> Turn {
    let lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (done, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(60)) {
            eprintln!("typesafe_destroy: a test is still running after 60 s: deadlock? aborting");
            std::process::abort();
        }
    });
    nolock::init();
    set_hook(Some(hook));
    Turn { _lock: lock, _done: done }
}

// ------------------------------------------------------------------------------------------------------------
// Objects, constructors and destructors
// ------------------------------------------------------------------------------------------------------------

#[repr(C)]
struct Obj {
    tag: AtomicU64,
    link: AtomicU64,
    data: [AtomicU64; 6],
}

const FREEPTR: usize = core::mem::offset_of!(Obj, link);
const DESTROYED: u64 = 0xdead_dead_dead_dead;

fn obj<'a>(p: usize) -> &'a Obj {
    // SAFETY: addresses passed here are objects of a type-safe cache of `Obj` layout that the caller owns, or
    // whose slab it knows to be alive: memory that is an `Obj` (all atomics).
    unsafe { &*(p as *const Obj) }
}

/// Counters of one kind of object (one constructor/destructor pair).
struct Kind {
    ctors: AtomicU64,
    dtors: AtomicU64,
    /// Destructor calls that found something wrong (tag not intact, or a reader still inside).
    bad_dtors: AtomicU64,
    /// Set while a reader that must hold off every destructor of this kind is inside its section.
    reader_inside: AtomicBool,
}

const KINDS: usize = 8;
static KIND: [Kind; KINDS] = [const {
    Kind {
        ctors: AtomicU64::new(0),
        dtors: AtomicU64::new(0),
        bad_dtors: AtomicU64::new(0),
        reader_inside: AtomicBool::new(false),
    }
}; KINDS];

const fn tag_of(k: usize) -> u64 {
    0x4445_5354_0000_0000 | ((k as u64 + 1) * 0x0101_0101)
}

fn ctor<const K: usize>(p: NonNull<u8>) {
    let o = obj(p.as_ptr() as usize);
    o.tag.store(tag_of(K), Ordering::Release);
    KIND[K].ctors.fetch_add(1, Ordering::Relaxed);
}

fn dtor<const K: usize>(p: NonNull<u8>) {
    let o = obj(p.as_ptr() as usize);
    if o.tag.load(Ordering::Acquire) != tag_of(K) || KIND[K].reader_inside.load(Ordering::SeqCst) {
        KIND[K].bad_dtors.fetch_add(1, Ordering::Relaxed);
    }
    o.tag.store(DESTROYED, Ordering::Release);
    KIND[K].dtors.fetch_add(1, Ordering::Relaxed);
}

fn counts(k: usize) -> (u64, u64, u64) {
    (
        KIND[k].ctors.load(Ordering::Relaxed),
        KIND[k].dtors.load(Ordering::Relaxed),
        KIND[k].bad_dtors.load(Ordering::Relaxed),
    )
}

static DOMAIN: SrcuFast = SrcuFast::new();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    Rcu,
    StaticSrcu,
    TasksTrace,
}

impl Flavour {
    fn builder(self, name: &str) -> nolock::KmemCacheBuilder<'_> {
        let b = KmemCache::builder(name, Layout::new::<Obj>()).freeptr_offset(FREEPTR);
        match self {
            Flavour::Rcu => b.flags(SlabFlags::TYPESAFE_BY_RCU),
            Flavour::StaticSrcu => b.flags(SlabFlags::TYPESAFE_BY_SRCU_FAST).srcu_domain(&DOMAIN),
            Flavour::TasksTrace => b.flags(SlabFlags::TYPESAFE_BY_SRCU_FAST),
        }
    }

    /// Run `f` inside a read-side section of this flavour.
    fn read<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            Flavour::Rcu => {
                let _g = nolock::rcu_read_lock();
                f()
            }
            Flavour::StaticSrcu => {
                let _g = DOMAIN.read_lock_fast();
                f()
            }
            Flavour::TasksTrace => {
                let _g = nolock::rcu_read_lock_tasks_trace();
                f()
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------------------

fn alloc(cache: &KmemCache, k: usize) -> usize {
    let p = cache.alloc_nolock(Gfp::NONE).expect("allocation").as_ptr() as usize;
    assert_eq!(obj(p).tag.load(Ordering::Acquire), tag_of(k), "a fresh object carries its constructor's tag");
    p
}

fn stamp(p: usize, seed: u64) {
    for (i, w) in obj(p).data.iter().enumerate() {
        w.store(seed.wrapping_mul(31).wrapping_add(i as u64), Ordering::Relaxed);
    }
}

fn stamped(p: usize, seed: u64) -> bool {
    obj(p)
        .data
        .iter()
        .enumerate()
        .all(|(i, w)| w.load(Ordering::Relaxed) == seed.wrapping_mul(31).wrapping_add(i as u64))
}

/// Free an object we own: through the cache, or through `kfree_nolock`, which finds the cache by address.
fn free(cache: &KmemCache, p: usize, via_kfree: bool) {
    if via_kfree {
        // SAFETY: our object, freed once.
        unsafe { nolock::try_kfree_nolock(p as *mut u8) }.expect("kfree_nolock");
    } else {
        // SAFETY: as above.
        unsafe { cache.try_free_nolock(NonNull::new(p as *mut u8).expect("non-null")) }.expect("free_nolock");
    }
}

fn is_slab_of(owner: PageOwner, name: &str) -> bool {
    matches!(owner, PageOwner::Slab(n) if n.as_str() == name)
}

fn cache_listed(name: &str) -> bool {
    snapshot().caches.iter().any(|c| c.name.as_str() == name)
}

// ------------------------------------------------------------------------------------------------------------
// Reentry hook: a nested allocation at `AllocFast`, where the outer allocation holds the thread's list busy
// ------------------------------------------------------------------------------------------------------------

thread_local! {
    /// The cache to allocate from in the hook (address of a `KmemCache`; 0: the hook does nothing).
    static ARM: Cell<usize> = const { Cell::new(0) };
    /// What the nested allocation returned (0: nothing).
    static NESTED: Cell<usize> = const { Cell::new(0) };
    /// Pause this thread at its next `PageFree` point (once).
    static PAUSE_ARMED: Cell<bool> = const { Cell::new(false) };
}

static PAUSED: AtomicBool = AtomicBool::new(false);
static RESUME: AtomicBool = AtomicBool::new(false);

/// Park the calling thread (inside the allocator) until `RESUME`, at most 10 s.
fn pause_here() {
    PAUSED.store(true, Ordering::Release);
    let start = std::time::Instant::now();
    while !RESUME.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn hook(at: Point) {
    if at == Point::PageFree && PAUSE_ARMED.with(|a| a.replace(false)) {
        pause_here();
        return;
    }
    if at != Point::AllocFast {
        return;
    }
    let c = ARM.with(|a| a.replace(0));
    if c == 0 {
        return;
    }
    // SAFETY: `nested_alloc` armed the hook with a cache it borrows for the duration of the outer allocation.
    let cache = unsafe { &*(c as *const KmemCache) };
    let p = cache.alloc_nolock(Gfp::NONE).map_or(0, |p| p.as_ptr() as usize);
    NESTED.with(|n| n.set(p));
}

/// Allocate while a nested context takes the thread's list of `cache` busy: returns (outer, nested). The nested
/// object must come from the paired fallback cache.
fn nested_alloc(cache: &KmemCache, k: usize, name: &str) -> (usize, usize) {
    let before = cache.stats().fallback_allocs;
    ARM.with(|a| a.set(cache as *const KmemCache as usize));
    let outer = alloc(cache, k);
    ARM.with(|a| a.set(0));
    let nested = NESTED.with(|n| n.replace(0));
    assert_ne!(nested, 0, "the nested allocation failed (or the hook did not run)");
    assert_eq!(obj(nested).tag.load(Ordering::Acquire), tag_of(k), "the fallback cache runs the same constructor");
    // At least one more: other threads may take the fallback path of the same cache at the same time. The page
    // owner below says which cache served this nested allocation.
    let after = cache.stats().fallback_allocs;
    assert!(after > before, "the nested allocation was served by the fallback cache ({before} -> {after})");
    let fb = format!("{name}-fb");
    assert!(is_slab_of(page_owner(nested as *const u8), &fb), "{:?}", page_owner(nested as *const u8));
    (outer, nested)
}

// ------------------------------------------------------------------------------------------------------------
// Destroy with pending grace periods and a reader inside
// ------------------------------------------------------------------------------------------------------------

fn destroy_waits<const K: usize>(flavour: Flavour, name: &str) {
    let _s = serial();
    let base_pages = allocated_pages();
    let cache = flavour.builder(name).ctor(ctor::<K>).dtor(dtor::<K>).build().expect("cache");
    let objs: Vec<usize> = (0..1000).map(|_| alloc(&cache, K)).collect();
    let (outer, nested) = nested_alloc(&cache, K, name);
    for (i, &p) in objs.iter().enumerate() {
        stamp(p, i as u64);
    }
    let held = objs[500];

    // A reader enters a section that begins before any slab is released, and stays until told to leave.
    let entered = Arc::new(Barrier::new(2));
    let leave = Arc::new(AtomicBool::new(false));
    let reader = {
        let (entered, leave) = (entered.clone(), leave.clone());
        std::thread::spawn(move || {
            flavour.read(|| {
                KIND[K].reader_inside.store(true, Ordering::SeqCst);
                entered.wait();
                let mut ok = true;
                while !leave.load(Ordering::Acquire) {
                    // Type-safe memory: still an `Obj` of this cache, whatever was freed.
                    ok &= obj(held).tag.load(Ordering::Acquire) == tag_of(K);
                    ok &= matches!(page_owner(held as *const u8), PageOwner::Slab(_));
                    std::thread::sleep(Duration::from_millis(1));
                }
                KIND[K].reader_inside.store(false, Ordering::SeqCst);
                ok
            })
        })
    };
    entered.wait();

    // Free everything and release the empty slabs: they wait for the reader's grace period.
    for (i, &p) in objs.iter().enumerate() {
        free(&cache, p, i % 2 == 0);
    }
    free(&cache, nested, true);
    free(&cache, outer, false);
    nolock::trim();
    let st = cache.stats();
    assert!(st.pending_slabs > 0, "empty slabs wait for the grace period: {st:?}");
    // More work for destroy itself: objects of a fresh slab, cached in this thread's list.
    let more: Vec<usize> = (0..10).map(|_| alloc(&cache, K)).collect();
    for &p in &more {
        free(&cache, p, false);
    }
    assert!(cache.stats().cached_objects >= 10);

    let done = Arc::new(AtomicBool::new(false));
    let destroyer = {
        let done = done.clone();
        std::thread::spawn(move || {
            let r = cache.destroy();
            done.store(true, Ordering::Release);
            r
        })
    };
    // Give destroy every chance to return early; it must not while the reader is inside.
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::Acquire), "destroy returned while a reader older than its pending slabs is inside");
    assert_eq!(counts(K).1, 0, "no destructor runs while the reader is inside");
    assert!(is_slab_of(page_owner(held as *const u8), name), "pages kept while the reader is inside");
    assert_eq!(obj(held).tag.load(Ordering::Acquire), tag_of(K));

    leave.store(true, Ordering::Release);
    assert!(reader.join().expect("reader"), "the reader saw its object change type or lose its slab");
    let report = destroyer.join().expect("destroy");
    assert_eq!(report.live_objects, 0, "{report:?}");
    assert!(report.slabs_released >= 1, "destroy released the slab of this thread's cached objects: {report:?}");

    // When destroy returns, every destructor has run and every page is back.
    let (c, d, bad) = counts(K);
    assert_eq!(c, d, "every constructed object destructed when destroy returns");
    assert_eq!(bad, 0, "a destructor ran with its tag damaged or while the reader was inside");
    for &p in objs.iter().chain(&more).chain([&nested, &outer]) {
        assert_eq!(page_owner(p as *const u8), PageOwner::Free, "page of {p:#x} given back");
    }
    assert!(!cache_listed(name) && !cache_listed(&format!("{name}-fb")), "both slots freed");
    assert_eq!(allocated_pages(), base_pages, "every page back");
}

#[test]
fn destroy_waits_for_reader_and_pending_slabs_rcu() {
    let _reports = testkit::NoReports::new();
    destroy_waits::<0>(Flavour::Rcu, "dw-rcu");
}

#[test]
fn destroy_waits_for_reader_and_pending_slabs_static_srcu() {
    let _reports = testkit::NoReports::new();
    destroy_waits::<1>(Flavour::StaticSrcu, "dw-srcu");
}

#[test]
fn destroy_waits_for_reader_and_pending_slabs_tasks_trace() {
    let _reports = testkit::NoReports::new();
    destroy_waits::<2>(Flavour::TasksTrace, "dw-trace");
}

// ------------------------------------------------------------------------------------------------------------
// Destroy with live objects
// ------------------------------------------------------------------------------------------------------------

const LIVE_CHILD_ENV: &str = "TYPESAFE_DESTROY_LIVE_CHILD";

/// Not a test on its own: the child process of `destroy_with_live_objects_reports_on_stderr`, which runs it
/// with `LIVE_CHILD_ENV` set and reads its standard error. Without the variable it does nothing.
#[test]
fn live_objects_report_child() {
    if std::env::var_os(LIVE_CHILD_ENV).is_none() {
        return;
    }
    nolock::init();
    let cache = Flavour::Rcu.builder("live-child").build().expect("cache");
    let objs: Vec<_> = (0..10).map(|_| cache.alloc_nolock(Gfp::NONE).expect("alloc")).collect();
    for &p in &objs[..3] {
        // SAFETY: ours, freed once.
        unsafe { cache.free_nolock(p) };
    }
    let r = cache.destroy();
    assert_eq!(r.live_objects, 7);
}

#[test]
fn destroy_with_live_objects_reports_on_stderr() {
    let _reports = testkit::NoReports::new();
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "live_objects_report_child", "--nocapture", "--test-threads=1"])
        .env(LIVE_CHILD_ENV, "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed: {}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(
        stderr.contains("cache 'live-child' destroyed with 7 objects still allocated"),
        "destroy reports the live objects clearly on stderr; got:\n{stderr}"
    );
}

#[test]
fn destroy_with_live_objects_keeps_them_valid_and_retires_the_slot() {
    let _gate = testkit::reports_expected();
    let _s = serial();
    const K: usize = 3;
    let name = "dl-live";
    let cache = Flavour::Rcu.builder(name).ctor(ctor::<K>).dtor(dtor::<K>).build().expect("cache");
    let objs: Vec<usize> = (0..640).map(|_| alloc(&cache, K)).collect();
    // Keep every 8th object (some in every slab), and one object of the fallback cache.
    let (outer, nested) = nested_alloc(&cache, K, name);
    free(&cache, outer, false);
    let mut live = vec![nested];
    for (i, &p) in objs.iter().enumerate() {
        if i % 8 == 0 {
            live.push(p);
        } else {
            free(&cache, p, i % 3 == 0);
        }
    }
    for &p in &live {
        stamp(p, p as u64);
    }
    let reports = nolock::debug::reports();
    nolock::debug::set_quiet(true);
    let report = cache.destroy();
    nolock::debug::set_quiet(false);
    assert_eq!(report.live_objects, live.len() as u64, "{report:?}");
    assert!(nolock::debug::reports() > reports, "the live objects were reported");
    nolock::rcu_barrier();

    // The live objects keep their memory, their type and their contents; their slabs were not destructed.
    let check = |when: &str| {
        for &p in &live {
            assert_eq!(obj(p).tag.load(Ordering::Acquire), tag_of(K), "{when}: live object {p:#x} keeps its type");
            assert!(stamped(p, p as u64), "{when}: live object {p:#x} keeps its contents");
            let owner = page_owner(p as *const u8);
            let fb = format!("{name}-fb");
            assert!(is_slab_of(owner, name) || is_slab_of(owner, &fb), "{when}: {p:#x} is still a slab: {owner:?}");
        }
    };
    check("after destroy");
    let (c, d, bad) = counts(K);
    assert_eq!(bad, 0);
    assert!(d < c, "slabs with live objects were not destructed ({c} ctors, {d} dtors)");

    // New caches never take over the retired slots: the live objects' pages keep naming the old cache, new
    // objects never land in the live slabs, and the memory stays writable and intact.
    let live_pages: std::collections::HashSet<usize> = live.iter().map(|p| p / 4096).collect();
    for i in 0..40 {
        let n = format!("dl-new-{i}");
        let k = 4 + i % 2;
        let c = if k == 4 {
            Flavour::Rcu.builder(&n).ctor(ctor::<4>).dtor(dtor::<4>).build()
        } else {
            Flavour::TasksTrace.builder(&n).ctor(ctor::<5>).dtor(dtor::<5>).build()
        }
        .expect("new cache");
        let ps: Vec<usize> = (0..100).map(|_| alloc(&c, k)).collect();
        for &p in &ps {
            assert!(!live_pages.contains(&(p / 4096)), "a new cache's object {p:#x} landed in a retired slab");
        }
        for &p in &ps {
            free(&c, p, true);
        }
        assert_eq!(c.destroy().live_objects, 0);
    }
    for &p in &live {
        stamp(p, p as u64);
    }
    check("after other caches came and went");
}

// ------------------------------------------------------------------------------------------------------------
// Destroy takes back other threads' lists
// ------------------------------------------------------------------------------------------------------------

#[test]
fn destroy_takes_back_other_threads_cached_objects() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    const K: usize = 6;
    const THREADS: usize = 3;
    const PER_THREAD: usize = 300;
    let name = "dt-lists";
    let base_pages = allocated_pages();
    let cache = Arc::new(Flavour::StaticSrcu.builder(name).ctor(ctor::<K>).dtor(dtor::<K>).build().expect("cache"));
    let ready = Arc::new(Barrier::new(THREADS + 1));
    let destroyed = Arc::new(Barrier::new(THREADS + 1));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (cache, ready, destroyed) = (cache.clone(), ready.clone(), destroyed.clone());
            std::thread::spawn(move || {
                // A failed check in this thread must not leave the others waiting at the barriers forever: catch
                // it, meet the barriers, then report it through `join`.
                let work = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let mut mine: Vec<usize> = (0..PER_THREAD).map(|_| alloc(&cache, K)).collect();
                    // Objects of the fallback cache too: this thread's list of the fallback cache gets them back.
                    for _ in 0..5 {
                        let (outer, nested) = nested_alloc(&cache, K, name);
                        mine.push(outer);
                        mine.push(nested);
                    }
                    for (i, &p) in mine.iter().enumerate() {
                        free(&cache, p, (i + t) % 2 == 0);
                    }
                    mine
                }));
                drop(cache);
                ready.wait();
                // Parked, alive, with objects in its lists, while the cache is destroyed.
                destroyed.wait();
                work.unwrap_or_else(|e| std::panic::resume_unwind(e))
            })
        })
        .collect();
    ready.wait();
    let cache = Arc::try_unwrap(cache).expect("the threads dropped their handles");
    let st = cache.stats();
    assert_eq!(st.allocs, st.frees, "{st:?}");
    assert!(st.cached_objects >= (THREADS * PER_THREAD) as u64, "the threads' lists hold their freed objects: {st:?}");
    let report = cache.destroy();
    assert_eq!(report.live_objects, 0, "{report:?}");
    let (c, d, bad) = counts(K);
    assert_eq!((c, bad), (d, 0), "every destructor ran, once, by the time destroy returned");
    assert_eq!(allocated_pages(), base_pages, "every page back while the threads still live");
    destroyed.wait();
    for t in threads {
        for p in t.join().expect("thread") {
            assert_eq!(page_owner(p as *const u8), PageOwner::Free, "{p:#x} taken back from its thread and freed");
        }
    }
    // The threads exited after destroy (their lists of the destroyed cache are empty and claimed).
    assert_eq!(allocated_pages(), base_pages);
    assert!(!cache_listed(name) && !cache_listed(&format!("{name}-fb")));
}

// ------------------------------------------------------------------------------------------------------------
// Many caches: slots reused
// ------------------------------------------------------------------------------------------------------------

#[test]
fn create_and_destroy_more_typesafe_caches_than_slots() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let base_pages = allocated_pages();
    let before = (counts(7), counts(4));
    let iterations = MAX_CACHES + 40;
    let mut ids = std::collections::HashSet::new();
    for i in 0..iterations {
        let name = format!("many-{i}");
        let flavour = [Flavour::Rcu, Flavour::StaticSrcu, Flavour::TasksTrace][i % 3];
        // Alternate constructors: a reused slot must run the new cache's constructor, not the old one's.
        let (k, cache) = if i % 2 == 0 {
            (7, flavour.builder(&name).ctor(ctor::<7>).dtor(dtor::<7>).build())
        } else {
            (4, flavour.builder(&name).ctor(ctor::<4>).dtor(dtor::<4>).build())
        };
        let cache = cache.unwrap_or_else(|e| panic!("iteration {i}: cache creation failed: {e}"));
        ids.insert(format!("{cache:?}").split(',').next().unwrap_or_default().to_string());
        let ps: Vec<usize> = (0..100).map(|_| alloc(&cache, k)).collect();
        for &p in &ps {
            assert!(is_slab_of(page_owner(p as *const u8), &name), "iteration {i}: a reused slot names the new cache");
        }
        let nested = if i % 10 == 0 { Some(nested_alloc(&cache, k, &name)) } else { None };
        for (j, &p) in ps.iter().enumerate() {
            free(&cache, p, j % 2 == 0);
        }
        if let Some((outer, nested)) = nested {
            free(&cache, outer, true);
            free(&cache, nested, false);
        }
        if i % 2 == 0 {
            assert_eq!(cache.destroy().live_objects, 0, "iteration {i}");
        } else {
            drop(cache);
        }
        assert!(!cache_listed(&name), "iteration {i}: destroyed cache still listed");
        for &p in &ps {
            assert_eq!(page_owner(p as *const u8), PageOwner::Free, "iteration {i}: {p:#x} given back");
        }
    }
    assert!(ids.len() < iterations, "slots were reused ({} distinct ids)", ids.len());
    let after = (counts(7), counts(4));
    for (b, a) in [(before.0, after.0), (before.1, after.1)] {
        assert_eq!(a.0 - b.0, a.1 - b.1, "constructors == destructors over the loop");
        assert_eq!(a.2, b.2, "no bad destructor call");
    }
    assert_eq!(allocated_pages(), base_pages, "no page leaked over {iterations} caches");
    assert!(!snapshot().caches.iter().any(|c| c.name.as_str().starts_with("many-")));
}

// ------------------------------------------------------------------------------------------------------------
// Destroy racing a concurrent shrink of the same cache
// ------------------------------------------------------------------------------------------------------------

/// The statistical form: destroy caches in a loop while another thread calls `trim()` (which shrinks every
/// cache) in a loop. Every object is freed before destroy, so every destroy must report 0 live objects.
#[test]
fn destroy_while_another_thread_trims() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    let stop = AtomicBool::new(false);
    let spurious = AtomicUsize::new(0);
    let first = Mutex::new(None);
    let reports = nolock::debug::reports();
    nolock::debug::set_quiet(true);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                nolock::trim();
            }
        });
        for i in 0..200 {
            let name = format!("dtrim-{i}");
            let cache = Flavour::Rcu.builder(&name).build().expect("cache");
            let ps: Vec<_> = (0..600).map(|_| cache.alloc_nolock(Gfp::NONE).expect("alloc")).collect();
            for p in ps {
                // SAFETY: ours, freed once.
                unsafe { kfree_nolock(p.as_ptr()) };
            }
            let r = cache.destroy();
            if r.live_objects != 0 {
                spurious.fetch_add(1, Ordering::Relaxed);
                first.lock().unwrap().get_or_insert((i, r));
            }
        }
        stop.store(true, Ordering::Release);
    });
    nolock::debug::set_quiet(false);
    assert_eq!(
        spurious.load(Ordering::Relaxed),
        0,
        "destroy of a cache with every object freed reported live objects (first: {:?}; {} reports)",
        first.lock().unwrap(),
        nolock::debug::reports() - reports
    );
}

/// The deterministic form. `CacheInner::shrink` lets one shrinker run per cache and returns 0 at once to any
/// other (the `shrinking` flag); `cache::destroy` calls `shrink(g, 0)` once and then trusts `nr_slabs`. A thread
/// that is inside `trim()`'s shrink of the cache (paused here with the reentry hook at `PageFree`, while it
/// releases the one empty slab it found) makes destroy's shrink a no-op: the slabs that destroy's drain just
/// emptied stay allocated, destroy reports a live object that does not exist ("destroyed with 0 objects still
/// allocated in 3 slabs"), retires the slot for good, and the emptied slabs are never released. The worker's
/// periodic shrink (or a reclaim on an allocation out of pages) opens the same window without any `trim()`.
///
/// A plain cache is used because only the immediate release path has a hook point inside `shrink`; the code in
/// `cache::destroy` is the same for type-safe caches (the statistical test above uses them).
#[test]
fn destroy_racing_a_paused_shrink_of_the_same_cache() {
    let _reports = testkit::NoReports::new();
    let _s = serial();
    // The pause needs the trimming thread to be the one that releases our empty slab (the worker's periodic pass
    // may get there first, or make trim skip the cache): retry the setup until it is.
    for _attempt in 0..20 {
        let cache = KmemCache::new("drace-plain", Layout::new::<Obj>()).expect("cache");
        let per_slab = cache.stats().objects_per_slab;
        // No entirely free slab anywhere else, so the paused release below is one of ours.
        nolock::trim();
        // Slabs 2 and 3 first: objects this thread frees later into its own list (destroy's drain empties them).
        let ps: Vec<_> = (0..2 * per_slab).map(|_| cache.alloc_nolock(Gfp::NONE).expect("alloc")).collect();
        // Slab 1: emptied by a thread that exits (its list goes back): entirely free, on the partial list.
        std::thread::scope(|s| {
            s.spawn(|| {
                let ps: Vec<_> = (0..per_slab).map(|_| cache.alloc_nolock(Gfp::NONE).expect("alloc")).collect();
                for p in ps {
                    // SAFETY: ours, freed once.
                    unsafe { cache.free_nolock(p) };
                }
            });
        });
        // A scoped thread counts as finished when its closure returns, before its thread-local destructors run:
        // wait for its exit to hand its list back.
        let start = std::time::Instant::now();
        while cache.stats().cached_objects != 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        for p in ps {
            // SAFETY: ours, freed once.
            unsafe { cache.free_nolock(p) };
        }
        PAUSED.store(false, Ordering::Release);
        RESUME.store(false, Ordering::Release);
        let trimmer = std::thread::spawn(|| {
            PAUSE_ARMED.with(|a| a.set(true));
            nolock::trim();
            PAUSE_ARMED.with(|a| a.set(false));
        });
        while !PAUSED.load(Ordering::Acquire) && !trimmer.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !PAUSED.load(Ordering::Acquire) {
            trimmer.join().expect("trimmer");
            nolock::debug::set_quiet(true);
            drop(cache);
            nolock::debug::set_quiet(false);
            continue;
        }
        // The trimming thread is inside shrink() of our cache, releasing slab 1 (with 3 slabs allocated). It
        // resumes shortly, whatever destroy does (a destroy that waits for the shrink in progress must not wait
        // for itself).
        let resumer = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            RESUME.store(true, Ordering::Release);
        });
        let report = cache.destroy();
        resumer.join().expect("resumer");
        trimmer.join().expect("trimmer");
        assert_eq!(report.live_objects, 0, "every object was freed before destroy: {report:?}");
        return;
    }
    panic!("setup: never caught trim() inside the cache's shrink");
}
