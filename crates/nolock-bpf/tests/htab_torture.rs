//! Type-safety torture, a map dropped while threads exit, and resident memory over a cross-thread add/delete
//! run.
//!
//! - Torture: writers insert, replace and delete keys of a small map (elements move between buckets all the
//!   time, so lockless walks follow recycled elements into other lists and restart on the nulls marker) while
//!   readers copy values with `lookup_copy`. Every value is the key's pattern with a version in every word: a
//!   reader must never see another key's value (false key match) or words of two versions (torn value).
//! - Drop: threads run operations and exit while the map is dropped (the last reference dropped by the main
//!   thread, or by the last exiting worker).
//! - Memory: one thread adds keys, another deletes them, for `NOLOCK_HTAB_RSS_SECS` seconds (default 3 per
//!   map); the map's memory and the process's resident memory in the second half stay within a bound of the
//!   first half's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock_bpf::htab::{Backend, HashMap, HtabAttr, LockMode, NolockReuse, UpdateFlags};
use nolock_bpf::memalloc::RefillMode;
use testkit::reports::NoReports;

const WORDS: usize = 8;

/// The tests of this file run one at a time (the memory test reads the process's resident memory).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn pattern(key: u64, version: u64) -> [u8; WORDS * 8] {
    let w = (key << 40) ^ version;
    let mut v = [0u8; WORDS * 8];
    for i in 0..WORDS {
        v[i * 8..i * 8 + 8].copy_from_slice(&w.to_ne_bytes());
    }
    v
}

fn check(key: u64, v: &[u8]) -> Result<(), String> {
    let w0 = u64::from_ne_bytes(v[0..8].try_into().unwrap());
    for i in 1..WORDS {
        let w = u64::from_ne_bytes(v[i * 8..i * 8 + 8].try_into().unwrap());
        if w != w0 {
            return Err(format!("torn value for key {key}: word 0 {w0:#x}, word {i} {w:#x}"));
        }
    }
    if w0 >> 40 != key {
        return Err(format!("false key match: key {key} returned the value of key {}", w0 >> 40));
    }
    Ok(())
}

fn torture(backend: Backend, lock: LockMode, dur: Duration) -> (u64, u64, u64) {
    let m = Arc::new(HashMap::new(HtabAttr::new(8, WORDS * 8, 64).backend(backend).lock(lock)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();
    for t in 0..2u64 {
        let (m, stop) = (m.clone(), stop.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = testkit::rand::Rng::new(t + 1);
            let mut ver = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let k = rng.next_u64() % 48;
                ver += 1;
                match rng.next_u64() % 3 {
                    0 => {
                        let _ = m.delete(&k.to_ne_bytes());
                    }
                    _ => {
                        let _ = m.update(&k.to_ne_bytes(), &pattern(k, ver), UpdateFlags::Any);
                    }
                }
            }
        }));
    }
    for t in 0..2u64 {
        let (m, stop, reads) = (m.clone(), stop.clone(), reads.clone());
        hs.push(std::thread::spawn(move || {
            let mut rng = testkit::rand::Rng::new(t + 100);
            let mut out = [0u8; WORDS * 8];
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let k = rng.next_u64() % 48;
                if m.lookup_copy(&k.to_ne_bytes(), &mut out).is_ok() {
                    check(k, &out).unwrap();
                    n += 1;
                }
            }
            reads.fetch_add(n, Ordering::Relaxed);
        }));
    }
    std::thread::sleep(dur);
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    let s = m.stats();
    (reads.load(Ordering::Relaxed), s.nulls_restarts, s.version_restarts)
}

#[test]
fn no_false_key_match_no_torn_value() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = NoReports::new();
    let mut restarts = 0;
    for (b, l) in [
        (Backend::Prealloc, LockMode::Rqspin),
        (Backend::BpfMemAlloc(RefillMode::AtRegionEnd), LockMode::Rqspin),
        (Backend::Nolock(NolockReuse::TypesafeImmediate), LockMode::Rqspin),
        (Backend::Nolock(NolockReuse::TypesafeImmediate), LockMode::LockFree),
        (Backend::Nolock(NolockReuse::AfterRcu), LockMode::LockFree),
    ] {
        let (reads, nulls, versions) = torture(b, l, Duration::from_millis(500));
        eprintln!("{:>9} {l:?}: {reads} checked reads, {nulls} nulls restarts, {versions} version restarts", b.name());
        assert!(reads > 0);
        restarts += nulls + versions;
    }
    eprintln!("restarts over all maps: {restarts}");
    nr.check("torture");
}

