//! A sampling profiler: a `SIGPROF` handler counts samples per "stack hash" in a BPF-style hash map while
//! other threads read the map.
//!
//! ```text
//! cargo run --release -p nolock-bpf --example profiler [seconds] [prealloc|bpf_ma|nolock] [maplocked|rqspin|lockfree]
//! ```
//!
//! The process-wide `ITIMER_PROF` timer sends `SIGPROF` to whichever thread is running. The handler hashes
//! the interrupted instruction pointer (x86-64; elsewhere only the phase) with the worker's current phase and
//! counts the sample the way a BPF profiler does: `lookup` and an atomic add on the value in place, or, for
//! a new stack, `update(NoExist)` with 1 (and on `Exists`, someone else inserted it first: look it up again).
//! Worker threads burn CPU in three "functions" (one of them updates keys of the same map); reader threads take snapshots with `for_each` and the main
//! thread prints the hottest stacks.
//!
//! The handler may interrupt a map operation of its own thread. With lock-free buckets (the default) and the
//! nolock backend no sample is lost; with the kernel's lock modes a nested update that meets the interrupted
//! one fails (`Busy` for v6.14's `map_locked`, `Deadlock` for v6.15's rqspinlock) and the sample is dropped,
//! as a kernel profiler drops it. At the end the samples in the map are checked against the handler's own
//! count.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock_bpf::htab::{Backend, Error, HtabAttr, LockMode, NolockReuse, TypedHashMap, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;

type Map = TypedHashMap<u64, u64>;

static MAP: AtomicPtr<Map> = AtomicPtr::new(core::ptr::null_mut());
static SAMPLES: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static DROPPED_BY: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

thread_local! {
    /// The "function" the worker is in (a stand-in for the frames a real profiler would unwind).
    static PHASE: core::cell::Cell<u64> = const { core::cell::Cell::new(0) };
}

fn stack_hash(ctx: *mut libc::c_void) -> u64 {
    let phase = PHASE.with(|p| p.get());
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let ip = {
        // SAFETY: the kernel passes the interrupted context to an SA_SIGINFO handler.
        let uc = unsafe { &*(ctx as *const libc::ucontext_t) };
        uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64
    };
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let ip = {
        let _ = ctx;
        0u64
    };
    // Bucket the instruction pointer by 256 bytes so the table stays small, and mix in the phase. (Keys below
    // 512 are the workers' own; a stack hash is never one of them.)
    let x = (ip >> 8) ^ (phase << 56);
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) | (1 << 47)
}

extern "C" fn on_sigprof(_: libc::c_int, _: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let saved = errno();
    let m = MAP.load(Ordering::Acquire);
    if m.is_null() {
        return;
    }
    // SAFETY: main keeps the map alive until the timer is stopped and every handler has returned.
    let m = unsafe { &*m };
    let key = stack_hash(ctx);
    SAMPLES.fetch_add(1, Ordering::Relaxed);
    loop {
        if let Some(v) = m.lookup_ref(&key) {
            v.atomic_u64(0).fetch_add(1, Ordering::Relaxed);
            break;
        }
        match m.update(&key, &1, UpdateFlags::NoExist) {
            Ok(()) => break,
            Err(Error::Exists) => continue,
            Err(e) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                let i = Error::ALL.iter().position(|&x| x == e).unwrap_or(0);
                DROPPED_BY[i].fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    set_errno(saved);
}

fn errno() -> i32 {
    // SAFETY: errno is thread-local.
    unsafe { *libc::__errno_location() }
}

fn set_errno(v: i32) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = v };
}

#[inline(never)]
fn parse_phase(n: u64) -> u64 {
    PHASE.with(|p| p.set(1));
    (0..n).fold(1u64, |a, i| a.wrapping_mul(31).wrapping_add(i) ^ (a >> 7))
}

#[inline(never)]
fn hash_phase(n: u64) -> u64 {
    PHASE.with(|p| p.set(2));
    (0..n).fold(7u64, |a, i| (a ^ i).rotate_left(13).wrapping_mul(0xff51_afd7_ed55_8ccd))
}

