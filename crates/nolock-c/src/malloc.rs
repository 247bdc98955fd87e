//! The malloc family over nolock, with glibc's semantics where C leaves a choice:
//!
//! - every block is aligned to 16 (`alignof(max_align_t)`); `malloc(0)` returns a unique pointer;
//! - a failure returns null with `errno = ENOMEM` (`calloc` overflow too);
//! - `realloc(NULL, n)` is `malloc(n)`; `realloc(p, 0)` frees `p` and returns null; a failed `realloc` leaves
//!   `p` untouched; a block that stays at least half used is kept, a smaller one moves to a smaller size
//!   class or gives its tail pages back; a block of a page or more grows by half again at least (see
//!   [`realloc`]);
//! - `posix_memalign` returns `EINVAL` unless the alignment is a power of two multiple of `sizeof(void *)`,
//!   `ENOMEM` when out of memory, and leaves `*memptr` alone on failure;
//! - `aligned_alloc` with an alignment that is not a power of two returns null with `EINVAL` (glibc 2.38 and
//!   later); `memalign` rounds such an alignment up to the next power of two (glibc); `valloc` and `pvalloc`
//!   align to the page (`pvalloc` also rounds the size up to it);
//! - `malloc_usable_size` is the size of the block's class (or page run); 0 for null and foreign pointers;
//! - a pointer nolock does not own given to `free` is leaked and counted (see the crate documentation);
//!   `realloc` of one copies what can be read of it into a new block;
//! - a freed block of 128 KiB or more gives its pages back to the OS at once (see [`free`]). (kmalloc's classes
//!   are four per power of two up to 32 KiB, so SQLite's 4 KiB-and-a-header page-cache blocks take 5 KiB; with
//!   the old power-of-two classes they took 8 KiB and this library kept a 5 KiB class of its own.)
//!
//! Every function here may be called from a signal handler, including one that interrupted any of them on the
//! same thread (the crate's default context), except `malloc_trim` (normal context).

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use nolock::{Gfp, kfree_nolock, kmalloc_layout_nolock, kmalloc_nolock, ksize};

use crate::set_errno;

/// The alignment of every block `malloc` returns: `alignof(max_align_t)` on x86-64 and aarch64.
pub const MALLOC_ALIGN: usize = 16;

const PAGE_SIZE: usize = 4096;

/// Foreign pointers given to `free` or `realloc` (leaked).
static FOREIGN_FREES: AtomicU64 = AtomicU64::new(0);

/// Whether [`configure`] ran.
static CONFIGURED: AtomicBool = AtomicBool::new(false);

/// Before nolock's first initialisation (the process's first `malloc`, usually from the C library or the
/// loader, before this library's constructor): turn nolock's background worker off unless
/// `NOLOCK_BACKGROUND=1`, so that a program gets no thread it did not ask for (a thread turns on glibc's stdio
/// locking and makes `unshare(CLONE_NEWUSER)` fail).
#[inline(always)]
pub(crate) fn configure() {
    if !CONFIGURED.load(Ordering::Relaxed) {
        configure_cold();
    }
}

/// [`configure`]'s work. Under an address-space limit (`ulimit -v`, `RLIMIT_AS`) and without `NOLOCK_ARENA_SIZE`, the arena takes
/// half of the limit (at most nolock's default of 16 GiB), leaving the rest to the program's own mappings:
/// reserving the default would fail, and every allocation with it.
#[cold]
#[inline(never)]
fn configure_cold() {
    let on = crate::env_is(c"NOLOCK_BACKGROUND", b"1");
    let mut cfg = nolock::Config::new().background(on);
    // SAFETY: getenv with a NUL-terminated name; only compared with null.
    if unsafe { libc::getenv(c"NOLOCK_ARENA_SIZE".as_ptr()) }.is_null() {
        let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: `rl` is a valid out-parameter.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) } == 0 && rl.rlim_cur != libc::RLIM_INFINITY {
            let half = usize::try_from(rl.rlim_cur / 2).unwrap_or(usize::MAX);
            cfg = cfg.arena_size(half.clamp(16 << 20, nolock::DEFAULT_ARENA_SIZE) & !(PAGE_SIZE - 1));
        }
    }
    // Already initialised (another thread got here first): nothing to change.
    let _ = cfg.apply();
    CONFIGURED.store(true, Ordering::Relaxed);
}

