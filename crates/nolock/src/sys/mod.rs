//! The OS layer: every system call nolock makes goes through this module.
//!
//! Everything here is a thin wrapper over one raw system call (or a libc function that is one). The functions
//! marked *async-signal-safe* below may run on any `*_nolock` path: they never allocate, never take a lock and
//! never touch errno-dependent global state beyond the calling thread's own `errno`. The others
//! (`spawn_thread`-like helpers live elsewhere) are normal-context only.

use core::ffi::CStr;
use core::fmt;
use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use core::time::Duration;

pub mod membarrier;

/// The base page size nolock is built for. Checked against the running kernel at arena set-up.
pub const PAGE_SHIFT: u32 = 12;
/// `1 << PAGE_SHIFT`.
pub const PAGE_SIZE: usize = 1 << PAGE_SHIFT;

/// Reserve `len` bytes of address space, readable and writable, backed lazily by zero pages and not counted
/// against the commit limit (`MAP_NORESERVE`). Returns `None` when the kernel refuses.
///
/// Async-signal-safe (one `mmap` system call).
pub fn mmap_reserve(len: usize) -> Option<*mut u8> {
    // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing memory.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED { None } else { Some(p.cast()) }
}

/// Reserve `len` bytes of address space with no access at all (`PROT_NONE`, `MAP_NORESERVE`): nothing is
/// committed, nothing can be touched, and `mlockall(MCL_FUTURE)` has nothing to fault in. Parts are made usable
/// with [`mprotect_rw`]. Returns the `errno` when the kernel refuses.
///
/// Async-signal-safe (one `mmap` system call).
pub fn mmap_none(len: usize) -> Result<*mut u8, i32> {
    // SAFETY: an anonymous private mapping at a kernel-chosen address touches no existing memory.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED { Err(errno()) } else { Ok(p.cast()) }
}

/// [`mmap_reserve`] that says why it failed (the `errno`). Async-signal-safe (one `mmap` system call).
pub fn mmap_reserve_err(len: usize) -> Result<*mut u8, i32> {
    mmap_reserve(len).ok_or_else(errno)
}

/// Make `[ptr, ptr + len)`, part of a [`mmap_none`] reservation, readable and writable. Under
/// `mlockall(MCL_CURRENT)` on that range the kernel also faults it in. Returns the `errno` on failure.
///
/// Async-signal-safe (one `mprotect` system call, which takes the process's `mmap` lock in the kernel: it can
/// sleep briefly while another thread maps or unmaps memory, but never waits for user space).
///
/// # Safety
/// The range must be page aligned and inside a reservation this process made and owns.
pub unsafe fn mprotect_rw(ptr: *mut u8, len: usize) -> Result<(), i32> {
    // SAFETY: forwarded from the caller; widening the protection of our own anonymous memory changes no content.
    if unsafe { libc::mprotect(ptr.cast(), len, libc::PROT_READ | libc::PROT_WRITE) } == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// Make `[ptr, ptr + len)`, part of a [`mmap_none`] reservation, readable only: reads fault in the shared zero
/// page (no memory is committed), writes fault. Returns the `errno` on failure. Async-signal-safe (one
/// `mprotect` system call).
///
/// # Safety
/// The range must be page aligned and inside a reservation this process made and owns, and nothing may be
/// writing to it.
pub unsafe fn mprotect_read(ptr: *mut u8, len: usize) -> Result<(), i32> {
    // SAFETY: forwarded from the caller.
    if unsafe { libc::mprotect(ptr.cast(), len, libc::PROT_READ) } == 0 { Ok(()) } else { Err(errno()) }
}

/// Lock `[ptr, ptr + len)` in memory (`mlock`: faults it in and keeps it resident). Returns the `errno` on
/// failure (`ENOMEM`/`EAGAIN`: over `RLIMIT_MEMLOCK`; `EPERM`: not allowed).
///
/// Async-signal-safe (one system call; like [`mprotect_rw`] it takes the `mmap` lock, and it zero-fills the
/// pages it faults in).
///
/// # Safety
/// The range must be page aligned and mapped by this process.
pub unsafe fn mlock(ptr: *mut u8, len: usize) -> Result<(), i32> {
    // SAFETY: forwarded from the caller; locking changes no content.
    if unsafe { libc::mlock(ptr.cast(), len) } == 0 { Ok(()) } else { Err(errno()) }
}

/// Unlock `[ptr, ptr + len)` (`munlock`). Used on fresh `PROT_NONE` reservations that `mlockall(MCL_FUTURE)`
/// marked locked, so that the kernel does not count the whole reservation as locked memory.
/// Async-signal-safe (one system call).
///
/// # Safety
/// The range must be page aligned and mapped by this process.
pub unsafe fn munlock(ptr: *mut u8, len: usize) {
    // SAFETY: forwarded from the caller; unlocking changes no content.
    unsafe { libc::munlock(ptr.cast(), len) };
}

/// Whether new mappings of this process are locked at once (`mlockall(MCL_FUTURE)` is in effect): a fresh
/// one-page readable and writable mapping is resident before it is ever touched. `MCL_FUTURE | MCL_ONFAULT`
/// is not detected (such mappings are resident only once touched).
///
/// Async-signal-safe (`mmap`, `mincore`, `munmap`).
pub fn mcl_future_in_effect() -> bool {
    let Some(p) = mmap_reserve(PAGE_SIZE) else {
        return false;
    };
    let mut vec = 0u8;
    // SAFETY: `p` is our fresh one-page mapping; `vec` has room for its one page.
    let rc = unsafe { libc::mincore(p.cast(), PAGE_SIZE, &mut vec) };
    // SAFETY: our own mapping, used by nothing else.
    unsafe { munmap(p, PAGE_SIZE) };
    rc == 0 && vec & 1 != 0
}

/// Fault in `[ptr, ptr + len)` writable without changing its contents (`MADV_POPULATE_WRITE`, Linux 5.14).
/// Returns the `errno` on failure (`EINVAL`: kernel too old).
///
/// Normal context: it can take long (it zero-fills every page it faults in).
///
/// # Safety
/// The range must be page aligned, readable and writable, inside a private anonymous mapping.
pub unsafe fn madvise_populate_write(ptr: *mut u8, len: usize) -> Result<(), i32> {
    // SAFETY: forwarded from the caller; populating private anonymous memory changes no content.
    if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) } == 0 { Ok(()) } else { Err(errno()) }
}

