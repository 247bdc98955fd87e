//! The nolock API for C (`include/nolock.h`): kmalloc, caches, RCU, SRCU-fast.
//!
//! Every function keeps the context rules of the nolock function it wraps: the `*_nolock` functions, `ksize`,
//! `rcu_read_lock` / `rcu_read_unlock` and `srcu_read_lock_fast` / `srcu_read_unlock_fast` may be called from
//! any context; those with a `# Context` section below may not.

use core::alloc::Layout;
use core::cell::UnsafeCell;
use core::ffi::{CStr, c_char, c_int, c_uint, c_void};
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use nolock::{Gfp, KmemCache, RcuHead, RcuReadGuard, SlabFlags, SrcuFast, SrcuFastGuard};

use crate::{say, set_errno};

/// `NOLOCK_GFP_ZERO`: zero the memory.
pub const GFP_ZERO: c_uint = 1;
/// `NOLOCK_SLAB_TYPESAFE_BY_RCU`.
pub const SLAB_TYPESAFE_BY_RCU: c_uint = 1;
/// `NOLOCK_SLAB_DEBUG`.
pub const SLAB_DEBUG: c_uint = 4;
/// `NOLOCK_SLAB_HARDENED`.
pub const SLAB_HARDENED: c_uint = 8;

fn gfp(flags: c_uint) -> Gfp {
    if flags & GFP_ZERO != 0 { Gfp::ZERO } else { Gfp::NONE }
}

fn out(p: Option<NonNull<u8>>) -> *mut c_void {
    p.map_or(core::ptr::null_mut(), |p| p.as_ptr().cast())
}

/// `kmalloc_nolock(size, flags)`: see `nolock::kmalloc_nolock` (size 0 gives `ZERO_SIZE_PTR`, 16).
#[unsafe(no_mangle)]
pub extern "C" fn kmalloc_nolock(size: usize, flags: c_uint) -> *mut c_void {
    crate::malloc::configure();
    out(nolock::kmalloc_nolock(size, gfp(flags)))
}

/// `kfree_nolock(p)`.
///
/// # Safety
/// `p` is null, `ZERO_SIZE_PTR` or a live nolock object not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kfree_nolock(p: *mut c_void) {
    // SAFETY: forwarded from the caller.
    unsafe { nolock::kfree_nolock(p.cast()) }
}

/// `ksize(p)`.
#[unsafe(no_mangle)]
pub extern "C" fn ksize(p: *const c_void) -> usize {
    nolock::ksize(p.cast())
}

/// `kmem_cache_create(name, size, align, flags)`: null with `errno` `EINVAL` (bad size, alignment or flags)
/// or `ENOSPC` (all caches in use) or `ENOMEM`.
///
/// # Safety
/// `name` is null or a NUL-terminated string.
///
/// # Context
/// Normal context only (as `KmemCache::new`: may map memory and start the background worker).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kmem_cache_create(
    name: *const c_char,
    size: usize,
    align: usize,
    flags: c_uint,
) -> *mut KmemCache {
    let name = if name.is_null() {
        "c-cache"
    } else {
        // SAFETY: the caller gives a NUL-terminated string.
        unsafe { CStr::from_ptr(name) }.to_str().unwrap_or("c-cache")
    };
    crate::malloc::configure();
    let Ok(layout) = Layout::from_size_align(size, align.max(1)) else {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    };
    if flags & !(SLAB_TYPESAFE_BY_RCU | SLAB_DEBUG | SLAB_HARDENED) != 0 {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    let mut sf = SlabFlags::NONE;
    if flags & SLAB_TYPESAFE_BY_RCU != 0 {
        sf = sf | SlabFlags::TYPESAFE_BY_RCU;
    }
    let b =
        KmemCache::builder(name, layout).flags(sf).debug(flags & SLAB_DEBUG != 0).hardened(flags & SLAB_HARDENED != 0);
    match b.build() {
        Ok(c) => Box::into_raw(Box::new(c)),
        Err(e) => {
            set_errno(match e {
                nolock::CacheError::TooManyCaches => libc::ENOSPC,
                nolock::CacheError::NoArena => libc::ENOMEM,
                _ => libc::EINVAL,
            });
            core::ptr::null_mut()
        }
    }
}

/// `kmem_cache_alloc_nolock(cache, flags)`.
///
/// # Safety
/// `cache` is a live cache from `kmem_cache_create`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kmem_cache_alloc_nolock(cache: *const KmemCache, flags: c_uint) -> *mut c_void {
    // SAFETY: the caller gives a live cache.
    out(unsafe { &*cache }.alloc_nolock(gfp(flags)))
}

