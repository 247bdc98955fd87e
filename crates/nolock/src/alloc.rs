//! [`NolockAlloc`]: nolock as a `GlobalAlloc`, so that ordinary Rust collections allocate from the arena.

use core::alloc::{GlobalAlloc, Layout};

use crate::page::Gfp;
use crate::slab::kmalloc::{kfree_nolock, kmalloc_layout_nolock, ksize};

/// A [`GlobalAlloc`] over `kmalloc_layout_nolock` / `kfree_nolock`.
///
/// ```no_run
/// #[global_allocator]
/// static A: nolock::NolockAlloc = nolock::NolockAlloc;
/// ```
///
/// Every allocation the program makes then comes from nolock, including from signal handlers. Zero-size
/// requests never reach a `GlobalAlloc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NolockAlloc;

// SAFETY: kmalloc_layout_nolock returns memory of at least `layout.size()` bytes aligned to `layout.align()`,
// or null; kfree_nolock accepts exactly those pointers.
unsafe impl GlobalAlloc for NolockAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        kmalloc_layout_nolock(layout, Gfp::NONE).map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        kmalloc_layout_nolock(layout, Gfp::ZERO).map_or(core::ptr::null_mut(), |p| p.as_ptr())
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` and the caller gives it up.
        unsafe { kfree_nolock(ptr) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size <= ksize(ptr) {
            return ptr;
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
