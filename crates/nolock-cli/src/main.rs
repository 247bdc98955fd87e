//! The `nolock` command: signal-storm scenarios for the allocator and the reclamation layer, and benchmarks.
//!
//! - `nolock demo`: worker threads and a POSIX-timer signal storm allocate, verify and free from loops and from
//!   signal handlers; prints one summary table and exits non-zero on a spurious failure or a corrupted object.
//! - `nolock rcu`: reader threads and signal handlers read an RCU / SRCU-fast protected table while updaters
//!   replace and retire its objects; exits non-zero if a reader ever sees a freed object.
//! - `nolock bench` (= `nolock bench alloc`): alloc/free workloads against glibc, mimalloc and jemalloc.
//! - `nolock bench rcu`: readers, grace periods, callbacks and retire-and-free against crossbeam-epoch, seize,
//!   `membarrier` and (feature `liburcu`) liburcu.
//! - `nolock bench typesafe`: the add-then-delete pattern through a type-safe cache, `kfree_rcu_nolock` and
//!   `kfree_nolock`: throughput and memory held.
//! - `nolock bench maps`: the kernel's BPF hash-map benchmarks (htab-mem and others) on `nolock-bpf` maps, with
//!   prealloc and bpf_mem_alloc baselines in the same run ([`maps`](mod@maps)).
//!
//! This file only parses arguments; the work is in [`demo`](mod@demo) and [`rcu`](mod@rcu) (both run by the
//! shared runner of [`scenario`](mod@scenario)) and [`bench`](mod@bench).

mod bench;
mod compare;
mod demo;
mod fmt;
mod health;
mod kernel_bpf;
mod maps;
mod rcu;
mod scenario;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::scenario::RunArgs;

