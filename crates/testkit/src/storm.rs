//! The signal storm of the scenarios: one handler for two real-time signals, two per-thread POSIX timers per
//! thread (one per signal, so that the second signal's handler can interrupt the first one's), and a
//! controller that re-tunes the timers until the *delivered* rate meets the target.
//!
//! Each storm thread owns a [`StormSlot`] (shared with the controller and the thread's handlers), starts its
//! timers with [`StormSlot::start`] and stops them by dropping the returned [`StormTimers`]. The handler finds
//! the thread's state in the timer's `sigev_value` with [`dispatch_timer_signal`] and counts the signal with
//! [`StormSlot::count`]; [`Storm::adjust`] reads those counts every 100 ms or so and re-arms the timers.

use core::ffi::{c_int, c_void};
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::signal::{Handler, SavedActions, block_signals};
use crate::sys::{ErrnoGuard, gettid};
use crate::timer::{ThreadTimer, arm_id};

/// The two storm signals. Neither is blocked while the other's handler runs, so handlers nest.
///
/// # Context
/// Any context: reads glibc's real-time signal range (no system call).
pub fn storm_signals() -> [c_int; 2] {
    [libc::SIGRTMIN(), libc::SIGRTMIN() + 1]
}

/// Install `handler` for both storm signals (`SA_SIGINFO | SA_RESTART`, empty mask); the previous actions
/// come back when the result is dropped.
///
/// # Context
/// Normal context: `sigaction` system calls, allocates.
pub fn install_handler(handler: Handler) -> io::Result<SavedActions> {
    SavedActions::install(&storm_signals(), handler, 0)
}

/// Shortest timer period the controller sets (50,000 expirations per second per timer).
pub const MIN_INTERVAL_NS: u64 = 20_000;

/// The nominal period of each of a thread's two timers for `rate` signals per second over `threads` threads
/// (`None` for a rate of 0: no storm).
///
/// # Context
/// Any context: arithmetic only.
pub fn nominal_interval_ns(rate: u64, threads: usize) -> Option<u64> {
    (rate > 0).then(|| (2 * threads as u64 * 1_000_000_000 / rate).max(MIN_INTERVAL_NS))
}

/// One storm thread's state, shared by the thread, its handlers and the controller.
#[derive(Default)]
pub struct StormSlot {
    /// The thread's two timers (`timer_t` as an address; 0: none), published by [`start`](Self::start) and
    /// withdrawn by the drop of [`StormTimers`], which deletes them under the lock: the controller re-arms
    /// them under it too, so it never re-arms a deleted timer. (A mutex: both sides run in normal context.)
    timers: Mutex<[usize; 2]>,
    /// Current period of each timer.
    interval_ns: AtomicU64,
    /// Handler runs counted by [`count`](Self::count).
    signals: AtomicU64,
    /// Timer overruns reported by those runs.
    overruns: AtomicU64,
}

impl StormSlot {
    /// An idle slot.
    ///
    /// # Context
    /// Any context (no system call, no allocation).
    pub fn new() -> Self {
        Self::default()
    }

    /// Start the calling thread's two timers, one per storm signal, each every `interval_ns` (the second half
    /// an interval later), with `value` as their `sigev_value`; publish them for the controller. The storm
    /// stops when the result is dropped; `value` must stay valid until then.
    ///
    /// # Context
    /// Normal context, on the thread that receives the storm: system calls, allocates. On an error no timer is
    /// left.
    pub fn start(&self, value: *mut c_void, interval_ns: u64) -> io::Result<StormTimers<'_>> {
        let tid = gettid();
        let mut timers = Vec::with_capacity(2);
        for (i, sig) in storm_signals().into_iter().enumerate() {
            let first = Duration::from_nanos(interval_ns + interval_ns * i as u64 / 2);
            // On an error the timers made so far are deleted with `timers`.
            timers.push(ThreadTimer::try_new(tid, sig, value, first, Duration::from_nanos(interval_ns))?);
        }
        self.interval_ns.store(interval_ns, Ordering::Relaxed);
        let mut published = self.timers.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, t) in published.iter_mut().zip(&timers) {
            *slot = t.id() as usize;
        }
        drop(published);
        Ok(StormTimers { slot: self, timers })
    }

    /// Count one handler run and the overruns its `siginfo` reported.
    ///
    /// # Context
    /// Any context, signal handlers included: two atomic RMWs (a nested handler may interrupt between a load
    /// and a store, so no plain read-modify-write).
    #[inline]
    pub fn count(&self, overrun: c_int) {
        self.signals.fetch_add(1, Ordering::Relaxed);
        if overrun > 0 {
            self.overruns.fetch_add(overrun as u64, Ordering::Relaxed);
        }
    }

    /// Handler runs counted so far.
    ///
    /// # Context
    /// Any context: one relaxed load.
    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    /// Timer overruns counted so far (expirations merged into a signal that was still pending).
    ///
    /// # Context
    /// Any context: one relaxed load.
    pub fn overruns(&self) -> u64 {
        self.overruns.load(Ordering::Relaxed)
    }

    /// Current period of each of the thread's timers (0: never started).
    ///
    /// # Context
    /// Any context: one relaxed load.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns.load(Ordering::Relaxed)
    }
}

impl AsRef<StormSlot> for StormSlot {
    fn as_ref(&self) -> &StormSlot {
        self
    }
}