#[cold]
fn enomem() -> *mut c_void {
    set_errno(libc::ENOMEM);
    core::ptr::null_mut()
}

/// `size` bytes aligned to 16: `kmalloc_nolock` of the size rounded up to a multiple of 16, whose class is
/// aligned to at least 16 (nolock keeps the natural alignment of the size's lowest set bit).
#[inline(always)]
fn alloc16(size: usize, flags: Gfp) -> *mut c_void {
    configure();
    let Some(n) = size.max(1).checked_next_multiple_of(MALLOC_ALIGN) else {
        return enomem();
    };
    match kmalloc_nolock(n, flags) {
        Some(p) => p.as_ptr().cast(),
        None => enomem(),
    }
}

/// `size` bytes aligned to `align` (a power of two).
fn alloc_aligned(size: usize, align: usize) -> *mut c_void {
    configure();
    if align <= MALLOC_ALIGN {
        return alloc16(size, Gfp::NONE);
    }
    let Ok(layout) = Layout::from_size_align(size.max(1), align) else {
        return enomem();
    };
    match kmalloc_layout_nolock(layout, Gfp::NONE) {
        Some(p) => p.as_ptr().cast(),
        None => enomem(),
    }
}

#[inline(always)]
fn owned(p: *const c_void) -> bool {
    nolock::stats::in_arena(p.cast())
}

#[cold]
#[inline(never)]
fn foreign_free() {
    FOREIGN_FREES.fetch_add(1, Ordering::Relaxed);
}

/// `malloc(3)`.
#[unsafe(no_mangle)]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    alloc16(size, Gfp::NONE)
}

/// `free(3)`. Null is ignored; a pointer nolock does not own is leaked (see the crate documentation); a bad
/// pointer inside the arena (double free, interior pointer) is reported on standard error by nolock and not
/// freed. A block of at least 128 KiB first gives its pages back (one `madvise`; the threshold then follows
/// glibc's dynamic mmap threshold, see `RELEASE_THRESHOLD`).
///
/// # Safety
/// `p` is null or a block of this allocator that is not used afterwards.
///
/// # Context
/// Any context, like every function here, but a free of a block of at least the threshold makes one
/// `madvise(MADV_DONTNEED)` system call (async-signal-safe, never blocks on a lock).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if owned(p) {
        // SAFETY: an arena pointer the caller gives up.
        unsafe { free_owned(p) }
    } else if !p.is_null() {
        foreign_free();
    }
}

/// Blocks of at least this many bytes give their pages back to the OS when freed (`madvise(MADV_DONTNEED)`
/// before the free), as glibc unmaps its large blocks: 128 KiB at first, then, like glibc's dynamic mmap
/// threshold, the size of the largest block released so far (up to 32 MiB), so that a program that keeps
/// allocating and freeing blocks of one size reuses them instead of faulting them in again.
static RELEASE_THRESHOLD: AtomicUsize = AtomicUsize::new(128 << 10);
const RELEASE_THRESHOLD_MAX: usize = 32 << 20;

/// Free a block of the arena.
///
/// # Safety
/// `p` is in the arena; the caller gives it up.
#[inline(always)]
unsafe fn free_owned(p: *mut c_void) {
    // Only page runs can reach the threshold, and they start on a page: one test keeps every other free on
    // the fast path.
    if (p as usize).is_multiple_of(PAGE_SIZE) {
        // SAFETY: forwarded.
        return unsafe { free_page_aligned(p) };
    }
    // SAFETY: forwarded.
    unsafe { kfree_nolock(p.cast()) }
}

