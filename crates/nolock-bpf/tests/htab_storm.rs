//! Signal storms with a shadow count: every update applied exactly once.
//!
//! Each increment moves a key's whole count out of the map and back in: `lookup_and_delete` takes the value
//! (if any), then `update(NoExist)` puts back the value plus one; if another context inserted the key in
//! between, its value is taken too and merged. So every unit is held by exactly one element or one context at
//! a time, and at the end the values in the map sum to the number of increments — unless an operation failed
//! while a context held units (`Busy`, `Deadlock`, `TimedOut`, `Full`, `NoMem`), which the test counts as lost.
//! Threads increment random keys in a loop while per-thread timers deliver a storm whose handlers increment
//! the same key, a random key, or a key of another map.
//!
//! `LockFree` must return no `Busy`/`Deadlock` and, with the Prealloc and nolock backends, lose nothing
//! (bpf_mem_alloc keeps its nested-allocation `NoMem`, the baseline's known failure); the nolock backend must
//! return no `NoMem` in any mode. The locked modes report their error counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use nolock_bpf::htab::{Backend, Error, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;
use testkit::reports::NoReports;
use testkit::storm::{self, Storm, StormSlot};

const KEYS: u64 = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    SameKey,
    RandomKey,
    OtherMap,
}

struct Worker {
    slot: Arc<StormSlot>,
    main: Arc<HashMap>,
    other: Arc<HashMap>,
    target: Target,
    rng: AtomicU64,
    /// Increments done (started) by the handler / the thread, on `main` and `other`.
    incs_main: AtomicU64,
    incs_other: AtomicU64,
    lost_main: AtomicU64,
    lost_other: AtomicU64,
    /// Errors by kind seen by this worker (Error::ALL order).
    errors: [AtomicU64; 8],
}

impl Worker {
    fn next(&self) -> u64 {
        // A per-worker splitmix step; the handler and the thread may race on it, which only changes the keys.
        let x = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        testkit::rand::splitmix64(x)
    }

