//! Signal storms shared by the scenarios (`nolock demo`, `nolock rcu`): one handler for two real-time signals,
//! two per-thread POSIX timers per thread (`timer_create` with `SIGEV_THREAD_ID`), and a controller that
//! re-tunes the timers until the *delivered* rate meets the target.

use core::ffi::{c_int, c_void};
use core::ptr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// An `SA_SIGINFO` handler.
pub type Handler = extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void);

/// The two storm signals. Neither is blocked while the other's handler runs, so handlers nest.
pub fn storm_signals() -> [c_int; 2] {
    [libc::SIGRTMIN(), libc::SIGRTMIN() + 1]
}

/// A signal set holding `sigs`.
pub fn sigset_of(sigs: &[c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { core::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: as above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Install `handler` for both storm signals; returns the previous actions.
pub fn install_handler(handler: Handler) -> std::io::Result<[libc::sigaction; 2]> {
    let mut old = [
        // SAFETY: sigaction is plain data.
        unsafe { core::mem::zeroed::<libc::sigaction>() },
        // SAFETY: as above.
        unsafe { core::mem::zeroed::<libc::sigaction>() },
    ];
    for (i, sig) in storm_signals().into_iter().enumerate() {
        // SAFETY: sigaction is plain data.
        let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // Nothing else blocked while in the handler: the other storm signal may nest into it.
        sa.sa_mask = sigset_of(&[]);
        // SAFETY: valid signal number and action; `handler` has the SA_SIGINFO signature.
        if unsafe { libc::sigaction(sig, &sa, &mut old[i]) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(old)
}

/// Put back the actions that [`install_handler`] replaced.
pub fn restore_handler(old: &[libc::sigaction; 2]) {
    for (i, sig) in storm_signals().into_iter().enumerate() {
        // SAFETY: restoring an action that sigaction returned.
        unsafe { libc::sigaction(sig, &old[i], ptr::null_mut()) };
    }
}

fn timespec_ns(ns: u64) -> libc::timespec {
    libc::timespec { tv_sec: (ns / 1_000_000_000) as libc::time_t, tv_nsec: (ns % 1_000_000_000) as libc::c_long }
}

/// (Re)arm timer `t`: first expiry after `first_ns`, then every `interval_ns`.
pub fn arm_timer(t: libc::timer_t, first_ns: u64, interval_ns: u64) -> std::io::Result<()> {
    let spec = libc::itimerspec { it_interval: timespec_ns(interval_ns), it_value: timespec_ns(first_ns) };
    // SAFETY: `t` is a live timer of this process (callers keep it until `stop_thread_timers`); valid itimerspec.
    if unsafe { libc::timer_settime(t, 0, &spec, ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A thread that receives a storm: where its timers are published for the [`Storm`] controller.
pub trait Timed {
    /// Signals its handlers have seen so far.
    fn signals(&self) -> u64;
    /// This thread's two timers (`timer_t` as an address; 0: none).
    fn timers(&self) -> &[AtomicUsize; 2];
    /// Current period of each timer.
    fn interval_ns(&self) -> &AtomicU64;
}

/// Start the calling thread's two timers, one per storm signal, each every `interval_ns` (the second half an
/// interval later), with `value` as their `sigev_value`; publish them in `t`. The caller deletes them with
/// [`stop_thread_timers`] before `value` dies.
pub fn start_thread_timers<T: Timed>(
    t: &T,
    value: *mut c_void,
    interval_ns: u64,
) -> std::io::Result<Vec<libc::timer_t>> {
    let mut timers = Vec::new();
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let mut result = Ok(());
    for (i, sig) in storm_signals().into_iter().enumerate() {
        // SAFETY: sigevent is plain data (it has private padding, so it cannot be built literally).
        let mut sev: libc::sigevent = unsafe { core::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        sev.sigev_value = libc::sigval { sival_ptr: value };
        sev.sigev_notify_thread_id = tid;
        let mut tm: libc::timer_t = ptr::null_mut();
        // SAFETY: valid clock, event and out pointer.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut tm) } != 0 {
            result = Err(std::io::Error::last_os_error());
            break;
        }
        timers.push(tm);
        if let Err(e) = arm_timer(tm, interval_ns + interval_ns * i as u64 / 2, interval_ns) {
            result = Err(e);
            break;
        }
    }
    if let Err(e) = result {
        stop_thread_timers(&timers);
        return Err(e);
    }
    for (slot, &tm) in t.timers().iter().zip(&timers) {
        slot.store(tm as usize, Ordering::Relaxed);
    }
    t.interval_ns().store(interval_ns, Ordering::Relaxed);
    Ok(timers)
}

/// Stop the storm on this thread: block both signals (pending ones die with the thread), delete the timers.
pub fn stop_thread_timers(timers: &[libc::timer_t]) {
    let set = sigset_of(&storm_signals());
    // SAFETY: valid set; changes only this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, ptr::null_mut()) };
    for &t in timers {
        // SAFETY: a timer this thread created and has not deleted.
        unsafe { libc::timer_delete(t) };
    }
}

/// Shortest timer period the controller sets (50,000 expirations per second per timer).
pub const MIN_INTERVAL_NS: u64 = 20_000;

/// The nominal period of each of a thread's two timers for `rate` signals per second over `threads` threads.
pub fn nominal_interval_ns(rate: u64, threads: usize) -> Option<u64> {
    (rate > 0).then(|| (2 * threads as u64 * 1_000_000_000 / rate).max(MIN_INTERVAL_NS))
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
    pub fn new(rate: u64, threads: usize, nominal_ns: u64) -> Self {
        Self {
            per_thread: rate as f64 / threads.max(1) as f64,
            max_interval_ns: nominal_ns.saturating_mul(4),
            last: vec![0; threads],
        }
    }

    /// Re-tune after `dt_s` seconds. The caller guarantees the threads' timers are still alive (not yet
    /// deleted).
    pub fn adjust<T: Timed>(&mut self, threads: &[T], dt_s: f64) {
        for (w, last) in threads.iter().zip(self.last.iter_mut()) {
            let cur = w.signals();
            let got = cur.saturating_sub(*last) as f64;
            *last = cur;
            let want = self.per_thread * dt_s;
            let ratio = if want > 0.0 { (got / want).clamp(0.5, 2.0) } else { 1.0 };
            if (0.93..=1.07).contains(&ratio) {
                continue;
            }
            let old = w.interval_ns().load(Ordering::Relaxed);
            let new = ((old as f64 * ratio) as u64).clamp(MIN_INTERVAL_NS, self.max_interval_ns.max(MIN_INTERVAL_NS));
            if new == old {
                continue;
            }
            w.interval_ns().store(new, Ordering::Relaxed);
            for (i, slot) in w.timers().iter().enumerate() {
                let t = slot.load(Ordering::Relaxed);
                if t != 0 {
                    let _ = arm_timer(t as libc::timer_t, new + new * i as u64 / 2, new);
                }
            }
        }
    }

    /// Mean timer period over the threads.
    pub fn mean_interval_ns<T: Timed>(threads: &[T]) -> u64 {
        let sum: u64 = threads.iter().map(|w| w.interval_ns().load(Ordering::Relaxed)).sum();
        sum / threads.len().max(1) as u64
    }
}

/// The body every storm handler shares: save errno, find the thread's state `T` in the timer's `sigev_value`,
/// run `work(state, overrun)`, restore errno. Atomics and nolock only inside `work`.
///
/// # Safety
/// `info` is the siginfo of an SA_SIGINFO handler for a timer armed by [`start_thread_timers`] with a `T`
/// that outlives the timer.
pub unsafe fn dispatch_timer_signal<T>(info: *mut libc::siginfo_t, work: impl FnOnce(&T, c_int)) {
    // SAFETY: errno is thread-local; its location is valid for the thread's life.
    let errno = unsafe { libc::__errno_location() };
    // SAFETY: as above.
    let saved = unsafe { errno.read() };
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; timer signals carry sigev_value.
    let (value, overrun) = unsafe { ((*info).si_value().sival_ptr, (*info).si_overrun()) };
    if !value.is_null() {
        // SAFETY: the timer's sigev_value is a `T` that outlives the thread's timers (caller).
        work(unsafe { &*(value as *const T) }, overrun);
    }
    // SAFETY: as above.
    unsafe { errno.write(saved) };
}

/// Sleep for `d` of wall-clock time even under the signal storm. `std::thread::sleep` restarts an interrupted
/// sleep with the time that was left, so a thread whose handlers run faster than it can sleep would never get
/// through it (and a reader sleeping inside a read-side section would hold grace periods forever); an absolute
/// deadline ends the sleep on time however often it is interrupted.
///
/// # Context
/// Normal context or a thread's own code between handlers: blocks for `d`.
pub fn sleep_wall(d: std::time::Duration) {
    // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC is valid and `ts` a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let nanos = ts.tv_nsec as u64 + u64::from(d.subsec_nanos());
    ts.tv_sec += (d.as_secs() + nanos / 1_000_000_000) as libc::time_t;
    ts.tv_nsec = (nanos % 1_000_000_000) as libc::c_long;
    // SAFETY: `ts` is a valid absolute deadline; a null remainder is allowed with TIMER_ABSTIME.
    while unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, ptr::null_mut()) }
        == libc::EINTR
    {}
}
