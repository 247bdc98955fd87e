//! Ports of the ideas of the kernel's `test_maps` for hash maps (flag semantics, full map, iteration,
//! iteration while updating), for every backend and lock mode.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nolock_bpf::htab::{Backend, Error, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;
use testkit::reports::NoReports;

static DOMAIN: nolock::SrcuFast = nolock::SrcuFast::new();

fn backends() -> Vec<Backend> {
    vec![
        Backend::Prealloc,
        Backend::BpfMemAlloc(RefillMode::AtRegionEnd),
        Backend::Nolock(NolockReuse::TypesafeImmediate),
        Backend::Nolock(NolockReuse::AfterRcu),
        Backend::Nolock(NolockReuse::AfterSrcu(&DOMAIN)),
    ]
}

const LOCKS: [LockMode; 3] = [LockMode::MapLocked, LockMode::Rqspin, LockMode::LockFree];

fn each(max: usize, f: impl Fn(HashMap, &str)) {
    for b in backends() {
        for l in LOCKS {
            let name = format!("{b:?}/{l:?}");
            let m = HashMap::new(HtabAttr::new(8, 8, max).backend(b).lock(l)).unwrap();
            f(m, &name);
        }
    }
}

fn k(i: u64) -> [u8; 8] {
    i.to_ne_bytes()
}

fn get(m: &HashMap, i: u64) -> Option<u64> {
    let mut out = [0u8; 8];
    m.lookup_copy(&k(i), &mut out).ok().map(|_| u64::from_ne_bytes(out))
}

#[test]
fn flags_semantics() {
    let nr = NoReports::new();
    each(64, |m, name| {
        assert_eq!(m.update(&k(1), &k(10), UpdateFlags::Exist), Err(Error::NotFound), "{name}");
        assert_eq!(m.update(&k(1), &k(10), UpdateFlags::NoExist), Ok(()), "{name}");
        assert_eq!(m.update(&k(1), &k(11), UpdateFlags::NoExist), Err(Error::Exists), "{name}");
        assert_eq!(get(&m, 1), Some(10), "{name}");
        assert_eq!(m.update(&k(1), &k(12), UpdateFlags::Exist), Ok(()), "{name}");
        assert_eq!(get(&m, 1), Some(12), "{name}");
        assert_eq!(m.update(&k(1), &k(13), UpdateFlags::Any), Ok(()), "{name}");
        assert_eq!(m.update(&k(2), &k(20), UpdateFlags::Any), Ok(()), "{name}");
        assert_eq!(get(&m, 1), Some(13), "{name}");
        assert_eq!(m.len(), 2, "{name}");
        let v = m.lookup(&k(2)).unwrap();
        assert_eq!(v.atomic_u64(0).load(Ordering::Relaxed), 20);
        let mut copy = [0u8; 8];
        v.copy_to(&mut copy);
        assert_eq!(copy, k(20), "{name}: ValueRef::copy_to copies the value");
        drop(v);
        let mut out = [0u8; 8];
        assert_eq!(m.lookup_and_delete(&k(2), &mut out), Ok(()), "{name}");
        assert_eq!(u64::from_ne_bytes(out), 20);
        assert_eq!(m.lookup_and_delete(&k(2), &mut out), Err(Error::NotFound), "{name}");
        assert_eq!(m.delete(&k(1)), Ok(()), "{name}");
        assert_eq!(m.delete(&k(1)), Err(Error::NotFound), "{name}");
        assert!(m.lookup(&k(1)).is_none(), "{name}");
        assert_eq!(m.len(), 0, "{name}");
        assert_eq!(m.update(&k(1), &[0u8; 4], UpdateFlags::Any), Err(Error::Invalid), "{name}");
        let s = m.stats();
        assert_eq!(s.error(Error::NotFound), 3, "{name}");
        assert_eq!(s.error(Error::Exists), 1, "{name}");
        assert_eq!(s.error(Error::Invalid), 1, "{name}");
    });
    nr.check("flags_semantics");
}

