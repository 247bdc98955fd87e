//! The `Allocator` trait (through the [`allocator_api2`] crate, so it works on stable Rust) for nolock's kmalloc
//! ([`Kmalloc`]) and for a [`KmemCache`] (`&KmemCache`), behind the `allocator-api2` feature.
//!
//! Collections that take an allocator — `allocator_api2::vec::Vec`, `allocator_api2::boxed::Box`, and
//! `hashbrown` with its `allocator-api2` feature — then live in nolock memory, and every allocation, growth and
//! free they make is async-signal-safe: a signal handler can build a `Vec` or a hash map without a global
//! allocator of nolock's.
//!
//! ```
//! use allocator_api2::vec::Vec;
//! use nolock::Kmalloc;
//!
//! let mut v: Vec<u64, Kmalloc> = Vec::new_in(Kmalloc);
//! v.extend(0..1000); // grows by kmalloc_nolock / kfree_nolock: fine in a signal handler
//! assert_eq!(v.iter().sum::<u64>(), 999 * 1000 / 2);
//! ```
//!
//! Allocation failures are errors (`AllocError`), so use the fallible methods (`try_reserve`, `try_insert` and
//! the like) where running out of memory must not abort: the infallible ones call `handle_alloc_error`, which
//! aborts.
//!
//! A [`KmemCache`] serves objects of one size: `&KmemCache` hands out one object for any layout whose size is
//! at most the cache's object size and whose alignment the object meets, and refuses anything else with
//! `AllocError` (so a `Vec` over a cache works up to the capacity that fits one object, and its growth beyond
//! fails cleanly).

use core::alloc::Layout;
use core::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator};

use crate::page::Gfp;
use crate::slab::KmemCache;
use crate::slab::kmalloc::{kfree_nolock, kmalloc_layout_nolock};

/// nolock's kmalloc as an allocator: a zero-sized handle over `kmalloc_layout_nolock` / `kfree_nolock`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Kmalloc;

/// A zero-length block for a zero-size layout: a dangling pointer with the layout's alignment.
#[inline]
fn empty(layout: Layout) -> NonNull<[u8]> {
    // A power of two is never zero.
    let p = NonNull::new(layout.align() as *mut u8).unwrap_or(NonNull::dangling());
    NonNull::slice_from_raw_parts(p, 0)
}

// SAFETY: blocks come from kmalloc_layout_nolock, which honours size and alignment (or fails), and stay valid
// until `deallocate`; the handle is zero-sized and every copy frees into the same kmalloc, so blocks may move
// between copies; zero-size layouts get a dangling, aligned pointer that `deallocate` ignores.
unsafe impl Allocator for Kmalloc {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(empty(layout));
        }
        let p = kmalloc_layout_nolock(layout, Gfp::NONE).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    #[inline]
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(empty(layout));
        }
        let p = kmalloc_layout_nolock(layout, Gfp::ZERO).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: a block of ours (caller), given up.
            unsafe { kfree_nolock(ptr.as_ptr()) };
        }
    }
}

/// Whether a block for `layout` can be one object of `cache` (size only; the alignment is checked on the
/// object).
#[inline]
fn fits(cache: &KmemCache, layout: Layout) -> bool {
    layout.size() <= cache.object_size()
}

#[inline]
fn allocate_object(cache: &KmemCache, layout: Layout, flags: Gfp) -> Result<NonNull<[u8]>, AllocError> {
    if layout.size() == 0 {
        return Ok(empty(layout));
    }
    if !fits(cache, layout) {
        return Err(AllocError);
    }
    let p = cache.alloc_nolock(flags).ok_or(AllocError)?;
    if !(p.as_ptr() as usize).is_multiple_of(layout.align()) {
        // SAFETY: just allocated from this cache, never handed out.
        unsafe { cache.free_nolock(p) };
        return Err(AllocError);
    }
    Ok(NonNull::slice_from_raw_parts(p, layout.size()))
}

// SAFETY: blocks are objects of this cache (at least `layout.size()` bytes, alignment checked on each), valid
// until `deallocate` frees them into the same cache; the cache outlives the reference, hence every block;
// zero-size layouts get a dangling, aligned pointer that `deallocate` ignores. (`&KmemCache` gets the trait
// through allocator-api2's blanket impl for references.)
unsafe impl Allocator for KmemCache {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        allocate_object(self, layout, Gfp::NONE)
    }

    #[inline]
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        allocate_object(self, layout, Gfp::ZERO)
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: an object of this cache (caller), given up.
            unsafe { self.free_nolock(ptr) };
        }
    }

    #[inline]
    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // Every block is a whole object: growth within the object stays in place.
        if old_layout.size() != 0
            && fits(self, new_layout)
            && (ptr.as_ptr() as usize).is_multiple_of(new_layout.align())
        {
            return Ok(NonNull::slice_from_raw_parts(ptr, new_layout.size()));
        }
        let new = self.allocate(new_layout)?;
        // SAFETY: both blocks are valid for the old size (new ≥ old) and distinct; the old one is given up.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr() as *mut u8, old_layout.size());
            self.deallocate(ptr, old_layout);
        }
        Ok(new)
    }

    #[inline]
    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if new_layout.size() == 0 {
            // SAFETY: given up by the caller.
            unsafe { self.deallocate(ptr, old_layout) };
            return Ok(empty(new_layout));
        }
        if (ptr.as_ptr() as usize).is_multiple_of(new_layout.align()) {
            return Ok(NonNull::slice_from_raw_parts(ptr, new_layout.size()));
        }
        let new = self.allocate(new_layout)?;
        // SAFETY: both blocks are valid for the new size (new ≤ old) and distinct; the old one is given up.
        unsafe {
            core::ptr::copy_nonoverlapping(ptr.as_ptr(), new.as_ptr() as *mut u8, new_layout.size());
            self.deallocate(ptr, old_layout);
        }
        Ok(new)
    }
}
