//! The MPSC queues under a signal storm: on two threads, both the normal code and a signal handler that
//! interrupts it push `NBox` samples (built in the handler) into a `BoundedQueue` and an `UnboundedQueue`, while a
//! third thread drains both. Every accepted sample arrives exactly once with its contents intact; the bounded
//! queue hands back exactly the samples it refused; nothing is lost or duplicated. Plus the sequential
//! behaviour: FIFO, full, out-of-memory hands the item back, drop frees what is left.

use std::collections::HashSet;
use std::ffi::{c_int, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock::NBox;
use nolock::queue::{BoundedQueue, UnboundedQueue};

static SERIAL: Mutex<()> = Mutex::new(());

type Sample = NBox<[u64]>;

static BOUNDED: BoundedQueue<Sample, 256> = BoundedQueue::new();
static UNBOUNDED: UnboundedQueue<Sample> = UnboundedQueue::new();

static SEQ: AtomicU64 = AtomicU64::new(1);
static PUSHED_B: AtomicU64 = AtomicU64::new(0);
static REFUSED_B: AtomicU64 = AtomicU64::new(0);
static PUSHED_U: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);
static HANDLERS: AtomicU64 = AtomicU64::new(0);

/// A sample: word 0 the sequence number, word i `seq * 31 + i`.
fn make(seq: u64) -> Option<Sample> {
    NBox::try_from_fn(
        (seq % 13 + 1) as usize,
        |i| if i == 0 { seq } else { seq.wrapping_mul(31).wrapping_add(i as u64) },
    )
}

fn check(s: &[u64]) -> Option<u64> {
    let seq = *s.first()?;
    (s.len() as u64 == seq % 13 + 1
        && s.iter().enumerate().skip(1).all(|(i, &x)| x == seq.wrapping_mul(31).wrapping_add(i as u64)))
    .then_some(seq)
}

