//! liburcu's membarrier flavour (`urcu-memb`, Debian's `liburcu-dev` / `liburcu8`) as an optional baseline for
//! `nolock bench rcu`, built only with the `liburcu` cargo feature.
//!
//! The library is opened at run time with `dlopen`, so even a build with the feature needs nothing installed:
//! when `liburcu-memb.so.8` is missing the liburcu rows are skipped. Its fast paths are called through function
//! pointers (no `_LGPL_SOURCE` inlining), so each read-side lock and unlock pays an indirect call that the C
//! numbers in perf.md §3c do not.

use core::ffi::{CStr, c_void};
use std::sync::OnceLock;

/// `struct rcu_head` of liburcu: a `cds_wfcq_node` (one pointer) and the callback.
#[repr(C)]
pub struct UrcuHead {
    next: *mut c_void,
    func: Option<UrcuCallback>,
}

impl UrcuHead {
    /// An unused head.
    pub const fn new() -> Self {
        Self { next: core::ptr::null_mut(), func: None }
    }
}

/// A liburcu callback.
pub type UrcuCallback = unsafe extern "C" fn(*mut UrcuHead);

/// The entry points of `liburcu-memb`.
pub struct Urcu {
    read_lock: unsafe extern "C" fn(),
    read_unlock: unsafe extern "C" fn(),
    synchronize: unsafe extern "C" fn(),
    register_thread: unsafe extern "C" fn(),
    unregister_thread: unsafe extern "C" fn(),
    call_rcu: unsafe extern "C" fn(*mut UrcuHead, UrcuCallback),
    barrier: unsafe extern "C" fn(),
}

// SAFETY: plain function pointers into a library that stays loaded for the life of the process.
unsafe impl Sync for Urcu {}
// SAFETY: as above.
unsafe impl Send for Urcu {}

/// The library, if it could be loaded.
pub fn get() -> Option<&'static Urcu> {
    static LIB: OnceLock<Option<Urcu>> = OnceLock::new();
    LIB.get_or_init(load).as_ref()
}

fn load() -> Option<Urcu> {
    let mut handle = core::ptr::null_mut();
    for name in [c"liburcu-memb.so.8", c"liburcu-memb.so"] {
        // SAFETY: a valid C string; RTLD_NOW resolves everything now or fails.
        handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
    }
    if handle.is_null() {
        return None;
    }
    let sym = |name: &CStr| -> Option<*mut c_void> {
        // SAFETY: `handle` is a live dlopen handle (never closed); `name` is a valid C string.
        let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    // SAFETY (all transmutes below): each symbol is the liburcu 0.13 function of that name, whose C signature is
    // the one given (`void f(void)`, or `void call_rcu(struct rcu_head *, void (*)(struct rcu_head *))`).
    let void_fn = |name: &CStr| -> Option<unsafe extern "C" fn()> {
        // SAFETY: see above.
        sym(name).map(|p| unsafe { core::mem::transmute::<*mut c_void, unsafe extern "C" fn()>(p) })
    };
    let call_rcu = sym(c"urcu_memb_call_rcu")?;
    Some(Urcu {
        read_lock: void_fn(c"urcu_memb_read_lock")?,
        read_unlock: void_fn(c"urcu_memb_read_unlock")?,
        synchronize: void_fn(c"urcu_memb_synchronize_rcu")?,
        register_thread: void_fn(c"urcu_memb_register_thread")?,
        unregister_thread: void_fn(c"urcu_memb_unregister_thread")?,
        // SAFETY: see above.
        call_rcu: unsafe {
            core::mem::transmute::<*mut c_void, unsafe extern "C" fn(*mut UrcuHead, UrcuCallback)>(call_rcu)
        },
        barrier: void_fn(c"urcu_memb_barrier")?,
    })
}

/// A registered liburcu reader thread for as long as it lives (not `Send`).
pub struct Registration<'a> {
    lib: &'a Urcu,
    _not_send: core::marker::PhantomData<*mut ()>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // SAFETY: this thread registered in `Urcu::register` and is not inside a read-side section.
        unsafe { (self.lib.unregister_thread)() };
    }
}

/// A liburcu read-side section; ends when dropped.
pub struct ReadGuard<'a> {
    lib: &'a Urcu,
    _not_send: core::marker::PhantomData<*mut ()>,
}

impl Drop for ReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: pairs with the read_lock of `Urcu::read_lock` on this thread (the guard is not Send).
        unsafe { (self.lib.read_unlock)() };
    }
}

impl Urcu {
    /// Register the calling thread as a reader (required before any other call on it).
    pub fn register(&self) -> Registration<'_> {
        // SAFETY: registration has no preconditions; the guard unregisters on the same thread.
        unsafe { (self.register_thread)() };
        Registration { lib: self, _not_send: core::marker::PhantomData }
    }

    /// `rcu_read_lock`; the registration proves the thread is registered.
    #[inline]
    pub fn read_lock<'a>(&'a self, _reg: &Registration<'a>) -> ReadGuard<'a> {
        // SAFETY: the calling thread is registered (`_reg`).
        unsafe { (self.read_lock)() };
        ReadGuard { lib: self, _not_send: core::marker::PhantomData }
    }

    /// `synchronize_rcu` (not inside a read-side section: callers hold no guard).
    pub fn synchronize(&self, _reg: &Registration<'_>) {
        // SAFETY: registered thread, outside any read-side section.
        unsafe { (self.synchronize)() };
    }

    /// `call_rcu`.
    ///
    /// # Safety
    /// `head` stays valid and untouched until `func` runs; `func` is sound to call with it then.
    #[inline]
    pub unsafe fn call_rcu(&self, _reg: &Registration<'_>, head: *mut UrcuHead, func: UrcuCallback) {
        // SAFETY: registered thread (`_reg`); the head's contract is the caller's.
        unsafe { (self.call_rcu)(head, func) };
    }

    /// `rcu_barrier`: every callback queued before has run.
    pub fn barrier(&self, _reg: &Registration<'_>) {
        // SAFETY: registered thread, outside any read-side section.
        unsafe { (self.barrier)() };
    }
}

/// A liburcu callback that `free`s the head, which is the first field of a `malloc`ed object.
///
/// # Safety
/// `head` is at the start of a live `malloc` allocation that nobody else frees.
pub unsafe extern "C" fn free_head(head: *mut UrcuHead) {
    // SAFETY: forwarded from the caller.
    unsafe { libc::free(head.cast()) };
}
