//! `nolock bench` / `nolock bench alloc`: allocation workloads for nolock and three baselines, all measured in
//! the same run.
//!
//! Allocators: nolock (`kmalloc_nolock` / `kfree_nolock`), glibc (`std::alloc::System`), mimalloc
//! (`mimalloc::MiMalloc`) and jemalloc (`tikv_jemallocator::Jemalloc`). The baselines are called through the
//! `GlobalAlloc` trait; none of them is installed as the global allocator, so the harness's own allocations
//! (channels, threads, the result table) go to glibc for every allocator alike.
//!
//! Workloads (64-byte objects unless said otherwise):
//! - `pair64`, `pair256`: allocate and free at once, repeated — ns per alloc+free pair;
//! - `batch1000`: 1000 allocations, then 1000 frees — ns per alloc+free;
//! - `xthread`: a producer thread allocates in batches of 256 and sends each batch over a
//!   `std::sync::mpsc::sync_channel` to a consumer thread that frees them — wall time per object.
//!
//! These machines are noisy (results can move 2× between runs), so each cell is the median of at least five
//! timed repetitions with min and max, the allocators take turns inside every repetition (in a rotating order),
//! and only ratios between allocators of the *same run* are meaningful.

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::Barrier;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Work {
    Pair64,
    Pair256,
    Batch1000,
    XThread,
}

const WORKS: [Work; 4] = [Work::Pair64, Work::Pair256, Work::Batch1000, Work::XThread];

