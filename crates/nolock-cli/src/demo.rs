//! `nolock demo`: a signal storm against the allocator.
//!
//! Worker threads allocate, fill, verify and free objects of every kmalloc class (and page runs above 8 KiB) in
//! tight loops, and hand objects to each other so that many are freed by another thread than the one that
//! allocated them. Meanwhile each worker gets two per-thread POSIX timers (`timer_create` with
//! `SIGEV_THREAD_ID`) on two different real-time signals, so a handler can interrupt the worker anywhere —
//! including inside `kmalloc_nolock` / `kfree_nolock` — and the second signal's handler can interrupt the first
//! one. Every handler allocates objects of random classes, writes and verifies a pattern, frees some at once,
//! parks some for later handlers or for the thread, and frees an object the thread left for it. A periodic
//! timer whose signal is still pending loses its next expiries (overruns), so the main thread re-tunes the
//! timers' period every 100 ms until the *delivered* rate meets `--rate` (see [`Storm`]).
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

use core::alloc::Layout;
use core::ffi::{c_int, c_void};
use core::ptr::{self, NonNull};
use std::process::ExitCode;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use nolock::{Gfp, kfree_nolock, kmalloc_layout_nolock, kmalloc_nolock};

use crate::fmt::{bytes, count, rate};
use crate::sig::{
    Storm, Timed, install_handler, nominal_interval_ns, restore_handler, start_thread_timers, stop_thread_timers,
};

/// What the user asked for.
pub struct DemoArgs {
    /// Worker threads.
    pub threads: usize,
    /// Duration of the storm.
    pub seconds: f64,
    /// Timer signals per second over all threads (0: none).
    pub rate: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Testing the checker: free one foreign pointer (nolock refuses and reports it; the run must fail).
    pub inject_bad_free: bool,
}

/// Requested sizes; the index is the object's size code. The first `N_SMALL` are served by the kmalloc slab
/// classes (8 B … 8 KiB), the rest by page runs.
const SIZES: [usize; 31] = [
    8, 16, 24, 32, 40, 48, 64, 72, 96, 100, 128, 160, 192, 200, 256, 320, // ≤ 320 B
    512, 700, 1024, 1500, 2048, 3000, 4096, 6000, 8192, // ≤ 8 KiB
    8200, 12288, 16384, 20000, 40000, 65536, // page runs
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
    h_signals: AtomicU64,
    h_overruns: AtomicU64,
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
    /// This thread's two timers (`timer_t` as an address; 0: none), published before the start barrier and
    /// deleted by the thread only after `STOP`, so the main thread may re-tune them until it sets `STOP`.
    timers: [AtomicUsize; 2],
    /// Current period of each timer.
    interval_ns: AtomicU64,
}

impl Worker {
    fn new(id: usize) -> Self {
        Self {
            id,
            t_allocs: AtomicU64::new(0),
            t_frees: AtomicU64::new(0),
            t_cross: AtomicU64::new(0),
            t_live: AtomicI64::new(0),
            h_signals: AtomicU64::new(0),
            h_overruns: AtomicU64::new(0),
            h_allocs: AtomicU64::new(0),
            h_frees: AtomicU64::new(0),
            h_cross: AtomicU64::new(0),
            h_seq: AtomicU64::new(0),
            h_live: AtomicI64::new(0),
            to_handler: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            from_handler: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            stash: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            mailbox: std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
            timers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            interval_ns: AtomicU64::new(0),
        }
    }
}

// Process-wide state read by handlers (statics: no allocation, no lazy initialisation).
static WORKERS: AtomicPtr<Worker> = AtomicPtr::new(ptr::null_mut());
static NWORKERS: AtomicUsize = AtomicUsize::new(0);
static ARENA_BYTES: AtomicU64 = AtomicU64::new(0);
static STOP: AtomicBool = AtomicBool::new(false);

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

/// xorshift64*: a tiny generator with no state outside the caller's stack (async-signal-safe).
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(splitmix(seed) | 1)
    }

    #[inline]
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn make_tag(code: usize, origin: usize, in_handler: bool, seq: u64) -> u64 {
    (MAGIC << 56)
        | ((code as u64 & 0xff) << 48)
        | ((origin as u64 & 0x7f) << 41)
        | ((in_handler as u64) << 40)
        | (seq & ((1 << 40) - 1))
}