#[test]
fn map_dropped_while_threads_exit() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = NoReports::new();
    static D: nolock::SrcuFast = nolock::SrcuFast::new();
    for b in [
        Backend::Prealloc,
        Backend::BpfMemAlloc(RefillMode::AtRegionEnd),
        Backend::Nolock(NolockReuse::TypesafeImmediate),
        Backend::Nolock(NolockReuse::AfterRcu),
        Backend::Nolock(NolockReuse::AfterSrcu(&D)),
    ] {
        for lock in [LockMode::Rqspin, LockMode::LockFree] {
            for last_on_worker in [false, true] {
                let m = Arc::new(HashMap::new(HtabAttr::new(8, 16, 256).backend(b).lock(lock)).unwrap());
                let hs: Vec<_> = (0..4u64)
                    .map(|t| {
                        let m = m.clone();
                        std::thread::spawn(move || {
                            for i in 0..2000u64 {
                                let k = (t * 1000 + i % 300).to_ne_bytes();
                                let _ = m.update(&k, &[t as u8; 16], UpdateFlags::Any);
                                if i % 2 == 1 {
                                    let _ = m.delete(&k);
                                }
                            }
                            // The thread exits holding its reference; the drop of the last one may be here.
                            drop(m);
                        })
                    })
                    .collect();
                if !last_on_worker {
                    drop(m);
                    for h in hs {
                        h.join().unwrap();
                    }
                } else {
                    let keep = m.clone();
                    drop(m);
                    let h2 = std::thread::spawn(move || drop(keep));
                    for h in hs {
                        h.join().unwrap();
                    }
                    h2.join().unwrap();
                }
            }
        }
    }
    nr.check("drop while threads exit");
}

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()).unwrap_or(0) * 4096
}

#[test]
fn memory_bounded_over_cross_thread_add_delete() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nr = NoReports::new();
    let secs = std::env::var("NOLOCK_HTAB_RSS_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(3.0);
    for (b, l) in [
        (Backend::Nolock(NolockReuse::TypesafeImmediate), LockMode::Rqspin),
        (Backend::Nolock(NolockReuse::TypesafeImmediate), LockMode::LockFree),
        (Backend::Nolock(NolockReuse::AfterRcu), LockMode::LockFree),
    ] {
        let m = Arc::new(HashMap::new(HtabAttr::new(4, 256, 8192).backend(b).lock(l)).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let hs: Vec<_> = (0..2)
            .map(|t| {
                let (m, stop) = (m.clone(), stop.clone());
                std::thread::spawn(move || {
                    let v = [7u8; 256];
                    while !stop.load(Ordering::Relaxed) {
                        for k in 0..64u32 {
                            if t == 0 {
                                let _ = m.update(&k.to_ne_bytes(), &v, UpdateFlags::Any);
                            } else {
                                let _ = m.delete(&k.to_ne_bytes());
                            }
                        }
                    }
                })
            })
            .collect();
        let start = Instant::now();
        let total = Duration::from_secs_f64(secs);
        let (mut first_map, mut second_map, mut first_rss, mut second_rss) = (0, 0, 0, 0);
        while start.elapsed() < total {
            std::thread::sleep(Duration::from_millis(20));
            let (mm, rss) = (m.mem_measured(), rss_bytes());
            if start.elapsed() < total / 2 {
                first_map = first_map.max(mm);
                first_rss = first_rss.max(rss);
            } else {
                second_map = second_map.max(mm);
                second_rss = second_rss.max(rss);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.join().unwrap();
        }
        eprintln!(
            "{:>9} {l:?}: map memory peak {} KiB then {} KiB; RSS peak {} KiB then {} KiB",
            b.name(),
            first_map / 1024,
            second_map / 1024,
            first_rss / 1024,
            second_rss / 1024
        );
        // Bounded: the second half holds no more than twice the first half's peak plus 8 MiB (grace periods
        // and the worker's timing move the figures; a leak grows without bound).
        assert!(second_map <= 2 * first_map + (8 << 20), "{b:?}/{l:?}: map memory grows");
        assert!(second_rss <= 2 * first_rss + (32 << 20), "{b:?}/{l:?}: resident memory grows");
        drop(m);
    }
    nr.check("memory bounded");
}
