//! The handler workload shared by the `HybridAlloc` tests (`tests/hybrid.rs` here, with `System`, and the
//! jemalloc ones in `crates/nolock-cli/tests/`): a SIGPROF storm (plus a second, nesting signal) on busy
//! threads whose handlers allocate the way real handlers do — `Vec` growth, `format!`, a backtrace captured into
//! a `Vec` — take over memory the normal code allocated (freeing it, growing it), and hand memory back to the
//! normal code; every value is checked.
//!
//! The including file declares the global allocator. With `mark == true` the handlers are marked (installed
//! through `nolock::hybrid::sigaction`, and a `HandlerGuard` in the second one), so a `HybridAlloc` serves them
//! from nolock; with `mark == false` they are plain handlers, as a program without `HybridAlloc` would have.
#![allow(dead_code)]

use std::ffi::{c_int, c_void};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

unsafe extern "C" {
    /// glibc's `backtrace(3)`: unwinds with libgcc's `_Unwind_Backtrace`. Its first call loads libgcc (dlopen,
    /// malloc): [`prime_backtrace`] makes it in normal context; later calls only walk unwind tables.
    fn backtrace(buffer: *mut *mut c_void, size: c_int) -> c_int;
}

/// Content-check failures seen (in handlers or normal code).
pub static ERRORS: AtomicU64 = AtomicU64::new(0);
/// Handler runs that did the whole workload.
pub static HANDLED: AtomicU64 = AtomicU64::new(0);
/// Nested-signal handler runs.
pub static NESTED: AtomicU64 = AtomicU64::new(0);
/// Frames captured by handlers' backtraces.
pub static FRAMES: AtomicU64 = AtomicU64::new(0);
/// Whether handlers are marked.
pub static MARK: AtomicBool = AtomicBool::new(true);

/// A `Vec` built in normal context (the inner allocator's memory), left for a handler to take over.
static TO_HANDLER: AtomicPtr<Vec<u64>> = AtomicPtr::new(std::ptr::null_mut());
/// A `Vec` a handler grew (moved to nolock) and hands back to normal code.
static FROM_HANDLER: AtomicPtr<Vec<u64>> = AtomicPtr::new(std::ptr::null_mut());