/// The address-space limit (`RLIMIT_AS`, `ulimit -v`) in bytes, `None` when unlimited. Async-signal-safe.
pub fn address_space_limit() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid rlimit to fill in.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// Give a mapping made by [`mmap_reserve`] back. Async-signal-safe.
///
/// # Safety
/// `[ptr, ptr + len)` must be a range this process mapped and no longer uses.
pub unsafe fn munmap(ptr: *mut u8, len: usize) {
    // SAFETY: the caller owns the range and promises nothing refers to it any more.
    unsafe { libc::munmap(ptr.cast(), len) };
}

/// Drop the physical pages behind `[ptr, ptr + len)`; the next touch sees zero-filled pages.
/// Returns the `errno` when the kernel refused (the memory then stays resident but intact; `EINVAL` for
/// locked memory).
///
/// # Safety
/// The range must be page aligned, inside a private anonymous mapping, and nobody may be using its contents.
pub unsafe fn madvise_dontneed(ptr: *mut u8, len: usize) -> Result<(), i32> {
    // SAFETY: forwarded from the caller; MADV_DONTNEED on private anonymous memory only discards contents.
    if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) } == 0 { Ok(()) } else { Err(errno()) }
}

/// The kernel's page size. Async-signal-safe.
pub fn kernel_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// The calling thread's kernel thread id. Async-signal-safe (raw `gettid`).
pub fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// The process id. Async-signal-safe.
pub fn getpid() -> i32 {
    // SAFETY: getpid has no preconditions and cannot fail.
    unsafe { libc::getpid() }
}

/// Whether thread `tid` of this process still exists (`tgkill(pid, tid, 0)` does not fail with ESRCH).
/// Async-signal-safe.
pub fn thread_alive(tid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence and permission; nothing is delivered.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, getpid(), tid, 0) };
    r == 0 || errno() != libc::ESRCH
}

/// Restores the calling thread's `errno` when dropped: system calls made on a path that may run in a signal
/// handler must not change the `errno` of the code they interrupted.
pub struct ErrnoGuard(i32);

impl ErrnoGuard {
    /// Remember the current `errno`. Async-signal-safe.
    pub fn save() -> Self {
        Self(errno())
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
        unsafe { *libc::__errno_location() = self.0 };
    }
}

/// The calling thread's `errno`. Async-signal-safe.
pub fn errno() -> i32 {
    // SAFETY: __errno_location returns the calling thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

/// Sleep until `word` no longer holds `expected`, a wake-up arrives, or `timeout` passes. Spurious wake-ups are
/// possible; callers re-check their condition. Blocks: normal context only.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout
        .map(|d| libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long });
    let ts_ptr = ts.as_ref().map_or(core::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, aligned 32-bit atomic; the kernel only reads it. A private futex is enough because
    // the word is never shared across processes.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG, expected, ts_ptr)
    };
}

/// Wake up to `n` threads sleeping in [`futex_wait`] on `word`. Async-signal-safe (one system call, no locks).
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic; FUTEX_WAKE does not dereference it in user space.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, n) };
}

/// Read an environment variable without allocating. Returns the bytes of its value.
///
/// Async-signal-safe as long as no other thread is calling `setenv` at the same moment (the same rule as
/// `getenv` itself); nolock only reads its configuration once, at first use.
pub fn getenv(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv returns either null or a pointer into the environment block, which lives for the process.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: a non-null getenv result is a NUL-terminated string that stays valid (see above).
    Some(unsafe { CStr::from_ptr(p) }.to_bytes())
}

