//! A lockless reader standing on an element that a writer deletes and reuses at once (immediate-reuse
//! backends: Prealloc, bpf_mem_alloc, type-safe nolock, under bucket locks) must not follow the element's
//! `next` while the writer is still initialising it (`next` is then the UNSET value 0): it restarts its walk.
//!
//! Deterministic, with two threads and two hook points: the reader stops at `ReaderStep` on element X (a key
//! of the bucket that is not the one it looks for); the writer deletes X's key and inserts another key, which
//! takes X again from this CPU's free list, and stops at `BeforeInsert` with X initialised but not linked; then
//! the reader resumes.
//!
//! And the reader must not skip elements: a replacement linked *in place* of a deeper element of the same
//! bucket, reusing the X a reader stands on, carried the reader past every element in between (a key present
//! all along was not found; `single_step_maps.rs` found it). Replacements in these modes are linked at the head,
//! as the kernel's `htab_map_update_elem` does.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Barrier, Mutex};

use nolock_bpf::htab::hooks::{Point, set_hook};
use nolock_bpf::htab::{Backend, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;

thread_local! {
    static ROLE: Cell<u8> = const { Cell::new(0) };
}

const READER: u8 = 1;
const WRITER: u8 = 2;

static STEP: AtomicU8 = AtomicU8::new(0);
static SYNC: Mutex<Option<Arc<Barrier>>> = Mutex::new(None);

fn barrier() {
    let b = SYNC.lock().unwrap().clone().unwrap();
    b.wait();
}

fn hook(p: Point) {
    match (ROLE.with(|r| r.get()), p) {
        // The reader, once, on its first non-matching element: let the writer reuse it, wait until it is
        // initialised and unlinked everywhere, then go on.
        (READER, Point::ReaderStep) if STEP.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok() => {
            barrier(); // 1: the reader stands on X
            barrier(); // 2: the writer holds X initialised, not linked
        }
        (WRITER, Point::BeforeInsert) if STEP.compare_exchange(1, 2, Ordering::AcqRel, Ordering::Acquire).is_ok() => {
            barrier(); // 2
            barrier(); // 3: the reader has finished its lookup
        }
        _ => {}
    }
}

/// The reader of `reader_is_not_carried_past_elements`: stands on its first non-matching element until the
/// writer is done.
fn hook_stand(p: Point) {
    if ROLE.with(|r| r.get()) == READER
        && p == Point::ReaderStep
        && STEP.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
    {
        barrier(); // 1: the reader stands on X
        barrier(); // 2: the writer replaced X's key and then P's, reusing X
    }
}

fn k(i: u64) -> [u8; 8] {
    i.to_ne_bytes()
}

/// The tests here share the hook and the barrier.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn reader_on_an_element_being_reused_restarts() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_hook(Some(hook));
    for b in [
        Backend::Prealloc,
        Backend::BpfMemAlloc(RefillMode::AtRegionEnd),
        Backend::Nolock(NolockReuse::TypesafeImmediate),
    ] {
        for lock in [LockMode::Rqspin, LockMode::MapLocked] {
            STEP.store(0, Ordering::Release);
            *SYNC.lock().unwrap() = Some(Arc::new(Barrier::new(2)));
            let m = Arc::new(HashMap::new(HtabAttr::new(8, 8, 4).backend(b).lock(lock)).unwrap());
            let mask = m.n_buckets() as u32 - 1;
            // X: a key in bucket 0; the reader looks up an absent key of the same bucket.
            let in0: Vec<u64> = (0..10_000).filter(|&i| m.debug_hash(&k(i)) & mask == 0).take(2).collect();
            let (x, absent) = (in0[0], in0[1]);
            let other = (0..10_000).find(|&i| m.debug_hash(&k(i)) & mask != 0).unwrap();
            let writer = {
                let m = m.clone();
                std::thread::spawn(move || {
                    ROLE.with(|r| r.set(WRITER));
                    m.update(&k(x), &k(1), UpdateFlags::NoExist).unwrap();
                    barrier(); // 0: X is linked
                    barrier(); // 1: the reader stands on X
                    m.delete(&k(x)).unwrap();
                    // Takes X again (this CPU's free list is LIFO) and stops at BeforeInsert.
                    m.update(&k(other), &k(2), UpdateFlags::NoExist).unwrap();
                })
            };
            barrier(); // 0
            ROLE.with(|r| r.set(READER));
            let mut out = [0u8; 8];
            let r = m.lookup_copy(&k(absent), &mut out);
            ROLE.with(|r| r.set(0));
            assert!(r.is_err(), "{b:?}/{lock:?}: found an absent key");
            barrier(); // 3
            writer.join().unwrap();
            assert_eq!(STEP.load(Ordering::Acquire), 2, "{b:?}/{lock:?}: the interleaving did not happen");
            assert!(m.stats().nulls_restarts >= 1, "{b:?}/{lock:?}: the reader did not restart");
        }
    }
    set_hook(None);
}

/// Bucket `head -> X -> K -> P`; the reader looks up K and stands on X; the writer replaces X's key (X is
/// retired and reused at once) and then P's (the replacement reuses X). Linked in place of P, X would lead the
/// reader from X straight to the end of the bucket, past K.
#[test]
fn reader_is_not_carried_past_elements() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_hook(Some(hook_stand));
    for b in [
        Backend::Prealloc,
        Backend::BpfMemAlloc(RefillMode::AtRegionEnd),
        Backend::Nolock(NolockReuse::TypesafeImmediate),
    ] {
        for lock in [LockMode::Rqspin, LockMode::MapLocked] {
            STEP.store(0, Ordering::Release);
            *SYNC.lock().unwrap() = Some(Arc::new(Barrier::new(2)));
            let m = Arc::new(HashMap::new(HtabAttr::new(8, 8, 4).backend(b).lock(lock)).unwrap());
            let mask = m.n_buckets() as u32 - 1;
            let in0: Vec<u64> = (0..10_000).filter(|&i| m.debug_hash(&k(i)) & mask == 0).take(3).collect();
            let (p, key, x) = (in0[0], in0[1], in0[2]);
            for (i, &kk) in [p, key, x].iter().enumerate() {
                m.update(&k(kk), &k(10 + i as u64), UpdateFlags::NoExist).unwrap();
            }
            let writer = {
                let m = m.clone();
                std::thread::spawn(move || {
                    barrier(); // 1: the reader stands on X
                    m.update(&k(x), &k(21), UpdateFlags::Exist).unwrap();
                    m.update(&k(p), &k(22), UpdateFlags::Exist).unwrap();
                    barrier(); // 2
                })
            };
            ROLE.with(|r| r.set(READER));
            let mut out = [0u8; 8];
            let r = m.lookup_copy(&k(key), &mut out);
            ROLE.with(|r| r.set(0));
            writer.join().unwrap();
            assert_eq!(STEP.load(Ordering::Acquire), 1, "{b:?}/{lock:?}: the interleaving did not happen");
            assert_eq!(r, Ok(()), "{b:?}/{lock:?}: a key present all along was not found");
            assert_eq!(out, k(11), "{b:?}/{lock:?}");
        }
    }
    set_hook(None);
}
