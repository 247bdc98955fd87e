//! `nolock bench typesafe`: the *add-then-delete* pattern of tracing programs (an object allocated, filled in,
//! maybe looked up once and freed within microseconds — a latency timestamp keyed by task) through three
//! routes, all measured in the same run:
//!
//! 1. **typesafe**: a `KmemCache` with `SlabFlags::TYPESAFE_BY_SRCU_FAST` (Tasks Trace domain, the default)
//!    and a constructor; `alloc_nolock` + `free_nolock`. A freed object is reused at once, but stays an object
//!    of this type until readers are gone; only the cache's empty slabs wait for a grace period (DESIGN.md §1
//!    class D, kernel.md §7).
//! 2. **kfree_rcu**: `kmalloc_nolock` + `kfree_rcu_nolock`: every freed object waits for an RCU grace period
//!    before it can be reused (class B).
//! 3. **kfree**: `kmalloc_nolock` + `kfree_nolock`: reused at once, no reader may touch it afterwards (class A,
//!    the speed floor).
//!
//! Each operation: allocate a 96-byte element, write its key, timestamp, pid and CPU (routes 2 and 3 also its
//! type tag, which route 1's constructor wrote once per slab life), publish it in a shared 4096-slot table,
//! look it up once, unpublish it, free it. Two reader threads run during the whole benchmark, one in RCU and
//! one in Tasks Trace read-side sections (bursts of short sections, then a short sleep), so that grace periods
//! really have readers to wait for. In each section a reader probes a random table slot and, where the route
//! allows it, reads the element's type tag: route 1 lets both flavours read (a Tasks Trace grace period implies
//! an RCU one), route 2 only RCU readers, route 3 nobody. A tag that is not the element tag is a type-safety
//! violation and fails the run.
//!
//! Per cell (route × writer threads, a fixed wall time): throughput in million add+delete per second, and
//! memory sampled every 2 ms from `nolock::stats::snapshot()` — objects allocated and not yet freed (per-cache
//! allocs − frees: for route 2, the retired objects still waiting for their grace period), slab memory (slabs ×
//! slab size of the route's caches: route 1 its cache and fallback cache, route 2 `kmalloc-96` and the 4 KiB
//! pointer blocks of `kmalloc-4k`, route 3 `kmalloc-96`), arena pages in use and resident memory (both as a
//! change from the start of the cell), and pending callbacks of the route's domain (queued − invoked: Tasks
//! Trace for route 1, whose dead slabs wait there; RCU for routes 2 and 3 — route 2's full pointer blocks wait
//! on the kfree block ring rather than as callbacks, so its backlog shows in the objects). Peak is the largest sample, steady state the median of the samples in the
//! second half of the cell. After the cell, the time until everything is really freed: route 1 destroys its
//! cache (a fresh cache per cell), route 2 runs `rcu_barrier`. Before each cell `nolock::trim()` returns free
//! slabs and pages, so every cell starts from the same state.
//!
//! These machines are noisy, so each cell is the median of at least five repetitions with min and max, the
//! routes take turns inside every repetition (in a rotating order), and only ratios within one run are
//! meaningful.

use core::ptr::{NonNull, addr_of, addr_of_mut};
use std::alloc::Layout;
use std::fmt::Write as _;
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nolock::stats::{Snapshot, snapshot};
use nolock::{
    Gfp, KmemCache, RCU_TASKS_TRACE, RcuHead, SlabFlags, kfree_nolock, kfree_rcu_nolock, kmalloc_nolock, rcu_barrier,
    rcu_read_lock, rcu_read_lock_tasks_trace, rcu_stats, synchronize_rcu, synchronize_rcu_tasks_trace,
};

use super::{BenchArgs, Summary, json_num, json_str, print_rows, progress_bar, summarize};

// ---------------------------------------------------------------------------------------------------------
// The element

/// The type tag every element carries (route 1: written by the constructor once per slab life).
const TAG: u64 = 0x4c45_5f45_4641_5354; // "TSAFE_EL"

/// One element: a latency-timestamp record as a tracing program keeps it. Readers only ever load `tag` and
/// `key` (atomics); the other fields belong to the thread that allocated the element.
#[repr(C)]
struct Elem {
    tag: AtomicU64,
    key: AtomicU64,
    ts_ns: u64,
    pid_tgid: u64,
    cpu: u32,
    flags: u32,
    stack_id: u64,
    value: [u64; 4],
    /// Route 1: the allocator's free-list link (`freeptr_offset`, away from `tag` and `key`); route 2: the
    /// callback head `kfree_rcu_nolock` falls back to.
    head: RcuHead,
}

/// Bytes per element (a `kmalloc-96` object on routes 2 and 3).
const OBJ_SIZE: usize = core::mem::size_of::<Elem>();
const _: () = assert!(OBJ_SIZE == 96);
const LINK_OFFSET: usize = core::mem::offset_of!(Elem, head);

/// Name of route 1's cache (its fallback cache is `<name>-fb`).
const TS_CACHE: &str = "bench-ts-elem";
const TS_CACHE_FB: &str = "bench-ts-elem-fb";
/// The kmalloc class of a 96-byte object, and the one of `kfree_rcu_nolock`'s pointer blocks.
const KMALLOC_OBJ: &str = "kmalloc-96";
const KMALLOC_BLOCKS: &str = "kmalloc-4k";

