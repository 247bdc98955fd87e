//! `nolock bench` / `nolock bench alloc`: allocation workloads for nolock and three baselines, all measured in
//! the same run.
//!
//! Allocators: nolock (`kmalloc_nolock` / `kfree_nolock`), glibc (`std::alloc::System`), mimalloc
//! (`mimalloc::MiMalloc`) and jemalloc (`tikv_jemallocator::Jemalloc`). The baselines are called through the
//! `GlobalAlloc` trait; none of them is installed as the global allocator, so the harness's own allocations
//! (channels, threads, the result table) go to glibc for every allocator alike.
//!
//! Workloads (ids for `--only` in brackets):
//! - pairs: allocate and free at once, repeated, at 16 B, 64 B, 256 B, 1 KiB, 4 KiB and 16 KiB (`pair16` …
//!   `pair16k`) — ns per alloc+free pair;
//! - batches: `n` allocations, then `n` frees in LIFO, FIFO or a fixed random order — 1000 × 64 B FIFO
//!   (`batch1000`), 100k × 64 B in each order (`lifo100k-64`, `fifo100k-64`, `random100k-64`), 100k of
//!   16–512 B (log-uniform) LIFO and random (`lifo100k-16to512`, `random100k-16to512`) — ns per pair;
//! - a live set of 10k objects of 16 B – 1 KiB (log-uniform), each step freeing a random one and allocating a
//!   new one in its place (`live10k`) — ns per step;
//! - cross-thread (`xthread`): a producer thread allocates 64 B objects in batches of 256 and sends each batch
//!   over a `std::sync::mpsc::sync_channel` to a consumer thread that frees them — wall time per object;
//! - a real program (`prog-wall`, `prog-sys`, `prog-rss`): `src/prog/workload.rs` (collections, sorting,
//!   serde_json, `BTreeMap`) built once per allocator as `#[global_allocator]` (the `prog-*` binaries, found next
//!   to this one) and run as a whole child process — wall time, system CPU time, peak RSS.
//!
//! The random sequences are fixed (a seeded xorshift) and built before any timing, so every allocator does
//! exactly the same work.
//!
//! These machines are noisy (results can move 2× between runs), so each cell is the median of at least five
//! timed repetitions with min and max, the allocators take turns inside every repetition (in a rotating order),
//! and only ratios between allocators of the *same run* are meaningful.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use testkit::Rng;

use nolock::{Gfp, kfree_nolock, kmalloc_nolock};

use super::{BenchArgs, Summary, print_rows, progress_bar, summarize};

/// An allocator as the workloads see it: raw pointers, size known at free.
trait RawAlloc: Sync {
    /// # Safety
    /// `size > 0`.
    unsafe fn alloc(&self, size: usize) -> *mut u8;
    /// # Safety
    /// `p` came from `alloc(size)` of this allocator and is not used afterwards.
    unsafe fn free(&self, p: *mut u8, size: usize);
}

struct Nolock;

impl RawAlloc for Nolock {
    #[inline(always)]
    unsafe fn alloc(&self, size: usize) -> *mut u8 {
        kmalloc_nolock(size, Gfp::NONE).map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    #[inline(always)]
    unsafe fn free(&self, p: *mut u8, _size: usize) {
        // SAFETY: forwarded from the caller: `p` came from kmalloc_nolock.
        unsafe { kfree_nolock(p) }
    }
}

/// A `GlobalAlloc` used directly (not installed as the global allocator).
struct Via<A>(A);

impl<A: GlobalAlloc + Sync> RawAlloc for Via<A> {
    #[inline(always)]
    unsafe fn alloc(&self, size: usize) -> *mut u8 {
        // SAFETY: size > 0 (caller) and 8 is a power of two that no size in these workloads overflows.
        unsafe { self.0.alloc(Layout::from_size_align_unchecked(size, 8)) }
    }

