//! Per-thread POSIX timers: `timer_create` with `SIGEV_THREAD_ID`, so that each expiry signals one chosen
//! thread (a process-directed timer would signal whichever thread the kernel picks).

use std::io;
use std::time::Duration;

use crate::sys::gettid;

/// A `CLOCK_MONOTONIC` POSIX timer that delivers a signal to one thread (`SIGEV_THREAD_ID`). Deleted on drop.
///
/// # Context
/// Normal context: every method makes a system call (`timer_create`, `timer_settime`, `timer_delete`).
pub struct ThreadTimer {
    id: libc::timer_t,
}

// SAFETY: a timer id is a plain handle; any thread of the process may re-arm or delete the timer. The
// `sigev_value` it carries is only handed to the signal handler, which is responsible for its use.
unsafe impl Send for ThreadTimer {}

/// `d` as a `timespec`.
///
/// # Context
/// Any context: arithmetic only.
pub fn timespec(d: Duration) -> libc::timespec {
    libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long }
}

impl ThreadTimer {
    /// A timer that sends `sig` to thread `tid` of this process with `value` as its `sigev_value` (what the
    /// handler reads in `si_value`), first after `first`, then every `interval` (zero `first`: created
    /// disarmed; zero `interval`: one shot).
    ///
    /// # Context
    /// Normal context: `timer_create` and `timer_settime` system calls; on an error nothing is left behind.
    pub fn try_new(
        tid: libc::pid_t,
        sig: libc::c_int,
        value: *mut libc::c_void,
        first: Duration,
        interval: Duration,
    ) -> io::Result<Self> {
        // SAFETY: an all-zero sigevent is a valid value (the struct has private padding, so no literal).
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        sev.sigev_value = libc::sigval { sival_ptr: value };
        sev.sigev_notify_thread_id = tid;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` is initialised and `id` is a valid out-pointer.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // On an error `t` is dropped, which deletes the timer.
        let t = Self { id };
        t.arm(first, interval)?;
        Ok(t)
    }

    /// A timer that sends `sig` to the calling thread every `period`, starting one period from now.
    ///
    /// # Context
    /// Normal context: system calls; panics if they fail.
    #[track_caller]
    pub fn for_current_thread(sig: libc::c_int, period: Duration) -> Self {
        Self::for_thread(gettid(), sig, period)
    }

    /// As [`for_current_thread`](Self::for_current_thread), for thread `tid` of this process.
    ///
    /// # Context
    /// Normal context: system calls; panics if they fail.
    #[track_caller]
    pub fn for_thread(tid: libc::pid_t, sig: libc::c_int, period: Duration) -> Self {
        match Self::try_new(tid, sig, std::ptr::null_mut(), period, period) {
            Ok(t) => t,
            Err(e) => panic!("timer_create / timer_settime: {e}"),
        }
    }

    /// Re-arm: first expiry after `first` (zero disarms), then every `interval` (zero: one shot).
    ///
    /// # Context
    /// Normal context: one `timer_settime` system call.
    pub fn arm(&self, first: Duration, interval: Duration) -> io::Result<()> {
        // SAFETY: `self.id` is a live timer (deleted only by `drop`).
        unsafe { arm_id(self.id, first, interval) }
    }

    /// Re-arm with `period` as first expiry and interval (zero disarms).
    ///
    /// # Context
    /// Normal context: one `timer_settime` system call; panics if it fails.
    #[track_caller]
    pub fn set(&self, period: Duration) {
        if let Err(e) = self.arm(period, period) {
            panic!("timer_settime: {e}");
        }
    }

    /// The timer's id, for [`arm_id`] from another thread while the timer is alive.
    ///
    /// # Context
    /// Any context.
    pub fn id(&self) -> libc::timer_t {
        self.id
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` is a live timer created by `timer_create` and deleted only here.
        unsafe { libc::timer_delete(self.id) };
    }
}

/// Re-arm the timer `id` as [`ThreadTimer::arm`] does, from any thread.
///
/// # Safety
/// `id` is the id of a [`ThreadTimer`] that is still alive (not dropped) during the call: a stale id may name
/// another timer of the process.
///
/// # Context
/// Normal context: one `timer_settime` system call.
pub unsafe fn arm_id(id: libc::timer_t, first: Duration, interval: Duration) -> io::Result<()> {
    let spec = libc::itimerspec { it_interval: timespec(interval), it_value: timespec(first) };
    // SAFETY: `id` is a live timer (caller); `spec` is initialised; a null old-value pointer is allowed.
    if unsafe { libc::timer_settime(id, 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
