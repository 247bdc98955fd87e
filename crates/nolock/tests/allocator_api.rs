//! The `Allocator` trait (allocator-api2) for `Kmalloc` and `&KmemCache`: `allocator_api2::vec::Vec` and
//! `hashbrown::HashMap` in nolock memory, built, grown and dropped inside signal handlers during a storm, with
//! content checks; a cache refuses layouts it cannot serve with `AllocError` and a `Vec` over it fails its
//! growth cleanly.

use std::alloc::Layout;
use std::ffi::{c_int, c_void};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use allocator_api2::alloc::Allocator;
use allocator_api2::vec::Vec as AVec;
use nolock::{Kmalloc, KmemCache};

static SERIAL: Mutex<()> = Mutex::new(());

/// A fixed hasher (no random seed: nothing in the handler touches the OS).
#[derive(Default)]
struct Fnv(u64);
impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}
type Map<K, V, A> = hashbrown::HashMap<K, V, BuildHasherDefault<Fnv>, A>;

fn in_arena<T>(p: *const T) -> bool {
    nolock::stats::page_owner(p.cast()) != nolock::stats::PageOwner::Foreign
}

#[test]
fn vec_and_hashmap_in_kmalloc() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: AVec<u64, Kmalloc> = AVec::new_in(Kmalloc);
    v.extend(0..100_000);
    assert!(in_arena(v.as_ptr()));
    assert!(v.iter().copied().eq(0..100_000));
    v.truncate(10);
    v.shrink_to_fit();
    assert_eq!(&v[..], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let z: AVec<u8, Kmalloc> = AVec::with_capacity_in(0, Kmalloc);
    assert_eq!(z.capacity(), 0);

    let mut m: Map<u64, AVec<u8, Kmalloc>, Kmalloc> = Map::with_hasher_in(Default::default(), Kmalloc);
    for i in 0..10_000u64 {
        let mut val = AVec::new_in(Kmalloc);
        val.extend(std::iter::repeat_n(i as u8, (i % 50) as usize));
        m.insert(i, val);
    }
    assert_eq!(m.len(), 10_000);
    assert!((0..10_000u64).all(|i| m[&i].len() == (i % 50) as usize && m[&i].iter().all(|&b| b == i as u8)));
    m.retain(|k, _| k % 3 == 0);
    assert_eq!(m.len(), 3334);
    // Zeroed allocation and zero-size layouts.
    let b = Kmalloc.allocate_zeroed(Layout::new::<[u64; 40]>()).unwrap();
    // SAFETY: 320 zeroed bytes we own.
    assert!(unsafe { b.as_ref() }.iter().all(|&x| x == 0));
    // SAFETY: ours, with that layout.
    unsafe { Kmalloc.deallocate(b.cast(), Layout::new::<[u64; 40]>()) };
    let e = Kmalloc.allocate(Layout::from_size_align(0, 64).unwrap()).unwrap();
    assert_eq!(e.len(), 0);
    assert_eq!(e.cast::<u8>().as_ptr() as usize % 64, 0);
}

#[test]
fn kmem_cache_serves_its_size_only() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cache = KmemCache::new("aa2-256", Layout::from_size_align(256, 64).unwrap()).unwrap();
    let a = &cache;
    // Fits: one object.
    let p = a.allocate(Layout::from_size_align(200, 16).unwrap()).unwrap();
    assert!(p.len() >= 200);
    // SAFETY: ours with that layout.
    unsafe { a.deallocate(p.cast(), Layout::from_size_align(200, 16).unwrap()) };
    // Too large: refused, nothing allocated.
    let before = cache.stats().allocs;
    assert!(a.allocate(Layout::from_size_align(257, 8).unwrap()).is_err());
    assert_eq!(cache.stats().allocs, before);
    // A Vec over the cache: up to one object's worth, then its growth fails cleanly.
    let mut v: AVec<u64, &KmemCache> = AVec::new_in(&cache);
    v.try_reserve_exact(32).unwrap();
    v.extend(0..32);
    let cap = v.capacity();
    assert!(cap >= 32);
    v.extend(32..cap as u64);
    assert!(v.try_reserve(1).is_err(), "growth beyond one object is an error");
    assert!(v.iter().copied().eq(0..cap as u64), "a failed growth loses nothing");
    // Growth within the object stays in place.
    let mut w: AVec<u32, &KmemCache> = AVec::with_capacity_in(4, &cache);
    w.push(1);
    let at = w.as_ptr();
    w.reserve_exact(60);
    assert_eq!(w.as_ptr(), at);
    drop((v, w));
    assert_eq!(cache.stats().allocs, cache.stats().frees);
}

