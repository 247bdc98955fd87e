//! One runner for the signal-storm scenarios (`nolock demo`, `nolock rcu`).
//!
//! Every scenario has the same skeleton, which lives here: refuse to start without an arena; count nolock's
//! reports from the start; spawn the worker threads, each with its two per-thread POSIX timers on two
//! real-time signals (the storm of [`testkit::storm`]); run for the requested time while the main thread
//! re-tunes the timers every 100 ms until the *delivered* rate meets `--rate`, samples the resident memory and
//! draws the progress bar; stop the threads (each deletes its timers before it exits) and put the old signal
//! actions back; let the scenario clean up; `nolock::trim()`; print one table; decide PASS or FAIL.
//!
//! A [`Scenario`] supplies the rest: its per-thread state (`Worker`), the threads' loop, the handler's work,
//! its counters and checks, and its sections of the table. The runner adds the sections and checks every
//! scenario shares: the signal storm and resident memory, a worker that failed (it could not start its timers,
//! or panicked), a storm that delivered nothing although one was asked for, and any report nolock printed
//! during the run. A run that could not exercise what it checks must not pass: each scenario adds its own
//! checks of that kind (see `health`).

use core::ffi::{c_int, c_void};
use std::ops::Deref;
use std::process::ExitCode;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use testkit::ReportCounter;
use testkit::storm::{self, Storm, StormSlot, StormTimers};

use crate::fmt::{bytes, count, rate};

/// What the user asked for, common to every scenario.
#[derive(Clone, Copy, Debug)]
pub struct RunArgs {
    /// Worker threads.
    pub threads: usize,
    /// Duration of the run.
    pub seconds: f64,
    /// Timer signals per second over all threads (0: no storm).
    pub rate: u64,
    /// Show a progress bar.
    pub progress: bool,
}

/// Set when the run is over: the threads leave their loops ([`Thread::running`]) and the handlers return at
/// once. One scenario runs at a time in the process.
static STOP: AtomicBool = AtomicBool::new(false);

/// A worker thread's state as the runner keeps it: the storm's per-thread counters and timers, and the
/// scenario's own state (reached through `Deref`). The thread's timers carry its address, so that the
/// handler finds it.
pub struct Slot<W> {
    storm: StormSlot,
    worker: W,
}

impl<W> Deref for Slot<W> {
    type Target = W;

    fn deref(&self) -> &W {
        &self.worker
    }
}

impl<W> AsRef<StormSlot> for Slot<W> {
    fn as_ref(&self) -> &StormSlot {
        &self.storm
    }
}

/// What a worker thread sees of the run.
pub struct Thread<'a> {
    timers: Option<StormTimers<'a>>,
}

impl Thread<'_> {
    /// Whether the run goes on. A thread checks it every few dozen operations and returns when it is false.
    ///
    /// # Context
    /// Any context: one relaxed load.
    #[inline]
    pub fn running(&self) -> bool {
        !STOP.load(Ordering::Relaxed)
    }

    /// Stop this thread's storm now (block both signals, delete its timers): from here on no handler runs on
    /// the thread, so it may take back what it shared with its handlers. The runner does it anyway when the
    /// thread's loop returns.
    ///
    /// # Context
    /// Normal context, on the thread itself: may wait a moment while the main thread re-tunes the timers.
    pub fn end_storm(&mut self) {
        self.timers = None;
    }
}

/// The scenario-specific parts of a run. The thread loop and the handler are associated functions: they run
/// on the worker threads, which share nothing with the scenario value but their `Worker`s (and statics).
pub trait Scenario {
    /// Per-thread state, shared by the thread, its signal handlers and the main thread (atomics only for
    /// what handlers write).
    type Worker: Sync;
    /// The counters summed over all threads and handlers.
    type Totals: Default;
    /// The command (`nolock NAME`).
    const NAME: &'static str;
    /// Worker threads are named `THREAD_NAME-i`.
    const THREAD_NAME: &'static str;
    /// What a handler runs, for the failure when no signal arrived (`no {IN_HANDLER} ran inside a handler`).
    const IN_HANDLER: &'static str;

