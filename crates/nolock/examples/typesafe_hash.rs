//! A lock-free hash table on a type-safe cache: the pattern BPF hash maps (and the kernel's
//! `SLAB_TYPESAFE_BY_RCU` users) rely on.
//!
//! Elements come from a `KmemCache` created with `SlabFlags::TYPESAFE_BY_SRCU_FAST` (Tasks Trace domain).
//! A deleted element is freed at once and may be reused for another key immediately, but its memory stays an
//! `Elem` until every reader that could still see it is gone. So readers never take a lock and never wait:
//!
//! 1. walk the bucket's list inside a read-side section (RCU *or* Tasks Trace: a Tasks Trace grace period
//!    implies an RCU one, so both kinds of readers are covered);
//! 2. on a key match, take a reference with *try-get* (fails on a free element, reference count 0);
//! 3. re-check the key after the reference is held: the element may have been freed and reused for another
//!    key between 1 and 2; on a mismatch, drop the reference and restart;
//! 4. lists end in a *nulls* marker that encodes the bucket number: a reader that followed a recycled element
//!    into another bucket's list notices at the end and restarts.
//!
//! The constructor sets up the fields readers probe (type tag, reference count, key) once per slab life, and
//! the free-list link lives at `freeptr_offset`, away from them. Writers serialize per bucket with a mutex.
//!
//! Run: `cargo run --release -p nolock-mm --example typesafe_hash`

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use std::time::{Duration, Instant};

use nolock::{Gfp, KmemCache, SlabFlags};

const ELEM_TAG: u64 = 0x454c_454d_5459_5045; // "ELEMTYPE"

/// One element. The first four fields are probed by lock-free readers and survive free and reuse.
#[repr(C)]
struct Elem {
    tag: AtomicU64,
    refcnt: AtomicU32,
    _pad: u32,
    key: AtomicU64,
    /// Next element, or a nulls marker `(bucket << 1) | 1`.
    next: AtomicUsize,
    value: AtomicU64,
    /// The allocator's free-list link (`freeptr_offset`): never read by readers.
    free_link: u64,
}

const FREEPTR_OFFSET: usize = core::mem::offset_of!(Elem, free_link);

fn elem_ctor(p: NonNull<u8>) {
    // SAFETY: a fresh object of Elem's layout; runs once per slab life.
    unsafe {
        p.cast::<Elem>().as_ptr().write(Elem {
            tag: AtomicU64::new(ELEM_TAG),
            refcnt: AtomicU32::new(0),
            _pad: 0,
            key: AtomicU64::new(0),
            next: AtomicUsize::new(1),
            value: AtomicU64::new(0),
            free_link: 0,
        })
    };
}

fn nulls(bucket: usize) -> usize {
    (bucket << 1) | 1
}

struct Bucket {
    head: AtomicUsize,
    lock: Mutex<()>,
}

/// The table.
struct Table {
    buckets: Vec<Bucket>,
    cache: KmemCache,
    /// Lookups that restarted because an element was recycled under them.
    restarts: AtomicU64,
}

/// A counted reference to an element.
struct ElemRef<'t> {
    e: &'t Elem,
    table: &'t Table,
}

impl Drop for ElemRef<'_> {
    fn drop(&mut self) {
        self.table.put(self.e);
    }
}

impl Table {
    fn new(nbuckets: usize) -> Self {
        let cache = KmemCache::builder("hash-elem", Layout::new::<Elem>())
            .flags(SlabFlags::TYPESAFE_BY_SRCU_FAST)
            .freeptr_offset(FREEPTR_OFFSET)
            .ctor(elem_ctor)
            .build()
            .expect("cache");
        let buckets =
            (0..nbuckets).map(|i| Bucket { head: AtomicUsize::new(nulls(i)), lock: Mutex::new(()) }).collect();
        Self { buckets, cache, restarts: AtomicU64::new(0) }
    }

    fn bucket_of(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize % self.buckets.len()
    }

    fn try_get(e: &Elem) -> bool {
        let mut r = e.refcnt.load(Ordering::Relaxed);
        loop {
            if r == 0 {
                return false;
            }
            // Acquire: pairs with the Release that published the element (refcnt 0 → 1).
            match e.refcnt.compare_exchange_weak(r, r + 1, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => r = now,
            }
        }
    }

    fn put(&self, e: &Elem) {
        // Release/Acquire: the last holder sees every other holder's accesses before freeing.
        if e.refcnt.fetch_sub(1, Ordering::Release) == 1 {
            fence(Ordering::Acquire);
            // SAFETY: the element came from this cache and nobody holds a reference any more. Readers may still
            // look at it: type-safe memory stays an Elem, and they re-check the key after try-get.
            unsafe { self.cache.free_nolock(NonNull::from(e).cast()) };
        }
    }

