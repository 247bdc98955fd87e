//! Task storage under a signal storm whose handlers call `get(CREATE)` on the thread they interrupted (which
//! is itself looping over `get(CREATE)` and `delete`), for every allocator and recursion mode. The lock-free
//! mode must show zero failures of any kind (with the `kmalloc_nolock` allocators; `bpf_mem_alloc`'s nested
//! allocation may still return NULL, which is counted apart); every value seen belongs to the thread that
//! sees it. The older modes' failure counts are printed (the deterministic reproduction is in
//! `task_storage_basic`). Bounded in time; fails on any nolock report.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nolock_bpf::task_storage::{GetFlags, Recursion, StorageAlloc, StorageConfig, StorageError, Task, TaskStorage};
use testkit::storm::{self, StormSlot};

type Map = TaskStorage<AtomicU64>;

static MAP: AtomicPtr<Map> = AtomicPtr::new(std::ptr::null_mut());
static HANDLER_FAIL: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
static THREAD_FAIL: [AtomicU64; 7] = [const { AtomicU64::new(0) }; 7];
static WRONG_VALUE: AtomicU64 = AtomicU64::new(0);
static HANDLER_OPS: AtomicU64 = AtomicU64::new(0);
static THREAD_OPS: AtomicU64 = AtomicU64::new(0);

struct PerThread {
    slot: StormSlot,
    /// The value every element of this thread holds.
    stamp: u64,
}

fn idx(e: StorageError) -> usize {
    StorageError::ALL.iter().position(|&x| x == e).unwrap()
}

fn create(map: &Map, stamp: u64, fails: &[AtomicU64; 7]) {
    match map.get_current(GetFlags::CREATE, || AtomicU64::new(stamp)) {
        Ok(v) => {
            if v.load(Ordering::Relaxed) != stamp {
                WRONG_VALUE.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(e) => {
            fails[idx(e)].fetch_add(1, Ordering::Relaxed);
        }
    }
}

extern "C" fn handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the storm's sigev_value is the thread's PerThread, alive while its timers run.
    unsafe {
        storm::dispatch_timer_signal::<PerThread>(info, |st, overrun| {
            st.slot.count(overrun);
            let m = MAP.load(Ordering::Acquire);
            if !m.is_null() {
                create(&*m, st.stamp, &HANDLER_FAIL);
                HANDLER_OPS.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
}

fn storm(alloc: StorageAlloc, recursion: Recursion) -> ([u64; 7], [u64; 7], u64) {
    for c in HANDLER_FAIL.iter().chain(THREAD_FAIL.iter()) {
        c.store(0, Ordering::Relaxed);
    }
    let map = Box::new(Map::new(StorageConfig { alloc, recursion, ..Default::default() }).unwrap());
    MAP.store(&*map as *const Map as *mut Map, Ordering::Release);
    let threads = 2;
    let interval = storm::nominal_interval_ns(40_000, threads).unwrap();
    let deadline = Instant::now() + Duration::from_millis(600);
    let signals: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let map = &*map;
                s.spawn(move || {
                    let st = Box::new(PerThread { slot: StormSlot::new(), stamp: 1000 + t as u64 });
                    let me = Task::current().unwrap();
                    {
                        let _timers = st.slot.start(&*st as *const PerThread as *mut libc::c_void, interval).unwrap();
                        let mut i = 0u64;
                        while Instant::now() < deadline {
                            create(map, st.stamp, &THREAD_FAIL);
                            if i % 4 == 3 {
                                // The handler may have deleted nothing (it only creates): NotFound can only
                                // come from a lost race, which no mode has here.
                                if let Err(e) = map.delete(&me) {
                                    THREAD_FAIL[idx(e)].fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            i += 1;
                            THREAD_OPS.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    st.slot.signals()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    MAP.store(std::ptr::null_mut(), Ordering::Release);
    let load = |a: &[AtomicU64; 7]| {
        let mut o = [0u64; 7];
        for (i, c) in a.iter().enumerate() {
            o[i] = c.load(Ordering::Relaxed);
        }
        o
    };
    let live = map.stats().live();
    assert_eq!(live, 0, "{alloc:?} {recursion:?}: every element freed at thread exit");
    drop(map);
    (load(&HANDLER_FAIL), load(&THREAD_FAIL), signals)
}

#[test]
fn storm_get_create_on_the_interrupted_thread() {
    let _reports = testkit::NoReports::new();
    let _saved = storm::install_handler(handler).expect("install the storm handler");
    for alloc in StorageAlloc::ALL {
        for recursion in Recursion::ALL {
            let (h, t, signals) = storm(alloc, recursion);
            eprintln!(
                "{alloc:?}/{recursion:?}: {signals} signals; handler failures {:?}; thread failures {:?}",
                StorageError::ALL.iter().zip(h).filter(|(_, n)| *n > 0).collect::<Vec<_>>(),
                StorageError::ALL.iter().zip(t).filter(|(_, n)| *n > 0).collect::<Vec<_>>(),
            );
            assert!(signals > 50, "the storm ran");
            assert_eq!(WRONG_VALUE.load(Ordering::Relaxed), 0, "a thread saw another thread's value");
            if recursion == Recursion::Nolock {
                let allowed =
                    |i: usize| alloc == StorageAlloc::BpfMemAlloc && StorageError::ALL[i] == StorageError::NoMem;
                for i in 0..7 {
                    if !allowed(i) {
                        assert_eq!(h[i], 0, "{alloc:?}: nolock handler failed with {:?}", StorageError::ALL[i]);
                        assert_eq!(t[i], 0, "{alloc:?}: nolock thread failed with {:?}", StorageError::ALL[i]);
                    }
                }
            }
        }
    }
}
