//! Sleeping under a signal storm.

use std::time::Duration;

/// Sleep for `d` of wall-clock time even under a signal storm, by sleeping to an absolute deadline
/// (`clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)`) and going back to sleep to the same deadline after each
/// interruption.
///
/// Why not `std::thread::sleep`: it restarts an interrupted sleep with the time that was *left*, and each
/// restart re-arms the kernel's timer from now. A thread interrupted by handlers more often than it can get
/// through the remaining time never finishes a 1 ms sleep: under a saturating storm the sleep livelocks. A
/// reader sleeping inside a read-side section then holds its grace period forever. That livelock was found
/// and fixed twice, once in each copy this function had (the `rcu_torture` test's sleepy readers: "no
/// progress for 20 s" aborts about one run in six; then the sleepy SRCU-fast readers of `nolock rcu`). An
/// absolute deadline ends the sleep on time, however often it is interrupted.
///
/// # Context
/// Normal context, or a thread's own code between its handlers: blocks for `d` (`clock_gettime`,
/// `clock_nanosleep`). Not for a handler (it would block the interrupted code).
pub fn sleep_wall(d: Duration) {
    // SAFETY: an all-zero timespec is valid; clock_gettime fills it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_MONOTONIC is valid and `ts` a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let nanos = ts.tv_nsec as u64 + u64::from(d.subsec_nanos());
    ts.tv_sec += (d.as_secs() + nanos / 1_000_000_000) as libc::time_t;
    ts.tv_nsec = (nanos % 1_000_000_000) as libc::c_long;
    // SAFETY: `ts` is a valid absolute deadline; a null remainder is allowed with TIMER_ABSTIME.
    while unsafe { libc::clock_nanosleep(libc::CLOCK_MONOTONIC, libc::TIMER_ABSTIME, &ts, std::ptr::null_mut()) }
        == libc::EINTR
    {}
}