    fn note(&self, e: Error) {
        let i = Error::ALL.iter().position(|&x| x == e).unwrap();
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// One increment of `key` in `m`; returns the units lost (0 on success).
    fn inc(&self, m: &HashMap, key: u64) -> u64 {
        let k = key.to_ne_bytes();
        let mut carry = 1u64;
        let mut out = [0u8; 8];
        loop {
            match m.lookup_and_delete(&k, &mut out) {
                Ok(()) => carry += u64::from_ne_bytes(out),
                Err(Error::NotFound) => {}
                Err(e) => {
                    self.note(e);
                    return carry;
                }
            }
            match m.update(&k, &carry.to_ne_bytes(), UpdateFlags::NoExist) {
                Ok(()) => return 0,
                Err(Error::Exists) => continue,
                Err(e) => {
                    self.note(e);
                    return carry;
                }
            }
        }
    }

    fn inc_main(&self, key: u64) {
        self.incs_main.fetch_add(1, Ordering::Relaxed);
        let l = self.inc(&self.main, key);
        self.lost_main.fetch_add(l, Ordering::Relaxed);
    }

    fn inc_other(&self, key: u64) {
        self.incs_other.fetch_add(1, Ordering::Relaxed);
        let l = self.inc(&self.other, key);
        self.lost_other.fetch_add(l, Ordering::Relaxed);
    }
}

extern "C" fn on_storm(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the storm timers carry a `Worker` that outlives them.
    unsafe {
        storm::dispatch_timer_signal::<Worker>(info, |w, overrun| {
            w.slot.count(overrun);
            match w.target {
                Target::SameKey => w.inc_main(0),
                Target::RandomKey => w.inc_main(w.next() % KEYS),
                Target::OtherMap => w.inc_other(w.next() % KEYS),
            }
        })
    };
}

fn sum(m: &HashMap) -> u64 {
    let mut s = 0;
    m.for_each(|_, v| s += u64::from_ne_bytes(v.try_into().unwrap()));
    s
}

struct Outcome {
    incs: u64,
    signals: u64,
    lost: u64,
    errors: [u64; 8],
}

fn storm_run(backend: Backend, lock: LockMode, target: Target, dur: Duration, rate: u64) -> Outcome {
    let attr = HtabAttr::new(8, 8, 64).backend(backend).lock(lock);
    let main = Arc::new(HashMap::new(attr.clone()).unwrap());
    let other = Arc::new(HashMap::new(attr).unwrap());
    // MapLocked spins on a raw lock: two threads whose handlers each want the bucket the other thread's
    // interrupted code holds deadlock (AB-BA through handlers, as v6.14 could through NMIs; the reason v6.15
    // moved to rqspinlock). So MapLocked storms run on one thread.
    let threads = if lock == LockMode::MapLocked { 1 } else { 2 };
    let nominal = storm::nominal_interval_ns(rate, threads).unwrap();
    let workers: Vec<Arc<Worker>> = (0..threads)
        .map(|i| {
            Arc::new(Worker {
                slot: Arc::new(StormSlot::new()),
                main: main.clone(),
                other: other.clone(),
                target,
                rng: AtomicU64::new(i as u64 * 7919 + 1),
                incs_main: AtomicU64::new(0),
                incs_other: AtomicU64::new(0),
                lost_main: AtomicU64::new(0),
                lost_other: AtomicU64::new(0),
                errors: Default::default(),
            })
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = workers
        .iter()
        .map(|w| {
            let (w, stop) = (w.clone(), stop.clone());
            std::thread::spawn(move || {
                let timers = w.slot.start(Arc::as_ptr(&w) as *mut libc::c_void, nominal).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let key = w.next() % KEYS;
                        w.inc_main(key);
                    }
                }
                drop(timers);
            })
        })
        .collect();
    let slots: Vec<Arc<StormSlot>> = workers.iter().map(|w| w.slot.clone()).collect();
    Storm::new(rate, threads, nominal).hold(&slots, dur, Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    let l = |f: fn(&Worker) -> &AtomicU64| workers.iter().map(|w| f(w).load(Ordering::Relaxed)).sum::<u64>();
    let incs_main = l(|w| &w.incs_main);
    let incs_other = l(|w| &w.incs_other);
    let lost_main = l(|w| &w.lost_main);
    let lost_other = l(|w| &w.lost_other);
    let ctx = format!("{backend:?}/{lock:?}/{target:?}");
    assert_eq!(sum(&main) + lost_main, incs_main, "{ctx}: main map: a unit was lost or applied twice");
    assert_eq!(sum(&other) + lost_other, incs_other, "{ctx}: other map: a unit was lost or applied twice");
    for m in [&main, &other] {
        for key in 0..KEYS {
            assert!(m.debug_key_copies(&key.to_ne_bytes()) <= 1, "{ctx}: key {key} has two live elements");
        }
    }
    let mut errors = [0u64; 8];
    let signals = workers.iter().map(|w| w.slot.signals()).sum();
    for w in &workers {
        for (i, e) in w.errors.iter().enumerate() {
            errors[i] += e.load(Ordering::Relaxed);
        }
    }
    drop(workers);
    drop(main);
    drop(other);
    Outcome { incs: incs_main + incs_other, signals, lost: lost_main + lost_other, errors }
}

fn err(o: &Outcome, e: Error) -> u64 {
    o.errors[Error::ALL.iter().position(|&x| x == e).unwrap()]
}

fn secs() -> Duration {
    let s = std::env::var("NOLOCK_HTAB_STORM_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.4);
    Duration::from_secs_f64(s)
}

static DOMAIN: nolock::SrcuFast = nolock::SrcuFast::new();

#[test]
fn storms_exactly_once() {
    let nr = NoReports::new();
    let _sa = storm::install_handler(on_storm).unwrap();
    let backends = [
        Backend::Prealloc,
        Backend::BpfMemAlloc(RefillMode::AtRegionEnd),
        Backend::Nolock(NolockReuse::TypesafeImmediate),
        Backend::Nolock(NolockReuse::AfterRcu),
        Backend::Nolock(NolockReuse::AfterSrcu(&DOMAIN)),
    ];
    for b in backends {
        for lock in [LockMode::MapLocked, LockMode::Rqspin, LockMode::LockFree] {
            let targets: &[Target] = if lock == LockMode::LockFree {
                &[Target::SameKey, Target::RandomKey, Target::OtherMap]
            } else {
                &[Target::RandomKey]
            };
            for &t in targets {
                let o = storm_run(b, lock, t, secs(), 40_000);
                eprintln!(
                    "{:>9} {:>9?} {:>9?}: {} increments, {} signals, lost {}, errors {:?}",
                    b.name(),
                    lock,
                    t,
                    o.incs,
                    o.signals,
                    o.lost,
                    Error::ALL.iter().zip(o.errors).filter(|(_, n)| *n != 0).collect::<Vec<_>>()
                );
                assert!(o.signals > 0, "no signal was delivered");
                if lock == LockMode::LockFree {
                    assert_eq!(err(&o, Error::Busy) + err(&o, Error::Deadlock), 0, "{b:?}: lock-free re-entry error");
                    assert_eq!(err(&o, Error::TimedOut), 0);
                    if !matches!(b, Backend::BpfMemAlloc(_)) {
                        assert_eq!(o.lost, 0, "{b:?}: lock-free storm lost units");
                    }
                }
                if matches!(b, Backend::Nolock(_)) {
                    assert_eq!(err(&o, Error::NoMem), 0, "{b:?}/{lock:?}: nolock backend returned NoMem");
                }
            }
        }
    }
    nr.check("storms");
}
