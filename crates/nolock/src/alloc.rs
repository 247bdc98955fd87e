//! [`NolockAlloc`]: nolock as a `GlobalAlloc`, so that ordinary Rust collections allocate from the arena.

use core::alloc::{GlobalAlloc, Layout};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::global::{self, Config, Size};
use crate::page::Gfp;
use crate::slab::kmalloc::{kfree_nolock, kmalloc_layout_nolock, krealloc_shrink, ksize};

/// A [`GlobalAlloc`] over `kmalloc_layout_nolock` / `kfree_nolock`.
///
/// ```no_run
/// use std::time::Duration;
///
/// #[global_allocator]
/// static A: nolock::NolockAlloc = nolock::NolockAlloc::new();
///
/// // Or with settings, read by the first allocation (the Rust runtime's, before `main`):
/// // static A: nolock::NolockAlloc =
/// //     nolock::NolockAlloc::with_config(nolock::Config::new().arena_size(64 << 30).purge_interval(None));
/// ```
///
/// Every allocation the program makes then comes from nolock, including from signal handlers. Zero-size
/// requests never reach a `GlobalAlloc`. Alignments up to the arena's size are honoured; a larger one gets a
/// null pointer (Rust's allocation-error handler then reports it), never misaligned memory.
///
/// When an allocation fails, the allocator says why on standard error, once per process (the arena is full,
/// or the alignment is above what it can give), naming `NOLOCK_ARENA_SIZE`, before returning null; Rust's
/// allocation-error handler then prints "memory allocation of N bytes failed" and aborts.
///
/// `realloc` to a smaller size gives memory back: an object moves to a smaller size class, a large (page-run)
/// allocation frees its tail pages in place.
///
/// Configuration: [`Config::apply`] cannot work for a global allocator (the runtime allocates before `main`);
/// use [`NolockAlloc::with_config`] or the environment variables listed at [`Config`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NolockAlloc {
    cfg: Config,
}

impl NolockAlloc {
    /// An allocator with every setting from the environment or its default.
    pub const fn new() -> Self {
        Self { cfg: Config::new() }
    }

    /// An allocator that initialises nolock with `cfg` (settings not given in `cfg` come from the environment
    /// or their default). `cfg` is used only if this allocator's first allocation is what initialises nolock;
    /// an arena size out of range is clamped into it, with a message on standard error.
    pub const fn with_config(cfg: Config) -> Self {
        Self { cfg }
    }

    /// First use: initialise with our configuration.
    #[cold]
    #[inline(never)]
    fn first_use(&self) {
        let _ = global::get_with(&self.cfg);
    }
}

static FAILURE_REPORTED: AtomicBool = AtomicBool::new(false);

/// An allocation failed: say why, once per process, before Rust's "memory allocation of N bytes failed" (raw
/// `write`, no allocation). Nothing is said when nolock could not start at all: initialisation said why.
#[cold]
#[inline(never)]
fn report_failure(layout: Layout) -> *mut u8 {
    if let Some(g) = global::get_if_init()
        && !FAILURE_REPORTED.swap(true, Ordering::Relaxed)
    {
        let st = g.pages.stats();
        let mut m = crate::sys::StackBuf::<512>::new();
        let _ = if layout.align() > st.max_align {
            writeln!(
                m,
                "nolock: NolockAlloc cannot align {} bytes to {}: the arena's base gives at most {} (a larger \
                 NOLOCK_ARENA_SIZE raises it).",
                layout.size(),
                Size(layout.align()),
                Size(st.max_align)
            )
        } else {
            writeln!(
                m,
                "nolock: NolockAlloc found no room for {} bytes: the arena of {} ({} in use) caps the heap; set \
                 NOLOCK_ARENA_SIZE (or Config::arena_size in NolockAlloc::with_config) larger.",
                layout.size(),
                Size(st.arena_pages * crate::sys::PAGE_SIZE),
                Size(st.used_pages * crate::sys::PAGE_SIZE)
            )
        };
        crate::sys::write_stderr(m.as_bytes());
    }
    core::ptr::null_mut()
}

// SAFETY: kmalloc_layout_nolock returns memory of at least `layout.size()` bytes aligned to `layout.align()`,
// or null (it refuses alignments it cannot honour); kfree_nolock accepts exactly those pointers; realloc keeps
// the first `min(old, new)` bytes and returns a block valid for the new size and the old alignment.
unsafe impl GlobalAlloc for NolockAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if global::get_if_init().is_none() {
            self.first_use();
        }
        kmalloc_layout_nolock(layout, Gfp::NONE).map_or_else(|| report_failure(layout), |p| p.as_ptr())
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if global::get_if_init().is_none() {
            self.first_use();
        }
        kmalloc_layout_nolock(layout, Gfp::ZERO).map_or_else(|| report_failure(layout), |p| p.as_ptr())
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` and the caller gives it up.
        unsafe { kfree_nolock(ptr) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let usable = ksize(ptr);
        if new_size <= usable {
            // SAFETY: `ptr` is a live allocation of ours with `layout`; `new_size` (non-zero, at most its usable
            // size) with `layout.align()` is a valid layout (caller).
            return unsafe { krealloc_shrink(ptr, usable, new_size, layout.align()) };
        }
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: forwarded from the caller.
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap.
            unsafe {
                core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}
