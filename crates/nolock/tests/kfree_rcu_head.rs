//! `kfree_rcu_nolock` through the object's own `RcuHead`: the path taken when no pointer block can be used
//! (here: a thread past its exit destructor, which has no per-thread state any more).
//!
//! The object is freed by a real grace-period callback of the slab layer that finds the object the head lies
//! in through the page descriptors. Before, the RCU layer decoded "kfree the object `func - 1` bytes before the
//! head" from the callback word, which limited the head to the object's first 64 KiB and trusted the offset:
//!
//! - `head_deep_inside_a_large_object`: a head 100 KiB into a 200 KiB object was reported and the object
//!   leaked (this test failed: a report, and no large free);
//! - `head_outside_the_object_is_refused`: a head past the end of a 64-byte object (in the next slot) was
//!   queued anyway, using another object's memory as a list link, and the object was freed; now it is
//!   reported at once and the object is kept (leaked), never freed too early or through foreign memory.

use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use nolock::slab::kmalloc::large_stats;
use nolock::{Gfp, RcuHead, kfree_rcu_nolock, kmalloc_nolock, ksize, rcu_barrier};

static SERIAL: Mutex<()> = Mutex::new(());

/// What the late destructor retires: (object, offset of the head in it).
static OBJ: AtomicUsize = AtomicUsize::new(0);
static OFF: AtomicUsize = AtomicUsize::new(0);
static HAD_SLOT: AtomicUsize = AtomicUsize::new(0);

/// A pthread key destructor that runs after nolock's (keys are destroyed in creation order, and nolock creates
/// its key before `main`): the thread has no slot, so `kfree_rcu_nolock` cannot use a pointer block.
extern "C" fn late_exit(_value: *mut libc::c_void) {
    HAD_SLOT.store(usize::from(nolock::stats::thread_has_shard()), Ordering::Relaxed);
    let (obj, off) = (OBJ.load(Ordering::Relaxed), OFF.load(Ordering::Relaxed));
    let head = (obj + off) as *mut RcuHead;
    // SAFETY: `obj` is a live nolock object nobody else uses; `head` is 8-aligned memory we may write (inside
    // the object, or, in the refusal case, checked and refused before it is touched).
    unsafe { kfree_rcu_nolock(obj as *mut u8, NonNull::new_unchecked(head)) };
}

/// Retire `obj` with its head `off` bytes in, from a thread past its exit destructor; then `rcu_barrier`.
fn retire_through_head(obj: *mut u8, off: usize) {
    OBJ.store(obj as usize, Ordering::Relaxed);
    OFF.store(off, Ordering::Relaxed);
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; `late_exit` has the destructor signature.
    assert_eq!(unsafe { libc::pthread_key_create(&mut key, Some(late_exit)) }, 0);
    std::thread::spawn(move || {
        // A normal life first: the thread has a slot (kmalloc-8: a class the tests do not count).
        let p = kmalloc_nolock(8, Gfp::NONE).expect("memory");
        // SAFETY: ours.
        unsafe { nolock::kfree_nolock(p.as_ptr()) };
        // SAFETY: `key` is live; any non-null value makes the destructor run at exit (never dereferenced).
        unsafe { libc::pthread_setspecific(key, NonNull::<u8>::dangling().as_ptr().cast()) };
    })
    .join()
    .expect("thread");
    // SAFETY: the only thread that set a value has exited.
    unsafe { libc::pthread_key_delete(key) };
    assert_eq!(HAD_SLOT.load(Ordering::Relaxed), 0, "nolock's exit destructor ran before the late one");
    rcu_barrier();
}

#[test]
fn head_deep_inside_a_large_object() {
    let reports = testkit::NoReports::new();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    let size = 200 << 10;
    let p = kmalloc_nolock(size, Gfp::NONE).expect("memory").as_ptr();
    assert!(ksize(p) >= size);
    let frees = large_stats().frees;
    retire_through_head(p, 100 << 10);
    assert_eq!(large_stats().frees - frees, 1, "the object was freed after the grace period");
    // A head in the object's first page, and one in a slab object, as before.
    let frees = large_stats().frees;
    retire_through_head(kmalloc_nolock(size, Gfp::NONE).expect("memory").as_ptr(), 64);
    assert_eq!(large_stats().frees - frees, 1);
    let small = kmalloc_nolock(256, Gfp::NONE).expect("memory").as_ptr();
    let before = nolock::stats::snapshot().cache("kmalloc-256").expect("class").frees;
    retire_through_head(small, 200);
    assert_eq!(nolock::stats::snapshot().cache("kmalloc-256").expect("class").frees - before, 1);
    reports.check("retire through heads inside their objects");
}

#[test]
fn head_outside_the_object_is_refused() {
    let _expected = testkit::reports_expected();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    nolock::init();
    // Two neighbours in the same slab: the head of the first is given inside the second.
    let a = kmalloc_nolock(64, Gfp::NONE).expect("memory").as_ptr();
    let b = kmalloc_nolock(64, Gfp::NONE).expect("memory").as_ptr();
    let (lo, hi) = if (a as usize) < (b as usize) { (a, b) } else { (b, a) };
    let off = hi as usize - lo as usize;
    assert!(off >= ksize(lo), "neighbours");
    // SAFETY: `hi` is ours: mark it to see that nothing writes into it.
    unsafe { std::ptr::write_bytes(hi, 0xa5, 64) };
    let reports = nolock::debug::reports();
    let before = nolock::stats::snapshot().cache("kmalloc-64").expect("class").frees;
    retire_through_head(lo, off);
    assert_eq!(nolock::debug::reports() - reports, 1, "the bad head was reported");
    assert_eq!(
        nolock::stats::snapshot().cache("kmalloc-64").expect("class").frees,
        before,
        "the object was not freed (leaked instead)"
    );
    // SAFETY: `hi` is still ours.
    assert!(unsafe { std::slice::from_raw_parts(hi, 64) }.iter().all(|&x| x == 0xa5), "the neighbour is intact");
    // SAFETY: ours; `lo` stays leaked.
    unsafe { nolock::kfree_nolock(hi) };
}
