//! The slab layer's state (`slab::tables::SlabState`) is built by the process's first allocation and published
//! with one CAS. A signal handler can interrupt that build on the same thread and allocate: it then builds and
//! publishes a state of its own. The interrupted build must lose its CAS, unmap its copy and go on with the
//! handler's state — never publish over it, never use the copy it unmapped, never wait.
//!
//! The hook at `Point::SlabStateBuild` (tables mapped and kmalloc caches created, before the CAS) raises the
//! signal at exactly that moment. Both allocations must be good and belong to one state: the thread frees the
//! handler's object and allocates on; a thread still using the unmapped copy would fault.
//!
//! One test in this binary: it needs a process in which nolock has never allocated.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use nolock::hooks::{Point, set_hook};
use nolock::stats::{PageOwner, page_owner};
use nolock::{Gfp, kfree_nolock, kmalloc_nolock, ksize};

const SIG: libc::c_int = libc::SIGUSR1;

/// Set once the hook has raised the signal (it raises it once).
static RAISED: AtomicBool = AtomicBool::new(false);
/// The object the handler allocated (0: none, 1: the allocation failed).
static HANDLER_OBJ: AtomicUsize = AtomicUsize::new(0);

fn hook(at: Point) {
    if at == Point::SlabStateBuild && !RAISED.swap(true, Ordering::AcqRel) {
        // SAFETY: raising a signal with a handler installed, on this thread.
        unsafe { libc::raise(SIG) };
    }
}

extern "C" fn on_signal(_sig: libc::c_int) {
    let _errno = testkit::ErrnoGuard::new();
    let v = kmalloc_nolock(64, Gfp::ZERO).map_or(1, |p| p.as_ptr() as usize);
    HANDLER_OBJ.store(v, Ordering::Release);
}

#[test]
fn a_handler_that_builds_the_state_inside_an_interrupted_build_wins() {
    let _reports = testkit::NoReports::new();
    nolock::Config::new().background(false).apply().expect("nothing has called nolock yet in this process");
    // SAFETY: installing a plain handler for SIG; the struct is zeroed and then filled.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(SIG, &sa, core::ptr::null_mut()), 0);
    }
    set_hook(Some(hook));
    let outer = kmalloc_nolock(100, Gfp::ZERO).expect("the interrupted first allocation");
    set_hook(None);

    assert!(RAISED.load(Ordering::Acquire), "the first allocation built the slab state");
    let inner = HANDLER_OBJ.load(Ordering::Acquire);
    assert!(inner > 1, "the handler's allocation inside the interrupted build");
    assert_eq!(ksize(inner as *const u8), 64);
    assert!(ksize(outer.as_ptr()) >= 100);
    for p in [inner, outer.as_ptr() as usize] {
        assert!(matches!(page_owner(p as *const u8), PageOwner::Slab(_)), "{p:#x} is a slab object");
    }
    // Both objects are usable, and the thread frees the handler's object through the state it goes on with.
    // SAFETY: live objects of at least 64 and 100 bytes, each freed once.
    unsafe {
        core::ptr::write_bytes(inner as *mut u8, 0x5a, 64);
        core::ptr::write_bytes(outer.as_ptr(), 0xa5, 100);
        kfree_nolock(inner as *mut u8);
        kfree_nolock(outer.as_ptr());
    }
    for size in [8, 64, 100, 4096, 32_768] {
        let p = kmalloc_nolock(size, Gfp::ZERO).expect("allocation after the race");
        // SAFETY: our object, freed once.
        unsafe { kfree_nolock(p.as_ptr()) };
    }
}
