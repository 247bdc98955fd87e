//! Helpers shared by the signal and reentry tests: signal handlers, alternate signal stacks, per-thread POSIX
//! timers, and object patterns that detect corruption and double hand-outs.
//!
//! Everything a signal handler may call from here (`ErrnoGuard`, `fill`, `check`, `gettid`, `raw_stderr`) uses
//! only raw memory accesses and async-signal-safe system calls: no lock, no allocation, no stdio.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io;
use std::marker::PhantomData;
use std::time::Duration;

/// The signature of an `SA_SIGINFO` handler.
pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Flags every handler gets: three-argument handler, interrupted system calls restart.
pub const BASE_FLAGS: libc::c_int = libc::SA_SIGINFO | libc::SA_RESTART;

/// Install `handler` for `sig` with `BASE_FLAGS | extra_flags` (e.g. `SA_ONSTACK`, `SA_NODEFER`) and an empty
/// mask (other signals may interrupt the handler).
pub fn install_handler(sig: libc::c_int, handler: Handler, extra_flags: libc::c_int) {
    // SAFETY: an all-zero `sigaction` is a valid value (no handler, empty mask, no flags); we then fill it in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = BASE_FLAGS | extra_flags;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is fully initialised; the handler is an `extern "C"` function of the SA_SIGINFO signature
    // that lives for the whole program; a null old-action pointer is allowed.
    let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "sigaction({sig}): {}", io::Error::last_os_error());
}

/// Block (`true`) or unblock (`false`) `sig` in the calling thread.
pub fn block_signal(sig: libc::c_int, block: bool) {
    // SAFETY: an all-zero sigset_t is a valid object for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; `sig` is a signal number.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
    }
    let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "pthread_sigmask");
}