/// # Safety
/// As [`free_owned`].
#[cold]
#[inline(never)]
unsafe fn free_page_aligned(p: *mut c_void) {
    let n = ksize(p.cast());
    let threshold = RELEASE_THRESHOLD.load(Ordering::Relaxed);
    if n >= threshold {
        let saved = errno();
        // SAFETY: the block is ours until the free below and its contents are dead: dropping its pages first
        // means no other thread can have been given them yet.
        unsafe { libc::madvise(p, n, libc::MADV_DONTNEED) };
        set_errno(saved);
        if n > threshold && n <= RELEASE_THRESHOLD_MAX {
            RELEASE_THRESHOLD.fetch_max(n, Ordering::Relaxed);
        }
    }
    // SAFETY: forwarded.
    unsafe { kfree_nolock(p.cast()) }
}

/// `calloc(3)`: zeroed; `n * size` overflowing gives null with `ENOMEM`.
#[unsafe(no_mangle)]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        Some(total) => alloc16(total, Gfp::ZERO),
        None => enomem(),
    }
}

/// `realloc(3)` with glibc's semantics (see the module documentation).
///
/// # Safety
/// `p` is null or a live block of this allocator (or one nolock does not own, see the module documentation).
///
/// # Context
/// Any context; system calls as [`free`] when the old block is freed, and one `process_vm_readv` per page
/// copied when `p` is a block nolock does not own.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return alloc16(size, Gfp::NONE);
    }
    if size == 0 {
        // SAFETY: forwarded from the caller (glibc frees and returns null).
        unsafe { free(p) };
        return core::ptr::null_mut();
    }
    if !owned(p) {
        // SAFETY: forwarded from the caller.
        return unsafe { realloc_foreign(p, size) };
    }
    let usable = ksize(p.cast());
    if usable == 0 {
        // Not the start of a live object: nolock reports it; the caller keeps nothing new.
        // SAFETY: kfree_nolock refuses (and reports) a pointer that is no live object, freeing nothing.
        unsafe { kfree_nolock(p.cast()) };
        return enomem();
    }
    if size <= usable {
        // Keep the block when at least half of it stays in use, so that shrinking a little and growing back
        // copies nothing (and a block grown ahead, below, keeps its room).
        if size >= usable / 2 {
            return p;
        }
        // Shrink: NolockAlloc's realloc moves to a smaller class or frees tail pages, never fails.
        // SAFETY: `p` is a live block of `usable` bytes aligned to at least 16 (every block is), so the layout
        // describes it; `size` is non-zero and at most `usable`.
        return unsafe {
            crate::ALLOC.realloc(p.cast(), Layout::from_size_align_unchecked(usable, MALLOC_ALIGN), size).cast()
        };
    }
    // Grow. A block of a page or more grows by half again at least, so that a buffer grown a little at a time
    // is copied O(log n) times, not at every growth (quadratic: glibc grows its large blocks with `mremap`).
    // The pages of the room ahead are not touched until used.
    let ahead = if usable >= PAGE_SIZE { size.max(usable.saturating_add(usable / 2)) } else { size };
    let mut q = if ahead > size { alloc16(ahead, Gfp::NONE) } else { core::ptr::null_mut() };
    if q.is_null() {
        q = alloc16(size, Gfp::NONE);
    }
    if !q.is_null() {
        // SAFETY: `p` is valid for `usable` bytes, `q` for `size > usable`; distinct blocks.
        unsafe {
            core::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), usable);
            free_owned(p);
        }
    }
    q
}