    #[inline(always)]
    unsafe fn free(&self, p: *mut u8, size: usize) {
        // SAFETY: `p` came from `alloc(size)` with the same layout (caller).
        unsafe { self.0.dealloc(p, Layout::from_size_align_unchecked(size, 8)) }
    }
}

#[cold]
#[inline(never)]
fn out_of_memory(name: &str) -> ! {
    panic!("{name}: allocation failed during the benchmark")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Nolock,
    Glibc,
    Mimalloc,
    Jemalloc,
}

const KINDS: [Kind; 4] = [Kind::Nolock, Kind::Glibc, Kind::Mimalloc, Kind::Jemalloc];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Nolock => "nolock",
            Kind::Glibc => "glibc",
            Kind::Mimalloc => "mimalloc",
            Kind::Jemalloc => "jemalloc",
        }
    }
}

/// The order in which a batch is freed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Order {
    /// Last allocated, first freed.
    Lifo,
    /// In allocation order.
    Fifo,
    /// In a fixed random permutation (the same for every allocator).
    Random,
}

/// Object sizes of a workload.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sizes {
    Fixed(usize),
    /// Log-uniform in 16 ..= 512 B (a fixed sequence, the same for every allocator).
    Mixed512,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Work {
    /// Allocate and free at once, repeated.
    Pair(usize),
    /// `n` allocations, then `n` frees in `order`.
    Batch { n: usize, sizes: Sizes, order: Order },
    /// A live set of `LIVE_N` objects of 16 B – 1 KiB (log-uniform); each step frees a random one and allocates
    /// a new one of a random size in its place.
    Live,
    /// Producer → consumer across threads.
    XThread,
}

/// Objects in the live set of [`Work::Live`].
const LIVE_N: usize = 10_000;
/// Largest `n` of a batch (the random permutation and size sequence have this many entries).
const BATCH_MAX: usize = 100_000;

const WORKS: [Work; 14] = [
    Work::Pair(16),
    Work::Pair(64),
    Work::Pair(256),
    Work::Pair(1024),
    Work::Pair(4096),
    Work::Pair(16384),
    Work::Batch { n: 1000, sizes: Sizes::Fixed(64), order: Order::Fifo },
    Work::Batch { n: BATCH_MAX, sizes: Sizes::Fixed(64), order: Order::Lifo },
    Work::Batch { n: BATCH_MAX, sizes: Sizes::Fixed(64), order: Order::Fifo },
    Work::Batch { n: BATCH_MAX, sizes: Sizes::Fixed(64), order: Order::Random },
    Work::Batch { n: BATCH_MAX, sizes: Sizes::Mixed512, order: Order::Lifo },
    Work::Batch { n: BATCH_MAX, sizes: Sizes::Mixed512, order: Order::Random },
    Work::Live,
    Work::XThread,
];

impl Work {
    fn id(self) -> String {
        let order = |o: Order| match o {
            Order::Lifo => "lifo",
            Order::Fifo => "fifo",
            Order::Random => "random",
        };
        match self {
            Work::Pair(s) => format!("pair{}", size_name(s)),
            Work::Batch { n: 1000, sizes: Sizes::Fixed(64), order: Order::Fifo } => "batch1000".into(),
            Work::Batch { n, sizes: Sizes::Fixed(s), order: o } => {
                format!("{}{}k-{}", order(o), n / 1000, size_name(s))
            }
            Work::Batch { n, sizes: Sizes::Mixed512, order: o } => format!("{}{}k-16to512", order(o), n / 1000),
            Work::Live => "live10k".into(),
            Work::XThread => "xthread".into(),
        }
    }