/// Write all of `bytes` to standard error with raw `write(2)`: no lock, no buffer, no allocation.
/// Async-signal-safe.
pub fn write_stderr(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: `rest` is a valid readable buffer of the given length.
        let n = unsafe { libc::write(2, rest.as_ptr().cast(), rest.len()) };
        if n <= 0 {
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// A fixed-size text buffer on the stack, for formatting messages on paths that must not allocate.
/// Text that does not fit is cut off and marked with `...`.
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> StackBuf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self { buf: [0; N], len: 0, truncated: false }
    }

    /// The text written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text written so far, as a string (it is always valid UTF-8 up to a possible cut inside a character,
    /// which is replaced by the cut marker).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(self.as_bytes()) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: from_utf8 reported that the bytes up to valid_up_to() are valid UTF-8.
                unsafe { core::str::from_utf8_unchecked(&self.buf[..e.valid_up_to()]) }
            }
        }
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N.saturating_sub(self.len + 4);
        let take = s.len().min(room);
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        if take < s.len() && !self.truncated {
            self.truncated = true;
            let end = (self.len + 3).min(N);
            self.buf[self.len..end].copy_from_slice(&b"..."[..end - self.len]);
            self.len = end;
        }
        Ok(())
    }
}

/// Resident set size of this process in bytes, from the kernel's own accounting (`/proc/self/statm`).
/// Normal context: opens a file. Returns `None` where procfs is not mounted.
pub fn resident_bytes() -> Option<usize> {
    let mut buf = [0u8; 128];
    // SAFETY: the path is a NUL-terminated literal; the descriptor is closed below.
    let fd = unsafe { libc::open(c"/proc/self/statm".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `buf` is writable for its whole length; `fd` is open.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: `fd` was opened above and is not used afterwards.
    unsafe { libc::close(fd) };
    if n <= 0 {
        return None;
    }
    let text = &buf[..n as usize];
    let mut fields = text.split(|&b| b == b' ');
    fields.next()?;
    let rss_pages = parse_u64(fields.next()?)?;
    Some(rss_pages as usize * kernel_page_size())
}

/// Parse an unsigned decimal number with an optional binary suffix (`K`, `M`, `G`, `T`, case-insensitive,
/// optionally followed by `iB`/`B`). Used for sizes given in environment variables. Never allocates.
pub fn parse_size(text: &[u8]) -> Option<u64> {
    let text = trim_ascii(text);
    let digits = text.iter().take_while(|b| b.is_ascii_digit()).count();
    let n = parse_u64(&text[..digits])?;
    let unit = trim_ascii(&text[digits..]);
    let shift = match unit.first().map(u8::to_ascii_uppercase) {
        None => 0,
        Some(b'K') => 10,
        Some(b'M') => 20,
        Some(b'G') => 30,
        Some(b'T') => 40,
        Some(b'B') if unit.len() == 1 => 0,
        _ => return None,
    };
    match unit.get(1..).unwrap_or(&[]) {
        [] | [b'B' | b'b'] | [b'i' | b'I', b'B' | b'b'] => {}
        _ => return None,
    }
    n.checked_mul(1u64 << shift)
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest
        } else {
            break;
        }
    }
    s
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// Spawn `run` as thread `name` unless `running` already holds this process's pid. One starter wins; a pid
/// left from before a `fork` counts as "not running" (the thread does not exist in the child).
///
/// # Context
/// Normal context only: spawns a thread.
pub fn start_once(running: &AtomicI32, name: &str, run: fn()) {
    let pid = getpid();
    let cur = running.load(Ordering::Acquire);
    if cur == pid {
        return;
    }
    // AcqRel: one starter per process.
    if running.compare_exchange(cur, pid, Ordering::AcqRel, Ordering::Acquire).is_err() {
        return;
    }
    if std::thread::Builder::new().name(name.into()).spawn(run).is_err() {
        // Release: pairs with the Acquire load in `start_once`/`is_running`: the start failed, another may try.
        running.store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn parse_sizes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"16G"), Some(16 << 30));
        assert_eq!(parse_size(b" 512m "), Some(512 << 20));
        assert_eq!(parse_size(b"1GiB"), Some(1 << 30));
        assert_eq!(parse_size(b"2KB"), Some(2048));
        assert_eq!(parse_size(b"12Q"), None);
        assert_eq!(parse_size(b""), None);
        assert_eq!(parse_size(b"G"), None);
        assert_eq!(parse_size(b"99999999999999999999"), None);
        assert_eq!(parse_size(b"20000000T"), None);
    }

    #[test]
    fn stack_buf_truncates() {
        let mut b = StackBuf::<16>::new();
        write!(b, "hello {}", 42).unwrap();
        assert_eq!(b.as_str(), "hello 42");
        write!(b, " and a lot more text").unwrap();
        assert!(b.as_str().ends_with("..."));
        assert!(b.as_bytes().len() <= 16);
    }

    #[test]
    fn resident_and_tid() {
        assert!(resident_bytes().unwrap() > 0);
        assert!(thread_alive(gettid()));
        assert_eq!(kernel_page_size(), PAGE_SIZE);
    }
}