/// `realloc` of a block nolock does not own: its size is unknown, so copy as much of `size` bytes from it as
/// is mapped, page by page (`process_vm_readv` on ourselves fails on an unmapped page instead of faulting;
/// one request per page because its manual promises no partial transfer inside one request, although Linux
/// 6.x gives one), and leak the old block (see the crate documentation).
///
/// # Safety
/// `p` is a block of another allocator that the caller gives up.
#[cold]
#[inline(never)]
unsafe fn realloc_foreign(p: *mut c_void, size: usize) -> *mut c_void {
    let q = alloc16(size, Gfp::NONE);
    if q.is_null() {
        return q;
    }
    let saved = errno();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut done = 0;
    while done < size {
        let src = p as usize + done;
        let len = (PAGE_SIZE - src % PAGE_SIZE).min(size - done);
        // SAFETY: `q + done .. + len` lies inside the new block of `size` bytes.
        let local = libc::iovec { iov_base: unsafe { q.cast::<u8>().add(done) }.cast(), iov_len: len };
        let remote = libc::iovec { iov_base: src as *mut c_void, iov_len: len };
        // SAFETY: reads from our own address space into `q`; an unmapped source page fails the call instead of
        // faulting.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 && done == 0 {
            // Not permitted (seccomp): copy up to the end of the block's first page, which is mapped.
            // SAFETY: `p .. p + len` lies in one mapped page; `q` is valid for `size >= len` bytes.
            unsafe { core::ptr::copy_nonoverlapping(p.cast::<u8>(), q.cast::<u8>(), len) };
        }
        if n != len as isize {
            break;
        }
        done += len;
    }
    set_errno(saved);
    foreign_free();
    q
}

fn errno() -> i32 {
    // SAFETY: reads the calling thread's errno.
    unsafe { *libc::__errno_location() }
}

/// `reallocarray(3)`: `realloc(p, n * size)`, null with `ENOMEM` if the product overflows (`p` untouched).
///
/// # Safety
/// As [`realloc`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: forwarded from the caller.
        Some(total) => unsafe { realloc(p, total) },
        None => enomem(),
    }
}

/// `posix_memalign(3)`.
///
/// # Safety
/// `memptr` is valid for a pointer write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(memptr: *mut *mut c_void, align: usize, size: usize) -> c_int {
    const WORD: usize = core::mem::size_of::<*mut c_void>();
    if !align.is_power_of_two() || !align.is_multiple_of(WORD) {
        return libc::EINVAL;
    }
    let saved = errno();
    let p = alloc_aligned(size, align);
    if p.is_null() {
        set_errno(saved);
        return libc::ENOMEM;
    }
    // SAFETY: the caller gives a writable `memptr`.
    unsafe { *memptr = p };
    0
}

/// `aligned_alloc(3)`: null with `EINVAL` unless `align` is a power of two (glibc 2.38 and later).
#[unsafe(no_mangle)]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    alloc_aligned(size, align)
}

/// `memalign(3)`: an alignment that is not a power of two is rounded up to one (glibc); one above half the
/// address space gives null with `EINVAL`.
#[unsafe(no_mangle)]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    match align.checked_next_power_of_two() {
        Some(a) if a <= isize::MAX as usize + 1 => alloc_aligned(size, a),
        _ => {
            set_errno(libc::EINVAL);
            core::ptr::null_mut()
        }
    }
}

/// `valloc(3)`: page aligned.
#[unsafe(no_mangle)]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    alloc_aligned(size, PAGE_SIZE)
}

/// `pvalloc(3)`: page aligned, the size rounded up to whole pages (one page for 0).
#[unsafe(no_mangle)]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    match size.max(1).checked_next_multiple_of(PAGE_SIZE) {
        Some(n) => alloc_aligned(n, PAGE_SIZE),
        None => enomem(),
    }
}

/// `malloc_usable_size(3)`: the bytes usable in the block (at least what was asked); 0 for null and for
/// pointers nolock does not own.
#[unsafe(no_mangle)]
pub extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if owned(p) { ksize(p.cast()) } else { 0 }
}

/// `malloc_trim(3)`: give free memory back to the OS now ([`nolock::trim`]). Returns 1 if memory was released,
/// 0 otherwise.
///
/// # Context
/// Normal context only: `madvise` system calls; may wait for a shrink in progress on another thread.
#[unsafe(no_mangle)]
pub extern "C" fn malloc_trim(_pad: usize) -> c_int {
    let r = nolock::trim();
    c_int::from(r.pages_purged > 0 || r.slabs_released > 0)
}

/// How many pointers nolock did not own were given to `free` or `realloc` (and leaked) so far.
#[unsafe(no_mangle)]
pub extern "C" fn nolock_c_foreign_frees() -> u64 {
    FOREIGN_FREES.load(Ordering::Relaxed)
}