impl Work {
    fn id(self) -> &'static str {
        match self {
            Work::Pair64 => "pair64",
            Work::Pair256 => "pair256",
            Work::Batch1000 => "batch1000",
            Work::XThread => "xthread",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Work::Pair64 => "pair 64 B (ns/pair)",
            Work::Pair256 => "pair 256 B (ns/pair)",
            Work::Batch1000 => "batch 1000 × 64 B (ns/pair)",
            Work::XThread => "cross-thread 64 B (ns/object)",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Work::XThread => "ns/object",
            _ => "ns/pair",
        }
    }

    /// Operations per timed repetition in a full run.
    fn full_ops(self) -> u64 {
        match self {
            Work::Pair64 | Work::Pair256 | Work::Batch1000 => 8_000_000,
            Work::XThread => 2_000_000,
        }
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

/// Rounds of 1000 allocations of 64 B then 1000 frees, `n` pairs in all; ns per pair.
fn batch<A: RawAlloc>(a: &A, name: &str, n: u64) -> f64 {
    const B: usize = 1000;
    let rounds = (n / B as u64).max(1);
    let mut ptrs = vec![core::ptr::null_mut::<u8>(); B];
    let t = Instant::now();
    for _ in 0..rounds {
        for slot in ptrs.iter_mut() {
            // SAFETY: size > 0.
            let p = unsafe { a.alloc(black_box(64)) };
            if p.is_null() {
                out_of_memory(name);
            }
            *slot = p;
        }
        black_box(&mut ptrs);
        for &p in ptrs.iter() {
            // SAFETY: p came from a.alloc(64) and is not used again.
            unsafe { a.free(p, 64) };
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * B as u64) as f64
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

fn run_work<A: RawAlloc>(a: &A, name: &str, w: Work, n: u64) -> f64 {
    match w {
        Work::Pair64 => pair(a, name, 64, n),
        Work::Pair256 => pair(a, name, 256, n),
        Work::Batch1000 => batch(a, name, n),
        Work::XThread => xthread(a, name, n),
    }
}

fn measure(k: Kind, w: Work, n: u64) -> f64 {
    match k {
        Kind::Nolock => run_work(&Nolock, k.name(), w, n),
        Kind::Glibc => run_work(&Via(System), k.name(), w, n),
        Kind::Mimalloc => run_work(&Via(mimalloc::MiMalloc), k.name(), w, n),
        Kind::Jemalloc => run_work(&Via(tikv_jemallocator::Jemalloc), k.name(), w, n),
    }
}

/// Run the benchmarks and print the table.
pub fn run(args: &BenchArgs) -> ExitCode {
    let reps = args.reps();
    let scale = if args.quick { 5 } else { 1 };
    let ops = |w: Work| w.full_ops() / scale;

    println!(
        "nolock bench ({}): {reps} timed repetitions per cell; allocators take turns inside each repetition; {}",
        if args.quick { "quick" } else { "full" },
        super::conditions()
    );
    let bar = progress_bar((reps * WORKS.len() * KINDS.len()) as u64);

    // Warm-up: threads' caches, page faults, code paths.
    bar.set_message("warming up");
    for w in WORKS {
        for k in KINDS {
            measure(k, w, ops(w) / 10);
        }
    }

    // samples[w][k]
    let mut samples = vec![vec![Vec::with_capacity(reps); KINDS.len()]; WORKS.len()];
    let t_start = Instant::now();
    for rep in 0..reps {
        for (wi, w) in WORKS.into_iter().enumerate() {
            for i in 0..KINDS.len() {
                let ki = (i + rep) % KINDS.len();
                let k = KINDS[ki];
                bar.set_message(format!("{} {}", w.id(), k.name()));
                samples[wi][ki].push(measure(k, w, ops(w)));
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let took = t_start.elapsed();

    let sums: Vec<Vec<Summary>> =
        samples.iter().map(|per_kind| per_kind.iter().map(|s| summarize(s)).collect()).collect();
    print_table(&sums);
    println!(
        "timed part took {:.1} s (load average at the end {}); cells are median [min–max] over the repetitions; \
         ratios are medians divided (below 1: nolock faster); compare numbers only within one run",
        took.as_secs_f64(),
        super::load_average()
    );

    if let Some(path) = &args.json {
        let json = to_json(args.quick, reps, &samples, &sums);
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("nolock bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("results written to {}", path.display());
    }
    ExitCode::SUCCESS
}

fn cell(s: &Summary) -> String {
    super::cell(s, 1)
}

fn print_table(sums: &[Vec<Summary>]) {
    let ki = kind_index;
    let mut header = vec!["workload".to_string()];
    header.extend(KINDS.iter().map(|k| k.name().to_string()));
    header.extend(["nolock/mimalloc", "nolock/glibc", "nolock/jemalloc"].map(String::from));
    let mut rows = vec![header];
    for (wi, w) in WORKS.into_iter().enumerate() {
        let s = &sums[wi];
        let mut row = vec![w.label().to_string()];
        row.extend(s.iter().map(cell));
        let nl = s[ki(Kind::Nolock)].median;
        for other in [Kind::Mimalloc, Kind::Glibc, Kind::Jemalloc] {
            row.push(format!("{:.2}", nl / s[ki(other)].median));
        }
        rows.push(row);
    }
    println!();
    print_rows(&rows);
    println!();
}

fn kind_index(k: Kind) -> usize {
    KINDS.iter().position(|&x| x == k).unwrap_or(0)
}

fn to_json(quick: bool, reps: usize, samples: &[Vec<Vec<f64>>], sums: &[Vec<Summary>]) -> String {
    let list = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(", ");
    let mut out = String::new();
    let _ = writeln!(out, "{{\n  \"quick\": {quick},\n  \"reps\": {reps},\n  \"results\": [");
    let mut first = true;
    for (wi, w) in WORKS.into_iter().enumerate() {
        for (ki, k) in KINDS.into_iter().enumerate() {
            let s = &sums[wi][ki];
            if !first {
                out.push_str(",\n");
            }
            first = false;
            let _ = write!(
                out,
                "    {{\"workload\": \"{}\", \"allocator\": \"{}\", \"unit\": \"{}\", \"median\": {:.3}, \
                 \"min\": {:.3}, \"max\": {:.3}, \"samples\": [{}]}}",
                w.id(),
                k.name(),
                w.unit(),
                s.median,
                s.min,
                s.max,
                list(&samples[wi][ki])
            );
        }
    }
    out.push_str("\n  ],\n  \"ratios\": [\n");
    for (wi, w) in WORKS.into_iter().enumerate() {
        let s = &sums[wi];
        let _ = write!(
            out,
            "    {{\"workload\": \"{}\", \"nolock/mimalloc\": {:.3}, \"nolock/glibc\": {:.3}, \
             \"nolock/jemalloc\": {:.3}}}{}",
            w.id(),
            s[kind_index(Kind::Nolock)].median / s[kind_index(Kind::Mimalloc)].median,
            s[kind_index(Kind::Nolock)].median / s[kind_index(Kind::Glibc)].median,
            s[kind_index(Kind::Nolock)].median / s[kind_index(Kind::Jemalloc)].median,
            if wi + 1 < WORKS.len() { ",\n" } else { "\n" }
        );
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allocator_runs_every_workload() {
        for w in WORKS {
            for k in KINDS {
                assert!(measure(k, w, 2048) > 0.0, "{w:?} {k:?}");
            }
        }
    }
}