/// `kmem_cache_alloc(cache, flags)`: the same as [`kmem_cache_alloc_nolock`].
///
/// # Safety
/// As [`kmem_cache_alloc_nolock`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kmem_cache_alloc(cache: *const KmemCache, flags: c_uint) -> *mut c_void {
    // SAFETY: forwarded.
    unsafe { kmem_cache_alloc_nolock(cache, flags) }
}

/// `kmem_cache_free_nolock(cache, p)`: null is ignored; an object of another cache is reported, not freed.
///
/// # Safety
/// `cache` is a live cache; `p` is null or a live object not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kmem_cache_free_nolock(cache: *const KmemCache, p: *mut c_void) {
    if let Some(p) = NonNull::new(p.cast::<u8>()) {
        // SAFETY: forwarded from the caller.
        unsafe { (*cache).free_nolock(p) }
    }
}

/// `kmem_cache_free(cache, p)`: the same as [`kmem_cache_free_nolock`].
///
/// # Safety
/// As [`kmem_cache_free_nolock`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kmem_cache_free(cache: *const KmemCache, p: *mut c_void) {
    // SAFETY: forwarded.
    unsafe { kmem_cache_free_nolock(cache, p) }
}

/// `kmem_cache_destroy(cache)`: returns the number of objects still allocated (0 when all were freed; else
/// their slabs are kept and the problem is reported). Null is ignored.
///
/// # Safety
/// `cache` is null or a cache from `kmem_cache_create`, not used afterwards.
///
/// # Context
/// Normal context only: blocks while a shrink runs elsewhere.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kmem_cache_destroy(cache: *mut KmemCache) -> u64 {
    if cache.is_null() {
        return 0;
    }
    // SAFETY: the caller gives up a cache from `kmem_cache_create` (a leaked Box).
    let c = unsafe { Box::from_raw(cache) };
    c.destroy().live_objects
}

// ---------------------------------------------------------------------------------------------------------------
// RCU

/// How deeply `rcu_read_lock` may nest on one thread.
pub const RCU_NEST_MAX: usize = 16;

/// This thread's open RCU sections: `rcu_read_lock` returns nothing to C, so the guards are kept here, a stack
/// that signal handlers may push onto and pop from while they interrupt it (the depth is claimed with one
/// atomic RMW on a thread-local word before the slot is written; a handler returns balanced).
struct RcuStack {
    depth: AtomicUsize,
    guards: [UnsafeCell<MaybeUninit<RcuReadGuard>>; RCU_NEST_MAX],
}

thread_local! {
    static RCU_STACK: RcuStack = const {
        RcuStack { depth: AtomicUsize::new(0), guards: [const { UnsafeCell::new(MaybeUninit::uninit()) }; RCU_NEST_MAX] }
    };
}

/// `rcu_read_lock()`: enter a read-side section; sections nest (at most [`RCU_NEST_MAX`] deep: deeper aborts
/// with a message).
#[unsafe(no_mangle)]
pub extern "C" fn rcu_read_lock() {
    let g = nolock::rcu_read_lock();
    RCU_STACK.with(|s| {
        let d = s.depth.fetch_add(1, Ordering::Relaxed);
        if d >= RCU_NEST_MAX {
            say(b"nolock: rcu_read_lock nested more than 16 deep\n");
            std::process::abort();
        }
        // SAFETY: slot `d` is ours: the depth was claimed above, and a handler that interrupts us claims the
        // slots above it and releases them before returning.
        unsafe { (*s.guards[d].get()).write(g) };
    });
}

/// `rcu_read_unlock()`: leave the innermost section. Without an open section: reported, nothing done.
#[unsafe(no_mangle)]
pub extern "C" fn rcu_read_unlock() {
    RCU_STACK.with(|s| {
        let d = s.depth.load(Ordering::Relaxed);
        if d == 0 {
            say(b"nolock: rcu_read_unlock without rcu_read_lock on this thread; ignored\n");
            return;
        }
        // SAFETY: slot `d - 1` holds the guard its `rcu_read_lock` wrote (depth `d` says it is filled); we take
        // it out before giving the slot up.
        let g = unsafe { (*s.guards[d - 1].get()).assume_init_read() };
        s.depth.fetch_sub(1, Ordering::Relaxed);
        drop(g);
    });
}