/// nolock's page size (its arena and slabs use 4 KiB pages on every target).
const NOLOCK_PAGE: usize = 4096;

/// Constructor runs (route 1), to show how rarely a reused element needs one.
static CTOR_RUNS: AtomicU64 = AtomicU64::new(0);

/// Route 1's constructor: the fields readers probe get their meaning once per slab life.
fn elem_ctor(p: NonNull<u8>) {
    // SAFETY: the allocator hands the constructor a fresh, exclusively owned object of `Elem`'s layout (the
    // cache was created with `Layout::new::<Elem>()`).
    unsafe {
        p.cast::<Elem>().as_ptr().write(Elem {
            tag: AtomicU64::new(TAG),
            key: AtomicU64::new(0),
            ts_ns: 0,
            pid_tgid: 0,
            cpu: 0,
            flags: 0,
            stack_id: 0,
            value: [0; 4],
            head: RcuHead::new(),
        })
    };
    CTOR_RUNS.fetch_add(1, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------------------
// Routes

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Typesafe,
    KfreeRcu,
    Kfree,
}

const ROUTES: [Route; 3] = [Route::Typesafe, Route::KfreeRcu, Route::Kfree];

/// `Route` as a const generic of the writer loop.
const R_TYPESAFE: u8 = 1;
const R_KFREE_RCU: u8 = 2;
const R_KFREE: u8 = 3;

/// Reader mode: no route running (readers must not dereference anything).
const MODE_NONE: u8 = 0;

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Typesafe => "1 typesafe cache",
            Route::KfreeRcu => "2 kfree_rcu_nolock",
            Route::Kfree => "3 kfree_nolock",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Route::Typesafe => "typesafe",
            Route::KfreeRcu => "kfree_rcu",
            Route::Kfree => "kfree",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Route::Typesafe => {
                "KmemCache TYPESAFE_BY_SRCU_FAST (Tasks Trace) + ctor, alloc_nolock/free_nolock: a freed object is \
                 reused at once but stays an Elem; only empty slabs wait for a grace period"
            }
            Route::KfreeRcu => {
                "kmalloc_nolock + kfree_rcu_nolock: every freed object waits for an RCU grace period before reuse"
            }
            Route::Kfree => {
                "kmalloc_nolock + kfree_nolock: reused at once, no reader may touch it after free (the speed floor)"
            }
        }
    }

    fn mode(self) -> u8 {
        match self {
            Route::Typesafe => R_TYPESAFE,
            Route::KfreeRcu => R_KFREE_RCU,
            Route::Kfree => R_KFREE,
        }
    }

    /// Caches whose allocs − frees count as the route's objects.
    fn object_caches(self) -> &'static [&'static str] {
        match self {
            Route::Typesafe => &[TS_CACHE, TS_CACHE_FB],
            Route::KfreeRcu | Route::Kfree => &[KMALLOC_OBJ],
        }
    }

    /// Caches whose slabs count as the route's slab memory.
    fn slab_caches(self) -> &'static [&'static str] {
        match self {
            Route::Typesafe => &[TS_CACHE, TS_CACHE_FB],
            Route::KfreeRcu => &[KMALLOC_OBJ, KMALLOC_BLOCKS],
            Route::Kfree => &[KMALLOC_OBJ],
        }
    }

    /// Callbacks waiting in the route's grace-period domain.
    fn pending_callbacks(self) -> i64 {
        let s = match self {
            Route::Typesafe => RCU_TASKS_TRACE.stats(),
            Route::KfreeRcu | Route::Kfree => rcu_stats(),
        };
        s.callbacks_queued as i64 - s.callbacks_invoked as i64
    }
}

// ---------------------------------------------------------------------------------------------------------
// Shared state: the table, the readers

/// Slots of the shared lookup table (a power of two).
const TABLE_SLOTS: usize = 4096;
/// Reader duty cycle: sections for this long, then sleep.
const READER_BURST: Duration = Duration::from_micros(50);
const READER_PAUSE: Duration = Duration::from_micros(200);
/// How often the main thread samples memory during a cell.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// Writer thread counts.
const THREADS: [usize; 3] = [1, 2, 4];

struct Shared {
    /// Published elements (0: empty).
    table: Vec<AtomicUsize>,
    /// Which route runs (`Route::mode`), or `MODE_NONE`: decides whether readers may dereference.
    mode: AtomicU8,
    readers_stop: AtomicBool,
    sections: AtomicU64,
    probes: AtomicU64,
    violations: AtomicU64,
}

impl Shared {
    fn new() -> Self {
        Self {
            table: (0..TABLE_SLOTS).map(|_| AtomicUsize::new(0)).collect(),
            mode: AtomicU8::new(MODE_NONE),
            readers_stop: AtomicBool::new(false),
            sections: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            violations: AtomicU64::new(0),
        }
    }
}

#[inline(always)]
fn slot_of(key: u64) -> usize {
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as usize & (TABLE_SLOTS - 1)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    Rcu,
    TasksTrace,
}

/// Whether a reader of `flavor` may dereference a published element while route `mode` runs.
fn may_read(mode: u8, flavor: Flavor) -> bool {
    match mode {
        R_TYPESAFE => true,
        R_KFREE_RCU => flavor == Flavor::Rcu,
        _ => false,
    }
}