    fn label(self) -> String {
        let order = |o: Order| match o {
            Order::Lifo => "LIFO",
            Order::Fifo => "FIFO",
            Order::Random => "random",
        };
        match self {
            Work::Pair(s) => format!("pair {} (ns/pair)", size_label(s)),
            Work::Batch { n, sizes: Sizes::Fixed(s), order: o } => {
                format!("{n} × {} then {} frees (ns/pair)", size_label(s), order(o))
            }
            Work::Batch { n, sizes: Sizes::Mixed512, order: o } => {
                format!("{n} × 16–512 B then {} frees (ns/pair)", order(o))
            }
            Work::Live => format!("live set {LIVE_N} × 16 B–1 KiB, replace (ns/step)"),
            Work::XThread => "cross-thread 64 B (ns/object)".into(),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Work::XThread => "ns/object",
            Work::Live => "ns/step",
            _ => "ns/pair",
        }
    }

    /// Operations per timed repetition in a full run.
    fn full_ops(self) -> u64 {
        match self {
            Work::Pair(s) if s > 1024 => 1_000_000,
            Work::Pair(_) | Work::Batch { .. } => 4_000_000,
            Work::Live | Work::XThread => 2_000_000,
        }
    }
}

fn size_name(s: usize) -> String {
    if s >= 1024 { format!("{}k", s / 1024) } else { s.to_string() }
}

fn size_label(s: usize) -> String {
    if s >= 1024 { format!("{} KiB", s / 1024) } else { format!("{s} B") }
}

/// Log-uniform in `lo ..= hi`.
fn log_uniform(rng: &mut Rng, lo: usize, hi: usize) -> usize {
    let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
    let x = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    ((a + (b - a) * x).exp() as usize).clamp(lo, hi)
}

/// The fixed random sequences, built once (outside any timing) and shared by every allocator.
struct Data {
    /// A random permutation of `0..BATCH_MAX`.
    perm: Vec<u32>,
    /// `BATCH_MAX` log-uniform sizes in 16 ..= 512.
    sizes512: Vec<u32>,
    /// `LIVE_N` initial sizes of the live set, log-uniform in 16 ..= 1024.
    live_init: Vec<u32>,
    /// Replacement steps of the live set: (slot, new size).
    live_steps: Vec<(u32, u32)>,
}

impl Data {
    fn new() -> Data {
        let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
        let mut perm: Vec<u32> = (0..BATCH_MAX as u32).collect();
        for i in (1..perm.len()).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let sizes512 = (0..BATCH_MAX).map(|_| log_uniform(&mut rng, 16, 512) as u32).collect();
        let live_init = (0..LIVE_N).map(|_| log_uniform(&mut rng, 16, 1024) as u32).collect();
        let live_steps =
            (0..1 << 20).map(|_| (rng.below(LIVE_N as u64) as u32, log_uniform(&mut rng, 16, 1024) as u32)).collect();
        Data { perm, sizes512, live_init, live_steps }
    }
}

/// Alloc+free of `size` bytes, `n` times; ns per pair.
fn pair<A: RawAlloc>(a: &A, name: &str, size: usize, n: u64) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        // SAFETY: size > 0.
        let p = unsafe { a.alloc(black_box(size)) };
        if p.is_null() {
            out_of_memory(name);
        }
        // SAFETY: p came from a.alloc(size) and is not used again.
        unsafe { a.free(black_box(p), size) };
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

