//! Deterministic same-thread re-entry: a real signal raised at a chosen hook point inside a map operation,
//! whose handler runs another operation on the same map.
//!
//! - `MapLocked` (v6.14 and earlier): a nested operation whose key shares the `map_locked` slot gets `Busy`,
//!   even on another bucket; another slot is fine.
//! - `Rqspin` (v6.15+): a nested operation on the same bucket gets `Deadlock`; another bucket is fine.
//! - `LockFree`: every pair of (outer, nested) operations on the same key or the same bucket, at every hook
//!   point, with every backend: no `Busy`/`Deadlock`, results as in some sequential order, at most one live
//!   element per key and the element count right.
//! - The burst: 64 inserts in one region into a fresh `BpfMemAlloc` map with late refill: the 5th gets
//!   `NoMem`; the nolock backend gets none.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, Ordering};
use std::time::Duration;

use nolock_bpf::cpu::IrqRegion;
use nolock_bpf::htab::hooks::{Point, set_hook};
use nolock_bpf::htab::{Backend, Error, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;
use testkit::reports::NoReports;

/// Tests here share the global hook and the signal handler.
static SERIAL: Mutex<()> = Mutex::new(());

static MAP: AtomicPtr<HashMap> = AtomicPtr::new(core::ptr::null_mut());
static ARMED: AtomicBool = AtomicBool::new(false);
static AT: AtomicU8 = AtomicU8::new(0);
static NESTED_OP: AtomicU8 = AtomicU8::new(0);
static NESTED_KEY: AtomicI32 = AtomicI32::new(0);
/// Result of the nested operation: -1 not run, 0 Ok, else errno.
static NESTED_RES: AtomicI32 = AtomicI32::new(-1);

const POINTS: [Point; 6] =
    [Point::Locked, Point::AfterSeek, Point::BeforeInsert, Point::AfterClaim, Point::AfterFreeze, Point::BeforeRetire];

fn point_id(p: Point) -> u8 {
    POINTS.iter().position(|&q| q == p).unwrap() as u8
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// update(key, 100 + who, NoExist)
    Insert,
    /// update(key, 100 + who, Any)
    Any,
    /// update(key, 100 + who, Exist)
    Exist,
    Delete,
}

const OPS: [Op; 4] = [Op::Insert, Op::Any, Op::Exist, Op::Delete];

fn k(i: i32) -> [u8; 8] {
    (i as u64).to_ne_bytes()
}

fn run(m: &HashMap, op: Op, key: i32, who: u64) -> Result<(), Error> {
    let v = (100 + who).to_ne_bytes();
    match op {
        Op::Insert => m.update(&k(key), &v, UpdateFlags::NoExist),
        Op::Any => m.update(&k(key), &v, UpdateFlags::Any),
        Op::Exist => m.update(&k(key), &v, UpdateFlags::Exist),
        Op::Delete => m.delete(&k(key)),
    }
}

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _e = testkit::sys::ErrnoGuard::new();
    let m = MAP.load(Ordering::Acquire);
    if m.is_null() {
        return;
    }
    // SAFETY: the test keeps the map alive while the hook is armed.
    let m = unsafe { &*m };
    let op = OPS[NESTED_OP.load(Ordering::Relaxed) as usize];
    let r = run(m, op, NESTED_KEY.load(Ordering::Relaxed), 2);
    NESTED_RES.store(r.map_or_else(|e| e.errno(), |_| 0), Ordering::Relaxed);
}

fn hook(p: Point) {
    if POINTS.get(AT.load(Ordering::Relaxed) as usize) == Some(&p) && ARMED.swap(false, Ordering::AcqRel) {
        // SAFETY: raise(3) delivers the signal to this thread before it returns: the handler runs here.
        unsafe { libc::raise(libc::SIGUSR1) };
    }
}

fn install() -> testkit::signal::SavedActions {
    testkit::signal::SavedActions::install(&[libc::SIGUSR1], on_signal, 0).unwrap()
}

/// Arm one nested operation at point `p`, run `outer`, and return (outer result, nested result or None).
fn nested(
    m: &HashMap,
    p: Point,
    nop: Op,
    nkey: i32,
    outer: impl FnOnce() -> Result<(), Error>,
) -> (Result<(), Error>, Option<i32>) {
    MAP.store(m as *const HashMap as *mut HashMap, Ordering::Release);
    AT.store(point_id(p), Ordering::Relaxed);
    NESTED_OP.store(OPS.iter().position(|&o| o == nop).unwrap() as u8, Ordering::Relaxed);
    NESTED_KEY.store(nkey, Ordering::Relaxed);
    NESTED_RES.store(-1, Ordering::Relaxed);
    ARMED.store(true, Ordering::Release);
    let r = outer();
    ARMED.store(false, Ordering::Release);
    MAP.store(core::ptr::null_mut(), Ordering::Release);
    let n = NESTED_RES.load(Ordering::Relaxed);
    (r, (n >= 0).then_some(n))
}

fn small_attr(b: Backend, l: LockMode) -> HtabAttr {
    HtabAttr::new(8, 8, 64).backend(b).lock(l)
}