fn error() {
    ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// `v[i] == base + i` for every i.
fn check_run(v: &[u64], base: u64) -> bool {
    v.iter().enumerate().all(|(i, &x)| x == base.wrapping_add(i as u64))
}

/// What a profiler's or crash reporter's handler does, with checks.
fn workload(n: u64) {
    // Vec growth from empty: several reallocations.
    let len = 8 + (n % 300) as usize;
    let mut v: Vec<u64> = Vec::new();
    for i in 0..len {
        v.push(n.wrapping_add(i as u64));
    }
    if !check_run(&v, n) {
        error();
    }
    // format! into a growing String.
    let s = format!("sample {n} of {} frames at {:#x}", v.len(), n.wrapping_mul(0x9e37));
    let mut words = s.split(' ');
    if words.nth(1).and_then(|w| w.parse::<u64>().ok()) != Some(n) {
        error();
    }
    // A backtrace captured into a stack buffer, then copied into a Vec.
    let mut buf = [std::ptr::null_mut::<c_void>(); 48];
    // SAFETY: `buf` holds 48 pointers.
    let k = unsafe { backtrace(buf.as_mut_ptr(), buf.len() as c_int) }.max(0) as usize;
    let frames: Vec<usize> = buf[..k].iter().map(|&p| p as usize).collect();
    if k == 0 || frames.iter().zip(&buf[..k]).any(|(&a, &b)| a != b as usize) {
        error();
    }
    FRAMES.fetch_add(k as u64, Ordering::Relaxed);
    // Take over a Vec of normal context's allocator: check it, grow it (realloc across the boundary), hand it
    // back to normal code if the slot is free, else free it here (a deferred free of the inner allocator's memory,
    // or a nolock free).
    let p = TO_HANDLER.swap(std::ptr::null_mut(), Ordering::Acquire);
    if !p.is_null() {
        // SAFETY: a Box<Vec<u64>> leaked by `refill`, now ours.
        let mut b = unsafe { Box::from_raw(p) };
        let base = b.first().copied().unwrap_or(0);
        if !check_run(&b, base) {
            error();
        }
        let old = b.len();
        for i in old..old + 100 {
            b.push(base.wrapping_add(i as u64));
        }
        if !check_run(&b, base) {
            error();
        }
        let q = Box::into_raw(b);
        if FROM_HANDLER.compare_exchange(std::ptr::null_mut(), q, Ordering::Release, Ordering::Relaxed).is_err() {
            // SAFETY: still ours.
            drop(unsafe { Box::from_raw(q) });
        }
    }
    drop((v, s, frames));
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

static SEQ: AtomicU64 = AtomicU64::new(1);

extern "C" fn on_sigprof(_sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let _errno = testkit::ErrnoGuard::new();
    workload(SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(1000));
}

extern "C" fn on_nested(_sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let _errno = testkit::ErrnoGuard::new();
    let _mark = MARK.load(Ordering::Relaxed).then(nolock::hybrid::HandlerGuard::enter);
    NESTED.fetch_add(1, Ordering::Relaxed);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let b: Box<[u64]> = (0..(n % 40) + 1).map(|i| i * n).collect();
    if b.iter().enumerate().any(|(i, &x)| x != i as u64 * n) {
        error();
    }
}

/// The nesting signal: its handler may interrupt the SIGPROF handler.
pub fn nested_signal() -> c_int {
    libc::SIGRTMIN() + 4
}

/// Load libgcc and its unwinder now, in normal context.
pub fn prime_backtrace() {
    let mut buf = [std::ptr::null_mut::<c_void>(); 8];
    // SAFETY: `buf` holds 8 pointers.
    unsafe { backtrace(buf.as_mut_ptr(), 8) };
}

/// Install the handlers: marked (through `nolock::hybrid::sigaction`) or plain.
pub fn install(mark: bool) {
    MARK.store(mark, Ordering::Relaxed);
    prime_backtrace();
    if mark {
        // SAFETY: the handler does only what a marked handler may.
        unsafe { nolock::hybrid::sigaction(libc::SIGPROF, on_sigprof, libc::SA_RESTART) }.expect("sigaction");
    } else {
        testkit::install_handler(libc::SIGPROF, on_sigprof, 0);
    }
    testkit::install_handler(nested_signal(), on_nested, 0);
}

fn refill(seq: u64) {
    if TO_HANDLER.load(Ordering::Relaxed).is_null() {
        let base = seq.wrapping_mul(7);
        let v: Vec<u64> = (0..(seq % 64) + 1).map(|i| base.wrapping_add(i)).collect();
        let p = Box::into_raw(Box::new(v));
        if TO_HANDLER.compare_exchange(std::ptr::null_mut(), p, Ordering::Release, Ordering::Relaxed).is_err() {
            // SAFETY: not published.
            drop(unsafe { Box::from_raw(p) });
        }
    }
    let q = FROM_HANDLER.swap(std::ptr::null_mut(), Ordering::Acquire);
    if !q.is_null() {
        // SAFETY: a Box<Vec<u64>> a handler handed back.
        let mut b = unsafe { Box::from_raw(q) };
        let base = b.first().copied().unwrap_or(0);
        // Grown in normal context: from nolock to the inner allocator.
        b.extend((b.len() as u64..b.len() as u64 + 50).map(|i| base.wrapping_add(i)));
        if !check_run(&b, base) {
            error();
        }
    }
}

/// One storm thread: churn the allocator for `d` under SIGPROF every `period` (and the nesting signal every
/// 3 periods), checking every block before it is freed.
pub fn storm_thread(d: Duration, period: Duration, seed: u64) {
    // Warm the thread's allocator state up first (jemalloc picks the thread's arena under a global lock on its
    // first allocation: a handler interrupting that deadlocks at once, which is real but not the steady state
    // this storm is about).
    drop(std::hint::black_box((0..1000).map(|i| vec![i as u8; i % 300 + 1]).collect::<Vec<_>>()));
    let prof = testkit::ThreadTimer::for_current_thread(libc::SIGPROF, period);
    let nest = testkit::ThreadTimer::for_current_thread(nested_signal(), period * 3);
    let mut ring: Vec<Vec<u64>> = (0..64).map(|_| Vec::new()).collect();
    let mut rng = testkit::Rng::new(seed);
    let end = Instant::now() + d;
    let mut i = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            i += 1;
            let slot = (rng.next_u64() % 64) as usize;
            let old = std::mem::take(&mut ring[slot]);
            if let Some(&b) = old.first()
                && !check_run(&old, b)
            {
                error();
            }
            drop(old);
            let len = (rng.next_u64() % 2000) as usize + 1;
            let base = seed ^ i.wrapping_mul(0x1_0000_0001);
            ring[slot] = (0..len as u64).map(|k| base.wrapping_add(k)).collect();
            if i.is_multiple_of(16) {
                let s = format!("{i}:{base}");
                if s.split(':').next().and_then(|x| x.parse::<u64>().ok()) != Some(i) {
                    error();
                }
                refill(i);
            }
        }
    }
    // Stop the signals before the thread's last frees.
    drop((prof, nest));
    testkit::block_signal(libc::SIGPROF, true);
    testkit::block_signal(nested_signal(), true);
    for v in ring {
        if let Some(&b) = v.first()
            && !check_run(&v, b)
        {
            error();
        }
    }
}