/// One read-side section: probe a slot, read the element's tag where allowed. Returns (probed, violation).
#[inline(always)]
fn probe(sh: &Shared, flavor: Flavor, x: u64) -> (bool, bool) {
    let mode = sh.mode.load(Ordering::Acquire);
    let p = sh.table[x as usize & (TABLE_SLOTS - 1)].load(Ordering::Acquire);
    if p == 0 || !may_read(mode, flavor) {
        return (false, false);
    }
    let e = p as *const Elem;
    // `p` was published by a writer of the running route and loaded inside our read-side section, which that
    // route covers (`may_read`): route 1's memory stays an `Elem` until every RCU and Tasks Trace reader that
    // could see it is gone (type-safe cache), route 2's stays intact until every RCU reader is gone.
    // SAFETY: as just explained; we only form references to the atomic fields.
    let (tag, key) =
        unsafe { ((*addr_of!((*e).tag)).load(Ordering::Relaxed), (*addr_of!((*e).key)).load(Ordering::Relaxed)) };
    black_box(key);
    (true, tag != TAG)
}

fn reader(sh: &Shared, flavor: Flavor, seed: u64) {
    let (mut sections, mut probes, mut bad) = (0u64, 0u64, 0u64);
    let mut x = seed | 1;
    while !sh.readers_stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        while t.elapsed() < READER_BURST {
            for _ in 0..16 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (p, v) = match flavor {
                    Flavor::Rcu => {
                        let _g = rcu_read_lock();
                        probe(sh, flavor, x)
                    }
                    Flavor::TasksTrace => {
                        let _g = rcu_read_lock_tasks_trace();
                        probe(sh, flavor, x)
                    }
                };
                sections += 1;
                probes += u64::from(p);
                bad += u64::from(v);
            }
        }
        std::thread::sleep(READER_PAUSE);
    }
    sh.sections.fetch_add(sections, Ordering::Relaxed);
    sh.probes.fetch_add(probes, Ordering::Relaxed);
    sh.violations.fetch_add(bad, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------------------------------------
// Writers

/// One add-then-delete. False when the allocation failed.
#[inline(always)]
fn add_delete<const R: u8>(t: u64, i: u64, cache: Option<&KmemCache>, table: &[AtomicUsize]) -> bool {
    let p = if R == R_TYPESAFE {
        match cache {
            Some(c) => c.alloc_nolock(Gfp::NONE),
            None => None,
        }
    } else {
        kmalloc_nolock(OBJ_SIZE, Gfp::NONE)
    };
    let Some(p) = p else { return false };
    let e = p.as_ptr().cast::<Elem>();
    let key = (t << 40) | i;
    // `e` is a live object of `Elem`'s size and alignment that this thread just allocated. Route 1: its `tag` and
    // `key` were initialised by the constructor and may be loaded by readers that saw an earlier life of it, so
    // `key` is written atomically through a reference to that field only; routes 2 and 3: nobody else can see it
    // yet, so the fields are initialised with raw writes. The other fields are never read by anyone else.
    // SAFETY: as just explained.
    unsafe {
        if R == R_TYPESAFE {
            (*addr_of!((*e).key)).store(key, Ordering::Relaxed);
        } else {
            addr_of_mut!((*e).tag).write(AtomicU64::new(TAG));
            addr_of_mut!((*e).key).write(AtomicU64::new(key));
        }
        addr_of_mut!((*e).ts_ns).write(i);
        addr_of_mut!((*e).pid_tgid).write((t << 32) | 4242);
        addr_of_mut!((*e).cpu).write(t as u32);
    }
    // Publish (Release: readers that load the slot see tag and key), look it up once, unpublish.
    let slot = &table[slot_of(key)];
    let published = slot.compare_exchange(0, e as usize, Ordering::Release, Ordering::Relaxed).is_ok();
    let q = if published { slot.load(Ordering::Acquire) as *const Elem } else { e as *const Elem };
    // SAFETY: `q` is `e` (only its publisher clears a slot), which is live and ours; atomics by reference to
    // the field, the plain field by a raw read.
    let hit = unsafe { (*addr_of!((*q).key)).load(Ordering::Relaxed) == key && addr_of!((*q).ts_ns).read() == i };
    black_box(hit);
    if published {
        slot.store(0, Ordering::Release);
    }
    if R == R_TYPESAFE {
        if let Some(c) = cache {
            // SAFETY: `p` came from this cache and is not used by this thread again; readers that may still
            // hold it only load its atomic fields, which the type-safe cache keeps meaningful.
            unsafe { c.free_nolock(p) };
        }
    } else if R == R_KFREE_RCU {
        // SAFETY: `p` is a live kmalloc object with an `RcuHead` inside it (offset 80 < 64 KiB); this thread
        // does not touch it again, and RCU readers may keep reading it until the grace period ends.
        unsafe { kfree_rcu_nolock(p.as_ptr(), NonNull::new_unchecked(addr_of_mut!((*e).head))) };
    } else {
        // SAFETY: `p` is a live kmalloc object, unpublished, and readers never dereference route 3's elements.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
    true
}

/// Start/stop flags of one cell.
struct CellSync {
    ready: AtomicUsize,
    go: AtomicBool,
    stop: AtomicBool,
}

/// A writer thread: add-then-delete until `stop`. Returns (operations, failed allocations).
fn writer<const R: u8>(t: u64, cache: Option<&KmemCache>, table: &[AtomicUsize], cs: &CellSync) -> (u64, u64) {
    // One untimed operation: the thread's per-thread caches exist before the clock starts.
    let _ = add_delete::<R>(t, 0, cache, table);
    cs.ready.fetch_add(1, Ordering::Release);
    while !cs.go.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let (mut ops, mut fails) = (0u64, 0u64);
    let mut i = 1u64;
    loop {
        if i & 63 == 0 && cs.stop.load(Ordering::Relaxed) {
            break;
        }
        if add_delete::<R>(t, i, cache, table) {
            ops += 1;
        } else {
            fails += 1;
        }
        i += 1;
    }
    (ops, fails)
}

// ---------------------------------------------------------------------------------------------------------
// Memory samples

/// One memory sample, relative to the start of the cell where said.
#[derive(Clone, Copy, Default)]
struct Sample {
    /// Objects allocated and not yet freed in the route's caches (change from the start).
    objects: i64,
    /// Slabs × slab size of the route's caches (absolute; `trim` ran before the cell).
    slab_bytes: i64,
    /// Arena pages in use, in bytes (change from the start).
    pages_bytes: i64,
    /// Callbacks queued and not yet invoked in the route's domain (absolute).
    pending: i64,
    /// Resident memory (change from the start).
    rss: i64,
}

fn objects_of(route: Route, s: &Snapshot) -> i64 {
    route.object_caches().iter().filter_map(|n| s.cache(n)).map(|c| c.allocs as i64 - c.frees as i64).sum()
}

fn slab_bytes_of(route: Route, s: &Snapshot) -> i64 {
    route
        .slab_caches()
        .iter()
        .filter_map(|n| s.cache(n))
        .map(|c| (c.slabs as usize * c.slab_pages * NOLOCK_PAGE) as i64)
        .sum()
}

fn take_sample(route: Route, base: &Sample) -> Sample {
    let s = snapshot();
    Sample {
        objects: objects_of(route, &s) - base.objects,
        slab_bytes: slab_bytes_of(route, &s),
        pages_bytes: (s.pages.used_pages * NOLOCK_PAGE) as i64 - base.pages_bytes,
        pending: route.pending_callbacks(),
        rss: s.resident_bytes.map_or(0, |r| r as i64) - base.rss,
    }
}

fn base_sample(route: Route) -> Sample {
    let s = snapshot();
    Sample {
        objects: objects_of(route, &s),
        slab_bytes: 0,
        pages_bytes: (s.pages.used_pages * NOLOCK_PAGE) as i64,
        pending: 0,
        rss: s.resident_bytes.map_or(0, |r| r as i64),
    }
}

/// Peak (largest sample) and steady state (median of the samples in the second half of the cell).
fn peak_steady(samples: &[(Duration, Sample)], half: Duration, f: impl Fn(&Sample) -> i64) -> (f64, f64) {
    let peak = samples.iter().map(|(_, s)| f(s)).max().unwrap_or(0) as f64;
    let late: Vec<f64> = samples.iter().filter(|(t, _)| *t >= half).map(|(_, s)| f(s) as f64).collect();
    let steady = if late.is_empty() { peak } else { summarize(&late).median };
    (peak, steady)
}

// ---------------------------------------------------------------------------------------------------------
// Results

const M_TPUT: &str = "throughput";
const M_OBJ_PEAK: &str = "objects_peak";
const M_OBJ_STEADY: &str = "objects_steady";
const M_SLAB_PEAK: &str = "slab_bytes_peak";
const M_SLAB_STEADY: &str = "slab_bytes_steady";
const M_PAGES_PEAK: &str = "pages_delta_bytes_peak";
const M_PAGES_STEADY: &str = "pages_delta_bytes_steady";
const M_PEND_PEAK: &str = "pending_callbacks_peak";
const M_PEND_STEADY: &str = "pending_callbacks_steady";
const M_RSS_PEAK: &str = "rss_delta_bytes_peak";
const M_DRAIN: &str = "drain_ms";
const M_CTOR: &str = "ctor_runs_per_million_allocs";

struct Series {
    route: Route,
    threads: usize,
    metric: &'static str,
    unit: &'static str,
    samples: Vec<f64>,
}

#[derive(Default)]
struct Results {
    series: Vec<Series>,
    notes: Vec<String>,
    /// Allocations that failed (all cells).
    failures: u64,
    /// Objects still allocated when a cell had drained (should be 0).
    leftovers: i64,
}

impl Results {
    fn add(&mut self, route: Route, threads: usize, metric: &'static str, unit: &'static str, v: f64) {
        if let Some(s) = self.series.iter_mut().find(|s| s.route == route && s.threads == threads && s.metric == metric)
        {
            s.samples.push(v);
        } else {
            self.series.push(Series { route, threads, metric, unit, samples: vec![v] });
        }
    }

    fn get(&self, route: Route, threads: usize, metric: &str) -> Option<Summary> {
        self.series
            .iter()
            .find(|s| s.route == route && s.threads == threads && s.metric == metric && !s.samples.is_empty())
            .map(|s| summarize(&s.samples))
    }

    /// The per-repetition ratios `a / b` of one metric (the routes of a repetition run back to back, so a slow
    /// phase of the machine hits both): median, min and max. `None` without samples or with a zero divisor.
    fn paired(&self, a: Route, b: Route, threads: usize, metric: &str) -> Option<Summary> {
        let samples = |r: Route| {
            self.series.iter().find(|s| s.route == r && s.threads == threads && s.metric == metric).map(|s| &s.samples)
        };
        let (x, y) = (samples(a)?, samples(b)?);
        let v: Vec<f64> = x.iter().zip(y).filter(|&(_, &d)| d > 0.0).map(|(&n, &d)| n / d).collect();
        (!v.is_empty() && v.len() == x.len().min(y.len())).then(|| summarize(&v))
    }

    fn note(&mut self, n: String) {
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// One cell

fn build_cache() -> KmemCache {
    match KmemCache::builder(TS_CACHE, Layout::new::<Elem>())
        .flags(SlabFlags::TYPESAFE_BY_SRCU_FAST)
        .freeptr_offset(LINK_OFFSET)
        .ctor(elem_ctor)
        .build()
    {
        Ok(c) => c,
        Err(e) => panic!("cannot create the type-safe cache: {e:?}"),
    }
}

/// Run `route` with `threads` writers for `dur`; record the results when `record`.
fn run_cell(route: Route, threads: usize, dur: Duration, sh: &Shared, res: &mut Results, record: bool) {
    // Untimed: the same starting state for every cell.
    nolock::trim();
    let cache = (route == Route::Typesafe).then(build_cache);
    let ctor0 = CTOR_RUNS.load(Ordering::Relaxed);
    let base = base_sample(route);
    let cs = CellSync { ready: AtomicUsize::new(0), go: AtomicBool::new(false), stop: AtomicBool::new(false) };
    sh.mode.store(route.mode(), Ordering::Release);
    let mut samples: Vec<(Duration, Sample)> = Vec::with_capacity(dur.as_millis() as usize + 16);
    let (ops, fails, elapsed) = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (cache, table, cs) = (cache.as_ref(), &sh.table[..], &cs);
                std::thread::Builder::new()
                    .name(format!("ts-writer-{t}"))
                    .spawn_scoped(s, move || match route {
                        Route::Typesafe => writer::<R_TYPESAFE>(t, cache, table, cs),
                        Route::KfreeRcu => writer::<R_KFREE_RCU>(t, cache, table, cs),
                        Route::Kfree => writer::<R_KFREE>(t, cache, table, cs),
                    })
                    .expect("spawn a writer")
            })
            .collect();
        while cs.ready.load(Ordering::Acquire) < threads {
            std::thread::yield_now();
        }
        let t0 = Instant::now();
        cs.go.store(true, Ordering::Release);
        loop {
            std::thread::sleep(SAMPLE_EVERY);
            let el = t0.elapsed();
            if el >= dur {
                break;
            }
            samples.push((el, take_sample(route, &base)));
        }
        cs.stop.store(true, Ordering::Relaxed);
        let elapsed = t0.elapsed();
        let (mut ops, mut fails) = (0, 0);
        for h in hs {
            let (o, f) = h.join().expect("writer panicked");
            ops += o;
            fails += f;
        }
        (ops, fails, elapsed)
    });
    // The state right after the writers stopped counts too (the backlog is largest there).
    samples.push((elapsed, take_sample(route, &base)));
    sh.mode.store(MODE_NONE, Ordering::Release);

    // Until everything is really freed.
    let t = Instant::now();
    let mut leftover = 0;
    match route {
        Route::Typesafe => {
            let allocs = cache.as_ref().map_or(0, |c| c.stats().allocs);
            let ctors = CTOR_RUNS.load(Ordering::Relaxed) - ctor0;
            if let Some(c) = cache {
                let r = c.destroy();
                leftover += r.live_objects as i64;
            }
            if record && allocs > 0 {
                res.add(route, threads, M_CTOR, "per 1e6 allocs", ctors as f64 * 1e6 / allocs as f64);
            }
        }
        Route::KfreeRcu => rcu_barrier(),
        Route::Kfree => {}
    }
    let drain_ms = t.elapsed().as_secs_f64() * 1e3;
    if route != Route::Typesafe {
        leftover += take_sample(route, &base).objects;
    }
    // Readers that saw this route's mode are gone before the next route publishes anything.
    synchronize_rcu();
    synchronize_rcu_tasks_trace();

    res.failures += fails;
    if leftover != 0 {
        res.leftovers += leftover;
        res.note(format!("{}: {leftover} objects still allocated after the cell drained", route.name()));
    }
    if !record {
        return;
    }
    let half = dur / 2;
    res.add(route, threads, M_TPUT, "M add+delete/s", ops as f64 / elapsed.as_secs_f64() / 1e6);
    let mut put = |(pk, st): (f64, f64), mp: &'static str, ms: &'static str, unit: &'static str| {
        res.add(route, threads, mp, unit, pk);
        res.add(route, threads, ms, unit, st);
    };
    put(peak_steady(&samples, half, |s| s.objects), M_OBJ_PEAK, M_OBJ_STEADY, "objects");
    put(peak_steady(&samples, half, |s| s.slab_bytes), M_SLAB_PEAK, M_SLAB_STEADY, "bytes");
    put(peak_steady(&samples, half, |s| s.pages_bytes), M_PAGES_PEAK, M_PAGES_STEADY, "bytes");
    put(peak_steady(&samples, half, |s| s.pending), M_PEND_PEAK, M_PEND_STEADY, "callbacks");
    res.add(route, threads, M_RSS_PEAK, "bytes", peak_steady(&samples, half, |s| s.rss).0);
    if route != Route::Kfree {
        res.add(route, threads, M_DRAIN, "ms", drain_ms);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Driver

/// The routes rotated by `rep` so that none always runs first.
fn rotated(rep: usize) -> [Route; 3] {
    [ROUTES[rep % 3], ROUTES[(rep + 1) % 3], ROUTES[(rep + 2) % 3]]
}

fn cell_duration(quick: bool) -> Duration {
    Duration::from_millis(if quick { 50 } else { 200 })
}

/// All cells of the benchmark, with two reader threads running throughout. Returns the reader counters
/// (sections, probes, violations).
fn run_all(
    reps: usize,
    dur: Duration,
    threads: &[usize],
    res: &mut Results,
    bar: &indicatif::ProgressBar,
) -> (u64, u64, u64) {
    let sh = Shared::new();
    std::thread::scope(|s| {
        let readers: Vec<_> = [(Flavor::Rcu, "ts-reader-rcu"), (Flavor::TasksTrace, "ts-reader-trace")]
            .into_iter()
            .enumerate()
            .map(|(i, (f, name))| {
                let sh = &sh;
                std::thread::Builder::new()
                    .name(name.into())
                    .spawn_scoped(s, move || reader(sh, f, 0x1234_5678_9abc_def1 ^ (i as u64 + 1)))
                    .expect("spawn a reader")
            })
            .collect();
        // Warm-up: every route once, untimed (caches, page faults, the grace-period worker, code paths).
        bar.set_message("warm-up");
        for route in ROUTES {
            run_cell(route, 1, dur / 4, &sh, res, false);
        }
        for rep in 0..reps {
            for &t in threads {
                bar.set_message(format!("rep {}/{reps}, {t} writer{}", rep + 1, if t == 1 { "" } else { "s" }));
                for route in rotated(rep) {
                    run_cell(route, t, dur, &sh, res, true);
                    bar.inc(1);
                }
            }
        }
        sh.readers_stop.store(true, Ordering::Relaxed);
        for h in readers {
            h.join().expect("reader panicked");
        }
    });
    (sh.sections.into_inner(), sh.probes.into_inner(), sh.violations.into_inner())
}

/// Run the benchmark and print the tables.
pub fn run(args: &BenchArgs) -> ExitCode {
    let reps = args.reps();
    let dur = cell_duration(args.quick);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "nolock bench typesafe ({}): add-then-delete of {OBJ_SIZE} B elements; {reps} timed repetitions per cell, \
         {} ms per cell, routes take turns inside each repetition; writers {} on {cpus} CPUs; readers: 1 RCU + 1 \
         Tasks Trace thread ({} µs bursts of read-side sections, then {} µs asleep)",
        if args.quick { "quick" } else { "full" },
        dur.as_millis(),
        THREADS.map(|t| t.to_string()).join("/"),
        READER_BURST.as_micros(),
        READER_PAUSE.as_micros(),
    );
    println!("routes:");
    for r in ROUTES {
        println!("  {:<20} {}", r.name(), r.what());
    }
    let bar = progress_bar((reps * THREADS.len() * ROUTES.len()) as u64);
    let mut res = Results::default();
    let t_start = Instant::now();
    let (sections, probes, violations) = run_all(reps, dur, &THREADS, &mut res, &bar);
    bar.finish_and_clear();
    let took = t_start.elapsed();

    print_tables(&res, dur);
    println!(
        "readers: {} read-side sections, {} probes of a published element, {violations} type-safety violations; \
         allocation failures: {}",
        crate::fmt::count(sections),
        crate::fmt::count(probes),
        crate::fmt::count(res.failures)
    );
    if res.failures > 0 {
        res.note(format!("{} allocations failed during the run", res.failures));
    }
    if violations > 0 {
        res.note(format!("{violations} reads saw an element whose type tag was wrong"));
    }
    for n in &res.notes {
        println!("note: {n}");
    }
    println!(
        "took {:.1} s; cells are median [min–max] over the repetitions; compare numbers only within one run",
        took.as_secs_f64()
    );
    if let Some(path) = &args.json {
        let json = to_json(args.quick, reps, dur, cpus, &res, (sections, probes, violations));
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("nolock bench typesafe: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("results written to {}", path.display());
    }
    if violations > 0 || res.leftovers != 0 {
        eprintln!("nolock bench typesafe: FAILED (type-safety violations or objects left allocated)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------------------
// Tables and JSON

/// A ratio with two decimals (none from 100 up).
fn ratio_num(r: f64) -> String {
    if r >= 100.0 { format!("{r:.0}") } else { format!("{r:.2}") }
}

/// The median of a paired ratio.
fn ratio_cell(r: Option<Summary>) -> String {
    r.map_or_else(|| "–".into(), |r| ratio_num(r.median))
}

/// A paired ratio: `median [min–max]`.
fn ratio_range_cell(r: Option<Summary>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{} [{}–{}]", ratio_num(r.median), ratio_num(r.min), ratio_num(r.max)))
}

fn cell(s: Option<Summary>, digits: usize) -> String {
    s.map_or_else(|| "–".into(), |s| super::cell(&s, digits))
}

/// A byte summary in KiB: `median [min–max]`.
fn kib_cell(s: Option<Summary>) -> String {
    s.map_or_else(|| "–".into(), |s| format!("{:.0} [{:.0}–{:.0}]", s.median / 1024.0, s.min / 1024.0, s.max / 1024.0))
}

/// A byte median with a unit.
fn bytes_median(s: Option<Summary>) -> String {
    s.map_or_else(
        || "–".into(),
        |s| {
            if s.median < 0.0 {
                format!("-{}", crate::fmt::bytes((-s.median) as u64))
            } else {
                crate::fmt::bytes(s.median as u64)
            }
        },
    )
}

fn count_median(s: Option<Summary>) -> String {
    s.map_or_else(
        || "–".into(),
        |s| if s.median < 0.0 { format!("{:.0}", s.median) } else { crate::fmt::count(s.median as u64) },
    )
}

fn threads_label(t: usize) -> String {
    format!("{t} thread{}", if t == 1 { "" } else { "s" })
}

fn print_tables(res: &Results, dur: Duration) {
    // Throughput.
    let mut head = vec!["M add+delete/s".to_string()];
    for t in THREADS {
        head.push(threads_label(t));
        head.push("/ route 3".into());
    }
    let mut rows = vec![head];
    for r in ROUTES {
        let mut row = vec![r.name().to_string()];
        for t in THREADS {
            let s = res.get(r, t, M_TPUT);
            row.push(cell(s, 2));
            row.push(ratio_cell(res.paired(r, Route::Kfree, t, M_TPUT)));
        }
        rows.push(row);
    }
    let mut row = vec!["route 2 / route 1".to_string()];
    for t in THREADS {
        row.push(ratio_cell(res.paired(Route::KfreeRcu, Route::Typesafe, t, M_TPUT)));
        row.push(String::new());
    }
    rows.push(row);
    println!();
    print_rows(&rows);
    println!(
        "one operation: allocate a {OBJ_SIZE} B element, write 4 fields (+ its type tag on routes 2 and 3), publish it \
         in a shared table, look it up, unpublish, free; throughput over all writers; \"/ route 3\" and the ratios \
         below are medians of per-repetition ratios (the three routes of a repetition run back to back)"
    );

    // Memory.
    let mut rows = vec![
        [
            "memory held",
            "writers",
            "objects not freed: peak",
            "steady",
            "slab KiB: peak",
            "steady",
            "arena pages Δ: peak",
            "steady",
            "pending callbacks: peak",
            "steady",
            "RSS Δ peak",
            "drain ms",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in ROUTES {
        for t in THREADS {
            let g = |m| res.get(r, t, m);
            rows.push(vec![
                r.name().into(),
                t.to_string(),
                cell(g(M_OBJ_PEAK), 0),
                cell(g(M_OBJ_STEADY), 0),
                kib_cell(g(M_SLAB_PEAK)),
                kib_cell(g(M_SLAB_STEADY)),
                bytes_median(g(M_PAGES_PEAK)),
                bytes_median(g(M_PAGES_STEADY)),
                count_median(g(M_PEND_PEAK)),
                count_median(g(M_PEND_STEADY)),
                bytes_median(g(M_RSS_PEAK)),
                if r == Route::Kfree { "–".into() } else { cell(g(M_DRAIN), 1) },
            ]);
        }
    }
    println!();
    print_rows(&rows);
    println!(
        "sampled every {} ms during each {} ms cell (and once right after the writers stop); peak = largest sample, \
         steady = median of the second half; objects = allocs − frees of the route's caches (in flight: ≤ 1 per \
         writer); slab = slabs × slab size (route 1: its cache + fallback, route 2: kmalloc-96 + kmalloc-4k pointer \
         blocks, route 3: kmalloc-96); pending callbacks = queued − invoked in Tasks Trace (route 1: dead slabs) or \
         RCU (routes 2, 3; route 2's full pointer blocks wait on the kfree block ring, not as callbacks, so its \
         backlog shows in objects); Δ = change from the start of the cell; drain = route 1 destroy of its cache, \
         route 2 rcu_barrier",
        SAMPLE_EVERY.as_millis(),
        dur.as_millis()
    );

    // Ratios.
    let mut rows = vec![vec!["ratios per repetition: median [min–max]".to_string()]];
    rows[0].extend(THREADS.map(threads_label));
    let lines: [(&str, Route, Route, &str); 5] = [
        ("throughput: route 1 / route 3", Route::Typesafe, Route::Kfree, M_TPUT),
        ("throughput: route 2 / route 3", Route::KfreeRcu, Route::Kfree, M_TPUT),
        ("throughput: route 2 / route 1", Route::KfreeRcu, Route::Typesafe, M_TPUT),
        ("objects not freed, steady: route 2 / route 1", Route::KfreeRcu, Route::Typesafe, M_OBJ_STEADY),
        ("slab memory, steady: route 2 / route 1", Route::KfreeRcu, Route::Typesafe, M_SLAB_STEADY),
    ];
    for (label, a, b, m) in lines {
        let mut row = vec![label.to_string()];
        for t in THREADS {
            row.push(ratio_range_cell(res.paired(a, b, t, m)));
        }
        rows.push(row);
    }
    let mut row = vec!["slab memory, steady: route 1 / route 3".to_string()];
    for t in THREADS {
        row.push(ratio_range_cell(res.paired(Route::Typesafe, Route::Kfree, t, M_SLAB_STEADY)));
    }
    rows.push(row);
    let mut row = vec!["route 1 constructor runs per 1e6 allocations".to_string()];
    for t in THREADS {
        row.push(cell(res.get(Route::Typesafe, t, M_CTOR), 0));
    }
    rows.push(row);
    println!();
    print_rows(&rows);
    println!();
}

fn to_json(quick: bool, reps: usize, dur: Duration, cpus: usize, res: &Results, readers: (u64, u64, u64)) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{{\n  \"bench\": \"typesafe\",\n  \"quick\": {quick},\n  \"reps\": {reps},\n  \"cell_ms\": {},\n  \
         \"cpus\": {cpus},\n  \"object_bytes\": {OBJ_SIZE},\n  \"routes\": [{}],\n  \"results\": [",
        dur.as_millis(),
        ROUTES
            .iter()
            .map(|r| format!(
                "{{\"id\": {}, \"name\": {}, \"what\": {}}}",
                json_str(r.id()),
                json_str(r.name()),
                json_str(r.what())
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (i, s) in res.series.iter().enumerate() {
        let sum = summarize(&s.samples);
        let samples = s.samples.iter().map(|&x| json_num(x)).collect::<Vec<_>>().join(", ");
        let _ = write!(
            out,
            "    {{\"route\": {}, \"threads\": {}, \"metric\": {}, \"unit\": {}, \"median\": {}, \"min\": {}, \
             \"max\": {}, \"samples\": [{samples}]}}{}",
            json_str(s.route.id()),
            s.threads,
            json_str(s.metric),
            json_str(s.unit),
            json_num(sum.median),
            json_num(sum.min),
            json_num(sum.max),
            if i + 1 < res.series.len() { ",\n" } else { "\n" }
        );
    }
    let _ = writeln!(out, "  ],\n  \"ratios_median_per_repetition\": [");
    let mut ratios = Vec::new();
    for t in THREADS {
        let r = |a, b, m| res.paired(a, b, t, m).map_or_else(|| "null".into(), |s| json_num(s.median));
        ratios.push(format!(
            "    {{\"threads\": {t}, \"throughput_typesafe/kfree\": {}, \"throughput_kfree_rcu/kfree\": {}, \
             \"throughput_kfree_rcu/typesafe\": {}, \"objects_steady_kfree_rcu/typesafe\": {}, \
             \"slab_steady_kfree_rcu/typesafe\": {}}}",
            r(Route::Typesafe, Route::Kfree, M_TPUT),
            r(Route::KfreeRcu, Route::Kfree, M_TPUT),
            r(Route::KfreeRcu, Route::Typesafe, M_TPUT),
            r(Route::KfreeRcu, Route::Typesafe, M_OBJ_STEADY),
            r(Route::KfreeRcu, Route::Typesafe, M_SLAB_STEADY),
        ));
    }
    let _ = write!(
        out,
        "{}\n  ],\n  \"readers\": {{\"sections\": {}, \"probes\": {}, \"violations\": {}}},\n  \"allocation_failures\": \
         {},\n  \"notes\": [{}]\n}}\n",
        ratios.join(",\n"),
        readers.0,
        readers.1,
        readers.2,
        res.failures,
        res.notes.iter().map(|n| json_str(n)).collect::<Vec<_>>().join(", ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_visits_every_route() {
        assert_eq!(rotated(0), ROUTES);
        assert_eq!(rotated(1), [Route::KfreeRcu, Route::Kfree, Route::Typesafe]);
        assert_eq!(rotated(3), ROUTES);
    }

    #[test]
    fn readers_only_dereference_where_covered() {
        assert!(may_read(R_TYPESAFE, Flavor::Rcu) && may_read(R_TYPESAFE, Flavor::TasksTrace));
        assert!(may_read(R_KFREE_RCU, Flavor::Rcu) && !may_read(R_KFREE_RCU, Flavor::TasksTrace));
        assert!(!may_read(R_KFREE, Flavor::Rcu) && !may_read(MODE_NONE, Flavor::TasksTrace));
    }

    #[test]
    fn every_route_runs() {
        let _serial = crate::bench::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        nolock::init();
        let mut res = Results::default();
        let (sections, _, violations) =
            run_all(1, Duration::from_millis(20), &[1, 2], &mut res, &indicatif::ProgressBar::hidden());
        assert!(sections > 0);
        assert_eq!(violations, 0);
        assert_eq!(res.failures, 0);
        assert_eq!(res.leftovers, 0, "{:?}", res.notes);
        for r in ROUTES {
            for t in [1, 2] {
                let s = res.get(r, t, M_TPUT).expect("throughput recorded");
                assert!(s.median > 0.0, "{} {t}", r.name());
                assert!(res.get(r, t, M_OBJ_PEAK).is_some());
            }
        }
        assert!(res.get(Route::Typesafe, 1, M_CTOR).is_some());
        let json = to_json(true, 1, Duration::from_millis(20), 2, &res, (sections, 0, violations));
        assert!(json.contains("\"throughput_kfree_rcu/typesafe\""));
        assert!(res.paired(Route::KfreeRcu, Route::Typesafe, 1, M_TPUT).is_some());
    }
}
