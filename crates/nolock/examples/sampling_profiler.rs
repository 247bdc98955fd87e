//! A SIGPROF sampling profiler: the handler captures the interrupted stack into nolock memory and queues it; a
//! thread drains the queue, resolves the leaf frames to function names and prints a flat profile.
//!
//! ```text
//! cargo run --release -p nolock-mm --example sampling_profiler
//! ```
//!
//! What runs in the handler: glibc's `backtrace()` into a stack array, `NBox::try_from_slice` (kmalloc_nolock)
//! to copy the frames into nolock memory, and `BoundedQueue::push` (one CAS and one store; a full queue hands
//! the sample back and it is counted as dropped). Nothing there calls `malloc`, takes a lock or waits.
//!
//! How the stack is walked, and why: Rust release builds omit frame pointers, so walking them would need every
//! crate (std included) rebuilt with `-C force-frame-pointers=yes`. `backtrace()` uses libgcc's table-driven
//! unwinder instead, which works on any build. It is not formally async-signal-safe: its *first* call loads
//! libgcc with `dlopen` (which allocates), so `main` calls it once before the timer starts; after that it only
//! reads unwind tables, finding them with `dl_iterate_phdr`, which takes the dynamic loader's lock — a signal
//! that lands while its own thread is inside `dlopen`/`dlclose` would wait for that lock forever. Profilers
//! (pprof-rs, the Go runtime's cgo traceback) accept that risk; if you cannot, build with frame pointers and
//! follow the `rbp` chain from the `ucontext` instead. The `backtrace` crate's `trace_unsynchronized` uses
//! the same unwinder, with the same properties. Symbol resolution (which allocates a lot and reads files)
//! happens on the draining thread, in normal context.

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock::NBox;
use nolock::queue::BoundedQueue;

unsafe extern "C" {
    /// glibc's `backtrace(3)`.
    fn backtrace(buffer: *mut *mut c_void, size: c_int) -> c_int;
}

/// One sample: the return addresses of the interrupted stack, innermost first.
type Sample = NBox<[usize]>;

static SAMPLES: BoundedQueue<Sample, 4096> = BoundedQueue::new();
static TAKEN: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Frames of the handler itself and of the kernel's signal trampoline (`__restore_rt`), above the interrupted
/// function.
const SKIP: usize = 2;

extern "C" fn on_sigprof(_sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let saved_errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut buf = [std::ptr::null_mut::<c_void>(); 64];
    // SAFETY: `buf` holds 64 pointers.
    let n = unsafe { backtrace(buf.as_mut_ptr(), buf.len() as c_int) }.max(0) as usize;
    if n > SKIP {
        // SAFETY: *mut c_void and usize have the same size and alignment; the first `n` entries are written.
        let frames: &[usize] = unsafe { std::slice::from_raw_parts(buf.as_ptr().add(SKIP).cast(), n - SKIP) };
        match NBox::try_from_slice(frames).map(|s| SAMPLES.push(s)) {
            Some(Ok(())) => TAKEN.fetch_add(1, Ordering::Relaxed),
            _ => DROPPED.fetch_add(1, Ordering::Relaxed), // out of memory, or the queue is full
        };
    }
    // SAFETY: restores the interrupted code's errno (a thread-local int).
    unsafe { *libc::__errno_location() = saved_errno };
}

// ---- the profiled program: three functions of different cost ----