/// Two keys with the same `map_locked` slot but different buckets, and one with another slot.
fn slot_keys(m: &HashMap) -> (i32, i32, i32) {
    let mask = m.n_buckets() as u32 - 1;
    let h0 = m.debug_hash(&k(0));
    let same = (1..10_000).find(|&i| {
        let h = m.debug_hash(&k(i));
        h & 7 == h0 & 7 && h & mask != h0 & mask
    });
    let other = (1..10_000).find(|&i| m.debug_hash(&k(i)) & 7 != h0 & 7);
    (0, same.unwrap(), other.unwrap())
}

fn same_bucket_key(m: &HashMap, key: i32) -> i32 {
    let mask = m.n_buckets() as u32 - 1;
    let h = m.debug_hash(&k(key)) & mask;
    (key + 1..key + 100_000).find(|&i| m.debug_hash(&k(i)) & mask == h).unwrap()
}

#[test]
fn map_locked_slot_aliasing_is_busy() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = NoReports::new();
    let _sa = install();
    set_hook(Some(hook));
    let m = HashMap::new(small_attr(Backend::Prealloc, LockMode::MapLocked)).unwrap();
    let (a, same_slot, other_slot) = slot_keys(&m);
    // The nested update's key shares the slot of the interrupted one (another bucket, another key): Busy.
    let (r, n) = nested(&m, Point::Locked, Op::Any, same_slot, || run(&m, Op::Any, a, 1));
    assert_eq!(r, Ok(()));
    assert_eq!(n, Some(libc::EBUSY), "MapLocked: slot aliasing must give -EBUSY");
    // Another slot: no error.
    let (r, n) = nested(&m, Point::Locked, Op::Any, other_slot, || run(&m, Op::Any, a, 1));
    assert_eq!(r, Ok(()));
    assert_eq!(n, Some(0));
    assert_eq!(m.stats().error(Error::Busy), 1);
    set_hook(None);
    drop(m);
    nr.check("map_locked");
}

#[test]
fn rqspin_same_bucket_is_deadlock() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = NoReports::new();
    let _sa = install();
    set_hook(Some(hook));
    let m = HashMap::new(small_attr(Backend::Prealloc, LockMode::Rqspin)).unwrap();
    let same = same_bucket_key(&m, 0);
    let (r, n) = nested(&m, Point::Locked, Op::Any, same, || run(&m, Op::Any, 0, 1));
    assert_eq!(r, Ok(()));
    assert_eq!(n, Some(libc::EDEADLK), "Rqspin: same-bucket re-entry must give -EDEADLK");
    let (_, _, other_slot) = slot_keys(&m);
    let (r, n) = nested(&m, Point::Locked, Op::Any, other_slot, || run(&m, Op::Any, 0, 1));
    assert_eq!((r, n), (Ok(()), Some(0)));
    assert_eq!(m.stats().error(Error::Deadlock), 1);
    // The same key with MapLocked is Busy too (same bucket implies same slot).
    set_hook(None);
    drop(m);
    nr.check("rqspin");
}

fn lockfree_backends() -> Vec<Backend> {
    static D: nolock::SrcuFast = nolock::SrcuFast::new();
    vec![
        Backend::Prealloc,
        Backend::BpfMemAlloc(RefillMode::AtRegionEnd),
        Backend::Nolock(NolockReuse::TypesafeImmediate),
        Backend::Nolock(NolockReuse::AfterRcu),
        Backend::Nolock(NolockReuse::AfterSrcu(&D)),
    ]
}

fn value(m: &HashMap, key: i32) -> Option<u64> {
    let mut out = [0u8; 8];
    m.lookup_copy(&k(key), &mut out).ok().map(|_| u64::from_ne_bytes(out))
}