/// A thread's running storm, from [`StormSlot::start`]. Dropping it (on the storm's thread) blocks both storm
/// signals in the thread (pending ones die with it: the thread is expected to exit soon), withdraws the timers
/// from the controller and deletes them; no handler of the storm runs on the thread afterwards. The drop
/// waits while the controller re-arms the timers.
pub struct StormTimers<'a> {
    slot: &'a StormSlot,
    timers: Vec<ThreadTimer>,
}

impl Drop for StormTimers<'_> {
    fn drop(&mut self) {
        block_signals(&storm_signals(), true);
        let mut published = self.slot.timers.lock().unwrap_or_else(|e| e.into_inner());
        *published = [0; 2];
        self.timers.clear();
    }
}

/// Keeps the *delivered* signal rate near the target. A periodic timer whose signal is still pending (its
/// thread is not running, or is still in the handler) does not queue another one: the expiry only counts as an
/// overrun. On a machine with fewer cores than threads most expirations are lost that way, so every 100 ms the
/// period of each thread's timers is scaled by (delivered / wanted), within a factor of 2 per step.
pub struct Storm {
    per_thread: f64,
    max_interval_ns: u64,
    last: Vec<u64>,
}

impl Storm {
    /// A controller for `rate` signals per second over `threads` threads, starting at `nominal_ns`.
    ///
    /// # Context
    /// Normal context: allocates.
    pub fn new(rate: u64, threads: usize, nominal_ns: u64) -> Self {
        Self {
            per_thread: rate as f64 / threads.max(1) as f64,
            max_interval_ns: nominal_ns.saturating_mul(4),
            last: vec![0; threads],
        }
    }

    /// Re-tune after `dt_s` seconds.
    ///
    /// # Context
    /// Normal context, on a thread other than the storms': `timer_settime` system calls, under each slot's
    /// lock (a thread stopping its storm waits for it).
    pub fn adjust<T: AsRef<StormSlot>>(&mut self, threads: &[T], dt_s: f64) {
        for (w, last) in threads.iter().map(AsRef::as_ref).zip(self.last.iter_mut()) {
            let cur = w.signals();
            let got = cur.saturating_sub(*last) as f64;
            *last = cur;
            let want = self.per_thread * dt_s;
            let ratio = if want > 0.0 { (got / want).clamp(0.5, 2.0) } else { 1.0 };
            if (0.93..=1.07).contains(&ratio) {
                continue;
            }
            let old = w.interval_ns.load(Ordering::Relaxed);
            let new = ((old as f64 * ratio) as u64).clamp(MIN_INTERVAL_NS, self.max_interval_ns.max(MIN_INTERVAL_NS));
            if new == old {
                continue;
            }
            w.interval_ns.store(new, Ordering::Relaxed);
            let published = w.timers.lock().unwrap_or_else(|e| e.into_inner());
            for (i, &t) in published.iter().enumerate() {
                if t != 0 {
                    let first = Duration::from_nanos(new + new * i as u64 / 2);
                    // SAFETY: a published timer is alive while its slot's lock is held: `StormTimers`
                    // withdraws it under the lock before deleting it.
                    let _ = unsafe { arm_id(t as libc::timer_t, first, Duration::from_nanos(new)) };
                }
            }
        }
    }

    /// Hold the rate for `dur`: re-tune every `tick` with the time that really passed, then return.
    ///
    /// # Context
    /// Normal context, on a thread other than the storms': sleeps, and [`adjust`](Self::adjust)'s system calls.
    pub fn hold<T: AsRef<StormSlot>>(&mut self, threads: &[T], dur: Duration, tick: Duration) {
        let start = std::time::Instant::now();
        let mut last = start;
        while start.elapsed() < dur {
            std::thread::sleep(tick);
            let now = std::time::Instant::now();
            self.adjust(threads, (now - last).as_secs_f64());
            last = now;
        }
    }

    /// Mean timer period over the threads.
    ///
    /// # Context
    /// Any context: relaxed loads.
    pub fn mean_interval_ns<T: AsRef<StormSlot>>(threads: &[T]) -> u64 {
        let sum: u64 = threads.iter().map(|w| w.as_ref().interval_ns()).sum();
        sum / threads.len().max(1) as u64
    }
}

/// The body every storm handler shares: save errno, find the thread's state `T` in the timer's `sigev_value`,
/// run `work(state, overrun)`, restore errno.
///
/// # Safety
/// `info` is the siginfo of an SA_SIGINFO handler for a timer made by [`StormSlot::start`] (or
/// [`ThreadTimer::try_new`]) with a pointer to a `T` that outlives the timer, or a null pointer (`work` is
/// then not called).
///
/// # Context
/// Signal handler: async-signal-safe itself (a thread-local load and store, no allocation, no lock); `work`
/// must be too.
#[inline]
pub unsafe fn dispatch_timer_signal<T>(info: *mut libc::siginfo_t, work: impl FnOnce(&T, c_int)) {
    let _errno = ErrnoGuard::new();
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; timer signals carry sigev_value.
    let (value, overrun) = unsafe { ((*info).si_value().sival_ptr, (*info).si_overrun()) };
    if !value.is_null() {
        // SAFETY: the timer's sigev_value is a `T` that outlives the thread's timers (caller).
        work(unsafe { &*(value as *const T) }, overrun);
    }
}
