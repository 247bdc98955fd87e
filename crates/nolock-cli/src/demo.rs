//! `nolock demo`: a signal storm against the allocator.
//!
//! Worker threads allocate, fill, verify and free objects of every kmalloc class (and page runs above 32 KiB) in
//! tight loops, and hand objects to each other so that many are freed by another thread than the one that
//! allocated them. Meanwhile each worker gets two per-thread POSIX timers (`timer_create` with
//! `SIGEV_THREAD_ID`) on two different real-time signals, so a handler can interrupt the worker anywhere —
//! including inside `kmalloc_nolock` / `kfree_nolock` — and the second signal's handler can interrupt the first
//! one. Every handler allocates objects of random classes, writes and verifies a pattern, frees some at once,
//! parks some for later handlers or for the thread, and frees an object the thread left for it. A periodic
//! timer whose signal is still pending loses its next expiries (overruns), so the main thread re-tunes the
//! timers' period every 100 ms until the *delivered* rate meets `--rate` (see [`testkit::storm::Storm`]).
//!
//! Handlers touch only atomics and nolock: no locks, no `std` allocation, no printing, no panicking paths that
//! can trigger. Objects travel between threads and between a thread and its handlers through `AtomicPtr`
//! slots (`swap` hands ownership over; whoever gets a non-null pointer back owns that object).
//!
//! Every object carries a tag in its first word (magic, size code, allocating worker, a sequence number) and a
//! pattern derived from it in the rest, so a checker that finds a wrong byte knows the object was handed out
//! twice or written after free. A failed allocation is *spurious* unless the live bytes of the demo come close
//! to the arena size: with the default 16 GiB arena every failure is spurious.
//!
//! A run that could not exercise the allocator fails too, with its cause: no arena (the kernel refused the
//! reservation, e.g. under `ulimit -v`: the demo does not start), no successful allocation, a worker thread or
//! the signal handlers without one, more than 1% of the attempts failing for lack of memory (the arena is too
//! small for the demo), or any report nolock printed during the run (a refused free, a debug-mode finding).
//!
//! The run itself (threads, storm, progress, table, verdict) is the shared runner of [`crate::scenario`]; this
//! file holds what is the demo's own: the objects, the threads' and handlers' work, and its checks.

use core::alloc::Layout;
use core::ptr::{self, NonNull};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use nolock::{Gfp, kfree_nolock, kmalloc_layout_nolock, kmalloc_nolock};
use testkit::Rng;

use crate::fmt::{bytes, count, rate};
use crate::scenario::{Report, Run, RunArgs, Scenario, Slot, Thread};

/// Run the demo and print its table; failure exit code on a spurious failure, corruption, a nolock report,
/// or a run that could not exercise the allocator (no arena, too few successful allocations).
/// `inject_bad_free` tests the checker: one foreign pointer is freed (nolock refuses and reports it; the run
/// must fail).
pub fn run(args: &RunArgs, inject_bad_free: bool) -> ExitCode {
    crate::scenario::run(Demo { inject_bad_free, ..Demo::default() }, args)
}

/// Requested sizes; the index is the object's size code. The first `N_SMALL` (up to 8 KiB) are the common
/// sizes; the rest are large: kmalloc slab classes up to `KMALLOC_MAX_CACHE_SIZE` (32 KiB), page runs above.
const SIZES: [usize; 31] = [
    8, 16, 24, 32, 40, 48, 64, 72, 96, 100, 128, 160, 192, 200, 256, 320, // ≤ 320 B
    512, 700, 1024, 1500, 2048, 3000, 4096, 6000, 8192, // ≤ 8 KiB
    8200, 12288, 16384, 20000, 40000, 65536, // large: slab classes up to 32 KiB, then page runs
];
const N_SMALL: usize = 25;
const N_TINY: usize = 16;
/// Alignments requested through `kmalloc_layout_nolock`.
const ALIGNS: [usize; 8] = [8, 16, 32, 64, 128, 256, 1024, 4096];

/// Objects each worker keeps in its own ring before freeing or handing them on.
const RING: usize = 256;
/// Cross-thread mailbox slots per worker.
const MAILBOX: usize = 64;
/// Thread ↔ handler slots per worker.
const SLOTS: usize = 8;

