//! Alternate signal stacks.

use std::io;
use std::marker::PhantomData;

/// An alternate signal stack for the calling thread (`sigaltstack`); on drop the previous one is put back.
/// Not `Send`: it must be dropped by the thread that created it.
///
/// Rust's standard library already gives every thread a small alternate stack (a few pages, for its
/// stack-overflow message); a handler installed with `SA_ONSTACK` runs there unless the thread installs a
/// bigger one like this, and nested handlers overflow it quickly.
///
/// # Context
/// Normal context (creation maps memory, drop unmaps it); never from a handler running on this stack.
pub struct AltStack {
    base: *mut libc::c_void,
    len: usize,
    old: libc::stack_t,
    _not_send: PhantomData<*mut ()>,
}

impl AltStack {
    /// Map `len` bytes and make them this thread's alternate signal stack (for handlers with `SA_ONSTACK`).
    ///
    /// # Context
    /// Normal context: `mmap` and `sigaltstack` system calls; panics if either fails.
    #[track_caller]
    pub fn new(len: usize) -> Self {
        // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap of a signal stack");
        let ss = libc::stack_t { ss_sp: base, ss_flags: 0, ss_size: len };
        let mut old = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: 0, ss_size: 0 };
        // SAFETY: `ss` describes memory we just mapped and keep mapped until `drop` has replaced the stack;
        // `old` is a valid out-pointer.
        let rc = unsafe { libc::sigaltstack(&ss, &mut old) };
        assert_eq!(rc, 0, "sigaltstack: {}", io::Error::last_os_error());
        Self { base, len, old, _not_send: PhantomData }
    }
}

impl Drop for AltStack {
    fn drop(&mut self) {
        let mut ss = self.old;
        if ss.ss_sp.is_null() || ss.ss_flags & libc::SS_DISABLE != 0 {
            ss = libc::stack_t { ss_sp: std::ptr::null_mut(), ss_flags: libc::SS_DISABLE, ss_size: 0 };
        } else {
            ss.ss_flags = 0;
        }
        // SAFETY: puts back the stack that was installed before (still mapped: its owner frees it at thread
        // exit) or disables ours; we are not running on ours (not in a handler).
        let rc = unsafe { libc::sigaltstack(&ss, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "sigaltstack(restore): {}", io::Error::last_os_error());
        // SAFETY: the stack is no longer installed, so no handler can run on it; the mapping is ours.
        unsafe { libc::munmap(self.base, self.len) };
    }
}
