//! The `nolock` command: a signal-storm demo of the allocator and allocator benchmarks against glibc, mimalloc
//! and jemalloc.
//!
//! - `nolock demo`: worker threads and a POSIX-timer signal storm allocate, verify and free from loops and from
//!   signal handlers; prints one summary table and exits non-zero on a spurious failure or a corrupted object.
//! - `nolock bench`: alloc/free workloads, nolock against the three baselines measured in the same run.
//!
//! This file only parses arguments; the work is in [`demo`](mod@demo) and [`bench`](mod@bench).

mod bench;
mod demo;
mod fmt;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    },
    /// Allocator benchmarks: nolock against glibc, mimalloc and jemalloc, measured in the same run.
    Bench {
        /// Short run (a few seconds): fewer iterations per repetition.
        #[arg(long)]
        quick: bool,
        /// Timed repetitions per workload and allocator, at least 5 (default 9, or 5 with --quick); the table shows
        /// their median, min and max.
        #[arg(long, value_parser = clap::value_parser!(u32).range(5..=1000))]
        reps: Option<u32>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    nolock::init();
    match cli.command {
        Command::Demo { threads, seconds, rate, quiet } => {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
                eprintln!("nolock demo: --seconds must be in (0, 3600]");
                return ExitCode::from(2);
            }
            demo::run(&demo::DemoArgs { threads: threads as usize, seconds, rate, progress: !quiet })
        }
        Command::Bench { quick, reps, json } => {
            bench::run(&bench::BenchArgs { quick, reps: reps.map(|r| r as usize), json })
        }
    }
}