#[inline(never)]
fn map_phase(m: &Map, n: u64) -> u64 {
    PHASE.with(|p| p.set(3));
    // The workers use the map too, so the handler often interrupts a map operation.
    let mut s = 0;
    for i in 0..n {
        let _ = m.update(&(i % 512), &i, UpdateFlags::Any);
        if let Some(v) = m.lookup(&(i % 512)) {
            s += v;
        }
    }
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let backend = match args.get(2).map(String::as_str) {
        Some("prealloc") => Backend::Prealloc,
        Some("bpf_ma") => Backend::BpfMemAlloc(RefillMode::AtRegionEnd),
        _ => Backend::Nolock(NolockReuse::TypesafeImmediate),
    };
    let lock = match args.get(3).map(String::as_str) {
        Some("maplocked") => LockMode::MapLocked,
        Some("rqspin") => LockMode::Rqspin,
        _ => LockMode::LockFree,
    };
    nolock::init();
    let map: Arc<Map> = Arc::new(TypedHashMap::new(HtabAttr::new(0, 0, 16384).backend(backend).lock(lock)).unwrap());
    MAP.store(Arc::as_ptr(&map) as *mut Map, Ordering::Release);

    // SAFETY: installing a handler with sigaction; the handler is async-signal-safe (map operations, atomics).
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_sigprof as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGPROF, &sa, core::ptr::null_mut()), 0);
        // 1 ms of CPU time per sample, over all threads.
        let it = libc::itimerval {
            it_interval: libc::timeval { tv_sec: 0, tv_usec: 1000 },
            it_value: libc::timeval { tv_sec: 0, tv_usec: 1000 },
        };
        assert_eq!(libc::setitimer(libc::ITIMER_PROF, &it, core::ptr::null_mut()), 0);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for _ in 0..2 {
        let (m, stop) = (map.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut sink = 0u64;
            while !stop.load(Ordering::Relaxed) {
                sink ^= parse_phase(20_000);
                sink ^= hash_phase(30_000);
                sink ^= map_phase(&m, 2_000);
            }
            std::hint::black_box(sink);
        }));
    }
    let reader = {
        let (m, stop) = (map.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut snapshots = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut total = 0u64;
                m.for_each(|_, v| total += v);
                snapshots += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            snapshots
        })
    };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        std::thread::sleep(Duration::from_millis(500));
        let mut top: Vec<(u64, u64)> = Vec::new();
        map.for_each(|k, v| {
            if k >= 512 {
                top.push((v, k))
            }
        });
        top.sort_unstable_by(|a, b| b.cmp(a));
        let line: Vec<String> = top.iter().take(3).map(|(v, k)| format!("{k:012x}:{v}")).collect();
        println!("{:4.1}s  {} stacks, hottest {}", t0.elapsed().as_secs_f64(), top.len(), line.join("  "));
    }

    // Stop the timer, then the threads; block SIGPROF here so no handler runs after the map is gone.
    // SAFETY: setitimer with a zero value disarms the timer.
    unsafe {
        let zero: libc::itimerval = core::mem::zeroed();
        libc::setitimer(libc::ITIMER_PROF, &zero, core::ptr::null_mut());
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let snapshots = reader.join().unwrap();
    // A last SIGPROF may still be running on another thread (nolock's own threads can receive it too).
    std::thread::sleep(Duration::from_millis(20));
    MAP.store(core::ptr::null_mut(), Ordering::Release);

    let mut counted = 0u64;
    map.for_each(|k, v| {
        if k >= 512 {
            counted += v
        }
    });
    let samples = SAMPLES.load(Ordering::Relaxed);
    let dropped = DROPPED.load(Ordering::Relaxed);
    let by: Vec<String> = Error::ALL
        .iter()
        .zip(DROPPED_BY.iter())
        .filter(|(_, n)| n.load(Ordering::Relaxed) != 0)
        .map(|(e, n)| format!("{e:?} {}", n.load(Ordering::Relaxed)))
        .collect();
    println!(
        "{} / {lock:?}: {samples} samples, {counted} counted in the map, {dropped} dropped [{}], {snapshots} reader snapshots",
        backend.name(),
        by.join(", ")
    );
    assert_eq!(counted + dropped, samples, "every sample is counted once or reported dropped");
}