/// The calling thread's kernel thread id. Async-signal-safe.
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Send `sig` to thread `tid` of this process. Async-signal-safe.
pub fn tgkill(tid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: tgkill only sends a signal; a stale tid makes it fail with ESRCH.
    let rc = unsafe { libc::tgkill(libc::getpid(), tid, sig) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Write `bytes` to standard error with one raw `write(2)`: async-signal-safe, and not captured by the test
/// harness (for messages right before `abort`).
pub fn raw_stderr(bytes: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2; a failure is ignored.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// Saves `errno` when created and restores it when dropped: a signal handler must not change the `errno` of
/// the code it interrupted.
pub struct ErrnoGuard(libc::c_int);

impl ErrnoGuard {
    /// Save the calling thread's errno.
    pub fn new() -> Self {
        // SAFETY: __errno_location returns a valid pointer to this thread's errno.
        Self(unsafe { *libc::__errno_location() })
    }
}

impl Default for ErrnoGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// An alternate signal stack for the calling thread (`sigaltstack`); on drop the previous one is put back.
/// Not `Send`: it must be dropped by the thread that created it.
///
/// Rust's standard library already gives every thread a small alternate stack (a few pages, for its
/// stack-overflow message); a handler installed with `SA_ONSTACK` runs there unless the thread installs a
/// bigger one like this, and nested handlers overflow it quickly.
pub struct AltStack {
    base: *mut libc::c_void,
    len: usize,
    old: libc::stack_t,
    _not_send: PhantomData<*mut ()>,
}

impl AltStack {
    /// Map `len` bytes and make them this thread's alternate signal stack (for handlers with `SA_ONSTACK`).
    pub fn new(len: usize) -> Self {
        // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap of a signal stack");
        let ss = libc::stack_t { ss_sp: base, ss_flags: 0, ss_size: len };
        let mut old = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: 0, ss_size: 0 };
        // SAFETY: `ss` describes memory we just mapped and keep mapped until `drop` has replaced the stack;
        // `old` is a valid out-pointer.
        let rc = unsafe { libc::sigaltstack(&ss, &mut old) };
        assert_eq!(rc, 0, "sigaltstack: {}", io::Error::last_os_error());
        Self { base, len, old, _not_send: PhantomData }
    }
}

impl Drop for AltStack {
    fn drop(&mut self) {
        let mut ss = self.old;
        if ss.ss_sp.is_null() || ss.ss_flags & libc::SS_DISABLE != 0 {
            ss = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
        } else {
            ss.ss_flags = 0;
        }
        // SAFETY: puts back the stack that was installed before (still mapped: its owner frees it at thread
        // exit) or disables ours; we are not running on ours (not in a handler).
        let rc = unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "sigaltstack(restore): {}", io::Error::last_os_error());
        // SAFETY: the stack is no longer installed, so no handler can run on it; the mapping is ours.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// A POSIX timer that delivers a signal periodically to one thread (`SIGEV_THREAD_ID`). Deleted on drop.
pub struct ThreadTimer {
    id: libc::timer_t,
}

// SAFETY: a timer id is a plain handle; any thread of the process may delete the timer.
unsafe impl Send for ThreadTimer {}

impl ThreadTimer {
    /// A `CLOCK_MONOTONIC` timer that sends `sig` to the calling thread every `period`, starting one period
    /// from now.
    pub fn for_current_thread(sig: libc::c_int, period: Duration) -> Self {
        Self::for_thread(gettid(), sig, period)
    }

    /// As [`for_current_thread`](Self::for_current_thread), for thread `tid` of this process.
    pub fn for_thread(tid: libc::pid_t, sig: libc::c_int, period: Duration) -> Self {
        // SAFETY: an all-zero sigevent is a valid value (the struct has private padding, so no literal).
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = sig;
        sev.sigev_notify_thread_id = tid;
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` is initialised and `id` is a valid out-pointer.
        let rc = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        assert_eq!(rc, 0, "timer_create: {}", io::Error::last_os_error());
        let t = Self { id };
        t.set(period);
        t
    }

    /// Re-arm with `period` (zero disarms).
    pub fn set(&self, period: Duration) {
        let ts =
            libc::timespec { tv_sec: period.as_secs() as libc::time_t, tv_nsec: period.subsec_nanos() as libc::c_long };
        let spec = libc::itimerspec { it_interval: ts, it_value: ts };
        // SAFETY: `self.id` is a live timer; `spec` is initialised; a null old-value pointer is allowed.
        let rc = unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "timer_settime: {}", io::Error::last_os_error());
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` is a live timer created by `timer_create` and deleted only here.
        unsafe { libc::timer_delete(self.id) };
    }
}

// ------------------------------------------------------------------------------------------------------------
// Object patterns
// ------------------------------------------------------------------------------------------------------------

/// The pattern word at index `i >= 1` of an object stamped with `seq`.
#[inline]
pub fn pattern_word(seq: u64, i: usize) -> u64 {
    seq ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Stamp the first `len` bytes (rounded down to whole words, at least one word) of `p` with `seq`: word 0 is
/// `seq`, word `i` is `pattern_word(seq, i)`. Volatile writes, so the compiler cannot merge them with checks.
///
/// # Safety
/// `p` must be 8-aligned and valid for writes of `max(len, 8)` bytes.
pub unsafe fn fill(p: *mut u8, len: usize, seq: u64) {
    let w = p.cast::<u64>();
    // SAFETY: the caller guarantees at least one writable, aligned word.
    unsafe { w.write_volatile(seq) };
    for i in 1..len / 8 {
        // SAFETY: `i < len / 8`, inside the caller's range.
        unsafe { w.add(i).write_volatile(pattern_word(seq, i)) };
    }
}

/// What [`check`] found wrong: the word index, what it should hold and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Index of the first bad word.
    pub word: usize,
    /// What it should hold.
    pub expected: u64,
    /// What it holds.
    pub found: u64,
}

/// Check a stamp made by [`fill`] with the same `len`. With `seq == None`, word 0 is taken as the stamp and only
/// has to lie in `1..seq_limit`. Returns the stamp found.
///
/// # Safety
/// As [`fill`], for reads.
pub unsafe fn check(p: *const u8, len: usize, seq: Option<u64>, seq_limit: u64) -> Result<u64, Damage> {
    let w = p.cast::<u64>();
    // SAFETY: the caller guarantees at least one readable, aligned word.
    let first = unsafe { w.read_volatile() };
    let seq = match seq {
        Some(s) if s != first => {
            return Err(Damage { word: 0, expected: s, found: first });
        }
        Some(s) => s,
        None if first == 0 || first >= seq_limit => {
            return Err(Damage { word: 0, expected: seq_limit, found: first });
        }
        None => first,
    };
    for i in 1..len / 8 {
        // SAFETY: `i < len / 8`, inside the caller's range.
        let v = unsafe { w.add(i).read_volatile() };
        if v != pattern_word(seq, i) {
            return Err(Damage { word: i, expected: pattern_word(seq, i), found: v });
        }
    }
    Ok(seq)
}

/// Whether the first `len` bytes of `p` are all zero (volatile reads).
///
/// # Safety
/// `p` must be valid for reads of `len` bytes.
pub unsafe fn is_zeroed(p: *const u8, len: usize) -> bool {
    // SAFETY: `i < len`, inside the caller's range.
    (0..len).all(|i| unsafe { p.add(i).read_volatile() } == 0)
}

/// A small, fast pseudo-random step (splitmix64).
#[inline]
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Sleep for `d` of wall-clock time even under a signal storm. `std::thread::sleep` restarts an interrupted
/// sleep with the time that was left, so a thread interrupted by handlers faster than it can sleep never gets
/// through a 1 ms sleep: a reader sleeping inside a read-side section would then hold grace periods forever.
/// An absolute deadline ends the sleep on time, however often it is interrupted.
///
/// # Context
/// Normal context: blocks for `d`.
#[allow(dead_code)]
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

// ------------------------------------------------------------------------------------------------------------
// No debug report during a test
// ------------------------------------------------------------------------------------------------------------

/// Tests of one binary that must see no report take this gate shared; a test that provokes reports on purpose
/// takes it exclusively ([`reports_expected`]), so it never runs while a [`NoReports`] test counts. Reports
/// are counted process-wide (`nolock::debug::reports()`) and the tests of one binary run in parallel threads.
static REPORT_GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Fails the test if nolock reports anything (a refused free, a debug-mode finding, a destroy with live
/// objects, a panicking callback: everything `nolock::debug::reports()` counts, each also printed on
/// standard error) between [`new`](Self::new) and the drop of the guard or an explicit [`check`](Self::check).
///
/// Create it first thing in the test, before any serialisation lock of the test file, and keep it to the end
/// (`let _reports = common::NoReports::new();`). A background worker's report made for this test after the
/// guard is dropped is not seen; tests that wait for their grace periods (`rcu_barrier`) before returning see
/// those too.
pub struct NoReports {
    start: u64,
    _gate: std::sync::RwLockReadGuard<'static, ()>,
}

impl NoReports {
    /// Start counting (waits while a test that expects reports runs).
    pub fn new() -> Self {
        let gate = REPORT_GATE.read().unwrap_or_else(|e| e.into_inner());
        Self { start: nolock::debug::reports(), _gate: gate }
    }

    /// Reports made since [`new`](Self::new).
    pub fn count(&self) -> u64 {
        nolock::debug::reports().wrapping_sub(self.start)
    }

    /// Panic if nolock reported anything so far.
    #[track_caller]
    pub fn check(&self, when: &str) {
        let n = self.count();
        assert_eq!(n, 0, "{when}: nolock printed {n} report(s) on standard error during the test (see stderr)");
    }
}

impl Default for NoReports {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoReports {
    fn drop(&mut self) {
        // A test that already fails keeps its own message (a second panic while unwinding would abort).
        if !std::thread::panicking() {
            self.check("at the end of the test");
        }
    }
}

/// For a test that provokes reports on purpose: no [`NoReports`] test of this binary runs while the guard is
/// held. The test checks its own expected count.
pub fn reports_expected() -> std::sync::RwLockWriteGuard<'static, ()> {
    REPORT_GATE.write().unwrap_or_else(|e| e.into_inner())
}