/// `rcu_read_lock_held()`: whether this thread is inside a read-side section (1) or not (0).
#[unsafe(no_mangle)]
pub extern "C" fn rcu_read_lock_held() -> c_int {
    c_int::from(nolock::rcu_read_lock_held())
}

/// `synchronize_rcu()`.
///
/// # Context
/// Normal context only: blocks for a grace period; must not be called inside a read-side section (aborts).
#[unsafe(no_mangle)]
pub extern "C" fn synchronize_rcu() {
    nolock::synchronize_rcu();
}

/// `rcu_barrier()`: wait until every callback queued before has run.
///
/// # Context
/// Normal context only: blocks.
#[unsafe(no_mangle)]
pub extern "C" fn rcu_barrier() {
    nolock::rcu_barrier();
}

/// The C `struct rcu_head`: nolock's 16-byte head, then the C callback.
#[repr(C)]
pub struct CRcuHead {
    head: RcuHead,
    func: Option<unsafe extern "C" fn(*mut CRcuHead)>,
}

/// Runs a C callback queued by `call_rcu_nolock` / `call_srcu_fast_nolock`.
///
/// # Safety
/// `head` is the first field of a `CRcuHead` whose `func` was set when it was queued.
unsafe fn trampoline(head: NonNull<RcuHead>) {
    let c = head.cast::<CRcuHead>().as_ptr();
    // SAFETY: `head` is the first field of the `CRcuHead` given to the queueing call (repr(C)).
    if let Some(f) = unsafe { (*c).func } {
        // SAFETY: the C caller's callback, called with its head as promised.
        unsafe { f(c) }
    }
}

/// `call_rcu_nolock(head, func)`: run `func(head)` on the grace-period worker after a grace period.
///
/// # Safety
/// `head` stays valid and untouched until `func` runs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn call_rcu_nolock(head: *mut CRcuHead, func: Option<unsafe extern "C" fn(*mut CRcuHead)>) {
    let Some(h) = NonNull::new(head) else { return };
    // SAFETY: the caller gives a head it does not touch until the callback has run.
    unsafe {
        (*h.as_ptr()).func = func;
        nolock::call_rcu_nolock(h.cast(), trampoline);
    }
}

/// `kfree_rcu_nolock(ptr, head)`: free `ptr` (from `kmalloc_nolock`, a cache or `malloc`) after a grace period.
/// `head` is a `struct rcu_head` inside the object.
///
/// # Safety
/// As `nolock::kfree_rcu_nolock`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kfree_rcu_nolock(ptr: *mut c_void, head: *mut CRcuHead) {
    let Some(h) = NonNull::new(head) else { return };
    // SAFETY: forwarded from the caller.
    unsafe { nolock::kfree_rcu_nolock(ptr.cast(), h.cast()) }
}

// ---------------------------------------------------------------------------------------------------------------
// SRCU-fast

/// What `srcu_read_lock_fast` returns: the section's guard, opaque to C, given back to `srcu_read_unlock_fast`.
#[repr(C)]
pub struct SrcuFastCtr {
    opaque: [MaybeUninit<usize>; 3],
}

const _: () = assert!(
    core::mem::size_of::<SrcuFastGuard<'static>>() <= core::mem::size_of::<SrcuFastCtr>()
        && core::mem::align_of::<SrcuFastGuard<'static>>() <= core::mem::align_of::<SrcuFastCtr>(),
    "struct srcu_fast_ctr in nolock.h must grow"
);

/// `srcu_fast_create()`: a new SRCU-fast domain.
///
/// # Context
/// Normal context only (allocates).
#[unsafe(no_mangle)]
pub extern "C" fn srcu_fast_create() -> *mut SrcuFast {
    Box::into_raw(Box::new(SrcuFast::new()))
}

/// `srcu_fast_destroy(d)`: run its pending callbacks and free it. Null is ignored.
///
/// # Safety
/// `d` is null or from `srcu_fast_create`, with no section open, not used afterwards.
///
/// # Context
/// Normal context only: waits for the domain's callbacks.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn srcu_fast_destroy(d: *mut SrcuFast) {
    if !d.is_null() {
        // SAFETY: the caller gives up a domain from `srcu_fast_create` (a leaked Box).
        drop(unsafe { Box::from_raw(d) });
    }
}