    /// The `n` threads' states.
    fn workers(&self, n: usize) -> Vec<Self::Worker>;
    /// The threads, for the first line (`4 thread(s)`, `6 threads (2 updaters, ...)`).
    fn describe(&self, n: usize) -> String;
    /// Before the threads start (main thread; no handler installed yet). `arena`: the arena's size in bytes.
    fn prepare(&mut self, arena: u64, workers: &[Slot<Self::Worker>]);
    /// A worker thread's loop: work until `t.running()` is false, then return.
    fn thread(w: &Self::Worker, all: &[Slot<Self::Worker>], t: &mut Thread<'_>);
    /// A signal handler's work on the thread of `w`, which it may have interrupted anywhere (in nolock calls
    /// included), possibly inside the other signal's handler. Not called once the run is over.
    ///
    /// # Context
    /// Signal handler: atomics and nolock's any-context calls only; no lock, no `std` allocation, no printing,
    /// no panicking path.
    fn on_signal(w: &Self::Worker);
    /// Sum the counters (main thread, any time).
    fn totals(workers: &[Slot<Self::Worker>]) -> Self::Totals;
    /// Every 100 ms during the run: sample what the scenario samples, and say what the progress bar shows.
    fn tick(&mut self, cur: &Self::Totals, last: &Self::Totals, dt_s: f64) -> String;
    /// After every thread has stopped its storm and exited: give back what is left (the runner then calls
    /// `nolock::trim()`).
    fn finish(&mut self, workers: &[Slot<Self::Worker>]);
    /// Fill in the scenario's sections of the table, its failures, notes, and its PASS line.
    fn report(&mut self, t: &Self::Totals, run: &Run, out: &mut Report);
}

/// What the runner measured, for [`Scenario::report`].
pub struct Run {
    /// Seconds from the start barrier to the last join.
    pub secs: f64,
    /// Signal handler runs over all threads.
    pub signals: u64,
}

/// A scenario's verdict and table.
#[derive(Default)]
pub struct Report {
    /// The summary table.
    pub table: Table,
    /// One line per failure (the run passes without any).
    pub failed: Vec<String>,
    /// Remarks printed after the table either way.
    pub notes: Vec<String>,
    /// The PASS line's text.
    pub pass: String,
}

/// A summary table: section heads, and rows of key, value and meaning.
#[derive(Default)]
pub struct Table {
    rows: Vec<(String, String, String)>,
}

impl Table {
    /// A section head.
    pub fn head(&mut self, k: &str) {
        self.rows.push((k.into(), String::new(), String::new()));
    }

    /// A row of the current section (indented).
    pub fn row(&mut self, k: &str, v: impl Into<String>, m: impl Into<String>) {
        self.rows.push((format!("  {k}"), v.into(), m.into()));
    }

    fn print(&self) {
        let w0 = self.rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        let w1 = self.rows.iter().map(|r| r.1.chars().count()).max().unwrap_or(0);
        for (k, v, m) in &self.rows {
            if v.is_empty() && m.is_empty() {
                println!("{k}");
            } else {
                println!("{k:<w0$}  {v:>w1$}  {m}");
            }
        }
    }
}

/// Peak resident set size of the process (`VmHWM`), if readable.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn resident() -> u64 {
    nolock::stats::resident_bytes().unwrap_or(0) as u64
}

/// The storm's handler for scenario `S`: finds the thread's [`Slot`] in the timer's `sigev_value`, counts the
/// signal and runs `S::on_signal`.
extern "C" fn on_signal<S: Scenario>(_sig: c_int, info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    // SAFETY: the storm's timers carry their thread's Slot, which outlives them: `run` keeps the slots until
    // every thread has joined, and each thread drops its timers (blocking both signals) before it ends.
    unsafe {
        storm::dispatch_timer_signal::<Slot<S::Worker>>(info, |slot, overrun| {
            // Once the run is over, return at once: a thread whose handlers take longer than the timer period
            // (a slow debug or sanitizer build) must still get back to its loop to see STOP and stop its storm.
            if STOP.load(Ordering::Relaxed) {
                return;
            }
            slot.storm.count(overrun);
            S::on_signal(&slot.worker);
        })
    };
}

/// A worker thread: start the storm, meet the others at `start`, run the scenario's loop, stop the storm.
fn thread_main<S: Scenario>(
    slot: &Slot<S::Worker>,
    all: &[Slot<S::Worker>],
    interval_ns: Option<u64>,
    start: &Barrier,
) -> std::io::Result<()> {
    let timers = match interval_ns {
        Some(ns) => slot.storm.start(slot as *const Slot<S::Worker> as *mut c_void, ns).map(Some),
        None => Ok(None),
    };
    // Meet the others even when the timers failed, so that the run starts (and fails with the error).
    start.wait();
    let mut t = Thread { timers: timers? };
    S::thread(&slot.worker, all, &mut t);
    t.end_storm();
    Ok(())
}

