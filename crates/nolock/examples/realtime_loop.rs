//! A real-time loop: lock memory, prefault, turn the purge off, then run a periodic loop that allocates,
//! queues, reads shared configuration and frees — and show that nothing it calls blocked: the loop thread's
//! voluntary context switches (a thread that waits on a lock, a futex, I/O or a page being read in gives up
//! the CPU voluntarily) and its page faults, before and after, from `getrusage(RUSAGE_THREAD)`.
//!
//! ```text
//! cargo run --release -p nolock-mm --example realtime_loop
//! ```
//!
//! The loop keeps its period by spinning on `Instant::now()` (the vDSO clock: no system call) rather than
//! sleeping, so that any voluntary switch counted during it comes from what it called. A real loop would sleep
//! with `clock_nanosleep(TIMER_ABSTIME)` between periods; the point here is that the *work* never blocks.
//! Another thread drains what the loop queues (normal context: it may block, and does).
//!
//! `mlockall` needs `CAP_IPC_LOCK` or a large enough `ulimit -l`; `SCHED_FIFO` needs `CAP_SYS_NICE`. Without
//! them the example carries on and says so.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nolock::queue::BoundedQueue;
use nolock::rcu_ptr::RcuPtr;
use nolock::typed::TypedCache;
use nolock::{Config, NBox};

/// What the loop reads every period: published by the control thread, read lock-free.
#[derive(Debug)]
struct Settings {
    gain: f64,
    generation: u64,
}

static SETTINGS: RcuPtr<Settings> = RcuPtr::null();
static OUT: BoundedQueue<NBox<[f32]>, 1024> = BoundedQueue::new();

#[derive(Default)]
struct Usage {
    voluntary: i64,
    involuntary: i64,
    minor_faults: i64,
    major_faults: i64,
}

fn usage() -> Usage {
    // SAFETY: an all-zero rusage is valid for getrusage to fill in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD reports the calling thread into `ru`.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    Usage { voluntary: ru.ru_nvcsw, involuntary: ru.ru_nivcsw, minor_faults: ru.ru_minflt, major_faults: ru.ru_majflt }
}

fn main() {
    // 1. Settings before nolock's first use: no purge (freed pages stay resident, so reusing them never
    //    faults), no background worker needed for this demonstration.
    Config::new().purge_interval(None).apply().expect("configure nolock before its first use");
    // 2. Lock memory, present and future.
    // SAFETY: only changes how this process's memory is paged.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        println!("mlockall: {} (carrying on without locked memory)", std::io::Error::last_os_error());
    }
    // 3. Start nolock, and fault in the memory the loop will use.
    nolock::init();
    nolock::prefault(16 << 20).expect("prefault");
    let samples = TypedCache::<[f64; 32]>::new("rt-samples").expect("cache");
    SETTINGS.publish(Settings { gain: 1.0, generation: 0 }).expect("memory");

    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The draining thread (normal context).
        let drain = s.spawn(|| {
            let mut n = 0u64;
            let mut sum = 0f64;
            while !stop.load(Ordering::Acquire) || !OUT.is_empty() {
                while let Some(block) = OUT.pop() {
                    n += 1;
                    sum += block.iter().map(|&x| x as f64).sum::<f64>();
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (n, sum)
        });
        // The control thread publishes new settings now and then (the old ones are retired after a grace
        // period, never freed under a reader).
        let control = s.spawn(|| {
            let mut g = 1;
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
                let _ = SETTINGS.publish(Settings { gain: 1.0 + g as f64 * 0.01, generation: g });
                g += 1;
            }
        });

        // The real-time thread.
        let rt = s.spawn(|| {
            let param = libc::sched_param { sched_priority: 10 };
            // SAFETY: changes this thread's scheduling policy only.
            let fifo = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) } == 0;
            // Warm-up period: the first touches of this thread's nolock state (its slot, its caches).
            let period = Duration::from_micros(200);
            let run = |iterations: u32| {
                let mut next = Instant::now();
                let mut last_gen = 0;
                let mut dropped = 0u32;
                for i in 0..iterations {
                    // Read the settings (lock-free, wait-free).
                    let (gain, generation) = {
                        let g = nolock::rcu_read_lock();
                        SETTINGS.load(&g).map_or((1.0, 0), |s| (s.gain, s.generation))
                    };
                    last_gen = last_gen.max(generation);
                    // Work on a scratch object of a typed cache, then queue a result block.
                    let mut scratch = samples.alloc([0.0; 32]).expect("prefaulted memory");
                    for (k, x) in scratch.iter_mut().enumerate() {
                        *x = (i as f64 + k as f64) * gain;
                    }
                    match NBox::try_from_fn(64, |k| scratch[k % 32] as f32) {
                        Some(block) => {
                            if OUT.push(block).is_err() {
                                dropped += 1; // full: the block comes back and is dropped here
                            }
                        }
                        None => dropped += 1,
                    }
                    drop(scratch);
                    // Keep the period by spinning on the vDSO clock.
                    next += period;
                    while Instant::now() < next {
                        std::hint::spin_loop();
                    }
                }
                (last_gen, dropped)
            };
            run(500);
            let before = usage();
            let start = Instant::now();
            let (last_gen, dropped) = run(10_000);
            let elapsed = start.elapsed();
            let after = usage();
            (fifo, before, after, elapsed, last_gen, dropped)
        });
        let (fifo, before, after, elapsed, last_gen, dropped) = rt.join().unwrap();
        stop.store(true, Ordering::Release);
        control.join().unwrap();
        let (blocks, _) = drain.join().unwrap();
        println!(
            "real-time thread ({}): 10000 periods of 200 us in {elapsed:?}; saw settings up to generation {last_gen}; \
             {blocks} blocks drained by the other thread, {dropped} dropped",
            if fifo { "SCHED_FIFO" } else { "normal priority: no CAP_SYS_NICE" }
        );
        println!(
            "during the loop: {} voluntary context switches (blocking), {} involuntary (preempted), {} minor and {} \
             major page faults",
            after.voluntary - before.voluntary,
            after.involuntary - before.involuntary,
            after.minor_faults - before.minor_faults,
            after.major_faults - before.major_faults
        );
        if after.voluntary == before.voluntary {
            println!("nothing the loop called blocked.");
        } else {
            println!("the loop blocked: something it called waited (see above)");
        }
    });
}