const MAGIC: u64 = 0xA5;
const FREED: u64 = 0xDEAD_F4EE_DEAD_F4EE;

/// Per-worker state shared with its signal handlers and with the other workers.
#[repr(C, align(128))]
struct Worker {
    id: usize,
    // Written only by the worker thread itself (plain stores of its local tallies; handlers never write them).
    t_allocs: AtomicU64,
    t_frees: AtomicU64,
    t_cross: AtomicU64,
    t_live: AtomicI64,
    // Written by this thread's signal handlers: atomic RMWs, because the second signal's handler can
    // interrupt the first one between a load and a store.
    h_allocs: AtomicU64,
    h_frees: AtomicU64,
    h_cross: AtomicU64,
    h_seq: AtomicU64,
    h_live: AtomicI64,
    /// The thread parks objects here; a handler takes one and frees it.
    to_handler: [AtomicPtr<u8>; SLOTS],
    /// A handler parks objects here; the thread takes them and frees them.
    from_handler: [AtomicPtr<u8>; SLOTS],
    /// Handlers only: objects kept from one signal to a later one.
    stash: [AtomicPtr<u8>; SLOTS],
    /// Other workers drop objects here; this worker frees them.
    mailbox: [AtomicPtr<u8>; MAILBOX],
}

impl Worker {
    fn new(id: usize) -> Self {
        Self {
            id,
            t_allocs: AtomicU64::new(0),
            t_frees: AtomicU64::new(0),
            t_cross: AtomicU64::new(0),
            t_live: AtomicI64::new(0),
            h_allocs: AtomicU64::new(0),
            h_frees: AtomicU64::new(0),
            h_cross: AtomicU64::new(0),
            h_seq: AtomicU64::new(0),
            h_live: AtomicI64::new(0),
            to_handler: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            from_handler: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            stash: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            mailbox: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }
    }
}

// Process-wide state read by handlers (statics: no allocation, no lazy initialisation).
static WORKERS: AtomicPtr<Slot<Worker>> = AtomicPtr::new(ptr::null_mut());
static NWORKERS: AtomicUsize = AtomicUsize::new(0);
static ARENA_BYTES: AtomicU64 = AtomicU64::new(0);

// Problems (rare: plain global RMW counters).
static SPURIOUS_THREAD: AtomicU64 = AtomicU64::new(0);
static SPURIOUS_HANDLER: AtomicU64 = AtomicU64::new(0);
static OOM: AtomicU64 = AtomicU64::new(0);
static CORRUPT: AtomicU64 = AtomicU64::new(0);
static NOT_ZEROED: AtomicU64 = AtomicU64::new(0);
static MISALIGNED: AtomicU64 = AtomicU64::new(0);
static NATURAL_MISS: AtomicU64 = AtomicU64::new(0);
/// First spurious failure: `size << 1 | in_handler`, plus one (0: none yet).
static FIRST_SPURIOUS: AtomicU64 = AtomicU64::new(0);
/// First natural-alignment miss: `size << 32 | address % size`, plus one (0: none yet).
static FIRST_NATURAL_MISS: AtomicU64 = AtomicU64::new(0);

fn make_tag(code: usize, origin: usize, in_handler: bool, seq: u64) -> u64 {
    (MAGIC << 56)
        | ((code as u64 & 0xff) << 48)
        | ((origin as u64 & 0x7f) << 41)
        | ((in_handler as u64) << 40)
        | (seq & ((1 << 40) - 1))
}

/// Check an object's tag and the stamp derived from it (`testkit::fill`); `Some((size, allocating worker))`
/// when intact.
///
/// # Safety
/// `p` points to a live object of this demo (at least 8 readable bytes, 8-aligned; the tag gives the rest).
unsafe fn check(p: *const u8) -> Option<(usize, usize)> {
    // SAFETY: every object is at least 8 bytes, 8-aligned (caller).
    let tag = unsafe { p.cast::<u64>().read_volatile() };
    if tag >> 56 != MAGIC {
        return None;
    }
    let size = *SIZES.get(((tag >> 48) & 0xff) as usize)?;
    // SAFETY: the tag's size code is intact, so the object has `size` bytes.
    unsafe { testkit::check(p, size, Some(tag), u64::MAX) }.ok()?;
    Some((size, ((tag >> 41) & 0x7f) as usize))
}