/// Rounds of `b` allocations then `b` frees in `order`, about `n` pairs in all; ns per pair.
fn batch<A: RawAlloc>(a: &A, name: &str, d: &Data, b: usize, sizes: Sizes, order: Order, n: u64) -> f64 {
    let rounds = (n / b as u64).max(1);
    let size_of = |i: usize| match sizes {
        Sizes::Fixed(s) => s,
        Sizes::Mixed512 => d.sizes512[i] as usize,
    };
    // A permutation of 0..b: the first b entries of the big one are not a permutation of 0..b unless b is all.
    let perm: Vec<u32> =
        if b == BATCH_MAX { d.perm.clone() } else { d.perm.iter().copied().filter(|&i| (i as usize) < b).collect() };
    let mut ptrs = vec![core::ptr::null_mut::<u8>(); b];
    let t = Instant::now();
    for _ in 0..rounds {
        for (i, slot) in ptrs.iter_mut().enumerate() {
            // SAFETY: size > 0.
            let p = unsafe { a.alloc(black_box(size_of(i))) };
            if p.is_null() {
                out_of_memory(name);
            }
            *slot = p;
        }
        black_box(&mut ptrs);
        match order {
            Order::Fifo => {
                for (i, &p) in ptrs.iter().enumerate() {
                    // SAFETY: p came from a.alloc(size_of(i)) and is not used again.
                    unsafe { a.free(p, size_of(i)) };
                }
            }
            Order::Lifo => {
                for (i, &p) in ptrs.iter().enumerate().rev() {
                    // SAFETY: as above.
                    unsafe { a.free(p, size_of(i)) };
                }
            }
            Order::Random => {
                for &i in &perm {
                    let i = i as usize;
                    // SAFETY: as above; the permutation frees each pointer once.
                    unsafe { a.free(ptrs[i], size_of(i)) };
                }
            }
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * b as u64) as f64
}

/// The live set: fill (untimed), `n` replacement steps (timed), free all (untimed); ns per step.
fn live<A: RawAlloc>(a: &A, name: &str, d: &Data, n: u64) -> f64 {
    let mut ptrs: Vec<(*mut u8, usize)> = d
        .live_init
        .iter()
        .map(|&s| {
            // SAFETY: s > 0.
            let p = unsafe { a.alloc(s as usize) };
            if p.is_null() {
                out_of_memory(name);
            }
            (p, s as usize)
        })
        .collect();
    let steps = &d.live_steps;
    let t = Instant::now();
    for k in 0..n as usize {
        let (slot, size) = steps[k & (steps.len() - 1)];
        let e = &mut ptrs[slot as usize];
        // SAFETY: e.0 came from a.alloc(e.1) and is replaced here.
        unsafe { a.free(e.0, e.1) };
        // SAFETY: size > 0.
        let p = unsafe { a.alloc(black_box(size as usize)) };
        if p.is_null() {
            out_of_memory(name);
        }
        *e = (p, size as usize);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    for (p, s) in ptrs {
        // SAFETY: each live object is freed once.
        unsafe { a.free(p, s) };
    }
    ns
}

/// A batch of pointers that crosses threads.
struct Batch([*mut u8; 256]);

// SAFETY: the pointers are plain heap objects handed from producer to consumer; only one side owns them at a time.
unsafe impl Send for Batch {}

/// Producer allocates 64 B objects in batches of 256 and sends them to a consumer that frees them; about `n`
/// objects in all; wall time per object.
fn xthread<A: RawAlloc>(a: &A, name: &str, n: u64) -> f64 {
    let batches = (n / 256).max(1);
    let (tx, rx) = sync_channel::<Batch>(16);
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let tx = tx;
            start.wait();
            // The clock starts here: the main thread may be descheduled after the barrier for longer than the
            // whole transfer takes.
            let t0 = Instant::now();
            for _ in 0..batches {
                let mut b = Batch([core::ptr::null_mut(); 256]);
                for slot in b.0.iter_mut() {
                    // SAFETY: size > 0.
                    let p = unsafe { a.alloc(black_box(64)) };
                    if p.is_null() {
                        out_of_memory(name);
                    }
                    *slot = p;
                }
                tx.send(b).expect("consumer alive");
            }
            t0
        });
        let consumer = s.spawn(|| {
            start.wait();
            for b in rx {
                for p in b.0 {
                    // SAFETY: p came from a.alloc(64) on the producer, which handed it over.
                    unsafe { a.free(black_box(p), 64) };
                }
            }
            Instant::now()
        });
        start.wait();
        let t0 = producer.join().expect("producer");
        let end = consumer.join().expect("consumer");
        (end - t0).as_nanos() as f64 / (batches * 256) as f64
    })
}

