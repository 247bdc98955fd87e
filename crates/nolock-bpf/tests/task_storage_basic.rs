//! Task storage: lifetimes (thread exit, map drop while owners exit), the same-thread F_CREATE race between a
//! thread and its own signal handler (a real signal raised at a hook point inside the creation), and the
//! per-CPU busy counter's spurious failure, reproduced deterministically.

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};

use nolock_bpf::task_storage::{
    self, GetFlags, HookPoint, Recursion, StorageAlloc, StorageConfig, StorageError, Task, TaskStorage,
};

type Map = TaskStorage<AtomicU64>;

/// Hook-based tests share the one hook, and `thread_exit_frees_the_storage` reads the process-wide storage
/// group: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn cfg(alloc: StorageAlloc, recursion: Recursion) -> StorageConfig {
    StorageConfig { alloc, recursion, ..Default::default() }
}

fn settle() {
    nolock::synchronize_rcu_tasks_trace();
    nolock::rcu_barrier_tasks_trace();
    nolock::rcu_barrier();
}

#[test]
fn thread_exit_frees_the_storage() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for alloc in StorageAlloc::ALL {
        let map = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
        // Frees still waiting for a grace period from earlier tests would land in the middle of this one.
        settle();
        let before_storage = task_storage::storage_group().current();
        let task = std::thread::scope(|s| {
            s.spawn(|| {
                let t = Task::current().unwrap();
                let v = map.get(&t, GetFlags::CREATE, || AtomicU64::new(7)).unwrap();
                assert_eq!(v.load(Ordering::Relaxed), 7);
                drop(v);
                // A second get finds the same element (no second creation).
                let v = map.get_current(GetFlags::NONE, || AtomicU64::new(0)).unwrap();
                assert_eq!(v.load(Ordering::Relaxed), 7);
                assert_eq!(map.stats().live(), 1);
                t
            })
            .join()
            .unwrap()
        });
        // The thread has exited: its destructor deleted the element; the handle still names the dead task.
        assert!(task.exited(), "{alloc:?}");
        let st = map.stats();
        assert_eq!((st.created, st.deleted, st.live()), (1, 1, 0), "{alloc:?}");
        assert_eq!(map.get(&task, GetFlags::CREATE, || AtomicU64::new(1)).err(), Some(StorageError::NoTask));
        let mut n = 0;
        map.for_each(|_, _| n += 1);
        assert_eq!(n, 0, "{alloc:?}: no element left in the map");
        settle();
        if alloc != StorageAlloc::BpfMemAlloc {
            // Freed back to kmalloc after the grace period (the BpfMemAlloc variant keeps them cached).
            assert_eq!(map.group().current(), 0, "{alloc:?}: element memory returned");
            assert_eq!(task_storage::storage_group().current(), before_storage, "{alloc:?}: storage returned");
        }
    }
}

#[test]
fn delete_then_create_again_and_iterate() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for alloc in StorageAlloc::ALL {
        for rec in Recursion::ALL {
            let a = Map::new(cfg(alloc, rec)).unwrap();
            let b = Map::new(cfg(alloc, rec)).unwrap();
            std::thread::scope(|s| {
                s.spawn(|| {
                    let t = Task::current().unwrap();
                    assert_eq!(a.delete(&t), Err(StorageError::NotFound));
                    a.get(&t, GetFlags::CREATE, || AtomicU64::new(1)).unwrap();
                    b.get(&t, GetFlags::CREATE, || AtomicU64::new(2)).unwrap();
                    a.delete(&t).unwrap();
                    assert_eq!(a.get(&t, GetFlags::NONE, || AtomicU64::new(0)).err(), Some(StorageError::NotFound));
                    assert_eq!(b.get(&t, GetFlags::NONE, || AtomicU64::new(0)).unwrap().load(Ordering::Relaxed), 2);
                    a.get(&t, GetFlags::CREATE, || AtomicU64::new(3)).unwrap();
                    let mut seen = Vec::new();
                    a.for_each(|id, v| seen.push((id, v.load(Ordering::Relaxed))));
                    assert_eq!(seen, vec![(t.id(), 3)], "{alloc:?} {rec:?}");
                })
                // `join` waits for the thread's exit destructors too (the end of a scope does not).
                .join()
                .unwrap();
            });
            assert_eq!(a.stats().live(), 0);
            assert_eq!(b.stats().live(), 0);
        }
    }
}