/// Run scenario `s` and print its table; failure exit code on any failure it or the runner found.
pub fn run<S: Scenario>(mut s: S, args: &RunArgs) -> ExitCode {
    let arena = match crate::health::arena_bytes() {
        Ok(a) => a,
        Err(e) => {
            println!("FAIL: nolock {}: {e}", S::NAME);
            return ExitCode::FAILURE;
        }
    };
    let reports = ReportCounter::start();
    let n = args.threads;
    let slots: Vec<Slot<S::Worker>> =
        s.workers(n).into_iter().map(|worker| Slot { storm: StormSlot::new(), worker }).collect();
    STOP.store(false, Ordering::Relaxed);
    s.prepare(arena, &slots);
    let rss_before = resident();

    let interval_ns = storm::nominal_interval_ns(args.rate, n);
    let old_actions = match storm::install_handler(on_signal::<S>) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nolock {}: cannot install the signal handler: {e}", S::NAME);
            return ExitCode::FAILURE;
        }
    };
    println!(
        "nolock {}: {} for {:.1} s; signal storm: {}",
        S::NAME,
        s.describe(n),
        args.seconds,
        if args.rate > 0 {
            format!(
                "{} over {} per-thread timers on 2 real-time signals, re-tuned every 100 ms",
                rate(args.rate as f64),
                2 * n
            )
        } else {
            "none".into()
        },
    );
    let bar = if args.progress {
        let b = ProgressBar::new((args.seconds * 10.0).ceil() as u64);
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
    let mut controller = interval_ns.map(|ns| Storm::new(args.rate, n, ns));
    let signals = |slots: &[Slot<S::Worker>]| slots.iter().map(|w| w.storm.signals()).sum::<u64>();
    let elapsed = std::thread::scope(|sc| {
        let handles: Vec<_> = slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let (all, start) = (&slots[..], &start);
                std::thread::Builder::new()
                    .name(format!("{}-{i}", S::THREAD_NAME))
                    .spawn_scoped(sc, move || thread_main::<S>(slot, all, interval_ns, start))
                    .expect("spawn a worker thread")
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs_f64(args.seconds);
        let (mut last, mut last_signals, mut last_t) = (S::Totals::default(), 0, t0);
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(100)));
            let (cur, cur_signals, now) = (S::totals(&slots), signals(&slots), Instant::now());
            let dt = (now - last_t).as_secs_f64().max(1e-9);
            if let Some(ctl) = controller.as_mut() {
                ctl.adjust(&slots, dt);
            }
            let msg = s.tick(&cur, &last, dt);
            bar.set_message(format!("{msg} | signals {}", rate(cur_signals.saturating_sub(last_signals) as f64 / dt)));
            bar.set_position(((now - t0).as_secs_f64() * 10.0) as u64);
            rss_peak_sampled = rss_peak_sampled.max(resident());
            (last, last_signals, last_t) = (cur, cur_signals, now);
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
    drop(old_actions);

    // Every thread has stopped its storm and exited.
    let total_signals = signals(&slots);
    let overruns: u64 = slots.iter().map(|w| w.storm.overruns()).sum();
    let final_interval_ns = Storm::mean_interval_ns(&slots);
    s.finish(&slots);
    let totals = S::totals(&slots);
    drop(slots);
    let rss_peak = peak_rss().unwrap_or(0).max(rss_peak_sampled);
    let trim = nolock::trim();
    let rss_after = resident();

    let secs = elapsed.as_secs_f64();
    let run = Run { secs, signals: total_signals };
    let mut out = Report::default();
    s.report(&totals, &run, &mut out);

    let table = &mut out.table;
    table.head("signal storm");
    table.row(
        "signals delivered",
        format!("{} ({})", count(total_signals), rate(total_signals as f64 / secs)),
        "handler runs (target: --rate)",
    );
    table.row(
        "timer overruns",
        count(overruns),
        "expirations merged into a still-pending signal (thread not running, or in a handler)",
    );
    if interval_ns.is_some() {
        table.row(
            "timer period at the end",
            format!("{:.0} µs", final_interval_ns as f64 / 1000.0),
            "per timer, tuned so that the delivered rate meets the target",
        );
    }
    table.head("resident memory");
    table.row("before", bytes(rss_before), "whole process, at start");
    table.row("at peak", bytes(rss_peak), "high-water mark during the run");
    table.row("after", bytes(rss_after), "at the end, everything freed or retired, after nolock::trim()");
    table.row(
        "  returned by trim()",
        count(trim.pages_purged as u64),
        format!("pages purged, {} slabs released", count(trim.slabs_released as u64)),
    );
    println!();
    out.table.print();
    println!();

    for e in &worker_errors {
        out.failed.push(format!("worker: {e}"));
    }
    if args.rate > 0 && total_signals == 0 {
        out.failed.push(format!("the signal storm delivered no signal: no {} ran inside a handler", S::IN_HANDLER));
    }
    if let Some(r) = crate::health::report_failure(&reports) {
        out.failed.push(r);
    }
    for note in &out.notes {
        println!("note: {note}");
    }
    if out.failed.is_empty() {
        println!("PASS: {}", out.pass);
        ExitCode::SUCCESS
    } else {
        for f in &out.failed {
            println!("FAIL: {f}");
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_are_indented_under_heads() {
        let mut t = Table::default();
        t.head("a");
        t.row("b", "1", "m");
        assert_eq!(t.rows[0], ("a".into(), String::new(), String::new()));
        assert_eq!(t.rows[1], ("  b".into(), "1".into(), "m".into()));
    }
}