/// Push one sample into each queue (any context).
fn produce() {
    let seq = SEQ.fetch_add(2, Ordering::Relaxed);
    match make(seq) {
        Some(s) => match BOUNDED.push(s) {
            Ok(()) => {
                PUSHED_B.fetch_add(1, Ordering::Relaxed);
            }
            Err(back) => {
                // Refused: the very sample comes back.
                if check(&back) != Some(seq) {
                    ERRORS.fetch_add(1, Ordering::Relaxed);
                }
                REFUSED_B.fetch_add(1, Ordering::Relaxed);
            }
        },
        None => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
    if make(seq + 1).is_some_and(|s| UNBOUNDED.push(s).is_ok()) {
        PUSHED_U.fetch_add(1, Ordering::Relaxed);
    } else {
        ERRORS.fetch_add(1, Ordering::Relaxed);
    }
}

extern "C" fn on_signal(_sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let _errno = testkit::ErrnoGuard::new();
    HANDLERS.fetch_add(1, Ordering::Relaxed);
    produce();
}

#[test]
fn signal_storm_producers_one_consumer() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let sig = libc::SIGRTMIN() + 3;
    testkit::install_handler(sig, on_signal, 0);
    let stop = AtomicBool::new(false);
    let (mut got_b, mut got_u) = (HashSet::new(), HashSet::new());
    std::thread::scope(|s| {
        let producers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let _t = testkit::ThreadTimer::for_current_thread(sig, Duration::from_micros(30));
                    let end = Instant::now() + Duration::from_millis(1500);
                    while Instant::now() < end {
                        produce();
                    }
                    drop(_t);
                    testkit::block_signal(sig, true);
                })
            })
            .collect();
        let consumer = s.spawn(|| {
            let drain = |got_b: &mut HashSet<u64>, got_u: &mut HashSet<u64>| {
                let mut n = 0;
                while let Some(x) = BOUNDED.pop() {
                    match check(&x) {
                        Some(seq) if seq % 2 == 1 && got_b.insert(seq) => {}
                        _ => {
                            ERRORS.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                while let Some(x) = UNBOUNDED.pop() {
                    match check(&x) {
                        Some(seq) if seq % 2 == 0 && got_u.insert(seq) => {}
                        _ => {
                            ERRORS.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    n += 1;
                }
                n
            };
            let (mut b, mut u) = (HashSet::new(), HashSet::new());
            while !stop.load(Ordering::Acquire) {
                if drain(&mut b, &mut u) == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            drain(&mut b, &mut u);
            (b, u)
        });
        for p in producers {
            p.join().unwrap();
        }
        // Release: pairs with the consumer's Acquire load; every push happened before.
        stop.store(true, Ordering::Release);
        (got_b, got_u) = consumer.join().unwrap();
    });
    let (pb, rb, pu) =
        (PUSHED_B.load(Ordering::Relaxed), REFUSED_B.load(Ordering::Relaxed), PUSHED_U.load(Ordering::Relaxed));
    eprintln!(
        "{} handler runs; bounded: {pb} pushed, {rb} refused (full), {} received; unbounded: {pu} pushed, {} received",
        HANDLERS.load(Ordering::Relaxed),
        got_b.len(),
        got_u.len()
    );
    assert_eq!(ERRORS.load(Ordering::Relaxed), 0);
    assert!(HANDLERS.load(Ordering::Relaxed) > 100, "the storm ran");
    assert_eq!(got_b.len() as u64, pb, "every accepted sample arrives once");
    assert_eq!(got_u.len() as u64, pu);
    assert!(BOUNDED.is_empty() && UNBOUNDED.is_empty());
}

#[test]
fn sequential_behaviour() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let q: BoundedQueue<NBox<u32>, 4> = BoundedQueue::new();
    for i in 0..4 {
        q.push(NBox::try_new(i).unwrap()).unwrap();
    }
    assert_eq!(q.len(), 4);
    let back = q.push(NBox::try_new(99).unwrap()).unwrap_err();
    assert_eq!(*back, 99, "full: the item comes back");
    assert_eq!(*q.pop().unwrap(), 0);
    q.push(NBox::try_new(4).unwrap()).unwrap();
    let out: Vec<u32> = std::iter::from_fn(|| q.pop()).map(NBox::into_inner).collect();
    assert_eq!(out, [1, 2, 3, 4]);
    assert!(q.pop().is_none());

    let u: UnboundedQueue<String> = UnboundedQueue::new();
    for i in 0..1000 {
        u.push(i.to_string()).unwrap();
    }
    assert_eq!(u.pop().as_deref(), Some("0"));
    for i in 1000..1010 {
        u.push(i.to_string()).unwrap();
    }
    let rest: Vec<String> = std::iter::from_fn(|| u.pop()).collect();
    assert_eq!(rest.len(), 1009);
    assert!(rest.iter().map(|s| s.parse::<u32>().unwrap()).eq(1..1010), "FIFO across refills");

    // Dropping a queue drops (and frees) what is still in it.
    static DROPS: AtomicU64 = AtomicU64::new(0);
    struct D;
    impl Drop for D {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::Relaxed);
        }
    }
    let b: BoundedQueue<D, 8> = BoundedQueue::new();
    let u: UnboundedQueue<D> = UnboundedQueue::new();
    for _ in 0..5 {
        let _ = b.push(D);
        let _ = u.push(D);
    }
    drop((b, u));
    assert_eq!(DROPS.load(Ordering::Relaxed), 10);
}

#[test]
fn unbounded_push_hands_the_item_back_when_out_of_memory() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let u: UnboundedQueue<[u64; 3]> = UnboundedQueue::new();
    u.push([1, 2, 3]).unwrap();
    // Every kmalloc allocation fails for a moment: the push hands its item back and the queue is unchanged.
    nolock::debug::set_kmalloc_fault_injection(nolock::FaultInjection::EveryNth(1));
    let r = u.push([4, 5, 6]);
    nolock::debug::set_kmalloc_fault_injection(nolock::FaultInjection::Off);
    assert_eq!(r, Err([4, 5, 6]));
    assert_eq!(u.pop(), Some([1, 2, 3]));
    assert_eq!(u.pop(), None);
}