#[inline]
fn pattern(tag: u64, i: usize) -> u64 {
    tag ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Write the object's tag and pattern.
///
/// # Safety
/// `p` points to at least `size` writable bytes, 8-aligned.
unsafe fn fill(p: *mut u8, size: usize, tag: u64) {
    let words = p as *mut u64;
    for i in 0..size / 8 {
        // SAFETY: i * 8 + 8 <= size, inside the object (caller).
        unsafe { words.add(i).write(pattern(tag, i)) };
    }
    for j in size / 8 * 8..size {
        // SAFETY: j < size, inside the object (caller).
        unsafe { p.add(j).write(tag as u8 ^ j as u8) };
    }
}

/// Check the tag and pattern; `Some((size, allocating worker))` when intact.
///
/// # Safety
/// `p` points to a live object of this demo (at least 8 readable bytes; the tag gives the rest).
unsafe fn check(p: *const u8) -> Option<(usize, usize)> {
    let words = p as *const u64;
    // SAFETY: every object is at least 8 bytes, 8-aligned (caller).
    let tag = unsafe { words.read() };
    if tag >> 56 != MAGIC {
        return None;
    }
    let size = *SIZES.get(((tag >> 48) & 0xff) as usize)?;
    for i in 1..size / 8 {
        // SAFETY: the tag's size code is intact, so the object has `size` bytes.
        if unsafe { words.add(i).read() } != pattern(tag, i) {
            return None;
        }
    }
    for j in size / 8 * 8..size {
        // SAFETY: as above.
        if unsafe { p.add(j).read() } != tag as u8 ^ j as u8 {
            return None;
        }
    }
    Some((size, ((tag >> 41) & 0x7f) as usize))
}

/// # Safety
/// `p` points to at least `size` readable bytes.
unsafe fn all_zero(p: *const u8, size: usize) -> bool {
    // SAFETY: forwarded from the caller.
    let s = unsafe { core::slice::from_raw_parts(p, size) };
    s.iter().all(|&b| b == 0)
}

/// Bytes the demo holds right now, over all workers and handlers.
fn live_bytes() -> i64 {
    let (w, n) = (WORKERS.load(Ordering::Acquire), NWORKERS.load(Ordering::Acquire));
    let mut sum = 0i64;
    for i in 0..n {
        // SAFETY: WORKERS points to `n` workers for as long as any thread or handler runs (see `run`).
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

/// Pick a size code from random bits: small sizes most of the time, a page run one time in `large_one_in`.
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
    // The contract of the call: the requested alignment (at least 8), whole pages above 8 KiB.
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
    if zero && !unsafe { all_zero(p.as_ptr(), size) } {
        NOT_ZEROED.fetch_add(1, Ordering::Relaxed);
    }
    // SAFETY: as above; every class is at least 8-aligned.
    unsafe { fill(p.as_ptr(), size, make_tag(code, origin, in_handler, seq)) };
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

/// The signal handler: runs on a worker thread, possibly in the middle of a nolock call, possibly inside the
/// other signal's handler. Atomics and nolock only.
extern "C" fn on_signal(_sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: our timers carry this thread's Worker, which outlives them (`run`).
    unsafe { crate::sig::dispatch_timer_signal::<Worker>(info, handler_work) };
}

fn handler_work(w: &Worker, overrun: c_int) {
    // Once the run is over, return at once: a thread whose handlers take longer than the timer period (a slow
    // debug or sanitizer build) must still get back to its loop to see `STOP` and delete its timers.
    if STOP.load(Ordering::Relaxed) {
        return;
    }
    w.h_signals.fetch_add(1, Ordering::Relaxed);
    if overrun > 0 {
        w.h_overruns.fetch_add(overrun as u64, Ordering::Relaxed);
    }
    let seq = w.h_seq.fetch_add(1, Ordering::Relaxed);
    let mut rng = Rng::new(seq ^ ((w.id as u64) << 56));
    let mut t = Tally::default();
    // An object the thread left for us: often of the class the thread is busy with right now.
    let r = rng.next();
    let q = w.to_handler[(r % SLOTS as u64) as usize].swap(ptr::null_mut(), Ordering::AcqRel);
    if !q.is_null() {
        t.free(q, w.id);
    }
    for k in 0..3u64 {
        let r = rng.next();
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

impl Timed for Worker {
    fn signals(&self) -> u64 {
        self.h_signals.load(Ordering::Relaxed)
    }

    fn timers(&self) -> &[AtomicUsize; 2] {
        &self.timers
    }

    fn interval_ns(&self) -> &AtomicU64 {
        &self.interval_ns
    }
}

/// Tallies of one worker thread, published to its `Worker` with plain stores.
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

fn worker_main(w: &Worker, all: &[Worker], interval_ns: Option<u64>, start: &Barrier) -> std::io::Result<()> {
    let timers = match interval_ns {
        Some(ns) => start_thread_timers(w, w as *const Worker as *mut c_void, ns),
        None => Ok(Vec::new()),
    };
    start.wait();
    let timers = timers?;
    let n = all.len();
    let mut rng = Rng::new(w.id as u64 + 1);
    let mut ring = [ptr::null_mut::<u8>(); RING];
    let mut t = Tally::default();
    let mut seq = 0u64;
    while !STOP.load(Ordering::Relaxed) {
        for _ in 0..64 {
            let r = rng.next();
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
    stop_thread_timers(&timers);
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
    Ok(())
}

/// Totals over all workers and handlers.
#[derive(Default, Clone, Copy)]
struct Totals {
    thread_allocs: u64,
    handler_allocs: u64,
    frees: u64,
    cross: u64,
    signals: u64,
    overruns: u64,
}

fn totals(workers: &[Worker]) -> Totals {
    let mut t = Totals::default();
    for w in workers {
        t.thread_allocs += w.t_allocs.load(Ordering::Relaxed);
        t.handler_allocs += w.h_allocs.load(Ordering::Relaxed);
        t.frees += w.t_frees.load(Ordering::Relaxed) + w.h_frees.load(Ordering::Relaxed);
        t.cross += w.t_cross.load(Ordering::Relaxed) + w.h_cross.load(Ordering::Relaxed);
        t.signals += w.h_signals.load(Ordering::Relaxed);
        t.overruns += w.h_overruns.load(Ordering::Relaxed);
    }
    t
}

/// Peak resident set size of the process (`VmHWM`), if readable.
pub(crate) fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Run the demo and print its table; failure exit code on a spurious failure, corruption, a nolock report,
/// or a run that could not exercise the allocator (no arena, too few successful allocations).
pub fn run(args: &DemoArgs) -> ExitCode {
    let arena = match crate::health::arena_bytes() {
        Ok(a) => a,
        Err(e) => {
            println!("FAIL: nolock demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reports = crate::health::Reports::start();
    let before = nolock::stats::snapshot();
    ARENA_BYTES.store(arena, Ordering::Relaxed);
    if args.inject_bad_free {
        let mut not_nolock = 0u64;
        // SAFETY: a stack address is not nolock's: kfree_nolock refuses it, reports it, and frees nothing.
        unsafe { kfree_nolock((&raw mut not_nolock).cast()) };
    }
    let rss_before = nolock::stats::resident_bytes().unwrap_or(0) as u64;

    let n = args.threads;
    let workers: Vec<Worker> = (0..n).map(Worker::new).collect();
    // Handlers reach the workers through WORKERS (failure classification) and through their timer's
    // sigev_value; `workers` lives until every worker thread has deleted its timers and exited.
    WORKERS.store(workers.as_ptr() as *mut Worker, Ordering::Release);
    NWORKERS.store(n, Ordering::Release);
    STOP.store(false, Ordering::Relaxed);

    let interval_ns = nominal_interval_ns(args.rate, n);
    let old_actions = match install_handler(on_signal) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nolock demo: cannot install the signal handler: {e}");
            return ExitCode::FAILURE;
        }
    };

    println!(
        "nolock demo: {n} thread(s) for {:.1} s, signal storm of {} ({})",
        args.seconds,
        rate(args.rate as f64),
        if args.rate > 0 {
            format!("{} per-thread timers on 2 real-time signals, re-tuned every 100 ms", 2 * n)
        } else {
            "no timers".into()
        },
    );
    let bar = if args.progress {
        let ticks = (args.seconds * 10.0).ceil() as u64;
        let b = ProgressBar::new(ticks);
        b.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>3} [{bar:30}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };

    let start = Barrier::new(n + 1);
    let mut rss_peak_sampled = rss_before;
    let mut worker_errors = Vec::new();
    let mut storm = interval_ns.map(|ns| Storm::new(args.rate, workers.len(), ns));
    let elapsed = std::thread::scope(|s| {
        let handles: Vec<_> = workers
            .iter()
            .map(|w| {
                let (all, start) = (&workers[..], &start);
                std::thread::Builder::new()
                    .name(format!("worker-{}", w.id))
                    .spawn_scoped(s, move || worker_main(w, all, interval_ns, start))
                    .expect("spawn worker thread")
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(args.seconds);
        let (mut last, mut last_t) = (Totals::default(), t0);
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
            let (cur, now) = (totals(&workers), Instant::now());
            let dt = (now - last_t).as_secs_f64().max(1e-9);
            if let Some(ctl) = storm.as_mut() {
                // Workers delete their timers only after STOP, which is not set yet.
                ctl.adjust(&workers, dt);
            }
            let ops = (cur.thread_allocs + cur.handler_allocs + cur.frees)
                .saturating_sub(last.thread_allocs + last.handler_allocs + last.frees);
            let spurious = SPURIOUS_THREAD.load(Ordering::Relaxed) + SPURIOUS_HANDLER.load(Ordering::Relaxed);
            bar.set_message(format!(
                "{} ops | {} signals | spurious failures {} | corrupted {}",
                rate(ops as f64 / dt),
                rate(cur.signals.saturating_sub(last.signals) as f64 / dt),
                spurious,
                CORRUPT.load(Ordering::Relaxed),
            ));
            bar.set_position(((now - t0).as_secs_f64() * 10.0) as u64);
            if let Some(r) = nolock::stats::resident_bytes() {
                rss_peak_sampled = rss_peak_sampled.max(r as u64);
            }
            (last, last_t) = (cur, now);
        }
        STOP.store(true, Ordering::Relaxed);
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => worker_errors.push(e.to_string()),
                Err(_) => worker_errors.push("a worker thread panicked".into()),
            }
        }
        t0.elapsed()
    });
    bar.finish_and_clear();
    restore_handler(&old_actions);

    // Every worker has stopped its timers and exited: free what is left in the mailboxes.
    let mut main_tally = Tally::default();
    for w in &workers {
        for slot in &w.mailbox {
            let q = slot.swap(ptr::null_mut(), Ordering::AcqRel);
            if !q.is_null() {
                main_tally.free(q, usize::MAX);
            }
        }
    }
    let mut t = totals(&workers);
    let per_worker_allocs: Vec<u64> = workers.iter().map(|w| w.t_allocs.load(Ordering::Relaxed)).collect();
    let final_interval_ns = Storm::mean_interval_ns(&workers);
    t.frees += main_tally.frees;
    t.cross += main_tally.cross;
    WORKERS.store(ptr::null_mut(), Ordering::Release);
    NWORKERS.store(0, Ordering::Release);
    drop(workers);

    let after = nolock::stats::snapshot();
    let rss_peak = peak_rss().unwrap_or(0).max(rss_peak_sampled);
    let trim = nolock::trim();
    let rss_after = nolock::stats::resident_bytes().unwrap_or(0) as u64;
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
    let secs = elapsed.as_secs_f64();
    let allocs = t.thread_allocs + t.handler_allocs;
    let idle_workers = per_worker_allocs.iter().filter(|&&a| a == 0).count();

    let oom_note = format!("None with the arena ({}) nearly full: expected 0", bytes(arena));
    let mut rows: Vec<(String, String, &str)> = Vec::new();
    rows.push(("operations".into(), String::new(), ""));
    let row = |rows: &mut Vec<(String, String, &str)>, k: &str, v: String, m: &'static str| {
        rows.push((format!("  {k}"), v, m))
    };
    row(&mut rows, "allocations in threads", count(t.thread_allocs), "kmalloc_nolock in the worker loops");
    row(
        &mut rows,
        "allocations in signal handlers",
        count(t.handler_allocs),
        "kmalloc_nolock inside handlers that interrupted the workers",
    );
    row(&mut rows, "frees", count(t.frees), "kfree_nolock after verifying the object's pattern");
    row(&mut rows, "  of them cross-thread", count(t.cross), "freed by another thread than the one that allocated it");
    row(
        &mut rows,
        "throughput",
        rate((allocs + t.frees) as f64 / secs),
        "allocations and frees per second, all threads",
    );
    rows.push(("problems".into(), String::new(), ""));
    row(
        &mut rows,
        "spurious failures",
        format!("{} ({} in handlers)", count(spurious_t + spurious_h), count(spurious_h)),
        "None while memory was available: must be 0",
    );
    rows.push(("  out-of-memory failures".into(), count(oom), &oom_note));
    row(&mut rows, "corrupted objects", count(corrupt + not_zeroed), "pattern or Gfp::ZERO check failed: must be 0");
    row(&mut rows, "misaligned objects", count(misaligned), "requested alignment not met: must be 0");
    row(
        &mut rows,
        "natural-alignment misses",
        count(natural),
        "2^n-byte kmalloc_nolock not 2^n-aligned (documented promise)",
    );
    row(
        &mut rows,
        "objects still allocated",
        live_objects.to_string(),
        "nolock's own count after everything was freed",
    );
    rows.push(("how nolock coped (its counters)".into(), String::new(), ""));
    row(
        &mut rows,
        "next-bucket retries",
        count(d(|c| c.next_bucket)),
        "size class busy under a handler: served by the next class",
    );
    row(
        &mut rows,
        "deferred frees",
        count(d(|c| c.deferred_frees)),
        "free while the thread's list was busy: finished later",
    );
    row(&mut rows, "remote frees", count(d(|c| c.remote_frees)), "object returned to a slab another thread was using");
    row(
        &mut rows,
        "shared-path allocations",
        count(d(|c| c.shared_allocs)),
        "no per-thread list usable (nested handlers, thread start/exit)",
    );
    row(
        &mut rows,
        "page-run allocations (> 8 KiB)",
        count(after.large.allocs.saturating_sub(before.large.allocs)),
        "served straight from the page allocator",
    );
    rows.push(("signal storm".into(), String::new(), ""));
    row(
        &mut rows,
        "signals delivered",
        format!("{} ({})", count(t.signals), rate(t.signals as f64 / secs)),
        "handler runs (target: --rate)",
    );
    row(
        &mut rows,
        "timer overruns",
        count(t.overruns),
        "expirations merged into a still-pending signal (thread not running)",
    );
    if interval_ns.is_some() {
        row(
            &mut rows,
            "timer period at the end",
            format!("{:.0} µs", final_interval_ns as f64 / 1000.0),
            "per timer, tuned so that the delivered rate meets the target",
        );
    }
    rows.push(("resident memory".into(), String::new(), ""));
    row(&mut rows, "before", bytes(rss_before), "whole process, at start");
    row(&mut rows, "at peak", bytes(rss_peak), "high-water mark during the storm");
    row(&mut rows, "after", bytes(rss_after), "everything freed, nolock::trim() called");
    row(&mut rows, "  returned by trim()", format!("{} slabs, {} pages", trim.slabs_released, trim.pages_purged), "");

    let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
    println!();
    for (k, v, m) in &rows {
        if v.is_empty() && m.is_empty() {
            println!("{k}");
        } else {
            println!("{k:<w0$}  {v:>w1$}  {m}");
        }
    }
    println!();

    let mut failed = Vec::new();
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
        if idle_workers > 0 {
            failed.push(format!("{idle_workers} of {n} worker thread(s) made no successful allocation"));
        }
        if oom.saturating_mul(100) > attempts {
            failed.push(format!(
                "{} of {} allocation attempts ({:.1}%) failed for lack of memory: the arena ({}) is too small for \
                 this demo; set a larger NOLOCK_ARENA_SIZE",
                count(oom),
                count(attempts),
                oom as f64 * 100.0 / attempts as f64,
                bytes(arena)
            ));
        }
    }
    if args.rate > 0 && t.signals == 0 {
        failed.push("the signal storm delivered no signal: no allocation ran inside a handler".into());
    } else if t.signals > 0 && t.handler_allocs == 0 {
        failed.push(format!("{} signal handler runs, but no allocation succeeded inside one", count(t.signals)));
    }
    if let Some(r) = reports.failure() {
        failed.push(r);
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
    for e in &worker_errors {
        failed.push(format!("worker: {e}"));
    }
    if natural > 0 {
        let first = FIRST_NATURAL_MISS.load(Ordering::Relaxed).wrapping_sub(1);
        println!(
            "note: {natural} power-of-two kmalloc_nolock allocation(s) were not naturally aligned\n      \
             (first: {} bytes at offset {} mod {}); the next-bucket path breaks this promise of the docs",
            first >> 32,
            first & 0xffff_ffff,
            first >> 32
        );
    }
    if failed.is_empty() {
        if oom > 0 {
            println!(
                "note: {} allocation(s) failed for lack of memory (the arena of {} was nearly full)",
                count(oom),
                bytes(arena)
            );
        }
        println!(
            "PASS: {} allocations, no spurious failure, no corruption, no nolock report, every object accounted \
             for",
            count(allocs)
        );
        ExitCode::SUCCESS
    } else {
        for f in &failed {
            println!("FAIL: {f}");
        }
        ExitCode::FAILURE
    }
}