/// Run the storm on `threads` threads for `d`.
pub fn storm(threads: usize, d: Duration, period: Duration) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || storm_thread(d, period, 0x5eed + t as u64));
        }
    });
}

/// How the children of [`run_children`] ended.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcomes {
    /// Exited 0: no error found.
    pub ok: u32,
    /// Killed after the timeout: deadlocked (or live-locked).
    pub hangs: u32,
    /// Died of a signal or exited with an unexpected status.
    pub crashes: u32,
    /// Exited 3: a content check failed.
    pub corrupt: u32,
}

/// Exit status a child uses for "a content check failed".
pub const EXIT_CORRUPT: i32 = 3;

/// The body of the child test: run the storm, then `_exit` (no atexit handlers, no harness output) with 0, or
/// [`EXIT_CORRUPT`] when a content check failed or nolock reported anything. Returns (without running anything) when not in a child.
pub fn child_main(mark: bool) {
    let Some(ms) = std::env::var("HYBRID_CHILD_MS").ok().and_then(|v| v.parse::<u64>().ok()) else { return };
    install(mark);
    let reports = nolock::debug::reports();
    storm(2, Duration::from_millis(ms), Duration::from_micros(50));
    // A report from nolock (a refused free, a damaged free list) counts as a failed check too.
    let clean = ERRORS.load(Ordering::Relaxed) == 0 && nolock::debug::reports() == reports;
    let code = if clean && HANDLED.load(Ordering::Relaxed) > 0 { 0 } else { EXIT_CORRUPT };
    // SAFETY: ends the process at once.
    unsafe { libc::_exit(code) };
}

/// Run `n` children of this test binary (test `child_test`), each a storm of `ms` milliseconds, killed after
/// `timeout`; two at a time.
pub fn run_children(child_test: &str, n: u32, ms: u64, timeout: Duration) -> Outcomes {
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().expect("current_exe");
    let mut out = Outcomes::default();
    let spawn = || {
        Command::new(&exe)
            .args(["--exact", child_test, "--nocapture", "--test-threads=1"])
            .env("HYBRID_CHILD_MS", ms.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child")
    };
    let mut left = n;
    while left > 0 {
        let batch = left.min(2);
        left -= batch;
        let mut kids: Vec<_> = (0..batch).map(|_| (spawn(), Instant::now())).collect();
        while !kids.is_empty() {
            kids.retain_mut(|(c, start)| match c.try_wait().expect("wait") {
                Some(st) => {
                    match (st.code(), st.signal()) {
                        (Some(0), _) => out.ok += 1,
                        (Some(EXIT_CORRUPT), _) => out.corrupt += 1,
                        _ => out.crashes += 1,
                    }
                    false
                }
                None if start.elapsed() > timeout => {
                    let _ = c.kill();
                    let _ = c.wait();
                    out.hangs += 1;
                    false
                }
                None => true,
            });
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    out
}