#[test]
fn another_thread_creates_for_a_task() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let map = Map::new(StorageConfig::default()).unwrap();
    let go = Barrier::new(2);
    let done = Barrier::new(2);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            tx.send(Task::current().unwrap()).unwrap();
            go.wait();
            done.wait();
            // Created by the other thread, seen here.
            assert_eq!(map.get_current(GetFlags::NONE, || AtomicU64::new(0)).unwrap().load(Ordering::Relaxed), 9);
        });
        let t = rx.recv().unwrap();
        go.wait();
        map.get(&t, GetFlags::CREATE, || AtomicU64::new(9)).unwrap();
        done.wait();
        h.join().unwrap();
    });
    assert_eq!(map.stats().live(), 0);
}

#[test]
fn map_dropped_while_its_owners_exit() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for alloc in StorageAlloc::ALL {
        for round in 0..20 {
            let keep = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
            let doomed = std::sync::Arc::new(Map::new(cfg(alloc, Recursion::Nolock)).unwrap());
            let threads = 8;
            let ready = Barrier::new(threads + 1);
            std::thread::scope(|s| {
                let mut hs = Vec::new();
                for i in 0..threads {
                    let (keep, doomed, ready) = (&keep, doomed.clone(), &ready);
                    hs.push(s.spawn(move || {
                        keep.get_current(GetFlags::CREATE, || AtomicU64::new(i as u64)).unwrap();
                        doomed.get_current(GetFlags::CREATE, || AtomicU64::new(100 + i as u64)).unwrap();
                        // The last reference to `doomed` is the main thread's: its drop runs there.
                        drop(doomed);
                        ready.wait();
                        // Exit now, while the main thread drops `doomed`.
                        for _ in 0..(round % 4) * 50 {
                            std::hint::spin_loop();
                        }
                    }));
                }
                ready.wait();
                drop(doomed);
                for h in hs {
                    h.join().unwrap();
                }
            });
            let st = keep.stats();
            assert_eq!((st.created, st.deleted), (threads as u64, threads as u64), "{alloc:?}");
            drop(keep);
        }
    }
    settle();
}

// ---------------------------------------------------------------------------------------------------------
// Same-thread signal handler at a hook point
// ---------------------------------------------------------------------------------------------------------

static MAP: AtomicPtr<Map> = AtomicPtr::new(std::ptr::null_mut());
/// Hook point at which to raise the signal (as `HookPoint as usize + 1`; 0: none); cleared once raised.
static FIRE_AT: AtomicUsize = AtomicUsize::new(0);
/// What the handler does: 1 get(CREATE, 2), 2 delete.
static ACTION: AtomicUsize = AtomicUsize::new(0);
/// The handler's result: 1 ok (value pointer in `HANDLER_PTR`), or 100 + error index.
static HANDLER_RESULT: AtomicUsize = AtomicUsize::new(0);
static HANDLER_PTR: AtomicUsize = AtomicUsize::new(0);

fn point_code(p: HookPoint) -> usize {
    match p {
        HookPoint::GetGuardHeld => 1,
        HookPoint::CreateBeforeLink => 2,
        HookPoint::CreateBeforePublish => 3,
        HookPoint::DeleteLocked => 4,
        _ => 99,
    }
}

fn hook(p: HookPoint) {
    if FIRE_AT.load(Ordering::Relaxed) == point_code(p) {
        FIRE_AT.store(0, Ordering::Relaxed);
        // SAFETY: raising a signal whose handler is installed; delivered to this thread before raise returns.
        unsafe { libc::raise(libc::SIGUSR1) };
    }
}