#[inline(never)]
fn mix(mut x: u64, rounds: u32) -> u64 {
    for _ in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

#[inline(never)]
fn hash_heavy(x: u64) -> u64 {
    std::hint::black_box(mix(x, 6000)) ^ 1
}

#[inline(never)]
fn hash_medium(x: u64) -> u64 {
    std::hint::black_box(mix(x, 3000)) ^ 1
}

#[inline(never)]
fn sort_light(v: &mut [u32]) -> u32 {
    v.sort_unstable_by_key(|&x| x.rotate_left(7));
    v[0]
}

fn workload(d: Duration) -> u64 {
    let end = Instant::now() + d;
    let mut acc = 1u64;
    let mut v: Vec<u32> = (0..2000).collect();
    while Instant::now() < end {
        acc = hash_heavy(acc);
        acc = hash_medium(acc);
        acc = acc.wrapping_add(sort_light(&mut v) as u64);
    }
    acc
}

/// The function containing `addr`, demangled, without its hash.
fn function_name(addr: usize, cache: &mut HashMap<usize, String>) -> String {
    cache
        .entry(addr)
        .or_insert_with(|| {
            let mut name = None;
            // A return address points after the call: look up the byte before it. Inlined frames come first;
            // the last name is the function the code was compiled into.
            backtrace::resolve((addr - 1) as *mut c_void, |s| {
                if let Some(n) = s.name() {
                    name = Some(format!("{n:#}"));
                }
            });
            name.unwrap_or_else(|| format!("{addr:#x}"))
        })
        .clone()
}

fn main() {
    // 1. Prime the unwinder (loads libgcc) and nolock (maps its arena) in normal context.
    let mut buf = [std::ptr::null_mut::<c_void>(); 4];
    // SAFETY: `buf` holds 4 pointers.
    unsafe { backtrace(buf.as_mut_ptr(), 4) };
    nolock::init();

    // 2. The handler, and a profiling timer at 1 kHz of CPU time.
    // SAFETY: an all-zero sigaction is valid; filled in below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigprof as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
    // SAFETY: `sa` is initialised; the handler lives for the whole program.
    assert_eq!(unsafe { libc::sigaction(libc::SIGPROF, &sa, std::ptr::null_mut()) }, 0);
    let tick = libc::timeval { tv_sec: 0, tv_usec: 1000 };
    let it = libc::itimerval { it_interval: tick, it_value: tick };
    // SAFETY: a valid itimerval.
    assert_eq!(unsafe { libc::setitimer(libc::ITIMER_PROF, &it, std::ptr::null_mut()) }, 0);

    // 3. The aggregating thread drains the queue while the program runs (it must not be profiled: it blocks
    //    SIGPROF), counting samples by leaf function (self) and by every function on the stack (total).
    let done = AtomicBool::new(false);
    let (self_counts, total_counts, samples) = std::thread::scope(|s| {
        let agg = s.spawn(|| {
            // SAFETY: an all-zero sigset_t is a valid value for sigemptyset to initialise.
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: valid sigset operations on a local set; only this thread's mask changes.
            unsafe {
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGPROF);
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            }
            let mut names = HashMap::new();
            let (mut self_c, mut total_c) = (HashMap::<String, u64>::new(), HashMap::<String, u64>::new());
            let mut n = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                while let Some(sample) = SAMPLES.pop() {
                    n += 1;
                    let funcs: Vec<String> = sample.iter().map(|&a| function_name(a, &mut names)).collect();
                    *self_c.entry(funcs[0].clone()).or_default() += 1;
                    let mut seen: Vec<&String> = funcs.iter().collect();
                    seen.sort();
                    seen.dedup();
                    for f in seen {
                        *total_c.entry(f.clone()).or_default() += 1;
                    }
                }
                if finished {
                    break (self_c, total_c, n);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let r = workload(Duration::from_secs(2));
        std::hint::black_box(r);
        // Stop the timer, then let the aggregator finish.
        let off = libc::itimerval {
            it_interval: libc::timeval { tv_sec: 0, tv_usec: 0 },
            it_value: libc::timeval { tv_sec: 0, tv_usec: 0 },
        };
        // SAFETY: a valid itimerval.
        unsafe { libc::setitimer(libc::ITIMER_PROF, &off, std::ptr::null_mut()) };
        done.store(true, Ordering::Release);
        agg.join().unwrap()
    });

    // 4. The flat profile.
    let mut rows: Vec<(&String, &u64)> = self_counts.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    println!(
        "{samples} samples ({} taken, {} dropped: queue full or out of memory)\n",
        TAKEN.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed)
    );
    println!("{:>7} {:>7} {:>7}  function", "self", "self%", "total%");
    for &(name, &c) in rows.iter().take(12) {
        let total = total_counts.get(name).copied().unwrap_or(c);
        println!(
            "{c:>7} {:>6.1}% {:>6.1}%  {name}",
            100.0 * c as f64 / samples.max(1) as f64,
            100.0 * total as f64 / samples.max(1) as f64
        );
    }
    println!();
    for f in ["hash_heavy", "hash_medium", "sort_light"] {
        let t: u64 = total_counts.iter().filter(|(k, _)| k.ends_with(f)).map(|(_, &v)| v).sum();
        println!("on the stack in {f}: {:.1}% of samples", 100.0 * t as f64 / samples.max(1) as f64);
    }
}
