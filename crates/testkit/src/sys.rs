//! Thread ids, thread-directed signals, raw standard error, and `errno` saving: the system calls a signal
//! handler may make.

use std::io;

/// The calling thread's kernel thread id.
///
/// # Context
/// Any context, signal handlers included: one `gettid` system call, no allocation, no lock.
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Send `sig` to thread `tid` of this process (`sig == 0`: only check that the thread exists).
///
/// # Context
/// Any context, signal handlers included: `getpid` and `tgkill` system calls, no allocation, no lock. The
/// error is built from `errno` without allocating.
pub fn tgkill(tid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: tgkill only sends a signal; a stale tid makes it fail with ESRCH.
    let rc = unsafe { libc::tgkill(libc::getpid(), tid, sig) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Write `bytes` to standard error with one raw `write(2)`, not captured by the test harness (for messages
/// right before `abort`). A failure or a short write is ignored.
///
/// # Context
/// Any context, signal handlers included: one `write` system call, no allocation, no lock, no stdio buffer.
pub fn raw_stderr(bytes: &[u8]) {
    // SAFETY: writing a valid buffer to fd 2; a failure is ignored.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// Saves `errno` when created and restores it when dropped: a signal handler must not change the `errno` of
/// the code it interrupted. Create it first thing in the handler (`let _errno = ErrnoGuard::new();`).
///
/// # Context
/// Any context, signal handlers included: a thread-local load and store, no system call.
pub struct ErrnoGuard(libc::c_int);

impl ErrnoGuard {
    /// Save the calling thread's errno.
    ///
    /// # Context
    /// Any context (see the type).
    pub fn new() -> Self {
        // SAFETY: __errno_location returns a valid pointer to this thread's errno.
        Self(unsafe { *libc::__errno_location() })
    }
}

impl Default for ErrnoGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_put_back() {
        // SAFETY: this thread's errno.
        unsafe { *libc::__errno_location() = 17 };
        {
            let _g = ErrnoGuard::new();
            // SAFETY: as above.
            unsafe { *libc::__errno_location() = 4 };
        }
        // SAFETY: as above.
        assert_eq!(unsafe { *libc::__errno_location() }, 17);
    }

    #[test]
    fn tgkill_zero_finds_this_thread() {
        assert!(tgkill(gettid(), 0).is_ok());
        assert_eq!(gettid(), libc_gettid());
    }

    fn libc_gettid() -> libc::pid_t {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }
}