fn code_of(e: StorageError) -> usize {
    100 + StorageError::ALL.iter().position(|&x| x == e).unwrap()
}

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let m = MAP.load(Ordering::Acquire);
    if m.is_null() {
        return;
    }
    // SAFETY: the map outlives the test's raise.
    let map = unsafe { &*m };
    let r = match ACTION.load(Ordering::Relaxed) {
        1 => match map.get_current(GetFlags::CREATE, || AtomicU64::new(2)) {
            Ok(v) => {
                HANDLER_PTR.store(&*v as *const AtomicU64 as usize, Ordering::Relaxed);
                1
            }
            Err(e) => code_of(e),
        },
        _ => match Task::current().map(|t| map.delete(&t)) {
            Some(Ok(())) => 1,
            Some(Err(e)) => code_of(e),
            None => 99,
        },
    };
    HANDLER_RESULT.store(r, Ordering::Relaxed);
}

/// On a fresh thread: arm the signal at `at`, run `body` (the interrupted call), return the handler's result.
fn with_signal_at<R: Send>(map: &Map, at: HookPoint, action: usize, body: impl FnOnce(&Map) -> R + Send) -> (R, usize) {
    testkit::signal::install_handler(libc::SIGUSR1, handler, 0);
    MAP.store(map as *const Map as *mut Map, Ordering::Release);
    task_storage::set_hook(Some(hook));
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            let _ = Task::current();
            HANDLER_RESULT.store(0, Ordering::Relaxed);
            HANDLER_PTR.store(0, Ordering::Relaxed);
            ACTION.store(action, Ordering::Relaxed);
            FIRE_AT.store(point_code(at), Ordering::Relaxed);
            let r = body(map);
            assert_eq!(FIRE_AT.load(Ordering::Relaxed), 0, "the hook point {at:?} was reached");
            (r, HANDLER_RESULT.load(Ordering::Relaxed))
        })
        .join()
        .unwrap()
    });
    task_storage::set_hook(None);
    MAP.store(std::ptr::null_mut(), Ordering::Release);
    r
}

#[test]
fn f_create_race_with_own_handler_nolock() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for alloc in StorageAlloc::ALL {
        // First creation: the handler publishes the storage while the thread is about to; the thread's
        // compare-and-swap loses and it uses the handler's element (no -EAGAIN).
        // Creation on an existing storage: the same race on the owner list.
        for (at, pre) in [(HookPoint::CreateBeforePublish, None), (HookPoint::CreateBeforeLink, Some(()))] {
            let map = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
            let other = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
            let ((ptr, val, live), res) = with_signal_at(&map, at, 1, |map| {
                if pre.is_some() {
                    // The storage exists already (created through another map).
                    other.get_current(GetFlags::CREATE, || AtomicU64::new(5)).unwrap();
                }
                let v = map.get_current(GetFlags::CREATE, || AtomicU64::new(1)).unwrap();
                let mut live = 0;
                map.for_each(|_, _| live += 1);
                (&*v as *const AtomicU64 as usize, v.load(Ordering::Relaxed), live)
            });
            assert_eq!(res, 1, "{alloc:?} {at:?}: the handler's get(CREATE) succeeded");
            assert_eq!(ptr, HANDLER_PTR.load(Ordering::Relaxed), "{alloc:?} {at:?}: both got the same element");
            assert_eq!(val, 2, "{alloc:?} {at:?}: the handler's element won");
            assert_eq!(live, 1, "{alloc:?} {at:?}: exactly one element");
            let st = map.stats();
            assert_eq!((st.created, st.deleted), (1, 1), "{alloc:?} {at:?}: freed at thread exit");
            assert!(st.errors.iter().all(|&e| e == 0), "{alloc:?} {at:?}: no failure: {st:?}");
        }
    }
}

/// The first creation loses the race to publish the storage to a handler that creates in *another* map: the
/// interrupted call retries in the handler's storage with a new element, whose value must be the one its `init`
/// built (`init` runs once; the value moves from the undone element). Found by `single_step_maps.rs`: the new
/// element's value was never written.
#[test]
fn f_create_lost_to_another_map_keeps_the_value() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for alloc in StorageAlloc::ALL {
        let map = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
        let other = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
        let ((val, inits), res) = with_signal_at(&other, HookPoint::CreateBeforePublish, 1, |_| {
            let mut inits = 0;
            let v = map
                .get_current(GetFlags::CREATE, || {
                    inits += 1;
                    AtomicU64::new(0x5eed)
                })
                .unwrap();
            (v.load(Ordering::Relaxed), inits)
        });
        assert_eq!(res, 1, "{alloc:?}: the handler's get(CREATE) on the other map succeeded");
        assert_eq!((val, inits), (0x5eed, 1), "{alloc:?}: the value init built, init run once");
        assert_eq!(map.stats().created, 1, "{alloc:?}");
        assert_eq!(other.stats().storages_created, 1, "{alloc:?}: the handler's storage is the one");
    }
}

