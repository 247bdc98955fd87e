//! `nolock bench`: workloads for nolock and baselines measured in the same run.
//!
//! - [`alloc`]: `kmalloc_nolock` / `kfree_nolock` against glibc, mimalloc and jemalloc (`nolock bench` or
//!   `nolock bench alloc`);
//! - [`rcu`]: RCU, SRCU-fast and Tasks Trace readers, grace periods, `call_rcu_nolock` and `kfree_rcu_nolock`
//!   against crossbeam-epoch, seize, `membarrier` and (with the `liburcu` feature) liburcu (`nolock bench rcu`);
//! - [`typesafe`]: the add-then-delete pattern through a type-safe cache, `kfree_rcu_nolock` and plain
//!   `kfree_nolock`: throughput and memory held (`nolock bench typesafe`);
//! - [`rseq`]: the rseq experiment: per-CPU lists guarded by restartable sequences against nolock's per-thread
//!   lists guarded by a busy flag (`nolock bench rseq`).
//!
//! These machines are noisy (results can move 2× between runs), so each cell is the median of at least five
//! timed repetitions with min and max, the contenders take turns inside every repetition, and only ratios
//! between contenders of the *same run* are meaningful.

#[cfg(feature = "c-baselines")]
pub mod alloc;
/// `nolock bench alloc` without its baselines.
#[cfg(not(feature = "c-baselines"))]
pub mod alloc {
    use std::process::ExitCode;

    /// Say why there is nothing to measure.
    pub fn run(args: &super::BenchArgs) -> ExitCode {
        let only = args.only.as_deref().map_or(String::new(), |o| format!(" (--only {o})"));
        eprintln!(
            "nolock bench alloc{only}: built without the `c-baselines` feature (mimalloc, jemalloc); rebuild with \
             default features to compare against them"
        );
        ExitCode::FAILURE
    }
}
pub mod rcu;
#[cfg(target_arch = "x86_64")]
pub mod rseq;
pub mod typesafe;
#[cfg(feature = "liburcu")]
mod urcu;

use std::fmt::Write as _;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

/// What the user asked for (shared by every bench).
pub struct BenchArgs {
    /// Short run.
    pub quick: bool,
    /// Repetitions per cell (default 9, 5 with `--quick`).
    pub reps: Option<usize>,
    /// Write JSON results here.
    pub json: Option<PathBuf>,
    /// Only the workloads whose id contains one of these comma-separated strings (`nolock bench alloc`).
    pub only: Option<String>,
}

impl BenchArgs {
    /// Timed repetitions per cell.
    pub fn reps(&self) -> usize {
        self.reps.unwrap_or(if self.quick { 5 } else { 9 })
    }
}

/// The conditions of a run, printed with its results: CPU model, CPUs online, and the load average (other
/// work on the machine moves every number; a busy second CPU slows the grace-period worker most).
pub fn conditions() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cpus} CPU(s), load average {}", load_average())
}

/// The 1-minute load average (`/proc/loadavg`), or `?`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Median, min and max of the samples.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    /// Median (mean of the two middle samples for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
}

/// Median, min and max of `samples` (not empty).
pub fn summarize(samples: &[f64]) -> Summary {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    let median = if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 };
    Summary { median, min: v[0], max: v[v.len() - 1] }
}

/// The `q`-quantile (0..=1) of `samples` (not empty), nearest rank.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

/// A bar for `len` steps, with the elapsed time and a message.
pub fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed:>3} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Print rows as a table: the first row is the header, column 0 left-aligned, the others right-aligned.
pub fn print_rows(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |t| t.chars().count())).max().unwrap_or(0)).collect();
    for (i, r) in rows.iter().enumerate() {
        let mut line = String::new();
        for (c, text) in r.iter().enumerate() {
            let pad = widths[c] - text.chars().count();
            if c == 0 {
                let _ = write!(line, "{text}{}", " ".repeat(pad));
            } else {
                let _ = write!(line, "  {}{text}", " ".repeat(pad));
            }
        }
        println!("{}", line.trim_end());
        if i == 0 {
            println!("{}", "-".repeat(line.chars().count()));
        }
    }
}

/// `median [min–max]` with `digits` decimals.
pub fn cell(s: &Summary, digits: usize) -> String {
    format!("{:.d$} [{:.d$}–{:.d$}]", s.median, s.min, s.max, d = digits)
}

/// A JSON string literal (the names here are plain ASCII; quotes and backslashes are escaped anyway).
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON number (non-finite values become `null`).
pub fn json_num(x: f64) -> String {
    if x.is_finite() { format!("{x:.4}") } else { "null".into() }
}

/// Tests that measure process-wide allocator statistics (`bench typesafe` counts the objects of `kmalloc-96`)
/// and tests that allocate from the same classes (`bench alloc`'s mixed sizes) take this, so they do not run
/// at the same time.
#[cfg(test)]
pub static TEST_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_samples() {
        let s = summarize(&[5.0, 1.0, 3.0, 4.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.median, 2.5);
    }

    #[test]
    fn quantiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.reverse();
        assert_eq!(quantile(&mut v, 0.5), 50.0);
        assert_eq!(quantile(&mut v, 0.99), 99.0);
        assert_eq!(quantile(&mut v, 1.0), 100.0);
        assert_eq!(quantile(&mut [7.0], 0.99), 7.0);
    }

    #[test]
    fn json_helpers() {
        assert_eq!(json_str("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json_num(f64::NAN), "null");
        assert_eq!(json_num(1.5), "1.5000");
    }
}
