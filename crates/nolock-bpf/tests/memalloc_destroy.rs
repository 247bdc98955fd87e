//! BpfMemAlloc destroy: with objects on every list (free, extra, free_by_rcu, extra_rcu, RCU and Tasks Trace
//! batches in flight, trimmed), the drop waits for the callbacks and gives every object back to kmalloc:
//! the allocator's kmalloc count equals its kfree count, its group is back to 0, and nolock's kmalloc
//! classes hold as many live objects as before.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use nolock::memcg::MemGroup;
use nolock_bpf::cpu::{IrqRegion, this_cpu};
use nolock_bpf::memalloc::{self, BpfMaConfig, BpfMemAlloc, HookPoint};

static MA: AtomicPtr<BpfMemAlloc> = AtomicPtr::new(std::ptr::null_mut());
static PENDING: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
static TID: AtomicU32 = AtomicU32::new(0);

fn hook(p: HookPoint) {
    if p != HookPoint::UnitFree || TID.load(Ordering::Relaxed) != testkit::gettid() as u32 {
        return;
    }
    TID.store(0, Ordering::Relaxed);
    // SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(libc::SIGUSR2) };
}

extern "C" fn handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the test keeps the allocator alive while armed.
    let ma = unsafe { &*MA.load(Ordering::Relaxed) };
    let _r = IrqRegion::enter();
    // SAFETY: objects handed over by the test.
    unsafe {
        ma.free(NonNull::new(PENDING[0].load(Ordering::Relaxed) as *mut u8).unwrap());
        ma.free_rcu(NonNull::new(PENDING[1].load(Ordering::Relaxed) as *mut u8).unwrap());
    }
}

fn live_kmalloc() -> u64 {
    let s = nolock::stats::snapshot();
    s.caches.iter().filter(|c| c.name.as_str().starts_with("kmalloc-")).map(|c| c.allocs - c.frees).sum()
}

#[test]
fn destroy_with_objects_on_every_list_frees_all() {
    let _reports = testkit::NoReports::new();
    let base = live_kmalloc();
    let group = Arc::new(MemGroup::new());
    let ma = BpfMemAlloc::new(None, BpfMaConfig { group: Some(group.clone()), ..Default::default() }).unwrap();
    MA.store(&ma as *const BpfMemAlloc as *mut BpfMemAlloc, Ordering::Relaxed);
    let _ = testkit::signal::try_install_handler(libc::SIGUSR2, handler, 0);
    let cpu = this_cpu().unwrap();
    // Every size class, many objects, some freed from another thread (tgt).
    let mut objs = Vec::new();
    for i in 0..3000usize {
        let _r = IrqRegion::enter();
        if let Some(p) = ma.alloc(1 + (i * 37) % 4000) {
            objs.push(p.as_ptr() as usize);
        }
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            for &p in objs.iter().take(1000) {
                let _r = IrqRegion::enter();
                // SAFETY: handed over.
                unsafe { ma.free(NonNull::new(p as *mut u8).unwrap()) };
            }
        });
    });
    // An RCU reader on another thread keeps the RCU callbacks in flight while we free_rcu; it lets go later.
    let release = Arc::new(AtomicU32::new(0));
    let r2 = release.clone();
    // Lets the reader go however the test ends (a failed assertion must not leave the drop waiting for it).
    struct Release(Arc<AtomicU32>);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.store(1, Ordering::Release);
        }
    }
    let release_guard = Release(release.clone());
    let reader = std::thread::spawn(move || {
        let _g = nolock::rcu_read_lock();
        while r2.load(Ordering::Acquire) == 0 {
            std::hint::spin_loop();
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    {
        let _r = IrqRegion::enter();
        for &p in objs[1000..2000].iter() {
            // SAFETY: from this allocator.
            unsafe { ma.free_rcu(NonNull::new(p as *mut u8).unwrap()) };
        }
        // Nested free and free_rcu: the extra lists.
        // Three objects of one size class: the handler frees two of them while the free of the third holds
        // the class's `active`.
        let n: Vec<_> = (0..3).map(|_| ma.alloc(100).unwrap()).collect();
        PENDING[0].store(n[0].as_ptr() as usize, Ordering::Relaxed);
        PENDING[1].store(n[1].as_ptr() as usize, Ordering::Relaxed);
        memalloc::set_hook(Some(hook));
        TID.store(testkit::gettid() as u32, Ordering::Relaxed);
        // SAFETY: from this allocator.
        unsafe { ma.free(n[2]) };
        memalloc::set_hook(None);
        let idx = nolock_bpf::memalloc::cache_idx(100 + 8).unwrap();
        let l = ma.lists(cpu, idx);
        assert_eq!((l.free_llist_extra, l.free_llist_extra_rcu), (1, 1), "{l:?}");
        // free_by_rcu is non-empty here (its irq_work has not run yet: same region).
        let any_rcu: usize = (0..11).map(|i| ma.lists(cpu, i).free_by_rcu).sum();
        assert!(any_rcu > 0);
    }
    // Objects 2000.. stay handed out until now, then freed: every list has something.
    {
        let _r = IrqRegion::enter();
        for &p in objs[2000..].iter() {
            // SAFETY: from this allocator.
            unsafe { ma.free(NonNull::new(p as *mut u8).unwrap()) };
        }
    }
    let s = ma.stats();
    assert!(s.kmallocs > s.kfrees);
    assert!(group.current() > 0);
    drop(release_guard);
    drop(ma);
    reader.join().unwrap();
    MA.store(std::ptr::null_mut(), Ordering::Relaxed);
    assert_eq!(group.current(), 0, "every object uncharged");
    assert!(group.peak() > 0);
    // Give back this thread's cached kmalloc objects before counting.
    nolock::trim();
    assert_eq!(live_kmalloc(), base, "nolock's kmalloc classes back to the baseline");
}