/// `srcu_read_lock_fast(d)`: enter a read-side section of `d` (it may sleep); give the result to
/// `srcu_read_unlock_fast` on the same thread.
///
/// # Safety
/// `d` is a live domain that outlives the section.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn srcu_read_lock_fast(d: *const SrcuFast) -> SrcuFastCtr {
    // SAFETY: the caller keeps the domain alive until the section ends.
    let g: SrcuFastGuard<'static> = unsafe { &*d }.read_lock_fast();
    let mut c = SrcuFastCtr { opaque: [MaybeUninit::uninit(); 3] };
    // SAFETY: `opaque` is large and aligned enough for the guard (checked at compile time above).
    unsafe { c.opaque.as_mut_ptr().cast::<SrcuFastGuard<'static>>().write(g) };
    c
}

/// `srcu_read_unlock_fast(d, ctr)`: leave the section `ctr` came from. A `ctr` of another domain is reported
/// (and its own section is left).
///
/// # Safety
/// `ctr` came from `srcu_read_lock_fast` on this thread and is given back exactly once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn srcu_read_unlock_fast(d: *const SrcuFast, ctr: SrcuFastCtr) {
    // SAFETY: `ctr` holds a guard written by `srcu_read_lock_fast`, read back once (caller).
    let g = unsafe { ctr.opaque.as_ptr().cast::<SrcuFastGuard<'static>>().read() };
    // SAFETY: the caller gives a live domain.
    if !g.is_of(unsafe { &*d }) {
        say(b"nolock: srcu_read_unlock_fast given a section of another domain\n");
    }
    drop(g);
}

/// `synchronize_srcu_fast(d)`: wait until every section of `d` that began before has ended.
///
/// # Safety
/// `d` is a live domain.
///
/// # Context
/// Normal context only: blocks for as long as the longest such reader.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn synchronize_srcu_fast(d: *const SrcuFast) {
    // SAFETY: the caller gives a live domain.
    unsafe { &*d }.synchronize();
}

/// `call_srcu_fast_nolock(d, head, func)`: run `func(head)` after a grace period of `d`.
///
/// # Safety
/// `d` is a live domain; `head` stays valid and untouched until `func` runs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn call_srcu_fast_nolock(
    d: *const SrcuFast,
    head: *mut CRcuHead,
    func: Option<unsafe extern "C" fn(*mut CRcuHead)>,
) {
    let Some(h) = NonNull::new(head) else { return };
    // SAFETY: the caller gives a live domain and a head it does not touch until the callback has run.
    unsafe {
        (*h.as_ptr()).func = func;
        (*d).call_srcu_fast_nolock(h.cast(), trampoline);
    }
}

/// `kfree_srcu_fast_nolock(d, ptr, head)`: free `ptr` after a grace period of `d`.
///
/// # Safety
/// As `nolock::kfree_srcu_fast_nolock`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kfree_srcu_fast_nolock(d: *const SrcuFast, ptr: *mut c_void, head: *mut CRcuHead) {
    let Some(h) = NonNull::new(head) else { return };
    // SAFETY: forwarded from the caller.
    unsafe { nolock::kfree_srcu_fast_nolock(&*d, ptr.cast(), h.cast()) }
}

/// `srcu_barrier_fast(d)`: wait until every callback queued on `d` before has run.
///
/// # Safety
/// `d` is a live domain.
///
/// # Context
/// Normal context only: blocks.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn srcu_barrier_fast(d: *const SrcuFast) {
    // SAFETY: the caller gives a live domain.
    unsafe { &*d }.barrier();
}

// ---------------------------------------------------------------------------------------------------------------
// Process

/// `nolock_init()`: map the arena, register the hooks and start the grace-period worker, and the background
/// worker if `NOLOCK_BACKGROUND=1` (this library turns it off by default; see `nolock::init`).
///
/// # Context
/// Normal context only: may spawn threads.
#[unsafe(no_mangle)]
pub extern "C" fn nolock_init() {
    nolock::init();
}

/// `nolock_trim()`: give free memory back to the OS now; returns the pages purged.
///
/// # Context
/// Normal context only: `madvise` system calls.
#[unsafe(no_mangle)]
pub extern "C" fn nolock_trim() -> usize {
    nolock::trim().pages_purged
}

/// `nolock_reports()`: problems nolock reported so far (refused frees, debug findings).
#[unsafe(no_mangle)]
pub extern "C" fn nolock_reports() -> u64 {
    nolock::debug::reports()
}