static CACHE: OnceLock<KmemCache> = OnceLock::new();
static ERRORS: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);
static SEQ: AtomicU64 = AtomicU64::new(1);

fn err() {
    ERRORS.fetch_add(1, Ordering::Relaxed);
}

extern "C" fn on_signal(_sig: c_int, _info: *mut libc::siginfo_t, _ctx: *mut c_void) {
    let _errno = testkit::ErrnoGuard::new();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    // A growing Vec in kmalloc.
    let mut v: AVec<u64, Kmalloc> = AVec::new_in(Kmalloc);
    for i in 0..(n % 200 + 1) {
        if v.try_reserve(1).is_err() {
            return err();
        }
        v.push(n ^ i);
    }
    if !v.iter().enumerate().all(|(i, &x)| x == n ^ i as u64) {
        err();
    }
    // A hash map in kmalloc.
    let mut m: Map<u64, u64, Kmalloc> = Map::with_hasher_in(Default::default(), Kmalloc);
    for k in 0..(n % 64 + 1) {
        if m.try_reserve(1).is_err() {
            return err();
        }
        m.insert(k, k.wrapping_mul(n));
    }
    if !(0..(n % 64 + 1)).all(|k| m.get(&k) == Some(&k.wrapping_mul(n))) {
        err();
    }
    // A fixed-capacity Vec in a KmemCache object.
    if let Some(cache) = CACHE.get() {
        let mut c: AVec<u32, &KmemCache> = AVec::new_in(cache);
        if c.try_reserve_exact(16).is_err() {
            return err();
        }
        c.extend((0..16).map(|i| i * n as u32));
        if !c.iter().enumerate().all(|(i, &x)| x == i as u32 * n as u32) {
            err();
        }
    }
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

#[test]
fn collections_inside_a_signal_storm() {
    let _reports = testkit::NoReports::new();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    CACHE.get_or_init(|| KmemCache::new("aa2-storm", Layout::new::<[u32; 16]>()).unwrap());
    let sig = libc::SIGRTMIN() + 6;
    testkit::install_handler(sig, on_signal, 0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let timer = testkit::ThreadTimer::for_current_thread(sig, Duration::from_micros(40));
                let end = Instant::now() + Duration::from_millis(800);
                let mut i = 0u64;
                while Instant::now() < end {
                    // The interrupted code uses the same allocators.
                    i += 1;
                    let mut v: AVec<u64, Kmalloc> = AVec::new_in(Kmalloc);
                    v.extend(0..(i % 500));
                    let mut m: Map<u64, u64, Kmalloc> = Map::with_hasher_in(Default::default(), Kmalloc);
                    m.extend((0..(i % 100)).map(|k| (k, k + i)));
                    if !v.iter().copied().eq(0..(i % 500)) || !(0..(i % 100)).all(|k| m[&k] == k + i) {
                        err();
                    }
                }
                drop(timer);
                testkit::block_signal(sig, true);
            });
        }
    });
    eprintln!("{} handler runs", HANDLED.load(Ordering::Relaxed));
    assert_eq!(ERRORS.load(Ordering::Relaxed), 0);
    assert!(HANDLED.load(Ordering::Relaxed) > 50);
    let st = CACHE.get().unwrap().stats();
    assert_eq!(st.allocs, st.frees);
}