#[test]
fn full_map() {
    let nr = NoReports::new();
    each(100, |m, name| {
        for i in 0..100 {
            m.update(&k(i), &k(i), UpdateFlags::NoExist).unwrap();
        }
        assert_eq!(m.update(&k(1000), &k(0), UpdateFlags::Any), Err(Error::Full), "{name}");
        assert_eq!(m.update(&k(1000), &k(0), UpdateFlags::NoExist), Err(Error::Full), "{name}");
        // Updating an existing key of a full map works (Prealloc: the per-CPU spare element). Prealloc in
        // lock-free mode reuses a replaced element only after a grace period: Full there is transient.
        let transient = name == "Prealloc/LockFree";
        for r in 0..3 {
            for i in 0..100 {
                loop {
                    match m.update(&k(i), &k(i + r), UpdateFlags::Exist) {
                        Ok(()) => break,
                        Err(Error::Full) if transient => nolock::rcu_barrier(),
                        Err(e) => panic!("{name}: {e}"),
                    }
                }
            }
        }
        assert_eq!(m.delete(&k(5)), Ok(()));
        if transient {
            nolock::rcu_barrier();
        }
        assert_eq!(m.update(&k(1000), &k(0), UpdateFlags::NoExist), Ok(()), "{name}");
        assert_eq!(m.len(), 100);
    });
    nr.check("full_map");
}

#[test]
fn get_next_key_visits_each_key_once() {
    let nr = NoReports::new();
    each(300, |m, name| {
        for i in 0..250 {
            m.update(&k(i * 7), &k(i), UpdateFlags::NoExist).unwrap();
        }
        let mut seen = HashSet::new();
        let mut cur: Option<[u8; 8]> = None;
        loop {
            let mut next = [0u8; 8];
            match m.get_next_key(cur.as_ref().map(|c| &c[..]), &mut next) {
                Ok(()) => {
                    assert!(seen.insert(u64::from_ne_bytes(next)), "{name}: key seen twice");
                    cur = Some(next);
                }
                Err(Error::NotFound) => break,
                Err(e) => panic!("{name}: {e}"),
            }
        }
        assert_eq!(seen.len(), 250, "{name}");
        let mut n = 0;
        m.for_each(|key, v| {
            assert_eq!(u64::from_ne_bytes(key.try_into().unwrap()), 7 * u64::from_ne_bytes(v.try_into().unwrap()));
            n += 1;
        });
        assert_eq!(n, 250, "{name}");
    });
    nr.check("get_next_key");
}

/// test_maps' "iterate while updating": keys 0..N/2 stay; keys N/2..N are added and deleted by two threads.
/// Every stable key is seen by every full iteration; no iteration loops forever.
#[test]
fn iteration_while_updating() {
    let nr = NoReports::new();
    for b in backends() {
        for l in LOCKS {
            let m = Arc::new(HashMap::new(HtabAttr::new(8, 8, 512).backend(b).lock(l)).unwrap());
            for i in 0..128 {
                m.update(&k(i), &k(i), UpdateFlags::NoExist).unwrap();
            }
            let stop = Arc::new(AtomicBool::new(false));
            let ths: Vec<_> = (0..2)
                .map(|t| {
                    let (m, stop) = (m.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut i = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let key = 1000 + t * 1000 + (i % 200);
                            let _ = m.update(&k(key), &k(key), UpdateFlags::Any);
                            if i.is_multiple_of(3) {
                                let _ = m.delete(&k(1000 + t * 1000 + ((i * 7) % 200)));
                            }
                            i += 1;
                        }
                    })
                })
                .collect();
            for _ in 0..50 {
                let mut seen = HashSet::new();
                let mut cur: Option<[u8; 8]> = None;
                let mut steps = 0;
                loop {
                    let mut next = [0u8; 8];
                    match m.get_next_key(cur.as_ref().map(|c| &c[..]), &mut next) {
                        Ok(()) => {
                            seen.insert(u64::from_ne_bytes(next));
                            cur = Some(next);
                        }
                        Err(_) => break,
                    }
                    steps += 1;
                    assert!(steps < 100_000, "{b:?}/{l:?}: iteration does not end");
                }
                // get_next_key returns the least key above the previous one in its bucket (byte order), else the
                // least of the next non-empty bucket: every pass ends, and sees every stable key, however the
                // writers churn (the kernel's walk could be carried into another bucket and skip them).
                for i in 0..128 {
                    assert!(seen.contains(&i), "{b:?}/{l:?}: stable key {i} missed");
                }
            }
            stop.store(true, Ordering::Relaxed);
            for t in ths {
                t.join().unwrap();
            }
            for i in 0..128 {
                assert_eq!(get(&m, i), Some(i));
            }
        }
    }
    nr.check("iteration_while_updating");
}