#[derive(Parser, Debug)]
#[command(name = "nolock", version, about = "Allocate and free memory from any context: demo and benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Signal storm: threads and signal handlers allocate, verify and free at once; prints a summary table.
    Demo {
        /// Worker threads.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        threads: u32,
        /// How long the storm runs, in seconds.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Signals per second to deliver, over all threads together; the timers are re-tuned every 100 ms to
        /// reach it (0: no signals).
        #[arg(long, default_value_t = 25_000)]
        rate: u64,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        /// Testing the checker: hand kfree_nolock one pointer that is not nolock's (refused and reported; the
        /// run must fail).
        #[arg(long, hide = true)]
        inject_bad_free: bool,
    },
    /// RCU scenario: readers (threads and signal handlers) verify an RCU / SRCU-fast protected table while
    /// updaters replace its objects and retire them with kfree_rcu_nolock / kfree_srcu_fast_nolock.
    Rcu {
        /// Worker threads, split into updaters (a third), SRCU-fast readers that sleep inside sections, and RCU
        /// readers.
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(3..=64))]
        threads: u32,
        /// How long the scenario runs, in seconds.
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        /// Timer signals per second over all threads together; re-tuned every 100 ms to reach it (0: none).
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        /// Testing the checker: free replaced raw objects at once, without a grace period (the run must fail).
        #[arg(long, hide = true)]
        inject_bug: bool,
    },
    /// Benchmarks, nolock against baselines measured in the same run: `alloc` (the default), `rcu` or
    /// `typesafe`.
    Bench {
        #[command(subcommand)]
        what: Option<BenchWhat>,
        /// Short run (a few seconds): fewer iterations per repetition.
        #[arg(long, global = true)]
        quick: bool,
        /// Timed repetitions per workload and contender, at least 5 (default 9, or 5 with --quick); the tables
        /// show their median, min and max.
        #[arg(long, global = true, value_parser = clap::value_parser!(u32).range(5..=1000))]
        reps: Option<u32>,
        /// Also write the results as JSON to this file.
        #[arg(long, global = true)]
        json: Option<PathBuf>,
        /// `bench alloc` only: run just the workloads whose id contains one of these comma-separated strings
        /// (ids: pair16 … pair16k, batch1000, lifo100k-64, fifo100k-64, random100k-64, lifo100k-16to512,
        /// random100k-16to512, live10k, xthread, prog-wall / prog-sys / prog-rss).
        #[arg(long, global = true)]
        only: Option<String>,
    },
    /// Every benchmark family in one run, one report (HTML with SVG charts, Markdown, JSON): allocator,
    /// reclamation, type-safe caches, BPF maps and task local storage; with --kernel also the running kernel's
    /// BPF hash maps.
    Compare {
        /// Smoke run (under a minute; what CI runs).
        #[arg(long)]
        quick: bool,
        /// Also measure the running kernel's BPF hash maps (needs root or CAP_BPF; skipped with a reason otherwise).
        #[arg(long)]
        kernel: bool,
        /// Directory for report.html, report.md, report.json and schema.json.
        #[arg(long, default_value = "compare-report")]
        out: PathBuf,
        /// Only these sections (comma-separated: alloc, rcu, typesafe, maps, storage).
        #[arg(long, value_delimiter = ',')]
        only: Option<Vec<String>>,
    },
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum BenchWhat {
    /// Allocator workloads: nolock against glibc, mimalloc and jemalloc.
    Alloc,
    /// Reclamation workloads: RCU, SRCU-fast and Tasks Trace against crossbeam-epoch, seize and membarrier.
    Rcu,
    /// Add-then-delete (allocate, fill, look up once, free) through a type-safe cache, kfree_rcu_nolock and
    /// kfree_nolock: throughput and memory held.
    Typesafe,
    /// BPF hash maps (nolock-bpf): htab-mem, full-update, occupancy, insert-until-full, burst and signal
    /// storms, nolock backends against prealloc and bpf_mem_alloc.
    Maps,
    /// The rseq experiment: a free list's pop+push with per-CPU lists guarded by restartable sequences, with
    /// nolock's per-thread busy flag, and unguarded (x86-64).
    Rseq,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every command needs the arena; without it every nolock allocation fails and no run means anything.
    if let Err(e) = health::arena_bytes() {
        let what = match cli.command {
            Command::Demo { .. } => "demo",
            Command::Rcu { .. } => "rcu",
            Command::Bench { .. } => "bench",
            Command::Compare { .. } => "compare",
        };
        println!("FAIL: nolock {what}: {e}");
        return ExitCode::FAILURE;
    }
    match cli.command {
        Command::Demo { threads, seconds, rate, quiet, inject_bad_free } => {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
                eprintln!("nolock demo: --seconds must be in (0, 3600]");
                return ExitCode::from(2);
            }
            demo::run(&RunArgs { threads: threads as usize, seconds, rate, progress: !quiet }, inject_bad_free)
        }
        Command::Rcu { threads, seconds, rate, quiet, inject_bug } => {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
                eprintln!("nolock rcu: --seconds must be in (0, 3600]");
                return ExitCode::from(2);
            }
            rcu::run(&RunArgs { threads: threads as usize, seconds, rate, progress: !quiet }, inject_bug)
        }
        Command::Bench { what, quick, reps, json, only } => {
            let args = bench::BenchArgs { quick, reps: reps.map(|r| r as usize), json, only };
            match what.unwrap_or(BenchWhat::Alloc) {
                BenchWhat::Alloc => bench::alloc::run(&args),
                BenchWhat::Rcu => bench::rcu::run(&args),
                BenchWhat::Typesafe => bench::typesafe::run(&args),
                BenchWhat::Maps => maps::run(&args),
                #[cfg(target_arch = "x86_64")]
                BenchWhat::Rseq => bench::rseq::run(&args),
                #[cfg(not(target_arch = "x86_64"))]
                BenchWhat::Rseq => {
                    eprintln!("nolock bench rseq: x86-64 only");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Compare { quick, kernel, out, only } => {
            compare::run(&compare::CompareArgs { quick, kernel, out, only })
        }
    }
}