/// Bytes the demo holds right now, over all workers and handlers.
fn live_bytes() -> i64 {
    let (w, n) = (WORKERS.load(Ordering::Acquire), NWORKERS.load(Ordering::Acquire));
    let mut sum = 0i64;
    for i in 0..n {
        // SAFETY: WORKERS points to `n` workers from `prepare` until `finish`, while threads and handlers run.
        let w = unsafe { &*w.add(i) };
        sum = sum.wrapping_add(w.t_live.load(Ordering::Relaxed));
        sum = sum.wrapping_add(w.h_live.load(Ordering::Relaxed));
    }
    sum
}

/// Count an allocation failure as out-of-memory or spurious. It is out-of-memory when the demo's live objects
/// fill half the arena, or when at least three quarters of the arena's pages are in use (slabs, page runs,
/// objects cached in threads' lists); anything else — in particular any failure with the default 16 GiB arena
/// — is spurious.
fn count_failure(size: usize, in_handler: bool) {
    let live = live_bytes().max(0) as u64;
    let arena = ARENA_BYTES.load(Ordering::Relaxed);
    // Any context: counts the page allocator's bitmap, only on this rare path.
    let used = nolock::stats::allocated_pages() as u64 * 4096;
    if arena == 0 || live.saturating_add(size as u64).saturating_mul(2) >= arena || used.saturating_mul(4) >= arena * 3
    {
        OOM.fetch_add(1, Ordering::Relaxed);
    } else {
        if in_handler {
            SPURIOUS_HANDLER.fetch_add(1, Ordering::Relaxed);
        } else {
            SPURIOUS_THREAD.fetch_add(1, Ordering::Relaxed);
        }
        let _ = FIRST_SPURIOUS.compare_exchange(
            0,
            ((size as u64) << 1 | in_handler as u64) + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Pick a size code from random bits: small sizes most of the time, a large one one time in `large_one_in`.
#[inline]
fn pick_code(r: u64, large_one_in: u64) -> usize {
    if (r >> 44).is_multiple_of(large_one_in) {
        N_SMALL + (r % (SIZES.len() - N_SMALL) as u64) as usize
    } else if (r >> 52) & 3 != 0 {
        (r % N_TINY as u64) as usize
    } else {
        (r % N_SMALL as u64) as usize
    }
}

/// Allocate an object chosen by `r`, check it (alignment, zeroing), and write its tag and pattern.
/// Returns the object and its size; a failure is counted and gives `None`.
fn alloc_obj(r: u64, origin: usize, in_handler: bool, seq: u64, large_one_in: u64) -> Option<(NonNull<u8>, usize)> {
    let code = pick_code(r, large_one_in);
    let size = SIZES[code];
    let zero = (r >> 4) & 3 == 0;
    let flags = if zero { Gfp::ZERO } else { Gfp::NONE };
    let mut align = 8;
    let got = if (r >> 8) & 3 == 0 {
        align = ALIGNS[((r >> 10) % ALIGNS.len() as u64) as usize];
        match Layout::from_size_align(size, align) {
            Ok(l) => kmalloc_layout_nolock(l, flags),
            Err(_) => {
                align = 8;
                kmalloc_nolock(size, flags)
            }
        }
    } else {
        kmalloc_nolock(size, flags)
    };
    let Some(p) = got else {
        count_failure(size, in_handler);
        return None;
    };
    let addr = p.as_ptr() as usize;
    // The contract of the call: the requested alignment (at least 8), whole pages above the largest class.
    let required = if size > nolock::KMALLOC_MAX_CACHE_SIZE { 4096.max(align) } else { align };
    if !addr.is_multiple_of(required) {
        MISALIGNED.fetch_add(1, Ordering::Relaxed);
    } else if align == 8
        && size.is_power_of_two()
        && size <= nolock::KMALLOC_MAX_CACHE_SIZE
        && !addr.is_multiple_of(size)
    {
        // kmalloc_nolock's documentation also promises natural alignment for power-of-two sizes.
        NATURAL_MISS.fetch_add(1, Ordering::Relaxed);
        let _ = FIRST_NATURAL_MISS.compare_exchange(
            0,
            ((size as u64) << 32 | (addr % size) as u64) + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    // SAFETY: a fresh object of at least `size` bytes.
    if zero && !unsafe { testkit::is_zeroed(p.as_ptr(), size) } {
        NOT_ZEROED.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: as above; every class is at least 8-aligned.
    unsafe { testkit::fill(p.as_ptr(), size, make_tag(code, origin, in_handler, seq)) };
    Some((p, size))
}

/// Verify an object and free it. Returns its size and whether another worker allocated it; a corrupted
/// object is counted and deliberately not freed (someone else may still own it).
///
/// # Safety
/// `p` is a live object of this demo that the caller owns.
unsafe fn check_and_free(p: *mut u8, me: usize) -> Option<(usize, bool)> {
    // SAFETY: forwarded from the caller.
    match unsafe { check(p) } {
        Some((size, origin)) => {
            // SAFETY: the object is ours; poison the tag so a second owner would notice, then free.
            unsafe {
                (p as *mut u64).write(FREED);
                kfree_nolock(p);
            }
            Some((size, origin != me))
        }
        None => {
            CORRUPT.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Tallies of one worker thread (or one handler run), published to its `Worker` with plain stores (by the
/// thread) or RMWs (by a handler).
#[derive(Default)]
struct Tally {
    allocs: u64,
    frees: u64,
    cross: u64,
    live: i64,
}

impl Tally {
    fn free(&mut self, p: *mut u8, me: usize) {
        // SAFETY: callers own `p`, a live demo object.
        if let Some((size, x)) = unsafe { check_and_free(p, me) } {
            self.frees += 1;
            self.cross += x as u64;
            self.live -= size as i64;
        }
    }

    fn publish(&self, w: &Worker) {
        w.t_allocs.store(self.allocs, Ordering::Relaxed);
        w.t_frees.store(self.frees, Ordering::Relaxed);
        w.t_cross.store(self.cross, Ordering::Relaxed);
        w.t_live.store(self.live, Ordering::Relaxed);
    }
}

/// Totals over all workers and handlers.
#[derive(Default, Clone, Copy)]
struct Totals {
    thread_allocs: u64,
    handler_allocs: u64,
    frees: u64,
    cross: u64,
}

/// The demo's scenario state (main thread).
#[derive(Default)]
struct Demo {
    inject_bad_free: bool,
    arena: u64,
    before: Option<nolock::stats::Snapshot>,
    after: Option<nolock::stats::Snapshot>,
    /// What the main thread freed from the mailboxes at the end.
    main: Tally,
    /// Workers that made no successful allocation.
    idle_workers: usize,
    threads: usize,
}

impl Scenario for Demo {
    type Worker = Worker;
    type Totals = Totals;
    const NAME: &'static str = "demo";
    const THREAD_NAME: &'static str = "worker";
    const IN_HANDLER: &'static str = "allocation";

    fn workers(&self, n: usize) -> Vec<Worker> {
        (0..n).map(Worker::new).collect()
    }

    fn describe(&self, n: usize) -> String {
        format!("{n} thread(s)")
    }

    fn prepare(&mut self, arena: u64, workers: &[Slot<Worker>]) {
        self.arena = arena;
        self.threads = workers.len();
        self.before = Some(nolock::stats::snapshot());
        ARENA_BYTES.store(arena, Ordering::Relaxed);
        if self.inject_bad_free {
            let mut not_nolock = 0u64;
            // SAFETY: a stack address is not nolock's: kfree_nolock refuses it, reports it, and frees nothing.
            unsafe { kfree_nolock((&raw mut not_nolock).cast()) };
        }
        // Handlers reach the workers through WORKERS (failure classification) and through their timer's
        // sigev_value; the runner keeps `workers` until every worker thread has stopped its storm and exited.
        WORKERS.store(workers.as_ptr().cast_mut(), Ordering::Release);
        NWORKERS.store(workers.len(), Ordering::Release);
    }

    fn thread(w: &Worker, all: &[Slot<Worker>], th: &mut Thread<'_>) {
        let n = all.len();
        let mut rng = Rng::new(w.id as u64 + 1);
        let mut ring = [ptr::null_mut::<u8>(); RING];
        let mut t = Tally::default();
        let mut seq = 0u64;
        while th.running() {
            for _ in 0..64 {
                let r = rng.next_u64();
                seq += 1;
                if let Some((p, size)) = alloc_obj(r, w.id, false, seq, 64) {
                    t.allocs += 1;
                    t.live += size as i64;
                    let old = core::mem::replace(&mut ring[((r >> 20) % RING as u64) as usize], p.as_ptr());
                    if !old.is_null() {
                        let slot = (r >> 32) as usize;
                        let prev = match (r >> 28) & 7 {
                            // To another worker's mailbox: it frees the object (cross-thread).
                            0 => {
                                let target = if n > 1 { (w.id + 1 + slot % (n - 1)) % n } else { w.id };
                                all[target].mailbox[slot % MAILBOX].swap(old, Ordering::AcqRel)
                            }
                            // To this thread's signal handlers.
                            1 => w.to_handler[slot % SLOTS].swap(old, Ordering::AcqRel),
                            _ => old,
                        };
                        if !prev.is_null() {
                            t.free(prev, w.id);
                        }
                    }
                }
                // Free what the other workers and the handlers left for us.
                let q = w.mailbox[((r >> 36) % MAILBOX as u64) as usize].swap(ptr::null_mut(), Ordering::AcqRel);
                if !q.is_null() {
                    t.free(q, w.id);
                }
                if (r >> 42) & 3 == 0 {
                    let q = w.from_handler[((r >> 44) % SLOTS as u64) as usize].swap(ptr::null_mut(), Ordering::AcqRel);
                    if !q.is_null() {
                        t.free(q, w.id);
                    }
                }
            }
            t.publish(w);
        }
        th.end_storm();
        // No handler runs on this thread any more: empty its ring and its handler slots.
        for p in ring {
            if !p.is_null() {
                t.free(p, w.id);
            }
        }
        for slot in w.to_handler.iter().chain(&w.from_handler).chain(&w.stash) {
            let q = slot.swap(ptr::null_mut(), Ordering::AcqRel);
            if !q.is_null() {
                t.free(q, w.id);
            }
        }
        t.publish(w);
    }

    /// Takes an object the thread left, allocates three (frees one at once, keeps one for a later handler,
    /// hands one to the thread). Atomics and nolock only.
    fn on_signal(w: &Worker) {
        let seq = w.h_seq.fetch_add(1, Ordering::Relaxed);
        let mut rng = Rng::new(seq ^ ((w.id as u64) << 56));
        let mut t = Tally::default();
        // An object the thread left for us: often of the class the thread is busy with right now.
        let r = rng.next_u64();
        let q = w.to_handler[(r % SLOTS as u64) as usize].swap(ptr::null_mut(), Ordering::AcqRel);
        if !q.is_null() {
            t.free(q, w.id);
        }
        for k in 0..3u64 {
            let r = rng.next_u64();
            let Some((p, size)) = alloc_obj(r, w.id, true, seq.wrapping_mul(4) + k, 8) else {
                continue;
            };
            t.allocs += 1;
            t.live += size as i64;
            let slot = ((r >> 16) % SLOTS as u64) as usize;
            // Free at once, keep for a later handler, or hand over to the thread.
            let old = match k {
                0 => p.as_ptr(),
                1 => w.stash[slot].swap(p.as_ptr(), Ordering::AcqRel),
                _ => w.from_handler[slot].swap(p.as_ptr(), Ordering::AcqRel),
            };
            if !old.is_null() {
                t.free(old, w.id);
            }
        }
        w.h_allocs.fetch_add(t.allocs, Ordering::Relaxed);
        w.h_frees.fetch_add(t.frees, Ordering::Relaxed);
        w.h_cross.fetch_add(t.cross, Ordering::Relaxed);
        w.h_live.fetch_add(t.live, Ordering::Relaxed);
    }

    fn totals(workers: &[Slot<Worker>]) -> Totals {
        let mut t = Totals::default();
        for w in workers {
            t.thread_allocs += w.t_allocs.load(Ordering::Relaxed);
            t.handler_allocs += w.h_allocs.load(Ordering::Relaxed);
            t.frees += w.t_frees.load(Ordering::Relaxed) + w.h_frees.load(Ordering::Relaxed);
            t.cross += w.t_cross.load(Ordering::Relaxed) + w.h_cross.load(Ordering::Relaxed);
        }
        t
    }

    fn tick(&mut self, cur: &Totals, last: &Totals, dt_s: f64) -> String {
        let ops = (cur.thread_allocs + cur.handler_allocs + cur.frees)
            .saturating_sub(last.thread_allocs + last.handler_allocs + last.frees);
        format!(
            "{} ops | spurious failures {} | corrupted {}",
            rate(ops as f64 / dt_s),
            SPURIOUS_THREAD.load(Ordering::Relaxed) + SPURIOUS_HANDLER.load(Ordering::Relaxed),
            CORRUPT.load(Ordering::Relaxed),
        )
    }

    fn finish(&mut self, workers: &[Slot<Worker>]) {
        // Every worker has stopped its timers and exited: free what is left in the mailboxes.
        for w in workers {
            for slot in &w.mailbox {
                let q = slot.swap(ptr::null_mut(), Ordering::AcqRel);
                if !q.is_null() {
                    self.main.free(q, usize::MAX);
                }
            }
        }
        self.idle_workers = workers.iter().filter(|w| w.t_allocs.load(Ordering::Relaxed) == 0).count();
        WORKERS.store(ptr::null_mut(), Ordering::Release);
        NWORKERS.store(0, Ordering::Release);
        self.after = Some(nolock::stats::snapshot());
    }

    fn report(&mut self, t: &Totals, run: &Run, out: &mut Report) {
        // The threads' and handlers' counts, and what the main thread freed from the mailboxes at the end.
        let t = Totals { frees: t.frees + self.main.frees, cross: t.cross + self.main.cross, ..*t };
        let (arena, n) = (self.arena, self.threads);
        let (before, after) = (self.before.take().unwrap_or_default(), self.after.take().unwrap_or_default());
        let after_trim = nolock::stats::snapshot();
        let (b, a) = (before.total(), after.total());
        let d = |f: fn(&nolock::CacheStats) -> u64| f(&a).saturating_sub(f(&b));
        let live_objects = (after_trim.total().allocs + after_trim.large.allocs)
            .wrapping_sub(after_trim.total().frees + after_trim.large.frees) as i64;

        let spurious_t = SPURIOUS_THREAD.load(Ordering::Relaxed);
        let spurious_h = SPURIOUS_HANDLER.load(Ordering::Relaxed);
        let oom = OOM.load(Ordering::Relaxed);
        let corrupt = CORRUPT.load(Ordering::Relaxed);
        let not_zeroed = NOT_ZEROED.load(Ordering::Relaxed);
        let misaligned = MISALIGNED.load(Ordering::Relaxed);
        let natural = NATURAL_MISS.load(Ordering::Relaxed);
        let allocs = t.thread_allocs + t.handler_allocs;

        let table = &mut out.table;
        table.head("operations");
        table.row("allocations in threads", count(t.thread_allocs), "kmalloc_nolock in the worker loops");
        table.row(
            "allocations in signal handlers",
            count(t.handler_allocs),
            "kmalloc_nolock inside handlers that interrupted the workers",
        );
        table.row("frees", count(t.frees), "kfree_nolock after verifying the object's pattern");
        table.row("  of them cross-thread", count(t.cross), "freed by another thread than the one that allocated it");
        table.row(
            "throughput",
            rate((allocs + t.frees) as f64 / run.secs),
            "allocations and frees per second, all threads",
        );
        table.head("problems");
        table.row(
            "spurious failures",
            format!("{} ({} in handlers)", count(spurious_t + spurious_h), count(spurious_h)),
            "None while memory was available: must be 0",
        );
        table.row(
            "out-of-memory failures",
            count(oom),
            format!("None with the arena ({}) nearly full: expected 0", bytes(arena)),
        );
        table.row("corrupted objects", count(corrupt + not_zeroed), "pattern or Gfp::ZERO check failed: must be 0");
        table.row("misaligned objects", count(misaligned), "requested alignment not met: must be 0");
        table.row(
            "natural-alignment misses",
            count(natural),
            "2^n-byte kmalloc_nolock not 2^n-aligned (documented promise)",
        );
        table.row("objects still allocated", live_objects.to_string(), "nolock's own count after everything was freed");
        table.head("how nolock coped (its counters)");
        table.row(
            "next-bucket retries",
            count(d(|c| c.next_bucket)),
            "size class busy under a handler: served by the next class",
        );
        table.row(
            "deferred frees",
            count(d(|c| c.deferred_frees)),
            "free while the thread's list was busy: finished later",
        );
        table.row("remote frees", count(d(|c| c.remote_frees)), "object returned to a slab another thread was using");
        table.row(
            "shared-path allocations",
            count(d(|c| c.shared_allocs)),
            "no per-thread list usable (nested handlers, thread start/exit)",
        );
        table.row(
            "page-run allocations (> 32 KiB)",
            count(after.large.allocs.saturating_sub(before.large.allocs)),
            "served straight from the page allocator",
        );

        let failed = &mut out.failed;
        if spurious_t + spurious_h > 0 {
            let first = FIRST_SPURIOUS.load(Ordering::Relaxed).wrapping_sub(1);
            failed.push(format!(
                "{} spurious allocation failure(s), first: {} bytes in {}",
                spurious_t + spurious_h,
                first >> 1,
                if first & 1 == 1 { "a signal handler" } else { "a thread" }
            ));
        }
        // A run that could not exercise the allocator proves nothing: it must not pass.
        let attempts = allocs + oom + spurious_t + spurious_h;
        if allocs == 0 {
            failed.push(format!(
                "no allocation succeeded ({} out-of-memory failures): the demo exercised nothing",
                count(oom)
            ));
        } else {
            if self.idle_workers > 0 {
                failed.push(format!("{} of {n} worker thread(s) made no successful allocation", self.idle_workers));
            }
            if oom.saturating_mul(100) > attempts {
                failed.push(format!(
                    "{} of {} allocation attempts ({:.1}%) failed for lack of memory: the arena ({}) is too small \
                     for this demo; set a larger NOLOCK_ARENA_SIZE",
                    count(oom),
                    count(attempts),
                    oom as f64 * 100.0 / attempts as f64,
                    bytes(arena)
                ));
            }
        }
        if run.signals > 0 && t.handler_allocs == 0 {
            failed.push(format!("{} signal handler runs, but no allocation succeeded inside one", count(run.signals)));
        }
        if corrupt + not_zeroed > 0 {
            failed.push(format!(
                "{} corrupted object(s) ({} bad patterns, {} not zeroed)",
                corrupt + not_zeroed,
                corrupt,
                not_zeroed
            ));
        }
        if misaligned > 0 {
            failed.push(format!("{misaligned} object(s) without the requested alignment"));
        }
        if live_objects != 0 {
            failed.push(format!("nolock counts {live_objects} object(s) still allocated"));
        }
        if natural > 0 {
            let first = FIRST_NATURAL_MISS.load(Ordering::Relaxed).wrapping_sub(1);
            out.notes.push(format!(
                "{natural} power-of-two kmalloc_nolock allocation(s) were not naturally aligned\n      (first: {} \
                 bytes at offset {} mod {}); the next-bucket path breaks this promise of the docs",
                first >> 32,
                first & 0xffff_ffff,
                first >> 32
            ));
        }
        if oom > 0 && failed.is_empty() {
            out.notes.push(format!(
                "{} allocation(s) failed for lack of memory (the arena of {} was nearly full)",
                count(oom),
                bytes(arena)
            ));
        }
        out.pass = format!(
            "{} allocations, no spurious failure, no corruption, no nolock report, every object accounted for",
            count(allocs)
        );
    }
}
