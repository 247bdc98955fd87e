//! Signal handler installation, signal sets and the thread's signal mask.

use std::io;

/// The signature of an `SA_SIGINFO` handler.
pub type Handler = extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void);

/// Flags every handler gets: three-argument handler, interrupted system calls restart.
pub const BASE_FLAGS: libc::c_int = libc::SA_SIGINFO | libc::SA_RESTART;

/// A signal set holding `sigs`.
///
/// # Context
/// Any context: fills a stack value, no system call.
pub fn sigset_of(sigs: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid object for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: as above; an invalid signal number only makes sigaddset fail.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Install `handler` for `sig` with `BASE_FLAGS | extra_flags` (e.g. `SA_ONSTACK`, `SA_NODEFER`) and an empty
/// mask (other signals may interrupt the handler). Returns the action it replaced.
///
/// # Context
/// Normal context: one `sigaction` system call.
pub fn try_install_handler(
    sig: libc::c_int,
    handler: Handler,
    extra_flags: libc::c_int,
) -> io::Result<libc::sigaction> {
    // SAFETY: an all-zero `sigaction` is a valid value (no handler, empty mask, no flags); we then fill it in.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as usize;
    sa.sa_flags = BASE_FLAGS | extra_flags;
    sa.sa_mask = sigset_of(&[]);
    // SAFETY: as above, for the out-value.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `sa` is fully initialised; the handler is an `extern "C"` function of the SA_SIGINFO signature
    // that lives for the whole program; `old` is a valid out-pointer.
    if unsafe { libc::sigaction(sig, &sa, &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(old)
}

/// As [`try_install_handler`], for tests: panics if `sigaction` fails, and leaves the handler installed.
///
/// # Context
/// Normal context: one `sigaction` system call; panics on failure.
#[track_caller]
pub fn install_handler(sig: libc::c_int, handler: Handler, extra_flags: libc::c_int) {
    if let Err(e) = try_install_handler(sig, handler, extra_flags) {
        panic!("sigaction({sig}): {e}");
    }
}

/// Actions replaced by [`SavedActions::install`], put back when it is dropped.
pub struct SavedActions {
    saved: Vec<(libc::c_int, libc::sigaction)>,
}

impl SavedActions {
    /// Install `handler` for every signal of `sigs` as [`try_install_handler`] does (`extra_flags` added to
    /// `BASE_FLAGS`, empty mask: the signals may nest into each other's handlers). On an error the actions
    /// already replaced are put back.
    ///
    /// # Context
    /// Normal context: `sigaction` system calls, allocates.
    pub fn install(sigs: &[libc::c_int], handler: Handler, extra_flags: libc::c_int) -> io::Result<Self> {
        let mut this = Self { saved: Vec::with_capacity(sigs.len()) };
        for &sig in sigs {
            // On an error `this` is dropped, which puts back what was replaced so far.
            let old = try_install_handler(sig, handler, extra_flags)?;
            this.saved.push((sig, old));
        }
        Ok(this)
    }
}

impl Drop for SavedActions {
    fn drop(&mut self) {
        for (sig, old) in self.saved.iter().rev() {
            // SAFETY: restoring an action that sigaction returned for this signal.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

/// Block (`true`) or unblock (`false`) `sig` in the calling thread.
///
/// # Context
/// Any context: one `rt_sigprocmask` system call; panics only if it fails (an invalid signal number).
#[track_caller]
pub fn block_signal(sig: libc::c_int, block: bool) {
    let rc = block_signals(&[sig], block);
    assert_eq!(rc, 0, "pthread_sigmask");
}

/// Block (`true`) or unblock (`false`) every signal of `sigs` in the calling thread. Returns
/// `pthread_sigmask`'s result (0 or an error number).
///
/// # Context
/// Any context, signal handlers included: one `rt_sigprocmask` system call, no allocation, no lock.
pub fn block_signals(sigs: &[libc::c_int], block: bool) -> libc::c_int {
    let set = sigset_of(sigs);
    let how = if block { libc::SIG_BLOCK } else { libc::SIG_UNBLOCK };
    // SAFETY: `set` is initialised; a null old-set pointer is allowed; only this thread's mask changes.
    unsafe { libc::pthread_sigmask(how, &set, std::ptr::null_mut()) }
}