#[test]
fn f_create_race_with_own_handler_older_kernels() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // rqspinlock era: the first-creation race ends in -EAGAIN for the loser (the interrupted thread).
    let map = Map::new(cfg(StorageAlloc::KmallocNolock, Recursion::Rqspin)).unwrap();
    let (r, res) = with_signal_at(&map, HookPoint::CreateBeforePublish, 1, |map| {
        map.get_current(GetFlags::CREATE, || AtomicU64::new(1)).err()
    });
    assert_eq!(res, 1, "the handler created the storage");
    assert_eq!(r, Some(StorageError::Again), "the interrupted creation lost with -EAGAIN");
    // rqspinlock: the handler's creation finds the storage lock held by its own thread: -EDEADLK.
    let map = Map::new(cfg(StorageAlloc::KmallocNolock, Recursion::Rqspin)).unwrap();
    let other = Map::new(cfg(StorageAlloc::KmallocNolock, Recursion::Rqspin)).unwrap();
    let (r, res) = with_signal_at(&map, HookPoint::CreateBeforeLink, 1, |map| {
        other.get_current(GetFlags::CREATE, || AtomicU64::new(5)).unwrap();
        map.get_current(GetFlags::CREATE, || AtomicU64::new(1)).map(|v| v.load(Ordering::Relaxed)).ok()
    });
    assert_eq!(res, code_of(StorageError::Deadlock));
    assert_eq!(r, Some(1));
    assert_eq!(map.stats().errors_of(StorageError::Deadlock), 1);
}

#[test]
fn busy_counter_spurious_failure_reproduced() {
    let _reports = testkit::NoReports::new();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for alloc in StorageAlloc::ALL {
        // A handler's get(CREATE) lands while the thread is inside a get: NULL (Busy), although the handler's
        // own element does not even exist yet and nothing is wrong.
        let map = Map::new(cfg(alloc, Recursion::PerCpuBusy)).unwrap();
        let (r, res) = with_signal_at(&map, HookPoint::GetGuardHeld, 1, |map| {
            map.get_current(GetFlags::CREATE, || AtomicU64::new(1)).map(|v| v.load(Ordering::Relaxed)).ok()
        });
        assert_eq!(r, Some(1));
        assert_eq!(res, code_of(StorageError::Busy), "{alloc:?}: the old kernel's spurious NULL");
        assert_eq!(map.stats().errors_of(StorageError::Busy), 1);
        // And a handler's delete during a get: -EBUSY.
        let map = Map::new(cfg(alloc, Recursion::PerCpuBusy)).unwrap();
        let (_, res) = with_signal_at(&map, HookPoint::GetGuardHeld, 2, |map| {
            map.get_current(GetFlags::CREATE, || AtomicU64::new(1)).map(|v| v.load(Ordering::Relaxed)).ok()
        });
        assert_eq!(res, code_of(StorageError::Busy), "{alloc:?}: the old kernel's spurious -EBUSY");
        // The same interruption with the lock-free mode: the handler's get(CREATE) and delete succeed.
        let map = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
        let (_, res) = with_signal_at(&map, HookPoint::GetGuardHeld, 1, |map| {
            map.get_current(GetFlags::CREATE, || AtomicU64::new(1)).map(|v| v.load(Ordering::Relaxed)).ok()
        });
        assert_eq!(res, 1, "{alloc:?}: nolock: the handler's get(CREATE) succeeds");
        let map = Map::new(cfg(alloc, Recursion::Nolock)).unwrap();
        let (r, res) = with_signal_at(&map, HookPoint::DeleteLocked, 1, |map| {
            map.get_current(GetFlags::CREATE, || AtomicU64::new(1)).unwrap();
            let t = Task::current().unwrap();
            map.delete(&t)
        });
        assert_eq!(res, 1, "{alloc:?}: nolock: get(CREATE) inside a delete succeeds");
        assert_eq!(r, Ok(()));
    }
}
