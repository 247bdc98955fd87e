//! `TypedCache<T>` and its owner `CacheBox`: values go in and come out intact, drops run once and give the
//! object back to the cache (counted in its statistics), out-of-memory hands the value back, zero-sized and
//! over-aligned types, `from_cache` checks, and owners allocated in signal handlers on several threads and
//! dropped on others.

use std::ffi::{c_int, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nolock::typed::{CacheBox, TypedCache};
use nolock::{CacheError, FaultInjection, KmemCache};

static SERIAL: Mutex<()> = Mutex::new(());

#[derive(Debug, PartialEq)]
struct Packet {
    seq: u64,
    data: [u64; 7],
}

impl Packet {
    fn new(seq: u64) -> Self {
        Self { seq, data: std::array::from_fn(|i| seq.wrapping_mul(31) + i as u64) }
    }
    fn ok(&self) -> bool {
        self.data.iter().enumerate().all(|(i, &x)| x == self.seq.wrapping_mul(31) + i as u64)
    }
}

#[test]
fn owners_drop_into_the_cache() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    struct D(u32);
    impl Drop for D {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::Relaxed);
        }
    }
    let cache = TypedCache::<D>::new("typed-d").unwrap();
    let boxes: Vec<CacheBox<'_, D>> = (0..100).map(|i| cache.alloc(D(i)).ok().unwrap()).collect();
    assert!(boxes.iter().enumerate().all(|(i, b)| b.0 == i as u32));
    assert_eq!(cache.stats().allocs, 100);
    drop(boxes);
    assert_eq!(DROPS.load(Ordering::Relaxed), 100);
    assert_eq!(cache.stats().frees, 100);
    // into_inner: the value out, the object freed, no second drop.
    let b = cache.alloc(D(7)).ok().unwrap();
    let d = CacheBox::into_inner(b);
    assert_eq!(d.0, 7);
    assert_eq!(DROPS.load(Ordering::Relaxed), 100);
    drop(d);
    assert_eq!(DROPS.load(Ordering::Relaxed), 101);
    assert_eq!(cache.stats().frees, 101);
    // into_raw / from_raw round trip.
    let raw = CacheBox::into_raw(cache.alloc(D(9)).ok().unwrap());
    // SAFETY: from into_raw of this cache, owned by nothing else.
    let back = unsafe { CacheBox::from_raw(&cache, raw) };
    assert_eq!(back.0, 9);
    drop(back);
    assert_eq!(cache.stats().frees, 102);
    // alloc_with builds in place.
    let p = cache.alloc_with(|| D(11)).unwrap();
    assert_eq!(p.0, 11);
}

#[test]
fn out_of_memory_hands_the_value_back() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cache = TypedCache::<Packet>::new("typed-oom").unwrap();
    cache.as_kmem_cache().set_fault_injection(FaultInjection::EveryNth(1));
    let back = cache.alloc(Packet::new(5)).unwrap_err();
    assert_eq!(back, Packet::new(5));
    let mut called = false;
    assert!(
        cache
            .alloc_with(|| {
                called = true;
                Packet::new(6)
            })
            .is_none()
    );
    assert!(!called, "alloc_with does not build a value it cannot place");
    cache.as_kmem_cache().set_fault_injection(FaultInjection::Off);
    assert!(cache.alloc(Packet::new(5)).is_ok());
}

#[test]
fn zero_sized_over_aligned_and_from_cache() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let units = TypedCache::<()>::new("typed-unit").unwrap();
    let u = units.alloc(()).unwrap();
    assert_eq!(*u, ());
    #[repr(align(256))]
    struct Big([u8; 300]);
    let big = TypedCache::<Big>::new("typed-256").unwrap();
    let bs: Vec<_> = (0..20).map(|i| big.alloc(Big([i; 300])).ok().unwrap()).collect();
    for (i, b) in bs.iter().enumerate() {
        assert_eq!(&**b as *const Big as usize % 256, 0);
        assert!(b.0.iter().all(|&x| x == i as u8));
    }
    // from_cache: a cache too small for T is refused; a fitting one is accepted.
    let small = KmemCache::new("typed-small", std::alloc::Layout::new::<u32>()).unwrap();
    assert_eq!(TypedCache::<Packet>::from_cache(small).err(), Some(CacheError::BadSize));
    let fits = KmemCache::builder("typed-fits", std::alloc::Layout::new::<Packet>()).debug(true).build().unwrap();
    let t = TypedCache::<Packet>::from_cache(fits).unwrap();
    let p = t.alloc(Packet::new(1)).unwrap();
    assert!(p.ok());
}

static CACHE: std::sync::OnceLock<TypedCache<Packet>> = std::sync::OnceLock::new();
static FROM_HANDLER: nolock::queue::BoundedQueue<CacheBox<'static, Packet>, 1024> = nolock::queue::BoundedQueue::new();
static SEQ: AtomicU64 = AtomicU64::new(1);
static ERRORS: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(_sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let _errno = testkit::ErrnoGuard::new();
    let Some(cache) = CACHE.get() else { return };
    HANDLED.fetch_add(1, Ordering::Relaxed);
    // A short-lived owner dropped in the handler, and one queued for the draining thread.
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    match cache.alloc(Packet::new(seq)) {
        Ok(b) if b.ok() => drop(b),
        _ => {
            ERRORS.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Ok(b) = cache.alloc(Packet::new(seq)) {
        let _ = FROM_HANDLER.push(b);
    }
}

#[test]
fn owners_from_signal_handlers_dropped_elsewhere() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cache = CACHE.get_or_init(|| TypedCache::new("typed-storm").unwrap());
    let sig = libc::SIGRTMIN() + 5;
    testkit::install_handler(sig, on_signal, 0);
    let before = cache.stats();
    let mut drained = 0u64;
    std::thread::scope(|s| {
        for t in 0..2u64 {
            s.spawn(move || {
                let timer = testkit::ThreadTimer::for_current_thread(sig, Duration::from_micros(40));
                let end = Instant::now() + Duration::from_millis(800);
                let mut i = 0;
                while Instant::now() < end {
                    // The normal code allocates and frees from the same cache the handler uses.
                    i += 1;
                    let v: Vec<_> =
                        (0..16).map(|k| cache.alloc(Packet::new(t << 40 | i << 8 | k)).ok().unwrap()).collect();
                    if !v.iter().all(|p| p.ok()) {
                        ERRORS.fetch_add(1, Ordering::Relaxed);
                    }
                }
                drop(timer);
                testkit::block_signal(sig, true);
            });
        }
        let end = Instant::now() + Duration::from_millis(900);
        while Instant::now() < end {
            while let Some(b) = FROM_HANDLER.pop() {
                if !b.ok() {
                    ERRORS.fetch_add(1, Ordering::Relaxed);
                }
                drained += 1;
            }
            std::thread::sleep(Duration::from_micros(300));
        }
    });
    while let Some(b) = FROM_HANDLER.pop() {
        assert!(b.ok());
        drained += 1;
    }
    let after = cache.stats();
    eprintln!("{} handler runs, {drained} owners dropped on the draining thread", HANDLED.load(Ordering::Relaxed));
    assert_eq!(ERRORS.load(Ordering::Relaxed), 0);
    assert!(HANDLED.load(Ordering::Relaxed) > 50);
    assert_eq!(after.allocs - before.allocs, after.frees - before.frees, "every owner freed its object");
}