    /// Lock-free lookup; the caller is inside a read-side section (RCU or Tasks Trace).
    fn lookup(&self, key: u64) -> Option<ElemRef<'_>> {
        let b = self.bucket_of(key);
        'restart: loop {
            let mut p = self.buckets[b].head.load(Ordering::Acquire);
            while p & 1 == 0 {
                // SAFETY: every non-marker link points into the type-safe cache: memory that is an Elem for as
                // long as our read-side section lasts, whatever happened to the element.
                let e = unsafe { &*(p as *const Elem) };
                assert_eq!(e.tag.load(Ordering::Relaxed), ELEM_TAG, "type safety violated");
                if e.key.load(Ordering::Acquire) == key && Self::try_get(e) {
                    if e.key.load(Ordering::Acquire) == key {
                        return Some(ElemRef { e, table: self });
                    }
                    // Recycled for another key between the match and the try-get.
                    self.put(e);
                    self.restarts.fetch_add(1, Ordering::Relaxed);
                    continue 'restart;
                }
                p = e.next.load(Ordering::Acquire);
            }
            if p != nulls(b) {
                // We followed a recycled element into another bucket's list.
                self.restarts.fetch_add(1, Ordering::Relaxed);
                continue 'restart;
            }
            return None;
        }
    }

    /// Insert `key → value` unless present. Returns false on a duplicate or out of memory.
    fn insert(&self, key: u64, value: u64) -> bool {
        let b = self.bucket_of(key);
        let bucket = &self.buckets[b];
        let _w = bucket.lock.lock().unwrap();
        let mut p = bucket.head.load(Ordering::Acquire);
        while p & 1 == 0 {
            // SAFETY: under the bucket lock, listed elements are live.
            let e = unsafe { &*(p as *const Elem) };
            if e.key.load(Ordering::Relaxed) == key {
                return false;
            }
            p = e.next.load(Ordering::Acquire);
        }
        let Some(mem) = self.cache.alloc_nolock(Gfp::NONE) else { return false };
        // SAFETY: a fresh element: its probed fields were set by the constructor and kept by the allocator.
        let e = unsafe { mem.cast::<Elem>().as_ref() };
        debug_assert_eq!(e.refcnt.load(Ordering::Relaxed), 0);
        e.key.store(key, Ordering::Relaxed);
        e.value.store(value, Ordering::Relaxed);
        e.next.store(bucket.head.load(Ordering::Relaxed), Ordering::Relaxed);
        // Release: readers that win try-get see key, value and next.
        e.refcnt.store(1, Ordering::Release);
        bucket.head.store(e as *const Elem as usize, Ordering::Release);
        true
    }

    /// Remove `key`; the element is freed when its last reference goes.
    fn delete(&self, key: u64) -> bool {
        let b = self.bucket_of(key);
        let bucket = &self.buckets[b];
        let _w = bucket.lock.lock().unwrap();
        let mut link = &bucket.head;
        let mut p = link.load(Ordering::Acquire);
        while p & 1 == 0 {
            // SAFETY: under the bucket lock, listed elements are live.
            let e = unsafe { &*(p as *const Elem) };
            if e.key.load(Ordering::Relaxed) == key {
                link.store(e.next.load(Ordering::Relaxed), Ordering::Release);
                self.put(e); // the table's own reference
                return true;
            }
            link = &e.next;
            p = link.load(Ordering::Acquire);
        }
        false
    }
}

fn main() {
    nolock::init();
    let table = Table::new(64);
    let stop = AtomicBool::new(false);
    let hits = AtomicU64::new(0);
    let misses = AtomicU64::new(0);
    let wrong = AtomicU64::new(0);
    const KEYS: u64 = 512;
    // The value of key k is always k * 3: a reader that returns another value saw a recycled element.
    let seconds = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    std::thread::scope(|s| {
        for w in 0..2u64 {
            let (table, stop) = (&table, &stop);
            s.spawn(move || {
                let mut x = w + 1;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let k = (x >> 33) % KEYS;
                    if !table.insert(k, k * 3) {
                        table.delete(k);
                    }
                }
            });
        }
        for r in 0..3u64 {
            let (table, stop, hits, misses, wrong) = (&table, &stop, &hits, &misses, &wrong);
            s.spawn(move || {
                let mut x = r + 100;
                while !stop.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let k = (x >> 33) % KEYS;
                    // Non-sleepable (RCU) and sleepable (Tasks Trace) readers share the table.
                    let found = if r == 0 {
                        let _g = nolock::rcu_read_lock_tasks_trace();
                        table.lookup(k).map(|e| e.e.value.load(Ordering::Relaxed))
                    } else {
                        let _g = nolock::rcu_read_lock();
                        table.lookup(k).map(|e| e.e.value.load(Ordering::Relaxed))
                    };
                    match found {
                        Some(v) if v == k * 3 => hits.fetch_add(1, Ordering::Relaxed),
                        Some(_) => wrong.fetch_add(1, Ordering::Relaxed),
                        None => misses.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs_f64(seconds) {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
    });
    for k in 0..KEYS {
        table.delete(k);
    }
    let st = table.cache.stats();
    println!("typesafe hash table: {seconds} s, 2 writers, 3 readers (1 Tasks Trace, 2 RCU), {KEYS} keys");
    println!("  lookups: {} hits, {} misses", hits.load(Ordering::Relaxed), misses.load(Ordering::Relaxed));
    println!("  lookups that returned a wrong element: {}", wrong.load(Ordering::Relaxed));
    println!("  restarts after meeting a recycled element: {}", table.restarts.load(Ordering::Relaxed));
    println!(
        "  element allocations {} (fallback {}), frees {}, slabs {} (allocated {}, freed {})",
        st.allocs, st.fallback_allocs, st.frees, st.slabs, st.slabs_allocated, st.slabs_freed
    );
    assert_eq!(wrong.load(Ordering::Relaxed), 0, "a lookup returned an element of another key");
    assert_eq!(st.allocs, st.frees, "every element freed");
    drop(table); // destroys the cache: waits for the grace periods of its slabs, returns every page
    println!("  ok");
}
