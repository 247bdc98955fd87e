//! The public page API over the process's arena: `alloc_pages_nolock`, `free_pages_nolock`, `prefault`.
//!
//! The page allocator itself ([`crate::page`]) knows nothing of the process-wide state; these entry points
//! find the arena through [`crate::global`] (initialising it on first use) and report refused frees through
//! [`crate::report`], so that the page layer imports nothing above it.

use core::ptr::NonNull;

use crate::page::{Gfp, PagesError, PrefaultError};

/// Largest order [`alloc_pages_nolock`] accepts (2^20 pages = 4 GiB).
pub const MAX_ORDER: u32 = 20;

/// Allocate `2^order` contiguous pages, aligned to their size up to 256 KiB (runs of more than 64 pages are
/// aligned to 256 KiB). With [`Gfp::ZERO`] the pages are zeroed (only pages that were used before are written).
///
/// Returns `None` only when the arena has no free run of that size (the arena's size is set by
/// [`crate::Config`] or `NOLOCK_ARENA_SIZE`), or when `order > MAX_ORDER`.
///
/// # Context
/// Any context: async-signal-safe, reentrant (a signal handler may call it while it runs on the same thread),
/// never blocks, never takes a lock, never allocates. The very first nolock call reserves the arena with
/// `mmap`; later calls make no system call, except `mprotect` (and `mlock` under `mlockall(MCL_FUTURE)`) when
/// the memory committed ahead of need is used up (see the [page module documentation](crate::page)).
pub fn alloc_pages_nolock(order: u32, flags: Gfp) -> Option<NonNull<u8>> {
    if order > MAX_ORDER {
        return None;
    }
    crate::global::get()?.pages.alloc_pages(order, flags)
}

/// Commit and fault in the pages nolock uses now and `bytes` more, so that allocations of up to about `bytes`
/// (beyond what is in use) make no page fault and no system call: the real-time set-up step after
/// `mlockall`, or instead of it. Pages stay resident until they are allocated, freed and then purged (turn
/// the purge off with [`crate::Config::purge_interval`] or `NOLOCK_PURGE=never` to keep them).
///
/// Uses `MADV_POPULATE_WRITE` (Linux 5.14); on older kernels it claims the free pages a word at a time and
/// writes to them. Pages already in use are faulted in too, without touching their contents.
///
/// # Errors
/// [`PrefaultError::ArenaTooSmall`] if the arena ends first (all of it is prefaulted then);
/// [`PrefaultError::Kernel`] if the kernel refuses (for example over `RLIMIT_MEMLOCK` under `mlockall`);
/// [`PrefaultError::Unavailable`] if nolock could not be initialised.
///
/// # Context
/// Normal context only: system calls that take long (every page faulted in is zero-filled). Initialises
/// nolock if needed. Safe to run while other threads allocate.
pub fn prefault(bytes: usize) -> Result<(), PrefaultError> {
    crate::global::get().ok_or(PrefaultError::Unavailable)?.pages.prefault(bytes)
}

/// Free pages from [`alloc_pages_nolock`], checking the pointer and the order first.
///
/// # Safety
/// If the pointer passes the checks, the pages must not be used afterwards.
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free, never blocks.
pub unsafe fn try_free_pages_nolock(ptr: NonNull<u8>, order: u32) -> Result<(), PagesError> {
    let g = crate::global::get().ok_or(PagesError::Foreign)?;
    // SAFETY: forwarded.
    unsafe { g.pages.try_free_pages(ptr, order) }
}

/// Free `2^order` pages from [`alloc_pages_nolock`]. A bad pointer or order is reported on standard error (raw
/// `write`, no allocation) and counted; nothing is freed then.
///
/// # Safety
/// The pages must not be used afterwards.
///
/// # Context
/// Any context: async-signal-safe, reentrant, lock-free, never blocks. Never fails for a valid pointer.
pub unsafe fn free_pages_nolock(ptr: NonNull<u8>, order: u32) {
    // SAFETY: forwarded.
    if let Err(e) = unsafe { try_free_pages_nolock(ptr, order) } {
        crate::report::emit(format_args!(
            "invalid free_pages_nolock({:#x}, order {order}): {e}; nothing was freed",
            ptr.as_ptr() as usize
        ));
    }
}