fn run_work<A: RawAlloc>(a: &A, name: &str, d: &Data, w: Work, n: u64) -> f64 {
    match w {
        Work::Pair(size) => pair(a, name, size, n),
        Work::Batch { n: b, sizes, order } => batch(a, name, d, b, sizes, order, n),
        Work::Live => live(a, name, d, n),
        Work::XThread => xthread(a, name, n),
    }
}

fn measure(k: Kind, w: Work, d: &Data, n: u64) -> f64 {
    match k {
        Kind::Nolock => run_work(&Nolock, k.name(), d, w, n),
        Kind::Glibc => run_work(&Via(System), k.name(), d, w, n),
        Kind::Mimalloc => run_work(&Via(mimalloc::MiMalloc), k.name(), d, w, n),
        Kind::Jemalloc => run_work(&Via(tikv_jemallocator::Jemalloc), k.name(), d, w, n),
    }
}

/// The real program (`src/prog/workload.rs`) with one allocator as `#[global_allocator]`, run as a child
/// process: (wall ms, system CPU ms, peak RSS MiB) and its checksum.
fn run_prog(bin: &Path, rounds: u32) -> Result<([f64; 3], String), String> {
    let t = Instant::now();
    let mut child = Command::new(bin)
        .arg(rounds.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let mut out = String::new();
    if let Some(mut so) = child.stdout.take() {
        so.read_to_string(&mut out).map_err(|e| format!("{}: {e}", bin.display()))?;
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { core::mem::zeroed() };
    // SAFETY: waits for our own child (not yet reaped: std's `Child` is never waited for) and fills `status`
    // and `ru`, which are valid for writes.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    let wall = t.elapsed().as_secs_f64() * 1e3;
    if pid < 0 {
        return Err(format!("wait4 for {}: {}", bin.display(), std::io::Error::last_os_error()));
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!("{} failed (wait status {status:#x})", bin.display()));
    }
    let sys = ru.ru_stime.tv_sec as f64 * 1e3 + ru.ru_stime.tv_usec as f64 / 1e3;
    // The program prints its checksum and its own peak RSS (VmHWM, KiB): `ru_maxrss` would include ours.
    let mut words = out.split_whitespace();
    let sum = words.next().unwrap_or("").to_string();
    let rss = words
        .next()
        .and_then(|w| w.parse::<f64>().ok())
        .ok_or_else(|| format!("{}: no peak RSS in {out:?}", bin.display()))?;
    Ok(([wall, sys, rss / 1024.0], sum))
}

/// One table row: a workload (measured in process) or one of the real program's three figures.
#[derive(Clone)]
struct Row {
    id: String,
    label: String,
    unit: &'static str,
}

const PROG_ROWS: [(&str, &str, &str); 3] = [
    ("prog-wall", "real program, wall time (ms)", "ms"),
    ("prog-sys", "real program, system CPU time (ms)", "ms"),
    ("prog-rss", "real program, peak RSS (MiB)", "MiB"),
];

/// Whether `id` is selected by `--only` (comma-separated substrings; none: everything).
fn selected(only: Option<&str>, id: &str) -> bool {
    only.is_none_or(|o| o.split(',').any(|p| !p.is_empty() && id.contains(p)))
}

/// Run the benchmarks and print the table.
pub fn run(args: &BenchArgs) -> ExitCode {
    let reps = args.reps();
    let scale = if args.quick { 5 } else { 1 };
    let ops = |w: Work| w.full_ops() / scale;
    let only = args.only.as_deref();
    let works: Vec<Work> = WORKS.into_iter().filter(|w| selected(only, &w.id())).collect();
    let prog_rounds: u32 = if args.quick { 6 } else { 30 };
    let prog_bins: Option<Vec<PathBuf>> = if PROG_ROWS.iter().any(|r| selected(only, r.0)) {
        let dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        let bins: Option<Vec<PathBuf>> =
            dir.map(|d| KINDS.iter().map(|k| d.join(format!("prog-{}", k.name()))).collect());
        match bins {
            Some(b) if b.iter().all(|p| p.exists()) => Some(b),
            _ => {
                println!(
                    "(real program skipped: build the prog-* binaries next to this one with \
                     `cargo build --release -p nolock-cli --bins`)"
                );
                None
            }
        }
    } else {
        None
    };
    let mut rows: Vec<Row> = works.iter().map(|w| Row { id: w.id(), label: w.label(), unit: w.unit() }).collect();
    if prog_bins.is_some() {
        rows.extend(PROG_ROWS.iter().map(|r| Row { id: r.0.into(), label: r.1.into(), unit: r.2 }));
    }

    println!(
        "nolock bench ({}): {reps} timed repetitions per cell; allocators take turns inside each repetition; {}",
        if args.quick { "quick" } else { "full" },
        super::conditions()
    );
    let steps = works.len() + usize::from(prog_bins.is_some());
    let bar = progress_bar((reps * steps * KINDS.len()) as u64);
    let data = Data::new();

    // Warm-up: threads' caches, page faults, code paths.
    bar.set_message("warming up");
    for &w in &works {
        for k in KINDS {
            measure(k, w, &data, ops(w) / 10);
        }
    }

    // samples[row][kind]
    let mut samples = vec![vec![Vec::with_capacity(reps); KINDS.len()]; rows.len()];
    let mut checksum: Option<String> = None;
    let t_start = Instant::now();
    for rep in 0..reps {
        for (wi, &w) in works.iter().enumerate() {
            for i in 0..KINDS.len() {
                let ki = (i + rep) % KINDS.len();
                let k = KINDS[ki];
                bar.set_message(format!("{} {}", w.id(), k.name()));
                samples[wi][ki].push(measure(k, w, &data, ops(w)));
                bar.inc(1);
            }
        }
        if let Some(bins) = &prog_bins {
            for i in 0..KINDS.len() {
                let ki = (i + rep) % KINDS.len();
                bar.set_message(format!("real program {}", KINDS[ki].name()));
                let (figs, out) = match run_prog(&bins[ki], prog_rounds) {
                    Ok(r) => r,
                    Err(e) => {
                        bar.finish_and_clear();
                        eprintln!("nolock bench: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if checksum.get_or_insert_with(|| out.clone()) != &out {
                    bar.finish_and_clear();
                    eprintln!("nolock bench: prog-{} printed {out}, expected {checksum:?}", KINDS[ki].name());
                    return ExitCode::FAILURE;
                }
                for (j, f) in figs.into_iter().enumerate() {
                    samples[works.len() + j][ki].push(f);
                }
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let took = t_start.elapsed();

    let sums: Vec<Vec<Summary>> =
        samples.iter().map(|per_kind| per_kind.iter().map(|s| summarize(s)).collect()).collect();
    print_table(&rows, &sums);
    println!(
        "timed part took {:.1} s (load average at the end {}); cells are median [min–max] over the repetitions; \
         ratios are medians divided (below 1: nolock faster or smaller); compare numbers only within one run",
        took.as_secs_f64(),
        super::load_average()
    );
    if prog_bins.is_some() {
        println!(
            "real program: prog-<allocator> {prog_rounds} (src/prog/workload.rs) run as a child process; wall time \
             includes process start and exit; system time from wait4, peak RSS (VmHWM) reported by the program itself"
        );
    }

    if let Some(path) = &args.json {
        let json = to_json(args.quick, reps, &rows, &samples, &sums);
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("nolock bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("results written to {}", path.display());
    }
    ExitCode::SUCCESS
}

fn cell(s: &Summary, unit: &str) -> String {
    super::cell(
        s,
        if unit == "MiB" {
            1
        } else if unit == "ms" {
            0
        } else {
            1
        },
    )
}

/// The spread of a ratio: the smallest and largest of the per-repetition ratios (repetition `r` of nolock over
/// repetition `r` of the other allocator, measured side by side).
fn ratio_spread(nl: &[f64], other: &[f64]) -> (f64, f64) {
    let rs: Vec<f64> = nl.iter().zip(other).map(|(a, b)| a / b).collect();
    let s = summarize(&rs);
    (s.min, s.max)
}

fn print_table(rows: &[Row], sums: &[Vec<Summary>]) {
    let ki = kind_index;
    let mut header = vec!["workload".to_string()];
    header.extend(KINDS.iter().map(|k| k.name().to_string()));
    header.extend(["nolock/mimalloc", "nolock/glibc", "nolock/jemalloc"].map(String::from));
    let mut table = vec![header];
    for (ri, r) in rows.iter().enumerate() {
        let s = &sums[ri];
        let mut row = vec![r.label.clone()];
        row.extend(s.iter().map(|x| cell(x, r.unit)));
        let nl = s[ki(Kind::Nolock)].median;
        for other in [Kind::Mimalloc, Kind::Glibc, Kind::Jemalloc] {
            row.push(format!("{:.2}", nl / s[ki(other)].median));
        }
        table.push(row);
    }
    println!();
    print_rows(&table);
    println!();
}

fn kind_index(k: Kind) -> usize {
    KINDS.iter().position(|&x| x == k).unwrap_or(0)
}

fn to_json(quick: bool, reps: usize, rows: &[Row], samples: &[Vec<Vec<f64>>], sums: &[Vec<Summary>]) -> String {
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    let _ = writeln!(out, "{{\n  \"quick\": {quick},\n  \"reps\": {reps},\n  \"results\": [");
    let mut first = true;
    for (ri, r) in rows.iter().enumerate() {
        for (ki, k) in KINDS.into_iter().enumerate() {
            let s = &sums[ri][ki];
            if !first {
                out.push_str(",\n");
            }
            first = false;
            let _ = write!(
                out,
                "    {{\"workload\": \"{}\", \"allocator\": \"{}\", \"unit\": \"{}\", \"median\": {:.3}, \
                 \"min\": {:.3}, \"max\": {:.3}, \"samples\": [{}]}}",
                r.id,
                k.name(),
                r.unit,
                s.median,
                s.min,
                s.max,
                list(&samples[ri][ki])
            );
        }
    }
    out.push_str("\n  ],\n  \"ratios\": [\n");
    let nl = kind_index(Kind::Nolock);
    for (ri, r) in rows.iter().enumerate() {
        let s = &sums[ri];
        let _ = write!(out, "    {{\"workload\": \"{}\"", r.id);
        for other in [Kind::Mimalloc, Kind::Glibc, Kind::Jemalloc] {
            let o = kind_index(other);
            let (lo, hi) = ratio_spread(&samples[ri][nl], &samples[ri][o]);
            // A ratio can be infinite (a system time of 0 ms in one repetition): JSON gets `null`.
            let _ = write!(
                out,
                ", \"nolock/{0}\": {1}, \"nolock/{0} min\": {2}, \"nolock/{0} max\": {3}",
                other.name(),
                super::json_num(s[nl].median / s[o].median),
                super::json_num(lo),
                super::json_num(hi)
            );
        }
        let _ = write!(out, "}}{}", if ri + 1 < rows.len() { ",\n" } else { "\n" });
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allocator_runs_every_workload() {
        let _serial = crate::bench::TEST_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let d = Data::new();
        for w in WORKS {
            for k in KINDS {
                assert!(measure(k, w, &d, 2048) > 0.0, "{w:?} {k:?}");
            }
        }
    }

    #[test]
    fn workload_ids_are_unique_and_selectable() {
        let ids: Vec<String> = WORKS.iter().map(|w| w.id()).collect();
        for (i, id) in ids.iter().enumerate() {
            assert!(!ids[..i].contains(id), "{id} twice");
        }
        assert!(selected(Some("pair,live"), "pair16"));
        assert!(!selected(Some("pair,live"), "random100k-64"));
        assert!(selected(None, "xthread"));
    }
}