/// Every (outer, nested) pair at every point, same key and same bucket, every backend, both initial states.
#[test]
fn lockfree_reentry_matrix() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = NoReports::new();
    let _sa = install();
    set_hook(Some(hook));
    let mut cases = 0;
    let mut fired = 0;
    for b in lockfree_backends() {
        let m = HashMap::new(small_attr(b, LockMode::LockFree)).unwrap();
        let other = same_bucket_key(&m, 0);
        for &p in &POINTS {
            for &oop in &OPS {
                for &nop in &OPS {
                    for &nkey in &[0, other] {
                        for present in [false, true] {
                            // Reset: key 0 present or not (value 100), `other` present (value 7). Prealloc in
                            // lock-free mode reuses elements after a grace period: let them come back.
                            if matches!(b, Backend::Prealloc) {
                                nolock::rcu_barrier();
                            }
                            let _ = m.delete(&k(0));
                            let _ = m.delete(&k(other));
                            if present {
                                m.update(&k(0), &100u64.to_ne_bytes(), UpdateFlags::NoExist).unwrap();
                            }
                            m.update(&k(other), &7u64.to_ne_bytes(), UpdateFlags::NoExist).unwrap();
                            let before = m.stats();
                            let (r, n) = nested(&m, p, nop, nkey, || run(&m, oop, 0, 1));
                            cases += 1;
                            let ctx = format!(
                                "{b:?} point {p:?} outer {oop:?} nested {nop:?} key {nkey} present {present}: {r:?} {n:?}"
                            );
                            let after = m.stats();
                            assert_eq!(after.error(Error::Busy), before.error(Error::Busy), "{ctx}");
                            assert_eq!(after.error(Error::Deadlock), before.error(Error::Deadlock), "{ctx}");
                            assert!(m.debug_key_copies(&k(0)) <= 1, "{ctx}: two live copies");
                            assert!(m.debug_key_copies(&k(other)) <= 1, "{ctx}: two live copies");
                            let live = usize::from(value(&m, 0).is_some()) + usize::from(value(&m, other).is_some());
                            assert_eq!(m.len(), live, "{ctx}: element count");
                            let Some(n) = n else { continue };
                            fired += 1;
                            let nres = if n == 0 { Ok(()) } else { Err(n) };
                            check_serial(
                                &ctx,
                                present,
                                oop,
                                r,
                                nop,
                                nkey == 0,
                                nres,
                                value(&m, 0),
                                nkey,
                                value(&m, other),
                            );
                        }
                    }
                }
            }
        }
        drop(m);
    }
    set_hook(None);
    eprintln!("lockfree matrix: the nested operation ran in {fired} of {cases} cases");
    assert!(fired > cases / 3, "the hook fired in {fired} of {cases} cases");
    nr.check("lockfree matrix");
}

/// The outcome must be that of running the nested op entirely before, or entirely after, the outer one.
#[allow(clippy::too_many_arguments)]
fn check_serial(
    ctx: &str,
    present: bool,
    oop: Op,
    r: Result<(), Error>,
    nop: Op,
    same_key: bool,
    n: Result<(), i32>,
    v0: Option<u64>,
    nkey: i32,
    vother: Option<u64>,
) {
    // A tiny model: key 0 and key `other` (initially 7).
    let apply = |st: &mut (Option<u64>, Option<u64>), op: Op, on0: bool, who: u64| -> Result<(), i32> {
        let slot = if on0 { &mut st.0 } else { &mut st.1 };
        match op {
            Op::Insert if slot.is_some() => Err(libc::EEXIST),
            Op::Exist if slot.is_none() => Err(libc::ENOENT),
            Op::Delete if slot.is_none() => Err(libc::ENOENT),
            Op::Delete => {
                *slot = None;
                Ok(())
            }
            _ => {
                *slot = Some(100 + who);
                Ok(())
            }
        }
    };
    let init = (present.then_some(100), Some(7));
    let mut ok = false;
    for nested_first in [true, false] {
        let mut st = init;
        let (ro, rn) = if nested_first {
            let rn = apply(&mut st, nop, same_key, 2);
            (apply(&mut st, oop, true, 1), rn)
        } else {
            let ro = apply(&mut st, oop, true, 1);
            (ro, apply(&mut st, nop, same_key, 2))
        };
        let ro = ro.map_err(|e| match e {
            libc::EEXIST => Error::Exists,
            _ => Error::NotFound,
        });
        if ro == r && rn == n && st.0 == v0 && st.1 == vother {
            ok = true;
        }
    }
    assert!(ok, "{ctx}: no sequential order explains it (key 0 = {v0:?}, key {nkey} = {vother:?})");
}

/// The burst of the production failures: 64 inserts within one region into a fresh map whose refill comes
/// late. bpf_mem_alloc holds 4 prefilled elements: the 5th insert fails with NoMem. The nolock backend
/// inserts all 64.
#[test]
fn burst_into_fresh_map_with_late_refill() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = NoReports::new();
    for lock in [LockMode::Rqspin, LockMode::LockFree] {
        let ma = HashMap::new(
            HtabAttr::new(4, 8, 1024)
                .backend(Backend::BpfMemAlloc(RefillMode::Late(Duration::from_millis(50))))
                .lock(lock),
        )
        .unwrap();
        let nl =
            HashMap::new(HtabAttr::new(4, 8, 1024).backend(Backend::Nolock(NolockReuse::TypesafeImmediate)).lock(lock))
                .unwrap();
        let (ra, rn) = {
            let _r = IrqRegion::enter();
            let ra: Vec<_> = (0..64u32).map(|i| ma.update(&i.to_ne_bytes(), &[1; 8], UpdateFlags::NoExist)).collect();
            let rn: Vec<_> = (0..64u32).map(|i| nl.update(&i.to_ne_bytes(), &[1; 8], UpdateFlags::NoExist)).collect();
            (ra, rn)
        };
        assert!(ra[..4].iter().all(|r| r.is_ok()), "{lock:?}: {ra:?}");
        assert_eq!(ra[4], Err(Error::NoMem), "{lock:?}: the 5th insert of the burst");
        assert_eq!(ma.stats().error(Error::NoMem), 60, "{lock:?}");
        assert!(rn.iter().all(|r| r.is_ok()), "{lock:?}: nolock backend: {rn:?}");
        assert_eq!(nl.stats().total_errors(), 0);
        drop(ma);
        drop(nl);
    }
    nr.check("burst");
}
